//! The `lstm` family: the recurrence against the PyTorch cell formula, backpropagation through time
//! and whole LSTM + MoE models against finite differences (f64 interpreter), and the lowering's
//! names, shapes and placement rules.
//!
//! Finite differences as in `autodiff_models.rs`: h = 1e-6 in f64, every coordinate of every
//! parameter, |analytic − fd| ≤ 1e-5·max(|analytic|, |fd|) + 1e-8, unit-variance parameters redrawn
//! until every top-k selection has a margin ≥ 1e-4 (`support::robust_feeds`).

use moec_compiler::autodiff::{differentiate, SEED};
use moec_compiler::check::check;
use moec_compiler::interp::{run_outputs_in, Precision, Value};
use moec_compiler::ir::{Graph, Op, TensorType, UnaryOp};
use moec_compiler::lower::lower;
use moec_compiler::stats::stats;
use std::collections::HashMap;
use std::path::Path;

mod support;
use support::*;

/// A flat noisy top-k MoE between two LSTM layers (the `lstm` default placement), cv2 + z losses.
const LM_FLAT: &str = r#"
model lstm_flat {
  family = lstm
  vocab = 11
  dim = 5
  layers = 2
  context = 4
  moe {
    experts = 4
    top_k = 2
    expert = gelu(hidden = 6)
    gate = noisy_top_k(noise = 1.0)
    balance = cv2(importance = 0.5, load = 0.5) + z(0.1)
  }
}
"#;

/// Shazeer's two-level hierarchy on an LSTM LM with tied embeddings, an MoE after both layers.
const LM_HIERARCHICAL: &str = r#"
model lstm_hierarchical {
  family = lstm
  vocab = 9
  dim = 4
  layers = 2
  context = 3
  tie_embeddings = true
  moe {
    layers = [0, 1]
    experts = 4
    groups = 2 x 2
    top_groups = 1
    top_k = 1
    expert = gelu(hidden = 5)
    gate = noisy_top_k(noise = 1.0)
    balance = cv2(importance = 0.5, load = 0.5)
  }
}
"#;

/// A bidirectional sequence classifier: the MoE works at width 2·dim, the head reads h_n.
const CLASSIFIER_BIDI: &str = r#"
model lstm_bidi {
  family = lstm
  inputs = 3
  classes = 4
  context = 5
  dim = 4
  layers = 2
  bidirectional = true
  moe {
    experts = 3
    top_k = 2
    expert = swiglu(hidden = 4)
    gate = softmax
    balance = aux(0.5) + z(0.1)
  }
}
"#;

#[test]
fn lstm_lm_with_flat_moe_gradients_match_finite_differences() {
    let g = graph(LM_FLAT, 2);
    let feeds = robust_feeds(&g, 1);
    check_model("lstm lm, flat noisy top-k", &g, &feeds);
}

#[test]
fn lstm_lm_with_hierarchical_moe_gradients_match_finite_differences() {
    let g = graph(LM_HIERARCHICAL, 2);
    let feeds = robust_feeds(&g, 50);
    check_model("lstm lm, two-level", &g, &feeds);
}

#[test]
fn bidirectional_lstm_classifier_gradients_match_finite_differences() {
    let g = graph(CLASSIFIER_BIDI, 3);
    let feeds = robust_feeds(&g, 100);
    check_model("bidirectional lstm classifier", &g, &feeds);
}

/// `xg → LstmScan → LstmHidden → Σ tanh(h)·wts` in both directions of a 3 × 6 × 4 scan: the
/// adjoints of `xg` and `w_hh` (LstmScanGrad, LstmScanGradW) against finite differences, with `xg`
/// and `w_hh` as parameters.
#[test]
fn scan_adjoints_match_finite_differences() {
    let (b, t, h) = (3, 6, 4);
    let mut g = Graph::new();
    let init = moec_compiler::ir::Init::Normal { std: 1.0 };
    let mut recs = Vec::new();
    for (d, reverse) in [false, true].into_iter().enumerate() {
        let xg = g.param(&format!("xg{d}"), &[b, t, 4 * h], init);
        let w = g.param(&format!("w{d}"), &[4 * h, h], init);
        recs.push(g.add(Op::LstmScan { reverse }, &[xg, w], "scan").unwrap());
    }
    let hid = g.add(Op::LstmHidden, &recs, "hidden").unwrap();
    let wts = g.input("wts", TensorType::f32(&[b, t, 2 * h]));
    let y = g.add(Op::Unary(UnaryOp::Tanh), &[hid], "tanh").unwrap();
    let y = g
        .add(
            Op::Binary(moec_compiler::ir::BinaryOp::Mul),
            &[y, wts],
            "weighted",
        )
        .unwrap();
    let y = g
        .add(
            Op::Reshape {
                shape: vec![1, b * t * 2 * h],
            },
            &[y],
            "row",
        )
        .unwrap();
    let s = g
        .add(Op::Reduce(moec_compiler::ir::ReduceOp::Sum), &[y], "sum")
        .unwrap();
    let s = g.add(Op::Reshape { shape: vec![1] }, &[s], "loss").unwrap();
    g.set_output("loss", s);
    let feeds = random_feeds(&g, 7);
    let train = differentiate(&g, "loss").unwrap();
    let mut tf = feeds.clone();
    tf.insert(SEED.into(), Value::F64(vec![1.0]));
    let outs = run_outputs_in(&train, &tf, Precision::F64).unwrap();
    for (_, name, _) in g.params() {
        let analytic = outs[&format!("grad.{name}")].to_f64();
        let base = feeds[&name].to_f64();
        for (i, &a) in analytic.iter().enumerate() {
            let at = |delta: f64| {
                let mut v = base.clone();
                v[i] += delta;
                let mut f = feeds.clone();
                f.insert(name.clone(), Value::F64(v));
                loss_of(&g, &f)
            };
            let fd = (at(H) - at(-H)) / (2.0 * H);
            assert!(
                (a - fd).abs() <= RTOL * a.abs().max(fd.abs()) + ATOL,
                "grad.{name}[{i}] = {a}, finite difference {fd}"
            );
        }
    }
}

/// One step of the PyTorch cell by hand: h = σ(o)·tanh(σ(i)·tanh(g)) with c₀ = 0 (so W_hh does not
/// matter), and the reverse direction of a sequence equals the forward direction of the sequence
/// reversed in time.
#[test]
fn scan_follows_the_pytorch_cell() {
    let (b, t, h) = (2, 3, 2);
    let mut g = Graph::new();
    let xg = g.input("xg", TensorType::f32(&[b, t, 4 * h]));
    let xr = g.input("xg_reversed", TensorType::f32(&[b, t, 4 * h]));
    let w = g.input("w", TensorType::f32(&[4 * h, h]));
    let fwd = g
        .add(Op::LstmScan { reverse: false }, &[xg, w], "f")
        .unwrap();
    let rev = g
        .add(Op::LstmScan { reverse: true }, &[xr, w], "r")
        .unwrap();
    let hf = g.add(Op::LstmHidden, &[fwd], "hf").unwrap();
    let hr = g.add(Op::LstmHidden, &[rev], "hr").unwrap();
    g.set_output("hf", hf);
    g.set_output("hr", hr);
    let x: Vec<f64> = (0..b * t * 4 * h)
        .map(|i| ((i * 37 % 17) as f64 - 8.0) / 5.0)
        .collect();
    let mut reversed = vec![0.0; x.len()];
    for bi in 0..b {
        for ti in 0..t {
            let (src, dst) = ((bi * t + ti) * 4 * h, (bi * t + t - 1 - ti) * 4 * h);
            reversed[dst..dst + 4 * h].copy_from_slice(&x[src..src + 4 * h]);
        }
    }
    let w_val: Vec<f64> = (0..4 * h * h).map(|i| (i as f64 - 7.0) / 9.0).collect();
    let feeds = HashMap::from([
        ("xg".to_string(), Value::F64(x.clone())),
        ("xg_reversed".to_string(), Value::F64(reversed)),
        ("w".to_string(), Value::F64(w_val)),
    ]);
    let outs = run_outputs_in(&g, &feeds, Precision::F64).unwrap();
    let (hf, hr) = (outs["hf"].to_f64(), outs["hr"].to_f64());
    let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
    for bi in 0..b {
        for j in 0..h {
            let xs = &x[bi * t * 4 * h..];
            let c = sig(xs[j]) * xs[2 * h + j].tanh();
            let want = sig(xs[3 * h + j]) * c.tanh();
            assert!((hf[bi * t * h + j] - want).abs() < 1e-12);
        }
        for ti in 0..t {
            for j in 0..h {
                let (f, r) = (hf[(bi * t + ti) * h + j], hr[(bi * t + t - 1 - ti) * h + j]);
                assert!((f - r).abs() < 1e-12, "b {bi} t {ti} unit {j}: {f} vs {r}");
            }
        }
    }
}

fn spec_of(source: &str) -> moec_compiler::spec::Spec {
    check(source, Path::new("test.moe")).unwrap_or_else(|d| panic!("{}", d.render()))
}

/// PyTorch `nn.LSTM` names and shapes per layer and direction, the MoE at width 2·dim after a
/// bidirectional layer, and `moec check`'s parameter count equal to the lowered graph's.
#[test]
fn lowering_uses_pytorch_names_and_widths() {
    let spec = spec_of(CLASSIFIER_BIDI);
    let g = lower(&spec, 2).unwrap();
    let shapes: HashMap<String, Vec<usize>> = g
        .params()
        .into_iter()
        .map(|(_, n, t)| (n, t.shape))
        .collect();
    let p = "model.layers";
    for (name, shape) in [
        (format!("{p}.0.lstm.weight_ih_l0"), vec![16, 3]),
        (format!("{p}.0.lstm.weight_ih_l0_reverse"), vec![16, 3]),
        (format!("{p}.0.lstm.weight_hh_l0_reverse"), vec![16, 4]),
        (format!("{p}.0.lstm.bias_ih_l0"), vec![16]),
        (format!("{p}.0.lstm.bias_hh_l0_reverse"), vec![16]),
        (format!("{p}.1.lstm.weight_ih_l0"), vec![16, 8]),
        (format!("{p}.0.block_sparse_moe.gate.weight"), vec![3, 8]),
        ("classifier.weight".to_string(), vec![4, 8]),
    ] {
        assert_eq!(shapes.get(&name), Some(&shape), "{name}");
    }
    assert!(!shapes
        .keys()
        .any(|n| n.contains("layers.1.block_sparse_moe")));
    let total: usize = shapes.values().map(|s| s.iter().product::<usize>()).sum();
    assert_eq!(stats(&spec).total_params as usize, total);
    assert_eq!(g.ty(g.output("logits").unwrap()).shape, vec![2, 4]);
    let lm = spec_of(LM_FLAT);
    let lg = lower(&lm, 2).unwrap();
    let total: usize = lg.params().iter().map(|(_, _, t)| t.numel()).sum();
    assert_eq!(stats(&lm).total_params as usize, total);
    assert_eq!(lg.ty(lg.output("logits").unwrap()).shape, vec![8, 11]);
}

/// The `lstm` rules of docs/language.md "Families": default MoE placement, no bidirectional LM,
/// classifier vs LM fields.
#[test]
fn lstm_rules() {
    let lm = |extra: &str, moe: &str| {
        format!("model m {{\n family = lstm\n vocab = 16\n dim = 8\n layers = 3\n context = 4\n {extra}\n moe {{\n experts = 2\n top_k = 1\n {moe}\n }}\n}}\n")
    };
    assert_eq!(spec_of(&lm("", "")).moe.unwrap().blocks, vec![0, 1]);
    assert_eq!(
        spec_of(&lm("", "every = 1")).moe.unwrap().blocks,
        vec![0, 1, 2]
    );
    let err = |src: &str| match check(src, Path::new("t.moe")) {
        Ok(_) => panic!("accepted:\n{src}"),
        Err(d) => d.render(),
    };
    let e = err(&lm("bidirectional = true", ""));
    assert!(e.contains("would see the token it predicts"), "{e}");
    let e = err(&lm("classes = 3", ""));
    assert!(e.contains("classifier field"), "{e}");
    let one = "model m {\n family = lstm\n vocab = 16\n dim = 8\n layers = 1\n context = 4\n moe {\n experts = 2\n top_k = 1\n }\n}\n";
    assert!(err(one).contains("between LSTM layers"));
    let classifier = "model c {\n family = lstm\n inputs = 96\n classes = 10\n context = 32\n dim = 8\n layers = 1\n}\ntrain {\n data = synthetic\n batch = 2\n steps = 1\n}\n";
    let spec = spec_of(classifier);
    assert_eq!((spec.model.vocab, spec.model.context), (None, Some(32)));
    let g = lower(&spec, 2).unwrap();
    assert_eq!(g.ty(g.output("logits").unwrap()).shape, vec![2, 10]);
}
