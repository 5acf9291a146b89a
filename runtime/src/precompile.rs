//! Cold start on adapters that compile a kernel at its first dispatch.
//!
//! llvmpipe (lavapipe) turns a pipeline into machine code with LLVM when it is first dispatched,
//! not when it is created, and keeps the result in Mesa's on-disk shader cache. So a fresh machine's
//! first training step compiles every kernel of the plan one after another, on the queue's one
//! thread, while the other cores wait. [`Gpu::precompile`] moves that work ahead of the first step
//! and spreads it over the cores: each thread opens its own device on the same adapter, creates
//! the kernels' pipelines exactly as an [`crate::Executor`] does (same module, same layout, so the
//! same cache key), and dispatches each once with zero workgroups, which compiles it and runs
//! nothing (so no buffer needs its real size). The executor's own first dispatches then load the
//! machine code from Mesa's cache. Measured in docs/DECISIONS.md (Runtime: cold start).

use crate::{kernel_pipeline, Gpu, RuntimeError};
use moec_compiler::plan::{Kernel, Plan};
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Reports compile progress: kernels done, kernels in all.
pub type Progress<'a> = &'a (dyn Fn(usize, usize) + Sync);

impl Gpu {
    /// Whether [`Gpu::precompile`] has anything to do here: a CPU adapter (llvmpipe compiles at
    /// first dispatch; GPU drivers compile when the pipeline is created, and keep it in moec's
    /// pipeline cache) whose Mesa shader cache is on (else nothing carries the work over).
    pub fn compiles_at_first_dispatch(&self) -> bool {
        let cache_off = std::env::var("MESA_SHADER_CACHE_DISABLE")
            .is_ok_and(|v| matches!(v.to_lowercase().as_str(), "1" | "true" | "yes"));
        self.is_cpu && !cache_off
    }

    /// Compiles every distinct kernel of `plans` into the driver's shader cache, on as many devices
    /// as the machine has cores, longest kernels first, calling `progress` after each. Does nothing
    /// where [`Gpu::compiles_at_first_dispatch`] is false. Returns the number of kernels compiled.
    pub fn precompile(&self, plans: &[&Plan], progress: Progress) -> Result<usize, RuntimeError> {
        if !self.compiles_at_first_dispatch() {
            return Ok(0);
        }
        let kernels = distinct_kernels(plans);
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(kernels.len());
        let next = AtomicUsize::new(0);
        let done = AtomicUsize::new(0);
        let first_error = Mutex::new(None);
        let work = |gpu: &Gpu| {
            while let Some(kernel) = kernels.get(next.fetch_add(1, Ordering::Relaxed)) {
                if let Err(e) = compile_now(gpu, kernel) {
                    first_error.lock().expect("no panics").get_or_insert(e);
                    return;
                }
                progress(done.fetch_add(1, Ordering::Relaxed) + 1, kernels.len());
            }
        };
        std::thread::scope(|scope| {
            for _ in 1..threads {
                // Without a second device, the threads that have one do the work.
                scope.spawn(|| {
                    if let Ok(helper) = Gpu::new(&self.choice) {
                        work(&helper);
                    }
                });
            }
            work(self);
        });
        match first_error.into_inner().expect("no panics") {
            Some(e) => Err(e),
            None => Ok(kernels.len()),
        }
    }
}

/// The kernels of `plans` with distinct source and bindings (a kernel repeated across layers or
/// shared by the training and eval plans compiles once), longest source first: the source's length
/// stands in for its compile time, so that no long kernel starts last.
fn distinct_kernels<'p>(plans: &[&'p Plan]) -> Vec<&'p Kernel> {
    let mut seen = HashSet::new();
    let mut kernels: Vec<&Kernel> = plans
        .iter()
        .flat_map(|plan| &plan.kernels)
        .filter(|k| seen.insert((&k.wgsl, &k.writes, &k.entry_point)))
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
