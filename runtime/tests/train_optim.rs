//! The optimizer kernels against CPU references of the same formulas, on hand-made parameter and
//! gradient buffers (no plan): AdamW, SGD with and without momentum, schedule-free AdamW, global-norm
//! clipping, gradient accumulation, parameter groups (no decay on 1-D params, `expert_lr`), the
//! non-finite flag, and the unsupported optimizers' errors.
//!
//! Tolerance: the CPU reference runs the kernels' f32 formulas in the same order; the GPU may fuse
//! multiply-adds, so values agree to |gpu - cpu| <= 1e-6 + 1e-5 |cpu| per element after 3 steps.

// The references index several parallel arrays by element, as the kernels do.
#![allow(clippy::needless_range_loop)]

use moec_compiler::spec::{ExpertLr, Optimizer as OptimizerSpec, Schedule};
use moec_runtime::optim::{OptimError, OptimSettings, Optimizer, ParamBinding};
use moec_runtime::{AdapterChoice, Gpu};
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};

const EXPERT: &str = "model.layers.0.block_sparse_moe.experts.w1";

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
        (EXPERT, vec![2, 3, 50]),
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

/// Per-parameter CPU state: weights and up to three state vectors.
#[derive(Clone)]
struct Cpu {
    p: Vec<f32>,
    s: [Vec<f32>; 3],
}

/// Runs `steps` optimizer steps on the GPU with fresh random gradients each micro-step, and the
/// same steps through `cpu_step(param index, step, grads of the micro-steps, state)` on the CPU;
/// compares weights and state (by checkpoint name) at the end.
fn run_and_compare(
    settings: &OptimSettings,
    steps: usize,
    grad_scale: f32,
    state_names: &[&str],
    mut cpu_step: impl FnMut(usize, usize, &[Vec<f32>], &mut Cpu),
) -> moec_runtime::optim::StepStats {
    let b = bench();
    let mut optim = Optimizer::new(&b.gpu, settings, &b.params, &b.loss, &b.ce).unwrap();
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
            assert_close(&name, &tensors[&name].1, expected);
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
    let stats = run_and_compare(&s, 3, 1.0, &["", "m", "v"], |i, step, grads, st| {
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
    run_and_compare(&s, 2, 1.0, &[""], |i, step, grads, st| {
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
    run_and_compare(&s, 3, 1.0, &["", "z", "v", "y"], |i, step, grads, st| {
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
    });
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

#[test]
fn unsupported_optimizers_are_clear_errors() {
    let b = bench();
    let s = settings(OptimizerSpec::Adafactor {
        lr: 0.01,
        decay: 0.8,
        eps: 1e-30,
    });
    let err = Optimizer::new(&b.gpu, &s, &b.params, &b.loss, &b.ce)
        .err()
        .expect("adafactor is refused");
    assert!(
        matches!(err, OptimError::Unsupported(_))
            && err.to_string().contains("adafactor")
            && err.to_string().contains("not supported yet"),
        "{err}"
    );
    let mut s = settings(OptimizerSpec::Sgd {
        lr: 0.1,
        momentum: 0.0,
    });
    s.expert_lr = Some(ExpertLr::Adaptive { base: 0.1 });
    let err = Optimizer::new(&b.gpu, &s, &b.params, &b.loss, &b.ce)
        .err()
        .expect("adaptive expert lr is refused");
    assert!(
        err.to_string().contains("adaptive") && err.to_string().contains("not supported yet"),
        "{err}"
    );
}
