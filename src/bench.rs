//! `moec bench`: training-step timing through the [`Trainer`]'s own step (no second training loop):
//! median milliseconds per optimizer step over `steps` steps after `warmup`, tokens/s, kernel
//! dispatches per step, memory (the planned peak, [`MemoryReport`]: what the run allocates) and
//! achieved GFLOP/s
//! (`flops_train_per_token` × tokens per step / median time).

use crate::Loaded;
use miette::{IntoDiagnostic, Result};
use moec_compiler::lower::Head;
use moec_compiler::plan::Plan;
use moec_compiler::spec::Every;
use moec_compiler::spec::Spec;
use moec_compiler::stats::human_bytes;
use moec_compiler::Compiled;
use moec_runtime::memory::MemoryReport;
use moec_runtime::optim::OptimSettings;
use moec_runtime::report::median;
use moec_runtime::train::{TrainOptions, Trainer};
use moec_runtime::Gpu;
use std::path::PathBuf;
use std::time::Instant;

/// What to time.
pub struct Args {
    pub steps: usize,
    pub warmup: usize,
    /// Time the fused plan (else the one-kernel-per-op plan).
    pub fusion: bool,
    /// Time both plans, their steps alternating (fused first).
    pub both: bool,
}

/// One timed configuration.
struct Row {
    fusion: bool,
    median_ms: f64,
    tokens_per_s: f64,
    dispatches: usize,
    bytes: u64,
    gflops: f64,
}

pub fn run(loaded: &Loaded, args: &Args, gpu: &Gpu) -> Result<()> {
    if args.steps == 0 {
        miette::bail!("--steps must be at least 1");
    }
    let modes: Vec<bool> = if args.both {
        vec![true, false]
    } else {
        vec![args.fusion]
    };
    let spec = untimed_side_work(loaded)?;
    let plans = modes
        .iter()
        .map(|&fusion| Plans::compile(&spec, fusion, gpu))
        .collect::<Result<Vec<_>>>()?;
    let out_dirs: Vec<PathBuf> = plans
        .iter()
        .map(|Plans { fusion, .. }| {
            std::env::temp_dir().join(format!("moec-bench-{}-{fusion}", std::process::id()))
        })
        .collect();
    let times = time_interleaved(loaded, &spec, args, &plans, &out_dirs, gpu);
    // The trainers' metrics files are the only thing written; the timing does not need them.
    for dir in &out_dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
    // Every configuration timed at least one step (`--steps` ≥ 1 is checked above).
    let rows: Vec<Row> = plans
        .iter()
        .zip(times?)
        .map(|(plans, (tokens, times))| plans.row(&spec, tokens, median(times).unwrap_or(f64::NAN)))
        .collect();
    print_rows(loaded, args, gpu, &rows);
    Ok(())
}

/// The spec with logging, evaluation and checkpoints off, so the timed steps do only training:
/// every(0) never fires, and each run is one step longer than timed so the final step's
/// log/eval/checkpoint never happens either.
fn untimed_side_work(loaded: &Loaded) -> Result<Spec> {
    let mut spec = loaded.spec.clone();
    let Some(train) = spec.train.as_mut() else {
        miette::bail!(
            "`{}` has no `train` block; bench times its training step",
            loaded.path.display()
        );
    };
    let off = Every {
        every: 0,
        batches: train.eval.batches,
    };
    (train.log, train.eval, train.checkpoint) = (off, off, off);
    Ok(spec)
}

/// One configuration's compiled plans, compiled before any trainer so the trainers can borrow them.
struct Plans {
    fusion: bool,
    training: Compiled,
    forward: Compiled,
}

impl Plans {
    fn compile(spec: &Spec, fusion: bool, gpu: &Gpu) -> Result<Plans> {
        let batch = spec
            .train
            .as_ref()
            .expect("checked by untimed_side_work")
            .batch;
        let target = gpu.target();
        Ok(Plans {
            fusion,
            training: moec_compiler::compile_training(spec, batch, &target, fusion)
                .into_diagnostic()?,
            forward: moec_compiler::compile_forward(spec, batch, &target, fusion, Head::Loss)
                .into_diagnostic()?,
        })
    }

    /// The table row for a median step of `seconds` over `tokens` per step.
    fn row(&self, spec: &Spec, tokens: usize, seconds: f64) -> Row {
        let train = spec.train.as_ref().expect("checked by untimed_side_work");
        let tokens = tokens as f64;
        let flops = moec_compiler::stats::stats(spec).flops_train_per_token as f64 * tokens;
        let settings = OptimSettings::from_train(train);
        Row {
            fusion: self.fusion,
            median_ms: seconds * 1e3,
            tokens_per_s: tokens / seconds.max(1e-12),
            dispatches: self.training.plan.dispatches.len() * train.accumulate,
            bytes: MemoryReport::training(&self.training.plan, &self.forward.plan, &settings)
                .total(),
            gflops: flops / seconds.max(1e-12) / 1e9,
        }
    }
}

/// Tokens per step and seconds of each timed step, per configuration. With several configurations
/// their steps alternate (one of each, then the next of each), so a machine whose speed drifts
/// during the run (a shared VM's can move ±30%) slows them alike and their ratio stays
/// meaningful; all of their plans are resident at once.
fn time_interleaved(
    loaded: &Loaded,
    spec: &Spec,
    args: &Args,
    plans: &[Plans],
    out_dirs: &[PathBuf],
    gpu: &Gpu,
) -> Result<Vec<(usize, Vec<f64>)>> {
    let all: Vec<&Plan> = plans
        .iter()
        .flat_map(|p| [&p.training.plan, &p.forward.plan])
        .collect();
    let compiling = crate::precompile(gpu, &all);
    let mut trainers = plans
        .iter()
        .zip(out_dirs)
        .map(|(p, out_dir)| {
            let options = TrainOptions {
                out_dir: out_dir.clone(),
                resume: false,
                steps: Some(args.warmup + args.steps + 1),
                spec_dir: loaded.dir(),
            };
            Trainer::new(
                gpu,
                spec,
                &loaded.source,
                &p.training.plan,
                &p.forward.plan,
                &options,
            )
            .into_diagnostic()
        })
        .collect::<Result<Vec<_>>>()?;
    compiling.finish(gpu)?;
    let mut times = vec![Vec::with_capacity(args.steps); trainers.len()];
    for i in 0..args.warmup + args.steps {
        for (trainer, times) in trainers.iter_mut().zip(&mut times) {
            let start = Instant::now();
            trainer.step().into_diagnostic()?;
            gpu.wait().into_diagnostic()?;
            if i >= args.warmup {
                times.push(start.elapsed().as_secs_f64());
            }
        }
    }
    Ok(trainers
        .iter()
        .map(|t| t.tokens_per_step())
        .zip(times)
        .collect())
}

fn print_rows(loaded: &Loaded, args: &Args, gpu: &Gpu, rows: &[Row]) {
    println!(
        "{} on {}: {} steps after {} warm-up{}",
        loaded.spec.name,
        gpu.info,
        args.steps,
        args.warmup,
        if rows.len() > 1 {
            ", the plans' steps alternating"
        } else {
            ""
        }
    );
    println!(
        "{:<8} {:>12} {:>12} {:>12} {:>12} {:>10}",
        "plan", "ms/step", "tokens/s", "dispatches", "memory", "GFLOP/s"
    );
    for r in rows {
        println!(
            "{:<8} {:>12.2} {:>12.0} {:>12} {:>12} {:>10.3}",
            if r.fusion { "fused" } else { "unfused" },
            r.median_ms,
            r.tokens_per_s,
            r.dispatches,
            human_bytes(r.bytes),
            r.gflops
        );
    }
    if let [fused, unfused] = rows {
        println!(
            "fusion speed-up: {:.2}x",
            unfused.median_ms / fused.median_ms.max(1e-12)
        );
    }
}
