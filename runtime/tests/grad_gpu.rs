//! Gradient ops and whole training graphs on the GPU (lavapipe where there is none) against the
//! reference interpreter in f64.
//!
//! Per-op tests use odd shapes (not multiples of any workgroup, block or tile size) and, for the MoE
//! adjoints, routing tables built the way a model builds them: `MoeRoute` of the `TopK` (k = 2, so
//! distinct experts per token) of random router scores, with one expert left empty. Every graph runs
//! under both matmul variants × fused and unfused. Tolerance: |gpu − ref| ≤ 1e-4 + 1e-4·|ref| (f32
//! with other summation orders than the interpreter; sums here have at most a few hundred terms of
//! magnitude ≤ 4).
//!
//! Training graphs: `autodiff::training_graph(lower(spec))` of a tiny dense and a tiny MoE
//! transformer (GQA, shared expert, aux + z balancing) and a one-block QK-norm one, fused and unfused, `grad_seed` = 1. Every
//! output (`loss`, the balancing terms, every `grad.<param>`) is compared with the interpreter:
//! |gpu − ref| ≤ 1e-3·|ref| + 1e-4·max|ref| (the floor is relative to the largest entry of the same
//! tensor, for entries that are near zero through cancellation). Parameters are drawn at
//! unit-variance scale (not the 0.02 init, which makes every gradient tiny) and redrawn until every
//! top-k selection has a margin ≥ 1e-3 between the k-th and (k+1)-th score, so the GPU's f32 router
//! picks the same experts as the f64 reference.

use moec_compiler::autodiff::{training_graph, SEED};
use moec_compiler::check::check;
use moec_compiler::emit::{MatmulVariant, Target};
use moec_compiler::interp::Value;
use moec_compiler::ir::{DType, Graph, Init, NodeId, Op, RouteLayout, TensorType};
use moec_compiler::lower::lower;
use moec_compiler::precision::mark_f16;
use moec_compiler::recompute::recompute;
use moec_compiler::spec::Recompute;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::Path;

mod support;
use support::*;

const OP_ABS: f64 = 1e-4;
const OP_REL: f64 = 1e-4;
const MODEL_REL: f64 = 1e-3;
const MODEL_FLOOR: f64 = 1e-4;

fn op_tol(reference: f64, _scale: f64) -> f64 {
    OP_ABS + OP_REL * reference
}

/// Random f32 feeds U(-2, 2) for every f32 leaf of `graph` not already in `feeds`.
fn fill_f32(graph: &Graph, feeds: &mut HashMap<String, Value>, rng: &mut ChaCha8Rng) {
    let leaves = graph
        .params()
        .into_iter()
        .map(|(_, n, t)| (n, t))
        .chain(graph.data_inputs().into_iter().map(|(_, n, t)| (n, t)));
    for (name, ty) in leaves {
        if ty.dtype == DType::F32 && !feeds.contains_key(&name) {
            let v = uniform(rng, ty.numel(), 2.0);
            feeds.insert(name, v);
        }
    }
}

#[test]
fn sum_to_and_broadcast_to() {
    let mut g = Graph::new();
    let x = g.input("x", TensorType::f32(&[3, 1, 37, 5]));
    for (i, to) in [
        vec![5],
        vec![37, 1],
        vec![3, 1, 1, 5],
        vec![1, 1],
        vec![1, 37, 5],
        vec![3, 1, 37, 1],
    ]
    .into_iter()
    .enumerate()
    {
        let s = add(&mut g, Op::SumTo { shape: to }, &[x], &format!("sum_to{i}"));
        g.set_output(&format!("sum_to{i}"), s);
    }
    // A long reduction: 2 · 301 rows into one bias row.
    let big = g.input("big", TensorType::f32(&[2, 301, 7]));
    let s = add(&mut g, Op::SumTo { shape: vec![7] }, &[big], "bias");
    g.set_output("bias", s);
    let r = g.input("r", TensorType::f32(&[37, 1]));
    for (i, to) in [vec![3, 37, 5], vec![37, 9]].into_iter().enumerate() {
        let b = add(
            &mut g,
            Op::BroadcastTo { shape: to },
            &[r],
            &format!("bcast{i}"),
        );
        g.set_output(&format!("bcast{i}"), b);
    }
    let mut feeds = HashMap::new();
    fill_f32(&g, &mut feeds, &mut ChaCha8Rng::seed_from_u64(1));
    let worst = compare(&g, &feeds, &op_tol);
    eprintln!("sum_to / broadcast_to max abs errors: {worst:?}");
}

#[test]
fn embedding_rope_cross_entropy_and_scatter_cols() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let mut g = Graph::new();
    // 123 ids over a 37-row vocabulary: every row gets several contributions, some none.
    let ids = g.input("ids", TensorType::u32(&[3, 41]));
    let gemb = g.input("gemb", TensorType::f32(&[3, 41, 19]));
    let eg = add(
        &mut g,
        Op::EmbeddingGrad { vocab: 37 },
        &[ids, gemb],
        "emb_grad",
    );
    let q = g.input("q", TensorType::f32(&[2, 9, 3, 10]));
    let rg = add(&mut g, Op::RopeGrad { theta: 10000.0 }, &[q], "rope_grad");
    let logits = g.input("logits", TensorType::f32(&[67, 131]));
    let targets = g.input("targets", TensorType::u32(&[67]));
    let seed = g.input("seed", TensorType::f32(&[1]));
    let ceg = add(
        &mut g,
        Op::CrossEntropyGrad,
        &[logits, targets, seed],
        "ce_grad",
    );
    // Scatter of top-k gate gradients back to the expert columns.
    let scores = g.input("scores", TensorType::f32(&[29, 7]));
    let idx = add(&mut g, Op::TopK { k: 2 }, &[scores], "idx");
    let gk = g.input("gk", TensorType::f32(&[29, 2]));
    let sc = add(&mut g, Op::ScatterCols { cols: 7 }, &[gk, idx], "scatter");
    for (name, id) in [
        ("emb_grad", eg),
        ("rope_grad", rg),
        ("ce_grad", ceg),
        ("scatter", sc),
    ] {
        g.set_output(name, id);
    }
    let mut feeds = HashMap::new();
    // Ids avoid the last 4 vocabulary rows, whose gradient must then be exactly zero.
    feeds.insert(
        "ids".into(),
        Value::U32((0..123).map(|_| rng.random_range(0..33)).collect()),
    );
    feeds.insert(
        "targets".into(),
        Value::U32((0..67).map(|_| rng.random_range(0..131)).collect()),
    );
    feeds.insert("seed".into(), Value::F32(vec![0.7]));
    // Large logits: the softmax must be computed stably.
    feeds.insert("logits".into(), uniform(&mut rng, 67 * 131, 30.0));
    fill_f32(&g, &mut feeds, &mut rng);
    let worst = compare(&g, &feeds, &op_tol);
    eprintln!("embedding/rope/ce/scatter max abs errors: {worst:?}");
    let got = run_gpu(&g, &feeds, &gpu().target(), true);
    assert!(
        got["emb_grad"][33 * 19..].iter().all(|&v| v == 0.0),
        "unused vocabulary rows get zero gradient"
    );
}

/// A realistic routing: `TopK` (k = 2) of random scores `[tokens, experts]` with the last expert's
/// scores pushed down so it receives no token (an empty segment), then `MoeRoute`.
fn routed(g: &mut Graph, layout: RouteLayout) -> NodeId {
    let scores = g.input("scores", TensorType::f32(&[layout.tokens, layout.experts]));
    let bias = g.param("bias", &[layout.experts], Init::Constant(0.0));
    let biased = add(
        g,
        Op::Binary(moec_compiler::ir::BinaryOp::Add),
        &[scores, bias],
        "biased",
    );
    let idx = add(g, Op::TopK { k: layout.k }, &[biased], "idx");
    add(g, Op::MoeRoute { layout }, &[idx], "route")
}

fn check_moe_adjoints(layout: RouteLayout, d: usize, hidden: usize, seed: u64) {
    let mut g = Graph::new();
    let route = routed(&mut g, layout);
    moe_adjoints(&mut g, layout, route, d, hidden);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut bias = vec![0.0f32; layout.experts];
    bias[layout.experts - 1] = -100.0;
    let mut feeds = HashMap::new();
    feeds.insert("bias".to_string(), Value::F32(bias));
    fill_f32(&g, &mut feeds, &mut rng);
    let worst = compare(&g, &feeds, &op_tol);
    eprintln!("moe adjoints {layout:?}: max abs errors {worst:?}");
    // The last expert is empty: its weight gradient is exactly zero.
    let got = run_gpu(&g, &feeds, &gpu().target(), true);
    let per_expert = hidden * d;
    assert!(
        got["grad_w"][(layout.experts - 1) * per_expert..]
            .iter()
            .all(|&v| v == 0.0),
        "empty expert gets zero gradient"
    );
}

#[test]
fn moe_adjoints_tile_16() {
    check_moe_adjoints(RouteLayout::dropless(53, 2, 6, 16), 19, 23, 3);
}

#[test]
fn moe_adjoints_with_vec4_loads() {
    // Every axis a multiple of 4 and the route tile a whole subgroup-shared block (32 rows): on a
    // CPU adapter the input gradient reads w as vec4s along its columns, and the weight gradient
    // reads both operands as vec4s (dy along its rows, x along its columns).
    check_moe_adjoints(RouteLayout::dropless(40, 2, 4, 32), 64, 96, 5);
}

#[test]
fn moe_adjoints_tile_4_wide() {
    // Wider than one register block in both output axes (hidden 75 > 8·8, d 70 > 64 columns).
    check_moe_adjoints(RouteLayout::dropless(37, 2, 5, 4), 70, 75, 4);
}

#[test]
fn moe_adjoints_with_capacity_drops() {
    // 82 slots, at most 15 per expert: over-capacity slots are dropped (slot_row = NONE) and the
    // padded row bound shrinks to 4 · 15 + 4 · 7.
    let layout = RouteLayout {
        capacity: 15,
        ..RouteLayout::dropless(41, 2, 4, 8)
    };
    assert!(layout.drops());
    check_moe_adjoints(layout, 13, 21, 5);
}

const DENSE: &str = r#"
model tiny_dense {
  vocab = 32
  dim = 16
  layers = 2
  heads = 2
  kv_heads = 1
  context = 8
  moe {
    experts = 0
  }
}
"#;

const MOE: &str = r#"
model tiny_moe {
  vocab = 32
  dim = 16
  layers = 2
  heads = 2
  kv_heads = 1
  context = 8
  moe {
    experts = 4
    top_k = 2
    expert = swiglu(hidden = 24)
    shared_experts = 1
    gate = softmax(renorm = true)
    balance = aux(0.5) + z(0.1)
  }
}
"#;

/// Unit-variance feeds: weights U(±√(3/fan_in)), constant-initialised params (norm weights,
/// biases) c ± 0.3, token ids and targets uniform over the vocabulary.
fn model_feeds(g: &Graph, vocab: u32, seed: u64) -> HashMap<String, Value> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut feeds = unit_variance_params(g, &mut rng);
    for (_, name, ty) in g.data_inputs() {
        if name.starts_with("jitter.") {
            // Switch jitter: U(1 - ε, 1 + ε), ε = 0.1.
            let v = (0..ty.numel())
                .map(|_| rng.random_range(0.9..1.1))
                .collect();
            feeds.insert(name, Value::F32(v));
            continue;
        }
        assert_eq!(
            ty.dtype,
            DType::U32,
            "{name}: transformer inputs are token ids"
        );
        feeds.insert(
            name,
            Value::U32(
                (0..ty.numel())
                    .map(|_| rng.random_range(0..vocab))
                    .collect(),
            ),
        );
    }
    feeds
}

/// How a training graph is compared: its dtypes, the router margin its feeds need, the seed and
/// the tolerance `rel·|ref| + floor·max|ref|`, and the (target, fused) configurations it runs in.
struct Mode {
    f16: bool,
    margin: f64,
    seed: f32,
    rel: f64,
    floor: f64,
    configs: fn() -> Vec<(Target, bool)>,
}

const F32_MODE: Mode = Mode {
    f16: false,
    margin: 1e-3,
    seed: 1.0,
    rel: MODEL_REL,
    floor: MODEL_FLOOR,
    configs,
};

fn check_training(what: &str, source: &str, vocab: u32) {
    check_training_in(what, source, vocab, &F32_MODE)
}

fn check_training_in(what: &str, source: &str, vocab: u32, mode: &Mode) {
    let spec = check(source, Path::new("test.moe")).unwrap_or_else(|d| panic!("{d:?}"));
    let forward = lower(&spec, 2).expect("lowers");
    let mut train = training_graph(&forward).expect("differentiates");
    if mode.f16 {
        mark_f16(&mut train);
    }
    let mut feeds = (1..200)
        .map(|seed| model_feeds(&forward, vocab, seed))
        .find(|f| selection_margin(&forward, f) >= mode.margin)
        .expect("a seed with well-separated router scores");
    feeds.insert(SEED.into(), Value::F32(vec![mode.seed]));
    let grads = train
        .outputs
        .iter()
        .filter(|(n, _)| n.starts_with("grad."))
        .count();
    assert_eq!(
        grads,
        forward.params().len(),
        "{what}: every parameter reaches the loss"
    );
    let worst = compare_lowered(
        &train,
        &train,
        &feeds,
        &|reference, scale| mode.rel * reference + mode.floor * scale,
        &(mode.configs)(),
    );
    let mut names: Vec<_> = worst.into_iter().collect();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    eprintln!("{what}: {} outputs; max abs error per output:", names.len());
    for (name, err) in names {
        eprintln!("  {name}: {err:.2e}");
    }
}

/// QK-norm (Qwen3: RMSNorm over each head's q and k before RoPE) with GQA, one dense block (the
/// MoE interplay is covered by the interpreter's finite-difference check; lavapipe is slow).
const QK_NORM: &str = r#"
model tiny_qk_norm {
  vocab = 32
  dim = 16
  layers = 1
  heads = 4
  kv_heads = 2
  context = 8
  qk_norm = true
  moe {
    experts = 0
  }
}
"#;

#[test]
fn qk_norm_training_graph_matches_interpreter() {
    check_training("qk_norm", QK_NORM, 32);
}

#[test]
fn dense_training_graph_matches_interpreter() {
    check_training("dense", DENSE, 32);
}

#[test]
fn moe_training_graph_matches_interpreter() {
    check_training("moe", MOE, 32);
}

/// `MOE` with every matmul axis a multiple of 4 and the expert hidden a whole subgroup-shared block
/// (32 rows): on a CPU adapter the grouped and plain products read their operands as vec4s along k,
/// along A's rows and along B's columns, with the gather prologues (token rows, gate weights)
/// absorbed into those loads. Register-blocked schedules only (the shared-tile one has no vec4
/// loads and `MOE` covers it), fused and unfused: a cold lavapipe compiles each kernel once.
#[test]
fn moe_training_graph_with_vec4_loads_matches_interpreter() {
    let source = MOE
        .replace("dim = 16", "dim = 32")
        .replace("hidden = 24", "hidden = 64");
    // Every product here is small enough for the compile-bound schedule, which has no vec4 loads.
    let register_blocked = || {
        configs()
            .into_iter()
            .filter(|(target, _)| target.matmul == MatmulVariant::RegisterBlocked)
            .map(|(target, fused)| {
                let large_blocks = Target {
                    small_product_macs: 0,
                    ..target
                };
                (large_blocks, fused)
            })
            .collect()
    };
    check_training_in(
        "moe vec4",
        &source,
        32,
        &Mode {
            configs: register_blocked,
            ..F32_MODE
        },
    );
}

/// `MOE` with Switch jitter on the router input: a random graph input the recomputed router must
/// read exactly as the forward pass did.
fn moe_with_jitter() -> String {
    MOE.replace(
        "balance = aux(0.5) + z(0.1)",
        "balance = aux(0.5) + z(0.1)\n    jitter = 0.1",
    )
}

/// Every recompute level: the recomputed training graph against the interpreter (as above), and
/// against the GPU run of the same graph without recomputation, output by output, in the fused and
/// unfused plans: equal within 1e-6 relative to the output's largest entry (the largest difference
/// is printed; the recomputed kernels are the forward's, so it is expected to be 0).
#[test]
fn recomputed_training_graphs_match_interpreter_and_no_recompute() {
    let source = moe_with_jitter();
    let spec = check(&source, Path::new("test.moe")).unwrap_or_else(|d| panic!("{d:?}"));
    let forward = lower(&spec, 2).expect("lowers");
    let plain = training_graph(&forward).expect("differentiates");
    let mut feeds = (1..50)
        .map(|seed| model_feeds(&forward, 32, seed))
        .find(|f| selection_margin(&forward, f) >= 1e-3)
        .expect("a seed with well-separated router scores");
    feeds.insert(SEED.into(), Value::F32(vec![1.0]));
    let target = gpu().target();
    let baseline: Vec<_> = [true, false]
        .map(|fused| run_gpu(&plain, &feeds, &target, fused))
        .into();
    for level in [Recompute::Attention, Recompute::Moe, Recompute::Block] {
        let g = recompute(plain.clone(), forward.g.node_count(), level);
        let clones =
            g.g.node_indices()
                .filter(|&n| g.node(n).label.starts_with("recompute."))
                .count();
        assert!(clones > 0, "{level:?}: nothing recomputed");
        compare(&g, &feeds, &|reference, scale| {
            MODEL_REL * reference + MODEL_FLOOR * scale
        });
        let mut largest = 0.0f64;
        for (fused, base) in [true, false].into_iter().zip(&baseline) {
            let got = run_gpu(&g, &feeds, &target, fused);
            for (name, want) in base {
                let scale = want.iter().fold(0.0f64, |m, w| m.max(w.abs()));
                for (w, h) in want.iter().zip(&got[name]) {
                    let diff = (w - h).abs();
                    largest = largest.max(diff / scale.max(f64::MIN_POSITIVE));
                    assert!(
                        diff <= 1e-6 * scale,
                        "{level:?} {name} (fused = {fused}): {h} vs {w}"
                    );
                }
            }
        }
        eprintln!("{level:?}: {clones} recomputed nodes; largest difference to no recompute {largest:.1e}");
    }
}

/// `precision = f16`: the marked training graph (activations and their gradients stored in f16)
/// against the interpreter's f16 mode, fused and unfused, with the seed a loss scale would give
/// (1024). Tolerance 2⁻⁶·|ref| + 2⁻⁷·max|ref|: fused groups keep values in f32 registers that the
/// interpreter rounds to f16 (2⁻¹¹ relative each), and those differences add up over two blocks and
/// their backward pass. Router scores need a margin of 0.01 so both pick the same experts.
#[test]
fn moe_f16_training_graph_matches_f16_interpreter() {
    check_training_in(
        "moe f16",
        MOE,
        32,
        &Mode {
            f16: true,
            margin: 0.01,
            seed: 1024.0,
            rel: 1.0 / 64.0,
            floor: 1.0 / 128.0,
            configs,
        },
    );
}

/// Split bindings: the MoE training step compiled as `moec train` compiles it (chunked head) for
/// a 1.5 KiB binding limit (the route table, which its template indexes directly, just fits), so
/// the embedding, every expert stack and their gradients are each bound
/// as several segments, against the interpreter (fused and unfused, the tolerance above), and
/// against the same graph on the adapter's real limit (nothing split): bit-identical, since
/// splitting changes only how a kernel addresses its buffers.
#[test]
fn split_bindings_match_the_interpreter_and_the_unsplit_plan() {
    let spec = check(MOE, Path::new("test.moe")).unwrap_or_else(|d| panic!("{d:?}"));
    let forward = lower(&spec, 2).expect("lowers");
    let mut feeds = (1..200)
        .map(|seed| model_feeds(&forward, 32, seed))
        .find(|f| selection_margin(&forward, f) >= 1e-3)
        .expect("a seed with well-separated router scores");
    feeds.insert(SEED.into(), Value::F32(vec![1.0]));
    let real = gpu().target();
    let small = moec_compiler::emit::Target {
        max_storage_binding_size: 1536,
        ..real.clone()
    };
    let compiled = moec_compiler::compile_training(&spec, 2, &small, true).expect("compiles");
    let split = compiled
        .plan
        .dispatches
        .iter()
        .filter(|d| d.bindings.iter().any(|b| b.offset > 0))
        .count();
    assert!(split > 0, "nothing was split");
    let graph = compiled.graph;
    let configs = [(small.clone(), true), (small.clone(), false)];
    compare_lowered(
        &graph,
        &graph,
        &feeds,
        &|reference, scale| MODEL_REL * reference + MODEL_FLOOR * scale,
        &configs,
    );
    for fused in [true, false] {
        let got = run_gpu(&graph, &feeds, &small, fused);
        let whole = run_gpu(&graph, &feeds, &real, fused);
        for (name, want) in &whole {
            assert_eq!(&got[name], want, "{name} (fused = {fused})");
        }
    }
    eprintln!("{split} dispatches bind split values");
}
