//! Router kernels ([`crate::fuse::GroupKind::Router`]): one invocation per token row computes the
//! router's narrow matmul row `x[t] · Wᵀ` and every row-local member after it (softmax or sigmoid,
//! top-k, gathered and renormalised gate weights, their scatter, the top-k mask, row statistics) in
//! function-local arrays, then writes the materialised members. With `E` columns the matmul row is
//! `E · D` multiply-adds, so a row per invocation keeps the whole router in registers without
//! workgroup memory or barriers on every target.
//!
//! Each member is computed as its own kernel computes it (the top-k is the same selection as
//! `shaders/topk.wgsl`: descending, ties to the lower index), so fused and unfused agree.

use super::expr::{bcast_index, op_expr, strided_index};
use super::frame::{fold, per_item_main, Binder, KernelError, KernelSrc};
use crate::fuse::{base, strided_view, Group};
use crate::ir::{DType, Graph, NodeId, Op, ReduceOp};
use crate::target::Target;
use std::collections::HashSet;
use std::fmt::Write;

/// Invocations per workgroup (one token row each).
const WG: u32 = 64;

/// The router group's kernel.
pub(crate) fn router_kernel(
    graph: &Graph,
    group: &Group,
    target: &Target,
) -> Result<KernelSrc, KernelError> {
    let rows = group.domain[0];
    let wg = WG.min(target.max_invocations_per_workgroup.max(1));
    // Absorbed permutes are read in place by the members that use them (no code of their own).
    let nodes: Vec<NodeId> = group
        .nodes
        .iter()
        .copied()
        .filter(|&n| !matches!(graph.node(n).op, Op::Permute { .. }))
        .collect();
    let members: HashSet<NodeId> = nodes.iter().copied().collect();
    let mut b = Binder::new(graph, target);
    let mut body = per_item_main(wg, rows);
    for &n in &nodes {
        let ty = match graph.ty(n).dtype {
            DType::U32 => "u32",
            DType::F32 | DType::F16 => "f32",
        };
        let _ = writeln!(
            body,
            "    var v{}: array<{ty}, {}>;",
            n.index(),
            cols(graph, n)
        );
    }
    for &n in &nodes {
        let code = member(graph, &members, &mut b, n);
        let _ = writeln!(body, "    {{\n{code}    }}");
    }
    for &o in &group.outputs {
        let name = b.write(o);
        let c = cols(graph, o);
        let put = b.put(
            &name,
            &format!("i * {c}u + c"),
            &format!("v{}[c]", o.index()),
        );
        let _ = writeln!(
            body,
            "    for (var c = 0u; c < {c}u; c = c + 1u) {{\n        {put}\n    }}"
        );
    }
    body.push_str("}\n");
    let grid = fold(rows.div_ceil(wg as usize) as u64, target)?;
    Ok(b.finish(&[], &body, grid))
}

/// Columns of a member's `[T, C]` row.
fn cols(graph: &Graph, n: NodeId) -> usize {
    graph.ty(n).shape[1]
}

/// Operand `a` of elementwise member `n` at column `col` (a WGSL `u32` expression): a member's row
/// (its only column when it is a per-row scalar), or a load broadcast over `n`'s `[T, C]` row, in
/// place through permuted strides when `a` is an absorbed permute (seen through reshapes).
fn operand(
    graph: &Graph,
    members: &HashSet<NodeId>,
    b: &mut Binder,
    n: NodeId,
    a: NodeId,
    col: &str,
) -> String {
    if members.contains(&a) {
        let c = if cols(graph, a) == 1 { "0u" } else { col };
        return format!("v{}[{c}]", a.index());
    }
    let shape = &graph.ty(n).shape;
    let lin = format!("(i * {}u + {col})", shape[1]);
    if let (Op::Permute { .. }, Some((src, view, strides))) =
        (&graph.node(base(graph, a)).op, strided_view(graph, a))
    {
        let name = b.read(src);
        return b.at(&name, &strided_index(shape, &view, &strides, &lin));
    }
    let name = b.read(a);
    b.at(&name, &bcast_index(shape, &graph.ty(a).shape, &lin))
}

/// Column `col` of selection operand `a`'s row: a member's, or the token's row `[T, k]` of a buffer.
fn row_at(
    graph: &Graph,
    members: &HashSet<NodeId>,
    b: &mut Binder,
    a: NodeId,
    col: &str,
) -> String {
    if members.contains(&a) {
        return format!("v{}[{col}]", a.index());
    }
    let name = b.read(a);
    b.at(&name, &format!("i * {}u + {col}", cols(graph, a)))
}

/// WGSL statements computing member `n`'s row into `v<n>` (inside its own block).
fn member(graph: &Graph, members: &HashSet<NodeId>, b: &mut Binder, n: NodeId) -> String {
    let args = graph.inputs(n);
    let c = cols(graph, n);
    let v = format!("v{}", n.index());
    let x = args.first().map(|a| format!("v{}", a.index()));
    let xc = args.first().map_or(0, |&a| cols(graph, a));
    match &graph.node(n).op {
        Op::MatMul { trans_b } => {
            let d = *graph.ty(args[0]).shape.last().expect("matmul operand");
            let (xa, wa) = (b.read(args[0]), b.read(args[1]));
            let w_at = if *trans_b {
                format!("c * {d}u + k")
            } else {
                format!("k * {c}u + c")
            };
            format!(
                "        for (var c = 0u; c < {c}u; c = c + 1u) {{\n            var acc = 0.0;\n            for (var k = 0u; k < {d}u; k = k + 1u) {{\n                acc = acc + {} * {};\n            }}\n            {v}[c] = acc;\n        }}\n",
                b.at(&xa, &format!("i * {d}u + k")),
                b.at(&wa, &w_at),
            )
        }
        op @ (Op::Affine { .. } | Op::Unary(_) | Op::Binary(_)) => {
            let operands: Vec<String> = args
                .iter()
                .map(|&a| operand(graph, members, b, n, a, "c"))
                .collect();
            format!(
                "        for (var c = 0u; c < {c}u; c = c + 1u) {{\n            {v}[c] = {};\n        }}\n",
                op_expr(op, &operands)
            )
        }
        Op::Reduce(r) => {
            let x = x.expect("reduce operand");
            let (init, step, fin) = match r {
                ReduceOp::Sum => ("0.0".to_string(), "acc + ", "acc".to_string()),
                ReduceOp::Mean => ("0.0".to_string(), "acc + ", format!("acc / {xc}.0")),
                ReduceOp::Max => (format!("{x}[0]"), "max(acc, ", "acc".to_string()),
            };
            let close = if step.starts_with("max") { ")" } else { "" };
            format!(
                "        var acc = {init};\n        for (var c = 0u; c < {xc}u; c = c + 1u) {{\n            acc = {step}{x}[c]{close};\n        }}\n        {v}[0] = {fin};\n"
            )
        }
        Op::Softmax { .. } => {
            let x = x.expect("softmax operand");
            format!(
                "        var m = {x}[0];\n        for (var c = 1u; c < {c}u; c = c + 1u) {{\n            m = max(m, {x}[c]);\n        }}\n        var s = 0.0;\n        for (var c = 0u; c < {c}u; c = c + 1u) {{\n            {v}[c] = exp({x}[c] - m);\n            s = s + {v}[c];\n        }}\n        for (var c = 0u; c < {c}u; c = c + 1u) {{\n            {v}[c] = {v}[c] / s;\n        }}\n"
            )
        }
        Op::TopK { .. } => {
            // Pick j is the best entry strictly after pick j-1 in (value descending, index ascending).
            let x = x.expect("top-k operand");
            format!(
                "        var pv = 0.0;\n        var pe = 0u;\n        for (var j = 0u; j < {c}u; j = j + 1u) {{\n            var bv = 0.0;\n            var be = {xc}u;\n            for (var e = 0u; e < {xc}u; e = e + 1u) {{\n                let x = {x}[e];\n                let after = j == 0u || x < pv || (x == pv && e > pe);\n                if (after && (be == {xc}u || x > bv)) {{\n                    bv = x;\n                    be = e;\n                }}\n            }}\n            {v}[j] = be;\n            pv = bv;\n            pe = be;\n        }}\n"
            )
        }
        Op::GatherCols => {
            let idx = row_at(graph, members, b, args[1], "j");
            let x = row_at(graph, members, b, args[0], &format!("min(e, {}u)", xc - 1));
            format!(
                "        for (var j = 0u; j < {c}u; j = j + 1u) {{\n            let e = {idx};\n            {v}[j] = select(0.0, {x}, e < {xc}u);\n        }}\n"
            )
        }
        Op::ScatterCols { .. } => {
            let w = row_at(graph, members, b, args[0], "j");
            let idx = row_at(graph, members, b, args[1], "j");
            scatter(graph, n, args[1], &idx, &format!("{v}[e] + {w}"))
        }
        Op::TopKMask { .. } => {
            let idx = row_at(graph, members, b, args[0], "j");
            scatter(graph, n, args[0], &idx, "1.0")
        }
        other @ (Op::Input { .. }
        | Op::Param { .. }
        | Op::Reshape { .. }
        | Op::Permute { .. }
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
        | Op::LstmLastGrad { .. }) => {
            unreachable!(
                "{} in a router group (fuse::router admits it)",
                other.mnemonic()
            )
        }
    }
}

/// Member `n`'s row zeroed, then `v<n>[e] = value` for each picked column `e = idx_j` (the WGSL
/// expression of pick `j` of operand `idx`) in range: `ScatterCols` adds the pick's weight,
/// `TopKMask` sets 1.
fn scatter(graph: &Graph, n: NodeId, idx: NodeId, idx_j: &str, value: &str) -> String {
    let (v, c, k) = (format!("v{}", n.index()), cols(graph, n), cols(graph, idx));
    let idx = idx_j;
    format!(
        "        for (var c = 0u; c < {c}u; c = c + 1u) {{\n            {v}[c] = 0.0;\n        }}\n        for (var j = 0u; j < {k}u; j = j + 1u) {{\n            let e = {idx};\n            if (e < {c}u) {{\n                {v}[e] = {value};\n            }}\n        }}\n"
    )
}
