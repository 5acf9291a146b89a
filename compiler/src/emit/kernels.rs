//! WGSL generators, one per [`GroupKind`]; a `Single` group's op goes to [`super::single`].
//!
//! Every kernel has the same frame ([`super::frame`]): constants (shapes and the folded grid `GX`,
//! `GY`), the storage bindings `@group(0) @binding(i)`, the prelude (`shaders/prelude.wgsl`), then
//! the body. Bodies are produced by walking the group's nodes: each elementwise node becomes one `let v<id> = ...;`, an
//! operand from outside the group becomes a load with a broadcasting index.

use super::blocked::{self, gathered, Blocked, KRange, Schedule};
use super::expr::{bcast_index, lit, op_expr, permuted_index, strided_index, Rope};
use super::frame::{
    anchor, fill, fold, is_prologue, loop_bound, per_item_main, wg_size, Access, Binder,
    KernelError, KernelSrc, Load, RopeLoad,
};
use crate::fuse::{base, Group, GroupKind};
use crate::ir::{Graph, NodeId, Op, ReduceOp, RouteLayout};
use crate::target::{MatmulVariant, Target};
use std::collections::{HashMap, HashSet};
use std::fmt::Write;

const MATMUL_TILED: &str = include_str!("../../../shaders/matmul_tiled.wgsl");
/// `load_a` / `load_b` of the tiled matmul: its operands' elements, zero outside the matrices.
const MATMUL_TILED_LOADS: &str = include_str!("../../../shaders/matmul_tiled_loads.wgsl");
/// The row kernel's entry point up to its bounds check, and its workgroup reduction tree.
const ROW_MAIN: &str = include_str!("../../../shaders/row_main.wgsl");
const ROW_REDUCE: &str = include_str!("../../../shaders/row_reduce.wgsl");
/// A reduction's combining step: `comb(accumulator, value)` as WGSL text.
type Combine = fn(&str, &str) -> String;
/// Invocations per row of the workgroup-per-row reduction (SharedTiled targets).
const ROW_THREADS: u32 = 64;

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
        GroupKind::Single => super::single::kernel(graph, group, target),
        GroupKind::Router => super::router::router_kernel(graph, group, target),
    }
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
    let mut kernel = RowKernel::new(graph, group, target);
    kernel.header();
    for &n in group.nodes.iter().filter(|&&n| !is_prologue(graph, n)) {
        kernel.member(n);
    }
    kernel.full_outputs();
    kernel.finish(target)
}

/// A row kernel while its body is written: the row geometry, the bindings, the per-row values
/// computed so far and the body text. Members are visited in group order ([`RowKernel::member`]).
struct RowKernel<'g> {
    graph: &'g Graph,
    group: &'g Group,
    walker: Walker<'g>,
    b: Binder<'g>,
    /// Row length (the domain's last axis) and number of rows.
    l: usize,
    rows: usize,
    /// Shape of a per-row scalar: the domain with its last axis 1.
    rshape: Vec<usize>,
    /// Rows of a causal mask's square (the domain's second-to-last axis).
    causal_rows: usize,
    /// Invocations per row (1: one invocation owns a row) and per workgroup.
    tpr: u32,
    wg: u32,
    /// Members that compute values (permute prologues are read in place by the walker).
    members: HashSet<NodeId>,
    /// Per-row values computed so far.
    env_row: HashMap<NodeId, String>,
    /// Softmax nodes whose row max/sum have been computed: (max var, sum var, causal).
    softmax: HashMap<NodeId, (String, String, bool)>,
    body: String,
}

impl<'g> RowKernel<'g> {
    fn new(graph: &'g Graph, group: &'g Group, target: &'g Target) -> Self {
        let d = &group.domain;
        let l = d.last().copied().unwrap_or(1);
        let mut rshape = d.clone();
        if let Some(x) = rshape.last_mut() {
            *x = 1;
        }
        let tpr = match target.matmul {
            MatmulVariant::RegisterBlocked => 1,
            MatmulVariant::SharedTiled => ROW_THREADS
                .min(l.next_power_of_two() as u32)
                .min(target.max_invocations_per_workgroup.max(1)),
        };
        let wg = if tpr == 1 {
            64u32.min(target.max_invocations_per_workgroup.max(1))
        } else {
            tpr
        };
        RowKernel {
            graph,
            group,
            walker: Walker::new(graph, group),
            b: Binder::new(graph, target),
            l,
            rows: d.iter().product::<usize>() / l.max(1),
            rshape,
            causal_rows: if d.len() >= 2 { d[d.len() - 2] } else { 1 },
            tpr,
            wg,
            members: group
                .nodes
                .iter()
                .copied()
                .filter(|&n| !is_prologue(graph, n))
                .collect(),
            env_row: HashMap::new(),
            softmax: HashMap::new(),
            body: String::new(),
        }
    }

    /// The entry point: the row this invocation (or workgroup) owns, bounds-checked.
    fn header(&mut self) {
        let (tpr, wg, rows) = (self.tpr, self.wg, self.rows);
        let body = &mut self.body;
        if tpr > 1 {
            let _ = writeln!(body, "var<workgroup> red: array<f32, {tpr}>;\n");
        }
        let row = if tpr == 1 {
            format!("wg * {wg}u + lid")
        } else {
            "wg".to_string()
        };
        body.push_str(&fill(
            ROW_MAIN,
            &[("wg", &wg), ("row", &row), ("rows", &rows)],
        ));
    }

    /// What member `n` computes once per row (full-width elementwise members wait for the column
    /// loops that use them), then its store when it is a per-row output.
    fn member(&mut self, n: NodeId) {
        let graph = self.graph;
        match &graph.node(n).op {
            Op::Affine { .. } | Op::Unary(_) | Op::Binary(_) | Op::BroadcastTo { .. } => {
                if graph.ty(n).shape != self.group.domain {
                    self.walker.elementwise(
                        &mut self.b,
                        &mut self.env_row,
                        n,
                        &self.rshape,
                        "row",
                        &mut self.body,
                        "    ",
                    );
                }
            }
            Op::Reduce(r) => self.reduce(n, *r),
            Op::Softmax { causal } => self.softmax(n, *causal),
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
        if self.group.outputs.contains(&n) && self.env_row.contains_key(&n) {
            let name = self.b.write(n);
            let guard = if self.tpr > 1 { "if (lid == 0u) " } else { "" };
            let put = self.b.put(&name, "row", &self.walker.var(n));
            let _ = writeln!(self.body, "    {guard}{{\n        {put}\n    }}");
        }
    }

    /// A reduction over the row: a column loop accumulates `a<id>`, the workgroup combines the
    /// partials into `r<id>`, and `v<id>` is the row's value (divided by the row length for a mean).
    fn reduce(&mut self, n: NodeId, r: ReduceOp) {
        let id = self.walker.id(n);
        let x = self.graph.inputs(n)[0];
        let (init, comb): (&str, Combine) = match r {
            ReduceOp::Sum | ReduceOp::Mean => ("0.0", add),
            ReduceOp::Max => ("-FLT_MAX", maximum),
        };
        let _ = writeln!(self.body, "    var a{id} = {init};");
        self.column_loop(&[x], &|v| {
            format!("        a{id} = {};\n", comb(&format!("a{id}"), &v[0]))
        });
        self.finish_reduce(&format!("r{id}"), &format!("a{id}"), comb);
        let value = if r == ReduceOp::Mean {
            format!("r{id} / {}", lit(self.l as f32))
        } else {
            format!("r{id}")
        };
        let _ = writeln!(self.body, "    let v{id} = {value};");
        self.env_row.insert(n, format!("v{id}"));
    }

    /// A softmax's row max `m<id>` and its row sum `s<id>` of `exp(x - m)`, each a column loop
    /// reduced across the workgroup; its values are computed in the column loops that use them.
    fn softmax(&mut self, n: NodeId, causal: bool) {
        let id = self.walker.id(n);
        let x = self.graph.inputs(n)[0];
        let valid = self.valid(causal);
        let _ = writeln!(self.body, "    var am{id} = -FLT_MAX;");
        self.column_loop(&[x], &|v| {
            format!(
                "        am{id} = select(am{id}, max(am{id}, {}), {valid});\n",
                v[0]
            )
        });
        self.finish_reduce(&format!("m{id}"), &format!("am{id}"), maximum);
        let _ = writeln!(self.body, "    var as{id} = 0.0;");
        self.column_loop(&[x], &|v| {
            format!(
                "        as{id} = as{id} + select(0.0, exp({} - m{id}), {valid});\n",
                v[0]
            )
        });
        self.finish_reduce(&format!("s{id}"), &format!("as{id}"), add);
        self.softmax
            .insert(n, (format!("m{id}"), format!("s{id}"), causal));
    }

    /// Whether column `c` of the row is inside a causal mask (`true` for a softmax without one).
    fn valid(&self, causal: bool) -> String {
        if causal {
            format!("c <= (row % {}u) % {}u", self.causal_rows, self.l)
        } else {
            "true".into()
        }
    }

    /// Appends a column loop computing `targets` (in-group full-width nodes or external operands)
    /// and the statements `each(values)` on them.
    fn column_loop(&mut self, targets: &[NodeId], each: &dyn Fn(&[String]) -> String) {
        let (group, l) = (self.group, self.l);
        let needed = self.needed(targets);
        let (start, step) = if self.tpr == 1 {
            ("0u".to_string(), "1u".to_string())
        } else {
            ("lid".to_string(), format!("{}u", self.tpr))
        };
        let bound = loop_bound(l, l.div_ceil(self.tpr as usize));
        let mut s = format!("    for (var c = {start}; c < {bound}; c = c + {step}) {{\n        let lin = row * {l}u + c;\n");
        let mut env = self.env_row.clone();
        for &n in group.nodes.iter().filter(|n| needed.contains(n)) {
            self.column_value(&mut env, n, &mut s);
        }
        let vals: Vec<String> = targets
            .iter()
            .map(|&t| {
                self.walker
                    .operand(&mut self.b, &env, t, &group.domain, "lin")
            })
            .collect();
        s += &each(&vals);
        s += "    }\n";
        self.body += &s;
    }

    /// The members a column loop over `targets` computes: those targets and the members they
    /// depend on that are not per-row values already.
    fn needed(&self, targets: &[NodeId]) -> HashSet<NodeId> {
        let pending = |q: &NodeId| self.members.contains(q) && !self.env_row.contains_key(q);
        let mut needed = HashSet::new();
        let mut stack: Vec<NodeId> = targets.iter().copied().filter(|q| pending(q)).collect();
        while let Some(x) = stack.pop() {
            if needed.insert(x) {
                stack.extend(self.graph.inputs(x).into_iter().filter(|q| pending(q)));
            }
        }
        needed
    }

    /// Appends to the loop text `s` the column value of member `n` (recorded in `env`): a softmax
    /// from its row max and sum, any other member elementwise.
    fn column_value(&mut self, env: &mut HashMap<NodeId, String>, n: NodeId, s: &mut String) {
        let (graph, group) = (self.graph, self.group);
        match &graph.node(n).op {
            Op::Softmax { .. } => {
                let x =
                    self.walker
                        .operand(&mut self.b, env, graph.inputs(n)[0], &group.domain, "lin");
                let (m, sum, causal) = &self.softmax[&n];
                let valid = self.valid(*causal);
                let v = self.walker.var(n);
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
                self.walker
                    .elementwise(&mut self.b, env, n, &group.domain, "lin", s, "        ")
            }
        }
    }

    /// Appends `let <name>`: `acc` (each invocation's partial) reduced across the workgroup through
    /// a fixed tree (deterministic); with one invocation per row the partial is the row's value.
    fn finish_reduce(&mut self, name: &str, acc: &str, combine: Combine) {
        let tpr = self.tpr;
        if tpr == 1 {
            let _ = writeln!(self.body, "    let {name} = {acc};");
            return;
        }
        self.body.push_str(&fill(
            ROW_REDUCE,
            &[
                ("acc", &acc),
                ("half", &(tpr / 2)),
                ("combined", &combine("red[lid]", "red[lid + s]")),
                ("name", &name),
            ],
        ));
    }

    /// The final column loop writing the group's full-width outputs.
    fn full_outputs(&mut self) {
        let group = self.group;
        let full: Vec<NodeId> = group
            .nodes
            .iter()
            .copied()
            .filter(|n| group.outputs.contains(n) && !self.env_row.contains_key(n))
            .collect();
        if full.is_empty() {
            return;
        }
        let names: Vec<Access> = full
            .iter()
            .map(|&o| {
                let name = self.b.write(o);
                self.b.access(&name)
            })
            .collect();
        self.column_loop(&full, &|v| {
            names
                .iter()
                .zip(v)
                .map(|(name, val)| format!("        {}\n", name.put("lin", val)))
                .collect()
        });
    }

    /// Closes the entry point and assembles the kernel: one workgroup per row, or per `wg` rows.
    fn finish(mut self, target: &Target) -> Result<KernelSrc, KernelError> {
        self.body.push_str("}\n");
        let groups = if self.tpr == 1 {
            self.rows.div_ceil(self.wg as usize)
        } else {
            self.rows
        };
        let grid = fold(groups as u64, target)?;
        Ok(self.b.finish(&[], &self.body, grid))
    }
}

/// Sum as a reduction's combining step.
fn add(x: &str, y: &str) -> String {
    format!("{x} + {y}")
}

/// Maximum as a reduction's combining step.
fn maximum(x: &str, y: &str) -> String {
    format!("max({x}, {y})")
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
    /// Every batch stride of both operands is a multiple of 4 (batch offsets are whole vec4s).
    batch_strides_div4: bool,
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
        let rope = RopeLoad {
            name: name.to_string(),
            rope: Rope::new(graph, owner),
            x: b.access(&x),
        };
        funcs.push_str(&rope.rope.function(name, &rope.x));
        return Load::Rope(rope);
    }
    b.load(src)
}

/// Matmul or grouped matmul plus its elementwise epilogue. The epilogue is a WGSL function
/// `store(lin, v)` the matmul body calls once per output element.
fn matmul_kernel(graph: &Graph, group: &Group, target: &Target) -> Result<KernelSrc, KernelError> {
    let anchor = anchor(graph, group);
    let members: HashSet<NodeId> = group.nodes.iter().copied().collect();
    let args = graph.inputs(anchor);
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
    let (mut mm, grouped) = geometry(
        graph,
        anchor,
        &mut b,
        (&a_shape, &a_str),
        (&b_shape, &b_str),
    );

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
        let a_at = a_load.at(&format!(
            "{} + m * {}u + k * {}u",
            mm.a_batch, mm.sam, mm.sak
        ));
        let b_at = b_load.at(&format!(
            "{} + k * {}u + n * {}u",
            mm.b_batch, mm.sbk, mm.sbn
        ));
        let loads = fill(MATMUL_TILED_LOADS, &[("a", &a_at), ("b", &b_at)]);
        let tiles = mm.batch * mm.m.div_ceil(64) * mm.n.div_ceil(64);
        (format!("{funcs}{store}{loads}\n{MATMUL_TILED}"), tiles)
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
        let schedule = Schedule::new(
            target,
            (mm.m, mm.n),
            mm.batch * mm.m * mm.n * mm.k,
            grouped.as_ref().map(|(layout, _)| layout.tile),
        );
        let mut blocked = Blocked {
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
            a4: None,
            b4: None,
            steps_by_4: false,
        };
        let schedule = blocked.vectorise(
            &mut b,
            target,
            schedule,
            KRange::Static(mm.k),
            mm.batch_strides_div4,
        );
        (
            format!("{funcs}{store}{}", blocked::body(&blocked, schedule)),
            schedule.workgroups(&blocked),
        )
    };
    let grid = fold(groups as u64, target)?;
    Ok(b.finish(&consts, &body, grid))
}

/// The geometry of the matmul `anchor` over its operands' views (logical shape, element strides),
/// and for a grouped matmul its routing layout and routing-table binding.
fn geometry(
    graph: &Graph,
    anchor: NodeId,
    b: &mut Binder,
    (a_shape, a_str): (&[usize], &[usize]),
    (b_shape, b_str): (&[usize], &[usize]),
) -> (Mm, Option<(RouteLayout, String)>) {
    let args = graph.inputs(anchor);
    let out = graph.ty(anchor);
    match &graph.node(anchor).op {
        Op::MatMul { trans_b } => (
            plain_geometry(out.last(), *trans_b, (a_shape, a_str), (b_shape, b_str)),
            None,
        ),
        Op::GroupedMatMul { layout } => {
            // w[e] is [N, K] read transposed.
            let (m, k, n) = (a_shape[0], a_shape[1], out.last());
            let route = b.read(args[2]);
            (grouped_geometry(m, k, n, (1, k)), Some((*layout, route)))
        }
        Op::GroupedMatMulGradX { layout } => {
            // g[rows, N] · w[e] with w[e] read as [N, K]: a grouped matmul contracting over N.
            let (m, k, n) = (a_shape[0], a_shape[1], out.last());
            let route = b.read(args[2]);
            (grouped_geometry(m, k, n, (n, 1)), Some((*layout, route)))
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
    }
}

/// A (batched) matmul `A[.., m, k] · B[.., k, n]` (`B` read as `[.., n, k]` when `trans_b`) over its
/// operands' views; `n` is the output's last axis.
fn plain_geometry(
    n: usize,
    trans_b: bool,
    (a_shape, a_str): (&[usize], &[usize]),
    (b_shape, b_str): (&[usize], &[usize]),
) -> Mm {
    let (ra, rb) = (a_shape.len(), b_shape.len());
    let (sbk, sbn) = if trans_b {
        (b_str[rb - 1], b_str[rb - 2])
    } else {
        (b_str[rb - 2], b_str[rb - 1])
    };
    Mm {
        batch: a_shape[..ra - 2].iter().product(),
        m: a_shape[ra - 2],
        n,
        k: a_shape[ra - 1],
        sam: a_str[ra - 2],
        sak: a_str[ra - 1],
        sbk,
        sbn,
        a_batch: batch_offset(&a_shape[..ra - 2], &a_str[..ra - 2]),
        b_batch: batch_offset(&b_shape[..rb - 2], &b_str[..rb - 2]),
        batch_strides_div4: a_str[..ra - 2]
            .iter()
            .chain(&b_str[..rb - 2])
            .all(|s| s % 4 == 0),
    }
}

/// A grouped matmul of contiguous `[m, k]` rows by one expert's weights, which it reads with the
/// element strides `(sbk, sbn)`; the expert's offset comes from the routing table, not a batch.
fn grouped_geometry(m: usize, k: usize, n: usize, (sbk, sbn): (usize, usize)) -> Mm {
    Mm {
        batch: 1,
        m,
        n,
        k,
        sam: k,
        sak: 1,
        sbk,
        sbn,
        a_batch: "0u".into(),
        b_batch: "0u".into(),
        batch_strides_div4: true,
    }
}

/// The epilogue `fn store(lin, acc)`: the anchor's value in, the group's elementwise members after
/// it computed, every materialised member written.
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
