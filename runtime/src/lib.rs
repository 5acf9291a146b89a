//! moec's runtime: picks a wgpu adapter, allocates the buffers a [`Plan`] names, creates each kernel's
//! pipeline once, and runs the dispatch list.
//!
//! The runtime knows nothing of the IR: a Plan is a list of buffers and dispatches with shapes baked
//! into the shaders, so one `run` is one command buffer with one compute pass, no host round trip.

use moec_compiler::emit::{MatmulVariant, Target};
use moec_compiler::ir::DType;
use moec_compiler::plan::{BufferId, BufferRole, Dispatch, Kernel, Plan};
use pipeline_cache::DiskPipelineCache;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("no GPU adapter found{0}")]
    NoAdapter(String),
    #[error("could not open the GPU device on `{adapter}`: {message}")]
    Device { adapter: String, message: String },
    #[error("the plan needs {what}, but adapter `{adapter}` allows {limit}")]
    Limit {
        adapter: String,
        what: String,
        limit: String,
    },
    #[error("kernel `{kernel}` was rejected by the GPU driver: {message}")]
    Pipeline { kernel: String, message: String },
    #[error("no buffer named `{0}` in the plan")]
    UnknownBuffer(String),
    #[error("buffer `{name}` holds {expected} bytes of {dtype:?}, got {got} bytes")]
    SizeMismatch {
        name: String,
        expected: u64,
        got: u64,
        dtype: DType,
    },
    #[error("GPU error while running the plan: {0}")]
    Execution(String),
    #[error("the plan stores values in f16 (`precision = f16`) but the adapter `{adapter}` does not have the `shader-f16` feature (wgpu Features::SHADER_F16); use `precision = f32` or another adapter (`moec devices`)")]
    NoF16 { adapter: String },
}

/// Which adapter to open. An explicit `name` (case-insensitive substring of the adapter name, as
/// `moec devices` prints it) wins; otherwise wgpu's own environment variables apply
/// (`WGPU_ADAPTER_NAME`, `WGPU_BACKEND`, `WGPU_POWER_PREF`), and otherwise the high-performance default.
#[derive(Debug, Clone, Default)]
pub struct AdapterChoice {
    pub name: Option<String>,
    /// Bind at most this many bytes per storage binding, below the adapter's own limit: compiles and
    /// runs what an adapter with that smaller limit would (values over it split across bindings),
    /// so the split path is tested on any machine.
    pub max_binding: Option<u64>,
}

/// One adapter as `moec devices` lists it.
#[derive(Debug, Clone)]
pub struct AdapterSummary {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
}

impl fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}, {}", self.name, self.backend, self.device_type)?;
        if !self.driver.is_empty() {
            write!(f, ", {}", self.driver)?;
        }
        write!(f, ")")
    }
}

impl AdapterSummary {
    /// A one-line upgrade hint when this is Mesa's llvmpipe older than Mesa 24: the same kernels run
    /// 2-5x slower there and compile about 5x more slowly (README "Setup"), which users otherwise
    /// take for moec being slow.
    pub fn slow_driver_hint(&self) -> Option<String> {
        if !self.name.to_lowercase().contains("llvmpipe") {
            return None;
        }
        let major = mesa_major_version(&self.driver)?;
        (major < 24).then(|| {
            format!(
                "hint: this lavapipe is Mesa {major}; Mesa >= 25 runs moec 2-5x faster and compiles its kernels ~5x faster \
                 (Debian 12: apt-get install -t bookworm-backports mesa-vulkan-drivers; or run scripts/install-lavapipe.sh)"
            )
        })
    }
}

/// The major version in a driver string such as `Mesa 22.3.6 (LLVM 15.0.6)`.
fn mesa_major_version(driver: &str) -> Option<u32> {
    let rest = &driver[driver.find("Mesa ")? + "Mesa ".len()..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn summary(info: &wgpu::AdapterInfo) -> AdapterSummary {
    AdapterSummary {
        name: info.name.clone(),
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        driver: [info.driver.as_str(), info.driver_info.as_str()]
            .iter()
            .filter(|s| !s.is_empty())
            .cloned()
            .collect::<Vec<_>>()
            .join(" "),
    }
}

/// Vulkan, Metal and DX12 unless `WGPU_BACKEND` says otherwise: moec is compute-only, and probing
/// the GL backend on a headless machine only prints display-server noise.
fn instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    desc.backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::PRIMARY);
    wgpu::Instance::new(desc)
}

/// Every adapter wgpu can see (all backends enabled by `WGPU_BACKEND`, or all).
pub fn list_adapters() -> Vec<AdapterSummary> {
    let instance = instance();
    pollster::block_on(
        instance.enumerate_adapters(wgpu::Backends::from_env().unwrap_or(wgpu::Backends::PRIMARY)),
    )
    .iter()
    .map(|a| summary(&a.get_info()))
    .collect()
}

/// An open device plus what the compiler needs to know about it.
pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: AdapterSummary,
    is_cpu: bool,
    limits: wgpu::Limits,
    /// [`Target::subgroup_size`]: lanes of the adapter's fixed-size subgroups, 0 where kernels must
    /// not rely on them.
    subgroup_size: u32,
    /// Bytes of every buffer [`Gpu::storage_buffer`] has created: what the memory report
    /// (`moec_runtime::memory`) must match.
    allocated: AtomicU64,
    pipeline_cache: Option<DiskPipelineCache>,
    /// The adapter this device was opened on, for [`Gpu::precompile`]'s helper devices.
    choice: AdapterChoice,
}

impl Gpu {
    pub fn new(choice: &AdapterChoice) -> Result<Gpu, RuntimeError> {
        let instance = instance();
        let adapter = match &choice.name {
            Some(wanted) => {
                let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::from_env().unwrap_or(wgpu::Backends::PRIMARY)));
                let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
                adapters
                    .into_iter()
                    .find(|a| a.get_info().name.to_lowercase().contains(&wanted.to_lowercase()))
                    .ok_or_else(|| RuntimeError::NoAdapter(format!(" matching `{wanted}` (have: {})", names.join(", "))))?
            }
            None => pollster::block_on(wgpu::util::initialize_adapter_from_env_or_default(&instance, None)).map_err(|e| {
                RuntimeError::NoAdapter(format!(
                    " ({e}); on a machine without a GPU install Mesa's software Vulkan: apt-get install mesa-vulkan-drivers"
                ))
            })?,
        };
        let info = adapter.get_info();
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("moec"),
            // shader-f16 when the adapter has it: `precision = f16` plans need it ([`Gpu::has_f16`]).
            required_features: adapter.features()
                & (wgpu::Features::SUBGROUP
                    | wgpu::Features::SHADER_F16
                    | DiskPipelineCache::FEATURE),
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| RuntimeError::Device {
            adapter: info.name.clone(),
            message: e.to_string(),
        })?;
        let is_cpu = info.device_type == wgpu::DeviceType::Cpu;
        // Only CPU adapters are known to lay lanes out by `local_invocation_index` (llvmpipe: one SIMD
        // vector of consecutive invocations); GPUs take the shared-memory schedule instead.
        let fixed_subgroups = adapter.features().contains(wgpu::Features::SUBGROUP)
            && info.subgroup_min_size == info.subgroup_max_size;
        let subgroup_size = if is_cpu && fixed_subgroups {
            info.subgroup_min_size
        } else {
            0
        };
        let pipeline_cache = DiskPipelineCache::open(&device, &info);
        Ok(Gpu {
            pipeline_cache,
            device,
            queue,
            is_cpu,
            info: summary(&info),
            limits: wgpu::Limits {
                max_storage_buffer_binding_size: choice
                    .max_binding
                    .map_or(limits.max_storage_buffer_binding_size, |cap| {
                        cap.min(limits.max_storage_buffer_binding_size)
                    }),
                ..limits
            },
            subgroup_size,
            allocated: AtomicU64::new(0),
            choice: choice.clone(),
        })
    }

    /// The compile target for this adapter: its real limits, and the matmul schedule that is fast on
    /// it (docs/DECISIONS.md, Runtime: CPU adapters such as lavapipe want register blocking, GPUs want shared tiles).
    pub fn target(&self) -> Target {
        Target {
            max_storage_buffers_per_stage: self.limits.max_storage_buffers_per_shader_stage,
            max_storage_binding_size: self.limits.max_storage_buffer_binding_size,
            max_workgroups_per_dim: self.limits.max_compute_workgroups_per_dimension,
            max_invocations_per_workgroup: self.limits.max_compute_invocations_per_workgroup,
            max_workgroup_storage_bytes: self.limits.max_compute_workgroup_storage_size,
            matmul: if self.is_cpu {
                MatmulVariant::RegisterBlocked
            } else {
                MatmulVariant::SharedTiled
            },
            subgroup_size: self.subgroup_size,
            small_product_macs: if self.is_cpu {
                moec_compiler::target::CPU_SMALL_PRODUCT_MACS
            } else {
                0
            },
        }
    }

    /// The pipeline cache every compute pipeline is created with, where the adapter has one.
    pub fn pipeline_cache(&self) -> Option<&wgpu::PipelineCache> {
        self.pipeline_cache.as_ref().map(DiskPipelineCache::cache)
    }

    /// Saves the pipeline cache after a batch of pipelines was created, so the next run on this
    /// adapter finds them compiled. Best effort: failing to write a cache only costs the next run
    /// its compile time, so the error is not the caller's concern.
    pub fn save_pipeline_cache(&self) {
        if let Some(cache) = &self.pipeline_cache {
            let _ = cache.save();
        }
    }

    /// Bytes of all storage buffers created so far (buffers are never freed while a run lasts; the
    /// transient readback buffers are not counted).
    pub fn allocated_bytes(&self) -> u64 {
        self.allocated.load(Ordering::Relaxed)
    }

    /// A CPU adapter (lavapipe): its buffers live in the machine's memory.
    pub fn is_cpu(&self) -> bool {
        self.is_cpu
    }

    /// Whether kernels may use f16 (`enable f16;`): the device was opened with `shader-f16`.
    pub fn has_f16(&self) -> bool {
        self.device.features().contains(wgpu::Features::SHADER_F16)
    }

    /// Refuses a plan that stores f16 values on a device without `shader-f16`, naming the adapter and
    /// the feature, before any shader is compiled.
    pub fn check_plan_features(&self, plan: &Plan) -> Result<(), RuntimeError> {
        // An f16 value may live in an f32 buffer (`emit::alloc`): the kernels say it too.
        let f16 = plan.buffers.iter().any(|b| b.dtype == DType::F16)
            || plan
                .kernels
                .iter()
                .any(|k| k.wgsl.starts_with("enable f16;"));
        if f16 && !self.has_f16() {
            return Err(RuntimeError::NoF16 {
                adapter: self.info.name.clone(),
            });
        }
        Ok(())
    }

    pub fn max_buffer_size(&self) -> u64 {
        self.limits.max_buffer_size
    }

    /// A storage buffer that can also be written by the host and read back (the usage every moec
    /// buffer has). `bytes` is rounded up to a multiple of 4, at least 4.
    pub fn storage_buffer(&self, label: &str, bytes: u64) -> wgpu::Buffer {
        let size = bytes.max(4).next_multiple_of(4);
        self.allocated.fetch_add(size, Ordering::Relaxed);
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// Records one compute pass with `record` and submits it, so several executors (the training plan,
    /// the optimizer) share one submission with no host round trip between them. Does not wait;
    /// returns the submission to wait for with [`Gpu::wait_for`].
    pub fn run_pass(
        &self,
        record: impl FnOnce(&mut wgpu::ComputePass<'_>),
    ) -> Result<wgpu::SubmissionIndex, RuntimeError> {
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("moec step"),
            });
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("moec"),
                timestamp_writes: None,
            });
            record(&mut pass);
        }
        let index = self.queue.submit([encoder.finish()]);
        match pollster::block_on(scope.pop()) {
            Some(error) => Err(RuntimeError::Execution(error.to_string())),
            None => Ok(index),
        }
    }

    /// Submits whole-buffer copies `(from, to)` (equal sizes), ordered after everything submitted
    /// before. Does not wait.
    pub fn copy_buffers(&self, copies: &[(&wgpu::Buffer, &wgpu::Buffer)]) {
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("moec copy"),
            });
        for (from, to) in copies {
            encoder.copy_buffer_to_buffer(from, 0, to, 0, from.size().min(to.size()));
        }
        self.queue.submit([encoder.finish()]);
    }

    /// Waits until one submission has finished (and lets wgpu reclaim what it used).
    pub fn wait_for(&self, index: wgpu::SubmissionIndex) -> Result<(), RuntimeError> {
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: Some(index),
                timeout: None,
            })
            .map(|_| ())
            .map_err(|e| RuntimeError::Execution(e.to_string()))
    }

    /// Waits for all submitted work.
    pub fn wait(&self) -> Result<(), RuntimeError> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| RuntimeError::Execution(e.to_string()))
    }

    /// Copies the first `size` bytes of `buffer` back to the host (waits for the GPU). `size` must be
    /// a multiple of 4 and at most the buffer's size.
    pub fn read_buffer(&self, buffer: &wgpu::Buffer, size: u64) -> Result<Vec<u8>, RuntimeError> {
        let padded = size.max(4).next_multiple_of(4);
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("moec readback"),
            size: padded,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("moec readback"),
            });
        encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, padded);
        self.queue.submit([encoder.finish()]);
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |result| {
            let _ = tx.send(result);
        });
        self.wait()?;
        rx.recv()
            .map_err(|e| RuntimeError::Execution(e.to_string()))?
            .map_err(|e| RuntimeError::Execution(format!("mapping a buffer for readback: {e}")))?;
        let bytes = staging
            .get_mapped_range(..)
            .map_err(|e| RuntimeError::Execution(e.to_string()))?[..size as usize]
            .to_vec();
        staging.unmap();
        Ok(bytes)
    }

    pub fn read_buffer_f32(
        &self,
        buffer: &wgpu::Buffer,
        len: usize,
    ) -> Result<Vec<f32>, RuntimeError> {
        Ok(bytemuck::pod_collect_to_vec(
            &self.read_buffer(buffer, 4 * len as u64)?,
        ))
    }
}

/// Where [`Executor::first_non_finite`] found the first NaN or infinity.
#[derive(Debug, Clone, PartialEq)]
pub struct NonFinite {
    /// Index into the plan's dispatch list.
    pub dispatch: usize,
    /// The dispatch's name (`012_matmul_blocks_0_attn_q`: dispatch index, anchor op, anchor label).
    pub kernel: String,
    /// Label of the written buffer that holds the non-finite value.
    pub buffer: String,
    /// Its first non-finite element: index and value.
    pub index: usize,
    pub value: f32,
}

impl fmt::Display for NonFinite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A reused scratch buffer's label lists every tensor it ever holds; two name it well enough.
        let parts: Vec<&str> = self.buffer.split(" | ").collect();
        let buffer = if parts.len() > 2 {
            format!("{} | {} | ...", parts[0], parts[1])
        } else {
            self.buffer.clone()
        };
        write!(
            f,
            "dispatch {} (kernel `{}`) wrote {} at element {} of buffer `{buffer}`",
            self.dispatch, self.kernel, self.value, self.index
        )
    }
}

/// A Plan made live on a [`Gpu`]: buffers allocated, pipelines and bind groups created once.
pub struct Executor<'g> {
    gpu: &'g Gpu,
    plan: Plan,
    buffers: Vec<wgpu::Buffer>,
    pipelines: Vec<wgpu::ComputePipeline>,
    bind_groups: Vec<wgpu::BindGroup>,
    by_name: HashMap<String, usize>,
}

/// The plan's buffers in order: lent by `host`, taken from `shared`, or fresh.
fn plan_buffers(
    gpu: &Gpu,
    plan: &Plan,
    shared: &HashMap<String, wgpu::Buffer>,
    host: Option<&Executor<'_>>,
) -> Result<Vec<wgpu::Buffer>, RuntimeError> {
    let lent = host.map_or_else(|| vec![None; plan.buffers.len()], |h| h.plan.lend(plan));
    let mut buffers = Vec::with_capacity(plan.buffers.len());
    for (spec, lent) in plan.buffers.iter().zip(lent) {
        if let (Some(h), Some(b)) = (host, lent) {
            buffers.push(h.buffers[b].clone());
            continue;
        }
        if let BufferRole::Param { name, .. } | BufferRole::Input { name, .. } = &spec.role {
            if let Some(buffer) = shared.get(name) {
                let expected = spec.size.max(4).next_multiple_of(4);
                if buffer.size() != expected {
                    return Err(RuntimeError::SizeMismatch {
                        name: name.clone(),
                        expected,
                        got: buffer.size(),
                        dtype: spec.dtype,
                    });
                }
                buffers.push(buffer.clone());
                continue;
            }
        }
        if spec.size > gpu.max_buffer_size() {
            return Err(RuntimeError::Limit {
                adapter: gpu.info.name.clone(),
                what: format!("a {} byte buffer for `{}`", spec.size, spec.label),
                limit: format!("{} bytes", gpu.max_buffer_size()),
            });
        }
        buffers.push(gpu.storage_buffer(&spec.label, spec.size));
    }
    Ok(buffers)
}

/// A kernel's pipeline and its bind group layout, explicit so that each binding is read-only
/// unless the kernel writes it.
fn kernel_pipeline(gpu: &Gpu, kernel: &Kernel) -> (wgpu::ComputePipeline, wgpu::BindGroupLayout) {
    let device = &gpu.device;
    let descriptor = wgpu::ShaderModuleDescriptor {
        label: Some(&kernel.name),
        source: wgpu::ShaderSource::Wgsl(kernel.wgsl.as_str().into()),
    };
    // SAFETY: every index a generated kernel computes is guarded by its own bounds check
    // against the shape constants it was specialised for, and the plan binds buffers of
    // exactly those sizes (checked in `write_bytes` and by construction in `emit`), so
    // wgpu's per-access clamping only costs time (MOEC_CHECKED_SHADERS=1 turns it back on).
    let module = if std::env::var_os("MOEC_CHECKED_SHADERS").is_some() {
        device.create_shader_module(descriptor)
    } else {
        unsafe {
            device.create_shader_module_trusted(descriptor, wgpu::ShaderRuntimeChecks::unchecked())
        }
    };
    let entries: Vec<wgpu::BindGroupLayoutEntry> = kernel
        .writes
        .iter()
        .enumerate()
        .map(|(i, &writes)| wgpu::BindGroupLayoutEntry {
            binding: i as u32,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage { read_only: !writes },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        })
        .collect();
    let bgl = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some(&kernel.name),
        entries: &entries,
    });
    let layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: Some(&kernel.name),
        bind_group_layouts: &[Some(&bgl)],
        immediate_size: 0,
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(&kernel.name),
        layout: Some(&layout),
        module: &module,
        entry_point: Some(&kernel.entry_point),
        compilation_options: Default::default(),
        cache: gpu.pipeline_cache(),
    });
    (pipeline, bgl)
}

/// A dispatch's bind group: each binding its range of the plan's buffers.
fn dispatch_bind_group(
    device: &wgpu::Device,
    dispatch: &Dispatch,
    buffers: &[wgpu::Buffer],
    layout: &wgpu::BindGroupLayout,
) -> wgpu::BindGroup {
    let entries: Vec<wgpu::BindGroupEntry> = dispatch
        .bindings
        .iter()
        .enumerate()
        .map(|(i, b)| wgpu::BindGroupEntry {
            binding: i as u32,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &buffers[b.buffer],
                offset: b.offset,
                size: std::num::NonZeroU64::new(b.size),
            }),
        })
        .collect();
    device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout,
        entries: &entries,
    })
}

impl<'g> Executor<'g> {
    pub fn new(gpu: &'g Gpu, plan: &Plan) -> Result<Executor<'g>, RuntimeError> {
        Self::with_shared(gpu, plan, &HashMap::new(), None)
    }

    /// Like [`Executor::new`], but every Param or Input buffer whose name is a key of `shared` is that
    /// buffer instead of a fresh one (it must have the plan's size), and with a `host` executor
    /// whose runs never interleave with this one's, every transient buffer [`Plan::lend`] finds
    /// room for lives in one of the host's. This is how the forward-only eval plan reads the weights
    /// (and router state) the training plan updates, with no copy, and runs in the training step's
    /// activation buffers, with no memory of its own.
    pub fn with_shared(
        gpu: &'g Gpu,
        plan: &Plan,
        shared: &HashMap<String, wgpu::Buffer>,
        host: Option<&Executor<'_>>,
    ) -> Result<Executor<'g>, RuntimeError> {
        gpu.check_plan_features(plan)?;
        let device = &gpu.device;
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let buffers = plan_buffers(gpu, plan, shared, host)?;
        let (pipelines, layouts): (Vec<_>, Vec<_>) = plan
            .kernels
            .iter()
            .map(|kernel| kernel_pipeline(gpu, kernel))
            .unzip();
        let bind_groups = plan
            .dispatches
            .iter()
            .map(|d| dispatch_bind_group(device, d, &buffers, &layouts[d.kernel]))
            .collect();
        if let Some(error) = pollster::block_on(scope.pop()) {
            return Err(RuntimeError::Pipeline {
                kernel: "(plan)".into(),
                message: error.to_string(),
            });
        }
        let by_name = plan
            .buffers
            .iter()
            .enumerate()
            .filter_map(|(i, b)| match &b.role {
                BufferRole::Param { name, .. }
                | BufferRole::Input { name, .. }
                | BufferRole::Output { name, .. } => Some((name.clone(), i)),
                BufferRole::Scratch => None,
            })
            .collect();
        gpu.save_pipeline_cache();
        Ok(Executor {
            gpu,
            plan: plan.clone(),
            buffers,
            pipelines,
            bind_groups,
            by_name,
        })
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    fn named(&self, name: &str) -> Result<usize, RuntimeError> {
        self.by_name
            .get(name)
            .copied()
            .ok_or_else(|| RuntimeError::UnknownBuffer(name.to_string()))
    }

    /// Writes raw bytes into a named buffer; the length must match its tensor exactly.
    pub fn write_bytes(&self, name: &str, bytes: &[u8]) -> Result<(), RuntimeError> {
        let id = self.named(name)?;
        let spec = &self.plan.buffers[id];
        let expected = spec.tensor_bytes().unwrap_or(spec.size);
        if bytes.len() as u64 != expected {
            return Err(RuntimeError::SizeMismatch {
                name: name.into(),
                expected,
                got: bytes.len() as u64,
                dtype: spec.dtype,
            });
        }
        self.gpu.queue.write_buffer(&self.buffers[id], 0, bytes);
        Ok(())
    }

    pub fn write_f32(&self, name: &str, data: &[f32]) -> Result<(), RuntimeError> {
        self.write_bytes(name, bytemuck::cast_slice(data))
    }

    pub fn write_u32(&self, name: &str, data: &[u32]) -> Result<(), RuntimeError> {
        self.write_bytes(name, bytemuck::cast_slice(data))
    }

    /// Records every dispatch of the plan into one compute pass and submits it.
    pub fn run(&self) -> Result<(), RuntimeError> {
        self.gpu.run_pass(|pass| self.encode(pass)).map(|_| ())
    }

    /// Records every dispatch of the plan into `pass` (see [`Gpu::run_pass`]).
    pub fn encode(&self, pass: &mut wgpu::ComputePass<'_>) {
        for (d, bind_group) in self.plan.dispatches.iter().zip(&self.bind_groups) {
            pass.set_pipeline(&self.pipelines[d.kernel]);
            pass.set_bind_group(0, bind_group, &[]);
            pass.dispatch_workgroups(d.workgroups[0], d.workgroups[1], d.workgroups[2]);
        }
    }

    /// The GPU buffer of a named Param, Input or Output.
    pub fn buffer(&self, name: &str) -> Result<&wgpu::Buffer, RuntimeError> {
        Ok(&self.buffers[self.named(name)?])
    }

    /// Every Param buffer by name, to share with another executor ([`Executor::with_shared`]).
    pub fn param_buffers(&self) -> HashMap<String, wgpu::Buffer> {
        self.plan
            .buffers
            .iter()
            .zip(&self.buffers)
            .filter_map(|(spec, buffer)| match &spec.role {
                BufferRole::Param { name, .. } => Some((name.clone(), buffer.clone())),
                _ => None,
            })
            .collect()
    }

    /// Runs the plan one dispatch at a time and, after each, reads back every f32 buffer it wrote;
    /// returns the first non-finite value found, or `None` when the whole plan stays finite. Scratch
    /// and Output buffers are zeroed first, so values left over from an earlier (diverged) run cannot
    /// be blamed on a kernel that only writes part of its buffer. Slow (a readback per dispatch): this
    /// is the diagnosis path after a NaN, not a training path.
    pub fn first_non_finite(&self) -> Result<Option<NonFinite>, RuntimeError> {
        let mut encoder = self
            .gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("moec clear"),
            });
        for (spec, buffer) in self.plan.buffers.iter().zip(&self.buffers) {
            if matches!(spec.role, BufferRole::Scratch | BufferRole::Output { .. }) {
                encoder.clear_buffer(buffer, 0, None);
            }
        }
        self.gpu.queue.submit([encoder.finish()]);
        for (i, (d, bind_group)) in self
            .plan
            .dispatches
            .iter()
            .zip(&self.bind_groups)
            .enumerate()
        {
            self.gpu.run_pass(|pass| {
                pass.set_pipeline(&self.pipelines[d.kernel]);
                pass.set_bind_group(0, bind_group, &[]);
                pass.dispatch_workgroups(d.workgroups[0], d.workgroups[1], d.workgroups[2]);
            })?;
            let kernel = &self.plan.kernels[d.kernel];
            let mut written: Vec<BufferId> = d
                .bindings
                .iter()
                .zip(&kernel.writes)
                .filter(|&(_, &writes)| writes)
                .map(|(b, _)| b.buffer)
                .collect();
            written.dedup();
            for b in written {
                let spec = &self.plan.buffers[b];
                if !spec.dtype.is_float() {
                    continue;
                }
                let bytes = self.gpu.read_buffer(&self.buffers[b], spec.size)?;
                let values = floats(&bytes, spec.dtype);
                if let Some(index) = values.iter().position(|v| !v.is_finite()) {
                    return Ok(Some(NonFinite {
                        dispatch: i,
                        kernel: d.name.clone(),
                        buffer: spec.label.clone(),
                        index,
                        value: values[index],
                    }));
                }
            }
        }
        Ok(None)
    }

    /// Runs the plan one dispatch per submission, waiting after each, and returns the wall time of
    /// every dispatch (its name, seconds). Slower than `run`, but portable: no timestamp queries
    /// needed, so it works on every adapter, lavapipe included.
    pub fn profile(&self) -> Result<Vec<(String, f64)>, RuntimeError> {
        let mut times = Vec::with_capacity(self.plan.dispatches.len());
        self.wait()?;
        for (d, bind_group) in self.plan.dispatches.iter().zip(&self.bind_groups) {
            let started = std::time::Instant::now();
            let mut encoder =
                self.gpu
                    .device
                    .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                        label: Some("moec profile"),
                    });
            {
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: None,
                    timestamp_writes: None,
                });
                pass.set_pipeline(&self.pipelines[d.kernel]);
                pass.set_bind_group(0, bind_group, &[]);
                pass.dispatch_workgroups(d.workgroups[0], d.workgroups[1], d.workgroups[2]);
            }
            self.gpu.queue.submit([encoder.finish()]);
            self.wait()?;
            times.push((d.name.clone(), started.elapsed().as_secs_f64()));
        }
        Ok(times)
    }

    /// Waits for all submitted work; used by benchmarks to time whole steps.
    pub fn wait(&self) -> Result<(), RuntimeError> {
        self.gpu.wait()
    }

    /// Copies a named tensor back to the host (waits for the GPU).
    pub fn read_bytes(&self, name: &str) -> Result<Vec<u8>, RuntimeError> {
        let id = self.named(name)?;
        let spec = &self.plan.buffers[id];
        self.gpu
            .read_buffer(&self.buffers[id], spec.tensor_bytes().unwrap_or(spec.size))
    }

    /// A float buffer's values (an f16 buffer widened).
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>, RuntimeError> {
        let dtype = self.plan.buffers[self.named(name)?].dtype;
        Ok(floats(&self.read_bytes(name)?, dtype))
    }

    pub fn read_u32(&self, name: &str) -> Result<Vec<u32>, RuntimeError> {
        Ok(bytemuck::pod_collect_to_vec(&self.read_bytes(name)?))
    }
}

/// The f32 values of a float buffer's bytes (f16 halves widened; an odd f16 count's padding half
/// included).
fn floats(bytes: &[u8], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|h| half::f16::from_le_bytes([h[0], h[1]]).to_f32())
            .collect(),
        _ => bytemuck::pod_collect_to_vec(bytes),
    }
}

pub mod checkpoint;
pub mod data;
pub mod hf;
pub mod megatron;
pub mod memory;
pub mod metrics;
pub mod optim;
mod pipeline_cache;
pub mod precompile;
pub mod report;
pub mod schedule;
pub mod train;

#[cfg(test)]
mod tests {
    use super::*;

    fn llvmpipe(driver: &str) -> AdapterSummary {
        AdapterSummary {
            name: "llvmpipe (LLVM 15.0.6, 256 bits)".into(),
            backend: "Vulkan".into(),
            device_type: "Cpu".into(),
            driver: driver.into(),
        }
    }

    #[test]
    fn old_lavapipe_gets_an_upgrade_hint_and_new_ones_do_not() {
        let old = llvmpipe("llvmpipe Mesa 22.3.6 (LLVM 15.0.6)").slow_driver_hint();
        assert!(old.unwrap().contains("Mesa 22"));
        assert_eq!(
            llvmpipe("llvmpipe Mesa 25.0.7-2~bpo12+1 (LLVM 19.1.7)").slow_driver_hint(),
            None
        );
        assert_eq!(llvmpipe("llvmpipe Mesa 24.0.1").slow_driver_hint(), None);
        assert_eq!(llvmpipe("no version here").slow_driver_hint(), None);
        let gpu = AdapterSummary {
            name: "NVIDIA H200".into(),
            ..llvmpipe("Mesa 22.3.6")
        };
        assert_eq!(gpu.slow_driver_hint(), None);
    }
}
