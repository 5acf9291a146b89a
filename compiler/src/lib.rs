//! moec's compiler passes, in pipeline order (docs/DECISIONS.md, "Architecture"):
//! `check` (AST → [`spec::Spec`]) → `lower` (Spec → [`ir::Graph`]) → (`autodiff`, `recompute`) → `head`
//! (the fused LM head in chunks for the target) → `fuse` (Graph → kernel groups) → `emit`
//! (groups → WGSL + [`plan::Plan`]), plus `interp`, the reference interpreter every kernel
//! is tested against, and `stats`, the numbers `moec check` prints.

pub mod autodiff;
pub mod check;
pub mod emit;
pub mod fuse;
pub mod head;
pub mod interp;
pub mod ir;
pub mod lower;
pub mod plan;
pub mod precision;
pub mod recompute;
pub mod spec;
pub mod stats;
pub mod target;

use fuse::{FuseOptions, Fused};
use ir::Graph;
use lower::Head;
use plan::Plan;
use spec::{Recompute, Spec};
use target::Target;

/// Everything after `check` failed: lowering or emitting.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error(transparent)]
    Lower(#[from] lower::LowerError),
    #[error(transparent)]
    Emit(#[from] emit::EmitError),
    #[error(transparent)]
    Autodiff(#[from] autodiff::AutodiffError),
    #[error(transparent)]
    Ir(#[from] ir::IrError),
}

/// The stages of one compilation, kept so callers can dump or test any of them.
pub struct Compiled {
    pub graph: Graph,
    pub fused: Fused,
    pub plan: Plan,
}

/// Spec → Graph (with the full `logits`, [`Head::Logits`]) → kernel groups → Plan: the forward
/// pass as `moec build` and `moec forward` run it. `fusion = false` gives one kernel per op
/// (`--no-fuse`).
pub fn compile(
    spec: &Spec,
    batch: usize,
    target: &Target,
    fusion: bool,
) -> Result<Compiled, CompileError> {
    compile_forward(spec, batch, target, fusion, Head::Logits)
}

/// [`compile`] with the graph ending in `head`: [`Head::Loss`] for evaluation (the loss through
/// the chunked head, no logits), [`Head::Sampled`] for generation.
pub fn compile_forward(
    spec: &Spec,
    batch: usize,
    target: &Target,
    fusion: bool,
    head: Head,
) -> Result<Compiled, CompileError> {
    let mut graph = lower::lower_with(spec, batch, head)?;
    apply_precision(spec, &mut graph);
    backend(graph, target, fusion)
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

/// Spec → forward Graph ([`Head::Loss`]) → training graph (forward + backward, [`autodiff::training_graph`];
/// with `precision = f16`, activations marked f16, [`apply_precision`]; with `train.recompute`, the
/// chosen activations recomputed in the backward, [`recompute::recompute`], whose clones keep the
/// marked dtypes) → kernel groups → Plan: what `moec train` runs each micro-step. Besides the forward outputs the plan has
/// the input `grad_seed` and one output `grad.<param>` per parameter that reaches the loss; the
/// optimizer update is not in the plan (the runtime's optimizer kernels run after it in the same
/// submission, with state the plan does not know about).
pub fn compile_training(
    spec: &Spec,
    batch: usize,
    target: &Target,
    fusion: bool,
) -> Result<Compiled, CompileError> {
    let forward = lower::lower_with(spec, batch, Head::Loss)?;
    let mut graph = autodiff::training_graph(&forward)?;
    apply_precision(spec, &mut graph);
    let level = spec.train.as_ref().map_or(Recompute::None, |t| t.recompute);
    let graph = recompute::recompute(graph, forward.g.node_count(), level);
    backend(graph, target, fusion)
}

/// The target-dependent passes: the fused head in chunks ([`head::legalize`]; the head's input
/// stays f32 under `precision = f16`, its fused op reads f32 only), fusion, emission.
/// The returned graph is the legalized one, the graph the plan computes.
fn backend(graph: Graph, target: &Target, fusion: bool) -> Result<Compiled, CompileError> {
    let graph = head::legalize(&graph, target)?;
    let options = if fusion {
        FuseOptions::for_target(target)
    } else {
        FuseOptions::unfused(target)
    };
    let fused = fuse::fuse(&graph, options);
    let plan = emit::emit(&graph, &fused, target)?;
    Ok(Compiled { graph, fused, plan })
}
