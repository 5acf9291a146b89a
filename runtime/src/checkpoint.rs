//! Checkpoints: one safetensors file holding the weights, optimizer and router state, the step, the
//! spec text and any other resumable state (docs/language.md, "What a run writes").
//!
//! # File layout
//! - Tensors are F32 with their shapes. Model weights use HF Mixtral/Llama names and `[out, in]`
//!   layouts, so `MixtralForCausalLM.from_pretrained` reads the file; the IR's stacked expert params
//!   (`...block_sparse_moe.experts.w1` `[E, hidden, dim]`) are split into HF's per-expert tensors by
//!   [`to_hf`] and stacked back by [`from_hf`]. Non-weight state lives under the `optim.` and
//!   `router_state.` prefixes and is stored as given (HF ignores unknown keys with a warning).
//! - Metadata (safetensors' string map): `format = pt` (transformers refuses a file whose metadata
//!   lacks it), `moec.step`, `moec.spec` (the spec file's text), and every entry of
//!   [`Checkpoint::meta`] under its own key (e.g. the batcher state as JSON).
//!
//! # HF transformers
//! For a spec whose forward pass an HF model computes exactly (Mixtral, Llama, Qwen3(-MoE),
//! GLM-4-MoE: [`crate::hf`]), [`hf_config`] gives its `config.json` and
//! [`Checkpoint::save_hf_files`] writes it beside the checkpoint with a
//! `model.safetensors.index.json` that points every weight at the checkpoint file (or, for the
//! architectures that name weights otherwise, at a renamed copy): the index is how transformers'
//! loader finds weights in a file not named `model.safetensors`, so `from_pretrained(run_dir)` can
//! take the run directory as it is. `scripts/hf_parity.py` checks
//! that an independent implementation of HF's forward pass gives moec's logits.
//!
//! Loading also accepts F16, BF16 and F64 tensors (converted to f32), so HF checkpoints load too; a
//! file without `moec.step` / `moec.spec` loads with step 0 and an empty spec text.
//!
//! # Atomic writes
//! [`Checkpoint::save`] writes a temporary file in the target's directory, fsyncs it, renames it over
//! the target and fsyncs the directory: a crash at any point leaves either the old checkpoint or the
//! new one, never a half-written file, and never a stray temporary file on success or error.

pub use crate::hf::hf_config;
use crate::hf::hf_weight_name;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A tensor as checkpoints carry it: shape and row-major f32 data.
pub type Tensor = (Vec<usize>, Vec<f32>);

/// Metadata keys moec reserves; [`Checkpoint::meta`] may not use them.
pub const META_FORMAT: &str = "format";
pub const META_STEP: &str = "moec.step";
pub const META_SPEC: &str = "moec.spec";

/// The HF model config [`Checkpoint::save_hf_files`] writes beside a checkpoint.
pub const HF_CONFIG_FILE: &str = "config.json";
/// The HF weight index [`Checkpoint::save_hf_files`] writes beside a checkpoint.
pub const HF_INDEX_FILE: &str = "model.safetensors.index.json";
/// The renamed weights [`Checkpoint::save_hf_files`] writes for architectures whose weight names
/// are not moec's.
pub const HF_WEIGHTS_FILE: &str = "model.safetensors";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot {action} checkpoint `{path}`: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        source: std::io::Error,
    },
    #[error("`{path}` is not a valid safetensors file: {message}")]
    Format { path: PathBuf, message: String },
    #[error("tensor `{name}` in `{path}` has dtype {dtype}; moec reads F32, F16, BF16 and F64")]
    Dtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    #[error("metadata `{key}` of `{path}` is `{value}`, not a step number")]
    Step {
        path: PathBuf,
        key: String,
        value: String,
    },
    #[error("tensor `{name}` has shape {shape:?} ({expected} values) but {actual} values of data")]
    ShapeData {
        name: String,
        shape: Vec<usize>,
        expected: usize,
        actual: usize,
    },
    #[error("metadata key `{0}` is reserved for moec (format, moec.step, moec.spec)")]
    ReservedKey(String),
    #[error("checkpoint metadata `{key}` is not the expected JSON: {message}")]
    Meta { key: String, message: String },
    #[error("cannot stack the experts of `{name}`: {message}")]
    Stack { name: String, message: String },
    #[error("HF transformers has no model that computes this spec: {0}")]
    NotHf(String),
    #[error("cannot write `{path}`: {message}")]
    Json { path: PathBuf, message: String },
}

/// Everything a run needs to continue, keyed by safetensors tensor name.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Checkpoint {
    /// Names as stored in the file (HF names for weights; see [`Checkpoint::insert_ir`]).
    pub tensors: BTreeMap<String, Tensor>,
    /// Optimizer steps taken.
    pub step: u64,
    /// The spec file's text at the time of the checkpoint (compared on `--resume`, see [`diff_specs`]).
    pub spec_text: String,
    /// Other state as strings, e.g. `"batcher"` → the [`crate::data::BatcherState`] as JSON.
    pub meta: BTreeMap<String, String>,
}

impl Checkpoint {
    /// Adds one IR parameter (or optimizer/router state) under its file name(s), splitting stacked
    /// expert params as [`to_hf`] does.
    pub fn insert_ir(&mut self, name: &str, shape: &[usize], data: &[f32]) {
        for (n, s, d) in to_hf(name, shape, data) {
            self.tensors.insert(n, (s, d));
        }
    }

    /// The tensors under IR names: HF per-expert weights stacked back by [`from_hf`].
    pub fn ir_tensors(&self) -> Result<BTreeMap<String, Tensor>, CheckpointError> {
        from_hf(self.tensors.clone())
    }

    /// Stores `value` as JSON under metadata key `key` (e.g. the batcher state).
    pub fn put_json<T: serde::Serialize>(
        &mut self,
        key: &str,
        value: &T,
    ) -> Result<(), CheckpointError> {
        let text = serde_json::to_string(value).map_err(|e| CheckpointError::Meta {
            key: key.into(),
            message: e.to_string(),
        })?;
        self.meta.insert(key.to_string(), text);
        Ok(())
    }

    /// Reads metadata key `key` as JSON; `Ok(None)` when the checkpoint has no such key.
    pub fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, CheckpointError> {
        self.meta
            .get(key)
            .map(|text| {
                serde_json::from_str(text).map_err(|e| CheckpointError::Meta {
                    key: key.into(),
                    message: e.to_string(),
                })
            })
            .transpose()
    }

    /// Writes the checkpoint atomically (module docs), creating the parent directory if needed.
    pub fn save(&self, path: &Path) -> Result<(), CheckpointError> {
        let mut metadata = HashMap::new();
        for (k, v) in &self.meta {
            if k == META_FORMAT || k == META_STEP || k == META_SPEC {
                return Err(CheckpointError::ReservedKey(k.clone()));
            }
            metadata.insert(k.clone(), v.clone());
        }
        metadata.insert(META_FORMAT.to_string(), "pt".to_string());
        metadata.insert(META_STEP.to_string(), self.step.to_string());
        metadata.insert(META_SPEC.to_string(), self.spec_text.clone());

        let mut bytes = Vec::with_capacity(self.tensors.len());
        for (name, (shape, data)) in &self.tensors {
            let expected: usize = shape.iter().product();
            if expected != data.len() {
                return Err(CheckpointError::ShapeData {
                    name: name.clone(),
                    shape: shape.clone(),
                    expected,
                    actual: data.len(),
                });
            }
            bytes.push((name, shape, le_bytes(data)));
        }
        let views = bytes
            .iter()
            .map(|(name, shape, b)| {
                TensorView::new(Dtype::F32, shape.to_vec(), b)
                    .map(|v| (name.as_str(), v))
                    .map_err(|e| CheckpointError::Format {
                        path: path.into(),
                        message: e.to_string(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let buffer =
            safetensors::serialize(views, Some(metadata)).map_err(|e| CheckpointError::Format {
                path: path.into(),
                message: e.to_string(),
            })?;
        write_atomic(path, &buffer)
    }

    /// Writes [`HF_CONFIG_FILE`] (`config`, from [`hf_config`]) and [`HF_INDEX_FILE`] into the
    /// directory of `path`, the checkpoint file this checkpoint was saved to: the index maps every
    /// model weight (not the `optim.` / `router_state.` state) to that file. Architectures that name
    /// weights otherwise ([`crate::hf::hf_weight_name`]: Qwen3-MoE, GLM-4-MoE) get the renamed
    /// weights in [`HF_WEIGHTS_FILE`] beside it, and the index points there. All are written
    /// atomically.
    pub fn save_hf_files(
        &self,
        path: &Path,
        config: &serde_json::Value,
    ) -> Result<(), CheckpointError> {
        let model_type = config["model_type"].as_str().unwrap_or_default();
        let weights: BTreeMap<String, &Tensor> = self
            .tensors
            .iter()
            .filter_map(|(name, t)| Some((hf_weight_name(model_type, name)?, t)))
            .collect();
        let dir = path.parent().unwrap_or(Path::new(""));
        let renamed = weights.keys().any(|hf| !self.tensors.contains_key(hf));
        let file_name = if renamed {
            let copy = Checkpoint {
                tensors: weights
                    .iter()
                    .map(|(name, t)| (name.clone(), (*t).clone()))
                    .collect(),
                step: self.step,
                spec_text: self.spec_text.clone(),
                meta: BTreeMap::new(),
            };
            copy.save(&dir.join(HF_WEIGHTS_FILE))?;
            HF_WEIGHTS_FILE.to_string()
        } else {
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let total_size: usize = weights.values().map(|(_, data)| data.len() * 4).sum();
        let weight_map: serde_json::Map<String, serde_json::Value> = weights
            .keys()
            .map(|name| (name.clone(), file_name.clone().into()))
            .collect();
        let index = serde_json::json!({ "metadata": { "total_size": total_size }, "weight_map": weight_map });
        for (name, value) in [(HF_CONFIG_FILE, config), (HF_INDEX_FILE, &index)] {
            let target = dir.join(name);
            let text = serde_json::to_string_pretty(value).map_err(|e| CheckpointError::Json {
                path: target.clone(),
                message: e.to_string(),
            })?;
            write_atomic(&target, format!("{text}\n").as_bytes())?;
        }
        Ok(())
    }

    pub fn load(path: &Path) -> Result<Checkpoint, CheckpointError> {
        let bytes = std::fs::read(path).map_err(|source| CheckpointError::Io {
            path: path.into(),
            action: "read",
            source,
        })?;
        let format_err = |e: safetensors::SafeTensorError| CheckpointError::Format {
            path: path.into(),
            message: e.to_string(),
        };
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(format_err)?;
        let file = SafeTensors::deserialize(&bytes).map_err(format_err)?;
        let mut tensors = BTreeMap::new();
        for (name, view) in file.tensors() {
            let data = to_f32(view.dtype(), view.data()).ok_or_else(|| CheckpointError::Dtype {
                path: path.into(),
                name: name.clone(),
                dtype: view.dtype().to_string(),
            })?;
            tensors.insert(name, (view.shape().to_vec(), data));
        }
        let mut meta: BTreeMap<String, String> = header
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        meta.remove(META_FORMAT);
        let step = match meta.remove(META_STEP) {
            Some(value) => value.parse().map_err(|_| CheckpointError::Step {
                path: path.into(),
                key: META_STEP.into(),
                value,
            })?,
            None => 0,
        };
        let spec_text = meta.remove(META_SPEC).unwrap_or_default();
        Ok(Checkpoint {
            tensors,
            step,
            spec_text,
            meta,
        })
    }
}

/// f32 data as little-endian bytes (safetensors' byte order), without a copy on little-endian hosts.
fn le_bytes(data: &[f32]) -> Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        Cow::Borrowed(bytemuck::cast_slice(data))
    } else {
        Cow::Owned(data.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
}

fn to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
            .collect(),
        _ => return None,
    })
}

/// Temp file in the same directory + fsync + rename + directory fsync; the temp file is removed on
/// any error.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let io = |action: &'static str| {
        move |source| CheckpointError::Io {
            path: path.into(),
            action,
            source,
        }
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path.file_name().ok_or_else(|| {
        io("write")(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the path names no file",
        ))
    })?;
    std::fs::create_dir_all(&dir).map_err(io("create the directory of"))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)?;
        // Makes the rename itself durable; directories cannot be opened as files on Windows.
        #[cfg(unix)]
        std::fs::File::open(&dir)?.sync_all()?;
        Ok(())
    };
    write().map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        io("write")(source)
    })
}

/// `(prefix, expert, projection)` of an HF per-expert weight
/// `model.layers.N.block_sparse_moe.experts.E.wK.weight`.
fn parse_hf_expert(name: &str) -> Option<(&str, usize, &str)> {
    let rest = name.strip_suffix(".weight")?;
    let (head, proj) = rest.rsplit_once('.')?;
    let (prefix, expert) = head.rsplit_once('.')?;
    let expert = expert.parse().ok()?;
    (is_stack_prefix(prefix) && matches!(proj, "w1" | "w2" | "w3"))
        .then_some((prefix, expert, proj))
}

fn is_stack_prefix(prefix: &str) -> bool {
    prefix.starts_with("model.") && prefix.ends_with(".block_sparse_moe.experts")
}

/// IR name + tensor → file name(s) + tensors. A stacked expert param
/// `model.layers.N.block_sparse_moe.experts.wK` of shape `[E, a, b]` becomes E tensors
/// `model.layers.N.block_sparse_moe.experts.{e}.wK.weight` of shape `[a, b]` (slice e of the stack);
/// anything else (including `optim.` and `router_state.` entries, and a tensor whose data does not
/// match its shape, which `save` then reports) is returned unchanged.
pub fn to_hf(name: &str, shape: &[usize], data: &[f32]) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let stacked = name
        .rsplit_once('.')
        .filter(|(prefix, proj)| is_stack_prefix(prefix) && matches!(*proj, "w1" | "w2" | "w3"));
    match stacked {
        Some((prefix, proj))
            if shape.len() == 3
                && shape.iter().product::<usize>() == data.len()
                && shape[0] > 0 =>
        {
            let per = shape[1] * shape[2];
            (0..shape[0])
                .map(|e| {
                    (
                        format!("{prefix}.{e}.{proj}.weight"),
                        shape[1..].to_vec(),
                        data[e * per..(e + 1) * per].to_vec(),
                    )
                })
                .collect()
        }
        _ => vec![(name.to_string(), shape.to_vec(), data.to_vec())],
    }
}

/// The inverse of [`to_hf`] over a whole tensor map: every group of HF per-expert weights
/// `...experts.{0..E}.wK.weight` becomes one stacked `...experts.wK` `[E, a, b]`; other tensors pass
/// through. Experts must be numbered 0..E without gaps and share one 2-D shape.
pub fn from_hf(
    tensors: BTreeMap<String, Tensor>,
) -> Result<BTreeMap<String, Tensor>, CheckpointError> {
    let mut out = BTreeMap::new();
    let mut groups: BTreeMap<String, BTreeMap<usize, Tensor>> = BTreeMap::new();
    for (name, tensor) in tensors {
        match parse_hf_expert(&name) {
            Some((prefix, expert, proj)) => {
                groups
                    .entry(format!("{prefix}.{proj}"))
                    .or_default()
                    .insert(expert, tensor);
            }
            None => {
                out.insert(name, tensor);
            }
        }
    }
    for (name, experts) in groups {
        let count = experts.len();
        let mut shape: Option<Vec<usize>> = None;
        let mut data = Vec::new();
        for (i, (e, (s, d))) in experts.into_iter().enumerate() {
            if e != i {
                return Err(CheckpointError::Stack {
                    name,
                    message: format!("expert {i} is missing (found expert {e} next)"),
                });
            }
            if s.len() != 2 || s.iter().product::<usize>() != d.len() {
                return Err(CheckpointError::Stack {
                    name,
                    message: format!(
                        "expert {e} has shape {s:?} with {} values, not a matrix",
                        d.len()
                    ),
                });
            }
            match &shape {
                Some(first) if *first != s => {
                    return Err(CheckpointError::Stack {
                        name,
                        message: format!("expert {e} has shape {s:?} but expert 0 has {first:?}"),
                    })
                }
                Some(_) => {}
                None => shape = Some(s),
            }
            data.extend_from_slice(&d);
        }
        let mut stacked = vec![count];
        stacked.extend(shape.unwrap_or_default());
        out.insert(name, (stacked, data));
    }
    Ok(out)
}

/// At most this many differing lines are listed by [`diff_specs`].
const MAX_DIFF_LINES: usize = 12;

/// How the spec text saved in a checkpoint (`a`) differs from the current spec file (`b`), as
/// numbered lines (`- 12 | old` from the checkpoint, `+ 12 | new` from the spec) of a minimal
/// line diff; `None` when they are the same, ignoring trailing whitespace on each line and trailing
/// blank lines. At most 12 lines are listed, then a count of the rest.
pub fn diff_specs(a: &str, b: &str) -> Option<String> {
    let lines = |s: &str| -> Vec<String> {
        let mut v: Vec<String> = s.lines().map(|l| l.trim_end().to_string()).collect();
        while v.last().is_some_and(|l| l.is_empty()) {
            v.pop();
        }
        v
    };
    let (a, b) = (lines(a), lines(b));
    if a == b {
        return None;
    }
    let edits = line_diff(&a, &b);
    let mut out = String::from("the checkpoint's spec (-) differs from the spec file (+):\n");
    for edit in edits.iter().take(MAX_DIFF_LINES) {
        match *edit {
            Edit::Removed(i) => out.push_str(&format!("-{:>4} | {}\n", i + 1, a[i])),
            Edit::Added(j) => out.push_str(&format!("+{:>4} | {}\n", j + 1, b[j])),
        }
    }
    if edits.len() > MAX_DIFF_LINES {
        out.push_str(&format!(
            "... and {} more differing lines\n",
            edits.len() - MAX_DIFF_LINES
        ));
    }
    Some(out.trim_end().to_string())
}

enum Edit {
    Removed(usize),
    Added(usize),
}

/// Removed/added lines of a longest-common-subsequence diff, in file order (a hunk's removals before
/// its additions). The common prefix and suffix are skipped first, so editing a few lines of a long
/// spec costs little; the quadratic table is only built over the differing middle, and a middle too
/// large for it (over 16M cells, far beyond any spec) is reported as all removed then all added.
fn line_diff(a: &[String], b: &[String]) -> Vec<Edit> {
    let prefix = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let suffix = a[prefix..]
        .iter()
        .rev()
        .zip(b[prefix..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    let (am, bm) = (&a[prefix..a.len() - suffix], &b[prefix..b.len() - suffix]);
    let (n, m) = (am.len(), bm.len());
    if n * m > 16 << 20 {
        return (0..n)
            .map(|i| Edit::Removed(prefix + i))
            .chain((0..m).map(|j| Edit::Added(prefix + j)))
            .collect();
    }
    // lcs[i][j] = LCS length of am[i..] and bm[j..].
    let mut lcs = vec![0u32; (n + 1) * (m + 1)];
    let at = |i: usize, j: usize| i * (m + 1) + j;
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[at(i, j)] = if am[i] == bm[j] {
                lcs[at(i + 1, j + 1)] + 1
            } else {
                lcs[at(i + 1, j)].max(lcs[at(i, j + 1)])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut edits = Vec::new();
    let (mut removed, mut added) = (Vec::new(), Vec::new());
    let flush = |removed: &mut Vec<usize>, added: &mut Vec<usize>, edits: &mut Vec<Edit>| {
        edits.extend(removed.drain(..).map(Edit::Removed));
        edits.extend(added.drain(..).map(Edit::Added));
    };
    while i < n || j < m {
        if i < n && j < m && am[i] == bm[j] {
            flush(&mut removed, &mut added, &mut edits);
            i += 1;
            j += 1;
        } else if j < m && (i == n || lcs[at(i, j + 1)] >= lcs[at(i + 1, j)]) {
            added.push(prefix + j);
            j += 1;
        } else {
            removed.push(prefix + i);
            i += 1;
        }
    }
    flush(&mut removed, &mut added, &mut edits);
    edits
}
