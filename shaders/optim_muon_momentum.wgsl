// Muon, stage 1 (one workgroup per matrix; each expert of a stack is its own matrix): the momentum
// M ← MOMENTUM·M + G, U = G + MOMENTUM·M with Nesterov (else M), and the Newton–Schulz start
// X₀ = U / (‖U‖_F + 1e-7). G is the clipped gradient. The norm is a fixed-order workgroup sum.
@group(0) @binding(0) var<storage, read> info: ParamInfo;
@group(0) @binding(1) var<storage, read> stats: Stats;
@group(0) @binding(2) var<storage, read> grad: array<f32>;
@group(0) @binding(3) var<storage, read_write> momentum: array<f32>;
@group(0) @binding(4) var<storage, read_write> x: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let m = wg.x + wg.y * nwg.x;
    let size = info.rows * info.cols;
    let live = m < info.matrices && stats.bad == 0u;
    var s = 0.0;
    if (live) {
        for (var t = lid; t < size; t = t + WG) {
            let i = m * size + t;
            let g = grad[i] * stats.scale;
            let b = MOMENTUM * momentum[i] + g;
            momentum[i] = b;
            var u = b;
            if (NESTEROV) {
                u = g + MOMENTUM * b;
            }
            x[i] = u;
            s = s + u * u;
        }
    }
    let norm = sqrt(workgroup_sum(lid, s));
    if (live) {
        for (var t = lid; t < size; t = t + WG) {
            let i = m * size + t;
            x[i] = x[i] / (norm + 1e-7);
        }
    }
}
