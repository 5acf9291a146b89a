//! Emit: kernel groups → naga-validated WGSL + [`Plan`].
//!
//! One compute shader per [`Group`] (identical shaders are shared by several dispatches). Shapes are
//! baked in as constants, so a dispatch binds only storage buffers. Kernel generators live in
//! [`kernels`] (with [`single`], [`blocked`], [`grad`] and [`lstm`]), on the frame every kernel shares
//! ([`frame`]: bindings, constants, prelude, folded grid); fixed-function kernels (tiled matmul, routing, top-k, cross-entropy) are hand-written
//! templates in `shaders/` that read constants and bindings the generator declares in front of them;
//! the bodies of small single-op kernels are `shaders/` templates too, with `{placeholders}` the
//! generator fills with literals and load/store expressions (`frame::fill`).
//!
//! Buffer plan: Params and Inputs get their own buffers, `Reshape` is free (it aliases its operand's
//! buffer), and every other materialised value (activations, scratch, graph outputs such as the
//! gradients) shares a buffer with values whose lifetimes over the whole plan are disjoint from its
//! own ([`alloc`]: greedy by size). A buffer that holds a graph output is that output's `Output`
//! buffer (it may be larger than the output, which the runtime reads by its shape). A dispatch never
//! binds one buffer both for reading and writing, because lifetimes are inclusive.
//!
//! Grids: every kernel computes a linear workgroup index from a grid folded into x/y/z (each at most
//! `target.max_workgroups_per_dim`) and bounds-checks it.

pub use crate::target::{segments, MatmulVariant, Target};

mod alloc;
mod blocked;
mod expr;
mod frame;
pub use blocked::{Strided, StridedMatmul};
pub use frame::validate_wgsl;
mod grad;
mod horizontal;
mod kernels;
mod lstm;
mod router;
mod single;

use crate::fuse::{base, Fused};
use crate::ir::{DType, Graph, NodeId, Op};
use crate::plan::{Binding, BufferId, BufferRole, BufferSpec, Dispatch, Kernel, Plan};
use frame::{KernelError, KernelSrc};
use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EmitError {
    #[error("kernel `{kernel}` failed WGSL validation:\n{message}")]
    Invalid { kernel: String, message: String },
    #[error("kernel `{kernel}` addresses `{label}` ({size} bytes) directly, so it cannot split it across bindings of at most {limit} bytes")]
    BindingTooLarge {
        kernel: String,
        label: String,
        size: u64,
        limit: u64,
    },
    #[error(
        "kernel `{kernel}` binds {count} storage buffers but the adapter allows {limit} per stage"
    )]
    TooManyBindings {
        kernel: String,
        count: usize,
        limit: u32,
    },
    #[error("kernel `{kernel}`: the emitter has no kernel for `{op}` yet")]
    Unsupported { kernel: String, op: String },
    #[error("kernel `{kernel}` needs {workgroups} workgroups, more than a {limit}³ grid holds")]
    GridTooLarge {
        kernel: String,
        workgroups: u64,
        limit: u32,
    },
}

/// A kernel generator's error as the [`EmitError`] of the kernel `kernel` it was generating (the
/// generators do not know the names their kernels get).
fn named(e: KernelError, kernel: &str) -> EmitError {
    match e {
        KernelError::Grid { workgroups, limit } => EmitError::GridTooLarge {
            kernel: kernel.to_string(),
            workgroups,
            limit,
        },
        KernelError::Unsupported(op) => EmitError::Unsupported {
            kernel: kernel.to_string(),
            op,
        },
    }
}

/// A materialised value's buffer request, before scratch reuse.
struct Value {
    node: NodeId,
    role: BufferRole,
    size: u64,
    dtype: DType,
    /// Dispatch that writes it (`None` for Params and Inputs, written by the host).
    def: Option<usize>,
    /// Last dispatch that reads it.
    last_use: Option<usize>,
}

/// Compiles the fused groups of `graph` into a [`Plan`] for `target`, in four steps: kernel sources
/// in dispatch order, the values they bind with their lifetimes, buffers shared by disjoint
/// lifetimes, then validated, deduplicated kernels and their dispatches.
pub fn emit(graph: &Graph, fused: &Fused, target: &Target) -> Result<Plan, EmitError> {
    let sources = sources(graph, fused, target)?;
    let (values, dispatch_values) = values(graph, fused.groups.len(), &sources)?;
    let (buffers, buffer_of) = buffers(graph, &values, sources.srcs.len());
    let (kernels, dispatches) = dispatches(
        graph,
        target,
        sources.srcs,
        dispatch_values,
        &values,
        &buffer_of,
    )?;
    Ok(Plan {
        buffers,
        kernels,
        dispatches,
    })
}

/// The kernel sources of a plan, in dispatch order: one per group, then the copies.
struct Sources {
    /// Kernel name and source of each dispatch.
    srcs: Vec<(String, KernelSrc)>,
    /// Output name and shape of each graph output a group writes (keyed by its buffer's node).
    output_name: HashMap<NodeId, (String, Vec<usize>)>,
    /// Output name and node of each copy dispatch, in order after the groups' dispatches.
    copies: Vec<(String, NodeId)>,
}

/// Step 1: kernel sources, in dispatch order. Graph outputs that are Params/Inputs, or a second
/// name for an already named value, get a copy kernel.
fn sources(graph: &Graph, fused: &Fused, target: &Target) -> Result<Sources, EmitError> {
    let mut srcs: Vec<(String, KernelSrc)> = Vec::new();
    for (gi, group) in fused.groups.iter().enumerate() {
        let name = kernel_name(graph, gi, frame::anchor(graph, group));
        let src = kernels::group_kernel(graph, group, target).map_err(|e| named(e, &name))?;
        srcs.push((name, src));
    }
    // Graph outputs that are Params/Inputs, or a second name for an already named value, get a copy.
    let mut output_name: HashMap<NodeId, (String, Vec<usize>)> = HashMap::new();
    let mut copies: Vec<(String, NodeId)> = Vec::new();
    for (name, id) in &graph.outputs {
        let b = base(graph, *id);
        let free = graph.node(b).op.is_free();
        if free || output_name.contains_key(&b) {
            let name_k = format!("{:03}_copy_{}", srcs.len(), sanitize(name));
            let src = kernels::copy_kernel(graph, *id, target).map_err(|e| named(e, &name_k))?;
            // The copy kernel writes a value owned by no node; it is keyed by the output's node, made
            // unique below through `copies`.
            copies.push((name.clone(), *id));
            srcs.push((name_k, src));
        } else {
            output_name.insert(b, (name.clone(), graph.ty(*id).shape.clone()));
        }
    }
    Ok(Sources {
        srcs,
        output_name,
        copies,
    })
}

/// Step 2: the values the dispatches bind, with their lifetimes (the dispatch that writes each and
/// the last that reads it), and each dispatch's values in binding order. Params and Inputs come
/// first (written by the host); a copy kernel writes a fresh Output value keyed by its index.
fn values(
    graph: &Graph,
    n_groups: usize,
    sources: &Sources,
) -> Result<(Vec<Value>, Vec<Vec<usize>>), EmitError> {
    let Sources {
        srcs,
        output_name,
        copies,
    } = sources;
    let mut values: Vec<Value> = Vec::new();
    let mut value_of: HashMap<NodeId, usize> = HashMap::new();
    for (id, name, ty) in graph.params() {
        let init = match &graph.node(id).op {
            Op::Param { init, .. } => *init,
            _ => unreachable!("Graph::params lists Param nodes"),
        };
        value_of.insert(id, values.len());
        values.push(Value {
            node: id,
            role: BufferRole::Param {
                name,
                shape: ty.shape.clone(),
                init,
            },
            size: ty.buffer_bytes(),
            dtype: ty.dtype,
            def: None,
            last_use: None,
        });
    }
    for (id, name, role, ty) in graph.inputs_with_roles() {
        value_of.insert(id, values.len());
        values.push(Value {
            node: id,
            role: BufferRole::Input {
                name,
                shape: ty.shape.clone(),
                role,
            },
            size: ty.buffer_bytes(),
            dtype: ty.dtype,
            def: None,
            last_use: None,
        });
    }
    let mut dispatch_values: Vec<Vec<usize>> = Vec::with_capacity(srcs.len());
    for (di, (_, src)) in srcs.iter().enumerate() {
        let mut vs = Vec::with_capacity(src.bindings.len());
        for (slot, &(node, writes)) in src.bindings.iter().enumerate() {
            let v = if writes && di >= n_groups {
                // A copy kernel's destination: always a fresh Output buffer.
                let (name, id) = &copies[di - n_groups];
                let ty = graph.ty(*id);
                values.push(Value {
                    node,
                    role: BufferRole::Output {
                        name: name.clone(),
                        shape: ty.shape.clone(),
                    },
                    size: ty.buffer_bytes(),
                    dtype: ty.dtype,
                    def: Some(di),
                    last_use: None,
                });
                values.len() - 1
            } else if writes {
                let ty = graph.ty(node);
                let role = match output_name.get(&node) {
                    Some((name, shape)) => BufferRole::Output {
                        name: name.clone(),
                        shape: shape.clone(),
                    },
                    None => BufferRole::Scratch,
                };
                values.push(Value {
                    node,
                    role,
                    size: ty.buffer_bytes(),
                    dtype: ty.dtype,
                    def: Some(di),
                    last_use: None,
                });
                value_of.insert(node, values.len() - 1);
                values.len() - 1
            } else {
                let v = *value_of.get(&node).ok_or_else(|| EmitError::Invalid {
                    kernel: srcs[di].0.clone(),
                    message: format!(
                        "binding {slot} reads %{} before any dispatch writes it",
                        node.index()
                    ),
                })?;
                values[v].last_use = Some(di);
                v
            };
            vs.push(v);
        }
        dispatch_values.push(vs);
    }
    Ok((values, dispatch_values))
}

/// Step 3: buffers. One per Param/Input value; every value a dispatch writes shares a buffer with
/// values whose lifetimes are disjoint from its own ([`alloc`]). Outputs live to the end of the plan
/// (`dispatches` long).
fn buffers(
    graph: &Graph,
    values: &[Value],
    dispatches: usize,
) -> (Vec<BufferSpec>, Vec<Option<BufferId>>) {
    let mut buffers: Vec<BufferSpec> = Vec::new();
    let mut buffer_of: Vec<Option<BufferId>> = vec![None; values.len()];
    for (vi, v) in values.iter().enumerate() {
        if v.def.is_none() {
            buffers.push(BufferSpec {
                size: v.size.max(4),
                dtype: v.dtype,
                role: v.role.clone(),
                label: graph.node(v.node).label.clone(),
            });
            buffer_of[vi] = Some(buffers.len() - 1);
        }
    }
    let written: Vec<usize> = (0..values.len())
        .filter(|&vi| values[vi].def.is_some())
        .collect();
    let requests: Vec<alloc::Request> = written
        .iter()
        .map(|&vi| {
            let v = &values[vi];
            let first = v.def.expect("written values have a def");
            let last = match v.role {
                BufferRole::Scratch => v.last_use.unwrap_or(first).max(first),
                _ => dispatches,
            };
            alloc::Request {
                size: v.size.max(4),
                dtype: v.dtype,
                first,
                last,
                transient: matches!(v.role, BufferRole::Scratch),
            }
        })
        .collect();
    let sharing = alloc::share(&requests);
    let shared_base = buffers.len();
    for (&size, &dtype) in sharing.sizes.iter().zip(&sharing.dtypes) {
        buffers.push(BufferSpec {
            size,
            dtype,
            role: BufferRole::Scratch,
            label: String::new(),
        });
    }
    // Labels list the buffer's values in dispatch order; an Output names its buffer.
    for (&vi, &s) in written.iter().zip(&sharing.buffer_of) {
        let b = &mut buffers[shared_base + s];
        if !b.label.is_empty() {
            b.label.push_str(" | ");
        }
        b.label.push_str(&graph.node(values[vi].node).label);
        if let BufferRole::Output { .. } = values[vi].role {
            b.role = values[vi].role.clone();
        }
        buffer_of[vi] = Some(shared_base + s);
    }
    (buffers, buffer_of)
}

/// Step 4: kernels (validated with naga, deduplicated by source and write flags) and dispatches,
/// each binding one segment per binding-limit slice of its values.
fn dispatches(
    graph: &Graph,
    target: &Target,
    srcs: Vec<(String, KernelSrc)>,
    dispatch_values: Vec<Vec<usize>>,
    values: &[Value],
    buffer_of: &[Option<BufferId>],
) -> Result<(Vec<Kernel>, Vec<Dispatch>), EmitError> {
    let mut kernels: Vec<Kernel> = Vec::new();
    let mut kernel_of: HashMap<String, usize> = HashMap::new();
    let mut dispatches = Vec::with_capacity(srcs.len());
    for ((name, src), vs) in srcs.into_iter().zip(dispatch_values) {
        if let Some(node) = src.unsplit {
            return Err(EmitError::BindingTooLarge {
                kernel: name,
                label: graph.node(node).label.clone(),
                size: graph.ty(node).buffer_bytes(),
                limit: target.max_storage_binding_size,
            });
        }
        // One binding per segment of each bound value, with its slot's write flag.
        let (bindings, writes): (Vec<Binding>, Vec<bool>) = src
            .bindings
            .iter()
            .zip(&vs)
            .flat_map(|(&(_, writes), &vi)| {
                let buffer = buffer_of[vi].expect("every bound value has a buffer");
                segments(values[vi].size, target.max_storage_binding_size)
                    .into_iter()
                    .map(move |(offset, size)| {
                        let binding = Binding {
                            buffer,
                            offset,
                            size,
                        };
                        (binding, writes)
                    })
            })
            .unzip();
        if bindings.len() > target.max_storage_buffers_per_stage as usize {
            return Err(EmitError::TooManyBindings {
                kernel: name,
                count: bindings.len(),
                limit: target.max_storage_buffers_per_stage,
            });
        }
        let key = format!("{writes:?}\n{}", src.wgsl);
        let kernel = match kernel_of.get(&key) {
            Some(&k) => k,
            None => {
                validate_wgsl(&src.wgsl).map_err(|message| EmitError::Invalid {
                    kernel: name.clone(),
                    message,
                })?;
                kernels.push(Kernel {
                    name: name.clone(),
                    wgsl: src.wgsl,
                    entry_point: "main".into(),
                    writes,
                });
                kernel_of.insert(key, kernels.len() - 1);
                kernels.len() - 1
            }
        };
        dispatches.push(Dispatch {
            name,
            kernel,
            bindings,
            workgroups: src.workgroups,
        });
    }
    Ok((kernels, dispatches))
}

/// `003_matmul_blocks_0_attn_q`: dispatch index, anchor op, anchor label.
fn kernel_name(graph: &Graph, index: usize, anchor: NodeId) -> String {
    let node = graph.node(anchor);
    format!(
        "{index:03}_{}_{}",
        node.op.mnemonic(),
        sanitize(&node.label)
    )
}

fn sanitize(label: &str) -> String {
    let s: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    s.chars().take(48).collect()
}

#[cfg(test)]
mod tests;
