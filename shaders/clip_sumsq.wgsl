// Global-norm clip, stage 1: each workgroup sums the squares of a grid-strided part of one
// parameter's gradient and writes one partial sum. Fixed order, so the norm is deterministic.
@group(0) @binding(0) var<storage, read> info: ParamInfo;
@group(0) @binding(1) var<storage, read> grad: array<f32>;
@group(0) @binding(2) var<storage, read_write> partials: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    // The binding is exactly the gradient (or its slice): runtime/src/optim.rs binds that byte range
    // of a buffer the plan may share with larger activations.
    let n = arrayLength(&grad);
    let stride = info.partials * WG;
    var s = 0.0;
    for (var i = wg.x * WG + lid; i < n; i = i + stride) {
        let g = grad[i];
        s = s + g * g;
    }
    let total = workgroup_sum(lid, s);
    if (lid == 0u) {
        partials[info.slot + wg.x] = total;
    }
}
