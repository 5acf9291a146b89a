// Global-norm clip, stage 2 (one workgroup): norm = sqrt(sum of all partial sums); the clip scale is
// PyTorch's clip_grad_norm_: min(1, CLIP / (norm + 1e-6)), or 1 without a clip (CLIP = 0). A
// non-finite norm or loss sets the sticky `bad` flag, which makes every later update a no-op.
@group(0) @binding(0) var<storage, read> scalars: Scalars;
@group(0) @binding(1) var<storage, read> partials: array<f32>;
@group(0) @binding(2) var<storage, read_write> stats: Stats;

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32) {
    let n = arrayLength(&partials);
    var s = 0.0;
    for (var i = lid; i < n; i = i + WG) {
        s = s + partials[i];
    }
    let norm = sqrt(workgroup_sum(lid, s));
    if (lid == 0u) {
        stats.norm = norm;
        var scale = 1.0;
        if (CLIP > 0.0) {
            scale = min(1.0, CLIP / (norm + 1e-6));
        }
        stats.scale = scale;
        if ((!is_finite(norm) || !is_finite(stats.loss)) && stats.bad == 0u) {
            stats.bad = 1u;
            stats.bad_step = scalars.step;
        }
    }
}
