// Backpropagation through time of one LSTM direction, persistent: workgroup b owns sequence b and
// walks its steps in reverse processing order on the device. Invocation `lid` owns the units
// j = lid + u·WG (u < UPT) and carries their dh and dc from the step after; per step it reads the
// record (ir::lstm), writes the pre-activation gate adjoints to `out[b, t]` and to workgroup memory,
// and after a barrier computes its units' dh for the step before: Σ_r W_hh[r, j]·dgates[r].
// Provided: constants B, T, H, WG, UPT, REVERSE, GW, COL, GX, GY; bindings `g`, `rec`, `w` (read),
// `out` (written).

var<workgroup> dgs: array<f32, 4u * H>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let b = wid.x + wid.y * GX + wid.z * (GX * GY);
    if (b >= B) {
        return;
    }
    var dh_next: array<f32, UPT>;
    var dc_next: array<f32, UPT>;
    for (var s = 0u; s < T; s = s + 1u) {
        // k: position in processing order (forward t = k, reverse t = T - 1 - k), walked backwards.
        let k = T - 1u - s;
        let t = select(k, T - 1u - k, REVERSE == 1u);
        let row = b * T + t;
        let kp = max(k, 1u) - 1u;
        let prow = b * T + select(kp, T - 1u - kp, REVERSE == 1u);
        for (var u = 0u; u < UPT; u = u + 1u) {
            let j = lid + u * WG;
            if (j < H) {
                let r = row * 6u * H + j;
                let dh = g[row * GW + COL + j] + dh_next[u];
                let gi = rec[r + 2u * H];
                let gf = rec[r + 3u * H];
                let gg = rec[r + 4u * H];
                let go = rec[r + 5u * H];
                let tc = tanh_(rec[r + H]);
                let dc = dc_next[u] + dh * go * (1.0 - tc * tc);
                let cp = select(0.0, rec[prow * 6u * H + H + j], k > 0u);
                let d = vec4<f32>(
                    dc * gg * gi * (1.0 - gi),
                    dc * cp * gf * (1.0 - gf),
                    dc * gi * (1.0 - gg * gg),
                    dh * tc * go * (1.0 - go)
                );
                let o = row * 4u * H + j;
                out[o] = d.x;
                out[o + H] = d.y;
                out[o + 2u * H] = d.z;
                out[o + 3u * H] = d.w;
                dgs[j] = d.x;
                dgs[H + j] = d.y;
                dgs[2u * H + j] = d.z;
                dgs[3u * H + j] = d.w;
                dc_next[u] = dc * gf;
            }
        }
        workgroupBarrier();
        for (var u = 0u; u < UPT; u = u + 1u) {
            let j = lid + u * WG;
            if (j < H) {
                var acc = 0.0;
                for (var q = 0u; q < 4u * H; q = q + 1u) {
                    acc = acc + w[q * H + j] * dgs[q];
                }
                dh_next[u] = acc;
            }
        }
        workgroupBarrier();
    }
}
