//! WGSL generators for gradient ops whose one-invocation-per-element form is too slow: the weight
//! gradient of the grouped matmul, the largest matmul of an MoE training step (bench-small: three per
//! MoE layer, each as many FLOPs as a forward expert matmul). The other gradient kernels live with
//! the forward kernels in [`super::kernels`].
//!
//! Deterministic: no float atomics; each output element is written by exactly one invocation that
//! sums its contributions in a fixed order, so results never depend on scheduling. Shapes and
//! routing-table offsets are baked in as literals and grids are folded with [`fold`].

use super::blocked::{self, gathered, Blocked, KRange, Schedule};
use super::frame::{anchor, fold, Binder, KernelError, KernelSrc};
use crate::fuse::Group;
use crate::ir::{Graph, NodeId, Op, RouteLayout};
use crate::target::Target;
use std::collections::HashSet;

/// Kernel of a `GroupedMatMulGradW` group: the node and the gather prologues of its operands.
pub(crate) fn grad_kernel(
    graph: &Graph,
    group: &Group,
    target: &Target,
) -> Result<KernelSrc, KernelError> {
    let n = anchor(graph, group);
    let args = graph.inputs(n);
    let members: HashSet<NodeId> = group.nodes.iter().copied().collect();
    match &graph.node(n).op {
        Op::GroupedMatMulGradW { layout } => grad_w(graph, n, &args, &members, layout, target),
        other @ (Op::Input { .. }
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
        | Op::MoeCombineGradRows { .. }
        | Op::MoeCombineGradWeights { .. }
        | Op::LstmScan { .. }
        | Op::LstmHidden
        | Op::LstmScanGrad { .. }
        | Op::LstmScanGradW { .. }
        | Op::LstmLast { .. }
        | Op::LstmLastGrad { .. }) => {
            unreachable!("{} has no kernel in emit::grad", other.mnemonic())
        }
    }
}

/// `GroupedMatMulGradW`: `dw[e, n, k] = Σ_{r ∈ [offsets[e], offsets[e+1])} g[r, n] · x[r, k]`, the
/// rows of expert `e` in ascending order: per expert, the blocked matmul `gᵀ · x` over that expert's
/// segment of rows (the schedule of [`super::blocked`]).
fn grad_w(
    graph: &Graph,
    n: NodeId,
    args: &[NodeId],
    members: &HashSet<NodeId>,
    layout: &RouteLayout,
    target: &Target,
) -> Result<KernelSrc, KernelError> {
    let mut b = Binder::new(graph, target);
    // Either operand may be gathered token rows (a gather prologue) along the contraction.
    let mut operand = |x: NodeId| match gathered(graph, members, &mut b, x) {
        Some((load, rows)) => (load, Some(rows)),
        None => (b.load(x), None),
    };
    let (g, a_k) = operand(args[0]);
    let (x, b_k) = operand(args[1]);
    let route = b.read(args[2]);
    let out = b.write(n);
    let (nn, k) = (graph.ty(args[0]).shape[1], graph.ty(args[1]).shape[1]);
    let off = layout.offsets_at();
    let mut blocked = Blocked {
        batch: layout.experts,
        m: nn,
        n: k,
        a: &g,
        b: &x,
        sam: 1,
        sak: nn,
        sbk: k,
        sbn: 1,
        setup: format!(
            "    let abase = 0u;\n    let bbase = 0u;\n    let kbeg = {route}[{off}u + bi];\n    let kend = min({route}[{off}u + bi + 1u], {}u);\n",
            layout.rows()
        ),
        put: format!(
            "    {}\n",
            b.put(&out, &format!("(bi * {nn}u + row) * {k}u + col"), "acc")
        ),
        a_rows: None,
        a_k,
        b_k,
        a4: None,
        b4: None,
        steps_by_4: false,
    };
    let scalar = Schedule::new(target, (nn, k), nn * k * layout.rows(), None);
    // The contraction runs over gathered padded rows: only vec4s along A's rows and B's columns.
    let schedule = blocked.vectorise(
        &mut b,
        target,
        scalar,
        KRange::Gathered { align: layout.tile },
        true,
    );
    let grid = fold(schedule.workgroups(&blocked) as u64, target)?;
    Ok(b.finish(&[], &blocked::body(&blocked, schedule), grid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emit::frame::validate_wgsl;
    use crate::fuse::GroupKind;
    use crate::ir::TensorType;

    /// `dw` alone in its group, as the unfused plan has it.
    fn alone(dw: NodeId) -> Group {
        Group {
            kind: GroupKind::Single,
            domain: Vec::new(),
            nodes: vec![dw],
            inputs: Vec::new(),
            outputs: vec![dw],
        }
    }

    fn grad_w_graph(layout: RouteLayout, n: usize, k: usize) -> (Graph, NodeId) {
        let mut g = Graph::new();
        let idx = g.input("idx", TensorType::u32(&[layout.tokens, layout.k]));
        let route = g.add(Op::MoeRoute { layout }, &[idx], "route").unwrap();
        let gr = g.input("g", TensorType::f32(&[layout.rows(), n]));
        let x = g.input("x", TensorType::f32(&[layout.rows(), k]));
        let dw = g
            .add(Op::GroupedMatMulGradW { layout }, &[gr, x, route], "dw")
            .unwrap();
        (g, dw)
    }

    #[test]
    fn grad_w_is_valid_wgsl_and_its_grid_covers_every_block() {
        for (n, k, max_dim) in [
            (23, 19, 65535),
            (75, 70, 65535),
            (512, 256, 65535),
            (1, 1, 65535),
            (75, 70, 4),
        ] {
            let layout = RouteLayout::dropless(37, 2, 5, 4);
            let (g, dw) = grad_w_graph(layout, n, k);
            let target = Target {
                max_workgroups_per_dim: max_dim,
                ..Target::default()
            };
            let src = grad_kernel(&g, &alone(dw), &target)
                .unwrap_or_else(|_| panic!("grid of {n}x{k} fits"));
            validate_wgsl(&src.wgsl).unwrap_or_else(|e| panic!("{n}x{k}: {e}"));
            let p = Schedule::new(&target, (n, k), 0, None);
            let blocks = layout.experts * n.div_ceil(p.rows) * k.div_ceil(p.cols * p.wg as usize);
            let grid: usize = src.workgroups.iter().map(|&d| d as usize).product();
            assert!(
                grid >= blocks && src.workgroups.iter().all(|&d| d <= max_dim),
                "{n}x{k}: grid {:?} for {blocks} blocks",
                src.workgroups
            );
            // g, x and the route are read, dw written.
            assert_eq!(
                src.bindings.iter().map(|b| b.1).collect::<Vec<_>>(),
                [false, false, false, true]
            );
        }
    }

    #[test]
    fn grad_w_binds_a_shared_operand_once() {
        // x · xᵀ per expert: g and x are the same buffer.
        let layout = RouteLayout::dropless(9, 2, 3, 4);
        let mut g = Graph::new();
        let idx = g.input("idx", TensorType::u32(&[9, 2]));
        let route = g.add(Op::MoeRoute { layout }, &[idx], "route").unwrap();
        let x = g.input("x", TensorType::f32(&[layout.rows(), 6]));
        let dw = g
            .add(Op::GroupedMatMulGradW { layout }, &[x, x, route], "dw")
            .unwrap();
        let src =
            grad_kernel(&g, &alone(dw), &Target::default()).unwrap_or_else(|_| panic!("fits"));
        validate_wgsl(&src.wgsl).unwrap();
        assert_eq!(src.bindings.len(), 3);
    }
}
