//! The Plan: everything the runtime needs to run a compiled graph, and nothing it has to think about.
//!
//! It is plain data (serde), written next to the kernels by `moec build`, so the runtime is a loop over
//! `dispatches` with no knowledge of the IR. Shapes are baked into each kernel's WGSL, so a dispatch
//! binds only storage buffers: binding `i` of group 0 is `dispatch.bindings[i]`.

use crate::ir::{DType, Init};
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
    /// Written by the host before a run.
    Input { name: String, shape: Vec<usize> },
    /// Read back by the host after a run.
    Output { name: String, shape: Vec<usize> },
    /// Intermediate; may be shared by tensors whose lifetimes do not overlap.
    Scratch,
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
    pub kernel: usize,
    pub bindings: Vec<BufferId>,
    /// Workgroup counts, each ≤ 65535 (large grids are folded into y and z by the emitter).
    pub workgroups: [u32; 3],
}

impl Plan {
    pub fn buffer_named(&self, wanted: &str) -> Option<BufferId> {
        self.buffers.iter().position(|b| match &b.role {
            BufferRole::Param { name, .. }
            | BufferRole::Input { name, .. }
            | BufferRole::Output { name, .. } => name == wanted,
            BufferRole::Scratch => false,
        })
    }
}
