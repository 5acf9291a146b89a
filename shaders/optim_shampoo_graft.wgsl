// Shampoo, stage 5 (one workgroup per matrix): the grafting ratio ‖A‖_F / ‖D‖_F, A = m̂ / (√v̂ + eps)
// Adam's direction for that matrix; 0 when D is all zeros. Fixed-order sums: deterministic.
@group(0) @binding(0) var<storage, read> info: ParamInfo;
@group(0) @binding(1) var<storage, read> scalars: Scalars;
@group(0) @binding(2) var<storage, read> m: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read> d: array<f32>;
@group(0) @binding(5) var<storage, read_write> ratio: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let mat = wg.x + wg.y * nwg.x;
    let size = info.rows * info.cols;
    var sa = 0.0;
    var sd = 0.0;
    if (mat < info.matrices) {
        for (var t = lid; t < size; t = t + WG) {
            let i = mat * size + t;
            let a = (m[i] / scalars.bc1) / (sqrt(v[i]) / scalars.bc2_sqrt + EPS);
            sa = sa + a * a;
            sd = sd + d[i] * d[i];
        }
    }
    let na = sqrt(workgroup_sum(lid, sa));
    let nd = sqrt(workgroup_sum(lid, sd));
    if (lid == 0u && mat < info.matrices) {
        ratio[mat] = select(0.0, na / nd, nd > 0.0);
    }
}
