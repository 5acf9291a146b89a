// Indices of the KK largest entries of each row of x[T, E], descending, ties to the lower index.
// One invocation per row; pick j is the best entry strictly after pick j-1 in the order
// (value descending, index ascending), so no per-row scratch memory is needed.
// Provided: constants T, E, KK, WG, GX, GY; bindings `x` (f32) and `out` (u32, written).

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = (wid.x + wid.y * GX + wid.z * (GX * GY)) * WG + lid;
    if (t >= T) {
        return;
    }
    var pv = 0.0;
    var pe = 0u;
    for (var j = 0u; j < KK; j = j + 1u) {
        var bv = 0.0;
        var be = E;
        for (var e = 0u; e < E; e = e + 1u) {
            let v = x[t * E + e];
            let after = j == 0u || v < pv || (v == pv && e > pe);
            if (after && (be == E || v > bv)) {
                bv = v;
                be = e;
            }
        }
        out[t * KK + j] = be;
        pv = bv;
        pe = be;
    }
}
