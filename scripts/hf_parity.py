#!/usr/bin/env python3
"""HF parity: do a moec checkpoint's logits equal those of HF transformers' MixtralForCausalLM?

moec promises (README, "HF parity") that a checkpoint of a Mixtral-shaped spec (softmax top-k
renormalised, SwiGLU experts, RMSNorm, RoPE rotate_half) gives the same logits in `MixtralForCausalLM` as in moec. PyTorch
is not needed here: this file re-implements the forward pass of `transformers`'
`models/mixtral/modeling_mixtral.py` (and, for dense specs, `models/llama/modeling_llama.py`) in
numpy, module by module with HF's names, reading only what `from_pretrained` would read: the
checkpoint directory's `config.json` and the safetensors weights under their HF names. moec's side
comes from `moec forward --checkpoint CKPT --tokens IDS --dump-logits FILE.npy` (the GPU plan).

The reference runs in float64, so the difference measures moec's f32 error plus any difference of
semantics. Exit status 1 when max |moec - hf| / max |hf| exceeds --tol (default 1e-4); a difference
of semantics (mask, RoPE layout, routing, GQA grouping) shows up as errors of order 1e-2..1.

    pip install numpy safetensors
    cargo build --release
    python3 scripts/hf_parity.py runs/mixtral            # a run directory or its checkpoint file
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from safetensors import safe_open

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- modeling_mixtral.py / modeling_llama.py, in numpy (float64) ----------------------------------


def linear(x, weight):
    """nn.Linear(bias=False): weights are [out, in]."""
    return x @ weight.T


def silu(x):
    return x / (1.0 + np.exp(-x))


def softmax(x, axis=-1):
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


class MixtralRMSNorm:
    def __init__(self, weight, eps):
        self.weight = weight
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        variance = (hidden_states**2).mean(-1, keepdims=True)
        hidden_states = hidden_states / np.sqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states


class MixtralRotaryEmbedding:
    """rope_type "default": inv_freq = 1 / theta^(arange(0, dim, 2) / dim), emb = cat(freqs, freqs)."""

    def __init__(self, config):
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        base = config.get("rope_theta", 10000.0)
        self.inv_freq = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float64) / head_dim))

    def forward(self, position_ids):
        freqs = position_ids[:, :, None].astype(np.float64) * self.inv_freq[None, None, :]
        emb = np.concatenate((freqs, freqs), axis=-1)
        return np.cos(emb), np.sin(emb)


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return np.concatenate((-x2, x1), axis=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    cos = np.expand_dims(cos, unsqueeze_dim)
    sin = np.expand_dims(sin, unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


def repeat_kv(hidden_states, n_rep):
    """(batch, kv_heads, slen, hd) -> (batch, kv_heads * n_rep, slen, hd): query head h reads kv head h // n_rep."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = np.broadcast_to(hidden_states[:, :, None, :, :], (batch, num_key_value_heads, n_rep, slen, head_dim))
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def causal_mask(seq_len, sliding_window):
    """create_causal_mask / create_sliding_window_causal_mask as an additive float mask."""
    q = np.arange(seq_len)[:, None]
    kv = np.arange(seq_len)[None, :]
    allowed = kv <= q
    if sliding_window is not None:
        allowed &= kv > q - sliding_window
    return np.where(allowed, 0.0, -np.inf)[None, None, :, :]


def eager_attention_forward(query, key, value, attention_mask, scaling, num_key_value_groups):
    key_states = repeat_kv(key, num_key_value_groups)
    value_states = repeat_kv(value, num_key_value_groups)
    attn_weights = (query @ key_states.transpose(0, 1, 3, 2)) * scaling
    attn_weights = attn_weights + attention_mask
    attn_weights = softmax(attn_weights, axis=-1)
    attn_output = attn_weights @ value_states
    return attn_output.transpose(0, 2, 1, 3)


class MixtralAttention:
    def __init__(self, config, w, prefix):
        self.head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        self.num_key_value_groups = config["num_attention_heads"] // config["num_key_value_heads"]
        self.scaling = self.head_dim**-0.5
        self.q_proj = w(prefix + "q_proj.weight")
        self.k_proj = w(prefix + "k_proj.weight")
        self.v_proj = w(prefix + "v_proj.weight")
        self.o_proj = w(prefix + "o_proj.weight")

    def forward(self, hidden_states, position_embeddings, attention_mask):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = linear(hidden_states, self.q_proj).reshape(hidden_shape).transpose(0, 2, 1, 3)
        key_states = linear(hidden_states, self.k_proj).reshape(hidden_shape).transpose(0, 2, 1, 3)
        value_states = linear(hidden_states, self.v_proj).reshape(hidden_shape).transpose(0, 2, 1, 3)
        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        attn_output = eager_attention_forward(
            query_states, key_states, value_states, attention_mask, self.scaling, self.num_key_value_groups
        )
        attn_output = attn_output.reshape(*input_shape, -1)
        return linear(attn_output, self.o_proj)


class MixtralBlockSparseTop2MLP:
    def __init__(self, w, prefix):
        self.w1 = w(prefix + "w1.weight")
        self.w2 = w(prefix + "w2.weight")
        self.w3 = w(prefix + "w3.weight")

    def forward(self, hidden_states):
        current_hidden_states = silu(linear(hidden_states, self.w1)) * linear(hidden_states, self.w3)
        return linear(current_hidden_states, self.w2)


class MixtralSparseMoeBlock:
    def __init__(self, config, w, prefix):
        self.num_experts = config["num_local_experts"]
        self.top_k = config["num_experts_per_tok"]
        self.gate = w(prefix + "gate.weight")
        self.experts = [MixtralBlockSparseTop2MLP(w, f"{prefix}experts.{e}.") for e in range(self.num_experts)]
        # Smallest gap between the k-th and (k+1)-th routing probability over all tokens: where it
        # is below f32 resolution, moec (f32) and this reference (f64) may pick different experts.
        self.min_margin = np.inf

    def forward(self, hidden_states):
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, hidden_dim)
        router_logits = linear(hidden_states, self.gate)
        routing_weights = softmax(router_logits, axis=1)
        # torch.topk: the k largest, in descending order.
        order = np.argsort(-routing_weights, axis=-1, kind="stable")
        selected_experts = order[:, : self.top_k]
        sorted_weights = np.take_along_axis(routing_weights, order, axis=-1)
        if self.top_k < self.num_experts:
            gap = sorted_weights[:, self.top_k - 1] - sorted_weights[:, self.top_k]
            self.min_margin = min(self.min_margin, float(gap.min()))
        routing_weights = sorted_weights[:, : self.top_k]
        routing_weights = routing_weights / routing_weights.sum(axis=-1, keepdims=True)

        final_hidden_states = np.zeros((batch_size * sequence_length, hidden_dim))
        for expert_idx in range(self.num_experts):
            top_x, idx = np.nonzero(selected_experts == expert_idx)
            if top_x.size == 0:
                continue
            current_state = hidden_states[top_x]
            current_hidden_states = self.experts[expert_idx].forward(current_state) * routing_weights[top_x, idx, None]
            np.add.at(final_hidden_states, top_x, current_hidden_states)
        return final_hidden_states.reshape(batch_size, sequence_length, hidden_dim), router_logits


class LlamaMLP:
    def __init__(self, w, prefix):
        self.gate_proj = w(prefix + "gate_proj.weight")
        self.up_proj = w(prefix + "up_proj.weight")
        self.down_proj = w(prefix + "down_proj.weight")

    def forward(self, x):
        return linear(silu(linear(x, self.gate_proj)) * linear(x, self.up_proj), self.down_proj)


class DecoderLayer:
    """MixtralDecoderLayer (block_sparse_moe) or LlamaDecoderLayer (mlp)."""

    def __init__(self, config, w, layer_idx):
        prefix = f"model.layers.{layer_idx}."
        eps = config["rms_norm_eps"]
        self.self_attn = MixtralAttention(config, w, prefix + "self_attn.")
        self.input_layernorm = MixtralRMSNorm(w(prefix + "input_layernorm.weight"), eps)
        self.post_attention_layernorm = MixtralRMSNorm(w(prefix + "post_attention_layernorm.weight"), eps)
        if config["model_type"] == "mixtral":
            self.block_sparse_moe = MixtralSparseMoeBlock(config, w, prefix + "block_sparse_moe.")
            self.mlp = None
        else:
            self.block_sparse_moe = None
            self.mlp = LlamaMLP(w, prefix + "mlp.")

    def forward(self, hidden_states, position_embeddings, attention_mask):
        residual = hidden_states
        hidden_states = self.input_layernorm.forward(hidden_states)
        hidden_states = self.self_attn.forward(hidden_states, position_embeddings, attention_mask)
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.post_attention_layernorm.forward(hidden_states)
        if self.block_sparse_moe is not None:
            hidden_states, _ = self.block_sparse_moe.forward(hidden_states)
        else:
            hidden_states = self.mlp.forward(hidden_states)
        return residual + hidden_states


class ForCausalLM:
    """MixtralForCausalLM / LlamaForCausalLM: embed_tokens, layers, norm, lm_head (tied or not)."""

    def __init__(self, config, w):
        self.config = config
        self.embed_tokens = w("model.embed_tokens.weight")
        self.layers = [DecoderLayer(config, w, i) for i in range(config["num_hidden_layers"])]
        self.norm = MixtralRMSNorm(w("model.norm.weight"), config["rms_norm_eps"])
        self.rotary_emb = MixtralRotaryEmbedding(config)
        self.lm_head = self.embed_tokens if config.get("tie_word_embeddings") else w("lm_head.weight")

    def forward(self, input_ids):
        inputs_embeds = self.embed_tokens[input_ids]
        position_ids = np.arange(input_ids.shape[1])[None, :]
        attention_mask = causal_mask(input_ids.shape[1], self.config.get("sliding_window"))
        position_embeddings = self.rotary_emb.forward(position_ids)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer.forward(hidden_states, position_embeddings, attention_mask)
        hidden_states = self.norm.forward(hidden_states)
        return linear(hidden_states, self.lm_head)

    def min_routing_margin(self):
        return min((l.block_sparse_moe.min_margin for l in self.layers if l.block_sparse_moe), default=np.inf)


# ---- the comparison -------------------------------------------------------------------------------


def checkpoint_file(path):
    return os.path.join(path, "checkpoint.safetensors") if os.path.isdir(path) else path


def load_weights(path):
    """The tensors HF would load (optimizer and router state under `optim.` / `router_state.` are
    ignored by from_pretrained, as here), as float64."""
    weights = {}
    with safe_open(path, framework="numpy") as f:
        for name in f.keys():
            if not name.startswith(("optim.", "router_state.")):
                weights[name] = f.get_tensor(name).astype(np.float64)
    return weights


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a moec run directory or its checkpoint.safetensors")
    parser.add_argument("--config", help="HF config.json (default: the one beside the checkpoint)")
    parser.add_argument("--tokens", help="comma-separated token ids (default: --length random ids)")
    parser.add_argument("--length", type=int, help="random ids to draw (default: the context)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random ids")
    parser.add_argument("--moec", default=os.path.join(REPO, "target", "release", "moec"), help="the moec binary")
    parser.add_argument("--logits", help="moec's logits as .npy instead of running moec (with --tokens)")
    parser.add_argument("--tol", type=float, default=1e-4, help="max |moec - hf| / max |hf| allowed")
    args = parser.parse_args()

    ckpt = checkpoint_file(args.checkpoint)
    config_path = args.config or os.path.join(os.path.dirname(ckpt), "config.json")
    if not os.path.exists(config_path):
        sys.exit(f"no HF config at {config_path}: moec writes config.json beside checkpoints of specs that "
                 "MixtralForCausalLM / LlamaForCausalLM can run (moec train prints why when it cannot)")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("model_type") not in ("mixtral", "llama"):
        sys.exit(f"{config_path} is a `{config.get('model_type')}` config; this check knows mixtral and llama")

    model = ForCausalLM(config, lambda name, w=load_weights(ckpt): w[name])
    vocab = config["vocab_size"]
    if args.tokens:
        ids = [int(t) for t in args.tokens.split(",")]
    else:
        length = args.length or config["max_position_embeddings"]
        ids = np.random.default_rng(args.seed).integers(0, vocab, size=length).tolist()

    if args.logits:
        if not args.tokens:
            sys.exit("--logits needs the --tokens moec ran on")
        ours = np.load(args.logits)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "logits.npy")
            cmd = [args.moec, "forward", "--checkpoint", args.checkpoint, "--tokens", ",".join(map(str, ids)), "--dump-logits", out]
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
            ours = np.load(out)

    theirs = model.forward(np.array([ids]))[0]
    if ours.shape != theirs.shape:
        sys.exit(f"moec's logits have shape {ours.shape}, HF's {theirs.shape}")
    diff = np.abs(ours.astype(np.float64) - theirs)
    scale = np.abs(theirs).max()
    rel = diff.max() / scale
    agree = (ours.argmax(-1) == theirs.argmax(-1)).mean()
    print(f"{config['architectures'][0]}: {len(ids)} tokens, vocab {vocab}, max |hf logit| {scale:.4f}")
    print(f"max abs error {diff.max():.3e}, mean abs error {diff.mean():.3e}, max error / max |logit| {rel:.3e} (tol {args.tol:.0e})")
    margin = model.min_routing_margin()
    routing = f", smallest top-k routing margin {margin:.3e}" if np.isfinite(margin) else ""
    print(f"argmax agreement {100 * agree:.1f}%{routing}")
    if not rel <= args.tol:
        worst = np.unravel_index(diff.argmax(), diff.shape)
        print(f"FAIL: worst at position {worst[0]}, token {worst[1]}: moec {ours[worst]:.6f}, hf {theirs[worst]:.6f}")
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
