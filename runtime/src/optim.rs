//! Optimizers, gradient clipping and gradient accumulation as WGSL kernels (`shaders/optim_*.wgsl`,
//! `shaders/clip_*.wgsl`), recorded into the same submission as the training plan: a step never
//! reads anything back to the host.
//!
//! # Per step
//! 1. After every micro-step's plan: `track` sums the plan's `loss` and `ce` into the [`StepStats`]
//!    buffer, and with `accumulate > 1` each gradient is added into an accumulation buffer (the plan
//!    scales its gradients by `grad_seed = 1 / accumulate`, so the sum is the mean gradient).
//! 2. After the last micro-step: `clip_sumsq` writes partial sums of squares of every gradient,
//!    `clip_finalize` reduces them to the global norm and the clip scale `min(1, clip / (norm + 1e-6))`
//!    (PyTorch's `clip_grad_norm_`; 1 without `clip`), and one update kernel per parameter applies the
//!    optimizer with the scaled gradient. A non-finite norm or loss sets a sticky flag in the stats
//!    buffer that turns every later update into a no-op, so the weights stay those of the last good
//!    step until the host next reads the stats (on log, eval and checkpoint steps).
//!
//! # Loss scaling (`precision = f16`)
//! torch.amp.GradScaler's dynamic loss scaling, decided on the GPU: the scale (initially
//! [`INITIAL_LOSS_SCALE`]) lives in the stats buffer; before each micro-step's plan
//! `optim_loss_seed` writes the plan's `grad_seed` = scale / accumulate, so every gradient is scaled;
//! `clip_finalize` measures the norm of the scaled gradients, folds 1/scale into the multiplier every
//! update already applies, and on a non-finite gradient skips the step's update, halves the scale and
//! counts the skip (a step is never half applied: the decision precedes every update kernel), while
//! [`GROWTH_INTERVAL`] finite steps in a row double it. The scale, its run of finite steps and the
//! skip count are read with the stats and saved in checkpoints ([`LossScaleState`]). Schedules and
//! AdamW's bias corrections count skipped steps as steps: the host never learns of a skip inside a
//! step.
//!
//! Per-step scalars (learning rates from the schedule, bias corrections, the schedule-free averaging
//! weight, Adafactor's decay, the micro-step index) live in one 52-byte storage buffer written by the
//! host per micro-step (a write, never a read). The one exception to "no readback" is Shampoo's root
//! step ([`Optimizer::finish_step`]).
//!
//! # Parameter groups
//! Weight decay is not applied to parameters with a 1-D shape (norm weights, biases), as nanoGPT and
//! most recipes do. `expert_lr = X` gives parameters whose name contains `block_sparse_moe.experts`
//! the base learning rate X, run through the same schedule as `lr` (same warmup and decay shape;
//! cosine's `min_lr` stays the absolute floor of both groups).
//!
//! `expert_lr = adaptive(base = X)` does the same with X, and multiplies expert e's learning rate by
//! min(mean_load / load_e, E) (docs/language.md's mean_load / load_e, capped at E so that an expert with
//! little or no load does not get an unbounded rate; 1 when the layer had no load at all). load is
//! the step's `moe.N.load` of the parameter's MoE layer summed over the micro-steps
//! (`shaders/optim_expert_lr.wgsl`, after each micro-step's plan), and slice e of the stacked
//! `[E, ...]` parameter is expert e. The multiplier scales every use of the lr in the update kernel
//! (AdamW's decoupled decay too; schedule-free's averaging weight stays the group's). The trainer
//! passes the load outputs as [`ExpertLoad`]s.
//!
//! # Optimizers
//! - `adamw`: PyTorch `torch.optim.AdamW` (decoupled decay, bias correction), state `m`, `v`.
//! - `sgd`: PyTorch `torch.optim.SGD` with momentum (dampening 0), state `momentum_buffer`; no state
//!   when `momentum = 0`.
//! - `schedule_free_adamw`: `schedulefree.AdamWScheduleFree` (r = 0, weight_lr_power = 2, its warmup
//!   replaced by the spec's `schedule`). The param buffer the plan reads is y, the point gradients
//!   are taken at; state `x` (the averaged weights), `z` and `v`. Checkpoints store **x** as the model
//!   weights (what is evaluated and shipped) and y, z, v as `optim.<name>.y/.z/.v`; evaluation reads x.
//! - `adafactor`: HF transformers' `Adafactor` with `relative_step = False, scale_parameter = False,
//!   warmup_init = False, beta1 = None, clip_threshold = 1.0` and no weight decay: beta2t = 1 - t^decay,
//!   for a matrix `[R, C]` the row and column EMAs r = EMA(mean over columns of g² + eps),
//!   c = EMA(mean over rows), update u = g / sqrt(r_i c_j / mean(r)), u /= max(1, RMS(u)), p -= lr u;
//!   a 1-D parameter keeps the full EMA v and u = g / sqrt(v). A stacked `[E, R, C]` parameter is E
//!   matrices, each factored and RMS-clipped on its own (HF on Mixtral's per-expert Linear weights).
//!   State `exp_avg_sq_row` `[E, R]`/`[R]` and `exp_avg_sq_col` `[E, C]`/`[C]`, or `exp_avg_sq` (1-D),
//!   HF's names. Three kernels (`shaders/optim_adafactor*.wgsl`): the moments (one workgroup per row or
//!   column, fixed-order reductions), per-matrix partial sums of u² for the RMS, then the update.
//! - `shampoo` and `muon`: the formulas of docs/language.md "Optimizers"; kernels, state names and
//!   the host roots are described in [`matrix`].

use crate::checkpoint::Tensor;
use crate::schedule::lr_at;
use crate::{Gpu, RuntimeError};
use bytemuck::{Pod, Zeroable};
use moec_compiler::emit::{segments, Target};
use moec_compiler::spec::{ExpertLr, Optimizer as OptimizerSpec, Precision, Schedule, Train};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};

const PRELUDE: &str = include_str!("../../shaders/optim_prelude.wgsl");
const TRACK: &str = include_str!("../../shaders/optim_track.wgsl");
const ACCUMULATE: &str = include_str!("../../shaders/optim_accumulate.wgsl");
const SUMSQ: &str = include_str!("../../shaders/clip_sumsq.wgsl");
const FINALIZE: &str = include_str!("../../shaders/clip_finalize.wgsl");
const ADAMW: &str = include_str!("../../shaders/optim_adamw.wgsl");
const SGD: &str = include_str!("../../shaders/optim_sgd.wgsl");
const SGD_PLAIN: &str = include_str!("../../shaders/optim_sgd_plain.wgsl");
const SCHEDULE_FREE: &str = include_str!("../../shaders/optim_schedule_free.wgsl");
const ADAFACTOR_COMMON: &str = include_str!("../../shaders/optim_adafactor_common.wgsl");
const ADAFACTOR_MOMENTS: &str = include_str!("../../shaders/optim_adafactor_moments.wgsl");
const ADAFACTOR_RMS: &str = include_str!("../../shaders/optim_adafactor_rms.wgsl");
/// `workgroup_sum`, prepended to the kernels that reduce within a workgroup.
const WORKGROUP_SUM: &str = include_str!("../../shaders/optim_workgroup_sum.wgsl");
const ADAFACTOR: &str = include_str!("../../shaders/optim_adafactor.wgsl");
const EXPERT_LR: &str = include_str!("../../shaders/optim_expert_lr.wgsl");
const LOSS_SEED: &str = include_str!("../../shaders/optim_loss_seed.wgsl");

/// GradScaler's `init_scale`: the first step's loss scale under `precision = f16`.
pub const INITIAL_LOSS_SCALE: f32 = 65536.0;
/// GradScaler's `growth_interval`: finite steps in a row after which the scale doubles.
pub const GROWTH_INTERVAL: u32 = 2000;

mod matrix;

/// Invocations per workgroup of every kernel here (`WG` in the prelude).
const WG: u64 = 256;
/// Gradient elements per workgroup of `clip_sumsq` (each invocation sums 16 with a grid stride), and
/// of Adafactor's RMS partial sums.
const SUMSQ_CHUNK: u64 = WG * 16;
/// At most this many partial sums per matrix for Adafactor's RMS: every update invocation adds them.
const MAX_RMS_CHUNKS: u64 = 64;
/// HF Adafactor's default `clip_threshold`: the update's RMS is clipped to it.
const CLIP_THRESHOLD: f64 = 1.0;
/// Name fragment that puts a parameter in the expert group.
pub const EXPERT_MARKER: &str = "block_sparse_moe.experts";

#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("the checkpoint has no tensor `{0}`")]
    Missing(String),
    #[error("tensor `{name}` has shape {got:?} in the checkpoint but {expected:?} in the model")]
    Shape {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("accumulate must be at least 1")]
    Accumulate,
    #[error("shampoo: the {side} statistics of `{name}` are not finite or have no eigendecomposition; the step's gradients were too large for f32")]
    Root { name: String, side: &'static str },
    #[error("`{name}` ({bytes} bytes) does not fit one storage binding of this adapter ({limit} bytes) and {why}")]
    TooLarge {
        name: String,
        bytes: u64,
        limit: u64,
        why: &'static str,
    },
    #[error("`expert_lr = adaptive` needs the per-expert load of the MoE layer of `{0}` (the training plan's `moe.N.load` output)")]
    NoExpertLoad(String),
    #[error("`expert_lr = adaptive`: expert parameter `{name}` has shape {shape:?}, not [{experts}, ...] like its MoE layer's other experts and `moe.N.load`")]
    ExpertCount {
        name: String,
        shape: Vec<usize>,
        experts: usize,
    },
}

/// Everything of the `train` block the optimizer needs.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimSettings {
    pub optimizer: OptimizerSpec,
    pub expert_lr: Option<ExpertLr>,
    pub schedule: Schedule,
    /// Length of the schedule in optimizer steps.
    pub total_steps: usize,
    pub clip: Option<f64>,
    pub accumulate: usize,
    /// Dynamic loss scaling (`precision = f16`; see the module doc).
    pub loss_scaling: bool,
}

impl OptimSettings {
    pub fn from_train(train: &Train) -> OptimSettings {
        OptimSettings {
            optimizer: train.optimizer,
            expert_lr: train.expert_lr,
            schedule: train.schedule,
            total_steps: train.steps,
            clip: train.clip,
            accumulate: train.accumulate,
            loss_scaling: train.precision == Precision::F16,
        }
    }

    /// Whether the optimizer can update parameter `name` in slices of one storage binding each (its
    /// elementwise kernels), so that it may exceed the binding limit; Shampoo's, Muon's and
    /// Adafactor's matrix kernels need the matrix whole.
    pub fn updates_in_slices(&self, name: &str, shape: &[usize]) -> bool {
        let layout = Layout::of(&self.optimizer);
        matches!(layout, Layout::Elementwise(_))
            || ParamKind::of(layout, name, shape) == ParamKind::Adam
    }

    /// Bytes [`Optimizer`] allocates for one trained parameter `name` of this shape: its state (m and
    /// v, momentum, x z v, Adafactor's moments and scratch, Shampoo's statistics and roots), the
    /// working buffers of Shampoo's and Muon's matrix updates, the accumulated gradient with
    /// `accumulate > 1`, and its info block. The memory report (`crate::memory`) adds these up
    /// before any buffer exists; `runtime/tests/memory.rs` checks the sum against the allocation.
    pub fn param_bytes(&self, name: &str, shape: &[usize]) -> u64 {
        let numel = shape.iter().product::<usize>() as u64;
        let layout = Layout::of(&self.optimizer);
        let state = match (layout, ParamKind::of(layout, name, shape)) {
            (Layout::Elementwise(suffixes), _) => 4 * numel * suffixes.len() as u64,
            (Layout::Adafactor, _) => {
                let (matrices, rows, cols, _) = factoring(shape);
                let chunks = ((rows * cols) as u64)
                    .div_ceil(SUMSQ_CHUNK)
                    .clamp(1, MAX_RMS_CHUNKS);
                let moments: usize = adafactor_states(shape)
                    .iter()
                    .map(|(_, s)| s.iter().product::<usize>())
                    .sum();
                4 * moments as u64 + 4 * matrices as u64 * (1 + chunks)
            }
            (Layout::Shampoo { .. } | Layout::Muon { .. }, ParamKind::Adam) => 4 * numel * 2,
            (Layout::Shampoo { .. }, _) => 4 * matrix::shampoo_elements(shape) as u64,
            (Layout::Muon { .. }, _) => 4 * matrix::muon_elements(shape) as u64,
        };
        let accumulated = if self.accumulate > 1 { 4 * numel } else { 0 };
        state + accumulated + std::mem::size_of::<ParamInfo>() as u64
    }

    /// The optimizer's base learning rate.
    pub fn base_lr(&self) -> f64 {
        self.optimizer.lr()
    }

    /// The learning rate of `muon`'s `adamw` parameters at 0-based step `step` (the schedule of
    /// `lr` applied to its own base); the non-expert rate of any other optimizer.
    pub fn adam_lr_at(&self, step: usize) -> f64 {
        match self.optimizer {
            OptimizerSpec::Muon { adamw, .. } => {
                lr_at(&self.schedule, adamw.lr, step, self.total_steps)
            }
            OptimizerSpec::AdamW { .. }
            | OptimizerSpec::Sgd { .. }
            | OptimizerSpec::Adafactor { .. }
            | OptimizerSpec::ScheduleFreeAdamW { .. }
            | OptimizerSpec::Shampoo { .. } => self.lrs_at(step)[0],
        }
    }

    /// Learning rates of group 0 (all but experts) and group 1 (experts) at 0-based step `step`.
    pub fn lrs_at(&self, step: usize) -> [f64; 2] {
        let base = self.base_lr();
        let lr = lr_at(&self.schedule, base, step, self.total_steps);
        let expert = match self.expert_lr {
            Some(ExpertLr::Fixed(x) | ExpertLr::Adaptive { base: x }) => {
                lr_at(&self.schedule, x, step, self.total_steps)
            }
            None => lr,
        };
        [lr, expert]
    }
}

/// One trainable tensor: its name and shape, the buffer the plan reads, and the plan's gradient.
#[derive(Debug, Clone)]
pub struct ParamBinding {
    pub name: String,
    pub shape: Vec<usize>,
    pub param: wgpu::Buffer,
    /// `None` when the parameter does not reach the loss (autodiff emits no gradient for it): like
    /// PyTorch's optimizers for a `None` grad, its update is skipped entirely (no weight decay
    /// either), and it has no optimizer state; it is still initialised, evaluated and checkpointed.
    pub grad: Option<wgpu::Buffer>,
}

/// One MoE layer's per-expert load output (`moe.N.load`, f32[E], token slots each expert processed)
/// and the names of its stacked expert parameters (`[E, ...]`), which `expert_lr = adaptive` scales by
/// it. Ignored under any other `expert_lr`.
#[derive(Debug, Clone)]
pub struct ExpertLoad {
    pub load: wgpu::Buffer,
    pub params: Vec<String>,
}

/// Host-side optimizer state that lives between steps (schedule-free's running lr maximum and weight
/// sum, per group); saved in checkpoints as JSON.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HostState {
    pub lr_max: [f64; 2],
    pub weight_sum: [f64; 2],
}

/// What the GPU tracked for the last optimizer step (read on demand, one small readback).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Mean over micro-steps of the plan's `loss`.
    pub loss: f32,
    /// Mean over micro-steps of the plan's `ce`.
    pub ce: f32,
    /// Global L2 norm of the (accumulated) gradient, before clipping.
    pub grad_norm: f32,
    /// The factor the gradient was multiplied by (1 unless clipped).
    pub clip_scale: f32,
    /// The first 0-based step whose loss or gradient norm was non-finite (and that loss scaling
    /// could not skip); no update ran since.
    pub bad_step: Option<u32>,
    /// The loss scale the next step will use (1 without loss scaling).
    pub loss_scale: f32,
    /// Steps skipped so far because a scaled gradient overflowed.
    pub skipped: u32,
}

/// The dynamic loss scale's state (GradScaler's `scale` and `_growth_tracker`, plus the skip count),
/// kept in checkpoints so `--resume` continues it exactly.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScaleState {
    pub scale: f32,
    pub good_steps: u32,
    pub skipped: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable)]
struct Scalars {
    lr: [f32; 3],
    step_size: [f32; 3],
    ckp1: [f32; 2],
    bc2_sqrt: f32,
    micro: u32,
    step: u32,
    beta2t: f32,
    bc1: f32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
struct ParamInfo {
    group: u32,
    decay: f32,
    slot: u32,
    partials: u32,
    lr_scale: u32,
    expert_size: u32,
    matrices: u32,
    rows: u32,
    cols: u32,
    chunks: u32,
    factored: u32,
    /// First element of the slice (see the prelude).
    base: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
struct ExpertLayer {
    offset: u32,
    experts: u32,
}

/// Why a preconditioned matrix over one binding cannot be updated (`moec check` says the same).
pub const MATRIX_WHOLE: &str =
    "this optimizer's matrix kernels need it whole (AdamW, SGD and schedule-free update it in slices)";

/// Bytes of the stats buffer's scalars (`Stats` in the prelude: 9 words before `lr_scale`).
const STATS_BYTES: u64 = 36;
/// Byte offset of `Stats.loss_scale` (followed by `good_steps` and `skipped`).
const LOSS_SCALE_AT: u64 = 24;

struct Slot {
    name: String,
    shape: Vec<usize>,
    numel: usize,
    param: wgpu::Buffer,
    /// Optimizer state, in checkpoint order; empty for a parameter without gradient.
    state: Vec<State>,
    /// `None` for a parameter without gradient.
    kernels: Option<SlotKernels>,
}

/// A range of a parameter that fits one storage binding: the elementwise kernels (accumulate,
/// clip's sums of squares, AdamW, SGD, schedule-free) run once per slice on that byte range of the parameter, its gradient and its
/// state, so no parameter is limited by one binding.
struct Slice {
    /// First element and element count.
    start: usize,
    len: usize,
    /// The slice's info block (its partial-sum slots and expert lr index).
    info: wgpu::Buffer,
}

/// The `(first element, count)` ranges of a parameter of `shape` (f32) under a binding limit of
/// `limit` bytes: the byte segments the compiler's kernels use for split values
/// ([`moec_compiler::emit::segments`]: 256-aligned offsets, which every adapter accepts).
fn slice_ranges(shape: &[usize], limit: u64) -> Vec<(usize, usize)> {
    let bytes = 4 * shape.iter().product::<usize>() as u64;
    segments(bytes, limit)
        .into_iter()
        .map(|(offset, size)| ((offset / 4) as usize, (size / 4) as usize))
        .collect()
}

/// One optimizer state tensor: `optim.<name>.<suffix>` (or the weights, for schedule-free's `x`),
/// stored at element `offset` of `buffer` (Adafactor keeps its row and column moments in one buffer).
struct State {
    suffix: &'static str,
    shape: Vec<usize>,
    buffer: wgpu::Buffer,
    offset: usize,
}

struct SlotKernels {
    /// Per [`Slice`]: accumulation and clip's sums of squares.
    slices: Vec<SliceKernels>,
    /// The update kernels of this parameter, in order.
    update: Vec<Stage>,
}

struct SliceKernels {
    accumulate: Option<wgpu::BindGroup>,
    sumsq: wgpu::BindGroup,
    sumsq_groups: u32,
    grid: [u32; 3],
}

/// One dispatch of a parameter's update.
struct Stage {
    /// Index into `Pipelines::update`.
    pipeline: usize,
    group: wgpu::BindGroup,
    grid: [u32; 3],
    /// Runs after Shampoo's host roots: in a second submission on root steps.
    after_roots: bool,
}

struct Pipelines {
    track: wgpu::ComputePipeline,
    accumulate: wgpu::ComputePipeline,
    sumsq: wgpu::ComputePipeline,
    finalize: wgpu::ComputePipeline,
    expert_lr: wgpu::ComputePipeline,
}

/// Every update kernel of the optimizer, which each parameter's [`Stage`]s index: one for AdamW,
/// SGD and schedule-free, three for Adafactor (moments, RMS partial sums, update), AdamW's first then
/// their own for Shampoo and Muon, then the matrix products Shampoo and Muon generate per shape
/// (added while the parameters are bound, one pipeline per distinct source).
struct UpdatePipelines<'a> {
    compile: &'a dyn Fn(&str, &str) -> wgpu::ComputePipeline,
    list: RefCell<Vec<wgpu::ComputePipeline>>,
    generated: RefCell<HashMap<String, usize>>,
}

impl UpdatePipelines<'_> {
    /// The index of the pipeline of `wgsl` (labelled `name`), compiled on first use.
    fn generated(&self, name: &str, wgsl: String) -> usize {
        if let Some(&i) = self.generated.borrow().get(&wgsl) {
            return i;
        }
        let mut list = self.list.borrow_mut();
        list.push((self.compile)(name, &wgsl));
        self.generated.borrow_mut().insert(wgsl, list.len() - 1);
        list.len() - 1
    }
}

/// The per-parameter state and update bindings of an optimizer.
#[derive(Clone, Copy)]
enum Layout {
    /// One elementwise kernel whose bindings after the gradient are these states, each shaped like
    /// the parameter.
    Elementwise(&'static [&'static str]),
    Adafactor,
    /// Matrices with both sides ≤ `max_dim` preconditioned, the rest AdamW (pipeline 0).
    Shampoo {
        max_dim: usize,
    },
    /// Hidden matrices orthogonalised, the rest AdamW (pipeline 0) with weight decay `adam_decay`.
    Muon {
        ns_steps: usize,
        adam_decay: f64,
    },
}

impl Layout {
    fn of(optimizer: &OptimizerSpec) -> Layout {
        match optimizer {
            OptimizerSpec::AdamW { .. } => Layout::Elementwise(&["m", "v"]),
            OptimizerSpec::Sgd { momentum, .. } if *momentum != 0.0 => {
                Layout::Elementwise(&["momentum_buffer"])
            }
            OptimizerSpec::Sgd { .. } => Layout::Elementwise(&[]),
            OptimizerSpec::ScheduleFreeAdamW { .. } => Layout::Elementwise(&["x", "z", "v"]),
            OptimizerSpec::Adafactor { .. } => Layout::Adafactor,
            OptimizerSpec::Shampoo { max_dim, .. } => Layout::Shampoo { max_dim: *max_dim },
            OptimizerSpec::Muon {
                ns_steps, adamw, ..
            } => Layout::Muon {
                ns_steps: *ns_steps,
                adam_decay: adamw.weight_decay,
            },
        }
    }
}

/// The optimizer of one training run, bound to the plan's parameter and gradient buffers.
pub struct Optimizer<'g> {
    gpu: &'g Gpu,
    settings: OptimSettings,
    slots: Vec<Slot>,
    pipelines: Pipelines,
    /// [`UpdatePipelines`]'s list.
    update: Vec<wgpu::ComputePipeline>,
    scalars: wgpu::Buffer,
    stats: wgpu::Buffer,
    track: wgpu::BindGroup,
    finalize: wgpu::BindGroup,
    /// `expert_lr = adaptive`: one bind group of `optim_expert_lr` per MoE layer.
    expert_lr: Vec<wgpu::BindGroup>,
    /// Loss scaling: the `optim_loss_seed` kernel bound to the plan's `grad_seed`
    /// ([`Optimizer::scale_loss_into`]).
    loss_seed: Option<(wgpu::ComputePipeline, wgpu::BindGroup)>,
    host: HostState,
    current: Scalars,
}

/// Whether a parameter gets weight decay: not norms and biases (1-D).
pub fn decays(shape: &[usize]) -> bool {
    shape.len() >= 2
}

/// Whether a parameter is in the expert learning-rate group.
pub fn is_expert(name: &str) -> bool {
    name.contains(EXPERT_MARKER)
}

/// WGSL float literal of an f32 constant (Rust's `{:?}` prints the shortest round-trip form).
fn lit(x: f64) -> String {
    let s = format!("{:?}", x as f32);
    if s.contains('.') || s.contains('e') || s.contains("inf") || s.contains("NaN") {
        s
    } else {
        format!("{s}.0")
    }
}

/// `groups` workgroups (at least one) folded into x and y.
fn fold(groups: u64, max_dim: u32) -> [u32; 3] {
    let groups = groups.max(1);
    let x = groups.min(max_dim as u64);
    [x as u32, groups.div_ceil(x) as u32, 1]
}

/// Elementwise grid of `n` elements at `WG` per workgroup, folded into x and y.
fn grid(n: usize, max_dim: u32) -> [u32; 3] {
    fold((n as u64).div_ceil(WG), max_dim)
}

/// Adafactor's view of a shape: (matrices, rows, cols, factored). Two or more axes are factored over
/// the last two, leading axes stacking matrices (HF factors `len(shape) >= 2`); fewer are one vector.
fn factoring(shape: &[usize]) -> (usize, usize, usize, bool) {
    match shape {
        [.., rows, cols] => (
            shape[..shape.len() - 2].iter().product(),
            *rows,
            *cols,
            true,
        ),
        _ => (1, shape.iter().product(), 1, false),
    }
}

/// Adafactor's state of a parameter: (suffix, shape) in buffer order.
fn adafactor_states(shape: &[usize]) -> Vec<(&'static str, Vec<usize>)> {
    if shape.len() < 2 {
        return vec![("exp_avg_sq", shape.to_vec())];
    }
    let n = shape.len();
    let mut col = shape[..n - 2].to_vec();
    col.push(shape[n - 1]);
    vec![
        ("exp_avg_sq_row", shape[..n - 1].to_vec()),
        ("exp_avg_sq_col", col),
    ]
}

/// How an optimizer treats one parameter.
#[derive(Debug, Clone, Copy, PartialEq)]
enum ParamKind {
    /// The optimizer's own update (every parameter of AdamW, SGD, schedule-free and Adafactor).
    Own,
    /// Shampoo's or Muon's preconditioned matrix update.
    Matrix,
    /// AdamW: Shampoo's vectors and matrices over `max_dim`, Muon's non-hidden parameters.
    Adam,
}

impl ParamKind {
    fn of(layout: Layout, name: &str, shape: &[usize]) -> ParamKind {
        let matrix = match layout {
            Layout::Elementwise(_) | Layout::Adafactor => return ParamKind::Own,
            Layout::Shampoo { max_dim } => {
                shape.len() >= 2 && shape[shape.len() - 2..].iter().all(|&n| n <= max_dim)
            }
            Layout::Muon { .. } => is_hidden_matrix(name, shape),
        };
        if matrix {
            ParamKind::Matrix
        } else {
            ParamKind::Adam
        }
    }
}

/// Whether Muon orthogonalises a parameter: every matrix (each expert of a stack) except the
/// embedding, the LM head, the `mlp` family's input projection and classifier, and the routers
/// (`block_sparse_moe.*` outside the experts), which take Muon's `adamw` (docs/language.md
/// "Optimizers").
pub fn is_hidden_matrix(name: &str, shape: &[usize]) -> bool {
    let outer = ["embed_tokens", "lm_head", "input_proj", "classifier"];
    let router =
        name.contains("block_sparse_moe.") && !is_expert(name) && !name.contains("shared_expert");
    shape.len() >= 2 && !router && !outer.iter().any(|o| name.contains(o))
}

/// A parameter's optimizer state and update stages.
struct Built {
    state: Vec<State>,
    update: Vec<Stage>,
}

/// What the update kernels of one parameter bind, and helpers to make its buffers and stages.
struct SlotContext<'a> {
    gpu: &'a Gpu,
    target: &'a Target,
    pipelines: &'a UpdatePipelines<'a>,
    name: &'a str,
    shape: &'a [usize],
    /// The info block of the first slice: the whole parameter's unless it is sliced, which only the
    /// elementwise kernels allow.
    info: &'a wgpu::Buffer,
    slices: &'a [Slice],
    scalars: &'a wgpu::Buffer,
    stats: &'a wgpu::Buffer,
    param: &'a wgpu::Buffer,
    /// The gradient the update reads (the accumulation buffer under `accumulate > 1`).
    grad: &'a wgpu::Buffer,
    max_dim: u32,
}

impl SlotContext<'_> {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// A stage of pipeline `pipeline` binding `buffers` whole, in order, run before any host roots.
    fn stage(&self, pipeline: usize, buffers: &[&wgpu::Buffer], grid: [u32; 3]) -> Stage {
        self.stage_of(pipeline, &whole(buffers), grid)
    }

    /// [`SlotContext::stage`] of buffer ranges.
    fn stage_of(&self, pipeline: usize, ranges: &[wgpu::BufferBinding], grid: [u32; 3]) -> Stage {
        Stage {
            pipeline,
            group: bind_group(
                &self.gpu.device,
                &self.pipelines.list.borrow()[pipeline],
                ranges,
            ),
            grid,
            after_roots: false,
        }
    }

    /// A zeroed state tensor `optim.<name>.<suffix>` of `shape`.
    fn state(&self, suffix: &'static str, shape: Vec<usize>) -> State {
        let n: usize = shape.iter().product();
        State {
            suffix,
            buffer: self
                .gpu
                .storage_buffer(&format!("optim.{}.{suffix}", self.name), 4 * n as u64),
            shape,
            offset: 0,
        }
    }

    /// A working buffer of `elements` f32 (not checkpointed).
    fn scratch(&self, what: &str, elements: usize) -> wgpu::Buffer {
        self.gpu
            .storage_buffer(&format!("{} {what}", self.name), 4 * elements.max(1) as u64)
    }

    /// One elementwise kernel (pipeline 0) whose bindings after the gradient are these states, each
    /// shaped like the parameter; one dispatch per slice, on its range of each.
    fn elementwise(&self, suffixes: &'static [&'static str]) -> Built {
        let state: Vec<State> = suffixes
            .iter()
            .map(|s| self.state(s, self.shape.to_vec()))
            .collect();
        let update = self
            .slices
            .iter()
            .map(|slice| {
                let mut ranges = vec![
                    slice.info.as_entire_buffer_binding(),
                    self.scalars.as_entire_buffer_binding(),
                    self.stats.as_entire_buffer_binding(),
                ];
                let per_element = [self.param, self.grad]
                    .into_iter()
                    .chain(state.iter().map(|s| &s.buffer));
                ranges.extend(per_element.map(|b| range_of(b, slice)));
                self.stage_of(0, &ranges, grid(slice.len, self.max_dim))
            })
            .collect();
        Built { state, update }
    }

    /// Adafactor's three stages; its row and column moments share one buffer.
    fn adafactor(&self, chunks: usize) -> Built {
        let (matrices, _, _, _) = factoring(self.shape);
        let shapes = adafactor_states(self.shape);
        let entries: usize = shapes
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        let moments = self.gpu.storage_buffer(
            &format!("optim.{}.exp_avg_sq", self.name),
            4 * entries as u64,
        );
        let scratch = self.scratch("adafactor scratch", matrices * (1 + chunks));
        let mut offset = 0;
        let state = shapes
            .into_iter()
            .map(|(suffix, shape)| {
                let s = State {
                    suffix,
                    buffer: moments.clone(),
                    offset,
                    shape,
                };
                offset += s.shape.iter().product::<usize>();
                s
            })
            .collect();
        let (info, scalars, stats, grad) = (self.info, self.scalars, self.stats, self.grad);
        let update = vec![
            self.stage(
                0,
                &[info, scalars, stats, grad, &moments],
                fold(entries as u64, self.max_dim),
            ),
            self.stage(
                1,
                &[info, stats, grad, &moments, &scratch],
                fold((matrices * chunks) as u64, self.max_dim),
            ),
            self.stage(
                2,
                &[info, scalars, stats, self.param, grad, &moments, &scratch],
                grid(self.numel(), self.max_dim),
            ),
        ];
        Built {
            state,
            update,
            // Bytes to kilobytes, like the clip partials.
        }
    }
}

/// The byte range of `slice` in a buffer of f32 elements shaped like its parameter.
fn range_of<'b>(buffer: &'b wgpu::Buffer, slice: &Slice) -> wgpu::BufferBinding<'b> {
    wgpu::BufferBinding {
        buffer,
        offset: 4 * slice.start as u64,
        size: std::num::NonZeroU64::new(4 * slice.len.max(1) as u64),
    }
}

/// Each buffer bound whole.
fn whole<'b>(buffers: &[&'b wgpu::Buffer]) -> Vec<wgpu::BufferBinding<'b>> {
    buffers
        .iter()
        .map(|b| b.as_entire_buffer_binding())
        .collect()
}

/// A bind group of `pipeline`'s group 0: binding i is `ranges[i]`.
fn bind_group(
    device: &wgpu::Device,
    pipeline: &wgpu::ComputePipeline,
    ranges: &[wgpu::BufferBinding],
) -> wgpu::BindGroup {
    let entries: Vec<wgpu::BindGroupEntry> = ranges
        .iter()
        .enumerate()
        .map(|(i, b)| wgpu::BindGroupEntry {
            binding: i as u32,
            resource: wgpu::BindingResource::Buffer(b.clone()),
        })
        .collect();
    device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &pipeline.get_bind_group_layout(0),
        entries: &entries,
    })
}

impl<'g> Optimizer<'g> {
    /// [`Optimizer::with_expert_loads`] without load outputs (any `expert_lr` but `adaptive`).
    pub fn new(
        gpu: &'g Gpu,
        settings: &OptimSettings,
        params: &[ParamBinding],
        loss: &wgpu::Buffer,
        ce: &wgpu::Buffer,
    ) -> Result<Optimizer<'g>, OptimError> {
        Self::with_expert_loads(gpu, settings, params, loss, ce, &[])
    }

    /// Creates the state buffers, pipelines and bind groups. `loss` and `ce` are the plan's output
    /// buffers of those names (one f32 each); `loads` the MoE layers' load outputs, which
    /// `expert_lr = adaptive` needs for every expert parameter with a gradient.
    pub fn with_expert_loads(
        gpu: &'g Gpu,
        settings: &OptimSettings,
        params: &[ParamBinding],
        loss: &wgpu::Buffer,
        ce: &wgpu::Buffer,
        loads: &[ExpertLoad],
    ) -> Result<Optimizer<'g>, OptimError> {
        if settings.accumulate == 0 {
            return Err(OptimError::Accumulate);
        }
        let kernels = UpdateKernels::of(&settings.optimizer);
        let experts = ExpertScales::new(settings, params, loads)?;
        let header = kernel_header(settings, &kernels.consts);
        let device = &gpu.device;
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let pipeline = |name: &str, body: &str| {
            let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(name),
                source: wgpu::ShaderSource::Wgsl(format!("{header}{body}").into()),
            });
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(name),
                layout: None,
                module: &module,
                entry_point: Some("main"),
                compilation_options: Default::default(),
                cache: gpu.pipeline_cache(),
            })
        };
        let pipelines = Pipelines {
            track: pipeline("optim_track", TRACK),
            accumulate: pipeline("optim_accumulate", ACCUMULATE),
            sumsq: pipeline("clip_sumsq", &format!("{WORKGROUP_SUM}{SUMSQ}")),
            finalize: pipeline("clip_finalize", &format!("{WORKGROUP_SUM}{FINALIZE}")),
            expert_lr: pipeline("optim_expert_lr", EXPERT_LR),
        };
        let update = UpdatePipelines {
            compile: &pipeline,
            list: RefCell::new(
                kernels
                    .stages
                    .iter()
                    .map(|(name, body)| pipeline(name, body))
                    .collect(),
            ),
            generated: RefCell::default(),
        };
        let scalars = gpu.storage_buffer("optim scalars", std::mem::size_of::<Scalars>() as u64);
        let stats = stats_buffer(gpu, settings, experts.count());
        let target = gpu.target();
        let max_dim = target.max_workgroups_per_dim.max(1);
        let (ranges, total_partials) =
            slice_ranges_of(params, target.max_storage_binding_size, max_dim);
        // At least one slot, so the finalize kernel has a buffer to bind when nothing has a gradient.
        let partials = gpu.storage_buffer("clip partial sums", 4 * total_partials.max(1));
        let binder = SlotBinder {
            gpu,
            settings,
            layout: Layout::of(&settings.optimizer),
            weight_decay: kernels.weight_decay,
            expert_of: &experts.expert_of,
            target: &target,
            pipelines: &pipelines,
            update: &update,
            scalars: &scalars,
            stats: &stats,
            partials: &partials,
            max_dim,
        };
        let slots = params
            .iter()
            .zip(&ranges)
            .map(|(p, ranges)| binder.slot(p, ranges))
            .collect::<Result<Vec<Slot>, OptimError>>()?;
        let bind = |pipeline: &wgpu::ComputePipeline, buffers: &[&wgpu::Buffer]| {
            bind_group(device, pipeline, &whole(buffers))
        };
        let track = bind(&pipelines.track, &[&scalars, loss, ce, &stats]);
        let finalize = bind(&pipelines.finalize, &[&scalars, &partials, &stats]);
        let expert_lr = experts
            .layers
            .iter()
            .map(|(layer, load)| {
                let info = gpu.storage_buffer("expert lr layer", 8);
                gpu.queue.write_buffer(&info, 0, bytemuck::bytes_of(layer));
                let sum = gpu.storage_buffer("expert load sum", 4 * layer.experts as u64);
                bind(&pipelines.expert_lr, &[&scalars, &info, load, &sum, &stats])
            })
            .collect();
        if let Some(error) = pollster::block_on(scope.pop()) {
            return Err(RuntimeError::Pipeline {
                kernel: "optimizer".into(),
                message: error.to_string(),
            }
            .into());
        }
        Ok(Optimizer {
            gpu,
            settings: settings.clone(),
            slots,
            pipelines,
            update: update.list.into_inner(),
            scalars,
            stats,
            track,
            finalize,
            expert_lr,
            loss_seed: None,
            host: HostState::default(),
            current: Scalars::default(),
        })
    }

    pub fn settings(&self) -> &OptimSettings {
        &self.settings
    }

    fn is_schedule_free(&self) -> bool {
        matches!(
            self.settings.optimizer,
            OptimizerSpec::ScheduleFreeAdamW { .. }
        )
    }

    /// Computes the scalars of 0-based optimizer step `step` (and advances schedule-free's running
    /// sums); call once per step, before its micro-steps. Returns the group learning rates.
    pub fn prepare_step(&mut self, step: usize) -> [f64; 2] {
        let lrs = self.settings.lrs_at(step);
        let t = (step + 1) as i32;
        let mut s = Scalars {
            step: step as u32,
            ..Scalars::default()
        };
        match self.settings.optimizer {
            OptimizerSpec::AdamW { betas, .. } => {
                adam_scalars(&mut s, [lrs[0], lrs[1], lrs[0]], betas, t);
            }
            OptimizerSpec::ScheduleFreeAdamW { betas, .. } => {
                let bc2 = 1.0 - betas.1.powi(t);
                for (g, &base) in lrs.iter().enumerate() {
                    let lr = base * bc2.sqrt();
                    self.host.lr_max[g] = self.host.lr_max[g].max(lr);
                    let weight = self.host.lr_max[g] * self.host.lr_max[g];
                    self.host.weight_sum[g] += weight;
                    s.lr[g] = lr as f32;
                    s.ckp1[g] = if self.host.weight_sum[g] > 0.0 {
                        (weight / self.host.weight_sum[g]) as f32
                    } else {
                        0.0
                    };
                }
            }
            OptimizerSpec::Adafactor { decay, .. } => {
                s.lr = [lrs[0] as f32, lrs[1] as f32, 0.0];
                s.beta2t = (1.0 - (t as f64).powf(decay)) as f32;
            }
            OptimizerSpec::Sgd { .. } => {
                s.lr = [lrs[0] as f32, lrs[1] as f32, 0.0];
            }
            OptimizerSpec::Shampoo { betas, .. } => {
                adam_scalars(&mut s, [lrs[0], lrs[1], lrs[0]], betas, t);
            }
            OptimizerSpec::Muon { adamw, .. } => {
                let adam = self.settings.adam_lr_at(step);
                adam_scalars(&mut s, [lrs[0], lrs[1], adam], adamw.betas, t);
            }
        }
        self.current = s;
        lrs
    }

    /// Writes the scalars for micro-step `micro` of the prepared step (before its submission).
    pub fn write_micro(&mut self, micro: usize) {
        self.current.micro = micro as u32;
        self.gpu
            .queue
            .write_buffer(&self.scalars, 0, bytemuck::bytes_of(&self.current));
    }

    /// Records what follows each micro-step's plan: loss tracking, the adaptive expert lr multipliers
    /// and gradient accumulation.
    pub fn encode_micro(&self, pass: &mut wgpu::ComputePass<'_>) {
        pass.set_pipeline(&self.pipelines.track);
        pass.set_bind_group(0, &self.track, &[]);
        pass.dispatch_workgroups(1, 1, 1);
        pass.set_pipeline(&self.pipelines.expert_lr);
        for group in &self.expert_lr {
            pass.set_bind_group(0, group, &[]);
            pass.dispatch_workgroups(1, 1, 1);
        }
        for k in self.slices() {
            if let Some(group) = &k.accumulate {
                pass.set_pipeline(&self.pipelines.accumulate);
                pass.set_bind_group(0, group, &[]);
                pass.dispatch_workgroups(k.grid[0], k.grid[1], k.grid[2]);
            }
        }
    }

    /// Records the gradient norm, clip scale and the update of every parameter (after the last
    /// micro-step's [`Optimizer::encode_micro`]).
    /// On Shampoo's root steps it stops before the preconditioned updates, which
    /// [`Optimizer::finish_step`] runs once the roots are computed.
    pub fn encode_update(&self, pass: &mut wgpu::ComputePass<'_>) {
        pass.set_pipeline(&self.pipelines.sumsq);
        for k in self.slices() {
            pass.set_bind_group(0, &k.sumsq, &[]);
            pass.dispatch_workgroups(k.sumsq_groups, 1, 1);
        }
        pass.set_pipeline(&self.pipelines.finalize);
        pass.set_bind_group(0, &self.finalize, &[]);
        pass.dispatch_workgroups(1, 1, 1);
        let root_step = self.is_root_step();
        self.encode_stages(pass, |stage| !(root_step && stage.after_roots));
    }

    /// The slices of every parameter with a gradient, in order.
    fn slices(&self) -> impl Iterator<Item = &SliceKernels> {
        self.slots
            .iter()
            .filter_map(|s| s.kernels.as_ref())
            .flat_map(|k| &k.slices)
    }

    /// Every parameter's update stages that `keep` selects, in order.
    fn encode_stages(&self, pass: &mut wgpu::ComputePass<'_>, keep: impl Fn(&Stage) -> bool) {
        for k in self.slots.iter().filter_map(|s| s.kernels.as_ref()) {
            for stage in k.update.iter().filter(|s| keep(s)) {
                pass.set_pipeline(&self.update[stage.pipeline]);
                pass.set_bind_group(0, &stage.group, &[]);
                pass.dispatch_workgroups(stage.grid[0], stage.grid[1], stage.grid[2]);
            }
        }
    }

    /// Whether the prepared step is a Shampoo root step (0-based step a multiple of `root_every`).
    fn is_root_step(&self) -> bool {
        match self.settings.optimizer {
            OptimizerSpec::Shampoo { root_every, .. } => {
                (self.current.step as usize).is_multiple_of(root_every)
            }
            OptimizerSpec::AdamW { .. }
            | OptimizerSpec::Sgd { .. }
            | OptimizerSpec::Adafactor { .. }
            | OptimizerSpec::ScheduleFreeAdamW { .. }
            | OptimizerSpec::Muon { .. } => false,
        }
    }

    /// Completes the step after the submission holding [`Optimizer::encode_update`]: on Shampoo's
    /// root steps reads every L and R, computes their inverse fourth roots in f64 on the host,
    /// uploads them and submits the preconditioned updates. Does nothing on other steps and for
    /// other optimizers (no readback).
    pub fn finish_step(&self) -> Result<(), OptimError> {
        let OptimizerSpec::Shampoo { eps, .. } = self.settings.optimizer else {
            return Ok(());
        };
        if !self.is_root_step() {
            return Ok(());
        }
        for slot in self.slots.iter().filter(|s| s.kernels.is_some()) {
            matrix::update_roots(self.gpu, &slot.name, &slot.state, eps)?;
        }
        self.gpu
            .run_pass(|pass| self.encode_stages(pass, |stage| stage.after_roots))?;
        Ok(())
    }

    /// Reads the stats of the last step (waits for the GPU).
    pub fn stats(&self) -> Result<StepStats, OptimError> {
        let words: Vec<u32> =
            bytemuck::pod_collect_to_vec(&self.gpu.read_buffer(&self.stats, STATS_BYTES)?);
        let a = self.settings.accumulate as f32;
        Ok(StepStats {
            loss: f32::from_bits(words[0]) / a,
            ce: f32::from_bits(words[1]) / a,
            grad_norm: f32::from_bits(words[2]),
            clip_scale: f32::from_bits(words[3]),
            bad_step: (words[4] == 1).then_some(words[5]),
            loss_scale: f32::from_bits(words[6]),
            skipped: words[8],
        })
    }

    /// The loss scale's state (waits for the GPU), for checkpoints.
    pub fn loss_scale_state(&self) -> Result<LossScaleState, OptimError> {
        let words: Vec<u32> =
            bytemuck::pod_collect_to_vec(&self.gpu.read_buffer(&self.stats, STATS_BYTES)?);
        Ok(LossScaleState {
            scale: f32::from_bits(words[6]),
            good_steps: words[7],
            skipped: words[8],
        })
    }

    /// Restores a checkpoint's loss-scale state.
    pub fn restore_loss_scale(&self, state: &LossScaleState) {
        write_loss_scale(self.gpu, &self.stats, state);
    }

    /// Under loss scaling, binds the kernel that writes the plan's `grad_seed` input (f32`[1]`) from
    /// the GPU-held scale before every micro-step ([`Optimizer::encode_seed`]); without it, nothing
    /// (the host writes `1 / accumulate` once).
    pub fn scale_loss_into(&mut self, grad_seed: &wgpu::Buffer) -> Result<(), OptimError> {
        if !self.settings.loss_scaling {
            return Ok(());
        }
        let device = &self.gpu.device;
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let header = format!(
            "const ACCUMULATE: u32 = {}u;\n{PRELUDE}\n",
            self.settings.accumulate
        );
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("optim_loss_seed"),
            source: wgpu::ShaderSource::Wgsl(format!("{header}{LOSS_SEED}").into()),
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some("optim_loss_seed"),
            layout: None,
            module: &module,
            entry_point: Some("main"),
            compilation_options: Default::default(),
            cache: self.gpu.pipeline_cache(),
        });
        let group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("optim_loss_seed"),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: self.stats.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: grad_seed.as_entire_binding(),
                },
            ],
        });
        if let Some(error) = pollster::block_on(scope.pop()) {
            return Err(RuntimeError::Pipeline {
                kernel: "optim_loss_seed".into(),
                message: error.to_string(),
            }
            .into());
        }
        self.loss_seed = Some((pipeline, group));
        Ok(())
    }

    /// Records the `grad_seed` write of loss scaling (before each micro-step's plan); nothing
    /// without it.
    pub fn encode_seed(&self, pass: &mut wgpu::ComputePass<'_>) {
        if let Some((pipeline, group)) = &self.loss_seed {
            pass.set_pipeline(pipeline);
            pass.set_bind_group(0, group, &[]);
            pass.dispatch_workgroups(1, 1, 1);
        }
    }

    /// The buffers a forward-only plan should read the weights from: x for schedule-free (the
    /// averaged weights), the param buffers otherwise.
    pub fn eval_params(&self) -> HashMap<String, wgpu::Buffer> {
        self.slots
            .iter()
            .map(|s| (s.name.clone(), self.weights(s).clone()))
            .collect()
    }

    /// The buffer holding a parameter's model weights: x for schedule-free (when it has state),
    /// else the param buffer.
    fn weights<'a>(&self, slot: &'a Slot) -> &'a wgpu::Buffer {
        slot.state
            .iter()
            .find(|s| s.suffix == "x")
            .map(|s| &s.buffer)
            .unwrap_or(&slot.param)
    }

    /// Whether the param buffer holds y rather than the weights (schedule-free, trained params).
    fn param_is_y(&self, slot: &Slot) -> bool {
        self.is_schedule_free() && slot.kernels.is_some()
    }

    /// Sets the starting weights (`init_params` values, by name): the param buffers, and x and z for
    /// schedule-free. Other state starts at zero. Names the optimizer does not know are ignored.
    pub fn init(&self, weights: &HashMap<String, Vec<f32>>) -> Result<(), OptimError> {
        for slot in &self.slots {
            let data = weights
                .get(&slot.name)
                .ok_or_else(|| OptimError::Missing(slot.name.clone()))?;
            if data.len() != slot.numel {
                return Err(OptimError::Shape {
                    name: slot.name.clone(),
                    expected: slot.shape.clone(),
                    got: vec![data.len()],
                });
            }
            let bytes: &[u8] = bytemuck::cast_slice(data);
            self.gpu.queue.write_buffer(&slot.param, 0, bytes);
            for s in &slot.state {
                if matches!(s.suffix, "x" | "z") {
                    self.gpu.queue.write_buffer(&s.buffer, 0, bytes);
                }
            }
        }
        Ok(())
    }

    /// Host state for checkpoints.
    pub fn host_state(&self) -> &HostState {
        &self.host
    }

    /// Every tensor a checkpoint needs, under IR names: the weights (`<name>`; x for schedule-free)
    /// and the state (`optim.<name>.<suffix>`, plus `optim.<name>.y` for schedule-free).
    pub fn checkpoint_tensors(&self) -> Result<Vec<(String, Tensor)>, OptimError> {
        let mut out = Vec::new();
        for slot in &self.slots {
            let param = self.gpu.read_buffer_f32(&slot.param, slot.numel)?;
            if self.param_is_y(slot) {
                out.push((
                    format!("optim.{}.y", slot.name),
                    (slot.shape.clone(), param),
                ));
            } else {
                out.push((slot.name.clone(), (slot.shape.clone(), param)));
            }
            for s in &slot.state {
                let len: usize = s.shape.iter().product();
                let data = self.gpu.read_buffer_f32(&s.buffer, s.offset + len)?;
                out.push((
                    state_name(slot, s),
                    (s.shape.clone(), data[s.offset..].to_vec()),
                ));
            }
        }
        Ok(out)
    }

    /// Restores what [`Optimizer::checkpoint_tensors`] saved (IR names) and the host state.
    pub fn restore(
        &mut self,
        tensors: &BTreeMap<String, Tensor>,
        host: &HostState,
    ) -> Result<(), OptimError> {
        for slot in &self.slots {
            let write = |name: String,
                         expected: &[usize],
                         buffer: &wgpu::Buffer,
                         offset: usize|
             -> Result<(), OptimError> {
                let (shape, data) = tensors
                    .get(&name)
                    .ok_or_else(|| OptimError::Missing(name.clone()))?;
                if shape != expected || data.len() != expected.iter().product::<usize>() {
                    return Err(OptimError::Shape {
                        name,
                        expected: expected.to_vec(),
                        got: shape.clone(),
                    });
                }
                self.gpu
                    .queue
                    .write_buffer(buffer, 4 * offset as u64, bytemuck::cast_slice(data));
                Ok(())
            };
            if self.param_is_y(slot) {
                write(
                    format!("optim.{}.y", slot.name),
                    &slot.shape,
                    &slot.param,
                    0,
                )?;
            } else {
                write(slot.name.clone(), &slot.shape, &slot.param, 0)?;
            }
            for s in &slot.state {
                write(state_name(slot, s), &s.shape, &s.buffer, s.offset)?;
            }
        }
        self.host = host.clone();
        Ok(())
    }
}

/// The optimizer's own part of its update kernels.
struct UpdateKernels {
    /// WGSL constants of its hyperparameters.
    consts: String,
    /// Its update stages (label, body), in pipeline order.
    stages: Vec<(&'static str, String)>,
    /// The weight decay of the parameters it updates itself.
    weight_decay: f64,
}

/// The constants of an Adam-style moment update.
fn adam_consts(betas: (f64, f64), eps: f64) -> String {
    format!(
        "const BETA1: f32 = {};\nconst BETA2: f32 = {};\nconst EPS: f32 = {};\n",
        lit(betas.0),
        lit(betas.1),
        lit(eps)
    )
}

impl UpdateKernels {
    fn of(optimizer: &OptimizerSpec) -> UpdateKernels {
        let (consts, stages, weight_decay) = match *optimizer {
            OptimizerSpec::AdamW {
                betas,
                eps,
                weight_decay,
                ..
            } => (
                adam_consts(betas, eps),
                vec![("optim_adamw", ADAMW.into())],
                weight_decay,
            ),
            OptimizerSpec::Sgd { momentum, .. } if momentum != 0.0 => (
                format!("const MOMENTUM: f32 = {};\n", lit(momentum)),
                vec![("optim_sgd", SGD.into())],
                0.0,
            ),
            OptimizerSpec::Sgd { .. } => (
                String::new(),
                vec![("optim_sgd_plain", SGD_PLAIN.into())],
                0.0,
            ),
            OptimizerSpec::ScheduleFreeAdamW {
                betas,
                eps,
                weight_decay,
                ..
            } => (
                adam_consts(betas, eps),
                vec![("optim_schedule_free", SCHEDULE_FREE.into())],
                weight_decay,
            ),
            OptimizerSpec::Adafactor { eps, .. } => (
                format!(
                    "const EPS: f32 = {};\nconst CLIP_THRESHOLD: f32 = {};\n",
                    lit(eps),
                    lit(CLIP_THRESHOLD)
                ),
                vec![
                    (
                        "optim_adafactor_moments",
                        format!("{WORKGROUP_SUM}{ADAFACTOR_MOMENTS}"),
                    ),
                    (
                        "optim_adafactor_rms",
                        format!("{WORKGROUP_SUM}{ADAFACTOR_COMMON}{ADAFACTOR_RMS}"),
                    ),
                    ("optim_adafactor", format!("{ADAFACTOR_COMMON}{ADAFACTOR}")),
                ],
                0.0,
            ),
            OptimizerSpec::Shampoo {
                betas,
                eps,
                decay,
                weight_decay,
                ..
            } => (
                format!(
                    "{}const DECAY: f32 = {};\n",
                    adam_consts(betas, eps),
                    lit(decay)
                ),
                matrix::SHAMPOO_STAGES
                    .iter()
                    .map(|(name, body)| (*name, body.to_string()))
                    .collect(),
                weight_decay,
            ),
            OptimizerSpec::Muon {
                momentum,
                nesterov,
                weight_decay,
                adamw,
                ..
            } => (
                format!(
                    "{}const MOMENTUM: f32 = {};\nconst NESTEROV: bool = {nesterov};\n{}",
                    adam_consts(adamw.betas, adamw.eps),
                    lit(momentum),
                    matrix::ns_consts()
                ),
                matrix::MUON_STAGES
                    .iter()
                    .map(|(name, body)| (*name, body.to_string()))
                    .collect(),
                weight_decay,
            ),
        };
        UpdateKernels {
            consts,
            stages,
            weight_decay,
        }
    }
}

/// What every optimizer kernel starts with: the run's settings as constants, the optimizer's
/// constants and the shared prelude.
fn kernel_header(settings: &OptimSettings, consts: &str) -> String {
    format!(
        "const CLIP: f32 = {};\nconst LOSS_SCALING: u32 = {}u;\nconst GROWTH_INTERVAL: u32 = {GROWTH_INTERVAL}u;\nconst ACCUMULATE: u32 = {}u;\n{consts}{PRELUDE}\n",
        lit(settings.clip.unwrap_or(0.0)),
        u32::from(settings.loss_scaling),
        settings.accumulate
    )
}

/// `expert_lr = adaptive`: each MoE layer's multipliers sit at Stats.lr_scale[offset..offset + E],
/// after the constant 1 at index 0. Empty for any other `expert_lr`.
#[derive(Default)]
struct ExpertScales<'a> {
    /// Each layer and its load output.
    layers: Vec<(ExpertLayer, &'a wgpu::Buffer)>,
    /// Each expert parameter's layer offset and expert count.
    expert_of: HashMap<&'a str, (u32, usize)>,
}

impl<'a> ExpertScales<'a> {
    /// Refuses an expert stack whose leading dimension is not its layer's expert count, and an
    /// expert parameter with a gradient but no load output to adapt its rate to.
    fn new(
        settings: &OptimSettings,
        params: &'a [ParamBinding],
        loads: &'a [ExpertLoad],
    ) -> Result<ExpertScales<'a>, OptimError> {
        let mut scales = ExpertScales::default();
        if !matches!(settings.expert_lr, Some(ExpertLr::Adaptive { .. })) {
            return Ok(scales);
        }
        let mut next = 1u32;
        for layer in loads {
            let shapes: Vec<&ParamBinding> = params
                .iter()
                .filter(|p| layer.params.contains(&p.name))
                .collect();
            let Some(first) = shapes.first() else {
                continue;
            };
            let experts = first.shape.first().copied().unwrap_or(0);
            for p in &shapes {
                if p.shape.len() < 2
                    || p.shape[0] != experts
                    || experts == 0
                    || layer.load.size() < 4 * experts as u64
                {
                    return Err(OptimError::ExpertCount {
                        name: p.name.clone(),
                        shape: p.shape.clone(),
                        experts,
                    });
                }
                scales.expert_of.insert(&p.name, (next, experts));
            }
            scales.layers.push((
                ExpertLayer {
                    offset: next,
                    experts: experts as u32,
                },
                &layer.load,
            ));
            next += experts as u32;
        }
        if let Some(p) = params.iter().find(|p| {
            p.grad.is_some()
                && is_expert(&p.name)
                && !scales.expert_of.contains_key(p.name.as_str())
        }) {
            return Err(OptimError::NoExpertLoad(p.name.clone()));
        }
        Ok(scales)
    }

    /// The length of Stats.lr_scale.
    fn count(&self) -> u64 {
        1 + self
            .layers
            .iter()
            .map(|(l, _)| l.experts as u64)
            .sum::<u64>()
    }
}

/// The stats buffer with its `scales` learning-rate multipliers at 1 and the loss scale at its
/// start: the first step reads both before any kernel writes them.
fn stats_buffer(gpu: &Gpu, settings: &OptimSettings, scales: u64) -> wgpu::Buffer {
    let stats = gpu.storage_buffer("optim stats", STATS_BYTES + 4 * scales);
    gpu.queue.write_buffer(
        &stats,
        STATS_BYTES,
        bytemuck::cast_slice(&vec![1.0f32; scales as usize]),
    );
    let initial = LossScaleState {
        scale: if settings.loss_scaling {
            INITIAL_LOSS_SCALE
        } else {
            1.0
        },
        good_steps: 0,
        skipped: 0,
    };
    write_loss_scale(gpu, &stats, &initial);
    stats
}

/// One slice of a parameter and its slots in the clip's partial-sums buffer.
#[derive(Clone, Copy)]
struct SliceRange {
    start: usize,
    len: usize,
    /// Its first partial-sum slot.
    slot: u64,
    /// Its partial sums of squares (0 for a parameter without gradient).
    groups: u64,
}

/// Every parameter's slices and the total of their partial sums, planned before any slot is
/// bound because that total sizes the partials buffer they all bind.
fn slice_ranges_of(
    params: &[ParamBinding],
    limit: u64,
    max_dim: u32,
) -> (Vec<Vec<SliceRange>>, u64) {
    let mut ranges = Vec::with_capacity(params.len());
    let mut total_partials = 0u64;
    for p in params {
        let sliced = slice_ranges(&p.shape, limit);
        let mut slots = Vec::with_capacity(sliced.len());
        for (start, len) in sliced {
            let groups = if p.grad.is_some() {
                (len as u64).div_ceil(SUMSQ_CHUNK).clamp(1, max_dim as u64)
            } else {
                0
            };
            slots.push(SliceRange {
                start,
                len,
                slot: total_partials,
                groups,
            });
            total_partials += groups;
        }
        ranges.push(slots);
    }
    (ranges, total_partials)
}

/// What every parameter's slot binds besides its own buffers, while the optimizer is built.
struct SlotBinder<'a> {
    gpu: &'a Gpu,
    settings: &'a OptimSettings,
    layout: Layout,
    /// The optimizer's own weight decay ([`UpdateKernels::weight_decay`]).
    weight_decay: f64,
    expert_of: &'a HashMap<&'a str, (u32, usize)>,
    target: &'a Target,
    pipelines: &'a Pipelines,
    update: &'a UpdatePipelines<'a>,
    scalars: &'a wgpu::Buffer,
    stats: &'a wgpu::Buffer,
    partials: &'a wgpu::Buffer,
    max_dim: u32,
}

impl SlotBinder<'_> {
    /// A parameter's state and kernels over its slices `ranges`; refuses a sliced parameter the
    /// optimizer's matrix kernels need whole.
    fn slot(&self, p: &ParamBinding, ranges: &[SliceRange]) -> Result<Slot, OptimError> {
        let numel: usize = p.shape.iter().product();
        let bytes = 4 * numel as u64;
        let Some(plan_grad) = &p.grad else {
            return Ok(Slot {
                name: p.name.clone(),
                shape: p.shape.clone(),
                numel,
                param: p.param.clone(),
                state: Vec::new(),
                kernels: None,
            });
        };
        let kind = ParamKind::of(self.layout, &p.name, &p.shape);
        if ranges.len() > 1 && !self.settings.updates_in_slices(&p.name, &p.shape) {
            return Err(OptimError::TooLarge {
                name: p.name.clone(),
                bytes,
                limit: self.target.max_storage_binding_size,
                why: MATRIX_WHOLE,
            });
        }
        let info = self.param_info(p, kind);
        let slices = self.slices(p, ranges, info);
        let acc = (self.settings.accumulate > 1).then(|| {
            self.gpu
                .storage_buffer(&format!("{} accumulated grad", p.name), bytes)
        });
        let grad = acc.as_ref().unwrap_or(plan_grad);
        let ctx = SlotContext {
            gpu: self.gpu,
            target: self.target,
            pipelines: self.update,
            name: &p.name,
            shape: &p.shape,
            info: &slices[0].info,
            slices: &slices,
            scalars: self.scalars,
            stats: self.stats,
            param: &p.param,
            grad,
            max_dim: self.max_dim,
        };
        let built = match (self.layout, kind) {
            (Layout::Elementwise(suffixes), _) => ctx.elementwise(suffixes),
            (_, ParamKind::Adam) => ctx.elementwise(&["m", "v"]),
            (Layout::Adafactor, _) => ctx.adafactor(info.chunks as usize),
            (Layout::Shampoo { .. }, _) => ctx.shampoo(),
            (Layout::Muon { ns_steps, .. }, _) => ctx.muon(ns_steps),
        };
        let slice_kernels = slices
            .iter()
            .zip(ranges)
            .map(|(slice, range)| self.slice_kernels(slice, range, plan_grad, acc.as_ref(), grad))
            .collect();
        Ok(Slot {
            name: p.name.clone(),
            shape: p.shape.clone(),
            numel,
            param: p.param.clone(),
            state: built.state,
            kernels: Some(SlotKernels {
                slices: slice_kernels,
                update: built.update,
            }),
        })
    }

    /// The info block of a parameter updated as `kind`, before its slice fields are set.
    fn param_info(&self, p: &ParamBinding, kind: ParamKind) -> ParamInfo {
        let numel: usize = p.shape.iter().product();
        let (matrices, rows, cols, factored) = factoring(&p.shape);
        let chunks = ((rows * cols) as u64)
            .div_ceil(SUMSQ_CHUNK)
            .clamp(1, MAX_RMS_CHUNKS);
        let (lr_scale, experts) = self
            .expert_of
            .get(p.name.as_str())
            .copied()
            .unwrap_or((0, 1));
        // Muon's AdamW parameters: their own group (learning rate) and weight decay.
        let adam_of_muon = match self.layout {
            Layout::Muon { adam_decay, .. } if kind == ParamKind::Adam => Some(adam_decay),
            Layout::Muon { .. }
            | Layout::Elementwise(_)
            | Layout::Adafactor
            | Layout::Shampoo { .. } => None,
        };
        let group = if is_expert(&p.name) {
            1
        } else if adam_of_muon.is_some() {
            2
        } else {
            0
        };
        let decay = adam_of_muon.unwrap_or(self.weight_decay);
        ParamInfo {
            group,
            decay: if decays(&p.shape) { decay as f32 } else { 0.0 },
            slot: 0,
            partials: 0,
            lr_scale,
            expert_size: (numel / experts).max(1) as u32,
            matrices: matrices as u32,
            rows: rows as u32,
            cols: cols as u32,
            chunks: chunks as u32,
            factored: factored as u32,
            base: 0,
        }
    }

    /// Each slice of the parameter with its own info block: `info` with the slice's partial-sum
    /// slots and first element.
    fn slices(&self, p: &ParamBinding, ranges: &[SliceRange], info: ParamInfo) -> Vec<Slice> {
        ranges
            .iter()
            .map(|range| {
                let info = ParamInfo {
                    slot: range.slot as u32,
                    partials: range.groups as u32,
                    base: range.start as u32,
                    ..info
                };
                let buffer = self.gpu.storage_buffer(
                    &format!("{} info", p.name),
                    std::mem::size_of::<ParamInfo>() as u64,
                );
                self.gpu
                    .queue
                    .write_buffer(&buffer, 0, bytemuck::bytes_of(&info));
                Slice {
                    start: range.start,
                    len: range.len,
                    info: buffer,
                }
            })
            .collect()
    }

    /// One slice's accumulation (into `acc`, under `accumulate > 1`) and clip sums of squares of
    /// `grad`, the gradient the update reads.
    fn slice_kernels(
        &self,
        slice: &Slice,
        range: &SliceRange,
        plan_grad: &wgpu::Buffer,
        acc: Option<&wgpu::Buffer>,
        grad: &wgpu::Buffer,
    ) -> SliceKernels {
        let device = &self.gpu.device;
        SliceKernels {
            accumulate: acc.map(|a| {
                bind_group(
                    device,
                    &self.pipelines.accumulate,
                    &[
                        self.scalars.as_entire_buffer_binding(),
                        range_of(plan_grad, slice),
                        range_of(a, slice),
                    ],
                )
            }),
            sumsq: bind_group(
                device,
                &self.pipelines.sumsq,
                &[
                    slice.info.as_entire_buffer_binding(),
                    range_of(grad, slice),
                    self.partials.as_entire_buffer_binding(),
                ],
            ),
            sumsq_groups: range.groups as u32,
            grid: grid(slice.len, self.max_dim),
        }
    }
}

/// Writes the loss-scale words of the stats buffer.
fn write_loss_scale(gpu: &Gpu, stats: &wgpu::Buffer, state: &LossScaleState) {
    let words = [state.scale.to_bits(), state.good_steps, state.skipped];
    gpu.queue
        .write_buffer(stats, LOSS_SCALE_AT, bytemuck::cast_slice(&words));
}

/// Adam's scalars of step `t` (1-based) for the three groups' learning rates `lrs`.
fn adam_scalars(s: &mut Scalars, lrs: [f64; 3], betas: (f64, f64), t: i32) {
    let bc1 = 1.0 - betas.0.powi(t);
    for (g, &lr) in lrs.iter().enumerate() {
        s.lr[g] = lr as f32;
        s.step_size[g] = (lr / bc1) as f32;
    }
    s.bc1 = bc1 as f32;
    s.bc2_sqrt = (1.0 - betas.1.powi(t)).sqrt() as f32;
}

/// Checkpoint name of a state tensor: the weights for schedule-free's x, else `optim.<name>.<suffix>`.
fn state_name(slot: &Slot, state: &State) -> String {
    if state.suffix == "x" {
        slot.name.clone()
    } else {
        format!("optim.{}.{}", slot.name, state.suffix)
    }
}
