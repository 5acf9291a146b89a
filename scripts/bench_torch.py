#!/usr/bin/env python3
"""The peer moec's speed is measured against: HF transformers + PyTorch eager training a spec's shape on
the CPU, with the same batch, context, optimizer and a random-token batch each step.

    python3 scripts/bench_torch.py specs/bench-small.moe [--steps 5] [--warmup 2] [--threads N]

Prints ms/step and tokens/s. Needs `pip install torch transformers` (kept out of CI and the README's two
commands). Only the fields of Mixtral/Llama-shaped transformer specs are read, with a small regex reader
(`moec check` validates the spec; this script trusts it).
"""
import argparse
import re
import time


def field(text, name, default=None, cast=int):
    match = re.search(rf"\b{name}\s*=\s*([0-9.e+-_]+)", text)
    return cast(match.group(1).replace("_", "")) if match else default


def read_spec(path):
    text = re.sub(r"#.*", "", open(path).read())
    moe = re.search(r"moe\s*\{(.*?)\}", text, re.S)
    moe_text = moe.group(1) if moe else ""
    model_text = text.replace(moe_text, "")
    dim = field(model_text, "dim")
    experts = field(moe_text, "experts", 0)
    hidden = field(moe_text, "hidden") or field(model_text, "hidden") or ((8 * dim // 3 + 63) // 64) * 64
    return {
        "vocab": field(model_text, "vocab"),
        "dim": dim,
        "layers": field(model_text, "layers"),
        "heads": field(model_text, "heads"),
        "kv_heads": field(model_text, "kv_heads") or field(model_text, "heads"),
        "context": field(model_text, "context"),
        "experts": experts,
        "top_k": field(moe_text, "top_k", 2),
        "hidden": hidden,
        "batch": field(text, "batch"),
        "lr": field(text, "lr", 3e-4, float),
    }


def model_for(shape):
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    common = dict(
        vocab_size=shape["vocab"],
        hidden_size=shape["dim"],
        intermediate_size=shape["hidden"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=shape["context"],
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    if shape["experts"]:
        config = MixtralConfig(
            num_local_experts=shape["experts"],
            num_experts_per_tok=shape["top_k"],
            output_router_logits=True,
            router_aux_loss_coef=0.01,
            **common,
        )
        return MixtralForCausalLM(config)
    return LlamaForCausalLM(LlamaConfig(**common))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = read_spec(args.spec)
    model = model_for(shape).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=shape["lr"], weight_decay=0.0)
    batch, context = shape["batch"], shape["context"]
    times = []
    for step in range(args.warmup + args.steps):
        tokens = torch.randint(0, shape["vocab"], (batch, context))
        started = time.perf_counter()
        # HF shifts labels itself; with output_router_logits its loss already includes the aux term.
        loss = model(input_ids=tokens, labels=tokens).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
    times.sort()
    median = times[len(times) // 2]
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), {shape}: "
        f"{median * 1e3:,.0f} ms/step, {batch * context / median:,.0f} tokens/s"
    )


if __name__ == "__main__":
    main()
