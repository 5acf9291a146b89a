// Muon Newton–Schulz iteration, part 3 of 3: X' = NS_A·X + B·X (rows ≤ cols), or X' = NS_A·X + X·B
// when rows > cols (the transposed iteration Xᵀ' = NS_A·Xᵀ + B·Xᵀ, B symmetric). X and X' are two
// buffers used in turn.
@group(0) @binding(0) var<storage, read> info: ParamInfo;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = linear_index(wg, nwg, lid);
    if (t >= arrayLength(&y)) {
        return;
    }
    let size = info.rows * info.cols;
    let s = min(info.rows, info.cols);
    let m = t / size;
    let r = (t % size) / info.cols;
    let c = t % info.cols;
    let base = m * size;
    let bb = m * s * s;
    var acc = 0.0;
    if (info.rows <= info.cols) {
        for (var k = 0u; k < s; k = k + 1u) {
            acc = acc + b[bb + r * s + k] * x[base + k * info.cols + c];
        }
    } else {
        for (var k = 0u; k < s; k = k + 1u) {
            acc = acc + x[base + r * info.cols + k] * b[bb + k * s + c];
        }
    }
    y[t] = NS_A * x[t] + acc;
}
