//! The fused, chunked LM head and loss (`Op::LinearCrossEntropy`, `head::legalize`) against the
//! unchunked reference, in the f64 interpreter.
//!
//! - The legalized training graph (chunks of 1, 5, 16 and 100 rows over 16 tokens: one row each, a
//!   chunk size that does not divide the tokens, exactly one chunk, and a chunk larger than the
//!   tokens) gives the unlegalized graph's outputs, and both give those of the classic head
//!   (`Head::Logits`: materialised logits, `CrossEntropy`): |a − b| ≤ 1e-12·max|b| per output.
//! - Finite differences (f64, central, h = 1e-6) of the legalized forward loss check every
//!   coordinate of every gradient of the legalized training graph, tied and untied.
//! - The legalized graph never holds a `[tokens, vocab]` value, and the chunk size follows the
//!   target's binding limit and the budget.

mod support;

use moec_compiler::autodiff::{training_graph, SEED};
use moec_compiler::check::check;
use moec_compiler::emit::Target;
use moec_compiler::head::{chunk_rows, legalize, legalize_in_chunks, CHUNK_BYTES};
use moec_compiler::interp::{run_outputs_in, Precision, Value};
use moec_compiler::ir::{Graph, Op};
use moec_compiler::lower::{lower_with, Head, LOGIT_ROWS};
use std::collections::HashMap;
use std::path::Path;

const TOKENS: usize = 16;

fn source(tied: bool, moe: bool) -> String {
    let moe = if moe {
        "experts = 4\n    top_k = 2\n    expert = swiglu(hidden = 12)\n    balance = aux(0.1)"
    } else {
        "experts = 0"
    };
    format!(
        "model head_test {{\n  vocab = 29\n  dim = 8\n  layers = 1\n  heads = 2\n  context = 8\n  tie_embeddings = {tied}\n  ffn = swiglu(hidden = 12)\n  moe {{\n    {moe}\n  }}\n}}\n"
    )
}

fn lowered(tied: bool, moe: bool, head: Head) -> Graph {
    let spec = check(&source(tied, moe), Path::new("test.moe")).unwrap_or_else(|d| panic!("{d:?}"));
    lower_with(&spec, TOKENS / 8, head).expect("lowers")
}

fn outputs(g: &Graph, feeds: &HashMap<String, Value>) -> HashMap<String, Vec<f64>> {
    run_outputs_in(g, feeds, Precision::F64)
        .expect("runs")
        .into_iter()
        .map(|(k, v)| (k, v.to_f64()))
        .collect()
}

/// Asserts every output of `want` is in `got` within `rel`·max|want| and returns the largest
/// such relative error.
fn assert_close(
    what: &str,
    got: &HashMap<String, Vec<f64>>,
    want: &HashMap<String, Vec<f64>>,
    rel: f64,
) -> f64 {
    let mut worst = 0.0f64;
    for (name, w) in want {
        let g = got
            .get(name)
            .unwrap_or_else(|| panic!("{what}: no output {name}"));
        assert_eq!(g.len(), w.len(), "{what}: {name}");
        let scale = w
            .iter()
            .fold(0.0f64, |m, x| m.max(x.abs()))
            .max(f64::MIN_POSITIVE);
        for (i, (a, b)) in g.iter().zip(w).enumerate() {
            let err = (a - b).abs() / scale;
            assert!(err <= rel, "{what}: {name}[{i}] = {a} vs {b} (rel {err:e})");
            worst = worst.max(err);
        }
    }
    worst
}

#[test]
fn chunked_training_graph_equals_the_unchunked_head() {
    for (tied, moe) in [(false, false), (true, false), (true, true)] {
        let what = format!("tied = {tied}, moe = {moe}");
        let fused = training_graph(&lowered(tied, moe, Head::Loss)).unwrap();
        let classic = training_graph(&lowered(tied, moe, Head::Logits)).unwrap();
        let mut feeds = support::random_feeds(&lowered(tied, moe, Head::Loss), 3);
        feeds.insert(SEED.into(), Value::F64(vec![1.0]));
        let reference = outputs(&fused, &feeds);
        // The classic graph also outputs the logits; every output the two share must agree.
        let mut classic_out = outputs(&classic, &feeds);
        classic_out.retain(|k, _| reference.contains_key(k));
        assert_eq!(classic_out.len(), reference.len(), "{what}");
        assert_close(&what, &reference, &classic_out, 1e-12);
        for rows in [1, 5, 16, 100] {
            let chunked = legalize_in_chunks(&fused, rows).unwrap();
            let count = |op: Op| chunked.g.node_weights().filter(|n| n.op == op).count();
            // One forward and one backward loss kernel per chunk.
            let chunks = TOKENS.div_ceil(rows);
            assert_eq!(count(Op::CrossEntropy), chunks, "{what}, rows {rows}");
            assert_eq!(count(Op::CrossEntropyGrad), chunks, "{what}, rows {rows}");
            let err = assert_close(&what, &outputs(&chunked, &feeds), &reference, 1e-12);
            eprintln!("{what}, chunks of {rows}: max rel error {err:.1e}");
        }
    }
}

#[test]
fn chunked_head_gradients_match_finite_differences() {
    for tied in [false, true] {
        let forward = lowered(tied, false, Head::Loss);
        let feeds = support::random_feeds(&forward, 5);
        let train = legalize_in_chunks(&training_graph(&forward).unwrap(), 5).unwrap();
        let chunked = legalize_in_chunks(&forward, 5).unwrap();
        support::check_graphs(
            &format!("chunked head, tied = {tied}"),
            &chunked,
            &train,
            &feeds,
        );
    }
}

#[test]
fn logits_never_exist_whole_and_chunks_follow_the_target() {
    let train = training_graph(&lowered(false, true, Head::Loss)).unwrap();
    let vocab = 29;
    // A binding of 7 logits rows: chunks of 7, 7 and 2 rows.
    let target = Target {
        max_storage_binding_size: 7 * vocab as u64 * 4,
        ..Target::default()
    };
    assert_eq!(chunk_rows(&target, vocab, TOKENS), 7);
    let chunked = legalize(&train, &target).unwrap();
    // The biggest value with a vocabulary axis, besides the `[vocab, dim]` weights and their
    // gradients: a chunk of 7 logits rows.
    let biggest = chunked
        .g
        .node_weights()
        .filter(|n| n.ty.shape.contains(&vocab) && n.ty.shape != [vocab, 8])
        .map(|n| n.ty.numel())
        .max()
        .unwrap();
    assert_eq!(biggest, 7 * vocab);
    assert!(chunked.g.node_weights().all(|n| !matches!(
        n.op,
        Op::LinearCrossEntropy | Op::LinearCrossEntropyGradH | Op::LinearCrossEntropyGradW
    )));
    // Real sizes: the budget, then the binding limit, then whole 32-row tiles, then the tokens.
    let lavapipe = Target::default();
    assert_eq!(chunk_rows(&lavapipe, 50257, 2048), 320);
    assert_eq!(chunk_rows(&lavapipe, 32000, 2048), 512);
    assert!(CHUNK_BYTES <= lavapipe.max_storage_binding_size);
    let small = Target {
        max_storage_binding_size: 1 << 20,
        ..Target::default()
    };
    assert_eq!(chunk_rows(&small, 32000, 2048), 8);
    assert_eq!(chunk_rows(&lavapipe, 256, 64), 64);
}

#[test]
fn sampled_head_gives_the_logits_of_the_chosen_rows() {
    let full = lowered(true, false, Head::Logits);
    let sampled = lowered(true, false, Head::Sampled);
    assert!(sampled.output("ce").is_none() && sampled.output("loss").is_none());
    let mut feeds = support::random_feeds(&full, 9);
    let rows = [5u32, 8 + 7];
    feeds.insert(LOGIT_ROWS.into(), Value::U32(rows.to_vec()));
    let all = outputs(&full, &feeds)["logits"].clone();
    let picked = outputs(&sampled, &feeds)["logits"].clone();
    let vocab = 29;
    assert_eq!(picked.len(), rows.len() * vocab);
    for (i, &r) in rows.iter().enumerate() {
        let r = r as usize;
        assert_eq!(
            picked[i * vocab..(i + 1) * vocab],
            all[r * vocab..(r + 1) * vocab]
        );
    }
}
