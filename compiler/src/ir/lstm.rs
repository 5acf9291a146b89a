//! The recurrence of the `lstm` family as IR ops (`LstmScan`, `LstmHidden` and their adjoints).
//!
//! # The record
//! `LstmScan` produces, for every sequence `b` and step `t`, the row `record[b, t]` of `6H` values:
//! `[h | c | σ(i) | σ(f) | tanh(g) | σ(o)]` (each `H` wide, PyTorch's gate order), i.e. the state
//! after step `t` and the activated gates that produced it. Backpropagation through time reads
//! exactly this (the state before step `t` is the neighbouring row), so the backward pass never
//! recomputes the recurrent matmul. [`PART_H`] .. [`PART_GATES`] are the part offsets in units of H.

use super::{expect_args, expect_dtype, DType, TensorType};

/// Values per record row, in units of the hidden width H.
pub const PARTS: usize = 6;
/// Part of the record row holding h.
pub const PART_H: usize = 0;
/// Part holding c.
pub const PART_C: usize = 1;
/// First of the four activated-gate parts (i, f, g, o).
pub const PART_GATES: usize = 2;

/// The step `LstmLast` reads for column `c` of a `[B, T, dirs·H]` sequence: the last step for the
/// forward columns, the first for the reverse ones.
pub fn last_step(c: usize, width: usize, dirs: usize, steps: usize) -> usize {
    if c >= width / dirs {
        0
    } else {
        steps - 1
    }
}

/// Hidden width H of a record type `[B, T, 6H]`.
pub fn hidden_of(record: &TensorType) -> usize {
    record.last() / PARTS
}

fn expect_record(t: &TensorType) -> Result<(), String> {
    expect_dtype(t, DType::F32, "record")?;
    if t.shape.len() != 3 || t.last() == 0 || !t.last().is_multiple_of(PARTS) {
        return Err(format!("an LSTM record is [B, T, {PARTS}·H], got {t}"));
    }
    Ok(())
}

fn expect_whh(w: &TensorType, h: usize) -> Result<(), String> {
    expect_dtype(w, DType::F32, "w_hh")?;
    if w.shape != [4 * h, h] {
        return Err(format!("w_hh must be [{}, {h}], got {w}", 4 * h));
    }
    Ok(())
}

/// `LstmScan`'s type: the record `[B, T, 6H]` of `xg [B, T, 4H]` and `w_hh [4H, H]`. The LSTM
/// ops' rules are named by [`super::infer`], one function each.
pub(super) fn scan(args: &[&TensorType]) -> Result<TensorType, String> {
    expect_args(args, 2)?;
    let xg = args[0];
    expect_dtype(xg, DType::F32, "xg")?;
    if xg.shape.len() != 3 || xg.last() == 0 || !xg.last().is_multiple_of(4) {
        return Err(format!("lstm_scan wants xg [B, T, 4·H], got {xg}"));
    }
    let h = xg.last() / 4;
    expect_whh(args[1], h)?;
    Ok(TensorType::f32(&[xg.shape[0], xg.shape[1], PARTS * h]))
}

/// `LstmHidden`'s type: the h parts of one or two equal records side by side, `[B, T, dirs·H]`.
pub(super) fn hidden(args: &[&TensorType]) -> Result<TensorType, String> {
    if args.is_empty() || args.len() > 2 {
        return Err(format!("expected 1 or 2 records, got {}", args.len()));
    }
    for r in args {
        expect_record(r)?;
        if r.shape != args[0].shape {
            return Err(format!("records differ: {} vs {r}", args[0]));
        }
    }
    let r = args[0];
    Ok(TensorType::f32(&[
        r.shape[0],
        r.shape[1],
        args.len() * hidden_of(r),
    ]))
}

/// `LstmLast`'s type: each direction's last step of `x [B, T, dirs·H]`, `[B, dirs·H]`.
pub(super) fn last(dirs: usize, args: &[&TensorType]) -> Result<TensorType, String> {
    expect_args(args, 1)?;
    let x = args[0];
    expect_dtype(x, DType::F32, "x")?;
    if x.shape.len() != 3 || !matches!(dirs, 1 | 2) || !x.last().is_multiple_of(dirs) {
        return Err(format!(
            "lstm_last of {dirs} directions wants x [B, T, dirs·H], got {x}"
        ));
    }
    Ok(TensorType::f32(&[x.shape[0], x.last()]))
}

/// `LstmScanGrad`'s type: the adjoint of the pre-activation gates, `[B, T, 4H]`.
pub(super) fn scan_grad(col: usize, args: &[&TensorType]) -> Result<TensorType, String> {
    expect_args(args, 3)?;
    let (g, rec) = (args[0], args[1]);
    expect_record(rec)?;
    let h = hidden_of(rec);
    expect_dtype(g, DType::F32, "g")?;
    if g.shape.len() != 3 || g.shape[..2] != rec.shape[..2] || col + h > g.last() {
        return Err(format!(
            "lstm_scan_grad wants g [B, T, ≥ {}] beside the record {rec}, got {g}",
            col + h
        ));
    }
    expect_whh(args[2], h)?;
    Ok(TensorType::f32(&[rec.shape[0], rec.shape[1], 4 * h]))
}

/// `LstmScanGradW`'s type: the adjoint of `w_hh`, `[4H, H]`.
pub(super) fn scan_grad_w(args: &[&TensorType]) -> Result<TensorType, String> {
    expect_args(args, 2)?;
    let (dg, rec) = (args[0], args[1]);
    expect_record(rec)?;
    let h = hidden_of(rec);
    expect_dtype(dg, DType::F32, "dgates")?;
    if dg.shape != [rec.shape[0], rec.shape[1], 4 * h] {
        return Err(format!(
            "lstm_scan_grad_w wants dgates [B, T, {}] beside the record {rec}, got {dg}",
            4 * h
        ));
    }
    Ok(TensorType::f32(&[4 * h, h]))
}

/// `LstmLastGrad`'s type: `g` spread back over `steps` steps, `[B, steps, dirs·H]`.
pub(super) fn last_grad(
    dirs: usize,
    steps: usize,
    args: &[&TensorType],
) -> Result<TensorType, String> {
    expect_args(args, 1)?;
    let g = args[0];
    expect_dtype(g, DType::F32, "g")?;
    if g.shape.len() != 2 || !matches!(dirs, 1 | 2) || !g.last().is_multiple_of(dirs) || steps == 0
    {
        return Err(format!(
            "lstm_last_grad of {dirs} directions wants g [B, dirs·H], got {g}"
        ));
    }
    Ok(TensorType::f32(&[g.shape[0], steps, g.last()]))
}
