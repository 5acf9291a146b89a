#!/usr/bin/env python3
"""LSTM parity: do a moec `family = lstm` model's logits equal PyTorch's?

Builds the model in PyTorch from a moec checkpoint, with code moec does not share: one
`torch.nn.LSTM(in, dim, num_layers=1, batch_first=True)` per layer (`bidirectional=True` when the
checkpoint has `_reverse` weights) loaded from the checkpoint's `model.layers.N.lstm.*` tensors as they
are, a flat top-k MoE with a residual after the MoE blocks (router `block_sparse_moe.gate.weight`,
per-expert `experts.E.w{1,2,3}.weight`), and the head: the LM head on every position for a language
model; for a sequence classifier `classifier.{weight,bias}` on PyTorch's h_n of the last layer's output
(forward half at the last step, reverse half at the first).
The router is evaluated as moec evaluates it (no noise): softmax over the experts, top-k, the
selected probabilities renormalised, which is also `noisy_top_k`'s G = softmax(KeepTopK(H, k)).
moec's side is `moec forward --checkpoint CKPT --dump-logits FILE.npy` (the GPU plan), with
`--tokens IDS` (random ids) for a language model and `--dump-inputs` for a classifier (moec's seeded
random features of one training batch, fed to PyTorch as they are).
Runs in float64; exit status 1 when max |moec - torch| / max |torch| exceeds --tol (1e-4).

    /work/venv/bin/python scripts/lstm_parity.py runs/shazeer_lstm_flat --experts-act relu --top-k 2
    /work/venv/bin/python scripts/lstm_parity.py runs/lstm_bidirectional --experts-act relu --top-k 2
"""

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from safetensors.torch import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def checkpoint_file(path):
    return os.path.join(path, "checkpoint.safetensors") if os.path.isdir(path) else path


class Moe(torch.nn.Module):
    def __init__(self, w, prefix, act, top_k):
        super().__init__()
        self.gate = w[f"{prefix}.gate.weight"]
        self.experts = []
        e = 0
        while f"{prefix}.experts.{e}.w1.weight" in w:
            self.experts.append({k: w.get(f"{prefix}.experts.{e}.{k}.weight") for k in ("w1", "w2", "w3")})
            e += 1
        self.act, self.top_k = act, top_k

    def expert(self, x, p):
        h = x @ p["w1"].T
        if self.act == "swiglu":
            h = torch.nn.functional.silu(h) * (x @ p["w3"].T)
        elif self.act == "gelu":
            h = torch.nn.functional.gelu(h, approximate="tanh")
        else:
            h = torch.relu(h)
        return h @ p["w2"].T

    def forward(self, x):
        probs = torch.softmax(x @ self.gate.T, dim=-1)
        top, idx = probs.topk(self.top_k, dim=-1)
        top = top / top.sum(-1, keepdim=True)
        y = torch.zeros_like(x)
        for e, p in enumerate(self.experts):
            weight = (top * (idx == e)).sum(-1, keepdim=True)
            y = y + weight * self.expert(x, p)
        return y


def build(w, act, top_k):
    layers = []
    n = 0
    while f"model.layers.{n}.lstm.weight_ih_l0" in w:
        p = f"model.layers.{n}.lstm"
        four_h, inp = w[f"{p}.weight_ih_l0"].shape
        bidirectional = f"{p}.weight_ih_l0_reverse" in w
        lstm = torch.nn.LSTM(inp, four_h // 4, num_layers=1, batch_first=True, bidirectional=bidirectional)
        # Every tensor under the layer's prefix, by nn.LSTM's own names (strict: none missing or extra).
        lstm.double().load_state_dict({k[len(p) + 1 :]: v for k, v in w.items() if k.startswith(f"{p}.")})
        moe_prefix = f"model.layers.{n}.block_sparse_moe"
        moe = Moe(w, moe_prefix, act, top_k) if f"{moe_prefix}.gate.weight" in w else None
        layers.append((lstm, moe))
        n += 1

    def body(x):
        for lstm, moe in layers:
            x, _ = lstm(x)
            if moe is not None:
                x = x + moe(x)
        return x

    if "classifier.weight" in w:
        # h_n of the last layer's output: the forward half after the last step, the reverse half
        # after its own last step, t = 0.
        def classify(features):
            y = body(features)
            dim = layers[-1][0].hidden_size
            h_n = y[:, -1, :dim]
            if layers[-1][0].bidirectional:
                h_n = torch.cat([h_n, y[:, 0, dim:]], dim=-1)
            return h_n @ w["classifier.weight"].T + w["classifier.bias"]

        return classify
    emb = w["model.embed_tokens.weight"]
    head = w.get("lm_head.weight", emb)
    return lambda ids: (body(emb[torch.tensor(ids)][None]) @ head.T)[0]


def layers_input_width(w):
    return w["model.layers.0.lstm.weight_ih_l0"].shape[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a moec run directory or its checkpoint.safetensors")
    parser.add_argument("--experts-act", default="relu", choices=["relu", "gelu", "swiglu"])
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--length", type=int, default=50, help="random ids to draw (LM; at most the context)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--moec", default=os.path.join(REPO, "target", "release", "moec"))
    parser.add_argument("--tol", type=float, default=1e-4)
    args = parser.parse_args()

    w = {k: v.double() for k, v in load_file(checkpoint_file(args.checkpoint)).items()}
    model = build(w, args.experts_act, args.top_k)
    with tempfile.TemporaryDirectory() as tmp:
        out, inputs = os.path.join(tmp, "logits.npy"), os.path.join(tmp, "inputs.npy")
        cmd = [args.moec, "forward", "--checkpoint", args.checkpoint, "--dump-logits", out]
        if "classifier.weight" in w:
            what = "features"
            cmd += ["--dump-inputs", inputs, "--seed", str(args.seed)]
        else:
            vocab = w["model.embed_tokens.weight"].shape[0]
            ids = np.random.default_rng(args.seed).integers(0, vocab, size=args.length).tolist()
            what = f"{len(ids)} tokens, vocab {vocab}"
            cmd += ["--tokens", ",".join(map(str, ids))]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        ours = np.load(out).astype(np.float64)
        with torch.no_grad():
            if "classifier.weight" in w:
                features = torch.from_numpy(np.load(inputs).astype(np.float64))
                batch, width = features.shape
                steps = width // layers_input_width(w)
                what = f"{batch} sequences of {steps} steps"
                theirs = model(features.reshape(batch, steps, -1)).numpy()
            else:
                theirs = model(ids).numpy()
    if ours.shape != theirs.shape:
        sys.exit(f"moec's logits have shape {ours.shape}, torch's {theirs.shape}")
    diff = np.abs(ours - theirs)
    scale = np.abs(theirs).max()
    print(f"nn.LSTM + MoE: {what}, max |logit| {scale:.4f}")
    print(f"max abs error {diff.max():.3e}, max error / max |logit| {diff.max() / scale:.3e} (tol {args.tol:.0e})")
    print(f"argmax agreement {100 * (ours.argmax(-1) == theirs.argmax(-1)).mean():.1f}%")
    if not diff.max() / scale <= args.tol:
        print("FAIL")
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
