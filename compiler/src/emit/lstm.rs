//! Kernels of the LSTM ops. The recurrence and its adjoint are persistent kernels
//! (`shaders/lstm_scan.wgsl`, `shaders/lstm_scan_grad.wgsl`): one workgroup per sequence loops over
//! every time step on the device, so a layer direction is one dispatch forward and two backward
//! (gates, then `w_hh`), whatever the context. The input projection of all steps is an ordinary
//! matmul before the scan. The other LSTM ops are one invocation per output element (bodies in
//! `shaders/lstm_scan_grad_w.wgsl`, `shaders/lstm_last*.wgsl`, filled by `frame::fill`).

use super::frame::{fill, fold, per_item_main, wg_size, Binder, KernelError, KernelSrc};
use crate::ir::lstm::{hidden_of, PARTS, PART_H};
use crate::ir::{Graph, NodeId, Op};
use crate::target::Target;

const SCAN: &str = include_str!("../../../shaders/lstm_scan.wgsl");
const SCAN_GRAD: &str = include_str!("../../../shaders/lstm_scan_grad.wgsl");
const SCAN_GRAD_W: &str = include_str!("../../../shaders/lstm_scan_grad_w.wgsl");
const LAST: &str = include_str!("../../../shaders/lstm_last.wgsl");
const LAST_GRAD: &str = include_str!("../../../shaders/lstm_last_grad.wgsl");

/// Most invocations of a scan workgroup: each owns `⌈H / WG⌉` units. 64 keeps a lavapipe
/// workgroup (one CPU thread, 8-wide SIMD) to a few lanes' worth of barriers per step.
const SCAN_WG: usize = 64;

/// Kernel of an LSTM op `n` (always its own group).
pub(crate) fn kernel(graph: &Graph, n: NodeId, target: &Target) -> Result<KernelSrc, KernelError> {
    let args = graph.inputs(n);
    let node = graph.node(n);
    let mut b = Binder::new(graph, target);
    match node.op {
        Op::LstmScan { reverse } => {
            let shape = &node.ty.shape;
            let h = shape[2] / PARTS;
            b.read_as(args[0], "xg");
            b.read_as(args[1], "w");
            b.write_as(n, "rec");
            scan(b, target, shape[0], shape[1], h, reverse, &[], SCAN, 4 * h)
        }
        Op::LstmScanGrad { reverse, col } => {
            let rec = graph.ty(args[1]);
            let h = hidden_of(rec);
            b.read_as(args[0], "g");
            b.read_as(args[1], "rec");
            b.read_as(args[2], "w");
            b.write_as(n, "out");
            let gw = graph.ty(args[0]).last() as u64;
            let extra = [("GW", gw), ("COL", col as u64)];
            let (bs, t) = (rec.shape[0], rec.shape[1]);
            scan(b, target, bs, t, h, reverse, &extra, SCAN_GRAD, 16 * h)
        }
        Op::LstmScanGradW { reverse } => grad_w(b, graph, n, &args, reverse, target),
        Op::LstmHidden => {
            let (w, h) = (node.ty.last(), hidden_of(graph.ty(args[0])));
            let recs: Vec<String> = args.iter().map(|&a| b.read(a)).collect();
            let pick = |r: &String| {
                format!(
                    "{r}[(i / {w}u) * {}u + {}u + c % {h}u]",
                    PARTS * h,
                    PART_H * h
                )
            };
            let v = match &recs[..] {
                [r] => pick(r),
                [r0, r1] => format!("select({}, {}, c >= {h}u)", pick(r0), pick(r1)),
                _ => return Err(KernelError::Unsupported(node.op.mnemonic())),
            };
            per_item(
                b,
                n,
                graph,
                target,
                &format!("    let c = i % {w}u;\n    let v = {v};\n"),
            )
        }
        Op::LstmLast { dirs } => {
            let steps = graph.ty(args[0]).shape[1];
            last_step(b, graph, n, LAST, (dirs, steps), target)
        }
        Op::LstmLastGrad { dirs, steps } => {
            last_step(b, graph, n, LAST_GRAD, (dirs, steps), target)
        }
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
        | Op::MoeCombineGradWeights { .. } => Err(KernelError::Unsupported(node.op.mnemonic())),
    }
}

/// A persistent scan kernel: one workgroup per sequence, `shared` floats of workgroup memory.
#[allow(clippy::too_many_arguments)]
fn scan(
    b: Binder,
    target: &Target,
    batch: usize,
    steps: usize,
    h: usize,
    reverse: bool,
    extra: &[(&str, u64)],
    template: &str,
    shared_bytes: usize,
) -> Result<KernelSrc, KernelError> {
    if shared_bytes > target.max_workgroup_storage_bytes as usize {
        return Err(KernelError::Unsupported(format!(
            "an LSTM of hidden width {h} ({shared_bytes} bytes of workgroup memory, the adapter has {})",
            target.max_workgroup_storage_bytes
        )));
    }
    let wg = SCAN_WG
        .min(h)
        .min(target.max_invocations_per_workgroup.max(1) as usize);
    let mut consts = vec![
        ("B", batch as u64),
        ("T", steps as u64),
        ("H", h as u64),
        ("WG", wg as u64),
        ("UPT", h.div_ceil(wg) as u64),
        ("REVERSE", u64::from(reverse)),
    ];
    consts.extend_from_slice(extra);
    let grid = fold(batch as u64, target)?;
    Ok(b.finish(&consts, template, grid))
}

/// `LstmScanGradW`: `dw[r, k] = Σ_b Σ_steps dgates[b, t, r] · h[b, t_prev, k]`, one invocation per
/// element summing in a fixed order (deterministic).
fn grad_w(
    mut b: Binder,
    graph: &Graph,
    n: NodeId,
    args: &[NodeId],
    reverse: bool,
    target: &Target,
) -> Result<KernelSrc, KernelError> {
    let dg = b.read(args[0]);
    let rec = b.read(args[1]);
    let rt = graph.ty(args[1]);
    let (bs, t, h) = (rt.shape[0], rt.shape[1], hidden_of(rt));
    let order = |s: &str| {
        if reverse {
            format!("({} - {s})", t - 1)
        } else {
            s.to_string()
        }
    };
    let body = fill(
        SCAN_GRAD_W,
        &[
            ("h", &h),
            ("bs", &bs),
            ("t", &t),
            ("step", &order("s")),
            ("prev", &order("(s - 1u)")),
            ("dg", &dg),
            ("gates", &(4 * h)),
            ("rec", &rec),
            ("rec_width", &(PARTS * h)),
            ("h_at", &(PART_H * h)),
        ],
    );
    per_item(b, n, graph, target, &body)
}

/// `LstmLast` (template `LAST`) or its gradient (`LAST_GRAD`) over sequences of `steps` steps and
/// `dirs` directions: a forward direction's last step is `steps - 1`, a reverse one's is 0.
fn last_step(
    mut b: Binder,
    graph: &Graph,
    n: NodeId,
    template: &str,
    (dirs, steps): (usize, usize),
    target: &Target,
) -> Result<KernelSrc, KernelError> {
    let src = b.read(graph.inputs(n)[0]);
    let w = graph.ty(n).last();
    let body = fill(
        template,
        &[
            ("w", &w),
            ("steps", &steps),
            ("last_step", &(steps - 1)),
            ("dir_w", &(w / dirs)),
            ("src", &src),
        ],
    );
    per_item(b, n, graph, target, &body)
}

/// One invocation per element of `n`'s output: `body` computes `let v = ...;` from `i`.
fn per_item(
    mut b: Binder,
    n: NodeId,
    graph: &Graph,
    target: &Target,
    body: &str,
) -> Result<KernelSrc, KernelError> {
    let wg = wg_size(target);
    let total = graph.ty(n).numel();
    let out = b.write(n);
    let src = format!("{}{body}    {out}[i] = v;\n}}\n", per_item_main(wg, total));
    let grid = fold(total.div_ceil(wg as usize) as u64, target)?;
    Ok(b.finish(&[], &src, grid))
}
