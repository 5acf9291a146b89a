//! Every `Op` variant through the whole pipeline: small specs (one per gate family, and an LSTM) are
//! lowered with the full logits and with the fused head, differentiated, legalized into head chunks
//! (also with f16 storage), run by the interpreter, fused (and unfused) and emitted for the default
//! and the register-blocked targets; `emit` validates every kernel with naga before it returns.
//!
//! Coverage is checked twice: [`variant`] matches `Op` with no catch-all arm, so a new variant does
//! not compile here until it is named, and the test asserts that the graphs below hold every variant
//! serde's derive lists for `Op` ([`op_variants`]), so a variant no graph exercises fails at run
//! time. A new op therefore needs a graph here that produces it (docs/DECISIONS.md, "Adding an op or
//! a gate").
//!
//! Numbers: the chunked head must give the unchunked training graph's loss and gradients (f64, to
//! 1e-6 of each output's largest magnitude: the chunks reorder a sum and weight it by shares
//! `len / N` held as f32 constants, and a gradient's entries can cancel to far below its scale);
//! every loss and gradient is finite in f32, f64 and the f16 mode. Correctness against formulas and finite differences is the other tests' job.

use moec_compiler::autodiff::{training_graph, SEED};
use moec_compiler::check::check;
use moec_compiler::emit::emit;
use moec_compiler::fuse::{fuse, FuseOptions};
use moec_compiler::head::legalize_in_chunks;
use moec_compiler::interp::{run_outputs_in, Precision, Value};
use moec_compiler::ir::{Graph, Op};
use moec_compiler::lower::{lower_with, Head};
use moec_compiler::precision::mark_f16;
use moec_compiler::target::{MatmulVariant, Target};
use serde::de::{self, Visitor};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

mod support;
use support::random_feeds;

/// Transformer, softmax gate with a dropping capacity (priority routing), jitter, aux and z losses.
const SOFTMAX: &str = r#"
model softmax_capacity {
  family = transformer
  vocab = 7
  dim = 8
  layers = 1
  heads = 2
  context = 3
  moe {
    experts = 3
    top_k = 2
    expert = swiglu(hidden = 4)
    gate = softmax
    capacity = factor(1.0, drop = probability)
    balance = aux(0.01) + z(0.001)
    jitter = 0.01
  }
}
"#;

/// Shazeer's two-level hierarchy with noisy top-k (scattered gate matrices) and the `bias` balance
/// (router state, expert loads).
const HIERARCHICAL: &str = r#"
model hierarchical_bias {
  family = transformer
  vocab = 7
  dim = 8
  layers = 1
  heads = 2
  context = 3
  moe {
    experts = 4
    groups = 2 x 2
    hierarchy = two_level
    top_groups = 1
    top_k = 1
    expert = relu(hidden = 4)
    gate = noisy_top_k(noise = 1.0)
    balance = bias(rate = 0.001)
  }
}
"#;

const EXPERT_CHOICE: &str = r#"
model expert_choice {
  family = transformer
  vocab = 7
  dim = 8
  layers = 1
  heads = 2
  context = 3
  moe {
    experts = 3
    expert = swiglu(hidden = 4)
    gate = expert_choice(capacity = 2.0)
    balance = none
  }
}
"#;

const SINKHORN: &str = r#"
model sinkhorn {
  family = transformer
  vocab = 7
  dim = 8
  layers = 1
  heads = 2
  context = 3
  moe {
    experts = 3
    top_k = 2
    expert = swiglu(hidden = 4)
    gate = sinkhorn(iters = 2)
    capacity = factor(2.0, drop = probability)
    balance = z(0.001)
  }
}
"#;

const AUCTION: &str = r#"
model auction {
  family = transformer
  vocab = 7
  dim = 8
  layers = 1
  heads = 2
  context = 3
  moe {
    experts = 3
    top_k = 2
    expert = swiglu(hidden = 4)
    gate = auction(rounds = 3, epsilon = 0.001, budget = 1.0, price_rate = 0.01)
    capacity = factor(1.25)
    balance = z(0.001)
  }
}
"#;

/// A bidirectional LSTM classifier (scans both ways, final states) with flat noisy top-k and cv2.
const LSTM: &str = r#"
model lstm_bidirectional {
  family = lstm
  inputs = 3
  classes = 4
  context = 3
  dim = 4
  layers = 2
  bidirectional = true
  moe {
    experts = 3
    top_k = 2
    expert = relu(hidden = 4)
    gate = noisy_top_k(noise = 1.0)
    balance = cv2(importance = 0.5, load = 0.5)
  }
}
"#;

/// `op`'s variant name. No catch-all arm: a new `Op` variant is a compile error here, and the test
/// then fails until some graph below contains it.
fn variant(op: &Op) -> &'static str {
    match op {
        Op::Input { .. } => "Input",
        Op::Param { .. } => "Param",
        Op::Affine { .. } => "Affine",
        Op::Unary(_) => "Unary",
        Op::Binary(_) => "Binary",
        Op::Reduce(_) => "Reduce",
        Op::Reshape { .. } => "Reshape",
        Op::Permute { .. } => "Permute",
        Op::MatMul { .. } => "MatMul",
        Op::Embedding => "Embedding",
        Op::Rope { .. } => "Rope",
        Op::Softmax { .. } => "Softmax",
        Op::CrossEntropy => "CrossEntropy",
        Op::LinearCrossEntropy => "LinearCrossEntropy",
        Op::SliceRows { .. } => "SliceRows",
        Op::ConcatRows => "ConcatRows",
        Op::TopK { .. } => "TopK",
        Op::GatherCols => "GatherCols",
        Op::TopKMask { .. } => "TopKMask",
        Op::MoeRoute { .. } => "MoeRoute",
        Op::SliceCols { .. } => "SliceCols",
        Op::RouteLoad { .. } => "RouteLoad",
        Op::ExpertChoice { .. } => "ExpertChoice",
        Op::Sinkhorn { .. } => "Sinkhorn",
        Op::Auction { .. } => "Auction",
        Op::MoeGather { .. } => "MoeGather",
        Op::GroupedMatMul { .. } => "GroupedMatMul",
        Op::MoeCombine { .. } => "MoeCombine",
        Op::SumTo { .. } => "SumTo",
        Op::BroadcastTo { .. } => "BroadcastTo",
        Op::EmbeddingGrad { .. } => "EmbeddingGrad",
        Op::RopeGrad { .. } => "RopeGrad",
        Op::CrossEntropyGrad => "CrossEntropyGrad",
        Op::LinearCrossEntropyGradH => "LinearCrossEntropyGradH",
        Op::LinearCrossEntropyGradW => "LinearCrossEntropyGradW",
        Op::ScatterCols { .. } => "ScatterCols",
        Op::MoeGatherGrad { .. } => "MoeGatherGrad",
        Op::GroupedMatMulGradX { .. } => "GroupedMatMulGradX",
        Op::GroupedMatMulGradW { .. } => "GroupedMatMulGradW",
        Op::MoeCombineGradRows { .. } => "MoeCombineGradRows",
        Op::MoeCombineGradWeights { .. } => "MoeCombineGradWeights",
        Op::LstmScan { .. } => "LstmScan",
        Op::LstmHidden => "LstmHidden",
        Op::LstmScanGrad { .. } => "LstmScanGrad",
        Op::LstmScanGradW { .. } => "LstmScanGradW",
        Op::LstmLast { .. } => "LstmLast",
        Op::LstmLastGrad { .. } => "LstmLastGrad",
    }
}

/// Every variant name of `Op`, from the list serde's derived `Deserialize` hands to
/// `deserialize_enum` (a deserializer that only records it): the list nobody has to keep by hand.
fn op_variants() -> BTreeSet<&'static str> {
    struct Names<'a>(&'a mut &'static [&'static str]);
    impl<'de> de::Deserializer<'de> for Names<'_> {
        type Error = de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not an enum"))
        }
        fn deserialize_enum<V: Visitor<'de>>(
            self,
            _: &'static str,
            variants: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = variants;
            Err(de::Error::custom("variants recorded"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map struct identifier
            ignored_any
        }
    }
    let mut names: &'static [&'static str] = &[];
    let _ = <Op as serde::Deserialize>::deserialize(Names(&mut names));
    names.iter().copied().collect()
}

fn targets() -> [Target; 2] {
    let blocked = Target {
        matmul: MatmulVariant::RegisterBlocked,
        max_storage_buffers_per_stage: 32,
        ..Target::default()
    };
    [Target::default(), blocked]
}

/// The named outputs of `graph` at `precision`, every float one asserted finite.
fn run_finite(
    what: &str,
    graph: &Graph,
    feeds: &HashMap<String, Value>,
    precision: Precision,
) -> HashMap<String, Value> {
    let outs = run_outputs_in(graph, feeds, precision).unwrap_or_else(|e| panic!("{what}: {e}"));
    for (name, v) in &outs {
        if v.as_u32().is_none() {
            assert!(
                v.to_f64().iter().all(|x| x.is_finite()),
                "{what}: `{name}` not finite"
            );
        }
    }
    outs
}

/// Every stage for one spec; returns the graphs it built, whose ops the coverage check reads.
fn pipeline(name: &str, source: &str) -> Vec<Graph> {
    let spec = check(source, Path::new("every_op.moe")).unwrap_or_else(|d| panic!("{d:?}"));
    let logits = lower_with(&spec, 2, Head::Logits).expect("lowers");
    let forward = lower_with(&spec, 2, Head::Loss).expect("lowers");
    let train = training_graph(&forward).expect("differentiates");
    // Chunks of 5 of the transformers' 6 token rows (an uneven last chunk), of 1 of the
    // classifier's 2 sequence rows.
    let rows = if name == "lstm" { 1 } else { 5 };
    let legal = legalize_in_chunks(&train, rows).expect("legalizes");
    let mut train16 = train.clone();
    mark_f16(&mut train16);
    let legal16 = legalize_in_chunks(&train16, rows).expect("legalizes");

    let mut feeds = random_feeds(&train, 7);
    feeds.insert(SEED.into(), Value::F64(vec![1.0]));
    let whole = run_finite(name, &train, &feeds, Precision::F64);
    let chunked = run_finite(name, &legal, &feeds, Precision::F64);
    for (out, v) in &whole {
        let (a, b) = (v.to_f64(), chunked[out].to_f64());
        let scale = a.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        for (x, y) in a.iter().zip(&b) {
            assert!(
                (x - y).abs() <= 1e-6 * scale + 1e-12,
                "{name}: `{out}` chunked {y} vs whole {x}"
            );
        }
    }
    run_finite(name, &legal, &feeds, Precision::F32);
    run_finite(name, &legal16, &feeds, Precision::F64);
    run_finite(name, &logits, &feeds, Precision::F32);

    for graph in [&logits, &legal, &legal16] {
        for target in targets() {
            for options in [
                FuseOptions::for_target(&target),
                FuseOptions::unfused(&target),
            ] {
                let fused = fuse(graph, options);
                emit(graph, &fused, &target).unwrap_or_else(|e| panic!("{name}: {e}"));
            }
        }
    }
    vec![logits, forward, train, legal, legal16]
}

#[test]
fn every_op_runs_through_inference_interpreter_autodiff_fusion_and_emit() {
    let specs = [
        ("softmax", SOFTMAX),
        ("hierarchical", HIERARCHICAL),
        ("expert_choice", EXPERT_CHOICE),
        ("sinkhorn", SINKHORN),
        ("auction", AUCTION),
        ("lstm", LSTM),
    ];
    let mut seen = BTreeSet::new();
    for (name, source) in specs {
        for graph in pipeline(name, source) {
            seen.extend(graph.g.node_weights().map(|n| variant(&n.op)));
        }
    }
    let all = op_variants();
    assert!(
        all.contains("Input") && all.contains("LstmLastGrad"),
        "{all:?}"
    );
    let missing: Vec<_> = all.difference(&seen).collect();
    assert!(missing.is_empty(), "no graph exercises {missing:?}");
    assert_eq!(seen, all);
}
