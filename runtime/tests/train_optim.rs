//! The optimizer kernels against CPU references of the same formulas, on hand-made parameter and
//! gradient buffers (no plan): AdamW, SGD with and without momentum, schedule-free AdamW, Adafactor,
//! global-norm clipping, gradient accumulation, parameter groups (no decay on 1-D params, `expert_lr`,
//! `expert_lr = adaptive` with hand-set loads) and the non-finite flag; Shampoo and Muon against f64
//! references, and with `MOEC_OPTIM_DUMP=DIR` their runs dumped for the independent numpy reference
//! `scripts/optim_reference.py`.
//!
//! Tolerance: the CPU reference runs the kernels' f32 formulas in the same order; the GPU may fuse
//! multiply-adds, so values agree to |gpu - cpu| <= 1e-6 + 1e-5 |cpu| per element after 3 steps.

// The references index several parallel arrays by element, as the kernels do.
#![allow(clippy::needless_range_loop)]

use moec_compiler::spec::{AdamArgs, ExpertLr, Optimizer as OptimizerSpec, Schedule};
use moec_runtime::optim::{ExpertLoad, OptimSettings, Optimizer, ParamBinding};
use moec_runtime::{AdapterChoice, Gpu};
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};

const EXPERT: &str = "model.layers.0.block_sparse_moe.experts.w1";
/// Experts stacked in EXPERT.
const EXPERTS: usize = 2;

fn gpu() -> Gpu {
    Gpu::new(&AdapterChoice::default())
        .expect("a wgpu adapter (lavapipe: apt-get install mesa-vulkan-drivers)")
}

/// Parameters covering the groups: a 2-D weight (decays), a 1-D norm (no decay), a stacked expert
/// weight (decays, expert lr), and a router and an embedding (Muon hands both to its AdamW; tall and
/// preconditioned under Shampoo). 70·5 = 350 elements span two 256-wide workgroups; the weight is
/// tall and the experts wide, so Muon's iteration runs both ways (on Xᵀ and on X).
fn shapes() -> Vec<(&'static str, Vec<usize>)> {
    vec![
        ("model.layers.0.self_attn.q_proj.weight", vec![70, 5]),
        ("model.norm.weight", vec![37]),
        (EXPERT, vec![EXPERTS, 3, 50]),
        (
            "model.layers.0.block_sparse_moe.gate.weight",
            vec![EXPERTS, 6],
        ),
        ("model.embed_tokens.weight", vec![11, 4]),
    ]
}

struct Bench {
    gpu: Gpu,
    params: Vec<ParamBinding>,
    loss: wgpu::Buffer,
    ce: wgpu::Buffer,
}

fn bench() -> Bench {
    bench_on(gpu())
}

fn bench_on(gpu: Gpu) -> Bench {
    let params = shapes()
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            ParamBinding {
                name: name.to_string(),
                shape,
                param: gpu.storage_buffer(name, 4 * n as u64),
                grad: Some(gpu.storage_buffer("grad", 4 * n as u64)),
            }
        })
        .collect();
    let loss = gpu.storage_buffer("loss", 4);
    let ce = gpu.storage_buffer("ce", 4);
    gpu.queue
        .write_buffer(&loss, 0, bytemuck::cast_slice(&[2.5f32]));
    gpu.queue
        .write_buffer(&ce, 0, bytemuck::cast_slice(&[2.25f32]));
    Bench {
        gpu,
        params,
        loss,
        ce,
    }
}

fn random(n: usize, scale: f32, rng: &mut rand_chacha::ChaCha8Rng) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

fn settings(optimizer: OptimizerSpec) -> OptimSettings {
    OptimSettings {
        optimizer,
        expert_lr: Some(ExpertLr::Fixed(0.05)),
        schedule: Schedule::Linear { warmup: 2 },
        total_steps: 10,
        clip: None,
        accumulate: 1,
        loss_scaling: false,
    }
}

fn assert_close(name: &str, gpu: &[f32], cpu: &[f32]) {
    assert_eq!(gpu.len(), cpu.len(), "{name}");
    for (i, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        assert!(
            (g - c).abs() <= 1e-6 + 1e-5 * c.abs(),
            "{name}[{i}]: gpu {g} vs cpu {c}"
        );
    }
}

/// Per-parameter CPU state: weights and up to three state vectors (each as long as the weights unless
/// the reference resizes it; an empty one is a state the parameter must not have).
#[derive(Clone)]
struct Cpu {
    p: Vec<f32>,
    s: [Vec<f32>; 3],
}

/// Hand-set per-expert loads of the expert parameter's layer, by (step, micro-step).
type Loads = fn(usize, usize) -> Vec<f32>;

type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// What [`run_gpu`] did: the initial weights and every gradient it fed (`grads[step][param][micro]`),
/// the checkpoint tensors after each step (`after[step]`, the last one in `tensors`) and the stats
/// at the end.
struct GpuRun {
    init: Vec<Vec<f32>>,
    grads: Vec<Vec<Vec<Vec<f32>>>>,
    after: Vec<Tensors>,
    tensors: Tensors,
    stats: moec_runtime::optim::StepStats,
}

/// Runs `steps` optimizer steps on the GPU from random weights with fresh random gradients each
/// micro-step (and, with `loads`, the EXPERT layer's load written before each micro-step).
fn run_gpu(
    settings: &OptimSettings,
    steps: usize,
    grad_scale: f32,
    loads: Option<Loads>,
) -> GpuRun {
    run_gpu_on(bench(), settings, steps, grad_scale, loads)
}

/// [`run_gpu`] on the parameters of `b`.
fn run_gpu_on(
    b: Bench,
    settings: &OptimSettings,
    steps: usize,
    grad_scale: f32,
    loads: Option<Loads>,
) -> GpuRun {
    let load = b.gpu.storage_buffer("moe.0.load", 4 * EXPERTS as u64);
    let layers = [ExpertLoad {
        load: load.clone(),
        params: vec![EXPERT.to_string()],
    }];
    let mut optim =
        Optimizer::with_expert_loads(&b.gpu, settings, &b.params, &b.loss, &b.ce, &layers).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let init: Vec<Vec<f32>> = b
        .params
        .iter()
        .map(|p| random(p.shape.iter().product(), 1.0, &mut rng))
        .collect();
    let named: HashMap<String, Vec<f32>> = b
        .params
        .iter()
        .zip(&init)
        .map(|(p, w)| (p.name.clone(), w.clone()))
        .collect();
    optim.init(&named).unwrap();
    let mut all = Vec::with_capacity(steps);
    let mut after = Vec::with_capacity(steps);
    for step in 0..steps {
        optim.prepare_step(step);
        let mut grads: Vec<Vec<Vec<f32>>> = vec![Vec::new(); b.params.len()];
        for micro in 0..settings.accumulate {
            for (i, p) in b.params.iter().enumerate() {
                let g = random(p.shape.iter().product(), grad_scale, &mut rng);
                b.gpu
                    .queue
                    .write_buffer(p.grad.as_ref().unwrap(), 0, bytemuck::cast_slice(&g));
                grads[i].push(g);
            }
            if let Some(loads) = loads {
                b.gpu
                    .queue
                    .write_buffer(&load, 0, bytemuck::cast_slice(&loads(step, micro)));
            }
            optim.write_micro(micro);
            b.gpu
                .run_pass(|pass| {
                    optim.encode_micro(pass);
                    if micro + 1 == settings.accumulate {
                        optim.encode_update(pass);
                    }
                })
                .unwrap();
        }
        optim.finish_step().unwrap();
        all.push(grads);
        after.push(optim.checkpoint_tensors().unwrap().into_iter().collect());
    }
    GpuRun {
        init,
        grads: all,
        tensors: after.last().cloned().unwrap_or_default(),
        after,
        stats: optim.stats().unwrap(),
    }
}

/// Checkpoint name of parameter `i`'s state `suffix` ("" for the weights).
fn tensor_name(i: usize, suffix: &str) -> String {
    if suffix.is_empty() {
        shapes()[i].0.to_string()
    } else {
        format!("optim.{}.{suffix}", shapes()[i].0)
    }
}

/// Runs [`run_gpu`] and the same steps through `cpu_step(param index, step, grads of the
/// micro-steps, state)` on the CPU; compares weights and state (by checkpoint name:
/// `state_names[k]` is `s[k - 1]`, "" the weights) at the end.
fn run_and_compare(
    settings: &OptimSettings,
    steps: usize,
    grad_scale: f32,
    state_names: &[&str],
    loads: Option<Loads>,
    mut cpu_step: impl FnMut(usize, usize, &[Vec<f32>], &mut Cpu),
) -> moec_runtime::optim::StepStats {
    let run = run_gpu(settings, steps, grad_scale, loads);
    let mut cpu: Vec<Cpu> = run
        .init
        .iter()
        .map(|w| {
            let zeros = vec![0.0; w.len()];
            Cpu {
                s: [zeros.clone(), zeros.clone(), zeros],
                p: w.clone(),
            }
        })
        .collect();
    for (step, grads) in run.grads.iter().enumerate() {
        for (i, g) in grads.iter().enumerate() {
            cpu_step(i, step, g, &mut cpu[i]);
        }
    }
    for i in 0..cpu.len() {
        for (k, suffix) in state_names.iter().enumerate() {
            let name = tensor_name(i, suffix);
            let expected = if suffix.is_empty() {
                &cpu[i].p
            } else {
                &cpu[i].s[k - 1]
            };
            match run.tensors.get(&name) {
                Some((_, gpu)) => assert_close(&name, gpu, expected),
                None => assert!(expected.is_empty(), "no state `{name}` on the GPU"),
            }
        }
    }
    run.stats
}

/// The learning rate of parameter `i` at `step` as the optimizer computes it.
fn lr(settings: &OptimSettings, i: usize, step: usize) -> f64 {
    settings.lrs_at(step)[(shapes()[i].0 == EXPERT) as usize]
}

fn decay(i: usize, wd: f32) -> f32 {
    if shapes()[i].1.len() >= 2 {
        wd
    } else {
        0.0
    }
}

/// The sum of the micro-steps' gradients, in the GPU's order.
fn summed(grads: &[Vec<f32>]) -> Vec<f32> {
    let mut acc = grads[0].clone();
    for g in &grads[1..] {
        for (a, x) in acc.iter_mut().zip(g) {
            *a += x;
        }
    }
    acc
}

#[test]
fn adamw_matches_pytorch_formula() {
    let (b1, b2, eps, wd) = (0.9f64, 0.95f64, 1e-8f64, 0.1f64);
    let s = settings(OptimizerSpec::AdamW {
        lr: 0.01,
        betas: (b1, b2),
        eps,
        weight_decay: wd,
    });
    let stats = run_and_compare(&s, 3, 1.0, &["", "m", "v"], None, |i, step, grads, st| {
        let lr = lr(&s, i, step);
        let t = (step + 1) as i32;
        let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        let (step_size, bc2_sqrt) = ((lr / bc1) as f32, bc2.sqrt() as f32);
        let (lr, b1, b2, eps) = (lr as f32, b1 as f32, b2 as f32, eps as f32);
        for j in 0..st.p.len() {
            let g = grads[0][j];
            let p = st.p[j] * (1.0 - lr * decay(i, wd as f32));
            let m = st.s[0][j] + (1.0 - b1) * (g - st.s[0][j]);
            let v = st.s[1][j] * b2 + (1.0 - b2) * g * g;
            st.s[0][j] = m;
            st.s[1][j] = v;
            st.p[j] = p - step_size * (m / ((v.sqrt() / bc2_sqrt) + eps));
        }
    });
    assert_eq!(stats.bad_step, None);
    assert_eq!(stats.clip_scale, 1.0);
    assert!(
        (stats.loss - 2.5).abs() < 1e-7 && (stats.ce - 2.25).abs() < 1e-7,
        "{stats:?}"
    );
}

#[test]
fn sgd_momentum_matches_pytorch_formula() {
    let s = settings(OptimizerSpec::Sgd {
        lr: 0.1,
        momentum: 0.9,
    });
    run_and_compare(
        &s,
        3,
        1.0,
        &["", "momentum_buffer"],
        None,
        |i, step, grads, st| {
            let lr = lr(&s, i, step) as f32;
            for j in 0..st.p.len() {
                let buf = 0.9 * st.s[0][j] + grads[0][j];
                st.s[0][j] = buf;
                st.p[j] -= lr * buf;
            }
        },
    );
}

#[test]
fn sgd_without_momentum_has_no_state() {
    let s = settings(OptimizerSpec::Sgd {
        lr: 0.1,
        momentum: 0.0,
    });
    run_and_compare(&s, 2, 1.0, &[""], None, |i, step, grads, st| {
        let lr = lr(&s, i, step) as f32;
        for j in 0..st.p.len() {
            st.p[j] -= lr * grads[0][j];
        }
    });
    let b = bench();
    let optim = Optimizer::new(&b.gpu, &s, &b.params, &b.loss, &b.ce).unwrap();
    assert_eq!(
        optim.checkpoint_tensors().unwrap().len(),
        shapes().len(),
        "weights only"
    );
}

#[test]
fn schedule_free_adamw_matches_the_schedulefree_package() {
    let (b1, b2, eps, wd) = (0.9f64, 0.999f64, 1e-8f64, 0.05f64);
    let s = settings(OptimizerSpec::ScheduleFreeAdamW {
        lr: 0.02,
        betas: (b1, b2),
        eps,
        weight_decay: wd,
    });
    // Running lr maximum and weight sum per group, as AdamWScheduleFree keeps per param group.
    let mut lr_max = [0.0f64; 2];
    let mut weight_sum = [0.0f64; 2];
    let mut last_step = [usize::MAX; 2];
    let mut ck = [0.0f64; 2];
    // Checkpoint layout: weights = x; optim.<name>.y is the gradient point (the param buffer).
    run_and_compare(
        &s,
        3,
        1.0,
        &["", "z", "v", "y"],
        None,
        |i, step, grads, st| {
            let group = (shapes()[i].0 == EXPERT) as usize;
            let t = (step + 1) as i32;
            let lr = lr(&s, i, step) * (1.0 - b2.powi(t)).sqrt();
            if last_step[group] != step {
                last_step[group] = step;
                lr_max[group] = lr_max[group].max(lr);
                let weight = lr_max[group] * lr_max[group];
                weight_sum[group] += weight;
                ck[group] = weight / weight_sum[group];
            }
            let (lr, c, b1, b2, eps) = (
                lr as f32,
                ck[group] as f32,
                b1 as f32,
                b2 as f32,
                eps as f32,
            );
            // st.p = x (the weights), s[0] = z, s[1] = v, s[2] = y; z and y start at the weights.
            if step == 0 {
                st.s[0] = st.p.clone();
                st.s[2] = st.p.clone();
            }
            for j in 0..st.p.len() {
                let g = grads[0][j];
                let v = st.s[1][j] * b2 + (1.0 - b2) * g * g;
                let gn = g / (v.sqrt() + eps) + decay(i, wd as f32) * st.s[2][j];
                let z = st.s[0][j] - lr * gn;
                let x = st.p[j] + c * (z - st.p[j]);
                st.s[1][j] = v;
                st.s[0][j] = z;
                st.p[j] = x;
                st.s[2][j] = (1.0 - b1) * z + b1 * x;
            }
        },
    );
}

#[test]
fn clip_scales_by_the_global_norm() {
    let mut s = settings(OptimizerSpec::Sgd {
        lr: 0.1,
        momentum: 0.0,
    });
    s.schedule = Schedule::Constant;
    s.expert_lr = None;
    s.clip = Some(0.5);
    let b = bench();
    let mut optim = Optimizer::new(&b.gpu, &s, &b.params, &b.loss, &b.ce).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let init: HashMap<String, Vec<f32>> = b
        .params
        .iter()
        .map(|p| {
            (
                p.name.clone(),
                random(p.shape.iter().product(), 1.0, &mut rng),
            )
        })
        .collect();
    optim.init(&init).unwrap();
    let grads: Vec<Vec<f32>> = b
        .params
        .iter()
        .map(|p| random(p.shape.iter().product(), 2.0, &mut rng))
        .collect();
    for (p, g) in b.params.iter().zip(&grads) {
        b.gpu
            .queue
            .write_buffer(p.grad.as_ref().unwrap(), 0, bytemuck::cast_slice(g));
    }
    optim.prepare_step(0);
    optim.write_micro(0);
    b.gpu
        .run_pass(|pass| {
            optim.encode_micro(pass);
            optim.encode_update(pass);
        })
        .unwrap();
    let stats = optim.stats().unwrap();
    let norm = grads
        .iter()
        .flatten()
        .map(|&g| g as f64 * g as f64)
        .sum::<f64>()
        .sqrt() as f32;
    let scale = (0.5 / (norm + 1e-6)).min(1.0);
    assert!(
        (stats.grad_norm - norm).abs() <= 1e-5 * norm,
        "norm {} vs {norm}",
        stats.grad_norm
    );
    assert!(
        (stats.clip_scale - scale).abs() <= 1e-6 * scale,
        "scale {} vs {scale}",
        stats.clip_scale
    );
    assert!(
        scale < 0.1,
        "gradients of norm {norm} must be clipped to 0.5"
    );
    let tensors: BTreeMap<_, _> = optim.checkpoint_tensors().unwrap().into_iter().collect();
    for (p, g) in b.params.iter().zip(&grads) {
        let expected: Vec<f32> = init[&p.name]
            .iter()
            .zip(g)
            .map(|(w, g)| w - 0.1 * (g * stats.clip_scale))
            .collect();
        assert_close(&p.name, &tensors[&p.name].1, &expected);
    }
}

#[test]
fn accumulation_sums_the_micro_step_gradients() {
    let mut s = settings(OptimizerSpec::Sgd {
        lr: 0.1,
        momentum: 0.5,
    });
    s.accumulate = 3;
    let stats = run_and_compare(
        &s,
        2,
        1.0,
        &["", "momentum_buffer"],
        None,
        |i, step, grads, st| {
            let lr = lr(&s, i, step) as f32;
            let g = summed(grads);
            for j in 0..st.p.len() {
                let buf = 0.5 * st.s[0][j] + g[j];
                st.s[0][j] = buf;
                st.p[j] -= lr * buf;
            }
        },
    );
    // The tracked loss is the mean over micro-steps (each micro-step's loss is 2.5 here).
    assert!((stats.loss - 2.5).abs() < 1e-6, "{stats:?}");
}

#[test]
fn a_non_finite_gradient_stops_every_update() {
    let s = settings(OptimizerSpec::AdamW {
        lr: 0.01,
        betas: (0.9, 0.999),
        eps: 1e-8,
        weight_decay: 0.0,
    });
    let b = bench();
    let mut optim = Optimizer::new(&b.gpu, &s, &b.params, &b.loss, &b.ce).unwrap();
    let init: HashMap<String, Vec<f32>> = b
        .params
        .iter()
        .map(|p| (p.name.clone(), vec![1.0; p.shape.iter().product()]))
        .collect();
    optim.init(&init).unwrap();
    for step in 0..3 {
        optim.prepare_step(step);
        for (i, p) in b.params.iter().enumerate() {
            let mut g = vec![0.5f32; p.shape.iter().product()];
            if step == 1 && i == 2 {
                g[7] = f32::NAN;
            }
            b.gpu
                .queue
                .write_buffer(p.grad.as_ref().unwrap(), 0, bytemuck::cast_slice(&g));
        }
        optim.write_micro(0);
        b.gpu
            .run_pass(|pass| {
                optim.encode_micro(pass);
                optim.encode_update(pass);
            })
            .unwrap();
        if step == 0 {
            let after_first: BTreeMap<_, _> =
                optim.checkpoint_tensors().unwrap().into_iter().collect();
            assert!(
                after_first[&b.params[0].name].1[0] < 1.0,
                "the first step updates"
            );
        }
    }
    let stats = optim.stats().unwrap();
    assert_eq!(stats.bad_step, Some(1), "{stats:?}");
    // The flag is sticky: step 2's gradients were finite again, yet nothing was updated after step 0.
    assert!(stats.grad_norm.is_finite());
    // Weights after step 0: 1 - lr (Adam's first step moves by lr against the gradient's sign).
    let tensors: BTreeMap<_, _> = optim.checkpoint_tensors().unwrap().into_iter().collect();
    for p in &b.params {
        for &w in &tensors[&p.name].1 {
            let expected = 1.0 - s.lrs_at(0)[(p.name == EXPERT) as usize] as f32;
            assert!((w - expected).abs() < 1e-6, "{}: {w} vs {expected}", p.name);
        }
    }
}

/// One Adafactor step of HF transformers' formula (module docs of `moec_runtime::optim`) on the CPU,
/// in f32 and in the kernels' order. `st.s` holds exp_avg_sq_row, exp_avg_sq_col (matrices) or
/// exp_avg_sq (vectors) and is sized on the first step; `lr(j)` is element j's learning rate.
fn adafactor_cpu(
    shape: &[usize],
    beta2t: f32,
    eps: f32,
    g: &[f32],
    st: &mut Cpu,
    lr: impl Fn(usize) -> f32,
) {
    let ema = |old: f32, sum: f32, len: usize| beta2t * old + (1.0 - beta2t) * (sum / len as f32);
    let sq = |x: f32| x * x + eps;
    if shape.len() < 2 {
        if st.s[2].len() != g.len() || !st.s[0].is_empty() {
            st.s = [Vec::new(), Vec::new(), vec![0.0; g.len()]];
        }
        let v = &mut st.s[2];
        let mut u: Vec<f32> = Vec::with_capacity(g.len());
        for j in 0..g.len() {
            v[j] = ema(v[j], sq(g[j]), 1);
            u.push((1.0 / v[j].sqrt()) * g[j]);
        }
        let rms = u.iter().map(|x| x * x).sum::<f32>().sqrt() / (g.len() as f32).sqrt();
        for j in 0..g.len() {
            st.p[j] -= lr(j) * (u[j] / rms.max(1.0));
        }
        return;
    }
    let (rows, cols) = (shape[shape.len() - 2], shape[shape.len() - 1]);
    let matrices = g.len() / (rows * cols);
    if st.s[0].len() != matrices * rows {
        st.s = [
            vec![0.0; matrices * rows],
            vec![0.0; matrices * cols],
            Vec::new(),
        ];
    }
    for m in 0..matrices {
        let at = |i: usize, j: usize| m * rows * cols + i * cols + j;
        for i in 0..rows {
            let sum: f32 = (0..cols).map(|j| sq(g[at(i, j)])).sum();
            st.s[0][m * rows + i] = ema(st.s[0][m * rows + i], sum, cols);
        }
        for j in 0..cols {
            let sum: f32 = (0..rows).map(|i| sq(g[at(i, j)])).sum();
            st.s[1][m * cols + j] = ema(st.s[1][m * cols + j], sum, rows);
        }
        let rmean = st.s[0][m * rows..(m + 1) * rows].iter().sum::<f32>() / rows as f32;
        let mut u = vec![0.0f32; rows * cols];
        for i in 0..rows {
            for j in 0..cols {
                let r = st.s[0][m * rows + i];
                let c = st.s[1][m * cols + j];
                u[i * cols + j] = (1.0 / (r / rmean).sqrt()) * (1.0 / c.sqrt()) * g[at(i, j)];
            }
        }
        let rms = u.iter().map(|x| x * x).sum::<f32>().sqrt() / ((rows * cols) as f32).sqrt();
        for (t, u) in u.iter().enumerate() {
            let j = m * rows * cols + t;
            st.p[j] -= lr(j) * (u / rms.max(1.0));
        }
    }
}

const ADAFACTOR_STATE: [&str; 4] = ["", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"];

#[test]
fn adafactor_matches_the_hf_formula() {
    let (decay, eps) = (-0.8f64, 1e-30f64);
    let s = settings(OptimizerSpec::Adafactor {
        lr: 0.01,
        decay,
        eps,
    });
    // A 2-D weight, a 1-D norm (full second moment) and a stacked [2, 3, 50] expert weight (two
    // factored matrices, each clipped on its own), over 3 steps: beta2t = 0, then 1 - 2^-0.8, ...
    let stats = run_and_compare(&s, 3, 1.0, &ADAFACTOR_STATE, None, |i, step, grads, st| {
        let lr = lr(&s, i, step) as f32;
        let beta2t = (1.0 - ((step + 1) as f64).powf(decay)) as f32;
        adafactor_cpu(&shapes()[i].1, beta2t, eps as f32, &grads[0], st, |_| lr);
    });
    assert_eq!(stats.bad_step, None);
    // The state shapes are HF's: rows [E, R], columns [E, C].
    let b = bench();
    let optim = Optimizer::new(&b.gpu, &s, &b.params, &b.loss, &b.ce).unwrap();
    let shapes: BTreeMap<String, Vec<usize>> = optim
        .checkpoint_tensors()
        .unwrap()
        .into_iter()
        .map(|(n, (shape, _))| (n, shape))
        .collect();
    assert_eq!(shapes[&format!("optim.{EXPERT}.exp_avg_sq_row")], [2, 3]);
    assert_eq!(shapes[&format!("optim.{EXPERT}.exp_avg_sq_col")], [2, 50]);
    assert_eq!(shapes["optim.model.norm.weight.exp_avg_sq"], [37]);
}

#[test]
fn adafactor_clips_the_update_rms() {
    // Tiny gradients: g / sqrt(EMA(g²)) is O(1) whatever the scale, so the clip still bites, and
    // accumulation over 2 micro-steps feeds the summed gradient.
    let mut s = settings(OptimizerSpec::Adafactor {
        lr: 0.05,
        decay: -0.8,
        eps: 1e-30,
    });
    s.accumulate = 2;
    run_and_compare(&s, 2, 1e-3, &ADAFACTOR_STATE, None, |i, step, grads, st| {
        let lr = lr(&s, i, step) as f32;
        let beta2t = (1.0 - ((step + 1) as f64).powf(-0.8)) as f32;
        adafactor_cpu(&shapes()[i].1, beta2t, 1e-30, &summed(grads), st, |_| lr);
    });
}

/// Per-expert loads by (step, micro-step): step 0 sums to [5, 0] (multipliers 0.5 and the cap
/// E = 2 for the idle expert), step 1 to [2, 4] (1.5, 0.75), step 2 to [0, 0] (no load: 1, 1).
fn hand_set_loads(step: usize, micro: usize) -> Vec<f32> {
    match (step, micro) {
        (0, 0) => vec![3.0, 0.0],
        (0, _) => vec![2.0, 0.0],
        (1, 0) => vec![1.0, 3.0],
        (1, _) => vec![1.0, 1.0],
        _ => vec![0.0, 0.0],
    }
}

/// The multiplier of expert e at `step` for [`hand_set_loads`], computed as the kernel does.
fn multiplier(step: usize, e: usize) -> f32 {
    let (a, b) = (hand_set_loads(step, 0), hand_set_loads(step, 1));
    let sum: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    let mean = sum.iter().sum::<f32>() / EXPERTS as f32;
    if mean > 0.0 {
        mean / sum[e].max(mean / EXPERTS as f32)
    } else {
        1.0
    }
}

/// Element j's lr multiplier under `expert_lr = adaptive`: its expert's for the expert parameter
/// (slice e of the stack is expert e), 1 elsewhere.
fn element_multiplier(i: usize, step: usize, j: usize) -> f32 {
    let (name, shape) = &shapes()[i];
    if *name == EXPERT {
        multiplier(step, j / (shape[1] * shape[2]))
    } else {
        1.0
    }
}

/// Element j's learning rate under `expert_lr = adaptive`: the group lr times its multiplier.
fn adaptive_lr(s: &OptimSettings, i: usize, step: usize, j: usize) -> f32 {
    lr(s, i, step) as f32 * element_multiplier(i, step, j)
}

#[test]
fn adaptive_expert_lr_scales_each_expert_by_mean_load_over_its_load() {
    assert_eq!(
        [
            multiplier(0, 0),
            multiplier(0, 1),
            multiplier(1, 0),
            multiplier(1, 1)
        ],
        [0.5, 2.0, 1.5, 0.75]
    );
    let mut s = settings(OptimizerSpec::Sgd {
        lr: 0.1,
        momentum: 0.0,
    });
    s.expert_lr = Some(ExpertLr::Adaptive { base: 0.05 });
    s.accumulate = 2;
    // Plain SGD: each expert slice moves by exactly -(its scaled lr) · (summed gradient).
    run_and_compare(
        &s,
        3,
        1.0,
        &[""],
        Some(hand_set_loads),
        |i, step, grads, st| {
            let g = summed(grads);
            for j in 0..st.p.len() {
                st.p[j] -= adaptive_lr(&s, i, step, j) * g[j];
            }
        },
    );
    // AdamW: the multiplier scales both the step size and the decoupled decay.
    let (b1, b2, eps, wd) = (0.9f64, 0.95f64, 1e-8f64, 0.1f64);
    s.optimizer = OptimizerSpec::AdamW {
        lr: 0.01,
        betas: (b1, b2),
        eps,
        weight_decay: wd,
    };
    run_and_compare(
        &s,
        3,
        1.0,
        &["", "m", "v"],
        Some(hand_set_loads),
        |i, step, grads, st| {
            let base = lr(&s, i, step);
            let t = (step + 1) as i32;
            let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
            let (step_size, bc2_sqrt) = ((base / bc1) as f32, bc2.sqrt() as f32);
            let (b1, b2, eps) = (b1 as f32, b2 as f32, eps as f32);
            let g = summed(grads);
            for j in 0..st.p.len() {
                let scale = element_multiplier(i, step, j);
                let lr = base as f32 * scale;
                let p = st.p[j] * (1.0 - lr * decay(i, wd as f32));
                let m = st.s[0][j] + (1.0 - b1) * (g[j] - st.s[0][j]);
                let v = st.s[1][j] * b2 + (1.0 - b2) * g[j] * g[j];
                st.s[0][j] = m;
                st.s[1][j] = v;
                st.p[j] = p - step_size * scale * (m / ((v.sqrt() / bc2_sqrt) + eps));
            }
        },
    );
    // Adafactor: the clipped update times the scaled lr.
    s.optimizer = OptimizerSpec::Adafactor {
        lr: 0.01,
        decay: -0.8,
        eps: 1e-30,
    };
    run_and_compare(
        &s,
        3,
        1.0,
        &ADAFACTOR_STATE,
        Some(hand_set_loads),
        |i, step, grads, st| {
            let beta2t = (1.0 - ((step + 1) as f64).powf(-0.8)) as f32;
            adafactor_cpu(&shapes()[i].1, beta2t, 1e-30, &summed(grads), st, |j| {
                adaptive_lr(&s, i, step, j)
            });
        },
    );
}

#[test]
fn adaptive_expert_lr_needs_the_layer_load() {
    let b = bench();
    let mut s = settings(OptimizerSpec::Sgd {
        lr: 0.1,
        momentum: 0.0,
    });
    s.expert_lr = Some(ExpertLr::Adaptive { base: 0.1 });
    let err = Optimizer::new(&b.gpu, &s, &b.params, &b.loss, &b.ce)
        .err()
        .expect("no load output for the expert parameter");
    assert!(
        err.to_string().contains(EXPERT) && err.to_string().contains("moe.N.load"),
        "{err}"
    );
}

// ------------------------------------------------------------------ Shampoo and Muon, f64 references

/// f64 reference state of one parameter: weights and state tensors by checkpoint suffix.
#[derive(Clone, Default)]
struct Ref64 {
    p: Vec<f64>,
    s: BTreeMap<&'static str, Vec<f64>>,
}

impl Ref64 {
    /// State `name`, created as `len` zeros on first use.
    fn state(&mut self, name: &'static str, len: usize) -> &mut Vec<f64> {
        self.s.entry(name).or_insert_with(|| vec![0.0; len])
    }
}

/// `(matrices, rows, cols)` of a shape with two or more axes (leading axes stack matrices).
fn matrix_view(shape: &[usize]) -> (usize, usize, usize) {
    let n = shape.len();
    (shape[..n - 2].iter().product(), shape[n - 2], shape[n - 1])
}

/// `a` (n × k) times `b` (k × m), row-major.
fn matmul(a: &[f64], b: &[f64], n: usize, k: usize, m: usize) -> Vec<f64> {
    let mut out = vec![0.0; n * m];
    for i in 0..n {
        for j in 0..m {
            out[i * m + j] = (0..k).map(|q| a[i * k + q] * b[q * m + j]).sum();
        }
    }
    out
}

/// The transpose of `a` (r × c), row-major.
fn transpose(a: &[f64], r: usize, c: usize) -> Vec<f64> {
    (0..r * c).map(|q| a[(q % r) * c + q / r]).collect()
}

fn frobenius(a: &[f64]) -> f64 {
    a.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// Runs [`run_gpu`] and, on the same gradients, `reference(param, step, gradient, state)` in f64:
/// the gradient is the sum of the micro-steps', times the global-norm clip scale under `clip`.
/// Compares every tensor of `compare` ("" = the weights) that the GPU checkpoint holds with
/// |gpu − ref| ≤ atol + rtol·|ref|; one the GPU does not hold must not exist in the reference.
fn compare_f64(
    settings: &OptimSettings,
    steps: usize,
    loads: Option<Loads>,
    compare: &[&str],
    (atol, rtol): (f64, f64),
    mut reference: impl FnMut(usize, usize, &[f64], &mut Ref64),
) -> GpuRun {
    let run = run_gpu(settings, steps, 1.0, loads);
    let mut refs: Vec<Ref64> = run
        .init
        .iter()
        .map(|w| Ref64 {
            p: w.iter().map(|&x| x as f64).collect(),
            ..Ref64::default()
        })
        .collect();
    for (step, grads) in run.grads.iter().enumerate() {
        let summed: Vec<Vec<f64>> = grads
            .iter()
            .map(|micro| {
                (0..micro[0].len())
                    .map(|j| micro.iter().map(|g| g[j] as f64).sum())
                    .collect()
            })
            .collect();
        let norm = summed
            .iter()
            .map(|g| frobenius(g).powi(2))
            .sum::<f64>()
            .sqrt();
        let scale = settings.clip.map_or(1.0, |c| (c / (norm + 1e-6)).min(1.0));
        for (i, g) in summed.iter().enumerate() {
            let g: Vec<f64> = g.iter().map(|x| x * scale).collect();
            reference(i, step, &g, &mut refs[i]);
        }
    }
    for (i, r) in refs.iter().enumerate() {
        for suffix in compare {
            let name = tensor_name(i, suffix);
            let expected = if suffix.is_empty() {
                Some(&r.p)
            } else {
                r.s.get(suffix)
            };
            match (run.tensors.get(&name), expected) {
                (Some((_, gpu)), Some(cpu)) => {
                    assert_eq!(gpu.len(), cpu.len(), "{name}");
                    for (j, (g, c)) in gpu.iter().zip(cpu).enumerate() {
                        assert!(
                            (*g as f64 - c).abs() <= atol + rtol * c.abs(),
                            "{name}[{j}]: gpu {g} vs f64 {c}"
                        );
                    }
                }
                (None, None) => {}
                (gpu, _) => panic!(
                    "`{name}`: on the GPU {}, in the reference {}",
                    gpu.is_some(),
                    expected.is_some()
                ),
            }
        }
    }
    run
}

/// The arguments of Shampoo or Muon as [`dump`] writes them (the lr goes per step and group).
fn optimizer_json(optimizer: &OptimizerSpec) -> serde_json::Value {
    use serde_json::json;
    match *optimizer {
        OptimizerSpec::Shampoo {
            betas,
            eps,
            decay,
            root_every,
            max_dim,
            weight_decay,
            ..
        } => json!({"name": "shampoo", "betas": betas, "eps": eps, "decay": decay,
            "root_every": root_every, "max_dim": max_dim, "weight_decay": weight_decay}),
        OptimizerSpec::Muon {
            momentum,
            nesterov,
            ns_steps,
            weight_decay,
            adamw,
            ..
        } => json!({"name": "muon", "momentum": momentum, "nesterov": nesterov,
            "ns_steps": ns_steps, "weight_decay": weight_decay,
            "adamw": {"betas": adamw.betas, "eps": adamw.eps, "weight_decay": adamw.weight_decay}}),
        ref other => panic!("no numpy reference for {other:?}"),
    }
}

/// With `MOEC_OPTIM_DUMP=DIR` set, writes `DIR/<label>.json` for the independent numpy reference
/// `scripts/optim_reference.py`: the optimizer's arguments, each step's learning rates by group
/// (`[group, experts, adamw]`, Muon's nested AdamW last), the parameters (name, shape, initial
/// weights), each step's gradients (one per micro-step) and every checkpoint tensor after each step.
/// f32 values are written in their shortest round-trip form, so the script reads them exactly.
fn dump(label: &str, s: &OptimSettings, run: &GpuRun) {
    let Some(dir) = std::env::var_os("MOEC_OPTIM_DUMP") else {
        return;
    };
    use serde_json::json;
    let optimizer = optimizer_json(&s.optimizer);
    assert!(
        s.clip.is_none() && !matches!(s.expert_lr, Some(ExpertLr::Adaptive { .. })),
        "the numpy reference takes neither clip nor adaptive expert lr"
    );
    let lrs: Vec<[f64; 3]> = (0..run.grads.len())
        .map(|step| {
            let [group, experts] = s.lrs_at(step);
            [group, experts, s.adam_lr_at(step)]
        })
        .collect();
    let params: Vec<_> = shapes()
        .iter()
        .zip(&run.init)
        .map(|((name, shape), init)| json!({"name": name, "shape": shape, "init": init}))
        .collect();
    let after: Vec<BTreeMap<&String, &Vec<f32>>> = run
        .after
        .iter()
        .map(|t| t.iter().map(|(name, (_, data))| (name, data)).collect())
        .collect();
    let out = json!({"optimizer": optimizer, "lr": lrs, "params": params, "grads": run.grads,
        "after": after});
    let path = std::path::Path::new(&dir).join(format!("{label}.json"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(&path, out.to_string()).unwrap();
}

/// One AdamW step in f64 as docs/language.md writes Shampoo's fallback: W ← W − lr·(A + wd·W), A =
/// m̂/(√v̂ + eps); `lr(j)` is element j's learning rate.
fn adam64(
    st: &mut Ref64,
    g: &[f64],
    t: i32,
    (b1, b2, eps, wd): (f64, f64, f64, f64),
    lr: impl Fn(usize) -> f64,
) -> Vec<f64> {
    let n = g.len();
    let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
    let mut a = vec![0.0; n];
    for j in 0..n {
        let m = b1 * st.state("m", n)[j] + (1.0 - b1) * g[j];
        let v = b2 * st.state("v", n)[j] + (1.0 - b2) * g[j] * g[j];
        st.state("m", n)[j] = m;
        st.state("v", n)[j] = v;
        a[j] = (m / bc1) / ((v / bc2).sqrt() + eps);
    }
    for j in 0..n {
        st.p[j] -= lr(j) * (a[j] + wd * st.p[j]);
    }
    a
}

/// The learning-rate multiplier of element j of parameter i at `step`: the hand-set loads' under
/// `expert_lr = adaptive`, else 1.
fn multiplier64(s: &OptimSettings, i: usize, step: usize, j: usize) -> f64 {
    match s.expert_lr {
        Some(ExpertLr::Adaptive { .. }) => element_multiplier(i, step, j) as f64,
        _ => 1.0,
    }
}

const NS: (f64, f64, f64) = (3.4445, -4.7750, 2.0315);

/// docs/language.md's quintic Newton–Schulz in f64 on a rows × cols matrix: X₀ = U/(‖U‖_F + 1e-7),
/// transposed when rows > cols, `steps` times X ← aX + b(XXᵀ)X + c(XXᵀ)²X.
fn newton_schulz(u: &[f64], rows: usize, cols: usize, steps: usize) -> Vec<f64> {
    let t = rows > cols;
    let (r, c) = if t { (cols, rows) } else { (rows, cols) };
    let norm = frobenius(u);
    let mut x: Vec<f64> = if t {
        transpose(u, rows, cols)
    } else {
        u.to_vec()
    };
    for v in &mut x {
        *v /= norm + 1e-7;
    }
    for _ in 0..steps {
        let a = matmul(&x, &transpose(&x, r, c), r, c, r);
        let aa = matmul(&a, &a, r, r, r);
        let b: Vec<f64> = a
            .iter()
            .zip(&aa)
            .map(|(a, aa)| NS.1 * a + NS.2 * aa)
            .collect();
        let bx = matmul(&b, &x, r, r, c);
        x = x.iter().zip(&bx).map(|(x, bx)| NS.0 * x + bx).collect();
    }
    if t {
        transpose(&x, r, c)
    } else {
        x
    }
}

/// Muon in f64 (docs/language.md) for parameter i of [`shapes`]: the weight and the expert stack
/// are hidden matrices; the norm, router and embedding take the nested AdamW (its lr group, its own
/// decay, none for the norm).
fn muon64(s: &OptimSettings, i: usize, step: usize, g: &[f64], st: &mut Ref64) {
    let OptimizerSpec::Muon {
        momentum: mu,
        nesterov,
        ns_steps,
        weight_decay,
        adamw,
        ..
    } = s.optimizer
    else {
        unreachable!()
    };
    let (name, shape) = &shapes()[i];
    let group = lr(s, i, step);
    if !moec_runtime::optim::is_hidden_matrix(name, shape) {
        let wd = decay(i, adamw.weight_decay as f32) as f64;
        let a = (adamw.betas.0, adamw.betas.1, adamw.eps, wd);
        adam64(st, g, step as i32 + 1, a, |_| s.adam_lr_at(step));
        return;
    }
    let (mats, rows, cols) = matrix_view(shape);
    let size = rows * cols;
    let scale = 0.2 * (rows.max(cols) as f64).sqrt();
    for m in 0..mats {
        let buf = st.state("momentum_buffer", g.len());
        let mut u = vec![0.0; size];
        for t in 0..size {
            let j = m * size + t;
            buf[j] = mu * buf[j] + g[j];
            u[t] = if nesterov { g[j] + mu * buf[j] } else { buf[j] };
        }
        let o = newton_schulz(&u, rows, cols, ns_steps);
        for t in 0..size {
            let j = m * size + t;
            let lr = group * multiplier64(s, i, step, j);
            st.p[j] -= lr * (scale * o[t] + weight_decay * st.p[j]);
        }
    }
}

fn muon(nesterov: bool) -> OptimizerSpec {
    OptimizerSpec::Muon {
        lr: 0.02,
        momentum: 0.95,
        nesterov,
        ns_steps: 5,
        weight_decay: 0.1,
        adamw: AdamArgs {
            lr: 0.01,
            betas: (0.9, 0.95),
            eps: 1e-8,
            weight_decay: 0.05,
        },
    }
}

/// Muon against f64: momentum and Newton–Schulz (f32 on the GPU) agree to 1e-6 + 1e-5·|ref|.
const MUON_TOL: (f64, f64) = (1e-6, 1e-5);
const MUON_STATE: [&str; 4] = ["", "momentum_buffer", "m", "v"];

#[test]
fn muon_matches_an_f64_reference() {
    // [70, 5] runs the transposed iteration (on Xᵀ), each [3, 50] expert the iteration as is; the
    // norm, router and embedding take AdamW. A warmup schedule and a fixed expert lr, 3 steps.
    // `MOEC_OPTIM_DUMP=DIR` also writes the run for scripts/optim_reference.py.
    let s = settings(muon(true));
    let run = compare_f64(&s, 3, None, &MUON_STATE, MUON_TOL, |i, step, g, st| {
        muon64(&s, i, step, g, st)
    });
    dump("muon", &s, &run);
}

#[test]
fn muon_with_accumulation_clip_and_adaptive_expert_lr() {
    let mut s = settings(muon(false));
    s.accumulate = 2;
    s.clip = Some(5.0);
    s.expert_lr = Some(ExpertLr::Adaptive { base: 0.05 });
    compare_f64(
        &s,
        3,
        Some(hand_set_loads),
        &MUON_STATE,
        MUON_TOL,
        |i, step, g, st| muon64(&s, i, step, g, st),
    );
}

/// φ(σ) = aσ + bσ³ + cσ⁵: what one quintic iteration does to each singular value.
fn quintic(x: f64) -> f64 {
    NS.0 * x + NS.1 * x.powi(3) + NS.2 * x.powi(5)
}

#[test]
fn muon_orthogonalises_within_the_quintic_band() {
    // One step, lr 1 and no decay, so W0 − W1 = 0.2·√max(rows, cols)·O: O's singular values must be
    // φ⁵ of X₀'s (X₀ = U/‖U‖_F, U = (1 + momentum)·G on the first Nesterov step), and all lie in the
    // band φ⁵ maps X₀'s singular value range to; the update's RMS is 0.2 × their RMS.
    let mut s = settings(OptimizerSpec::Muon {
        lr: 1.0,
        momentum: 0.95,
        nesterov: true,
        ns_steps: 5,
        weight_decay: 0.0,
        adamw: AdamArgs {
            lr: 1.0,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
        },
    });
    s.schedule = Schedule::Constant;
    s.expert_lr = None;
    let run = run_gpu(&s, 1, 1.0, None);
    for i in [0, 2] {
        let (name, shape) = &shapes()[i];
        let (mats, rows, cols) = matrix_view(shape);
        let size = rows * cols;
        let after = &run.tensors[*name].1;
        let scale = 0.2 * (rows.max(cols) as f64).sqrt();
        for m in 0..mats {
            let range = m * size..(m + 1) * size;
            let g = &run.grads[0][i][0][range.clone()];
            let delta: Vec<f64> = range
                .clone()
                .map(|j| run.init[i][j] as f64 - after[j] as f64)
                .collect();
            let o = nalgebra::DMatrix::from_row_slice(rows, cols, &delta) / scale;
            let g = nalgebra::DMatrix::from_row_iterator(rows, cols, g.iter().map(|&x| x as f64));
            let mut before: Vec<f64> = g.singular_values().iter().map(|x| x / g.norm()).collect();
            let mut got: Vec<f64> = o.singular_values().iter().copied().collect();
            before.sort_by(f64::total_cmp);
            got.sort_by(f64::total_cmp);
            let phi5 = |x: f64| (0..5).fold(x, |x, _| quintic(x));
            // The band: φ⁵ over [σ_min, σ_max] of X₀, sampled finely.
            let (lo, hi) = (0..=10_000)
                .map(|k| phi5(before[0] + (before[before.len() - 1] - before[0]) * k as f64 / 1e4))
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), y| {
                    (lo.min(y), hi.max(y))
                });
            // Monotone order is not preserved by φ⁵, so compare the sorted images.
            let mut expected: Vec<f64> = before.iter().map(|&x| phi5(x)).collect();
            expected.sort_by(f64::total_cmp);
            for (k, (got, want)) in got.iter().zip(&expected).enumerate() {
                assert!(
                    (got - want).abs() < 1e-4,
                    "{name}[{m}] σ{k}: {got} vs φ⁵ {want}"
                );
                assert!(
                    (lo - 1e-4..=hi + 1e-4).contains(got),
                    "{name}[{m}] σ{k} = {got} outside the quintic band [{lo}, {hi}]"
                );
            }
            assert!(
                lo > 0.6 && hi < 1.25,
                "band [{lo}, {hi}] for X₀ σ in {before:?}"
            );
            let rms = |x: &[f64]| (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64).sqrt();
            let want = 0.2 * rms(&got);
            let update = rms(&delta);
            assert!(
                (update - want).abs() < 1e-5 * want.max(1e-3) + 1e-6,
                "{name}[{m}] update RMS {update} vs 0.2·RMS(σ) {want}"
            );
            assert!((0.2 * lo..=0.2 * hi).contains(&update));
        }
    }
}

#[test]
fn muon_splits_hidden_matrices_from_the_rest() {
    use moec_runtime::optim::is_hidden_matrix;
    let m = [4, 8];
    assert!(is_hidden_matrix(
        "model.layers.0.self_attn.q_proj.weight",
        &m
    ));
    assert!(is_hidden_matrix("model.layers.1.mlp.down_proj.weight", &m));
    assert!(is_hidden_matrix(EXPERT, &[2, 4, 8]));
    assert!(is_hidden_matrix(
        "model.layers.0.block_sparse_moe.shared_expert.up_proj.weight",
        &m
    ));
    assert!(is_hidden_matrix("model.layers.0.lstm.weight_hh_l0", &m));
    for outer in [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "classifier.weight",
        "model.input_proj.weight",
        "model.layers.0.block_sparse_moe.gate.weight",
        "model.layers.0.block_sparse_moe.noise.weight",
        "model.layers.0.block_sparse_moe.group_gate.weight",
    ] {
        assert!(!is_hidden_matrix(outer, &m), "{outer}");
    }
    assert!(!is_hidden_matrix("model.norm.weight", &[8]));
}

/// (A + eps·I)^(−1/4) in f64 (eigenvalues of the PSD statistic clamped at 0, as pinned for f32).
fn root64(a: &[f64], n: usize, eps: f64) -> Vec<f64> {
    let m = nalgebra::DMatrix::from_row_slice(n, n, a);
    let eig = m.symmetric_eigen();
    let d = eig.eigenvalues.map(|l| (l.max(0.0) + eps).powf(-0.25));
    let p = &eig.eigenvectors * nalgebra::DMatrix::from_diagonal(&d) * eig.eigenvectors.transpose();
    (0..n * n).map(|k| p[(k / n, k % n)]).collect()
}

/// Shampoo in f64 (docs/language.md) for parameter i of [`shapes`].
fn shampoo64(s: &OptimSettings, i: usize, step: usize, g: &[f64], st: &mut Ref64) {
    let OptimizerSpec::Shampoo {
        betas,
        eps,
        decay: d,
        root_every,
        max_dim,
        weight_decay,
        ..
    } = s.optimizer
    else {
        unreachable!()
    };
    let shape = &shapes()[i].1;
    let wd = decay(i, weight_decay as f32) as f64;
    let lr = |j: usize| lr(s, i, step) * multiplier64(s, i, step, j);
    let t = step as i32 + 1;
    let a = adam64(st, g, t, (betas.0, betas.1, eps, 0.0), |_| 0.0);
    if shape.len() < 2 || shape[shape.len() - 2..].iter().any(|&n| n > max_dim) {
        for j in 0..g.len() {
            st.p[j] -= lr(j) * (a[j] + wd * st.p[j]);
        }
        return;
    }
    let (mats, r, c) = matrix_view(shape);
    let size = r * c;
    for m in 0..mats {
        let gm = &g[m * size..(m + 1) * size];
        let ggt = matmul(gm, &transpose(gm, r, c), r, c, r);
        let gtg = matmul(&transpose(gm, r, c), gm, c, r, c);
        for (name, prod, n) in [("left", &ggt, r), ("right", &gtg, c)] {
            let stat = &mut st.state(name, mats * n * n)[m * n * n..(m + 1) * n * n];
            for (x, p) in stat.iter_mut().zip(prod) {
                *x = d * *x + (1.0 - d) * p;
            }
            if step.is_multiple_of(root_every) {
                let root = root64(stat, n, eps);
                let name = if name == "left" {
                    "left_root"
                } else {
                    "right_root"
                };
                st.state(name, mats * n * n)[m * n * n..(m + 1) * n * n].copy_from_slice(&root);
            }
        }
        let pl = st.s["left_root"][m * r * r..(m + 1) * r * r].to_vec();
        let pr = st.s["right_root"][m * c * c..(m + 1) * c * c].to_vec();
        let dm = matmul(&pl, &matmul(gm, &pr, r, c, c), r, r, c);
        let ratio = frobenius(&a[m * size..(m + 1) * size]) / frobenius(&dm);
        for t in 0..size {
            let j = m * size + t;
            st.p[j] -= lr(j) * (dm[t] * ratio + wd * st.p[j]);
        }
    }
}

/// Shampoo with eps = 1e-3 rather than the default 1e-8: R of a [3, 50] or L of a [70, 5] matrix has rank
/// ≤ 3·steps (≤ 5·steps), and its null space gets (λ + eps)^(−1/4) with λ exactly 0 in f64 but f32
/// rounding noise (~1e-7·‖R‖ ≫ 1e-8) on the GPU. A gradient of a later, non-root step has most of
/// its mass in that null space, so with eps = 1e-8 the update is dominated by rounding noise raised
/// to −1/4, in any f32 implementation; eps = 1e-3 keeps the formula well conditioned and the test
/// meaningful.
fn shampoo(root_every: usize, max_dim: usize) -> OptimizerSpec {
    OptimizerSpec::Shampoo {
        lr: 0.01,
        betas: (0.9, 0.999),
        eps: 1e-3,
        decay: 0.9,
        root_every,
        max_dim,
        weight_decay: 0.1,
    }
}

/// Shampoo against f64: L and R accumulate in f32 on the GPU and the roots are taken of those f32
/// statistics, so the weights agree to 1e-5 + 1e-4·|ref| (the moments and statistics far closer).
const SHAMPOO_TOL: (f64, f64) = (1e-5, 1e-4);
const SHAMPOO_STATE: [&str; 5] = ["", "m", "v", "left", "right"];

#[test]
fn shampoo_matches_an_f64_reference() {
    // max_dim = 64: the [70, 5] weight is over it and takes Adam's direction, the norm is a vector
    // (Adam), each [3, 50] expert, the router and the (tall) embedding are preconditioned; roots on
    // steps 0 and 2, step 1 reuses step 0's. `MOEC_OPTIM_DUMP=DIR` also writes the run for
    // scripts/optim_reference.py.
    let s = settings(shampoo(2, 64));
    let run = compare_f64(
        &s,
        3,
        None,
        &SHAMPOO_STATE,
        SHAMPOO_TOL,
        |i, step, g, st| shampoo64(&s, i, step, g, st),
    );
    dump("shampoo", &s, &run);
    assert!(!run
        .tensors
        .contains_key(&format!("optim.{}.left", shapes()[0].0)));
    assert_eq!(run.tensors[&format!("optim.{EXPERT}.left")].0, [2, 3, 3]);
    assert_eq!(
        run.tensors[&format!("optim.{EXPERT}.right_root")].0,
        [2, 50, 50]
    );
}

#[test]
fn shampoo_with_accumulation_clip_and_adaptive_expert_lr() {
    // Every matrix preconditioned (max_dim 1024), one root step (step 0), 2 micro-steps, clipped.
    let mut s = settings(shampoo(10, 1024));
    s.accumulate = 2;
    s.clip = Some(5.0);
    s.expert_lr = Some(ExpertLr::Adaptive { base: 0.05 });
    compare_f64(
        &s,
        3,
        Some(hand_set_loads),
        &SHAMPOO_STATE,
        SHAMPOO_TOL,
        |i, step, g, st| shampoo64(&s, i, step, g, st),
    );
}

/// Parameters over the binding limit (capped at 512 bytes: the weight, the experts and the
/// embedding each split into 256-aligned slices of 128 elements, the last shorter) take AdamW with
/// clipping, accumulation and adaptive expert lr slice by slice: the same weights and state as
/// the whole-parameter update of the same gradients, within 1e-6 + 1e-6·|x| (clip's partial sums
/// are grouped per slice, which may change the norm's last bit).
#[test]
fn parameters_over_the_binding_limit_update_in_slices_like_whole_ones() {
    let mut s = settings(OptimizerSpec::AdamW {
        lr: 0.01,
        betas: (0.9, 0.95),
        eps: 1e-8,
        weight_decay: 0.1,
    });
    s.clip = Some(0.05);
    s.accumulate = 2;
    s.expert_lr = Some(ExpertLr::Adaptive { base: 0.05 });
    let whole = run_gpu(&s, 3, 1.0, Some(hand_set_loads));
    let capped = Gpu::new(&AdapterChoice {
        name: None,
        max_binding: Some(512),
    })
    .expect("a wgpu adapter");
    let sliced = run_gpu_on(bench_on(capped), &s, 3, 1.0, Some(hand_set_loads));
    assert!(whole.stats.clip_scale < 1.0, "the clip is active");
    assert_eq!(whole.tensors.len(), sliced.tensors.len());
    for (name, (_, want)) in &whole.tensors {
        let got = &sliced.tensors[name].1;
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-6 + 1e-6 * w.abs(),
                "{name}[{i}]: sliced {g} vs whole {w}"
            );
        }
    }
}
