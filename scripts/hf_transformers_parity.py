#!/usr/bin/env python3
"""Loads a moec run directory in real HF transformers and compares its logits with moec's.

    python scripts/hf_transformers_parity.py RUN_DIR [--moec PATH] [--seed S]

`AutoModelForCausalLM.from_pretrained(RUN_DIR)` reads the run's config.json (the architecture moec
chose: Llama, Mixtral, Qwen3, Qwen3-MoE, GLM-4-MoE) and its weights through
model.safetensors.index.json; every weight must load (no missing or unexpected keys). One random
context-length row of token ids goes through it in float32 and through
`moec forward --checkpoint RUN_DIR --tokens IDS --dump-logits FILE`; fails when
max |moec - HF| exceeds 1e-4 of max |logit|.

Needs torch and transformers (pip install torch transformers safetensors numpy); not part of CI.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from transformers import AutoModelForCausalLM

TOL = 1e-4


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--moec", default="target/debug/moec")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with open(os.path.join(args.run_dir, "config.json")) as f:
        config = json.load(f)
    rng = np.random.default_rng(args.seed)
    ids = rng.integers(0, config["vocab_size"], config["max_position_embeddings"])

    with tempfile.TemporaryDirectory() as tmp:
        dump = os.path.join(tmp, "logits.npy")
        subprocess.run(
            [args.moec, "forward", "--checkpoint", args.run_dir, "--tokens",
             ",".join(map(str, ids)), "--dump-logits", dump],
            check=True,
        )
        ours = np.load(dump).astype(np.float64)

    model, info = AutoModelForCausalLM.from_pretrained(
        args.run_dir, dtype=torch.float32, output_loading_info=True
    )
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        sys.exit(f"weights did not load cleanly: {bad}")
    model.eval()
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].double().numpy()
    err = float(np.abs(ours - theirs).max())
    scale = float(np.abs(theirs).max())
    print(f"{type(model).__name__}: max |moec - HF| = {err:.2e}, max |logit| = {scale:.3f}, ratio {err / scale:.2e}")
    if err > TOL * scale:
        sys.exit(f"FAIL: above {TOL} of max |logit|")
    print("ok")


if __name__ == "__main__":
    main()
