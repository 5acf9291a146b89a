//! `moec export megatron SPEC -o DIR`: the spec as a Megatron-Core run (see
//! [`moec_runtime::megatron`] for the mapping). Writes `launch.sh`, `megatron.json` and `EXPORT.md`
//! into DIR and prints the approximations; refuses, naming each one, what Megatron cannot express
//! unless `--allow-approx`.

use crate::load;
use miette::{Context, IntoDiagnostic, Result};
use moec_runtime::checkpoint::HF_CONFIG_FILE;
use moec_runtime::megatron::{export, Fidelity, Parallel};
use std::path::{Path, PathBuf};

#[derive(clap::Subcommand)]
pub enum Target {
    /// Megatron-Core (Megatron-LM's pretrain_gpt.py): expert, tensor, pipeline and data parallelism.
    Megatron {
        spec: PathBuf,
        /// A moec run directory whose weights the Megatron run starts from (converted by
        /// Megatron-Bridge through its HF config.json).
        #[arg(long, value_name = "DIR")]
        run: Option<PathBuf>,
        #[arg(short, long, value_name = "DIR")]
        out: PathBuf,
        /// Tensor-parallel size.
        #[arg(long, default_value_t = 1)]
        tp: usize,
        /// Pipeline-parallel size.
        #[arg(long, default_value_t = 1)]
        pp: usize,
        /// Expert-parallel size.
        #[arg(long, default_value_t = 1)]
        ep: usize,
        /// GPUs in total (default tp × pp × ep).
        #[arg(long)]
        gpus: Option<usize>,
        /// Export what Megatron cannot express as the substitutes EXPORT.md lists, instead of
        /// refusing.
        #[arg(long)]
        allow_approx: bool,
    },
}

pub fn run(target: Target) -> Result<()> {
    let Target::Megatron {
        spec,
        run,
        out,
        tp,
        pp,
        ep,
        gpus,
        allow_approx,
    } = target;
    let loaded = load(&spec)?;
    let parallel = Parallel {
        tp,
        pp,
        ep,
        gpus: gpus.unwrap_or(tp * pp * ep),
    };
    let exported = export(&loaded.spec, parallel, allow_approx).into_diagnostic()?;
    let run = run.map(|dir| checked_run(&dir)).transpose()?;
    std::fs::create_dir_all(&out)
        .into_diagnostic()
        .wrap_err_with(|| format!("cannot create `{}`", out.display()))?;
    let json = format!("{:#}\n", exported.json());
    let files = [
        ("launch.sh", exported.launch_script(run.as_deref())),
        ("megatron.json", json),
        ("EXPORT.md", exported.markdown(&loaded.spec, run.as_deref())),
    ];
    for (name, text) in files {
        let path = out.join(name);
        std::fs::write(&path, text)
            .into_diagnostic()
            .wrap_err_with(|| format!("cannot write `{}`", path.display()))?;
    }
    make_executable(&out.join("launch.sh"))?;
    for row in &exported.rows {
        match &row.fidelity {
            Fidelity::Exact => {}
            Fidelity::Approximate(why) => println!("approximate: {}: {why}", row.feature),
            Fidelity::Inexpressible(why) => {
                println!("NOT EXPRESSIBLE (substituted): {}: {why}", row.feature)
            }
        }
    }
    println!(
        "wrote launch.sh, megatron.json and EXPORT.md to {}",
        out.display()
    );
    Ok(())
}

/// The run directory as the conversion command names it; it must hold an HF `config.json`.
fn checked_run(dir: &Path) -> Result<String> {
    if !dir.join(HF_CONFIG_FILE).is_file() {
        miette::bail!(
            "`{}` has no {HF_CONFIG_FILE}: Megatron-Bridge converts a run only when its spec has an HF architecture (moec train writes it then)",
            dir.display()
        );
    }
    Ok(dir.display().to_string())
}

#[cfg(unix)]
fn make_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).into_diagnostic()
}

#[cfg(not(unix))]
fn make_executable(_: &Path) -> Result<()> {
    Ok(())
}
