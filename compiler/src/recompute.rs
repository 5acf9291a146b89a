//! Recompute: activation recomputation as a graph transform on the training graph, before fusion
//! (docs/language.md "The `train` block", `recompute`; docs/DECISIONS.md "Memory planning and
//! recomputation").
//!
//! The chosen regions are label prefixes `lower` gives every block: `model.layers.N.self_attn`
//! (`attention`), `model.layers.N.block_sparse_moe` (`moe`), `model.layers.N` (`block`). In a region,
//! a forward value is *recomputable* when it is computed (not a parameter or input), is not a graph
//! output, and every forward use of it is inside the region; the region's other values (its outputs,
//! such as the block's residual stream) and everything it reads from outside are kept, as the
//! checkpoints. Every backward use of a recomputable value is rewired to a clone (labelled
//! `recompute.<label>`), built from the region's kept inputs by cloning the recomputable values it
//! depends on. The clones are inserted right before the first backward node that needs them, so
//! the forward originals die in the forward pass and the clones live only through their block's
//! backward; the whole-step buffer plan (`emit`) then shares their buffers.
//!
//! Randomness is a graph input (`noise.*`, `jitter.*`), so a clone reads the very values the
//! forward pass read and recomputes identically; so do routing decisions (top-k, routes), which are
//! deterministic functions of their operands. Node ids are renumbered so that creation order stays
//! the schedule (`Graph::topo_order`).

use crate::ir::{Graph, NodeId, Op};
use crate::spec::Recompute;
use std::collections::{HashMap, HashSet};

/// `graph` (a training graph whose first `forward_nodes` nodes are the forward pass, as
/// [`crate::autodiff::differentiate`] builds it) with the activations of `level`'s regions
/// recomputed in the backward pass. `Recompute::None` returns it unchanged.
pub fn recompute(graph: Graph, forward_nodes: usize, level: Recompute) -> Graph {
    if level == Recompute::None {
        return graph;
    }
    let is_forward = |n: NodeId| n.index() < forward_nodes;
    let outputs: HashSet<NodeId> = graph.outputs.iter().map(|(_, id)| *id).collect();
    let region_of: HashMap<NodeId, String> = graph
        .g
        .node_indices()
        .filter(|&n| {
            is_forward(n) && !matches!(graph.node(n).op, Op::Param { .. } | Op::Input { .. })
        })
        .filter_map(|n| region(&graph.node(n).label, level).map(|r| (n, r)))
        .collect();
    let recomputable: HashSet<NodeId> = region_of
        .iter()
        .filter(|(&n, r)| {
            !outputs.contains(&n)
                && graph
                    .users(n)
                    .into_iter()
                    .filter(|&u| is_forward(u))
                    .all(|u| region_of.get(&u) == Some(*r))
        })
        .map(|(&n, _)| n)
        .collect();

    let mut out = Graph::new();
    let mut new_of: HashMap<NodeId, NodeId> = HashMap::new();
    let mut clone_of: HashMap<NodeId, NodeId> = HashMap::new();
    for n in graph.topo_order() {
        if !is_forward(n) {
            for a in graph.inputs(n) {
                if recomputable.contains(&a) {
                    emit_clone(&graph, &recomputable, a, &new_of, &mut clone_of, &mut out);
                }
            }
        }
        let arg = |a: NodeId| {
            if !is_forward(n) && recomputable.contains(&a) {
                clone_of[&a]
            } else {
                new_of[&a]
            }
        };
        let args: Vec<NodeId> = graph.inputs(n).into_iter().map(arg).collect();
        let id = copy_node(&mut out, graph.node(n).clone(), &args);
        new_of.insert(n, id);
    }
    out.outputs = graph
        .outputs
        .iter()
        .map(|(name, id)| (name.clone(), new_of[id]))
        .collect();
    out
}

/// Clones recomputable `x` and the recomputable values it depends on (once each, dependencies
/// first); kept values are read from the forward originals.
fn emit_clone(
    graph: &Graph,
    recomputable: &HashSet<NodeId>,
    x: NodeId,
    new_of: &HashMap<NodeId, NodeId>,
    clone_of: &mut HashMap<NodeId, NodeId>,
    out: &mut Graph,
) {
    // Iterative post-order: a node is cloned after all its recomputable inputs.
    let mut stack = vec![(x, false)];
    while let Some((n, ready)) = stack.pop() {
        if clone_of.contains_key(&n) {
            continue;
        }
        let inputs = graph.inputs(n);
        if !ready {
            stack.push((n, true));
            for &a in inputs.iter().rev() {
                if recomputable.contains(&a) && !clone_of.contains_key(&a) {
                    stack.push((a, false));
                }
            }
            continue;
        }
        let args: Vec<NodeId> = inputs
            .iter()
            .map(|a| clone_of.get(a).copied().unwrap_or_else(|| new_of[a]))
            .collect();
        let mut node = graph.node(n).clone();
        node.label = format!("recompute.{}", node.label);
        let id = copy_node(out, node, &args);
        clone_of.insert(n, id);
    }
}

/// Adds an already type-checked node with its arguments in slot order.
fn copy_node(out: &mut Graph, node: crate::ir::Node, args: &[NodeId]) -> NodeId {
    let id = out.g.add_node(node);
    for (slot, &a) in args.iter().enumerate() {
        out.g.add_edge(a, id, slot);
    }
    id
}

/// The region of a forward node's label at `level`: `model.layers.N` plus, for `attention` and `moe`,
/// the sub-layer; `None` outside every region.
fn region(label: &str, level: Recompute) -> Option<String> {
    let rest = label.strip_prefix("model.layers.")?;
    let digits = rest.find(|c: char| !c.is_ascii_digit())?;
    let (block, rest) = rest.split_at(digits);
    let rest = rest.strip_prefix('.')?;
    if block.is_empty() {
        return None;
    }
    let sub = match level {
        Recompute::None => return None,
        Recompute::Block => return Some(format!("model.layers.{block}")),
        Recompute::Attention => "self_attn",
        Recompute::Moe => "block_sparse_moe",
    };
    rest.strip_prefix(sub)
        .filter(|r| r.starts_with('.'))
        .map(|_| format!("model.layers.{block}.{sub}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_follow_the_block_labels() {
        let l = "model.layers.12.self_attn.q_proj";
        assert_eq!(
            region(l, Recompute::Attention).as_deref(),
            Some("model.layers.12.self_attn")
        );
        assert_eq!(region(l, Recompute::Moe), None);
        assert_eq!(
            region(l, Recompute::Block).as_deref(),
            Some("model.layers.12")
        );
        assert_eq!(
            region("model.layers.3.block_sparse_moe.gate", Recompute::Moe).as_deref(),
            Some("model.layers.3.block_sparse_moe")
        );
        assert_eq!(region("model.norm.scale", Recompute::Block), None);
        assert_eq!(region("model.layers.x.foo", Recompute::Block), None);
        assert_eq!(
            region("model.layers.1.self_attnx.q", Recompute::Attention),
            None
        );
    }
}
