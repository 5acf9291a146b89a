//! `moec check`: the spec's parameters and FLOPs ([`moec_compiler::stats`]) and the memory its
//! training run allocates on the adapter ([`moec_runtime::memory`]: exact, from the compiled plans),
//! compared with the adapter's memory when it is known; when the run does not fit, the recompute
//! level or batch that does.

use crate::Loaded;
use miette::{IntoDiagnostic, Result};
use moec_compiler::emit::Target;
use moec_compiler::plan::BufferRole;
use moec_compiler::spec::{Precision, Recompute, Spec};
use moec_compiler::stats::{human_bytes, stats, thousands};
use moec_runtime::memory::{for_spec, MemoryReport};
use moec_runtime::optim::OptimSettings;

/// The adapter `check` compares against.
pub struct Adapter {
    pub target: Target,
    pub name: String,
    /// Bytes of memory the run may use: `--memory`, else the machine's memory for a CPU adapter
    /// (lavapipe allocates in RAM); `None` when unknown (wgpu does not report a GPU's memory).
    pub memory: Option<u64>,
}

pub fn run(loaded: &Loaded, adapter: &Adapter) -> Result<()> {
    let spec = &loaded.spec;
    let st = stats(spec);
    println!("{} ({}): ok", spec.name, loaded.path.display());
    print!("{st}");
    if let Some((name, bytes)) = matrix_over_binding(spec, &adapter.target)? {
        miette::bail!(
            "`{}` cannot run on {}: `{name}` ({bytes} bytes) does not fit one storage binding ({} bytes) and {}",
            spec.name,
            adapter.name,
            adapter.target.max_storage_binding_size,
            moec_runtime::optim::MATRIX_WHOLE
        );
    }
    let batch = crate::batch_of(spec, None);
    let report = match for_spec(spec, batch, &adapter.target) {
        Ok(r) => r,
        // Families the compiler does not lower yet: the analytic estimate, labelled as one.
        Err(moec_compiler::CompileError::Lower(why)) => {
            print!("{}", st.memory);
            println!("  (an estimate: the plan could not be compiled: {why})");
            return Ok(());
        }
        Err(e) => {
            return Err(e)
                .into_diagnostic()
                .map_err(|e| e.wrap_err(format!("`{}` cannot run on {}", spec.name, adapter.name)))
        }
    };
    let m = &st.memory;
    let recompute = spec.train.as_ref().map_or(Recompute::None, |t| t.recompute);
    println!(
        "  memory on {} (batch {}, {} tokens, {}, recompute {}), as allocated:",
        adapter.name,
        m.batch,
        thousands(m.tokens as u64),
        m.optimizer,
        recompute.name()
    );
    println!("{report}");
    let Some(budget) = adapter.memory else {
        println!(
            "  the adapter does not report its memory; pass --memory SIZE to compare the peak with it"
        );
        return Ok(());
    };
    if report.total() <= budget {
        println!(
            "fits {}: peak {} of {}",
            adapter.name,
            human_bytes(report.total()),
            human_bytes(budget)
        );
        return Ok(());
    }
    let m_precision = spec.train.as_ref().map_or(Precision::F32, |t| t.precision);
    let advice = match what_fits(spec, &adapter.target, budget)? {
        Some(fit) => format!(
            "with `recompute = {}`{} and `batch = {}`{} it needs {}",
            fit.recompute.name(),
            if fit.precision == Precision::F16 && m_precision != Precision::F16 {
                ", `precision = f16`"
            } else {
                ""
            },
            fit.batch,
            if fit.batch < m.batch {
                format!(" (`accumulate` keeps {} sequences per step)", m.batch)
            } else {
                String::new()
            },
            human_bytes(fit.report.total())
        ),
        None => {
            if let Some((name, bytes)) = parameter_over(spec, &adapter.target, budget)? {
                miette::bail!(
                    "`{}` cannot fit in {} ({}) at any batch or recompute level: parameter `{name}` alone needs {} (weights, gradient and optimizer state)",
                    spec.name,
                    human_bytes(budget),
                    adapter.name,
                    human_bytes(bytes)
                );
            }
            "not even at batch 1 with `recompute = block` and `precision = f16`".into()
        }
    };
    miette::bail!(
        "`{}` needs {} but {} has {}; it fits {advice}",
        spec.name,
        human_bytes(report.total()),
        adapter.name,
        human_bytes(budget)
    )
}

/// What [`what_fits`] changes: the recompute level, the batch and the precision.
struct Fit {
    recompute: Recompute,
    batch: usize,
    precision: Precision,
    report: MemoryReport,
}

/// The least change that fits `budget`, in this order: a higher recompute level at the spec's batch
/// (no change to the numbers); then `precision = f16` from the spec's recompute level up; then the
/// largest halved batch with `recompute = block`, in the spec's precision and then in f16.
fn what_fits(spec: &Spec, target: &Target, budget: u64) -> Result<Option<Fit>> {
    let Some(train) = &spec.train else {
        return Ok(None);
    };
    let from_spec = |r: &Recompute| *r as u8 >= train.recompute as u8;
    let mut tries: Vec<(Recompute, usize, Precision)> = Recompute::ALL
        .into_iter()
        .filter(|r| *r as u8 > train.recompute as u8)
        .map(|r| (r, train.batch, train.precision))
        .collect();
    if train.precision == Precision::F32 {
        tries.extend(
            Recompute::ALL
                .into_iter()
                .filter(from_spec)
                .map(|r| (r, train.batch, Precision::F16)),
        );
    }
    let mut batch = train.batch;
    let mut halved = Vec::new();
    while batch > 1 {
        batch /= 2;
        halved.push(batch);
    }
    let precisions = match train.precision {
        Precision::F32 => vec![Precision::F32, Precision::F16],
        Precision::F16 => vec![Precision::F16],
    };
    for precision in precisions {
        tries.extend(halved.iter().map(|&b| (Recompute::Block, b, precision)));
    }
    for (recompute, batch, precision) in tries {
        let mut s = spec.clone();
        if let Some(t) = s.train.as_mut() {
            (t.recompute, t.batch, t.precision) = (recompute, batch, precision);
        }
        let report = for_spec(&s, batch, target).into_diagnostic()?;
        if report.total() <= budget {
            return Ok(Some(Fit {
                recompute,
                batch,
                precision,
                report,
            }));
        }
    }
    Ok(None)
}

/// The largest parameter whose weights, gradient and optimizer state alone exceed `budget`: no batch
/// or recompute level can help then, and the error names the tensor.
fn parameter_over(spec: &Spec, target: &Target, budget: u64) -> Result<Option<(String, u64)>> {
    let Some(train) = &spec.train else {
        return Ok(None);
    };
    let plan = moec_compiler::compile_training(spec, 1, target, true)
        .into_diagnostic()?
        .plan;
    let settings = OptimSettings::from_train(train);
    let largest = plan
        .buffers
        .iter()
        .filter_map(|b| match &b.role {
            BufferRole::Param { name, shape, .. } => Some((
                name.clone(),
                2 * b.allocated() + settings.param_bytes(name, shape),
            )),
            _ => None,
        })
        .max_by_key(|(_, bytes)| *bytes);
    Ok(largest.filter(|(_, bytes)| *bytes > budget))
}

/// A parameter over the target's binding limit that the spec's optimizer must update whole
/// (a Shampoo, Muon or Adafactor matrix), with its bytes: the one thing a split binding cannot serve.
fn matrix_over_binding(spec: &Spec, target: &Target) -> Result<Option<(String, u64)>> {
    let Some(train) = &spec.train else {
        return Ok(None);
    };
    let settings = OptimSettings::from_train(train);
    let graph = moec_compiler::lower::lower(spec, 1).into_diagnostic()?;
    Ok(graph
        .params()
        .into_iter()
        .map(|(_, name, ty)| (name, ty))
        .find(|(name, ty)| {
            ty.size_bytes() as u64 > target.max_storage_binding_size
                && !settings.updates_in_slices(name, &ty.shape)
        })
        .map(|(name, ty)| (name, ty.size_bytes() as u64)))
}

/// Total memory of this machine (`MemTotal` of `/proc/meminfo`), what a CPU adapter allocates from.
pub fn machine_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
