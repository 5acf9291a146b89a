// Shampoo, stage 4: D = P_L·T = P_L·G·P_R per matrix (P_L = (L + eps·I)^(−1/4)).
@group(0) @binding(0) var<storage, read> info: ParamInfo;
@group(0) @binding(1) var<storage, read> left_root: array<f32>;
@group(0) @binding(2) var<storage, read> tmp: array<f32>;
@group(0) @binding(3) var<storage, read_write> d: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = linear_index(wg, nwg, lid);
    if (t >= arrayLength(&d)) {
        return;
    }
    let r = info.rows;
    let c = info.cols;
    let size = r * c;
    let m = t / size;
    let i = (t % size) / c;
    let j = t % c;
    let p = m * r * r + i * r;
    var acc = 0.0;
    for (var k = 0u; k < r; k = k + 1u) {
        acc = acc + left_root[p + k] * tmp[m * size + k * c + j];
    }
    d[t] = acc;
}
