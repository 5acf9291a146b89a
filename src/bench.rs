//! `moec bench`: training-step timing through the [`Trainer`]'s own step (no second training loop):
//! median milliseconds per optimizer step over `steps` steps after `warmup`, tokens/s, kernel
//! dispatches per step, memory (the planned peak, [`MemoryReport`]: what the run allocates) and
//! achieved GFLOP/s
//! (`flops_train_per_token` × tokens per step / median time).

use crate::Loaded;
use miette::{IntoDiagnostic, Result};
use moec_compiler::lower::Head;
use moec_compiler::spec::Every;
use moec_compiler::stats::human_bytes;
use moec_runtime::memory::MemoryReport;
use moec_runtime::optim::OptimSettings;
use moec_runtime::train::{TrainOptions, Trainer};
use moec_runtime::Gpu;
use std::time::Instant;

/// What to time.
pub struct Args {
    pub steps: usize,
    pub warmup: usize,
    /// Time the fused plan (else the one-kernel-per-op plan).
    pub fusion: bool,
    /// Time both plans, fused first.
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
    let rows = modes
        .iter()
        .map(|&fusion| time(loaded, args, fusion, gpu))
        .collect::<Result<Vec<_>>>()?;
    println!(
        "{} on {}: {} steps after {} warm-up",
        loaded.spec.name, gpu.info, args.steps, args.warmup
    );
    println!(
        "{:<8} {:>12} {:>12} {:>12} {:>12} {:>10}",
        "plan", "ms/step", "tokens/s", "dispatches", "memory", "GFLOP/s"
    );
    for r in &rows {
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
    if let [fused, unfused] = rows.as_slice() {
        println!(
            "fusion speed-up: {:.2}x",
            unfused.median_ms / fused.median_ms.max(1e-12)
        );
    }
    Ok(())
}

fn time(loaded: &Loaded, args: &Args, fusion: bool, gpu: &Gpu) -> Result<Row> {
    let mut spec = loaded.spec.clone();
    let Some(train) = spec.train.as_mut() else {
        miette::bail!(
            "`{}` has no `train` block; bench times its training step",
            loaded.path.display()
        );
    };
    // Never log, evaluate or checkpoint inside the timed steps: every(0) never fires, and the run
    // is one step longer than timed so the final step's log/eval/checkpoint never happens either.
    let off = Every {
        every: 0,
        batches: train.eval.batches,
    };
    (train.log, train.eval, train.checkpoint) = (off, off, off);
    let batch = train.batch;
    let accumulate = train.accumulate;
    let settings = OptimSettings::from_train(train);
    let target = gpu.target();
    let training =
        moec_compiler::compile_training(&spec, batch, &target, fusion).into_diagnostic()?;
    let forward = moec_compiler::compile_forward(&spec, batch, &target, fusion, Head::Loss)
        .into_diagnostic()?;
    let out_dir =
        std::env::temp_dir().join(format!("moec-bench-{}-{}", std::process::id(), fusion));
    let spec_dir = loaded.dir();
    let options = TrainOptions {
        out_dir: out_dir.clone(),
        resume: false,
        steps: Some(args.warmup + args.steps + 1),
        spec_dir,
    };
    let compiling = crate::precompile(gpu, &[&training.plan, &forward.plan]);
    let result = (|| {
        let mut trainer = Trainer::new(
            gpu,
            &spec,
            &loaded.source,
            &training.plan,
            &forward.plan,
            &options,
        )
        .into_diagnostic()?;
        compiling.finish(gpu)?;
        let mut times = Vec::with_capacity(args.steps);
        for i in 0..args.warmup + args.steps {
            let start = Instant::now();
            trainer.step().into_diagnostic()?;
            gpu.wait().into_diagnostic()?;
            if i >= args.warmup {
                times.push(start.elapsed().as_secs_f64());
            }
        }
        times.sort_by(f64::total_cmp);
        let median = if times.len() % 2 == 1 {
            times[times.len() / 2]
        } else {
            (times[times.len() / 2 - 1] + times[times.len() / 2]) / 2.0
        };
        let tokens = trainer.tokens_per_step() as f64;
        let flops = moec_compiler::stats::stats(&spec).flops_train_per_token as f64 * tokens;
        Ok(Row {
            fusion,
            median_ms: median * 1e3,
            tokens_per_s: tokens / median.max(1e-12),
            dispatches: training.plan.dispatches.len() * accumulate,
            bytes: MemoryReport::training(&training.plan, &forward.plan, &settings).total(),
            gflops: flops / median.max(1e-12) / 1e9,
        })
    })();
    // The trainer's metrics file is the only thing written; the timing does not need it.
    let _ = std::fs::remove_dir_all(&out_dir);
    result
}
