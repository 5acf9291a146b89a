//! Lower: the checked [`Spec`] → the forward [`Graph`] (logits, losses), for one static batch size.
//!
//! The graph uses the IR's primitive ops (reduce, broadcasting binary, affine, unary) for norms and
//! losses so that fusion sees small, fusable pieces, and the composites only where the IR has them
//! (softmax, RoPE, cross-entropy, the MoE routing ops).
//!
//! # Outputs
//! `logits` (`[B*T, V]`, or `[B, classes]` for `mlp`; a language model has it only with
//! [`Head::Logits`], and `[B, V]` with [`Head::Sampled`]), `ce` (mean cross-entropy, `[1]`), `aux.N` for
//! every MoE block `N` that has balancing terms (the sum of that block's terms, `[1]`), and `loss` =
//! `ce` + Σ `aux.N` (`[1]`). `loss` is always its own node (an identity affine of `ce` when there are no
//! balancing terms) so that every output name owns one buffer. Every MoE block also has the metrics
//! `moe.N.load` `[E]`, `moe.N.dropped` `[1]`, `moe.N.router_z` `[1]`, `moe.N.router_logits`
//! `[T, E]` (the clean expert-level gate logits, for LANGUAGE.md's router-logit statistics), and,
//! with `bias(...)` or `auction`, the router-state update `router_state.N.bias.next` /
//! `router_state.N.prices.next`.
//!
//! # Inputs besides the data
//! `noise.N` (`[T, E]`, ε of `noisy_top_k`; `noise.N.groups` `[T, G]` for a `two_level` primary gate),
//! `jitter.N` (`[T, dim]`), `router_state.N.bias` and `router_state.N.prices` (`[E]`): what the
//! runtime feeds is docs/DECISIONS.md, "Router state and noise".
//!
//! # Parameter names and layouts
//! HF Mixtral/Llama names (docs/language.md, "What a run writes"), `[out, in]` linear weights read with `MatMul { trans_b }`:
//! - dense FFN `swiglu`: `mlp.{gate,up,down}_proj.weight`; `gelu` / `relu` have no gate, so they use
//!   `mlp.up_proj.weight` and `mlp.down_proj.weight` only (as GPT-style blocks under Llama names).
//! - LayerNorm adds `.bias` next to each norm's `.weight`.
//! - `qk_norm = true`: `self_attn.q_norm.weight` and `self_attn.k_norm.weight` `[head_dim]` (Qwen3).
//! - routed experts are ONE parameter per projection, stacked over experts, because `GroupedMatMul`
//!   reads `[E, N, K]`: `block_sparse_moe.experts.w1` `[E, hidden, dim]` (SwiGLU gate, or the up
//!   projection of gelu/relu experts), `...experts.w3` `[E, hidden, dim]` (SwiGLU up) and
//!   `...experts.w2` `[E, dim, hidden]` (down). The checkpoint writer splits each into the HF
//!   per-expert tensors `experts.E.w1.weight` etc. (slice `e` of the stack is expert `e`).
//! - shared experts (`shared_experts = S`) are one dense FFN of hidden `S * expert.hidden`, named as
//!   Qwen-MoE does: `block_sparse_moe.shared_expert.{gate,up,down}_proj.weight`.
//! - `mlp` family: `model.input_proj.{weight,bias}` (inputs → dim), per block `model.layers.N.norm` then
//!   the FFN/MoE with a residual, `model.norm`, `classifier.{weight,bias}` (dim → classes). Its
//!   "sequence" for `seq_aux` is the whole batch (samples are independent), so `seq_aux` = `aux`.
//!
//! # Init
//! Linear and embedding weights N(0, 0.02²) (HF `initializer_range`), norm weights 1, biases 0.
//!
//! # Routing
//! A router ([`Routing`]) turns the router input into selected experts `idx[T, k]` (u32, `NONE` for an
//! unassigned slot) and their gate weights: top-k gates (flat or `group_limited`) share
//! `gate_level`; `two_level`, `expert_choice`, `sinkhorn` and `auction` have their own. Dispatch,
//! capacity, balancing and metrics are common to all of them.
//!
//! # The `lstm` family
//! See [`lstm`]: LSTM layers as `LstmScan` recurrences, MoE layers with a residual after the MoE
//! blocks, and the same MoE, head and loss lowering as the transformer.

use crate::ir::{
    BinaryOp, Graph, Init, InputRole, IrError, NodeId, Op, ReduceOp, RouteLayout, TensorType,
    UnaryOp,
};
use crate::spec::{
    Activation, Balance, Capacity, DropPolicy, Family, Ffn, Gate, Hierarchy, Moe, Norm, Spec,
    NORM_EPS,
};

mod lstm;

/// Rows per tile of the MoE routing table: every expert's segment of gathered rows is padded to a
/// multiple of this, so one grouped-matmul tile never straddles two experts. 32 is the row block of
/// the subgroup-shared register-blocked matmul (emit/blocked.rs) and a multiple of the 16-row
/// shared-memory tile and the 8-row plain block; the emitter's grouped matmul must use a row block
/// that divides it.
pub const ROUTE_TILE: usize = 32;

/// Standard deviation of the normal init of linear and embedding weights (GPT-2 / HF
/// `initializer_range`).
pub const INIT_STD: f32 = 0.02;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LowerError {
    #[error("lowering does not support {feature} yet")]
    Unsupported { feature: String },
    #[error("the {family} family needs `{field}`")]
    Missing {
        field: &'static str,
        family: &'static str,
    },
    #[error("invalid spec for lowering: {0}")]
    Invalid(String),
    #[error(transparent)]
    Ir(#[from] IrError),
}

/// How a language model's graph ends: what it computes from the final hidden states `h[B*T, D]`.
/// The `mlp` family and `lstm` classifiers always have [`Head::Logits`]: a classifier's
/// `[B, classes]` logits are small and its evaluation reads them (accuracy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// The `logits` output `[B*T, V]` and `ce` computed from it: `moec forward --dump-logits`, HF
    /// parity, `moec build`, and the unchunked reference of the tests.
    Logits,
    /// No `logits`: `ce` is the fused [`Op::LinearCrossEntropy`], which `head::legalize` runs chunk
    /// by chunk over the tokens, so the `[B*T, V]` logits never exist. Training and evaluation.
    Loss,
    /// The logits of one row per sequence only: `logits` `[B, V]` of the rows of `h` named by the
    /// u32 input [`LOGIT_ROWS`] `[B]` (flat indices into the `B*T` tokens); no `ce` or `loss`.
    /// Generation, which samples one position per sequence.
    Sampled,
}

/// The input of [`Head::Sampled`]: which token row's logits each sequence gets.
pub const LOGIT_ROWS: &str = "logit_rows";

/// Lowers `spec` to its forward graph for `batch` sequences (or samples, for `mlp`), with the full
/// `logits` output ([`Head::Logits`]).
pub fn lower(spec: &Spec, batch: usize) -> Result<Graph, LowerError> {
    lower_with(spec, batch, Head::Logits)
}

/// Lowers `spec` to its forward graph for `batch` sequences, ending in `head`.
pub fn lower_with(spec: &Spec, batch: usize, head: Head) -> Result<Graph, LowerError> {
    if batch == 0 {
        return Err(LowerError::Invalid("batch must be at least 1".into()));
    }
    if let Some(moe) = &spec.moe {
        check_moe_supported(moe)?;
    }
    let mut l = Lower {
        g: Graph::new(),
        spec,
        aux: Vec::new(),
        metrics: Vec::new(),
    };
    let (logits, ce) = match spec.model.family {
        Family::Transformer => l.transformer(batch, head)?,
        Family::Mlp => {
            let (logits, ce) = l.mlp(batch)?;
            (Some(logits), Some(ce))
        }
        Family::Lstm => l.lstm(batch, head)?,
    };
    l.finish(logits, ce)?;
    Ok(l.g)
}

fn check_moe_supported(moe: &Moe) -> Result<(), LowerError> {
    if moe.experts == 0 || moe.top_k == 0 || moe.top_k > moe.experts {
        return Err(LowerError::Invalid(format!(
            "top_k = {} with {} experts",
            moe.top_k, moe.experts
        )));
    }
    if let Some((g, m)) = moe.groups {
        if g * m != moe.experts || moe.top_groups == 0 || moe.top_groups > g {
            return Err(LowerError::Invalid(format!(
                "groups {g} x {m} with {} experts and top_groups = {}",
                moe.experts, moe.top_groups
            )));
        }
        let limit = match moe.hierarchy {
            Hierarchy::TwoLevel => m,
            Hierarchy::GroupLimited => moe.top_groups * m,
        };
        if moe.top_k > limit {
            return Err(LowerError::Invalid(format!(
                "top_k = {} with groups {g} x {m}",
                moe.top_k
            )));
        }
    }
    if let Gate::NoisyTopK { noise } = moe.gate {
        let smooth_load = moe
            .balance
            .iter()
            .any(|b| matches!(b, Balance::Cv2 { load, .. } if *load != 0.0));
        if smooth_load && noise <= 0.0 {
            return Err(LowerError::Invalid(
                "the smooth load of `cv2(load > 0)` divides by the noise scale, so `noisy_top_k` needs `noise > 0`".into(),
            ));
        }
    }
    if let Capacity::Factor { factor, .. } = moe.capacity {
        if !(factor > 0.0 && factor.is_finite()) {
            return Err(LowerError::Invalid(format!("capacity factor {factor}")));
        }
    }
    Ok(())
}

/// Expert capacity ⌈F·T·k/E⌉ (at least 1).
fn capacity_of(factor: f64, tokens: usize, k: usize, experts: usize) -> usize {
    ((factor * (tokens * k) as f64 / experts as f64).ceil() as usize).max(1)
}

/// What a router hands to dispatch, balancing and metrics.
struct Routing {
    /// Expert-level router logits `[T, E]` (`router_z`, `z`).
    logits: NodeId,
    /// Router probabilities `p[T, E]`: `P_e` of `aux`, the priority of `drop = probability`.
    probs: NodeId,
    /// Selected experts `[T, k]` (u32, `NONE` for an unassigned slot).
    idx: NodeId,
    /// Gate weights `[T, k]` of the selected experts.
    weights: NodeId,
    /// Token slots per token.
    k: usize,
    /// Average experts per token, the `k` of `aux`'s `f_e = Σ sel / (T·k)`.
    k_eff: f64,
    /// The router's own per-expert capacity (expert choice, auction), else from `capacity`.
    capacity: Option<usize>,
    /// Dense gate matrix `G[T, E]` (0 off the selection): `Importance_e = Σ_t G[t, e]`.
    gates: NodeId,
    /// Smooth selection probabilities `[T, E]` of `noisy_top_k` (the `cv2` load estimator).
    smooth_load: Option<NodeId>,
    /// Auction: `(prices input, demand [E], price_rate)`.
    prices: Option<(NodeId, NodeId, f64)>,
}

/// One gating level (flat gates have one, `two_level` two).
struct Level {
    probs: NodeId,
    idx: NodeId,
    weights: NodeId,
    smooth_load: Option<NodeId>,
}

/// The noise of a `noisy_top_k` gate: noise logits `x·Wnoise`, the N(0,1) input ε, the `noise` scale.
struct Noise {
    logits: NodeId,
    eps: NodeId,
    scale: f64,
}

struct Lower<'s> {
    g: Graph,
    spec: &'s Spec,
    /// `(block, summed balancing terms)` of every MoE block that has any.
    aux: Vec<(usize, NodeId)>,
    /// Metrics and router-state outputs (`moe.N.load`, `router_state.N.bias.next`, ...), in order.
    metrics: Vec<(String, NodeId)>,
}

impl Lower<'_> {
    fn add(
        &mut self,
        op: Op,
        args: &[NodeId],
        label: impl Into<String>,
    ) -> Result<NodeId, LowerError> {
        Ok(self.g.add(op, args, label)?)
    }
    fn unary(
        &mut self,
        u: UnaryOp,
        x: NodeId,
        label: impl Into<String>,
    ) -> Result<NodeId, LowerError> {
        self.add(Op::Unary(u), &[x], label)
    }
    fn binary(
        &mut self,
        b: BinaryOp,
        x: NodeId,
        y: NodeId,
        label: impl Into<String>,
    ) -> Result<NodeId, LowerError> {
        self.add(Op::Binary(b), &[x, y], label)
    }
    fn reduce(
        &mut self,
        r: ReduceOp,
        x: NodeId,
        label: impl Into<String>,
    ) -> Result<NodeId, LowerError> {
        self.add(Op::Reduce(r), &[x], label)
    }
    fn affine(
        &mut self,
        x: NodeId,
        mul: f32,
        add: f32,
        label: impl Into<String>,
    ) -> Result<NodeId, LowerError> {
        self.add(Op::Affine { mul, add }, &[x], label)
    }
    fn reshape(
        &mut self,
        x: NodeId,
        shape: &[usize],
        label: impl Into<String>,
    ) -> Result<NodeId, LowerError> {
        self.add(
            Op::Reshape {
                shape: shape.to_vec(),
            },
            &[x],
            label,
        )
    }
    fn permute(
        &mut self,
        x: NodeId,
        perm: &[usize],
        label: impl Into<String>,
    ) -> Result<NodeId, LowerError> {
        self.add(
            Op::Permute {
                perm: perm.to_vec(),
            },
            &[x],
            label,
        )
    }
    fn last_dim(&self, x: NodeId) -> usize {
        self.g.ty(x).last()
    }

    /// Init of a weight with `fan_in` inputs: N(0, 0.02²) (HF `initializer_range`), or for the
    /// `lstm` family PyTorch's `nn.Linear` default U(±1/√fan_in): with no normalisation layer, the
    /// small normal keeps an LSTM LM at the unigram loss for hundreds of steps (docs/DECISIONS.md).
    fn weight_init(&self, fan_in: usize) -> Init {
        match self.spec.model.family {
            Family::Lstm => Init::Uniform {
                bound: (1.0 / fan_in as f64).sqrt() as f32,
            },
            Family::Transformer | Family::Mlp => Init::Normal { std: INIT_STD },
        }
    }

    /// Init of a bias of a layer with `fan_in` inputs: 0, or for the `lstm` family PyTorch's
    /// U(±1/√fan_in) (see [`Self::weight_init`]).
    fn bias_init(&self, fan_in: usize) -> Init {
        match self.spec.model.family {
            Family::Lstm => self.weight_init(fan_in),
            Family::Transformer | Family::Mlp => Init::Constant(0.0),
        }
    }

    /// `x · Wᵀ (+ b)` with `W` `[out, in]` named `{name}.weight` (and `{name}.bias`).
    fn linear(
        &mut self,
        x: NodeId,
        name: &str,
        out: usize,
        bias: bool,
    ) -> Result<NodeId, LowerError> {
        let inp = self.last_dim(x);
        let init = self.weight_init(inp);
        let w = self.g.param(&format!("{name}.weight"), &[out, inp], init);
        let y = self.add(Op::MatMul { trans_b: true }, &[x, w], name)?;
        if !bias {
            return Ok(y);
        }
        let init = self.bias_init(inp);
        let b = self.g.param(&format!("{name}.bias"), &[out], init);
        self.binary(BinaryOp::Add, y, b, format!("{name}.bias_add"))
    }

    /// RMSNorm `x · rsqrt(mean(x²) + eps) · w`, or LayerNorm `(x - μ) · rsqrt(var + eps) · w + b`,
    /// over the last axis.
    fn norm(&mut self, x: NodeId, name: &str) -> Result<NodeId, LowerError> {
        self.norm_of(self.spec.model.norm, x, name)
    }

    /// [`Self::norm`] of the given kind (QK-norm is RMSNorm whatever the model's `norm`).
    fn norm_of(&mut self, kind: Norm, x: NodeId, name: &str) -> Result<NodeId, LowerError> {
        let d = self.last_dim(x);
        let centred = match kind {
            Norm::RmsNorm => x,
            Norm::LayerNorm => {
                let mu = self.reduce(ReduceOp::Mean, x, format!("{name}.mean"))?;
                self.binary(BinaryOp::Sub, x, mu, format!("{name}.centre"))?
            }
        };
        let sq = self.unary(UnaryOp::Square, centred, format!("{name}.sq"))?;
        let ms = self.reduce(ReduceOp::Mean, sq, format!("{name}.var"))?;
        let ms = self.affine(ms, 1.0, NORM_EPS, format!("{name}.eps"))?;
        let r = self.unary(UnaryOp::Rsqrt, ms, format!("{name}.rsqrt"))?;
        let y = self.binary(BinaryOp::Mul, centred, r, format!("{name}.normed"))?;
        let w = self
            .g
            .param(&format!("{name}.weight"), &[d], Init::Constant(1.0));
        let y = self.binary(BinaryOp::Mul, y, w, format!("{name}.scale"))?;
        match kind {
            Norm::RmsNorm => Ok(y),
            Norm::LayerNorm => {
                let b = self
                    .g
                    .param(&format!("{name}.bias"), &[d], Init::Constant(0.0));
                self.binary(BinaryOp::Add, y, b, format!("{name}.shift"))
            }
        }
    }

    fn activation(
        &mut self,
        a: Activation,
        x: NodeId,
        label: String,
    ) -> Result<NodeId, LowerError> {
        let u = match a {
            Activation::SwiGlu => UnaryOp::Silu,
            Activation::Gelu => UnaryOp::Gelu,
            Activation::Relu => UnaryOp::Relu,
        };
        self.unary(u, x, label)
    }

    /// Dense FFN under `{prefix}.{gate,up,down}_proj` (no gate for gelu/relu).
    fn ffn(&mut self, x: NodeId, prefix: &str, ffn: Ffn) -> Result<NodeId, LowerError> {
        let d = self.last_dim(x);
        let up = self.linear(x, &format!("{prefix}.up_proj"), ffn.hidden, false)?;
        let h = match ffn.activation {
            Activation::SwiGlu => {
                let gate = self.linear(x, &format!("{prefix}.gate_proj"), ffn.hidden, false)?;
                let gate = self.activation(ffn.activation, gate, format!("{prefix}.act"))?;
                self.binary(BinaryOp::Mul, gate, up, format!("{prefix}.glu"))?
            }
            Activation::Gelu | Activation::Relu => {
                self.activation(ffn.activation, up, format!("{prefix}.act"))?
            }
        };
        self.linear(h, &format!("{prefix}.down_proj"), d, false)
    }

    /// Causal multi-head attention with RoPE, grouped-query heads and optional QK-norm (before RoPE)
    /// on `h[B*T, dim]`.
    ///
    /// The G query heads that share a KV head are stacked along rows (`[B, KV, G*T, hd]`), so one
    /// batched matmul against `k[B, KV, T, hd]` serves the whole group and `Softmax { causal }` masks
    /// with `c <= r % T` (see `Op::Softmax`). Query head `h` is `kv * G + g`, i.e. it uses KV head
    /// `h / G`, as HF `repeat_kv`.
    fn attention(
        &mut self,
        h: NodeId,
        block: usize,
        b: usize,
        t: usize,
    ) -> Result<NodeId, LowerError> {
        let spec = self.spec;
        let m = &spec.model;
        let (heads, kv, d) = (m.heads, m.kv_heads, m.dim);
        if heads == 0 || kv == 0 || heads % kv != 0 || d % heads != 0 {
            return Err(LowerError::Invalid(format!(
                "{heads} heads, {kv} kv heads, dim {d}"
            )));
        }
        let (hd, g) = (d / heads, heads / kv);
        let theta = m.rope_theta as f32;
        let p = format!("model.layers.{block}.self_attn");
        let q = self.linear(h, &format!("{p}.q_proj"), heads * hd, false)?;
        let k = self.linear(h, &format!("{p}.k_proj"), kv * hd, false)?;
        let v = self.linear(h, &format!("{p}.v_proj"), kv * hd, false)?;

        let q = self.reshape(q, &[b, t, heads, hd], format!("{p}.q_heads"))?;
        let q = self.qk_norm(q, &format!("{p}.q_norm"))?;
        let q = self.add(Op::Rope { theta }, &[q], format!("{p}.q_rope"))?;
        let q = self.reshape(q, &[b, t, kv, g, hd], format!("{p}.q_groups"))?;
        let q = self.permute(q, &[0, 2, 3, 1, 4], format!("{p}.q_stack"))?;
        let q = self.reshape(q, &[b, kv, g * t, hd], format!("{p}.q_rows"))?;

        let k = self.reshape(k, &[b, t, kv, hd], format!("{p}.k_heads"))?;
        let k = self.qk_norm(k, &format!("{p}.k_norm"))?;
        let k = self.add(Op::Rope { theta }, &[k], format!("{p}.k_rope"))?;
        let k = self.permute(k, &[0, 2, 1, 3], format!("{p}.k_t"))?;
        let v = self.reshape(v, &[b, t, kv, hd], format!("{p}.v_heads"))?;
        let v = self.permute(v, &[0, 2, 1, 3], format!("{p}.v_t"))?;

        let s = self.add(Op::MatMul { trans_b: true }, &[q, k], format!("{p}.scores"))?;
        let s = self.affine(s, 1.0 / (hd as f32).sqrt(), 0.0, format!("{p}.scale"))?;
        let a = self.add(Op::Softmax { causal: true }, &[s], format!("{p}.probs"))?;
        let c = self.add(
            Op::MatMul { trans_b: false },
            &[a, v],
            format!("{p}.context"),
        )?;
        let c = self.reshape(c, &[b, kv, g, t, hd], format!("{p}.ctx_groups"))?;
        let c = self.permute(c, &[0, 3, 1, 2, 4], format!("{p}.ctx_unstack"))?;
        let c = self.reshape(c, &[b * t, heads * hd], format!("{p}.ctx_rows"))?;
        self.linear(c, &format!("{p}.o_proj"), d, false)
    }

    /// `qk_norm = true`: RMSNorm over the last axis (head_dim) of `x[B, T, heads, hd]`, one `[hd]`
    /// scale `{name}.weight` shared by the heads (Qwen3's `q_norm` / `k_norm`); else `x`.
    fn qk_norm(&mut self, x: NodeId, name: &str) -> Result<NodeId, LowerError> {
        if self.spec.model.qk_norm {
            self.norm_of(Norm::RmsNorm, x, name)
        } else {
            Ok(x)
        }
    }

    /// A routed MoE layer on `x[N, dim]` for block `block`; `seqs = (B, T)` groups tokens into
    /// sequences for `seq_aux` (`None`: the whole batch is one sequence).
    ///
    /// Router (scores → selection → weights, [`Routing`]), capacity, dispatch (route, gather,
    /// grouped experts, combine), balancing terms, then the metrics and router-state outputs of the
    /// module doc.
    fn moe(
        &mut self,
        x: NodeId,
        block: usize,
        moe: &Moe,
        seqs: Option<(usize, usize)>,
    ) -> Result<NodeId, LowerError> {
        let p = format!("model.layers.{block}.block_sparse_moe");
        let (r, bias) = self.router(x, block, moe, &p)?;
        let (y, route, layout) = self.dispatch(x, moe, &r, &p)?;
        let (load, router_z) = self.moe_metrics(block, moe, &r, route, layout, &p)?;
        self.balance_terms(block, moe, &r, router_z, seqs, &p)?;
        self.router_state_updates(block, moe, &r, bias, load, &p)?;
        Ok(y)
    }

    /// The router of an MoE layer on `x[N, dim]` (jitter on its input, the gate), and the bias input
    /// of `bias(...)` balancing when there is one.
    fn router(
        &mut self,
        x: NodeId,
        block: usize,
        moe: &Moe,
        p: &str,
    ) -> Result<(Routing, Option<NodeId>), LowerError> {
        let n = self.g.ty(x).rows();
        let e = moe.experts;
        // Switch-style multiplicative jitter on the router's input only.
        let xr = if moe.jitter != 0.0 {
            let d = self.last_dim(x);
            let j = self.g.input_as(
                &format!("jitter.{block}"),
                InputRole::Jitter,
                TensorType::f32(&[n, d]),
            );
            self.binary(BinaryOp::Mul, x, j, format!("{p}.jittered"))?
        } else {
            x
        };
        let bias = if moe
            .balance
            .iter()
            .any(|b| matches!(b, Balance::Bias { .. }))
        {
            Some(self.g.input_as(
                &format!("router_state.{block}.bias"),
                InputRole::RouterState,
                TensorType::f32(&[e]),
            ))
        } else {
            None
        };
        let r = match (moe.gate, moe.groups) {
            (Gate::ExpertChoice { capacity }, _) => {
                self.expert_choice_router(xr, moe, capacity, p)?
            }
            (Gate::Sinkhorn { .. }, _) => self.sinkhorn_router(xr, moe, p)?,
            (Gate::Auction { .. }, _) => self.auction_router(xr, block, moe, p)?,
            (
                Gate::Softmax { .. } | Gate::Sigmoid | Gate::NoisyTopK { .. } | Gate::Switch,
                Some((groups, m)),
            ) if moe.hierarchy == Hierarchy::TwoLevel => {
                self.two_level_router(xr, block, moe, groups, m, bias, p)?
            }
            (Gate::Softmax { .. } | Gate::Sigmoid | Gate::NoisyTopK { .. } | Gate::Switch, _) => {
                self.top_k_router(xr, block, moe, bias, p)?
            }
        };

        Ok((r, bias))
    }

    /// Capacity, route, gather, grouped experts and combine (plus shared experts) of the routing
    /// `r`: the layer's output, the route table and its layout.
    fn dispatch(
        &mut self,
        x: NodeId,
        moe: &Moe,
        r: &Routing,
        p: &str,
    ) -> Result<(NodeId, NodeId, RouteLayout), LowerError> {
        let (n, e) = (self.g.ty(x).rows(), moe.experts);
        let slots = n * r.k;
        let capacity = match (moe.capacity, r.capacity) {
            (_, Some(c)) => c,
            (Capacity::Factor { factor, .. }, None) => capacity_of(factor, n, r.k, e),
            (Capacity::Dropless, None) => slots,
        };
        let layout = RouteLayout {
            capacity: capacity.min(slots),
            ..RouteLayout::dropless(n, r.k, e, ROUTE_TILE)
        };
        let by_probability = matches!(
            moe.capacity,
            Capacity::Factor {
                drop: DropPolicy::Probability,
                ..
            }
        ) && layout.drops();
        let route = if by_probability {
            let prio = self.add(Op::GatherCols, &[r.probs, r.idx], format!("{p}.slot_probs"))?;
            self.add(
                Op::MoeRoute { layout },
                &[r.idx, prio],
                format!("{p}.route"),
            )?
        } else {
            self.add(Op::MoeRoute { layout }, &[r.idx], format!("{p}.route"))?
        };
        let xp = self.add(Op::MoeGather { layout }, &[x, route], format!("{p}.gather"))?;
        let yp = self.experts(xp, route, layout, &format!("{p}.experts"), moe.expert)?;
        let mut y = self.add(
            Op::MoeCombine { layout },
            &[yp, r.weights, route],
            format!("{p}.combine"),
        )?;
        if moe.shared_experts > 0 {
            let shared = Ffn {
                activation: moe.expert.activation,
                hidden: moe.shared_experts * moe.expert.hidden,
            };
            let ys = self.ffn(x, &format!("{p}.shared_expert"), shared)?;
            y = self.binary(BinaryOp::Add, y, ys, format!("{p}.plus_shared"))?;
        }

        Ok((y, route, layout))
    }

    /// The metric outputs of every MoE block, whatever its balancing (module doc): returns the load
    /// and `router_z`, which balancing and the bias update read.
    fn moe_metrics(
        &mut self,
        block: usize,
        moe: &Moe,
        r: &Routing,
        route: NodeId,
        layout: RouteLayout,
        p: &str,
    ) -> Result<(NodeId, NodeId), LowerError> {
        let (n, e, slots) = (layout.tokens, moe.experts, layout.tokens * r.k);
        let load = self.add(Op::RouteLoad { layout }, &[route], format!("{p}.load"))?;
        let router_z = self.router_z(r.logits, p)?;
        let dropped = if matches!(moe.gate, Gate::ExpertChoice { .. }) {
            // Expert choice has no token slots to drop: the fraction of tokens no expert took.
            let mask = self.add(Op::TopKMask { experts: e }, &[r.idx], format!("{p}.taken"))?;
            let any = self.reduce(ReduceOp::Max, mask, format!("{p}.served"))?;
            let any = self.reshape(any, &[1, n], format!("{p}.served_row"))?;
            let frac = self.reduce(ReduceOp::Mean, any, format!("{p}.served_frac"))?;
            let frac = self.reshape(frac, &[1], format!("{p}.served_scalar"))?;
            self.affine(frac, -1.0, 1.0, format!("{p}.dropped"))?
        } else {
            // (slots − kept) / slots: the count is exact in f32, so a dropless block reports 0 exactly.
            let kept = self.sum_all(load, &format!("{p}.kept"))?;
            let lost = self.affine(kept, -1.0, slots as f32, format!("{p}.lost"))?;
            self.affine(lost, 1.0 / slots as f32, 0.0, format!("{p}.dropped"))?
        };
        self.metrics.push((format!("moe.{block}.load"), load));
        self.metrics.push((format!("moe.{block}.dropped"), dropped));
        self.metrics
            .push((format!("moe.{block}.router_z"), router_z));
        self.metrics
            .push((format!("moe.{block}.router_logits"), r.logits));

        Ok((load, router_z))
    }

    /// The balancing loss terms of `moe.balance`, summed into the block's `aux` entry.
    fn balance_terms(
        &mut self,
        block: usize,
        moe: &Moe,
        r: &Routing,
        router_z: NodeId,
        seqs: Option<(usize, usize)>,
        p: &str,
    ) -> Result<(), LowerError> {
        let (n, e) = (self.g.ty(r.logits).rows(), moe.experts);
        let mut terms = Vec::new();
        let mut mask = None;
        for bal in &moe.balance {
            let term = match *bal {
                Balance::Aux(c) | Balance::SeqAux(c) => {
                    let mask = match mask {
                        Some(m) => m,
                        None => *mask.insert(self.add(
                            Op::TopKMask { experts: e },
                            &[r.idx],
                            format!("{p}.mask"),
                        )?),
                    };
                    let (groups, name) = match (*bal, seqs) {
                        (Balance::SeqAux(_), Some(bt)) => (bt, "seq_aux"),
                        (Balance::SeqAux(_), None) => ((1, n), "seq_aux"),
                        (
                            Balance::Aux(_)
                            | Balance::Z(_)
                            | Balance::Cv2 { .. }
                            | Balance::Bias { .. },
                            _,
                        ) => ((1, n), "aux"),
                    };
                    self.aux_loss(mask, r.probs, c, r.k_eff, groups, &format!("{p}.{name}"))?
                }
                Balance::Z(c) => self.affine(router_z, c as f32, 0.0, format!("{p}.z"))?,
                Balance::Cv2 { importance, load } => self.cv2_loss(r, importance, load, p)?,
                // Not a loss: a state update, below.
                Balance::Bias { .. } => continue,
            };
            terms.push(term);
        }
        if let Some((&first, rest)) = terms.split_first() {
            let mut total = first;
            for &t in rest {
                total = self.binary(BinaryOp::Add, total, t, format!("{p}.balance"))?;
            }
            self.aux.push((block, total));
        }

        Ok(())
    }

    /// Router state updates: graph outputs the runtime copies into the state after a step.
    fn router_state_updates(
        &mut self,
        block: usize,
        moe: &Moe,
        r: &Routing,
        bias: Option<NodeId>,
        load: NodeId,
        p: &str,
    ) -> Result<(), LowerError> {
        let slots = self.g.ty(r.idx).rows() * r.k;
        let e = moe.experts;
        for bal in &moe.balance {
            if let (Balance::Bias { rate }, Some(b)) = (*bal, bias) {
                let next = self.bias_update(b, load, rate, p)?;
                self.metrics
                    .push((format!("router_state.{block}.bias.next"), next));
            }
        }
        if let Some((prices, demand, rate)) = r.prices {
            // p_e += g · (demand_e − mean) / mean, with mean = T·k/E (each token has k first choices).
            let mean = slots as f64 / e as f64;
            let step = self.affine(
                demand,
                (rate / mean) as f32,
                -rate as f32,
                format!("{p}.price_step"),
            )?;
            let next = self.binary(BinaryOp::Add, prices, step, format!("{p}.prices_next"))?;
            self.metrics
                .push((format!("router_state.{block}.prices.next"), next));
        }
        Ok(())
    }

    /// Token-choice top-k gates (`softmax`, `switch`, `sigmoid`, `noisy_top_k`), flat or
    /// `group_limited`, with an optional selection bias (`bias(...)` balancing).
    fn top_k_router(
        &mut self,
        x: NodeId,
        block: usize,
        moe: &Moe,
        bias: Option<NodeId>,
        p: &str,
    ) -> Result<Routing, LowerError> {
        let (e, k) = (moe.experts, moe.top_k);
        let logits = self.linear(x, &format!("{p}.gate"), e, false)?;
        let noise = self.noise_source(x, block, moe, e, "", p)?;
        let lv = self.gate_level(
            logits,
            noise,
            moe.gate,
            k,
            bias,
            moe.groups.map(|(g, m)| (g, m, moe.top_groups)),
            p,
        )?;
        let dense = self.add(
            Op::ScatterCols { cols: e },
            &[lv.weights, lv.idx],
            format!("{p}.gates"),
        )?;
        Ok(Routing {
            logits,
            probs: lv.probs,
            idx: lv.idx,
            weights: lv.weights,
            k,
            k_eff: k as f64,
            capacity: None,
            gates: dense,
            smooth_load: lv.smooth_load,
            prices: None,
        })
    }

    /// The noise of a `noisy_top_k` gate over `cols` columns: `(noise logits x·Wnoise, ε input)`,
    /// or `None` for other gates. `suffix` tells the hierarchical primary gate's names apart.
    fn noise_source(
        &mut self,
        x: NodeId,
        block: usize,
        moe: &Moe,
        cols: usize,
        suffix: &str,
        p: &str,
    ) -> Result<Option<Noise>, LowerError> {
        let Gate::NoisyTopK { noise } = moe.gate else {
            return Ok(None);
        };
        let n = self.g.ty(x).rows();
        let name = if suffix.is_empty() {
            "noise".to_string()
        } else {
            format!("{suffix}_noise")
        };
        let logits = self.linear(x, &format!("{p}.{name}"), cols, false)?;
        let input = if suffix.is_empty() {
            format!("noise.{block}")
        } else {
            format!("noise.{block}.{suffix}")
        };
        let eps = self
            .g
            .input_as(&input, InputRole::Noise, TensorType::f32(&[n, cols]));
        Ok(Some(Noise {
            logits,
            eps,
            scale: noise,
        }))
    }

    /// One gating level on `logits[R, C]`: probabilities, selection of `k` columns and their weights
    /// as the gate kind says (see the module doc), and for `noisy_top_k` the smooth selection
    /// probabilities of the `cv2` load term. `bias` (`[C]`, or `[R, C]` row by row) shifts the
    /// selection scores only; `groups = (G, M, kept)` restricts the selection to the `kept` best
    /// groups (DeepSeek-V3).
    #[allow(clippy::too_many_arguments)]
    fn gate_level(
        &mut self,
        logits: NodeId,
        noise: Option<Noise>,
        gate: Gate,
        k: usize,
        bias: Option<NodeId>,
        groups: Option<(usize, usize, usize)>,
        p: &str,
    ) -> Result<Level, LowerError> {
        let (rows, cols) = (self.g.ty(logits).rows(), self.last_dim(logits));
        let softmax = |l: &mut Self, x: NodeId, label: String| {
            l.add(Op::Softmax { causal: false }, &[x], label)
        };
        // `scores`: what is selected on (before bias) and what the weights are read from.
        let (scores, probs, noisy) = match (gate, &noise) {
            (Gate::NoisyTopK { .. }, Some(nz)) => {
                let sd = self.unary(UnaryOp::Softplus, nz.logits, format!("{p}.noise_std"))?;
                let sd = self.affine(sd, nz.scale as f32, 0.0, format!("{p}.noise_scaled"))?;
                let eps = self.binary(BinaryOp::Mul, nz.eps, sd, format!("{p}.noise_sample"))?;
                let h = self.binary(BinaryOp::Add, logits, eps, format!("{p}.noisy_logits"))?;
                let probs = softmax(self, h, format!("{p}.probs"))?;
                (h, probs, Some(sd))
            }
            (Gate::Sigmoid, _) => {
                let s = self.unary(UnaryOp::Sigmoid, logits, format!("{p}.scores"))?;
                let total = self.reduce(ReduceOp::Sum, s, format!("{p}.scores_sum"))?;
                let probs = self.binary(BinaryOp::Div, s, total, format!("{p}.probs"))?;
                (s, probs, None)
            }
            (
                Gate::Softmax { .. }
                | Gate::NoisyTopK { .. }
                | Gate::Switch
                | Gate::ExpertChoice { .. }
                | Gate::Sinkhorn { .. }
                | Gate::Auction { .. },
                _,
            ) => {
                let probs = softmax(self, logits, format!("{p}.probs"))?;
                (probs, probs, None)
            }
        };
        let mut sel = match bias {
            Some(b) => self.binary(BinaryOp::Add, scores, b, format!("{p}.biased_scores"))?,
            None => scores,
        };
        if let Some((g, m, kept)) = groups {
            sel = self.limit_groups(sel, rows, g, m, kept, p)?;
        }
        // Noisy top-k selects with TopK(k + 1) so that the load estimator's thresholds (the k-th and
        // (k+1)-th noisy logits) come from the same sort as the selection.
        let (idx, smooth_load) = match noisy {
            Some(sd) if k < cols && sel == scores => {
                let idx1 = self.add(Op::TopK { k: k + 1 }, &[sel], format!("{p}.topk_plus_one"))?;
                let idx = self.add(
                    Op::SliceCols { start: 0, len: k },
                    &[idx1],
                    format!("{p}.topk"),
                )?;
                let load = self.smooth_load(logits, scores, sd, idx, idx1, k, p)?;
                (idx, Some(load))
            }
            _ => (self.add(Op::TopK { k }, &[sel], format!("{p}.topk"))?, None),
        };
        let picked = self.add(Op::GatherCols, &[scores, idx], format!("{p}.topk_scores"))?;
        let weights = match gate {
            // KeepTopK then softmax: a softmax over the kept noisy logits.
            Gate::NoisyTopK { .. } => softmax(self, picked, format!("{p}.weights"))?,
            Gate::Softmax { renorm: true } | Gate::Sigmoid => {
                let total = self.reduce(ReduceOp::Sum, picked, format!("{p}.topk_sum"))?;
                self.binary(BinaryOp::Div, picked, total, format!("{p}.weights"))?
            }
            Gate::Softmax { renorm: false }
            | Gate::Switch
            | Gate::ExpertChoice { .. }
            | Gate::Sinkhorn { .. }
            | Gate::Auction { .. } => picked,
        };
        Ok(Level {
            probs,
            idx,
            weights,
            smooth_load,
        })
    }

    /// DeepSeek-V3 group-limited selection: group score = sum of the top-2 scores of its M experts
    /// (the top-1 when M = 1); scores outside the `kept` best groups are pushed to −1e30.
    fn limit_groups(
        &mut self,
        sel: NodeId,
        rows: usize,
        g: usize,
        m: usize,
        kept: usize,
        p: &str,
    ) -> Result<NodeId, LowerError> {
        let by_group = self.reshape(sel, &[rows * g, m], format!("{p}.group_scores_in"))?;
        let top = self.add(
            Op::TopK { k: m.min(2) },
            &[by_group],
            format!("{p}.group_top"),
        )?;
        let vals = self.add(
            Op::GatherCols,
            &[by_group, top],
            format!("{p}.group_top_scores"),
        )?;
        let score = self.reduce(ReduceOp::Sum, vals, format!("{p}.group_score"))?;
        let score = self.reshape(score, &[rows, g], format!("{p}.group_scores"))?;
        let gidx = self.add(Op::TopK { k: kept }, &[score], format!("{p}.group_topk"))?;
        let gmask = self.add(
            Op::TopKMask { experts: g },
            &[gidx],
            format!("{p}.group_mask"),
        )?;
        let gmask = self.reshape(gmask, &[rows, g, 1], format!("{p}.group_mask_cols"))?;
        let shift = self.affine(gmask, 1e30, -1e30, format!("{p}.group_shift"))?;
        let sel3 = self.reshape(sel, &[rows, g, m], format!("{p}.scores_by_group"))?;
        let masked = self.binary(BinaryOp::Add, sel3, shift, format!("{p}.group_limited"))?;
        self.reshape(masked, &[rows, g * m], format!("{p}.group_limited_scores"))
    }

    /// Shazeer et al. (2017) smooth load per (row, column): `Φ((clean − threshold) / sd)`, threshold
    /// the k-th largest noisy logit excluding the column when it is selected (the (k+1)-th overall),
    /// else the k-th. `idx1` is `TopK(noisy, k + 1)`, `idx` its first k columns.
    #[allow(clippy::too_many_arguments)]
    fn smooth_load(
        &mut self,
        clean: NodeId,
        noisy: NodeId,
        sd: NodeId,
        idx: NodeId,
        idx1: NodeId,
        k: usize,
        p: &str,
    ) -> Result<NodeId, LowerError> {
        let cols = self.last_dim(clean);
        let i_in = self.add(
            Op::SliceCols { start: k, len: 1 },
            &[idx1],
            format!("{p}.threshold_in_idx"),
        )?;
        let i_out = self.add(
            Op::SliceCols {
                start: k - 1,
                len: 1,
            },
            &[idx1],
            format!("{p}.threshold_out_idx"),
        )?;
        let t_in = self.add(Op::GatherCols, &[noisy, i_in], format!("{p}.threshold_in"))?;
        let t_out = self.add(
            Op::GatherCols,
            &[noisy, i_out],
            format!("{p}.threshold_out"),
        )?;
        let is_in = self.add(Op::TopKMask { experts: cols }, &[idx], format!("{p}.is_in"))?;
        let gap = self.binary(BinaryOp::Sub, t_in, t_out, format!("{p}.threshold_gap"))?;
        let shift = self.binary(BinaryOp::Mul, is_in, gap, format!("{p}.threshold_shift"))?;
        let threshold = self.binary(BinaryOp::Add, t_out, shift, format!("{p}.threshold"))?;
        let margin = self.binary(BinaryOp::Sub, clean, threshold, format!("{p}.load_margin"))?;
        let z = self.binary(BinaryOp::Div, margin, sd, format!("{p}.load_z"))?;
        self.unary(UnaryOp::NormalCdf, z, format!("{p}.load_prob"))
    }

    /// Shazeer App. B two-level gate: a primary gate over G groups keeps `top_groups` of them, a
    /// secondary gate per group keeps `top_k` of its M experts; expert (i, j) gets `Gp_i · G_i,j`.
    ///
    /// `bias [E]` (`bias(...)` balancing) shifts the selection scores only: expert (i, j)'s secondary
    /// score by `b[i·M + j]`, group i's primary score by the mean of its M experts' biases
    /// (docs/DECISIONS.md, "Routing and balancing").
    #[allow(clippy::too_many_arguments)]
    fn two_level_router(
        &mut self,
        x: NodeId,
        block: usize,
        moe: &Moe,
        groups: usize,
        m: usize,
        bias: Option<NodeId>,
        p: &str,
    ) -> Result<Routing, LowerError> {
        let (n, e) = (self.g.ty(x).rows(), moe.experts);
        let k = moe.top_groups * moe.top_k;
        // The bias in each level's layout: `[G]` for the primary scores `[n, G]`, and `[n·G, M]`
        // rows for the secondary scores (row t·G + i holds group i's M experts of token t).
        let (group_bias, expert_bias) = match bias {
            Some(b) => {
                let by_group = self.reshape(b, &[groups, m], format!("{p}.bias_by_group"))?;
                let mean = self.reduce(ReduceOp::Mean, by_group, format!("{p}.group_bias_mean"))?;
                let gb = self.reshape(mean, &[groups], format!("{p}.group_bias"))?;
                let rows = self.add(
                    Op::BroadcastTo {
                        shape: vec![n, groups, m],
                    },
                    &[by_group],
                    format!("{p}.bias_per_token"),
                )?;
                let eb = self.reshape(rows, &[n * groups, m], format!("{p}.bias_rows"))?;
                (Some(gb), Some(eb))
            }
            None => (None, None),
        };
        let pl = self.linear(x, &format!("{p}.group_gate"), groups, false)?;
        let pn = self.noise_source(x, block, moe, groups, "groups", p)?;
        let prim = self.gate_level(
            pl,
            pn,
            moe.gate,
            moe.top_groups,
            group_bias,
            None,
            &format!("{p}.primary"),
        )?;
        let logits = self.linear(x, &format!("{p}.gate"), e, false)?;
        let sn = self.noise_source(x, block, moe, e, "", p)?;
        let sl = self.reshape(logits, &[n * groups, m], format!("{p}.gate_by_group"))?;
        let sn = match sn {
            Some(nz) => Some(Noise {
                logits: self.reshape(nz.logits, &[n * groups, m], format!("{p}.noise_by_group"))?,
                eps: self.reshape(nz.eps, &[n * groups, m], format!("{p}.eps_by_group"))?,
                scale: nz.scale,
            }),
            None => None,
        };
        let sec = self.gate_level(
            sl,
            sn,
            moe.gate,
            moe.top_k,
            expert_bias,
            None,
            &format!("{p}.secondary"),
        )?;
        // Dense products over [n, G, M], flattened to experts e = i·M + j.
        let product =
            |l: &mut Self, a: NodeId, b: NodeId, what: &str| -> Result<NodeId, LowerError> {
                let a = l.reshape(a, &[n, groups, 1], format!("{p}.{what}_primary"))?;
                let b = l.reshape(b, &[n, groups, m], format!("{p}.{what}_secondary"))?;
                let ab = l.binary(BinaryOp::Mul, a, b, format!("{p}.{what}_product"))?;
                l.reshape(ab, &[n, e], format!("{p}.{what}"))
            };
        let gp = self.add(
            Op::ScatterCols { cols: groups },
            &[prim.weights, prim.idx],
            format!("{p}.primary.gates"),
        )?;
        let gs = self.add(
            Op::ScatterCols { cols: m },
            &[sec.weights, sec.idx],
            format!("{p}.secondary.gates"),
        )?;
        let gates = product(self, gp, gs, "gates")?;
        let probs = product(self, prim.probs, sec.probs, "probs")?;
        let smooth_load = match (prim.smooth_load, sec.smooth_load) {
            (Some(a), Some(b)) => Some(product(self, a, b, "load_prob")?),
            _ => None,
        };
        // Exactly the k products of selected pairs are non-zero: top-k of the dense gates.
        let idx = self.add(Op::TopK { k }, &[gates], format!("{p}.topk"))?;
        let weights = self.add(Op::GatherCols, &[gates, idx], format!("{p}.weights"))?;
        Ok(Routing {
            logits,
            probs,
            idx,
            weights,
            k,
            k_eff: k as f64,
            capacity: None,
            gates,
            smooth_load,
            prices: None,
        })
    }

    /// Expert choice (Zhou et al. 2022): S = softmax(x·Wg); each expert takes its ⌈n·c/E⌉ best tokens.
    fn expert_choice_router(
        &mut self,
        x: NodeId,
        moe: &Moe,
        c: f64,
        p: &str,
    ) -> Result<Routing, LowerError> {
        let (n, e) = (self.g.ty(x).rows(), moe.experts);
        let logits = self.linear(x, &format!("{p}.gate"), e, false)?;
        let probs = self.add(
            Op::Softmax { causal: false },
            &[logits],
            format!("{p}.probs"),
        )?;
        let cap = ((n as f64 * c / e as f64).ceil() as usize).clamp(1, n);
        let idx = self.add(
            Op::ExpertChoice { capacity: cap },
            &[probs],
            format!("{p}.expert_choice"),
        )?;
        let weights = self.add(Op::GatherCols, &[probs, idx], format!("{p}.weights"))?;
        let gates = self.add(
            Op::ScatterCols { cols: e },
            &[weights, idx],
            format!("{p}.gates"),
        )?;
        Ok(Routing {
            logits,
            probs,
            idx,
            weights,
            k: e,
            k_eff: (e * cap) as f64 / n as f64,
            capacity: Some(cap),
            gates,
            smooth_load: None,
            prices: None,
        })
    }

    /// Megatron-LM Sinkhorn routing: top-k of the Sinkhorn-balanced `exp(logits)` (not
    /// differentiated); weights softmax (k > 1) or sigmoid (k = 1) of the logits, not renormalised.
    fn sinkhorn_router(&mut self, x: NodeId, moe: &Moe, p: &str) -> Result<Routing, LowerError> {
        let (e, k) = (moe.experts, moe.top_k);
        let Gate::Sinkhorn { iters } = moe.gate else {
            return Err(LowerError::Invalid(
                "sinkhorn router without a sinkhorn gate".into(),
            ));
        };
        let logits = self.linear(x, &format!("{p}.gate"), e, false)?;
        let balanced = self.add(Op::Sinkhorn { iters }, &[logits], format!("{p}.sinkhorn"))?;
        let idx = self.add(Op::TopK { k }, &[balanced], format!("{p}.topk"))?;
        let probs = self.add(
            Op::Softmax { causal: false },
            &[logits],
            format!("{p}.probs"),
        )?;
        let gate = if k == 1 {
            self.unary(UnaryOp::Sigmoid, logits, format!("{p}.scores"))?
        } else {
            probs
        };
        let weights = self.add(Op::GatherCols, &[gate, idx], format!("{p}.weights"))?;
        let gates = self.add(
            Op::ScatterCols { cols: e },
            &[weights, idx],
            format!("{p}.gates"),
        )?;
        Ok(Routing {
            logits,
            probs,
            idx,
            weights,
            k,
            k_eff: k as f64,
            capacity: None,
            gates,
            smooth_load: None,
            prices: None,
        })
    }

    /// The auction router (docs/language.md): values = softmax(x·Wg), prices from the router state; the
    /// won experts' probabilities renormalised are the weights; demand at the start prices feeds the
    /// price update.
    fn auction_router(
        &mut self,
        x: NodeId,
        block: usize,
        moe: &Moe,
        p: &str,
    ) -> Result<Routing, LowerError> {
        let (n, e, k) = (self.g.ty(x).rows(), moe.experts, moe.top_k);
        let Gate::Auction {
            rounds,
            epsilon,
            budget,
            price_rate,
        } = moe.gate
        else {
            return Err(LowerError::Invalid(
                "auction router without an auction gate".into(),
            ));
        };
        let factor = match moe.capacity {
            Capacity::Factor { factor, .. } => factor,
            Capacity::Dropless => 1.0,
        };
        let cap = capacity_of(factor, n, k, e);
        let logits = self.linear(x, &format!("{p}.gate"), e, false)?;
        let probs = self.add(
            Op::Softmax { causal: false },
            &[logits],
            format!("{p}.probs"),
        )?;
        let prices = self.g.input_as(
            &format!("router_state.{block}.prices"),
            InputRole::RouterState,
            TensorType::f32(&[e]),
        );
        let op = Op::Auction {
            rounds,
            epsilon: epsilon as f32,
            budget: budget as f32,
            capacity: cap,
            k,
        };
        let won = self.add(op, &[probs, prices], format!("{p}.auction"))?;
        let idx = self.add(
            Op::SliceCols { start: 0, len: k },
            &[won],
            format!("{p}.won"),
        )?;
        let picked = self.add(Op::GatherCols, &[probs, idx], format!("{p}.won_probs"))?;
        let total = self.reduce(ReduceOp::Sum, picked, format!("{p}.won_sum"))?;
        // A token that won nothing has total 0: the guard keeps its (unused) weights finite.
        let total = self.affine(total, 1.0, 1e-20, format!("{p}.won_sum_guarded"))?;
        let weights = self.binary(BinaryOp::Div, picked, total, format!("{p}.weights"))?;
        let gates = self.add(
            Op::ScatterCols { cols: e },
            &[weights, idx],
            format!("{p}.gates"),
        )?;
        // Demand: each token's k first choices by net value at the start-of-step prices.
        let net = self.binary(BinaryOp::Sub, probs, prices, format!("{p}.net_values"))?;
        let first = self.add(Op::TopK { k }, &[net], format!("{p}.first_choices"))?;
        let wants = self.add(Op::TopKMask { experts: e }, &[first], format!("{p}.wants"))?;
        let demand = self.column_sums(wants, &format!("{p}.demand"))?;
        Ok(Routing {
            logits,
            probs,
            idx,
            weights,
            k,
            k_eff: k as f64,
            capacity: Some(cap),
            gates,
            smooth_load: None,
            prices: Some((prices, demand, price_rate)),
        })
    }

    /// `Σ_t x[t, c]` of `x[T, C]` as `[C]`.
    fn column_sums(&mut self, x: NodeId, label: &str) -> Result<NodeId, LowerError> {
        let t = self.g.ty(x).shape.clone();
        let xt = self.permute(x, &[1, 0], format!("{label}_by_column"))?;
        let s = self.reduce(ReduceOp::Sum, xt, format!("{label}_sum"))?;
        self.reshape(s, &[t[1]], label)
    }

    /// Sum of every element of a 1-D `x` as `[1]`.
    fn sum_all(&mut self, x: NodeId, label: &str) -> Result<NodeId, LowerError> {
        let n = self.g.ty(x).numel();
        let row = self.reshape(x, &[1, n], format!("{label}_row"))?;
        let s = self.reduce(ReduceOp::Sum, row, format!("{label}_sum"))?;
        self.reshape(s, &[1], label)
    }

    /// CV² of a 1-D `x`: population variance / (mean² + 1e-10), as `[1]`.
    fn cv2(&mut self, x: NodeId, label: &str) -> Result<NodeId, LowerError> {
        let n = self.g.ty(x).numel();
        let row = self.reshape(x, &[1, n], format!("{label}_row"))?;
        let mean = self.reduce(ReduceOp::Mean, row, format!("{label}_mean"))?;
        let centred = self.binary(BinaryOp::Sub, row, mean, format!("{label}_centred"))?;
        let sq = self.unary(UnaryOp::Square, centred, format!("{label}_sq"))?;
        let var = self.reduce(ReduceOp::Mean, sq, format!("{label}_var"))?;
        let m2 = self.unary(UnaryOp::Square, mean, format!("{label}_mean_sq"))?;
        let m2 = self.affine(m2, 1.0, 1e-10, format!("{label}_mean_sq_eps"))?;
        let r = self.binary(BinaryOp::Div, var, m2, format!("{label}_ratio"))?;
        self.reshape(r, &[1], label)
    }

    /// docs/language.md `cv2(importance = a, load = b)`: `a·CV²(Importance) + b·CV²(Load)`.
    fn cv2_loss(&mut self, r: &Routing, a: f64, b: f64, p: &str) -> Result<NodeId, LowerError> {
        let importance = self.column_sums(r.gates, &format!("{p}.importance"))?;
        let cv_i = self.cv2(importance, &format!("{p}.importance_cv2"))?;
        let mut total = self.affine(cv_i, a as f32, 0.0, format!("{p}.cv2_importance"))?;
        if b != 0.0 {
            if let Some(probs) = r.smooth_load {
                let load = self.column_sums(probs, &format!("{p}.smooth_load"))?;
                let cv_l = self.cv2(load, &format!("{p}.smooth_load_cv2"))?;
                let term = self.affine(cv_l, b as f32, 0.0, format!("{p}.cv2_load"))?;
                total = self.binary(BinaryOp::Add, total, term, format!("{p}.cv2"))?;
            }
        }
        Ok(total)
    }

    /// DeepSeek-V3 loss-free balancing: `b + rate · sign(mean_load − load)`.
    fn bias_update(
        &mut self,
        b: NodeId,
        load: NodeId,
        rate: f64,
        p: &str,
    ) -> Result<NodeId, LowerError> {
        let e = self.g.ty(load).numel();
        let row = self.reshape(load, &[1, e], format!("{p}.load_row"))?;
        let mean = self.reduce(ReduceOp::Mean, row, format!("{p}.load_mean"))?;
        let under = self.binary(BinaryOp::Sub, mean, row, format!("{p}.underload"))?;
        let pos = self.unary(UnaryOp::Step, under, format!("{p}.underloaded"))?;
        let over = self.unary(UnaryOp::Neg, under, format!("{p}.overload"))?;
        let neg = self.unary(UnaryOp::Step, over, format!("{p}.overloaded"))?;
        let sign = self.binary(BinaryOp::Sub, pos, neg, format!("{p}.load_sign"))?;
        let sign = self.reshape(sign, &[e], format!("{p}.load_sign_flat"))?;
        let step = self.affine(sign, rate as f32, 0.0, format!("{p}.bias_step"))?;
        self.binary(BinaryOp::Add, b, step, format!("{p}.bias_next"))
    }

    /// The routed experts on gathered rows `xp[rows, dim]` (see the module doc for names).
    fn experts(
        &mut self,
        xp: NodeId,
        route: NodeId,
        layout: RouteLayout,
        p: &str,
        ffn: Ffn,
    ) -> Result<NodeId, LowerError> {
        let (e, d, h) = (layout.experts, self.last_dim(xp), ffn.hidden);
        let (init_in, init_out) = (self.weight_init(d), self.weight_init(h));
        let w1 = self.g.param(&format!("{p}.w1"), &[e, h, d], init_in);
        let a = self.add(
            Op::GroupedMatMul { layout },
            &[xp, w1, route],
            format!("{p}.h1"),
        )?;
        let a = self.activation(ffn.activation, a, format!("{p}.act"))?;
        let a = match ffn.activation {
            Activation::SwiGlu => {
                let w3 = self.g.param(&format!("{p}.w3"), &[e, h, d], init_in);
                let up = self.add(
                    Op::GroupedMatMul { layout },
                    &[xp, w3, route],
                    format!("{p}.h3"),
                )?;
                self.binary(BinaryOp::Mul, a, up, format!("{p}.glu"))?
            }
            Activation::Gelu | Activation::Relu => a,
        };
        let w2 = self.g.param(&format!("{p}.w2"), &[e, d, h], init_out);
        self.add(
            Op::GroupedMatMul { layout },
            &[a, w2, route],
            format!("{p}.out"),
        )
    }

    /// docs/language.md `aux(c)`: `c · E · Σ_e f_e · P_e` with `f_e = Σ_t sel[t,e] / (T·k)` and
    /// `P_e = Σ_t p[t,e] / T`, over `groups = (G, T)` sequences of T tokens, averaged over the G
    /// sequences (G = 1 is `aux`, G = B is `seq_aux`). The term is labelled `label`.
    fn aux_loss(
        &mut self,
        mask: NodeId,
        probs: NodeId,
        c: f64,
        k: f64,
        groups: (usize, usize),
        label: &str,
    ) -> Result<NodeId, LowerError> {
        let p = label.rsplit_once('.').map_or(label, |(prefix, _)| prefix);
        let (gn, t) = groups;
        let e = self.last_dim(mask);
        let mut col_means = Vec::new();
        for (x, what) in [(mask, "load"), (probs, "importance")] {
            let x = self.reshape(x, &[gn, t, e], format!("{p}.{what}_seq"))?;
            let x = self.permute(x, &[0, 2, 1], format!("{p}.{what}_by_expert"))?;
            col_means.push(self.reduce(ReduceOp::Mean, x, format!("{p}.{what}_mean"))?);
        }
        let prod = self.binary(
            BinaryOp::Mul,
            col_means[0],
            col_means[1],
            format!("{p}.aux_prod"),
        )?;
        let prod = self.reshape(prod, &[gn, e], format!("{p}.aux_prod_rows"))?;
        let mut s = self.reduce(ReduceOp::Sum, prod, format!("{p}.aux_sum"))?;
        if gn > 1 {
            s = self.reshape(s, &[1, gn], format!("{p}.aux_seqs"))?;
            s = self.reduce(ReduceOp::Mean, s, format!("{p}.aux_seq_mean"))?;
        }
        let s = self.reshape(s, &[1], format!("{p}.aux_scalar"))?;
        self.affine(s, (c * e as f64 / k) as f32, 0.0, label)
    }

    /// `mean_t (logsumexp_e logits[t,e])²` as `[1]` (logsumexp shifted by the row max): the
    /// `moe.N.router_z` metric, and the `z(c)` loss of docs/language.md times `c`.
    fn router_z(&mut self, logits: NodeId, p: &str) -> Result<NodeId, LowerError> {
        let n = self.g.ty(logits).rows();
        let m = self.reduce(ReduceOp::Max, logits, format!("{p}.z_max"))?;
        let shifted = self.binary(BinaryOp::Sub, logits, m, format!("{p}.z_shift"))?;
        let ex = self.unary(UnaryOp::Exp, shifted, format!("{p}.z_exp"))?;
        let s = self.reduce(ReduceOp::Sum, ex, format!("{p}.z_sum"))?;
        let l = self.unary(UnaryOp::Log, s, format!("{p}.z_log"))?;
        let lse = self.binary(BinaryOp::Add, l, m, format!("{p}.z_lse"))?;
        let sq = self.unary(UnaryOp::Square, lse, format!("{p}.z_sq"))?;
        let sq = self.reshape(sq, &[1, n], format!("{p}.z_row"))?;
        let mean = self.reduce(ReduceOp::Mean, sq, format!("{p}.z_mean"))?;
        self.reshape(mean, &[1], format!("{p}.router_z"))
    }

    /// Llama/Mixtral decoder: returns `(logits, ce)` as `head` asks for them.
    fn transformer(
        &mut self,
        batch: usize,
        head: Head,
    ) -> Result<(Option<NodeId>, Option<NodeId>), LowerError> {
        let spec = self.spec;
        let m = &spec.model;
        let vocab = m.vocab.ok_or(LowerError::Missing {
            field: "vocab",
            family: "transformer",
        })?;
        let t = m.context.ok_or(LowerError::Missing {
            field: "context",
            family: "transformer",
        })?;
        let (d, n) = (m.dim, batch * t);
        let tokens = self.g.input("tokens", TensorType::u32(&[batch, t]));
        let targets = self.g.input("targets", TensorType::u32(&[batch, t]));
        let emb = self.g.param(
            "model.embed_tokens.weight",
            &[vocab, d],
            Init::Normal { std: INIT_STD },
        );
        let x = self.add(Op::Embedding, &[emb, tokens], "model.embed_tokens")?;
        let mut x = self.reshape(x, &[n, d], "model.embed_rows")?;
        for i in 0..m.layers {
            let p = format!("model.layers.{i}");
            let h = self.norm(x, &format!("{p}.input_layernorm"))?;
            let a = self.attention(h, i, batch, t)?;
            x = self.binary(BinaryOp::Add, x, a, format!("{p}.attn_residual"))?;
            let h = self.norm(x, &format!("{p}.post_attention_layernorm"))?;
            let y = self.block_ffn(h, i, Some((batch, t)))?;
            x = self.binary(BinaryOp::Add, x, y, format!("{p}.ffn_residual"))?;
        }
        let h = self.norm(x, "model.norm")?;
        self.lm_head(h, emb, targets, batch, head)
    }

    /// The LM head and loss of `h[N, dim]` against `targets` (`[B, T]`, N = B·T) as `head` asks:
    /// `lm_head`, or the embedding matrix with `tie_embeddings`; `(logits, ce)`.
    fn lm_head(
        &mut self,
        h: NodeId,
        emb: NodeId,
        targets: NodeId,
        batch: usize,
        head: Head,
    ) -> Result<(Option<NodeId>, Option<NodeId>), LowerError> {
        let n = self.g.ty(h).rows();
        let (vocab, d) = (self.g.ty(emb).shape[0], self.g.ty(h).last());
        let w = if self.spec.model.tie_embeddings {
            emb
        } else {
            let init = self.weight_init(d);
            self.g.param("lm_head.weight", &[vocab, d], init)
        };
        let head_rows = match head {
            Head::Sampled => {
                let rows =
                    self.g
                        .input_as(LOGIT_ROWS, InputRole::LogitRows, TensorType::u32(&[batch]));
                self.add(Op::Embedding, &[h, rows], "lm_head.rows")?
            }
            Head::Logits | Head::Loss => h,
        };
        let logits = match head {
            Head::Logits | Head::Sampled => {
                Some(self.add(Op::MatMul { trans_b: true }, &[head_rows, w], "lm_head")?)
            }
            Head::Loss => None,
        };
        let targets = self.reshape(targets, &[n], "targets_flat")?;
        let ce = match (head, logits) {
            (Head::Logits, Some(logits)) => {
                Some(self.add(Op::CrossEntropy, &[logits, targets], "ce")?)
            }
            (Head::Loss, _) => Some(self.add(Op::LinearCrossEntropy, &[h, w, targets], "ce")?),
            _ => None,
        };
        Ok((logits, ce))
    }

    /// Classifier: residual pre-norm FFN/MoE blocks between an input projection and a linear head.
    fn mlp(&mut self, batch: usize) -> Result<(NodeId, NodeId), LowerError> {
        let spec = self.spec;
        let m = &spec.model;
        let inputs = m.inputs.ok_or(LowerError::Missing {
            field: "inputs",
            family: "mlp",
        })?;
        let classes = m.classes.ok_or(LowerError::Missing {
            field: "classes",
            family: "mlp",
        })?;
        let features = self.g.input("features", TensorType::f32(&[batch, inputs]));
        let targets = self.g.input("targets", TensorType::u32(&[batch]));
        let mut x = self.linear(features, "model.input_proj", m.dim, true)?;
        for i in 0..m.layers {
            let p = format!("model.layers.{i}");
            let h = self.norm(x, &format!("{p}.norm"))?;
            let y = self.block_ffn(h, i, None)?;
            x = self.binary(BinaryOp::Add, x, y, format!("{p}.residual"))?;
        }
        let h = self.norm(x, "model.norm")?;
        let logits = self.linear(h, "classifier", classes, true)?;
        let ce = self.add(Op::CrossEntropy, &[logits, targets], "ce")?;
        Ok((logits, ce))
    }

    /// The FFN of block `i`: routed MoE when the spec says so, else the dense `ffn`.
    fn block_ffn(
        &mut self,
        h: NodeId,
        i: usize,
        seqs: Option<(usize, usize)>,
    ) -> Result<NodeId, LowerError> {
        let spec = self.spec;
        match &spec.moe {
            Some(moe) if moe.is_moe_block(i) => self.moe(h, i, moe, seqs),
            _ => self.ffn(h, &format!("model.layers.{i}.mlp"), spec.model.ffn),
        }
    }

    fn finish(&mut self, logits: Option<NodeId>, ce: Option<NodeId>) -> Result<(), LowerError> {
        if let Some(logits) = logits {
            self.g.set_output("logits", logits);
        }
        if let Some(ce) = ce {
            self.g.set_output("ce", ce);
        }
        let terms = std::mem::take(&mut self.aux);
        for &(block, term) in &terms {
            self.g.set_output(&format!("aux.{block}"), term);
        }
        if let Some(ce) = ce {
            let mut loss = if terms.is_empty() {
                self.affine(ce, 1.0, 0.0, "loss")?
            } else {
                ce
            };
            for &(_, term) in &terms {
                loss = self.binary(BinaryOp::Add, loss, term, "loss")?;
            }
            self.g.set_output("loss", loss);
        }
        for (name, id) in std::mem::take(&mut self.metrics) {
            self.g.set_output(&name, id);
        }
        Ok(())
    }
}
