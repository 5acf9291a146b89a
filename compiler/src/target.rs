//! The compile target: what the emitter, the fusion pass and the head legalization need to know
//! about the adapter they compile for (its limits and the matmul schedule that is fast on it), and
//! how a value over its binding limit is split. Its own module so that the passes before emission
//! depend on it rather than on `emit`.

use serde::{Deserialize, Serialize};

/// What the emitter needs to know about the adapter it compiles for. The runtime fills it from the
/// wgpu adapter; `Target::default()` is the portable baseline (wgpu's default limits) used by
/// `moec build` when no adapter is named and by the snapshot tests, so snapshots never depend on the
/// machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Target {
    pub max_storage_buffers_per_stage: u32,
    pub max_storage_binding_size: u64,
    pub max_workgroups_per_dim: u32,
    pub max_invocations_per_workgroup: u32,
    pub max_workgroup_storage_bytes: u32,
    pub matmul: MatmulVariant,
    /// Lanes per subgroup when the adapter runs fixed-size subgroups that map consecutive
    /// `local_invocation_index`es to consecutive lanes and the device has subgroups enabled (lavapipe:
    /// 8, its SIMD width); 0 when kernels must not use subgroup operations.
    #[serde(default)]
    pub subgroup_size: u32,
    /// Register-blocked products of fewer multiply-adds than this are compile-bound on this adapter:
    /// llvmpipe compiles a kernel at its first dispatch, in time that grows with the unrolled
    /// block, while a small product runs in about the same time under any block. They get a
    /// half-height block with scalar loads (`emit::blocked::Schedule`). 0: every product gets the
    /// block that runs fastest.
    #[serde(default)]
    pub small_product_macs: u64,
}

/// [`Target::small_product_macs`] of CPU adapters. The quickstart's products (9.4M multiply-adds
/// at most) then compile in 10.6 s instead of 24.1 s, summed over its training plan, and train at the
/// same speed; every product of `bench-small` (67M and up) but its router keeps the large block.
pub const CPU_SMALL_PRODUCT_MACS: u64 = 1 << 25;

/// Matmul schedule (docs/DECISIONS.md, Runtime): on lavapipe (a CPU) a register-blocked kernel with
/// no workgroup memory is ~12x faster than a shared-memory tile; real GPUs want the tile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MatmulVariant {
    RegisterBlocked,
    SharedTiled,
}

/// The byte ranges `(offset, size)` a value of `bytes` is bound as under a binding limit of `limit`
/// bytes: one range when it fits, else consecutive segments of the limit rounded down to a multiple
/// of 256 (so every offset meets any adapter's offset alignment, which WebGPU caps at 256), the last
/// one shorter. The kernels declare one binding per range and address the value through accessor
/// functions (the emitter's `Access`), so no tensor is limited by one binding.
pub fn segments(bytes: u64, limit: u64) -> Vec<(u64, u64)> {
    let bytes = bytes.next_multiple_of(4).max(4);
    if bytes <= limit {
        return vec![(0, bytes)];
    }
    let segment = (limit / 256 * 256).max(256);
    (0..bytes.div_ceil(segment))
        .map(|j| (j * segment, segment.min(bytes - j * segment)))
        .collect()
}

impl Default for Target {
    fn default() -> Self {
        Target {
            max_storage_buffers_per_stage: 8,
            max_storage_binding_size: 128 << 20,
            max_workgroups_per_dim: 65535,
            max_invocations_per_workgroup: 256,
            max_workgroup_storage_bytes: 16384,
            matmul: MatmulVariant::SharedTiled,
            subgroup_size: 0,
            small_product_macs: 0,
        }
    }
}
