// Shared by the optimizer, clip and accumulate kernels (runtime/src/optim.rs). The Rust side puts the
// optimizer's constants (BETA1, BETA2, EPS, MOMENTUM, CLIP, CLIP_THRESHOLD, DECAY, NESTEROV, NS_A,
// NS_B, NS_C) in front of this file.

// Written by the host once per micro-step (one small write, no readback).
struct Scalars {
    // Learning rate of parameter group 0 (everything else), 1 (experts, `expert_lr`) and 2 (the
    // parameters muon gives its `adamw`).
    lr: array<f32, 3>,
    // AdamW (and the Adam of Shampoo and Muon): lr / (1 - beta1^t) per group.
    step_size: array<f32, 3>,
    // Schedule-free: the averaging weight c_{t+1} per group.
    ckp1: array<f32, 2>,
    // AdamW: sqrt(1 - beta2^t).
    bc2_sqrt: f32,
    // Micro-step index within the optimizer step (gradient accumulation).
    micro: u32,
    // 0-based optimizer step, recorded when a step goes non-finite.
    step: u32,
    // Adafactor: the second-moment decay 1 - t^decay of this step.
    beta2t: f32,
    // Shampoo: 1 - beta1^t (Adam's direction for grafting).
    bc1: f32,
}

// Written by the GPU: the step's tracked losses, the gradient norm and the gradient multiplier
// (clip and loss-scale), `bad`: 1 is a sticky flag that stops every later update once a step went
// non-finite, 2 skips this step's update only (an overflow under loss scaling); the dynamic loss
// scale (1 without `precision = f16`), its run of finite steps and the count of skipped steps
// (GradScaler semantics, clip_finalize.wgsl); and the learning-rate multipliers:
// lr_scale[0] = 1 (every parameter outside `expert_lr = adaptive`), then one per expert of each MoE
// layer (optim_expert_lr.wgsl). They live here rather than in a buffer of their own because the
// schedule-free kernel already binds 8 storage buffers, WebGPU's default limit.
struct Stats {
    loss: f32,
    ce: f32,
    norm: f32,
    scale: f32,
    bad: u32,
    bad_step: u32,
    loss_scale: f32,
    good_steps: u32,
    skipped: u32,
    lr_scale: array<f32>,
}

// One per parameter, written once at startup.
struct ParamInfo {
    // Index into Scalars.lr / step_size / ckp1.
    group: u32,
    // The weight decay applied to this parameter (0 for norms and biases).
    decay: f32,
    // First slot of this parameter's partial sums of squares, and how many workgroups write them.
    slot: u32,
    partials: u32,
    // Element i's lr multiplier is Stats.lr_scale[lr_scale + i / expert_size] (lr_scale_index).
    lr_scale: u32,
    expert_size: u32,
    // Adafactor's, Shampoo's and Muon's view of the parameter: `matrices` stacked [rows, cols]
    // matrices (the last two axes) when `factored`, else one vector (matrices = 1, rows = its
    // length, cols = 1); Adafactor's `chunks` workgroups per matrix write the partial sums of the
    // squared update (its RMS).
    matrices: u32,
    rows: u32,
    cols: u32,
    chunks: u32,
    factored: u32,
    // First element of the slice this block describes (0 unless the parameter is over one storage
    // binding and its elementwise kernels run per slice, each binding its byte range).
    base: u32,
}

const WG: u32 = 256u;

// Elementwise kernels fold their grid into x and y; the linear element index of an invocation.
fn linear_index(wg: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wg.x + wg.y * nwg.x) * WG + lid;
}

// Index into Stats.lr_scale of element i (of the slice) of the parameter's learning-rate multiplier.
fn lr_scale_index(info: ParamInfo, i: u32) -> u32 {
    return info.lr_scale + (info.base + i) / info.expert_size;
}

// No isnan/isinf in WGSL, and fast-math may fold x != x: test the exponent bits instead.
fn is_finite(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u;
}
