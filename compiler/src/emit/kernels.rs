//! WGSL generators, one per [`GroupKind`] and per composite op.
//!
//! Every kernel has the same frame: constants (shapes and the folded grid `GX`, `GY`), the storage
//! bindings `@group(0) @binding(i)`, the prelude (`shaders/prelude.wgsl`), then the body. Bodies are
//! produced by walking the group's nodes: each elementwise node becomes one `let v<id> = ...;`, an
//! operand from outside the group becomes a load with a broadcasting index.

use super::blocked::{self, Blocked, Gathered, Load, Schedule};
use super::{EmitError, KernelSrc, MatmulVariant, Target};
use crate::fuse::{base, Group, GroupKind};
use crate::ir::{BinaryOp, DType, Graph, NodeId, Op, ReduceOp, RouteLayout, UnaryOp};
use std::collections::{HashMap, HashSet};
use std::fmt::Write;

const PRELUDE: &str = include_str!("../../../shaders/prelude.wgsl");
const MATMUL_TILED: &str = include_str!("../../../shaders/matmul_tiled.wgsl");
const MOE_ROUTE: &str = include_str!("../../../shaders/moe_route.wgsl");
const TOPK: &str = include_str!("../../../shaders/topk.wgsl");
const CROSS_ENTROPY: &str = include_str!("../../../shaders/cross_entropy.wgsl");
const SINKHORN: &str = include_str!("../../../shaders/sinkhorn.wgsl");
const AUCTION: &str = include_str!("../../../shaders/auction.wgsl");

/// Invocations per workgroup of one-invocation-per-element kernels.
const WG: u32 = 256;

/// A reduction's combining step: `comb(accumulator, value)` as WGSL text.
type Combine = dyn Fn(&str, &str) -> String;
/// Invocations per row of the workgroup-per-row reduction (SharedTiled targets).
const ROW_THREADS: u32 = 64;

/// Why a kernel could not be generated; named by the caller.
pub(crate) enum KernelError {
    /// A grid that does not fit the target even folded.
    Grid { workgroups: u64, limit: u32 },
    /// An op with no kernel yet (its mnemonic).
    Unsupported(String),
}

impl KernelError {
    pub(crate) fn named(self, kernel: &str) -> EmitError {
        match self {
            KernelError::Grid { workgroups, limit } => EmitError::GridTooLarge {
                kernel: kernel.to_string(),
                workgroups,
                limit,
            },
            KernelError::Unsupported(op) => EmitError::Unsupported {
                kernel: kernel.to_string(),
                op,
            },
        }
    }
}

/// Folds a linear count of workgroups into `[x, y, z]`, each at most the target's limit. Kernels
/// recompute the linear index as `x + y·GX + z·GX·GY` and bounds-check it.
pub(crate) fn fold(total: u64, target: &Target) -> Result<[u32; 3], KernelError> {
    let max = u64::from(target.max_workgroups_per_dim.max(1));
    let total = total.max(1);
    let x = total.min(max);
    let rest = total.div_ceil(x);
    let y = rest.min(max);
    let z = rest.div_ceil(y);
    if z > max {
        return Err(KernelError::Grid {
            workgroups: total,
            limit: target.max_workgroups_per_dim,
        });
    }
    Ok([x as u32, y as u32, z as u32])
}

/// Storage bindings of one kernel, in slot order; reads are deduplicated by owning buffer. A value
/// larger than the target's binding limit takes several bindings ([`super::segments`]), which the
/// kernel reaches through the accessor functions [`Access`] names.
pub(crate) struct Binder<'g> {
    graph: &'g Graph,
    target: &'g Target,
    slots: Vec<(NodeId, bool, String)>,
}

impl<'g> Binder<'g> {
    pub(crate) fn new(graph: &'g Graph, target: &'g Target) -> Self {
        Binder {
            graph,
            target,
            slots: Vec::new(),
        }
    }

    /// Name of the read-only binding holding `operand` (its Reshape base's buffer).
    pub(crate) fn read(&mut self, operand: NodeId) -> String {
        let b = base(self.graph, operand);
        if let Some((_, _, name)) = self.slots.iter().find(|(n, w, _)| *n == b && !*w) {
            return name.clone();
        }
        let name = format!("b{}", self.slots.len());
        self.slots.push((b, false, name.clone()));
        name
    }

    pub(crate) fn read_as(&mut self, operand: NodeId, name: &str) {
        let b = base(self.graph, operand);
        self.slots.push((b, false, name.to_string()));
    }

    pub(crate) fn write(&mut self, node: NodeId) -> String {
        if let Some((_, _, name)) = self.slots.iter().find(|(n, w, _)| *n == node && *w) {
            return name.clone();
        }
        let name = format!("b{}", self.slots.len());
        self.slots.push((node, true, name.clone()));
        name
    }

    pub(crate) fn write_as(&mut self, node: NodeId, name: &str) {
        self.slots.push((node, true, name.to_string()));
    }

    /// How many bindings the value of `node` takes on this target.
    fn segments(&self, node: NodeId) -> Vec<(u64, u64)> {
        super::segments(
            self.graph.ty(node).buffer_bytes(),
            self.target.max_storage_binding_size,
        )
    }

    /// How the binding `name` is read and written (see [`Access`]).
    pub(crate) fn access(&self, name: &str) -> Access {
        let slot = self.slots.iter().find(|(_, _, n)| n == name);
        let dtype = slot.map_or(DType::F32, |(node, _, _)| self.graph.ty(*node).dtype);
        Access {
            name: name.to_string(),
            f16: dtype == DType::F16,
            split: slot.is_some_and(|(node, _, _)| self.segments(*node).len() > 1),
        }
    }

    /// The read binding of `operand` as a matmul operand load.
    pub(crate) fn load(&mut self, operand: NodeId) -> Load {
        let name = self.read(operand);
        Load::Buffer(self.access(&name))
    }

    /// `name[idx]` as a value for f32 arithmetic (an f16 binding is widened).
    pub(crate) fn at(&self, name: &str, idx: &str) -> String {
        self.access(name).at(idx)
    }

    /// The statement storing the f32 expression `value` at `name[idx]` (rounded for an f16 binding).
    pub(crate) fn put(&self, name: &str, idx: &str, value: &str) -> String {
        self.access(name).put(idx, value)
    }

    /// Assembles constants, bindings, prelude and body into a kernel.
    pub(crate) fn finish(
        self,
        consts: &[(&str, u64)],
        body: &str,
        workgroups: [u32; 3],
    ) -> KernelSrc {
        let mut s = String::new();
        if self
            .slots
            .iter()
            .any(|(node, _, _)| self.graph.ty(*node).dtype == DType::F16)
        {
            s.push_str("enable f16;\n");
        }
        for (name, value) in consts {
            let _ = writeln!(s, "const {name}: u32 = {value}u;");
        }
        let _ = writeln!(
            s,
            "const GX: u32 = {}u;\nconst GY: u32 = {}u;",
            workgroups[0], workgroups[1]
        );
        let mut binding = 0;
        let mut accessors = String::new();
        let mut unsplit = None;
        for (node, writes, name) in &self.slots {
            let access = if *writes { "read_write" } else { "read" };
            let ty = self.graph.ty(*node).dtype.wgsl();
            let segments = self.segments(*node);
            if segments.len() == 1 {
                let _ = writeln!(
                    s,
                    "@group(0) @binding({binding}) var<storage, {access}> {name}: array<{ty}>;"
                );
                binding += 1;
                continue;
            }
            for j in 0..segments.len() {
                let _ = writeln!(
                    s,
                    "@group(0) @binding({binding}) var<storage, {access}> {name}_{j}: array<{ty}>;"
                );
                binding += 1;
            }
            let per = segments[0].1 / self.graph.ty(*node).dtype.size_bytes() as u64;
            accessors.push_str(&segment_accessors(name, ty, *writes, segments.len(), per));
            if indexes_directly(body, name) {
                unsplit = Some(*node);
            }
        }
        s.push_str(PRELUDE);
        s.push('\n');
        s.push_str(&accessors);
        s.push_str(body);
        KernelSrc {
            wgsl: s,
            bindings: self.slots.into_iter().map(|(n, w, _)| (n, w)).collect(),
            workgroups,
            unsplit,
        }
    }
}

/// `NAME_ld(i)` and (for a written value) `NAME_st(i, v)` over the `count` segment bindings
/// `NAME_0..` of `per` elements each: element `i` lives in segment `i / per`.
fn segment_accessors(name: &str, ty: &str, writes: bool, count: usize, per: u64) -> String {
    let mut load = format!("fn {name}_ld(i: u32) -> {ty} {{\n");
    let mut store = format!("fn {name}_st(i: u32, v: {ty}) {{\n");
    for j in 0..count as u64 {
        let (lo, hi) = (j * per, (j + 1) * per);
        if j + 1 < count as u64 {
            let _ = writeln!(
                load,
                "    if (i < {hi}u) {{\n        return {name}_{j}[i - {lo}u];\n    }}"
            );
            let _ = writeln!(store, "    if (i < {hi}u) {{\n        {name}_{j}[i - {lo}u] = v;\n        return;\n    }}");
        } else {
            let _ = writeln!(load, "    return {name}_{j}[i - {lo}u];\n}}\n");
            let _ = writeln!(store, "    {name}_{j}[i - {lo}u] = v;\n}}\n");
        }
    }
    if writes {
        load.push_str(&store);
    }
    load
}

/// Whether `body` indexes the array `name` itself (`name[`), which a split value cannot serve.
fn indexes_directly(body: &str, name: &str) -> bool {
    let pattern = format!("{name}[");
    body.match_indices(&pattern).any(|(at, _)| {
        !body[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

/// A float binding as kernels use it: every computation is f32 (the accumulators of matmuls and
/// reductions included), so an f16 binding (`precision = f16`) is widened on load and rounded to
/// nearest on store, and an f32 binding is used as is. A binding split across segments is reached
/// through its `NAME_ld` / `NAME_st` accessors.
#[derive(Debug, Clone)]
pub(crate) struct Access {
    pub name: String,
    pub f16: bool,
    pub split: bool,
}

impl Access {
    /// `name[idx]` as an f32 expression.
    pub(crate) fn at(&self, idx: &str) -> String {
        let raw = if self.split {
            format!("{}_ld({idx})", self.name)
        } else {
            format!("{}[{idx}]", self.name)
        };
        if self.f16 {
            format!("f32({raw})")
        } else {
            raw
        }
    }

    /// `name[idx] = value;` for an f32 expression `value`.
    pub(crate) fn put(&self, idx: &str, value: &str) -> String {
        let value = if self.f16 {
            format!("f16({value})")
        } else {
            value.to_string()
        };
        if self.split {
            format!("{}_st({idx}, {value});", self.name)
        } else {
            format!("{}[{idx}] = {value};", self.name)
        }
    }
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

/// f32 literal that WGSL parses back to the same value.
fn lit(x: f32) -> String {
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
fn permuted_index(shape: &[usize], perm: &[usize], lin: &str) -> String {
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let mut strides = vec![0usize; shape.len()];
    for (i, &p) in perm.iter().enumerate() {
        strides[p] = out_shape[i + 1..].iter().product();
    }
    strided_index(shape, shape, &strides, lin)
}

/// Walks group nodes into `let` statements; operands not in `env` are loaded with broadcasting.
///
/// Values are named by their position in the group, not by graph node id, so the same computation
/// in every layer gives the same WGSL text and shares one kernel (and one driver compile).
struct Walker<'g> {
    graph: &'g Graph,
    local: HashMap<NodeId, usize>,
}

impl<'g> Walker<'g> {
    fn new(graph: &'g Graph, group: &Group) -> Self {
        Walker {
            graph,
            local: group
                .nodes
                .iter()
                .enumerate()
                .map(|(i, &n)| (n, i))
                .collect(),
        }
    }

    /// Kernel-local number of a group member.
    fn id(&self, n: NodeId) -> usize {
        self.local[&n]
    }

    fn var(&self, n: NodeId) -> String {
        format!("v{}", self.id(n))
    }

    /// The statement that writes materialised member `o` at domain index `lin` into `name`; a permute
    /// epilogue writes its operand's value at the permuted position.
    fn store(&self, b: &Binder, name: &str, o: NodeId, lin: &str) -> String {
        let graph = self.graph;
        match &graph.node(o).op {
            Op::Permute { perm } => {
                let x = graph.inputs(o)[0];
                b.put(
                    name,
                    &permuted_index(&graph.ty(x).shape, perm, lin),
                    &self.var(base(graph, x)),
                )
            }
            Op::Input { .. }
            | Op::Param { .. }
            | Op::Affine { .. }
            | Op::Unary(_)
            | Op::Binary(_)
            | Op::Reduce(_)
            | Op::Reshape { .. }
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
            | Op::LstmLastGrad { .. } => b.put(name, lin, &self.var(o)),
        }
    }

    fn operand(
        &self,
        b: &mut Binder,
        env: &HashMap<NodeId, String>,
        q: NodeId,
        domain: &[usize],
        lin: &str,
    ) -> String {
        if let Some(v) = env.get(&q) {
            return v.clone();
        }
        // A member that is not a value is an absorbed permute prologue: read its source in place.
        if self.local.contains_key(&base(self.graph, q)) {
            if let Some((src, shape, strides)) = crate::fuse::strided_view(self.graph, q) {
                let name = b.read(src);
                return b.at(&name, &strided_index(domain, &shape, &strides, lin));
            }
        }
        let name = b.read(q);
        b.at(&name, &bcast_index(domain, &self.graph.ty(q).shape, lin))
    }

    /// `let v<n> = <op>(operands);` for an elementwise node; records `v<n>` in `env`.
    // The index domain (`domain`, `lin`) and the output position (`out`, `indent`) differ per caller.
    #[allow(clippy::too_many_arguments)]
    fn elementwise(
        &self,
        b: &mut Binder,
        env: &mut HashMap<NodeId, String>,
        n: NodeId,
        domain: &[usize],
        lin: &str,
        out: &mut String,
        indent: &str,
    ) {
        let args: Vec<String> = self
            .graph
            .inputs(n)
            .into_iter()
            .map(|q| self.operand(b, env, q, domain, lin))
            .collect();
        let v = self.var(n);
        let _ = writeln!(
            out,
            "{indent}let {v} = {};",
            op_expr(&self.graph.node(n).op, &args)
        );
        env.insert(n, v);
    }
}

/// Kernel for one fused group.
pub(crate) fn group_kernel(
    graph: &Graph,
    group: &Group,
    target: &Target,
) -> Result<KernelSrc, KernelError> {
    match group.kind {
        GroupKind::Elementwise => elementwise_kernel(graph, group, target),
        GroupKind::Row => row_kernel(graph, group, target),
        GroupKind::Matmul => matmul_kernel(graph, group, target),
        GroupKind::Single => single_kernel(graph, group, target),
        GroupKind::Router => super::router::router_kernel(graph, group, target),
    }
}

pub(crate) fn wg_size(target: &Target) -> u32 {
    WG.min(target.max_invocations_per_workgroup.max(1))
}

/// Entry point of a kernel with one invocation per linear item `i < total`.
pub(crate) fn per_item_main(wg: u32, total: usize) -> String {
    format!(
        "@compute @workgroup_size({wg})\nfn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {{\n    let i = (wid.x + wid.y * GX + wid.z * (GX * GY)) * {wg}u + lid;\n    if (i >= {total}u) {{\n        return;\n    }}\n"
    )
}

fn elementwise_kernel(
    graph: &Graph,
    group: &Group,
    target: &Target,
) -> Result<KernelSrc, KernelError> {
    let wg = wg_size(target);
    let total: usize = group.domain.iter().product();
    let mut b = Binder::new(graph, target);
    let walker = Walker::new(graph, group);
    let mut env = HashMap::new();
    let mut body = per_item_main(wg, total);
    for &n in group.nodes.iter().filter(|&&n| !is_prologue(graph, n)) {
        walker.elementwise(&mut b, &mut env, n, &group.domain, "i", &mut body, "    ");
    }
    for &o in &group.outputs {
        let name = b.write(o);
        let _ = writeln!(body, "    {}", walker.store(&b, &name, o, "i"));
    }
    body.push_str("}\n");
    let grid = fold(total.div_ceil(wg as usize) as u64, target)?;
    Ok(b.finish(&[], &body, grid))
}

/// Row kernel: reductions and softmax over the last axis with elementwise prologue and epilogue.
///
/// Per-row scalars (`[..., 1]` nodes, reduction results, softmax max/sum) are computed once per row;
/// full-width nodes are recomputed inside each column loop that needs them (cheap elementwise math
/// instead of a round trip through memory), and written in a final loop. On register-blocked
/// (CPU-like) targets one invocation owns a row and loops serially, with no barriers; elsewhere a
/// workgroup owns a row and reduces through workgroup memory with a fixed tree (deterministic).
fn row_kernel(graph: &Graph, group: &Group, target: &Target) -> Result<KernelSrc, KernelError> {
    let d = &group.domain;
    let l = d.last().copied().unwrap_or(1);
    let rows = d.iter().product::<usize>() / l.max(1);
    let rshape = {
        let mut s = d.clone();
        if let Some(x) = s.last_mut() {
            *x = 1;
        }
        s
    };
    let tpr = match target.matmul {
        MatmulVariant::RegisterBlocked => 1,
        MatmulVariant::SharedTiled => ROW_THREADS
            .min(l.next_power_of_two() as u32)
            .min(target.max_invocations_per_workgroup.max(1)),
    };
    let (wg, start, step, rows_per_wg) = if tpr == 1 {
        (
            64u32.min(target.max_invocations_per_workgroup.max(1)),
            "0u".to_string(),
            "1u".to_string(),
            None,
        )
    } else {
        (tpr, "lid".into(), format!("{tpr}u"), Some(()))
    };
    // Members that compute values (permute prologues are read in place by the walker).
    let members: HashSet<NodeId> = group
        .nodes
        .iter()
        .copied()
        .filter(|&n| !is_prologue(graph, n))
        .collect();
    let is_row = |n: NodeId| match graph.node(n).op {
        Op::Reduce(_) => true,
        Op::Affine { .. } | Op::Unary(_) | Op::Binary(_) | Op::BroadcastTo { .. } => {
            graph.ty(n).shape != *d
        }
        Op::Input { .. }
        | Op::Param { .. }
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
        | Op::LstmLastGrad { .. } => false,
    };
    let outputs: HashSet<NodeId> = group.outputs.iter().copied().collect();
    let causal_rows = if d.len() >= 2 { d[d.len() - 2] } else { 1 };

    let mut b = Binder::new(graph, target);
    let walker = Walker::new(graph, group);
    let mut body = String::new();
    if tpr > 1 {
        let _ = writeln!(body, "var<workgroup> red: array<f32, {tpr}>;\n");
    }
    let _ = writeln!(body, "@compute @workgroup_size({wg})\nfn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {{");
    let _ = writeln!(body, "    let wg = wid.x + wid.y * GX + wid.z * (GX * GY);");
    if rows_per_wg.is_none() {
        let _ = writeln!(body, "    let row = wg * {wg}u + lid;");
    } else {
        let _ = writeln!(body, "    let row = wg;");
    }
    let _ = writeln!(body, "    if (row >= {rows}u) {{\n        return;\n    }}");
    let row_write_guard = if tpr > 1 { "if (lid == 0u) " } else { "" };

    let mut env_row: HashMap<NodeId, String> = HashMap::new();
    // Softmax nodes whose row max/sum have been computed: (max var, sum var, causal).
    let mut softmax: HashMap<NodeId, (String, String, bool)> = HashMap::new();

    // Emits a column loop computing `targets` (in-group full nodes or external operands) and calling
    // `each(values)` on them; returns the loop text.
    let column_loop = |b: &mut Binder,
                       env_row: &HashMap<NodeId, String>,
                       softmax: &HashMap<NodeId, (String, String, bool)>,
                       targets: &[NodeId],
                       each: &dyn Fn(&[String]) -> String|
     -> String {
        let mut needed: HashSet<NodeId> = HashSet::new();
        let mut stack: Vec<NodeId> = targets
            .iter()
            .copied()
            .filter(|t| members.contains(t) && !env_row.contains_key(t))
            .collect();
        while let Some(x) = stack.pop() {
            if needed.insert(x) {
                stack.extend(
                    graph
                        .inputs(x)
                        .into_iter()
                        .filter(|q| members.contains(q) && !env_row.contains_key(q)),
                );
            }
        }
        let mut s = format!("    for (var c = {start}; c < {l}u; c = c + {step}) {{\n        let lin = row * {l}u + c;\n");
        let mut env = env_row.clone();
        for &n in group.nodes.iter().filter(|n| needed.contains(n)) {
            match &graph.node(n).op {
                Op::Softmax { .. } => {
                    let x = walker.operand(b, &env, graph.inputs(n)[0], d, "lin");
                    let (m, sum, causal) = &softmax[&n];
                    let valid = if *causal {
                        format!("c <= (row % {causal_rows}u) % {l}u")
                    } else {
                        "true".into()
                    };
                    let v = walker.var(n);
                    let _ = writeln!(
                        s,
                        "        let {v} = select(0.0, exp({x} - {m}) / {sum}, {valid});"
                    );
                    env.insert(n, v);
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
                | Op::LstmLastGrad { .. } => {
                    walker.elementwise(b, &mut env, n, d, "lin", &mut s, "        ")
                }
            }
        }
        let vals: Vec<String> = targets
            .iter()
            .map(|&t| walker.operand(b, &env, t, d, "lin"))
            .collect();
        s += &each(&vals);
        s += "    }\n";
        s
    };
    // Reduces `acc` (per-invocation partial) across the workgroup into `let <name>`.
    let finish_reduce = |name: &str, acc: &str, combine: &dyn Fn(&str, &str) -> String| -> String {
        if tpr == 1 {
            return format!("    let {name} = {acc};\n");
        }
        format!(
            "    red[lid] = {acc};\n    workgroupBarrier();\n    for (var s = {half}u; s > 0u; s = s >> 1u) {{\n        if (lid < s) {{\n            red[lid] = {comb};\n        }}\n        workgroupBarrier();\n    }}\n    let {name} = red[0];\n    workgroupBarrier();\n",
            half = tpr / 2,
            comb = combine("red[lid]", "red[lid + s]")
        )
    };
    let add = |x: &str, y: &str| format!("{x} + {y}");
    let max = |x: &str, y: &str| format!("max({x}, {y})");

    for &n in group.nodes.iter().filter(|&&n| !is_prologue(graph, n)) {
        let id = walker.id(n);
        match &graph.node(n).op {
            Op::Affine { .. } | Op::Unary(_) | Op::Binary(_) | Op::BroadcastTo { .. } => {
                if is_row(n) {
                    walker.elementwise(&mut b, &mut env_row, n, &rshape, "row", &mut body, "    ");
                }
            }
            Op::Reduce(r) => {
                let x = graph.inputs(n)[0];
                let (init, comb): (&str, &Combine) = match r {
                    ReduceOp::Sum | ReduceOp::Mean => ("0.0", &add),
                    ReduceOp::Max => ("-FLT_MAX", &max),
                };
                let _ = writeln!(body, "    var a{id} = {init};");
                body += &column_loop(&mut b, &env_row, &softmax, &[x], &|v| {
                    format!("        a{id} = {};\n", comb(&format!("a{id}"), &v[0]))
                });
                body += &finish_reduce(&format!("r{id}"), &format!("a{id}"), comb);
                let value = if *r == ReduceOp::Mean {
                    format!("r{id} / {}", lit(l as f32))
                } else {
                    format!("r{id}")
                };
                let _ = writeln!(body, "    let v{id} = {value};");
                env_row.insert(n, format!("v{id}"));
            }
            Op::Softmax { causal } => {
                let x = graph.inputs(n)[0];
                let valid = if *causal {
                    format!("c <= (row % {causal_rows}u) % {l}u")
                } else {
                    "true".into()
                };
                let _ = writeln!(body, "    var am{id} = -FLT_MAX;");
                body += &column_loop(&mut b, &env_row, &softmax, &[x], &|v| {
                    format!(
                        "        am{id} = select(am{id}, max(am{id}, {}), {valid});\n",
                        v[0]
                    )
                });
                body += &finish_reduce(&format!("m{id}"), &format!("am{id}"), &max);
                let _ = writeln!(body, "    var as{id} = 0.0;");
                body += &column_loop(&mut b, &env_row, &softmax, &[x], &|v| {
                    format!(
                        "        as{id} = as{id} + select(0.0, exp({} - m{id}), {valid});\n",
                        v[0]
                    )
                });
                body += &finish_reduce(&format!("s{id}"), &format!("as{id}"), &add);
                softmax.insert(n, (format!("m{id}"), format!("s{id}"), *causal));
            }
            other @ (Op::Input { .. }
            | Op::Param { .. }
            | Op::Reshape { .. }
            | Op::Permute { .. }
            | Op::MatMul { .. }
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
            | Op::LstmLastGrad { .. }) => unreachable!("{} in a row group", other.mnemonic()),
        }
        if outputs.contains(&n) && env_row.contains_key(&n) {
            let name = b.write(n);
            let _ = writeln!(
                body,
                "    {row_write_guard}{{\n        {}\n    }}",
                b.put(&name, "row", &format!("v{id}"))
            );
        }
    }
    let full_outputs: Vec<NodeId> = group
        .nodes
        .iter()
        .copied()
        .filter(|n| outputs.contains(n) && !env_row.contains_key(n))
        .collect();
    if !full_outputs.is_empty() {
        let names: Vec<Access> = full_outputs
            .iter()
            .map(|&o| {
                let name = b.write(o);
                b.access(&name)
            })
            .collect();
        body += &column_loop(&mut b, &env_row, &softmax, &full_outputs, &|v| {
            names
                .iter()
                .zip(v)
                .map(|(name, val)| format!("        {}\n", name.put("lin", val)))
                .collect()
        });
    }
    body.push_str("}\n");
    let groups = if tpr == 1 {
        rows.div_ceil(wg as usize)
    } else {
        rows
    };
    let grid = fold(groups as u64, target)?;
    Ok(b.finish(&[], &body, grid))
}

/// Matmul geometry shared by the variants. Operands are addressed through strides, so a transpose
/// (or any permute) absorbed from the group's prologue costs nothing: `A[bi, m, k]` lives at
/// `a_batch(bi) + m·sam + k·sak` and `B[bi, k, n]` at `b_batch(bi) + k·sbk + n·sbn`.
struct Mm {
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    sam: usize,
    sak: usize,
    sbk: usize,
    sbn: usize,
    /// WGSL expressions of the batch offsets in terms of `bi`.
    a_batch: String,
    b_batch: String,
}

/// Logical shape and element strides of a matmul operand: the operand itself, or, when it is an
/// absorbed `Permute` member (possibly seen through reshapes), its source read in place.
fn operand_view(
    graph: &Graph,
    members: &HashSet<NodeId>,
    x: NodeId,
) -> (NodeId, Vec<usize>, Vec<usize>) {
    if members.contains(&base(graph, x)) {
        if let Some(view) = crate::fuse::strided_view(graph, x) {
            return view;
        }
    }
    let shape = graph.ty(x).shape.clone();
    let strides = (0..shape.len())
        .map(|i| shape[i + 1..].iter().product())
        .collect();
    (x, shape, strides)
}

/// `Σ coord_i(bi) · stride_i` over the batch axes `dims` (row-major) with element `strides`.
fn batch_offset(dims: &[usize], strides: &[usize]) -> String {
    let mut terms = Vec::new();
    let mut rest = 1usize;
    for i in (0..dims.len()).rev() {
        if dims[i] > 1 {
            let coord = if i == 0 {
                format!("(bi / {rest}u)")
            } else {
                format!("((bi / {rest}u) % {}u)", dims[i])
            };
            terms.push(format!("{coord} * {}u", strides[i]));
        }
        rest *= dims[i];
    }
    if terms.is_empty() {
        "0u".into()
    } else {
        terms.join(" + ")
    }
}

/// The node a group is named after and, for a Matmul group, its matmul: the first member that is not
/// an absorbed permute prologue.
pub(crate) fn anchor(graph: &Graph, group: &Group) -> NodeId {
    group
        .nodes
        .iter()
        .copied()
        .find(|&n| !is_prologue(graph, n))
        .unwrap_or(group.nodes[0])
}

/// Is group member `n` an absorbed `Permute` (read in place by its consumers, no code of its own) or
/// a RoPE or gather prologue (computed by the matmul's operand loads)? Only fusion puts these ops
/// into a multi-node group; a lone one is a `Single` group.
fn is_prologue(graph: &Graph, n: NodeId) -> bool {
    matches!(
        graph.node(n).op,
        Op::Permute { .. }
            | Op::Rope { .. }
            | Op::RopeGrad { .. }
            | Op::MoeGather { .. }
            | Op::MoeCombineGradRows { .. }
    )
}

/// When grouped-matmul operand `x` is a gather prologue member (`MoeGather`, or `MoeCombineGradRows`
/// with its gate weights), the load of its source's token rows and how padded rows map to them.
pub(crate) fn gathered(
    graph: &Graph,
    members: &HashSet<NodeId>,
    b: &mut Binder,
    x: NodeId,
) -> Option<(Load, Gathered)> {
    if !members.contains(&x) {
        return None;
    }
    let args = graph.inputs(x);
    let (layout, weights) = match graph.node(x).op {
        Op::MoeGather { layout } => (layout, None),
        Op::MoeCombineGradRows { layout } => (layout, Some(args[1])),
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
        | Op::MoeCombineGradWeights { .. }
        | Op::LstmScan { .. }
        | Op::LstmHidden
        | Op::LstmScanGrad { .. }
        | Op::LstmScanGradW { .. }
        | Op::LstmLast { .. }
        | Op::LstmLastGrad { .. } => return None,
    };
    let load = b.load(args[0]);
    Some((
        load,
        Gathered {
            route: b.read(args[args.len() - 1]),
            row_slot_at: layout.row_slot_at(),
            k: layout.k,
            slots: layout.tokens * layout.k,
            weights: weights.map(|w| {
                let name = b.read(w);
                b.access(&name)
            }),
        },
    ))
}

/// How a matmul reads operand `src` (the buffer-owning node behind its view): from its buffer, or,
/// when `src` is a RoPE prologue member, through a WGSL function `name` (appended to `funcs`) that
/// rotates the element from the rotation's own operand.
fn matmul_load(
    graph: &Graph,
    members: &HashSet<NodeId>,
    b: &mut Binder,
    src: NodeId,
    name: &str,
    funcs: &mut String,
) -> Load {
    let owner = base(graph, src);
    if members.contains(&owner)
        && matches!(graph.node(owner).op, Op::Rope { .. } | Op::RopeGrad { .. })
    {
        let x = b.read(graph.inputs(owner)[0]);
        funcs.push_str(&rope_fn(graph, owner, name, &b.access(&x)));
        return Load::Computed(name.to_string());
    }
    b.load(src)
}

/// `fn {name}(i: u32) -> f32`: element `i` of `Rope`/`RopeGrad` node `n` (`[B, T, H, hd]`, HF
/// "rotate_half"), computed from its operand bound as `x`. The adjoint rotates by the negated angle.
fn rope_fn(graph: &Graph, n: NodeId, name: &str, x: &Access) -> String {
    let (sign, theta) = match graph.node(n).op {
        Op::Rope { theta } => ("", theta),
        Op::RopeGrad { theta } => ("-", theta),
        ref other => unreachable!("rope_fn on {}", other.mnemonic()),
    };
    let shape = &graph.ty(n).shape;
    let (t, h, hd) = (shape[1], shape[2], shape[3]);
    let half = hd / 2;
    format!(
        "fn {name}(i: u32) -> f32 {{\n    let d = i % {hd}u;\n    let pos = f32((i / {}u) % {t}u);\n    let j = d % {half}u;\n    let inv = exp2(-f32(2u * j) / {} * log2({}));\n    let ang = {sign}pos * inv;\n    let x = {};\n    if (d < {half}u) {{\n        return x * cos(ang) - {} * sin(ang);\n    }}\n    return x * cos(ang) + {} * sin(ang);\n}}\n\n",
        hd * h,
        lit(hd as f32),
        lit(theta),
        x.at("i"),
        x.at(&format!("i + {half}u")),
        x.at(&format!("i - {half}u")),
    )
}

/// `fn store(lin, acc)` of a matmul group: the anchor value in, its elementwise epilogue, every
/// materialised member out.
fn epilogue(graph: &Graph, group: &Group, anchor: NodeId, b: &mut Binder) -> String {
    let walker = Walker::new(graph, group);
    let mut env = HashMap::new();
    env.insert(anchor, walker.var(anchor));
    let mut store = format!(
        "fn store(lin: u32, acc: f32) {{\n    let {} = acc;\n",
        walker.var(anchor)
    );
    for &n in group
        .nodes
        .iter()
        .skip_while(|&&n| n != anchor)
        .skip(1)
        .filter(|&&n| !is_prologue(graph, n))
    {
        walker.elementwise(b, &mut env, n, &group.domain, "lin", &mut store, "    ");
    }
    for &o in &group.outputs {
        let name = b.write(o);
        let _ = writeln!(store, "    {}", walker.store(b, &name, o, "lin"));
    }
    store.push_str("}\n\n");
    store
}

/// Matmul or grouped matmul plus its elementwise epilogue. The epilogue is a WGSL function
/// `store(lin, v)` the matmul body calls once per output element.
fn matmul_kernel(graph: &Graph, group: &Group, target: &Target) -> Result<KernelSrc, KernelError> {
    let anchor = anchor(graph, group);
    let members: HashSet<NodeId> = group.nodes.iter().copied().collect();
    let args = graph.inputs(anchor);
    let out = graph.ty(anchor);
    let mut b = Binder::new(graph, target);
    let (a_src, a_shape, a_str) = operand_view(graph, &members, args[0]);
    let (b_src, b_shape, b_str) = operand_view(graph, &members, args[1]);
    let mut funcs = String::new();
    // A grouped matmul's rows may be gathered token rows (a gather prologue).
    let (a_load, a_rows) = match gathered(graph, &members, &mut b, args[0]) {
        Some((load, rows)) => (load, Some(rows)),
        None => (
            matmul_load(graph, &members, &mut b, a_src, "rope_a", &mut funcs),
            None,
        ),
    };
    let b_load = matmul_load(graph, &members, &mut b, b_src, "rope_b", &mut funcs);
    let (mut mm, grouped) = match &graph.node(anchor).op {
        Op::MatMul { trans_b } => {
            let (ra, rb) = (a_shape.len(), b_shape.len());
            let (m, k) = (a_shape[ra - 2], a_shape[ra - 1]);
            let n = out.last();
            let batch: usize = a_shape[..ra - 2].iter().product();
            let (sbk, sbn) = if *trans_b {
                (b_str[rb - 1], b_str[rb - 2])
            } else {
                (b_str[rb - 2], b_str[rb - 1])
            };
            let a_batch = batch_offset(&a_shape[..ra - 2], &a_str[..ra - 2]);
            let b_batch = batch_offset(&b_shape[..rb - 2], &b_str[..rb - 2]);
            (
                Mm {
                    batch,
                    m,
                    n,
                    k,
                    sam: a_str[ra - 2],
                    sak: a_str[ra - 1],
                    sbk,
                    sbn,
                    a_batch,
                    b_batch,
                },
                None,
            )
        }
        Op::GroupedMatMul { layout } => {
            // w[e] is [N, K] read transposed.
            let (m, k, n) = (a_shape[0], a_shape[1], out.last());
            let route = b.read(args[2]);
            (
                Mm {
                    batch: 1,
                    m,
                    n,
                    k,
                    sam: k,
                    sak: 1,
                    sbk: 1,
                    sbn: k,
                    a_batch: "0u".into(),
                    b_batch: "0u".into(),
                },
                Some((*layout, route)),
            )
        }
        Op::GroupedMatMulGradX { layout } => {
            // g[rows, N] · w[e] with w[e] read as [N, K]: a grouped matmul contracting over N.
            let (m, k, n) = (a_shape[0], a_shape[1], out.last());
            let route = b.read(args[2]);
            (
                Mm {
                    batch: 1,
                    m,
                    n,
                    k,
                    sam: k,
                    sak: 1,
                    sbk: n,
                    sbn: 1,
                    a_batch: "0u".into(),
                    b_batch: "0u".into(),
                },
                Some((*layout, route)),
            )
        }
        other @ (Op::Input { .. }
        | Op::Param { .. }
        | Op::Affine { .. }
        | Op::Unary(_)
        | Op::Binary(_)
        | Op::Reduce(_)
        | Op::Reshape { .. }
        | Op::Permute { .. }
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
        | Op::GroupedMatMulGradW { .. }
        | Op::MoeCombineGradRows { .. }
        | Op::MoeCombineGradWeights { .. }
        | Op::LstmScan { .. }
        | Op::LstmHidden
        | Op::LstmScanGrad { .. }
        | Op::LstmScanGradW { .. }
        | Op::LstmLast { .. }
        | Op::LstmLastGrad { .. }) => unreachable!("{} anchors a matmul group", other.mnemonic()),
    };

    // Several products of one operand (horizontal fusion) are the batch axis of one matmul that
    // reads each product's weights and writes its output through `hb` and `store`.
    let (b_load, store) =
        match super::horizontal::horizontal(graph, group, &mut b, (mm.m, mm.k, mm.n)) {
            Some(h) => {
                mm.batch = h.batch;
                mm.b_batch = h.b_batch;
                (h.load, h.funcs)
            }
            None => (b_load, epilogue(graph, group, anchor, &mut b)),
        };

    let tiled = target.matmul == MatmulVariant::SharedTiled
        && grouped.is_none()
        && target.max_invocations_per_workgroup >= 256
        && target.max_workgroup_storage_bytes >= 8192;
    let consts: Vec<(&str, u64)> = vec![
        ("M", mm.m as u64),
        ("N", mm.n as u64),
        ("K", mm.k as u64),
        ("BATCH", mm.batch as u64),
    ];
    let (body, groups) = if tiled {
        let loads = format!(
            "fn load_a(bi: u32, m: u32, k: u32) -> f32 {{\n    if (m < M && k < K) {{\n        return {};\n    }}\n    return 0.0;\n}}\n\nfn load_b(bi: u32, k: u32, n: u32) -> f32 {{\n    if (n < N && k < K) {{\n        return {};\n    }}\n    return 0.0;\n}}\n\n",
            a_load.at(&format!("{} + m * {}u + k * {}u", mm.a_batch, mm.sam, mm.sak)),
            b_load.at(&format!("{} + k * {}u + n * {}u", mm.b_batch, mm.sbk, mm.sbn)),
        );
        let tiles = mm.batch * mm.m.div_ceil(64) * mm.n.div_ceil(64);
        (format!("{funcs}{store}{loads}{MATMUL_TILED}"), tiles)
    } else {
        let setup = match &grouped {
            Some((layout, route)) => format!(
                "    let live = m0 < {route}[{}u];\n    let e = min({route}[{}u + min(m0, {}u)], {}u);\n    let kbeg = 0u;\n    let kend = select(0u, K, live);\n    let abase = 0u;\n    let bbase = e * N * K;\n",
                layout.offsets_at() + layout.experts,
                layout.row_expert_at(),
                mm.m - 1,
                layout.experts - 1
            ),
            None => format!("    let kbeg = 0u;\n    let kend = K;\n    let abase = {};\n    let bbase = {};\n", mm.a_batch, mm.b_batch),
        };
        let blocked = Blocked {
            batch: mm.batch,
            m: mm.m,
            n: mm.n,
            a: &a_load,
            b: &b_load,
            sam: mm.sam,
            sak: mm.sak,
            sbk: mm.sbk,
            sbn: mm.sbn,
            setup,
            put: "    store((bi * M + row) * N + col, acc);\n".into(),
            a_rows,
            a_k: None,
            b_k: None,
        };
        let schedule = Schedule::new(
            target,
            mm.m,
            mm.n,
            grouped.as_ref().map(|(layout, _)| layout.tile),
        );
        (
            format!("{funcs}{store}{}", blocked::body(&blocked, schedule)),
            schedule.workgroups(&blocked),
        )
    };
    let grid = fold(groups as u64, target)?;
    Ok(b.finish(&consts, &body, grid))
}

/// Kernels of ops that are never fused (layout changes, NN composites, MoE routing); a weight
/// gradient's group may hold gather prologues of its operands.
fn single_kernel(graph: &Graph, group: &Group, target: &Target) -> Result<KernelSrc, KernelError> {
    let n = anchor(graph, group);
    let node = graph.node(n);
    let args = graph.inputs(n);
    let shape = &node.ty.shape;
    let total = node.ty.numel();
    let wg = wg_size(target);
    let mut b = Binder::new(graph, target);
    // One invocation per output element: `body` computes `let v = ...;` from `i`.
    let per_item =
        |b: Binder, body: &dyn Fn(&Binder) -> String| -> Result<KernelSrc, KernelError> {
            let mut b = b;
            let body = body(&b);
            let out = b.write(n);
            let src = format!(
                "{}{body}    {}\n}}\n",
                per_item_main(wg, total),
                b.put(&out, "i", "v")
            );
            let grid = fold(total.div_ceil(wg as usize) as u64, target)?;
            Ok(b.finish(&[], &src, grid))
        };
    match &node.op {
        Op::Permute { perm } => {
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
            per_item(b, &|b| format!("    let v = {};\n", b.at(&x, &index)))
        }
        Op::Embedding => {
            let table = b.read(args[0]);
            let ids = b.read(args[1]);
            let (v, d) = (graph.ty(args[0]).shape[0], graph.ty(args[0]).shape[1]);
            per_item(b, &|b| {
                format!(
                    "    let id = min({ids}[i / {d}u], {}u);\n    let v = {};\n",
                    v - 1,
                    b.at(&table, &format!("id * {d}u + i % {d}u"))
                )
            })
        }
        Op::Rope { .. } | Op::RopeGrad { .. } => {
            // The rotation a fused matmul computes in its loads (`rope_fn`), here per element.
            let x = b.read(args[0]);
            let out = b.write(n);
            let src = format!(
                "{}{}    {}\n}}\n",
                rope_fn(graph, n, "rope", &b.access(&x)),
                per_item_main(wg, total),
                b.put(&out, "i", "rope(i)")
            );
            let grid = fold(total.div_ceil(wg as usize) as u64, target)?;
            Ok(b.finish(&[], &src, grid))
        }
        Op::GatherCols => {
            let x = b.read(args[0]);
            let idx = b.read(args[1]);
            let (e, k) = (graph.ty(args[0]).shape[1], shape[1]);
            // An unassigned slot (`NONE`) gathers 0.
            per_item(b, &|_| {
                format!("    let c = {idx}[i];\n    let v = select({x}[(i / {k}u) * {e}u + min(c, {}u)], 0.0, c == {}u);\n", e - 1, RouteLayout::NONE)
            })
        }
        Op::TopKMask { experts } => {
            let idx = b.read(args[0]);
            let k = graph.ty(args[0]).shape[1];
            per_item(b, &|_| {
                format!("    let t = i / {experts}u;\n    let e = i % {experts}u;\n    var v = 0.0;\n    for (var j = 0u; j < {k}u; j = j + 1u) {{\n        if ({idx}[t * {k}u + j] == e) {{\n            v = 1.0;\n        }}\n    }}\n")
            })
        }
        Op::MoeGather { layout } => {
            let x = b.read(args[0]);
            let route = b.read(args[1]);
            let d = shape[1];
            per_item(b, &|b| {
                format!(
                    "    let slot = {route}[{}u + i / {d}u];\n    var v = 0.0;\n    if (slot != {}u) {{\n        v = {};\n    }}\n",
                    layout.row_slot_at(),
                    RouteLayout::NONE,
                    b.at(&x, &format!("(slot / {}u) * {d}u + i % {d}u", layout.k)),
                )
            })
        }
        Op::MoeCombine { layout } => {
            let yp = b.read(args[0]);
            let w = b.read(args[1]);
            let route = b.read(args[2]);
            let (d, k) = (shape[1], layout.k);
            per_item(b, &|b| {
                format!(
                    "    let t = i / {d}u;\n    var v = 0.0;\n    for (var j = 0u; j < {k}u; j = j + 1u) {{\n        let r = {route}[{}u + t * {k}u + j];\n        if (r != {}u) {{\n            v = v + {} * {};\n        }}\n    }}\n",
                    layout.slot_row_at(),
                    RouteLayout::NONE,
                    b.at(&w, &format!("t * {k}u + j")),
                    b.at(&yp, &format!("r * {d}u + i % {d}u")),
                )
            })
        }
        Op::TopK { k } => {
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
        Op::CrossEntropy => {
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
        Op::MoeRoute { layout } => {
            b.read_as(args[0], "idx");
            let kept = if args.len() > 1 {
                // Kept when fewer than CAPACITY of the expert's slots outrank it (higher priority, or
                // equal priority and a lower slot).
                b.read_as(args[1], "prio");
                "fn kept(e: u32, s: u32, seen: u32) -> bool {\n    var rank = 0u;\n    for (var o = 0u; o < T * KK; o = o + 1u) {\n        if (idx[o] == e && (prio[o] > prio[s] || (prio[o] == prio[s] && o < s))) {\n            rank = rank + 1u;\n        }\n    }\n    return rank < CAPACITY;\n}\n\n"
            } else {
                "fn kept(e: u32, s: u32, seen: u32) -> bool {\n    return seen < CAPACITY;\n}\n\n"
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
        Op::SumTo { shape: to } => {
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
            per_item(b, &|_| {
                format!("    let base = {base_expr};\n    var v = 0.0;\n    for (var r = 0u; r < {count}u; r = r + 1u) {{\n        v = v + {term};\n    }}\n")
            })
        }
        // Register-blocked / workgroup-uniform kernels of their own (emit::grad).
        Op::EmbeddingGrad { vocab } => {
            // Deterministic scatter-add as a gather: one invocation per vocabulary row scans the ids
            // in order and accumulates the matching gradient rows into its own output row, so the
            // cost is vocab·ids compares plus ids·D adds (a per-element gather would be vocab·ids·D).
            let ids = b.read(args[0]);
            let g = b.read(args[1]);
            let out = b.write(n);
            let n_ids = graph.ty(args[0]).numel();
            let d = graph.ty(args[1]).last();
            let at = format!("tok * {d}u + c");
            let body = format!(
                "{}    let tok = i;\n    for (var c = 0u; c < {d}u; c = c + 1u) {{\n        {}\n    }}\n    for (var j = 0u; j < {n_ids}u; j = j + 1u) {{\n        if ({ids}[j] == tok) {{\n            for (var c = 0u; c < {d}u; c = c + 1u) {{\n                {}\n            }}\n        }}\n    }}\n}}\n",
                per_item_main(wg, *vocab),
                b.put(&out, &at, "0.0"),
                b.put(
                    &out,
                    &at,
                    &format!("{} + {}", b.at(&out, &at), b.at(&g, &format!("j * {d}u + c")))
                )
            );
            let grid = fold(vocab.div_ceil(wg as usize) as u64, target)?;
            Ok(b.finish(&[], &body, grid))
        }
        Op::GroupedMatMulGradW { .. } => super::grad::grad_kernel(graph, group, target),
        Op::LstmScan { .. }
        | Op::LstmHidden
        | Op::LstmScanGrad { .. }
        | Op::LstmScanGradW { .. }
        | Op::LstmLast { .. }
        | Op::LstmLastGrad { .. } => super::lstm::kernel(graph, n, target),
        Op::CrossEntropyGrad => {
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
            let body = format!(
                "{}    let r = i;\n    var m = -FLT_MAX;\n    for (var c = 0u; c < {v}u; c = c + 1u) {{\n        m = max(m, {logit});\n    }}\n    var s = 0.0;\n    for (var c = 0u; c < {v}u; c = c + 1u) {{\n        s = s + exp({logit} - m);\n    }}\n    let lse = m + log(s);\n    let scale = {g}[0] / {};\n    let t = {targets}[r];\n    for (var c = 0u; c < {v}u; c = c + 1u) {{\n        {store}\n    }}\n}}\n",
                per_item_main(wg, rows),
                lit(rows.max(1) as f32)
            );
            let grid = fold(rows.div_ceil(wg as usize) as u64, target)?;
            Ok(b.finish(&[], &body, grid))
        }
        Op::ScatterCols { cols } => {
            let g = b.read(args[0]);
            let idx = b.read(args[1]);
            let k = graph.ty(args[0]).shape[1];
            per_item(b, &|_| {
                format!("    let t = i / {cols}u;\n    let c = i % {cols}u;\n    var v = 0.0;\n    for (var j = 0u; j < {k}u; j = j + 1u) {{\n        if ({idx}[t * {k}u + j] == c) {{\n            v = v + {g}[t * {k}u + j];\n        }}\n    }}\n")
            })
        }
        Op::MoeGatherGrad { layout } => {
            let gp = b.read(args[0]);
            let route = b.read(args[1]);
            let (d, k) = (shape[1], layout.k);
            per_item(b, &|b| {
                format!(
                    "    let t = i / {d}u;\n    var v = 0.0;\n    for (var j = 0u; j < {k}u; j = j + 1u) {{\n        let r = {route}[{}u + t * {k}u + j];\n        if (r != {}u) {{\n            v = v + {};\n        }}\n    }}\n",
                    layout.slot_row_at(),
                    RouteLayout::NONE,
                    b.at(&gp, &format!("r * {d}u + i % {d}u")),
                )
            })
        }
        Op::MoeCombineGradRows { layout } => {
            let dy = b.read(args[0]);
            let w = b.read(args[1]);
            let route = b.read(args[2]);
            let d = shape[1];
            per_item(b, &|b| {
                format!(
                    "    let slot = {route}[{}u + i / {d}u];\n    var v = 0.0;\n    if (slot != {}u) {{\n        v = {} * {};\n    }}\n",
                    layout.row_slot_at(),
                    RouteLayout::NONE,
                    b.at(&w, "slot"),
                    b.at(&dy, &format!("(slot / {}u) * {d}u + i % {d}u", layout.k)),
                )
            })
        }
        Op::MoeCombineGradWeights { layout } => {
            let dy = b.read(args[0]);
            let yp = b.read(args[1]);
            let route = b.read(args[2]);
            let d = graph.ty(args[0]).shape[1];
            per_item(b, &|b| {
                format!(
                    "    let r = {route}[{}u + i];\n    var v = 0.0;\n    if (r != {}u) {{\n        let t = i / {}u;\n        for (var c = 0u; c < {d}u; c = c + 1u) {{\n            v = v + {} * {};\n        }}\n    }}\n",
                    layout.slot_row_at(),
                    RouteLayout::NONE,
                    layout.k,
                    b.at(&dy, &format!("t * {d}u + c")),
                    b.at(&yp, &format!("r * {d}u + c")),
                )
            })
        }
        Op::SliceRows { start, .. } => {
            let x = b.read(args[0]);
            let row: usize = shape[1..].iter().product();
            per_item(b, &|b| {
                format!(
                    "    let v = {};\n",
                    b.at(&x, &format!("{}u + i", start * row))
                )
            })
        }
        Op::ConcatRows => {
            let upper = b.read(args[0]);
            let lower = b.read(args[1]);
            let split = graph.ty(args[0]).numel();
            per_item(b, &|b| {
                format!(
                    "    var v = 0.0;\n    if (i < {split}u) {{\n        v = {};\n    }} else {{\n        v = {};\n    }}\n",
                    b.at(&upper, "i"),
                    b.at(&lower, &format!("i - {split}u"))
                )
            })
        }
        Op::SliceCols { start, len } => {
            let x = b.read(args[0]);
            let cols = graph.ty(args[0]).shape[1];
            per_item(b, &|_| {
                format!("    let v = {x}[(i / {len}u) * {cols}u + {start}u + i % {len}u];\n")
            })
        }
        Op::RouteLoad { layout } => {
            let route = b.read(args[0]);
            per_item(b, &|_| {
                format!("    let v = f32({route}[{}u + i]);\n", layout.counts_at())
            })
        }
        Op::ExpertChoice { capacity } => {
            // Invocation (t, e): expert e takes token t when fewer than `capacity` tokens outrank it in
            // column e (higher score, or equal score and lower token).
            let x = b.read(args[0]);
            let (t, e) = (shape[0], shape[1]);
            per_item(b, &|_| {
                format!(
                    "    let tok = i / {e}u;\n    let ex = i % {e}u;\n    let s = {x}[i];\n    var rank = 0u;\n    for (var u = 0u; u < {t}u; u = u + 1u) {{\n        let o = {x}[u * {e}u + ex];\n        if (o > s || (o == s && u < tok)) {{\n            rank = rank + 1u;\n        }}\n    }}\n    let v = select({}u, ex, rank < {capacity}u);\n",
                    RouteLayout::NONE
                )
            })
        }
        Op::Sinkhorn { iters } => {
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
        Op::Auction {
            rounds,
            epsilon,
            budget,
            capacity,
            k,
        } => {
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

/// Copies the buffer of `id` into a fresh buffer (a graph output that names a Param, an Input, or a
/// value already exported under another name).
pub(crate) fn copy_kernel(
    graph: &Graph,
    id: NodeId,
    target: &Target,
) -> Result<KernelSrc, KernelError> {
    let wg = wg_size(target);
    let total = graph.ty(id).numel();
    let mut b = Binder::new(graph, target);
    let x = b.read(id);
    // The destination is keyed by the output node itself: emit() gives it a fresh Output buffer.
    let out = b.write(id);
    let src = format!(
        "{}    {}\n}}\n",
        per_item_main(wg, total),
        b.put(&out, "i", &b.at(&x, "i"))
    );
    let grid = fold(total.div_ceil(wg as usize) as u64, target)?;
    Ok(b.finish(&[], &src, grid))
}
