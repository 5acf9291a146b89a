//! Every spec in specs/ goes through the whole pipeline: it checks, builds fused and unfused, its IR
//! dump and WGSL are pinned by snapshots, and its forward pass on the GPU (lavapipe in CI) gives the
//! interpreter's logits and losses.

use moec_compiler::emit::Target;
use moec_compiler::interp::{self, Value};
use moec_compiler::ir::DType;
use moec_compiler::spec::Spec;
use moec_compiler::{check, compile, Compiled};
use moec_runtime::{AdapterChoice, Executor, Gpu};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn spec_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("specs"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "moe"))
            .collect();
    files.sort();
    assert!(files.len() >= 4, "specs/ holds the example specs");
    files
}

fn load(path: &Path) -> Spec {
    let source = std::fs::read_to_string(path).unwrap();
    check::check(&source, path)
        .unwrap_or_else(|d| panic!("{} does not check:\n{}", path.display(), d.render()))
}

fn stem(path: &Path) -> String {
    path.file_stem().unwrap().to_string_lossy().into_owned()
}

/// Snapshots use the portable target and batch 1 so they do not depend on the machine.
#[test]
fn every_spec_builds_and_its_ir_and_wgsl_are_pinned() {
    for path in spec_files() {
        let spec = load(&path);
        let fused = compile(&spec, 1, &Target::default(), true).unwrap();
        let unfused = compile(&spec, 1, &Target::default(), false).unwrap();
        assert!(
            fused.plan.dispatches.len() < unfused.plan.dispatches.len(),
            "{}: fusion should cut dispatches ({} vs {})",
            path.display(),
            fused.plan.dispatches.len(),
            unfused.plan.dispatches.len()
        );
        let name = stem(&path);
        insta::assert_snapshot!(format!("{name}.ir"), fused.graph.dump());
        let wgsl: String = fused
            .plan
            .kernels
            .iter()
            .map(|k| format!("// ---- {}.wgsl\n{}\n", k.name, k.wgsl))
            .collect();
        insta::assert_snapshot!(format!("{name}.wgsl"), wgsl);
    }
}

fn feeds_for(compiled: &Compiled, vocab: u32, seed: u64) -> HashMap<String, Value> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    compiled
        .graph
        .data_inputs()
        .into_iter()
        .map(|(_, name, ty)| {
            let value = match ty.dtype {
                DType::U32 => Value::U32(
                    (0..ty.numel())
                        .map(|_| rng.random_range(0..vocab))
                        .collect(),
                ),
                // A classifier's input features.
                DType::F32 if name == "features" => Value::F32(
                    (0..ty.numel())
                        .map(|_| rng.random_range(-1.0..1.0))
                        .collect(),
                ),
                // Routing inputs as in evaluation (docs/DECISIONS.md, "Router state and noise"): no
                // noise (zeros), no jitter (ones), router state (biases, prices) at its start, zeros.
                DType::F32 | DType::F16 => Value::F32(vec![
                    if name.starts_with("jitter.") {
                        1.0
                    } else {
                        0.0
                    };
                    ty.numel()
                ]),
            };
            (name, value)
        })
        .collect()
}

/// Relative error with a floor, so entries near zero compare absolutely: |a - b| / max(|b|, 1e-2).
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1e-2))
        .fold(0.0, f32::max)
}

/// Forward on the GPU vs the interpreter, fused and unfused, with the adapter's own schedule.
/// Tolerance: 1e-3 relative on logits and every loss (f32 sums in a different order over
/// dim ≤ 256 and vocab 256).
#[test]
fn forward_on_gpu_matches_the_interpreter() {
    let gpu = Gpu::new(&AdapterChoice::default())
        .expect("a wgpu adapter (lavapipe: apt-get install mesa-vulkan-drivers)");
    for path in spec_files() {
        let spec = load(&path);
        // Token ids of a language model, or labels of a classifier.
        let vocab = spec.model.vocab.or(spec.model.classes).unwrap() as u32;
        for fusion in [true, false] {
            let compiled = compile(&spec, 2, &gpu.target(), fusion).unwrap();
            let params = interp::init_params(&compiled.graph, 7);
            let feeds = feeds_for(&compiled, vocab, 11);
            let exec = Executor::new(&gpu, &compiled.plan).unwrap();
            for (name, values) in &params {
                exec.write_f32(name, values).unwrap();
            }
            for (name, value) in &feeds {
                match value {
                    Value::U32(v) => exec.write_u32(name, v).unwrap(),
                    other => exec.write_f32(name, &other.to_f32()).unwrap(),
                }
            }
            exec.run().unwrap();
            let mut all = interp::param_feeds(&params);
            all.extend(feeds);
            let reference = interp::run_outputs(&compiled.graph, &all).unwrap();
            assert!(
                compiled.graph.output("logits").is_some()
                    && compiled.graph.output("loss").is_some()
            );
            for (name, _) in &compiled.graph.outputs {
                let ours = exec.read_f32(name).unwrap();
                let theirs = reference[name].to_f32();
                let err = rel_err(&ours, &theirs);
                assert!(
                    err < 1e-3,
                    "{} (fusion {fusion}) output `{name}`: rel err {err:e}",
                    path.display()
                );
            }
        }
    }
}

/// `precision = f16` on the quick-start spec: the training graph's IR dump (its dtypes say which
/// values are stored in f16) and its kernels (`enable f16;`, widening loads, rounding stores) are
/// pinned like every spec's f32 forward pass.
#[test]
fn f16_training_ir_and_wgsl_are_pinned() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("specs/quickstart.moe");
    let mut spec = load(&path);
    spec.train.as_mut().unwrap().precision = moec_compiler::spec::Precision::F16;
    let compiled = moec_compiler::compile_training(&spec, 1, &Target::default(), true).unwrap();
    insta::assert_snapshot!("quickstart-f16-training.ir", compiled.graph.dump());
    let wgsl: String = compiled
        .plan
        .kernels
        .iter()
        .map(|k| format!("// ---- {}.wgsl\n{}\n", k.name, k.wgsl))
        .collect();
    assert!(wgsl.contains("enable f16;"));
    insta::assert_snapshot!("quickstart-f16-training.wgsl", wgsl);
}
