// Adafactor, stage 3 of 3: u = adafactor_update / max(1, RMS(u) / CLIP_THRESHOLD) with RMS over the
// element's matrix (HF's norm(u) / sqrt(numel)), then p -= lr * u (lr times the expert multiplier).
// No first moment (beta1 = None) and no weight decay (the spec's adafactor has none).
@group(0) @binding(0) var<storage, read> info: ParamInfo;
@group(0) @binding(1) var<storage, read> scalars: Scalars;
@group(0) @binding(2) var<storage, read> stats: Stats;
@group(0) @binding(3) var<storage, read_write> param: array<f32>;
@group(0) @binding(4) var<storage, read> grad: array<f32>;
@group(0) @binding(5) var<storage, read> moments: array<f32>;
@group(0) @binding(6) var<storage, read> scratch: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wg, nwg, lid);
    if (i >= arrayLength(&param) || stats.bad != 0u) {
        return;
    }
    let size = info.rows * info.cols;
    let m = i / size;
    var sumsq = 0.0;
    for (var p = 0u; p < info.chunks; p = p + 1u) {
        sumsq = sumsq + scratch[info.matrices + m * info.chunks + p];
    }
    let rms = sqrt(sumsq) / sqrt(f32(size));
    let u = adafactor_update(m, i % size, scratch[m]) / max(1.0, rms / CLIP_THRESHOLD);
    let lr = scalars.lr[info.group] * stats.lr_scale[lr_scale_index(info, i)];
    param[i] = param[i] - lr * u;
}
