// Global-norm clip, stage 2 (one workgroup): norm = sqrt(sum of all partial sums) / loss scale (the
// gradients are those of the loss times the scale); the clip scale is PyTorch's clip_grad_norm_:
// min(1, CLIP / (norm + 1e-6)), or 1 without a clip (CLIP = 0), and `stats.scale`, which every
// update multiplies the gradient by, also divides by the loss scale (GradScaler's unscale_).
// A non-finite loss, or a non-finite gradient without loss scaling (LOSS_SCALING = 0) or at a loss
// scale of 1 or less, sets the sticky `bad` flag, which makes every later update a no-op. Under loss
// scaling a non-finite gradient instead skips this step's update (`bad` = 2, cleared by the next
// step's finalize), halves the scale and counts the skip; GROWTH_INTERVAL finite steps in a row
// double it (torch.amp.GradScaler: backoff 0.5, growth 2).
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
    let scaled_norm = sqrt(workgroup_sum(lid, s));
    if (lid == 0u) {
        if (stats.bad == 2u) {
            stats.bad = 0u;
        }
        let loss_scale = stats.loss_scale;
        let norm = scaled_norm / loss_scale;
        stats.norm = norm;
        var scale = 1.0;
        if (CLIP > 0.0) {
            scale = min(1.0, CLIP / (norm + 1e-6));
        }
        stats.scale = scale / loss_scale;
        let finite = is_finite(scaled_norm);
        let recoverable = LOSS_SCALING != 0u && loss_scale > 1.0;
        if ((!is_finite(stats.loss) || (!finite && !recoverable)) && stats.bad == 0u) {
            stats.bad = 1u;
            stats.bad_step = scalars.step;
        } else if (!finite && stats.bad == 0u) {
            stats.bad = 2u;
            stats.loss_scale = loss_scale * 0.5;
            stats.good_steps = 0u;
            stats.skipped = stats.skipped + 1u;
        } else if (finite && LOSS_SCALING != 0u) {
            stats.good_steps = stats.good_steps + 1u;
            if (stats.good_steps >= GROWTH_INTERVAL) {
                stats.loss_scale = loss_scale * 2.0;
                stats.good_steps = 0u;
            }
        }
    }
}
