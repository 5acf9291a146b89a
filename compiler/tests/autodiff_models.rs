//! Gradient check of whole lowered models: `autodiff::training_graph` of small specs (MoE
//! transformers with GQA, shared experts and aux + z / seq_aux balancing, a dense transformer, a
//! top-1 Switch MoE classifier, a QK-norm transformer), run in the f64 interpreter, against central finite differences of
//! the forward graph on EVERY coordinate of every parameter (the models are small enough: a few
//! thousand coordinates each, well under a second of interpreter time per model).
//!
//! Finite differences: h = 1e-6, f64. Tolerance: |analytic − fd| ≤ 1e-5·max(|analytic|, |fd|) + 1e-8
//! (FD rounding is about ε·|loss|/h ≈ 1e-9). Parameters are drawn at unit-variance scale (not the
//! 0.02 init, which makes every gradient tiny and the router near-uniform), and the draw is redone
//! until every top-k selection has a margin of at least 1e-4, so no ±h step changes the routing.
//! Also: the training graph keeps the forward graph intact, adds no dead nodes, and is linear in
//! the seed.

use moec_compiler::autodiff::{training_graph, SEED};
use moec_compiler::check::check;
use moec_compiler::interp::{run_outputs_in, Precision, Value};
use moec_compiler::ir::NodeId;
use moec_compiler::lower::lower;
use std::collections::{HashMap, HashSet};
use std::path::Path;

mod support;
use support::*;

const MOE: &str = r#"
model tiny_moe {
  vocab = 16
  dim = 8
  layers = 2
  heads = 2
  kv_heads = 1
  context = 4
  moe {
    experts = 4
    top_k = 2
    expert = swiglu(hidden = 8)
    shared_experts = 1
    gate = softmax(renorm = true)
    balance = aux(0.5) + z(0.1)
  }
}
"#;

const MOE_SIGMOID: &str = r#"
model tiny_sigmoid {
  vocab = 16
  dim = 8
  layers = 2
  heads = 2
  context = 4
  norm = layernorm
  tie_embeddings = true
  ffn = gelu(hidden = 12)
  moe {
    layers = [1]
    experts = 4
    top_k = 2
    expert = gelu(hidden = 8)
    gate = sigmoid
    balance = seq_aux(0.5)
  }
}
"#;

const DENSE: &str = r#"
model tiny_dense {
  vocab = 16
  dim = 8
  layers = 2
  heads = 2
  context = 4
  norm = layernorm
  ffn = gelu(hidden = 16)
  moe {
    experts = 0
  }
}
"#;

/// QK-norm (Qwen3) with GQA, a dense first block and an MoE second block, under LayerNorm blocks
/// (QK-norm stays RMSNorm).
const QK_NORM: &str = r#"
model tiny_qk_norm {
  vocab = 16
  dim = 8
  layers = 2
  heads = 2
  kv_heads = 1
  context = 4
  norm = layernorm
  qk_norm = true
  ffn = swiglu(hidden = 8)
  moe {
    every = 2
    experts = 4
    top_k = 2
    expert = swiglu(hidden = 8)
    gate = softmax(renorm = true)
    balance = aux(0.5)
  }
}
"#;

const MLP_MOE: &str = r#"
model tiny_classifier {
  family = mlp
  inputs = 6
  classes = 3
  dim = 8
  layers = 2
  moe {
    experts = 4
    expert = swiglu(hidden = 8)
    gate = switch
    balance = aux(0.5)
  }
}
"#;

#[test]
fn moe_transformer_gradients_match_finite_differences() {
    let g = graph(MOE, 2);
    let feeds = robust_feeds(&g, 1);
    check_model("moe transformer", &g, &feeds);
}

#[test]
fn sigmoid_gated_tied_layernorm_transformer_gradients_match_finite_differences() {
    let g = graph(MOE_SIGMOID, 2);
    let feeds = robust_feeds(&g, 100);
    check_model("sigmoid moe transformer", &g, &feeds);
}

#[test]
fn dense_transformer_gradients_match_finite_differences() {
    let g = graph(DENSE, 2);
    let feeds = random_feeds(&g, 200);
    check_model("dense transformer", &g, &feeds);
}

#[test]
fn qk_norm_transformer_gradients_match_finite_differences() {
    let g = graph(QK_NORM, 2);
    for name in ["q_norm", "k_norm"] {
        for block in 0..2 {
            let param = format!("model.layers.{block}.self_attn.{name}.weight");
            let found = g.params().into_iter().find(|(_, n, _)| *n == param);
            assert_eq!(found.map(|(_, _, ty)| ty.shape), Some(vec![4]), "{param}");
        }
    }
    let feeds = robust_feeds(&g, 400);
    check_model("qk_norm transformer", &g, &feeds);
}

#[test]
fn moe_classifier_gradients_match_finite_differences() {
    let g = graph(MLP_MOE, 5);
    let feeds = robust_feeds(&g, 300);
    check_model("moe classifier", &g, &feeds);
}

/// Every forward node keeps its id, op and label; forward outputs keep their nodes; every parameter
/// gets a `grad.*` output of its shape; every node autodiff added feeds some gradient output.
#[test]
fn training_graph_extends_the_forward_graph_without_dead_nodes() {
    let g = graph(MOE, 2);
    let train = training_graph(&g).unwrap();
    for id in g.g.node_indices() {
        assert_eq!(
            train.node(id),
            g.node(id),
            "forward node {} changed",
            id.index()
        );
    }
    for (name, id) in &g.outputs {
        assert_eq!(train.output(name), Some(*id), "forward output {name}");
    }
    let params = g.params();
    let grads: Vec<&(String, NodeId)> = train
        .outputs
        .iter()
        .filter(|(n, _)| n.starts_with("grad."))
        .collect();
    assert_eq!(grads.len(), params.len(), "one gradient per parameter");
    for (_, name, ty) in &params {
        let id = train
            .output(&format!("grad.{name}"))
            .unwrap_or_else(|| panic!("no grad.{name}"));
        assert_eq!(train.ty(id), ty);
    }
    let distinct: HashSet<NodeId> = grads.iter().map(|(_, id)| *id).collect();
    assert_eq!(
        distinct.len(),
        grads.len(),
        "every gradient output owns its node"
    );

    let mut live: HashSet<NodeId> = HashSet::new();
    let mut stack: Vec<NodeId> = grads.iter().map(|(_, id)| *id).collect();
    while let Some(id) = stack.pop() {
        if live.insert(id) {
            stack.extend(train.inputs(id));
        }
    }
    for id in train.g.node_indices() {
        if g.g.node_weight(id).is_none() {
            assert!(
                live.contains(&id),
                "dead backward node %{} {}",
                id.index(),
                train.node(id).label
            );
            assert!(
                train.node(id).label.starts_with("grad"),
                "backward label {}",
                train.node(id).label
            );
        }
    }
    let backward = train.g.node_count() - g.g.node_count();
    eprintln!(
        "moe transformer: {} forward nodes, {backward} backward nodes",
        g.g.node_count()
    );
}

/// Gradients are linear in the seed (the runtime scales it for accumulation and loss scaling).
#[test]
fn gradients_scale_with_the_seed() {
    let g = graph(DENSE, 1);
    let train = training_graph(&g).unwrap();
    let mut feeds = random_feeds(&g, 5);
    let grads = |feeds: &HashMap<String, Value>| -> Vec<f64> {
        let outs = run_outputs_in(&train, feeds, Precision::F64).unwrap();
        g.params()
            .iter()
            .flat_map(|(_, n, _)| outs[&format!("grad.{n}")].to_f64())
            .collect()
    };
    feeds.insert(SEED.into(), Value::F64(vec![1.0]));
    let one = grads(&feeds);
    feeds.insert(SEED.into(), Value::F64(vec![0.25]));
    let quarter = grads(&feeds);
    // The backward pass is linear in the seed and 0.25 is a power of two: exactly a quarter.
    let scaled: Vec<f64> = one.iter().map(|a| a * 0.25).collect();
    assert_eq!(scaled, quarter);
    assert!(one.iter().any(|&a| a != 0.0));
}

/// The f32 interpreter (what the GPU kernels are compared with) agrees with f64 on every gradient:
/// |g32 − g64| ≤ 1e-4 · max|g64 of that parameter| + 1e-7.
#[test]
fn f32_gradients_agree_with_f64() {
    let g = graph(MOE, 2);
    let train = training_graph(&g).unwrap();
    let mut feeds = robust_feeds(&g, 1);
    feeds.insert(SEED.into(), Value::F64(vec![1.0]));
    let wide = run_outputs_in(&train, &feeds, Precision::F64).unwrap();
    let narrow = run_outputs_in(&train, &feeds, Precision::F32).unwrap();
    let mut worst = 0.0f64;
    for (_, name, _) in g.params() {
        let key = format!("grad.{name}");
        let (a, b) = (wide[&key].to_f64(), narrow[&key].to_f64());
        let scale = a.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        for (x, y) in a.iter().zip(&b) {
            let err = (x - y).abs();
            assert!(err <= 1e-4 * scale + 1e-7, "{key}: f64 {x}, f32 {y}");
            worst = worst.max(err / scale.max(1e-30));
        }
    }
    eprintln!("moe transformer: f32 vs f64 gradients, max error / max|grad| {worst:.1e}");
}

/// Every example spec in `specs/` differentiates at its real size (batch 2), with a gradient output
/// for every parameter; prints forward and backward node counts.
#[test]
fn example_specs_differentiate() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("specs/ exists") {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("moe") {
            continue;
        }
        let source = std::fs::read_to_string(&path).unwrap();
        let spec = check(&source, &path).unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
        let g = lower(&spec, 2).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let train = training_graph(&g).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for (_, name, ty) in g.params() {
            let id = train.output(&format!("grad.{name}"));
            assert_eq!(
                id.map(|id| train.ty(id)),
                Some(&ty),
                "{}: grad.{name}",
                path.display()
            );
        }
        eprintln!(
            "{}: {} forward nodes, {} backward",
            path.display(),
            g.g.node_count(),
            train.g.node_count() - g.g.node_count()
        );
        seen += 1;
    }
    assert!(seen >= 3, "found {seen} specs");
}
