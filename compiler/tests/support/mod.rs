//! Finite-difference gradient checking shared by the autodiff test files: unit-variance random feeds
//! (so routing decisions are well separated) and a check of every coordinate of every parameter.
#![allow(dead_code)] // each test file uses a different subset

use moec_compiler::autodiff::{training_graph, SEED};
use moec_compiler::check::check;
use moec_compiler::interp::{run_in, run_outputs_in, Precision, Value};
use moec_compiler::ir::{Graph, Init, Op};
use moec_compiler::lower::lower;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::Path;

pub const H: f64 = 1e-6;
pub const RTOL: f64 = 1e-5;
pub const ATOL: f64 = 1e-8;

pub fn graph(source: &str, batch: usize) -> Graph {
    let spec = check(source, Path::new("test.moe")).unwrap_or_else(|d| panic!("{d:?}"));
    lower(&spec, batch).expect("lowers")
}

/// Random feeds at unit-variance scale: weights uniform with variance 1/fan_in, norm weights
/// 1 ± 0.3, biases ± 0.3, ids and targets uniform, f32 inputs uniform in [-1, 1).
pub fn random_feeds(g: &Graph, seed: u64) -> HashMap<String, Value> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut feeds = HashMap::new();
    for (id, name, ty) in g.params() {
        let v: Vec<f64> = match g.node(id).op {
            Op::Param {
                init: Init::Constant(c),
                ..
            } => (0..ty.numel())
                .map(|_| c as f64 + rng.random_range(-0.3..0.3))
                .collect(),
            _ => {
                let bound = (3.0 / ty.last() as f64).sqrt();
                (0..ty.numel())
                    .map(|_| rng.random_range(-bound..bound))
                    .collect()
            }
        };
        feeds.insert(name, Value::F64(v));
    }
    for (_, name, ty) in g.data_inputs() {
        let v = match ty.dtype {
            moec_compiler::ir::DType::U32 => {
                // ids index the vocabulary (tokens) or the classes (targets): bound by the table it feeds
                let bound = id_bound(g, &name);
                Value::U32(
                    (0..ty.numel())
                        .map(|_| rng.random_range(0..bound))
                        .collect(),
                )
            }
            moec_compiler::ir::DType::F32 | moec_compiler::ir::DType::F16 => Value::F64(
                (0..ty.numel())
                    .map(|_| rng.random_range(-1.0..1.0))
                    .collect(),
            ),
        };
        feeds.insert(name, v);
    }
    feeds
}

/// The exclusive bound of a u32 input: the row count of the embedding table or the logits width of
/// the cross-entropy it (possibly through reshapes) feeds.
pub fn id_bound(g: &Graph, name: &str) -> u32 {
    let mut frontier = vec![
        g.data_inputs()
            .into_iter()
            .find(|(_, n, _)| n == name)
            .unwrap()
            .0,
    ];
    while let Some(id) = frontier.pop() {
        for user in g.users(id) {
            match g.node(user).op {
                Op::Embedding => return g.ty(g.inputs(user)[0]).shape[0] as u32,
                Op::CrossEntropy => return g.ty(g.inputs(user)[0]).last() as u32,
                _ => frontier.push(user),
            }
        }
    }
    panic!("{name} feeds no embedding or cross-entropy")
}

pub fn loss_of(g: &Graph, feeds: &HashMap<String, Value>) -> f64 {
    run_outputs_in(g, feeds, Precision::F64).expect("forward runs")["loss"].to_f64()[0]
}

/// FD check of every coordinate of every parameter, asserting the tolerance; prints the largest
/// absolute error and the largest relative error among gradients of magnitude ≥ 1e-3.
pub fn check_model(what: &str, g: &Graph, feeds: &HashMap<String, Value>) {
    let train = training_graph(g).unwrap_or_else(|e| panic!("{what}: {e}"));
    let mut tfeeds = feeds.clone();
    tfeeds.insert(SEED.into(), Value::F64(vec![1.0]));
    let outs = run_outputs_in(&train, &tfeeds, Precision::F64).unwrap();
    let (mut worst_abs, mut worst_rel, mut coords) = (0.0f64, 0.0f64, 0);
    for (_, name, ty) in g.params() {
        let analytic = outs
            .get(&format!("grad.{name}"))
            .unwrap_or_else(|| panic!("{what}: no grad.{name}"))
            .to_f64();
        assert_eq!(analytic.len(), ty.numel());
        let base = feeds[&name].to_f64();
        for (i, &a) in analytic.iter().enumerate() {
            let at = |delta: f64| {
                let mut v = base.clone();
                v[i] += delta;
                let mut f = feeds.clone();
                f.insert(name.clone(), Value::F64(v));
                loss_of(g, &f)
            };
            let fd = (at(H) - at(-H)) / (2.0 * H);
            let err = (a - fd).abs();
            assert!(
                err <= RTOL * a.abs().max(fd.abs()) + ATOL,
                "{what}: grad.{name}[{i}] = {a}, finite difference {fd} (error {err:e})"
            );
            worst_abs = worst_abs.max(err);
            if fd.abs() >= 1e-3 {
                worst_rel = worst_rel.max(err / fd.abs());
            }
            coords += 1;
        }
    }
    eprintln!(
        "{what}: {} params, {coords} coordinates, max abs error {worst_abs:.1e}, max rel error (|g| ≥ 1e-3) {worst_rel:.1e}",
        g.params().len()
    );
}

/// Smallest margin, over every `TopK` node and row, between the k-th and (k+1)-th score (and over
/// every expert-choice column, between its capacity-th and next token).
pub fn selection_margin(g: &Graph, feeds: &HashMap<String, Value>) -> f64 {
    let vals = run_in(g, feeds, Precision::F64).expect("forward runs");
    let mut margin = f64::INFINITY;
    for id in g.topo_order() {
        if let Op::TopK { k } = g.node(id).op {
            let scores_id = g.inputs(id)[0];
            let e = g.ty(scores_id).last();
            if k == e {
                continue;
            }
            for row in vals[&scores_id].to_f64().chunks(e) {
                let mut s = row.to_vec();
                s.sort_by(|a, b| b.total_cmp(a));
                margin = margin.min(s[k - 1] - s[k]);
            }
        }
        // Expert choice ranks tokens within a column.
        if let Op::ExpertChoice { capacity } = g.node(id).op {
            let scores_id = g.inputs(id)[0];
            let (t, e) = (g.ty(scores_id).shape[0], g.ty(scores_id).shape[1]);
            let s = vals[&scores_id].to_f64();
            for c in 0..e {
                let mut col: Vec<f64> = (0..t).map(|r| s[r * e + c]).collect();
                col.sort_by(|a, b| b.total_cmp(a));
                if capacity < t {
                    margin = margin.min(col[capacity - 1] - col[capacity]);
                }
            }
        }
    }
    margin
}

/// Feeds ([`random_feeds`] of the first seed from `first_seed` that works) whose routing is robust
/// to the FD steps: every selection margin above 1e-4, so no ±h step changes the routing.
pub fn robust_feeds(g: &Graph, first_seed: u64) -> HashMap<String, Value> {
    for seed in first_seed..first_seed + 50 {
        let feeds = random_feeds(g, seed);
        if selection_margin(g, &feeds) > 1e-4 {
            return feeds;
        }
    }
    panic!("no seed gives well-separated router scores")
}
