//! The memory a run allocates, computed from its plans before any GPU work: what `moec check` prints,
//! `moec train` prints at startup and `moec bench` per plan.
//!
//! It is exact, not a bound: every byte comes from a buffer the runtime will create, counted the way
//! [`crate::Gpu::storage_buffer`] rounds it. A training run allocates
//! - the training plan's buffers: weights, gradients, and the activations and scratch of the whole
//!   step, shared by liveness (`moec_compiler::emit`);
//! - the eval plan's buffers, except its weights (the training weights, [`crate::Executor::with_shared`]),
//!   its router state (the training plan's), and every transient buffer that fits in a training
//!   buffer ([`moec_compiler::plan::Plan::lend`]);
//! - the optimizer's per-parameter buffers ([`OptimSettings::param_bytes`]).
//!
//! Only the optimizer's scalars, stats and clip partial sums (bytes to kilobytes) and transient
//! readback buffers are left out. `runtime/tests/memory.rs` checks the total against the bytes the
//! runtime allocates.

use crate::optim::OptimSettings;
use moec_compiler::autodiff::GRAD_PREFIX;
use moec_compiler::emit::Target;
use moec_compiler::ir::InputRole;
use moec_compiler::lower::Head;
use moec_compiler::plan::{BufferRole, Plan};
use moec_compiler::spec::Spec;
use moec_compiler::stats::human_bytes;
use moec_compiler::{compile_forward, CompileError};
use std::fmt;

/// Bytes by category.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryReport {
    pub weights: u64,
    pub grads: u64,
    /// Optimizer state (and accumulated gradients under `accumulate`).
    pub optimizer: u64,
    /// Everything else the plans allocate: activations kept for the backward pass, scratch, the
    /// data inputs and the outputs other than gradients.
    pub activations: u64,
}

/// Whether the eval plan reads the training plan's buffer for an input of this role rather than its
/// own: the router state, which the training step updates.
pub fn eval_shares_input(role: InputRole) -> bool {
    match role {
        InputRole::RouterState => true,
        InputRole::Data
        | InputRole::LogitRows
        | InputRole::LossSeed
        | InputRole::Noise
        | InputRole::Jitter => false,
    }
}

impl MemoryReport {
    /// A training run: the training plan, the eval plan (`forward`) and the optimizer.
    pub fn training(training: &Plan, forward: &Plan, settings: &OptimSettings) -> MemoryReport {
        let mut r = MemoryReport::default();
        for b in &training.buffers {
            match &b.role {
                BufferRole::Param { name, shape, .. } => {
                    r.weights += b.allocated();
                    let grad = format!("{GRAD_PREFIX}{name}");
                    if training.buffer_named(&grad).is_some() {
                        r.optimizer += settings.param_bytes(name, shape);
                    }
                }
                BufferRole::Output { name, .. } if name.starts_with(GRAD_PREFIX) => {
                    // A gradient's buffer may also hold larger activations before the gradient.
                    let grad = b.tensor_bytes().unwrap_or(0).next_multiple_of(4);
                    r.grads += grad;
                    r.activations += b.allocated() - grad;
                }
                _ => r.activations += b.allocated(),
            }
        }
        for (b, lent) in forward.buffers.iter().zip(training.lend(forward)) {
            let shared = match &b.role {
                BufferRole::Param { .. } => true,
                BufferRole::Input { role, .. } => eval_shares_input(*role),
                _ => lent.is_some(),
            };
            if !shared {
                r.activations += b.allocated();
            }
        }
        r
    }

    /// A forward-only run (a spec without a `train` block): weights and activations.
    pub fn forward(forward: &Plan) -> MemoryReport {
        let mut r = MemoryReport::default();
        for b in &forward.buffers {
            match b.role {
                BufferRole::Param { .. } => r.weights += b.allocated(),
                _ => r.activations += b.allocated(),
            }
        }
        r
    }

    pub fn total(&self) -> u64 {
        self.weights + self.grads + self.optimizer + self.activations
    }
}

impl fmt::Display for MemoryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = |n: u64| format!("{:>10}", human_bytes(n));
        writeln!(f, "    weights                {}", bytes(self.weights))?;
        writeln!(f, "    gradients              {}", bytes(self.grads))?;
        writeln!(f, "    optimizer state        {}", bytes(self.optimizer))?;
        writeln!(f, "    activations, scratch   {}", bytes(self.activations))?;
        write!(f, "    peak (allocated)       {}", bytes(self.total()))
    }
}

/// The report for `spec` as `moec train` would run it on `target` (fused), batch `batch`: the
/// training and eval plans when the spec has a `train` block, else the forward plan alone.
pub fn for_spec(spec: &Spec, batch: usize, target: &Target) -> Result<MemoryReport, CompileError> {
    Ok(match &spec.train {
        Some(train) => {
            let training = moec_compiler::compile_training(spec, batch, target, true)?.plan;
            let forward = compile_forward(spec, batch, target, true, Head::Loss)?.plan;
            MemoryReport::training(&training, &forward, &OptimSettings::from_train(train))
        }
        None => MemoryReport::forward(&moec_compiler::compile(spec, batch, target, true)?.plan),
    })
}
