//! Horizontal matmul kernels (`fuse/horizontal.rs`): the products `A · B_p` of one A operand, stacked
//! as the batch axis of one matmul. Batch `p`'s B elements are read by `hb(bi, i)` from product `p`'s
//! weight (`i` runs over the stacked `[P, K, N]` weights) and `store(lin, acc)` writes product
//! `p`'s output, so both matmul schedules run unchanged: a workgroup computes one block of one
//! product, and A's batch offset is 0 for every product.

use super::frame::{Access, Binder, Load, Stacked};
use crate::fuse::Group;
use crate::ir::{Graph, NodeId, Op};
use std::fmt::Write;

/// What a horizontal group changes in its matmul kernel.
pub(crate) struct Horizontal {
    /// Products stacked on the batch axis.
    pub batch: usize,
    /// B's batch offset: product `bi`'s weights start at `bi · K · N` of the stacked index.
    pub b_batch: String,
    /// B read through `hb`.
    pub load: Load,
    /// WGSL functions `hb(bi, i)` and `store(lin, acc)`.
    pub funcs: String,
}

/// The products of `group` when it is horizontal (several `MatMul` members), in member order.
fn products(graph: &Graph, group: &Group) -> Vec<NodeId> {
    let mms: Vec<NodeId> = group
        .nodes
        .iter()
        .copied()
        .filter(|&n| matches!(graph.node(n).op, Op::MatMul { .. }))
        .collect();
    if mms.len() > 1 {
        mms
    } else {
        Vec::new()
    }
}

/// The horizontal form of `group`'s matmul (`[M, K] · B` with `N` output columns), or `None` for a
/// single product.
pub(crate) fn horizontal(
    graph: &Graph,
    group: &Group,
    b: &mut Binder,
    (m, k, n): (usize, usize, usize),
) -> Option<Horizontal> {
    let products = products(graph, group);
    if products.is_empty() {
        return None;
    }
    let (kn, mn) = (k * n, m * n);
    let mut parts: Vec<Access> = Vec::new();
    let mut store = String::from("fn store(lin: u32, acc: f32) {\n");
    for (p, &mm) in products.iter().enumerate() {
        let w = b.read(graph.inputs(mm)[1]);
        parts.push(b.access(&w));
        let out = b.write(mm);
        let oi = format!("lin - {}u", p * mn);
        if p + 1 < products.len() {
            let _ = writeln!(
                store,
                "    if (lin < {}u) {{\n        {}\n        return;\n    }}",
                (p + 1) * mn,
                b.put(&out, &oi, "acc")
            );
        } else {
            let _ = writeln!(store, "    {}\n}}\n", b.put(&out, &oi, "acc"));
        }
    }
    let stacked = Stacked {
        name: "hb".into(),
        parts,
        stride: kn,
    };
    let hb = stacked.function("hb", "f32", &stacked.parts, 1);
    Some(Horizontal {
        batch: products.len(),
        b_batch: format!("bi * {kn}u"),
        load: Load::Stacked(stacked),
        funcs: hb + &store,
    })
}
