#!/usr/bin/env python3
"""The PyTorch CPU peer of a moec `family = lstm` language model: the same shape trained with
`torch.nn.LSTM` (one per layer) and a Shazeer noisy top-k MoE with a residual after every LSTM layer
but the last (docs/language.md "Families": the default placement), CV² importance and smooth-load
losses, AdamW.

    bench: tokens/s of training steps on random tokens (moec's `moec bench` measures the same thing)
        /work/venv/bin/python scripts/lstm_torch.py bench specs/shazeer-lstm-flat.moe --steps 20
    train: the same step budget on a byte text as `moec train` (first 90% trains, random windows; val
        loss on random windows of the last 10%), for a val loss next to moec's
        /work/venv/bin/python scripts/lstm_torch.py train specs/shazeer-lstm-flat.moe \\
            --text ../shared/data/tinyshakespeare.txt --steps 600 --eval-every 100

Only the fields of the flat `noisy_top_k` LSTM LM specs are read, with a small regex reader (`moec
check` validates the spec; this script trusts it). Not part of CI: it needs torch.
"""
import argparse
import math
import re
import time

import numpy as np
import torch


def field(text, name, default=None, cast=int):
    match = re.search(rf"\b{name}\s*=\s*([0-9.eE+\-_]+)", text)
    return cast(match.group(1).replace("_", "")) if match else default


def read_spec(path):
    text = re.sub(r"#.*", "", open(path).read())
    moe = re.search(r"moe\s*\{(.*?)\}", text, re.S)
    moe_text = moe.group(1) if moe else ""
    model_text = text.replace(moe_text, "")
    return {
        "vocab": field(model_text, "vocab"),
        "dim": field(model_text, "dim"),
        "layers": field(model_text, "layers"),
        "context": field(model_text, "context"),
        "experts": field(moe_text, "experts", 0),
        "top_k": field(moe_text, "top_k", 2),
        "hidden": field(moe_text, "hidden"),
        "importance": field(moe_text, "importance", 0.0, float),
        "load": field(moe_text, "load", 0.0, float),
        "batch": field(text, "batch"),
        "lr": field(text, "lr", 1e-3, float),
    }


def cv2(v):
    return v.var(unbiased=False) / (v.mean() ** 2 + 1e-10)


class NoisyTopKMoe(torch.nn.Module):
    """Shazeer 2017: H = x·Wg + ε·softplus(x·Wnoise), G = softmax(KeepTopK(H, k)); ReLU experts run
    on the tokens routed to them only (index_select / index_add_, the usual sparse CPU layout)."""

    def __init__(self, dim, experts, hidden, top_k):
        super().__init__()
        self.gate = torch.nn.Linear(dim, experts, bias=False)
        self.noise = torch.nn.Linear(dim, experts, bias=False)
        # Each expert as an nn.Linear pair with its default init U(±1/√fan_in), like moec's `lstm` family.
        bound1, bound2 = 1 / math.sqrt(dim), 1 / math.sqrt(hidden)
        self.w1 = torch.nn.Parameter(torch.empty(experts, hidden, dim).uniform_(-bound1, bound1))
        self.w2 = torch.nn.Parameter(torch.empty(experts, dim, hidden).uniform_(-bound2, bound2))
        self.top_k = top_k

    def forward(self, x):
        clean = self.gate(x)
        std = torch.nn.functional.softplus(self.noise(x))
        noisy = clean + torch.randn_like(clean) * std if self.training else clean
        top, idx = noisy.topk(self.top_k + 1, dim=-1)
        gates = torch.zeros_like(noisy).scatter(1, idx[:, : self.top_k], torch.softmax(top[:, : self.top_k], -1))
        # Smooth load: P(e stays in the top k when only its own noise is redrawn).
        kth, kth1 = top[:, self.top_k - 1 : self.top_k], top[:, self.top_k : self.top_k + 1]
        threshold = torch.where(noisy >= kth, kth1, kth)
        load = torch.distributions.Normal(0.0, 1.0).cdf((clean - threshold) / std).sum(0)
        y = torch.zeros_like(x)
        for e in range(self.w1.shape[0]):
            rows = (gates[:, e] > 0).nonzero().squeeze(1)
            if rows.numel():
                h = torch.relu(x[rows] @ self.w1[e].T) @ self.w2[e].T
                y.index_add_(0, rows, h * gates[rows, e : e + 1])
        return y, gates.sum(0), load


class LstmLm(torch.nn.Module):
    def __init__(self, s):
        super().__init__()
        d = s["dim"]
        self.embed = torch.nn.Embedding(s["vocab"], d)
        self.lstms = torch.nn.ModuleList(torch.nn.LSTM(d, d, batch_first=True) for _ in range(s["layers"]))
        self.moes = torch.nn.ModuleList(
            NoisyTopKMoe(d, s["experts"], s["hidden"], s["top_k"]) for _ in range(s["layers"] - 1)
        )
        self.head = torch.nn.Linear(d, s["vocab"], bias=False)
        self.importance, self.load = s["importance"], s["load"]

    def forward(self, ids, targets):
        x, aux = self.embed(ids), 0.0
        for i, lstm in enumerate(self.lstms):
            x, _ = lstm(x)
            if i < len(self.moes):
                b, t, d = x.shape
                y, imp, load = self.moes[i](x.reshape(b * t, d))
                x = x + y.reshape(b, t, d)
                aux = aux + self.importance * cv2(imp) + self.load * cv2(load)
        logits = self.head(x)
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return ce, aux


def windows(data, batch, context, rng):
    starts = rng.integers(0, len(data) - context - 1, size=batch)
    w = np.stack([data[s : s + context + 1] for s in starts]).astype(np.int64)
    return torch.from_numpy(w[:, :-1]), torch.from_numpy(w[:, 1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["bench", "train"])
    parser.add_argument("spec")
    parser.add_argument("--text", help="byte text file (train)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before a bench")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    s = read_spec(args.spec)
    b, t = s["batch"], s["context"]
    model = LstmLm(s)
    opt = torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=0.0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {s}")

    def step(ids, targets):
        ce, aux = model(ids, targets)
        opt.zero_grad()
        (ce + aux).backward()
        opt.step()
        return ce.item()

    if args.mode == "bench":
        ids = torch.randint(0, s["vocab"], (b, t))
        for _ in range(args.warmup):
            step(ids, ids)
        start = time.perf_counter()
        for _ in range(args.steps):
            step(ids, ids)
        secs = (time.perf_counter() - start) / args.steps
        print(f"{secs * 1e3:.1f} ms/step, {b * t / secs:.0f} tokens/s (batch {b} x context {t})")
        return
    data = np.frombuffer(open(args.text, "rb").read(), dtype=np.uint8)
    cut = int(0.9 * len(data))
    train, val = data[:cut], data[cut:]
    start = time.perf_counter()
    for i in range(1, args.steps + 1):
        loss = step(*windows(train, b, t, rng))
        if i % args.eval_every == 0 or i == args.steps:
            model.eval()
            with torch.no_grad():
                val_loss = np.mean([model(*windows(val, b, t, rng))[0].item() for _ in range(args.eval_batches)])
            model.train()
            print(f"step {i} loss {loss:.4f} val_loss {val_loss:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
