//! moec's compiler passes, in pipeline order (docs/DECISIONS.md, "Architecture"):
//! `check` (AST → [`spec::Spec`]) → `lower` (Spec → [`ir::Graph`]) → `fuse` (Graph → kernel groups)
//! → `emit` (groups → WGSL + [`plan::Plan`]), plus `interp`, the reference interpreter every kernel
//! is tested against, and `stats`, the numbers `moec check` prints.

pub mod autodiff;
pub mod check;
pub mod emit;
pub mod fuse;
pub mod interp;
pub mod ir;
pub mod lower;
pub mod plan;
pub mod precision;
pub mod spec;
pub mod stats;

use emit::Target;
use fuse::{FuseOptions, Fused};
use ir::Graph;
use plan::Plan;
use spec::Spec;

/// Everything after `check` failed: lowering or emitting.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error(transparent)]
    Lower(#[from] lower::LowerError),
    #[error(transparent)]
    Emit(#[from] emit::EmitError),
    #[error(transparent)]
    Autodiff(#[from] autodiff::AutodiffError),
}

/// The stages of one compilation, kept so callers can dump or test any of them.
pub struct Compiled {
    pub graph: Graph,
    pub fused: Fused,
    pub plan: Plan,
}

/// Spec → Graph → kernel groups → Plan: the whole compiler after `check`, as every command and test
/// runs it. `fusion = false` gives one kernel per op (`--no-fuse`).
pub fn compile(
    spec: &Spec,
    batch: usize,
    target: &Target,
    fusion: bool,
) -> Result<Compiled, CompileError> {
    let mut graph = lower::lower(spec, batch)?;
    apply_precision(spec, &mut graph);
    let options = if fusion {
        FuseOptions::for_target(target)
    } else {
        FuseOptions::unfused(target)
    };
    let fused = fuse::fuse(&graph, options);
    let plan = emit::emit(&graph, &fused, target)?;
    Ok(Compiled { graph, fused, plan })
}

/// `precision = f16` in the spec's train block stores activations in f16 ([`precision::mark_f16`]);
/// the forward plan of evaluation follows the same dtypes as training.
pub fn apply_precision(spec: &Spec, graph: &mut Graph) {
    if spec
        .train
        .as_ref()
        .is_some_and(|t| t.precision == spec::Precision::F16)
    {
        precision::mark_f16(graph);
    }
}

/// Spec → forward Graph → training graph (forward + backward, [`autodiff::training_graph`]) → kernel
/// groups → Plan: what `moec train` runs each micro-step. Besides the forward outputs the plan has
/// the input `grad_seed` and one output `grad.<param>` per parameter that reaches the loss; the
/// optimizer update is not in the plan (the runtime's optimizer kernels run after it in the same
/// submission, with state the plan does not know about).
pub fn compile_training(
    spec: &Spec,
    batch: usize,
    target: &Target,
    fusion: bool,
) -> Result<Compiled, CompileError> {
    let forward = lower::lower(spec, batch)?;
    let mut graph = autodiff::training_graph(&forward)?;
    apply_precision(spec, &mut graph);
    let options = if fusion {
        FuseOptions::for_target(target)
    } else {
        FuseOptions::unfused(target)
    };
    let fused = fuse::fuse(&graph, options);
    let plan = emit::emit(&graph, &fused, target)?;
    Ok(Compiled { graph, fused, plan })
}
