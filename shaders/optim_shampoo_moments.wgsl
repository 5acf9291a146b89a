// Shampoo, stage 1 (every preconditioned matrix, elementwise): Adam's moments, which Shampoo keeps
// for every parameter to graft its step size: m = lerp(m, g, 1 - beta1), v = beta2·v + (1 - beta2)·g².
// g is the clipped gradient.
@group(0) @binding(0) var<storage, read> stats: Stats;
@group(0) @binding(1) var<storage, read> grad: array<f32>;
@group(0) @binding(2) var<storage, read_write> m: array<f32>;
@group(0) @binding(3) var<storage, read_write> v: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wg, nwg, lid);
    if (i >= arrayLength(&m) || stats.bad != 0u) {
        return;
    }
    let g = grad[i] * stats.scale;
    m[i] = m[i] + (1.0 - BETA1) * (g - m[i]);
    v[i] = v[i] * BETA2 + (1.0 - BETA2) * g * g;
}
