// Loss scaling (`precision = f16`): before each micro-step's plan, the plan's `grad_seed` input (the
// adjoint of the loss) becomes loss scale / accumulate, read from the GPU-held scale, so the backward
// pass runs on scaled gradients with no host round trip.
@group(0) @binding(0) var<storage, read> stats: Stats;
@group(0) @binding(1) var<storage, read_write> seed: array<f32>;

@compute @workgroup_size(1)
fn main() {
    seed[0] = stats.loss_scale / f32(ACCUMULATE);
}
