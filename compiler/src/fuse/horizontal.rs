//! Horizontal matmul groups: several `MatMul`s of one operand (attention's q, k and v projections
//! of the normed input) as one dispatch. The products are stacked as the batch axis of one matmul
//! whose B loads pick the product's weight by batch index and whose store picks its output
//! (`emit/horizontal.rs`), so each workgroup computes one block of one product, in both matmul
//! schedules.
//!
//! Only plain products join: 2-D `[M, K] · [K, N]` (or `Nᵀ`) of the same shapes and different
//! weights (the chunked head's backward recomputes its logits as a second product of the same
//! operands, late on purpose: stacking it would keep both `[rows, V]` buffers alive), operands read
//! from buffers, and no elementwise user (a matmul with an epilogue — the SwiGLU's `silu(gate) · up` —
//! keeps it, which saves a round trip that a horizontal dispatch would not).

use super::{GroupKind, State};
use crate::ir::{NodeId, Op};

impl State<'_> {
    /// Groups matmul `n` may join horizontally: those of the other matmuls of its A operand.
    pub(super) fn siblings(&self, n: NodeId) -> Vec<usize> {
        let a = self.graph.inputs(n)[0];
        self.graph
            .users(a)
            .iter()
            .filter(|&&u| u != n)
            .filter_map(|u| self.group_of.get(u).copied())
            .collect()
    }

    /// May matmul `n` join group `gi` as one more product of the same A operand?
    pub(super) fn horizontal_accepts(&self, gi: usize, n: NodeId) -> bool {
        let g = self.graph;
        let b = &self.groups[gi];
        let args = g.inputs(n);
        let plain = |m: NodeId| {
            let a = g.inputs(m);
            g.ty(m).shape.len() == 2
                && g.ty(a[1]).shape.len() == 2
                && a.iter().all(|&x| self.prologue(x).is_empty())
                && g.users(m).iter().all(|&u| {
                    !matches!(
                        g.node(u).op,
                        Op::Affine { .. } | Op::Unary(_) | Op::Binary(_)
                    )
                })
        };
        b.kind == GroupKind::Matmul
            && plain(n)
            && b.nodes.iter().all(|&m| {
                g.node(m).op == g.node(n).op
                    && plain(m)
                    && g.inputs(m)[0] == args[0]
                    && g.inputs(m)[1] != args[1]
                    && g.ty(g.inputs(m)[1]) == g.ty(args[1])
                    && g.ty(m) == g.ty(n)
            })
    }

    /// Does group `gi` compute several products (so no epilogue may join it)?
    pub(super) fn is_horizontal(&self, gi: usize) -> bool {
        self.groups[gi].nodes.len() > 1
            && self.groups[gi]
                .nodes
                .iter()
                .all(|&m| matches!(self.graph.node(m).op, Op::MatMul { .. }))
    }
}
