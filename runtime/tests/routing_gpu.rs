//! Every routing method of docs/language.md on the GPU (lavapipe where there is none) against the f64
//! reference interpreter: forward and training graphs of tiny one-MoE-block transformers, one per
//! gate kind, hierarchy, capacity policy and balancing term, fused and unfused under both matmul
//! variants. Every output is compared: logits, losses, every `grad.<param>`, the metrics
//! (`moe.N.load`, `dropped`, `router_z`) and the router-state updates (`router_state.N.*.next`).
//!
//! Feeds: unit-variance parameters, noise N(0,1)-like (uniform ±1.5), jitter U(0.9, 1.1), router state
//! uniform ±0.2, redrawn until every top-k and expert-choice selection has a margin ≥ 1e-3 (so the
//! GPU's f32 router picks what the f64 reference picks). Tolerance: |gpu − ref| ≤ 1e-3·|ref| +
//! 1e-4·max|ref of that output| (as grad_gpu.rs: f32 with other summation orders; the GPU's Φ is an
//! erfc approximation with absolute error below 1.5e-7).

use moec_compiler::autodiff::{training_graph, SEED};
use moec_compiler::check::check;
use moec_compiler::interp::Value;
use moec_compiler::ir::{DType, Graph};
use moec_compiler::lower::lower;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::Path;

mod support;
use support::*;

const MODEL_REL: f64 = 1e-3;
const MODEL_FLOOR: f64 = 1e-4;

/// Unit-variance parameters and the routing inputs as the runtime feeds them in training.
fn model_feeds(g: &Graph, seed: u64) -> HashMap<String, Value> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut feeds = unit_variance_params(g, &mut rng);
    for (_, name, ty) in g.data_inputs() {
        let n = ty.numel();
        let v = match ty.dtype {
            DType::U32 => Value::U32((0..n).map(|_| rng.random_range(0..16)).collect()),
            DType::F32 if name.starts_with("noise.") => {
                Value::F32((0..n).map(|_| rng.random_range(-1.5..1.5)).collect())
            }
            DType::F32 if name.starts_with("jitter.") => {
                Value::F32((0..n).map(|_| rng.random_range(0.9..1.1)).collect())
            }
            DType::F32 | DType::F16 => {
                Value::F32((0..n).map(|_| rng.random_range(-0.2..0.2)).collect())
            }
        };
        feeds.insert(name, v);
    }
    feeds
}

fn check_routing(what: &str, moe: &str) {
    let source = format!("model tiny {{\n vocab = 16\n dim = 16\n layers = 1\n heads = 2\n context = 8\n moe {{\n expert = swiglu(hidden = 12)\n {moe}\n }}\n}}\n");
    let spec = check(&source, Path::new("test.moe")).unwrap_or_else(|d| panic!("{d:?}"));
    let forward = lower(&spec, 2).expect("lowers");
    let train = training_graph(&forward).expect("differentiates");
    let mut feeds = (1..80)
        .map(|seed| model_feeds(&forward, seed))
        .find(|f| selection_margin(&forward, f) >= 1e-3)
        .expect("a seed with well-separated router scores");
    let tol = |reference: f64, scale: f64| MODEL_REL * reference + MODEL_FLOOR * scale;
    compare(&forward, &feeds, &tol);
    feeds.insert(SEED.into(), Value::F32(vec![1.0]));
    let worst = compare(&train, &feeds, &tol);
    let mut names: Vec<_> = worst
        .into_iter()
        .filter(|(n, _)| !n.starts_with("grad."))
        .collect();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    eprintln!("{what}: {names:?}");
}

#[test]
fn noisy_top_k_with_cv2_on_gpu() {
    check_routing("noisy_top_k", "experts = 4\n top_k = 2\n gate = noisy_top_k\n balance = cv2(importance = 0.5, load = 0.5) + z(0.1)");
}

#[test]
fn two_level_hierarchy_on_gpu() {
    check_routing("two_level", "experts = 6\n groups = 3 x 2\n top_groups = 2\n top_k = 1\n gate = noisy_top_k\n balance = cv2(importance = 0.5, load = 0.5)");
}

#[test]
fn two_level_with_bias_on_gpu() {
    check_routing("two_level + bias", "experts = 6\n groups = 2 x 3\n top_groups = 1\n top_k = 2\n gate = noisy_top_k\n balance = bias(rate = 0.01) + aux(0.1)");
}

#[test]
fn group_limited_sigmoid_with_bias_on_gpu() {
    check_routing("group_limited + bias", "experts = 8\n groups = 4 x 2\n hierarchy = group_limited\n top_groups = 2\n top_k = 3\n gate = sigmoid\n balance = bias(rate = 0.01) + seq_aux(0.5)");
}

#[test]
fn capacity_policies_and_jitter_on_gpu() {
    check_routing("switch + probability drop + jitter", "experts = 4\n gate = switch\n capacity = factor(1.0, drop = probability)\n jitter = 0.1\n balance = aux(0.5) + z(0.1)");
    check_routing(
        "softmax + position drop",
        "experts = 4\n top_k = 2\n capacity = factor(0.75)\n balance = aux(0.5)",
    );
}

#[test]
fn expert_choice_and_sinkhorn_on_gpu() {
    check_routing(
        "expert_choice",
        "experts = 4\n gate = expert_choice(capacity = 1.5)\n balance = aux(0.5) + z(0.1)",
    );
    check_routing(
        "sinkhorn",
        "experts = 4\n top_k = 2\n gate = sinkhorn(iters = 4)\n balance = z(0.1)",
    );
}

#[test]
fn auction_on_gpu() {
    check_routing("auction", "experts = 4\n top_k = 2\n gate = auction(rounds = 6, epsilon = 0.01, budget = 0.5, price_rate = 0.1)\n capacity = factor(1.0)\n balance = z(0.1)");
}
