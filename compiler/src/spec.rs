//! The typed, checked model description: what `check` produces from the AST and every later pass reads.
//!
//! Every default of docs/language.md is already filled in here, and every semantic rule already holds, so
//! passes after `check` never re-validate and never see an `Option` that means "use the default".
//! Choices the literature leaves open are documented on the field that carries them.

use serde::{Deserialize, Serialize};

/// A whole `.moe` file after checking.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spec {
    /// The `NAME` of `model NAME { ... }`.
    pub name: String,
    pub model: Model,
    /// `None` when there is no `moe` block or when `experts = 0` (a dense model).
    pub moe: Option<Moe>,
    /// `None` when the file has no `train` block.
    pub train: Option<Train>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Family {
    Transformer,
    Lstm,
    Mlp,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Model {
    pub family: Family,
    /// Vocabulary size; `Some` for the LM families (`transformer`, `lstm`).
    pub vocab: Option<usize>,
    /// Input width of the `mlp` family.
    pub inputs: Option<usize>,
    /// Class count of the `mlp` family.
    pub classes: Option<usize>,
    pub dim: usize,
    /// Number of blocks.
    pub layers: usize,
    /// Attention heads (transformer). `dim % heads == 0` holds.
    pub heads: usize,
    /// Key/value heads; `heads % kv_heads == 0` holds. Equals `heads` unless grouped-query attention.
    pub kv_heads: usize,
    /// Sequence length; `Some` for LMs.
    pub context: Option<usize>,
    pub norm: Norm,
    pub rope_theta: f64,
    /// Dense FFN of the non-MoE blocks. Default `swiglu(hidden = H)` with H = 8*dim/3 rounded up to a
    /// multiple of 64 (the Llama rule), because "4*dim rounded" for a gated FFN means that in practice.
    pub ffn: Ffn,
    pub bidirectional: bool,
    pub tie_embeddings: bool,
    /// Qwen3 / OLMoE QK-norm: RMSNorm over each head's q and k before RoPE, with one learned scale
    /// per head dimension shared by all heads (`self_attn.{q,k}_norm.weight` `[head_dim]`). Always
    /// RMSNorm, whatever `norm` says, because that is what the models that have it do.
    pub qk_norm: bool,
}

impl Model {
    pub fn head_dim(&self) -> usize {
        self.dim / self.heads
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Norm {
    RmsNorm,
    LayerNorm,
}

/// Epsilon used by both norms (HF Mixtral/Llama `rms_norm_eps` default).
pub const NORM_EPS: f32 = 1e-5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// silu(x·W1ᵀ) ⊙ (x·W3ᵀ), then ·W2ᵀ (Llama/Mixtral).
    SwiGlu,
    /// gelu (tanh approximation, as GPT-2 and HF `gelu_new`).
    Gelu,
    Relu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ffn {
    pub activation: Activation,
    pub hidden: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Moe {
    /// The MoE block indices, resolved from `layers`, `every` and `first_dense`, ascending.
    pub blocks: Vec<usize>,
    /// Routed experts, ≥ 1 here (`experts = 0` makes `Spec::moe` `None`).
    pub experts: usize,
    /// Experts per token; `top_k <= experts` holds. Forced to 1 for `switch`.
    pub top_k: usize,
    pub expert: Ffn,
    pub shared_experts: usize,
    pub gate: Gate,
    /// `(G, M)` with `G * M == experts`, or `None` when flat.
    pub groups: Option<(usize, usize)>,
    /// Meaningful only when `groups` is `Some`.
    pub hierarchy: Hierarchy,
    /// `top_groups <= G` holds.
    pub top_groups: usize,
    pub capacity: Capacity,
    /// Empty for `balance = none`.
    pub balance: Vec<Balance>,
    pub jitter: f64,
    pub router_precision: Precision,
}

impl Moe {
    pub fn is_moe_block(&self, block: usize) -> bool {
        self.blocks.contains(&block)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Gate {
    Softmax {
        renorm: bool,
    },
    Sigmoid,
    NoisyTopK {
        noise: f64,
    },
    Switch,
    ExpertChoice {
        capacity: f64,
    },
    Sinkhorn {
        iters: usize,
    },
    Auction {
        rounds: usize,
        epsilon: f64,
        budget: f64,
        price_rate: f64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Hierarchy {
    TwoLevel,
    GroupLimited,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Capacity {
    Dropless,
    Factor { factor: f64, drop: DropPolicy },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DropPolicy {
    Position,
    Probability,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Balance {
    Aux(f64),
    Z(f64),
    Cv2 { importance: f64, load: f64 },
    Bias { rate: f64 },
    SeqAux(f64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Precision {
    F32,
    F16,
}

/// Which forward activations the training step drops after the forward pass and recomputes in the
/// backward pass (docs/language.md "The `train` block", `recompute`; `compiler/src/recompute.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Recompute {
    #[default]
    None,
    /// Inside each block's attention (`model.layers.N.self_attn.*`).
    Attention,
    /// Inside each block's MoE layer (`model.layers.N.block_sparse_moe.*`).
    Moe,
    /// Everything inside each block (`model.layers.N.*`): only the blocks' inputs are kept.
    Block,
}

impl Recompute {
    pub const ALL: [Recompute; 4] = [
        Recompute::None,
        Recompute::Attention,
        Recompute::Moe,
        Recompute::Block,
    ];

    /// The spelling in a spec.
    pub fn name(self) -> &'static str {
        match self {
            Recompute::None => "none",
            Recompute::Attention => "attention",
            Recompute::Moe => "moe",
            Recompute::Block => "block",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Train {
    pub data: Data,
    pub split: f64,
    pub batch: usize,
    pub accumulate: usize,
    pub steps: usize,
    pub optimizer: Optimizer,
    /// `None` means experts use the optimizer's `lr`.
    pub expert_lr: Option<ExpertLr>,
    pub schedule: Schedule,
    pub clip: Option<f64>,
    pub precision: Precision,
    #[serde(default)]
    pub recompute: Recompute,
    pub seed: u64,
    pub eval: Every,
    pub checkpoint: Every,
    pub log: Every,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Data {
    /// Raw bytes, vocab 256. The path is as written, relative to the spec file's directory.
    Text {
        path: String,
    },
    Tokens {
        path: String,
        dtype: TokenDtype,
    },
    Cifar10 {
        dir: String,
    },
    Synthetic {
        kind: SyntheticKind,
        seed: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TokenDtype {
    U16,
    U32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyntheticKind {
    Copy,
    Markov,
    Classes,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Optimizer {
    AdamW {
        lr: f64,
        betas: (f64, f64),
        eps: f64,
        weight_decay: f64,
    },
    Sgd {
        lr: f64,
        momentum: f64,
    },
    Adafactor {
        lr: f64,
        decay: f64,
        eps: f64,
    },
    ScheduleFreeAdamW {
        lr: f64,
        betas: (f64, f64),
        eps: f64,
        weight_decay: f64,
    },
    /// docs/language.md "Optimizers": per-matrix L/R statistics, inverse fourth roots every
    /// `root_every` steps, grafted to Adam's direction.
    Shampoo {
        lr: f64,
        betas: (f64, f64),
        eps: f64,
        decay: f64,
        root_every: usize,
        max_dim: usize,
        weight_decay: f64,
    },
    /// docs/language.md "Optimizers": Newton–Schulz-orthogonalised momentum for hidden matrices,
    /// `adamw` for everything else.
    Muon {
        lr: f64,
        momentum: f64,
        nesterov: bool,
        ns_steps: usize,
        weight_decay: f64,
        adamw: AdamArgs,
    },
}

/// The arguments of `adamw(...)`: the AdamW that `muon` gives the embedding, head, router, norms and
/// vectors.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamArgs {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
}

impl Optimizer {
    /// The base learning rate (`lr`; for `muon`, that of its hidden matrices).
    pub fn lr(&self) -> f64 {
        match *self {
            Optimizer::AdamW { lr, .. }
            | Optimizer::Sgd { lr, .. }
            | Optimizer::Adafactor { lr, .. }
            | Optimizer::ScheduleFreeAdamW { lr, .. }
            | Optimizer::Shampoo { lr, .. }
            | Optimizer::Muon { lr, .. } => lr,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum ExpertLr {
    Fixed(f64),
    Adaptive { base: f64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Schedule {
    Constant,
    Cosine { warmup: usize, min_lr: f64 },
    Linear { warmup: usize },
}

/// `every(N, batches = B)`; `batches` is only meaningful for `eval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Every {
    pub every: usize,
    pub batches: usize,
}
