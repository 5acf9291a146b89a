//! Gradient check of the routing and balancing methods (docs/language.md) through whole lowered layers:
//! `autodiff::training_graph` of tiny one-MoE-block transformers, one per gate kind and balancing
//! term, in the f64 interpreter, against central finite differences of the forward graph on EVERY
//! coordinate of every parameter; plus the new elementwise ops (`NormalCdf`, `NormalPdf`) and the
//! forward use of `ScatterCols` on their own.
//!
//! Same method and tolerances as `autodiff_models.rs`: h = 1e-6, |analytic − fd| ≤
//! 1e-5·max(|analytic|, |fd|) + 1e-8; unit-variance parameters redrawn until every top-k (and
//! expert-choice) selection has a margin ≥ 1e-4. Noise, jitter and router-state inputs are random
//! (uniform in [-1, 1)): gradients must hold for any value the runtime feeds. Routing decisions that
//! are not top-k margins (auction bids, capacity ranks, Sinkhorn) are piecewise constant in the
//! parameters; the seeds are fixed, and a flip under a ±h step would show as a gross error.

use moec_compiler::autodiff::{differentiate, SEED};
use moec_compiler::interp::{run_outputs_in, Precision, Value};
use moec_compiler::ir::{BinaryOp, Graph, Init, Op, ReduceOp, TensorType, UnaryOp};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

mod support;
use support::*;

/// A one-block MoE transformer with the given `moe { ... }` body.
fn spec_src(moe: &str) -> String {
    format!("model tiny {{\n vocab = 16\n dim = 8\n layers = 1\n heads = 2\n context = 4\n moe {{\n expert = swiglu(hidden = 6)\n {moe}\n }}\n}}\n")
}

fn check_gate(what: &str, moe: &str, seed: u64) {
    let g = graph(&spec_src(moe), 2);
    let feeds = robust_feeds(&g, seed);
    check_model(what, &g, &feeds);
}

#[test]
fn noisy_top_k_with_cv2_importance_and_smooth_load() {
    check_gate("noisy_top_k + cv2", "experts = 4\n top_k = 2\n gate = noisy_top_k(noise = 1.0)\n balance = cv2(importance = 0.5, load = 0.5) + z(0.1)", 1);
}

#[test]
fn two_level_noisy_hierarchy_with_cv2() {
    check_gate("two_level noisy + cv2", "experts = 6\n groups = 3 x 2\n top_groups = 2\n top_k = 1\n gate = noisy_top_k\n balance = cv2(importance = 0.5, load = 0.5) + aux(0.1)", 20);
}

#[test]
fn two_level_noisy_hierarchy_with_bias() {
    check_gate("two_level noisy + bias", "experts = 9\n groups = 3 x 3\n top_groups = 2\n top_k = 2\n gate = noisy_top_k\n balance = bias(rate = 0.01) + cv2(importance = 0.5, load = 0) + aux(0.1)", 30);
}

#[test]
fn group_limited_sigmoid_with_bias_and_seq_aux() {
    check_gate("group_limited sigmoid + bias", "experts = 8\n groups = 4 x 2\n hierarchy = group_limited\n top_groups = 2\n top_k = 3\n gate = sigmoid\n balance = bias(rate = 0.01) + seq_aux(0.5)", 40);
}

#[test]
fn switch_with_capacity_by_probability_and_jitter() {
    check_gate("switch + capacity + jitter", "experts = 4\n gate = switch\n capacity = factor(1.0, drop = probability)\n jitter = 0.1\n balance = aux(0.5) + z(0.1)", 60);
}

#[test]
fn softmax_with_capacity_by_position() {
    check_gate(
        "softmax + capacity by position",
        "experts = 4\n top_k = 2\n capacity = factor(0.75)\n balance = aux(0.5)",
        70,
    );
}

#[test]
fn expert_choice_gradients() {
    check_gate(
        "expert_choice",
        "experts = 4\n gate = expert_choice(capacity = 1.5)\n balance = aux(0.5) + z(0.1)",
        80,
    );
}

#[test]
fn sinkhorn_gradients_skip_the_balancing() {
    check_gate(
        "sinkhorn k = 2",
        "experts = 4\n top_k = 2\n gate = sinkhorn(iters = 4)\n balance = z(0.1)",
        100,
    );
    check_gate(
        "sinkhorn k = 1",
        "experts = 4\n top_k = 1\n gate = sinkhorn(iters = 4)\n balance = aux(0.5)",
        120,
    );
}

#[test]
fn auction_gradients_flow_through_renormalised_weights() {
    // Capacity ⌈4·8·2/4⌉ = 16 ≥ 8 tokens: every token wins its first choices in round 1, which are the
    // top-k of v − prices, a `TopK` of the demand computation, so the margin check covers the
    // assignment (contested rounds are piecewise constant and tested in routing_interp.rs).
    check_gate("auction", "experts = 4\n top_k = 2\n gate = auction(rounds = 3, epsilon = 0.01, budget = 1.0, price_rate = 0.1)\n capacity = factor(4.0)\n balance = z(0.1)", 140);
}

/// `loss = Σ op(x) ⊙ r` for each new elementwise op, and `Σ ScatterCols(w, idx) ⊙ r`.
#[test]
fn normal_cdf_pdf_and_scatter_cols_adjoints() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut g = Graph::new();
    let mut feeds = HashMap::new();
    let x = g.param("x", &[3, 5], Init::Constant(0.0));
    feeds.insert(
        "x".to_string(),
        Value::F64((0..15).map(|_| rng.random_range(-3.0..3.0)).collect()),
    );
    let w = g.param("w", &[3, 2], Init::Constant(0.0));
    feeds.insert(
        "w".to_string(),
        Value::F64((0..6).map(|_| rng.random_range(-1.0..1.0)).collect()),
    );
    let idx = g.input("idx", TensorType::u32(&[3, 2]));
    feeds.insert(
        "idx".to_string(),
        Value::U32(vec![4, 0, moec_compiler::ir::RouteLayout::NONE, 2, 1, 3]),
    );
    let outs = [
        g.add(Op::Unary(UnaryOp::NormalCdf), &[x], "cdf").unwrap(),
        g.add(Op::Unary(UnaryOp::NormalPdf), &[x], "pdf").unwrap(),
        g.add(Op::ScatterCols { cols: 5 }, &[w, idx], "dense")
            .unwrap(),
    ];
    let mut loss = None;
    for (i, o) in outs.into_iter().enumerate() {
        let r = g.input(&format!("r{i}"), TensorType::f32(&[3, 5]));
        feeds.insert(
            format!("r{i}"),
            Value::F64((0..15).map(|_| rng.random_range(-1.0..1.0)).collect()),
        );
        let p = g
            .add(Op::Binary(BinaryOp::Mul), &[o, r], "weighted")
            .unwrap();
        let p = g
            .add(Op::Reshape { shape: vec![1, 15] }, &[p], "flat")
            .unwrap();
        let s = g.add(Op::Reduce(ReduceOp::Sum), &[p], "sum").unwrap();
        let s = g
            .add(Op::Reshape { shape: vec![1] }, &[s], "scalar")
            .unwrap();
        loss = Some(match loss {
            None => s,
            Some(l) => g.add(Op::Binary(BinaryOp::Add), &[l, s], "total").unwrap(),
        });
    }
    g.set_output("loss", loss.unwrap());
    let train = differentiate(&g, "loss").unwrap();
    let mut tf = feeds.clone();
    tf.insert(SEED.into(), Value::F64(vec![1.0]));
    let out = run_outputs_in(&train, &tf, Precision::F64).unwrap();
    for name in ["x", "w"] {
        let analytic = out[&format!("grad.{name}")].to_f64();
        let base = feeds[name].to_f64();
        for (i, a) in analytic.iter().enumerate() {
            let at = |d: f64| {
                let mut v = base.clone();
                v[i] += d;
                let mut f = feeds.clone();
                f.insert(name.to_string(), Value::F64(v));
                run_outputs_in(&g, &f, Precision::F64).unwrap()["loss"].to_f64()[0]
            };
            let fd = (at(H) - at(-H)) / (2.0 * H);
            assert!(
                (a - fd).abs() <= 1e-6 * a.abs().max(fd.abs()) + 5e-8,
                "grad.{name}[{i}] = {a} vs fd {fd}"
            );
        }
    }
    // The NONE slot of idx scatters nothing, so its weight has no gradient.
    assert_eq!(out["grad.w"].to_f64()[2], 0.0);
}
