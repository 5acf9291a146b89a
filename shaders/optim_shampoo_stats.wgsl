// Shampoo, stage 2: per matrix G (rows × cols; each expert of a stack on its own), the statistics
// L ← DECAY·L + (1 − DECAY)·G·Gᵀ and R ← DECAY·R + (1 − DECAY)·Gᵀ·G. One invocation per entry:
// entries 0..M·rows² are L, the next M·cols² are R. G is the clipped gradient.
@group(0) @binding(0) var<storage, read> info: ParamInfo;
@group(0) @binding(1) var<storage, read> stats: Stats;
@group(0) @binding(2) var<storage, read> grad: array<f32>;
@group(0) @binding(3) var<storage, read_write> left: array<f32>;
@group(0) @binding(4) var<storage, read_write> right: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = linear_index(wg, nwg, lid);
    let r = info.rows;
    let c = info.cols;
    let lefts = info.matrices * r * r;
    if (t >= lefts + info.matrices * c * c || stats.bad != 0u) {
        return;
    }
    let s2 = stats.scale * stats.scale;
    if (t < lefts) {
        let base = (t / (r * r)) * r * c;
        let i = (t % (r * r)) / r;
        let j = t % r;
        var acc = 0.0;
        for (var k = 0u; k < c; k = k + 1u) {
            acc = acc + grad[base + i * c + k] * grad[base + j * c + k];
        }
        left[t] = DECAY * left[t] + (1.0 - DECAY) * (acc * s2);
    } else {
        let u = t - lefts;
        let base = (u / (c * c)) * r * c;
        let i = (u % (c * c)) / c;
        let j = u % c;
        var acc = 0.0;
        for (var k = 0u; k < r; k = k + 1u) {
            acc = acc + grad[base + k * c + i] * grad[base + k * c + j];
        }
        right[u] = DECAY * right[u] + (1.0 - DECAY) * (acc * s2);
    }
}
