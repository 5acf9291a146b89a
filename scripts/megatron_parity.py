#!/usr/bin/env python3
"""Checks moec's routing against Megatron-Core's own routing functions.

    moec export megatron SPEC -o OUT
    moec forward SPEC --dump-router DUMP
    python scripts/megatron_parity.py OUT DUMP

Builds Megatron-Core's TransformerConfig from OUT/megatron.json (its __post_init__ validation must
pass), then, for every MoE block in DUMP, runs megatron.core.transformer.moe.moe_utils (top-k routing
with the score function, group-limited top-k and expert bias; the TopKRouter's Sinkhorn routing;
capacity and drop policy; the switch aux loss, the per-sequence aux loss, the z-loss; the expert-bias
update) on moec's router logits and compares:
- selected experts: identical (before capacity; after capacity for drop = probs; for drop = position
  Megatron picks which routed tokens to keep by torch.topk on a 0/1 map, in no promised order, so
  only each expert's kept count must agree, and the differing slots are reported);
- gate weights, balancing terms and the updated expert bias: within 1e-5 (absolute).
Megatron orders tokens sequence-first ([s, b]); moec's dump is batch-major, so tokens are reordered
before Megatron sees them. Exits 1 on any mismatch.

Needs torch and megatron-core (pip install torch megatron-core numpy); runs on the CPU.
"""

import argparse
import json
import os
import sys
import types
import warnings

import numpy as np

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from megatron.core.transformer.moe import moe_utils  # noqa: E402
from megatron.core.transformer.moe.router import TopKRouter  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

TOL = 1e-5

ACTIVATIONS = {
    "silu": F.silu,
    "openai_gelu": lambda x: F.gelu(x, approximate="tanh"),
}


def transformer_config(out_dir):
    with open(os.path.join(out_dir, "megatron.json")) as f:
        exported = json.load(f)
    fields = dict(exported["transformer_config"])
    fields["activation_func"] = ACTIVATIONS[fields.get("activation_func", "silu")]
    # Constructing it runs Megatron's validation (__post_init__).
    return TransformerConfig(**fields), exported


def load(dump, block, name, batch, seq):
    """A dumped [B*T, ...] array (batch-major) as a tensor in Megatron's [s*b, ...] order."""
    path = os.path.join(dump, f"block{block}.{name}.npy")
    if not os.path.exists(path):
        return None
    a = np.load(path)
    if a.ndim == 2 and a.shape[0] == batch * seq:
        a = a.reshape(batch, seq, -1).transpose(1, 0, 2).reshape(batch * seq, -1)
    return torch.from_numpy(a.astype(np.int64 if a.dtype == np.uint32 else np.float32))


def scatter(idx, values, experts):
    out = torch.zeros(idx.shape[0], experts, dtype=values.dtype)
    return out.scatter(1, idx, values)


def loss_types(cfg):
    kinds = cfg.moe_router_load_balancing_type
    coeffs = cfg.moe_aux_loss_coeff
    if isinstance(kinds, str):
        return {kinds: coeffs}
    return dict(zip(kinds, coeffs))


def single_rank_process_group():
    """get_updated_expert_bias all-reduces over the data-parallel group: one CPU rank here."""
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            "gloo", init_method="tcp://127.0.0.1:29512", rank=0, world_size=1
        )
    parallel_state.get_tensor_and_data_parallel_group = lambda **_: None


class Report:
    def __init__(self):
        self.failures = []

    def close(self, what, ours, theirs, tol=TOL):
        err = float((ours.double() - theirs.double()).abs().max()) if ours.numel() else 0.0
        ok = err <= tol
        print(f"  {what:<34} max |moec - megatron| = {err:.2e} {'ok' if ok else 'FAIL'}")
        if not ok:
            self.failures.append(what)

    def same(self, what, ours, theirs):
        differ = int((ours != theirs).sum())
        print(f"  {what:<34} {differ} of {ours.numel()} entries differ {'ok' if differ == 0 else 'FAIL'}")
        if differ:
            self.failures.append(what)


def check_block(cfg, manifest, dump, block, report):
    b, s = manifest["batch"], manifest["seq"]
    e, k = cfg.num_moe_experts, cfg.moe_router_topk
    get = lambda name: load(dump, block, name, b, s)  # noqa: E731
    logits = get("logits")
    tokens = logits.shape[0]
    print(f"block {block}: {tokens} tokens, {e} experts, top-{k}")
    experts, weights, kept = get("experts"), get("weights"), get("kept")
    ours_map = scatter(experts, torch.ones_like(experts, dtype=torch.float32), e).bool()
    ours_probs = scatter(experts, weights, e)
    kinds = loss_types(cfg)

    if kinds.get("sinkhorn") is not None:
        router = types.SimpleNamespace(topk=k, config=cfg, training=True)
        probs, routing_map = TopKRouter.sinkhorn_load_balancing(router, logits)
    else:
        bias = get("bias")
        bias = bias.flatten() if bias is not None and cfg.moe_router_enable_expert_bias else None
        probs, routing_map = moe_utils.topk_routing_with_score_function(
            logits,
            k,
            use_pre_softmax=cfg.moe_router_pre_softmax,
            num_groups=cfg.moe_router_num_groups,
            group_topk=cfg.moe_router_group_topk,
            scaling_factor=cfg.moe_router_topk_scaling_factor,
            score_function=cfg.moe_router_score_function,
            expert_bias=bias,
        )
    report.same("selected experts", ours_map, routing_map)
    report.close("gate weights", ours_probs, probs)

    if cfg.moe_expert_capacity_factor is not None:
        capacity = moe_utils.get_capacity(tokens * k, e, cfg.moe_expert_capacity_factor)
        print(f"  capacity {capacity} (moec {manifest['capacity']})")
        if capacity != manifest["capacity"]:
            report.failures.append("capacity")
        probs, routing_map = moe_utils.apply_router_token_dropping(
            probs,
            routing_map,
            router_topk=k,
            capacity_factor=cfg.moe_expert_capacity_factor,
            drop_policy=cfg.moe_token_drop_policy,
            pad_to_capacity=cfg.moe_pad_expert_input_to_capacity,
        )
        ours_kept = scatter(experts, kept.float(), e).bool() & ours_map
        if cfg.moe_token_drop_policy == "probs":
            report.same("kept slots (drop = probs)", ours_kept, routing_map)
            report.close("gate weights after drops", ours_probs * ours_kept, probs)
        else:
            report.same("kept per expert (drop = position)", ours_kept.sum(0), routing_map.sum(0))
            differ = int((ours_kept != routing_map).sum())
            print(f"  ({differ} slots kept by one and not the other: Megatron's tie order)")

    if kinds.get("aux_loss") or kinds.get("seq_aux_loss"):
        map_aux, scores = moe_utils.compute_routing_scores_for_aux_loss(
            logits, k, cfg.moe_router_score_function
        )
        if kinds.get("aux_loss"):
            aux = moe_utils.switch_load_balancing_loss_func(
                scores, map_aux.sum(0), tokens, k, e, kinds["aux_loss"]
            )
            report.close("aux loss", get("aux").flatten(), aux.reshape(1))
        if kinds.get("seq_aux_loss"):
            # As TopKRouter._apply_seq_aux_loss: the batch folded into the expert axis.
            seq_scores = scores.reshape(s, -1)
            seq_map = map_aux.reshape(s, -1)
            seq = moe_utils.switch_load_balancing_loss_func(
                seq_scores, seq_map.sum(0), s, k, e, kinds["seq_aux_loss"]
            ) / b
            report.close("seq aux loss", get("seq_aux").flatten(), seq.reshape(1))
    if cfg.moe_z_loss_coeff is not None:
        z = moe_utils.z_loss_func(logits, cfg.moe_z_loss_coeff)
        report.close("z loss", get("z").flatten(), z.reshape(1))
    else:
        z = moe_utils.z_loss_func(logits, 1.0)
        report.close("router z (coefficient 1)", get("router_z").flatten(), z.reshape(1))

    if cfg.moe_router_enable_expert_bias:
        single_rank_process_group()
        updated = moe_utils.get_updated_expert_bias(
            routing_map.sum(0).float(), get("bias").flatten(), cfg.moe_router_bias_update_rate
        )
        report.close("updated expert bias", get("bias_next").flatten(), updated)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="the directory `moec export megatron` wrote")
    parser.add_argument("dump", help="the directory `moec forward --dump-router` wrote")
    args = parser.parse_args()
    cfg, exported = transformer_config(args.out)
    print(f"TransformerConfig of `{exported['model']}` built and validated")
    with open(os.path.join(args.dump, "router.json")) as f:
        manifest = json.load(f)
    report = Report()
    with torch.no_grad():
        for block in manifest["blocks"]:
            check_block(cfg, manifest, args.dump, block, report)
    if report.failures:
        print(f"FAIL: {', '.join(report.failures)}")
        sys.exit(1)
    print("parity: ok")


if __name__ == "__main__":
    main()
