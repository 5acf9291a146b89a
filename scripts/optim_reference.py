#!/usr/bin/env python3
"""Shampoo and Muon on the GPU against an independent numpy float64 reference.

The reference is written from the formulas of docs/language.md "Optimizers", not ported from moec's
Rust code or its Rust f64 test reference. Its input is what `runtime/tests/train_optim.rs` dumps
when `MOEC_OPTIM_DUMP=DIR` is set: for Shampoo and Muon, 3 steps from random weights on random
gradients, with a warmup schedule and a fixed `expert_lr`, on a tall [70, 5] attention weight, a
vector (norm), a stacked expert weight [2, 3, 50], a router [2, 6] and an embedding [11, 4];
Shampoo's `max_dim = 64` puts the [70, 5] weight over it. The file holds each step's learning rate
per group, the initial weights, the gradients and every checkpoint tensor after each step (weights
and state: Adam's m, v, Shampoo's L, R and their roots, Muon's momentum buffer).

The reference runs all steps chained in f64 from the initial weights, its state starting at zero,
and after each step compares every tensor the GPU checkpointed (the same set must exist on both
sides). Per parameter, step and tensor it prints the max |gpu - ref| and the max relative error
|gpu - ref| / max(|ref|, ATOL/RTOL), and at the end the worst of each over the steps with the worst
error as a fraction of the tolerance. For every Muon hidden matrix it also checks the
Newton-Schulz output O recovered from the GPU's update of that step,
O = ((W_prev - W)/lr - weight_decay * W_prev) / (0.2 sqrt(max(rows, cols))): its singular values
must equal phi^ns_steps of X0's (phi(s) = a s + b s^3 + c s^5 is what one quintic iteration does to
each singular value; X0 from the reference's U) and lie in the band phi^ns_steps maps X0's
singular value range to, and the update's RMS per unit lr (without decay) must equal the
reference's.

Tolerances, per element (|gpu - ref| <= ATOL + RTOL |ref|):
- Muon 1e-6 + 1e-5 |ref|: momentum and Newton-Schulz run in f32 on the GPU.
- Shampoo 1e-5 + 1e-4 |ref|, its roots 1e-4 + 1e-3 |ref|: L and R accumulate in f32 and the GPU's
  roots are taken of those f32 statistics; their rounding (~1e-7 |L|) moves the roots' directions
  of small eigenvalues (eps = 1e-3 in the dump) far more than the grafted update.
- Singular values of O within 1e-4 of phi^5(sigma(X0)) and of the band; update RMS within 1e-5
  relative. O is recovered from f32 weights, so W_prev - W carries their rounding.
Exit status 1 when any tolerance is exceeded.

    MOEC_OPTIM_DUMP=/tmp/optim cargo test -p moec-runtime --test train_optim f64_reference
    python3 scripts/optim_reference.py /tmp/optim
"""

import argparse
import json
import os
import sys

import numpy as np

TOL = {"muon": (1e-6, 1e-5), "shampoo": (1e-5, 1e-4)}
ROOT_TOL = (1e-4, 1e-3)
SIGMA_TOL = 1e-4
RMS_RTOL = 1e-5
NS = (3.4445, -4.7750, 2.0315)


def is_expert(name):
    return ".experts." in name


def decays(shape):
    """No optimizer decays 1-D parameters (norm weights, biases)."""
    return len(shape) >= 2


def is_hidden(name, shape):
    """Muon's hidden matrices: not the embedding, LM head, input projection, classifier or routers."""
    outer = ("embed_tokens", "lm_head", "input_proj", "classifier")
    router = "block_sparse_moe." in name and not is_expert(name) and "shared_expert" not in name
    return len(shape) >= 2 and not router and not any(o in name for o in outer)


def matrices(x, shape):
    """A parameter as a stack of matrices [n, rows, cols] (leading axes stack)."""
    return x.reshape(-1, shape[-2], shape[-1])


def adam_direction(state, g, t, betas, eps):
    """Adam's moments with `betas` and its direction A = m_hat / (sqrt(v_hat) + eps)."""
    b1, b2 = betas
    state["m"] = b1 * state["m"] + (1 - b1) * g
    state["v"] = b2 * state["v"] + (1 - b2) * g * g
    return (state["m"] / (1 - b1**t)) / (np.sqrt(state["v"] / (1 - b2**t)) + eps)


def inverse_fourth_root(x, eps):
    """(X + eps I)^(-1/4) of a symmetric PSD matrix (eigenvalues below 0 are rounding: set to 0)."""
    w, v = np.linalg.eigh(x)
    return (v * (np.maximum(w, 0) + eps) ** -0.25) @ v.T


def shampoo_step(opt, step, name, shape, w, g, state):
    t = step + 1
    a = adam_direction(state, g, t, opt["betas"], opt["eps"])
    wd = opt["weight_decay"] if decays(shape) else 0.0
    if len(shape) < 2 or max(shape[-2:]) > opt["max_dim"]:
        return w - lr_of(opt, step, name, shape) * (a + wd * w)
    d = opt["decay"]
    gm, am = matrices(g, shape), matrices(a, shape)
    state["left"] = d * state["left"] + (1 - d) * gm @ gm.transpose(0, 2, 1)
    state["right"] = d * state["right"] + (1 - d) * gm.transpose(0, 2, 1) @ gm
    if step % opt["root_every"] == 0:
        for side in ("left", "right"):
            state[side + "_root"] = np.stack(
                [inverse_fourth_root(x, opt["eps"]) for x in state[side]]
            )
    dm = state["left_root"] @ gm @ state["right_root"]
    ratio = np.linalg.norm(am, axis=(1, 2)) / np.linalg.norm(dm, axis=(1, 2))
    dm = dm * ratio[:, None, None]
    return w - lr_of(opt, step, name, shape) * (dm.reshape(w.shape) + wd * w)


def newton_schulz(u, steps):
    """`steps` quintic iterations X <- aX + b(XX^T)X + c(XX^T)^2 X from X0 = U / (|U|_F + 1e-7),
    on U^T when U has more rows than columns."""
    tall = u.shape[0] > u.shape[1]
    x = u.T if tall else u
    x = x / (np.linalg.norm(x) + 1e-7)
    a, b, c = NS
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if tall else x


def muon_scale(shape):
    return 0.2 * np.sqrt(max(shape[-2:]))


def muon_step(opt, step, name, shape, w, g, state):
    lr = lr_of(opt, step, name, shape)
    if not is_hidden(name, shape):
        adamw = opt["adamw"]
        a = adam_direction(state, g, step + 1, adamw["betas"], adamw["eps"])
        wd = adamw["weight_decay"] if decays(shape) else 0.0
        return w - lr * (a + wd * w)
    mu = opt["momentum"]
    state["momentum_buffer"] = mu * state["momentum_buffer"] + g
    u = g + mu * state["momentum_buffer"] if opt["nesterov"] else state["momentum_buffer"]
    o = np.stack([newton_schulz(m, opt["ns_steps"]) for m in matrices(u, shape)])
    state["ns_input"], state["ns_output"] = matrices(u, shape), o
    return w - lr * (muon_scale(shape) * o.reshape(w.shape) + opt["weight_decay"] * w)


def lr_of(opt, step, name, shape):
    """The step's learning rate: experts' group, Muon's AdamW group, or the optimizer's."""
    group, experts, adamw = opt["lr"][step]
    if is_expert(name):
        return experts
    if opt["name"] == "muon" and not is_hidden(name, shape):
        return adamw
    return group


def phi_power(x, steps):
    a, b, c = NS
    for _ in range(steps):
        x = a * x + b * x**3 + c * x**5
    return x


def check_orthogonality(opt, step, name, shape, w_prev, w_gpu, state, failures):
    """Newton-Schulz output recovered from the GPU's update vs the quintic's singular value map."""
    lr = lr_of(opt, step, name, shape)
    scale = muon_scale(shape)
    o_gpu = matrices(((w_prev - w_gpu) / lr - opt["weight_decay"] * w_prev) / scale, shape)
    for e, (u, o_ref, o) in enumerate(zip(state["ns_input"], state["ns_output"], o_gpu)):
        sigma0 = np.linalg.svd(u, compute_uv=False) / (np.linalg.norm(u) + 1e-7)
        grid = np.linspace(sigma0.min(), sigma0.max(), 10001)
        band = phi_power(grid, opt["ns_steps"])
        lo, hi = band.min(), band.max()
        want = np.sort(phi_power(sigma0, opt["ns_steps"]))
        got = np.sort(np.linalg.svd(o, compute_uv=False))
        ref = np.sort(np.linalg.svd(o_ref, compute_uv=False))
        rms_gpu = scale * np.sqrt(np.mean(o**2))
        rms_ref = scale * np.sqrt(np.mean(o_ref**2))
        err = np.abs(got - want).max()
        rms_err = abs(rms_gpu - rms_ref) / rms_ref
        print(
            f"    NS output {name}[{e}] step {step}: sigma(O) in [{got.min():.5f}, {got.max():.5f}], "
            f"band phi^{opt['ns_steps']}([{sigma0.min():.4f}, {sigma0.max():.4f}]) = [{lo:.5f}, {hi:.5f}], "
            f"max |sigma - phi^5(sigma0)| = {err:.2e} (f64 ref {np.abs(ref - want).max():.1e}); "
            f"update RMS/lr {rms_gpu:.6f} vs ref {rms_ref:.6f} (rel {rms_err:.1e})"
        )
        if err > SIGMA_TOL or got.min() < lo - SIGMA_TOL or got.max() > hi + SIGMA_TOL:
            failures.append(f"{name}[{e}] step {step}: singular values outside the quintic band")
        if rms_err > RMS_RTOL:
            failures.append(f"{name}[{e}] step {step}: update RMS off by {rms_err:.1e}")


def initial_state(opt, name, shape):
    """The optimizer state of one parameter before step 0 (all zeros)."""
    n = int(np.prod(shape))
    if opt["name"] == "muon" and is_hidden(name, shape):
        return {"momentum_buffer": np.zeros(n)}
    state = {"m": np.zeros(n), "v": np.zeros(n)}
    if opt["name"] == "shampoo" and len(shape) >= 2 and max(shape[-2:]) <= opt["max_dim"]:
        k, r, c = n // (shape[-2] * shape[-1]), shape[-2], shape[-1]
        state.update(left=np.zeros((k, r, r)), right=np.zeros((k, c, c)))
    return state


def f64(values):
    return np.array(values, np.float32).astype(np.float64)


def compare(label, dump, failures):
    """Runs the reference from the dump's initial weights on its gradients, all steps chained in
    f64, and compares every tensor the GPU checkpointed after each step."""
    opt = dict(dump["optimizer"], lr=dump["lr"])
    step_fn = {"shampoo": shampoo_step, "muon": muon_step}[opt["name"]]
    atol, rtol = TOL[opt["name"]]
    steps = len(dump["grads"])
    print(f"{label}: {steps} steps, tolerance {atol:g} + {rtol:g}|ref| (roots "
          f"{ROOT_TOL[0]:g} + {ROOT_TOL[1]:g}|ref|); per tensor: max abs error / max rel error")
    worst = {}
    for i, p in enumerate(dump["params"]):
        name, shape = p["name"], p["shape"]
        w, state = f64(p["init"]), initial_state(opt, name, shape)
        w_gpu = w
        for step, grads in enumerate(dump["grads"]):
            assert len(grads[i]) == 1, "one micro-step per step"
            w = step_fn(opt, step, name, shape, w, f64(grads[i][0]), state)
            after = dump["after"][step]
            prefix = f"optim.{name}."
            gpu = {k[len(prefix):]: f64(v) for k, v in after.items() if k.startswith(prefix)}
            gpu[""] = f64(after[name])
            ref = {"": w, **{k: v for k, v in state.items() if not k.startswith("ns_")}}
            if set(ref) != set(gpu):
                failures.append(f"{name} step {step}: state {sorted(gpu)} on the GPU, "
                                f"{sorted(ref)} in the reference")
                continue
            line = []
            for k in sorted(ref):
                r, got = ref[k].reshape(-1), gpu[k]
                tol = ROOT_TOL if k.endswith("_root") else (atol, rtol)
                d = np.abs(got - r)
                ratio = (d / (tol[0] + tol[1] * np.abs(r))).max()
                rel = (d / np.maximum(np.abs(r), tol[0] / tol[1])).max()
                line.append(f"{k or 'w'} {d.max():.1e}/{rel:.1e}")
                key = (name, k or "w")
                old = worst.get(key, (0.0, 0.0, 0.0))
                worst[key] = tuple(max(a, b) for a, b in zip(old, (d.max(), rel, ratio)))
                if ratio > 1:
                    failures.append(f"{name}.{k or 'w'} step {step}: {ratio:.2f}x the tolerance")
            print(f"  {name} {shape} step {step}: " + ", ".join(line))
            if opt["name"] == "muon" and is_hidden(name, shape):
                check_orthogonality(opt, step, name, shape, w_gpu, gpu[""], state, failures)
            w_gpu = gpu[""]
    print(f"{label}: worst over {steps} steps (max abs error, max rel error, max error/tolerance):")
    for (name, k), (d, rel, ratio) in sorted(worst.items()):
        print(f"    {name} {k}: {d:.2e} {rel:.2e} {ratio:.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dir", help="the MOEC_OPTIM_DUMP directory (shampoo.json, muon.json)")
    args = parser.parse_args()
    failures = []
    for label in ("shampoo", "muon"):
        path = os.path.join(args.dir, f"{label}.json")
        with open(path) as f:
            compare(label, json.load(f), failures)
    for f in failures:
        print("FAIL:", f)
    print("all within tolerance" if not failures else f"{len(failures)} failures")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
