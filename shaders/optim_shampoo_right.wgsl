// Shampoo, stage 3: T = G·P_R per matrix (P_R = (R + eps·I)^(−1/4), from the last root step).
@group(0) @binding(0) var<storage, read> info: ParamInfo;
@group(0) @binding(1) var<storage, read> stats: Stats;
@group(0) @binding(2) var<storage, read> grad: array<f32>;
@group(0) @binding(3) var<storage, read> right_root: array<f32>;
@group(0) @binding(4) var<storage, read_write> tmp: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = linear_index(wg, nwg, lid);
    if (t >= arrayLength(&tmp)) {
        return;
    }
    let c = info.cols;
    let size = info.rows * c;
    let m = t / size;
    let i = (t % size) / c;
    let j = t % c;
    let g = m * size + i * c;
    let p = m * c * c;
    var acc = 0.0;
    for (var k = 0u; k < c; k = k + 1u) {
        acc = acc + grad[g + k] * right_root[p + k * c + j];
    }
    tmp[t] = acc * stats.scale;
}
