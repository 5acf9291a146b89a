//! `moec forward --dump-router DIR`: every MoE block's routing as NumPy files, so that
//! `scripts/megatron_parity.py` can run Megatron-Core's own routing functions on moec's router
//! logits and compare.
//!
//! The values are the reference interpreter's on the same weights and batch as the GPU run (the
//! command checks the GPU's outputs against the interpreter's; the interpreter also holds the
//! intermediate values a fused plan never writes out). Per block `N`, in token order `[B·T]`
//! (batch-major, `t = b·T + s`):
//! - `blockN.input.npy` `[T, dim]` f32: the router's input (after jitter, if any);
//! - `blockN.logits.npy` `[T, E]` f32: `x · Wgᵀ`;
//! - `blockN.probs.npy` `[T, E]` f32: the router probabilities (`P_e` of `aux`);
//! - `blockN.experts.npy` `[T, k]` u32: the selected experts (before capacity);
//! - `blockN.weights.npy` `[T, k]` f32: their gate weights;
//! - `blockN.kept.npy` `[T, k]` u32: 1 where the capacity kept the slot, 0 where it dropped it;
//! - `blockN.load.npy` `[E]` f32: kept slots per expert;
//! - `blockN.{aux,seq_aux,z}.npy` `[1]` f32: each balancing term the spec has (with its
//!   coefficient), `blockN.router_z.npy` (`mean (logsumexp)²`, no coefficient);
//! - with `bias(...)`: `blockN.bias.npy` and `blockN.bias_next.npy` `[E]` (the router state before
//!   and after this batch's update).
//!
//! `router.json` says the shapes: `batch`, `seq`, `experts`, `top_k`, `capacity`, `blocks`.

use miette::{miette, Context, IntoDiagnostic, Result};
use moec_compiler::interp::{self, Value};
use moec_compiler::ir::{Graph, NodeId, Op, RouteLayout};
use moec_compiler::spec::Spec;
use std::collections::HashMap;
use std::path::Path;

/// Writes the routing of every MoE block of `graph` (run on `feeds`) into `dir`.
pub fn dump(
    spec: &Spec,
    graph: &Graph,
    feeds: &HashMap<String, Value>,
    batch: usize,
    dir: &Path,
) -> Result<()> {
    let Some(moe) = &spec.moe else {
        miette::bail!("`{}` has no MoE blocks to dump", spec.name);
    };
    std::fs::create_dir_all(dir)
        .into_diagnostic()
        .wrap_err_with(|| format!("cannot create `{}`", dir.display()))?;
    let values = interp::run(graph, feeds).into_diagnostic()?;
    let labels: HashMap<&str, NodeId> = graph
        .topo_order()
        .into_iter()
        .map(|id| (graph.node(id).label.as_str(), id))
        .collect();
    let node = |label: &str| {
        labels
            .get(label)
            .copied()
            .ok_or_else(|| miette!("the graph has no node `{label}`"))
    };
    let mut capacity = 0;
    for &block in &moe.blocks {
        let p = format!("model.layers.{block}.block_sparse_moe");
        let write = |name: &str, id: NodeId| -> Result<()> {
            let ty = graph.ty(id);
            let path = dir.join(format!("block{block}.{name}.npy"));
            let bytes = match &values[&id] {
                Value::U32(v) => crate::forward::npy_u32(&ty.shape, v),
                other => crate::forward::npy_f32(&ty.shape, &other.to_f32()),
            };
            std::fs::write(&path, bytes)
                .into_diagnostic()
                .wrap_err_with(|| format!("cannot write `{}`", path.display()))
        };
        let gate = node(&format!("{p}.gate"))?;
        let route = node(&format!("{p}.route"))?;
        let combine = node(&format!("{p}.combine"))?;
        write("input", graph.inputs(gate)[0])?;
        write("logits", gate)?;
        write("probs", node(&format!("{p}.probs"))?)?;
        write("experts", graph.inputs(route)[0])?;
        write("weights", graph.inputs(combine)[1])?;
        for term in ["aux", "seq_aux", "z"] {
            if let Ok(id) = node(&format!("{p}.{term}")) {
                write(term, id)?;
            }
        }
        for (output, name) in [
            (format!("moe.{block}.load"), "load"),
            (format!("moe.{block}.router_z"), "router_z"),
            (format!("router_state.{block}.bias.next"), "bias_next"),
        ] {
            if let Some(id) = graph.output(&output) {
                write(name, id)?;
            }
        }
        if let Some((id, _, _)) = graph
            .data_inputs()
            .into_iter()
            .find(|(_, n, _)| *n == format!("router_state.{block}.bias"))
        {
            write("bias", id)?;
        }
        let Op::MoeRoute { layout } = graph.node(route).op else {
            miette::bail!("`{p}.route` is not a routing table");
        };
        capacity = layout.capacity;
        let kept = kept_slots(&layout, &values[&route]);
        let path = dir.join(format!("block{block}.kept.npy"));
        std::fs::write(
            path,
            crate::forward::npy_u32(&[layout.tokens, layout.k], &kept),
        )
        .into_diagnostic()?;
    }
    let manifest = serde_json::json!({
        "model": spec.name,
        "batch": batch,
        "seq": spec.model.context.unwrap_or(1),
        "experts": moe.experts,
        "top_k": moe.top_k,
        "capacity": capacity,
        "blocks": moe.blocks,
    });
    let path = dir.join("router.json");
    std::fs::write(path, format!("{manifest:#}\n")).into_diagnostic()?;
    println!(
        "wrote the routing of {} MoE blocks to {}",
        moe.blocks.len(),
        dir.display()
    );
    Ok(())
}

/// 1 for every token slot the routing table placed in a row, 0 for a dropped one.
fn kept_slots(layout: &RouteLayout, table: &Value) -> Vec<u32> {
    let Value::U32(table) = table else {
        return Vec::new();
    };
    let at = layout.slot_row_at();
    table[at..at + layout.tokens * layout.k]
        .iter()
        .map(|&row| u32::from(row != RouteLayout::NONE))
        .collect()
}
