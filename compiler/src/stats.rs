//! Stats: what `moec check` prints about a model: parameters (total and active per token), the MoE
//! blocks, FLOPs per token and an analytic memory estimate for one training step (printed only when
//! the plan cannot be compiled; otherwise `moec check` prints the exact plan, `moec_runtime::memory`).
//!
//! Parameter counts are analytic (from the [`Spec`] alone), so they exist for every family, including
//! those `lower` does not handle yet; for the families it does, a test checks them against the
//! lowered graph's parameters. Activation memory comes from the lowered graph when lowering succeeds.
//!
//! # Conventions
//! - *Active parameters per token*: every parameter except the routed experts not chosen, i.e. each
//!   MoE block counts `top_k` of its `E` experts (`expert_choice`: `capacity` experts per token on
//!   average), plus shared experts, router, attention, norms and embeddings.
//! - *FLOPs per token, forward*: `2 ·` the active parameters used in matmuls (everything but the
//!   embedding lookup and norm weights; the tied output matrix counts once as the LM head) plus, per
//!   transformer block, `4 · T · dim` for the attention scores and the weighted sum over `T`
//!   positions. That is the full `T × T` product, not the causal average (half): the IR computes the
//!   whole score matrix and masks it, so this is the work the hardware does.
//! - *Training FLOPs*: `3 ·` forward (backward ≈ 2 · forward).
//! - *Memory for one step* (`train.batch` sequences, 1 without a `train` block; `batch` is per micro
//!   step under `accumulate`): f32 weights, f32 gradients, optimizer state (AdamW and schedule-free
//!   AdamW 2× the weights, SGD with momentum 1×, without 0×, Adafactor one row and one column vector
//!   per matrix; Shampoo Adam's 2× plus, per matrix with both sides ≤ `max_dim`, L, R and their roots
//!   and two weight-sized working buffers; Muon for each matrix its momentum, two weight-sized
//!   Newton–Schulz buffers and two `min(rows, cols)²` products, Adam's 2× for the rest, the LM head
//!   and router counted as matrices), and activations bounded above by the sum of every tensor of the lowered forward
//!   graph (an upper bound on what backward keeps: reshapes are free views and not counted, buffer
//!   reuse would lower it). The largest single tensor (params included) bounds the storage binding
//!   size the adapter must allow.

use crate::ir::Op;
use crate::lower::lower;
use crate::spec::{Activation, Family, Ffn, Gate, Hierarchy, Moe, Norm, Optimizer, Spec};
use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    pub name: String,
    pub family: Family,
    pub total_params: u64,
    pub active_params: u64,
    /// Embedding (and tied output) table.
    pub embedding_params: u64,
    pub moe_blocks: Vec<MoeBlockStats>,
    pub flops_forward_per_token: u64,
    pub flops_train_per_token: u64,
    pub memory: Memory,
}

/// One MoE block.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeBlockStats {
    pub block: usize,
    pub experts: usize,
    pub top_k: usize,
    pub shared_experts: usize,
    /// Parameters of one routed expert.
    pub params_per_expert: u64,
    /// Router + all routed experts + shared experts.
    pub params: u64,
    /// Router + `top_k` routed experts + shared experts.
    pub active_params: u64,
}

/// Memory of one training step, in bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Memory {
    pub batch: usize,
    /// Tokens (or samples) per micro step.
    pub tokens: usize,
    pub optimizer: String,
    pub weights: u64,
    pub grads: u64,
    pub optimizer_state: u64,
    /// Upper bound from the lowered graph; `Err` holds why the graph could not be lowered.
    pub activations: Result<u64, String>,
    /// Label, type and bytes of the largest single tensor.
    pub largest_tensor: (String, u64),
}

impl Memory {
    /// Weights + gradients + optimizer state + activations (0 when unknown).
    pub fn total(&self) -> u64 {
        self.weights + self.grads + self.optimizer_state + *self.activations.as_ref().unwrap_or(&0)
    }
}

/// One parameter tensor as stats sees it.
struct P {
    shape: Vec<usize>,
    kind: Kind,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Embedding,
    Norm,
    /// Dense matmul weight or bias (attention, dense FFN, heads, router, shared experts).
    Matmul,
    /// Routed expert stack `[E, N, K]`.
    Expert,
}

impl P {
    fn numel(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64
    }
}

fn ffn_shapes(dim: usize, f: Ffn, out: &mut Vec<P>) {
    let mats = if f.activation == Activation::SwiGlu {
        3
    } else {
        2
    };
    for _ in 0..mats {
        out.push(P {
            shape: vec![f.hidden, dim],
            kind: Kind::Matmul,
        });
    }
}

fn norm_shapes(dim: usize, norm: Norm, out: &mut Vec<P>) {
    let n = if norm == Norm::LayerNorm { 2 } else { 1 };
    for _ in 0..n {
        out.push(P {
            shape: vec![dim],
            kind: Kind::Norm,
        });
    }
}

/// Router and experts of one MoE block at width `dim`, and the block's stats.
fn moe_shapes(block: usize, dim: usize, moe: &Moe, out: &mut Vec<P>) -> MoeBlockStats {
    let start = out.len();
    let e = moe.experts;
    // Routers: flat gate [E, dim]; Shazeer's two-level hierarchy a primary [G, dim] plus one [M, dim]
    // per group; noisy top-k adds the noise projection.
    match (moe.groups, moe.hierarchy) {
        (Some((g, _)), Hierarchy::TwoLevel) => out.push(P {
            shape: vec![g + e, dim],
            kind: Kind::Matmul,
        }),
        (None, _) | (Some(_), Hierarchy::GroupLimited) => out.push(P {
            shape: vec![e, dim],
            kind: Kind::Matmul,
        }),
    }
    if let Gate::NoisyTopK { .. } = moe.gate {
        out.push(P {
            shape: vec![e, dim],
            kind: Kind::Matmul,
        });
    }
    let mats = if moe.expert.activation == Activation::SwiGlu {
        3
    } else {
        2
    };
    for _ in 0..mats {
        out.push(P {
            shape: vec![e, moe.expert.hidden, dim],
            kind: Kind::Expert,
        });
    }
    if moe.shared_experts > 0 {
        ffn_shapes(
            dim,
            Ffn {
                activation: moe.expert.activation,
                hidden: moe.shared_experts * moe.expert.hidden,
            },
            out,
        );
    }
    let params: u64 = out[start..].iter().map(P::numel).sum();
    let experts: u64 = out[start..]
        .iter()
        .filter(|p| p.kind == Kind::Expert)
        .map(P::numel)
        .sum();
    let per_expert = experts / e.max(1) as u64;
    let k = active_experts(moe);
    MoeBlockStats {
        block,
        experts: e,
        top_k: moe.top_k,
        shared_experts: moe.shared_experts,
        params_per_expert: per_expert,
        params,
        active_params: params - experts + (per_expert as f64 * k).round() as u64,
    }
}

/// Routed experts a token uses on average.
fn active_experts(moe: &Moe) -> f64 {
    match moe.gate {
        Gate::ExpertChoice { capacity } => capacity.min(moe.experts as f64),
        Gate::Softmax { .. }
        | Gate::Sigmoid
        | Gate::NoisyTopK { .. }
        | Gate::Switch
        | Gate::Sinkhorn { .. }
        | Gate::Auction { .. } => moe.top_k as f64,
    }
}

/// Every parameter tensor of the model (shapes as `lower` builds them) and the MoE block stats.
fn param_shapes(spec: &Spec) -> (Vec<P>, Vec<MoeBlockStats>) {
    let m = &spec.model;
    let d = m.dim;
    let mut ps = Vec::new();
    let mut blocks = Vec::new();
    let is_moe = |i: usize| spec.moe.as_ref().is_some_and(|moe| moe.is_moe_block(i));
    let mut ffn_or_moe = |i: usize, width: usize, ps: &mut Vec<P>| match &spec.moe {
        Some(moe) if is_moe(i) => blocks.push(moe_shapes(i, width, moe, ps)),
        _ => ffn_shapes(width, m.ffn, ps),
    };
    match m.family {
        Family::Transformer => {
            let hd = d / m.heads.max(1);
            ps.push(P {
                shape: vec![m.vocab.unwrap_or(0), d],
                kind: Kind::Embedding,
            });
            for i in 0..m.layers {
                norm_shapes(d, m.norm, &mut ps);
                norm_shapes(d, m.norm, &mut ps);
                for out in [m.heads * hd, m.kv_heads * hd, m.kv_heads * hd] {
                    ps.push(P {
                        shape: vec![out, d],
                        kind: Kind::Matmul,
                    });
                }
                ps.push(P {
                    shape: vec![d, m.heads * hd],
                    kind: Kind::Matmul,
                });
                ffn_or_moe(i, d, &mut ps);
            }
            norm_shapes(d, m.norm, &mut ps);
            if !m.tie_embeddings {
                ps.push(P {
                    shape: vec![m.vocab.unwrap_or(0), d],
                    kind: Kind::Matmul,
                });
            }
        }
        Family::Mlp => {
            let (inputs, classes) = (m.inputs.unwrap_or(0), m.classes.unwrap_or(0));
            ps.push(P {
                shape: vec![d, inputs],
                kind: Kind::Matmul,
            });
            ps.push(P {
                shape: vec![d],
                kind: Kind::Matmul,
            });
            for i in 0..m.layers {
                norm_shapes(d, m.norm, &mut ps);
                ffn_or_moe(i, d, &mut ps);
            }
            norm_shapes(d, m.norm, &mut ps);
            ps.push(P {
                shape: vec![classes, d],
                kind: Kind::Matmul,
            });
            ps.push(P {
                shape: vec![classes],
                kind: Kind::Matmul,
            });
        }
        // PyTorch LSTM layers (lower/lstm.rs): W_ih, W_hh and two biases per direction, an MoE at the
        // layer's output width after each MoE block, then the LM head or the classifier.
        Family::Lstm => {
            let dirs = if m.bidirectional { 2 } else { 1 };
            let first_in = match m.vocab {
                Some(v) => {
                    ps.push(P {
                        shape: vec![v, d],
                        kind: Kind::Embedding,
                    });
                    d
                }
                None => m.inputs.unwrap_or(0),
            };
            for i in 0..m.layers {
                let inp = if i == 0 { first_in } else { d * dirs };
                for _ in 0..dirs {
                    for shape in [vec![4 * d, inp], vec![4 * d, d], vec![4 * d], vec![4 * d]] {
                        ps.push(P {
                            shape,
                            kind: Kind::Matmul,
                        });
                    }
                }
                if is_moe(i) {
                    ffn_or_moe(i, d * dirs, &mut ps);
                }
            }
            let head = match m.vocab {
                Some(_) if m.tie_embeddings => vec![],
                Some(v) => vec![vec![v, d * dirs]],
                None => {
                    let classes = m.classes.unwrap_or(0);
                    vec![vec![classes, d * dirs], vec![classes]]
                }
            };
            for shape in head {
                ps.push(P {
                    shape,
                    kind: Kind::Matmul,
                });
            }
        }
    }
    (ps, blocks)
}

/// Adafactor keeps one row and one column second-moment vector per matrix (per expert for stacks),
/// and the full vector for 1-D parameters.
fn adafactor_state(ps: &[P]) -> u64 {
    ps.iter()
        .map(|p| match p.shape.as_slice() {
            [n] => *n as u64,
            [rows, cols] => (rows + cols) as u64,
            [e, rows, cols] => (e * (rows + cols)) as u64,
            other => other.iter().product::<usize>() as u64,
        })
        .sum()
}

/// The stacked `(matrices, rows, cols)` view of a parameter with two or more axes.
fn matrices(p: &P) -> Option<(u64, u64, u64)> {
    match p.shape.as_slice() {
        [lead @ .., rows, cols] => Some((
            lead.iter().product::<usize>() as u64,
            *rows as u64,
            *cols as u64,
        )),
        _ => None,
    }
}

/// Shampoo: Adam's m and v for everything; per matrix with both sides ≤ `max_dim`, L, R, their
/// inverse fourth roots and two weight-sized working buffers (G·P_R and the preconditioned update).
fn shampoo_state(ps: &[P], max_dim: usize) -> u64 {
    ps.iter()
        .map(|p| match matrices(p) {
            Some((m, r, c)) if r <= max_dim as u64 && c <= max_dim as u64 => {
                2 * p.numel() + 2 * m * (r * r + c * c) + 2 * p.numel()
            }
            _ => 2 * p.numel(),
        })
        .sum()
}

/// Muon: per matrix its momentum, two weight-sized Newton–Schulz buffers and two `s × s` products
/// (s = min(rows, cols)); Adam's m and v for the embedding, norms and vectors.
fn muon_state(ps: &[P]) -> u64 {
    ps.iter()
        .map(|p| match matrices(p) {
            Some((m, r, c)) if p.kind != Kind::Embedding => {
                3 * p.numel() + 2 * m * r.min(c) * r.min(c)
            }
            _ => 2 * p.numel(),
        })
        .sum()
}

pub fn stats(spec: &Spec) -> Stats {
    let m = &spec.model;
    let (ps, moe_blocks) = param_shapes(spec);
    let total: u64 = ps.iter().map(P::numel).sum();
    let embedding: u64 = ps
        .iter()
        .filter(|p| p.kind == Kind::Embedding)
        .map(P::numel)
        .sum();
    let norms: u64 = ps
        .iter()
        .filter(|p| p.kind == Kind::Norm)
        .map(P::numel)
        .sum();
    let inactive: u64 = moe_blocks.iter().map(|b| b.params - b.active_params).sum();
    let active = total - inactive;
    let tied_head = if m.tie_embeddings { embedding } else { 0 };
    let matmul_active = active - embedding - norms + tied_head;
    let attention = match m.family {
        Family::Transformer => 4 * m.context.unwrap_or(0) as u64 * m.dim as u64 * m.layers as u64,
        Family::Mlp | Family::Lstm => 0,
    };
    let forward = 2 * matmul_active + attention;

    let batch = spec.train.as_ref().map_or(1, |t| t.batch).max(1);
    let tokens = match m.family {
        Family::Transformer | Family::Lstm => batch * m.context.unwrap_or(1),
        Family::Mlp => batch,
    };
    let (optimizer, state) = match spec.train.as_ref().map(|t| t.optimizer) {
        None => ("AdamW".to_string(), 2 * total),
        Some(Optimizer::AdamW { .. }) => ("AdamW".into(), 2 * total),
        Some(Optimizer::ScheduleFreeAdamW { .. }) => ("schedule-free AdamW".into(), 2 * total),
        Some(Optimizer::Sgd { momentum, .. }) if momentum != 0.0 => {
            ("SGD with momentum".into(), total)
        }
        Some(Optimizer::Sgd { .. }) => ("SGD".into(), 0),
        Some(Optimizer::Adafactor { .. }) => ("Adafactor".into(), adafactor_state(&ps)),
        Some(Optimizer::Shampoo { max_dim, .. }) => ("Shampoo".into(), shampoo_state(&ps, max_dim)),
        Some(Optimizer::Muon { .. }) => ("Muon".into(), muon_state(&ps)),
    };
    let largest_param = ps.iter().map(|p| p.numel() * 4).max().unwrap_or(0);
    let (activations, largest_tensor) = match lower(spec, batch) {
        Ok(mut g) => {
            // `precision = f16`: activations at the dtypes the kernels store them in.
            crate::apply_precision(spec, &mut g);
            let mut acts = 0u64;
            let mut largest = (String::from("(none)"), 0u64);
            for id in g.g.node_indices() {
                let n = g.node(id);
                let bytes = n.ty.size_bytes() as u64;
                if bytes > largest.1 {
                    largest = (format!("{} {}", n.label, n.ty), bytes);
                }
                if !matches!(n.op, Op::Param { .. } | Op::Reshape { .. }) {
                    acts += bytes;
                }
            }
            (Ok(acts), largest)
        }
        Err(e) => (
            Err(e.to_string()),
            ("largest parameter".into(), largest_param),
        ),
    };
    Stats {
        name: spec.name.clone(),
        family: m.family,
        total_params: total,
        active_params: active,
        embedding_params: embedding,
        moe_blocks,
        flops_forward_per_token: forward,
        flops_train_per_token: 3 * forward,
        memory: Memory {
            batch,
            tokens,
            optimizer,
            weights: 4 * total,
            grads: 4 * total,
            optimizer_state: 4 * state,
            activations,
            largest_tensor,
        },
    }
}

/// `1234567` → `1,234,567`.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Decimal units for counts: `1.23M`, `45.6K`, `7`.
pub fn human_count(n: u64) -> String {
    scaled(n as f64, 1000.0, &["", "K", "M", "B", "T"])
}

/// Binary units for bytes: `45.6 MiB`.
pub fn human_bytes(n: u64) -> String {
    scaled(n as f64, 1024.0, &[" B", " KiB", " MiB", " GiB", " TiB"])
}

fn scaled(mut x: f64, base: f64, units: &[&str]) -> String {
    let mut u = 0;
    while x >= base && u + 1 < units.len() {
        x /= base;
        u += 1;
    }
    if u == 0 {
        format!("{x}{}", units[0])
    } else {
        // Three significant digits.
        let decimals = if x >= 100.0 {
            0
        } else if x >= 10.0 {
            1
        } else {
            2
        };
        format!("{x:.decimals$}{}", units[u])
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let family = match self.family {
            Family::Transformer => "transformer",
            Family::Lstm => "lstm",
            Family::Mlp => "mlp",
        };
        let count = |n: u64| format!("{:>15}  {:>7}", thousands(n), human_count(n));
        writeln!(f, "model {} ({family})", self.name)?;
        writeln!(f, "  parameters, total        {}", count(self.total_params))?;
        writeln!(
            f,
            "  parameters, active/token {}",
            count(self.active_params)
        )?;
        writeln!(
            f,
            "  embedding                {}",
            count(self.embedding_params)
        )?;
        if self.moe_blocks.is_empty() {
            writeln!(f, "  MoE blocks               none (dense)")?;
        } else {
            writeln!(f, "  MoE blocks               {}", self.moe_blocks.len())?;
            writeln!(
                f,
                "    {:>5}  {:>7}  {:>5}  {:>6}  {:>10}  {:>10}  {:>10}",
                "block", "experts", "top-k", "shared", "per expert", "params", "active"
            )?;
            for b in &self.moe_blocks {
                writeln!(
                    f,
                    "    {:>5}  {:>7}  {:>5}  {:>6}  {:>10}  {:>10}  {:>10}",
                    b.block,
                    b.experts,
                    b.top_k,
                    b.shared_experts,
                    human_count(b.params_per_expert),
                    human_count(b.params),
                    human_count(b.active_params)
                )?;
            }
        }
        writeln!(
            f,
            "  FLOPs/token, forward     {}",
            count(self.flops_forward_per_token)
        )?;
        writeln!(
            f,
            "  FLOPs/token, training    {}",
            count(self.flops_train_per_token)
        )?;
        Ok(())
    }
}

/// The analytic estimate, for `moec check` on specs the compiler cannot lower yet (otherwise it
/// prints the exact plan, `moec_runtime::memory`).
impl fmt::Display for Memory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self;
        writeln!(
            f,
            "  memory, one step (batch {}, {} tokens, {}):",
            m.batch,
            thousands(m.tokens as u64),
            m.optimizer
        )?;
        let bytes = |n: u64| format!("{:>10}", human_bytes(n));
        writeln!(f, "    weights                {}", bytes(m.weights))?;
        writeln!(f, "    gradients              {}", bytes(m.grads))?;
        writeln!(f, "    optimizer state        {}", bytes(m.optimizer_state))?;
        match &m.activations {
            Ok(a) => writeln!(f, "    activations (≤)        {}", bytes(*a))?,
            Err(why) => writeln!(f, "    activations            unknown ({why})")?,
        }
        writeln!(f, "    total                  {}", bytes(m.total()))?;
        writeln!(
            f,
            "    largest tensor         {}  {}",
            bytes(m.largest_tensor.1),
            m.largest_tensor.0
        )
    }
}
