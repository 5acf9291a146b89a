// AdamW with PyTorch's semantics (torch.optim.AdamW, foreach=False): decoupled weight decay
// p *= 1 - lr * wd, m = lerp(m, g, 1 - beta1), v = beta2 * v + (1 - beta2) * g^2,
// p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps). g is the clipped gradient; lr (and
// so lr / (1 - beta1^t)) is scaled by the element's expert multiplier under `expert_lr = adaptive`.
@group(0) @binding(0) var<storage, read> info: ParamInfo;
@group(0) @binding(1) var<storage, read> scalars: Scalars;
@group(0) @binding(2) var<storage, read> stats: Stats;
@group(0) @binding(3) var<storage, read_write> param: array<f32>;
@group(0) @binding(4) var<storage, read> grad: array<f32>;
@group(0) @binding(5) var<storage, read_write> m: array<f32>;
@group(0) @binding(6) var<storage, read_write> v: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wg, nwg, lid);
    if (i >= arrayLength(&param) || stats.bad != 0u) {
        return;
    }
    let g = grad[i] * stats.scale;
    let scale = stats.lr_scale[lr_scale_index(info, i)];
    let lr = scalars.lr[info.group] * scale;
    let p = param[i] * (1.0 - lr * info.decay);
    let mi = m[i] + (1.0 - BETA1) * (g - m[i]);
    let vi = v[i] * BETA2 + (1.0 - BETA2) * g * g;
    m[i] = mi;
    v[i] = vi;
    let denom = sqrt(vi) / scalars.bc2_sqrt + EPS;
    param[i] = p - scalars.step_size[info.group] * scale * (mi / denom);
}
