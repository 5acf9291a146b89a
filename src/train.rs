//! `moec train`: compile the spec for training and for evaluation, then run the [`Trainer`] with a
//! progress bar (loss, lr, tokens/s), the console log line of every log step, and a closing summary
//! that puts the final losses next to the data's unigram entropy, so a user sees whether the model
//! learned more than token frequencies.

use crate::{print_slowest, Loaded};
use indicatif::{ProgressBar, ProgressStyle};
use miette::{IntoDiagnostic, Result};
use moec_compiler::lower::Head;
use moec_compiler::plan::Plan;
use moec_compiler::stats::human_bytes;
use moec_runtime::data::TrainData;
use moec_runtime::memory::MemoryReport;
use moec_runtime::metrics::{console_line, moe_summary_lines, sci, Record};
use moec_runtime::optim::OptimSettings;
use moec_runtime::train::{TrainOptions, Trainer};
use moec_runtime::Gpu;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What `moec train` was asked to do beyond the spec.
pub struct Args {
    /// Run directory; default `runs/<spec name>`.
    pub out: Option<PathBuf>,
    pub resume: bool,
    /// Overrides the spec's `steps`.
    pub steps: Option<usize>,
    pub fusion: bool,
    /// Time each dispatch of one training micro-step before training and print the slowest.
    pub profile: bool,
}

pub fn run(loaded: &Loaded, args: &Args, gpu: &Gpu) -> Result<()> {
    let spec = &loaded.spec;
    let Some(train) = &spec.train else {
        miette::bail!(
            "`{}` has no `train` block; add one (data, batch, steps, ...) to train it",
            loaded.path.display()
        );
    };
    let started = Instant::now();
    let target = gpu.target();
    let training = moec_compiler::compile_training(spec, train.batch, &target, args.fusion)
        .into_diagnostic()?;
    // Evaluation computes the loss as training does, through the chunked head (no logits).
    let forward =
        moec_compiler::compile_forward(spec, train.batch, &target, args.fusion, Head::Loss)
            .into_diagnostic()?;
    let out_dir = args
        .out
        .clone()
        .unwrap_or_else(|| Path::new("runs").join(&spec.name));
    let spec_dir = loaded.dir();
    let options = TrainOptions {
        out_dir: out_dir.clone(),
        resume: args.resume,
        steps: args.steps,
        spec_dir,
    };
    let compiling = crate::precompile(gpu, &[&training.plan, &forward.plan]);
    let mut trainer = Trainer::new(
        gpu,
        spec,
        &loaded.source,
        &training.plan,
        &forward.plan,
        &options,
    )
    .into_diagnostic()?;
    compiling.finish(gpu)?;
    let memory = MemoryReport::training(
        &training.plan,
        &forward.plan,
        &OptimSettings::from_train(train),
    );
    print_setup(
        &spec.name,
        gpu,
        &trainer,
        &training.plan,
        &forward.plan,
        &memory,
        started,
    );
    if args.resume {
        println!(
            "resuming from step {} of {} ({})",
            trainer.step_count(),
            trainer.total_steps(),
            trainer.checkpoint_path().display()
        );
    }
    if args.profile {
        print_profile(&trainer)?;
    }
    let first_step = trainer.step_count();
    let run_started = Instant::now();
    let first = train_with_progress(&mut trainer)?;
    print_summary(&trainer, first, first_step, run_started);
    Ok(())
}

/// What the run will cost and what it learns from, before the first step: the plans' sizes, the
/// planned memory peak, and the data's entropy to judge the losses against.
fn print_setup(
    name: &str,
    gpu: &Gpu,
    trainer: &Trainer<'_>,
    training: &Plan,
    forward: &Plan,
    memory: &MemoryReport,
    started: Instant,
) {
    println!(
        "{} on {}: {} dispatches per micro-step ({} kernels), eval {} dispatches, planned peak {} (weights {}, gradients {}, optimizer {}, activations {}); ready in {:.2?}",
        name,
        gpu.info,
        training.dispatches.len(),
        training.kernels.len(),
        forward.dispatches.len(),
        human_bytes(memory.total()),
        human_bytes(memory.weights),
        human_bytes(memory.grads),
        human_bytes(memory.optimizer),
        human_bytes(memory.activations),
        started.elapsed()
    );
    if let Some(hint) = gpu.info.slow_driver_hint() {
        println!("{hint}");
    }
    let data = trainer.data();
    println!(
        "data: {} ({} training / {} validation {}), {} entropy {:.4} nats{}",
        data.description(),
        data.train_len(),
        data.val_len(),
        data.unit(),
        entropy_name(data),
        data.unigram_entropy(),
        data.conditional_entropy()
            .map(|h| format!(", best possible loss {h:.4}"))
            .unwrap_or_default()
    );
}

/// `--profile`: the slowest dispatches of one training micro-step.
fn print_profile(trainer: &Trainer<'_>) -> Result<()> {
    // Twice: the first run includes the driver's lazy shader compilation.
    trainer.profile_step().into_diagnostic()?;
    print_slowest(
        trainer.profile_step().into_diagnostic()?,
        |ms| {
            format!("slowest dispatches of one training micro-step ({ms:.1} ms in all, one submission each):")
        },
        0,
    );
    Ok(())
}

/// Runs the remaining steps under a progress bar, printing each logged step; returns the first
/// logged record, which the summary compares the last one with.
fn train_with_progress(trainer: &mut Trainer<'_>) -> Result<Option<Record>> {
    let bar =
        ProgressBar::new(trainer.total_steps() as u64).with_position(trainer.step_count() as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30.cyan/blue} {pos}/{len} steps | {msg} | {elapsed_precise} < {eta_precise}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    // Without a terminal the bar draws nothing, so log lines go to stdout instead.
    let say = |line: String| {
        if bar.is_hidden() {
            println!("{line}")
        } else {
            bar.println(line)
        }
    };
    let mut first: Option<Record> = None;
    while !trainer.is_done() {
        match trainer.step() {
            Ok(Some(record)) => {
                say(console_line(&record));
                if record.val_loss.is_some() {
                    moe_summary_lines(&record).into_iter().for_each(&say);
                }
                bar.set_message(format!(
                    "loss {:.4} | lr {} | {:.0} tok/s",
                    record.loss,
                    sci(record.lr),
                    record.tokens_per_s
                ));
                first.get_or_insert(record);
            }
            Ok(None) => {}
            Err(e) => {
                bar.abandon();
                return Err(e).into_diagnostic();
            }
        }
        bar.set_position(trainer.step_count() as u64);
    }
    bar.finish_and_clear();
    Ok(first)
}

/// The closing lines: throughput, where the checkpoint and log are, and the final losses next to
/// the first logged loss and the data's entropy, so a user sees whether the model learned more
/// than token frequencies.
fn print_summary(
    trainer: &Trainer<'_>,
    first: Option<Record>,
    first_step: usize,
    run_started: Instant,
) {
    let steps = trainer.step_count() - first_step;
    let seconds = run_started.elapsed().as_secs_f64();
    println!(
        "trained {steps} steps in {seconds:.1} s ({:.0} tokens/s on average); checkpoint {}, log {}",
        (steps * trainer.tokens_per_step()) as f64 / seconds.max(1e-9),
        trainer.checkpoint_path().display(),
        trainer.metrics_path().display()
    );
    if let Some(last) = trainer.last_record() {
        let data = trainer.data();
        let mut summary = format!("final: train loss {:.4}", last.loss);
        if let Some(first) = first.filter(|f| f.step < last.step) {
            summary.push_str(&format!(" (step {}: {:.4})", first.step, first.loss));
        }
        match (last.val_loss, last.val_ppl, last.val_acc) {
            (Some(v), Some(p), _) => summary.push_str(&format!(" | val loss {v:.4} (ppl {p:.2})")),
            (Some(v), _, Some(a)) => {
                summary.push_str(&format!(" | val loss {v:.4} (accuracy {:.2}%)", 100.0 * a))
            }
            _ => {}
        }
        summary.push_str(&format!(
            " | {} entropy {:.4}",
            entropy_name(data),
            data.unigram_entropy()
        ));
        if let Some(h) = data.conditional_entropy() {
            summary.push_str(&format!(" | best possible {h:.4}"));
        }
        println!("{summary}");
    }
}

/// What [`TrainData::unigram_entropy`] measures: of the tokens, or of a classifier's labels.
fn entropy_name(data: &TrainData) -> &'static str {
    match data {
        TrainData::Tokens(_) => "unigram",
        TrainData::Samples(_) => "label",
    }
}
