// `expert_lr = adaptive`, once per MoE layer after each micro-step: sum = the layer's per-expert load
// (the plan's `moe.N.load`) summed over the micro-steps so far, and each expert's lr multiplier
// mean / max(load_e, mean / E) = min(mean / load_e, E), mean = sum of the loads / E, written to
// Stats.lr_scale[layer.offset + e]. The cap E also covers an expert that processed no token; a layer
// with no load at all gets 1. The last micro-step's values are the step's. One invocation: E is small.
struct Layer {
    offset: u32,
    experts: u32,
}

@group(0) @binding(0) var<storage, read> scalars: Scalars;
@group(0) @binding(1) var<storage, read> layer: Layer;
@group(0) @binding(2) var<storage, read> load: array<f32>;
@group(0) @binding(3) var<storage, read_write> sum: array<f32>;
@group(0) @binding(4) var<storage, read_write> stats: Stats;

@compute @workgroup_size(1)
fn main() {
    let n = layer.experts;
    var total = 0.0;
    for (var e = 0u; e < n; e = e + 1u) {
        var s = load[e];
        if (scalars.micro != 0u) {
            s = sum[e] + s;
        }
        sum[e] = s;
        total = total + s;
    }
    let mean = total / f32(n);
    for (var e = 0u; e < n; e = e + 1u) {
        var x = 1.0;
        if (mean > 0.0) {
            x = mean / max(sum[e], mean / f32(n));
        }
        stats.lr_scale[layer.offset + e] = x;
    }
}
