//! `moec forward`: one seeded batch through the compiled kernels on the GPU and through the reference
//! interpreter, side by side. The quickest way to see that a spec compiles and runs correctly on the
//! adapter at hand.

use crate::{compile, Loaded};
use miette::{IntoDiagnostic, Result};
use moec_compiler::interp::{self, Value};
use moec_compiler::ir::Graph;
use moec_runtime::{Executor, Gpu};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::time::Instant;

/// Random token ids for every u32 input of the graph, uniform features for every f32 input.
pub fn random_feeds(graph: &Graph, vocab: usize, seed: u64) -> HashMap<String, Value> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    graph
        .data_inputs()
        .into_iter()
        .map(|(_, name, ty)| {
            let value = match ty.dtype {
                moec_compiler::ir::DType::U32 => Value::U32((0..ty.numel()).map(|_| rng.random_range(0..vocab as u32)).collect()),
                moec_compiler::ir::DType::F32 => Value::F32((0..ty.numel()).map(|_| rng.random_range(-1.0..1.0)).collect()),
            };
            (name, value)
        })
        .collect()
}

/// Largest |a - b| / (|b| + 1e-3) over two equally long slices: relative error that stays meaningful
/// for entries near zero.
pub fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs() / (y.abs() + 1e-3)).fold(0.0, f32::max)
}

pub fn run(loaded: &Loaded, batch: usize, seed: u64, fusion: bool, profile: bool, gpu: &Gpu) -> Result<()> {
    let started = Instant::now();
    let compiled = compile(&loaded.spec, batch, &gpu.target(), fusion)?;
    let params = interp::init_params(&compiled.graph, seed);
    let vocab = loaded.spec.model.vocab.or(loaded.spec.model.classes).unwrap_or(2);
    let feeds = random_feeds(&compiled.graph, vocab, seed);

    let exec = Executor::new(gpu, &compiled.plan).into_diagnostic()?;
    for (name, values) in &params {
        exec.write_f32(name, values).into_diagnostic()?;
    }
    for (name, value) in &feeds {
        match value {
            Value::U32(ids) => exec.write_u32(name, ids).into_diagnostic()?,
            other => exec.write_f32(name, &other.to_f32()).into_diagnostic()?,
        }
    }
    let compiled_in = started.elapsed();
    // The first run includes the driver's lazy shader compilation; the steady state is what a
    // training step costs.
    let mut gpu_times = Vec::new();
    for _ in 0..3 {
        let t0 = Instant::now();
        exec.run().into_diagnostic()?;
        exec.wait().into_diagnostic()?;
        gpu_times.push(t0.elapsed());
    }

    if profile {
        let mut times = exec.profile().into_diagnostic()?;
        let total: f64 = times.iter().map(|(_, t)| t).sum();
        times.sort_by(|a, b| b.1.total_cmp(&a.1));
        println!("slowest dispatches (of {:.1} ms, one submission each):", total * 1e3);
        for (name, t) in times.iter().take(15).chain(times.iter().rev().take(3)) {
            println!("  {:>8.2} ms {:>5.1}%  {name}", t * 1e3, 100.0 * t / total);
        }
    }

    let mut all_feeds = interp::param_feeds(&params);
    all_feeds.extend(feeds);
    let t0 = Instant::now();
    let reference = interp::run_outputs(&compiled.graph, &all_feeds).into_diagnostic()?;
    let cpu_time = t0.elapsed();

    println!(
        "{} on {}: {} dispatches, {} kernels (compiled in {:.2?}); GPU forward {:.2?} first, {:.2?} warm; interpreter {:.2?}",
        loaded.spec.name,
        gpu.info,
        compiled.plan.dispatches.len(),
        compiled.plan.kernels.len(),
        compiled_in,
        gpu_times[0],
        gpu_times[2],
        cpu_time
    );
    let mut worst = 0.0f32;
    for (name, _) in &compiled.graph.outputs {
        let ours = exec.read_f32(name).into_diagnostic()?;
        let theirs = reference[name].to_f32();
        let diff = max_rel_diff(&ours, &theirs);
        worst = worst.max(diff);
        if ours.len() == 1 {
            println!("  {name:<10} gpu {:>12.6}  interpreter {:>12.6}  rel diff {diff:.1e}", ours[0], theirs[0]);
        } else {
            println!("  {name:<10} {} values, max rel diff {diff:.1e}", ours.len());
        }
    }
    if worst > 1e-3 {
        miette::bail!("GPU and interpreter disagree (max rel diff {worst:.1e} > 1e-3)");
    }
    Ok(())
}
