//! The Plan: everything the runtime needs to run a compiled graph, and nothing it has to think about.
//!
//! It is plain data (serde), written next to the kernels by `moec build`, so the runtime is a loop over
//! `dispatches` with no knowledge of the IR. Shapes are baked into each kernel's WGSL, so a dispatch
//! binds only storage buffers: binding `i` of group 0 is the byte range `dispatch.bindings[i]`.

use crate::ir::{DType, Init, InputRole};
use serde::{Deserialize, Serialize};

pub type BufferId = usize;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub buffers: Vec<BufferSpec>,
    /// Distinct shaders; a pipeline is created once per kernel.
    pub kernels: Vec<Kernel>,
    /// In execution order.
    pub dispatches: Vec<Dispatch>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BufferSpec {
    /// Bytes; at least 4 (wgpu rejects empty bindings).
    pub size: u64,
    pub dtype: DType,
    pub role: BufferRole,
    /// Human label for debugging and `--emit` dumps.
    pub label: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum BufferRole {
    /// Uploaded once, kept across steps; `name` is the checkpoint name.
    Param {
        name: String,
        shape: Vec<usize>,
        init: Init,
    },
    /// Written by the host before a run, as `role` says.
    Input {
        name: String,
        shape: Vec<usize>,
        role: InputRole,
    },
    /// Read back by the host after a run.
    Output { name: String, shape: Vec<usize> },
    /// Intermediate; may be shared by tensors whose lifetimes do not overlap.
    Scratch,
}

impl BufferSpec {
    /// Bytes the runtime allocates for it: `size` rounded up to a multiple of 4 (wgpu's rule).
    pub fn allocated(&self) -> u64 {
        self.size.max(4).next_multiple_of(4)
    }

    /// Bytes of the named tensor it holds (Param, Input, Output): its shape's. An Output's buffer may
    /// be larger, because values that are dead before the output is written share it.
    pub fn tensor_bytes(&self) -> Option<u64> {
        match &self.role {
            BufferRole::Param { shape, .. }
            | BufferRole::Input { shape, .. }
            | BufferRole::Output { shape, .. } => {
                Some((shape.iter().product::<usize>() * self.dtype.size_bytes()) as u64)
            }
            BufferRole::Scratch => None,
        }
    }

    /// Holds only values of one run (Scratch, Output): its contents are dead once the host has read
    /// the outputs, so another plan run later may use it ([`Plan::lend`]).
    pub fn is_transient(&self) -> bool {
        matches!(self.role, BufferRole::Scratch | BufferRole::Output { .. })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Kernel {
    /// Unique, file-name safe (`003_matmul_blocks_0_attn_q`); the build writes `<name>.wgsl`.
    pub name: String,
    pub wgsl: String,
    pub entry_point: String,
    /// For each binding, whether the shader writes it (`read_write`) or only reads it (`read`).
    pub writes: Vec<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dispatch {
    /// What this dispatch computes (`012_matmul_blocks_0_attn_q`: dispatch index, anchor op,
    /// anchor label), for profiles and diagnostics. Its kernel may serve several dispatches of the
    /// same shape and is named after the first of them only.
    pub name: String,
    pub kernel: usize,
    pub bindings: Vec<Binding>,
    /// Workgroup counts, each ≤ 65535 (large grids are folded into y and z by the emitter).
    pub workgroups: [u32; 3],
}

/// One storage binding: a byte range of a buffer. A value bound whole is one range at offset 0; a
/// value larger than the adapter's binding limit is bound as several consecutive segments
/// ([`crate::emit::segments`]), and a buffer shared by values of different sizes is bound only as far
/// as the value a dispatch reads or writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    pub buffer: BufferId,
    /// Bytes; a multiple of 256 (every adapter's `min_storage_buffer_offset_alignment` divides it).
    pub offset: u64,
    /// Bytes; a multiple of 4, at least 4.
    pub size: u64,
}

impl Plan {
    /// Bytes the runtime allocates for every buffer of the plan.
    pub fn allocated(&self) -> u64 {
        self.buffers.iter().map(BufferSpec::allocated).sum()
    }

    /// For each buffer of `guest`, the buffer of `self` it can live in, when both plans run one after
    /// the other and never interleave (the training step, then evaluation): each transient buffer of
    /// `guest` gets a distinct transient buffer of `self` of the same dtype and at least its size
    /// (largest first, best fit), or `None` (a buffer of its own). Params and Inputs are never lent:
    /// they hold state across runs.
    pub fn lend(&self, guest: &Plan) -> Vec<Option<BufferId>> {
        let mut free: Vec<BufferId> = (0..self.buffers.len())
            .filter(|&b| self.buffers[b].is_transient())
            .collect();
        free.sort_by_key(|&b| (self.buffers[b].allocated(), b));
        let mut wanted: Vec<BufferId> = (0..guest.buffers.len())
            .filter(|&b| guest.buffers[b].is_transient())
            .collect();
        wanted.sort_by_key(|&b| (std::cmp::Reverse(guest.buffers[b].allocated()), b));
        let mut lent = vec![None; guest.buffers.len()];
        for g in wanted {
            let need = &guest.buffers[g];
            if let Some(k) = free.iter().position(|&h| {
                let host = &self.buffers[h];
                host.dtype == need.dtype && host.allocated() >= need.allocated()
            }) {
                lent[g] = Some(free.remove(k));
            }
        }
        lent
    }

    pub fn buffer_named(&self, wanted: &str) -> Option<BufferId> {
        self.buffers.iter().position(|b| match &b.role {
            BufferRole::Param { name, .. }
            | BufferRole::Input { name, .. }
            | BufferRole::Output { name, .. } => name == wanted,
            BufferRole::Scratch => false,
        })
    }
}
