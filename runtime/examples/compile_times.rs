//! Where a cold start goes: the driver's compile time of every kernel of a spec's training plan.
//!
//! `MESA_SHADER_CACHE_DIR=$(mktemp -d) cargo run --release -p moec-runtime --example compile_times -- SPEC`
//! runs the plan twice one dispatch at a time ([`Executor::profile`]) and prints, per kernel, the
//! first run's time minus the second's: on lavapipe that is LLVM compiling the kernel at its first
//! dispatch (docs/DECISIONS.md, Runtime: cold start). With a warm shader cache the figures are ~0.
//! A second argument DIR writes every kernel there as `NAME.wgsl`, to look at the slow ones.

use moec_compiler::check::check;
use moec_compiler::compile_training;
use moec_runtime::{AdapterChoice, Executor, Gpu};
use std::collections::HashMap;
use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).ok_or("usage: compile_times SPEC")?;
    let spec =
        check(&std::fs::read_to_string(&path)?, Path::new(&path)).map_err(|d| format!("{d:?}"))?;
    let batch = spec.train.as_ref().map_or(1, |t| t.batch);
    let gpu = Gpu::new(&AdapterChoice::default())?;
    let compiled = compile_training(&spec, batch, &gpu.target(), true)?;
    if let Some(dir) = std::env::args().nth(2) {
        std::fs::create_dir_all(&dir)?;
        for kernel in &compiled.plan.kernels {
            std::fs::write(format!("{dir}/{}.wgsl", kernel.name), &kernel.wgsl)?;
        }
    }
    let exec = Executor::new(&gpu, &compiled.plan)?;
    let cold = exec.profile()?;
    let warm = exec.profile()?;
    let mut per_kernel: HashMap<String, f64> = HashMap::new();
    for ((name, c), (_, w)) in cold.iter().zip(&warm) {
        *per_kernel.entry(name.clone()).or_default() += c - w;
    }
    let mut rows: Vec<_> = per_kernel.into_iter().collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total: f64 = rows.iter().map(|r| r.1).sum();
    println!(
        "{} on {}: {} kernels, {total:.1} s of first-dispatch overhead",
        path,
        gpu.info,
        rows.len()
    );
    for (name, s) in rows.iter().take(25) {
        println!("{s:8.2} s  {name}");
    }
    Ok(())
}
