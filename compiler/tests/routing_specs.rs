//! Every routing and balancing method through lowering, the interpreter and autodiff, on the example
//! specs of specs/ (each one exercises a gate of docs/language.md): the metrics and router-state outputs
//! exist and agree with the routing, the forward pass runs with the runtime's feeds (noise, jitter,
//! router state), and the training graph differentiates and runs.

use moec_compiler::autodiff::{training_graph, SEED};
use moec_compiler::check::check;
use moec_compiler::interp::{init_params, param_feeds, run_outputs, Value};
use moec_compiler::ir::{DType, Graph, InputRole};
use moec_compiler::lower::lower;
use moec_compiler::spec::Spec;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn specs() -> Vec<(PathBuf, Spec)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "moe"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let src = std::fs::read_to_string(&p).unwrap();
            let spec =
                check(&src, &p).unwrap_or_else(|d| panic!("{}: {}", p.display(), d.render()));
            (p, spec)
        })
        .collect()
}

/// The range of the u32 data inputs: token ids of a language model, labels of a classifier.
fn labels(spec: &Spec) -> u32 {
    spec.model.vocab.or(spec.model.classes).unwrap() as u32
}

/// Feeds as the runtime fills them in training, by input role: token ids, ε ~ N(0, 1) noise, jitter
/// U(0.99, 1.01), router state from `state` (zeros by default), the gradient seed 1. Also checks that
/// each role's input carries its documented name prefix (docs/DECISIONS.md "Router state and noise":
/// the checkpoint keys and the HF/Megatron exports rely on them).
fn feeds(
    graph: &Graph,
    vocab: u32,
    seed: u64,
    state: &HashMap<String, Vec<f32>>,
) -> HashMap<String, Value> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = param_feeds(&init_params(graph, 1));
    for (_, name, role, ty) in graph.inputs_with_roles() {
        let n = ty.numel();
        let prefix = match role {
            InputRole::Noise => "noise.",
            InputRole::Jitter => "jitter.",
            InputRole::RouterState => "router_state.",
            InputRole::LossSeed => SEED,
            InputRole::Data | InputRole::LogitRows => "",
        };
        assert!(name.starts_with(prefix), "{role:?} input `{name}`");
        let v = match role {
            InputRole::Data if ty.dtype == DType::U32 => {
                Value::U32((0..n).map(|_| rng.random_range(0..vocab)).collect())
            }
            InputRole::Data if name == "features" => {
                Value::F32((0..n).map(|_| rng.random_range(-1.0..1.0)).collect())
            }
            InputRole::Noise => Value::F32(
                (0..n)
                    .map(|_| {
                        let (u1, u2): (f64, f64) = (1.0 - rng.random::<f64>(), rng.random());
                        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
                    })
                    .collect(),
            ),
            InputRole::Jitter => Value::F32((0..n).map(|_| rng.random_range(0.99..1.01)).collect()),
            InputRole::RouterState => {
                Value::F32(state.get(&name).cloned().unwrap_or_else(|| vec![0.0; n]))
            }
            InputRole::LossSeed => Value::F32(vec![1.0]),
            InputRole::Data | InputRole::LogitRows => panic!("unexpected input `{name}`"),
        };
        out.insert(name, v);
    }
    out
}

#[test]
fn every_moe_block_reports_load_dropped_and_router_z() {
    for (path, spec) in specs() {
        let Some(moe) = &spec.moe else { continue };
        let batch = 2;
        let g = lower(&spec, batch).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let out = run_outputs(&g, &feeds(&g, labels(&spec), 3, &HashMap::new())).unwrap();
        // A classifier routes one row per sample.
        let tokens = batch * spec.model.context.unwrap_or(1);
        for &b in &moe.blocks {
            let load = out[&format!("moe.{b}.load")].to_f64();
            let dropped = out[&format!("moe.{b}.dropped")].to_f64();
            let z = out[&format!("moe.{b}.router_z")].to_f64();
            assert_eq!(load.len(), moe.experts, "{}", path.display());
            assert!(
                load.iter().all(|&l| l >= 0.0 && l.fract() == 0.0),
                "{}: load {load:?}",
                path.display()
            );
            assert!(
                (0.0..=1.0).contains(&dropped[0]),
                "{}: dropped {dropped:?}",
                path.display()
            );
            assert!(
                z[0].is_finite() && z[0] > 0.0,
                "{}: router_z {z:?}",
                path.display()
            );
            let total: f64 = load.iter().sum();
            match moe.gate {
                moec_compiler::spec::Gate::ExpertChoice { capacity } => {
                    let per_expert = ((tokens as f64 * capacity / moe.experts as f64).ceil()
                        as usize)
                        .min(tokens);
                    assert!(
                        load.iter().all(|&l| l as usize == per_expert),
                        "{}: {load:?}",
                        path.display()
                    );
                }
                _ => {
                    let k = match (moe.groups, moe.hierarchy) {
                        (Some(_), moec_compiler::spec::Hierarchy::TwoLevel) => {
                            moe.top_groups * moe.top_k
                        }
                        _ => moe.top_k,
                    };
                    let slots = (tokens * k) as f64;
                    assert!(
                        (1.0 - total / slots - dropped[0]).abs() < 1e-6,
                        "{}: {total} of {slots} vs {dropped:?}",
                        path.display()
                    );
                    if matches!(moe.capacity, moec_compiler::spec::Capacity::Dropless)
                        && !matches!(moe.gate, moec_compiler::spec::Gate::Auction { .. })
                    {
                        assert_eq!(total, slots, "{}", path.display());
                    }
                }
            }
        }
    }
}

#[test]
fn every_spec_trains_in_the_interpreter() {
    for (path, spec) in specs() {
        let g = training_graph(&lower(&spec, 1).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let out = run_outputs(&g, &feeds(&g, labels(&spec), 5, &HashMap::new())).unwrap();
        assert!(out["loss"].to_f64()[0].is_finite(), "{}", path.display());
        for (name, _, _) in g.params().iter().map(|(id, n, t)| (n, id, t)) {
            if let Some(v) = out.get(&format!("grad.{name}")) {
                assert!(
                    v.to_f64().iter().all(|x| x.is_finite()),
                    "{}: grad.{name}",
                    path.display()
                );
            }
        }
        // The router's gate weights get a gradient under every gate kind.
        if let Some(moe) = &spec.moe {
            let b = moe.blocks[0];
            let gate = format!("grad.model.layers.{b}.block_sparse_moe.gate.weight");
            assert!(out.contains_key(&gate), "{}: no {gate}", path.display());
        }
    }
}
