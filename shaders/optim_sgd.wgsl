// SGD with momentum, PyTorch's semantics (dampening 0, no Nesterov): buf = momentum * buf + g,
// p -= lr * buf (lr times the expert multiplier). The first step's buf = g, as PyTorch's clone,
// because buf starts at zero.
@group(0) @binding(0) var<storage, read> info: ParamInfo;
@group(0) @binding(1) var<storage, read> scalars: Scalars;
@group(0) @binding(2) var<storage, read> stats: Stats;
@group(0) @binding(3) var<storage, read_write> param: array<f32>;
@group(0) @binding(4) var<storage, read> grad: array<f32>;
@group(0) @binding(5) var<storage, read_write> buf: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wg, nwg, lid);
    if (i >= arrayLength(&param) || stats.bad != 0u) {
        return;
    }
    let b = MOMENTUM * buf[i] + grad[i] * stats.scale;
    buf[i] = b;
    param[i] = param[i] - scalars.lr[info.group] * stats.lr_scale[lr_scale_index(info, i)] * b;
}
