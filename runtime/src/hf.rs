//! The HF transformers architecture that computes a spec exactly, as a `config.json`, and the
//! names its weights take there (docs/DECISIONS.md, "Export to Megatron-Core and HF").
//!
//! | spec | architecture |
//! |---|---|
//! | dense | `LlamaForCausalLM`, or `Qwen3ForCausalLM` with `qk_norm` |
//! | every block MoE, softmax renormalised over the top k, no `qk_norm` | `MixtralForCausalLM` |
//! | softmax (renorm on/off) or switch, with `qk_norm`, any MoE blocks | `Qwen3MoeForCausalLM` |
//! | sigmoid (+ `bias(...)`, `group_limited`), shared experts, the first K blocks dense | `Glm4MoeForCausalLM` |
//!
//! Read from transformers 5's modeling files:
//! - Qwen3-MoE: block `i` is sparse when `i ∉ mlp_only_layers` and `(i + 1) % decoder_sparse_step ==
//!   0` (moec's `every`); the router is a softmax over all experts, top-k, renormalised when
//!   `norm_topk_prob`; `q_norm` / `k_norm` are RMSNorms over the head dim before RoPE, always present.
//! - GLM-4-MoE: blocks `≥ first_k_dense_replace` are MoE; scores σ(logits), selection on scores +
//!   `e_score_correction_bias` limited to the `topk_group` of `n_group` groups ranked by the sum of
//!   their top-2 biased scores, weights the selected unbiased scores over their sum
//!   (`norm_topk_prob`, `routed_scaling_factor = 1`); shared experts are one MLP of
//!   `n_shared_experts × moe_intermediate_size` added to the routed output; RoPE over
//!   `partial_rotary_factor` of the head (1.0 here).
//!
//! Mixtral and Llama read moec's checkpoint names as they are; Qwen3 and GLM name the MoE block
//! `mlp` ([`hf_weight_name`]), so their runs get a renamed copy of the weights.

use crate::checkpoint::CheckpointError;
use moec_compiler::spec::{
    Activation, Balance, Capacity, Family, Gate, Hierarchy, Moe, Norm, Precision, Spec, NORM_EPS,
};
use serde_json::{json, Value};

/// The HF transformers `config.json` of `spec` (the table in the module doc), or `NotHf` naming
/// the first feature none of those models computes.
pub fn hf_config(spec: &Spec) -> Result<Value, CheckpointError> {
    let m = &spec.model;
    let (Family::Transformer, Some(vocab), Some(context)) = (m.family, m.vocab, m.context) else {
        return not(format!(
            "family `{:?}` is not a token transformer",
            m.family
        ));
    };
    if m.norm != Norm::RmsNorm {
        return not("norm = layernorm (Mixtral, Llama, Qwen3 and GLM-4-MoE use RMSNorm)".into());
    }
    if m.bidirectional {
        return not("bidirectional attention (HF's decoders are causal)".into());
    }
    // The f32 eps as written (1e-5), not its binary value widened to f64.
    let eps: f64 = NORM_EPS.to_string().parse().unwrap_or(f64::from(NORM_EPS));
    let mut config = json!({
        "vocab_size": vocab,
        "hidden_size": m.dim,
        "num_hidden_layers": m.layers,
        "num_attention_heads": m.heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_dim(),
        "hidden_act": "silu",
        "max_position_embeddings": context,
        "rms_norm_eps": eps,
        "rope_theta": m.rope_theta,
        "tie_word_embeddings": m.tie_embeddings,
        "attention_dropout": 0.0,
        // moec's `Normal { std: 0.02 }` init.
        "initializer_range": 0.02,
        "use_cache": true,
        // moec's vocabularies have no special tokens.
        "bos_token_id": null,
        "eos_token_id": null,
        "pad_token_id": null,
        "torch_dtype": "float32",
    });
    let extra = match &spec.moe {
        None => dense(spec)?,
        Some(moe) => {
            common_moe(spec, moe)?;
            match moe.gate {
                Gate::Sigmoid => glm4_moe(spec, moe)?,
                Gate::Softmax { .. } | Gate::Switch if m.qk_norm => qwen3_moe(spec, moe)?,
                Gate::Softmax { .. }
                | Gate::Switch
                | Gate::NoisyTopK { .. }
                | Gate::ExpertChoice { .. }
                | Gate::Sinkhorn { .. }
                | Gate::Auction { .. } => mixtral(spec, moe)?,
            }
        }
    };
    if let (Some(config), Value::Object(extra)) = (config.as_object_mut(), extra) {
        config.extend(extra);
    }
    Ok(config)
}

fn not<T>(what: String) -> Result<T, CheckpointError> {
    Err(CheckpointError::NotHf(what))
}

fn dense(spec: &Spec) -> Result<Value, CheckpointError> {
    let m = &spec.model;
    if m.ffn.activation != Activation::SwiGlu {
        return not(format!(
            "ffn = {:?} (Llama's and Qwen3's MLP is SwiGLU)",
            m.ffn.activation
        ));
    }
    Ok(if m.qk_norm {
        json!({
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "intermediate_size": m.ffn.hidden,
            "attention_bias": false,
            "use_sliding_window": false,
        })
    } else {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "intermediate_size": m.ffn.hidden,
            "attention_bias": false,
            "mlp_bias": false,
            "pretraining_tp": 1,
        })
    })
}

/// What every HF MoE here shares: SwiGLU experts (and dense blocks), no dropping, an f32 router,
/// no two-level hierarchy, a deterministic gate.
fn common_moe(spec: &Spec, moe: &Moe) -> Result<(), CheckpointError> {
    if moe.expert.activation != Activation::SwiGlu {
        return not(format!(
            "expert = {:?} (HF's MoE experts are SwiGLU)",
            moe.expert.activation
        ));
    }
    if moe.blocks.len() < spec.model.layers && spec.model.ffn.activation != Activation::SwiGlu {
        return not(format!(
            "ffn = {:?} on the dense blocks (HF's MLPs are SwiGLU)",
            spec.model.ffn.activation
        ));
    }
    if moe.capacity != Capacity::Dropless {
        return not("a capacity factor (HF's MoE models drop no tokens)".into());
    }
    if moe.router_precision != Precision::F32 {
        return not("router_precision = f16 (HF routes in the model's dtype)".into());
    }
    if moe.groups.is_some() && moe.hierarchy == Hierarchy::TwoLevel {
        return not("a two-level gate hierarchy (no HF model has one)".into());
    }
    Ok(())
}

fn has_bias(moe: &Moe) -> bool {
    moe.balance
        .iter()
        .any(|b| matches!(b, Balance::Bias { .. }))
}

fn mixtral(spec: &Spec, moe: &Moe) -> Result<Value, CheckpointError> {
    let m = &spec.model;
    if !matches!(moe.gate, Gate::Softmax { .. } | Gate::Switch) {
        return not(format!(
            "gate = {:?} (Mixtral's and Qwen3-MoE's gates are softmax top-k, GLM-4-MoE's sigmoid)",
            moe.gate
        ));
    }
    if moe.gate != (Gate::Softmax { renorm: true }) {
        return not(format!(
            "gate = {:?} (Mixtral's gate is softmax renormalised over the top k; Qwen3-MoE's `norm_topk_prob = false` needs qk_norm = true)",
            moe.gate
        ));
    }
    if moe.blocks.len() != m.layers {
        return not(format!(
            "MoE on {} of {} blocks (Mixtral's blocks are all MoE; Qwen3-MoE, which has dense blocks, needs qk_norm = true)",
            moe.blocks.len(),
            m.layers
        ));
    }
    softmax_router_limits(moe, "Mixtral")?;
    // moec's aux(c) is c·E·Σ f_e·P_e with f_e the share of the T·k choices; HF's
    // load_balancing_loss_func counts f per choice slot without dividing by k, so c / k
    // gives the same scale (HF pools all layers' tokens where moec sums per layer).
    Ok(json!({
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "intermediate_size": moe.expert.hidden,
        "num_local_experts": moe.experts,
        "num_experts_per_tok": moe.top_k,
        // Training only; HF jitters the experts' input too, moec only the router's.
        "router_jitter_noise": moe.jitter,
        "router_aux_loss_coef": aux_coefficient(moe) / moe.top_k as f64,
        "output_router_logits": false,
        "sliding_window": null,
    }))
}

/// Mixtral and Qwen3-MoE route with one flat softmax: no shared experts, groups or bias.
fn softmax_router_limits(moe: &Moe, model: &str) -> Result<(), CheckpointError> {
    if moe.shared_experts > 0 || moe.groups.is_some() {
        return not(format!(
            "shared experts or expert groups ({model} has one flat set of routed experts)"
        ));
    }
    if has_bias(moe) {
        return not(format!(
            "bias balancing (a selection bias {model}'s router lacks)"
        ));
    }
    Ok(())
}

fn aux_coefficient(moe: &Moe) -> f64 {
    moe.balance
        .iter()
        .find_map(|b| match b {
            Balance::Aux(c) => Some(*c),
            _ => None,
        })
        .unwrap_or(0.0)
}

fn qwen3_moe(spec: &Spec, moe: &Moe) -> Result<Value, CheckpointError> {
    let m = &spec.model;
    softmax_router_limits(moe, "Qwen3-MoE")?;
    // The largest step whose sparse blocks include every MoE block; the rest of them are dense
    // through `mlp_only_layers`.
    let step = (1..=m.layers)
        .rev()
        .find(|s| moe.blocks.iter().all(|b| (b + 1) % s == 0))
        .unwrap_or(1);
    let mlp_only: Vec<usize> = (0..m.layers)
        .filter(|i| (i + 1) % step == 0 && !moe.is_moe_block(*i))
        .collect();
    Ok(json!({
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "intermediate_size": m.ffn.hidden,
        "moe_intermediate_size": moe.expert.hidden,
        "num_experts": moe.experts,
        "num_experts_per_tok": moe.top_k,
        "norm_topk_prob": moe.gate == (Gate::Softmax { renorm: true }),
        "decoder_sparse_step": step,
        "mlp_only_layers": mlp_only,
        "router_aux_loss_coef": aux_coefficient(moe) / moe.top_k as f64,
        "output_router_logits": false,
        "attention_bias": false,
        "use_sliding_window": false,
        "sliding_window": null,
    }))
}

fn glm4_moe(spec: &Spec, moe: &Moe) -> Result<Value, CheckpointError> {
    let m = &spec.model;
    let first_dense = moe.blocks.first().copied().unwrap_or(m.layers);
    if moe.blocks != (first_dense..m.layers).collect::<Vec<_>>() {
        return not(format!(
            "gate = Sigmoid with MoE blocks {:?} (GLM-4-MoE's MoE blocks are all blocks after the first K dense ones)",
            moe.blocks
        ));
    }
    if moe.shared_experts == 0 {
        return not(
            "gate = Sigmoid without shared experts (GLM-4-MoE, the sigmoid-gated model, always has them)"
                .into(),
        );
    }
    let (groups, kept) = match moe.groups {
        Some((g, per)) if per >= 2 => (g, moe.top_groups),
        Some((g, per)) => {
            return not(format!(
                "groups = {g} x {per} (GLM-4-MoE scores a group by its top 2 experts)"
            ))
        }
        None => (1, 1),
    };
    if moe.experts < 2 {
        return not("one expert (GLM-4-MoE scores a group by its top 2 experts)".into());
    }
    Ok(json!({
        "architectures": ["Glm4MoeForCausalLM"],
        "model_type": "glm4_moe",
        "intermediate_size": m.ffn.hidden,
        "moe_intermediate_size": moe.expert.hidden,
        "n_routed_experts": moe.experts,
        "num_experts_per_tok": moe.top_k,
        "n_shared_experts": moe.shared_experts,
        "n_group": groups,
        "topk_group": kept,
        "first_k_dense_replace": first_dense,
        "norm_topk_prob": true,
        "routed_scaling_factor": 1.0,
        "use_qk_norm": m.qk_norm,
        "partial_rotary_factor": 1.0,
        "rope_parameters": { "rope_type": "default", "rope_theta": m.rope_theta, "partial_rotary_factor": 1.0 },
        "attention_bias": false,
        "num_nextn_predict_layers": 0,
        "output_router_logits": false,
    }))
}

/// The name moec's checkpoint tensor `name` takes in the HF model `model_type`, or `None` when it
/// is not one of that model's weights (optimizer and router state, except GLM-4-MoE's
/// `e_score_correction_bias`, which is moec's `bias(...)` state).
pub fn hf_weight_name(model_type: &str, name: &str) -> Option<String> {
    if name.starts_with("optim.") {
        return None;
    }
    let renamed = matches!(model_type, "qwen3_moe" | "glm4_moe");
    if let Some(rest) = name.strip_prefix("router_state.") {
        let block = rest.strip_suffix(".bias")?;
        return (model_type == "glm4_moe")
            .then(|| format!("model.layers.{block}.mlp.gate.e_score_correction_bias"));
    }
    if !renamed || !name.contains(".block_sparse_moe.") {
        return Some(name.to_string());
    }
    let mut out = name.replace(".block_sparse_moe.", ".mlp.");
    for (moec, hf) in [
        (".w1.weight", ".gate_proj.weight"),
        (".w3.weight", ".up_proj.weight"),
        (".w2.weight", ".down_proj.weight"),
    ] {
        if let Some(stem) = out.strip_suffix(moec) {
            out = format!("{stem}{hf}");
        }
    }
    Some(out.replace(".mlp.shared_expert.", ".mlp.shared_experts."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_names_per_architecture() {
        let cases = [
            (
                "mixtral",
                "model.layers.0.block_sparse_moe.experts.3.w1.weight",
                Some("model.layers.0.block_sparse_moe.experts.3.w1.weight"),
            ),
            ("mixtral", "router_state.0.bias", None),
            (
                "qwen3_moe",
                "model.layers.1.block_sparse_moe.gate.weight",
                Some("model.layers.1.mlp.gate.weight"),
            ),
            (
                "qwen3_moe",
                "model.layers.1.block_sparse_moe.experts.0.w1.weight",
                Some("model.layers.1.mlp.experts.0.gate_proj.weight"),
            ),
            (
                "qwen3_moe",
                "model.layers.1.block_sparse_moe.experts.7.w3.weight",
                Some("model.layers.1.mlp.experts.7.up_proj.weight"),
            ),
            (
                "qwen3_moe",
                "model.layers.1.block_sparse_moe.experts.7.w2.weight",
                Some("model.layers.1.mlp.experts.7.down_proj.weight"),
            ),
            (
                "qwen3_moe",
                "model.layers.0.mlp.gate_proj.weight",
                Some("model.layers.0.mlp.gate_proj.weight"),
            ),
            (
                "qwen3_moe",
                "model.layers.0.self_attn.q_norm.weight",
                Some("model.layers.0.self_attn.q_norm.weight"),
            ),
            ("qwen3_moe", "router_state.1.bias", None),
            (
                "glm4_moe",
                "router_state.1.bias",
                Some("model.layers.1.mlp.gate.e_score_correction_bias"),
            ),
            (
                "glm4_moe",
                "model.layers.1.block_sparse_moe.shared_expert.up_proj.weight",
                Some("model.layers.1.mlp.shared_experts.up_proj.weight"),
            ),
            ("glm4_moe", "optim.m.model.norm.weight", None),
        ];
        for (model, name, want) in cases {
            assert_eq!(
                hf_weight_name(model, name).as_deref(),
                want,
                "{model}: {name}"
            );
        }
    }
}
