// Sinkhorn balancing (ir::Op::Sinkhorn) of logits[T, E] in one workgroup (deterministic):
// c = exp(logits - rowmax), d1 = 1, then ITERS times d0[t] = (1/T)/(Σ_e d1[e]·c[t,e] + 1e-8) and
// d1[e] = (1/E)/(Σ_t d0[t]·c[t,e] + 1e-8); out[t, e] = d1[e]·c[t,e]·d0[t].
// While iterating, row t of `out` holds d0[t] in column 0 and rowmax[t] in column E-1 (E > 1), so no
// scratch buffer is needed; each row is rewritten by the invocation that owns it at the end.
// Provided: constants T, E, ITERS, WG; bindings `logits` (f32) and `out` (f32, written).

var<workgroup> d1: array<f32, E>;

fn row_max(t: u32) -> f32 {
    if (E == 1u) {
        return logits[t];
    }
    return out[t * E + E - 1u];
}

fn d0_of(t: u32) -> f32 {
    if (E == 1u) {
        return out[t];
    }
    return out[t * E];
}

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32) {
    for (var t = lid; t < T; t = t + WG) {
        var m = -FLT_MAX;
        for (var e = 0u; e < E; e = e + 1u) {
            m = max(m, logits[t * E + e]);
        }
        out[t * E] = 1.0;
        if (E > 1u) {
            out[t * E + E - 1u] = m;
        }
    }
    for (var e = lid; e < E; e = e + WG) {
        d1[e] = 1.0;
    }
    storageBarrier();
    workgroupBarrier();
    for (var it = 0u; it < ITERS; it = it + 1u) {
        for (var t = lid; t < T; t = t + WG) {
            let m = row_max(t);
            var s = 0.0;
            for (var e = 0u; e < E; e = e + 1u) {
                s = s + d1[e] * exp(logits[t * E + e] - m);
            }
            out[t * E] = (1.0 / f32(T)) / (s + 1e-8);
        }
        storageBarrier();
        workgroupBarrier();
        for (var e = lid; e < E; e = e + WG) {
            var s = 0.0;
            for (var t = 0u; t < T; t = t + 1u) {
                s = s + d0_of(t) * exp(logits[t * E + e] - row_max(t));
            }
            d1[e] = (1.0 / f32(E)) / (s + 1e-8);
        }
        storageBarrier();
        workgroupBarrier();
    }
    for (var t = lid; t < T; t = t + WG) {
        let m = row_max(t);
        let d0 = d0_of(t);
        for (var e = 0u; e < E; e = e + 1u) {
            out[t * E + e] = d1[e] * exp(logits[t * E + e] - m) * d0;
        }
    }
}
