//! Cold start (docs/DECISIONS.md, Runtime: cold start). The on-disk pipeline cache: a run saves it,
//! the next run on the same adapter loads it, and a damaged file is ignored instead of failing the
//! run. A test binary of its own because it sets `MOEC_CACHE_DIR`, which every `Gpu` of the process
//! reads. And the ahead-of-time compile of adapters that compile at first dispatch.

use moec_compiler::emit::emit;
use moec_compiler::fuse::{fuse, FuseOptions};
use moec_compiler::ir::{Graph, Init, Op, TensorType};
use moec_compiler::plan::Plan;
use moec_runtime::{AdapterChoice, Executor, Gpu};
use std::path::Path;
use std::sync::{Arc, Mutex};

const M: usize = 5;
const N: usize = 3;
const K: usize = 4;

fn matmul_plan(gpu: &Gpu, m: usize) -> Plan {
    let mut g = Graph::new();
    let x = g.input("x", TensorType::f32(&[m, K]));
    let w = g.param("w", &[N, K], Init::Constant(0.0));
    let y = g.add(Op::MatMul { trans_b: true }, &[x, w], "y").unwrap();
    g.set_output("y", y);
    let target = gpu.target();
    emit(&g, &fuse(&g, FuseOptions::for_target(&target)), &target).unwrap()
}

/// Runs `y = x · wᵀ` of `matmul_plan(gpu, M)` and checks it on the host.
fn check_matmul(gpu: &Gpu) {
    let exec = Executor::new(gpu, &matmul_plan(gpu, M)).unwrap();
    let x: Vec<f32> = (0..M * K).map(|i| i as f32 * 0.25).collect();
    let w: Vec<f32> = (0..N * K).map(|i| 1.0 - i as f32 * 0.125).collect();
    exec.write_f32("x", &x).unwrap();
    exec.write_f32("w", &w).unwrap();
    exec.run().unwrap();
    let y = exec.read_f32("y").unwrap();
    for (r, c) in (0..M).flat_map(|r| (0..N).map(move |c| (r, c))) {
        let want: f32 = (0..K).map(|k| x[r * K + k] * w[c * K + k]).sum();
        assert!((y[r * N + c] - want).abs() <= 1e-5 * want.abs().max(1.0));
    }
}

/// Opens the adapter afresh (loading the cache) and checks a product; returns whether the adapter
/// has a pipeline cache.
fn run_once() -> bool {
    let gpu = Gpu::new(&AdapterChoice::default()).unwrap();
    check_matmul(&gpu);
    gpu.pipeline_cache().is_some()
}

fn cache_files(dir: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| entries.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default()
}

#[test]
fn a_run_saves_the_pipeline_cache_and_the_next_loads_it_or_drops_a_damaged_one() {
    let dir = tempfile::tempdir().unwrap();
    std::env::set_var("MOEC_CACHE_DIR", dir.path());
    let has_cache = run_once();
    let backend = Gpu::new(&AdapterChoice::default()).unwrap().info.backend;
    if !has_cache {
        assert_ne!(backend, "Vulkan", "wgpu has pipeline caches on Vulkan");
        assert!(cache_files(dir.path()).is_empty());
        return;
    }
    let files = cache_files(dir.path());
    assert_eq!(files.len(), 1, "one cache file per adapter: {files:?}");
    let saved = std::fs::read(&files[0]).unwrap();
    assert!(!saved.is_empty());
    assert!(run_once(), "the second run loads the saved cache");
    std::fs::write(&files[0], b"not a pipeline cache").unwrap();
    assert!(run_once(), "a damaged cache is replaced by an empty one");
    assert_ne!(
        std::fs::read(&files[0]).unwrap(),
        b"not a pipeline cache",
        "and saved again"
    );
}

/// `Gpu::precompile` compiles each distinct kernel of the plans once (a plan given twice adds
/// nothing), reporting each, on as many devices as there are cores, and the executor's results
/// afterwards are those of a run without it. Where the adapter compiles when the pipeline is created
/// it does nothing.
#[test]
fn precompile_compiles_each_distinct_kernel_once_and_leaves_results_unchanged() {
    let gpu = Gpu::new(&AdapterChoice::default()).unwrap();
    let (plan, taller) = (matmul_plan(&gpu, M), matmul_plan(&gpu, 2 * M));
    let reports = Arc::new(Mutex::new(Vec::new()));
    let reported = Arc::clone(&reports);
    let compiled = gpu
        .precompile(
            &[&plan, &taller, &plan],
            Box::new(move |done, all| reported.lock().unwrap().push((done, all))),
        )
        .finish(&gpu)
        .unwrap();
    let mut reports = reports.lock().unwrap().clone();
    reports.sort();
    if gpu.compiles_at_first_dispatch() {
        assert_eq!(compiled, 2);
        assert_eq!(reports, [(1, 2), (2, 2)]);
    } else {
        assert_eq!((compiled, reports.len()), (0, 0));
    }
    check_matmul(&gpu);
}
