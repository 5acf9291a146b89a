//! `moec`: compile a `.moe` Mixture-of-Experts spec to fused WGSL kernels and run it on any GPU.

use clap::{Parser, Subcommand, ValueEnum};
use miette::{Context, IntoDiagnostic, Result};
use moec_compiler::emit::Target;
use moec_compiler::spec::{Data, Spec};
use moec_compiler::Compiled;
use moec_runtime::{AdapterChoice, Gpu};
use std::path::{Path, PathBuf};

mod bench;
mod check;
mod eval;
mod export;
mod f16_compare;
mod fmt;
mod forward;
mod generate;
mod report;
mod router_dump;
mod train;

#[derive(Parser)]
#[command(
    name = "moec",
    version,
    about = "Compile a Mixture-of-Experts spec to fused GPU kernels and run it through wgpu"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone, Default)]
struct AdapterArgs {
    /// Adapter to use: a case-insensitive part of its name as `moec devices` prints it. Without it,
    /// wgpu's WGPU_ADAPTER_NAME / WGPU_BACKEND / WGPU_POWER_PREF apply.
    #[arg(long, value_name = "NAME")]
    adapter: Option<String>,
    /// Bind at most this many bytes per storage buffer (e.g. `64MiB`), below the adapter's own limit:
    /// compile and run as a GPU with that smaller limit would, splitting larger tensors across bindings.
    #[arg(long, value_name = "SIZE", value_parser = parse_bytes)]
    max_binding: Option<u64>,
}

impl AdapterArgs {
    fn open(&self) -> Result<Gpu> {
        Gpu::new(&AdapterChoice {
            name: self.adapter.clone(),
            max_binding: self.max_binding,
        })
        .into_diagnostic()
    }
}

#[derive(clap::Args)]
struct BuildArgs {
    spec: PathBuf,
    #[arg(short, long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// One kernel per op, for comparison.
    #[arg(long)]
    no_fuse: bool,
    /// Print pipeline stages to stdout (comma separated).
    #[arg(long, value_delimiter = ',', value_name = "STAGES")]
    emit: Vec<Stage>,
    #[arg(long)]
    batch: Option<usize>,
    /// Compile for this adapter's limits and matmul schedule (default: portable baseline, no GPU needed).
    #[arg(long, value_name = "NAME")]
    adapter: Option<String>,
}

#[derive(clap::Args)]
struct ForwardArgs {
    /// The spec; its weights are the seeded initialisation.
    #[arg(required_unless_present = "checkpoint", conflicts_with = "checkpoint")]
    spec: Option<PathBuf>,
    /// Run a checkpoint (a `checkpoint.safetensors` or its run directory) instead: its spec and weights.
    #[arg(long, value_name = "CKPT")]
    checkpoint: Option<PathBuf>,
    #[arg(long, conflicts_with = "tokens")]
    batch: Option<usize>,
    /// One row of comma-separated token ids instead of the seeded random batch (at most the
    /// context; padded with 0, which causal attention never lets the given positions see).
    #[arg(long, value_delimiter = ',', value_name = "IDS")]
    tokens: Option<Vec<u32>>,
    /// Write the GPU's logits to FILE as NumPy .npy (f32, [positions, vocab]; only the given
    /// positions with --tokens), e.g. for scripts/hf_parity.py.
    #[arg(long, value_name = "FILE")]
    dump_logits: Option<PathBuf>,
    /// Write every MoE block's router input, logits, selected experts, gate weights, kept slots
    /// and balancing terms to DIR as NumPy .npy files, e.g. for scripts/megatron_parity.py.
    #[arg(long, value_name = "DIR")]
    dump_router: Option<PathBuf>,
    /// Write the batch fed to the model (`tokens` as u32 or a classifier's `features` as f32) to
    /// FILE as NumPy .npy, so that a peer model sees the same inputs (scripts/lstm_parity.py).
    #[arg(long, value_name = "FILE")]
    dump_inputs: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    no_fuse: bool,
    /// Also time every dispatch on its own and print the slowest kernels.
    #[arg(long)]
    profile: bool,
    #[command(flatten)]
    adapter: AdapterArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a spec and print what it will cost: parameters, FLOPs, memory against the adapter.
    Check {
        spec: PathBuf,
        /// Skip opening a GPU; compile for wgpu's portable default limits instead.
        #[arg(long)]
        no_device: bool,
        /// Memory the run may use (e.g. `16GiB`), to compare the peak with: by default the
        /// machine's memory for a CPU adapter such as lavapipe, unknown for GPUs.
        #[arg(long, value_name = "SIZE", value_parser = parse_bytes)]
        memory: Option<u64>,
        #[command(flatten)]
        adapter: AdapterArgs,
    },
    /// Rewrite specs in the canonical layout (comments kept); a directory means every .moe below it.
    Fmt {
        #[arg(required = true, value_name = "SPEC")]
        specs: Vec<PathBuf>,
        /// Write nothing; list the specs whose layout differs and fail if there are any.
        #[arg(long)]
        check: bool,
    },
    /// Compile a spec: kernels (*.wgsl), plan.json, ir.txt, fused.txt and graph.dot into DIR.
    Build(BuildArgs),
    /// Run the forward pass of a spec on the GPU for one seeded batch and compare it with the
    /// reference interpreter.
    Forward(ForwardArgs),
    /// Train a spec on the GPU as its `train` block says: progress bar, log lines, metrics.jsonl and
    /// checkpoints in DIR (default runs/<spec name>).
    Train {
        spec: PathBuf,
        #[arg(short, long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Continue from DIR/checkpoint.safetensors (refused when the spec changed since).
        #[arg(long)]
        resume: bool,
        /// Total optimizer steps, overriding the spec's `steps` (the schedule spans this many).
        #[arg(long, value_name = "N")]
        steps: Option<usize>,
        #[arg(long)]
        no_fuse: bool,
        /// Before training, time every dispatch of one micro-step and print the slowest kernels.
        #[arg(long)]
        profile: bool,
        #[command(flatten)]
        adapter: AdapterArgs,
    },
    /// Sample text from a checkpoint (a `checkpoint.safetensors` or its run directory).
    Generate {
        checkpoint: PathBuf,
        /// Prompt text; its UTF-8 bytes are the tokens (byte-level models, vocab 256).
        #[arg(long, conflicts_with = "prompt_ids")]
        prompt: Option<String>,
        /// Prompt as comma-separated token ids (any vocab); the output is then ids too.
        #[arg(long, value_delimiter = ',', value_name = "IDS")]
        prompt_ids: Option<Vec<u32>>,
        /// Tokens to generate.
        #[arg(long, default_value_t = 64)]
        tokens: usize,
        /// Softmax temperature; 0 is greedy.
        #[arg(long, default_value_t = 1.0)]
        temperature: f64,
        /// Nucleus sampling mass.
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        no_fuse: bool,
        #[command(flatten)]
        adapter: AdapterArgs,
    },
    /// Validation loss and perplexity of a checkpoint, as the trainer computes `val_loss`.
    Eval {
        checkpoint: PathBuf,
        /// A text file whose validation part to evaluate instead of the spec's data.
        #[arg(long, value_name = "FILE")]
        data: Option<PathBuf>,
        /// Validation batches (default: the spec's eval batches).
        #[arg(long, value_name = "N")]
        batches: Option<usize>,
        #[arg(long)]
        no_fuse: bool,
        #[command(flatten)]
        adapter: AdapterArgs,
    },
    /// Time the training step: median ms/step, tokens/s, dispatches, memory, GFLOP/s.
    Bench {
        spec: PathBuf,
        #[arg(long, default_value_t = 10)]
        steps: usize,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        #[arg(long)]
        no_fuse: bool,
        /// Time fused and unfused plans in one process, their steps alternating, and print both rows.
        #[arg(long)]
        both: bool,
        #[command(flatten)]
        adapter: AdapterArgs,
    },
    /// List the GPU adapters wgpu can see, with backend and device type.
    Devices,
    /// Compare training runs: report.md (a table of final/best losses, load balance, throughput)
    /// and loss, balance, expert-utilisation and router-state plots (PNG and SVG) from each
    /// RUN_DIR/metrics.jsonl.
    Report {
        #[arg(required = true, value_name = "RUN_DIR")]
        runs: Vec<PathBuf>,
        #[arg(short, long, value_name = "DIR", default_value = "report")]
        out: PathBuf,
    },
    /// Hand a spec to another engine: `moec export megatron SPEC -o DIR` writes a Megatron-Core
    /// launch script, its TransformerConfig fields and EXPORT.md.
    Export {
        #[command(subcommand)]
        target: export::Target,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Stage {
    Ast,
    Spec,
    Ir,
    Fused,
    Wgsl,
}

/// The spec, checked, with the path and text it came from.
pub struct Loaded {
    pub path: PathBuf,
    pub source: String,
    pub spec: Spec,
}

pub fn load(path: &Path) -> Result<Loaded> {
    let source = std::fs::read_to_string(path)
        .into_diagnostic()
        .wrap_err_with(|| format!("cannot read spec `{}`", path.display()))?;
    let spec = moec_compiler::check::check(&source, path)?;
    Ok(Loaded {
        path: path.to_path_buf(),
        source,
        spec,
    })
}

impl Loaded {
    /// The directory the spec's data paths are relative to.
    pub fn dir(&self) -> PathBuf {
        self.path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."))
    }

    /// Warns when the spec's `cifar10(dir)` directory does not exist: `check` lets such a spec through
    /// so that it checks and builds without the separate download, but `moec train` will need it.
    fn warn_missing_data(&self) {
        if let Some(Data::Cifar10 { dir }) = self.spec.train.as_ref().map(|t| &t.data) {
            let full = self.dir().join(dir);
            if !full.exists() {
                eprintln!(
                    "warning: the CIFAR-10 directory `{dir}` does not exist ({}); `moec train` needs the extracted `cifar-10-batches-bin` there",
                    full.display()
                );
            }
        }
    }
}

pub fn batch_of(spec: &Spec, batch: Option<usize>) -> usize {
    batch.or(spec.train.as_ref().map(|t| t.batch)).unwrap_or(1)
}

pub fn compile(spec: &Spec, batch: usize, target: &Target, fusion: bool) -> Result<Compiled> {
    moec_compiler::compile(spec, batch, target, fusion).into_diagnostic()
}

/// Starts compiling the kernels of `plans` ahead of the first step where the driver would otherwise
/// compile them one by one inside it ([`Gpu::precompile`]), with a progress bar on a terminal; the
/// caller builds its trainer meanwhile and then calls [`Precompile::finish`].
pub fn precompile(gpu: &Gpu, plans: &[&moec_compiler::plan::Plan]) -> Precompile {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30.cyan/blue} {pos}/{len} kernels compiled (first run of these kernels; the driver keeps them)",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let shown = bar.clone();
    let compiling = gpu.precompile(
        plans,
        Box::new(move |done, all| {
            shown.set_length(all as u64);
            shown.set_position(done as u64);
        }),
    );
    Precompile { compiling, bar }
}

/// [`precompile`] under way.
pub struct Precompile {
    compiling: moec_runtime::precompile::Precompiling,
    bar: indicatif::ProgressBar,
}

impl Precompile {
    /// Compiles the rest on this thread too and waits for the helpers.
    pub fn finish(self, gpu: &Gpu) -> Result<()> {
        self.compiling.finish(gpu).into_diagnostic()?;
        self.bar.finish_and_clear();
        Ok(())
    }
}

/// `--profile`'s table of `times` (name, seconds): the 15 slowest dispatches, then the `fastest`
/// quickest, each with its share of the total; `heading` gets the total in milliseconds.
pub fn print_slowest(
    mut times: Vec<(String, f64)>,
    heading: impl Fn(f64) -> String,
    fastest: usize,
) {
    let total: f64 = times.iter().map(|(_, t)| t).sum();
    times.sort_by(|a, b| b.1.total_cmp(&a.1));
    println!("{}", heading(total * 1e3));
    for (name, t) in times
        .iter()
        .take(15)
        .chain(times.iter().rev().take(fastest))
    {
        println!("  {:>8.2} ms {:>5.1}%  {name}", t * 1e3, 100.0 * t / total);
    }
}

/// Worker threads for llvmpipe (lavapipe), which reads `LP_NUM_THREADS` when the adapter opens:
/// four per core, up to its maximum of 32, where llvmpipe would start one per core. It hands each
/// worker a fixed share of a dispatch's workgroups, and a worker that starts late (a VM's idle
/// core wakes slowly) holds its share back; with small dispatches the quickstart kept 1.0 of 2
/// cores busy. Smaller shares let the workers that are running take the rest: quickstart 119–135
/// → 77–83 ms per step on 2 cores, bench-small unchanged (docs/DECISIONS.md, "llvmpipe worker
/// threads"). A user's own `LP_NUM_THREADS` is left as it is.
fn llvmpipe_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (4 * cores).min(32)
}

fn main() -> Result<()> {
    // Mesa's Vulkan loader prints "XDG_RUNTIME_DIR is invalid" on every probe of a headless Linux
    // machine (CI, servers, lavapipe). moec never opens a window; any existing directory silences it.
    // Both variables are set before any thread starts.
    if cfg!(target_os = "linux") && std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir());
    }
    if std::env::var_os("LP_NUM_THREADS").is_none() {
        std::env::set_var("LP_NUM_THREADS", llvmpipe_threads().to_string());
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Check {
            spec,
            no_device,
            memory,
            adapter,
        } => check_command(&spec, no_device, memory, &adapter),
        Command::Fmt { specs, check } => fmt::run(&specs, check),
        Command::Build(args) => build(args),
        Command::Forward(args) => forward_command(args),
        Command::Train {
            spec,
            out,
            resume,
            steps,
            no_fuse,
            profile,
            adapter,
        } => {
            let loaded = load(&spec)?;
            let gpu = adapter.open()?;
            train::run(
                &loaded,
                &train::Args {
                    out,
                    resume,
                    steps,
                    fusion: !no_fuse,
                    profile,
                },
                &gpu,
            )
        }
        Command::Generate {
            checkpoint,
            prompt,
            prompt_ids,
            tokens,
            temperature,
            top_p,
            seed,
            no_fuse,
            adapter,
        } => {
            let gpu = adapter.open()?;
            generate::run(
                &checkpoint,
                &generate::Args {
                    prompt,
                    prompt_ids,
                    tokens,
                    temperature,
                    top_p,
                    seed,
                    fusion: !no_fuse,
                },
                &gpu,
            )
        }
        Command::Eval {
            checkpoint,
            data,
            batches,
            no_fuse,
            adapter,
        } => {
            let gpu = adapter.open()?;
            eval::run(
                &checkpoint,
                &eval::Args {
                    data,
                    batches,
                    fusion: !no_fuse,
                },
                &gpu,
            )
        }
        Command::Bench {
            spec,
            steps,
            warmup,
            no_fuse,
            both,
            adapter,
        } => {
            let loaded = load(&spec)?;
            let gpu = adapter.open()?;
            bench::run(
                &loaded,
                &bench::Args {
                    steps,
                    warmup,
                    fusion: !no_fuse,
                    both,
                },
                &gpu,
            )
        }
        Command::Report { runs, out } => report::run(&runs, &out),
        Command::Export { target } => export::run(target),
        Command::Devices => devices(),
    }
}

/// `moec check`: the adapter's limits come from the device, or with `--no-device` from wgpu's
/// portable defaults (capped by `--max-binding`), so a spec can be checked on a machine without
/// a GPU.
fn check_command(
    spec: &Path,
    no_device: bool,
    memory: Option<u64>,
    adapter: &AdapterArgs,
) -> Result<()> {
    let loaded = load(spec)?;
    loaded.warn_missing_data();
    let adapter = if no_device {
        let portable = Target::default();
        check::Adapter {
            target: Target {
                max_storage_binding_size: adapter
                    .max_binding
                    .map_or(portable.max_storage_binding_size, |cap| {
                        cap.min(portable.max_storage_binding_size)
                    }),
                ..portable
            },
            name: "wgpu default limits".to_string(),
            memory,
        }
    } else {
        let gpu = adapter.open()?;
        check::Adapter {
            target: gpu.target(),
            name: gpu.info.to_string(),
            memory: memory.or_else(|| gpu.is_cpu().then(check::machine_memory).flatten()),
        }
    };
    check::run(&loaded, &adapter)
}

/// `moec build`: prints the requested stages, writes the build directory and a summary line that
/// compares the fused dispatch count with the unfused one.
fn build(args: BuildArgs) -> Result<()> {
    let BuildArgs {
        spec,
        out,
        no_fuse,
        emit,
        batch,
        adapter,
    } = args;
    let loaded = load(&spec)?;
    loaded.warn_missing_data();
    let batch = batch_of(&loaded.spec, batch);
    let target = match adapter {
        Some(name) => Gpu::new(&AdapterChoice {
            name: Some(name),
            max_binding: None,
        })
        .into_diagnostic()?
        .target(),
        None => Target::default(),
    };
    if emit.contains(&Stage::Ast) {
        println!("{:#?}", moec_grammar::parse(&loaded.source)?);
    }
    if emit.contains(&Stage::Spec) {
        println!(
            "{}",
            serde_json::to_string_pretty(&loaded.spec).into_diagnostic()?
        );
    }
    let compiled = compile(&loaded.spec, batch, &target, !no_fuse)?;
    if emit.contains(&Stage::Ir) {
        print!("{}", compiled.graph.dump());
    }
    if emit.contains(&Stage::Fused) {
        print!("{}", compiled.fused.dump(&compiled.graph));
    }
    if emit.contains(&Stage::Wgsl) {
        for k in &compiled.plan.kernels {
            println!("// ---- {}.wgsl\n{}", k.name, k.wgsl);
        }
    }
    let unfused = if no_fuse {
        compiled.plan.dispatches.len()
    } else {
        compile(&loaded.spec, batch, &target, false)?
            .plan
            .dispatches
            .len()
    };
    if let Some(dir) = &out {
        write_build(dir, &compiled)
            .wrap_err_with(|| format!("writing build output to `{}`", dir.display()))?;
    }
    println!(
        "{}: {} ops -> {} dispatches fused, {} unfused ({} distinct kernels){}",
        loaded.spec.name,
        compiled.graph.g.node_count(),
        if no_fuse {
            unfused
        } else {
            compiled.plan.dispatches.len()
        },
        unfused,
        compiled.plan.kernels.len(),
        out.map(|d| format!("; wrote {}", d.display()))
            .unwrap_or_default()
    );
    Ok(())
}

/// `moec forward` on a spec's seeded weights or on a checkpoint.
fn forward_command(args: ForwardArgs) -> Result<()> {
    let ForwardArgs {
        spec,
        checkpoint,
        batch,
        tokens,
        dump_logits,
        dump_router,
        dump_inputs,
        seed,
        no_fuse,
        profile,
        adapter,
    } = args;
    let args = forward::Args {
        batch,
        seed,
        fusion: !no_fuse,
        profile,
        tokens,
        dump_logits,
        dump_router,
        dump_inputs,
    };
    let loaded = spec.as_deref().map(load).transpose()?;
    let source = match (&loaded, &checkpoint) {
        (Some(loaded), _) => forward::Source::Spec(loaded),
        (None, Some(path)) => forward::Source::Checkpoint(path),
        (None, None) => miette::bail!("give a spec or --checkpoint"),
    };
    let gpu = adapter.open()?;
    forward::run(source, &args, &gpu)
}

/// `moec devices`: the adapters wgpu finds, with a hint where the driver is known to be slow.
fn devices() -> Result<()> {
    let adapters = moec_runtime::list_adapters();
    if adapters.is_empty() {
        println!("no adapters found; on a machine without a GPU install Mesa's software Vulkan (apt-get install mesa-vulkan-drivers)");
    }
    for (i, a) in adapters.iter().enumerate() {
        println!("{i}: {a}");
        if let Some(hint) = a.slow_driver_hint() {
            println!("   {hint}");
        }
    }
    Ok(())
}

/// `16GiB`, `512 MiB`, `2e9`: a size in bytes for `--memory` and `--max-binding`.
fn parse_bytes(text: &str) -> std::result::Result<u64, String> {
    parse_size::parse_size(text)
        .map_err(|e| format!("`{text}` is not a size ({e}); write e.g. 16GiB"))
}

fn write_build(dir: &Path, compiled: &Compiled) -> Result<()> {
    let kernels = dir.join("kernels");
    std::fs::create_dir_all(&kernels).into_diagnostic()?;
    for k in &compiled.plan.kernels {
        std::fs::write(kernels.join(format!("{}.wgsl", k.name)), &k.wgsl).into_diagnostic()?;
    }
    std::fs::write(
        dir.join("plan.json"),
        serde_json::to_string_pretty(&compiled.plan).into_diagnostic()?,
    )
    .into_diagnostic()?;
    std::fs::write(dir.join("ir.txt"), compiled.graph.dump()).into_diagnostic()?;
    std::fs::write(dir.join("fused.txt"), compiled.fused.dump(&compiled.graph))
        .into_diagnostic()?;
    std::fs::write(dir.join("graph.dot"), compiled.graph.dot()).into_diagnostic()?;
    Ok(())
}
