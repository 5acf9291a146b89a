//! Token data sets for the language-model families and the batcher that cuts training windows.
//!
//! # Sources (`train { data = ... }`)
//! - `text("file")`: the file's raw bytes are the tokens (needs `vocab >= 256`).
//! - `tokens("file.bin", dtype = u16 | u32)`: little-endian token ids, nanoGPT's flat `.bin` layout, or
//!   llm.c's fineweb shards, recognised by their header (256 little-endian i32: magic, version, token
//!   count, zeros): magic 20240520 / version 1 holds u16 tokens, magic 20240801 / version 7 holds u32
//!   tokens. A header whose token width disagrees with `dtype` is an error, so a wrong `dtype` never
//!   silently reads garbage.
//! - `synthetic(kind = markov | copy, seed = S)`: generated in memory, the same for the same seed on
//!   every machine (ChaCha8). See [`MARKOV_TOKENS`] and [`COPY_TOKENS`] for the sizes.
//!
//! Paths are relative to the spec file's directory (absolute paths are kept).
//!
//! # Split
//! The first `floor(split · n)` tokens are the training part and the rest the validation part: a
//! contiguous cut (as nanoGPT does), so no validation window overlaps a training window except at
//! the single boundary. For `copy`, whose windows are whole sequences, the cut is on sequence
//! boundaries: the first `floor(split · sequences)` sequences train. Each part must hold at least one
//! window, `context + 1` tokens (the inputs plus the next-token target).
//!
//! # Windows
//! A window is `context + 1` consecutive tokens: inputs are the first `context`, targets the last
//! `context` (inputs shifted by one). Stream data (`text`, `tokens`, `markov`) may start a window at
//! any position; `copy` windows start at sequence boundaries.

use moec_compiler::spec::{Data, SyntheticKind, TokenDtype};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Magic of llm.c's GPT-2 token shards (u16 tokens, version 1), fineweb's usual layout.
pub const FINEWEB_MAGIC_U16: i32 = 20240520;
/// Magic of llm.c's Llama-3 token shards (u32 tokens, version 7).
pub const FINEWEB_MAGIC_U32: i32 = 20240801;
/// Header size of llm.c shards: 256 i32.
pub const FINEWEB_HEADER_BYTES: usize = 256 * 4;
/// Length of `synthetic(kind = markov)`: ~1M tokens, enough that a small model cannot memorise it
/// and generated in a few milliseconds. Grows to 64 windows when the context is very long.
pub const MARKOV_TOKENS: usize = 1 << 20;
/// Likely successors of each token in the `markov` chain.
pub const MARKOV_SUCCESSORS: usize = 4;
/// Approximate length of `synthetic(kind = copy)` in tokens (whole sequences; at least 16 of them).
pub const COPY_TOKENS: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read data file `{path}`: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{what} data is not token data for a language model; it is meant for the `mlp` (classifier) family")]
    NotForLm { what: String },
    #[error("text data is raw bytes (256 token ids), but the model's vocab is {vocab}; set vocab = 256 or more")]
    TextVocab { vocab: usize },
    #[error("the model's vocab is 0; synthetic data needs at least one token id")]
    EmptyVocab,
    #[error("`{path}` holds {bytes} bytes of token data, not a multiple of {width} ({dtype} tokens); is the dtype right?")]
    Misaligned { path: PathBuf, bytes: usize, width: usize, dtype: &'static str },
    #[error("`{path}` has a token-shard header for {header} tokens, but the spec says dtype = {spec}; write dtype = {header}")]
    HeaderDtype { path: PathBuf, header: &'static str, spec: &'static str },
    #[error("`{path}` has a token-shard header (magic {magic}) with version {version}; expected version {expected}")]
    HeaderVersion { path: PathBuf, magic: i32, version: i32, expected: i32 },
    #[error("`{path}`: its header says {header} tokens but the file holds {actual}; the file is truncated or not a token shard")]
    HeaderCount { path: PathBuf, header: i64, actual: usize },
    #[error("{source_name}: token {value} at position {position} is not below the model's vocab = {vocab}")]
    TokenOutOfRange { source_name: String, position: usize, value: u32, vocab: usize },
    #[error(
        "{source_name} is too short for context = {context}: its {part} part has {have} tokens, but each part needs at least {needed} \
         (context + 1); {total} tokens in all, split = {split}"
    )]
    TooShort { source_name: String, part: &'static str, have: usize, needed: usize, total: usize, context: usize, split: f64 },
    #[error(
        "the saved batcher state is for {saved} training tokens, but this data set has {actual}; the data changed since the checkpoint"
    )]
    StateMismatch { saved: usize, actual: usize },
}

/// Where windows may start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Any position (a token stream).
    Stream,
    /// Only at multiples of `context + 1` (independent sequences, e.g. `copy`).
    Sequences,
}

/// An LM data set, already split; tokens are `u32` whatever the file's width.
#[derive(Debug, Clone)]
pub struct Dataset {
    vocab: usize,
    context: usize,
    layout: Layout,
    train: Vec<u32>,
    val: Vec<u32>,
    description: String,
    conditional_entropy: Option<f64>,
}

/// One batch: `[batch, context]` row-major inputs and next-token targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub tokens: Vec<u32>,
    pub targets: Vec<u32>,
}

impl Dataset {
    /// Reads or generates `data` for a model of `vocab` token ids and sequence length `context`, and
    /// splits it (module docs). `spec_dir` is the directory of the spec file.
    pub fn load(data: &Data, spec_dir: &Path, vocab: usize, context: usize, split: f64) -> Result<Dataset, DataError> {
        let (tokens, layout, description) = match data {
            Data::Text { path } => {
                if vocab < 256 {
                    return Err(DataError::TextVocab { vocab });
                }
                let full = spec_dir.join(path);
                let bytes = read(&full)?;
                (bytes.into_iter().map(u32::from).collect(), Layout::Stream, format!("`{}`", full.display()))
            }
            Data::Tokens { path, dtype } => {
                let full = spec_dir.join(path);
                let tokens = parse_tokens(&read(&full)?, *dtype, &full)?;
                let description = format!("`{}`", full.display());
                check_range(&tokens, vocab, &description)?;
                (tokens, Layout::Stream, description)
            }
            Data::Cifar10 { dir } => return Err(DataError::NotForLm { what: format!("cifar10(\"{dir}\")") }),
            Data::Synthetic { kind: SyntheticKind::Classes, .. } => {
                return Err(DataError::NotForLm { what: "synthetic(kind = classes)".into() })
            }
            Data::Synthetic { kind: SyntheticKind::Markov, seed } => {
                if vocab == 0 {
                    return Err(DataError::EmptyVocab);
                }
                let chain = MarkovChain::new(vocab, *seed);
                let n = MARKOV_TOKENS.max(64 * (context + 1));
                let tokens = chain.generate(n, *seed);
                let mut ds = split_into(tokens, Layout::Stream, format!("synthetic(kind = markov, seed = {seed})"), vocab, context, split)?;
                ds.conditional_entropy = Some(chain.conditional_entropy(&ds.train));
                return Ok(ds);
            }
            Data::Synthetic { kind: SyntheticKind::Copy, seed } => {
                if vocab == 0 {
                    return Err(DataError::EmptyVocab);
                }
                let len = context + 1;
                let tokens = copy_sequences(vocab, len, (COPY_TOKENS / len).max(16), *seed);
                let mut ds =
                    split_into(tokens, Layout::Sequences, format!("synthetic(kind = copy, seed = {seed})"), vocab, context, split)?;
                // Targets 1..h-1 of each sequence are fresh uniform tokens; targets h.. repeat the first
                // half, which the model has seen: the best achievable loss is (h-1)/context · ln V.
                let h = len.div_ceil(2);
                ds.conditional_entropy = Some((h - 1) as f64 / context.max(1) as f64 * (vocab as f64).ln());
                return Ok(ds);
            }
        };
        split_into(tokens, layout, description, vocab, context, split)
    }

    /// A stream data set from tokens already in memory (e.g. tokenised elsewhere, or built by a test):
    /// checked against `vocab` and split like a file. `description` names the source in errors.
    pub fn from_tokens(tokens: Vec<u32>, description: &str, vocab: usize, context: usize, split: f64) -> Result<Dataset, DataError> {
        check_range(&tokens, vocab, description)?;
        split_into(tokens, Layout::Stream, description.to_string(), vocab, context, split)
    }

    pub fn vocab(&self) -> usize {
        self.vocab
    }

    pub fn context(&self) -> usize {
        self.context
    }

    /// Where the data came from, for messages (`` `path` `` or `synthetic(...)`).
    pub fn description(&self) -> &str {
        &self.description
    }

    pub fn train_tokens(&self) -> &[u32] {
        &self.train
    }

    pub fn val_tokens(&self) -> &[u32] {
        &self.val
    }

    /// Entropy (nats/token) of the training part's unigram distribution: the loss of the best model
    /// that ignores context. A trained LM's loss well below this has learned from context.
    pub fn unigram_entropy(&self) -> f64 {
        let mut counts = vec![0u64; self.vocab];
        for &t in &self.train {
            counts[t as usize] += 1;
        }
        let n = self.train.len() as f64;
        counts.iter().filter(|&&c| c > 0).map(|&c| c as f64 / n).map(|p| -p * p.ln()).sum()
    }

    /// The best achievable next-token loss (nats/token) where it is known exactly: for `markov` the
    /// chain's conditional entropy H(next | current) weighted by how often each token occurs in the
    /// training part; for `copy` the share of unpredictable targets times ln V. `None` for files.
    pub fn conditional_entropy(&self) -> Option<f64> {
        self.conditional_entropy
    }

    /// Number of distinct window start positions in a part.
    fn windows(&self, part: &[u32]) -> usize {
        let len = self.context + 1;
        match self.layout {
            Layout::Stream => part.len() - len + 1,
            Layout::Sequences => part.len() / len,
        }
    }

    fn window_start(&self, index: usize) -> usize {
        match self.layout {
            Layout::Stream => index,
            Layout::Sequences => index * (self.context + 1),
        }
    }

    fn push_window(&self, part: &[u32], index: usize, batch: &mut Batch) {
        let start = self.window_start(index);
        batch.tokens.extend_from_slice(&part[start..start + self.context]);
        batch.targets.extend_from_slice(&part[start + 1..start + self.context + 1]);
    }

    /// `n` validation batches of `batch` windows each, the same on every call: the `batch · n`
    /// windows are spread evenly over the validation part (first and last window included), so eval
    /// losses are comparable across steps and runs.
    pub fn val_batches(&self, batch: usize, n: usize) -> Vec<Batch> {
        let windows = self.windows(&self.val);
        let total = batch * n;
        let mut out = Vec::with_capacity(n);
        for b in 0..n {
            let mut batch_out =
                Batch { tokens: Vec::with_capacity(batch * self.context), targets: Vec::with_capacity(batch * self.context) };
            for r in 0..batch {
                let j = b * batch + r;
                let index = if total <= 1 { 0 } else { (j as u128 * (windows - 1) as u128 / (total - 1) as u128) as usize };
                self.push_window(&self.val, index, &mut batch_out);
            }
            out.push(batch_out);
        }
        out
    }
}

fn read(path: &Path) -> Result<Vec<u8>, DataError> {
    std::fs::read(path).map_err(|source| DataError::Read { path: path.to_path_buf(), source })
}

fn dtype_name(dtype: TokenDtype) -> &'static str {
    match dtype {
        TokenDtype::U16 => "u16",
        TokenDtype::U32 => "u32",
    }
}

/// Decodes a token file: an llm.c shard when it starts with one of the two magics, else a flat array.
fn parse_tokens(bytes: &[u8], dtype: TokenDtype, path: &Path) -> Result<Vec<u32>, DataError> {
    let header_i32 = |i: usize| i32::from_le_bytes([bytes[4 * i], bytes[4 * i + 1], bytes[4 * i + 2], bytes[4 * i + 3]]);
    let mut body = bytes;
    if bytes.len() >= FINEWEB_HEADER_BYTES {
        let magic = header_i32(0);
        let shard = match magic {
            FINEWEB_MAGIC_U16 => Some((TokenDtype::U16, 1)),
            FINEWEB_MAGIC_U32 => Some((TokenDtype::U32, 7)),
            _ => None,
        };
        if let Some((header_dtype, expected)) = shard {
            let version = header_i32(1);
            if version != expected {
                return Err(DataError::HeaderVersion { path: path.into(), magic, version, expected });
            }
            if header_dtype != dtype {
                return Err(DataError::HeaderDtype { path: path.into(), header: dtype_name(header_dtype), spec: dtype_name(dtype) });
            }
            body = &bytes[FINEWEB_HEADER_BYTES..];
            let width = if header_dtype == TokenDtype::U16 { 2 } else { 4 };
            let count = header_i32(2) as i64;
            if count < 0 || count as u64 != (body.len() / width) as u64 || !body.len().is_multiple_of(width) {
                return Err(DataError::HeaderCount { path: path.into(), header: count, actual: body.len() / width });
            }
        }
    }
    let width = if dtype == TokenDtype::U16 { 2 } else { 4 };
    if !body.len().is_multiple_of(width) {
        return Err(DataError::Misaligned { path: path.into(), bytes: body.len(), width, dtype: dtype_name(dtype) });
    }
    Ok(match dtype {
        TokenDtype::U16 => body.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u32).collect(),
        TokenDtype::U32 => body.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
    })
}

fn check_range(tokens: &[u32], vocab: usize, source_name: &str) -> Result<(), DataError> {
    match tokens.iter().position(|&t| t as usize >= vocab) {
        Some(position) => Err(DataError::TokenOutOfRange { source_name: source_name.into(), position, value: tokens[position], vocab }),
        None => Ok(()),
    }
}

fn split_into(
    tokens: Vec<u32>,
    layout: Layout,
    description: String,
    vocab: usize,
    context: usize,
    split: f64,
) -> Result<Dataset, DataError> {
    let total = tokens.len();
    let needed = context + 1;
    // NaN and out-of-range splits clamp into [0, 1]; the size check below then explains the problem.
    let split_frac = if split.is_nan() { 0.0 } else { split.clamp(0.0, 1.0) };
    let cut = match layout {
        Layout::Stream => (total as f64 * split_frac).floor() as usize,
        Layout::Sequences => ((total / needed) as f64 * split_frac).floor() as usize * needed,
    };
    let usable = match layout {
        Layout::Stream => total,
        Layout::Sequences => total / needed * needed,
    };
    for (part, have) in [("training", cut), ("validation", usable - cut)] {
        if have < needed {
            return Err(DataError::TooShort { source_name: description, part, have, needed, total, context, split });
        }
    }
    let mut train = tokens;
    train.truncate(usable);
    let val = train.split_off(cut);
    Ok(Dataset { vocab, context, layout, train, val, description, conditional_entropy: None })
}

/// A first-order chain in which every token has [`MARKOV_SUCCESSORS`] successors with
/// Dirichlet(1)-distributed probabilities (expected row entropy ≈ 1.08 nats, far below ln V). One
/// successor of each token follows a random cycle through the whole vocab, so the chain is
/// irreducible and a long sample visits every token.
struct MarkovChain {
    /// Per token: (successor, probability), probabilities summing to 1.
    rows: Vec<Vec<(u32, f64)>>,
}

impl MarkovChain {
    fn new(vocab: usize, seed: u64) -> MarkovChain {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut cycle: Vec<u32> = (0..vocab as u32).collect();
        for i in (1..vocab).rev() {
            cycle.swap(i, rng.random_range(0..=i as u64) as usize);
        }
        let mut next = vec![0u32; vocab];
        for i in 0..vocab {
            next[cycle[i] as usize] = cycle[(i + 1) % vocab];
        }
        let k = MARKOV_SUCCESSORS.min(vocab);
        let rows = (0..vocab)
            .map(|t| {
                let mut succ = vec![next[t]];
                while succ.len() < k {
                    let s = rng.random_range(0..vocab as u64) as u32;
                    if !succ.contains(&s) {
                        succ.push(s);
                    }
                }
                let weights: Vec<f64> = succ.iter().map(|_| -(1.0 - rng.random::<f64>()).ln()).collect();
                let sum: f64 = weights.iter().sum();
                // All-zero weights (every draw exactly 1.0) cannot happen in practice; fall back to uniform.
                succ.into_iter().zip(weights).map(|(s, w)| (s, if sum > 0.0 { w / sum } else { 1.0 / k as f64 })).collect()
            })
            .collect();
        MarkovChain { rows }
    }

    fn generate(&self, n: usize, seed: u64) -> Vec<u32> {
        // A separate stream from the chain's construction, so the two never share draws.
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(1);
        let mut out = Vec::with_capacity(n);
        let mut t = rng.random_range(0..self.rows.len() as u64) as u32;
        for _ in 0..n {
            out.push(t);
            let row = &self.rows[t as usize];
            let u: f64 = rng.random();
            let mut acc = 0.0;
            // The last successor takes any rounding remainder.
            t = row[row.len() - 1].0;
            for &(s, p) in row {
                acc += p;
                if u < acc {
                    t = s;
                    break;
                }
            }
        }
        out
    }

    /// Σ_c freq(c) · H(row c) over the positions of `tokens` that have a successor.
    fn conditional_entropy(&self, tokens: &[u32]) -> f64 {
        let row_h: Vec<f64> = self.rows.iter().map(|r| r.iter().filter(|(_, p)| *p > 0.0).map(|(_, p)| -p * p.ln()).sum()).collect();
        let n = tokens.len().saturating_sub(1);
        if n == 0 {
            return 0.0;
        }
        tokens[..n].iter().map(|&t| row_h[t as usize]).sum::<f64>() / n as f64
    }
}

/// `count` sequences of `len` tokens: a uniform random first half of `h = ceil(len / 2)` tokens, then
/// the first `len - h` of them again.
fn copy_sequences(vocab: usize, len: usize, count: usize, seed: u64) -> Vec<u32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let h = len.div_ceil(2);
    let mut out = Vec::with_capacity(count * len);
    for _ in 0..count {
        let start = out.len();
        for _ in 0..h {
            out.push(rng.random_range(0..vocab as u64) as u32);
        }
        for i in h..len {
            out.push(out[start + i - h]);
        }
    }
    out
}

/// Everything needed to continue a [`Batcher`] exactly where it stopped (stored in checkpoints as
/// JSON). `word_pos` is the ChaCha8 stream position in 32-bit words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatcherState {
    pub seed: u64,
    pub word_pos: u128,
    /// Size of the training part the state was taken on, to refuse resuming on different data.
    pub train_tokens: usize,
}

/// Draws training windows uniformly at random (with replacement) from the training part, in an
/// order fixed by `seed`.
pub struct Batcher<'d> {
    data: &'d Dataset,
    seed: u64,
    rng: ChaCha8Rng,
}

impl<'d> Batcher<'d> {
    pub fn new(data: &'d Dataset, seed: u64) -> Batcher<'d> {
        Batcher { data, seed, rng: ChaCha8Rng::seed_from_u64(seed) }
    }

    /// The next `batch` training windows.
    pub fn next_train_batch(&mut self, batch: usize) -> Batch {
        let windows = self.data.windows(&self.data.train) as u64;
        let mut out =
            Batch { tokens: Vec::with_capacity(batch * self.data.context), targets: Vec::with_capacity(batch * self.data.context) };
        for _ in 0..batch {
            let index = self.rng.random_range(0..windows) as usize;
            self.data.push_window(&self.data.train, index, &mut out);
        }
        out
    }

    pub fn state(&self) -> BatcherState {
        BatcherState { seed: self.seed, word_pos: self.rng.get_word_pos(), train_tokens: self.data.train.len() }
    }

    /// Continues from a saved state: the following batches equal those the saved batcher would have
    /// drawn next.
    pub fn restore(&mut self, state: &BatcherState) -> Result<(), DataError> {
        if state.train_tokens != self.data.train.len() {
            return Err(DataError::StateMismatch { saved: state.train_tokens, actual: self.data.train.len() });
        }
        self.seed = state.seed;
        self.rng = ChaCha8Rng::seed_from_u64(state.seed);
        self.rng.set_word_pos(state.word_pos);
        Ok(())
    }
}
