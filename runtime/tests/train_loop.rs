//! The training loop end to end on tiny specs with synthetic markov data: the loss falls, gradient
//! accumulation equals a bigger batch, kill-and-resume reproduces an uninterrupted run (also with
//! the LM head and loss in chunks that do not divide the tokens), resume
//! refuses a changed spec, a poisoned weight is caught by the non-finite guard, and the logged
//! rate counts training time only.

use moec_compiler::autodiff::training_graph;
use moec_compiler::check::check;
use moec_compiler::emit::{emit, Target};
use moec_compiler::fuse::{fuse, FuseOptions};
use moec_compiler::head::legalize_in_chunks;
use moec_compiler::ir::Graph;
use moec_compiler::lower::{lower_with, Head};
use moec_compiler::plan::Plan;
use moec_compiler::spec::Spec;
use moec_compiler::{compile, compile_training};
use moec_runtime::metrics::Record;
use moec_runtime::optim::{OptimSettings, Optimizer, ParamBinding};
use moec_runtime::train::{TrainError, TrainOptions, Trainer};
use moec_runtime::{AdapterChoice, Executor, Gpu};
use std::collections::BTreeMap;
use std::path::Path;

/// A small MoE transformer (4 experts, top-2) on a 32-token markov chain.
fn tiny_spec(steps: usize, extra: &str) -> String {
    format!(
        "model tiny {{
  vocab = 32
  dim = 32
  layers = 1
  heads = 2
  context = 16
  moe {{
    experts = 4
    top_k = 2
    expert = swiglu(hidden = 32)
    balance = aux(0.01)
  }}
}}
train {{
  data = synthetic(kind = markov, seed = 3)
  batch = 4
  steps = {steps}
  optimizer = adamw(lr = 1e-2, betas = (0.9, 0.95), weight_decay = 0.01)
  schedule = cosine(warmup = 1, min_lr = 1e-3)
  clip = 1.0
  {extra}
}}
"
    )
}

fn gpu() -> Gpu {
    Gpu::new(&AdapterChoice::default())
        .expect("a wgpu adapter (lavapipe: apt-get install mesa-vulkan-drivers)")
}

fn spec_of(text: &str) -> Spec {
    check(text, Path::new("tiny.moe")).expect("the test spec checks")
}

fn trainer<'g>(
    gpu: &'g Gpu,
    text: &str,
    dir: &Path,
    resume: bool,
) -> Result<Trainer<'g>, TrainError> {
    let spec = spec_of(text);
    let batch = spec.train.as_ref().unwrap().batch;
    let target = gpu.target();
    let training = compile_training(&spec, batch, &target, true).expect("compiles for training");
    let forward = compile(&spec, batch, &target, true).expect("compiles");
    start(gpu, &spec, text, dir, resume, &training.plan, &forward.plan)
}

/// A trainer whose training and evaluation plans run the LM head in chunks of `rows` tokens
/// (`head::legalize_in_chunks`) instead of the target's chunk size (one chunk at these sizes).
fn chunked_trainer<'g>(
    gpu: &'g Gpu,
    text: &str,
    dir: &Path,
    resume: bool,
    rows: usize,
) -> Result<Trainer<'g>, TrainError> {
    let spec = spec_of(text);
    let batch = spec.train.as_ref().unwrap().batch;
    let target = gpu.target();
    let plan = |graph: &Graph| {
        let graph = legalize_in_chunks(graph, rows).unwrap();
        emit(
            &graph,
            &fuse(&graph, FuseOptions::for_target(&target)),
            &target,
        )
        .unwrap()
    };
    let forward = lower_with(&spec, batch, Head::Loss).unwrap();
    let training = plan(&training_graph(&forward).unwrap());
    start(gpu, &spec, text, dir, resume, &training, &plan(&forward))
}

fn start<'g>(
    gpu: &'g Gpu,
    spec: &Spec,
    text: &str,
    dir: &Path,
    resume: bool,
    training: &Plan,
    forward: &Plan,
) -> Result<Trainer<'g>, TrainError> {
    let options = TrainOptions {
        out_dir: dir.to_path_buf(),
        resume,
        steps: None,
        spec_dir: ".".into(),
    };
    Trainer::new(gpu, spec, text, training, forward, &options)
}

fn run(t: &mut Trainer, until: usize) -> Vec<Record> {
    let mut records = Vec::new();
    while t.step_count() < until {
        records.extend(t.step().expect("a finite step"));
    }
    records
}

#[test]
fn loss_falls_on_markov_data() {
    let gpu = gpu();
    let dir = tempfile::tempdir().unwrap();
    let text = tiny_spec(40, "log = every(10)\n  eval = every(20, batches = 2)");
    let mut t = trainer(&gpu, &text, dir.path(), false).unwrap();
    let initial = t.evaluate().unwrap();
    let records = run(&mut t, 40);
    assert_eq!(
        records.iter().map(|r| r.step).collect::<Vec<_>>(),
        vec![10, 20, 30, 40]
    );
    let last = records.last().unwrap();
    let val = last.val_loss.expect("the last step evaluates");
    let unigram = t.data().unigram_entropy();
    // Starts at ln 32 = 3.47 (init std 0.02 gives near-uniform logits) and must learn the chain's
    // transitions, not only its unigram statistics (3.25 nats here): clearly below that.
    assert!(
        (initial - 32f64.ln()).abs() < 0.1,
        "initial val loss {initial}"
    );
    assert!(
        val < unigram - 0.5,
        "val loss {val} vs unigram entropy {unigram}"
    );
    assert!(
        last.loss < records[0].loss,
        "train loss {} at step 40 vs {} at step 10",
        last.loss,
        records[0].loss
    );
    assert!((last.val_ppl.unwrap() - val.exp()).abs() < 1e-9);
    assert!(
        last.aux.unwrap() > 0.0 && last.aux.unwrap() < 0.05,
        "aux {:?}",
        last.aux
    );
    assert!(last.tokens_per_s > 0.0);
    // Utilisation of the one MoE layer: 4 experts share the 4·16 tokens × top-2 assignments.
    let layer = &last.moe.as_ref().expect("MoE metrics on log steps")["0"];
    assert_eq!(layer.tokens_per_expert.len(), 4);
    assert_eq!(layer.tokens_per_expert.iter().sum::<u64>(), 4 * 16 * 2);
    assert_eq!(layer.dropped, 0.0, "dropless");
    assert!((layer.fraction.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    assert!(
        layer.router_z > 0.0 && (layer.aux - last.aux.unwrap()).abs() < 1e-6,
        "{layer:?}"
    );
    let lines = std::fs::read_to_string(t.metrics_path()).unwrap();
    assert_eq!(lines.lines().count(), 4);
    assert!(
        t.checkpoint_path().exists(),
        "the end of the run checkpoints"
    );
}

/// Kill-and-resume: 12 steps straight vs 6 steps, a "kill" (the trainer dropped after its step-6
/// checkpoint), and a resume to 12. Every kernel is deterministic, so the losses agree to f32
/// round-off (in practice bit for bit; asserted to 1e-6 relative).
/// A log window's tokens/s counts from its first step, not from when the trainer was built: `moec
/// train` builds it while kernels still compile, and that wait is not training throughput. The
/// trainer here idles 3 s first; a step of this model takes milliseconds, so a rate that counted
/// the idle time would be below one step's tokens per 3 s.
#[test]
fn the_first_logged_rate_leaves_out_the_time_before_the_first_step() {
    let gpu = gpu();
    let dir = tempfile::tempdir().unwrap();
    let mut t = trainer(&gpu, &tiny_spec(2, "log = every(1)"), dir.path(), false).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3));
    let first = run(&mut t, 1).pop().expect("step 1 is logged");
    let idle_bound = t.tokens_per_step() as f64 / 3.0;
    assert!(
        first.tokens_per_s > idle_bound,
        "{} tokens/s at step 1 would include the 3 s idle ({idle_bound})",
        first.tokens_per_s
    );
}

#[test]
fn resume_continues_exactly() {
    resume_is_exact(&resume_spec(""), None);
}

/// [`resume_continues_exactly`] with the LM head and loss in chunks of 24 of the 64 tokens.
#[test]
fn resume_continues_exactly_with_a_chunked_head() {
    resume_is_exact(&resume_spec(""), Some(24));
}

/// [`resume_continues_exactly`] with activation recomputation and router jitter: the recomputed
/// blocks read the step's jitter again, and resume stays exact.
#[test]
fn resume_continues_exactly_with_recompute() {
    let text = resume_spec("\n  recompute = block").replace(
        "balance = aux(0.01)",
        "balance = aux(0.01)\n    jitter = 0.05",
    );
    assert!(
        text.contains("jitter"),
        "the tiny spec has an aux-balanced MoE"
    );
    resume_is_exact(&text, None);
}

/// 12 steps, logged every step, evaluated and checkpointed every 6; `extra` adds train fields.
fn resume_spec(extra: &str) -> String {
    tiny_spec(
        12,
        &format!("log = every(1)\n  eval = every(6, batches = 1)\n  checkpoint = every(6){extra}"),
    )
}

fn resume_is_exact(text: &str, chunk: Option<usize>) {
    let gpu = gpu();
    let make = |dir: &Path, resume: bool| match chunk {
        None => trainer(&gpu, text, dir, resume),
        Some(rows) => chunked_trainer(&gpu, text, dir, resume, rows),
    };
    let straight_dir = tempfile::tempdir().unwrap();
    let mut straight = make(straight_dir.path(), false).unwrap();
    let all = run(&mut straight, 12);

    let dir = tempfile::tempdir().unwrap();
    let mut first = make(dir.path(), false).unwrap();
    let head = run(&mut first, 8); // steps 7 and 8 are lost with the "kill"
    drop(first);
    let mut resumed = make(dir.path(), true).unwrap();
    assert_eq!(resumed.step_count(), 6);
    let tail = run(&mut resumed, 12);

    let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * b.abs().max(1.0);
    for (a, b) in head.iter().zip(&all) {
        assert!(
            close(a.loss, b.loss),
            "step {}: {} vs {}",
            a.step,
            a.loss,
            b.loss
        );
    }
    assert_eq!(tail.first().unwrap().step, 7);
    for (a, b) in tail.iter().zip(&all[6..]) {
        assert_eq!(a.step, b.step);
        assert!(
            close(a.loss, b.loss),
            "step {}: resumed {} vs straight {}",
            a.step,
            a.loss,
            b.loss
        );
        assert_eq!(a.val_loss.is_some(), b.val_loss.is_some());
        if let (Some(x), Some(y)) = (a.val_loss, b.val_loss) {
            assert!(close(x, y), "val at {}: {x} vs {y}", a.step);
        }
    }
    // The metrics log of the resumed run has each step once.
    let steps: Vec<u64> = std::fs::read_to_string(resumed.metrics_path())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Record>(l).unwrap().step)
        .collect();
    assert_eq!(steps, (1..=12).collect::<Vec<_>>());
}

#[test]
fn resume_refuses_a_changed_spec() {
    let gpu = gpu();
    let dir = tempfile::tempdir().unwrap();
    let text = tiny_spec(2, "log = every(1)");
    let mut t = trainer(&gpu, &text, dir.path(), false).unwrap();
    run(&mut t, 2);
    drop(t);
    let changed = text.replace("lr = 1e-2", "lr = 3e-2");
    let err = trainer(&gpu, &changed, dir.path(), true)
        .err()
        .expect("a changed spec is refused");
    let message = err.to_string();
    assert!(matches!(err, TrainError::SpecChanged { .. }), "{message}");
    assert!(
        message.contains("lr = 1e-2") && message.contains("lr = 3e-2"),
        "{message}"
    );
    let missing = tempfile::tempdir().unwrap();
    assert!(matches!(
        trainer(&gpu, &text, missing.path(), true).err(),
        Some(TrainError::NoCheckpoint(_))
    ));
}

#[test]
fn a_poisoned_weight_stops_with_the_step_and_the_kernel() {
    let gpu = gpu();
    let dir = tempfile::tempdir().unwrap();
    let text = tiny_spec(6, "log = every(2)\n  checkpoint = every(2)");
    let mut t = trainer(&gpu, &text, dir.path(), false).unwrap();
    run(&mut t, 2);
    let good = std::fs::read(t.checkpoint_path()).unwrap();
    t.write_param("model.norm.weight", &[f32::NAN; 32]).unwrap();
    t.step().unwrap(); // step 3: flagged on the GPU, not read yet
    let err = t.step().expect_err("step 4 reads the stats and stops");
    let message = err.to_string();
    assert!(
        matches!(err, TrainError::NonFinite { step: 3, .. }),
        "{message}"
    );
    assert!(message.contains("kernel `"), "names the kernel: {message}");
    assert_eq!(
        std::fs::read(t.checkpoint_path()).unwrap(),
        good,
        "the last good checkpoint is untouched"
    );
}

/// Two micro-steps of batch 2 equal one step of batch 4 in gradients (a dense model, whose loss is a
/// plain token mean, so the two are equal up to f32 summation order; tolerance 1e-4 relative).
#[test]
fn accumulation_matches_a_double_batch() {
    let gpu = gpu();
    let dense = tiny_spec(1, "")
        .replace("experts = 4", "experts = 0")
        .replace("top_k = 2\n", "")
        .replace("balance = aux(0.01)\n", "");
    let spec = spec_of(&dense);
    let target: Target = gpu.target();
    let tokens: Vec<u32> = (0..64).map(|i| (i * 7 + 3) % 32).collect();
    let targets: Vec<u32> = (0..64).map(|i| (i * 5 + 1) % 32).collect();
    // SGD with lr 1 and no momentum: the weight change is exactly minus the gradient.
    let mut settings = OptimSettings::from_train(spec.train.as_ref().unwrap());
    settings.optimizer = moec_compiler::spec::Optimizer::Sgd {
        lr: 1.0,
        momentum: 0.0,
    };
    settings.schedule = moec_compiler::spec::Schedule::Constant;
    settings.clip = None;
    let mut deltas = Vec::new();
    for (batch, accumulate) in [(4usize, 1usize), (2, 2)] {
        let plan = compile_training(&spec, batch, &target, true).unwrap().plan;
        let exec = Executor::new(&gpu, &plan).unwrap();
        let mut params = Vec::new();
        let mut init = std::collections::HashMap::new();
        for b in &plan.buffers {
            if let moec_compiler::plan::BufferRole::Param {
                name,
                shape,
                init: how,
            } = &b.role
            {
                params.push(ParamBinding {
                    name: name.clone(),
                    shape: shape.clone(),
                    param: exec.buffer(name).unwrap().clone(),
                    grad: exec.buffer(&format!("grad.{name}")).ok().cloned(),
                });
                init.insert(
                    name.clone(),
                    moec_compiler::interp::init_values(name, *how, shape.iter().product(), 0),
                );
            }
        }
        settings.accumulate = accumulate;
        let mut optim = Optimizer::new(
            &gpu,
            &settings,
            &params,
            exec.buffer("loss").unwrap(),
            exec.buffer("ce").unwrap(),
        )
        .unwrap();
        optim.init(&init).unwrap();
        exec.write_f32("grad_seed", &[1.0 / accumulate as f32])
            .unwrap();
        optim.prepare_step(0);
        let per = 64 / accumulate;
        for micro in 0..accumulate {
            exec.write_u32("tokens", &tokens[micro * per..(micro + 1) * per])
                .unwrap();
            exec.write_u32("targets", &targets[micro * per..(micro + 1) * per])
                .unwrap();
            optim.write_micro(micro);
            gpu.run_pass(|pass| {
                exec.encode(pass);
                optim.encode_micro(pass);
                if micro + 1 == accumulate {
                    optim.encode_update(pass);
                }
            })
            .unwrap();
        }
        let after: BTreeMap<String, Vec<f32>> = optim
            .checkpoint_tensors()
            .unwrap()
            .into_iter()
            .map(|(n, (_, d))| (n, d))
            .collect();
        let delta: BTreeMap<String, Vec<f32>> = after
            .iter()
            .map(|(n, d)| {
                (
                    n.clone(),
                    d.iter().zip(&init[n]).map(|(a, b)| a - b).collect(),
                )
            })
            .collect();
        deltas.push((delta, optim.stats().unwrap()));
    }
    let ((big, big_stats), (acc, acc_stats)) = (&deltas[0], &deltas[1]);
    assert!(
        (big_stats.loss - acc_stats.loss).abs() < 1e-5,
        "mean loss {} vs {}",
        big_stats.loss,
        acc_stats.loss
    );
    assert!((big_stats.grad_norm - acc_stats.grad_norm).abs() < 1e-4 * big_stats.grad_norm);
    let mut compared = 0;
    for (name, d) in big {
        let scale = d.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-6);
        for (i, (x, y)) in d.iter().zip(&acc[name]).enumerate() {
            assert!(
                (x - y).abs() <= 1e-4 * scale,
                "{name}[{i}]: batch 4 {x} vs 2x2 {y}"
            );
        }
        compared += 1;
    }
    assert!(compared >= 5, "every parameter compared");
}

/// Schedule-free AdamW (evaluated at its averaged weights x, which the eval plan reads directly)
/// and SGD with momentum also train: the validation loss drops clearly below its start (ln 32).
#[test]
fn schedule_free_and_sgd_learn() {
    let gpu = gpu();
    for optimizer in [
        "schedule_free_adamw(lr = 1e-2, betas = (0.9, 0.95))",
        "sgd(lr = 0.5, momentum = 0.9)",
    ] {
        let text = tiny_spec(20, "log = every(20)\n  eval = every(20, batches = 2)").replace(
            "adamw(lr = 1e-2, betas = (0.9, 0.95), weight_decay = 0.01)",
            optimizer,
        );
        let dir = tempfile::tempdir().unwrap();
        let mut t = trainer(&gpu, &text, dir.path(), false).unwrap();
        let initial = t.evaluate().unwrap();
        let records = run(&mut t, 20);
        let val = records.last().unwrap().val_loss.unwrap();
        assert!(
            val < initial - 0.5,
            "{optimizer}: val loss {val} from {initial}"
        );
    }
}

/// Router state and training noise survive a resume exactly: loss-free bias balancing (its
/// `router_state.0.bias` is checkpointed and updated by a GPU copy each step) and noisy top-k (its
/// noise is seeded by step, so the resumed run draws the same noise).
#[test]
fn resume_is_exact_with_router_state_and_noise() {
    let gpu = gpu();
    for (gate, balance) in [
        ("sigmoid", "bias(rate = 0.01)"),
        ("noisy_top_k(noise = 1.0)", "aux(0.01)"),
    ] {
        let text = tiny_spec(
            6,
            "log = every(1)\n  eval = every(3, batches = 1)\n  checkpoint = every(3)",
        )
        .replace(
            "balance = aux(0.01)",
            &format!("gate = {gate}\n    balance = {balance}"),
        );
        let straight_dir = tempfile::tempdir().unwrap();
        let all = run(
            &mut trainer(&gpu, &text, straight_dir.path(), false).unwrap(),
            6,
        );
        let dir = tempfile::tempdir().unwrap();
        run(&mut trainer(&gpu, &text, dir.path(), false).unwrap(), 3);
        let tail = run(&mut trainer(&gpu, &text, dir.path(), true).unwrap(), 6);
        for (a, b) in tail.iter().zip(&all[3..]) {
            assert!(
                (a.loss - b.loss).abs() <= 1e-6 * b.loss.abs(),
                "{gate}: step {}: resumed {} vs {}",
                a.step,
                a.loss,
                b.loss
            );
        }
        if balance.starts_with("bias") {
            let ckpt = moec_runtime::checkpoint::Checkpoint::load(
                &dir.path().join("checkpoint.safetensors"),
            )
            .unwrap();
            let (_, bias) = &ckpt.tensors["router_state.0.bias"];
            assert!(bias.iter().any(|&b| b != 0.0), "the bias moved: {bias:?}");
        }
    }
}

/// `precision = f16` with a balancing term whose gradient overflows f16 at the initial loss scale
/// (`z(1000)`: the router's input gradient is ~1e5 at scale 2¹⁶): the first steps are skipped on
/// the GPU and the scale backs off (GradScaler: ×0.5 per skip; on lavapipe 7 skips, down to 2⁹),
/// then training goes on with finite losses (an occasional later overflow is skipped the same way;
/// lavapipe: one more at step 10 as the router's gradients grow), and the checkpoint holds only
/// finite tensors.
#[test]
fn f16_overflow_skips_steps_backs_off_the_scale_and_recovers() {
    let gpu = gpu();
    let dir = tempfile::tempdir().unwrap();
    let steps = 12;
    let text = tiny_spec(
        steps,
        "log = every(1)\n  checkpoint = every(6)\n  precision = f16",
    )
    .replace("balance = aux(0.01)", "balance = z(1000)");
    let mut t = trainer(&gpu, &text, dir.path(), false).unwrap();
    let records = run(&mut t, steps);
    let scales: Vec<f64> = records.iter().map(|r| r.loss_scale.unwrap()).collect();
    let skipped: Vec<u64> = records.iter().map(|r| r.skipped.unwrap()).collect();
    let losses: Vec<f64> = records.iter().map(|r| r.loss).collect();
    eprintln!("loss scale per step: {scales:?}\nskipped so far: {skipped:?}\nloss: {losses:?}");
    assert!(skipped[0] >= 1, "step 1 overflows at scale 2^16");
    let mut before = 0;
    for (i, (&skips, &scale)) in skipped.iter().zip(&scales).enumerate() {
        assert!(
            skips <= before + 1,
            "one skip per step at most: {skipped:?}"
        );
        // Every skip halved the scale; nothing doubled it (growth needs 2000 finite steps).
        assert_eq!(scale, 65536.0 / f64::from(1u32 << skips), "step {}", i + 1);
        before = skips;
    }
    assert!(
        (before as usize) + 3 <= steps,
        "the backed-off scale fits: at least 3 steps applied: {skipped:?}"
    );
    assert!(losses.iter().all(|l| l.is_finite()));
    // Skipped steps leave the weights alone; the applied ones train.
    assert!(
        losses[steps - 1] < losses[0],
        "training goes on: {losses:?}"
    );
    let ckpt = moec_runtime::checkpoint::Checkpoint::load(&t.checkpoint_path()).unwrap();
    for (name, (_, data)) in ckpt.ir_tensors().unwrap() {
        assert!(data.iter().all(|v| v.is_finite()), "{name} is finite");
    }
    let line = moec_runtime::metrics::console_line(&records[0]);
    assert!(
        line.contains("scale ") && line.contains("skipped "),
        "{line}"
    );
}

/// `precision = f16`: kill and resume reproduces the uninterrupted run (the checkpoint keeps the
/// f32 weights and the loss scale's state), and a poisoned weight still stops the run with the
/// step and the kernel, as in f32: a non-finite loss is not something loss scaling can skip.
#[test]
fn f16_resume_is_exact_and_the_guard_still_names_the_kernel() {
    let gpu = gpu();
    let text = tiny_spec(
        8,
        "log = every(1)\n  checkpoint = every(4)\n  precision = f16",
    )
    .replace("balance = aux(0.01)", "balance = aux(0.01) + z(300)");
    let straight_dir = tempfile::tempdir().unwrap();
    let mut straight = trainer(&gpu, &text, straight_dir.path(), false).unwrap();
    let all = run(&mut straight, 8);
    assert!(
        all[0].skipped.unwrap() >= 1,
        "the resumed state includes a backed-off scale"
    );
    let dir = tempfile::tempdir().unwrap();
    let mut first = trainer(&gpu, &text, dir.path(), false).unwrap();
    run(&mut first, 6);
    drop(first);
    let mut resumed = trainer(&gpu, &text, dir.path(), true).unwrap();
    assert_eq!(resumed.step_count(), 4);
    let tail = run(&mut resumed, 8);
    for (a, b) in tail.iter().zip(&all[4..]) {
        assert_eq!(a.step, b.step);
        assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "step {}", a.step);
        assert_eq!((a.loss_scale, a.skipped), (b.loss_scale, b.skipped));
    }

    let good = std::fs::read(resumed.checkpoint_path()).unwrap();
    resumed
        .write_param("model.norm.weight", &[f32::NAN; 32])
        .unwrap();
    let err = run_until_error(&mut resumed);
    let message = err.to_string();
    assert!(matches!(err, TrainError::NonFinite { .. }), "{message}");
    assert!(message.contains("kernel `"), "names the kernel: {message}");
    assert_eq!(std::fs::read(resumed.checkpoint_path()).unwrap(), good);
}

fn run_until_error(t: &mut Trainer) -> TrainError {
    loop {
        if let Err(e) = t.step() {
            return e;
        }
    }
}
