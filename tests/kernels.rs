//! Every kernel moec emits is pinned: for every spec in specs/ (and specs/compare/), the forward and
//! the training plan, each for the portable default target (shared-memory tiles) and for the CPU
//! target (register-blocked matmuls with subgroup-shared loads, what lavapipe runs), as a manifest
//! of kernel name → hash of its WGSL, one line per kernel. So "kernels unchanged" in a commit is
//! checkable: a changed kernel changes its line in `tests/snapshots/kernels__<spec>.snap`. Specs
//! with a train block also pin their `precision = f16` training plan on the CPU target.
//! The full WGSL of the forward plans on the default target is in `specs__<spec>.wgsl.snap`
//! (tests/specs.rs).
//!
//! After a deliberate kernel change, regenerate with
//! `INSTA_UPDATE=always cargo test --test kernels` (or `cargo insta review`), and say in the commit
//! why the kernels changed.

use moec_compiler::emit::{MatmulVariant, Target};
use moec_compiler::spec::{Precision, Spec};
use moec_compiler::{check, compile, compile_training, Compiled};
use std::hash::Hasher;
use std::path::{Path, PathBuf};

/// The example specs, `specs/*.moe` then `specs/compare/*.moe`, by name.
fn spec_files() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("specs");
    let mut files = Vec::new();
    for dir in [root.clone(), root.join("compare")] {
        let mut here: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "moe"))
            .collect();
        here.sort();
        files.extend(here);
    }
    assert!(files.len() >= 10, "specs/ holds the example specs");
    files
}

/// The CPU adapters' target: register-blocked matmuls sharing loads through subgroups of 8 lanes
/// (lavapipe's) and its compile-bound block for small products, with the portable limits so the
/// manifest does not depend on the machine.
fn cpu_target() -> Target {
    Target {
        matmul: MatmulVariant::RegisterBlocked,
        subgroup_size: 8,
        small_product_macs: moec_compiler::target::CPU_SMALL_PRODUCT_MACS,
        ..Target::default()
    }
}

/// FNV-1a 64 of the WGSL text: stable across platforms and Rust versions, unlike `DefaultHasher`.
fn content_hash(wgsl: &str) -> String {
    let mut h = fnv::FnvHasher::default();
    h.write(wgsl.as_bytes());
    format!("{:016x}", h.finish())
}

/// One section of a manifest: a header, then `name hash` per kernel.
fn section(title: &str, compiled: &Compiled) -> String {
    let kernels = &compiled.plan.kernels;
    let mut out = format!("# {title}: {} kernels\n", kernels.len());
    for k in kernels {
        out.push_str(&format!("{} {}\n", k.name, content_hash(&k.wgsl)));
    }
    out
}

/// `spec` trained with `precision = f16`, when it has a train block.
fn with_f16_activations(spec: &Spec) -> Option<Spec> {
    let mut spec = spec.clone();
    spec.train.as_mut()?.precision = Precision::F16;
    Some(spec)
}

/// Batch 1, fused, as the WGSL snapshots: the same shapes whatever the machine.
#[test]
fn every_kernel_of_every_spec_is_pinned() {
    for path in spec_files() {
        let source = std::fs::read_to_string(&path).unwrap();
        let spec = check::check(&source, &path)
            .unwrap_or_else(|d| panic!("{} does not check:\n{}", path.display(), d.render()));
        let mut manifest = String::new();
        for (target_name, target) in [("default", Target::default()), ("cpu", cpu_target())] {
            let forward = compile(&spec, 1, &target, true).unwrap();
            let training = compile_training(&spec, 1, &target, true).unwrap();
            manifest.push_str(&section(&format!("forward, {target_name}"), &forward));
            manifest.push_str(&section(&format!("training, {target_name}"), &training));
        }
        // `precision = f16` training plans, on the CPU target (f16 storage, f32 arithmetic).
        if let Some(f16_spec) = with_f16_activations(&spec) {
            let training = compile_training(&f16_spec, 1, &cpu_target(), true).unwrap();
            manifest.push_str(&section("training, f16, cpu", &training));
        }
        let relative = path
            .strip_prefix(Path::new(env!("CARGO_MANIFEST_DIR")).join("specs"))
            .unwrap()
            .with_extension("");
        let name = relative.to_string_lossy().replace('/', "-");
        insta::assert_snapshot!(name, manifest);
    }
}
