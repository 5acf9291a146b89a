//! moec's compiler passes, in pipeline order (DESIGN.md):
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
pub fn compile(spec: &Spec, batch: usize, target: &Target, fusion: bool) -> Result<Compiled, CompileError> {
    let graph = lower::lower(spec, batch)?;
    let options = if fusion { FuseOptions::for_target(target) } else { FuseOptions::unfused(target) };
    let fused = fuse::fuse(&graph, options);
    let plan = emit::emit(&graph, &fused, target)?;
    Ok(Compiled { graph, fused, plan })
}

/// Spec → forward Graph → training graph (forward + backward, [`autodiff::training_graph`]) → kernel
/// groups → Plan: what `moec train` runs each micro-step. Besides the forward outputs the plan has
/// the input `grad_seed`, one output `grad.<param>` per parameter that reaches the loss, and the
/// routing outputs of every MoE block ([`route_output`], [`router_logits_output`]); the
/// optimizer update is not in the plan (the runtime's optimizer kernels run after it in the same
/// submission, with state the plan does not know about).
pub fn compile_training(spec: &Spec, batch: usize, target: &Target, fusion: bool) -> Result<Compiled, CompileError> {
    let mut forward = lower::lower(spec, batch)?;
    expose_routing(&mut forward);
    let graph = autodiff::training_graph(&forward)?;
    let options = if fusion { FuseOptions::for_target(target) } else { FuseOptions::unfused(target) };
    let fused = fuse::fuse(&graph, options);
    let plan = emit::emit(&graph, &fused, target)?;
    Ok(Compiled { graph, fused, plan })
}

/// Output name of MoE block `block`'s routing table (u32, [`ir::RouteLayout`]: the first `experts`
/// entries are the tokens each expert received), added by [`compile_training`] for the per-layer
/// utilisation metrics of the training log.
pub fn route_output(block: usize) -> String {
    format!("moe.{block}.route")
}

/// Output name of MoE block `block`'s router logits (`[tokens, experts]`, f32), for `router_z`.
pub fn router_logits_output(block: usize) -> String {
    format!("moe.{block}.router_logits")
}

/// Makes the routing table and the router logits of every MoE block graph outputs, so the runtime
/// can read them on log steps (they are computed anyway; as outputs their buffers are not reused).
/// Blocks are recognised by the HF names lowering gives them: the `MoeRoute` node labelled
/// `model.layers.N...`, and the matmul reading the param `model.layers.N.block_sparse_moe.gate.weight`.
fn expose_routing(graph: &mut Graph) {
    let block_of = |label: &str| label.strip_prefix("model.layers.")?.split('.').next()?.parse::<usize>().ok();
    let mut found = Vec::new();
    for id in graph.g.node_indices() {
        let node = graph.node(id);
        match &node.op {
            ir::Op::MoeRoute { .. } => {
                if let Some(block) = block_of(&node.label) {
                    found.push((route_output(block), id));
                }
            }
            ir::Op::MatMul { .. } => {
                let gate = graph.inputs(id).into_iter().find_map(|arg| match &graph.node(arg).op {
                    ir::Op::Param { name, .. } if name.ends_with(".block_sparse_moe.gate.weight") => block_of(name),
                    _ => None,
                });
                if let Some(block) = gate {
                    found.push((router_logits_output(block), id));
                }
            }
            _ => {}
        }
    }
    for (name, id) in found {
        graph.set_output(&name, id);
    }
}
