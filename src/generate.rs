//! `moec generate`: sample tokens from a checkpoint. The forward plan is compiled for one row of
//! the model's static context; the tokens are left-aligned and the rest padded with 0. Attention is
//! causal, so the padding never changes the logits of the last real position, which are the ones
//! sampled from, and the only ones the plan computes ([`Head::Sampled`]: the LM head runs on that
//! row alone). When the sequence outgrows the context, the window slides to its last `context`
//! tokens.

use crate::eval::Model;
use miette::{IntoDiagnostic, Result};
use moec_compiler::lower::{Head, LOGIT_ROWS};
use moec_runtime::Gpu;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::Path;

/// What to generate.
pub struct Args {
    /// The prompt as text (byte tokens; vocab 256 only).
    pub prompt: Option<String>,
    /// The prompt as token ids, for any vocab.
    pub prompt_ids: Option<Vec<u32>>,
    pub tokens: usize,
    /// Softmax temperature; 0 means greedy (argmax).
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f64,
    pub seed: u64,
    pub fusion: bool,
}

pub fn run(checkpoint: &Path, args: &Args, gpu: &Gpu) -> Result<()> {
    let model = Model::load(checkpoint)?;
    let (vocab, context) = model.vocab_context()?;
    let mut tokens: Vec<u32> = match (&args.prompt, &args.prompt_ids) {
        (_, Some(ids)) => ids.clone(),
        (Some(text), None) if vocab == 256 => text.bytes().map(u32::from).collect(),
        (Some(_), None) => miette::bail!("the model's vocab is {vocab}, not bytes (256); give the prompt as token ids with --prompt-ids"),
        (None, None) => miette::bail!("give a prompt: --prompt TEXT or --prompt-ids 1,2,3"),
    };
    if tokens.is_empty() {
        miette::bail!("the prompt is empty; generation needs at least one token");
    }
    if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
        miette::bail!("prompt token {bad} is outside the model's vocab of {vocab}");
    }
    let temperature_ok = args.temperature >= 0.0 && args.temperature.is_finite();
    let top_p_ok = args.top_p > 0.0 && args.top_p <= 1.0;
    if !(temperature_ok && top_p_ok) {
        miette::bail!("--temperature must be ≥ 0 and --top-p in (0, 1]");
    }
    let exec = model.executor(gpu, 1, args.fusion, Head::Sampled)?;
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let prompt_len = tokens.len();
    for _ in 0..args.tokens {
        let window = &tokens[tokens.len().saturating_sub(context)..];
        let mut input = window.to_vec();
        input.resize(context, 0);
        exec.write_u32("tokens", &input).into_diagnostic()?;
        exec.write_u32(LOGIT_ROWS, &[window.len() as u32 - 1])
            .into_diagnostic()?;
        exec.run().into_diagnostic()?;
        let logits = exec.read_f32("logits").into_diagnostic()?;
        tokens.push(sample(
            &logits[..vocab],
            args.temperature,
            args.top_p,
            &mut rng,
        ));
    }
    if vocab == 256 && args.prompt_ids.is_none() {
        let bytes: Vec<u8> = tokens.iter().map(|&t| t as u8).collect();
        println!("{}", String::from_utf8_lossy(&bytes));
    } else {
        let ids: Vec<String> = tokens[prompt_len..].iter().map(u32::to_string).collect();
        println!("{}", ids.join(","));
    }
    Ok(())
}

/// One token from `logits`: argmax at temperature 0 (lowest id on ties), else a draw from the
/// tempered softmax restricted to its top-`top_p` nucleus.
fn sample(logits: &[f32], temperature: f64, top_p: f64, rng: &mut ChaCha8Rng) -> u32 {
    let argmax = logits
        .iter()
        .enumerate()
        .fold(0, |best, (i, &x)| if x > logits[best] { i } else { best });
    if temperature == 0.0 {
        return argmax as u32;
    }
    let max = logits[argmax] as f64;
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .map(|&x| ((x as f64 - max) / temperature).exp())
        .enumerate()
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut kept = 0.0;
    let mut cut = probs.len();
    for (i, p) in probs.iter().enumerate() {
        kept += p.1 / total;
        if kept >= top_p {
            cut = i + 1;
            break;
        }
    }
    let nucleus = &probs[..cut];
    let mass: f64 = nucleus.iter().map(|p| p.1).sum();
    let mut draw = rng.random::<f64>() * mass;
    for &(i, p) in nucleus {
        if draw < p {
            return i as u32;
        }
        draw -= p;
    }
    nucleus[nucleus.len() - 1].0 as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_argmax_and_a_tiny_nucleus_is_the_argmax() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let logits = [0.1, 2.0, -1.0, 1.9];
        assert_eq!(sample(&logits, 0.0, 1.0, &mut rng), 1);
        // The top token alone holds more than 1e-6 of the mass, so the nucleus is just it.
        for _ in 0..20 {
            assert_eq!(sample(&logits, 1.0, 1e-6, &mut rng), 1);
        }
    }
}
