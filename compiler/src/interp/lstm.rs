//! The LSTM ops in the interpreter: the recurrence step by step, exactly as the op docs in `ir.rs`
//! and the record layout in `ir::lstm` say (PyTorch `nn.LSTM` cell: gates (i, f, g, o),
//! c ← σ(f)·c + σ(i)·tanh(g), h ← σ(o)·tanh(c), h₀ = c₀ = 0).

use super::{unary, Ctx, Float, InterpError, Tensor};
use crate::ir::lstm::{hidden_of, last_step, PARTS, PART_C, PART_GATES, PART_H};
use crate::ir::{TensorType, UnaryOp};

/// Steps of one direction in processing order.
fn steps(t: usize, reverse: bool) -> Vec<usize> {
    if reverse {
        (0..t).rev().collect()
    } else {
        (0..t).collect()
    }
}

/// `LstmScan`: the records of one direction's recurrence (the op functions here are named by
/// `interp::eval_node`).
pub(super) fn eval_scan<F: Float>(
    ctx: &Ctx,
    ty: &TensorType,
    args: &[&Tensor<F>],
    reverse: bool,
) -> Result<Tensor<F>, InterpError> {
    ctx.argc(2, args.len())?;
    let (xg, w) = (ctx.f(args[0])?, ctx.f(args[1])?);
    Ok(Tensor::F(scan(xg, w, &ty.shape, reverse)))
}

/// `LstmScanGrad`: backpropagation through time of one direction.
pub(super) fn eval_scan_grad<F: Float>(
    ctx: &Ctx,
    args: &[&Tensor<F>],
    arg_tys: &[&TensorType],
    reverse: bool,
    col: usize,
) -> Result<Tensor<F>, InterpError> {
    ctx.argc(3, args.len())?;
    let (g, rec, w) = (ctx.f(args[0])?, ctx.f(args[1])?, ctx.f(args[2])?);
    let gw = arg_tys[0].last();
    Ok(Tensor::F(bptt(g, gw, col, rec, w, arg_tys[1], reverse)))
}

/// `LstmScanGradW`: the adjoint of `w_hh`.
pub(super) fn eval_scan_grad_w<F: Float>(
    ctx: &Ctx,
    args: &[&Tensor<F>],
    arg_tys: &[&TensorType],
    reverse: bool,
) -> Result<Tensor<F>, InterpError> {
    ctx.argc(2, args.len())?;
    let (dg, rec) = (ctx.f(args[0])?, ctx.f(args[1])?);
    Ok(Tensor::F(scan_grad_w(dg, rec, arg_tys[1], reverse)))
}

/// `LstmLast`: each direction's last step.
pub(super) fn eval_last<F: Float>(
    ctx: &Ctx,
    ty: &TensorType,
    args: &[&Tensor<F>],
    arg_tys: &[&TensorType],
    dirs: usize,
) -> Result<Tensor<F>, InterpError> {
    ctx.argc(1, args.len())?;
    let x = ctx.f(args[0])?;
    let (t, w) = (arg_tys[0].shape[1], arg_tys[0].last());
    let out = (0..ty.numel())
        .map(|i| {
            let (b, c) = (i / w, i % w);
            x[(b * t + last_step(c, w, dirs, t)) * w + c]
        })
        .collect();
    Ok(Tensor::F(out))
}

/// `LstmLastGrad`: `g` put back at each direction's last step, zeros elsewhere.
pub(super) fn eval_last_grad<F: Float>(
    ctx: &Ctx,
    ty: &TensorType,
    args: &[&Tensor<F>],
    arg_tys: &[&TensorType],
    dirs: usize,
    steps: usize,
) -> Result<Tensor<F>, InterpError> {
    ctx.argc(1, args.len())?;
    let g = ctx.f(args[0])?;
    let w = arg_tys[0].last();
    let mut out = vec![F::ZERO; ty.numel()];
    for (i, &v) in g.iter().enumerate() {
        let (b, c) = (i / w, i % w);
        out[(b * steps + last_step(c, w, dirs, steps)) * w + c] = v;
    }
    Ok(Tensor::F(out))
}

/// `LstmHidden`: the h part of each record (of type `record`), side by side.
pub(super) fn hidden<F: Float>(
    ctx: &Ctx,
    ty: &TensorType,
    args: &[&Tensor<F>],
    record: &TensorType,
) -> Result<Tensor<F>, InterpError> {
    let (b, t, width) = (ty.shape[0], ty.shape[1], ty.shape[2]);
    let h = hidden_of(record);
    let mut out = vec![F::ZERO; ty.numel()];
    for (d, rec) in args.iter().enumerate() {
        let rec = ctx.f(rec)?;
        for bt in 0..b * t {
            let src = &rec[bt * PARTS * h + PART_H * h..][..h];
            out[bt * width + d * h..][..h].copy_from_slice(src);
        }
    }
    Ok(Tensor::F(out))
}

/// `LstmScanGradW`: `Σ_{b,t} dgates[b,t]ᵀ · h_prev[b,t]` over the steps of one direction, from the
/// records (of type `record`) of the forward scan.
fn scan_grad_w<F: Float>(dg: &[F], rec: &[F], record: &TensorType, reverse: bool) -> Vec<F> {
    let (b, t, h) = (record.shape[0], record.shape[1], hidden_of(record));
    let mut out = vec![F::ZERO; 4 * h * h];
    for bi in 0..b {
        let order = steps(t, reverse);
        for w in order.windows(2) {
            let (prev, ti) = (w[0], w[1]);
            let hp = &rec[(bi * t + prev) * PARTS * h + PART_H * h..][..h];
            let d = &dg[(bi * t + ti) * 4 * h..][..4 * h];
            for (r, &dr) in d.iter().enumerate() {
                for (o, &x) in out[r * h..(r + 1) * h].iter_mut().zip(hp) {
                    *o += dr * x;
                }
            }
        }
    }
    out
}

/// The forward recurrence: the record `[B, T, 6H]` of `xg[B, T, 4H]` and `w[4H, H]`.
fn scan<F: Float>(xg: &[F], w: &[F], shape: &[usize], reverse: bool) -> Vec<F> {
    let (b, t, h) = (shape[0], shape[1], shape[2] / PARTS);
    let mut rec = vec![F::ZERO; b * t * PARTS * h];
    let sig = |x: F| unary(UnaryOp::Sigmoid, x);
    for bi in 0..b {
        let (mut hs, mut cs) = (vec![F::ZERO; h], vec![F::ZERO; h]);
        for ti in steps(t, reverse) {
            let row = bi * t + ti;
            let x = &xg[row * 4 * h..][..4 * h];
            let pre: Vec<F> = (0..4 * h)
                .map(|r| {
                    let wr = &w[r * h..(r + 1) * h];
                    wr.iter().zip(&hs).fold(x[r], |acc, (&a, &b)| acc + a * b)
                })
                .collect();
            let out = &mut rec[row * PARTS * h..][..PARTS * h];
            for j in 0..h {
                let (i, f) = (sig(pre[j]), sig(pre[h + j]));
                let (g, o) = (pre[2 * h + j].tanh(), sig(pre[3 * h + j]));
                cs[j] = f * cs[j] + i * g;
                hs[j] = o * cs[j].tanh();
                for (part, v) in [(PART_H, hs[j]), (PART_C, cs[j])] {
                    out[part * h + j] = v;
                }
                for (q, v) in [i, f, g, o].into_iter().enumerate() {
                    out[(PART_GATES + q) * h + j] = v;
                }
            }
        }
    }
    rec
}

/// Backpropagation through time of one direction: the adjoint of the pre-activation gates
/// `[B, T, 4H]`, given the adjoint `g[B, T, gw]` of the hidden states at columns `col..col + H`.
fn bptt<F: Float>(
    g: &[F],
    gw: usize,
    col: usize,
    rec: &[F],
    w: &[F],
    rec_ty: &TensorType,
    reverse: bool,
) -> Vec<F> {
    let (b, t, h) = (rec_ty.shape[0], rec_ty.shape[1], hidden_of(rec_ty));
    let mut dgates = vec![F::ZERO; b * t * 4 * h];
    let part = |row: usize, p: usize, j: usize| rec[row * PARTS * h + p * h + j];
    for bi in 0..b {
        // Adjoints flowing back from the step processed after this one.
        let (mut dh_next, mut dc_next) = (vec![F::ZERO; h], vec![F::ZERO; h]);
        let order = steps(t, reverse);
        for (k, &ti) in order.iter().enumerate().rev() {
            let row = bi * t + ti;
            let prev = (k > 0).then(|| bi * t + order[k - 1]);
            let d = &mut dgates[row * 4 * h..][..4 * h];
            for j in 0..h {
                let dh = g[row * gw + col + j] + dh_next[j];
                let gate = |q: usize| part(row, PART_GATES + q, j);
                let (i, f, gg, o) = (gate(0), gate(1), gate(2), gate(3));
                let tc = part(row, PART_C, j).tanh();
                let dc = dc_next[j] + dh * o * (F::ONE - tc * tc);
                let c_prev = prev.map_or(F::ZERO, |p| part(p, PART_C, j));
                d[j] = dc * gg * i * (F::ONE - i);
                d[h + j] = dc * c_prev * f * (F::ONE - f);
                d[2 * h + j] = dc * i * (F::ONE - gg * gg);
                d[3 * h + j] = dh * tc * o * (F::ONE - o);
                dc_next[j] = dc * f;
            }
            for (k2, dn) in dh_next.iter_mut().enumerate() {
                *dn = (0..4 * h).fold(F::ZERO, |acc, r| acc + w[r * h + k2] * d[r]);
            }
        }
    }
    dgates
}
