//! Cold start on adapters that compile a kernel at its first dispatch.
//!
//! llvmpipe (lavapipe) turns a pipeline into machine code with LLVM when it is first dispatched,
//! not when it is created, and keeps the result in Mesa's on-disk shader cache. So a fresh machine's
//! first training step compiles every kernel of the plan one after another, on the queue's one
//! thread, while the other cores wait. [`Gpu::precompile`] moves that work ahead of the first step
//! and spreads it over the cores, overlapping the caller's setup (helper threads start compiling
//! while it builds its executors, and its own thread joins in after). Each helper opens its own
//! device on the same adapter; every thread creates
//! the kernels' pipelines exactly as an [`crate::Executor`] does (same module, same layout, so the
//! same cache key), and dispatches each once with zero workgroups, which compiles it and runs
//! nothing (so no buffer needs its real size). The executor's own first dispatches then load the
//! machine code from Mesa's cache. Measured in docs/DECISIONS.md (Runtime: cold start).

use crate::{kernel_pipeline, Gpu, RuntimeError};
use moec_compiler::plan::{Kernel, Plan};
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Reports compile progress: kernels done, kernels in all.
pub type Progress = Box<dyn Fn(usize, usize) + Send + Sync>;

/// Kernels being compiled ahead of their first dispatch, by helper threads that started in
/// [`Gpu::precompile`]; [`Precompiling::finish`] joins in and waits for them. Dropped unfinished,
/// it hands out no more kernels and waits for the ones under way.
pub struct Precompiling {
    work: Arc<Work>,
    helpers: Vec<JoinHandle<()>>,
}

/// The shared queue of kernels, longest first, and what came of them.
struct Work {
    kernels: Vec<Kernel>,
    next: AtomicUsize,
    done: AtomicUsize,
    first_error: Mutex<Option<RuntimeError>>,
    progress: Progress,
}

impl Gpu {
    /// Whether [`Gpu::precompile`] has anything to do here: Mesa's llvmpipe, which compiles at first
    /// dispatch, with its shader cache on (else nothing carries the work over). GPU drivers compile
    /// when the pipeline is created, and keep it in moec's pipeline cache; other CPU adapters are
    /// unmeasured.
    pub fn compiles_at_first_dispatch(&self) -> bool {
        let cache_off = std::env::var("MESA_SHADER_CACHE_DISABLE")
            .is_ok_and(|v| matches!(v.to_lowercase().as_str(), "1" | "true" | "yes"));
        self.is_cpu && self.info.name.to_lowercase().contains("llvmpipe") && !cache_off
    }

    /// Starts compiling every distinct kernel of `plans` into the driver's shader cache: one helper
    /// thread per core but one, each on its own device of this adapter, while the caller goes on
    /// (building its executors); [`Precompiling::finish`] then puts the caller's core to work too.
    /// `progress` is called after each kernel. Nothing is compiled where
    /// [`Gpu::compiles_at_first_dispatch`] is false.
    pub fn precompile(&self, plans: &[&Plan], progress: Progress) -> Precompiling {
        let kernels = if self.compiles_at_first_dispatch() {
            distinct_kernels(plans)
        } else {
            Vec::new()
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let helpers = cores.min(kernels.len()).saturating_sub(1);
        let work = Arc::new(Work {
            kernels,
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            first_error: Mutex::new(None),
            progress,
        });
        let helpers = (0..helpers)
            .map(|_| {
                let (work, choice) = (Arc::clone(&work), self.choice.clone());
                // Without a second device, the threads that have one do the work.
                std::thread::spawn(move || {
                    if let Ok(helper) = Gpu::new(&choice) {
                        work.run_on(&helper);
                    }
                })
            })
            .collect();
        Precompiling { work, helpers }
    }
}

impl Precompiling {
    /// Compiles the kernels no helper has taken on `gpu` (the caller's device), waits for the
    /// helpers, and returns how many kernels were compiled, or the first driver error.
    pub fn finish(mut self, gpu: &Gpu) -> Result<usize, RuntimeError> {
        self.work.run_on(gpu);
        self.join();
        match self.work.first_error.lock().expect("no panics").take() {
            Some(e) => Err(e),
            None => Ok(self.work.kernels.len()),
        }
    }

    fn join(&mut self) {
        for helper in self.helpers.drain(..) {
            // A helper that panicked compiled less; the executor compiles the rest at first dispatch.
            let _ = helper.join();
        }
    }
}

impl Drop for Precompiling {
    fn drop(&mut self) {
        self.work
            .next
            .store(self.work.kernels.len(), Ordering::Relaxed);
        self.join();
    }
}

impl Work {
    /// Takes kernels off the queue and compiles them on `gpu` until none is left or one fails.
    fn run_on(&self, gpu: &Gpu) {
        while let Some(kernel) = self.kernels.get(self.next.fetch_add(1, Ordering::Relaxed)) {
            if let Err(e) = compile_now(gpu, kernel) {
                self.first_error.lock().expect("no panics").get_or_insert(e);
                self.next.store(self.kernels.len(), Ordering::Relaxed);
                return;
            }
            let done = self.done.fetch_add(1, Ordering::Relaxed) + 1;
            (self.progress)(done, self.kernels.len());
        }
    }
}

/// The kernels of `plans` with distinct source and bindings (a kernel repeated across layers or
/// shared by the training and eval plans compiles once), longest source first: the source's length
/// stands in for its compile time, so that no long kernel starts last.
fn distinct_kernels(plans: &[&Plan]) -> Vec<Kernel> {
    let mut seen = HashSet::new();
    let mut kernels: Vec<Kernel> = plans
        .iter()
        .flat_map(|plan| &plan.kernels)
        .filter(|k| seen.insert((&k.wgsl, &k.writes, &k.entry_point)))
        .cloned()
        .collect();
    kernels.sort_by_key(|k| std::cmp::Reverse(k.wgsl.len()));
    kernels
}

/// Creates `kernel`'s pipeline on `gpu` and dispatches it with zero workgroups, each binding a
/// minimal buffer: the driver compiles it, and no invocation runs.
fn compile_now(gpu: &Gpu, kernel: &Kernel) -> Result<(), RuntimeError> {
    let device = &gpu.device;
    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let (pipeline, layout) = kernel_pipeline(gpu, kernel);
    // vec4 views need 16 bytes; each binding its own buffer, as read-only and writable bindings
    // of one buffer may not meet in a dispatch.
    let buffers: Vec<wgpu::Buffer> = kernel
        .writes
        .iter()
        .map(|_| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("moec precompile"),
                size: 16,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            })
        })
        .collect();
    let entries: Vec<wgpu::BindGroupEntry> = buffers
        .iter()
        .enumerate()
        .map(|(i, buffer)| wgpu::BindGroupEntry {
            binding: i as u32,
            resource: buffer.as_entire_binding(),
        })
        .collect();
    let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("moec precompile"),
        layout: &layout,
        entries: &entries,
    });
    let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
        label: Some("moec precompile"),
    });
    {
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: None,
            timestamp_writes: None,
        });
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(0, 1, 1);
    }
    gpu.queue.submit([encoder.finish()]);
    if let Some(error) = pollster::block_on(scope.pop()) {
        return Err(RuntimeError::Pipeline {
            kernel: kernel.name.clone(),
            message: error.to_string(),
        });
    }
    gpu.wait()
}
