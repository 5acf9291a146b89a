//! The training loop: data → training plan (forward + backward) → optimizer, with evaluation,
//! logging, checkpoints, exact resume and a non-finite guard.
//!
//! # One step
//! For each of the `accumulate` micro-steps the host writes the batch (`tokens`, `targets`) and the
//! optimizer's per-step scalars, then submits one compute pass holding the whole training plan, the
//! loss tracking and gradient accumulation kernels and, after the last micro-step, the clip and
//! update kernels ([`crate::optim`]). Nothing is read back inside a step: the host reads the small
//! stats buffer (loss, grad norm, non-finite flag) only on log, eval and checkpoint steps.
//!
//! # Evaluation
//! A forward-only plan (`moec_compiler::compile`) whose Param buffers *are* the training weights
//! ([`crate::Executor::with_shared`]; schedule-free reads its averaged x). It runs over `batches`
//! fixed validation batches ([`TrainData::val_batches`]); `val_loss` is the mean of their `ce` (the
//! cross-entropy without balancing terms) and, for language models, `val_ppl = exp(val_loss)`; for
//! classifiers `val_acc` is the share of validation samples whose largest logit is their label
//! ([`evaluate_batches`], which `moec eval` shares). A separate plan rather than the training plan
//! without its update: it has no backward dispatches, so eval costs a third.
//!
//! # Data
//! Language models feed `tokens` and `targets` per micro-step, classifiers (`mlp`) `features` and
//! `targets` ([`feed`]); both come from one seeded [`Batcher`] whose position the checkpoint keeps.
//! For classifiers the log's `tokens_per_s` counts samples per second.
//!
//! # Steps, logs and checkpoints
//! `step N` in logs and checkpoints counts optimizer steps done. MoE layers' utilisation in the log
//! (`moe`) is that of the step's last micro-step. Step N logs when N is a multiple of
//! `log`, evaluates when a multiple of `eval`, checkpoints when a multiple of `checkpoint`; the last
//! step of the run does all three. The run directory holds `metrics.jsonl` ([`MetricsLog`]) and
//! `checkpoint.safetensors` ([`Checkpoint`]: weights under HF names, optimizer state under
//! `optim.`, the batcher state and the optimizer's host state as JSON metadata, the spec text).
//!
//! # Resume
//! `resume` loads `checkpoint.safetensors`, refuses it when its spec text differs from the current
//! spec ([`diff_specs`]), restores weights, optimizer state, batcher position and step, and drops
//! the lines of `metrics.jsonl` past the checkpoint's step (a killed run may have logged further).
//! Every kernel is deterministic (fixed reduction orders), so the resumed run's losses equal an
//! uninterrupted run's.
//!
//! # Router state and training-only randomness
//! As docs/DECISIONS.md "Router state and noise" says: `noise.*` inputs get i.i.d. N(0, 1) and
//! `jitter.*` U(1 − ε, 1 + ε) every micro-step in training (seeded by seed, step and micro-step, so
//! resume is exact) and zeros / ones in evaluation; `router_state.*` inputs start at zero, are shared
//! with the eval plan, receive their `.next` output after every optimizer step (a GPU copy), and are
//! saved in checkpoints under their own names.
//!
//! # Mixed precision
//! `precision = f16` plans store activations in f16 (`moec_compiler::precision`); the trainer
//! refuses an adapter without `shader-f16` before anything runs, and the optimizer scales the loss
//! dynamically ([`crate::optim`]: overflowing steps are skipped on the GPU). Log lines and
//! `metrics.jsonl` carry `loss_scale` and `skipped`; checkpoints keep the f32 weights and the loss
//! scale's state, so `--resume` continues it exactly.
//!
//! # Non-finite guard
//! When a stats read finds the sticky non-finite flag (see [`crate::optim`]), no update has run since
//! the bad step, so the weights are those before it: the trainer replays that step's batches one
//! dispatch at a time ([`crate::Executor::first_non_finite`]), reports the step and the first kernel
//! whose output went non-finite, and stops without writing a checkpoint, so the last good one stays.

use crate::checkpoint::{diff_specs, hf_config, Checkpoint, CheckpointError};
use crate::data::{standard_normal, Batch, Batcher, BatcherState, DataError, TrainData};
use crate::memory::eval_shares_input;
use crate::metrics::{MetricsError, MetricsLog, MoeLayerMetrics, Record, RouterLogitStats};
use crate::optim::{
    ExpertLoad, HostState, LossScaleState, OptimError, OptimSettings, Optimizer, ParamBinding,
    StepStats, EXPERT_MARKER,
};
use crate::{Executor, Gpu, NonFinite, RuntimeError};
use moec_compiler::interp::init_values;
use moec_compiler::ir::InputRole;
use moec_compiler::plan::{BufferRole, Plan};
use moec_compiler::spec::{Every, Precision, Spec, Train};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// File name of the checkpoint inside the run directory.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
/// Checkpoint metadata key of the batcher state.
const META_BATCHER: &str = "batcher";
/// Checkpoint metadata key of the optimizer's host state.
const META_OPTIM: &str = "optim";
/// Checkpoint metadata key of the loss scale (`precision = f16`).
const META_LOSS_SCALE: &str = "loss_scale";

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("the spec has no `train` block; add one (see docs/language.md) to train this model")]
    NoTrainBlock,
    #[error("the {which} plan has no {what} `{name}`; was it compiled for training?")]
    Plan {
        which: &'static str,
        what: &'static str,
        name: String,
    },
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Optim(#[from] OptimError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("nothing to resume: no checkpoint at `{0}`")]
    NoCheckpoint(PathBuf),
    #[error("refusing to resume from `{path}`: {diff}")]
    SpecChanged { path: PathBuf, diff: String },
    #[error("the checkpoint `{path}` has no `{key}` metadata; it was not written by `moec train`")]
    CheckpointMeta { path: PathBuf, key: &'static str },
    #[error("cannot rewrite `{path}` for the resume: {source}")]
    MetricsRewrite {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "step {step}: the {what} is not finite; {culprit}. Stopped; the last good checkpoint is untouched{}",
        .checkpoint.as_ref().map(|p| format!(" (`{}`)", p.display())).unwrap_or_default()
    )]
    NonFinite {
        step: usize,
        what: String,
        culprit: String,
        checkpoint: Option<PathBuf>,
    },
}

/// How to run: where to write, whether to resume, and an optional override of the spec's `steps`.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// The run directory (`metrics.jsonl`, `checkpoint.safetensors`).
    pub out_dir: PathBuf,
    pub resume: bool,
    /// Total optimizer steps, overriding `train.steps` (the schedule spans this many steps).
    pub steps: Option<usize>,
    /// The spec file's directory: data paths are relative to it.
    pub spec_dir: PathBuf,
}

/// A training run on one GPU.
pub struct Trainer<'g> {
    gpu: &'g Gpu,
    spec: Spec,
    spec_text: String,
    train: Train,
    batch: usize,
    data: TrainData,
    val: Vec<Batch>,
    batcher: BatcherState,
    exec: Executor<'g>,
    eval: Executor<'g>,
    optim: Optimizer<'g>,
    step: usize,
    total: usize,
    metrics: MetricsLog,
    out_dir: PathBuf,
    /// Batches of the steps since the stats were last read, by 0-based step, to replay a bad step.
    pending: Vec<(usize, Vec<Batch>)>,
    /// When the log window's first step started (`tokens_since` counts its tokens): a window opens
    /// at a step, not when the previous one was logged or the trainer was built, so the first
    /// window's tokens/s leaves out the wait for compilation before it.
    since: Instant,
    tokens_since: usize,
    last: Option<Record>,
    /// The last submitted micro-step, waited for after the next one is submitted.
    in_flight: Option<wgpu::SubmissionIndex>,
    /// Persistent router state inputs (`router_state.N.bias` / `.prices`) and their shapes.
    router_state: Vec<(String, Vec<usize>)>,
    /// Training-only random inputs (`noise.N...`, `jitter.N`), their element counts and distributions.
    noise: Vec<(String, usize, Draw)>,
    /// The spec's `jitter` (ε of U(1 − ε, 1 + ε)).
    jitter: f64,
}

/// The distribution of a training-only random input ([`InputRole::Noise`], [`InputRole::Jitter`]).
#[derive(Debug, Clone, Copy)]
enum Draw {
    /// i.i.d. N(0, 1).
    Normal,
    /// i.i.d. U(1 − ε, 1 + ε), ε the spec's `jitter`.
    Jitter,
}

fn every(n: usize, e: &Every) -> bool {
    e.every > 0 && n.is_multiple_of(e.every)
}

impl<'g> Trainer<'g> {
    /// Loads the data, allocates the plans and the optimizer, and sets the weights: from
    /// `init_params`' formula seeded by `train.seed`, or from the checkpoint with `resume`.
    /// `training` is the plan of `moec_compiler::compile_training` and `forward` the plan of
    /// `moec_compiler::compile`, both for `train.batch`.
    pub fn new(
        gpu: &'g Gpu,
        spec: &Spec,
        spec_text: &str,
        training: &Plan,
        forward: &Plan,
        options: &TrainOptions,
    ) -> Result<Trainer<'g>, TrainError> {
        let train = spec.train.clone().ok_or(TrainError::NoTrainBlock)?;
        if train.precision == Precision::F16 && !gpu.has_f16() {
            return Err(RuntimeError::NoF16 {
                adapter: gpu.info.name.clone(),
            }
            .into());
        }
        let data = TrainData::load(&train.data, &options.spec_dir, &spec.model, train.split)?;
        let val = data.val_batches(train.batch, train.eval.batches.max(1));
        let total = options.steps.unwrap_or(train.steps);

        let exec = Executor::new(gpu, training)?;
        require_data_buffers(training, forward, &data)?;
        let bindings = param_bindings(training, &exec)?;
        let mut settings = OptimSettings::from_train(&train);
        settings.total_steps = total;
        let mut optim = Optimizer::with_expert_loads(
            gpu,
            &settings,
            &bindings,
            exec.buffer("loss")?,
            exec.buffer("ce")?,
            &expert_loads(spec, &exec, &bindings),
        )?;
        // Router state (`router_state.N.*`, docs/DECISIONS.md): the eval plan reads the training
        // plan's state buffers, and each step copies the `.next` outputs into them.
        let router_state = router_state_inputs(training)?;
        let mut shared = optim.eval_params();
        for (name, _) in &router_state {
            shared.insert(name.clone(), exec.buffer(name)?.clone());
        }
        // Evaluation never interleaves with a step, so it runs in the step's activation buffers.
        let eval = Executor::with_shared(gpu, forward, &shared, Some(&exec))?;
        feed_eval_randomness(forward, &eval)?;
        let noise = training_random_inputs(training);
        exec.write_f32("grad_seed", &[1.0 / train.accumulate as f32])?;
        optim.scale_loss_into(exec.buffer("grad_seed")?)?;

        let (batcher, step, metrics) = if options.resume {
            resume(
                &options.out_dir,
                spec_text,
                &data,
                train.seed,
                &exec,
                &mut optim,
                &router_state,
            )?
        } else {
            optim.init(&initial_weights(training, train.seed))?;
            let batcher = Batcher::new(&data, train.seed).state();
            (batcher, 0, MetricsLog::create(&options.out_dir)?)
        };
        Ok(Trainer {
            gpu,
            spec: spec.clone(),
            spec_text: spec_text.to_string(),
            batch: train.batch,
            train,
            data,
            val,
            batcher,
            exec,
            eval,
            optim,
            step,
            total,
            metrics,
            out_dir: options.out_dir.clone(),
            pending: Vec::new(),
            since: Instant::now(),
            tokens_since: 0,
            last: None,
            in_flight: None,
            router_state,
            noise,
            jitter: spec.moe.as_ref().map_or(0.0, |m| m.jitter),
        })
    }

    /// Optimizer steps done so far.
    pub fn step_count(&self) -> usize {
        self.step
    }

    /// Optimizer steps of the whole run.
    pub fn total_steps(&self) -> usize {
        self.total
    }

    pub fn is_done(&self) -> bool {
        self.step >= self.total
    }

    pub fn data(&self) -> &TrainData {
        &self.data
    }

    /// The last logged record (with `val_loss` if that step evaluated).
    pub fn last_record(&self) -> Option<&Record> {
        self.last.as_ref()
    }

    pub fn checkpoint_path(&self) -> PathBuf {
        self.out_dir.join(CHECKPOINT_FILE)
    }

    pub fn metrics_path(&self) -> &Path {
        self.metrics.path()
    }

    /// Tokens one optimizer step consumes (samples, for a classifier).
    pub fn tokens_per_step(&self) -> usize {
        self.batch * self.data.targets_per_row() * self.train.accumulate
    }

    /// Overwrites one weight on the GPU (the buffer the training plan reads). For tools and tests,
    /// e.g. to check that a poisoned weight is caught by the non-finite guard.
    pub fn write_param(&self, name: &str, values: &[f32]) -> Result<(), TrainError> {
        Ok(self.exec.write_f32(name, values)?)
    }

    /// Runs one optimizer step; returns the step's record when it logged (or evaluated).
    pub fn step(&mut self) -> Result<Option<Record>, TrainError> {
        if self.tokens_since == 0 {
            self.since = Instant::now();
        }
        let s = self.step;
        let lrs = self.optim.prepare_step(s);
        let mut batcher = Batcher::new(&self.data, self.train.seed);
        batcher.restore(&self.batcher)?;
        let accumulate = self.train.accumulate;
        let mut batches = Vec::with_capacity(accumulate);
        for micro in 0..accumulate {
            let batch = batcher.next_train_batch(self.batch);
            feed(&self.exec, &batch)?;
            self.write_noise(s, micro)?;
            self.optim.write_micro(micro);
            let (exec, optim) = (&self.exec, &self.optim);
            let submitted = self.gpu.run_pass(|pass| {
                optim.encode_seed(pass);
                exec.encode(pass);
                optim.encode_micro(pass);
                if micro + 1 == accumulate {
                    optim.encode_update(pass);
                }
            })?;
            // At most two micro-steps in flight: the host prepares the next batch while the GPU runs
            // this one, but never queues up unboundedly (lavapipe slows down badly when it does).
            if let Some(previous) = self.in_flight.replace(submitted) {
                self.gpu.wait_for(previous)?;
            }
            batches.push(batch);
        }
        // Shampoo's root steps: host roots, then the rest of the update (a no-op otherwise).
        self.optim.finish_step()?;
        if !self.router_state.is_empty() {
            let copies = self
                .router_state
                .iter()
                .map(|(name, _)| {
                    Ok((
                        self.exec.buffer(&format!("{name}.next"))?,
                        self.exec.buffer(name)?,
                    ))
                })
                .collect::<Result<Vec<_>, RuntimeError>>()?;
            self.gpu.copy_buffers(&copies);
        }
        self.batcher = batcher.state();
        self.pending.push((s, batches));
        self.step += 1;
        self.tokens_since += self.tokens_per_step();

        let done = self.step;
        let last = done >= self.total;
        let log = last || every(done, &self.train.log);
        let eval = last || every(done, &self.train.eval);
        let checkpoint = last || every(done, &self.train.checkpoint);
        if !(log || eval || checkpoint) {
            return Ok(None);
        }
        let stats = self.optim.stats()?;
        let elapsed = self.since.elapsed().as_secs_f64();
        self.check(&stats)?;
        let mut record = None;
        if log || eval {
            let mut r = Record::new(
                done as u64,
                stats.loss as f64,
                lrs[0],
                self.tokens_since as f64 / elapsed.max(1e-9),
            );
            if self.optim.settings().loss_scaling {
                r.loss_scale = Some(stats.loss_scale as f64);
                r.skipped = Some(stats.skipped as u64);
            }
            if self.spec.moe.is_some() {
                r.aux = Some((stats.loss - stats.ce) as f64);
                r.moe = self.moe_metrics()?;
            }
            if eval {
                let e = evaluate_batches(&self.eval, &self.val)?;
                r = match e.accuracy {
                    Some(acc) => Record {
                        val_loss: Some(e.loss),
                        val_acc: Some(acc),
                        ..r
                    },
                    None => r.with_val_loss(e.loss),
                };
            }
            self.metrics.write(&r)?;
            self.last = Some(r.clone());
            record = Some(r);
        }
        if checkpoint {
            self.save_checkpoint()?;
        }
        self.tokens_since = 0;
        Ok(record)
    }

    /// Times every dispatch of the training plan on its own (forward + backward, no update) on the
    /// first validation batch: (dispatch name, seconds) in dispatch order. Leaves the weights, the
    /// optimizer and the batcher untouched.
    pub fn profile_step(&self) -> Result<Vec<(String, f64)>, TrainError> {
        feed(&self.exec, &self.val[0])?;
        Ok(self.exec.profile()?)
    }

    /// Fills the training-only random inputs for micro-step `micro` of 0-based step `step`: `noise.*`
    /// i.i.d. N(0, 1), `jitter.*` U(1 − ε, 1 + ε). Seeded by (seed, step, micro), so a resumed run
    /// draws exactly what the uninterrupted one did.
    fn write_noise(&self, step: usize, micro: usize) -> Result<(), TrainError> {
        if self.noise.is_empty() {
            return Ok(());
        }
        let mut rng = ChaCha8Rng::seed_from_u64(self.train.seed ^ 0x6e6f_6973_6500_0000);
        rng.set_stream((step * self.train.accumulate + micro) as u64);
        for (name, n, draw) in &self.noise {
            let values: Vec<f32> = match draw {
                Draw::Jitter => (0..*n)
                    .map(|_| (1.0 + self.jitter * (2.0 * rng.random::<f64>() - 1.0)) as f32)
                    .collect(),
                Draw::Normal => (0..*n).map(|_| standard_normal(&mut rng) as f32).collect(),
            };
            self.exec.write_f32(name, &values)?;
        }
        Ok(())
    }

    /// Per-MoE-layer utilisation of the last micro-step (docs/language.md "Metrics"), from the
    /// metric outputs lowering gives every MoE block (`moe.N.load`, `moe.N.dropped`, `moe.N.router_z`)
    /// and its `aux.N`, and the router-logit statistics of `moe.N.router_logits` (read back on log
    /// steps only). `None` when the plan has no such outputs.
    fn moe_metrics(&self) -> Result<Option<BTreeMap<String, MoeLayerMetrics>>, TrainError> {
        let Some(moe) = &self.spec.moe else {
            return Ok(None);
        };
        let mut layers = BTreeMap::new();
        for &block in &moe.blocks {
            let read = |name: String| match self.exec.read_f32(&name) {
                Ok(v) => Ok(Some(v)),
                Err(RuntimeError::UnknownBuffer(_)) => Ok(None),
                Err(e) => Err(e),
            };
            let (Some(load), Some(dropped), Some(router_z)) = (
                read(format!("moe.{block}.load"))?,
                read(format!("moe.{block}.dropped"))?,
                read(format!("moe.{block}.router_z"))?,
            ) else {
                continue;
            };
            let counts: Vec<u64> = load.iter().map(|&c| c.max(0.0).round() as u64).collect();
            let aux = read(format!("aux.{block}"))?.map_or(0.0, |v| v[0] as f64);
            // `moe.N.dropped` is a fraction; the log's `dropped` is a percentage.
            let mut metrics = MoeLayerMetrics::from_counts(
                &counts,
                100.0 * dropped[0] as f64,
                router_z[0] as f64,
                aux,
            );
            metrics.router_logits = read(format!("moe.{block}.router_logits"))?
                .map(|logits| RouterLogitStats::from_logits(&logits, counts.len()));
            layers.insert(block.to_string(), metrics);
        }
        Ok((!layers.is_empty()).then_some(layers))
    }

    /// Mean validation cross-entropy over the fixed validation batches (`val_loss`).
    pub fn evaluate(&self) -> Result<f64, TrainError> {
        Ok(evaluate_batches(&self.eval, &self.val)?.loss)
    }

    /// Writes `checkpoint.safetensors` atomically with everything [`Trainer::new`] needs to resume.
    pub fn save_checkpoint(&self) -> Result<PathBuf, TrainError> {
        let mut ckpt = Checkpoint {
            step: self.step as u64,
            spec_text: self.spec_text.clone(),
            ..Checkpoint::default()
        };
        for (name, (shape, data)) in self.optim.checkpoint_tensors()? {
            ckpt.insert_ir(&name, &shape, &data);
        }
        for (name, shape) in &self.router_state {
            ckpt.insert_ir(name, shape, &self.exec.read_f32(name)?);
        }
        ckpt.put_json(META_BATCHER, &self.batcher)?;
        ckpt.put_json(META_OPTIM, self.optim.host_state())?;
        if self.optim.settings().loss_scaling {
            ckpt.put_json(META_LOSS_SCALE, &self.optim.loss_scale_state()?)?;
        }
        let path = self.checkpoint_path();
        ckpt.save(&path)?;
        // Where HF transformers computes this spec, `from_pretrained(run_dir)` loads the run.
        if let Ok(config) = hf_config(&self.spec) {
            ckpt.save_hf_files(&path, &config)?;
        }
        Ok(path)
    }

    /// Stops the run with a diagnosis when the GPU flagged a non-finite step.
    fn check(&mut self, stats: &StepStats) -> Result<(), TrainError> {
        let Some(bad) = stats.bad_step else {
            self.pending.clear();
            return Ok(());
        };
        let bad = bad as usize;
        let mut culprit: Option<NonFinite> = None;
        if let Some((_, batches)) = self.pending.iter().find(|(s, _)| *s == bad) {
            for batch in batches {
                feed(&self.exec, batch)?;
                culprit = self.exec.first_non_finite()?;
                if culprit.is_some() {
                    break;
                }
            }
        }
        let what = if stats.loss.is_finite() {
            format!("gradient norm ({})", stats.grad_norm)
        } else {
            format!("loss ({})", stats.loss)
        };
        let culprit = match culprit {
            Some(c) => format!("the first non-finite value came from {c}"),
            None => "replaying the step kept every kernel output finite, so the squared gradient norm overflowed f32".into(),
        };
        let checkpoint = Some(self.checkpoint_path()).filter(|p| p.exists());
        Err(TrainError::NonFinite {
            step: bad + 1,
            what,
            culprit,
            checkpoint,
        })
    }
}

/// Writes a batch into a plan's data inputs: `tokens` (language models) or `features`
/// (classifiers), and `targets`.
pub fn feed(exec: &Executor<'_>, batch: &Batch) -> Result<(), RuntimeError> {
    match batch {
        Batch::Tokens { tokens, targets } => {
            exec.write_u32("tokens", tokens)?;
            exec.write_u32("targets", targets)
        }
        Batch::Samples { features, targets } => {
            exec.write_f32("features", features)?;
            exec.write_u32("targets", targets)
        }
    }
}

/// What one evaluation measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    /// Mean of the batches' `ce`.
    pub loss: f64,
    /// Classifiers: the share of rows whose largest logit (the first, on ties) is their target;
    /// a row with a NaN logit counts as wrong. `None` for language models.
    pub accuracy: Option<f64>,
}

/// Runs a forward executor over `batches` (the trainer's eval and `moec eval`): mean `ce`, and for
/// sample batches the accuracy read from the `logits` output (`[rows, classes]`).
pub fn evaluate_batches(
    exec: &Executor<'_>,
    batches: &[Batch],
) -> Result<Evaluation, RuntimeError> {
    let (mut sum, mut correct, mut rows, mut classifier) = (0.0, 0usize, 0usize, false);
    for batch in batches {
        feed(exec, batch)?;
        exec.run()?;
        sum += exec.read_f32("ce")?[0] as f64;
        if let Batch::Samples { targets, .. } = batch {
            classifier = true;
            let logits = exec.read_f32("logits")?;
            let classes = logits.len() / targets.len().max(1);
            for (row, &target) in logits.chunks_exact(classes.max(1)).zip(targets) {
                let mut argmax = 0;
                for (i, &v) in row.iter().enumerate() {
                    if v > row[argmax] {
                        argmax = i;
                    }
                }
                let nan = row.iter().any(|v| v.is_nan());
                correct += usize::from(!nan && argmax == target as usize);
                rows += 1;
            }
        }
    }
    Ok(Evaluation {
        loss: sum / batches.len().max(1) as f64,
        accuracy: classifier.then(|| correct as f64 / rows.max(1) as f64),
    })
}

/// Refuses a plan without the buffer `name`, naming the plan (`which`) and the buffer's kind.
fn require(
    plan: &Plan,
    which: &'static str,
    what: &'static str,
    name: &str,
) -> Result<(), TrainError> {
    plan.buffer_named(name)
        .map(|_| ())
        .ok_or_else(|| TrainError::Plan {
            which,
            what,
            name: name.to_string(),
        })
}

/// Checks up front that both plans have the buffers the loop feeds and reads, so a plan compiled
/// without training fails with its missing buffer's name rather than inside the first step.
fn require_data_buffers(
    training: &Plan,
    forward: &Plan,
    data: &TrainData,
) -> Result<(), TrainError> {
    let inputs = match data {
        TrainData::Tokens(_) => "tokens",
        TrainData::Samples(_) => "features",
    };
    for input in [inputs, "targets", "grad_seed"] {
        require(training, "training", "input", input)?;
    }
    for output in ["loss", "ce"] {
        require(training, "training", "output", output)?;
    }
    for name in [inputs, "targets", "ce"] {
        require(forward, "forward", "buffer", name)?;
    }
    if let TrainData::Samples(_) = data {
        require(forward, "forward", "output", "logits")?;
    }
    Ok(())
}

/// The training plan's parameters with their gradients; refuses a plan where no parameter has
/// one, since its optimizer would never move anything.
fn param_bindings(training: &Plan, exec: &Executor<'_>) -> Result<Vec<ParamBinding>, TrainError> {
    let mut bindings = Vec::new();
    for buffer in &training.buffers {
        if let BufferRole::Param { name, shape, .. } = &buffer.role {
            // No `grad.<name>` output: the parameter does not reach the loss (autodiff's contract).
            let grad = exec.buffer(&format!("grad.{name}")).ok().cloned();
            bindings.push(ParamBinding {
                name: name.clone(),
                shape: shape.clone(),
                param: exec.buffer(name)?.clone(),
                grad,
            });
        }
    }
    if bindings.iter().all(|b| b.grad.is_none()) {
        return Err(TrainError::Plan {
            which: "training",
            what: "output",
            name: "grad.*".into(),
        });
    }
    Ok(bindings)
}

/// Each MoE block's load output and its stacked experts, for `expert_lr = adaptive`.
fn expert_loads(spec: &Spec, exec: &Executor<'_>, bindings: &[ParamBinding]) -> Vec<ExpertLoad> {
    let mut loads = Vec::new();
    for &block in spec.moe.as_ref().map_or(&[][..], |m| &m.blocks[..]) {
        if let Ok(load) = exec.buffer(&format!("moe.{block}.load")) {
            let prefix = format!("model.layers.{block}.{EXPERT_MARKER}.");
            loads.push(ExpertLoad {
                load: load.clone(),
                params: bindings
                    .iter()
                    .filter(|b| b.name.starts_with(&prefix))
                    .map(|b| b.name.clone())
                    .collect(),
            });
        }
    }
    loads
}

/// The training plan's persistent router state inputs and their shapes; each must have the
/// `.next` output the step copies back into it.
fn router_state_inputs(training: &Plan) -> Result<Vec<(String, Vec<usize>)>, TrainError> {
    let mut router_state = Vec::new();
    for b in &training.buffers {
        if let BufferRole::Input { name, shape, role } = &b.role {
            if eval_shares_input(*role) {
                require(training, "training", "output", &format!("{name}.next"))?;
                router_state.push((name.clone(), shape.clone()));
            }
        }
    }
    Ok(router_state)
}

/// Training-only randomness is off in evaluation: its noise inputs hold zeros and its jitter
/// inputs ones, written once since nothing else writes them.
fn feed_eval_randomness(forward: &Plan, eval: &Executor<'_>) -> Result<(), TrainError> {
    for b in &forward.buffers {
        if let BufferRole::Input { name, shape, role } = &b.role {
            let n: usize = shape.iter().product();
            match role {
                InputRole::Noise => eval.write_f32(name, &vec![0.0; n])?,
                InputRole::Jitter => eval.write_f32(name, &vec![1.0; n])?,
                // Shared with training (router state) or fed per batch.
                InputRole::RouterState
                | InputRole::Data
                | InputRole::LossSeed
                | InputRole::LogitRows => {}
            }
        }
    }
    Ok(())
}

/// The training plan's noise and jitter inputs, their element counts and distributions, redrawn
/// every micro-step.
fn training_random_inputs(training: &Plan) -> Vec<(String, usize, Draw)> {
    let mut noise = Vec::new();
    for b in &training.buffers {
        if let BufferRole::Input { name, shape, role } = &b.role {
            let n = shape.iter().product();
            match role {
                InputRole::Noise => noise.push((name.clone(), n, Draw::Normal)),
                InputRole::Jitter => noise.push((name.clone(), n, Draw::Jitter)),
                // Fed per micro-step (`feed`), once (`grad_seed`), kept (router state), or absent
                // from a training plan (logit rows).
                InputRole::Data
                | InputRole::LossSeed
                | InputRole::RouterState
                | InputRole::LogitRows => {}
            }
        }
    }
    noise
}

/// A fresh run's weights: each parameter's `init_params` formula seeded by `seed`.
fn initial_weights(training: &Plan, seed: u64) -> HashMap<String, Vec<f32>> {
    let mut init = HashMap::new();
    for buffer in &training.buffers {
        if let BufferRole::Param {
            name,
            shape,
            init: how,
        } = &buffer.role
        {
            init.insert(
                name.clone(),
                init_values(name, *how, shape.iter().product(), seed),
            );
        }
    }
    init
}

/// Restores a run from `OUT_DIR/checkpoint.safetensors` (weights, optimizer and loss-scale
/// state, router state) and returns the batcher position, the step and the metrics log to append
/// to; refuses a checkpoint of a different spec.
fn resume(
    out_dir: &Path,
    spec_text: &str,
    data: &TrainData,
    seed: u64,
    exec: &Executor<'_>,
    optim: &mut Optimizer<'_>,
    router_state: &[(String, Vec<usize>)],
) -> Result<(BatcherState, usize, MetricsLog), TrainError> {
    let path = out_dir.join(CHECKPOINT_FILE);
    if !path.exists() {
        return Err(TrainError::NoCheckpoint(path));
    }
    let ckpt = Checkpoint::load(&path)?;
    if let Some(diff) = diff_specs(&ckpt.spec_text, spec_text) {
        return Err(TrainError::SpecChanged { path, diff });
    }
    let host: HostState = checkpoint_meta(&ckpt, &path, META_OPTIM)?;
    let batcher: BatcherState = checkpoint_meta(&ckpt, &path, META_BATCHER)?;
    Batcher::new(data, seed).restore(&batcher)?;
    let tensors = ckpt.ir_tensors()?;
    optim.restore(&tensors, &host)?;
    if optim.settings().loss_scaling {
        let state: LossScaleState = checkpoint_meta(&ckpt, &path, META_LOSS_SCALE)?;
        optim.restore_loss_scale(&state);
    }
    for (name, shape) in router_state {
        match tensors.get(name) {
            Some((s, data)) if s == shape => exec.write_f32(name, data)?,
            _ => return Err(OptimError::Missing(name.clone()).into()),
        }
    }
    truncate_metrics(out_dir, ckpt.step)?;
    Ok((batcher, ckpt.step as usize, MetricsLog::append(out_dir)?))
}

/// The checkpoint's JSON metadata under `key`, which `moec train` always writes.
fn checkpoint_meta<T: serde::de::DeserializeOwned>(
    ckpt: &Checkpoint,
    path: &Path,
    key: &'static str,
) -> Result<T, TrainError> {
    ckpt.get_json(key)?.ok_or(TrainError::CheckpointMeta {
        path: path.to_path_buf(),
        key,
    })
}

/// Keeps only the lines of `DIR/metrics.jsonl` up to step `step` (a resumed run re-logs the rest).
fn truncate_metrics(dir: &Path, step: u64) -> Result<(), TrainError> {
    let path = dir.join(MetricsLog::FILE_NAME);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(TrainError::MetricsRewrite { path, source }),
    };
    let kept: String = text
        .lines()
        .filter(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_some_and(|s| s <= step)
        })
        .map(|line| format!("{line}\n"))
        .collect();
    std::fs::write(&path, kept).map_err(|source| TrainError::MetricsRewrite { path, source })
}
