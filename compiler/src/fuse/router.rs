//! Router groups ([`GroupKind::Router`]): a narrow matmul (the router's `x · Wᵀ`, `[T, E]` with `E`
//! small) and the row-local ops that follow it — softmax or sigmoid, top-k, the gathered and
//! renormalised gate weights, their dense scatter, the top-k mask, the router z-loss row
//! statistics — as one kernel with one invocation per token row, every member's row held in
//! registers (see `emit/router.rs`).
//!
//! Soundness does not depend on the gate: each member is computed exactly as its own kernel would,
//! row by row, so any chain of the listed ops that reads only its own row may join. Which gates get
//! the kernel therefore follows from the anchor rule: a matmul read by a softmax or a sigmoid
//! (`softmax`, `switch`, `sigmoid`, and the probabilities of `expert_choice`, `sinkhorn`, `auction`,
//! whose own selection ops keep their kernels). `noisy_top_k` selects on `logits + noise`, so its
//! router matmul is not a softmax operand and keeps the matmul kernel.

use super::{base, strided_view, GroupKind, State};
use crate::ir::{NodeId, Op, UnaryOp};

/// Widest row a router group holds in registers (columns of any member).
pub(crate) const ROUTER_COLS: usize = 64;

impl State<'_> {
    /// Does matmul `n` start a router group? A 2-D `[T, C]` product with `C ≤ ROUTER_COLS`, whose
    /// operands are buffers (no absorbed prologue), read by a softmax or a sigmoid.
    pub(super) fn router_anchor(&self, n: NodeId) -> bool {
        let g = self.graph;
        let shape = &g.ty(n).shape;
        matches!(g.node(n).op, Op::MatMul { .. })
            && shape.len() == 2
            && shape[1] <= ROUTER_COLS
            && g.inputs(n).iter().all(|&a| self.prologue(a).is_empty())
            && g.users(n).iter().any(|&u| {
                matches!(
                    g.node(u).op,
                    Op::Softmax { causal: false } | Op::Unary(UnaryOp::Sigmoid)
                )
            })
    }

    /// Does selection op `n` (top-k, a column gather or scatter, a top-k mask) turn the narrow
    /// elementwise or row group `gi` it reads into a router group? Only when every member is one a
    /// router group admits (the gate-weight adjoint before the scatter of the backward pass).
    pub(super) fn becomes_router(&self, gi: usize, n: NodeId) -> bool {
        let b = &self.groups[gi];
        matches!(
            self.graph.node(n).op,
            Op::TopK { .. } | Op::GatherCols | Op::ScatterCols { .. } | Op::TopKMask { .. }
        ) && matches!(b.kind, GroupKind::Elementwise | GroupKind::Row)
            && b.domain.len() == 2
            && b.domain[1] <= ROUTER_COLS
            && b.nodes
                .iter()
                .all(|&m| !self.absorbed.contains(&m) && self.router_accepts(gi, m))
    }

    /// May `n` join router group `gi`? Its value must be a `[T, C ≤ ROUTER_COLS]` row computed from
    /// member rows of the same token and from outside values: broadcast over the row (possibly read
    /// through an absorbed permute) for elementwise ops, the token's own row for selection ops.
    pub(super) fn router_accepts(&self, gi: usize, n: NodeId) -> bool {
        let g = self.graph;
        let rows = self.groups[gi].domain[0];
        let shape = &g.ty(n).shape;
        if shape.len() != 2 || shape[0] != rows || shape[1] > ROUTER_COLS {
            return false;
        }
        let member = |a: NodeId| self.group_of.get(&a) == Some(&gi);
        // A selection operand: a member, or the token's row `[T, k]` of a buffer.
        let row = |a: NodeId| {
            let s = &g.ty(a).shape;
            member(a) || (self.producer(a) == base(g, a) && s.len() == 2 && s[0] == rows)
        };
        let args = g.inputs(n);
        match &g.node(n).op {
            Op::Affine { .. } | Op::Unary(_) | Op::Binary(_) => args.iter().all(|&a| {
                let s = &g.ty(a).shape;
                if member(a) {
                    return s[1] == shape[1] || s[1] == 1;
                }
                // Read from its buffer, or in place through absorbed permutes, with a broadcasting
                // index over `[T, C]`.
                let in_place = self.producer(a) == base(g, a)
                    || (self
                        .prologue(a)
                        .iter()
                        .all(|&p| matches!(g.node(p).op, Op::Permute { .. }))
                        && strided_view(g, a).is_some());
                in_place
                    && s.len() <= 2
                    && s.iter()
                        .rev()
                        .zip(shape.iter().rev())
                        .all(|(&d, &t)| d == t || d == 1)
            }),
            Op::Reduce(_) | Op::Softmax { causal: false } | Op::TopK { .. } => member(args[0]),
            Op::TopKMask { .. } => row(args[0]),
            Op::GatherCols | Op::ScatterCols { .. } => row(args[0]) && row(args[1]),
            Op::Input { .. }
            | Op::Param { .. }
            | Op::Reshape { .. }
            | Op::Permute { .. }
            | Op::MatMul { .. }
            | Op::Embedding
            | Op::Rope { .. }
            | Op::Softmax { causal: true }
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
            | Op::BroadcastTo { .. }
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
            | Op::LstmLastGrad { .. } => false,
        }
    }
}
