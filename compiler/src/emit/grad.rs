//! WGSL generators for the gradient ops whose simple one-invocation-per-element form is too slow:
//! the weight gradient of the grouped matmul (the largest matmul of an MoE training step) and the
//! embedding gradient. The other gradient kernels live with the forward kernels in [`super::kernels`].
//!
//! Both kernels are deterministic: no float atomics; each output element is written by exactly one
//! invocation that sums its contributions in a fixed order, so results never depend on scheduling.
//! Shapes and routing-table offsets are baked in as literals and grids are folded with [`fold`].

use super::kernels::{fold, KernelError};
use super::{KernelSrc, Target};
use crate::fuse::base;
use crate::ir::{Graph, NodeId, Op, RouteLayout};
use std::fmt::Write;

const PRELUDE: &str = include_str!("../../../shaders/prelude.wgsl");

/// Output rows one invocation of the weight gradient holds.
const TM: usize = 8;
/// Output columns one invocation of the weight gradient holds, strided by the workgroup size.
const TN: usize = 8;
/// Largest workgroup of the weight-gradient and embedding-gradient kernels.
const WG_NARROW: u32 = 64;

/// Storage bindings of one kernel, named by role, in binding order.
struct Bind<'g> {
    graph: &'g Graph,
    slots: Vec<(NodeId, bool, String)>,
}

impl<'g> Bind<'g> {
    fn new(graph: &'g Graph) -> Self {
        Bind { graph, slots: Vec::new() }
    }

    /// Binds `operand`'s buffer (its Reshape base) read-only as `name`, or returns the name it is
    /// already bound under.
    fn read(&mut self, operand: NodeId, name: &str) -> String {
        let b = base(self.graph, operand);
        if let Some((_, _, existing)) = self.slots.iter().find(|(n, w, _)| *n == b && !*w) {
            return existing.clone();
        }
        self.slots.push((b, false, name.to_string()));
        name.to_string()
    }

    /// Binds the buffer of `node` (the kernel's result) as `out`.
    fn write(&mut self, node: NodeId) -> &'static str {
        self.slots.push((node, true, "out".into()));
        "out"
    }

    /// Constants, the folded grid, bindings and the prelude in front of `body`.
    fn finish(self, body: &str, workgroups: [u32; 3]) -> KernelSrc {
        let mut s = format!("const GX: u32 = {}u;\nconst GY: u32 = {}u;\n", workgroups[0], workgroups[1]);
        for (i, (node, writes, name)) in self.slots.iter().enumerate() {
            let access = if *writes { "read_write" } else { "read" };
            let ty = self.graph.ty(*node).dtype.wgsl();
            let _ = writeln!(s, "@group(0) @binding({i}) var<storage, {access}> {name}: array<{ty}>;");
        }
        s.push_str(PRELUDE);
        s.push('\n');
        s.push_str(body);
        KernelSrc { wgsl: s, bindings: self.slots.into_iter().map(|(n, w, _)| (n, w)).collect(), workgroups }
    }
}

fn wg_size(target: &Target, want: u32) -> u32 {
    want.min(target.max_invocations_per_workgroup.max(1))
}

/// Linear workgroup index of a folded grid.
const WORKGROUP: &str = "wid.x + wid.y * GX + wid.z * (GX * GY)";

fn main_header(wg: u32) -> String {
    format!("@compute @workgroup_size({wg})\nfn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {{\n")
}

/// Kernel of `EmbeddingGrad` or `GroupedMatMulGradW` node `n` (always its own group).
pub(crate) fn grad_kernel(graph: &Graph, n: NodeId, target: &Target) -> Result<KernelSrc, KernelError> {
    let args = graph.inputs(n);
    let b = Bind::new(graph);
    match &graph.node(n).op {
        Op::EmbeddingGrad { vocab } => embedding_grad(b, n, args[0], args[1], *vocab, target),
        Op::GroupedMatMulGradW { layout } => grad_w(b, n, &args, layout, target),
        other => unreachable!("{} has no kernel in emit::grad", other.mnemonic()),
    }
}

/// `EmbeddingGrad` as a gather: a workgroup owns one vocabulary row and a chunk of its columns and
/// scans every id in order, adding `g` rows whose id matches. O(V·N) id comparisons, but the id
/// loads and the branch are uniform across the workgroup (each lane only adds its column), so on a
/// SIMD CPU adapter a comparison costs one scalar load, and on a GPU the ids stay in cache.
fn embedding_grad(mut b: Bind, n: NodeId, ids_node: NodeId, g_node: NodeId, vocab: usize, target: &Target) -> Result<KernelSrc, KernelError> {
    let graph = b.graph;
    let ids = b.read(ids_node, "ids");
    let g = b.read(g_node, "g");
    let count = graph.ty(ids_node).numel();
    let d = graph.ty(g_node).last();
    let lanes = wg_size(target, WG_NARROW.min(d.next_power_of_two() as u32));
    let chunks = d.div_ceil(lanes as usize);
    let out = b.write(n);
    let src = format!(
        "{}    let w = {WORKGROUP};\n    if (w >= {}u) {{\n        return;\n    }}\n    let row = w / {chunks}u;\n    let c = (w % {chunks}u) * {lanes}u + lid;\n    if (c >= {d}u) {{\n        return;\n    }}\n    var acc = 0.0;\n    for (var t = 0u; t < {count}u; t = t + 1u) {{\n        if ({ids}[t] == row) {{\n            acc = acc + {g}[t * {d}u + c];\n        }}\n    }}\n    {out}[row * {d}u + c] = acc;\n}}\n",
        main_header(lanes),
        vocab * chunks
    );
    let grid = fold((vocab * chunks) as u64, target)?;
    Ok(b.finish(&src, grid))
}

/// `GroupedMatMulGradW`: `dw[e, n, k] = Σ_{r ∈ [offsets[e], offsets[e+1])} g[r, n] · x[r, k]`, the
/// rows of expert `e` in ascending order.
///
/// Register-blocked like the forward matmul (DESIGN.md): an invocation accumulates a `TM × TN`
/// block by outer products over the rows, with no workgroup memory and no barriers. A workgroup
/// owns one expert and `TM` values of `n`, so the segment bounds and the `g` loads are uniform
/// across it (one scalar load plus a broadcast on a SIMD CPU adapter); lanes take columns
/// `k = n0 + j·wg`, so `x` loads are contiguous across lanes. Edge blocks clamp their load indices
/// (no branches in the row loop) and discard out-of-range results at the store. Narrow outputs get
/// narrower workgroups instead of idle lanes.
fn grad_w(mut b: Bind, n: NodeId, args: &[NodeId], layout: &RouteLayout, target: &Target) -> Result<KernelSrc, KernelError> {
    let graph = b.graph;
    let g = b.read(args[0], "g");
    let x = b.read(args[1], "x");
    let route = b.read(args[2], "route");
    let out = b.write(n);
    let (nn, k) = (graph.ty(args[0]).shape[1], graph.ty(args[1]).shape[1]);
    let (rows, e) = (layout.rows(), layout.experts);
    let wg = wg_size(target, WG_NARROW.min((k.div_ceil(TN) as u32).next_power_of_two().max(8)));
    let span = TN * wg as usize;
    let (mt, ct) = (nn.div_ceil(TM), k.div_ceil(span));
    let off = layout.offsets_at();
    let mut s = main_header(wg);
    let _ = writeln!(s, "    let w_ = {WORKGROUP};\n    if (w_ >= {}u) {{\n        return;\n    }}", e * mt * ct);
    let _ = writeln!(s, "    let e = w_ / {}u;\n    let m0 = ((w_ / {ct}u) % {mt}u) * {TM}u;\n    let n0 = (w_ % {ct}u) * {span}u + lid;", mt * ct);
    let _ = writeln!(s, "    let rend = min({route}[{off}u + e + 1u], {rows}u);");
    for i in 0..TM {
        let _ = writeln!(s, "    let gc{i} = min(m0 + {i}u, {}u);", nn - 1);
    }
    for j in 0..TN {
        let _ = writeln!(s, "    let xc{j} = min(n0 + {}u, {}u);", j * wg as usize, k - 1);
    }
    for i in 0..TM {
        for j in 0..TN {
            let _ = writeln!(s, "    var c{i}_{j} = 0.0;");
        }
    }
    let _ = writeln!(s, "    for (var r = {route}[{off}u + e]; r < rend; r = r + 1u) {{");
    for j in 0..TN {
        let _ = writeln!(s, "        let xv{j} = {x}[r * {k}u + xc{j}];");
    }
    for i in 0..TM {
        let _ = writeln!(s, "        let gv{i} = {g}[r * {nn}u + gc{i}];");
        for j in 0..TN {
            let _ = writeln!(s, "        c{i}_{j} = fma(gv{i}, xv{j}, c{i}_{j});");
        }
    }
    s += "    }\n";
    for i in 0..TM {
        let _ = writeln!(s, "    if (m0 + {i}u < {nn}u) {{");
        for j in 0..TN {
            let col = format!("n0 + {}u", j * wg as usize);
            let _ = writeln!(s, "        if ({col} < {k}u) {{\n            {out}[(e * {nn}u + m0 + {i}u) * {k}u + {col}] = c{i}_{j};\n        }}");
        }
        s += "    }\n";
    }
    s += "}\n";
    let grid = fold((e * mt * ct) as u64, target)?;
    Ok(b.finish(&s, grid))
}
