//! Data sets and the batcher: token streams for the language-model families ([`Dataset`]) and
//! labelled samples for the `mlp` classifier family ([`Samples`]), behind one [`TrainData`].
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
//! - `synthetic(kind = classes, seed = S)` (classifiers): [`CLASS_SAMPLES`] samples drawn from
//!   [`CLUSTERS_PER_CLASS`] Gaussian clusters per class ([`class_clusters`]), also ChaCha8.
//! - `cifar10("dir")` (classifiers): the CIFAR-10 binary batches `data_batch_1.bin` ...
//!   `data_batch_5.bin` and `test_batch.bin`, each a run of 3073-byte records (one label byte, then
//!   1024 red, 1024 green and 1024 blue pixel bytes, rows top to bottom). A sample's 3072 features are
//!   the pixel bytes in that order divided by 255, so they lie in [0, 1]; no mean is subtracted
//!   (the model's input projection has a bias and every block normalises).
//!
//! Paths are relative to the spec file's directory (absolute paths are kept).
//!
//! # Split
//! The first `floor(split · n)` tokens are the training part and the rest the validation part: a
//! contiguous cut (as nanoGPT does), so no validation window overlaps a training window except at
//! the single boundary. For `copy`, whose windows are whole sequences, the cut is on sequence
//! boundaries: the first `floor(split · sequences)` sequences train. Each part must hold at least one
//! window, `context + 1` tokens (the inputs plus the next-token target). `synthetic(kind = classes)`
//! cuts its samples the same way (the first `floor(split · n)` train; samples are i.i.d., so
//! position carries no meaning). `cifar10` keeps the data set's own split whatever `split` says: the
//! five `data_batch` files (50,000 images) train and `test_batch` (10,000) validates, so accuracies
//! compare with published ones. Each part must hold at least one sample.
//!
//! # Windows
//! A window is `context + 1` consecutive tokens: inputs are the first `context`, targets the last
//! `context` (inputs shifted by one). Stream data (`text`, `tokens`, `markov`) may start a window at
//! any position; `copy` windows start at sequence boundaries. A classifier's unit is one sample.

use moec_compiler::spec::{Data, Family, Model, SyntheticKind, TokenDtype};
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
/// Samples of `synthetic(kind = classes)`: enough that a small classifier cannot memorise them, few
/// enough to generate in milliseconds at the usual input widths.
pub const CLASS_SAMPLES: usize = 20_000;
/// Gaussian clusters per class of `synthetic(kind = classes)`: several, so a class is not one convex
/// region and a linear model stays well below what a non-linear one reaches.
pub const CLUSTERS_PER_CLASS: usize = 4;
/// Noise standard deviation of `synthetic(kind = classes)` per coordinate, in units of √inputs (the
/// distance between two cluster centres grows as √inputs, so the overlap does not depend on inputs).
pub const CLASS_NOISE: f64 = 0.25;
/// CIFAR-10 images: 32×32 pixels × 3 channels, one byte each.
pub const CIFAR_INPUTS: usize = 3072;
pub const CIFAR_CLASSES: usize = 10;
/// The CIFAR-10 training batches, in the order their records are concatenated.
pub const CIFAR_TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
/// The CIFAR-10 test batch: the validation part.
pub const CIFAR_TEST_FILE: &str = "test_batch.bin";

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read data file `{path}`: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} data is not token data for a language model; it is meant for the `mlp` (classifier) family")]
    NotForLm { what: String },
    #[error("{what} data is token data for a language model; an `mlp` classifier trains on `cifar10(\"dir\")` or `synthetic(kind = classes)`")]
    NotForClassifier { what: String },
    #[error("the `{family}` model has no `{field}`, which its data needs")]
    ModelField {
        family: &'static str,
        field: &'static str,
    },
    #[error("a classifier needs inputs >= 1 and classes >= 2, but the model has inputs = {inputs}, classes = {classes}")]
    ClassifierShape { inputs: usize, classes: usize },
    #[error("CIFAR-10 images are {expected}, but the model has {field} = {actual}; set {field} = {wanted}")]
    CifarShape {
        field: &'static str,
        actual: usize,
        wanted: usize,
        expected: &'static str,
    },
    #[error(
        "the CIFAR-10 directory `{dir}` lacks {missing}; point at the extracted `cifar-10-batches-bin` \
         (data_batch_1.bin ... data_batch_5.bin, test_batch.bin)"
    )]
    CifarMissing { dir: PathBuf, missing: String },
    #[error("`{path}` holds {bytes} bytes, not a whole number of {record}-byte CIFAR-10 records; the file is truncated or not a CIFAR-10 batch")]
    CifarRecords {
        path: PathBuf,
        bytes: usize,
        record: usize,
    },
    #[error("{source_name}: label {value} of sample {position} is not below the model's classes = {classes}")]
    LabelOutOfRange {
        source_name: String,
        position: usize,
        value: u32,
        classes: usize,
    },
    #[error("{source_name} leaves no sample for its {part} part: {total} samples in all, split = {split}")]
    EmptyPart {
        source_name: String,
        part: &'static str,
        total: usize,
        split: f64,
    },
    #[error("text data is raw bytes (256 token ids), but the model's vocab is {vocab}; set vocab = 256 or more")]
    TextVocab { vocab: usize },
    #[error("the model's vocab is 0; synthetic data needs at least one token id")]
    EmptyVocab,
    #[error("`{path}` holds {bytes} bytes of token data, not a multiple of {width} ({dtype} tokens); is the dtype right?")]
    Misaligned {
        path: PathBuf,
        bytes: usize,
        width: usize,
        dtype: &'static str,
    },
    #[error("`{path}` has a token-shard header for {header} tokens, but the spec says dtype = {spec}; write dtype = {header}")]
    HeaderDtype {
        path: PathBuf,
        header: &'static str,
        spec: &'static str,
    },
    #[error("`{path}` has a token-shard header (magic {magic}) with version {version}; expected version {expected}")]
    HeaderVersion {
        path: PathBuf,
        magic: i32,
        version: i32,
        expected: i32,
    },
    #[error("`{path}`: its header says {header} tokens but the file holds {actual}; the file is truncated or not a token shard")]
    HeaderCount {
        path: PathBuf,
        header: i64,
        actual: usize,
    },
    #[error("{source_name}: token {value} at position {position} is not below the model's vocab = {vocab}")]
    TokenOutOfRange {
        source_name: String,
        position: usize,
        value: u32,
        vocab: usize,
    },
    #[error(
        "{source_name} is too short for context = {context}: its {part} part has {have} tokens, but each part needs at least {needed} \
         (context + 1); {total} tokens in all, split = {split}"
    )]
    TooShort {
        source_name: String,
        part: &'static str,
        have: usize,
        needed: usize,
        total: usize,
        context: usize,
        split: f64,
    },
    #[error(
        "the saved batcher state is for {saved} training tokens (samples for a classifier), but this data set has {actual}; the data changed since the checkpoint"
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

/// One batch, in the layout of the plan's data inputs.
#[derive(Debug, Clone, PartialEq)]
pub enum Batch {
    /// Language models: `[batch, context]` row-major input tokens and next-token targets.
    Tokens { tokens: Vec<u32>, targets: Vec<u32> },
    /// Classifiers: `[batch, inputs]` row-major features and `[batch]` class labels.
    Samples {
        features: Vec<f32>,
        targets: Vec<u32>,
    },
}

/// Index `j` of `total` picks spread evenly over `count` items, the first and the last included:
/// fixed validation batches that cover the whole validation part.
fn spread(j: usize, total: usize, count: usize) -> usize {
    if total <= 1 {
        0
    } else {
        (j as u128 * (count - 1) as u128 / (total - 1) as u128) as usize
    }
}

impl Dataset {
    /// Reads or generates `data` for a model of `vocab` token ids and sequence length `context`, and
    /// splits it (module docs). `spec_dir` is the directory of the spec file.
    pub fn load(
        data: &Data,
        spec_dir: &Path,
        vocab: usize,
        context: usize,
        split: f64,
    ) -> Result<Dataset, DataError> {
        let (tokens, layout, description) = match data {
            Data::Text { path } => {
                if vocab < 256 {
                    return Err(DataError::TextVocab { vocab });
                }
                let full = spec_dir.join(path);
                let bytes = read(&full)?;
                (
                    bytes.into_iter().map(u32::from).collect(),
                    Layout::Stream,
                    format!("`{}`", full.display()),
                )
            }
            Data::Tokens { path, dtype } => {
                let full = spec_dir.join(path);
                let tokens = parse_tokens(&read(&full)?, *dtype, &full)?;
                let description = format!("`{}`", full.display());
                check_range(&tokens, vocab, &description)?;
                (tokens, Layout::Stream, description)
            }
            Data::Cifar10 { dir } => {
                return Err(DataError::NotForLm {
                    what: format!("cifar10(\"{dir}\")"),
                })
            }
            Data::Synthetic {
                kind: SyntheticKind::Classes,
                ..
            } => {
                return Err(DataError::NotForLm {
                    what: "synthetic(kind = classes)".into(),
                })
            }
            Data::Synthetic {
                kind: SyntheticKind::Markov,
                seed,
            } => {
                if vocab == 0 {
                    return Err(DataError::EmptyVocab);
                }
                let chain = MarkovChain::new(vocab, *seed);
                let n = MARKOV_TOKENS.max(64 * (context + 1));
                let tokens = chain.generate(n, *seed);
                let mut ds = split_into(
                    tokens,
                    Layout::Stream,
                    format!("synthetic(kind = markov, seed = {seed})"),
                    vocab,
                    context,
                    split,
                )?;
                ds.conditional_entropy = Some(chain.conditional_entropy(&ds.train));
                return Ok(ds);
            }
            Data::Synthetic {
                kind: SyntheticKind::Copy,
                seed,
            } => {
                if vocab == 0 {
                    return Err(DataError::EmptyVocab);
                }
                let len = context + 1;
                let tokens = copy_sequences(vocab, len, (COPY_TOKENS / len).max(16), *seed);
                let mut ds = split_into(
                    tokens,
                    Layout::Sequences,
                    format!("synthetic(kind = copy, seed = {seed})"),
                    vocab,
                    context,
                    split,
                )?;
                // Targets 1..h-1 of each sequence are fresh uniform tokens; targets h.. repeat the first
                // half, which the model has seen: the best achievable loss is (h-1)/context · ln V.
                let h = len.div_ceil(2);
                ds.conditional_entropy =
                    Some((h - 1) as f64 / context.max(1) as f64 * (vocab as f64).ln());
                return Ok(ds);
            }
        };
        split_into(tokens, layout, description, vocab, context, split)
    }

    /// A stream data set from tokens already in memory (e.g. tokenised elsewhere, or built by a test):
    /// checked against `vocab` and split like a file. `description` names the source in errors.
    pub fn from_tokens(
        tokens: Vec<u32>,
        description: &str,
        vocab: usize,
        context: usize,
        split: f64,
    ) -> Result<Dataset, DataError> {
        check_range(&tokens, vocab, description)?;
        split_into(
            tokens,
            Layout::Stream,
            description.to_string(),
            vocab,
            context,
            split,
        )
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
        counts
            .iter()
            .filter(|&&c| c > 0)
            .map(|&c| c as f64 / n)
            .map(|p| -p * p.ln())
            .sum()
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

    /// The windows at `indices` of `part`, as one batch.
    fn window_batch(&self, part: &[u32], indices: impl ExactSizeIterator<Item = usize>) -> Batch {
        let rows = indices.len();
        let (mut tokens, mut targets) = (
            Vec::with_capacity(rows * self.context),
            Vec::with_capacity(rows * self.context),
        );
        for index in indices {
            let start = self.window_start(index);
            tokens.extend_from_slice(&part[start..start + self.context]);
            targets.extend_from_slice(&part[start + 1..start + self.context + 1]);
        }
        Batch::Tokens { tokens, targets }
    }

    /// `n` validation batches of `batch` windows each, the same on every call: the `batch · n`
    /// windows are spread evenly over the validation part (first and last window included), so eval
    /// losses are comparable across steps and runs.
    pub fn val_batches(&self, batch: usize, n: usize) -> Vec<Batch> {
        let windows = self.windows(&self.val);
        (0..n)
            .map(|b| {
                self.window_batch(
                    &self.val,
                    (b * batch..(b + 1) * batch).map(|j| spread(j, batch * n, windows)),
                )
            })
            .collect()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, DataError> {
    std::fs::read(path).map_err(|source| DataError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn dtype_name(dtype: TokenDtype) -> &'static str {
    match dtype {
        TokenDtype::U16 => "u16",
        TokenDtype::U32 => "u32",
    }
}

/// Decodes a token file: an llm.c shard when it starts with one of the two magics, else a flat array.
fn parse_tokens(bytes: &[u8], dtype: TokenDtype, path: &Path) -> Result<Vec<u32>, DataError> {
    let header_i32 = |i: usize| {
        i32::from_le_bytes([
            bytes[4 * i],
            bytes[4 * i + 1],
            bytes[4 * i + 2],
            bytes[4 * i + 3],
        ])
    };
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
                return Err(DataError::HeaderVersion {
                    path: path.into(),
                    magic,
                    version,
                    expected,
                });
            }
            if header_dtype != dtype {
                return Err(DataError::HeaderDtype {
                    path: path.into(),
                    header: dtype_name(header_dtype),
                    spec: dtype_name(dtype),
                });
            }
            body = &bytes[FINEWEB_HEADER_BYTES..];
            let width = if header_dtype == TokenDtype::U16 {
                2
            } else {
                4
            };
            let count = header_i32(2) as i64;
            if count < 0
                || count as u64 != (body.len() / width) as u64
                || !body.len().is_multiple_of(width)
            {
                return Err(DataError::HeaderCount {
                    path: path.into(),
                    header: count,
                    actual: body.len() / width,
                });
            }
        }
    }
    let width = if dtype == TokenDtype::U16 { 2 } else { 4 };
    if !body.len().is_multiple_of(width) {
        return Err(DataError::Misaligned {
            path: path.into(),
            bytes: body.len(),
            width,
            dtype: dtype_name(dtype),
        });
    }
    Ok(match dtype {
        TokenDtype::U16 => body
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
            .collect(),
        TokenDtype::U32 => body
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    })
}

fn check_range(tokens: &[u32], vocab: usize, source_name: &str) -> Result<(), DataError> {
    match tokens.iter().position(|&t| t as usize >= vocab) {
        Some(position) => Err(DataError::TokenOutOfRange {
            source_name: source_name.into(),
            position,
            value: tokens[position],
            vocab,
        }),
        None => Ok(()),
    }
}

/// `split` as a fraction to cut at: NaN and out-of-range splits clamp into [0, 1], and the size
/// checks after the cut then explain the problem.
fn split_fraction(split: f64) -> f64 {
    if split.is_nan() {
        0.0
    } else {
        split.clamp(0.0, 1.0)
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
    let cut = match layout {
        Layout::Stream => (total as f64 * split_fraction(split)).floor() as usize,
        Layout::Sequences => {
            ((total / needed) as f64 * split_fraction(split)).floor() as usize * needed
        }
    };
    let usable = match layout {
        Layout::Stream => total,
        Layout::Sequences => total / needed * needed,
    };
    for (part, have) in [("training", cut), ("validation", usable - cut)] {
        if have < needed {
            return Err(DataError::TooShort {
                source_name: description,
                part,
                have,
                needed,
                total,
                context,
                split,
            });
        }
    }
    let mut train = tokens;
    train.truncate(usable);
    let val = train.split_off(cut);
    Ok(Dataset {
        vocab,
        context,
        layout,
        train,
        val,
        description,
        conditional_entropy: None,
    })
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
                let weights: Vec<f64> = succ
                    .iter()
                    .map(|_| -(1.0 - rng.random::<f64>()).ln())
                    .collect();
                let sum: f64 = weights.iter().sum();
                // All-zero weights (every draw exactly 1.0) cannot happen in practice; fall back to uniform.
                succ.into_iter()
                    .zip(weights)
                    .map(|(s, w)| (s, if sum > 0.0 { w / sum } else { 1.0 / k as f64 }))
                    .collect()
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
        let row_h: Vec<f64> = self
            .rows
            .iter()
            .map(|r| {
                r.iter()
                    .filter(|(_, p)| *p > 0.0)
                    .map(|(_, p)| -p * p.ln())
                    .sum()
            })
            .collect();
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

/// Samples' features as stored: CIFAR-10 keeps its pixel bytes (a quarter of the memory of f32)
/// and scales them when a batch is cut.
#[derive(Debug, Clone)]
enum Features {
    /// Pixel bytes; feature = byte / 255.
    Bytes(Vec<u8>),
    F32(Vec<f32>),
}

/// A classification data set (the `mlp` family), already split: each sample is `inputs` features and
/// a label below `classes`; samples `..cut` train and `cut..` validate.
#[derive(Debug, Clone)]
pub struct Samples {
    inputs: usize,
    classes: usize,
    features: Features,
    labels: Vec<u32>,
    cut: usize,
    description: String,
}

impl Samples {
    /// Reads or generates classifier data for a model of `inputs` features and `classes` classes and
    /// splits it (module docs). `spec_dir` is the directory of the spec file.
    pub fn load(
        data: &Data,
        spec_dir: &Path,
        inputs: usize,
        classes: usize,
        split: f64,
    ) -> Result<Samples, DataError> {
        if inputs == 0 || classes < 2 {
            return Err(DataError::ClassifierShape { inputs, classes });
        }
        let (features, labels, cut, description) = match data {
            Data::Synthetic {
                kind: SyntheticKind::Classes,
                seed,
            } => {
                let (features, labels) = class_clusters(inputs, classes, CLASS_SAMPLES, *seed);
                let description = format!("synthetic(kind = classes, seed = {seed})");
                let cut = (labels.len() as f64 * split_fraction(split)).floor() as usize;
                for (part, have) in [("training", cut), ("validation", labels.len() - cut)] {
                    if have == 0 {
                        return Err(DataError::EmptyPart {
                            source_name: description,
                            part,
                            total: labels.len(),
                            split,
                        });
                    }
                }
                (Features::F32(features), labels, cut, description)
            }
            Data::Cifar10 { dir } => {
                let (pixels, labels, cut, description) =
                    read_cifar10(&spec_dir.join(dir), inputs, classes)?;
                (Features::Bytes(pixels), labels, cut, description)
            }
            Data::Text { path } => {
                return Err(DataError::NotForClassifier {
                    what: format!("text(\"{path}\")"),
                })
            }
            Data::Tokens { path, .. } => {
                return Err(DataError::NotForClassifier {
                    what: format!("tokens(\"{path}\")"),
                })
            }
            Data::Synthetic { kind, .. } => {
                let kind = if *kind == SyntheticKind::Copy {
                    "copy"
                } else {
                    "markov"
                };
                return Err(DataError::NotForClassifier {
                    what: format!("synthetic(kind = {kind})"),
                });
            }
        };
        Ok(Samples {
            inputs,
            classes,
            features,
            labels,
            cut,
            description,
        })
    }

    pub fn inputs(&self) -> usize {
        self.inputs
    }

    /// CIFAR-10 images as an `lstm` reads them (docs/language.md "Data"): row by row, each row's 32
    /// pixels × (R, G, B), i.e. the file's planes (`[3, 32, 32]`) transposed to `[32, 32, 3]`.
    /// Other data is returned unchanged.
    pub fn pixel_rows(mut self) -> Samples {
        if let Features::Bytes(planes) = &self.features {
            let side = 32;
            let plane = side * side;
            let mut rows = vec![0u8; planes.len()];
            for (src, dst) in planes
                .chunks_exact(CIFAR_INPUTS)
                .zip(rows.chunks_exact_mut(CIFAR_INPUTS))
            {
                for (p, px) in dst.chunks_exact_mut(3).enumerate() {
                    for (c, v) in px.iter_mut().enumerate() {
                        *v = src[c * plane + p];
                    }
                }
            }
            self.features = Features::Bytes(rows);
        }
        self
    }

    pub fn classes(&self) -> usize {
        self.classes
    }

    pub fn description(&self) -> &str {
        &self.description
    }

    pub fn train_labels(&self) -> &[u32] {
        &self.labels[..self.cut]
    }

    pub fn val_labels(&self) -> &[u32] {
        &self.labels[self.cut..]
    }

    /// The features of sample `index` (training samples first, then validation ones).
    pub fn features(&self, index: usize) -> Vec<f32> {
        let row = index * self.inputs..(index + 1) * self.inputs;
        match &self.features {
            Features::Bytes(b) => b[row].iter().map(|&p| p as f32 / 255.0).collect(),
            Features::F32(f) => f[row].to_vec(),
        }
    }

    /// Entropy (nats) of the training labels' distribution: the loss of the best classifier that
    /// ignores its input.
    pub fn label_entropy(&self) -> f64 {
        let mut counts = vec![0u64; self.classes];
        for &l in self.train_labels() {
            counts[l as usize] += 1;
        }
        let n = self.cut as f64;
        counts
            .iter()
            .filter(|&&c| c > 0)
            .map(|&c| c as f64 / n)
            .map(|p| -p * p.ln())
            .sum()
    }

    /// The samples at `indices` (of the whole set), as one batch.
    fn sample_batch(&self, indices: impl ExactSizeIterator<Item = usize>) -> Batch {
        let rows = indices.len();
        let (mut features, mut targets) = (
            Vec::with_capacity(rows * self.inputs),
            Vec::with_capacity(rows),
        );
        for index in indices {
            features.extend(self.features(index));
            targets.push(self.labels[index]);
        }
        Batch::Samples { features, targets }
    }

    /// `n` validation batches of `batch` samples each, fixed and spread like [`Dataset::val_batches`].
    pub fn val_batches(&self, batch: usize, n: usize) -> Vec<Batch> {
        let count = self.labels.len() - self.cut;
        (0..n)
            .map(|b| {
                self.sample_batch(
                    (b * batch..(b + 1) * batch).map(|j| self.cut + spread(j, batch * n, count)),
                )
            })
            .collect()
    }
}

/// `synthetic(kind = classes)`: `n` samples of `inputs` features. Each class `c` owns
/// [`CLUSTERS_PER_CLASS`] centres μ ~ N(0, I); a sample picks a class and one of its centres
/// uniformly and is x = (μ + σ·ε) / √(1 + σ²) with ε ~ N(0, I) and σ = [`CLASS_NOISE`] · √inputs, so
/// every feature has unit variance. Centres and samples come from separate ChaCha8 streams of `seed`.
/// Returns the features (`[n, inputs]` row-major) and the labels.
pub fn class_clusters(inputs: usize, classes: usize, n: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let centres: Vec<f64> = (0..classes * CLUSTERS_PER_CLASS * inputs)
        .map(|_| standard_normal(&mut rng))
        .collect();
    let sigma = CLASS_NOISE * (inputs as f64).sqrt();
    let scale = 1.0 / (1.0 + sigma * sigma).sqrt();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(1);
    let mut features = Vec::with_capacity(n * inputs);
    let mut labels = Vec::with_capacity(n);
    for _ in 0..n {
        let class = rng.random_range(0..classes as u64) as usize;
        let cluster =
            class * CLUSTERS_PER_CLASS + rng.random_range(0..CLUSTERS_PER_CLASS as u64) as usize;
        let centre = &centres[cluster * inputs..(cluster + 1) * inputs];
        features.extend(
            centre
                .iter()
                .map(|&m| ((m + sigma * standard_normal(&mut rng)) * scale) as f32),
        );
        labels.push(class as u32);
    }
    (features, labels)
}

/// One N(0, 1) draw (Box–Muller, the cosine branch): two uniform draws per normal, so a stream's
/// position after `k` normals is fixed, which exact resume relies on.
pub fn standard_normal(rng: &mut impl Rng) -> f64 {
    let (u1, u2) = (1.0 - rng.random::<f64>(), rng.random::<f64>());
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Reads a CIFAR-10 directory (module docs): (pixel bytes, labels, training samples, description).
/// The shape and the files are checked before anything is read.
fn read_cifar10(
    dir: &Path,
    inputs: usize,
    classes: usize,
) -> Result<(Vec<u8>, Vec<u32>, usize, String), DataError> {
    for (field, actual, wanted, expected) in [
        ("inputs", inputs, CIFAR_INPUTS, "32×32×3 = 3072 pixel bytes"),
        ("classes", classes, CIFAR_CLASSES, "in 10 classes"),
    ] {
        if actual != wanted {
            return Err(DataError::CifarShape {
                field,
                actual,
                wanted,
                expected,
            });
        }
    }
    let files: Vec<&str> = CIFAR_TRAIN_FILES
        .iter()
        .copied()
        .chain([CIFAR_TEST_FILE])
        .collect();
    let missing: Vec<&str> = files
        .iter()
        .copied()
        .filter(|f| !dir.join(f).is_file())
        .collect();
    if !missing.is_empty() {
        return Err(DataError::CifarMissing {
            dir: dir.to_path_buf(),
            missing: missing.join(", "),
        });
    }
    let record = 1 + CIFAR_INPUTS;
    let (mut pixels, mut labels, mut cut) = (Vec::new(), Vec::new(), 0);
    let description = format!("cifar10(`{}`)", dir.display());
    for file in files {
        if file == CIFAR_TEST_FILE {
            cut = labels.len();
        }
        let path = dir.join(file);
        let bytes = read(&path)?;
        if bytes.is_empty() || !bytes.len().is_multiple_of(record) {
            return Err(DataError::CifarRecords {
                path,
                bytes: bytes.len(),
                record,
            });
        }
        for r in bytes.chunks_exact(record) {
            let label = r[0] as u32;
            if label as usize >= classes {
                return Err(DataError::LabelOutOfRange {
                    source_name: format!("`{}`", path.display()),
                    position: labels.len(),
                    value: label,
                    classes,
                });
            }
            labels.push(label);
            pixels.extend_from_slice(&r[1..]);
        }
    }
    Ok((pixels, labels, cut, description))
}

/// The data a model trains on: token windows for language models, labelled samples for classifiers.
#[derive(Debug, Clone)]
pub enum TrainData {
    Tokens(Dataset),
    Samples(Samples),
}

impl TrainData {
    /// Loads `data` as the model's family reads it: [`Dataset::load`] for language models
    /// (`transformer`, `lstm` with a vocabulary), [`Samples::load`] for classifiers (`mlp`, and `lstm`
    /// without one, whose samples are `context · inputs` features). `spec_dir` is the directory of the
    /// spec file.
    pub fn load(
        data: &Data,
        spec_dir: &Path,
        model: &Model,
        split: f64,
    ) -> Result<TrainData, DataError> {
        let field = |value: Option<usize>, family: &'static str, field: &'static str| {
            value.ok_or(DataError::ModelField { family, field })
        };
        Ok(match model.family {
            // A sequence classifier: each sample is `context` steps of `inputs` features, flat.
            Family::Lstm if model.vocab.is_none() => {
                let (inputs, classes, steps) = (
                    field(model.inputs, "lstm", "inputs")?,
                    field(model.classes, "lstm", "classes")?,
                    field(model.context, "lstm", "context")?,
                );
                let samples = Samples::load(data, spec_dir, steps * inputs, classes, split)?;
                TrainData::Samples(samples.pixel_rows())
            }
            Family::Transformer | Family::Lstm => {
                let family = if model.family == Family::Lstm {
                    "lstm"
                } else {
                    "transformer"
                };
                let (vocab, context) = (
                    field(model.vocab, family, "vocab")?,
                    field(model.context, family, "context")?,
                );
                TrainData::Tokens(Dataset::load(data, spec_dir, vocab, context, split)?)
            }
            Family::Mlp => {
                let (inputs, classes) = (
                    field(model.inputs, "mlp", "inputs")?,
                    field(model.classes, "mlp", "classes")?,
                );
                TrainData::Samples(Samples::load(data, spec_dir, inputs, classes, split)?)
            }
        })
    }

    pub fn description(&self) -> &str {
        match self {
            TrainData::Tokens(d) => d.description(),
            TrainData::Samples(s) => s.description(),
        }
    }

    /// What [`TrainData::train_len`] counts: `"tokens"` or `"samples"`.
    pub fn unit(&self) -> &'static str {
        match self {
            TrainData::Tokens(_) => "tokens",
            TrainData::Samples(_) => "samples",
        }
    }

    /// Tokens (or samples) in the training part.
    pub fn train_len(&self) -> usize {
        match self {
            TrainData::Tokens(d) => d.train.len(),
            TrainData::Samples(s) => s.cut,
        }
    }

    /// Tokens (or samples) in the validation part.
    pub fn val_len(&self) -> usize {
        match self {
            TrainData::Tokens(d) => d.val.len(),
            TrainData::Samples(s) => s.labels.len() - s.cut,
        }
    }

    /// Targets (loss terms) in one row of a batch: `context` tokens, or one label.
    pub fn targets_per_row(&self) -> usize {
        match self {
            TrainData::Tokens(d) => d.context,
            TrainData::Samples(_) => 1,
        }
    }

    /// The loss of the best model that ignores its input: the training tokens' unigram entropy
    /// ([`Dataset::unigram_entropy`]), or the training labels' entropy ([`Samples::label_entropy`]).
    pub fn unigram_entropy(&self) -> f64 {
        match self {
            TrainData::Tokens(d) => d.unigram_entropy(),
            TrainData::Samples(s) => s.label_entropy(),
        }
    }

    /// [`Dataset::conditional_entropy`]; `None` for classifier data.
    pub fn conditional_entropy(&self) -> Option<f64> {
        match self {
            TrainData::Tokens(d) => d.conditional_entropy(),
            TrainData::Samples(_) => None,
        }
    }

    /// `n` fixed validation batches of `batch` rows ([`Dataset::val_batches`], [`Samples::val_batches`]).
    pub fn val_batches(&self, batch: usize, n: usize) -> Vec<Batch> {
        match self {
            TrainData::Tokens(d) => d.val_batches(batch, n),
            TrainData::Samples(s) => s.val_batches(batch, n),
        }
    }

    /// Distinct training rows a batcher draws from: window starts, or training samples.
    fn train_rows(&self) -> usize {
        match self {
            TrainData::Tokens(d) => d.windows(&d.train),
            TrainData::Samples(s) => s.cut,
        }
    }

    fn train_batch(&self, rows: &[usize]) -> Batch {
        match self {
            TrainData::Tokens(d) => d.window_batch(&d.train, rows.iter().copied()),
            TrainData::Samples(s) => s.sample_batch(rows.iter().copied()),
        }
    }
}

/// Everything needed to continue a [`Batcher`] exactly where it stopped (stored in checkpoints as
/// JSON). `word_pos` is the ChaCha8 stream position in 32-bit words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatcherState {
    pub seed: u64,
    pub word_pos: u128,
    /// Size of the training part the state was taken on (tokens, or samples for a classifier), to
    /// refuse resuming on different data. The name predates classifiers; checkpoints keep it.
    pub train_tokens: usize,
}

/// Draws training rows (windows, or samples) uniformly at random (with replacement) from the
/// training part, in an order fixed by `seed`.
pub struct Batcher<'d> {
    data: &'d TrainData,
    seed: u64,
    rng: ChaCha8Rng,
}

impl<'d> Batcher<'d> {
    pub fn new(data: &'d TrainData, seed: u64) -> Batcher<'d> {
        Batcher {
            data,
            seed,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// The next `batch` training rows.
    pub fn next_train_batch(&mut self, batch: usize) -> Batch {
        let rows = self.data.train_rows() as u64;
        let indices: Vec<usize> = (0..batch)
            .map(|_| self.rng.random_range(0..rows) as usize)
            .collect();
        self.data.train_batch(&indices)
    }

    pub fn state(&self) -> BatcherState {
        BatcherState {
            seed: self.seed,
            word_pos: self.rng.get_word_pos(),
            train_tokens: self.data.train_len(),
        }
    }

    /// Continues from a saved state: the following batches equal those the saved batcher would have
    /// drawn next.
    pub fn restore(&mut self, state: &BatcherState) -> Result<(), DataError> {
        if state.train_tokens != self.data.train_len() {
            return Err(DataError::StateMismatch {
                saved: state.train_tokens,
                actual: self.data.train_len(),
            });
        }
        self.seed = state.seed;
        self.rng = ChaCha8Rng::seed_from_u64(state.seed);
        self.rng.set_word_pos(state.word_pos);
        Ok(())
    }
}
