//! `moec forward`: one batch through the compiled kernels on the GPU and through the reference
//! interpreter, side by side. The quickest way to see that a spec compiles and runs correctly on the
//! adapter at hand.
//!
//! The weights are a spec's seeded initialisation, or a checkpoint's (`--checkpoint`); the batch is
//! seeded random data, or one row of given token ids (`--tokens`). `--dump-logits` writes the GPU's
//! logits as a NumPy `.npy` file, which is how `scripts/hf_parity.py` compares moec with an
//! independent HF Mixtral forward pass; `--dump-router` writes every MoE block's routing
//! ([`crate::router_dump`]) for `scripts/megatron_parity.py`. A `precision = f16` spec is compared
//! with the interpreter's f16 mode, with f16's tolerance and on routing-stable rows
//! ([`crate::f16_compare`]).

use crate::eval::Model;
use crate::{batch_of, compile, f16_compare, print_slowest, Loaded};
use miette::{Context, IntoDiagnostic, Result};
use moec_compiler::interp::{self, Value};
use moec_compiler::ir::{Graph, NodeId};
use moec_compiler::lower::Head;
use moec_compiler::precision::uses_f16;
use moec_compiler::spec::Spec;
use moec_compiler::Compiled;
use moec_runtime::{Executor, Gpu};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Random token ids for every u32 input of the graph, uniform features for every f32 input.
pub fn random_feeds(graph: &Graph, vocab: usize, seed: u64) -> HashMap<String, Value> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    graph
        .data_inputs()
        .into_iter()
        .map(|(_, name, ty)| {
            let value = match ty.dtype {
                moec_compiler::ir::DType::U32 => Value::U32(
                    (0..ty.numel())
                        .map(|_| rng.random_range(0..vocab as u32))
                        .collect(),
                ),
                moec_compiler::ir::DType::F32 | moec_compiler::ir::DType::F16 => Value::F32(
                    (0..ty.numel())
                        .map(|_| rng.random_range(-1.0..1.0))
                        .collect(),
                ),
            };
            (name, value)
        })
        .collect()
}

/// Largest |a - b| / (|b| + 1e-3) over two equally long slices: relative error that stays meaningful
/// for entries near zero.
pub fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / (y.abs() + 1e-3))
        .fold(0.0, f32::max)
}

/// Where the weights come from.
pub enum Source<'a> {
    /// A spec, with `init_params`' seeded initialisation.
    Spec(&'a Loaded),
    /// A checkpoint (file or run directory): its spec text and weights, fed as `moec eval` feeds them.
    Checkpoint(&'a Path),
}

/// What `moec forward` was asked beyond the model.
pub struct Args {
    pub batch: Option<usize>,
    pub seed: u64,
    pub fusion: bool,
    pub profile: bool,
    /// One row of token ids instead of the seeded random tokens (the batch is then 1).
    pub tokens: Option<Vec<u32>>,
    /// Where to write the GPU's `logits` as `.npy`.
    pub dump_logits: Option<PathBuf>,
    /// Where to write every MoE block's routing ([`crate::router_dump`]).
    pub dump_router: Option<PathBuf>,
    /// Where to write the batch's `tokens` or `features` input.
    pub dump_inputs: Option<PathBuf>,
}

/// The graph inputs that carry the batch; every other input is model state (router state, noise).
const BATCH_INPUTS: [&str; 3] = ["tokens", "features", "targets"];

pub fn run(source: Source<'_>, args: &Args, gpu: &Gpu) -> Result<()> {
    let started = Instant::now();
    let checkpoint_model;
    let (spec, model) = match source {
        Source::Spec(loaded) => (&loaded.spec, None),
        Source::Checkpoint(path) => {
            checkpoint_model = Model::load(path)?;
            (&checkpoint_model.spec, Some(&checkpoint_model))
        }
    };
    let batch = if args.tokens.is_some() {
        1
    } else {
        batch_of(spec, args.batch)
    };
    let compiled = compile(spec, batch, &gpu.target(), args.fusion)?;
    let vocab = spec.model.vocab.or(spec.model.classes).unwrap_or(2);
    let mut feeds = random_feeds(&compiled.graph, vocab, args.seed);
    if let Some(ids) = &args.tokens {
        feeds.insert("tokens".into(), Value::U32(token_row(spec, ids)?));
    }

    let (exec, params) = match model {
        None => seeded_executor(gpu, &compiled, &feeds, args.seed)?,
        Some(model) => checkpoint_executor(gpu, model, &compiled, &mut feeds, batch, args.fusion)?,
    };
    let compiled_in = started.elapsed();
    // The first run includes the driver's lazy shader compilation; the steady state is what a
    // training step costs.
    let mut gpu_times = Vec::new();
    for _ in 0..3 {
        let t0 = Instant::now();
        exec.run().into_diagnostic()?;
        exec.wait().into_diagnostic()?;
        gpu_times.push(t0.elapsed());
    }
    if args.profile {
        print_profile(&exec)?;
    }

    let mut all_feeds = interp::param_feeds(&params);
    all_feeds.extend(feeds);
    let t0 = Instant::now();
    let values = interp::run(&compiled.graph, &all_feeds).into_diagnostic()?;
    let cpu_time = t0.elapsed();
    // f16 plans are compared with f16's tolerance, on routing-stable rows (crate::f16_compare).
    let stable = uses_f16(&compiled.graph).then(|| {
        f16_compare::stable_rows(&compiled.graph, &values, batch, !spec.model.bidirectional)
    });
    if let Some(path) = &args.dump_inputs {
        dump_inputs(&compiled.graph, &all_feeds, path)?;
    }
    if let Some(dir) = &args.dump_router {
        crate::router_dump::dump(spec, &compiled.graph, &all_feeds, batch, dir)?;
    }

    println!(
        "{} on {}: {} dispatches, {} kernels (compiled in {:.2?}); GPU forward {:.2?} first, {:.2?} warm; interpreter {:.2?}",
        spec.name,
        gpu.info,
        compiled.plan.dispatches.len(),
        compiled.plan.kernels.len(),
        compiled_in,
        gpu_times[0],
        gpu_times[2],
        cpu_time
    );
    let worst = compare_outputs(&exec, &compiled.graph, &values, &stable)?;
    if let Some(path) = &args.dump_logits {
        dump_logits(
            &exec,
            &compiled.graph,
            args.tokens.as_ref().map(Vec::len),
            path,
        )?;
    }
    match &stable {
        None if worst > 1e-3 => {
            miette::bail!("GPU and interpreter disagree (max rel diff {worst:.1e} > 1e-3)")
        }
        Some(rows) if worst > 1.0 => miette::bail!(
            "GPU and the interpreter's f16 mode disagree (largest error {worst:.2} of the f16 \
             tolerance 2^-6·|ref| + 2^-7·max|ref|{})",
            stable_note(rows.as_deref())
        ),
        Some(rows) => println!(
            "f16 plan: errors within the f16 tolerance 2^-6·|ref| + 2^-7·max|ref| (largest {worst:.2} of it){}",
            stable_note(rows.as_deref())
        ),
        None => {}
    }
    Ok(())
}

/// The plan's executor with the spec's seeded weights and the batch `feeds`, and those weights
/// for the interpreter.
fn seeded_executor<'g>(
    gpu: &'g Gpu,
    compiled: &Compiled,
    feeds: &HashMap<String, Value>,
    seed: u64,
) -> Result<(Executor<'g>, HashMap<String, Vec<f32>>)> {
    let compiling = crate::precompile(gpu, &[&compiled.plan]);
    let exec = Executor::new(gpu, &compiled.plan).into_diagnostic()?;
    compiling.finish(gpu)?;
    let params = interp::init_params(&compiled.graph, seed);
    for (name, values) in &params {
        exec.write_f32(name, values).into_diagnostic()?;
    }
    for (name, value) in feeds {
        write_feed(&exec, name, value)?;
    }
    Ok((exec, params))
}

/// The checkpoint's executor fed the batch inputs of `feeds`. The interpreter gets exactly what
/// the GPU holds: the weights and state inputs `Model::executor` wrote are read back (into the
/// returned weights and `feeds`) rather than reloaded.
fn checkpoint_executor<'g>(
    gpu: &'g Gpu,
    model: &Model,
    compiled: &Compiled,
    feeds: &mut HashMap<String, Value>,
    batch: usize,
    fusion: bool,
) -> Result<(Executor<'g>, HashMap<String, Vec<f32>>)> {
    let exec = model.executor(gpu, batch, fusion, Head::Logits)?;
    for (_, name, ty) in compiled.graph.data_inputs() {
        if BATCH_INPUTS.contains(&name.as_str()) {
            write_feed(&exec, &name, &feeds[&name])?;
        } else {
            let mut data = exec.read_f32(&name).into_diagnostic()?;
            data.truncate(ty.numel());
            feeds.insert(name, Value::F32(data));
        }
    }
    let mut params = HashMap::new();
    for (_, name, ty) in compiled.graph.params() {
        let mut data = exec.read_f32(&name).into_diagnostic()?;
        data.truncate(ty.numel());
        params.insert(name, data);
    }
    Ok((exec, params))
}

/// `--profile`: the slowest dispatches, and the three fastest for scale.
fn print_profile(exec: &Executor<'_>) -> Result<()> {
    print_slowest(
        exec.profile().into_diagnostic()?,
        |ms| format!("slowest dispatches (of {ms:.1} ms, one submission each):"),
        3,
    );
    Ok(())
}

/// Prints each output's difference between the GPU and the interpreter's `values` and returns the
/// largest: relative, or with `stable` (f16 plans) the error over f16's tolerance on the
/// routing-stable rows.
fn compare_outputs(
    exec: &Executor<'_>,
    graph: &Graph,
    values: &HashMap<NodeId, Value>,
    stable: &Option<Option<Vec<bool>>>,
) -> Result<f32> {
    let mut worst = 0.0f32;
    for (name, id) in &graph.outputs {
        let ours = exec.read_f32(name).into_diagnostic()?;
        let theirs = values[id].to_f32();
        let diff = match stable {
            None => max_rel_diff(&ours, &theirs),
            Some(rows) => {
                let shape = &graph.ty(*id).shape;
                let rows = rows
                    .as_deref()
                    .filter(|r| f16_compare::is_per_token(shape, r.len()));
                f16_compare::excess(&ours, &theirs, rows)
            }
        };
        worst = worst.max(diff);
        let what = if stable.is_some() {
            "error/tolerance"
        } else {
            "rel diff"
        };
        if ours.len() == 1 {
            println!(
                "  {name:<10} gpu {:>12.6}  interpreter {:>12.6}  {what} {diff:.1e}",
                ours[0], theirs[0]
            );
        } else {
            println!("  {name:<10} {} values, max {what} {diff:.1e}", ours.len());
        }
    }
    Ok(worst)
}

/// How many token rows the per-token outputs were compared on, when routing left some out.
fn stable_note(rows: Option<&[bool]>) -> String {
    match rows {
        Some(rows) if rows.iter().any(|&s| !s) => format!(
            "; per-token outputs on {} of {} rows: the rest follow a token whose top-k routing is \
             within the tolerance of a tie",
            rows.iter().filter(|&&s| s).count(),
            rows.len()
        ),
        _ => String::new(),
    }
}

fn write_feed(exec: &Executor<'_>, name: &str, value: &Value) -> Result<()> {
    match value {
        Value::U32(ids) => exec.write_u32(name, ids).into_diagnostic(),
        other => exec.write_f32(name, &other.to_f32()).into_diagnostic(),
    }
}

/// `ids` as the `tokens` input of a batch of one: padded with 0 to the context. Attention is
/// causal, so the padding never changes the logits of the given positions.
fn token_row(spec: &Spec, ids: &[u32]) -> Result<Vec<u32>> {
    let (Some(vocab), Some(context)) = (spec.model.vocab, spec.model.context) else {
        miette::bail!(
            "--tokens needs a token language model; `{}` has no vocab and context",
            spec.name
        );
    };
    if spec.model.bidirectional {
        miette::bail!(
            "--tokens pads the row to the context, which changes a bidirectional model's logits"
        );
    }
    if ids.is_empty() || ids.len() > context {
        miette::bail!(
            "--tokens takes 1 to {context} ids (the context), not {}",
            ids.len()
        );
    }
    if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
        miette::bail!("token {bad} is outside the model's vocab of {vocab}");
    }
    let mut row = ids.to_vec();
    row.resize(context, 0);
    Ok(row)
}

/// Writes the GPU's `logits` output to `path` as `.npy`: its graph shape, or `[given, vocab]` (the
/// rows of the given tokens) with `--tokens`.
fn dump_logits(
    exec: &Executor<'_>,
    graph: &Graph,
    given: Option<usize>,
    path: &Path,
) -> Result<()> {
    let id = graph
        .outputs
        .iter()
        .find(|(name, _)| name == "logits")
        .map(|(_, id)| *id)
        .ok_or_else(|| miette::miette!("the model has no `logits` output to dump"))?;
    let mut shape = graph.g[id].ty.shape.clone();
    let mut logits = exec.read_f32("logits").into_diagnostic()?;
    logits.truncate(shape.iter().product());
    if let Some(rows) = given {
        let width = shape.last().copied().unwrap_or(1);
        logits.truncate(rows * width);
        shape = vec![rows, width];
    }
    std::fs::write(path, npy_f32(&shape, &logits))
        .into_diagnostic()
        .wrap_err_with(|| format!("cannot write `{}`", path.display()))?;
    println!("wrote logits {shape:?} to {}", path.display());
    Ok(())
}

/// Writes the batch's model input (`tokens`, or a classifier's `features`) to `path` as `.npy`, in
/// its graph shape; the targets are left out (no peer needs them to compare logits).
fn dump_inputs(graph: &Graph, feeds: &HashMap<String, Value>, path: &Path) -> Result<()> {
    let (name, ty) = graph
        .data_inputs()
        .into_iter()
        .find(|(_, name, _)| name == "tokens" || name == "features")
        .map(|(_, name, ty)| (name, ty))
        .ok_or_else(|| miette::miette!("the model has no `tokens` or `features` input to dump"))?;
    let bytes = match &feeds[&name] {
        Value::U32(ids) => npy_u32(&ty.shape, ids),
        other => npy_f32(&ty.shape, &other.to_f32()),
    };
    std::fs::write(path, bytes)
        .into_diagnostic()
        .wrap_err_with(|| format!("cannot write `{}`", path.display()))?;
    println!("wrote {name} {:?} to {}", ty.shape, path.display());
    Ok(())
}

/// `data` as a NumPy `.npy` file of little-endian f32.
pub(crate) fn npy_f32(shape: &[usize], data: &[f32]) -> Vec<u8> {
    npy("<f4", shape, data.iter().flat_map(|v| v.to_le_bytes()))
}

/// `data` as a NumPy `.npy` file of little-endian u32.
pub(crate) fn npy_u32(shape: &[usize], data: &[u32]) -> Vec<u8> {
    npy("<u4", shape, data.iter().flat_map(|v| v.to_le_bytes()))
}

/// A NumPy `.npy` file (format 1.0, C order) of element type `descr` holding `data`'s bytes, which
/// `numpy.load` reads.
fn npy(descr: &str, shape: &[usize], data: impl Iterator<Item = u8>) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let tuple = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {tuple}, }}");
    // Magic (6 bytes), version (2) and header length (2), then the header ending in '\n', padded
    // with spaces so the data starts on a 64-byte boundary, as the format asks.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend(data);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The header text of an `.npy` file and where its data starts.
    fn header(bytes: &[u8]) -> (&str, usize) {
        let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        (std::str::from_utf8(&bytes[10..10 + len]).unwrap(), 10 + len)
    }

    #[test]
    fn npy_header_is_aligned_and_data_follows_it() {
        let bytes = npy_f32(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, -0.5]);
        assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
        let (text, start) = header(&bytes);
        assert_eq!(start % 64, 0);
        assert!(
            text.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"),
            "{text}"
        );
        assert!(text.ends_with('\n'));
        let data: Vec<f32> = bytes[start..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(data, [1.0, 2.0, 3.0, 4.0, 5.0, -0.5]);
        // A Python 1-tuple needs its trailing comma.
        assert!(header(&npy_f32(&[4], &[0.0; 4]))
            .0
            .contains("'shape': (4,), }"));
    }
}
