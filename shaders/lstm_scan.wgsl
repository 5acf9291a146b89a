// One direction of an LSTM layer over whole sequences, persistent: workgroup b owns sequence b and
// loops over its T steps on the device (no dispatch per step). Invocation `lid` owns the units
// j = lid + u·WG (u < UPT): it computes their four gate pre-activations xg[b, t] + W_hh·h (h of the
// previous step from workgroup memory), the cell update (c stays in registers), and writes the
// record row [h | c | σi | σf | tanh g | σo] (ir::lstm); two barriers per step publish the new h.
// Provided: constants B, T, H, WG, UPT, REVERSE, GX, GY; bindings `xg`, `w` (read), `rec` (written).

var<workgroup> hs: array<f32, H>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let b = wid.x + wid.y * GX + wid.z * (GX * GY);
    if (b >= B) {
        return;
    }
    for (var j = lid; j < H; j = j + WG) {
        hs[j] = 0.0;
    }
    var c: array<f32, UPT>;
    var hn: array<f32, UPT>;
    workgroupBarrier();
    for (var s = 0u; s < T; s = s + 1u) {
        let t = select(s, T - 1u - s, REVERSE == 1u);
        let row = b * T + t;
        for (var u = 0u; u < UPT; u = u + 1u) {
            let j = lid + u * WG;
            if (j < H) {
                let x = row * 4u * H + j;
                var pre = vec4<f32>(xg[x], xg[x + H], xg[x + 2u * H], xg[x + 3u * H]);
                for (var k = 0u; k < H; k = k + 1u) {
                    let wk = vec4<f32>(w[j * H + k], w[(H + j) * H + k], w[(2u * H + j) * H + k], w[(3u * H + j) * H + k]);
                    pre = pre + wk * hs[k];
                }
                let gi = sigmoid_(pre.x);
                let gf = sigmoid_(pre.y);
                let gg = tanh_(pre.z);
                let go = sigmoid_(pre.w);
                c[u] = gf * c[u] + gi * gg;
                let h = go * tanh_(c[u]);
                hn[u] = h;
                let r = row * 6u * H + j;
                rec[r] = h;
                rec[r + H] = c[u];
                rec[r + 2u * H] = gi;
                rec[r + 3u * H] = gf;
                rec[r + 4u * H] = gg;
                rec[r + 5u * H] = go;
            }
        }
        workgroupBarrier();
        for (var u = 0u; u < UPT; u = u + 1u) {
            let j = lid + u * WG;
            if (j < H) {
                hs[j] = hn[u];
            }
        }
        workgroupBarrier();
    }
}
