// Routing table (ir::RouteLayout) from idx[T, KK], in one workgroup so that it is deterministic:
// token slots sit in each expert's segment in t*KK + j order, segments are padded to TILE rows, and
// every entry is rewritten on every run (padding rows and rows past the used count get NONE).
// An expert keeps at most CAPACITY slots: the function `kept(e, s, seen)` (provided) says whether
// slot s, the `seen`-th slot routed to e in slot order, is kept (first come, or by priority).
// Provided: constants T, KK, E, TILE, ROWS, WG, CAPACITY, COUNTS_AT, OFFSETS_AT, SLOT_ROW_AT,
// ROW_SLOT_AT, ROW_EXPERT_AT, NONE; bindings `idx` (u32) and `route` (u32, written); `opaque_trips(n)`
// (n, hidden from the unroller: emit/frame.rs `loop_bound`).

var<workgroup> counts: array<u32, E>;
var<workgroup> offsets: array<u32, E + 1u>;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32) {
    // 1. Slots per expert (kept ones): one invocation per expert scans all slots.
    for (var e = lid; e < E; e = e + WG) {
        var c = 0u;
        for (var s = 0u; s < opaque_trips(T * KK); s = s + 1u) {
            if (idx[s] == e) {
                c = c + 1u;
            }
        }
        counts[e] = min(c, CAPACITY);
    }
    workgroupBarrier();
    // 2. Exclusive prefix sum of the padded segment sizes.
    if (lid == 0u) {
        var o = 0u;
        for (var e = 0u; e < E; e = e + 1u) {
            offsets[e] = o;
            o = o + (counts[e] + TILE - 1u) / TILE * TILE;
        }
        offsets[E] = o;
    }
    workgroupBarrier();
    for (var e = lid; e <= E; e = e + WG) {
        if (e < E) {
            route[COUNTS_AT + e] = counts[e];
        }
        route[OFFSETS_AT + e] = offsets[e];
    }
    // 3. Each expert places its kept slots in slot order (dropped ones get NONE), then marks its
    //    padding rows.
    for (var e = lid; e < E; e = e + WG) {
        var r = offsets[e];
        var seen = 0u;
        for (var s = 0u; s < opaque_trips(T * KK); s = s + 1u) {
            if (idx[s] == e) {
                if (kept(e, s, seen)) {
                    route[SLOT_ROW_AT + s] = r;
                    route[ROW_SLOT_AT + r] = s;
                    route[ROW_EXPERT_AT + r] = e;
                    r = r + 1u;
                } else {
                    route[SLOT_ROW_AT + s] = NONE;
                }
                seen = seen + 1u;
            }
        }
        for (; r < offsets[e + 1u]; r = r + 1u) {
            route[ROW_SLOT_AT + r] = NONE;
            route[ROW_EXPERT_AT + r] = e;
        }
    }
    // 4. Slots naming no valid expert are unassigned; rows past the used count are unused.
    for (var s = lid; s < T * KK; s = s + WG) {
        if (idx[s] >= E) {
            route[SLOT_ROW_AT + s] = NONE;
        }
    }
    for (var r = offsets[E] + lid; r < ROWS; r = r + WG) {
        route[ROW_SLOT_AT + r] = NONE;
        route[ROW_EXPERT_AT + r] = NONE;
    }
}
