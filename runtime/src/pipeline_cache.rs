//! wgpu's pipeline cache, kept on disk between runs, for adapters whose backend has one (Vulkan).
//!
//! Why: a GPU driver turns every WGSL kernel into machine code when its pipeline is created, and a
//! training graph has a few hundred kernels. With the driver's binaries saved in
//! `<cache dir>/moec/<adapter key>.bin`, the next run of the same kernels on the same adapter and
//! driver skips that work (docs/DECISIONS.md, Runtime: cold start). The cache is only an
//! accelerator: data wgpu or the driver does not accept (another driver version, a damaged file)
//! is dropped and the pipelines are compiled as if there were none, and a cache that cannot be
//! written only costs the next run its compile time.

use std::path::PathBuf;

/// A pipeline cache and the file it is loaded from and saved to.
pub(crate) struct DiskPipelineCache {
    cache: wgpu::PipelineCache,
    file: PathBuf,
}

impl DiskPipelineCache {
    /// The feature to request when the adapter has it.
    pub(crate) const FEATURE: wgpu::Features = wgpu::Features::PIPELINE_CACHE;

    /// Opens the cache of `info`'s adapter on `device` (which must have been opened with
    /// [`Self::FEATURE`]), seeded from disk when an earlier run saved one. None where the backend
    /// has no pipeline cache or there is no cache directory.
    pub(crate) fn open(device: &wgpu::Device, info: &wgpu::AdapterInfo) -> Option<Self> {
        if !device.features().contains(Self::FEATURE) {
            return None;
        }
        let key = wgpu::util::pipeline_cache_key(info)?;
        let dir = cache_dir()?;
        let file = dir.join(format!("{key}.bin"));
        let data = std::fs::read(&file).ok();
        // SAFETY: wgpu validates the header (wgpu version, adapter, driver) of `data` and with
        // `fallback` replaces data it does not accept by an empty cache; the file is written only
        // by `save` below from `get_data`, atomically.
        let cache = unsafe {
            device.create_pipeline_cache(&wgpu::PipelineCacheDescriptor {
                label: Some("moec pipelines"),
                data: data.as_deref(),
                fallback: true,
            })
        };
        Some(DiskPipelineCache { cache, file })
    }

    pub(crate) fn cache(&self) -> &wgpu::PipelineCache {
        &self.cache
    }

    /// Writes the cache's current content (every pipeline created with it so far) to its file,
    /// atomically: to a temporary file renamed over the old one, so a concurrent run reads either
    /// the old cache or the new one, never half of one.
    pub(crate) fn save(&self) -> std::io::Result<()> {
        let Some(data) = self.cache.get_data() else {
            return Ok(());
        };
        if let Some(dir) = self.file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let temp = self
            .file
            .with_extension(format!("{}.tmp", std::process::id()));
        std::fs::write(&temp, data)?;
        std::fs::rename(&temp, &self.file)
    }
}

/// The optimizer creates some pipelines at its first step, after the executors saved the cache:
/// saving once more when the device closes keeps them too.
impl Drop for DiskPipelineCache {
    fn drop(&mut self) {
        let _ = self.save();
    }
}

/// `MOEC_CACHE_DIR`, else `moec/` in the user's cache directory: `$XDG_CACHE_HOME` or `~/.cache`
/// (the XDG rule; macOS and Windows users who want another place set `MOEC_CACHE_DIR`). Not the
/// `dirs` crate: adding it changed the feature set of `libc` and so rebuilt every dependency, for
/// three environment variables.
fn cache_dir() -> Option<PathBuf> {
    let var = |name| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("MOEC_CACHE_DIR").or_else(|| {
        var("XDG_CACHE_HOME")
            .or_else(|| var("HOME").map(|home| home.join(".cache")))
            .map(|dir| dir.join("moec"))
    })
}
