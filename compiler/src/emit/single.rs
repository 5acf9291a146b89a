//! Kernels of ops that are never fused (layout changes, NN composites, MoE routing), one function
//! per op so each reads on its own; the grouped weight gradient and the LSTM ops go to [`super::grad`]
//! and [`super::lstm`]. Most are one invocation per output element ([`Cx::per_item`]) with a body
//! from a `shaders/` template; top-k, cross-entropy, routing, Sinkhorn and auction are fixed-function
//! templates reading the constants declared in front of them.

use super::expr::{lit, Rope};
use super::frame::{anchor, fill, fold, per_item_main, wg_size, Binder, KernelError, KernelSrc};
use crate::fuse::Group;
use crate::ir::{Graph, NodeId, Op, RouteLayout};
use crate::target::Target;
use std::fmt::Write;

const MOE_ROUTE: &str = include_str!("../../../shaders/moe_route.wgsl");
const TOPK: &str = include_str!("../../../shaders/topk.wgsl");
const CROSS_ENTROPY: &str = include_str!("../../../shaders/cross_entropy.wgsl");
const SINKHORN: &str = include_str!("../../../shaders/sinkhorn.wgsl");
const AUCTION: &str = include_str!("../../../shaders/auction.wgsl");

// Kernel bodies with `{placeholder}`s that the generators fill ([`fill`]): shapes and offsets baked
// in as literals, binding names, and load/store expressions (which depend on the binding's dtype and
// split). Per-item bodies start inside `main` (after `per_item_main`) and leave the value in `v`.
const TOPK_MASK: &str = include_str!("../../../shaders/topk_mask.wgsl");
const MOE_GATHER: &str = include_str!("../../../shaders/moe_gather.wgsl");
const MOE_COMBINE: &str = include_str!("../../../shaders/moe_combine.wgsl");
const SUM_TO: &str = include_str!("../../../shaders/sum_to.wgsl");
const EMBEDDING_GRAD: &str = include_str!("../../../shaders/embedding_grad.wgsl");
const CROSS_ENTROPY_GRAD: &str = include_str!("../../../shaders/cross_entropy_grad.wgsl");
const SCATTER_COLS: &str = include_str!("../../../shaders/scatter_cols.wgsl");
const MOE_GATHER_GRAD: &str = include_str!("../../../shaders/moe_gather_grad.wgsl");
const MOE_COMBINE_GRAD_ROWS: &str = include_str!("../../../shaders/moe_combine_grad_rows.wgsl");
const MOE_COMBINE_GRAD_WEIGHTS: &str =
    include_str!("../../../shaders/moe_combine_grad_weights.wgsl");
const CONCAT_ROWS: &str = include_str!("../../../shaders/concat_rows.wgsl");
const EXPERT_CHOICE: &str = include_str!("../../../shaders/expert_choice.wgsl");
const MOE_ROUTE_KEPT_PRIO: &str = include_str!("../../../shaders/moe_route_kept_prio.wgsl");
const MOE_ROUTE_KEPT_SEEN: &str = include_str!("../../../shaders/moe_route_kept_seen.wgsl");

/// What every single-op kernel reads: its node, operands, output shape and per-item grid.
struct Cx<'g> {
    graph: &'g Graph,
    target: &'g Target,
    n: NodeId,
    args: Vec<NodeId>,
    shape: &'g [usize],
    total: usize,
    wg: u32,
}

impl Cx<'_> {
    /// One invocation per output element: `body` computes `let v = ...;` from `i`.
    fn per_item(
        &self,
        mut b: Binder,
        body: &dyn Fn(&Binder) -> String,
    ) -> Result<KernelSrc, KernelError> {
        let body = body(&b);
        let out = b.write(self.n);
        let src = format!(
            "{}{body}    {}\n}}\n",
            per_item_main(self.wg, self.total),
            b.put(&out, "i", "v")
        );
        let grid = fold(self.total.div_ceil(self.wg as usize) as u64, self.target)?;
        Ok(b.finish(&[], &src, grid))
    }
}

/// Kernel of a `Single` group: its op, and for a weight gradient the gather prologues of its operands.
pub(crate) fn kernel(
    graph: &Graph,
    group: &Group,
    target: &Target,
) -> Result<KernelSrc, KernelError> {
    let n = anchor(graph, group);
    let node = graph.node(n);
    let cx = Cx {
        graph,
        target,
        n,
        args: graph.inputs(n),
        shape: &node.ty.shape,
        total: node.ty.numel(),
        wg: wg_size(target),
    };
    let b = Binder::new(graph, target);
    match &node.op {
        Op::Permute { perm } => permute(&cx, b, perm),
        Op::Embedding => embedding(&cx, b),
        Op::Rope { .. } | Op::RopeGrad { .. } => rope(&cx, b),
        Op::GatherCols => gather_cols(&cx, b),
        Op::TopKMask { experts } => topk_mask(&cx, b, experts),
        Op::MoeGather { layout } => moe_gather(&cx, b, layout),
        Op::MoeCombine { layout } => moe_combine(&cx, b, layout),
        Op::TopK { k } => topk(&cx, b, k),
        Op::CrossEntropy => cross_entropy(&cx, b),
        Op::MoeRoute { layout } => moe_route(&cx, b, layout),
        Op::SumTo { shape: to } => sum_to(&cx, b, to),
        Op::EmbeddingGrad { vocab } => embedding_grad(&cx, b, vocab),
        Op::GroupedMatMulGradW { .. } => super::grad::grad_kernel(graph, group, target),
        Op::LstmScan { .. }
        | Op::LstmHidden
        | Op::LstmScanGrad { .. }
        | Op::LstmScanGradW { .. }
        | Op::LstmLast { .. }
        | Op::LstmLastGrad { .. } => super::lstm::kernel(graph, n, target),
        Op::CrossEntropyGrad => cross_entropy_grad(&cx, b),
        Op::ScatterCols { cols } => scatter_cols(&cx, b, cols),
        Op::MoeGatherGrad { layout } => moe_gather_grad(&cx, b, layout),
        Op::MoeCombineGradRows { layout } => moe_combine_grad_rows(&cx, b, layout),
        Op::MoeCombineGradWeights { layout } => moe_combine_grad_weights(&cx, b, layout),
        Op::SliceRows { start, .. } => slice_rows(&cx, b, start),
        Op::ConcatRows => concat_rows(&cx, b),
        Op::SliceCols { start, len } => slice_cols(&cx, b, start, len),
        Op::RouteLoad { layout } => route_load(&cx, b, layout),
        Op::ExpertChoice { capacity } => expert_choice(&cx, b, capacity),
        Op::Sinkhorn { iters } => sinkhorn(&cx, b, iters),
        Op::Auction {
            rounds,
            epsilon,
            budget,
            capacity,
            k,
        } => auction(&cx, b, rounds, epsilon, budget, capacity, k),
        other @ (Op::Input { .. }
        | Op::Param { .. }
        | Op::Affine { .. }
        | Op::Unary(_)
        | Op::Binary(_)
        | Op::Reduce(_)
        | Op::Reshape { .. }
        | Op::MatMul { .. }
        | Op::Softmax { .. }
        | Op::LinearCrossEntropy
        | Op::GroupedMatMul { .. }
        | Op::BroadcastTo { .. }
        | Op::LinearCrossEntropyGradH
        | Op::LinearCrossEntropyGradW
        | Op::GroupedMatMulGradX { .. }) => Err(KernelError::Unsupported(other.mnemonic())),
    }
}

/// `permute(x, perm)`: each output element reads its source through the permuted strides.
fn permute(cx: &Cx, mut b: Binder, perm: &[usize]) -> Result<KernelSrc, KernelError> {
    let Cx {
        graph,
        ref args,
        shape,
        ..
    } = *cx;
    let x = b.read(args[0]);
    let in_shape = &graph.ty(args[0]).shape;
    let in_stride: Vec<usize> = (0..in_shape.len())
        .map(|a| in_shape[a + 1..].iter().product())
        .collect();
    let mut terms = Vec::new();
    let mut rest = 1usize;
    for axis in (0..shape.len()).rev() {
        if shape[axis] > 1 {
            terms.push(format!(
                "((i / {rest}u) % {}u) * {}u",
                shape[axis], in_stride[perm[axis]]
            ));
        }
        rest *= shape[axis];
    }
    let index = if terms.is_empty() {
        "0u".to_string()
    } else {
        terms.join(" + ")
    };
    cx.per_item(b, &|b| format!("    let v = {};\n", b.at(&x, &index)))
}

/// Embedding lookup; out-of-range ids clamp to the last row.
fn embedding(cx: &Cx, mut b: Binder) -> Result<KernelSrc, KernelError> {
    let Cx {
        graph, ref args, ..
    } = *cx;
    let table = b.read(args[0]);
    let ids = b.read(args[1]);
    let (v, d) = (graph.ty(args[0]).shape[0], graph.ty(args[0]).shape[1]);
    cx.per_item(b, &|b| {
        format!(
            "    let id = min({ids}[i / {d}u], {}u);\n    let v = {};\n",
            v - 1,
            b.at(&table, &format!("id * {d}u + i % {d}u"))
        )
    })
}

/// RoPE (or its adjoint) on its own, when no matmul absorbed it: the same [`Rope`] function per element.
fn rope(cx: &Cx, mut b: Binder) -> Result<KernelSrc, KernelError> {
    let Cx {
        graph,
        target,
        n,
        ref args,
        total,
        wg,
        ..
    } = *cx;
    // The rotation a fused matmul computes in its loads, here per element.
    let x = b.read(args[0]);
    let out = b.write(n);
    let src = format!(
        "{}{}    {}\n}}\n",
        Rope::new(graph, n).function("rope", &b.access(&x)),
        per_item_main(wg, total),
        b.put(&out, "i", "rope(i)")
    );
    let grid = fold(total.div_ceil(wg as usize) as u64, target)?;
    Ok(b.finish(&[], &src, grid))
}

/// `x[t, idx[t, j]]`; an unassigned slot (`NONE`) gathers 0.
fn gather_cols(cx: &Cx, mut b: Binder) -> Result<KernelSrc, KernelError> {
    let Cx {
        graph,
        ref args,
        shape,
        ..
    } = *cx;
    let x = b.read(args[0]);
    let idx = b.read(args[1]);
    let (e, k) = (graph.ty(args[0]).shape[1], shape[1]);
    // An unassigned slot (`NONE`) gathers 0.
    cx.per_item(b, &|_| {
        format!("    let c = {idx}[i];\n    let v = select({x}[(i / {k}u) * {e}u + min(c, {}u)], 0.0, c == {}u);\n", e - 1, RouteLayout::NONE)
    })
}

/// One-hot mask of each row's top-k experts.
fn topk_mask(cx: &Cx, mut b: Binder, experts: &usize) -> Result<KernelSrc, KernelError> {
    let Cx {
        graph, ref args, ..
    } = *cx;
    let idx = b.read(args[0]);
    let k = graph.ty(args[0]).shape[1];
    cx.per_item(b, &|_| {
        fill(TOPK_MASK, &[("experts", experts), ("k", &k), ("idx", &idx)])
    })
}

/// Token rows into the padded expert-sorted rows of the routing table.
fn moe_gather(cx: &Cx, mut b: Binder, layout: &RouteLayout) -> Result<KernelSrc, KernelError> {
    let Cx {
        ref args, shape, ..
    } = *cx;
    let x = b.read(args[0]);
    let route = b.read(args[1]);
    let d = shape[1];
    cx.per_item(b, &|b| {
        fill(
            MOE_GATHER,
            &[
                ("route", &route),
                ("row_slot_at", &layout.row_slot_at()),
                ("d", &d),
                ("none", &RouteLayout::NONE),
                (
                    "x_at",
                    &b.at(&x, &format!("(slot / {}u) * {d}u + i % {d}u", layout.k)),
                ),
            ],
        )
    })
}

/// Each token's gate-weighted sum over its expert output rows.
fn moe_combine(cx: &Cx, mut b: Binder, layout: &RouteLayout) -> Result<KernelSrc, KernelError> {
    let Cx {
        ref args, shape, ..
    } = *cx;
    let yp = b.read(args[0]);
    let w = b.read(args[1]);
    let route = b.read(args[2]);
    let (d, k) = (shape[1], layout.k);
    cx.per_item(b, &|b| {
        fill(
            MOE_COMBINE,
            &[
                ("d", &d),
                ("k", &k),
                ("route", &route),
                ("slot_row_at", &layout.slot_row_at()),
                ("none", &RouteLayout::NONE),
                ("w_at", &b.at(&w, &format!("t * {k}u + j"))),
                ("yp_at", &b.at(&yp, &format!("r * {d}u + i % {d}u"))),
            ],
        )
    })
}

/// Top-k indices per row (`shaders/topk.wgsl`).
fn topk(cx: &Cx, mut b: Binder, k: &usize) -> Result<KernelSrc, KernelError> {
    let Cx {
        graph,
        target,
        n,
        ref args,
        wg,
        ..
    } = *cx;
    b.read_as(args[0], "x");
    b.write_as(n, "out");
    let (t, e) = (graph.ty(args[0]).shape[0], graph.ty(args[0]).shape[1]);
    let grid = fold(t.div_ceil(wg as usize) as u64, target)?;
    Ok(b.finish(
        &[
            ("T", t as u64),
            ("E", e as u64),
            ("KK", *k as u64),
            ("WG", u64::from(wg)),
        ],
        TOPK,
        grid,
    ))
}

/// Mean cross-entropy (`shaders/cross_entropy.wgsl`).
fn cross_entropy(cx: &Cx, mut b: Binder) -> Result<KernelSrc, KernelError> {
    let Cx {
        graph,
        n,
        ref args,
        wg,
        ..
    } = *cx;
    b.read_as(args[0], "logits");
    b.read_as(args[1], "targets");
    b.write_as(n, "out");
    let (rows, v) = (graph.ty(args[0]).shape[0], graph.ty(args[0]).shape[1]);
    // The tree reduction needs a power-of-two workgroup.
    let ce_wg = 1u32 << (31 - wg.leading_zeros());
    // The template reads f32 logits; f16 ones (the chunked head under `precision = f16`)
    // are widened on load.
    let src = if b.access("logits").f16 {
        widen_reads(CROSS_ENTROPY, "logits")
    } else {
        CROSS_ENTROPY.to_string()
    };
    Ok(b.finish(
        &[
            ("N", rows as u64),
            ("V", v as u64),
            ("WG", u64::from(ce_wg)),
        ],
        &src,
        [1, 1, 1],
    ))
}

/// The routing table (`shaders/moe_route.wgsl`), with the capacity rule `kept`.
fn moe_route(cx: &Cx, mut b: Binder, layout: &RouteLayout) -> Result<KernelSrc, KernelError> {
    let Cx {
        n, ref args, wg, ..
    } = *cx;
    b.read_as(args[0], "idx");
    let kept = if args.len() > 1 {
        // Kept when fewer than CAPACITY of the expert's slots outrank it (higher priority, or
        // equal priority and a lower slot).
        b.read_as(args[1], "prio");
        MOE_ROUTE_KEPT_PRIO
    } else {
        MOE_ROUTE_KEPT_SEEN
    };
    b.write_as(n, "route");
    let consts = [
        ("T", layout.tokens as u64),
        ("KK", layout.k as u64),
        ("E", layout.experts as u64),
        ("TILE", layout.tile as u64),
        ("ROWS", layout.rows() as u64),
        (
            "CAPACITY",
            layout.capacity.min(layout.tokens * layout.k) as u64,
        ),
        ("WG", u64::from(wg)),
        ("COUNTS_AT", layout.counts_at() as u64),
        ("OFFSETS_AT", layout.offsets_at() as u64),
        ("SLOT_ROW_AT", layout.slot_row_at() as u64),
        ("ROW_SLOT_AT", layout.row_slot_at() as u64),
        ("ROW_EXPERT_AT", layout.row_expert_at() as u64),
        ("NONE", u64::from(RouteLayout::NONE)),
    ];
    Ok(b.finish(&consts, &format!("{kept}{MOE_ROUTE}"), [1, 1, 1]))
}

/// Broadcast adjoint: one invocation per output element sums the broadcast axes in a fixed order.
fn sum_to(cx: &Cx, mut b: Binder, to: &[usize]) -> Result<KernelSrc, KernelError> {
    let Cx {
        graph, ref args, ..
    } = *cx;
    // One invocation per output element sums the broadcast axes in a fixed order.
    let x = b.read(args[0]);
    let from = &graph.ty(args[0]).shape;
    let pad = from.len() - to.len();
    let t: Vec<usize> = (0..from.len())
        .map(|i| if i < pad { 1 } else { to[i - pad] })
        .collect();
    let xstride: Vec<usize> = (0..from.len())
        .map(|i| from[i + 1..].iter().product())
        .collect();
    let reduced: Vec<usize> = (0..from.len())
        .filter(|&i| t[i] == 1 && from[i] > 1)
        .collect();
    let count: usize = reduced.iter().map(|&i| from[i]).product();
    // Base index in x of output element i: its kept coordinates, reduced coordinates zero.
    let mut base_terms = Vec::new();
    let mut rest = 1usize;
    for a in (0..from.len()).rev() {
        if t[a] > 1 {
            base_terms.push(format!("((i / {rest}u) % {}u) * {}u", t[a], xstride[a]));
        }
        rest *= t[a];
    }
    let mut red_terms = Vec::new();
    let mut rest = 1usize;
    for &a in reduced.iter().rev() {
        red_terms.push(format!("((r / {rest}u) % {}u) * {}u", from[a], xstride[a]));
        rest *= from[a];
    }
    let base_expr = if base_terms.is_empty() {
        "0u".to_string()
    } else {
        base_terms.join(" + ")
    };
    let red_expr = if red_terms.is_empty() {
        "0u".to_string()
    } else {
        red_terms.join(" + ")
    };
    let term = b.at(&x, &format!("base + {red_expr}"));
    cx.per_item(b, &|_| {
        fill(
            SUM_TO,
            &[
                ("base_expr", &base_expr),
                ("count", &count),
                ("term", &term),
            ],
        )
    })
}

/// Embedding gradient as a deterministic gather (no float atomics).
fn embedding_grad(cx: &Cx, mut b: Binder, vocab: &usize) -> Result<KernelSrc, KernelError> {
    let Cx {
        graph,
        target,
        n,
        ref args,
        wg,
        ..
    } = *cx;
    // Deterministic scatter-add as a gather: one invocation per vocabulary row scans the ids
    // in order and accumulates the matching gradient rows into its own output row, so the
    // cost is vocab·ids compares plus ids·D adds (a per-element gather would be vocab·ids·D).
    let ids = b.read(args[0]);
    let g = b.read(args[1]);
    let out = b.write(n);
    let n_ids = graph.ty(args[0]).numel();
    let d = graph.ty(args[1]).last();
    let at = format!("tok * {d}u + c");
    let body = fill(
        EMBEDDING_GRAD,
        &[
            ("main", &per_item_main(wg, *vocab)),
            ("d", &d),
            ("zero", &b.put(&out, &at, "0.0")),
            ("n_ids", &n_ids),
            ("ids", &ids),
            (
                "acc",
                &b.put(
                    &out,
                    &at,
                    &format!(
                        "{} + {}",
                        b.at(&out, &at),
                        b.at(&g, &format!("j * {d}u + c"))
                    ),
                ),
            ),
        ],
    );
    let grid = fold(vocab.div_ceil(wg as usize) as u64, target)?;
    Ok(b.finish(&[], &body, grid))
}

/// Cross-entropy gradient, one invocation per row.
fn cross_entropy_grad(cx: &Cx, mut b: Binder) -> Result<KernelSrc, KernelError> {
    let Cx {
        target,
        n,
        ref args,
        shape,
        wg,
        ..
    } = *cx;
    // One invocation per row: logsumexp, then (softmax - onehot) · g / N.
    let logits = b.read(args[0]);
    let targets = b.read(args[1]);
    let g = b.read(args[2]);
    let out = b.write(n);
    let (rows, v) = (shape[0], shape[1]);
    // Logits and the adjoint may be f16 (the chunked head under `precision = f16`).
    let logit = b.at(&logits, &format!("r * {v}u + c"));
    let store = b.put(
        &out,
        &format!("r * {v}u + c"),
        &format!("(exp({logit} - lse) - select(0.0, 1.0, c == t)) * scale"),
    );
    let body = fill(
        CROSS_ENTROPY_GRAD,
        &[
            ("main", &per_item_main(wg, rows)),
            ("v", &v),
            ("logit", &logit),
            ("g", &g),
            ("n", &lit(rows.max(1) as f32)),
            ("targets", &targets),
            ("store", &store),
        ],
    );
    let grid = fold(rows.div_ceil(wg as usize) as u64, target)?;
    Ok(b.finish(&[], &body, grid))
}

/// Adjoint of `gather_cols`: each column sums the slots that picked it.
fn scatter_cols(cx: &Cx, mut b: Binder, cols: &usize) -> Result<KernelSrc, KernelError> {
    let Cx {
        graph, ref args, ..
    } = *cx;
    let g = b.read(args[0]);
    let idx = b.read(args[1]);
    let k = graph.ty(args[0]).shape[1];
    cx.per_item(b, &|_| {
        fill(
            SCATTER_COLS,
            &[("cols", cols), ("k", &k), ("idx", &idx), ("g", &g)],
        )
    })
}

/// Adjoint of `moe_gather`: each token row sums its padded rows.
fn moe_gather_grad(cx: &Cx, mut b: Binder, layout: &RouteLayout) -> Result<KernelSrc, KernelError> {
    let Cx {
        ref args, shape, ..
    } = *cx;
    let gp = b.read(args[0]);
    let route = b.read(args[1]);
    let (d, k) = (shape[1], layout.k);
    cx.per_item(b, &|b| {
        fill(
            MOE_GATHER_GRAD,
            &[
                ("d", &d),
                ("k", &k),
                ("route", &route),
                ("slot_row_at", &layout.slot_row_at()),
                ("none", &RouteLayout::NONE),
                ("gp_at", &b.at(&gp, &format!("r * {d}u + i % {d}u"))),
            ],
        )
    })
}

/// Adjoint of `moe_combine` towards the expert rows.
fn moe_combine_grad_rows(
    cx: &Cx,
    mut b: Binder,
    layout: &RouteLayout,
) -> Result<KernelSrc, KernelError> {
    let Cx {
        ref args, shape, ..
    } = *cx;
    let dy = b.read(args[0]);
    let w = b.read(args[1]);
    let route = b.read(args[2]);
    let d = shape[1];
    cx.per_item(b, &|b| {
        fill(
            MOE_COMBINE_GRAD_ROWS,
            &[
                ("route", &route),
                ("row_slot_at", &layout.row_slot_at()),
                ("d", &d),
                ("none", &RouteLayout::NONE),
                ("w_at", &b.at(&w, "slot")),
                (
                    "dy_at",
                    &b.at(&dy, &format!("(slot / {}u) * {d}u + i % {d}u", layout.k)),
                ),
            ],
        )
    })
}

/// Adjoint of `moe_combine` towards the gate weights.
fn moe_combine_grad_weights(
    cx: &Cx,
    mut b: Binder,
    layout: &RouteLayout,
) -> Result<KernelSrc, KernelError> {
    let Cx {
        graph, ref args, ..
    } = *cx;
    let dy = b.read(args[0]);
    let yp = b.read(args[1]);
    let route = b.read(args[2]);
    let d = graph.ty(args[0]).shape[1];
    cx.per_item(b, &|b| {
        fill(
            MOE_COMBINE_GRAD_WEIGHTS,
            &[
                ("route", &route),
                ("slot_row_at", &layout.slot_row_at()),
                ("none", &RouteLayout::NONE),
                ("k", &layout.k),
                ("d", &d),
                ("dy_at", &b.at(&dy, &format!("t * {d}u + c"))),
                ("yp_at", &b.at(&yp, &format!("r * {d}u + c"))),
            ],
        )
    })
}

/// Rows `start..` of the operand.
fn slice_rows(cx: &Cx, mut b: Binder, start: &usize) -> Result<KernelSrc, KernelError> {
    let Cx {
        ref args, shape, ..
    } = *cx;
    let x = b.read(args[0]);
    let row: usize = shape[1..].iter().product();
    cx.per_item(b, &|b| {
        format!(
            "    let v = {};\n",
            b.at(&x, &format!("{}u + i", start * row))
        )
    })
}

/// Two operands stacked by rows.
fn concat_rows(cx: &Cx, mut b: Binder) -> Result<KernelSrc, KernelError> {
    let Cx {
        graph, ref args, ..
    } = *cx;
    let upper = b.read(args[0]);
    let lower = b.read(args[1]);
    let split = graph.ty(args[0]).numel();
    cx.per_item(b, &|b| {
        fill(
            CONCAT_ROWS,
            &[
                ("split", &split),
                ("upper_at", &b.at(&upper, "i")),
                ("lower_at", &b.at(&lower, &format!("i - {split}u"))),
            ],
        )
    })
}

/// Columns `start..start + len` of each row.
fn slice_cols(
    cx: &Cx,
    mut b: Binder,
    start: &usize,
    len: &usize,
) -> Result<KernelSrc, KernelError> {
    let Cx {
        graph, ref args, ..
    } = *cx;
    let x = b.read(args[0]);
    let cols = graph.ty(args[0]).shape[1];
    cx.per_item(b, &|_| {
        format!("    let v = {x}[(i / {len}u) * {cols}u + {start}u + i % {len}u];\n")
    })
}

/// The routing table's per-expert counts as f32 (the load balance statistics).
fn route_load(cx: &Cx, mut b: Binder, layout: &RouteLayout) -> Result<KernelSrc, KernelError> {
    let Cx { ref args, .. } = *cx;
    let route = b.read(args[0]);
    cx.per_item(b, &|_| {
        format!("    let v = f32({route}[{}u + i]);\n", layout.counts_at())
    })
}

/// Expert-choice routing: each expert takes its `capacity` best tokens.
fn expert_choice(cx: &Cx, mut b: Binder, capacity: &usize) -> Result<KernelSrc, KernelError> {
    let Cx {
        ref args, shape, ..
    } = *cx;
    // Invocation (t, e): expert e takes token t when fewer than `capacity` tokens outrank it in
    // column e (higher score, or equal score and lower token).
    let x = b.read(args[0]);
    let (t, e) = (shape[0], shape[1]);
    cx.per_item(b, &|_| {
        fill(
            EXPERT_CHOICE,
            &[
                ("e", &e),
                ("x", &x),
                ("t", &t),
                ("none", &RouteLayout::NONE),
                ("capacity", capacity),
            ],
        )
    })
}

/// Sinkhorn balancing (`shaders/sinkhorn.wgsl`), one workgroup.
fn sinkhorn(cx: &Cx, mut b: Binder, iters: &usize) -> Result<KernelSrc, KernelError> {
    let Cx {
        n,
        ref args,
        shape,
        wg,
        ..
    } = *cx;
    b.read_as(args[0], "logits");
    b.write_as(n, "out");
    let (t, e) = (shape[0], shape[1]);
    Ok(b.finish(
        &[
            ("T", t as u64),
            ("E", e as u64),
            ("ITERS", *iters as u64),
            ("WG", u64::from(wg)),
        ],
        SINKHORN,
        [1, 1, 1],
    ))
}

/// Auction routing (`shaders/auction.wgsl`), one workgroup.
fn auction(
    cx: &Cx,
    mut b: Binder,
    rounds: &usize,
    epsilon: &f32,
    budget: &f32,
    capacity: &usize,
    k: &usize,
) -> Result<KernelSrc, KernelError> {
    let Cx {
        graph,
        n,
        ref args,
        wg,
        ..
    } = *cx;
    b.read_as(args[0], "values");
    b.read_as(args[1], "start_prices");
    b.write_as(n, "out");
    let (t, e) = (graph.ty(args[0]).shape[0], graph.ty(args[0]).shape[1]);
    let consts = [
        ("T", t as u64),
        ("E", e as u64),
        ("KK", *k as u64),
        ("ROUNDS", *rounds as u64),
        ("CAP", *capacity as u64),
        ("WG", u64::from(wg)),
        ("NONE", u64::from(RouteLayout::NONE)),
    ];
    let floats = format!(
        "const EPS: f32 = {};\nconst BUDGET: f32 = {};\n",
        lit(*epsilon),
        lit(*budget)
    );
    Ok(b.finish(&consts, &format!("{floats}{AUCTION}"), [1, 1, 1]))
}

/// `src` with every read `name[...]` widened to `f32(name[...])`: a fixed-function template written
/// against an f32 binding, bound to an f16 one. The templates' indices hold no brackets, and they
/// never write such a binding; comments are left as they are.
fn widen_reads(src: &str, name: &str) -> String {
    let open = format!("{name}[");
    let mut out = String::with_capacity(src.len() + 64);
    for line in src.split_inclusive('\n') {
        let (mut rest, comment) = line.split_at(line.find("//").unwrap_or(line.len()));
        while let Some(at) = rest.find(&open) {
            let whole_word = rest[..at]
                .chars()
                .next_back()
                .is_none_or(|c| !(c.is_alphanumeric() || c == '_'));
            let end = rest[at..].find(']').map_or(rest.len(), |e| at + e + 1);
            out.push_str(&rest[..at]);
            if whole_word {
                let _ = write!(out, "f32({})", &rest[at..end]);
            } else {
                out.push_str(&rest[at..end]);
            }
            rest = &rest[end..];
        }
        out.push_str(rest);
        out.push_str(comment);
    }
    out
}
