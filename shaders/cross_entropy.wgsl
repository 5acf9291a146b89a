// Mean token cross-entropy of logits[N, V] against targets[N], in one workgroup so that the sum is
// deterministic: each invocation accumulates whole rows (stable logsumexp), then a tree reduction.
// Provided: constants N, V, WG; bindings `logits` (f32), `targets` (u32), `out` (f32[1], written);
// `opaque_trips(n)` (n, hidden from the unroller: emit/frame.rs `loop_bound`).

var<workgroup> partial: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32) {
    var acc = 0.0;
    for (var r = lid; r < N; r = r + WG) {
        var m = -FLT_MAX;
        for (var c = 0u; c < opaque_trips(V); c = c + 1u) {
            m = max(m, logits[r * V + c]);
        }
        var s = 0.0;
        for (var c = 0u; c < opaque_trips(V); c = c + 1u) {
            s = s + exp(logits[r * V + c] - m);
        }
        let t = min(targets[r], V - 1u);
        acc = acc + (log(s) + m - logits[r * V + t]);
    }
    partial[lid] = acc;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            partial[lid] = partial[lid] + partial[lid + s];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        out[0] = partial[0] / f32(N);
    }
}
