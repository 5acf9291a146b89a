// Muon Newton–Schulz iteration, part 1 of 3: A = X·Xᵀ per matrix, s × s with s = min(rows, cols).
// When rows > cols the iteration runs on Xᵀ (LANGUAGE.md) without transposing anything: A = XᵀX.
@group(0) @binding(0) var<storage, read> info: ParamInfo;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> a: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = linear_index(wg, nwg, lid);
    let s = min(info.rows, info.cols);
    if (t >= info.matrices * s * s) {
        return;
    }
    let m = t / (s * s);
    let i = (t % (s * s)) / s;
    let j = t % s;
    let base = m * info.rows * info.cols;
    var acc = 0.0;
    if (info.rows <= info.cols) {
        for (var k = 0u; k < info.cols; k = k + 1u) {
            acc = acc + x[base + i * info.cols + k] * x[base + j * info.cols + k];
        }
    } else {
        for (var k = 0u; k < info.rows; k = k + 1u) {
            acc = acc + x[base + k * info.cols + i] * x[base + k * info.cols + j];
        }
    }
    a[t] = acc;
}
