// Adafactor, stage 1 of 3 (HF transformers' Adafactor with beta1 = None, relative_step = False): the
// second-moment EMAs, m = beta2t * m + (1 - beta2t) * mean(g^2 + EPS), beta2t = 1 - t^decay. g is the
// clipped gradient. One workgroup per moment entry, reduced in a fixed order (deterministic):
// - factored: entries 0..M·R are exp_avg_sq_row (mean over a matrix row's C columns), entries
//   M·R..M·(R + C) exp_avg_sq_col (mean over a column's R rows), both in the one `moments` buffer;
// - a vector: one entry per element, exp_avg_sq = EMA of g^2 + EPS itself.
@group(0) @binding(0) var<storage, read> info: ParamInfo;
@group(0) @binding(1) var<storage, read> scalars: Scalars;
@group(0) @binding(2) var<storage, read> stats: Stats;
@group(0) @binding(3) var<storage, read> grad: array<f32>;
@group(0) @binding(4) var<storage, read_write> moments: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let k = wg.x + wg.y * nwg.x;
    let row_entries = info.matrices * info.rows;
    var base = k;
    var stride = 1u;
    var len = 1u;
    var entries = row_entries;
    if (info.factored != 0u) {
        entries = row_entries + info.matrices * info.cols;
        if (k < row_entries) {
            base = k * info.cols;
            len = info.cols;
        } else {
            let c = k - row_entries;
            base = (c / info.cols) * info.rows * info.cols + c % info.cols;
            stride = info.cols;
            len = info.rows;
        }
    }
    var s = 0.0;
    if (k < entries) {
        for (var t = lid; t < len; t = t + WG) {
            let g = grad[base + t * stride] * stats.scale;
            s = s + (g * g + EPS);
        }
    }
    let total = workgroup_sum(lid, s);
    if (lid == 0u && k < entries && stats.bad == 0u) {
        moments[k] = scalars.beta2t * moments[k] + (1.0 - scalars.beta2t) * (total / f32(len));
    }
}
