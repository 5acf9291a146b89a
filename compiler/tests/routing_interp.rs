//! The routing and balancing methods of docs/language.md in the reference interpreter, against values
//! computed by hand or by naive re-implementations of the pinned formulas in this file.
//!
//! Ops are checked on constructed inputs whose answers are worked out in the comments; whole MoE
//! layers are lowered from tiny specs and their intermediate values (read by node label) are fed to
//! the formulas. Tolerances: exact for indices, 1e-12 relative for f64 arithmetic replayed in the
//! same order, 1e-9 where the test sums in another order.

use moec_compiler::check::check;
use moec_compiler::interp::{
    self, auction, expert_choice, route_with, sinkhorn, AuctionParams, Value,
};
use moec_compiler::ir::{Graph, NodeId, Op, RouteLayout, TensorType, UnaryOp};
use moec_compiler::lower::lower;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::Path;

const NONE: u32 = RouteLayout::NONE;

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * b.abs().max(1.0)
}

#[test]
fn auction_by_hand() {
    // Three tokens, two experts of capacity 1, one slot each, eps = 0.01, budget 0.5, prices 0.
    let v = [0.9, 0.1, 0.8, 0.2, 0.6, 0.4];
    let prices = [0.0, 0.0];
    let params = |rounds| AuctionParams {
        rounds,
        epsilon: 0.01,
        budget: 0.5,
        capacity: 1,
        k: 1,
    };
    let won = |rounds| -> Vec<u32> {
        let out = auction::<f64>(&v, &prices, 3, 2, &params(rounds));
        assert!(
            out.chunks(3).all(|row| row[1..] == [0, 0]),
            "working space is cleared: {out:?}"
        );
        out.chunks(3).map(|row| row[0]).collect()
    };
    // Round 1: all bid on e0 (net 0.9 / 0.8 / 0.6 vs the next 0.1 / 0.2 / 0.4): amounts 0.81, 0.61,
    // 0.21; e0 keeps t0 and prices at 0.81.
    assert_eq!(won(1), [0, NONE, NONE]);
    // Round 2: t1 nets (-0.01, 0.2) bids 0.22 on e1; t2 nets (-0.21, 0.4) bids 0.62 on e1: e1 keeps
    // t2 at price 0.62.
    assert_eq!(won(2), [0, NONE, 1]);
    // Round 3: t1 nets (-0.01, -0.42) bids 0.81 + 0.41 + 0.01 = 1.23 on e0 and displaces t0.
    assert_eq!(won(3), [NONE, 0, 1]);
    // Round 4: t0 nets (-0.33, -0.52); the outside option is -0.5, so it bids min(1.41, 0.9 + 0.5).
    assert_eq!(won(4), [0, NONE, 1]);
    // Round 5: t1 nets (-0.6, -0.42) bids min(0.71, 0.2 + 0.5) = 0.7 on e1 and displaces t2.
    assert_eq!(won(5), [0, 1, NONE]);
    // Round 6: t2 nets (-0.8, -0.3) bids min(0.91, 0.9) on e1 and displaces t1.
    assert_eq!(won(6), [0, NONE, 1]);
    // Round 7+: t1's best net is -0.6 < -budget: it stays unassigned; the market is stable.
    assert_eq!(won(7), [0, NONE, 1]);
    assert_eq!(won(20), [0, NONE, 1]);
}

#[test]
fn auction_with_two_slots_fills_distinct_experts_in_ascending_order() {
    // Ample capacity: every token wins its two best experts, listed ascending.
    let v = [0.1, 0.5, 0.4, 0.7, 0.2, 0.1];
    let out = auction::<f64>(
        &v,
        &[0.0; 3],
        2,
        3,
        &AuctionParams {
            rounds: 4,
            epsilon: 0.01,
            budget: 1.0,
            capacity: 2,
            k: 2,
        },
    );
    assert_eq!(out, vec![1, 2, 0, 0, 0, 0, 1, 0, 0, 0]);
}

proptest! {
    #[test]
    fn auction_never_exceeds_capacity(
        (t, e, k, cap, rounds, seed) in (1usize..24, 1usize..7).prop_flat_map(|(t, e)| (Just(t), Just(e), 1..=e, 1usize..6, 0usize..12, any::<u64>()))
    ) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let v: Vec<f64> = (0..t * e).map(|_| rng.random_range(0.0..1.0)).collect();
        let prices: Vec<f64> = (0..e).map(|_| rng.random_range(-0.3..0.3)).collect();
        let p = AuctionParams { rounds, epsilon: 1e-3, budget: rng.random_range(0.0..1.0), capacity: cap, k };
        let out = auction::<f64>(&v, &prices, t, e, &p);
        let mut held = vec![0usize; e];
        for row in out.chunks(k + e) {
            let won: Vec<u32> = row[..k].iter().copied().filter(|&x| x != NONE).collect();
            // Won experts first, ascending and distinct, then NONE; the working space is zero.
            prop_assert!(row[..k].iter().skip(won.len()).all(|&x| x == NONE));
            prop_assert!(won.windows(2).all(|w| w[0] < w[1]));
            prop_assert!(row[k..].iter().all(|&x| x == 0));
            for x in won {
                prop_assert!((x as usize) < e);
                held[x as usize] += 1;
            }
        }
        prop_assert!(held.iter().all(|&h| h <= cap), "held {:?} > capacity {}", held, cap);
        // Enough rounds and budget with ample capacity: everyone gets k experts.
        if cap >= t && rounds >= 1 && p.budget >= 0.3 {
            prop_assert_eq!(held.iter().sum::<usize>(), t * k);
        }
    }
}

#[test]
fn capacity_drops_by_position_and_by_probability() {
    // T = 4, k = 2, E = 3, capacity 2. Slots in order: s0 t0→0, s1 t0→1, s2 t1→0, s3 t1→2,
    // s4 t2→0, s5 t2→1, s6 t3→1, s7 t3→0.
    let idx = [0, 1, 0, 2, 0, 1, 1, 0];
    let layout = RouteLayout {
        capacity: 2,
        ..RouteLayout::dropless(4, 2, 3, 4)
    };
    let slot_row = |t: &[u32]| t[layout.slot_row_at()..layout.slot_row_at() + 8].to_vec();
    let counts = |t: &[u32]| t[layout.counts_at()..layout.counts_at() + 3].to_vec();
    // Position: expert 0 keeps s0, s2 (drops s4, s7); expert 1 keeps s1, s5 (drops s6).
    let t = route_with(&idx, None, &layout).unwrap();
    assert_eq!(counts(&t), [2, 2, 1]);
    assert_eq!(slot_row(&t), [0, 4, 1, 8, NONE, 5, NONE, NONE]);
    // Probability: expert 0's slots have prio s0 .1, s2 .5, s4 .9, s7 .5 → keeps s4 and s2 (the tie
    // at .5 goes to the lower slot); expert 1: s1 .3, s5 .3, s6 .2 → keeps s1, s5.
    let prio = [0.1, 0.3, 0.5, 0.7, 0.9, 0.3, 0.2, 0.5];
    let t = route_with(&idx, Some(&prio), &layout).unwrap();
    assert_eq!(counts(&t), [2, 2, 1]);
    assert_eq!(slot_row(&t), [NONE, 4, 0, 8, 1, 5, NONE, NONE]);
    // NONE slots are unassigned and counted nowhere.
    let t = route_with(&[NONE, 1, 2, NONE, 0, 1, 1, NONE], None, &layout).unwrap();
    assert_eq!(counts(&t), [1, 2, 1]);
    assert_eq!(slot_row(&t), [NONE, 4, 8, NONE, 0, 5, NONE, NONE]);
}

#[test]
fn expert_choice_by_hand() {
    // Column 0 [.9 .1 .5 .5]: t0, then the tie at .5 goes to t2. Column 1 [.1 .9 .5 .3]: t1, t2.
    let s = [0.9, 0.1, 0.1, 0.9, 0.5, 0.5, 0.5, 0.3];
    assert_eq!(
        expert_choice::<f64>(&s, 4, 2, 2),
        vec![0, NONE, NONE, 1, 0, 1, NONE, NONE]
    );
}

#[test]
fn sinkhorn_by_hand_and_converged() {
    // logits [[0, ln 2], [0, 0]] → c = [[.5, 1], [1, 1]]; one iteration: d0 = (1/2)/(1.5, 2) =
    // (1/3, 1/4); d1 = (1/2)/(1/3·.5 + 1/4, 1/3 + 1/4) = (1.2, 6/7); out = d1·c·d0.
    let out = sinkhorn::<f64>(&[0.0, 2f64.ln(), 0.0, 0.0], 2, 2, 1);
    let want = [0.2, 2.0 / 7.0, 0.3, 1.5 / 7.0];
    for (o, w) in out.iter().zip(want) {
        assert!(close(*o, w, 1e-7), "{out:?} vs {want:?}");
    }
    // Many iterations: columns sum to 1/E exactly (up to the 1e-8 guard), rows to 1/T.
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let logits: Vec<f64> = (0..18).map(|_| rng.random_range(-2.0..2.0)).collect();
    let out = sinkhorn::<f64>(&logits, 6, 3, 200);
    for e in 0..3 {
        let col: f64 = (0..6).map(|t| out[t * 3 + e]).sum();
        assert!(close(col, 1.0 / 3.0, 1e-6), "column {e}: {col}");
    }
    for t in 0..6 {
        let row: f64 = out[t * 3..t * 3 + 3].iter().sum();
        assert!(close(row, 1.0 / 6.0, 1e-6), "row {t}: {row}");
    }
}

#[test]
fn normal_cdf_and_pdf_values() {
    let mut g = Graph::new();
    let x = g.input("x", TensorType::f32(&[7]));
    let cdf = g.add(Op::Unary(UnaryOp::NormalCdf), &[x], "cdf").unwrap();
    let pdf = g.add(Op::Unary(UnaryOp::NormalPdf), &[x], "pdf").unwrap();
    g.set_output("cdf", cdf);
    g.set_output("pdf", pdf);
    let xs = [-6.0, -3.5, -1.0, 0.0, 0.5, 2.0, 4.0];
    let feeds = HashMap::from([("x".to_string(), Value::F64(xs.to_vec()))]);
    let out = interp::run_outputs(&g, &feeds).unwrap();
    // Φ from standard tables (scipy.stats.norm.cdf), φ = e^{-x²/2}/√(2π).
    let want_cdf = [
        9.865876450376946e-10,
        2.326290790355401e-4,
        0.15865525393145707,
        0.5,
        0.6914624612740131,
        0.9772498680518208,
        0.9999683287581669,
    ];
    for ((c, w), x) in out["cdf"].to_f64().iter().zip(want_cdf).zip(xs) {
        assert!((c - w).abs() <= 1e-13 + 1e-12 * w, "Φ({x}) = {c} vs {w}");
    }
    for (p, x) in out["pdf"].to_f64().iter().zip(xs) {
        let w = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
        assert!(close(*p, w, 1e-15), "φ({x})");
    }
}

/// A one-block MoE transformer with the given `moe { ... }` body.
fn tiny(moe: &str) -> moec_compiler::spec::Spec {
    let src = format!("model tiny {{\n vocab = 16\n dim = 8\n layers = 1\n heads = 2\n context = 6\n moe {{\n{moe}\n }}\n}}\n");
    check(&src, Path::new("tiny.moe")).unwrap_or_else(|d| panic!("{}", d.render()))
}

/// Every node value of `g` in f64 under random unit-scale parameters, N(0,1) noise, and the given
/// fixed feeds (router state, or a parameter); plus a lookup by label.
struct Run {
    g: Graph,
    vals: HashMap<NodeId, Value>,
    feeds: HashMap<String, Value>,
}

impl Run {
    fn new(g: Graph, seed: u64, fixed: &[(&str, Vec<f64>)]) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut feeds = HashMap::new();
        let fixed_feed = |name: &str| fixed.iter().find(|(s, _)| *s == name).map(|(_, v)| v);
        for (_, name, ty) in g.params() {
            let random: Vec<f64> = (0..ty.numel())
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let v = fixed_feed(&name).cloned().unwrap_or(random);
            feeds.insert(name, Value::F64(v));
        }
        for (_, name, ty) in g.data_inputs() {
            let n = ty.numel();
            let v = if let Some(v) = fixed_feed(&name) {
                Value::F64(v.clone())
            } else if name.starts_with("noise.") || name.starts_with("jitter.") {
                Value::F64((0..n).map(|_| rng.random_range(-1.5..1.5)).collect())
            } else {
                Value::U32((0..n).map(|_| rng.random_range(0..16)).collect())
            };
            feeds.insert(name, v);
        }
        let vals = interp::run(&g, &feeds).unwrap();
        Run { g, vals, feeds }
    }
    fn at(&self, label: &str) -> Vec<f64> {
        let id = self
            .g
            .g
            .node_indices()
            .filter(|&i| self.g.node(i).label == label)
            .max()
            .unwrap_or_else(|| panic!("no node `{label}`"));
        self.vals[&id].to_f64()
    }
    fn out(&self, name: &str) -> Vec<f64> {
        self.vals[&self.g.output(name).unwrap()].to_f64()
    }
    fn feed(&self, name: &str) -> Vec<f64> {
        self.feeds[name].to_f64()
    }
}

const P: &str = "model.layers.0.block_sparse_moe";

/// Indices of the k largest of `row`, descending, ties to the lower index.
fn top(row: &[f64], k: usize) -> Vec<usize> {
    let mut o: Vec<usize> = (0..row.len()).collect();
    o.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
    o.truncate(k);
    o
}

fn cv2(x: &[f64]) -> f64 {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    var / (mean * mean + 1e-10)
}

fn phi(x: f64) -> f64 {
    // Φ by numerical integration of φ (Simpson, 20k panels from -12): independent of the erfc code.
    let (a, n) = (-12.0, 20_000);
    let h = (x - a) / n as f64;
    let f = |t: f64| (-0.5 * t * t).exp() / (2.0 * std::f64::consts::PI).sqrt();
    let mut s = f(a) + f(x);
    for i in 1..n {
        s += f(a + i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
    }
    s * h / 3.0
}

#[test]
fn noisy_top_k_gates_and_cv2_match_the_pinned_formulas() {
    let spec = tiny("experts = 4\n top_k = 2\n gate = noisy_top_k(noise = 0.75)\n balance = cv2(importance = 0.25, load = 0.125)");
    let r = Run::new(lower(&spec, 2).unwrap(), 11, &[]);
    let (t_n, e_n, k) = (12, 4, 2);
    let clean = r.at(&format!("{P}.gate"));
    let noise_logits = r.at(&format!("{P}.noise"));
    let eps = r.feed("noise.0");
    let mut importance = vec![0.0; e_n];
    let mut load = vec![0.0; e_n];
    let weights = r.at(&format!("{P}.weights"));
    for t in 0..t_n {
        let sd: Vec<f64> = (0..e_n)
            .map(|e| 0.75 * (1.0 + noise_logits[t * e_n + e].exp()).ln())
            .collect();
        let h: Vec<f64> = (0..e_n)
            .map(|e| clean[t * e_n + e] + eps[t * e_n + e] * sd[e])
            .collect();
        let sel = top(&h, k + 1);
        // G = softmax over KeepTopK(H, k).
        let z: f64 = sel[..k].iter().map(|&e| h[e].exp()).sum();
        for (j, &e) in sel[..k].iter().enumerate() {
            let g = h[e].exp() / z;
            assert!(close(weights[t * k + j], g, 1e-12), "G[{t}, {e}]");
            importance[e] += g;
        }
        for e in 0..e_n {
            let threshold = if sel[..k].contains(&e) {
                h[sel[k]]
            } else {
                h[sel[k - 1]]
            };
            load[e] += phi((clean[t * e_n + e] - threshold) / sd[e]);
        }
    }
    let want = 0.25 * cv2(&importance) + 0.125 * cv2(&load);
    let got = r.out("aux.0")[0];
    assert!(close(got, want, 1e-9), "cv2 loss {got} vs {want}");
    assert!(want > 1e-3, "the case exercises both terms: {want}");
}

/// The bias update the tests expect: `b + rate · sign(mean_load − load)` (0 where they are equal).
fn bias_next(b: &[f64], load: &[f64], rate: f64) -> Vec<f64> {
    let mean = load.iter().sum::<f64>() / load.len() as f64;
    b.iter()
        .zip(load)
        .map(|(b, l)| b + rate * (mean - l).signum() * ((mean - l) != 0.0) as u8 as f64)
        .collect()
}

#[test]
fn bias_selects_with_b_weights_without_and_updates_by_sign() {
    let spec = tiny("experts = 4\n top_k = 2\n gate = sigmoid\n balance = bias(rate = 0.125)");
    let b = vec![0.0, 0.9, -0.9, 0.3];
    let r = Run::new(
        lower(&spec, 2).unwrap(),
        5,
        &[("router_state.0.bias", b.clone())],
    );
    let (t_n, e_n, k) = (12, 4, 2);
    let logits = r.at(&format!("{P}.gate"));
    let weights = r.at(&format!("{P}.weights"));
    let mut load = vec![0.0; e_n];
    for t in 0..t_n {
        let s: Vec<f64> = logits[t * e_n..(t + 1) * e_n]
            .iter()
            .map(|x| 1.0 / (1.0 + (-x).exp()))
            .collect();
        let biased: Vec<f64> = s.iter().zip(&b).map(|(a, c)| a + c).collect();
        let sel = top(&biased, k);
        let total: f64 = sel.iter().map(|&e| s[e]).sum();
        for (j, &e) in sel.iter().enumerate() {
            assert!(close(weights[t * k + j], s[e] / total, 1e-12));
            load[e] += 1.0;
        }
    }
    assert_eq!(r.out("moe.0.load"), load);
    assert_eq!(
        r.out("router_state.0.bias.next"),
        bias_next(&b, &load, 0.125)
    );
    assert_eq!(r.out("moe.0.dropped"), [0.0]);
}

#[test]
fn group_limited_keeps_the_best_groups_by_their_top_two() {
    let spec = tiny("experts = 8\n top_k = 3\n groups = 4 x 2\n hierarchy = group_limited\n top_groups = 2\n gate = softmax(renorm = true)\n balance = none");
    let r = Run::new(lower(&spec, 2).unwrap(), 8, &[]);
    let (t_n, e_n, k) = (12, 8, 3);
    let probs = r.at(&format!("{P}.probs"));
    let idx = r.at(&format!("{P}.topk"));
    for t in 0..t_n {
        let p = &probs[t * e_n..(t + 1) * e_n];
        let score: Vec<f64> = (0..4).map(|g| p[2 * g] + p[2 * g + 1]).collect();
        let groups = top(&score, 2);
        let masked: Vec<f64> = (0..e_n)
            .map(|e| {
                if groups.contains(&(e / 2)) {
                    p[e]
                } else {
                    -1.0
                }
            })
            .collect();
        let want: Vec<f64> = top(&masked, k).into_iter().map(|e| e as f64).collect();
        assert_eq!(&idx[t * k..(t + 1) * k], &want[..], "token {t}");
    }
}

#[test]
fn two_level_weights_are_products_of_primary_and_secondary_gates() {
    let spec = tiny("experts = 6\n top_k = 2\n groups = 3 x 2\n top_groups = 2\n gate = softmax(renorm = true)\n capacity = factor(0.5)\n balance = aux(0.01)");
    let r = Run::new(lower(&spec, 2).unwrap(), 9, &[]);
    let (t_n, g_n, m, k) = (12, 3, 2, 4);
    let pl = r.at(&format!("{P}.group_gate"));
    let sl = r.at(&format!("{P}.gate"));
    let weights = r.at(&format!("{P}.weights"));
    let idx = r.at(&format!("{P}.topk"));
    let softmax = |x: &[f64]| -> Vec<f64> {
        let z: f64 = x.iter().map(|v| v.exp()).sum();
        x.iter().map(|v| v.exp() / z).collect()
    };
    for t in 0..t_n {
        let gp = softmax(&pl[t * g_n..(t + 1) * g_n]);
        let groups = top(&gp, 2);
        let gsum: f64 = groups.iter().map(|&g| gp[g]).sum();
        let mut want: Vec<(usize, f64)> = Vec::new();
        for &g in &groups {
            // Secondary gate of group g: softmax over its M = 2 experts, both kept, renormalised.
            let gs = softmax(&sl[t * 6 + g * m..t * 6 + (g + 1) * m]);
            for (j, g_j) in gs.iter().enumerate() {
                want.push((g * m + j, gp[g] / gsum * g_j));
            }
        }
        want.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        for (j, (e, w)) in want.iter().enumerate() {
            assert_eq!(idx[t * k + j], *e as f64, "token {t} slot {j}");
            assert!(close(weights[t * k + j], *w, 1e-12), "token {t} slot {j}");
        }
    }
    // Capacity ⌈0.5·12·4/6⌉ = 4 per expert: loads never exceed it; drops are reported.
    let load = r.out("moe.0.load");
    assert!(load.iter().all(|&l| l <= 4.0), "{load:?}");
    let dropped = r.out("moe.0.dropped")[0];
    // The metric multiplies by f32(1/48): 1e-7 relative.
    assert!(close(dropped, 1.0 - load.iter().sum::<f64>() / 48.0, 1e-7) && dropped > 0.0);
}

#[test]
fn two_level_bias_by_hand_picks_group_by_mean_bias_and_expert_by_bias() {
    // Zero router weights: every primary probability is 1/3 and every secondary one 1/2, so the
    // unbiased selection is all ties (group 0, expert 0) and the bias alone decides. Group biases
    // (means) are [0, 0.15, -0.15]: group 1 (the max rule would take group 0, whose 0.3 is the
    // largest bias); inside it expert 2 (0.2) beats expert 3 (0.1). The weight stays the unbiased
    // Gp · G = 1/3 · 1/2 (`renorm = false`).
    let spec = tiny("experts = 6\n top_k = 1\n groups = 3 x 2\n top_groups = 1\n gate = softmax(renorm = false)\n balance = bias(rate = 0.125)");
    let b = vec![0.3, -0.3, 0.2, 0.1, -0.2, -0.1];
    let r = Run::new(
        lower(&spec, 2).unwrap(),
        3,
        &[
            ("router_state.0.bias", b.clone()),
            (&format!("{P}.group_gate.weight"), vec![0.0; 3 * 8]),
            (&format!("{P}.gate.weight"), vec![0.0; 6 * 8]),
        ],
    );
    let t_n = 12;
    assert_eq!(r.at(&format!("{P}.primary.topk")), vec![1.0; t_n]);
    assert_eq!(r.at(&format!("{P}.topk")), vec![2.0; t_n]);
    for w in r.at(&format!("{P}.weights")) {
        assert!(close(w, 1.0 / 6.0, 1e-15), "{w}");
    }
    let load = r.out("moe.0.load");
    assert_eq!(load, [0.0, 0.0, 12.0, 0.0, 0.0, 0.0]);
    // Mean load 2: expert 2 is over it (b − 0.125), the others under (b + 0.125); 1e-15 for the
    // decimal literals' rounding.
    let next = r.out("router_state.0.bias.next");
    for (got, want) in next
        .iter()
        .zip([0.425, -0.175, 0.075, 0.225, -0.075, 0.025])
    {
        assert!(close(*got, want, 1e-15), "{next:?}");
    }
    assert_eq!(next, bias_next(&b, &load, 0.125));
}

#[test]
fn two_level_noisy_bias_selects_with_b_weights_without_and_updates_by_sign() {
    // Shazeer's noisy gates at both levels; the group bias is the mean of its experts' biases,
    // [0.4, -0.3, 0.2].
    let spec = tiny("experts = 9\n top_k = 2\n groups = 3 x 3\n top_groups = 2\n gate = noisy_top_k(noise = 0.5)\n balance = bias(rate = 0.0625)");
    let b = vec![1.2, -0.3, 0.3, 0.5, 0.2, -1.6, -0.4, 0.9, 0.1];
    let r = Run::new(
        lower(&spec, 2).unwrap(),
        8,
        &[("router_state.0.bias", b.clone())],
    );
    let (t_n, g_n, m, k) = (12, 3, 3, 4);
    let group_bias: Vec<f64> = b
        .chunks(m)
        .map(|c| c.iter().sum::<f64>() / m as f64)
        .collect();
    // H = clean + ε · 0.5·softplus(noise logits), per level.
    let noisy = |clean: &str, noise: &str, eps: &str| -> Vec<f64> {
        let (c, z, e) = (r.at(clean), r.at(noise), r.feed(eps));
        (0..c.len())
            .map(|i| c[i] + e[i] * 0.5 * (1.0 + z[i].exp()).ln())
            .collect()
    };
    let hp = noisy(
        &format!("{P}.group_gate"),
        &format!("{P}.groups_noise"),
        "noise.0.groups",
    );
    let hs = noisy(&format!("{P}.gate"), &format!("{P}.noise"), "noise.0");
    let softmax_of = |h: &[f64], keep: &[usize]| -> Vec<f64> {
        let z: f64 = keep.iter().map(|&i| h[i].exp()).sum();
        keep.iter().map(|&i| h[i].exp() / z).collect()
    };
    let shifted =
        |h: &[f64], by: &[f64]| -> Vec<f64> { h.iter().zip(by).map(|(a, c)| a + c).collect() };
    let (idx, weights) = (r.at(&format!("{P}.topk")), r.at(&format!("{P}.weights")));
    let (mut groups_moved, mut experts_moved) = (0, 0);
    let mut load = vec![0.0; 9];
    for t in 0..t_n {
        let hp_t = &hp[t * g_n..(t + 1) * g_n];
        let groups = top(&shifted(hp_t, &group_bias), 2);
        groups_moved += (groups != top(hp_t, 2)) as usize;
        let gp = softmax_of(hp_t, &groups);
        let mut want: Vec<(usize, f64)> = Vec::new();
        for (&g, gp_g) in groups.iter().zip(&gp) {
            let hs_g = &hs[t * 9 + g * m..t * 9 + (g + 1) * m];
            let picked = top(&shifted(hs_g, &b[g * m..(g + 1) * m]), 2);
            experts_moved += (picked != top(hs_g, 2)) as usize;
            for (&j, gs) in picked.iter().zip(softmax_of(hs_g, &picked)) {
                want.push((g * m + j, gp_g * gs));
                load[g * m + j] += 1.0;
            }
        }
        want.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        for (j, (e, w)) in want.iter().enumerate() {
            assert_eq!(idx[t * k + j], *e as f64, "token {t} slot {j}");
            assert!(close(weights[t * k + j], *w, 1e-12), "token {t} slot {j}");
        }
    }
    assert!(
        groups_moved > 0 && experts_moved > 0,
        "the bias changes selections: {groups_moved} groups, {experts_moved} experts"
    );
    assert_eq!(r.out("moe.0.load"), load);
    assert_eq!(
        r.out("router_state.0.bias.next"),
        bias_next(&b, &load, 0.0625)
    );
    assert_eq!(r.out("moe.0.dropped"), [0.0]);
}

#[test]
fn auction_prices_move_with_first_choice_demand() {
    let spec = tiny("experts = 4\n top_k = 2\n gate = auction(rounds = 6, epsilon = 0.01, budget = 0.5, price_rate = 0.1)\n balance = none");
    let prices = vec![0.2, -0.1, 0.0, 0.05];
    let r = Run::new(
        lower(&spec, 2).unwrap(),
        4,
        &[("router_state.0.prices", prices.clone())],
    );
    let (t_n, e_n, k) = (12, 4, 2);
    let probs = r.at(&format!("{P}.probs"));
    let mut demand = vec![0.0; e_n];
    for t in 0..t_n {
        let net: Vec<f64> = (0..e_n).map(|e| probs[t * e_n + e] - prices[e]).collect();
        for e in top(&net, k) {
            demand[e] += 1.0;
        }
    }
    let mean = (t_n * k) as f64 / e_n as f64;
    let next = r.out("router_state.0.prices.next");
    for e in 0..e_n {
        let want = prices[e] + 0.1 * (demand[e] - mean) / mean;
        assert!(
            close(next[e], want, 1e-7),
            "price {e}: {} vs {want}",
            next[e]
        );
    }
    // Capacity ⌈1.0·12·2/4⌉ = 6 (dropless means F = 1 for the auction); weights renormalised over
    // the won experts.
    let load = r.out("moe.0.load");
    assert!(load.iter().all(|&l| l <= 6.0), "{load:?}");
    let won = r.at(&format!("{P}.won"));
    let weights = r.at(&format!("{P}.weights"));
    for t in 0..t_n {
        let picked: Vec<usize> = won[t * k..(t + 1) * k]
            .iter()
            .filter(|&&e| e != NONE as f64)
            .map(|&e| e as usize)
            .collect();
        let total: f64 = picked.iter().map(|&e| probs[t * e_n + e]).sum();
        for (j, &e) in picked.iter().enumerate() {
            assert!(close(weights[t * k + j], probs[t * e_n + e] / total, 1e-12));
        }
    }
}

#[test]
fn expert_choice_and_sinkhorn_layers() {
    let spec = tiny("experts = 4\n gate = expert_choice(capacity = 1.0)\n balance = aux(0.01)");
    let r = Run::new(lower(&spec, 2).unwrap(), 2, &[]);
    // ⌈12·1/4⌉ = 3 tokens per expert.
    assert_eq!(r.out("moe.0.load"), [3.0; 4]);
    let taken = r.at(&format!("{P}.expert_choice"));
    let served = taken
        .chunks(4)
        .filter(|row| row.iter().any(|&x| x != NONE as f64))
        .count();
    assert!(close(
        r.out("moe.0.dropped")[0],
        1.0 - served as f64 / 12.0,
        1e-7
    ));

    let spec = tiny("experts = 4\n top_k = 1\n gate = sinkhorn(iters = 5)\n balance = none");
    let r = Run::new(lower(&spec, 2).unwrap(), 3, &[]);
    let logits = r.at(&format!("{P}.gate"));
    let balanced = sinkhorn::<f64>(&logits, 12, 4, 5);
    let idx = r.at(&format!("{P}.topk"));
    let weights = r.at(&format!("{P}.weights"));
    for t in 0..12 {
        let e = top(&balanced[t * 4..t * 4 + 4], 1)[0];
        assert_eq!(idx[t], e as f64);
        // k = 1: the gate weight is the sigmoid of the logit.
        assert!(close(
            weights[t],
            1.0 / (1.0 + (-logits[t * 4 + e]).exp()),
            1e-12
        ));
    }
}

#[test]
fn jitter_scales_the_router_input_only() {
    let spec = tiny("experts = 4\n gate = switch\n jitter = 0.1\n balance = none");
    let r = Run::new(lower(&spec, 2).unwrap(), 6, &[]);
    let x = r.at("model.layers.0.post_attention_layernorm.scale");
    let j = r.feed("jitter.0");
    let xr = r.at(&format!("{P}.jittered"));
    for i in 0..x.len() {
        assert!(close(xr[i], x[i] * j[i], 1e-15));
    }
    // The experts read the un-jittered x: the gather's rows are rows of x.
    let gather = r.at(&format!("{P}.gather"));
    assert!(gather
        .chunks(8)
        .all(|row| row.iter().all(|&v| v == 0.0) || x.chunks(8).any(|xr| xr == row)));
}
