//! WGSL expressions the generators build kernels from: float literals, elementwise ops, and the
//! index arithmetic of broadcast, strided and permuted reads. Pure text functions of shapes and
//! ops, shared by every generator (so none imports another for them).

use super::frame::{fill, Access};
use crate::ir::{BinaryOp, Graph, NodeId, Op, UnaryOp};

/// The element function of [`Rope`].
const ROPE: &str = include_str!("../../../shaders/rope.wgsl");
/// The vec4 function of [`Rope`]: the same operations per element.
const ROPE4: &str = include_str!("../../../shaders/rope4.wgsl");

/// f32 literal that WGSL parses back to the same value.
pub(crate) fn lit(x: f32) -> String {
    if x.is_finite() {
        format!("{x:?}f")
    } else {
        format!("bitcast<f32>({}u)", x.to_bits())
    }
}

/// Index into a tensor of shape `src` broadcast (numpy rules) over `domain`, at linear index `lin`
/// of `domain`. Runs of axes that are not broadcast collapse into one div/mod term.
pub(crate) fn bcast_index(domain: &[usize], src: &[usize], lin: &str) -> String {
    let n = domain.len();
    if src.iter().product::<usize>() == 1 {
        return "0u".into();
    }
    if src.len() > n {
        return lin.to_string();
    }
    let pad = n - src.len();
    let s: Vec<usize> = (0..n)
        .map(|i| if i < pad { 1 } else { src[i - pad] })
        .collect();
    if s == domain {
        return lin.to_string();
    }
    let dstride: Vec<usize> = (0..n).map(|i| domain[i + 1..].iter().product()).collect();
    let sstride: Vec<usize> = (0..n).map(|i| s[i + 1..].iter().product()).collect();
    let mut terms = Vec::new();
    let mut i = 0;
    while i < n {
        if s[i] != domain[i] {
            i += 1;
            continue;
        }
        let mut j = i;
        while j + 1 < n && s[j + 1] == domain[j + 1] {
            j += 1;
        }
        let size: usize = domain[i..=j].iter().product();
        if size > 1 {
            let mut t = if dstride[j] == 1 {
                lin.to_string()
            } else {
                format!("({lin} / {}u)", dstride[j])
            };
            if i > 0 {
                t = format!("({t} % {size}u)");
            }
            if sstride[j] != 1 {
                t = format!("{t} * {}u", sstride[j]);
            }
            terms.push(t);
        }
        i = j + 1;
    }
    if terms.is_empty() {
        "0u".into()
    } else {
        terms.join(" + ")
    }
}

/// WGSL expression of an elementwise op applied to operand expressions.
pub(crate) fn op_expr(op: &Op, a: &[String]) -> String {
    match op {
        Op::Affine { mul, add } => format!("({} * {} + {})", a[0], lit(*mul), lit(*add)),
        Op::Unary(u) => {
            let x = &a[0];
            match u {
                UnaryOp::Neg => format!("(-{x})"),
                UnaryOp::Exp => format!("exp({x})"),
                UnaryOp::Log => format!("log({x})"),
                UnaryOp::Sqrt => format!("sqrt({x})"),
                UnaryOp::Rsqrt => format!("inverseSqrt({x})"),
                UnaryOp::Recip => format!("(1.0 / {x})"),
                UnaryOp::Square => format!("({x} * {x})"),
                UnaryOp::Tanh => format!("tanh_({x})"),
                UnaryOp::Relu => format!("max({x}, 0.0)"),
                UnaryOp::Silu => format!("silu_({x})"),
                UnaryOp::Gelu => format!("gelu_({x})"),
                UnaryOp::Sigmoid => format!("sigmoid_({x})"),
                UnaryOp::Softplus => format!("softplus_({x})"),
                UnaryOp::Step => format!("select(0.0, 1.0, {x} > 0.0)"),
                UnaryOp::GeluGrad => format!("gelu_grad_({x})"),
                UnaryOp::NormalCdf => format!("normal_cdf_({x})"),
                UnaryOp::NormalPdf => format!("normal_pdf_({x})"),
            }
        }
        Op::Binary(b) => {
            let (x, y) = (&a[0], &a[1]);
            match b {
                BinaryOp::Add => format!("({x} + {y})"),
                BinaryOp::Sub => format!("({x} - {y})"),
                BinaryOp::Mul => format!("({x} * {y})"),
                BinaryOp::Div => format!("({x} / {y})"),
                BinaryOp::Max => format!("max({x}, {y})"),
                BinaryOp::Ge => format!("select(0.0, 1.0, {x} >= {y})"),
            }
        }
        // A broadcast is an identity on the operand loaded with a broadcasting index.
        Op::BroadcastTo { .. } => a[0].clone(),
        other @ (Op::Input { .. }
        | Op::Param { .. }
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
        | Op::LstmLastGrad { .. }) => {
            unreachable!("op_expr on non-elementwise {}", other.mnemonic())
        }
    }
}

/// Index into a strided view (logical `shape`, element `strides`) broadcast over `domain` (numpy
/// rules: `shape` right-aligned, size-1 axes repeat), at linear index `lin` of the domain.
pub(crate) fn strided_index(
    domain: &[usize],
    shape: &[usize],
    strides: &[usize],
    lin: &str,
) -> String {
    // Leading size-1 axes beyond the domain's rank carry no index.
    let extra = shape.len().saturating_sub(domain.len());
    let (shape, strides) = (&shape[extra..], &strides[extra..]);
    let pad = domain.len() - shape.len();
    let mut terms = Vec::new();
    let mut rest = 1usize;
    for i in (0..domain.len()).rev() {
        if i >= pad && shape[i - pad] > 1 {
            let mut coord = if rest == 1 {
                lin.to_string()
            } else {
                format!("({lin} / {rest}u)")
            };
            if i > 0 {
                coord = format!("({coord} % {}u)", domain[i]);
            }
            let stride = strides[i - pad];
            terms.push(if stride == 1 {
                coord
            } else {
                format!("{coord} * {stride}u")
            });
        }
        rest *= domain[i];
    }
    if terms.is_empty() {
        "0u".into()
    } else {
        terms.join(" + ")
    }
}

/// Linear index, in `permute(x, perm)`, of the element at linear index `lin` of `x` (shape `shape`):
/// `x` read through the strides its axes have in the permuted layout.
pub(crate) fn permuted_index(shape: &[usize], perm: &[usize], lin: &str) -> String {
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let mut strides = vec![0usize; shape.len()];
    for (i, &p) in perm.iter().enumerate() {
        strides[p] = out_shape[i + 1..].iter().product();
    }
    strided_index(shape, shape, &strides, lin)
}

/// A `Rope`/`RopeGrad` node (`[B, T, H, hd]`, HF "rotate_half") computed where it is read, from
/// its operand: by the standalone rope kernel, and by matmuls whose loads absorb it (a prologue).
/// The adjoint rotates by the negated angle.
pub(crate) struct Rope {
    sign: &'static str,
    theta: f32,
    t: usize,
    /// Elements per position (`H · hd`).
    row: usize,
    hd: usize,
}

impl Rope {
    pub(crate) fn new(graph: &Graph, n: NodeId) -> Rope {
        let (sign, theta) = match graph.node(n).op {
            Op::Rope { theta } => ("", theta),
            Op::RopeGrad { theta } => ("-", theta),
            ref other => unreachable!("Rope::new on {}", other.mnemonic()),
        };
        let shape = &graph.ty(n).shape;
        Rope {
            sign,
            theta,
            t: shape[1],
            row: shape[2] * shape[3],
            hd: shape[3],
        }
    }

    /// `fn {name}(i: u32) -> f32`: element `i`, from the operand bound as `x`.
    pub(crate) fn function(&self, name: &str, x: &Access) -> String {
        self.fill(ROPE, name, x, "i", self.hd / 2)
    }

    /// Whether every aligned run of 4 elements lies in one half of one head, so that
    /// [`Rope::function4`] can rotate it as one vec4.
    pub(crate) fn quads(&self) -> bool {
        (self.hd / 2).is_multiple_of(4)
    }

    /// `fn {name}(q: u32) -> vec4<f32>`: elements `4q .. 4q + 4`, from `view`, a vec4 view of the
    /// operand. Only where [`Rope::quads`].
    pub(crate) fn function4(&self, name: &str, view: &Access) -> String {
        self.fill(ROPE4, name, view, "q", self.hd / 8)
    }

    /// `template` with the operand read through `x` at `at` and at `at ± shift` (half a head).
    fn fill(&self, template: &str, name: &str, x: &Access, at: &str, shift: usize) -> String {
        let half = self.hd / 2;
        fill(
            template,
            &[
                ("name", &name),
                ("hd", &self.hd),
                ("row", &self.row),
                ("t", &self.t),
                ("half", &half),
                ("hd_f", &lit(self.hd as f32)),
                ("theta", &lit(self.theta)),
                ("sign", &self.sign),
                ("x", &x.at(at)),
                ("x_hi", &x.at(&format!("{at} + {shift}u"))),
                ("x_lo", &x.at(&format!("{at} - {shift}u"))),
            ],
        )
    }
}
