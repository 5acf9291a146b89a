//! The `lstm` family (docs/language.md "Families"; Shazeer et al. 2017): stacked PyTorch `nn.LSTM`
//! layers with a routed MoE layer and a residual (`h ← h + MoE(h)`) after every MoE block, then an
//! LM head (a language model, `vocab`) or a linear head on the final states (a sequence classifier,
//! `inputs`, `classes`). No normalisation layers.
//!
//! Each layer and direction is one input projection of all steps at once (`x·W_ihᵀ + b_ih + b_hh`,
//! one matmul) and one `LstmScan` (the recurrence); `LstmHidden` joins the directions in PyTorch's
//! bidirectional layout `[h_forward, h_reverse]`.
//!
//! Names load into one `nn.LSTM(in, dim, num_layers = 1)` per layer:
//! `model.layers.N.lstm.{weight_ih_l0, weight_hh_l0, bias_ih_l0, bias_hh_l0}` (+ `_reverse`).
//! Init: PyTorch's defaults: LSTM weights and biases U(±1/√dim), linear layers (experts, routers,
//! heads) U(±1/√fan_in) (`Lower::weight_init`), the embedding N(0, 1).
//! Classifier head: `classifier.{weight,bias}` as the `mlp` family's.

use super::{Lower, LowerError};
use crate::ir::{BinaryOp, Init, NodeId, Op, TensorType};

impl Lower<'_> {
    /// The `lstm` family: `(logits, ce)` of a language model ending in `head`, or of a sequence
    /// classifier (always [`super::Head::Logits`]).
    pub(super) fn lstm(
        &mut self,
        batch: usize,
        head: super::Head,
    ) -> Result<(Option<NodeId>, Option<NodeId>), LowerError> {
        let m = &self.spec.model;
        let missing = |field| LowerError::Missing {
            field,
            family: "lstm",
        };
        let t = m.context.ok_or(missing("context"))?;
        let dirs = if m.bidirectional { 2 } else { 1 };
        let (x, out) = match (m.vocab, m.inputs, m.classes) {
            (Some(vocab), _, _) => {
                if dirs == 2 {
                    return Err(LowerError::Invalid(
                        "a bidirectional language model would see the token it predicts".into(),
                    ));
                }
                let tokens = self.g.input("tokens", TensorType::u32(&[batch, t]));
                let targets = self.g.input("targets", TensorType::u32(&[batch, t]));
                // N(0, 1), PyTorch nn.Embedding's init: no normalisation layer rescales the LSTM's
                // input, and with the transformer's N(0, 0.02) the gates barely see the tokens, so
                // the model sits at the unigram loss for hundreds of steps (docs/DECISIONS.md).
                let emb = self.g.param(
                    "model.embed_tokens.weight",
                    &[vocab, m.dim],
                    Init::Normal { std: 1.0 },
                );
                let x = self.add(Op::Embedding, &[emb, tokens], "model.embed_tokens")?;
                (x, Head::Lm { emb, targets })
            }
            (None, Some(inputs), Some(classes)) => {
                let features = self
                    .g
                    .input("features", TensorType::f32(&[batch, t * inputs]));
                let targets = self.g.input("targets", TensorType::u32(&[batch]));
                let x = self.reshape(features, &[batch, t, inputs], "model.steps")?;
                (x, Head::Classes { classes, targets })
            }
            (None, None, _) => return Err(missing("vocab")),
            (None, Some(_), None) => return Err(missing("classes")),
        };
        let mut x = x;
        for i in 0..m.layers {
            x = self.lstm_layer(x, i, dirs)?;
            x = self.lstm_moe(x, i, batch, t)?;
        }
        let width = self.last_dim(x);
        match out {
            Head::Lm { emb, targets } => {
                let h = self.reshape(x, &[batch * t, width], "model.rows")?;
                self.lm_head(h, emb, targets, batch, head)
            }
            Head::Classes { classes, targets } => {
                let last = self.add(Op::LstmLast { dirs }, &[x], "model.final_states")?;
                let logits = self.linear(last, "classifier", classes, true)?;
                let ce = self.add(Op::CrossEntropy, &[logits, targets], "ce")?;
                Ok((Some(logits), Some(ce)))
            }
        }
    }

    /// LSTM layer `i` on `x[B, T, in]` → `[B, T, dirs·dim]`.
    fn lstm_layer(&mut self, x: NodeId, i: usize, dirs: usize) -> Result<NodeId, LowerError> {
        let shape = self.g.ty(x).shape.clone();
        let (b, t, inp, h) = (shape[0], shape[1], shape[2], self.spec.model.dim);
        let p = format!("model.layers.{i}.lstm");
        let rows = self.reshape(x, &[b * t, inp], format!("{p}.input_rows"))?;
        // nn.LSTM's init: every weight and bias U(±1/√dim).
        let init = self.weight_init(h);
        let mut records = Vec::new();
        for d in 0..dirs {
            let sfx = if d == 1 { "_reverse" } else { "" };
            let w_ih = self
                .g
                .param(&format!("{p}.weight_ih_l0{sfx}"), &[4 * h, inp], init);
            let w_hh = self
                .g
                .param(&format!("{p}.weight_hh_l0{sfx}"), &[4 * h, h], init);
            let b_ih = self
                .g
                .param(&format!("{p}.bias_ih_l0{sfx}"), &[4 * h], init);
            let b_hh = self
                .g
                .param(&format!("{p}.bias_hh_l0{sfx}"), &[4 * h], init);
            let xg = self.add(
                Op::MatMul { trans_b: true },
                &[rows, w_ih],
                format!("{p}.input_proj{sfx}"),
            )?;
            let xg = self.binary(BinaryOp::Add, xg, b_ih, format!("{p}.bias_ih{sfx}"))?;
            let xg = self.binary(BinaryOp::Add, xg, b_hh, format!("{p}.bias_hh{sfx}"))?;
            let xg = self.reshape(xg, &[b, t, 4 * h], format!("{p}.gates_in{sfx}"))?;
            let reverse = d == 1;
            let op = Op::LstmScan { reverse };
            records.push(self.add(op, &[xg, w_hh], format!("{p}.scan{sfx}"))?);
        }
        self.add(Op::LstmHidden, &records, format!("{p}.hidden"))
    }

    /// `x + MoE(x)` when block `i` is an MoE block, else `x` unchanged; `x[B, T, W]`.
    fn lstm_moe(&mut self, x: NodeId, i: usize, b: usize, t: usize) -> Result<NodeId, LowerError> {
        let spec = self.spec;
        let Some(moe) = spec.moe.as_ref().filter(|moe| moe.is_moe_block(i)) else {
            return Ok(x);
        };
        let w = self.last_dim(x);
        let p = format!("model.layers.{i}");
        let rows = self.reshape(x, &[b * t, w], format!("{p}.moe_rows"))?;
        let y = self.moe(rows, i, moe, Some((b, t)))?;
        let y = self.binary(BinaryOp::Add, rows, y, format!("{p}.moe_residual"))?;
        self.reshape(y, &[b, t, w], format!("{p}.moe_out"))
    }
}

/// What the last layer's output feeds.
enum Head {
    Lm { emb: NodeId, targets: NodeId },
    Classes { classes: usize, targets: NodeId },
}
