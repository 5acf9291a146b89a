//! Fuse: Graph IR → kernel groups.
//!
//! A [`Group`] is a set of IR nodes that becomes one compute shader. Fusion decisions are plain data
//! (node lists plus a [`GroupKind`]); the emitter walks a group's nodes to generate WGSL, so no pass
//! ever rewrites generated code.
//!
//! Rules (greedy, in topological order; a node joins the group of one of its producers when allowed):
//! - **Elementwise chains**: `Affine`/`Unary`/`Binary` nodes whose shape equals the group's domain
//!   join it; operands from outside the group are read with broadcasting, so a bias `[N]` or a row
//!   scalar `[R, 1]` costs no extra kernel.
//! - **Row kernels** ([`GroupKind::Row`]): a last-axis `Reduce` or `Softmax` joins the elementwise
//!   group that produces its operand (the prologue, e.g. `x²` before `mean`), and row-local
//!   elementwise consumers join afterwards (the epilogue: `rsqrt(mean + eps)` per row, then `x · rs · w`
//!   per element). RMSNorm is therefore one kernel. The domain is the full `[..., L]` shape; nodes of
//!   shape `[..., 1]` are per-row scalars.
//! - **Matmul epilogues** ([`GroupKind::Matmul`]): elementwise nodes of the matmul's output shape that
//!   consume the matmul (directly or through earlier epilogue nodes) join it: bias, activation,
//!   residual add, and `silu(a) · b` where `b` is another matmul computed earlier. The anchor (first
//!   node) is a `MatMul` or a `GroupedMatMul`.
//!   A `Permute` used only as a matmul operand (the transposes of weight gradients) is absorbed as a
//!   prologue: the matmul reads its source in place with permuted strides.
//! - **Permute prologues** elsewhere: a `Permute` whose every use is a matmul operand or an operand of
//!   an elementwise, reduction or softmax node (a reduction over a non-last axis is lowered as
//!   permute + last-axis reduce) is never materialised: each consuming group reads its source in place
//!   through permuted strides.
//! - **Permute epilogues**: a `Permute` of a value computed by an elementwise or matmul group (the
//!   attention context `[B, H, T, D] → [B, T, H, D]` and its adjoints) joins that group, which writes
//!   the value straight to its permuted position instead of materialising it for a copy kernel.
//!   Members never read such a permute (its value is not indexed by the group's domain).
//! - **RoPE prologues**: a `Rope` or `RopeGrad` whose every use reaches a matmul operand through
//!   reshapes and absorbed permutes only (attention's `q`, `k` and their adjoints) is never
//!   materialised: each consuming matmul computes the rotated element from the rotation's operand
//!   when it loads it (two loads and a sine/cosine instead of one load), like a permute prologue.
//! - **Gather prologues**: a `MoeGather` (or its weighted adjoint twin `MoeCombineGradRows`) read
//!   only as the padded-row operand of grouped matmuls (forward, input and weight gradients) is never
//!   materialised as a `[rows, dim]` buffer: the grouped matmul maps each padded row through the
//!   routing table to its token row (zero for padding, times the gate weight for the adjoint).
//! - **Router kernels** ([`GroupKind::Router`], `fuse/router.rs`): a narrow matmul `[T, C ≤ 64]`
//!   read by a softmax or a sigmoid, and the row-local ops after it (softmax or sigmoid, top-k,
//!   gathered and renormalised gate weights, their dense scatter, the top-k mask, the z-loss row
//!   statistic), one invocation per token row. A narrow elementwise or row group read by a selection
//!   op (top-k, column gather or scatter, mask) becomes one too: the gate-weight adjoint of the
//!   backward pass. `noisy_top_k` keeps its matmul kernel (it selects on `logits + noise`).
//! - **Horizontal matmuls** (`fuse/horizontal.rs`): plain 2-D products of one A operand with
//!   weights of one shape and no epilogue (attention's q, k and v projections) are one `Matmul`
//!   group, stacked on the batch axis of one kernel; no epilogue joins such a group.
//! - Everything else is its own [`GroupKind::Single`] group.
//!
//! A node with users outside its group (or that is a graph output) is materialised: it is listed in
//! `outputs` and gets a buffer. A join is refused when it would make the group graph cyclic (a group
//! may not both feed and consume another) or when the group would bind more storage buffers than the
//! target allows (then the node starts a new group, i.e. the group is split).
//!
//! ## MoE fusions still open
//! The kinds are anchors plus elementwise satellites (and computed prologues), so the remaining MoE
//! fusions are new anchors, not new machinery:
//! - *Horizontal weight gradients* (`dWq`, `dWk`, `dWv` share their B operand, the normed input)
//!   and *input gradients* (`dq·Wq + dk·Wk + dv·Wv`, one contraction over the stacked products):
//!   their A operands are RoPE-adjoint and permute prologues, which the stacked load does not
//!   compose with yet.
//! - *Grouped matmul → weighted combine*: `MoeCombine` reads `k` rows per token, so it cannot be a
//!   per-element epilogue without atomics; it stays a consumer, but the SwiGLU of two grouped matmuls
//!   (`silu(gm1) · gm2`) is already an ordinary `Matmul` epilogue. The token gather and the combine's
//!   row adjoint are prologues (above).

use crate::ir::{Graph, NodeId, Op};
use crate::target::Target;
use serde::Serialize;
use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet};

mod horizontal;
mod router;

/// Knobs of the fusion pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FuseOptions {
    /// `false` (`--no-fuse`): every non-free node is its own group.
    pub enabled: bool,
    /// Storage buffers one kernel may bind (the adapter's per-stage limit).
    pub max_bindings: u32,
    /// Bytes one binding may hold: a value over it takes several bindings ([`crate::target::segments`]).
    pub max_binding_bytes: u64,
}

impl FuseOptions {
    pub fn for_target(target: &Target) -> Self {
        FuseOptions {
            enabled: true,
            max_bindings: target.max_storage_buffers_per_stage,
            max_binding_bytes: target.max_storage_binding_size,
        }
    }
    pub fn unfused(target: &Target) -> Self {
        FuseOptions {
            enabled: false,
            max_bindings: target.max_storage_buffers_per_stage,
            max_binding_bytes: target.max_storage_binding_size,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum GroupKind {
    /// Elementwise nodes over one domain shape, one invocation per element.
    Elementwise,
    /// Last-axis reductions / softmax with elementwise prologue and row-local epilogue.
    Row,
    /// A `MatMul`, `GroupedMatMul` or `GroupedMatMulGradX` (the anchor), absorbed operand permutes
    /// before it, and an elementwise epilogue after it.
    Matmul,
    /// One op with its own kernel (permute, embedding, rope, cross-entropy, top-k, MoE routing...).
    Single,
    /// A narrow router matmul `[T, E]` and the row-local ops after it (softmax or sigmoid, top-k,
    /// gate weights, row statistics), one invocation per token row (`fuse/router.rs`).
    Router,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Group {
    pub kind: GroupKind,
    /// Iteration shape: the elementwise/row domain, or the anchor's output shape.
    pub domain: Vec<usize>,
    /// Member nodes in topological order.
    #[serde(skip)]
    pub nodes: Vec<NodeId>,
    /// External values read (operands of member nodes that are not members), first use first.
    #[serde(skip)]
    pub inputs: Vec<NodeId>,
    /// Members materialised to buffers (used outside the group, graph outputs, or unused).
    #[serde(skip)]
    pub outputs: Vec<NodeId>,
}

/// Fusion result: groups in an order that is valid to execute (producers first).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Fused {
    pub groups: Vec<Group>,
}

impl Fused {
    /// One line per group: kind, members and materialised outputs (`--emit groups`, tests).
    pub fn dump(&self, graph: &Graph) -> String {
        let mut s = String::new();
        for (i, g) in self.groups.iter().enumerate() {
            let names = |ids: &[NodeId]| {
                ids.iter()
                    .map(|n| format!("%{}:{}", n.index(), graph.node(*n).op.mnemonic()))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            s += &format!(
                "group {i} {:?} {:?}: [{}] -> [{}]\n",
                g.kind,
                g.domain,
                names(&g.nodes),
                names(&g.outputs)
            );
        }
        s
    }

    /// Number of kernels (dispatches) the groups turn into.
    pub fn len(&self) -> usize {
        self.groups.len()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }
}

/// Source, logical shape and element strides of `x` when it is a permuted view of a buffer, possibly
/// seen through reshapes: `x[i…] = src[Σ i·stride]`. `None` when a reshape splits or merges axes that
/// the permute made non-contiguous (then the permute must be materialised).
pub fn strided_view(graph: &Graph, x: NodeId) -> Option<(NodeId, Vec<usize>, Vec<usize>)> {
    match &graph.node(x).op {
        Op::Permute { perm } => {
            let src = graph.inputs(x)[0];
            let shape = &graph.ty(src).shape;
            let strides: Vec<usize> = (0..shape.len())
                .map(|i| shape[i + 1..].iter().product())
                .collect();
            Some((
                src,
                graph.ty(x).shape.clone(),
                perm.iter().map(|&p| strides[p]).collect(),
            ))
        }
        Op::Reshape { shape } => {
            let (src, from, strides) = strided_view(graph, graph.inputs(x)[0])?;
            Some((src, shape.clone(), reshape_strides(&from, &strides, shape)?))
        }
        Op::Input { .. }
        | Op::Param { .. }
        | Op::Affine { .. }
        | Op::Unary(_)
        | Op::Binary(_)
        | Op::Reduce(_)
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
        | Op::MoeCombine { .. }
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
        | Op::LstmLastGrad { .. } => None,
    }
}

/// Strides of a reshape of a strided view, when it is still a strided view (NumPy's no-copy rule):
/// size-1 axes are free; otherwise each run of target axes must cover a run of source axes that is
/// contiguous relative to itself.
fn reshape_strides(from: &[usize], strides: &[usize], to: &[usize]) -> Option<Vec<usize>> {
    let src: Vec<(usize, usize)> = from
        .iter()
        .zip(strides)
        .filter(|(d, _)| **d != 1)
        .map(|(d, s)| (*d, *s))
        .collect();
    let tgt: Vec<usize> = (0..to.len()).filter(|&t| to[t] != 1).collect();
    let mut out = vec![1usize; to.len()];
    let (mut i, mut j) = (0usize, 0usize);
    while j < tgt.len() {
        // The smallest runs src[i..ii] and tgt[j..jj] with equal element counts.
        let (mut ps, mut ii) = (src.get(i)?.0, i + 1);
        let (mut pt, mut jj) = (to[tgt[j]], j + 1);
        while ps != pt {
            if ps < pt {
                ps *= src.get(ii)?.0;
                ii += 1;
            } else {
                pt *= to[*tgt.get(jj)?];
                jj += 1;
            }
        }
        if (i..ii - 1).any(|k| src[k].1 != src[k + 1].1 * src[k + 1].0) {
            return None;
        }
        let mut stride = src[ii - 1].1;
        for &t in tgt[j..jj].iter().rev() {
            out[t] = stride;
            stride *= to[t];
        }
        i = ii;
        j = jj;
    }
    (i == src.len()).then_some(out)
}

/// Follows free `Reshape` nodes to the node that owns the buffer.
pub fn base(graph: &Graph, mut id: NodeId) -> NodeId {
    while let Op::Reshape { .. } = graph.node(id).op {
        id = graph.inputs(id)[0];
    }
    id
}

struct Builder {
    kind: GroupKind,
    domain: Vec<usize>,
    nodes: Vec<NodeId>,
}

struct State<'g> {
    graph: &'g Graph,
    pos: HashMap<NodeId, usize>,
    group_of: HashMap<NodeId, usize>,
    groups: Vec<Builder>,
    /// `deps[g]`: groups whose outputs group `g` reads.
    deps: Vec<HashSet<usize>>,
    /// Permutes read in place by the matmuls that use them (members of several groups, owned by none).
    absorbed: HashSet<NodeId>,
    graph_outputs: HashSet<NodeId>,
    max_bindings: usize,
    max_binding_bytes: u64,
}

/// Splits `graph` into kernel groups. Never fails: any well-typed graph has the trivial grouping.
pub fn fuse(graph: &Graph, options: FuseOptions) -> Fused {
    let order = graph.topo_order();
    let pos: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let mut st = State {
        graph,
        pos,
        group_of: HashMap::new(),
        groups: Vec::new(),
        deps: Vec::new(),
        absorbed: HashSet::new(),
        graph_outputs: graph.outputs.iter().map(|(_, id)| *id).collect(),
        max_bindings: options.max_bindings.max(2) as usize,
        max_binding_bytes: options.max_binding_bytes,
    };
    if options.enabled {
        st.absorbed = absorbed(graph, &order, &st.graph_outputs);
    }
    for &n in &order {
        if graph.node(n).op.is_free() || st.absorbed.contains(&n) {
            continue;
        }
        if options.enabled && st.try_join(n) {
            continue;
        }
        let (kind, domain) = st.new_group_kind(n, options.enabled);
        st.start_group(n, kind, domain);
    }
    st.finish()
}

/// The prologue nodes no kernel computes on its own: each consuming group reads or computes them as
/// it loads them (see the module doc).
///
/// A permute whose every use reads it element by element (a matmul operand, an elementwise or row
/// op, possibly through reshapes that keep it a strided view) is read in place with permuted
/// strides by each consumer, so it never gets a kernel or a buffer: it joins every consuming group
/// as a prologue member. RoPE rotations read only by matmuls, and gathers read only by grouped
/// matmuls, are computed by each consumer as it loads them.
fn absorbed(graph: &Graph, order: &[NodeId], graph_outputs: &HashSet<NodeId>) -> HashSet<NodeId> {
    let permutes: HashSet<NodeId> = order
        .iter()
        .copied()
        .filter(|&p| {
            matches!(graph.node(p).op, Op::Permute { .. }) && read_in_place(graph, graph_outputs, p)
        })
        .collect();
    let computed: Vec<NodeId> = order
        .iter()
        .copied()
        .filter(|&r| {
            // The computing loads read the operands' buffers: none may be a prologue itself.
            !graph_outputs.contains(&r)
                && graph
                    .inputs(r)
                    .iter()
                    .all(|&a| !permutes.contains(&base(graph, a)))
                && computed_by_consumers(graph, &permutes, r)
        })
        .collect();
    permutes.into_iter().chain(computed).collect()
}

/// Whether node `r` is a RoPE rotation read only by matmuls or a gather read only by grouped
/// matmuls (given the absorbed permutes), which its consumers compute as they load it.
fn computed_by_consumers(graph: &Graph, absorbed: &HashSet<NodeId>, r: NodeId) -> bool {
    match graph.node(r).op {
        Op::Rope { .. } | Op::RopeGrad { .. } => only_matmul_operand(graph, absorbed, r),
        Op::MoeGather { .. } | Op::MoeCombineGradRows { .. } => only_grouped_rows(graph, r),
        Op::Input { .. }
        | Op::Param { .. }
        | Op::Affine { .. }
        | Op::Unary(_)
        | Op::Binary(_)
        | Op::Reduce(_)
        | Op::Reshape { .. }
        | Op::Permute { .. }
        | Op::MatMul { .. }
        | Op::Embedding
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
        | Op::GroupedMatMul { .. }
        | Op::MoeCombine { .. }
        | Op::SumTo { .. }
        | Op::BroadcastTo { .. }
        | Op::EmbeddingGrad { .. }
        | Op::CrossEntropyGrad
        | Op::LinearCrossEntropyGradH
        | Op::LinearCrossEntropyGradW
        | Op::ScatterCols { .. }
        | Op::MoeGatherGrad { .. }
        | Op::GroupedMatMulGradX { .. }
        | Op::GroupedMatMulGradW { .. }
        | Op::MoeCombineGradWeights { .. }
        | Op::LstmScan { .. }
        | Op::LstmHidden
        | Op::LstmScanGrad { .. }
        | Op::LstmScanGradW { .. }
        | Op::LstmLast { .. }
        | Op::LstmLastGrad { .. } => false,
    }
}

/// Last axis of a row domain, and the per-row scalar shape `[..., 1]`.
fn row_shape(domain: &[usize]) -> Vec<usize> {
    let mut s = domain.to_vec();
    if let Some(l) = s.last_mut() {
        *l = 1;
    }
    s
}

/// Does every use of `x` reach, through reshapes and absorbed permutes only, an operand of a `MatMul`
/// (which can compute the value as it loads it)?
fn only_matmul_operand(graph: &Graph, absorbed: &HashSet<NodeId>, x: NodeId) -> bool {
    let users = graph.users(x);
    !users.is_empty()
        && users.iter().all(|&u| match &graph.node(u).op {
            Op::Reshape { .. } => only_matmul_operand(graph, absorbed, u),
            Op::Permute { .. } => absorbed.contains(&u) && only_matmul_operand(graph, absorbed, u),
            Op::MatMul { .. } => true,
            Op::Input { .. }
            | Op::Param { .. }
            | Op::Affine { .. }
            | Op::Unary(_)
            | Op::Binary(_)
            | Op::Reduce(_)
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
            | Op::MoeCombine { .. }
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
            | Op::LstmLastGrad { .. } => false,
        })
}

/// Is every use of `x` (a gather of token rows into padded rows) the padded-row operand of a grouped
/// matmul over the same routing table: the rows of the forward and input-gradient products, either
/// operand of the weight gradient?
fn only_grouped_rows(graph: &Graph, x: NodeId) -> bool {
    let args = graph.inputs(x);
    let route = args[args.len() - 1];
    let users = graph.users(x);
    !users.is_empty()
        && users.iter().all(|&u| {
            let a = graph.inputs(u);
            let slot_ok = match graph.node(u).op {
                Op::GroupedMatMul { .. } | Op::GroupedMatMulGradX { .. } => a[0] == x && a[1] != x,
                Op::GroupedMatMulGradW { .. } => true,
                Op::Input { .. }
                | Op::Param { .. }
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
                | Op::MoeCombine { .. }
                | Op::SumTo { .. }
                | Op::BroadcastTo { .. }
                | Op::EmbeddingGrad { .. }
                | Op::RopeGrad { .. }
                | Op::CrossEntropyGrad
                | Op::LinearCrossEntropyGradH
                | Op::LinearCrossEntropyGradW
                | Op::ScatterCols { .. }
                | Op::MoeGatherGrad { .. }
                | Op::MoeCombineGradRows { .. }
                | Op::MoeCombineGradWeights { .. }
                | Op::LstmScan { .. }
                | Op::LstmHidden
                | Op::LstmScanGrad { .. }
                | Op::LstmScanGradW { .. }
                | Op::LstmLast { .. }
                | Op::LstmLastGrad { .. } => false,
            };
            slot_ok && a[2] == route
        })
}

/// Does every use of `x` (a permute, or a reshape of one) reach, through reshapes only and as a
/// strided view, an operand that the consuming kernel reads element by element: a matmul operand, or
/// an operand of an elementwise, reduction or softmax node?
fn read_in_place(graph: &Graph, graph_outputs: &HashSet<NodeId>, x: NodeId) -> bool {
    let users = graph.users(x);
    !users.is_empty()
        && !graph_outputs.contains(&x)
        && strided_view(graph, x).is_some()
        && users.iter().all(|&u| match &graph.node(u).op {
            Op::Reshape { .. } => read_in_place(graph, graph_outputs, u),
            Op::MatMul { .. } | Op::Reduce(_) | Op::Softmax { .. } => true,
            Op::Affine { .. } | Op::Unary(_) | Op::Binary(_) | Op::BroadcastTo { .. } => true,
            Op::Input { .. }
            | Op::Param { .. }
            | Op::Permute { .. }
            | Op::Embedding
            | Op::Rope { .. }
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
            | Op::MoeCombine { .. }
            | Op::SumTo { .. }
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
            | Op::LstmLastGrad { .. } => false,
        })
}

impl State<'_> {
    /// The kind and domain of the group `n` starts when it joins none (`enabled`: fusion is on, so a
    /// router matmul may anchor a router group).
    fn new_group_kind(&self, n: NodeId, enabled: bool) -> (GroupKind, Vec<usize>) {
        let node = self.graph.node(n);
        match &node.op {
            Op::Affine { .. } | Op::Unary(_) | Op::Binary(_) | Op::BroadcastTo { .. } => {
                (GroupKind::Elementwise, node.ty.shape.clone())
            }
            Op::Reduce(_) => (
                GroupKind::Row,
                self.graph.ty(self.graph.inputs(n)[0]).shape.clone(),
            ),
            Op::Softmax { .. } => (GroupKind::Row, node.ty.shape.clone()),
            Op::MatMul { .. } if enabled && self.router_anchor(n) => {
                (GroupKind::Router, node.ty.shape.clone())
            }
            Op::MatMul { .. } | Op::GroupedMatMul { .. } | Op::GroupedMatMulGradX { .. } => {
                (GroupKind::Matmul, node.ty.shape.clone())
            }
            Op::Input { .. }
            | Op::Param { .. }
            | Op::Reshape { .. }
            | Op::Permute { .. }
            | Op::Embedding
            | Op::Rope { .. }
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
            | Op::MoeCombine { .. }
            | Op::SumTo { .. }
            | Op::EmbeddingGrad { .. }
            | Op::RopeGrad { .. }
            | Op::CrossEntropyGrad
            | Op::LinearCrossEntropyGradH
            | Op::LinearCrossEntropyGradW
            | Op::ScatterCols { .. }
            | Op::MoeGatherGrad { .. }
            | Op::GroupedMatMulGradW { .. }
            | Op::MoeCombineGradRows { .. }
            | Op::MoeCombineGradWeights { .. }
            | Op::LstmScan { .. }
            | Op::LstmHidden
            | Op::LstmScanGrad { .. }
            | Op::LstmScanGradW { .. }
            | Op::LstmLast { .. }
            | Op::LstmLastGrad { .. } => (GroupKind::Single, node.ty.shape.clone()),
        }
    }

    /// Starts a group anchored at `n`, with the absorbed prologues of its operands.
    fn start_group(&mut self, n: NodeId, kind: GroupKind, domain: Vec<usize>) {
        let gi = self.groups.len();
        let mut nodes = vec![n];
        for a in self.graph.inputs(n) {
            for p in self.prologue(a) {
                if !nodes.contains(&p) {
                    nodes.push(p);
                }
            }
        }
        self.groups.push(Builder {
            kind,
            domain,
            nodes,
        });
        self.deps.push(HashSet::new());
        self.group_of.insert(n, gi);
        self.add_deps(gi, n);
    }

    /// The node whose buffer holds operand `a`: through reshapes and absorbed permutes.
    fn producer(&self, mut a: NodeId) -> NodeId {
        loop {
            a = base(self.graph, a);
            if !self.absorbed.contains(&a) {
                return a;
            }
            a = self.graph.inputs(a)[0];
        }
    }

    /// The absorbed prologue nodes a group reads operand `a` through (a permute, a RoPE behind it...),
    /// outermost first: they join every group that reads `a`.
    fn prologue(&self, mut a: NodeId) -> Vec<NodeId> {
        let mut chain = Vec::new();
        loop {
            a = base(self.graph, a);
            if !self.absorbed.contains(&a) {
                return chain;
            }
            chain.push(a);
            a = self.graph.inputs(a)[0];
        }
    }

    /// Tries to put `n` into the group of one of its operands; true on success.
    fn try_join(&mut self, n: NodeId) -> bool {
        let g = self.graph;
        let node = g.node(n);
        let args = g.inputs(n);
        let candidates: Vec<usize> = match &node.op {
            Op::Affine { .. } | Op::Unary(_) | Op::Binary(_) | Op::BroadcastTo { .. } => args
                .iter()
                .filter_map(|a| self.group_of.get(a).copied())
                .collect(),
            Op::Permute { .. } => self
                .group_of
                .get(&base(g, args[0]))
                .copied()
                .into_iter()
                .collect(),
            Op::Reduce(_) | Op::Softmax { .. } => args
                .iter()
                .take(1)
                .filter_map(|a| self.group_of.get(a).copied())
                .collect(),
            // Another product of a matmul's operand (horizontal fusion).
            Op::MatMul { .. } => self.siblings(n),
            // Only router groups take these (row-local selection ops).
            Op::TopK { .. } | Op::GatherCols | Op::TopKMask { .. } | Op::ScatterCols { .. } => args
                .iter()
                .filter_map(|a| self.group_of.get(a).copied())
                .collect(),
            Op::Input { .. }
            | Op::Param { .. }
            | Op::Reshape { .. }
            | Op::Embedding
            | Op::Rope { .. }
            | Op::CrossEntropy
            | Op::LinearCrossEntropy
            | Op::SliceRows { .. }
            | Op::ConcatRows
            | Op::MoeRoute { .. }
            | Op::SliceCols { .. }
            | Op::RouteLoad { .. }
            | Op::ExpertChoice { .. }
            | Op::Sinkhorn { .. }
            | Op::Auction { .. }
            | Op::MoeGather { .. }
            | Op::GroupedMatMul { .. }
            | Op::MoeCombine { .. }
            | Op::SumTo { .. }
            | Op::EmbeddingGrad { .. }
            | Op::RopeGrad { .. }
            | Op::CrossEntropyGrad
            | Op::LinearCrossEntropyGradH
            | Op::LinearCrossEntropyGradW
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
            | Op::LstmLastGrad { .. } => Vec::new(),
        };
        for gi in candidates {
            if self.accepts(gi, n)
                && !self.creates_cycle(gi, n)
                && self.bindings_with(gi, n) <= self.max_bindings
            {
                if self.becomes_router(gi, n) {
                    self.groups[gi].kind = GroupKind::Router;
                }
                let b = &mut self.groups[gi];
                if b.kind == GroupKind::Elementwise
                    && matches!(node.op, Op::Reduce(_) | Op::Softmax { .. })
                {
                    b.kind = GroupKind::Row;
                }
                b.nodes.push(n);
                let prologue: Vec<NodeId> = self
                    .graph
                    .inputs(n)
                    .into_iter()
                    .flat_map(|a| self.prologue(a))
                    .collect();
                let b = &mut self.groups[gi];
                for p in prologue {
                    if !b.nodes.contains(&p) {
                        b.nodes.push(p);
                    }
                }
                self.group_of.insert(n, gi);
                self.add_deps(gi, n);
                return true;
            }
        }
        false
    }

    fn accepts(&self, gi: usize, n: NodeId) -> bool {
        let b = &self.groups[gi];
        let node = self.graph.node(n);
        let shape = &node.ty.shape;
        // An epilogue permute's value is not indexed by the domain: no member may read it.
        if self
            .graph
            .inputs(n)
            .iter()
            .any(|&a| self.is_epilogue_permute(gi, base(self.graph, a)))
        {
            return false;
        }
        if b.kind == GroupKind::Router || self.becomes_router(gi, n) {
            return self.router_accepts(gi, n);
        }
        match &node.op {
            Op::MatMul { .. } => self.horizontal_accepts(gi, n),
            Op::Permute { .. } => {
                let x = base(self.graph, self.graph.inputs(n)[0]);
                matches!(b.kind, GroupKind::Elementwise | GroupKind::Matmul)
                    && !self.is_horizontal(gi)
                    && self.group_of.get(&x) == Some(&gi)
                    && self.graph.ty(x).shape == b.domain
            }
            Op::Affine { .. } | Op::Unary(_) | Op::Binary(_) | Op::BroadcastTo { .. } => {
                match b.kind {
                    GroupKind::Elementwise => *shape == b.domain,
                    // A reduction prologue (`square` before `mean`) is better recomputed inside the row
                    // kernel than materialised by the matmul: keep it out of the epilogue.
                    GroupKind::Matmul => {
                        *shape == b.domain && !self.feeds_row_op(n) && !self.is_horizontal(gi)
                    }
                    // A one-column domain cannot tell row scalars from elements: keep such rows alone.
                    GroupKind::Row => {
                        b.domain.last().copied().unwrap_or(1) > 1
                            && (*shape == b.domain || *shape == row_shape(&b.domain))
                    }
                    GroupKind::Single | GroupKind::Router => false,
                }
            }
            Op::Reduce(_) | Op::Softmax { .. } => {
                let x = self.graph.ty(self.graph.inputs(n)[0]);
                matches!(b.kind, GroupKind::Elementwise | GroupKind::Row)
                    && x.shape == b.domain
                    && x.last() > 1
            }
            Op::Input { .. }
            | Op::Param { .. }
            | Op::Reshape { .. }
            | Op::Embedding
            | Op::Rope { .. }
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
            | Op::MoeCombine { .. }
            | Op::SumTo { .. }
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
            | Op::LstmLastGrad { .. } => false,
        }
    }

    /// Is `p` a permute epilogue of group `gi` (a member permute of a member's value)?
    fn is_epilogue_permute(&self, gi: usize, p: NodeId) -> bool {
        matches!(self.graph.node(p).op, Op::Permute { .. }) && self.group_of.get(&p) == Some(&gi)
    }

    /// Is `n` an operand of a reduction or softmax (which would start a row kernel)?
    fn feeds_row_op(&self, n: NodeId) -> bool {
        self.graph
            .users(n)
            .iter()
            .any(|&u| matches!(self.graph.node(u).op, Op::Reduce(_) | Op::Softmax { .. }))
    }

    /// Would adding `n` to group `gi` make the group graph cyclic? True when an operand of `n` from
    /// outside `gi` is produced by a group that (transitively) reads from `gi`, or is a reshaped view
    /// of a member (a buffer the same dispatch is still writing).
    fn creates_cycle(&self, gi: usize, n: NodeId) -> bool {
        let mut stack: Vec<usize> = Vec::new();
        // A permute epilogue takes its operand's value from the member, not from the buffer.
        let computes_from_member = matches!(self.graph.node(n).op, Op::Permute { .. });
        for a in self.graph.inputs(n) {
            if self.group_of.get(&a) == Some(&gi) {
                continue;
            }
            match self.group_of.get(&self.producer(a)) {
                Some(&h) if h == gi && computes_from_member => {}
                Some(&h) if h == gi => return true,
                Some(&h) => stack.push(h),
                None => {}
            }
        }
        let mut seen: HashSet<usize> = HashSet::new();
        while let Some(h) = stack.pop() {
            if h == gi {
                return true;
            }
            if seen.insert(h) {
                stack.extend(self.deps[h].iter().copied());
            }
        }
        false
    }

    /// Records that group `gi` reads the operands of its new member `n`.
    fn add_deps(&mut self, gi: usize, n: NodeId) {
        // A prologue member's own operands (a gather's route and gate weights) are read too.
        let mut reads = Vec::new();
        for a in self.graph.inputs(n) {
            reads.push(a);
            for p in self.prologue(a) {
                reads.extend(self.graph.inputs(p));
            }
        }
        for a in reads {
            if let Some(&h) = self.group_of.get(&self.producer(a)) {
                if h != gi {
                    self.deps[gi].insert(h);
                }
            }
        }
    }

    /// Storage buffers group `gi` would bind with `n` added (an upper bound: later members can only
    /// turn outputs into internal values).
    fn bindings_with(&self, gi: usize, n: NodeId) -> usize {
        let mut members: HashSet<NodeId> = self.groups[gi].nodes.iter().copied().collect();
        members.insert(n);
        let (inputs, outputs) = self.io(&members, members.iter().copied());
        inputs
            .iter()
            .chain(&outputs)
            .map(|&v| {
                crate::target::segments(self.graph.ty(v).buffer_bytes(), self.max_binding_bytes)
                    .len()
            })
            .sum()
    }

    /// External input buffers (by owning node) and materialised members of a member set.
    fn io(
        &self,
        members: &HashSet<NodeId>,
        nodes: impl Iterator<Item = NodeId>,
    ) -> (BTreeSet<NodeId>, BTreeSet<NodeId>) {
        let mut inputs = BTreeSet::new();
        let mut outputs = BTreeSet::new();
        for m in nodes {
            for a in self.graph.inputs(m) {
                if !members.contains(&a) && !members.contains(&self.producer(a)) {
                    inputs.insert(self.producer(a));
                }
            }
            // A prologue member is computed by its readers, never written.
            if !self.absorbed.contains(&m) && self.materialised(members, m) {
                outputs.insert(m);
            }
        }
        (inputs, outputs)
    }

    fn materialised(&self, members: &HashSet<NodeId>, m: NodeId) -> bool {
        let users = self.graph.users(m);
        users.is_empty()
            || self.graph_outputs.contains(&m)
            || users.iter().any(|&u| self.escapes(members, u))
    }

    /// Does a use by `u` need the value in memory? Not when `u` is a member, nor when it is a
    /// reshape whose uses are all members (an absorbed permute seen through a view).
    fn escapes(&self, members: &HashSet<NodeId>, u: NodeId) -> bool {
        if members.contains(&u) {
            return false;
        }
        match self.graph.node(u).op {
            Op::Reshape { .. } => {
                let users = self.graph.users(u);
                users.is_empty()
                    || self.graph_outputs.contains(&u)
                    || users.iter().any(|&v| self.escapes(members, v))
            }
            Op::Input { .. }
            | Op::Param { .. }
            | Op::Affine { .. }
            | Op::Unary(_)
            | Op::Binary(_)
            | Op::Reduce(_)
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
            | Op::MoeCombine { .. }
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
            | Op::LstmLastGrad { .. } => true,
        }
    }

    /// Final inputs/outputs per group, and a producer-first order of the groups.
    fn finish(self) -> Fused {
        let g = self.graph;
        let mut groups: Vec<Group> = Vec::with_capacity(self.groups.len());
        for b in &self.groups {
            let mut nodes = b.nodes.clone();
            nodes.sort_by_key(|n| self.pos[n]);
            let members: HashSet<NodeId> = nodes.iter().copied().collect();
            let mut inputs = Vec::new();
            for &m in &nodes {
                for a in g.inputs(m) {
                    if !members.contains(&a)
                        && !members.contains(&self.producer(a))
                        && !inputs.contains(&a)
                    {
                        inputs.push(a);
                    }
                }
            }
            let outputs = nodes
                .iter()
                .copied()
                .filter(|&m| !self.absorbed.contains(&m) && self.materialised(&members, m))
                .collect();
            groups.push(Group {
                kind: b.kind,
                domain: b.domain.clone(),
                nodes,
                inputs,
                outputs,
            });
        }
        // Kahn's algorithm over group dependencies, lowest creation index first (deterministic).
        let mut deps: Vec<HashSet<usize>> = vec![HashSet::new(); groups.len()];
        let mut users: Vec<Vec<usize>> = vec![Vec::new(); groups.len()];
        for (gi, grp) in groups.iter().enumerate() {
            for &a in &grp.inputs {
                if let Some(&h) = self.group_of.get(&self.producer(a)) {
                    if h != gi && deps[gi].insert(h) {
                        users[h].push(gi);
                    }
                }
            }
        }
        let mut missing: Vec<usize> = deps.iter().map(|d| d.len()).collect();
        let mut ready: BinaryHeap<Reverse<usize>> = (0..groups.len())
            .filter(|&i| missing[i] == 0)
            .map(Reverse)
            .collect();
        let mut order = Vec::with_capacity(groups.len());
        while let Some(Reverse(i)) = ready.pop() {
            order.push(i);
            for &u in &users[i] {
                missing[u] -= 1;
                if missing[u] == 0 {
                    ready.push(Reverse(u));
                }
            }
        }
        assert_eq!(
            order.len(),
            groups.len(),
            "fusion produced a cyclic group graph (creates_cycle is wrong)"
        );
        let mut slots: Vec<Option<Group>> = groups.into_iter().map(Some).collect();
        Fused {
            groups: order.into_iter().filter_map(|i| slots[i].take()).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reshapes_of_strided_views() {
        // Dropping a size-1 axis keeps the strides.
        assert_eq!(
            reshape_strides(&[2, 4, 1, 8], &[32, 1, 1, 4], &[2, 4, 8]),
            Some(vec![32, 1, 4])
        );
        // Merging axes that are contiguous relative to each other.
        assert_eq!(
            reshape_strides(&[2, 3, 4], &[1, 8, 2], &[2, 12]),
            Some(vec![1, 2])
        );
        // Merging a transposed pair is not a view.
        assert_eq!(reshape_strides(&[3, 4], &[1, 3], &[12]), None);
        // Splitting an axis.
        assert_eq!(
            reshape_strides(&[6, 5], &[1, 6], &[2, 3, 5]),
            Some(vec![3, 1, 6])
        );
    }
}
