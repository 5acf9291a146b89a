//! The optimizer kernels against CPU references of the same formulas, on hand-made parameter and
//! gradient buffers (no plan): AdamW, SGD with and without momentum, schedule-free AdamW, Adafactor,
//! global-norm clipping, gradient accumulation, parameter groups (no decay on 1-D params, `expert_lr`,
//! `expert_lr = adaptive` with hand-set loads) and the non-finite flag.
//!
//! Tolerance: the CPU reference runs the kernels' f32 formulas in the same order; the GPU may fuse
//! multiply-adds, so values agree to |gpu - cpu| <= 1e-6 + 1e-5 |cpu| per element after 3 steps.

// The references index several parallel arrays by element, as the kernels do.
#![allow(clippy::needless_range_loop)]

use moec_compiler::spec::{ExpertLr, Optimizer as OptimizerSpec, Schedule};
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

/// Three parameters covering the groups: a 2-D weight (decays), a 1-D norm (no decay), and a
/// stacked expert weight (decays, expert lr). 5·70 = 350 elements span two 256-wide workgroups.
fn shapes() -> Vec<(&'static str, Vec<usize>)> {
    vec![
        ("model.layers.0.self_attn.q_proj.weight", vec![5, 70]),
        ("model.norm.weight", vec![37]),
        (EXPERT, vec![EXPERTS, 3, 50]),
    ]
}

struct Bench {
    gpu: Gpu,
    params: Vec<ParamBinding>,
    loss: wgpu::Buffer,
    ce: wgpu::Buffer,
}

fn bench() -> Bench {
    let gpu = gpu();
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

/// Runs `steps` optimizer steps on the GPU with fresh random gradients each micro-step (and, with
/// `loads`, the EXPERT layer's load written before each micro-step), and the same steps through
/// `cpu_step(param index, step, grads of the micro-steps, state)` on the CPU; compares weights and
/// state (by checkpoint name: `state_names[k]` is `s[k - 1]`, "" the weights) at the end.
fn run_and_compare(
    settings: &OptimSettings,
    steps: usize,
    grad_scale: f32,
    state_names: &[&str],
    loads: Option<Loads>,
    mut cpu_step: impl FnMut(usize, usize, &[Vec<f32>], &mut Cpu),
) -> moec_runtime::optim::StepStats {
    let b = bench();
    let load = b.gpu.storage_buffer("moe.0.load", 4 * EXPERTS as u64);
    let layers = [ExpertLoad {
        load: load.clone(),
        params: vec![EXPERT.to_string()],
    }];
    let mut optim =
        Optimizer::with_expert_loads(&b.gpu, settings, &b.params, &b.loss, &b.ce, &layers).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
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
    let mut cpu: Vec<Cpu> = b
        .params
        .iter()
        .map(|p| {
            let w = init[&p.name].clone();
            let zeros = vec![0.0; w.len()];
            Cpu {
                s: [zeros.clone(), zeros.clone(), zeros],
                p: w,
            }
        })
        .collect();
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
        for (i, g) in grads.iter().enumerate() {
            cpu_step(i, step, g, &mut cpu[i]);
        }
    }
    let tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)> =
        optim.checkpoint_tensors().unwrap().into_iter().collect();
    for (i, p) in b.params.iter().enumerate() {
        for (k, suffix) in state_names.iter().enumerate() {
            let name = if suffix.is_empty() {
                p.name.clone()
            } else {
                format!("optim.{}.{suffix}", p.name)
            };
            let expected = if suffix.is_empty() {
                &cpu[i].p
            } else {
                &cpu[i].s[k - 1]
            };
            match tensors.get(&name) {
                Some((_, gpu)) => assert_close(&name, gpu, expected),
                None => assert!(expected.is_empty(), "no state `{name}` on the GPU"),
            }
        }
    }
    optim.stats().unwrap()
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
    assert_eq!(optim.checkpoint_tensors().unwrap().len(), 3, "weights only");
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
