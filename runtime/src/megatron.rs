//! `moec export megatron`: a spec as a Megatron-Core training run (beyond one device moec hands the
//! model to an engine people trust rather than grow a cluster runtime; docs/DECISIONS.md, "Export").
//!
//! Every feature of the spec becomes one [`Row`]: the `pretrain_gpt.py` flags that express it (names
//! from Megatron-LM's `megatron/training/arguments.py`, whose network flags are the
//! `TransformerConfig` field names with dashes), the same settings as `TransformerConfig` fields,
//! and how faithful the mapping is ([`Fidelity`]). The rows are the single source of the launch
//! script, the config JSON and `EXPORT.md`, so the three never disagree.
//!
//! Semantics compared (megatron-core 0.16, `megatron/core/transformer/moe/{router,moe_utils}.py`):
//! - `softmax(renorm = true)` is Megatron's default top-k (top-k on the logits, softmax over the k
//!   kept = the top-k probabilities renormalised); `renorm = false` and `switch` are
//!   `--moe-router-pre-softmax` (softmax, then top-k, weights the raw probabilities).
//! - `sigmoid` is `--moe-router-score-function sigmoid`, whose weights are the selected scores over
//!   their sum for k > 1 but the raw score for k = 1 (moec's weight is then 1): k = 1 is refused.
//! - Megatron's aux and seq-aux losses count f_e on a plain top-k of the scores, not on the actual
//!   selection, so with a selection bias or group-limited routing moec's `aux` / `seq_aux` (on the
//!   actual selection, docs/language.md) are approximations.
//! - Group-limited routing scores a group by the sum of its top `top_k / top_groups` scores; moec by
//!   its top 2 (DeepSeek-V3): exact when `top_k / top_groups` is 2 (or 1 for one-expert groups).
//!   Under `softmax(renorm = true)` Megatron limits groups on the logits, moec on the
//!   probabilities.
//! - Sinkhorn iterates to a tolerance of 1e-4 instead of moec's fixed `iters`, and Megatron refuses
//!   it with an aux loss or a capacity factor.
//! - Capacity: `probs` drops the lowest routing probabilities of each expert, as moec's
//!   `drop = probability` when Megatron's routing probabilities are moec's (softmax without
//!   renormalisation); `position` keeps `capacity` of an expert's tokens chosen by `torch.topk` on a
//!   0/1 map (ties in no promised order), where moec keeps the earliest.

use crate::checkpoint::hf_config;
use moec_compiler::spec::{
    Activation, Balance, Capacity, Data, DropPolicy, ExpertLr, Family, Gate, Hierarchy, Moe, Norm,
    Optimizer, Precision, Schedule, Spec, Train, NORM_EPS,
};
use serde_json::{json, Map, Value};
use std::fmt::Write as _;

/// The parallel layout asked for on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parallel {
    /// Tensor-parallel size.
    pub tp: usize,
    /// Pipeline-parallel size.
    pub pp: usize,
    /// Expert-parallel size.
    pub ep: usize,
    /// GPUs in total (all nodes).
    pub gpus: usize,
}

impl Default for Parallel {
    fn default() -> Self {
        Parallel {
            tp: 1,
            pp: 1,
            ep: 1,
            gpus: 1,
        }
    }
}

/// How faithfully Megatron-Core runs a spec feature.
#[derive(Debug, Clone, PartialEq)]
pub enum Fidelity {
    /// The same computation.
    Exact,
    /// Close, with the stated difference; exported with the difference written down.
    Approximate(String),
    /// Megatron-Core has no such feature (the reason); refused unless `--allow-approx`, which
    /// exports the stated substitute.
    Inexpressible(String),
}

/// One spec feature and what Megatron makes of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The feature as the spec says it, e.g. `moe.gate = sigmoid`.
    pub feature: String,
    pub fidelity: Fidelity,
    /// `pretrain_gpt.py` flags: `(name, value)`, `None` for a switch.
    pub flags: Vec<(&'static str, Option<String>)>,
    /// The same settings as `TransformerConfig` fields.
    pub config: Vec<(&'static str, Value)>,
}

impl Row {
    fn new(feature: impl Into<String>) -> Self {
        Row {
            feature: feature.into(),
            fidelity: Fidelity::Exact,
            flags: Vec::new(),
            config: Vec::new(),
        }
    }
    fn flag(mut self, name: &'static str, value: impl ToString) -> Self {
        self.flags.push((name, Some(value.to_string())));
        self
    }
    fn switch(mut self, name: &'static str) -> Self {
        self.flags.push((name, None));
        self
    }
    fn field(mut self, name: &'static str, value: Value) -> Self {
        self.config.push((name, value));
        self
    }
    fn approx(mut self, why: impl Into<String>) -> Self {
        self.fidelity = Fidelity::Approximate(why.into());
        self
    }
    fn inexpressible(mut self, why: impl Into<String>) -> Self {
        self.fidelity = Fidelity::Inexpressible(why.into());
        self
    }
    /// Approximate only when `cond` holds.
    fn approx_if(self, cond: bool, why: impl Into<String>) -> Self {
        if cond {
            self.approx(why)
        } else {
            self
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExportError {
    #[error("Megatron-Core cannot express {}; pass --allow-approx to export the substitutes listed in EXPORT.md instead", list(.0))]
    Inexpressible(Vec<String>),
    #[error("cannot lay out the run: {0}")]
    Layout(String),
    #[error("Megatron's GPT model is a transformer; `family = {0}` is not")]
    Family(&'static str),
}

fn list(features: &[String]) -> String {
    features.join("; ")
}

/// A spec as a Megatron-Core run: its rows and the parallel layout.
#[derive(Debug, Clone)]
pub struct Export {
    pub name: String,
    pub rows: Vec<Row>,
    pub parallel: Parallel,
    /// Data-parallel size: `gpus / (tp · pp)`.
    pub data_parallel: usize,
}

/// Maps `spec` to Megatron-Core. Features Megatron cannot express are an error naming every one of
/// them, unless `allow_approx`.
pub fn export(spec: &Spec, parallel: Parallel, allow_approx: bool) -> Result<Export, ExportError> {
    let m = &spec.model;
    let family = match m.family {
        Family::Transformer => None,
        Family::Lstm => Some("lstm"),
        Family::Mlp => Some("mlp"),
    };
    if let Some(f) = family {
        return Err(ExportError::Family(f));
    }
    let data_parallel = layout(spec, parallel)?;
    let mut rows = model_rows(spec, parallel);
    if let Some(moe) = &spec.moe {
        rows.extend(moe_rows(spec, moe));
    }
    if let Some(train) = &spec.train {
        rows.extend(train_rows(train, data_parallel)?);
    }
    rows.push(parallel_row(parallel));
    let refused: Vec<String> = rows
        .iter()
        .filter_map(|r| match &r.fidelity {
            Fidelity::Inexpressible(why) => Some(format!("{} ({why})", r.feature)),
            _ => None,
        })
        .collect();
    if !refused.is_empty() && !allow_approx {
        return Err(ExportError::Inexpressible(refused));
    }
    Ok(Export {
        name: spec.name.clone(),
        rows,
        parallel,
        data_parallel,
    })
}

/// Checks the parallel sizes against the model (Megatron's own constraints) and returns the
/// data-parallel size.
fn layout(spec: &Spec, p: Parallel) -> Result<usize, ExportError> {
    let m = &spec.model;
    let bad = |what: String| Err(ExportError::Layout(what));
    if p.tp == 0 || p.pp == 0 || p.ep == 0 || p.gpus == 0 {
        return bad("--tp, --pp, --ep and --gpus must be at least 1".into());
    }
    if !p.gpus.is_multiple_of(p.tp * p.pp) {
        return bad(format!(
            "{} GPUs are not a multiple of tp × pp = {}",
            p.gpus,
            p.tp * p.pp
        ));
    }
    let dp = p.gpus / (p.tp * p.pp);
    if !m.heads.is_multiple_of(p.tp) || !m.kv_heads.is_multiple_of(p.tp) {
        return bad(format!(
            "{} heads and {} kv heads do not split over tp = {}",
            m.heads, m.kv_heads, p.tp
        ));
    }
    if !m.layers.is_multiple_of(p.pp) {
        return bad(format!(
            "{} layers do not split evenly over pp = {}",
            m.layers, p.pp
        ));
    }
    match &spec.moe {
        Some(moe) => {
            if !moe.experts.is_multiple_of(p.ep) {
                return bad(format!(
                    "{} experts do not split over ep = {}",
                    moe.experts, p.ep
                ));
            }
            // Expert parallelism spans the data-parallel (and, with ETP = TP, tensor) ranks.
            if !(dp * p.tp).is_multiple_of(p.ep * p.tp) {
                return bad(format!(
                    "ep = {} does not divide the data-parallel size {dp}",
                    p.ep
                ));
            }
        }
        None if p.ep > 1 => return bad("--ep > 1 needs experts".into()),
        None => {}
    }
    Ok(dp)
}

/// `[..]` of the layer pattern as Megatron's `moe_freq_type` parses it.
fn layer_pattern(layers: usize, moe: &Moe) -> String {
    let bits: Vec<&str> = (0..layers)
        .map(|i| if moe.is_moe_block(i) { "1" } else { "0" })
        .collect();
    format!("[{}]", bits.join(","))
}

/// Megatron's name of an activation (`silu` is gated: SwiGLU), or why it has none.
fn activation(a: Activation) -> Result<&'static str, String> {
    match a {
        Activation::SwiGlu => Ok("silu"),
        // moec's gelu is the tanh approximation, which is Megatron's `--openai-gelu`.
        Activation::Gelu => Ok("openai_gelu"),
        Activation::Relu => Err(
            "pretrain_gpt.py has no flag for a plain ReLU FFN (gelu, openai-gelu, squared-relu, swiglu, quick-geglu)"
                .into(),
        ),
    }
}

fn activation_flags(row: Row, a: Activation) -> Row {
    match activation(a) {
        Ok("silu") => row
            .switch("--swiglu")
            .field("gated_linear_unit", json!(true))
            .field("activation_func", json!("silu")),
        Ok(name) => row
            .switch("--openai-gelu")
            .field("gated_linear_unit", json!(false))
            .field("activation_func", json!(name)),
        Err(why) => row.inexpressible(why),
    }
}

fn model_rows(spec: &Spec, p: Parallel) -> Vec<Row> {
    let m = &spec.model;
    let (vocab, context) = (m.vocab.unwrap_or(0), m.context.unwrap_or(0));
    let eps: f64 = NORM_EPS.to_string().parse().unwrap_or(1e-5);
    let mut rows = vec![
        Row::new(format!("model.vocab = {vocab}"))
            .flag("--tokenizer-type", "NullTokenizer")
            .flag("--vocab-size", vocab)
            .flag("--make-vocab-size-divisible-by", 1)
            .approx_if(
                !vocab.is_multiple_of(p.tp),
                format!("the vocabulary is padded to a multiple of tp = {} (extra logit rows that are never targets)", p.tp),
            ),
        Row::new(format!("model.dim = {}", m.dim))
            .flag("--hidden-size", m.dim)
            .field("hidden_size", json!(m.dim)),
        Row::new(format!("model.layers = {}", m.layers))
            .flag("--num-layers", m.layers)
            .field("num_layers", json!(m.layers)),
        Row::new(format!("model.heads = {}", m.heads))
            .flag("--num-attention-heads", m.heads)
            .flag("--kv-channels", m.head_dim())
            .field("num_attention_heads", json!(m.heads))
            .field("kv_channels", json!(m.head_dim())),
        {
            let row = Row::new(format!("model.kv_heads = {}", m.kv_heads))
                .field("num_query_groups", json!(m.kv_heads));
            if m.kv_heads < m.heads {
                row.switch("--group-query-attention")
                    .flag("--num-query-groups", m.kv_heads)
            } else {
                row
            }
        },
        Row::new(format!("model.context = {context}"))
            .flag("--seq-length", context)
            .flag("--max-position-embeddings", context),
        match m.norm {
            Norm::RmsNorm => Row::new("model.norm = rmsnorm")
                .flag("--normalization", "RMSNorm")
                .field("normalization", json!("RMSNorm")),
            Norm::LayerNorm => Row::new("model.norm = layernorm")
                .flag("--normalization", "LayerNorm")
                .field("normalization", json!("LayerNorm")),
        }
        .flag("--norm-epsilon", eps)
        .field("layernorm_epsilon", json!(eps)),
        {
            let theta = m.rope_theta;
            let row = Row::new(format!("model.rope_theta = {theta}"))
                .flag("--position-embedding-type", "rope")
                .flag("--rotary-base", theta.round() as u64)
                .flag("--rotary-percent", "1.0")
                .switch("--no-rope-fusion");
            row.approx_if(
                theta.fract() != 0.0,
                "--rotary-base takes an integer: the base is rounded",
            )
        },
        {
            let row = Row::new(format!(
                "model.ffn = {}(hidden = {})",
                act_name(m.ffn.activation),
                m.ffn.hidden
            ))
            .flag("--ffn-hidden-size", m.ffn.hidden)
            .field("ffn_hidden_size", json!(m.ffn.hidden));
            // With every block MoE the experts' row carries the (one) activation.
            let all_moe = spec.moe.as_ref().is_some_and(|moe| moe.blocks.len() == m.layers);
            if all_moe {
                row
            } else {
                activation_flags(row, m.ffn.activation)
            }
        },
        if m.tie_embeddings {
            Row::new("model.tie_embeddings = true")
        } else {
            Row::new("model.tie_embeddings = false")
                .switch("--untie-embeddings-and-output-weights")
        },
        Row::new("linear layers without biases, no dropout")
            .switch("--disable-bias-linear")
            .flag("--attention-dropout", "0.0")
            .flag("--hidden-dropout", "0.0")
            .field("add_bias_linear", json!(false))
            .field("attention_dropout", json!(0.0))
            .field("hidden_dropout", json!(0.0)),
        Row::new("init N(0, 0.02²)")
            .flag("--init-method-std", "0.02")
            .field("init_method_std", json!(0.02))
            .approx("Megatron scales the init of each block's output projections by 1/√(2·layers); moec does not (matters only for runs started from scratch)"),
    ];
    if m.qk_norm {
        rows.push(
            Row::new("model.qk_norm = true")
                .switch("--qk-layernorm")
                .field("qk_layernorm", json!(true))
                .approx_if(
                    m.norm == Norm::LayerNorm,
                    "Megatron's QK-norm uses the model's norm (LayerNorm here); moec's is RMSNorm",
                ),
        );
    }
    rows
}

fn act_name(a: Activation) -> &'static str {
    match a {
        Activation::SwiGlu => "swiglu",
        Activation::Gelu => "gelu",
        Activation::Relu => "relu",
    }
}

fn moe_rows(spec: &Spec, moe: &Moe) -> Vec<Row> {
    let m = &spec.model;
    let all_moe = moe.blocks.len() == m.layers;
    let freq = if all_moe {
        json!(1)
    } else {
        let bits: Vec<u8> = (0..m.layers).map(|i| moe.is_moe_block(i) as u8).collect();
        json!(bits)
    };
    let mut rows = vec![
        Row::new(format!("moe.experts = {}", moe.experts))
            .flag("--num-experts", moe.experts)
            .field("num_moe_experts", json!(moe.experts))
            .switch("--moe-grouped-gemm")
            .flag("--moe-token-dispatcher-type", "alltoall")
            .field("moe_token_dispatcher_type", json!("alltoall")),
        Row::new(format!("MoE blocks {:?}", moe.blocks))
            .flag(
                "--moe-layer-freq",
                if all_moe {
                    "1".to_string()
                } else {
                    layer_pattern(m.layers, moe)
                },
            )
            .field("moe_layer_freq", freq),
        Row::new(format!("moe.top_k = {}", moe.top_k))
            .flag("--moe-router-topk", moe.top_k)
            .field("moe_router_topk", json!(moe.top_k)),
        {
            let row = Row::new(format!(
                "moe.expert = {}(hidden = {})",
                act_name(moe.expert.activation),
                moe.expert.hidden
            ))
            .flag("--moe-ffn-hidden-size", moe.expert.hidden)
            .field("moe_ffn_hidden_size", json!(moe.expert.hidden));
            let dense_blocks = moe.blocks.len() < m.layers;
            if dense_blocks && moe.expert.activation != m.ffn.activation {
                row.inexpressible(
                    "Megatron has one activation for dense FFNs and experts; the spec's differ",
                )
            } else if all_moe {
                activation_flags(row, moe.expert.activation)
            } else {
                // The dense FFN row already carries the (shared) activation.
                match activation(moe.expert.activation) {
                    Ok(_) => row,
                    Err(why) => row.inexpressible(why),
                }
            }
        },
        Row::new(format!(
            "moe.router_precision = {}",
            match moe.router_precision {
                Precision::F32 => "f32",
                Precision::F16 => "f16",
            }
        ))
        .flag("--moe-router-dtype", "fp32")
        .field("moe_router_dtype", json!("fp32"))
        .approx_if(
            moe.router_precision == Precision::F16,
            "Megatron's router runs in fp32 or fp64, not f16",
        ),
    ];
    if moe.shared_experts > 0 {
        let size = moe.shared_experts * moe.expert.hidden;
        rows.push(
            Row::new(format!("moe.shared_experts = {}", moe.shared_experts))
                .flag("--moe-shared-expert-intermediate-size", size)
                .field("moe_shared_expert_intermediate_size", json!(size)),
        );
    }
    rows.push(gate_row(moe));
    if let Some(row) = groups_row(moe) {
        rows.push(row);
    }
    if let Some(row) = capacity_row(moe) {
        rows.push(row);
    }
    rows.extend(balance_rows(moe));
    if moe.jitter != 0.0 {
        rows.push(
            Row::new(format!("moe.jitter = {}", moe.jitter))
                .flag("--moe-input-jitter-eps", moe.jitter)
                .field("moe_input_jitter_eps", json!(moe.jitter)),
        );
    }
    rows
}

fn gate_row(moe: &Moe) -> Row {
    let softmax = |row: Row| {
        row.flag("--moe-router-score-function", "softmax")
            .field("moe_router_score_function", json!("softmax"))
    };
    let pre_softmax = |row: Row| {
        softmax(row)
            .switch("--moe-router-pre-softmax")
            .field("moe_router_pre_softmax", json!(true))
    };
    match moe.gate {
        Gate::Softmax { renorm: true } => softmax(Row::new("moe.gate = softmax(renorm = true)")),
        Gate::Softmax { renorm: false } => pre_softmax(Row::new("moe.gate = softmax(renorm = false)")),
        Gate::Switch => pre_softmax(Row::new("moe.gate = switch")),
        Gate::Sigmoid => {
            let row = Row::new("moe.gate = sigmoid")
                .flag("--moe-router-score-function", "sigmoid")
                .field("moe_router_score_function", json!("sigmoid"));
            if moe.top_k == 1 {
                row.inexpressible("with top_k = 1 Megatron weights the expert by its sigmoid score, moec by 1")
            } else {
                row
            }
        }
        Gate::Sinkhorn { iters } => Row::new(format!("moe.gate = sinkhorn(iters = {iters})"))
            .approx(format!("Megatron iterates Sinkhorn to a tolerance of 1e-4 instead of {iters} fixed iterations (the same balanced assignment once converged)")),
        Gate::NoisyTopK { noise } => softmax(Row::new(format!("moe.gate = noisy_top_k(noise = {noise})")))
            .inexpressible("Megatron has no noisy top-k gate (substitute: softmax top-k without noise)"),
        Gate::ExpertChoice { capacity } => softmax(Row::new(format!("moe.gate = expert_choice(capacity = {capacity})")))
            .inexpressible("Megatron routes by token choice only (substitute: softmax top-k)"),
        Gate::Auction { rounds, .. } => softmax(Row::new(format!("moe.gate = auction(rounds = {rounds}, ...)")))
            .inexpressible("Megatron has no auction router (substitute: softmax top-k)"),
    }
}

fn groups_row(moe: &Moe) -> Option<Row> {
    let (g, m) = moe.groups?;
    let feature = format!(
        "moe.groups = {g} x {m}, hierarchy = {}, top_groups = {}",
        match moe.hierarchy {
            Hierarchy::TwoLevel => "two_level",
            Hierarchy::GroupLimited => "group_limited",
        },
        moe.top_groups
    );
    if moe.hierarchy == Hierarchy::TwoLevel {
        return Some(Row::new(feature).inexpressible(
            "Megatron has no two-level (primary and secondary gate) hierarchy (substitute: flat routing)",
        ));
    }
    let row = Row::new(feature)
        .flag("--moe-router-num-groups", g)
        .flag("--moe-router-group-topk", moe.top_groups)
        .field("moe_router_num_groups", json!(g))
        .field("moe_router_group_topk", json!(moe.top_groups));
    let per_group = moe.top_k / moe.top_groups;
    let row = if per_group != m.min(2) || !moe.top_k.is_multiple_of(moe.top_groups) {
        row.approx(format!(
            "Megatron scores a group by its top {per_group} scores, moec by its top {}",
            m.min(2)
        ))
    } else {
        row
    };
    Some(row.approx_if(
        moe.gate == (Gate::Softmax { renorm: true }),
        "Megatron picks the groups on the logits, moec on the probabilities",
    ))
}

fn capacity_row(moe: &Moe) -> Option<Row> {
    let Capacity::Factor { factor, drop } = moe.capacity else {
        return None;
    };
    let (name, policy) = match drop {
        DropPolicy::Position => ("position", "position"),
        DropPolicy::Probability => ("probability", "probs"),
    };
    let row = Row::new(format!("moe.capacity = factor({factor}, drop = {name})"))
        .flag("--moe-expert-capacity-factor", factor)
        .flag("--moe-token-drop-policy", policy)
        .field("moe_expert_capacity_factor", json!(factor))
        .field("moe_token_drop_policy", json!(policy));
    if matches!(moe.gate, Gate::Sinkhorn { .. }) {
        return Some(row.inexpressible("Megatron allows a capacity factor only with aux-loss or no balancing, not Sinkhorn (substitute: dropless)"));
    }
    let same_probs = matches!(moe.gate, Gate::Softmax { renorm: false } | Gate::Switch);
    Some(match drop {
        DropPolicy::Position => row.approx("Megatron keeps `capacity` of an expert's tokens picked by torch.topk on a 0/1 map (no promised order), moec the earliest; the kept counts agree"),
        DropPolicy::Probability => row.approx_if(
            !same_probs,
            "Megatron ranks an expert's tokens by their gate weight, moec by the router probability",
        ),
    })
}

fn balance_rows(moe: &Moe) -> Vec<Row> {
    let sinkhorn = matches!(moe.gate, Gate::Sinkhorn { .. });
    let biased_or_grouped = moe
        .balance
        .iter()
        .any(|b| matches!(b, Balance::Bias { .. }))
        || (moe.groups.is_some() && moe.hierarchy == Hierarchy::GroupLimited);
    let mut rows = Vec::new();
    // (Megatron type, coefficient) of the loss terms, in spec order.
    let mut types: Vec<(&str, f64)> = Vec::new();
    for b in &moe.balance {
        let row = match *b {
            Balance::Aux(c) | Balance::SeqAux(c) => {
                let (kind, name) = if matches!(b, Balance::Aux(_)) {
                    ("aux_loss", "aux")
                } else {
                    ("seq_aux_loss", "seq_aux")
                };
                let row = Row::new(format!("moe.balance {name}({c})"));
                if sinkhorn {
                    row.inexpressible(
                        "Megatron's Sinkhorn router refuses an aux loss (substitute: none)",
                    )
                } else {
                    types.push((kind, c));
                    row.approx_if(
                        biased_or_grouped,
                        "Megatron counts f_e on a plain top-k of the scores, moec on the actual (biased or group-limited) selection",
                    )
                }
            }
            Balance::Z(c) => Row::new(format!("moe.balance z({c})"))
                .flag("--moe-z-loss-coeff", c)
                .field("moe_z_loss_coeff", json!(c)),
            Balance::Bias { rate } => {
                let row = Row::new(format!("moe.balance bias(rate = {rate})"))
                    .switch("--moe-router-enable-expert-bias")
                    .flag("--moe-router-bias-update-rate", rate)
                    .field("moe_router_enable_expert_bias", json!(true))
                    .field("moe_router_bias_update_rate", json!(rate));
                if moe.gate == Gate::Sigmoid {
                    row
                } else {
                    row.inexpressible("Megatron's expert bias needs the sigmoid score function")
                }
            }
            Balance::Cv2 { importance, load } => Row::new(format!(
                "moe.balance cv2(importance = {importance}, load = {load})"
            ))
            .inexpressible("Megatron has no CV² importance/load loss (substitute: none)"),
        };
        rows.push(row);
    }
    let (kind, coeff) = match (sinkhorn, types.as_slice()) {
        (true, _) => (json!("sinkhorn"), json!(0.0)),
        (false, []) => (json!("none"), json!(0.0)),
        (false, [(k, c)]) => (json!(k), json!(c)),
        (false, many) => (
            json!(many.iter().map(|(k, _)| *k).collect::<Vec<_>>()),
            json!(many.iter().map(|(_, c)| *c).collect::<Vec<_>>()),
        ),
    };
    let words = |v: &Value| match v {
        Value::Array(items) => items
            .iter()
            .map(|i| i.to_string().trim_matches('"').to_string())
            .collect::<Vec<_>>()
            .join(" "),
        other => other.to_string().trim_matches('"').to_string(),
    };
    rows.push(
        Row::new("load-balancing type")
            .flag("--moe-router-load-balancing-type", words(&kind))
            .flag("--moe-aux-loss-coeff", words(&coeff))
            .field("moe_router_load_balancing_type", kind)
            .field("moe_aux_loss_coeff", coeff),
    );
    rows
}

fn train_rows(t: &Train, dp: usize) -> Result<Vec<Row>, ExportError> {
    let global = t.batch * t.accumulate;
    // Megatron's aux losses and capacity are per micro-batch, as moec's per micro-step: keep moec's
    // micro-batch on each data-parallel rank when the global batch allows it.
    let micro = if global.is_multiple_of(t.batch * dp) {
        t.batch
    } else if global.is_multiple_of(dp) {
        global / dp
    } else {
        return Err(ExportError::Layout(format!(
            "the global batch {global} (batch × accumulate) does not split over {dp} data-parallel ranks"
        )));
    };
    let mut rows = vec![
        Row::new(format!("train.batch = {}, accumulate = {}", t.batch, t.accumulate))
            .flag("--micro-batch-size", micro)
            .flag("--global-batch-size", global)
            .approx_if(
                micro != t.batch,
                format!("micro-batches of {micro} sequences, not moec's {}: aux losses and capacity see other token sets", t.batch),
            ),
        Row::new(format!("train.steps = {}", t.steps)).flag("--train-iters", t.steps),
        Row::new(format!("train.seed = {}", t.seed)).flag("--seed", t.seed),
        Row::new(format!(
            "train.clip = {}",
            t.clip.map_or("none".into(), |c| c.to_string())
        ))
        .flag("--clip-grad", t.clip.unwrap_or(0.0))
        .approx_if(t.clip == Some(0.0), "clip = 0 disables clipping in Megatron"),
        Row::new(format!("train.eval = every({}, batches = {})", t.eval.every, t.eval.batches))
            .flag("--eval-interval", t.eval.every)
            .flag("--eval-iters", t.eval.batches),
        Row::new(format!("train.checkpoint = every({})", t.checkpoint.every))
            .flag("--save-interval", t.checkpoint.every),
        Row::new(format!("train.log = every({})", t.log.every)).flag("--log-interval", t.log.every),
        Row::new(format!("train.split = {}", t.split))
            .flag("--split", split(t.split))
            .approx("Megatron splits its indexed dataset by documents, moec a token stream by position"),
        data_row(&t.data),
        optimizer_row(&t.optimizer),
        schedule_row(t),
        match t.precision {
            Precision::F32 => Row::new("train.precision = f32"),
            Precision::F16 => Row::new("train.precision = f16")
                .switch("--fp16")
                .flag("--initial-loss-scale", 65536)
                .flag("--loss-scale-window", 2000)
                .flag("--hysteresis", 1)
                .field("fp16", json!(true))
                .approx("Megatron's fp16 keeps fp32 master weights and a dynamic loss scale as moec, with its own choice of f32 ops"),
        },
    ];
    if let Some(lr) = t.expert_lr {
        let what = match lr {
            ExpertLr::Fixed(x) => format!("train.expert_lr = {x}"),
            ExpertLr::Adaptive { base } => format!("train.expert_lr = adaptive(base = {base})"),
        };
        rows.push(Row::new(what).inexpressible(
            "Megatron has no per-expert learning rate (substitute: the optimizer's lr)",
        ));
    }
    Ok(rows)
}

/// `split = 0.9` as Megatron's `--split 900,100,0` (train, validation, test weights).
fn split(fraction: f64) -> String {
    let train = (fraction * 1000.0).round() as i64;
    format!("{train},{},0", 1000 - train)
}

fn data_row(data: &Data) -> Row {
    match data {
        Data::Tokens { path, .. } => {
            Row::new(format!("train.data = tokens(\"{path}\")")).flag("--data-path", "$DATA_PREFIX")
        }
        Data::Text { path } => {
            Row::new(format!("train.data = text(\"{path}\")")).flag("--data-path", "$DATA_PREFIX")
        }
        Data::Synthetic { kind, seed } => Row::new(format!(
            "train.data = synthetic(kind = {kind:?}, seed = {seed})"
        ))
        .switch("--mock-data")
        .approx("Megatron's --mock-data is random tokens, not moec's generated corpus"),
        Data::Cifar10 { dir } => Row::new(format!("train.data = cifar10(\"{dir}\")"))
            .inexpressible("images are not a GPT token stream"),
    }
}

fn optimizer_row(o: &Optimizer) -> Row {
    match *o {
        Optimizer::AdamW {
            lr,
            betas,
            eps,
            weight_decay,
        } => Row::new(format!(
            "train.optimizer = adamw(lr = {lr}, betas = ({}, {}), eps = {eps}, weight_decay = {weight_decay})",
            betas.0, betas.1
        ))
        .flag("--optimizer", "adam")
        .flag("--lr", lr)
        .flag("--adam-beta1", betas.0)
        .flag("--adam-beta2", betas.1)
        .flag("--adam-eps", eps)
        .flag("--weight-decay", weight_decay),
        Optimizer::Sgd { lr, momentum } => {
            Row::new(format!("train.optimizer = sgd(lr = {lr}, momentum = {momentum})"))
                .flag("--optimizer", "sgd")
                .flag("--lr", lr)
                .flag("--sgd-momentum", momentum)
                .flag("--weight-decay", 0.0)
        }
        Optimizer::Adafactor { lr, .. } => Row::new("train.optimizer = adafactor(...)")
            .flag("--optimizer", "adam")
            .flag("--lr", lr)
            .inexpressible("Megatron has no Adafactor (substitute: Adam)"),
        Optimizer::ScheduleFreeAdamW { lr, .. } => {
            Row::new("train.optimizer = schedule_free_adamw(...)")
                .flag("--optimizer", "adam")
                .flag("--lr", lr)
                .inexpressible("Megatron has no schedule-free AdamW (substitute: Adam)")
        }
        Optimizer::Shampoo { lr, .. } => Row::new("train.optimizer = shampoo(...)")
            .flag("--optimizer", "adam")
            .flag("--lr", lr)
            .inexpressible("Megatron has no Shampoo (substitute: Adam)"),
        Optimizer::Muon { lr, .. } => Row::new("train.optimizer = muon(...)")
            .flag("--optimizer", "adam")
            .flag("--lr", lr)
            .inexpressible("Megatron has no Muon (substitute: Adam)"),
    }
}

fn schedule_row(t: &Train) -> Row {
    let warm = "Megatron's warmup gives lr·s/W at iteration s (0 at the first), moec lr·(s+1)/W";
    match t.schedule {
        Schedule::Constant => {
            Row::new("train.schedule = constant").flag("--lr-decay-style", "constant")
        }
        // moec reaches min_lr at the last step, `steps - 1`.
        Schedule::Cosine { warmup, min_lr } => Row::new(format!(
            "train.schedule = cosine(warmup = {warmup}, min_lr = {min_lr})"
        ))
        .flag("--lr-decay-style", "cosine")
        .flag("--lr-warmup-iters", warmup)
        .flag(
            "--lr-decay-iters",
            t.steps.saturating_sub(1).max(warmup + 1),
        )
        .flag("--min-lr", min_lr)
        .approx_if(warmup > 0, warm),
        // moec would reach 0 one step past the end.
        Schedule::Linear { warmup } => {
            Row::new(format!("train.schedule = linear(warmup = {warmup})"))
                .flag("--lr-decay-style", "linear")
                .flag("--lr-warmup-iters", warmup)
                .flag("--lr-decay-iters", t.steps.max(warmup + 1))
                .flag("--min-lr", 0.0)
                .approx_if(warmup > 0, warm)
        }
    }
}

fn parallel_row(p: Parallel) -> Row {
    let row = Row::new(format!(
        "parallel: tp = {}, pp = {}, ep = {}, {} GPUs",
        p.tp, p.pp, p.ep, p.gpus
    ))
    .flag("--tensor-model-parallel-size", p.tp)
    .flag("--pipeline-model-parallel-size", p.pp)
    .flag("--expert-model-parallel-size", p.ep)
    .field("tensor_model_parallel_size", json!(p.tp))
    .field("pipeline_model_parallel_size", json!(p.pp))
    .field("expert_model_parallel_size", json!(p.ep));
    // Megatron requires sequence parallelism for MoE under tensor parallelism.
    if p.tp > 1 {
        row.switch("--sequence-parallel")
            .field("sequence_parallel", json!(true))
    } else {
        row
    }
}

impl Export {
    /// The `pretrain_gpt.py` arguments, in row order.
    pub fn args(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (name, value) in self.rows.iter().flat_map(|r| &r.flags) {
            out.push(name.to_string());
            // A list value (`nargs='+'`) is one argument per word.
            out.extend(
                value
                    .iter()
                    .flat_map(|v| v.split_whitespace().map(String::from)),
            );
        }
        out
    }

    /// The `TransformerConfig` fields, plus `activation_func` as a name (a Python callable in
    /// Megatron).
    pub fn transformer_config(&self) -> Map<String, Value> {
        self.rows
            .iter()
            .flat_map(|r| &r.config)
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    /// The JSON file: `transformer_config` (keyword arguments of `TransformerConfig`, but
    /// `activation_func` named), `args` (the launch arguments) and `features` (each row's fidelity).
    pub fn json(&self) -> Value {
        let features: Vec<Value> = self
            .rows
            .iter()
            .map(|r| {
                let (fidelity, note) = fidelity_words(&r.fidelity);
                json!({ "feature": r.feature, "fidelity": fidelity, "note": note })
            })
            .collect();
        json!({
            "model": self.name,
            "transformer_config": self.transformer_config(),
            "args": self.args(),
            "features": features,
        })
    }

    /// `launch.sh`: `torchrun ... pretrain_gpt.py` with every argument, one per line.
    pub fn launch_script(&self, load: Option<&str>) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "#!/usr/bin/env bash");
        let _ = writeln!(
            s,
            "# `{}` on Megatron-Core, generated by `moec export megatron` (see EXPORT.md).",
            self.name
        );
        let _ = writeln!(s, "# MEGATRON_LM: a Megatron-LM checkout; DATA_PREFIX: the indexed dataset (EXPORT.md); NNODES, NODE_RANK,");
        let _ = writeln!(
            s,
            "# MASTER_ADDR, MASTER_PORT: the usual torchrun rendezvous for more than one node."
        );
        let _ = writeln!(s, "set -euo pipefail");
        let _ = writeln!(s, "HERE=\"$(cd \"$(dirname \"$0\")\" && pwd)\"");
        let _ = writeln!(
            s,
            ": \"${{MEGATRON_LM:?set MEGATRON_LM to a Megatron-LM checkout}}\""
        );
        let _ = writeln!(
            s,
            "DATA_PREFIX=\"${{DATA_PREFIX:-$HERE/data/train_text_document}}\""
        );
        let _ = writeln!(s, "NNODES=\"${{NNODES:-1}}\"");
        let _ = writeln!(s, "GPUS={}", self.parallel.gpus);
        let _ = writeln!(
            s,
            "torchrun --nnodes \"$NNODES\" --nproc-per-node \"$((GPUS / NNODES))\" \\"
        );
        let _ = writeln!(s, "  --node-rank \"${{NODE_RANK:-0}}\" --master-addr \"${{MASTER_ADDR:-localhost}}\" --master-port \"${{MASTER_PORT:-6000}}\" \\");
        let _ = writeln!(s, "  \"$MEGATRON_LM/pretrain_gpt.py\" \\");
        for (name, value) in self.rows.iter().flat_map(|r| &r.flags) {
            match value {
                Some(v) if v.starts_with('$') => {
                    let _ = writeln!(s, "  {name} \"{v}\" \\");
                }
                Some(v) => {
                    let words: Vec<String> = v.split_whitespace().map(shell_word).collect();
                    let _ = writeln!(s, "  {name} {} \\", words.join(" "));
                }
                None => {
                    let _ = writeln!(s, "  {name} \\");
                }
            }
        }
        if let Some(dir) = load {
            let _ = writeln!(
                s,
                "  --load {} --finetune --no-load-optim --no-load-rng \\",
                shell_word(dir)
            );
        }
        let _ = writeln!(s, "  --save \"$HERE/checkpoints\" \\");
        let _ = writeln!(s, "  \"$@\"");
        s
    }

    /// `EXPORT.md`: the feature table, the data and checkpoint conversion commands.
    pub fn markdown(&self, spec: &Spec, run: Option<&str>) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# `{}` on Megatron-Core\n", self.name);
        let _ = writeln!(s, "Generated by `moec export megatron`. `launch.sh` starts the run (`MEGATRON_LM=/path/to/Megatron-LM ./launch.sh`); `megatron.json` holds the same settings as Megatron-Core `TransformerConfig` fields, which `scripts/megatron_parity.py` builds and checks against moec's routing.\n");
        let _ = writeln!(
            s,
            "Layout: tp = {}, pp = {}, ep = {}, {} GPUs, data-parallel size {}.\n",
            self.parallel.tp,
            self.parallel.pp,
            self.parallel.ep,
            self.parallel.gpus,
            self.data_parallel
        );
        let _ = writeln!(
            s,
            "## Features\n\n| spec | Megatron | fidelity |\n|---|---|---|"
        );
        for r in &self.rows {
            let flags: Vec<String> = r
                .flags
                .iter()
                .map(|(n, v)| match v {
                    Some(v) => format!("`{n} {v}`"),
                    None => format!("`{n}`"),
                })
                .collect();
            let (fidelity, note) = fidelity_words(&r.fidelity);
            let fidelity = if note.is_empty() {
                fidelity.to_string()
            } else {
                format!("{fidelity}: {note}")
            };
            let _ = writeln!(s, "| {} | {} | {} |", r.feature, flags.join(" "), fidelity);
        }
        let _ = writeln!(s, "\n## Data\n");
        let _ = writeln!(s, "{}", data_commands(spec));
        let _ = writeln!(s, "## Weights\n");
        let _ = writeln!(s, "{}", weight_commands(spec, run));
        s
    }
}

fn fidelity_words(f: &Fidelity) -> (&'static str, &str) {
    match f {
        Fidelity::Exact => ("exact", ""),
        Fidelity::Approximate(why) => ("approximate", why),
        Fidelity::Inexpressible(why) => ("not expressible", why),
    }
}

/// `v` quoted for the shell when it holds anything but `[A-Za-z0-9._,+-]`.
fn shell_word(v: &str) -> String {
    if !v.is_empty()
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._,+-/".contains(c))
    {
        v.to_string()
    } else {
        format!("'{}'", v.replace('\'', "'\\''"))
    }
}

fn data_commands(spec: &Spec) -> String {
    let Some(train) = &spec.train else {
        return "The spec has no `train` block: point `DATA_PREFIX` at a Megatron indexed dataset.\n"
            .into();
    };
    match &train.data {
        Data::Tokens { path, dtype } => format!(
            "moec's token file becomes a Megatron indexed dataset (`.bin` + `.idx`) without re-tokenising (needs `pip install megatron-core numpy`):\n\n```\npython scripts/megatron_data.py {path} data/train_text_document --dtype {}\n```\n",
            match dtype {
                moec_compiler::spec::TokenDtype::U16 => "u16",
                moec_compiler::spec::TokenDtype::U32 => "u32",
            }
        ),
        Data::Text { path } => format!(
            "The text's bytes are its tokens (vocab 256), written as a Megatron indexed dataset:\n\n```\npython scripts/megatron_data.py {path} data/train_text_document --bytes\n```\n"
        ),
        Data::Synthetic { .. } => "Synthetic data: the launch uses Megatron's `--mock-data` (random tokens). To train on moec's corpus, write it as a token file and convert it with `scripts/megatron_data.py`.\n".into(),
        Data::Cifar10 { .. } => "CIFAR-10 is not a token stream.\n".into(),
    }
}

fn weight_commands(spec: &Spec, run: Option<&str>) -> String {
    match hf_config(spec) {
        Ok(config) => {
            let arch = config["architectures"][0].as_str().unwrap_or("?").to_string();
            let dir = run.unwrap_or("RUN_DIR");
            format!(
                "A moec run directory loads in HF transformers as `{arch}` (its `config.json`), so Megatron-Bridge converts it to a Megatron checkpoint:\n\n```\npython -c \"from megatron.bridge import AutoBridge; AutoBridge.import_ckpt('{dir}', 'megatron_ckpt')\"\n```\n\nthen start from it with `./launch.sh --load megatron_ckpt --finetune --no-load-optim --no-load-rng`{}. {}\n",
                if run.is_some() { " (already in `launch.sh`)" } else { "" },
                if config["model_type"] == "glm4_moe" {
                    "moec's expert-bias state (`router_state.N.bias`) travels as GLM-4-MoE's `e_score_correction_bias`."
                } else {
                    "moec's router state (`router_state.N.*`) is not an HF weight; Megatron starts it afresh."
                },
            )
        }
        Err(e) => format!("No checkpoint conversion: {e}. Megatron-Bridge converts HF checkpoints, and this spec has no HF architecture that computes it exactly.\n"),
    }
}

#[cfg(test)]
mod tests;
