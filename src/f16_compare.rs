//! How `moec forward` compares an f16 plan (`precision = f16`) with the interpreter's f16 mode.
//!
//! The interpreter rounds every value the graph stores in f16, while a fused kernel keeps its inner
//! values in f32 registers, so the two differ by a few f16 ulps (2⁻¹¹ relative) wherever f16 is
//! stored, and the differences add up through the layers. The tolerance is therefore grad_gpu.rs's
//! f16 one, per output: |gpu − ref| ≤ 2⁻⁶·|ref| + 2⁻⁷·max|ref| (f32 plans keep the 1e-3 relative
//! check).
//!
//! A token whose top-k router scores are that close to a tie may be routed to other experts on the
//! GPU, which changes its rows completely: the routing is sensitive there, not a kernel wrong. So
//! per-token outputs (`logits`, router logits) are compared only on rows no such token can reach
//! ([`stable_rows`]); scalars and per-expert outputs (losses, loads) are compared in full, since a
//! few tokens move them by far less than the tolerance.

use moec_compiler::interp::Value;
use moec_compiler::ir::{Graph, NodeId, Op};
use std::collections::HashMap;

/// Largest |gpu − ref| / (2⁻⁶·|ref| + 2⁻⁷·max|ref|) over the compared elements (module doc); at
/// most 1 passes. With `stable`, the output has `stable.len()` rows and only the stable ones count.
pub fn excess(gpu: &[f32], reference: &[f32], stable: Option<&[bool]>) -> f32 {
    let width = stable.map_or(reference.len().max(1), |s| reference.len() / s.len().max(1));
    let kept = |i: usize| stable.is_none_or(|s| s.get(i / width.max(1)).copied().unwrap_or(false));
    let scale = reference
        .iter()
        .enumerate()
        .filter(|&(i, _)| kept(i))
        .fold(0.0f32, |m, (_, r)| m.max(r.abs()));
    gpu.iter()
        .zip(reference)
        .enumerate()
        .filter(|&(i, _)| kept(i))
        .map(|(_, (g, r))| {
            let tol = r.abs() / 64.0 + scale / 128.0;
            if tol > 0.0 {
                (g - r).abs() / tol
            } else if g == r {
                0.0
            } else {
                f32::INFINITY
            }
        })
        .fold(0.0, f32::max)
}

/// Which token rows the GPU and the interpreter must agree on, from the interpreter's `values`
/// (every node's): a row is unsafe when, in some MoE layer, its top-k selection margin (the k-th
/// minus the next score) is below 2⁻⁷ of that layer's largest score magnitude, the tolerance's
/// floor: a score error the check would accept could flip its routing. In a causal model a sequence's rows before its first unsafe row are stable (the rows
/// after it attend to that token); in a bidirectional one all of a sequence's rows or none. When
/// routing couples tokens (capacity drops, expert choice, auction: one token's choice moves
/// another's) an unsafe row anywhere makes every row unstable, and expert choice and auction
/// (whose margins are not per token) make every row unstable. `None` for a graph without top-k
/// routing: all rows compare.
pub fn stable_rows(
    graph: &Graph,
    values: &HashMap<NodeId, Value>,
    sequences: usize,
    causal: bool,
) -> Option<Vec<bool>> {
    let mut unsafe_rows: Option<Vec<bool>> = None;
    let mut coupled = false;
    let mut unknown = false;
    for id in graph.g.node_indices() {
        match &graph.node(id).op {
            Op::TopK { k } => {
                let x = graph.inputs(id)[0];
                let experts = graph.ty(x).last().max(1);
                let scores = values.get(&x)?.to_f32();
                let rows = scores.len() / experts;
                let flags = unsafe_rows.get_or_insert_with(|| vec![false; rows]);
                if flags.len() != rows {
                    unknown = true;
                    continue;
                }
                let delta = scores.iter().fold(0.0f32, |m, s| m.max(s.abs())) / 128.0;
                for (flag, row) in flags.iter_mut().zip(scores.chunks_exact(experts)) {
                    *flag |= margin(row, *k) < delta;
                }
            }
            Op::ExpertChoice { .. } | Op::Auction { .. } => unknown = true,
            Op::MoeRoute { layout } => coupled |= layout.capacity < layout.tokens * layout.k,
            // Routing decided elsewhere, or not routing at all.
            Op::Input { .. }
            | Op::Param { .. }
            | Op::Affine { .. }
            | Op::Unary(_)
            | Op::Binary(_)
            | Op::Reduce(_)
            | Op::Reshape { .. }
            | Op::Permute { .. }
            | Op::MatMul { .. }
            | Op::Embedding
            | Op::Rope { .. }
            | Op::Softmax { .. }
            | Op::CrossEntropy
            | Op::LinearCrossEntropy
            | Op::SliceRows { .. }
            | Op::ConcatRows
            | Op::GatherCols
            | Op::TopKMask { .. }
            | Op::SliceCols { .. }
            | Op::RouteLoad { .. }
            | Op::Sinkhorn { .. }
            | Op::MoeGather { .. }
            | Op::GroupedMatMul { .. }
            | Op::MoeCombine { .. }
            | Op::SumTo { .. }
            | Op::BroadcastTo { .. }
            | Op::EmbeddingGrad { .. }
            | Op::RopeGrad { .. }
            | Op::CrossEntropyGrad
            | Op::LinearCrossEntropyGradH
            | Op::LinearCrossEntropyGradW
            | Op::ScatterCols { .. }
            | Op::MoeGatherGrad { .. }
            | Op::GroupedMatMulGradX { .. }
            | Op::GroupedMatMulGradW { .. }
            | Op::MoeCombineGradRows { .. }
            | Op::MoeCombineGradWeights { .. }
            | Op::LstmScan { .. }
            | Op::LstmHidden
            | Op::LstmScanGrad { .. }
            | Op::LstmScanGradW { .. }
            | Op::LstmLast { .. }
            | Op::LstmLastGrad { .. } => {}
        }
    }
    let unsafe_rows = unsafe_rows?;
    let any_unsafe = unsafe_rows.iter().any(|&u| u);
    if unknown || (coupled && any_unsafe) {
        return Some(vec![false; unsafe_rows.len()]);
    }
    let len = if sequences > 0 && unsafe_rows.len() % sequences == 0 {
        unsafe_rows.len() / sequences
    } else {
        1
    };
    let mut stable = Vec::with_capacity(unsafe_rows.len());
    for seq in unsafe_rows.chunks(len.max(1)) {
        let first_unsafe = seq.iter().position(|&u| u).unwrap_or(seq.len());
        let kept = if causal || first_unsafe == seq.len() {
            first_unsafe
        } else {
            0
        };
        stable.extend((0..seq.len()).map(|i| i < kept));
    }
    Some(stable)
}

/// The k-th largest score minus the next one (infinite when every score is selected).
fn margin(row: &[f32], k: usize) -> f32 {
    if k == 0 || k >= row.len() {
        return f32::INFINITY;
    }
    let mut sorted = row.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    sorted[k - 1] - sorted[k]
}

/// Whether an output of `shape` holds one row per token of the `rows` (a leading run of axes whose
/// product is `rows`): those are compared on stable rows only.
pub fn is_per_token(shape: &[usize], rows: usize) -> bool {
    shape.len() > 1
        && shape
            .iter()
            .scan(1usize, |p, &d| {
                *p *= d;
                Some(*p)
            })
            .take(shape.len() - 1)
            .any(|p| p == rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use moec_compiler::ir::TensorType;

    /// Scores `[rows, 3]` into a top-2: rows 1 and 4 are near a tie (margin 1e-4 of scale 1).
    fn graph_and_values() -> (Graph, HashMap<NodeId, Value>) {
        let mut g = Graph::new();
        let x = g.input("scores", TensorType::f32(&[6, 3]));
        g.add(Op::TopK { k: 2 }, &[x], "topk").unwrap();
        let mut scores = Vec::new();
        for r in 0..6 {
            let tie = if r == 1 || r == 4 { 1e-4 } else { 0.2 };
            scores.extend([1.0, 0.5, 0.5 - tie]);
        }
        (g, HashMap::from([(x, Value::F32(scores))]))
    }

    #[test]
    fn rows_after_a_near_tie_in_their_sequence_are_not_compared() {
        let (g, values) = graph_and_values();
        // Two causal sequences of 3: rows 0 | 3 stay; 1, 2 and 4, 5 follow a near tie.
        let causal = stable_rows(&g, &values, 2, true).unwrap();
        assert_eq!(causal, [true, false, false, true, false, false]);
        // Bidirectional: a sequence with a near tie is left out whole.
        let both = stable_rows(&g, &values, 2, false).unwrap();
        assert_eq!(both, [false; 6]);
        // Without top-k there is nothing to guard.
        assert_eq!(stable_rows(&Graph::new(), &HashMap::new(), 2, true), None);
    }

    #[test]
    fn the_f16_tolerance_scales_with_each_output_and_skips_unstable_rows() {
        let reference = [1.0, -2.0, 0.0, 4.0];
        // 2⁻⁶·|ref| + 2⁻⁷·4: 0.0469 at 1.0, within; 0.04 off at 0.0 (tol 0.03125): 1.28.
        assert!(excess(&[1.04, -2.0, 0.0, 4.0], &reference, None) <= 1.0);
        let off = excess(&[1.0, -2.0, 0.04, 4.0], &reference, None);
        assert!((off - 1.28).abs() < 1e-4, "{off}");
        // Rows of two: the second row (0.0, 4.0) is left out, the scale is the first row's.
        let rows = [true, false];
        assert_eq!(excess(&[1.0, -2.0, 9.0, 9.0], &reference, Some(&rows)), 0.0);
        assert!(is_per_token(&[2, 8, 32], 16) && is_per_token(&[16, 32], 16));
        assert!(!is_per_token(&[16], 16) && !is_per_token(&[4], 16));
    }
}
