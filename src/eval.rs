//! `moec eval`: validation loss and perplexity (accuracy, for classifiers) of a checkpoint, through
//! the trainer's own evaluation ([`evaluate_batches`]), and the checkpoint loading that
//! `moec generate` shares: the spec rebuilt from the checkpoint's spec text, a forward plan whose
//! Param buffers hold the checkpoint's weights (HF names stacked back to IR names by
//! [`Checkpoint::ir_tensors`]).

use miette::{IntoDiagnostic, Result};
use moec_compiler::ir::InputRole;
use moec_compiler::lower::Head;
use moec_compiler::plan::BufferRole;
use moec_compiler::spec::{Data, Family, Spec};
use moec_runtime::checkpoint::Checkpoint;
use moec_runtime::data::TrainData;
use moec_runtime::train::evaluate_batches;
use moec_runtime::{Executor, Gpu};
use std::path::{Path, PathBuf};

/// A checkpoint's model: its spec, the directory data paths are relative to, and its IR tensors.
pub struct Model {
    pub spec: Spec,
    pub spec_dir: PathBuf,
    tensors: std::collections::BTreeMap<String, moec_runtime::checkpoint::Tensor>,
}

impl Model {
    /// Reads `path` (a `checkpoint.safetensors` or a run directory holding one) and checks its spec text.
    pub fn load(path: &Path) -> Result<Model> {
        let file = if path.is_dir() {
            path.join(moec_runtime::train::CHECKPOINT_FILE)
        } else {
            path.to_path_buf()
        };
        let ckpt = Checkpoint::load(&file).into_diagnostic()?;
        if ckpt.spec_text.is_empty() {
            miette::bail!("`{}` holds no spec text; only checkpoints written by `moec train` can be evaluated", file.display());
        }
        // The checker resolves (and reads) the spec's data paths relative to the spec file, whose
        // location the checkpoint does not record: try the checkpoint's directory, its parent
        // (`moec train --out DIR` beside the spec) and the working directory; report the first
        // failure when none holds the data.
        let dir = file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let mut candidates = vec![dir.clone()];
        candidates.extend(
            dir.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map(Path::to_path_buf),
        );
        candidates.push(PathBuf::from("."));
        let mut first_error = None;
        let mut found = None;
        for spec_dir in candidates {
            match moec_compiler::check::check(
                &ckpt.spec_text,
                &spec_dir.join(file.file_name().unwrap_or_default()),
            ) {
                Ok(spec) => {
                    found = Some((spec, spec_dir));
                    break;
                }
                Err(e) => {
                    first_error.get_or_insert_with(|| miette::Report::from(e));
                }
            }
        }
        let Some((spec, spec_dir)) = found else {
            return Err(
                first_error.unwrap_or_else(|| miette::miette!("no directory to check the spec in"))
            );
        };
        Ok(Model {
            spec,
            spec_dir,
            tensors: ckpt.ir_tensors().into_diagnostic()?,
        })
    }

    /// (vocab, context) of a token language model; other families have no token interface.
    pub fn vocab_context(&self) -> Result<(usize, usize)> {
        match (
            self.spec.model.family,
            self.spec.model.vocab,
            self.spec.model.context,
        ) {
            (Family::Transformer | Family::Lstm, Some(v), Some(c)) => Ok((v, c)),
            (family, _, _) => miette::bail!(
                "the `{family:?}` family has no token interface to evaluate or sample"
            ),
        }
    }

    /// A forward executor for `batch` rows ending in `head` (the loss for evaluation, sampled
    /// logits for generation, all logits for `moec forward`) with the checkpoint's weights written
    /// into its Param buffers. Inputs other than the data (tokens or features, targets) are set as evaluation
    /// feeds them: router state
    /// from the checkpoint when it holds one, `jitter.*` multipliers to ones (no jitter); the rest
    /// (`noise.*`) stay zero, as fresh GPU buffers are.
    pub fn executor<'g>(
        &self,
        gpu: &'g Gpu,
        batch: usize,
        fusion: bool,
        head: Head,
    ) -> Result<Executor<'g>> {
        let compiled =
            moec_compiler::compile_forward(&self.spec, batch, &gpu.target(), fusion, head)
                .into_diagnostic()?;
        let compiling = crate::precompile(gpu, &[&compiled.plan]);
        let exec = Executor::new(gpu, &compiled.plan).into_diagnostic()?;
        compiling.finish(gpu)?;
        for buffer in &compiled.plan.buffers {
            match &buffer.role {
                BufferRole::Param { name, shape, .. } => {
                    let (stored, data) = self.tensors.get(name).ok_or_else(|| {
                        miette::miette!(
                            "the checkpoint has no weight `{name}` that the spec's model needs"
                        )
                    })?;
                    if stored.iter().product::<usize>() != shape.iter().product::<usize>() {
                        miette::bail!("weight `{name}` has shape {stored:?} in the checkpoint but {shape:?} in the model");
                    }
                    exec.write_f32(name, data).into_diagnostic()?;
                }
                BufferRole::Input { name, shape, role } => match role {
                    // Checkpointed under its own name.
                    InputRole::RouterState => {
                        if let Some((_, data)) = self.tensors.get(name) {
                            exec.write_f32(name, data).into_diagnostic()?;
                        }
                    }
                    // Evaluation draws no jitter (ones) and no noise (the new buffer's zeros).
                    InputRole::Jitter => exec
                        .write_f32(name, &vec![1.0; shape.iter().product()])
                        .into_diagnostic()?,
                    InputRole::Noise => {}
                    // Fed per batch or per call by the caller (a forward plan has no loss seed).
                    InputRole::Data | InputRole::LogitRows | InputRole::LossSeed => {}
                },
                _ => {}
            }
        }
        Ok(exec)
    }
}

/// What `moec eval` was asked beyond the checkpoint.
pub struct Args {
    /// A text file (byte tokens) whose validation part is evaluated instead of the spec's data.
    pub data: Option<PathBuf>,
    /// Validation batches (default: the spec's `eval` batches).
    pub batches: Option<usize>,
    pub fusion: bool,
}

pub fn run(checkpoint: &Path, args: &Args, gpu: &Gpu) -> Result<()> {
    let model = Model::load(checkpoint)?;
    let train = model.spec.train.as_ref().ok_or_else(|| {
        miette::miette!("the checkpoint's spec has no `train` block (data, batch)")
    })?;
    let (data, dir) = match &args.data {
        Some(_) if model.spec.model.vocab.is_none() => {
            miette::bail!("--data takes a text file for a language model; a classifier is evaluated on its spec's data")
        }
        // The file's validation part under the spec's split, as training would cut it.
        Some(path) => (
            Data::Text {
                path: path.to_string_lossy().into_owned(),
            },
            std::env::current_dir().into_diagnostic()?,
        ),
        None => (train.data.clone(), model.spec_dir.clone()),
    };
    let dataset = TrainData::load(&data, &dir, &model.spec.model, train.split).into_diagnostic()?;
    let batches = dataset.val_batches(
        train.batch,
        args.batches.unwrap_or(train.eval.batches).max(1),
    );
    let exec = model.executor(gpu, train.batch, args.fusion, Head::Loss)?;
    let e = evaluate_batches(&exec, &batches).into_diagnostic()?;
    let shape = format!(
        "{} batches of {}x{}",
        batches.len(),
        train.batch,
        dataset.targets_per_row()
    );
    let result = match e.accuracy {
        Some(acc) => format!("loss {:.4} accuracy {:.2}%", e.loss, 100.0 * acc),
        None => format!("loss {:.4} ppl {:.4}", e.loss, e.loss.exp()),
    };
    println!(
        "{} on {} ({shape}): {result}",
        model.spec.name,
        dataset.description()
    );
    Ok(())
}
