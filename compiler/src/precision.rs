//! Mixed precision (`precision = f16`, docs/language.md "The `train` block"): the pass that decides
//! which values are stored in f16.
//!
//! [`mark_f16`] only changes the dtype of values (`DType::F16`); it adds and removes no node. Every
//! later stage follows the dtypes: emit declares f16 bindings (`enable f16;`), widens them to f32 on
//! load and rounds on store, so all arithmetic, every matmul and reduction accumulator included,
//! stays f32; buffer sizes, and so the plan's memory, halve; the interpreter rounds the values the
//! graph marks (its f16 mode), which is what the kernels store.
//!
//! A value is stored in f16 when all of these hold:
//! 1. it is an activation or an activation gradient: the result of an elementwise op, a broadcast, a
//!    matmul or grouped matmul (and its input gradient), a permute, an embedding lookup, RoPE, a
//!    softmax (its max and sum are f32 inside the kernel; the probabilities are stored as the
//!    following matmul reads them), or an MoE gather/combine and their row adjoints. Reductions
//!    (normalisation statistics and every other row statistic), `SumTo`, the loss and its adjoint,
//!    routing ops and parameter-gradient ops stay f32;
//! 2. it is not a graph output, parameter or input: the host, the optimizer and the metrics read
//!    those as f32 (parameter gradients are outputs, so they stay f32 as master weights do);
//! 3. its last axis is not 1 (per-row statistics such as RMSNorm's `rsqrt(mean + eps)`);
//! 4. it is not part of a router (`router_precision = f32`): values computed from a router parameter
//!    (`…block_sparse_moe.{gate,group_gate,noise,group_noise}.weight`) up to the combine that applies
//!    the gate weights, and the adjoints of those values;
//! 5. every consumer's kernel widens f16 operands (the fixed-function templates — top-k,
//!    routing, Sinkhorn, auction — read f32 only). The cross-entropy kernels widen f16 logits, but
//!    the logits they read here are graph outputs; the chunked head's logits and their adjoint are
//!    stored in f16 by `head::legalize`, after this pass.
//!
//! `Reshape` aliases its operand's buffer, so it takes its base's dtype, and rule 5 counts the
//! consumers of every reshape of a value.

use crate::autodiff::SEED;
use crate::fuse::base;
use crate::ir::{DType, Graph, NodeId, Op};
use std::collections::{HashMap, HashSet};

/// Marks the values of `graph` (forward or training graph) that are stored in f16, as the module doc
/// says. Idempotent.
pub fn mark_f16(graph: &mut Graph) {
    let router = router_values(graph);
    let outputs: HashSet<NodeId> = graph
        .outputs
        .iter()
        .map(|(_, id)| base(graph, *id))
        .collect();
    // Consumers of each buffer owner, through reshapes.
    let mut readers: HashMap<NodeId, Vec<NodeId>> = HashMap::new();
    for id in graph.g.node_indices() {
        if matches!(graph.node(id).op, Op::Reshape { .. }) {
            continue;
        }
        for arg in graph.inputs(id) {
            readers.entry(base(graph, arg)).or_default().push(id);
        }
    }
    let chosen: Vec<NodeId> = graph
        .g
        .node_indices()
        .filter(|&id| {
            let node = graph.node(id);
            node.ty.dtype.is_float()
                && stores_activation(&node.op)
                && !outputs.contains(&id)
                && node.ty.last() != 1
                && !router.contains(&id)
                && readers
                    .get(&id)
                    .is_some_and(|rs| rs.iter().all(|&r| reads_f16(&graph.node(r).op)))
        })
        .collect();
    for id in chosen {
        graph.g[id].ty.dtype = DType::F16;
    }
    let reshapes: Vec<NodeId> = graph
        .g
        .node_indices()
        .filter(|&id| matches!(graph.node(id).op, Op::Reshape { .. }))
        .collect();
    for id in reshapes {
        let dtype = graph.ty(base(graph, id)).dtype;
        graph.g[id].ty.dtype = dtype;
    }
}

/// Whether the graph stores any value in f16 (its kernels need the adapter's `shader-f16`).
pub fn uses_f16(graph: &Graph) -> bool {
    graph.g.node_weights().any(|n| n.ty.dtype == DType::F16)
}

/// Rule 1: ops whose result is an activation (or an activation's gradient).
fn stores_activation(op: &Op) -> bool {
    op.is_elementwise()
        || matches!(
            op,
            Op::BroadcastTo { .. }
                | Op::MatMul { .. }
                | Op::GroupedMatMul { .. }
                | Op::GroupedMatMulGradX { .. }
                | Op::Permute { .. }
                | Op::Embedding
                | Op::Rope { .. }
                | Op::RopeGrad { .. }
                | Op::Softmax { .. }
                | Op::MoeGather { .. }
                | Op::MoeCombine { .. }
                | Op::MoeGatherGrad { .. }
                | Op::MoeCombineGradRows { .. }
        )
}

/// Rule 5: ops whose kernels read their float operands through `emit`'s widening loads.
fn reads_f16(op: &Op) -> bool {
    stores_activation(op)
        || matches!(
            op,
            Op::Reduce(_)
                | Op::SumTo { .. }
                | Op::EmbeddingGrad { .. }
                | Op::GroupedMatMulGradW { .. }
                | Op::MoeCombineGradWeights { .. }
        )
}

/// Whether a parameter belongs to a router (gate, group gate, and their noise projections).
fn is_router_param(name: &str) -> bool {
    name.contains(".block_sparse_moe.")
        && [
            ".gate.weight",
            ".group_gate.weight",
            ".noise.weight",
            ".group_noise.weight",
        ]
        .iter()
        .any(|s| name.ends_with(s))
}

/// Rule 4: the forward float values computed from router parameters (stopping at `MoeCombine`, whose
/// result is an activation again), and the backward values labelled as their adjoints (`grad.<label>` or
/// `grad.<label>.<part>`, autodiff's labels). Backward nodes are those created after the seed input.
fn router_values(graph: &Graph) -> HashSet<NodeId> {
    let seed = graph
        .data_inputs()
        .into_iter()
        .find(|(_, name, _)| name == SEED)
        .map(|(id, _, _)| id);
    let forward = |id: NodeId| seed.is_none_or(|s| id < s);
    let mut region: HashSet<NodeId> = HashSet::new();
    for id in graph.topo_order() {
        if !forward(id) {
            continue;
        }
        let node = graph.node(id);
        let inside = match &node.op {
            Op::Param { name, .. } => is_router_param(name),
            Op::MoeCombine { .. } => false,
            // Only float values carry the router's numbers; routing tables (u32) go everywhere.
            Op::Input { .. }
            | Op::Affine { .. }
            | Op::Unary(_)
            | Op::Binary(_)
            | Op::Reduce(_)
            | Op::Reshape { .. }
            | Op::Permute { .. }
            | Op::MatMul { .. }
            | Op::Embedding
            | Op::Rope { .. }
            | Op::Softmax { .. }
            | Op::CrossEntropy
            | Op::LinearCrossEntropy
            | Op::SliceRows { .. }
            | Op::ConcatRows
            | Op::TopK { .. }
            | Op::GatherCols
            | Op::TopKMask { .. }
            | Op::MoeRoute { .. }
            | Op::SliceCols { .. }
            | Op::RouteLoad { .. }
            | Op::ExpertChoice { .. }
            | Op::Sinkhorn { .. }
            | Op::Auction { .. }
            | Op::MoeGather { .. }
            | Op::GroupedMatMul { .. }
            | Op::SumTo { .. }
            | Op::BroadcastTo { .. }
            | Op::EmbeddingGrad { .. }
            | Op::RopeGrad { .. }
            | Op::CrossEntropyGrad
            | Op::LinearCrossEntropyGradH
            | Op::LinearCrossEntropyGradW
            | Op::ScatterCols { .. }
            | Op::MoeGatherGrad { .. }
            | Op::GroupedMatMulGradX { .. }
            | Op::GroupedMatMulGradW { .. }
            | Op::MoeCombineGradRows { .. }
            | Op::MoeCombineGradWeights { .. }
            | Op::LstmScan { .. }
            | Op::LstmHidden
            | Op::LstmScanGrad { .. }
            | Op::LstmScanGradW { .. }
            | Op::LstmLast { .. }
            | Op::LstmLastGrad { .. } => graph
                .inputs(id)
                .iter()
                .any(|&a| region.contains(&a) && graph.ty(a).dtype.is_float()),
        };
        if inside {
            region.insert(id);
        }
    }
    let labels: HashSet<&str> = region
        .iter()
        .map(|&id| graph.node(id).label.as_str())
        .collect();
    let adjoints: Vec<NodeId> = graph
        .g
        .node_indices()
        .filter(|&id| !forward(id))
        .filter(|&id| {
            let Some(of) = graph.node(id).label.strip_prefix("grad.") else {
                return false;
            };
            labels.contains(of)
                || of
                    .rsplit_once('.')
                    .is_some_and(|(head, _)| labels.contains(head))
        })
        .collect();
    region.extend(adjoints);
    region
}
