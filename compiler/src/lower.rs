//! Lower: the checked [`Spec`] → the forward [`Graph`] (logits, losses), for one static batch size.
//!
//! The graph uses the IR's primitive ops (reduce, broadcasting binary, affine, unary) for norms and
//! losses so that fusion sees small, fusable pieces, and the composites only where the IR has them
//! (softmax, RoPE, cross-entropy, the MoE routing ops).
//!
//! # Outputs
//! `logits` (`[B*T, V]`, or `[B, classes]` for `mlp`), `ce` (mean cross-entropy, `[1]`), `aux.N` for
//! every MoE block `N` that has balancing terms (the sum of that block's terms, `[1]`), and `loss` =
//! `ce` + Σ `aux.N` (`[1]`). `loss` is always its own node (an identity affine of `ce` when there are no
//! balancing terms) so that every output name owns one buffer.
//!
//! # Parameter names and layouts
//! HF Mixtral/Llama names (DESIGN.md), `[out, in]` linear weights read with `MatMul { trans_b }`:
//! - dense FFN `swiglu`: `mlp.{gate,up,down}_proj.weight`; `gelu` / `relu` have no gate, so they use
//!   `mlp.up_proj.weight` and `mlp.down_proj.weight` only (as GPT-style blocks under Llama names).
//! - LayerNorm adds `.bias` next to each norm's `.weight`.
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
//! # What is not lowered yet
//! `lstm` family; gates `noisy_top_k`, `expert_choice`, `sinkhorn`, `auction`; `groups`;
//! `capacity = factor(...)`; `cv2` and `bias` balancing; `jitter`. Each returns
//! [`LowerError::Unsupported`] naming the feature. The MoE code is split (scores → selection →
//! weights → dispatch → balancing) so those slot in as new score/selection arms.

use crate::ir::{
    BinaryOp, Graph, Init, IrError, NodeId, Op, ReduceOp, RouteLayout, TensorType, UnaryOp,
};
use crate::spec::{Activation, Balance, Capacity, Family, Ffn, Gate, Moe, Norm, Spec, NORM_EPS};

/// Rows per tile of the MoE routing table: every expert's segment of gathered rows is padded to a
/// multiple of this, so one grouped-matmul tile never straddles two experts. 16 matches the 16-row
/// shared-memory matmul tile and is a multiple of the 8-row register-blocked one; the emitter's
/// grouped matmul must use a row tile that divides it.
pub const ROUTE_TILE: usize = 16;

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

fn unsupported(feature: impl Into<String>) -> LowerError {
    LowerError::Unsupported {
        feature: feature.into(),
    }
}

/// Lowers `spec` to its forward graph for `batch` sequences (or samples, for `mlp`).
pub fn lower(spec: &Spec, batch: usize) -> Result<Graph, LowerError> {
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
    };
    let (logits, ce) = match spec.model.family {
        Family::Transformer => l.transformer(batch)?,
        Family::Mlp => l.mlp(batch)?,
        Family::Lstm => return Err(unsupported("the `lstm` family")),
    };
    l.finish(logits, ce)?;
    Ok(l.g)
}

fn check_moe_supported(moe: &Moe) -> Result<(), LowerError> {
    match moe.gate {
        Gate::Softmax { .. } | Gate::Switch | Gate::Sigmoid => {}
        Gate::NoisyTopK { .. } => return Err(unsupported("`gate = noisy_top_k`")),
        Gate::ExpertChoice { .. } => return Err(unsupported("`gate = expert_choice`")),
        Gate::Sinkhorn { .. } => return Err(unsupported("`gate = sinkhorn`")),
        Gate::Auction { .. } => return Err(unsupported("`gate = auction`")),
    }
    if moe.groups.is_some() {
        return Err(unsupported("`groups` (hierarchical gating)"));
    }
    if let Capacity::Factor { .. } = moe.capacity {
        return Err(unsupported(
            "`capacity = factor(...)` (only `dropless` is lowered)",
        ));
    }
    for b in &moe.balance {
        match b {
            Balance::Aux(_) | Balance::Z(_) | Balance::SeqAux(_) => {}
            Balance::Cv2 { .. } => return Err(unsupported("`cv2(...)` balancing")),
            Balance::Bias { .. } => return Err(unsupported("`bias(...)` balancing")),
        }
    }
    if moe.jitter != 0.0 {
        return Err(unsupported("`jitter`"));
    }
    if moe.experts == 0 || moe.top_k == 0 || moe.top_k > moe.experts {
        return Err(LowerError::Invalid(format!(
            "top_k = {} with {} experts",
            moe.top_k, moe.experts
        )));
    }
    Ok(())
}

struct Lower<'s> {
    g: Graph,
    spec: &'s Spec,
    /// `(block, summed balancing terms)` of every MoE block that has any.
    aux: Vec<(usize, NodeId)>,
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

    /// `x · Wᵀ (+ b)` with `W` `[out, in]` named `{name}.weight` (and `{name}.bias`).
    fn linear(
        &mut self,
        x: NodeId,
        name: &str,
        out: usize,
        bias: bool,
    ) -> Result<NodeId, LowerError> {
        let inp = self.last_dim(x);
        let w = self.g.param(
            &format!("{name}.weight"),
            &[out, inp],
            Init::Normal { std: INIT_STD },
        );
        let y = self.add(Op::MatMul { trans_b: true }, &[x, w], name)?;
        if !bias {
            return Ok(y);
        }
        let b = self
            .g
            .param(&format!("{name}.bias"), &[out], Init::Constant(0.0));
        self.binary(BinaryOp::Add, y, b, format!("{name}.bias_add"))
    }

    /// RMSNorm `x · rsqrt(mean(x²) + eps) · w`, or LayerNorm `(x - μ) · rsqrt(var + eps) · w + b`,
    /// over the last axis.
    fn norm(&mut self, x: NodeId, name: &str) -> Result<NodeId, LowerError> {
        let d = self.last_dim(x);
        let centred = match self.spec.model.norm {
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
        match self.spec.model.norm {
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

    /// Causal multi-head attention with RoPE and grouped-query heads on `h[B*T, dim]`.
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
        let q = self.add(Op::Rope { theta }, &[q], format!("{p}.q_rope"))?;
        let q = self.reshape(q, &[b, t, kv, g, hd], format!("{p}.q_groups"))?;
        let q = self.permute(q, &[0, 2, 3, 1, 4], format!("{p}.q_stack"))?;
        let q = self.reshape(q, &[b, kv, g * t, hd], format!("{p}.q_rows"))?;

        let k = self.reshape(k, &[b, t, kv, hd], format!("{p}.k_heads"))?;
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

    /// A routed MoE layer on `x[N, dim]` for block `block`; `seqs = (B, T)` groups tokens into
    /// sequences for `seq_aux` (`None`: the whole batch is one sequence).
    fn moe(
        &mut self,
        x: NodeId,
        block: usize,
        moe: &Moe,
        seqs: Option<(usize, usize)>,
    ) -> Result<NodeId, LowerError> {
        let p = format!("model.layers.{block}.block_sparse_moe");
        let n = self.g.ty(x).rows();
        let (e, k) = (moe.experts, moe.top_k);
        let logits = self.linear(x, &format!("{p}.gate"), e, false)?;

        // Scores to select on, the probabilities the balancing loss sees, and whether the selected
        // weights are renormalised. Switch keeps the raw top-1 probability (renormalising a single
        // weight would make it 1 and cut the router's gradient).
        let (scores, probs, renorm) = match moe.gate {
            Gate::Softmax { renorm } => {
                let p_ = self.add(
                    Op::Softmax { causal: false },
                    &[logits],
                    format!("{p}.probs"),
                )?;
                (p_, p_, renorm)
            }
            Gate::Switch => {
                let p_ = self.add(
                    Op::Softmax { causal: false },
                    &[logits],
                    format!("{p}.probs"),
                )?;
                (p_, p_, false)
            }
            // DeepSeek-V3: s = σ(logits); the balancing loss uses s normalised over all experts.
            Gate::Sigmoid => {
                let s = self.unary(UnaryOp::Sigmoid, logits, format!("{p}.scores"))?;
                let total = self.reduce(ReduceOp::Sum, s, format!("{p}.scores_sum"))?;
                let norm = self.binary(BinaryOp::Div, s, total, format!("{p}.probs"))?;
                (s, norm, true)
            }
            other => return Err(unsupported(format!("gate {other:?}"))),
        };
        let idx = self.add(Op::TopK { k }, &[scores], format!("{p}.topk"))?;
        let mut weights = self.add(Op::GatherCols, &[scores, idx], format!("{p}.topk_scores"))?;
        if renorm {
            let total = self.reduce(ReduceOp::Sum, weights, format!("{p}.topk_sum"))?;
            weights = self.binary(BinaryOp::Div, weights, total, format!("{p}.weights"))?;
        }

        let layout = RouteLayout {
            tokens: n,
            k,
            experts: e,
            tile: ROUTE_TILE,
        };
        let route = self.add(Op::MoeRoute { layout }, &[idx], format!("{p}.route"))?;
        let xp = self.add(Op::MoeGather { layout }, &[x, route], format!("{p}.gather"))?;
        let yp = self.experts(xp, route, layout, &format!("{p}.experts"), moe.expert)?;
        let mut y = self.add(
            Op::MoeCombine { layout },
            &[yp, weights, route],
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

        let mut terms = Vec::new();
        let mut mask = None;
        for bal in &moe.balance {
            let term = match *bal {
                Balance::Aux(c) | Balance::SeqAux(c) => {
                    let mask = match mask {
                        Some(m) => m,
                        None => *mask.insert(self.add(
                            Op::TopKMask { experts: e },
                            &[idx],
                            format!("{p}.mask"),
                        )?),
                    };
                    let groups = match (*bal, seqs) {
                        (Balance::SeqAux(_), Some(bt)) => bt,
                        _ => (1, n),
                    };
                    self.aux_loss(mask, probs, c, k, groups, &p)?
                }
                Balance::Z(c) => self.z_loss(logits, c, &p)?,
                other => return Err(unsupported(format!("balancing {other:?}"))),
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
        Ok(y)
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
        let normal = Init::Normal { std: INIT_STD };
        let w1 = self.g.param(&format!("{p}.w1"), &[e, h, d], normal);
        let a = self.add(
            Op::GroupedMatMul { layout },
            &[xp, w1, route],
            format!("{p}.h1"),
        )?;
        let a = self.activation(ffn.activation, a, format!("{p}.act"))?;
        let a = match ffn.activation {
            Activation::SwiGlu => {
                let w3 = self.g.param(&format!("{p}.w3"), &[e, h, d], normal);
                let up = self.add(
                    Op::GroupedMatMul { layout },
                    &[xp, w3, route],
                    format!("{p}.h3"),
                )?;
                self.binary(BinaryOp::Mul, a, up, format!("{p}.glu"))?
            }
            Activation::Gelu | Activation::Relu => a,
        };
        let w2 = self.g.param(&format!("{p}.w2"), &[e, d, h], normal);
        self.add(
            Op::GroupedMatMul { layout },
            &[a, w2, route],
            format!("{p}.out"),
        )
    }

    /// LANGUAGE.md `aux(c)`: `c · E · Σ_e f_e · P_e` with `f_e = Σ_t sel[t,e] / (T·k)` and
    /// `P_e = Σ_t p[t,e] / T`, over `groups = (G, T)` sequences of T tokens, averaged over the G
    /// sequences (G = 1 is `aux`, G = B is `seq_aux`).
    fn aux_loss(
        &mut self,
        mask: NodeId,
        probs: NodeId,
        c: f64,
        k: usize,
        groups: (usize, usize),
        p: &str,
    ) -> Result<NodeId, LowerError> {
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
        self.affine(s, (c * e as f64 / k as f64) as f32, 0.0, format!("{p}.aux"))
    }

    /// LANGUAGE.md `z(c)`: `c · mean_t (logsumexp_e logits[t,e])²`, logsumexp shifted by the row max.
    fn z_loss(&mut self, logits: NodeId, c: f64, p: &str) -> Result<NodeId, LowerError> {
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
        let mean = self.reshape(mean, &[1], format!("{p}.z_scalar"))?;
        self.affine(mean, c as f32, 0.0, format!("{p}.z"))
    }

    /// Llama/Mixtral decoder: returns `(logits[B*T, V], ce)`.
    fn transformer(&mut self, batch: usize) -> Result<(NodeId, NodeId), LowerError> {
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
        let logits = if m.tie_embeddings {
            self.add(Op::MatMul { trans_b: true }, &[h, emb], "lm_head")?
        } else {
            self.linear(h, "lm_head", vocab, false)?
        };
        let targets = self.reshape(targets, &[n], "targets_flat")?;
        let ce = self.add(Op::CrossEntropy, &[logits, targets], "ce")?;
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

    fn finish(&mut self, logits: NodeId, ce: NodeId) -> Result<(), LowerError> {
        self.g.set_output("logits", logits);
        self.g.set_output("ce", ce);
        let terms = std::mem::take(&mut self.aux);
        let mut loss = if terms.is_empty() {
            self.affine(ce, 1.0, 0.0, "loss")?
        } else {
            ce
        };
        for (block, term) in terms {
            self.g.set_output(&format!("aux.{block}"), term);
            loss = self.binary(BinaryOp::Add, loss, term, "loss")?;
        }
        self.g.set_output("loss", loss);
        Ok(())
    }
}
