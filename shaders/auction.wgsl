// The auction router (ir::Op::Auction, docs/language.md `gate = auction`), one workgroup, Jacobi rounds
// exactly as `interp::auction` documents them:
// 1. bids: every token with open slots bids on its best candidates (net value v - price, ties to the
//    lower expert) the amount min(price + (net - net_next) + EPS, v + BUDGET), never below -BUDGET;
// 2. acceptance: every expert keeps its CAP best bids (amount descending, token ascending) and then
//    prices at its CAP-th bid.
// Standing bids live in the last E columns of each output row as f32 bits (the working state); at the
// end row t holds its won experts ascending, then NONE, and the working columns are cleared to 0.
// Provided: constants T, E, KK, ROUNDS, CAP, WG, EPS, BUDGET, NONE; bindings `values` (f32 [T, E]),
// `start_prices` (f32 [E]) and `out` (u32 [T, KK + E], written).

const W: u32 = KK + E;
const NO_BID: f32 = -FLT_MAX;

var<workgroup> price: array<f32, E>;

fn bid(t: u32, e: u32) -> f32 {
    return bitcast<f32>(out[t * W + KK + e]);
}

fn set_bid(t: u32, e: u32, b: f32) {
    out[t * W + KK + e] = bitcast<u32>(b);
}

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32) {
    for (var e = lid; e < E; e = e + WG) {
        price[e] = start_prices[e];
    }
    for (var i = lid; i < T * E; i = i + WG) {
        set_bid(i / E, i % E, NO_BID);
    }
    storageBarrier();
    workgroupBarrier();
    for (var round = 0u; round < ROUNDS; round = round + 1u) {
        // 1. Bids: each token reads only its own row and this round's prices.
        for (var t = lid; t < T; t = t + WG) {
            var held = 0u;
            for (var e = 0u; e < E; e = e + 1u) {
                if (bid(t, e) != NO_BID) {
                    held = held + 1u;
                }
            }
            if (held >= KK) {
                continue;
            }
            let open = KK - held;
            var picks: array<u32, KK + 1u>;
            var nets: array<f32, KK + 1u>;
            var npicks = 0u;
            var pn = 0.0;
            var pe = 0u;
            for (var j = 0u; j <= open; j = j + 1u) {
                var bn = 0.0;
                var be = E;
                for (var e = 0u; e < E; e = e + 1u) {
                    if (bid(t, e) == NO_BID) {
                        let n = values[t * E + e] - price[e];
                        let after = j == 0u || n < pn || (n == pn && e > pe);
                        if (after && (be == E || n > bn)) {
                            bn = n;
                            be = e;
                        }
                    }
                }
                if (be == E) {
                    break;
                }
                picks[j] = be;
                nets[j] = bn;
                npicks = j + 1u;
                pn = bn;
                pe = be;
            }
            var n_next = -BUDGET;
            if (npicks > open) {
                n_next = max(nets[open], -BUDGET);
            }
            for (var j = 0u; j < min(open, npicks); j = j + 1u) {
                let n = nets[j];
                if (n < -BUDGET) {
                    break;
                }
                let e = picks[j];
                set_bid(t, e, min(price[e] + (n - n_next) + EPS, values[t * E + e] + BUDGET));
            }
        }
        storageBarrier();
        workgroupBarrier();
        // 2. Acceptance: each expert owns its column.
        for (var e = lid; e < E; e = e + WG) {
            var count = 0u;
            var lowest = FLT_MAX;
            for (var t = 0u; t < T; t = t + 1u) {
                let b = bid(t, e);
                if (b != NO_BID) {
                    count = count + 1u;
                    lowest = min(lowest, b);
                }
            }
            if (count == CAP) {
                price[e] = lowest;
            } else if (count > CAP) {
                // The CAP-th best bid by successive selection in (amount desc, token asc) order.
                var pa = 0.0;
                var pt = 0u;
                for (var j = 0u; j < CAP; j = j + 1u) {
                    var ba = 0.0;
                    var bt = T;
                    for (var t = 0u; t < T; t = t + 1u) {
                        let b = bid(t, e);
                        let after = j == 0u || b < pa || (b == pa && t > pt);
                        if (b != NO_BID && after && (bt == T || b > ba)) {
                            ba = b;
                            bt = t;
                        }
                    }
                    pa = ba;
                    pt = bt;
                }
                for (var t = 0u; t < T; t = t + 1u) {
                    let b = bid(t, e);
                    if (b != NO_BID && (b < pa || (b == pa && t > pt))) {
                        set_bid(t, e, NO_BID);
                    }
                }
                price[e] = pa;
            }
        }
        storageBarrier();
        workgroupBarrier();
    }
    for (var t = lid; t < T; t = t + WG) {
        var slot = 0u;
        for (var e = 0u; e < E; e = e + 1u) {
            if (bid(t, e) != NO_BID) {
                out[t * W + slot] = e;
                slot = slot + 1u;
            }
        }
        for (; slot < KK; slot = slot + 1u) {
            out[t * W + slot] = NONE;
        }
        for (var e = 0u; e < E; e = e + 1u) {
            out[t * W + KK + e] = 0u;
        }
    }
}
