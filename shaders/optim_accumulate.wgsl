// Gradient accumulation: acc = grad on the first micro-step, acc += grad on the others. The plan
// already scales its gradients by grad_seed = 1 / accumulate, so acc ends as the mean gradient.
@group(0) @binding(0) var<storage, read> scalars: Scalars;
@group(0) @binding(1) var<storage, read> grad: array<f32>;
@group(0) @binding(2) var<storage, read_write> acc: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wg, nwg, lid);
    if (i >= arrayLength(&acc)) {
        return;
    }
    if (scalars.micro == 0u) {
        acc[i] = grad[i];
    } else {
        acc[i] = acc[i] + grad[i];
    }
}
