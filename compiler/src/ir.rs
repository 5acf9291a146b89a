//! The Graph IR: a dataflow graph of tensor ops with static shapes and dtypes, held in petgraph.
//!
//! Shapes are static so that every kernel is specialised and compiled once per build. The op set is
//! small and closed: elementwise, last-axis reductions, layout, matmul, a few NN composites whose
//! kernels and gradients are worth writing once (softmax, RoPE, cross-entropy), and the MoE composites
//! (top-k, routing, gather, grouped matmul, combine). Nodes are created only through [`Graph`]'s
//! builder methods, which infer the output type and reject ill-typed graphs, so a pass that holds a
//! `Graph` may assume it is well typed.
//!
//! Edges go from producer to consumer and carry the argument slot, so `inputs(n)` is ordered.

use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::{EdgeRef, IntoEdgeReferences};
use petgraph::Direction;
use serde::{Deserialize, Serialize};
use std::fmt;

pub mod lstm;

pub type NodeId = NodeIndex<u32>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    F32,
    U32,
    /// Half-precision storage of an f32 value (`precision = f16`): kernels widen it to f32 on load
    /// and round to nearest on store, so every computation stays in f32. Only
    /// [`crate::precision::mark_f16`] creates it; builders and [`infer`] see f32.
    F16,
}

impl DType {
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F16 => 2,
            DType::F32 | DType::U32 => 4,
        }
    }
    pub fn wgsl(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::U32 => "u32",
            DType::F16 => "f16",
        }
    }
    /// A float value, stored as f32 or f16.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorType {
    pub shape: Vec<usize>,
    pub dtype: DType,
}

impl TensorType {
    pub fn f32(shape: &[usize]) -> Self {
        TensorType {
            shape: shape.to_vec(),
            dtype: DType::F32,
        }
    }
    pub fn u32(shape: &[usize]) -> Self {
        TensorType {
            shape: shape.to_vec(),
            dtype: DType::U32,
        }
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn size_bytes(&self) -> usize {
        self.numel() * self.dtype.size_bytes()
    }
    /// Bytes of a storage buffer holding it: WebGPU binds whole 4-byte words and no empty buffers,
    /// so an f16 tensor of odd length gets a padding half.
    pub fn buffer_bytes(&self) -> u64 {
        (self.size_bytes() as u64).next_multiple_of(4).max(4)
    }
    /// Size of the last axis (1 for a scalar).
    pub fn last(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }
    /// Number of rows when viewed as `[numel / last, last]`.
    pub fn rows(&self) -> usize {
        self.numel() / self.last().max(1)
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dims: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        write!(f, "{}[{}]", self.dtype.wgsl(), dims.join(", "))
    }
}

/// How a parameter is initialised. Deterministic from the training seed and the parameter's name.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Init {
    /// N(0, std²).
    Normal { std: f32 },
    /// U(−bound, bound): PyTorch's `nn.Linear`/`nn.LSTM` default, bound = 1/√fan_in.
    Uniform { bound: f32 },
    /// All elements equal (norm weights = 1, biases = 0).
    Constant(f32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum UnaryOp {
    Neg,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Recip,
    Square,
    Tanh,
    Relu,
    /// x·σ(x)
    Silu,
    /// tanh approximation (GPT-2 / HF `gelu_new`).
    Gelu,
    Sigmoid,
    /// ln(1 + eˣ), computed stably.
    Softplus,
    /// 1 where x > 0, else 0: the derivative of `Relu`.
    Step,
    /// d/dx of `Gelu` (the same tanh approximation).
    GeluGrad,
    /// Φ(x), the standard normal CDF: the smooth load estimator of Shazeer et al. (2017).
    NormalCdf,
    /// φ(x) = e^(−x²/2)/√(2π), the standard normal density: the derivative of `NormalCdf`.
    NormalPdf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    /// 1 where x ≥ y, else 0: routes the gradient of `Max` and of `Reduce(Max)`.
    Ge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReduceOp {
    Sum,
    Mean,
    Max,
}

/// Layout of the u32 routing table produced by [`Op::MoeRoute`]. Every MoE composite that reads the
/// table uses these offsets, so the layout lives in one place.
///
/// Dropless routing always places exactly `tokens * k` token slots, but grouped matmul wants each tile
/// of `tile` rows to belong to one expert, so every expert's segment is padded to a multiple of `tile`.
/// The padded row count is bounded statically by `min(tokens * k, experts * capacity) + experts *
/// (tile - 1)`, which is what the grouped matmul is dispatched over; rows past an expert's real count
/// are padding (`row_slot = NONE`).
///
/// `capacity` is the most token slots one expert keeps (`capacity = factor(F)`: ⌈F·T·k/E⌉); slots
/// beyond it are dropped (`slot_row = NONE`), and so are slots whose expert index is `NONE` (the
/// auction's unassigned slots, expert choice's unchosen pairs). `capacity >= tokens * k` is dropless.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RouteLayout {
    pub tokens: usize,
    pub k: usize,
    pub experts: usize,
    pub tile: usize,
    pub capacity: usize,
}

impl RouteLayout {
    /// Marks a padding row in `row_slot`, an unassigned slot (dropped token) in `slot_row`, and an
    /// unassigned slot in an index tensor `idx[T, k]` (every MoE op reading `idx` skips it).
    pub const NONE: u32 = u32::MAX;
    /// A layout whose experts keep every slot routed to them.
    pub fn dropless(tokens: usize, k: usize, experts: usize, tile: usize) -> Self {
        RouteLayout {
            tokens,
            k,
            experts,
            tile,
            capacity: tokens * k,
        }
    }
    /// Whether some slot can be left without a row (capacity below `tokens * k`).
    pub fn drops(&self) -> bool {
        self.capacity < self.tokens * self.k
    }
    /// Upper bound of padded rows: the static row count of gathered activations.
    pub fn rows(&self) -> usize {
        (self.tokens * self.k).min(self.experts.saturating_mul(self.capacity))
            + self.experts * (self.tile - 1)
    }
    /// `counts[e]`: token slots routed to (and kept by) expert `e`.
    pub fn counts_at(&self) -> usize {
        0
    }
    /// `offsets[e]`: first padded row of expert `e`; `offsets[experts]` = used padded rows.
    pub fn offsets_at(&self) -> usize {
        self.experts
    }
    /// `slot_row[t * k + j]`: padded row of token `t`'s `j`-th choice.
    pub fn slot_row_at(&self) -> usize {
        self.offsets_at() + self.experts + 1
    }
    /// `row_slot[r]`: token slot held by padded row `r`, or `NONE`.
    pub fn row_slot_at(&self) -> usize {
        self.slot_row_at() + self.tokens * self.k
    }
    /// `row_expert[r]`: the expert that owns padded row `r` (valid for every row below `offsets[experts]`).
    pub fn row_expert_at(&self) -> usize {
        self.row_slot_at() + self.rows()
    }
    /// Words in the whole route table (its `u32` tensor's length).
    pub fn table_len(&self) -> usize {
        self.row_expert_at() + self.rows()
    }
}

/// What the host writes into an [`Op::Input`], so the runtime never decodes it from the name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InputRole {
    /// The batch the caller feeds each run: token ids, features, targets (and the operands of
    /// hand-built test graphs).
    Data,
    /// Flat indices of the token rows whose logits a [`crate::lower::Head::Logits`] graph computes
    /// ([`crate::lower::LOGIT_ROWS`]), chosen by the caller (generation).
    LogitRows,
    /// The adjoint of the loss ([`crate::autodiff::SEED`]): the trainer writes `1 / accumulate` once.
    LossSeed,
    /// Standard-normal noise of a noisy top-k router (`noise.N`, `noise.N.group`): drawn afresh for
    /// each training micro-step; zero in evaluation.
    Noise,
    /// Switch-style multiplicative router jitter (`jitter.N`): U(1 − ε, 1 + ε) for each training
    /// micro-step; one in evaluation.
    Jitter,
    /// Router state the training step updates (`router_state.N.bias`, `router_state.N.prices`): kept
    /// across steps and checkpointed; each step copies the graph's output `{name}.next` into it, and
    /// evaluation reads the training buffer.
    RouterState,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// A value the host writes before a run. `name` is the key the runtime binds it by (and, for
    /// router state, the checkpoint key); `role` says what the host writes there.
    Input {
        name: String,
        role: InputRole,
    },
    /// A trainable parameter; `name` is its checkpoint name (HF layout, docs/language.md "What a run writes").
    Param {
        name: String,
        init: Init,
    },
    /// Elementwise `x * mul + add` (scales, epsilons, `1 - x`).
    Affine {
        mul: f32,
        add: f32,
    },
    Unary(UnaryOp),
    /// Elementwise with numpy broadcasting (trailing axes aligned, size-1 axes stretched).
    Binary(BinaryOp),
    /// Reduce the last axis, keeping it with size 1 (so the result broadcasts back).
    Reduce(ReduceOp),
    /// Same elements, new shape. Free: no kernel.
    Reshape {
        shape: Vec<usize>,
    },
    /// Materialised axis permutation: `out.shape[i] = in.shape[perm[i]]`.
    Permute {
        perm: Vec<usize>,
    },
    /// `A[..., M, K] · B` where B is `[..., K, N]`, or `[..., N, K]` read transposed when `trans_b`
    /// (PyTorch `[out, in]` weights). B's batch axes equal A's, or B has none (shared weight).
    MatMul {
        trans_b: bool,
    },
    /// Rows of `table[V, D]` picked by u32 `ids[...]`: out `[..., D]`.
    Embedding,
    /// Rotary embedding, HF "rotate_half" convention, on `x[B, T, H, hd]`; position = index along T.
    Rope {
        theta: f32,
    },
    /// Softmax over the last axis. With `causal`, row r of the trailing `[R, S]` matrix attends to
    /// columns `c <= r % S`: plain causal attention when R == S, and grouped-query attention when the
    /// heads sharing a KV head are stacked along rows (R = group·S).
    Softmax {
        causal: bool,
    },
    /// Mean token cross-entropy of `logits[N, V]` against u32 `targets[N]`: a `[1]` tensor.
    CrossEntropy,
    /// The LM head fused with its loss: [`Op::CrossEntropy`] of the logits `h · wᵀ` for `h[N, D]`,
    /// `w[V, D]` (PyTorch `[out, in]`, or the tied embedding table) and u32 `targets[N]`: `[1]`.
    /// The `[N, V]` logits are never a value of the graph: `head::legalize` runs this op and its
    /// adjoints chunk by chunk over the rows, so only a `[rows, V]` chunk of them ever exists.
    LinearCrossEntropy,
    /// Rows `start..start + len` of `x[R, ...]` (f32 or u32): a chunk of tokens (`head::legalize`).
    /// Not differentiated (it only appears after autodiff).
    SliceRows {
        start: usize,
        len: usize,
    },
    /// `a[Ra, ...]` with `b[Rb, ...]` appended below it: `[Ra + Rb, ...]` (f32), the chunks of a
    /// gradient put back together (`head::legalize`). Not differentiated.
    ConcatRows,
    /// Indices of the `k` largest entries of each row of `scores[T, E]` (u32 `[T, k]`), in descending
    /// score order; ties go to the lower index. Not differentiable.
    TopK {
        k: usize,
    },
    /// `out[t, j] = x[t, idx[t, j]]` for `x[T, E]` and u32 `idx[T, k]`; 0 where `idx` is `NONE`
    /// (an unassigned slot, see [`RouteLayout::NONE`]).
    GatherCols,
    /// Selection mask: f32 `[T, experts]` with 1 where `e` is among `idx[t, :]` (`NONE` entries mark
    /// nothing). Not differentiable.
    TopKMask {
        experts: usize,
    },
    /// Routing table (see [`RouteLayout`]) from u32 `idx[T, k]` (`NONE` entries stay unassigned).
    /// With a second operand `prio[T, k]` (f32) an expert over capacity keeps its `capacity` slots of
    /// highest priority (ties to the lower slot); without it, its first `capacity` slots in slot order
    /// (token order). Not differentiable.
    MoeRoute {
        layout: RouteLayout,
    },
    /// Columns `start..start + len` of a u32 index tensor `[R, C]` (a slice of a top-k or auction
    /// result). Not differentiable (indices).
    SliceCols {
        start: usize,
        len: usize,
    },
    /// `load[e]` = token slots expert `e` keeps, as f32 `[E]`, read from a routing table (after
    /// capacity): the per-expert load that metrics and the `bias` update use.
    RouteLoad {
        layout: RouteLayout,
    },
    /// Expert choice (Zhou et al. 2022): from `scores[T, E]`, each expert takes its `capacity` tokens
    /// of highest score (ties to the lower token). Out: u32 `[T, E]` with `e` at `[t, e]` when expert
    /// `e` took token `t`, else `NONE`: a token-slot index tensor with k = E. Not differentiable.
    ExpertChoice {
        capacity: usize,
    },
    /// Sinkhorn balancing (Megatron-LM) of `logits[T, E]` with `iters` fixed iterations on
    /// `c = exp(logits − rowmax)` (row scalings cancel in the normalisation): `d1 = 1`, then
    /// `d0[t] = (1/T) / (Σ_e d1[e]·c[t,e] + 1e-8)`, `d1[e] = (1/E) / (Σ_t d0[t]·c[t,e] + 1e-8)`;
    /// out `d1[e]·c[t,e]·d0[t]`. Used for selection only, so not differentiated (a stop-gradient).
    Sinkhorn {
        iters: usize,
    },
    /// The auction router (docs/language.md `gate = auction`): values `v[T, E]` and start prices `[E]` →
    /// u32 `[T, k + E]`. Row `t` holds, in its first `k` entries, the experts token `t` won in
    /// ascending order followed by `NONE`; the last `E` entries are the auction's working state (the
    /// f32 bits of `t`'s standing bid per expert) and carry no meaning for consumers. See
    /// `interp::auction` for the exact rounds. Not differentiable.
    Auction {
        rounds: usize,
        epsilon: f32,
        budget: f32,
        capacity: usize,
        k: usize,
    },
    /// Gather token rows into expert-sorted padded rows: `x[T, D]`, `route` → `[rows, D]`, zero padding.
    MoeGather {
        layout: RouteLayout,
    },
    /// Per-expert matmul on padded rows: `xp[rows, K]`, `w[E, N, K]` (PyTorch `[out, in]` per expert),
    /// `route` → `[rows, N]`; row r uses expert `row_expert[r]`.
    GroupedMatMul {
        layout: RouteLayout,
    },
    /// Weighted scatter back to tokens: `yp[rows, D]`, `weights[T, k]`, `route` →
    /// `y[t] = Σ_j weights[t, j] · yp[slot_row[t·k + j]]` (skipping unassigned slots).
    MoeCombine {
        layout: RouteLayout,
    },

    // Gradient ops: produced by `autodiff`, each the adjoint of one forward op above.
    /// Sum `x` down to `shape`, the inverse of broadcasting (`shape` broadcasts to x's shape).
    SumTo {
        shape: Vec<usize>,
    },
    /// Broadcast `x` up to `shape` (numpy rules): the adjoint of `Reduce` and of `SumTo`.
    BroadcastTo {
        shape: Vec<usize>,
    },
    /// Adjoint of `Embedding`: u32 `ids[...]`, `g[..., D]` → `[vocab, D]` with rows scatter-added.
    EmbeddingGrad {
        vocab: usize,
    },
    /// Adjoint of `Rope`: the inverse rotation.
    RopeGrad {
        theta: f32,
    },
    /// Adjoint of `CrossEntropy`: `logits[N, V]`, u32 `targets[N]`, `g[1]` →
    /// `(softmax(logits) − onehot(targets)) · g / N`.
    CrossEntropyGrad,
    /// Adjoint of `LinearCrossEntropy` for `h`: `h, w, targets, g[1]` → `[N, D]` = `G · w`, where
    /// `G = (softmax(h · wᵀ) − onehot(targets)) · g / N` is the logits' adjoint.
    LinearCrossEntropyGradH,
    /// Adjoint of `LinearCrossEntropy` for `w`: `h, w, targets, g[1]` → `[V, D]` = `Gᵀ · h`.
    LinearCrossEntropyGradW,
    /// Adjoint of `GatherCols`: `g[T, k]`, u32 `idx[T, k]` → `[T, cols]`, zero where not gathered
    /// (`NONE` entries scatter nothing). Also a forward op: the dense `[T, E]` gate matrix of the
    /// selected weights (Importance, hierarchical gates); its adjoint is `GatherCols`.
    ScatterCols {
        cols: usize,
    },
    /// Adjoint of `MoeGather`: `gp[rows, D]`, `route` → `[T, D]`, `dx[t] = Σ_j gp[slot_row[t·k + j]]`.
    MoeGatherGrad {
        layout: RouteLayout,
    },
    /// Adjoint of `GroupedMatMul` for x: `g[rows, N]`, `w[E, N, K]`, `route` → `[rows, K]` = g · w[e].
    GroupedMatMulGradX {
        layout: RouteLayout,
    },
    /// Adjoint of `GroupedMatMul` for w: `g[rows, N]`, `x[rows, K]`, `route` → `[E, N, K]`,
    /// `dw[e] = Σ_{rows r of e} g[r]ᵀ · x[r]`.
    GroupedMatMulGradW {
        layout: RouteLayout,
    },
    /// Adjoint of `MoeCombine` for the rows: `dy[T, D]`, `weights[T, k]`, `route` → `[rows, D]`,
    /// `dyp[slot_row[t·k + j]] = weights[t, j] · dy[t]`, zero on padding rows.
    MoeCombineGradRows {
        layout: RouteLayout,
    },
    /// Adjoint of `MoeCombine` for the weights: `dy[T, D]`, `yp[rows, D]`, `route` → `[T, k]`,
    /// `dw[t, j] = dy[t] · yp[slot_row[t·k + j]]` (0 for an unassigned slot).
    MoeCombineGradWeights {
        layout: RouteLayout,
    },

    // The recurrence (the `lstm` family): see [`crate::ir::lstm`] for the record layout.
    /// One direction of a PyTorch `nn.LSTM` layer over whole sequences: `xg[B, T, 4H]` (the input
    /// projection of every step, `x·W_ihᵀ + b_ih + b_hh`, gates in PyTorch's (i, f, g, o) order) and
    /// `w_hh[4H, H]` → the record `[B, T, 6H]` (h, c and the activated gates of every step, what
    /// backpropagation through time reads). `reverse` runs from `t = T−1` down to 0. `h₀ = c₀ = 0`.
    /// The record is read only by `LstmHidden`; the pair is differentiated as one unit.
    LstmScan {
        reverse: bool,
    },
    /// The hidden states of one or two records (forward, then reverse: PyTorch's bidirectional
    /// layout) side by side: `[B, T, n·H]`.
    LstmHidden,
    /// Backpropagation through time of `LstmHidden ∘ LstmScan` for one direction: `g[B, T, W]` (the
    /// adjoint of the `LstmHidden` output, this direction's h at columns `col..col + H`), the record,
    /// `w_hh[4H, H]` → the adjoint of the scan's `xg`, `[B, T, 4H]` (the pre-activation gates').
    LstmScanGrad {
        reverse: bool,
        col: usize,
    },
    /// The adjoint of `w_hh`: `dgates[B, T, 4H]` (from `LstmScanGrad`), the record →
    /// `Σ_{b,t} dgates[b,t]ᵀ · h_prev[b,t]` `[4H, H]`, `h_prev` the state before step t (zero at the
    /// first step of the direction).
    LstmScanGradW {
        reverse: bool,
    },
    /// PyTorch's `h_n` of a sequence of outputs `x[B, T, dirs·H]`: the forward columns at the last
    /// step and, when `dirs = 2`, the reverse columns at the first step (where the reverse direction
    /// ends) → `[B, dirs·H]`.
    LstmLast {
        dirs: usize,
    },
    /// Adjoint of `LstmLast`: `g[B, dirs·H]` → `[B, T, dirs·H]`, zero off the steps `LstmLast` read.
    LstmLastGrad {
        dirs: usize,
        steps: usize,
    },
}

impl Op {
    /// Short name for dumps and kernel names.
    pub fn mnemonic(&self) -> String {
        match self {
            Op::Input { .. } => "input".into(),
            Op::Param { .. } => "param".into(),
            Op::Affine { .. } => "affine".into(),
            Op::Unary(u) => format!("{u:?}").to_lowercase(),
            Op::Binary(b) => format!("{b:?}").to_lowercase(),
            Op::Reduce(r) => format!("reduce_{}", format!("{r:?}").to_lowercase()),
            Op::Reshape { .. } => "reshape".into(),
            Op::Permute { .. } => "permute".into(),
            Op::MatMul { .. } => "matmul".into(),
            Op::Embedding => "embedding".into(),
            Op::Rope { .. } => "rope".into(),
            Op::Softmax { .. } => "softmax".into(),
            Op::CrossEntropy => "cross_entropy".into(),
            Op::LinearCrossEntropy => "linear_cross_entropy".into(),
            Op::SliceRows { .. } => "slice_rows".into(),
            Op::ConcatRows => "concat_rows".into(),
            Op::TopK { .. } => "topk".into(),
            Op::GatherCols => "gather_cols".into(),
            Op::TopKMask { .. } => "topk_mask".into(),
            Op::MoeRoute { .. } => "moe_route".into(),
            Op::SliceCols { .. } => "slice_cols".into(),
            Op::RouteLoad { .. } => "route_load".into(),
            Op::ExpertChoice { .. } => "expert_choice".into(),
            Op::Sinkhorn { .. } => "sinkhorn".into(),
            Op::Auction { .. } => "auction".into(),
            Op::MoeGather { .. } => "moe_gather".into(),
            Op::GroupedMatMul { .. } => "grouped_matmul".into(),
            Op::MoeCombine { .. } => "moe_combine".into(),
            Op::SumTo { .. } => "sum_to".into(),
            Op::BroadcastTo { .. } => "broadcast_to".into(),
            Op::EmbeddingGrad { .. } => "embedding_grad".into(),
            Op::RopeGrad { .. } => "rope_grad".into(),
            Op::CrossEntropyGrad => "cross_entropy_grad".into(),
            Op::LinearCrossEntropyGradH => "linear_cross_entropy_grad_h".into(),
            Op::LinearCrossEntropyGradW => "linear_cross_entropy_grad_w".into(),
            Op::ScatterCols { .. } => "scatter_cols".into(),
            Op::MoeGatherGrad { .. } => "moe_gather_grad".into(),
            Op::GroupedMatMulGradX { .. } => "grouped_matmul_grad_x".into(),
            Op::GroupedMatMulGradW { .. } => "grouped_matmul_grad_w".into(),
            Op::MoeCombineGradRows { .. } => "moe_combine_grad_rows".into(),
            Op::MoeCombineGradWeights { .. } => "moe_combine_grad_weights".into(),
            Op::LstmScan { .. } => "lstm_scan".into(),
            Op::LstmHidden => "lstm_hidden".into(),
            Op::LstmScanGrad { .. } => "lstm_scan_grad".into(),
            Op::LstmScanGradW { .. } => "lstm_scan_grad_w".into(),
            Op::LstmLast { .. } => "lstm_last".into(),
            Op::LstmLastGrad { .. } => "lstm_last_grad".into(),
        }
    }

    pub fn is_elementwise(&self) -> bool {
        matches!(self, Op::Affine { .. } | Op::Unary(_) | Op::Binary(_))
    }

    /// Ops that produce no kernel of their own.
    pub fn is_free(&self) -> bool {
        matches!(
            self,
            Op::Input { .. } | Op::Param { .. } | Op::Reshape { .. }
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub op: Op,
    pub ty: TensorType,
    /// Human label for dumps and kernel names (`blocks.0.attn.q`).
    pub label: String,
}

/// A type error while building a graph: always a bug in a pass, never the user's fault, but reported
/// as a value so a pass can attach context.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("ill-typed `{op}` ({label}): {message}")]
pub struct IrError {
    pub op: String,
    pub label: String,
    pub message: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Graph {
    pub g: StableDiGraph<Node, usize, u32>,
    /// Named results (`logits`, `loss`, `ce`, `aux.3`, ...), in insertion order.
    pub outputs: Vec<(String, NodeId)>,
}

impl Graph {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.g[id]
    }

    pub fn ty(&self, id: NodeId) -> &TensorType {
        &self.g[id].ty
    }

    /// Arguments of `id`, in slot order.
    pub fn inputs(&self, id: NodeId) -> Vec<NodeId> {
        let mut edges: Vec<(usize, NodeId)> = self
            .g
            .edges_directed(id, Direction::Incoming)
            .map(|e| (*e.weight(), e.source()))
            .collect();
        edges.sort_by_key(|(slot, _)| *slot);
        edges.into_iter().map(|(_, src)| src).collect()
    }

    /// Consumers of `id` (one entry per use).
    pub fn users(&self, id: NodeId) -> Vec<NodeId> {
        let mut users: Vec<NodeId> = self
            .g
            .edges_directed(id, Direction::Outgoing)
            .map(|e| e.target())
            .collect();
        users.sort();
        users
    }

    /// Node ids in a topological order: creation order, which is topological because builders only
    /// consume existing nodes, and which keeps dumps and kernel numbering readable and stable. A pass
    /// that rewires edges backwards falls back to a general topological sort.
    pub fn topo_order(&self) -> Vec<NodeId> {
        let mut order: Vec<NodeId> = self.g.node_indices().collect();
        order.sort();
        if self.g.edge_references().all(|e| e.source() < e.target()) {
            order
        } else {
            petgraph::algo::toposort(&self.g, None).expect("Graph IR is acyclic by construction")
        }
    }

    pub fn output(&self, name: &str) -> Option<NodeId> {
        self.outputs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, id)| *id)
    }

    pub fn set_output(&mut self, name: &str, id: NodeId) {
        self.outputs.retain(|(n, _)| n != name);
        self.outputs.push((name.to_string(), id));
    }

    /// Adds a node after inferring its type; the single entry point every builder goes through.
    pub fn add(
        &mut self,
        op: Op,
        args: &[NodeId],
        label: impl Into<String>,
    ) -> Result<NodeId, IrError> {
        let label = label.into();
        let arg_types: Vec<&TensorType> = args.iter().map(|&a| &self.g[a].ty).collect();
        let ty = infer(&op, &arg_types).map_err(|message| IrError {
            op: op.mnemonic(),
            label: label.clone(),
            message,
        })?;
        let id = self.g.add_node(Node { op, ty, label });
        for (slot, &arg) in args.iter().enumerate() {
            self.g.add_edge(arg, id, slot);
        }
        Ok(id)
    }

    /// A [`InputRole::Data`] input. Leaves carry their type explicitly.
    pub fn input(&mut self, name: &str, ty: TensorType) -> NodeId {
        self.input_as(name, InputRole::Data, ty)
    }

    /// An input the host fills as `role` says.
    pub fn input_as(&mut self, name: &str, role: InputRole, ty: TensorType) -> NodeId {
        self.g.add_node(Node {
            op: Op::Input {
                name: name.into(),
                role,
            },
            ty,
            label: name.into(),
        })
    }

    pub fn param(&mut self, name: &str, shape: &[usize], init: Init) -> NodeId {
        self.g.add_node(Node {
            op: Op::Param {
                name: name.into(),
                init,
            },
            ty: TensorType::f32(shape),
            label: name.into(),
        })
    }

    /// Parameters in creation order with their names and types.
    pub fn params(&self) -> Vec<(NodeId, String, TensorType)> {
        let mut ps: Vec<_> = self
            .g
            .node_indices()
            .filter_map(|id| match &self.g[id].op {
                Op::Param { name, .. } => Some((id, name.clone(), self.g[id].ty.clone())),
                _ => None,
            })
            .collect();
        ps.sort_by_key(|(id, _, _)| *id);
        ps
    }

    /// Inputs in creation order with their names and types.
    pub fn data_inputs(&self) -> Vec<(NodeId, String, TensorType)> {
        self.inputs_with_roles()
            .into_iter()
            .map(|(id, name, _, ty)| (id, name, ty))
            .collect()
    }

    /// Inputs in creation order with their names, roles and types.
    pub fn inputs_with_roles(&self) -> Vec<(NodeId, String, InputRole, TensorType)> {
        let mut xs: Vec<_> = self
            .g
            .node_indices()
            .filter_map(|id| match &self.g[id].op {
                Op::Input { name, role } => Some((id, name.clone(), *role, self.g[id].ty.clone())),
                _ => None,
            })
            .collect();
        xs.sort_by_key(|(id, _, _, _)| *id);
        xs
    }

    /// Readable dump, one node per line in topological order: the `--emit ir` format and the IR
    /// snapshots. Stable across runs (node ids are dense creation indices).
    pub fn dump(&self) -> String {
        let mut out = String::new();
        for id in self.topo_order() {
            let n = &self.g[id];
            let args: Vec<String> = self
                .inputs(id)
                .iter()
                .map(|a| format!("%{}", a.index()))
                .collect();
            let attrs = match &n.op {
                Op::Input { name, .. } => format!(" \"{name}\""),
                Op::Param { name, init } => format!(" \"{name}\" {init:?}"),
                Op::Affine { mul, add } => format!(" mul={mul} add={add}"),
                Op::Reshape { shape } => format!(" {shape:?}"),
                Op::Permute { perm } => format!(" {perm:?}"),
                Op::MatMul { trans_b } => {
                    if *trans_b {
                        " trans_b".into()
                    } else {
                        String::new()
                    }
                }
                Op::Rope { theta } => format!(" theta={theta}"),
                Op::Softmax { causal } => {
                    if *causal {
                        " causal".into()
                    } else {
                        String::new()
                    }
                }
                Op::TopK { k } => format!(" k={k}"),
                Op::TopKMask { experts } => format!(" experts={experts}"),
                Op::SumTo { shape } | Op::BroadcastTo { shape } => format!(" {shape:?}"),
                Op::EmbeddingGrad { vocab } => format!(" vocab={vocab}"),
                Op::RopeGrad { theta } => format!(" theta={theta}"),
                Op::ScatterCols { cols } => format!(" cols={cols}"),
                Op::SliceCols { start, len } | Op::SliceRows { start, len } => {
                    format!(" start={start} len={len}")
                }
                Op::ExpertChoice { capacity } => format!(" capacity={capacity}"),
                Op::Sinkhorn { iters } => format!(" iters={iters}"),
                Op::LstmScan { reverse } | Op::LstmScanGradW { reverse } if *reverse => {
                    " reverse".into()
                }
                Op::LstmScanGrad { reverse, col } => {
                    format!("{} col={col}", if *reverse { " reverse" } else { "" })
                }
                Op::LstmLast { dirs } => format!(" dirs={dirs}"),
                Op::LstmLastGrad { dirs, steps } => format!(" dirs={dirs} steps={steps}"),
                Op::Auction {
                    rounds,
                    epsilon,
                    budget,
                    capacity,
                    k,
                } => {
                    format!(" rounds={rounds} epsilon={epsilon} budget={budget} capacity={capacity} k={k}")
                }
                Op::MoeRoute { layout } if layout.drops() => {
                    format!(
                        " tokens={} k={} experts={} tile={} capacity={}",
                        layout.tokens, layout.k, layout.experts, layout.tile, layout.capacity
                    )
                }
                Op::MoeRoute { layout }
                | Op::RouteLoad { layout }
                | Op::MoeGather { layout }
                | Op::GroupedMatMul { layout }
                | Op::MoeCombine { layout }
                | Op::MoeGatherGrad { layout }
                | Op::GroupedMatMulGradX { layout }
                | Op::GroupedMatMulGradW { layout }
                | Op::MoeCombineGradRows { layout }
                | Op::MoeCombineGradWeights { layout } => {
                    format!(
                        " tokens={} k={} experts={} tile={}",
                        layout.tokens, layout.k, layout.experts, layout.tile
                    )
                }
                Op::Unary(_)
                | Op::Binary(_)
                | Op::Reduce(_)
                | Op::Embedding
                | Op::CrossEntropy
                | Op::LinearCrossEntropy
                | Op::ConcatRows
                | Op::GatherCols
                | Op::CrossEntropyGrad
                | Op::LinearCrossEntropyGradH
                | Op::LinearCrossEntropyGradW
                | Op::LstmScan { .. }
                | Op::LstmHidden
                | Op::LstmScanGradW { .. } => String::new(),
            };
            out += &format!(
                "%{} = {}{}({}) : {}  # {}\n",
                id.index(),
                n.op.mnemonic(),
                attrs,
                args.join(", "),
                n.ty,
                n.label
            );
        }
        for (name, id) in &self.outputs {
            out += &format!("output {name} = %{}\n", id.index());
        }
        out
    }
}

impl Graph {
    /// Graphviz rendering (`graph.dot` of `moec build`): one box per node with op, type and label;
    /// parameters and inputs are drawn as ellipses so the dataflow reads top to bottom.
    pub fn dot(&self) -> String {
        let escape = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
        let mut out = String::from("digraph moec {\n  rankdir=TB;\n  node [shape=box, fontname=\"monospace\", fontsize=10];\n");
        for id in self.topo_order() {
            let n = &self.g[id];
            let shape = if matches!(n.op, Op::Param { .. } | Op::Input { .. }) {
                ", shape=ellipse"
            } else {
                ""
            };
            out += &format!(
                "  n{} [label=\"%{} {}\\n{}\\n{}\"{}];\n",
                id.index(),
                id.index(),
                escape(&n.op.mnemonic()),
                n.ty,
                escape(&n.label),
                shape
            );
        }
        for e in self.g.edge_references() {
            out += &format!("  n{} -> n{};\n", e.source().index(), e.target().index());
        }
        for (name, id) in &self.outputs {
            out += &format!(
                "  out_{0} [label=\"{0}\", shape=doublecircle];\n  n{1} -> out_{0};\n",
                escape(name).replace('.', "_"),
                id.index()
            );
        }
        out + "}\n"
    }
}

/// Numpy broadcasting of two shapes.
pub fn broadcast_shapes(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let n = a.len().max(b.len());
    let mut out = vec![0; n];
    for i in 0..n {
        let da = if i + a.len() >= n {
            a[i + a.len() - n]
        } else {
            1
        };
        let db = if i + b.len() >= n {
            b[i + b.len() - n]
        } else {
            1
        };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return None,
        };
    }
    Some(out)
}

fn expect_args(args: &[&TensorType], n: usize) -> Result<(), String> {
    if args.len() == n {
        Ok(())
    } else {
        Err(format!("expected {n} arguments, got {}", args.len()))
    }
}

fn expect_dtype(t: &TensorType, dtype: DType, what: &str) -> Result<(), String> {
    if t.dtype == dtype {
        Ok(())
    } else {
        Err(format!("{what} must be {}, got {t}", dtype.wgsl()))
    }
}

/// Output type of `op` applied to arguments of the given types. Every op names its rule here (the
/// rules follow, forward ops first, then the gradient ops, the LSTM ones in [`lstm`]), so adding an
/// op makes the compiler ask for its rule.
pub fn infer(op: &Op, args: &[&TensorType]) -> Result<TensorType, String> {
    match op {
        Op::Input { .. } | Op::Param { .. } => {
            Err("leaves are created with Graph::input / Graph::param".into())
        }
        Op::Affine { .. } | Op::Unary(_) | Op::Softmax { .. } => same_f32(args),
        Op::Binary(_) => binary(args),
        Op::Reduce(_) => reduce(args),
        Op::Reshape { shape } => reshape(shape, args),
        Op::Permute { perm } => permute(perm, args),
        Op::MatMul { trans_b } => matmul(*trans_b, args),
        Op::Embedding => embedding(args),
        Op::Rope { .. } | Op::RopeGrad { .. } => rope(args),
        Op::CrossEntropy => cross_entropy(args),
        Op::LinearCrossEntropy => {
            expect_args(args, 3)?;
            linear_cross_entropy_operands(args)?;
            Ok(TensorType::f32(&[1]))
        }
        Op::SliceRows { start, len } => slice_rows(*start, *len, args),
        Op::ConcatRows => concat_rows(args),
        Op::TopK { k } => top_k(*k, args),
        Op::GatherCols => gather_cols(args),
        Op::TopKMask { experts } => top_k_mask(*experts, args),
        Op::MoeRoute { layout } => moe_route(layout, args),
        Op::SliceCols { start, len } => slice_cols(*start, *len, args),
        Op::RouteLoad { layout } => {
            expect_args(args, 1)?;
            expect_route(args[0], layout)?;
            Ok(TensorType::f32(&[layout.experts]))
        }
        Op::ExpertChoice { capacity } => expert_choice(*capacity, args),
        Op::Sinkhorn { .. } => sinkhorn(args),
        Op::Auction { k, capacity, .. } => auction(*k, *capacity, args),
        Op::MoeGather { layout } => moe_gather(layout, args),
        Op::GroupedMatMul { layout } => grouped_matmul(layout, args),
        Op::MoeCombine { layout } => moe_combine(layout, args),
        Op::SumTo { shape } => sum_to(shape, args),
        Op::BroadcastTo { shape } => broadcast_to(shape, args),
        Op::EmbeddingGrad { vocab } => embedding_grad(*vocab, args),
        Op::CrossEntropyGrad => cross_entropy_grad(args),
        Op::LinearCrossEntropyGradH => {
            let (n, _, d) = linear_cross_entropy_grad(args)?;
            Ok(TensorType::f32(&[n, d]))
        }
        Op::LinearCrossEntropyGradW => {
            let (_, v, d) = linear_cross_entropy_grad(args)?;
            Ok(TensorType::f32(&[v, d]))
        }
        Op::ScatterCols { cols } => scatter_cols(*cols, args),
        Op::MoeGatherGrad { layout } => moe_gather_grad(layout, args),
        Op::GroupedMatMulGradX { layout } => grouped_matmul_grad_x(layout, args),
        Op::GroupedMatMulGradW { layout } => grouped_matmul_grad_w(layout, args),
        Op::MoeCombineGradRows { layout } => moe_combine_grad_rows(layout, args),
        Op::MoeCombineGradWeights { layout } => moe_combine_grad_weights(layout, args),
        Op::LstmScan { .. } => lstm::scan(args),
        Op::LstmHidden => lstm::hidden(args),
        Op::LstmScanGrad { col, .. } => lstm::scan_grad(*col, args),
        Op::LstmScanGradW { .. } => lstm::scan_grad_w(args),
        Op::LstmLast { dirs } => lstm::last(*dirs, args),
        Op::LstmLastGrad { dirs, steps } => lstm::last_grad(*dirs, *steps, args),
    }
}

/// One f32 operand, the result of its type (elementwise ops, softmax).
fn same_f32(args: &[&TensorType]) -> Result<TensorType, String> {
    expect_args(args, 1)?;
    expect_dtype(args[0], DType::F32, "operand")?;
    Ok(args[0].clone())
}

fn binary(args: &[&TensorType]) -> Result<TensorType, String> {
    expect_args(args, 2)?;
    expect_dtype(args[0], DType::F32, "lhs")?;
    expect_dtype(args[1], DType::F32, "rhs")?;
    let shape = broadcast_shapes(&args[0].shape, &args[1].shape)
        .ok_or_else(|| format!("cannot broadcast {} with {}", args[0], args[1]))?;
    Ok(TensorType::f32(&shape))
}

fn reduce(args: &[&TensorType]) -> Result<TensorType, String> {
    expect_args(args, 1)?;
    expect_dtype(args[0], DType::F32, "operand")?;
    let mut shape = args[0].shape.clone();
    match shape.last_mut() {
        Some(last) => *last = 1,
        None => return Err("cannot reduce a scalar".into()),
    }
    Ok(TensorType::f32(&shape))
}

fn reshape(shape: &[usize], args: &[&TensorType]) -> Result<TensorType, String> {
    expect_args(args, 1)?;
    let numel: usize = shape.iter().product();
    if numel != args[0].numel() {
        return Err(format!(
            "reshape of {} to {shape:?} changes the element count",
            args[0]
        ));
    }
    Ok(TensorType {
        shape: shape.to_vec(),
        dtype: args[0].dtype,
    })
}

fn permute(perm: &[usize], args: &[&TensorType]) -> Result<TensorType, String> {
    expect_args(args, 1)?;
    let rank = args[0].shape.len();
    let mut seen = vec![false; rank];
    if perm.len() != rank
        || perm
            .iter()
            .any(|&p| p >= rank || std::mem::replace(&mut seen[p], true))
    {
        return Err(format!("{perm:?} is not a permutation of {rank} axes"));
    }
    let shape: Vec<usize> = perm.iter().map(|&p| args[0].shape[p]).collect();
    Ok(TensorType {
        shape,
        dtype: args[0].dtype,
    })
}

fn matmul(trans_b: bool, args: &[&TensorType]) -> Result<TensorType, String> {
    expect_args(args, 2)?;
    let (a, b) = (args[0], args[1]);
    expect_dtype(a, DType::F32, "lhs")?;
    expect_dtype(b, DType::F32, "rhs")?;
    if a.shape.len() < 2 || b.shape.len() < 2 {
        return Err("matmul operands need at least 2 axes".into());
    }
    let (ab, am) = a.shape.split_at(a.shape.len() - 2);
    let (bb, bm) = b.shape.split_at(b.shape.len() - 2);
    if !bb.is_empty() && bb != ab {
        return Err(format!("batch axes differ: {a} vs {b}"));
    }
    let (m, k) = (am[0], am[1]);
    let (kb, n) = if trans_b {
        (bm[1], bm[0])
    } else {
        (bm[0], bm[1])
    };
    if k != kb {
        return Err(format!(
            "contracted axes differ: {a} vs {b} (trans_b = {trans_b})"
        ));
    }
    let mut shape = ab.to_vec();
    shape.extend([m, n]);
    Ok(TensorType::f32(&shape))
}

fn embedding(args: &[&TensorType]) -> Result<TensorType, String> {
    expect_args(args, 2)?;
    expect_dtype(args[0], DType::F32, "table")?;
    expect_dtype(args[1], DType::U32, "ids")?;
    if args[0].shape.len() != 2 {
        return Err("embedding table must be [V, D]".into());
    }
    let mut shape = args[1].shape.clone();
    shape.push(args[0].shape[1]);
    Ok(TensorType::f32(&shape))
}

/// Rope and its adjoint: `[B, T, H, hd]` with even `hd`, same type out.
fn rope(args: &[&TensorType]) -> Result<TensorType, String> {
    expect_args(args, 1)?;
    expect_dtype(args[0], DType::F32, "operand")?;
    if args[0].shape.len() != 4 || !args[0].shape[3].is_multiple_of(2) {
        return Err(format!(
            "rope wants [B, T, H, hd] with even hd, got {}",
            args[0]
        ));
    }
    Ok(args[0].clone())
}

fn cross_entropy(args: &[&TensorType]) -> Result<TensorType, String> {
    expect_args(args, 2)?;
    expect_dtype(args[0], DType::F32, "logits")?;
    expect_dtype(args[1], DType::U32, "targets")?;
    if args[0].shape.len() != 2 || args[1].shape != [args[0].shape[0]] {
        return Err(format!(
            "cross entropy wants logits [N, V] and targets [N], got {} and {}",
            args[0], args[1]
        ));
    }
    Ok(TensorType::f32(&[1]))
}

fn slice_rows(start: usize, len: usize, args: &[&TensorType]) -> Result<TensorType, String> {
    expect_args(args, 1)?;
    let rows = args[0].shape.first().copied().unwrap_or(0);
    if len == 0 || start + len > rows {
        return Err(format!("rows {start}..{} of {}", start + len, args[0]));
    }
    let mut shape = args[0].shape.clone();
    shape[0] = len;
    Ok(TensorType {
        shape,
        dtype: args[0].dtype,
    })
}

fn concat_rows(args: &[&TensorType]) -> Result<TensorType, String> {
    expect_args(args, 2)?;
    expect_dtype(args[0], DType::F32, "upper rows")?;
    expect_dtype(args[1], DType::F32, "lower rows")?;
    let (a, b) = (&args[0].shape, &args[1].shape);
    if a.is_empty() || b.len() != a.len() || a[1..] != b[1..] {
        return Err(format!(
            "concat_rows wants [Ra, ...] and [Rb, ...], got {} and {}",
            args[0], args[1]
        ));
    }
    let mut shape = a.clone();
    shape[0] += b[0];
    Ok(TensorType::f32(&shape))
}

fn top_k(k: usize, args: &[&TensorType]) -> Result<TensorType, String> {
    expect_args(args, 1)?;
    expect_dtype(args[0], DType::F32, "scores")?;
    if args[0].shape.len() != 2 || k == 0 || k > args[0].shape[1] {
        return Err(format!("top-{k} of {}", args[0]));
    }
    Ok(TensorType::u32(&[args[0].shape[0], k]))
}

fn gather_cols(args: &[&TensorType]) -> Result<TensorType, String> {
    expect_args(args, 2)?;
    expect_dtype(args[0], DType::F32, "x")?;
    expect_dtype(args[1], DType::U32, "idx")?;
    if args[0].shape.len() != 2 || args[1].shape.len() != 2 || args[0].shape[0] != args[1].shape[0]
    {
        return Err(format!(
            "gather_cols wants x [T, E] and idx [T, k], got {} and {}",
            args[0], args[1]
        ));
    }
    Ok(TensorType::f32(&args[1].shape))
}

fn top_k_mask(experts: usize, args: &[&TensorType]) -> Result<TensorType, String> {
    expect_args(args, 1)?;
    expect_dtype(args[0], DType::U32, "idx")?;
    if args[0].shape.len() != 2 {
        return Err("topk_mask wants idx [T, k]".into());
    }
    Ok(TensorType::f32(&[args[0].shape[0], experts]))
}

fn moe_route(layout: &RouteLayout, args: &[&TensorType]) -> Result<TensorType, String> {
    if args.len() != 1 && args.len() != 2 {
        return Err(format!(
            "expected idx and an optional prio, got {} arguments",
            args.len()
        ));
    }
    expect_dtype(args[0], DType::U32, "idx")?;
    if args[0].shape != [layout.tokens, layout.k] {
        return Err(format!("route of {} with layout {layout:?}", args[0]));
    }
    if let Some(prio) = args.get(1) {
        expect_dtype(prio, DType::F32, "prio")?;
        if prio.shape != args[0].shape {
            return Err(format!(
                "prio {prio} must have the shape of idx {}",
                args[0]
            ));
        }
    }
    if layout.tile == 0 || layout.capacity == 0 {
        return Err(format!(
            "route layout {layout:?} needs tile and capacity ≥ 1"
        ));
    }
    Ok(TensorType::u32(&[layout.table_len()]))
}

fn slice_cols(start: usize, len: usize, args: &[&TensorType]) -> Result<TensorType, String> {
    expect_args(args, 1)?;
    expect_dtype(args[0], DType::U32, "operand")?;
    if args[0].shape.len() != 2 || len == 0 || start + len > args[0].shape[1] {
        return Err(format!("columns {start}..{} of {}", start + len, args[0]));
    }
    Ok(TensorType::u32(&[args[0].shape[0], len]))
}

fn expert_choice(capacity: usize, args: &[&TensorType]) -> Result<TensorType, String> {
    expect_args(args, 1)?;
    expect_dtype(args[0], DType::F32, "scores")?;
    if args[0].shape.len() != 2 || capacity == 0 || capacity > args[0].shape[0] {
        return Err(format!(
            "expert choice of {capacity} tokens from {}",
            args[0]
        ));
    }
    Ok(TensorType::u32(&args[0].shape))
}

fn sinkhorn(args: &[&TensorType]) -> Result<TensorType, String> {
    expect_args(args, 1)?;
    expect_dtype(args[0], DType::F32, "logits")?;
    if args[0].shape.len() != 2 {
        return Err(format!("sinkhorn wants logits [T, E], got {}", args[0]));
    }
    Ok(args[0].clone())
}

fn auction(k: usize, capacity: usize, args: &[&TensorType]) -> Result<TensorType, String> {
    expect_args(args, 2)?;
    expect_dtype(args[0], DType::F32, "values")?;
    expect_dtype(args[1], DType::F32, "prices")?;
    let (v, p) = (args[0], args[1]);
    if v.shape.len() != 2 || p.shape != [v.shape[1]] || k == 0 || k > v.shape[1] || capacity == 0 {
        return Err(format!("auction of {k} slots per token, capacity {capacity}, wants values [T, E] and prices [E], got {v} and {p}"));
    }
    Ok(TensorType::u32(&[v.shape[0], k + v.shape[1]]))
}

fn moe_gather(layout: &RouteLayout, args: &[&TensorType]) -> Result<TensorType, String> {
    expect_args(args, 2)?;
    expect_dtype(args[0], DType::F32, "x")?;
    expect_route(args[1], layout)?;
    if args[0].shape.len() != 2 || args[0].shape[0] != layout.tokens {
        return Err(format!(
            "moe_gather wants x [{}, D], got {}",
            layout.tokens, args[0]
        ));
    }
    Ok(TensorType::f32(&[layout.rows(), args[0].shape[1]]))
}

fn grouped_matmul(layout: &RouteLayout, args: &[&TensorType]) -> Result<TensorType, String> {
    expect_args(args, 3)?;
    let (x, w) = (args[0], args[1]);
    expect_dtype(x, DType::F32, "x")?;
    expect_dtype(w, DType::F32, "w")?;
    expect_route(args[2], layout)?;
    if x.shape.len() != 2
        || x.shape[0] != layout.rows()
        || w.shape.len() != 3
        || w.shape[0] != layout.experts
        || w.shape[2] != x.shape[1]
    {
        return Err(format!(
            "grouped_matmul wants x [{}, K] and w [{}, N, K], got {x} and {w}",
            layout.rows(),
            layout.experts
        ));
    }
    Ok(TensorType::f32(&[layout.rows(), w.shape[1]]))
}

fn moe_combine(layout: &RouteLayout, args: &[&TensorType]) -> Result<TensorType, String> {
    expect_args(args, 3)?;
    let (yp, wt) = (args[0], args[1]);
    expect_dtype(yp, DType::F32, "yp")?;
    expect_dtype(wt, DType::F32, "weights")?;
    expect_route(args[2], layout)?;
    if yp.shape.len() != 2 || yp.shape[0] != layout.rows() || wt.shape != [layout.tokens, layout.k]
    {
        return Err(format!(
            "moe_combine wants yp [{}, D] and weights [{}, {}], got {yp} and {wt}",
            layout.rows(),
            layout.tokens,
            layout.k
        ));
    }
    Ok(TensorType::f32(&[layout.tokens, yp.shape[1]]))
}

fn sum_to(shape: &[usize], args: &[&TensorType]) -> Result<TensorType, String> {
    expect_args(args, 1)?;
    expect_dtype(args[0], DType::F32, "operand")?;
    if broadcast_shapes(shape, &args[0].shape).as_deref() != Some(&args[0].shape[..]) {
        return Err(format!("{shape:?} does not broadcast to {}", args[0]));
    }
    Ok(TensorType::f32(shape))
}

fn broadcast_to(shape: &[usize], args: &[&TensorType]) -> Result<TensorType, String> {
    expect_args(args, 1)?;
    expect_dtype(args[0], DType::F32, "operand")?;
    if broadcast_shapes(&args[0].shape, shape).as_deref() != Some(shape) {
        return Err(format!("{} does not broadcast to {shape:?}", args[0]));
    }
    Ok(TensorType::f32(shape))
}

fn embedding_grad(vocab: usize, args: &[&TensorType]) -> Result<TensorType, String> {
    expect_args(args, 2)?;
    expect_dtype(args[0], DType::U32, "ids")?;
    expect_dtype(args[1], DType::F32, "g")?;
    if args[1].shape.len() != args[0].shape.len() + 1
        || args[1].shape[..args[0].shape.len()] != args[0].shape[..]
    {
        return Err(format!(
            "embedding_grad wants ids [...] and g [..., D], got {} and {}",
            args[0], args[1]
        ));
    }
    Ok(TensorType::f32(&[vocab, args[1].last()]))
}

fn cross_entropy_grad(args: &[&TensorType]) -> Result<TensorType, String> {
    expect_args(args, 3)?;
    cross_entropy(&args[..2])?;
    if args[2].shape != [1] || args[2].dtype != DType::F32 {
        return Err(format!(
            "cross_entropy_grad wants g f32[1], got {}",
            args[2]
        ));
    }
    Ok(args[0].clone())
}

/// `(N, V, D)` of the fused head's adjoints: its operands and the loss adjoint `g` f32`[1]`.
fn linear_cross_entropy_grad(args: &[&TensorType]) -> Result<(usize, usize, usize), String> {
    expect_args(args, 4)?;
    let nvd = linear_cross_entropy_operands(&args[..3])?;
    if args[3].shape != [1] || args[3].dtype != DType::F32 {
        return Err(format!("the adjoint g must be f32[1], got {}", args[3]));
    }
    Ok(nvd)
}

fn scatter_cols(cols: usize, args: &[&TensorType]) -> Result<TensorType, String> {
    expect_args(args, 2)?;
    expect_dtype(args[0], DType::F32, "g")?;
    expect_dtype(args[1], DType::U32, "idx")?;
    if args[0].shape.len() != 2 || args[0].shape != args[1].shape {
        return Err(format!(
            "scatter_cols wants g [T, k] and idx [T, k], got {} and {}",
            args[0], args[1]
        ));
    }
    Ok(TensorType::f32(&[args[0].shape[0], cols]))
}

fn moe_gather_grad(layout: &RouteLayout, args: &[&TensorType]) -> Result<TensorType, String> {
    expect_args(args, 2)?;
    expect_dtype(args[0], DType::F32, "gp")?;
    expect_route(args[1], layout)?;
    if args[0].shape.len() != 2 || args[0].shape[0] != layout.rows() {
        return Err(format!(
            "moe_gather_grad wants gp [{}, D], got {}",
            layout.rows(),
            args[0]
        ));
    }
    Ok(TensorType::f32(&[layout.tokens, args[0].shape[1]]))
}

fn grouped_matmul_grad_x(layout: &RouteLayout, args: &[&TensorType]) -> Result<TensorType, String> {
    expect_args(args, 3)?;
    let (g, w) = (args[0], args[1]);
    expect_dtype(g, DType::F32, "g")?;
    expect_dtype(w, DType::F32, "w")?;
    expect_route(args[2], layout)?;
    if g.shape.len() != 2
        || g.shape[0] != layout.rows()
        || w.shape.len() != 3
        || w.shape[0] != layout.experts
        || w.shape[1] != g.shape[1]
    {
        return Err(format!(
            "grouped_matmul_grad_x wants g [{}, N] and w [{}, N, K], got {g} and {w}",
            layout.rows(),
            layout.experts
        ));
    }
    Ok(TensorType::f32(&[layout.rows(), w.shape[2]]))
}

fn grouped_matmul_grad_w(layout: &RouteLayout, args: &[&TensorType]) -> Result<TensorType, String> {
    expect_args(args, 3)?;
    let (g, x) = (args[0], args[1]);
    expect_dtype(g, DType::F32, "g")?;
    expect_dtype(x, DType::F32, "x")?;
    expect_route(args[2], layout)?;
    if g.shape.len() != 2
        || x.shape.len() != 2
        || g.shape[0] != layout.rows()
        || x.shape[0] != layout.rows()
    {
        return Err(format!(
            "grouped_matmul_grad_w wants g [{0}, N] and x [{0}, K], got {g} and {x}",
            layout.rows()
        ));
    }
    Ok(TensorType::f32(&[layout.experts, g.shape[1], x.shape[1]]))
}

fn moe_combine_grad_rows(layout: &RouteLayout, args: &[&TensorType]) -> Result<TensorType, String> {
    expect_args(args, 3)?;
    let (dy, w) = (args[0], args[1]);
    expect_dtype(dy, DType::F32, "dy")?;
    expect_dtype(w, DType::F32, "weights")?;
    expect_route(args[2], layout)?;
    if dy.shape.len() != 2 || dy.shape[0] != layout.tokens || w.shape != [layout.tokens, layout.k] {
        return Err(format!(
            "moe_combine_grad_rows wants dy [{0}, D] and weights [{0}, {1}], got {dy} and {w}",
            layout.tokens, layout.k
        ));
    }
    Ok(TensorType::f32(&[layout.rows(), dy.shape[1]]))
}

fn moe_combine_grad_weights(
    layout: &RouteLayout,
    args: &[&TensorType],
) -> Result<TensorType, String> {
    expect_args(args, 3)?;
    let (dy, yp) = (args[0], args[1]);
    expect_dtype(dy, DType::F32, "dy")?;
    expect_dtype(yp, DType::F32, "yp")?;
    expect_route(args[2], layout)?;
    if dy.shape.len() != 2
        || dy.shape[0] != layout.tokens
        || yp.shape != [layout.rows(), dy.shape[1]]
    {
        return Err(format!(
            "moe_combine_grad_weights wants dy [{}, D] and yp [{}, D], got {dy} and {yp}",
            layout.tokens,
            layout.rows()
        ));
    }
    Ok(TensorType::f32(&[layout.tokens, layout.k]))
}

/// `(N, V, D)` of the operands `h[N, D]`, `w[V, D]`, `targets[N]` of the fused LM head and loss.
fn linear_cross_entropy_operands(args: &[&TensorType]) -> Result<(usize, usize, usize), String> {
    expect_dtype(args[0], DType::F32, "h")?;
    expect_dtype(args[1], DType::F32, "w")?;
    expect_dtype(args[2], DType::U32, "targets")?;
    let (h, w, t) = (&args[0].shape, &args[1].shape, &args[2].shape);
    if h.len() != 2 || w.len() != 2 || h[1] != w[1] || t[..] != [h[0]] {
        return Err(format!(
            "linear cross entropy wants h [N, D], w [V, D] and targets [N], got {}, {} and {}",
            args[0], args[1], args[2]
        ));
    }
    Ok((h[0], w[0], h[1]))
}

fn expect_route(t: &TensorType, layout: &RouteLayout) -> Result<(), String> {
    if t.dtype == DType::U32 && t.shape == [layout.table_len()] {
        Ok(())
    } else {
        Err(format!(
            "route table must be u32[{}], got {t}",
            layout.table_len()
        ))
    }
}
