//! The LSTM kernels on the GPU (lavapipe where there is none) against the f64 interpreter, both
//! matmul variants × fused and unfused (`support::compare`).
//!
//! Ops: forward and reverse scans, `LstmHidden`, `LstmLast` and every adjoint (`LstmScanGrad`,
//! `LstmScanGradW`, `LstmLastGrad`) in the training graph of a small loss, at odd sizes (B = 3,
//! T = 7, H = 5) and at a context and width larger than a scan workgroup (T = 70 steps, H = 67 units:
//! two units per invocation of the 64-wide workgroup). Tolerance |gpu − ref| ≤ 1e-4 + 1e-4·|ref|
//! + 1e-5·max|ref| (f32 sums of ≤ 4H products per step, over up to 70 steps of recurrence).
//!
//! Models: the training graphs of a tiny LSTM LM with a flat noisy top-k MoE and of a tiny
//! bidirectional classifier with a softmax MoE; every output (loss, balancing terms, every grad)
//! within 1e-3·|ref| + 1e-4·max|ref|, unit-variance parameters redrawn until every top-k selection
//! has a margin ≥ 1e-3, so the f32 router picks what the f64 reference picks.

use moec_compiler::autodiff::{differentiate, training_graph, SEED};
use moec_compiler::check::check;
use moec_compiler::interp::Value;
use moec_compiler::ir::{BinaryOp, DType, Graph, Init, Op, ReduceOp, TensorType, UnaryOp};
use moec_compiler::lower::lower;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::Path;

mod support;
use support::*;

/// Unit-variance f32 feeds: weights U(±√(3/fan_in)), constant-initialised params c ± 0.3, u32 ids
/// below `ids`, other f32 inputs (features, noise) U(-1, 1).
fn feeds(g: &Graph, ids: u32, seed: u64) -> HashMap<String, Value> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = unit_variance_params(g, &mut rng);
    for (_, name, ty) in g.data_inputs() {
        let v = match ty.dtype {
            DType::U32 => Value::U32((0..ty.numel()).map(|_| rng.random_range(0..ids)).collect()),
            DType::F32 | DType::F16 => Value::F32(
                (0..ty.numel())
                    .map(|_| rng.random_range(-1.0..1.0))
                    .collect(),
            ),
        };
        out.insert(name, v);
    }
    out
}

/// Both directions of a scan of `[b, t, h]`, their hidden states, final states, and the adjoints of
/// `Σ tanh(hidden)·wts + Σ last·wts_last`.
fn scan_graph(b: usize, t: usize, h: usize) -> Graph {
    let mut g = Graph::new();
    let init = Init::Normal { std: 1.0 };
    let mut recs = Vec::new();
    for (d, reverse) in [false, true].into_iter().enumerate() {
        let xg = g.param(&format!("xg{d}"), &[b, t, 4 * h], init);
        let w = g.param(&format!("w{d}"), &[4 * h, h], init);
        recs.push(g.add(Op::LstmScan { reverse }, &[xg, w], "scan").unwrap());
    }
    let add = |g: &mut Graph, op: Op, args: &[_], l: &str| g.add(op, args, l).unwrap();
    let hid = add(&mut g, Op::LstmHidden, &recs, "hidden");
    let last = add(&mut g, Op::LstmLast { dirs: 2 }, &[hid], "last");
    let wts = g.input("wts", TensorType::f32(&[b, t, 2 * h]));
    let wl = g.input("wts_last", TensorType::f32(&[b, 2 * h]));
    let y = add(&mut g, Op::Unary(UnaryOp::Tanh), &[hid], "tanh");
    let y = add(&mut g, Op::Binary(BinaryOp::Mul), &[y, wts], "weighted");
    let y = add(
        &mut g,
        Op::Reshape {
            shape: vec![1, b * t * 2 * h],
        },
        &[y],
        "row",
    );
    let s = add(&mut g, Op::Reduce(ReduceOp::Sum), &[y], "sum");
    let z = add(
        &mut g,
        Op::Binary(BinaryOp::Mul),
        &[last, wl],
        "weighted_last",
    );
    let z = add(
        &mut g,
        Op::Reshape {
            shape: vec![1, b * 2 * h],
        },
        &[z],
        "row_last",
    );
    let z = add(&mut g, Op::Reduce(ReduceOp::Sum), &[z], "sum_last");
    let s = add(&mut g, Op::Binary(BinaryOp::Add), &[s, z], "total");
    let s = add(&mut g, Op::Reshape { shape: vec![1] }, &[s], "loss");
    g.set_output("hidden", hid);
    g.set_output("loss", s);
    differentiate(&g, "loss").unwrap()
}

fn check_scan(b: usize, t: usize, h: usize) {
    let g = scan_graph(b, t, h);
    let mut f = feeds(&g, 1, 3);
    f.insert(SEED.into(), Value::F32(vec![1.0]));
    let worst = compare(&g, &f, &|r, scale| 1e-4 + 1e-4 * r + 1e-5 * scale);
    eprintln!("scan {b}×{t}×{h}: {worst:?}");
}

#[test]
fn scan_and_adjoints_at_odd_sizes() {
    check_scan(3, 7, 5);
}

#[test]
fn scan_longer_and_wider_than_a_workgroup() {
    check_scan(2, 70, 67);
}

const LM: &str = r#"
model lstm_lm {
  family = lstm
  vocab = 13
  dim = 6
  layers = 2
  context = 5
  moe {
    experts = 4
    top_k = 2
    expert = relu(hidden = 8)
    gate = noisy_top_k(noise = 1.0)
    balance = cv2(importance = 0.1, load = 0.1)
  }
}
"#;

const BIDI: &str = r#"
model lstm_bidi {
  family = lstm
  inputs = 5
  classes = 3
  context = 6
  dim = 7
  layers = 2
  bidirectional = true
  moe {
    experts = 3
    top_k = 2
    expert = swiglu(hidden = 6)
    gate = softmax
    balance = aux(0.1) + z(0.01)
  }
}
"#;

fn check_training(what: &str, source: &str, ids: u32) {
    let spec = check(source, Path::new("test.moe")).unwrap_or_else(|d| panic!("{d:?}"));
    let forward = lower(&spec, 3).expect("lowers");
    let train = training_graph(&forward).expect("differentiates");
    let mut f = (1..50)
        .map(|seed| feeds(&forward, ids, seed))
        .find(|f| selection_margin(&forward, f) >= 1e-3)
        .expect("a seed with well-separated router scores");
    f.insert(SEED.into(), Value::F32(vec![1.0]));
    let worst = compare(&train, &f, &|r, scale| 1e-3 * r + 1e-4 * scale);
    let max = worst.values().fold(0.0f64, |m, &e| m.max(e));
    eprintln!("{what}: {} outputs, max abs error {max:.2e}", worst.len());
}

#[test]
fn lstm_lm_training_graph_matches_interpreter() {
    check_training("lstm lm", LM, 13);
}

#[test]
fn bidirectional_classifier_training_graph_matches_interpreter() {
    check_training("bidirectional classifier", BIDI, 3);
}
