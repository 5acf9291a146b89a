// Adafactor, stage 2 of 3: per matrix, the mean of its row moments (scratch[m]) and partial sums of
// the squared update (scratch[M + m·chunks + p]), for the RMS clip of stage 3. Each stacked expert
// matrix is clipped on its own, as HF does for the separate per-expert Linear weights of Mixtral.
// Workgroup k = m·chunks + p sums a grid-strided part of matrix m; fixed order, so deterministic.
// Every workgroup of matrix m computes the same row mean in the same order.
@group(0) @binding(0) var<storage, read> info: ParamInfo;
@group(0) @binding(1) var<storage, read> stats: Stats;
@group(0) @binding(2) var<storage, read> grad: array<f32>;
@group(0) @binding(3) var<storage, read> moments: array<f32>;
@group(0) @binding(4) var<storage, read_write> scratch: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let k = wg.x + wg.y * nwg.x;
    let m = min(k / info.chunks, info.matrices - 1u);
    let p = k % info.chunks;
    var rmean = 1.0;
    if (info.factored != 0u) {
        var s = 0.0;
        for (var i = lid; i < info.rows; i = i + WG) {
            s = s + moments[m * info.rows + i];
        }
        rmean = workgroup_sum(lid, s) / f32(info.rows);
    }
    let size = info.rows * info.cols;
    var s = 0.0;
    for (var t = p * WG + lid; t < size; t = t + info.chunks * WG) {
        let u = adafactor_update(m, t, rmean);
        s = s + u * u;
    }
    let total = workgroup_sum(lid, s);
    if (lid == 0u && k < info.matrices * info.chunks) {
        scratch[info.matrices + k] = total;
        if (p == 0u) {
            scratch[m] = rmean;
        }
    }
}
