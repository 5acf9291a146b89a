// After each micro-step: sums the plan's `loss` and `ce` outputs over the micro-steps of the
// optimizer step, so the host reads them only on log steps.
@group(0) @binding(0) var<storage, read> scalars: Scalars;
@group(0) @binding(1) var<storage, read> loss: array<f32>;
@group(0) @binding(2) var<storage, read> ce: array<f32>;
@group(0) @binding(3) var<storage, read_write> stats: Stats;

@compute @workgroup_size(1)
fn main() {
    if (scalars.micro == 0u) {
        stats.loss = loss[0];
        stats.ce = ce[0];
    } else {
        stats.loss = stats.loss + loss[0];
        stats.ce = stats.ce + ce[0];
    }
}
