//! The register-blocked matmul body shared by the plain matmul, the grouped matmul (forward and
//! input gradient) and the grouped weight gradient on CPU-like adapters (docs/DECISIONS.md, Runtime: no workgroup
//! memory, no barriers).
//!
//! Why it looks like this (measured on lavapipe, Mesa 22.3; numbers in docs/DECISIONS.md, Runtime):
//! llvmpipe runs 8 invocations as the lanes of one SIMD vector, and every storage-buffer load costs a
//! scalar loop over the lanes (~170 cycles per load, whatever the addresses, vec4 loads 3.5 times
//! that), while arithmetic and subgroup broadcasts are nearly free. So the schedule minimises loads
//! per multiply-add:
//! - A workgroup owns `rows` consecutive output rows; its lanes own columns. A lane holds a
//!   `rows × cols` block of accumulators and walks the contraction axis once, loading `cols` values
//!   of B (its own columns, neighbouring lanes at neighbouring addresses).
//! - Without subgroups every lane loads all `rows` values of A itself (uniform addresses).
//! - With fixed-size subgroups of `lanes` lanes, the lanes of a subgroup load the `rows` values of A
//!   cooperatively (`rows / lanes` loads each) and hand them round with `subgroupBroadcast`, which
//!   llvmpipe compiles to an element extract. That cuts loads per multiply-add from 1/4 to 1/21 and
//!   runs 1024³ at 8.5 GFLOP/s instead of 2.
//! - The epilogue (`put`) runs once per output in a loop over the block after the contraction, not
//!   inlined per accumulator.
//! - On Mesa 25 a vec4 load costs about what a scalar one does, so operands laid out in whole vec4s
//!   along k or along their output axis are read four elements per load ([`Quad`]), on a narrower
//!   block ([`Schedule::quads`]).
//!
//! Edge blocks clamp their load indices into the matrix (no branches in the loop, every lane stays
//! active for the broadcasts) and drop out-of-range results at the store.

use super::frame::{loop_bound, opaque_trips_fn, Access, Binder, Load};
use crate::ir::{Graph, NodeId, Op};
use crate::target::Target;
use std::collections::HashSet;
use std::fmt::Write;

/// Linear workgroup index of a folded grid.
const WORKGROUP: &str = "wid.x + wid.y * GX + wid.z * (GX * GY)";

/// An operand whose padded-row index (of a grouped matmul) goes through the routing table to a token
/// row: a `MoeGather`, or the weighted `MoeCombineGradRows`, computed in the loads. Padded row `r`
/// reads token row `slot / k` of the source (whose rows are as long as the padded rows), times the
/// slot's gate weight when `weights` is set; padding rows (`NONE` slots) read 0.
pub(crate) struct Gathered {
    pub route: String,
    pub row_slot_at: usize,
    pub k: usize,
    /// Token slots (`tokens · k`): the length of `weights`.
    pub slots: usize,
    pub weights: Option<Access>,
}

impl Gathered {
    /// Statements that look up padded row `row`: its slot `{v}s` and token row `{v}t`.
    fn lookup(&self, v: &str, row: &str, indent: &str) -> String {
        format!(
            "{indent}let {v}s = {}[{}u + {row}];\n{indent}let {v}t = select({v}s / {}u, 0u, {v}s == {}u);\n",
            self.route,
            self.row_slot_at,
            self.k,
            crate::ir::RouteLayout::NONE
        )
    }

    /// The factor of a row whose slot is `{v}s`: its gate weight (or 1), 0 for padding.
    fn factor(&self, v: &str) -> String {
        let w = match &self.weights {
            Some(w) => w.at(&format!("min({v}s, {}u)", self.slots - 1)),
            None => "1.0".into(),
        };
        format!(
            "select({w}, 0.0, {v}s == {}u)",
            crate::ir::RouteLayout::NONE
        )
    }
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

/// `out[bi][row, col] = Σ_{k ∈ [kbeg, kend)} A[row, k] · B[k, col]` for `bi < batch`, where A and B
/// are read in place from `a` and `b` through element strides, after per-block offsets.
pub(crate) struct Blocked<'a> {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub a: &'a Load,
    pub b: &'a Load,
    pub sam: usize,
    pub sak: usize,
    pub sbk: usize,
    pub sbn: usize,
    /// WGSL statements run once per block, after `bi` (batch index) and `m0` (first row of the block)
    /// are set; they define `abase` and `bbase` (element offsets of A and B) and the contraction range
    /// `kbeg`, `kend`, all uniform across the workgroup.
    pub setup: String,
    /// WGSL body of `fn put(bi: u32, row: u32, col: u32, acc: f32)`, called once per in-range output.
    pub put: String,
    /// A's rows are gathered padded rows (grouped matmul, input gradient).
    pub a_rows: Option<Gathered>,
    /// The contraction index is a padded row gathered in A (weight gradient: the output gradient).
    pub a_k: Option<Gathered>,
    /// The contraction index is a padded row gathered in B (weight gradient: the layer input).
    pub b_k: Option<Gathered>,
    /// A read as vec4s ([`Quad`]), else one element at a time through `a`.
    pub a4: Option<Quad>,
    /// B read as vec4s, else one element at a time through `b`.
    pub b4: Option<Quad>,
    /// The vec4 contraction steps 4 elements of k at a time ([`Blocked::vectorise`]).
    pub steps_by_4: bool,
}

/// What [`Blocked::vectorise`] may assume of the contraction range `[kbeg, kend)`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum KRange {
    /// `[0, k)` over plain indices, or empty.
    Static(usize),
    /// Padded rows of a routing table's expert segments, whose bounds are multiples of `align`,
    /// gathered to token rows.
    Gathered { align: usize },
}

/// The axis a vec4 view of a matmul operand steps along.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Along {
    /// The contraction axis: A's rows or B's columns are contiguous in k (the forward `x · wᵀ`,
    /// attention scores).
    K,
    /// The operand's output axis: A contiguous along its rows (the weight gradient's `dyᵀ`) or B
    /// along its columns (the input gradient's `w`, the weight gradient's `x`).
    Out,
}

/// An operand read four elements at a time through an `array<vec4<f32>>` view of its binding
/// (`Binder::vec4_view`). llvmpipe pays per load, not per byte, so this cuts the loads of the
/// contraction by 4 (docs/DECISIONS.md, Runtime: vec4 loads). Every accumulator still adds its
/// products in k order, so the sums are exactly those of scalar loads. [`Blocked::vectorise`] says
/// when an operand's layout allows one.
pub(crate) struct Quad {
    pub view: QuadLoad,
    pub along: Along,
}

/// Where a [`Quad`] reads its vec4s.
pub(crate) enum QuadLoad {
    /// `view[i]`, a vec4 view of the operand's binding.
    View(String),
    /// `name(i)`, or `name(bi, i)` when `batched`, defined by `function` over vec4 views: a RoPE
    /// prologue's operand, or each part of a [`Stacked`] operand.
    Function {
        name: String,
        batched: bool,
        function: String,
    },
}

impl QuadLoad {
    /// How `load` reads its vec4s from `views`, vec4 views of its [`viewed_bindings`].
    fn of(load: &Load, views: &[Access]) -> QuadLoad {
        match load {
            Load::Buffer(_) => QuadLoad::View(views[0].name.clone()),
            Load::Stacked(stacked) => {
                let name = format!("{}4", stacked.name);
                QuadLoad::Function {
                    function: stacked.function(&name, "vec4<f32>", views, 4),
                    batched: true,
                    name,
                }
            }
            Load::Rope(rope) => {
                let name = format!("{}4", rope.name);
                QuadLoad::Function {
                    function: rope.rope.function4(&name, &views[0]),
                    batched: false,
                    name,
                }
            }
        }
    }

    /// The vec4 at index expression `i` of the view.
    fn at(&self, i: &str) -> String {
        match self {
            QuadLoad::View(view) => format!("{view}[{i}]"),
            QuadLoad::Function {
                name,
                batched: true,
                ..
            } => format!("{name}(bi, {i})"),
            QuadLoad::Function { name, .. } => format!("{name}({i})"),
        }
    }

    /// The WGSL function the loads call, if any.
    fn function(&self) -> &str {
        match self {
            QuadLoad::View(_) => "",
            QuadLoad::Function { function, .. } => function,
        }
    }
}

/// The bindings whose vec4 views `load` can read instead of its scalar loads, or `None` where its
/// elements do not come 4 to an aligned vec4 (f16 and split buffers, a RoPE whose half head is not a
/// multiple of 4).
fn viewed_bindings(load: &Load) -> Option<Vec<String>> {
    let plain = |x: &Access| !x.f16 && !x.split;
    match load {
        Load::Buffer(x) if plain(x) => Some(vec![x.name.clone()]),
        Load::Stacked(stacked)
            if stacked.parts.iter().all(plain) && stacked.stride.is_multiple_of(4) =>
        {
            Some(stacked.parts.iter().map(|x| x.name.clone()).collect())
        }
        Load::Rope(rope) if plain(&rope.x) && rope.rope.quads() => Some(vec![rope.x.name.clone()]),
        Load::Buffer(_) | Load::Rope(_) | Load::Stacked(_) => None,
    }
}

/// One operand of a [`StridedMatmul`]: element `[bi][i, j]` is `buffer[bi·batch + i·rows + j·cols]`
/// (any layout a plain buffer has: a transpose is swapped strides).
#[derive(Debug, Clone, Copy)]
pub struct Strided<'a> {
    pub buffer: &'a str,
    pub batch: usize,
    pub rows: usize,
    pub cols: usize,
}

/// `[bi][row, col] = Σ_{t < k} A[bi][row, t] · B[bi][t, col]` for `bi < batch` over plain strided
/// buffers, for kernels built outside a plan (the runtime's Shampoo and Muon products): they get the
/// register-blocked schedule of the plan's matmuls, so that a multiply-add costs them what it costs
/// the model (on lavapipe a one-output-per-invocation loop pays two storage loads per multiply-add).
pub struct StridedMatmul<'a> {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: Strided<'a>,
    pub b: Strided<'a>,
    /// WGSL body of `fn put(bi: u32, row: u32, col: u32, acc: f32)`, called once per output.
    pub put: &'a str,
}

impl StridedMatmul<'_> {
    /// The WGSL functions `put` and `main` on `target`, and how many workgroups to dispatch. The
    /// caller declares the buffers and `GX`, `GY` (the grid folded into x and y, as for every kernel).
    pub fn wgsl(&self, target: &Target) -> (String, usize) {
        // The optimizer's matrices are f32 (master weights and their statistics).
        let f32_buffer = |name: &str| {
            Load::Buffer(Access {
                name: name.to_string(),
                f16: false,
                split: false,
            })
        };
        let (a, b) = (f32_buffer(self.a.buffer), f32_buffer(self.b.buffer));
        let mm = Blocked {
            batch: self.batch,
            m: self.m,
            n: self.n,
            a: &a,
            b: &b,
            sam: self.a.rows,
            sak: self.a.cols,
            sbk: self.b.rows,
            sbn: self.b.cols,
            setup: format!(
                "    let kbeg = 0u;\n    let kend = {}u;\n    let abase = bi * {}u;\n    let bbase = bi * {}u;\n",
                self.k, self.a.batch, self.b.batch
            ),
            put: format!("{}\n", self.put.trim_end()),
            a_rows: None,
            a_k: None,
            b_k: None,
            a4: None,
            b4: None,
            steps_by_4: false,
        };
        let schedule = Schedule::new(
            target,
            (self.m, self.n),
            self.batch * self.m * self.n * self.k,
            None,
        );
        let body = body(&mm, schedule);
        (
            opaque_trips_fn(self.a.buffer, &body) + &body,
            schedule.workgroups(&mm),
        )
    }
}

/// How a blocked matmul is cut: accumulator block per lane, workgroup size, and how many lanes share
/// their A loads through subgroup broadcasts (1: none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Schedule {
    pub rows: usize,
    pub cols: usize,
    pub wg: u32,
    pub lanes: u32,
    /// A compile-bound product ([`Target::small_product_macs`]): scalar loads only, since vec4
    /// loads unroll the contraction 4 times for no gain at its size.
    pub small: bool,
}

/// Accumulator block of a lane without subgroups: 64 accumulators amortise the A loads.
const PLAIN_ROWS: usize = 8;
/// Rows of a block whose A loads are shared across a subgroup: 32 × 8 accumulators per lane was the
/// fastest block on lavapipe that still compiles in about a second (64 × 8: +15%, twice the compile).
const SHARED_ROWS: usize = 32;
/// Rows of a subgroup-shared block of a compile-bound product. Measured on the quickstart's training
/// plan (lavapipe, Mesa 25.0.7, compile summed over its 62 kernels, release `moec bench` interleaved):
/// 32 rows with vec4 loads 24.1 s, 16 rows 14.5 s, 16 rows with scalar loads 10.6 s, all three at
/// ~105 ms per step; 8 rows with scalar loads 8.3 s but 130 ms per step.
const SMALL_SHARED_ROWS: usize = 16;
const COLS: usize = 8;
const WG_MAX: u32 = 64;
/// Columns per lane and workgroup size of vec4 contractions ([`Schedule::quads`]).
const K4_COLS: usize = 4;
const K4_WG_MAX: u32 = 32;

/// Lanes of a workgroup whose lanes own `cols` columns each of an `n`-wide output: at most `max`,
/// and narrow outputs (router logits, small heads) get narrower workgroups instead of idle lanes.
fn workgroup_size(max: u32, n: usize, cols: usize, lanes: u32, target: &Target) -> u32 {
    max.min((n.div_ceil(cols) as u32).next_power_of_two())
        .max(8)
        .max(lanes)
        .min(target.max_invocations_per_workgroup.max(1))
}

impl Schedule {
    /// The schedule for an `m × n` output on `target`. `row_align`: a block must not straddle a
    /// multiple of it (grouped matmuls: an expert's segment starts at multiples of the route tile).
    /// Small outputs get smaller blocks: llvmpipe's compile time grows with the unrolled block, and a
    /// block larger than the output only adds idle accumulators. So do products of few multiply-adds
    /// (`macs`, over the whole dispatch) on adapters where they are compile-bound.
    pub(crate) fn new(
        target: &Target,
        (m, n): (usize, usize),
        macs: usize,
        row_align: Option<usize>,
    ) -> Schedule {
        let fits = |rows: usize| row_align.is_none_or(|t| t % rows == 0);
        let lanes = target.subgroup_size;
        let small = (macs as u64) < target.small_product_macs;
        let most_rows = if small {
            SMALL_SHARED_ROWS.max(lanes as usize)
        } else {
            SHARED_ROWS
        };
        let shared = (lanes > 1
            && (lanes as usize) <= SHARED_ROWS
            && lanes <= target.max_invocations_per_workgroup)
            .then(|| {
                let want = m.next_multiple_of(lanes as usize).min(most_rows);
                (1..=want / lanes as usize)
                    .rev()
                    .map(|q| q * lanes as usize)
                    .find(|&r| fits(r))
            })
            .flatten();
        let (rows, lanes) = match shared {
            Some(rows) => (rows, lanes),
            None => (
                (1..=PLAIN_ROWS.min(m.max(1)))
                    .rev()
                    .find(|&r| fits(r))
                    .unwrap_or(1),
                1,
            ),
        };
        let cols = COLS.min(n.div_ceil(8).max(1));
        Schedule {
            rows,
            cols,
            wg: workgroup_size(WG_MAX, n, cols, lanes, target),
            lanes,
            small,
        }
    }

    /// This schedule for vec4 loads ([`Quad`]): they are 4 times fewer, so the block that balances
    /// them against the multiply-adds is narrower. Measured on lavapipe (Mesa 25.0.7, x · wᵀ of
    /// 4096 × 512 × 256, best of 4 runs of 15): 32 rows × 4 columns × 32 lanes 30 ms, 16 × 4 × 32 35,
    /// 16 × 8 × 32 35, 32 × 4 × 64 36, 64 × 4 × 64 44, 32 × 8 × 64 (the scalar block) 50.
    fn quads(self, n: usize, target: &Target) -> Schedule {
        let cols = self.cols.min(K4_COLS);
        Schedule {
            cols,
            wg: workgroup_size(K4_WG_MAX, n, cols, self.lanes, target),
            ..self
        }
    }

    /// Lanes that share rows and split the columns of a block between them.
    fn group(&self) -> u32 {
        if self.lanes > 1 {
            self.lanes
        } else {
            self.wg
        }
    }

    /// Workgroups the whole product needs.
    pub(crate) fn workgroups(&self, mm: &Blocked) -> usize {
        mm.batch * mm.m.div_ceil(self.rows) * mm.n.div_ceil(self.cols * self.wg as usize)
    }
}

impl Blocked<'_> {
    /// Reads A and B as vec4s wherever their layouts allow ([`Quad`]), binding the views in `binder`,
    /// and returns the schedule to run with: `scalar` when neither operand can. `range`: what the
    /// contraction runs over (vec4s along k need a static length, steps of 4 bounds that are
    /// multiples of 4); `batch_div4`: every batch offset of both operands is a whole number of vec4s. Only on adapters with fixed subgroups (the CPU schedule
    /// this was measured for), and only while the views fit the adapter's bindings per stage.
    pub(crate) fn vectorise(
        &mut self,
        binder: &mut Binder,
        target: &Target,
        scalar: Schedule,
        range: KRange,
        batch_div4: bool,
    ) -> Schedule {
        if scalar.small {
            return scalar;
        }
        let p = scalar.quads(self.n, target);
        let k4 = matches!(range, KRange::Static(k) if k % 4 == 0);
        let shared_quads = p.rows.is_multiple_of(4 * p.lanes as usize);
        let a = if k4 && self.sak == 1 && self.sam.is_multiple_of(4) {
            Some(Along::K)
        } else if self.a_rows.is_none()
            && self.sam == 1
            && self.sak.is_multiple_of(4)
            && self.m.is_multiple_of(4)
            && shared_quads
        {
            Some(Along::Out)
        } else {
            None
        };
        let b = if k4 && self.sbk == 1 && self.sbn.is_multiple_of(4) {
            Some(Along::K)
        } else if self.sbn == 1
            && self.sbk.is_multiple_of(4)
            && self.n.is_multiple_of(4)
            && p.cols.is_multiple_of(4)
        {
            Some(Along::Out)
        } else {
            None
        };
        let viewed = |load: &Load, along: Option<Along>| Some((viewed_bindings(load)?, along?));
        let (a, b) = (viewed(self.a, a), viewed(self.b, b));
        let mut names: Vec<&String> = a.iter().chain(&b).flat_map(|(names, _)| names).collect();
        names.dedup();
        let room =
            binder.binding_count() + names.len() <= target.max_storage_buffers_per_stage as usize;
        if p.lanes <= 1 || !batch_div4 || !room || (a.is_none() && b.is_none()) {
            return scalar;
        }
        let mut quad = |load: &Load, (names, along): (Vec<String>, Along)| {
            let views: Vec<Access> = names
                .iter()
                .map(|name| {
                    let view = binder.vec4_view(name);
                    binder.access(&view)
                })
                .collect();
            Quad {
                view: QuadLoad::of(load, &views),
                along,
            }
        };
        self.a4 = a.map(|a| quad(self.a, a));
        self.b4 = b.map(|b| quad(self.b, b));
        // Steps of 4 let each accumulator take 4 multiply-adds in a row (`contraction_vec4`).
        self.steps_by_4 = match range {
            KRange::Static(_) => k4,
            KRange::Gathered { align } => align.is_multiple_of(4),
        };
        p
    }

    fn a_along(&self) -> Option<Along> {
        self.a4.as_ref().map(|q| q.along)
    }

    fn b_along(&self) -> Option<Along> {
        self.b4.as_ref().map(|q| q.along)
    }
}

/// The kernel's `put` helper and entry point.
pub(crate) fn body(mm: &Blocked, p: Schedule) -> String {
    let Schedule {
        rows,
        cols,
        wg,
        lanes,
        small: _,
    } = p;
    let group = p.group();
    let (mt, ct) = (mm.m.div_ceil(rows), mm.n.div_ceil(cols * wg as usize));
    let mut s: String = [&mm.a4, &mm.b4]
        .into_iter()
        .flatten()
        .map(|quad| quad.view.function())
        .collect();
    let _ = write!(
        s,
        "fn put(bi: u32, row: u32, col: u32, acc: f32) {{\n{}}}\n\n",
        mm.put
    );
    let lane_arg = if lanes > 1 {
        ", @builtin(subgroup_invocation_id) lane: u32"
    } else {
        ""
    };
    let _ = writeln!(s, "@compute @workgroup_size({wg})\nfn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32{lane_arg}) {{");
    let _ = writeln!(
        s,
        "    let w = {WORKGROUP};\n    if (w >= {}u) {{\n        return;\n    }}",
        mm.batch * mt * ct
    );
    let _ = writeln!(
        s,
        "    let bi = w / {}u;\n    let m0 = ((w / {ct}u) % {mt}u) * {rows}u;",
        mt * ct
    );
    // A lane's first column, or its first vec4 of columns when B is read along its columns.
    let col_unit = if mm.b_along() == Some(Along::Out) {
        4
    } else {
        1
    };
    let _ = writeln!(
        s,
        "    let n0 = (w % {ct}u) * {}u + (lid / {group}u) * {}u + lid % {group}u;",
        cols * wg as usize / col_unit,
        group as usize * cols / col_unit
    );
    s += &mm.setup;
    s += &a_bases(mm, p);
    s += &b_bases(mm, p);
    for i in 0..rows {
        for j in 0..cols {
            let _ = writeln!(s, "    var c{i}_{j} = 0.0;");
        }
    }
    s += &match (&mm.a4, &mm.b4) {
        (None, None) => contraction(mm, p, rows / lanes as usize),
        _ => contraction_vec4(mm, p),
    };
    s += &store_block(mm, p);
    s += "}\n";
    s
}

/// The offsets `ar{q}` of the A values this lane loads (rows, or vec4s of them).
fn a_bases(mm: &Blocked, p: Schedule) -> String {
    let Schedule { rows, lanes, .. } = p;
    let mut s = String::new();
    if mm.a_along() == Some(Along::Out) {
        for q in 0..rows / (4 * lanes as usize) {
            let _ = writeln!(
                s,
                "    let ar{q} = abase / 4u + min(m0 / 4u + lane + {}u, {}u);",
                q * lanes as usize,
                mm.m / 4 - 1
            );
        }
        return s;
    }
    // Element offsets, or vec4 offsets when A is read along k.
    let quad = if mm.a4.is_some() { " / 4u" } else { "" };
    // Rows this lane loads: all of the block's, or its share of them.
    let loads = rows / lanes as usize;
    for q in 0..loads {
        let row = if lanes > 1 {
            format!("m0 + lane + {}u", q * lanes as usize)
        } else {
            format!("m0 + {q}u")
        };
        let row = format!("min({row}, {}u)", mm.m - 1);
        let row = match &mm.a_rows {
            Some(g) => {
                let v = format!("g{q}");
                s += &g.lookup(&v, &row, "    ");
                let _ = writeln!(s, "    let {v}w = {};", g.factor(&v));
                format!("{v}t")
            }
            None => row,
        };
        let _ = writeln!(
            s,
            "    let ar{q} = abase{quad} + {row} * {}u;",
            per_quad(mm.sam, quad)
        );
    }
    s
}

/// The offsets `bc{j}` of the B values this lane loads (columns, or vec4s of them).
fn b_bases(mm: &Blocked, p: Schedule) -> String {
    let cols = p.cols;
    let group = p.group() as usize;
    let mut s = String::new();
    if mm.b_along() == Some(Along::Out) {
        for j in 0..cols / 4 {
            let _ = writeln!(
                s,
                "    let bc{j} = bbase / 4u + min(n0 + {}u, {}u);",
                j * group,
                mm.n / 4 - 1
            );
        }
        return s;
    }
    let quad = if mm.b4.is_some() { " / 4u" } else { "" };
    for j in 0..cols {
        let _ = writeln!(
            s,
            "    let bc{j} = bbase{quad} + min(n0 + {}u, {}u) * {}u;",
            j * group,
            mm.n - 1,
            per_quad(mm.sbn, quad)
        );
    }
    s
}

/// A stride in elements, or in vec4s when offsets are (`quad`): the callers checked it divides.
fn per_quad(stride: usize, quad: &str) -> usize {
    if quad.is_empty() {
        stride
    } else {
        stride / 4
    }
}

/// The contraction loop over `k ∈ [kbeg, kend)`: per k, this lane's `loads` values of A (gathered
/// and scaled where a gather prologue was absorbed), its `cols` values of B, and with subgroups the
/// broadcasts that hand the block's rows round, into the `rows × cols` accumulators.
fn contraction(mm: &Blocked, p: Schedule, loads: usize) -> String {
    let Schedule {
        rows, cols, lanes, ..
    } = p;
    let mut s = String::new();
    // A gathered contraction index reads token row `kt` of the source instead of padded row `k`.
    let scaled = |stride: usize, gathered: bool| {
        let k = if gathered { "kt" } else { "k" };
        if stride == 1 {
            k.to_string()
        } else {
            format!("{k} * {stride}u")
        }
    };
    let (ak, bk) = (
        scaled(mm.sak, mm.a_k.is_some()),
        scaled(mm.sbk, mm.b_k.is_some()),
    );
    let b_factor = b_factor(mm, "k");
    s += "    for (var k = kbeg; k < kend; k = k + 1u) {\n";
    s += &gathered_k_lookup(mm, "k", "k");
    // Without subgroups the lane's own loads are the row values (`av`); with them, its share (`al`).
    let loaded = if lanes > 1 { "al" } else { "av" };
    for q in 0..loads {
        let _ = writeln!(
            s,
            "        let {loaded}{q} = {}{};",
            mm.a.at(&format!("ar{q} + {ak}")),
            a_factor(mm, q, "k")
        );
    }
    for j in 0..cols {
        let _ = writeln!(
            s,
            "        let bv{j} = {}{b_factor};",
            mm.b.at(&format!("bc{j} + {bk}"))
        );
    }
    for i in 0..rows {
        if lanes > 1 {
            s += &broadcast(i, lanes as usize, "");
        }
        for j in 0..cols {
            let _ = writeln!(s, "        c{i}_{j} = fma(av{i}, bv{j}, c{i}_{j});");
        }
    }
    s += "    }\n";
    s
}

/// [`contraction`] with one or both operands read as vec4s ([`Quad`]). With a vec4 along k the loop
/// steps 4 elements of k, loading those once per step, and runs 4 sub-steps for the operands read
/// per element of k; otherwise it steps 1. Per sub-step every accumulator gets one multiply-add, so
/// each still sums in k order.
fn contraction_vec4(mm: &Blocked, p: Schedule) -> String {
    let Schedule {
        rows, cols, lanes, ..
    } = p;
    let lanes = lanes as usize;
    let k4 = mm.steps_by_4;
    let mut s = String::from(if k4 {
        "    for (var k = kbeg / 4u; k < kend / 4u; k = k + 1u) {\n"
    } else {
        "    for (var k = kbeg; k < kend; k = k + 1u) {\n"
    });
    let sub_steps = if k4 { &XYZW[..] } else { &XYZW[..1] };
    for u in 0..sub_steps.len() {
        let (gathered, padded_row) = if k4 {
            (format!("k{u}"), format!("(k * 4u + {u}u)"))
        } else {
            ("k".to_string(), "k".to_string())
        };
        s += &gathered_k_lookup(mm, &gathered, &padded_row);
    }
    let b_factor = b_factor(mm, "k");
    if let Some(Quad {
        view,
        along: Along::K,
    }) = &mm.a4
    {
        for q in 0..rows / lanes {
            let _ = writeln!(
                s,
                "        let al{q} = {}{};",
                view.at(&format!("ar{q} + k")),
                a_factor(mm, q, "k")
            );
        }
    }
    if let Some(Quad {
        view,
        along: Along::K,
    }) = &mm.b4
    {
        for j in 0..cols {
            let _ = writeln!(
                s,
                "        let bv{j} = {}{b_factor};",
                view.at(&format!("bc{j} + k"))
            );
        }
    }
    for u in 0..sub_steps.len() {
        s += &sub_step_loads(mm, p, u, k4);
    }
    // Accumulator by accumulator, its sub-steps in k order: LLVM then loads each spilled
    // accumulator once per step, not once per sub-step (x · wᵀ of 4096 × 512 × 256 on lavapipe,
    // interleaved best-of-15 pairs: 45–55 ms against 35–81 ms sub-step by sub-step).
    for i in 0..rows {
        if mm.a_along() == Some(Along::K) {
            s += &broadcast(i, lanes, "");
        }
        for j in 0..cols {
            for (u, component) in sub_steps.iter().enumerate() {
                let a = match mm.a_along() {
                    Some(Along::K) => format!("av{i}.{component}"),
                    Some(Along::Out) => format!("av{}_{u}.{}", i / 4, XYZW[i % 4]),
                    None => format!("av{i}_{u}"),
                };
                let b = match mm.b_along() {
                    Some(Along::K) => format!("bv{j}.{component}"),
                    Some(Along::Out) => format!("bv{}_{u}.{}", j / 4, XYZW[j % 4]),
                    None => format!("bv{j}_{u}"),
                };
                let _ = writeln!(s, "        c{i}_{j} = fma({a}, {b}, c{i}_{j});");
            }
        }
    }
    s += "    }\n";
    s
}

const XYZW: [&str; 4] = ["x", "y", "z", "w"];

/// Row `i` of a subgroup-shared block, `av{i}{suffix}`: lane `i % lanes` loaded it as the
/// `i / lanes`-th of its `al{q}{suffix}` values.
fn broadcast(i: usize, lanes: usize, suffix: &str) -> String {
    format!(
        "        let av{i}{suffix} = subgroupBroadcast(al{}{suffix}, {}u);\n",
        i / lanes,
        i % lanes
    )
}

/// The loads of sub-step `u` (the `u`-th element of a vec4 step of k, else the step's one element)
/// for the operands not read along k: A's rows (as vec4s of rows, or one at a time) and their
/// broadcasts, and B's columns.
fn sub_step_loads(mm: &Blocked, p: Schedule, u: usize, k4: bool) -> String {
    let Schedule {
        rows, cols, lanes, ..
    } = p;
    // The sub-step's element of k: the source's token row `{gathered}t` where that operand is
    // gathered (`gathered_k_lookup`), else the padded index.
    let gathered = if k4 { format!("k{u}") } else { "k".to_string() };
    let ke = |source: &Option<Gathered>| match (k4, source) {
        (_, Some(_)) => format!("{gathered}t"),
        (true, None) => format!("(k * 4u + {u}u)"),
        (false, None) => "k".to_string(),
    };
    let (ake, bke) = (ke(&mm.a_k), ke(&mm.b_k));
    let lanes = lanes as usize;
    let b_factor = b_factor(mm, &gathered);
    let mut s = String::new();
    match &mm.a4 {
        Some(Quad {
            along: Along::K, ..
        }) => {}
        Some(Quad {
            view,
            along: Along::Out,
        }) => {
            for q in 0..rows / (4 * lanes) {
                let _ = writeln!(
                    s,
                    "        let al{q}_{u} = {}{};",
                    view.at(&format!("ar{q} + {ake} * {}u", mm.sak / 4)),
                    a_factor(mm, q, &gathered)
                );
            }
            for r in 0..rows / 4 {
                s += &broadcast(r, lanes, &format!("_{u}"));
            }
        }
        None => {
            for q in 0..rows / lanes {
                let _ = writeln!(
                    s,
                    "        let al{q}_{u} = {}{};",
                    mm.a.at(&format!("ar{q} + {ake} * {}u", mm.sak)),
                    a_factor(mm, q, &gathered)
                );
            }
            for i in 0..rows {
                s += &broadcast(i, lanes, &format!("_{u}"));
            }
        }
    }
    match &mm.b4 {
        Some(Quad {
            along: Along::K, ..
        }) => {}
        Some(Quad {
            view,
            along: Along::Out,
        }) => {
            for j in 0..cols / 4 {
                let _ = writeln!(
                    s,
                    "        let bv{j}_{u} = {}{b_factor};",
                    view.at(&format!("bc{j} + {bke} * {}u", mm.sbk / 4))
                );
            }
        }
        None => {
            for j in 0..cols {
                let _ = writeln!(
                    s,
                    "        let bv{j}_{u} = {}{b_factor};",
                    mm.b.at(&format!("bc{j} + {bke} * {}u", mm.sbk))
                );
            }
        }
    }
    s
}

/// Gathered loads are scaled by their row's factor: the gate weight (or 1), 0 on padding rows. This
/// is the factor of A's `q`-th load.
/// `gathered`: the contraction index's lookup (`gathered_k_lookup`).
fn a_factor(mm: &Blocked, q: usize, gathered: &str) -> String {
    match (&mm.a_rows, &mm.a_k) {
        (Some(_), _) => format!(" * g{q}w"),
        (None, Some(_)) => format!(" * {gathered}aw"),
        _ => String::new(),
    }
}

/// The factor of B's loads (see [`a_factor`]).
fn b_factor(mm: &Blocked, gathered: &str) -> String {
    if mm.b_k.is_some() {
        format!(" * {gathered}bw")
    } else {
        String::new()
    }
}

/// A gathered contraction index `v`: the lookup of padded row `row`'s token row `{v}t` and the
/// factors of the gathered operands, `{v}aw` and `{v}bw`. Both gathers of a weight gradient read one
/// routing table: one lookup per element of k.
fn gathered_k_lookup(mm: &Blocked, v: &str, row: &str) -> String {
    let mut s = String::new();
    if let Some(g) = mm.a_k.as_ref().or(mm.b_k.as_ref()) {
        s += &g.lookup(v, row, "        ");
        for (operand, gathered) in [("a", &mm.a_k), ("b", &mm.b_k)] {
            if let Some(g) = gathered {
                let _ = writeln!(s, "        let {v}{operand}w = {};", g.factor(v));
            }
        }
    }
    s
}

/// The accumulators written through `put`, each in-range output once.
fn store_block(mm: &Blocked, p: Schedule) -> String {
    let Schedule { rows, cols, .. } = p;
    let group = p.group();
    let mut s = String::new();
    // The epilogue (`put`, with its loads and elementwise code) appears once, in a loop over the block
    // spilled to a private array, instead of once per accumulator: inlined `rows × cols` times it
    // made fused kernels large enough to thrash the CPU's instruction cache.
    let block = rows * cols;
    let _ = writeln!(s, "    var tile: array<f32, {block}>;");
    for i in 0..rows {
        for j in 0..cols {
            let _ = writeln!(s, "    tile[{}] = c{i}_{j};", i * cols + j);
        }
    }
    let _ = writeln!(
        s,
        "    for (var t = 0u; t < {}; t = t + 1u) {{",
        loop_bound(block, block)
    );
    let col = match mm.b_along() {
        // Accumulator j is column j % 4 of the lane's (j / 4)-th vec4 of columns.
        Some(Along::Out) => format!("(n0 + (t % {cols}u) / 4u * {group}u) * 4u + t % 4u"),
        Some(Along::K) | None => format!("n0 + (t % {cols}u) * {group}u"),
    };
    let _ = writeln!(
        s,
        "        let row = m0 + t / {cols}u;\n        let col = {col};"
    );
    let _ = writeln!(s, "        if (row < {}u && col < {}u) {{\n            put(bi, row, col, tile[t]);\n        }}\n    }}", mm.m, mm.n);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(subgroup_size: u32) -> Target {
        Target {
            subgroup_size,
            ..Target::default()
        }
    }

    #[test]
    fn subgroup_blocks_are_multiples_of_the_subgroup_and_respect_the_row_alignment() {
        assert_eq!(
            Schedule::new(&target(8), (2048, 512), usize::MAX, None),
            Schedule {
                rows: 32,
                cols: 8,
                wg: 64,
                lanes: 8,
                small: false
            }
        );
        assert_eq!(
            Schedule::new(&target(8), (2048, 512), usize::MAX, Some(16)).rows,
            16
        );
        assert_eq!(
            Schedule::new(&target(8), (2048, 512), usize::MAX, Some(24)).rows,
            24
        );
        // No multiple of 8 divides 12: plain blocking with a row count that does.
        assert_eq!(
            Schedule::new(&target(8), (2048, 512), usize::MAX, Some(12)),
            Schedule {
                rows: 6,
                cols: 8,
                wg: 64,
                lanes: 1,
                small: false
            }
        );
        assert_eq!(
            Schedule::new(&target(0), (2048, 512), usize::MAX, None),
            Schedule {
                rows: 8,
                cols: 8,
                wg: 64,
                lanes: 1,
                small: false
            }
        );
        // Small outputs: small blocks; 8 lanes still make one whole subgroup.
        assert_eq!(
            Schedule::new(&target(8), (13, 512), usize::MAX, None).rows,
            16
        );
        assert_eq!(
            Schedule::new(&target(0), (5, 512), usize::MAX, None).rows,
            5
        );
        assert_eq!(
            Schedule::new(&target(8), (64, 3), usize::MAX, None),
            Schedule {
                rows: 32,
                cols: 1,
                wg: 8,
                lanes: 8,
                small: false
            }
        );
        assert_eq!(
            Schedule::new(&target(0), (64, 20), usize::MAX, None),
            Schedule {
                rows: 8,
                cols: 3,
                wg: 8,
                lanes: 1,
                small: false
            }
        );
    }

    /// The vec4 axes [`Blocked::vectorise`] picks for an `m × n` product over `k` with these
    /// strides of A (`sam`, `sak`) and B (`sbk`, `sbn`), both plain f32 buffers of 4096 elements.
    fn quads(
        lanes: u32,
        (m, n, k): (usize, usize, usize),
        strides: [usize; 4],
    ) -> (Option<Along>, Option<Along>) {
        quads_on(&target(lanes), (m, n, k), strides)
    }

    fn quads_on(
        target: &Target,
        (m, n, k): (usize, usize, usize),
        strides: [usize; 4],
    ) -> (Option<Along>, Option<Along>) {
        let mut g = Graph::new();
        let (x, w) = (
            g.input("x", crate::ir::TensorType::f32(&[4096])),
            g.input("w", crate::ir::TensorType::f32(&[4096])),
        );
        let mut binder = Binder::new(&g, target);
        let (a, b) = (binder.load(x), binder.load(w));
        let [sam, sak, sbk, sbn] = strides;
        let mut mm = Blocked {
            batch: 1,
            m,
            n,
            a: &a,
            b: &b,
            sam,
            sak,
            sbk,
            sbn,
            setup: String::new(),
            put: String::new(),
            a_rows: None,
            a_k: None,
            b_k: None,
            a4: None,
            b4: None,
            steps_by_4: false,
        };
        let scalar = Schedule::new(target, (m, n), m * n * k, None);
        mm.vectorise(&mut binder, target, scalar, KRange::Static(k), true);
        (mm.a_along(), mm.b_along())
    }

    #[test]
    fn compile_bound_products_get_half_height_blocks_and_scalar_loads() {
        let cpu = Target {
            small_product_macs: 1 << 20,
            ..target(8)
        };
        let at = |macs| {
            let p = Schedule::new(&cpu, (2048, 512), macs, None);
            (p.rows, p.small)
        };
        assert_eq!(at((1 << 20) - 1), (16, true));
        assert_eq!(at(1 << 20), (32, false));
        // 64 × 48 × 32 = 98,304 multiply-adds: x · wᵀ keeps scalar loads.
        assert_eq!(quads_on(&cpu, (64, 48, 32), [32, 1, 1, 32]), (None, None));
        let fast = Target {
            small_product_macs: 0,
            ..cpu
        };
        assert_eq!(
            quads_on(&fast, (64, 48, 32), [32, 1, 1, 32]),
            (Some(Along::K), Some(Along::K))
        );
    }

    #[test]
    fn vec4_axes_follow_the_operand_layouts() {
        use Along::{Out, K};
        // x · wᵀ (forward): both contiguous along k.
        assert_eq!(quads(8, (64, 48, 32), [32, 1, 1, 32]), (Some(K), Some(K)));
        // dy · w (input gradient): A along k, B along its columns.
        assert_eq!(quads(8, (64, 48, 32), [32, 1, 48, 1]), (Some(K), Some(Out)));
        // dyᵀ · x (weight gradient): A along its rows, B along its columns.
        assert_eq!(
            quads(8, (64, 48, 32), [1, 64, 48, 1]),
            (Some(Out), Some(Out))
        );
        // K not a multiple of 4: A's rows are not whole vec4s along k, B's columns still are.
        assert_eq!(quads(8, (64, 48, 30), [30, 1, 48, 1]), (None, Some(Out)));
        // Without fixed subgroups (portable target), scalar loads.
        assert_eq!(quads(0, (64, 48, 32), [32, 1, 1, 32]), (None, None));
    }

    #[test]
    fn strided_matmuls_validate_with_and_without_subgroups() {
        // X·Xᵀ of 3 stacked 5 × 70 matrices (Muon's Gram matrix): B is X read transposed.
        let mm = StridedMatmul {
            batch: 3,
            m: 5,
            n: 5,
            k: 70,
            a: Strided {
                buffer: "x",
                batch: 350,
                rows: 70,
                cols: 1,
            },
            b: Strided {
                buffer: "x",
                batch: 350,
                rows: 1,
                cols: 70,
            },
            put: "    y[(bi * 5u + row) * 5u + col] = acc;",
        };
        for lanes in [0, 8] {
            let (body, groups) = mm.wgsl(&target(lanes));
            let src = format!("const GX: u32 = {groups}u;\nconst GY: u32 = 1u;\n@group(0) @binding(0) var<storage, read> x: array<f32>;\n@group(0) @binding(1) var<storage, read_write> y: array<f32>;\n{body}");
            crate::emit::frame::validate_wgsl(&src)
                .unwrap_or_else(|e| panic!("{lanes} lanes: {e}"));
            // One workgroup per matrix: 5 rows and 5 columns fit one block.
            assert_eq!(groups, 3, "{src}");
        }
    }
}
