// Muon Newton–Schulz iteration, part 2 of 3: B = NS_B·A + NS_C·A·A per matrix (s × s).
@group(0) @binding(0) var<storage, read> info: ParamInfo;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read_write> b: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = linear_index(wg, nwg, lid);
    let s = min(info.rows, info.cols);
    if (t >= info.matrices * s * s) {
        return;
    }
    let base = (t / (s * s)) * s * s;
    let i = (t % (s * s)) / s;
    let j = t % s;
    var acc = 0.0;
    for (var k = 0u; k < s; k = k + 1u) {
        acc = acc + a[base + i * s + k] * a[base + k * s + j];
    }
    b[t] = NS_B * a[t] + NS_C * acc;
}
