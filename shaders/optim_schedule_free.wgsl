// Schedule-free AdamW (Defazio et al. 2024), as schedulefree.AdamWScheduleFree: the gradient is taken
// at y (the param buffer); z is the base sequence, x the weighted average the model is evaluated and
// saved at, and y = lerp(z, x, beta1) = (1 - beta1) z + beta1 x:
//   v  = beta2 v + (1 - beta2) g^2
//   gn = g / (sqrt(v) + eps) + wd * y          (decay at y, as the package)
//   z' = z - lr * gn                           (lr already includes sqrt(1 - beta2^t) and the
//                                               expert multiplier of `expert_lr = adaptive`)
//   x' = lerp(x, z', c)                        (c = ckp1 = lr_max^2 / sum of lr_max^2)
//   y' = (1 - beta1) z' + beta1 x'
// The package stores only y and z and updates y incrementally; the result is the same algebra.
@group(0) @binding(0) var<storage, read> info: ParamInfo;
@group(0) @binding(1) var<storage, read> scalars: Scalars;
@group(0) @binding(2) var<storage, read> stats: Stats;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read> grad: array<f32>;
@group(0) @binding(5) var<storage, read_write> x: array<f32>;
@group(0) @binding(6) var<storage, read_write> z: array<f32>;
@group(0) @binding(7) var<storage, read_write> v: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wg, nwg, lid);
    if (i >= arrayLength(&y) || stats.bad != 0u) {
        return;
    }
    let g = grad[i] * stats.scale;
    let vi = v[i] * BETA2 + (1.0 - BETA2) * g * g;
    let gn = g / (sqrt(vi) + EPS) + info.decay * y[i];
    let zi = z[i] - scalars.lr[info.group] * stats.lr_scale[lr_scale_index(info, i)] * gn;
    let xi = x[i] + scalars.ckp1[info.group] * (zi - x[i]);
    v[i] = vi;
    z[i] = zi;
    x[i] = xi;
    y[i] = (1.0 - BETA1) * zi + BETA1 * xi;
}
