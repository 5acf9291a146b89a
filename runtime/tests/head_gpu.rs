//! The fused, chunked LM head and loss on the GPU (lavapipe where there is none) against the
//! interpreter's unchunked `LinearCrossEntropy` and its adjoints in f64, fused and unfused, with the
//! adapter's own matmul schedule (the head's kernels are the ordinary matmul and cross-entropy
//! kernels, whose other schedules grad_gpu.rs and ops_gpu.rs cover).
//!
//! - The head alone: `h[23, 12]`, `w[101, 12]`, chunks of 9 rows (9 + 9 + 5, so the chunk size
//!   does not divide the tokens), and the same with `w` tied to an embedding of the tokens.
//!   Loss and gradients: |gpu − ref| ≤ 1e-5·max|ref| per output (f32 sums of ≤ 101 terms).
//! - Whole training graphs of a tiny transformer, untied and tied, chunks of 9 of
//!   the 16 tokens: the model tolerance of grad_gpu.rs, |gpu − ref| ≤ 1e-3·|ref| + 1e-4·max|ref|;
//!   and the same marked f16 (f16 chunk logits and adjoint) against the interpreter's f16 mode, with
//!   grad_gpu.rs's f16 tolerance.

mod support;

use moec_compiler::autodiff::{training_graph, SEED};
use moec_compiler::check::check;
use moec_compiler::emit::Target;
use moec_compiler::head::legalize_in_chunks;
use moec_compiler::interp::Value;
use moec_compiler::ir::{BinaryOp, Graph, Init, Op, TensorType};
use moec_compiler::lower::{lower_with, Head};
use moec_compiler::precision::mark_f16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::Path;
use support::{compare_lowered, uniform};

const ROWS: usize = 9;

/// Fused and unfused, with the adapter's matmul schedule.
fn configs() -> Vec<(Target, bool)> {
    [true, false]
        .map(|fused| (support::gpu().target(), fused))
        .to_vec()
}

/// `LinearCrossEntropy(h, w, targets)` as the loss; with `tied`, `h = embedding(w, tokens) · s`
/// (a per-feature scale), so `w` gets both the head's and the embedding's gradient.
fn head_graph(tied: bool) -> Graph {
    let (n, v, d) = (23, 101, 12);
    let normal = Init::Normal { std: 0.02 };
    let mut g = Graph::new();
    let w = g.param("w", &[v, d], normal);
    let h = if tied {
        let tokens = g.input("tokens", TensorType::u32(&[n]));
        let x = g.add(Op::Embedding, &[w, tokens], "embed").unwrap();
        let s = g.param("s", &[d], normal);
        g.add(Op::Binary(BinaryOp::Mul), &[x, s], "h").unwrap()
    } else {
        g.param("h", &[n, d], normal)
    };
    let targets = g.input("targets", TensorType::u32(&[n]));
    let ce = g
        .add(Op::LinearCrossEntropy, &[h, w, targets], "ce")
        .unwrap();
    g.set_output("loss", ce);
    g
}

#[test]
fn chunked_head_matches_the_unchunked_interpreter() {
    for tied in [false, true] {
        let forward = head_graph(tied);
        let train = training_graph(&forward).unwrap();
        let chunked = legalize_in_chunks(&train, ROWS).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(if tied { 2 } else { 1 });
        let mut feeds = HashMap::new();
        for (_, name, ty) in forward.params() {
            feeds.insert(name, uniform(&mut rng, ty.numel(), 3.0));
        }
        for (_, name, ty) in forward.data_inputs() {
            let ids = (0..ty.numel()).map(|_| rng.random_range(0..101)).collect();
            feeds.insert(name, Value::U32(ids));
        }
        feeds.insert(SEED.into(), Value::F32(vec![1.0]));
        let worst = compare_lowered(
            &train,
            &chunked,
            &feeds,
            &|_, scale| 1e-5 * scale,
            &configs(),
        );
        eprintln!("head, tied = {tied}: max abs error per output {worst:?}");
    }
}

/// A tiny dense transformer (the head does not depend on the blocks; MoE routing on the GPU is
/// grad_gpu.rs's subject).
fn model(tied: bool) -> String {
    format!(
        "model head_gpu {{\n  vocab = 37\n  dim = 8\n  layers = 1\n  heads = 2\n  context = 8\n  tie_embeddings = {tied}\n  ffn = swiglu(hidden = 12)\n  moe {{\n    experts = 0\n  }}\n}}\n"
    )
}

/// The tiny model's training graph, chunked, on the GPU against the unchunked one in the
/// interpreter; with `f16`, both marked (`precision = f16`: the chunks' logits and their adjoint
/// are then f16 too) and the interpreter in its f16 mode. Returns the loss error.
fn check_model(tied: bool, f16: bool, seed: f32, tol: &dyn Fn(f64, f64) -> f64) -> f64 {
    let spec = check(&model(tied), Path::new("test.moe")).unwrap_or_else(|d| panic!("{d:?}"));
    let forward = lower_with(&spec, 2, Head::Loss).unwrap();
    let mut train = training_graph(&forward).unwrap();
    if f16 {
        mark_f16(&mut train);
    }
    let chunked = legalize_in_chunks(&train, ROWS).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut feeds = HashMap::new();
    for (id, name, ty) in forward.params() {
        let value = match forward.node(id).op {
            Op::Param {
                init: Init::Constant(c),
                ..
            } => Value::F32(
                (0..ty.numel())
                    .map(|_| c + rng.random_range(-0.3..0.3))
                    .collect(),
            ),
            _ => uniform(&mut rng, ty.numel(), (3.0 / ty.last() as f32).sqrt()),
        };
        feeds.insert(name, value);
    }
    for (_, name, ty) in forward.data_inputs() {
        let ids = (0..ty.numel()).map(|_| rng.random_range(0..37)).collect();
        feeds.insert(name, Value::U32(ids));
    }
    feeds.insert(SEED.into(), Value::F32(vec![seed]));
    compare_lowered(&train, &chunked, &feeds, tol, &configs())["loss"]
}

#[test]
fn chunked_training_graphs_match_the_interpreter() {
    for tied in [false, true] {
        let tol = |reference: f64, scale: f64| 1e-3 * reference + 1e-4 * scale;
        let loss = check_model(tied, false, 1.0, &tol);
        eprintln!("model tied = {tied}: loss error {loss:.1e}");
    }
}

/// `precision = f16`: the chunks' f16 logits and adjoint (widened by the cross-entropy kernels)
/// against the interpreter's f16 mode, which rounds the fused head's logits and adjoint, with a
/// loss-scale-like seed (1024) and grad_gpu.rs's f16 tolerance 2⁻⁶·|ref| + 2⁻⁷·max|ref|.
#[test]
fn f16_chunked_training_graphs_match_the_f16_interpreter() {
    for tied in [false, true] {
        let tol = |reference: f64, scale: f64| reference / 64.0 + scale / 128.0;
        let loss = check_model(tied, true, 1024.0, &tol);
        eprintln!("model f16, tied = {tied}: loss error {loss:.1e}");
    }
}
