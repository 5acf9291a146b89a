//! Head legalization: the fused LM head and loss ([`Op::LinearCrossEntropy`] and its adjoints
//! [`Op::LinearCrossEntropyGradH`] / [`Op::LinearCrossEntropyGradW`]) become a loop over chunks of
//! token rows made of ordinary ops, so the `[tokens, vocab]` logits never exist whole.
//!
//! A graph-to-graph pass between autodiff and fusion (docs/DECISIONS.md "Chunked LM head and
//! loss"). For chunk `i` of rows `start..start + len`:
//! - forward: `logits_i = h[rows] · wᵀ` (`[len, V]`), `ce_i = CrossEntropy(logits_i, t[rows])`,
//!   and `ce = Σ_i ce_i · len / N` (each chunk's mean weighted by its share of the rows);
//! - backward (both adjoints in one loop, sharing the chunk's logits): the logits are recomputed,
//!   `G_i = CrossEntropyGrad(logits_i, t[rows], g · len / N)` (= `(softmax − onehot) · g / N`),
//!   `dh[rows] = G_i · w` (the chunks stacked with `ConcatRows`) and `dw = Σ_i G_iᵀ · h[rows]`
//!   (the transpose is read in place by the matmul and the sum is its epilogue).
//!
//! The rebuilt graph lists every chunk's nodes after the previous chunk's, so kernels run chunk by
//! chunk and a chunk's `[len, V]` buffers are free (and reused by exact size) before the next
//! chunk's are allocated: the head's scratch is two `[len, V]` buffers (logits and their adjoint),
//! whatever the token count. The backward recomputes the logits instead of keeping them, which
//! costs one more `[N, D] · [D, V]` matmul per step.
//!
//! The chunk size comes from the target ([`chunk_rows`]); the interpreter runs the fused ops
//! unchunked, which is what the chunked kernels are tested against.
//!
//! In a graph that stores anything in f16 (`precision = f16`, [`uses_f16`]) the chunks' logits and
//! their adjoint are stored in f16, as a matmul output and its gradient are under autocast and in
//! Liger-Kernel's fused linear cross-entropy: the cross-entropy kernels widen them and compute the
//! log-softmax, the loss and the adjoint in f32 (docs/language.md `precision = f16`: "Softmax and
//! loss are computed in f32"), and the head's input `h`, its weight and `dw` stay f32. It halves
//! the head's scratch, the one activation buffer pair whose size does not depend on the recompute
//! level. The interpreter's f16 mode rounds the fused ops' logits and adjoint the same way.

use crate::ir::{BinaryOp, DType, Graph, IrError, NodeId, Op};
use crate::precision::uses_f16;
use crate::target::Target;
use std::collections::HashMap;

/// Most bytes one `[rows, V]` chunk of logits takes, below the adapter's binding limit: the memory
/// budget of the head's scratch (two such buffers), small next to a model that needs a chunked head.
pub const CHUNK_BYTES: u64 = 64 << 20;

/// Token rows per chunk for `vocab` logits per row over `tokens` rows: as many as fit the target's
/// storage binding and [`CHUNK_BYTES`], in whole 32-row matmul tiles when more than one fits.
pub fn chunk_rows(target: &Target, vocab: usize, tokens: usize) -> usize {
    let bytes = target.max_storage_binding_size.min(CHUNK_BYTES);
    let rows = (bytes / (vocab.max(1) as u64 * 4)) as usize;
    let rows = if rows > 32 { rows / 32 * 32 } else { rows };
    rows.clamp(1, tokens.max(1))
}

/// `graph` with every fused head legalized for `target` ([`chunk_rows`]); a graph without one is
/// returned as it is.
pub fn legalize(graph: &Graph, target: &Target) -> Result<Graph, IrError> {
    rebuild(graph, &|vocab, tokens| chunk_rows(target, vocab, tokens))
}

/// `graph` with every fused head legalized in chunks of `rows` token rows (the last one shorter
/// when `rows` does not divide the tokens).
pub fn legalize_in_chunks(graph: &Graph, rows: usize) -> Result<Graph, IrError> {
    rebuild(graph, &|_, tokens| rows.clamp(1, tokens.max(1)))
}

/// What [`rebuild`] does with a node of the source graph.
#[derive(Clone, Copy, PartialEq)]
enum Expand {
    /// The fused forward head: a loop over chunks ([`Chunks::forward`]).
    Forward,
    /// One of the fused head's adjoints: expanded with its partner in one loop ([`Chunks::backward`]).
    Adjoint,
    /// Any other op: copied as it is.
    Copy,
}

/// How `op` is rebuilt; every op names its case, so a new op decides whether it is a fused head.
fn expand(op: &Op) -> Expand {
    match op {
        Op::LinearCrossEntropy => Expand::Forward,
        Op::LinearCrossEntropyGradH | Op::LinearCrossEntropyGradW => Expand::Adjoint,
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
        | Op::SliceRows { .. }
        | Op::ConcatRows
        | Op::TopK { .. }
        | Op::GatherCols
        | Op::TopKMask { .. }
        | Op::MoeRoute { .. }
        | Op::SliceCols { .. }
        | Op::RouteLoad { .. }
        | Op::ExpertChoice { .. }
        | Op::Sinkhorn { .. }
        | Op::Auction { .. }
        | Op::MoeGather { .. }
        | Op::GroupedMatMul { .. }
        | Op::MoeCombine { .. }
        | Op::SumTo { .. }
        | Op::BroadcastTo { .. }
        | Op::EmbeddingGrad { .. }
        | Op::RopeGrad { .. }
        | Op::CrossEntropyGrad
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
        | Op::LstmLastGrad { .. } => Expand::Copy,
    }
}

/// Copies `graph` node by node in topological order, expanding the fused head ops in place.
fn rebuild(graph: &Graph, rows_for: &dyn Fn(usize, usize) -> usize) -> Result<Graph, IrError> {
    if !graph
        .g
        .node_weights()
        .any(|n| expand(&n.op) != Expand::Copy)
    {
        return Ok(graph.clone());
    }
    let f16 = uses_f16(graph);
    let mut halves = Vec::new();
    let mut out = Graph::new();
    let mut map: HashMap<NodeId, NodeId> = HashMap::new();
    for id in graph.topo_order() {
        if map.contains_key(&id) {
            continue; // the second adjoint of a pair, expanded with the first
        }
        let node = graph.node(id);
        let old_args = graph.inputs(id);
        let args: Vec<NodeId> = old_args.iter().map(|a| map[a]).collect();
        match expand(&node.op) {
            Expand::Forward => {
                let ce = Chunks::new(graph, &old_args, rows_for, f16, &mut out, &mut halves)
                    .forward(&args, &node.label)?;
                map.insert(id, ce);
            }
            Expand::Adjoint => {
                // Both adjoints of one forward op share their operands; run them as one loop.
                let pair: Vec<NodeId> = graph
                    .users(old_args[0])
                    .into_iter()
                    .filter(|&u| {
                        expand(&graph.node(u).op) == Expand::Adjoint && graph.inputs(u) == old_args
                    })
                    .collect();
                let find =
                    |want: fn(&Op) -> bool| pair.iter().copied().find(|&u| want(&graph.node(u).op));
                let dh_old = find(|op| matches!(op, Op::LinearCrossEntropyGradH));
                let dw_old = find(|op| matches!(op, Op::LinearCrossEntropyGradW));
                let prefix = node.label.rsplit_once('.').map_or(&node.label[..], |p| p.0);
                let (dh, dw) = Chunks::new(graph, &old_args, rows_for, f16, &mut out, &mut halves)
                    .backward(&args, dh_old.is_some(), dw_old.is_some(), prefix)?;
                for (old, new) in [(dh_old, dh), (dw_old, dw)] {
                    if let (Some(old), Some(new)) = (old, new) {
                        map.insert(old, new);
                    }
                }
            }
            Expand::Copy => {
                let new = out.g.add_node(node.clone());
                for (slot, &a) in args.iter().enumerate() {
                    out.g.add_edge(a, new, slot);
                }
                map.insert(id, new);
            }
        }
    }
    for x in halves {
        out.g[x].ty.dtype = DType::F16;
    }
    out.outputs = graph
        .outputs
        .iter()
        .map(|(name, id)| (name.clone(), map[id]))
        .collect();
    Ok(out)
}

/// How [`Chunks::fold`] puts the chunks' parts together.
enum Fold {
    /// Summed (`Binary(Add)`): a loss or a weight's adjoint over all rows.
    Sum,
    /// Stacked (`ConcatRows`): a per-row adjoint.
    Stack,
}

/// The graph being rebuilt and the chunking of one fused head over `n` token rows.
struct Chunks<'g> {
    g: &'g mut Graph,
    n: usize,
    rows: usize,
    /// Logits and their adjoint stored in f16 (module doc).
    f16: bool,
    /// The values to store in f16, marked once the graph is built: the builder's type inference
    /// (like every pass before `precision::mark_f16`) wants f32 operands.
    halves: &'g mut Vec<NodeId>,
}

impl<'g> Chunks<'g> {
    /// The chunking of a fused head op of `graph` with operands `h[N, D]`, `w[V, D]`, ...: N rows
    /// of V logits, `rows_for(V, N)` rows per chunk.
    fn new(
        graph: &Graph,
        old_args: &[NodeId],
        rows_for: &dyn Fn(usize, usize) -> usize,
        f16: bool,
        g: &'g mut Graph,
        halves: &'g mut Vec<NodeId>,
    ) -> Self {
        let (n, v) = (
            graph.ty(old_args[0]).shape[0],
            graph.ty(old_args[1]).shape[0],
        );
        Chunks {
            g,
            n,
            rows: rows_for(v, n),
            f16,
            halves,
        }
    }

    /// `x`, to be stored in f16 in an f16 graph.
    fn stored(&mut self, x: NodeId) -> NodeId {
        if self.f16 {
            self.halves.push(x);
        }
        x
    }

    /// `(index, start, len)` of every chunk.
    fn each(&self) -> Vec<(usize, usize, usize)> {
        (0..self.n)
            .step_by(self.rows)
            .enumerate()
            .map(|(i, start)| (i, start, self.rows.min(self.n - start)))
            .collect()
    }

    /// Rows `start..start + len` of `x` (`x` itself when that is all of it).
    fn rows_of(
        &mut self,
        x: NodeId,
        start: usize,
        len: usize,
        label: String,
    ) -> Result<NodeId, IrError> {
        if len == self.n {
            return Ok(x);
        }
        self.g.add(Op::SliceRows { start, len }, &[x], label)
    }

    /// `x · len / N`: a chunk's share of a mean over all rows (`x` itself for a single chunk).
    fn share(&mut self, x: NodeId, len: usize, label: String) -> Result<NodeId, IrError> {
        if len == self.n {
            return Ok(x);
        }
        let mul = (len as f64 / self.n as f64) as f32;
        self.g.add(Op::Affine { mul, add: 0.0 }, &[x], label)
    }

    /// `acc ∘ part`, or `part` for the first chunk. A sum is built as `part + acc`: fusion joins an
    /// elementwise node to its first operand's group, so chunk `i`'s `dw_sum` becomes the epilogue
    /// of chunk `i`'s own `dw` matmul and only two `[V, D]` partial sums are ever live. As
    /// `acc + part`, every sum joined chunk 0's matmul, which then ran last with all the chunks'
    /// `[V, D]` partials live (three extra `[V, D]` f32 buffers on the seed-sized spec).
    fn fold(
        &mut self,
        acc: Option<NodeId>,
        part: NodeId,
        fold: Fold,
        label: String,
    ) -> Result<NodeId, IrError> {
        let Some(acc) = acc else {
            return Ok(part);
        };
        let (op, args) = match fold {
            Fold::Stack => (Op::ConcatRows, [acc, part]),
            Fold::Sum => (Op::Binary(BinaryOp::Add), [part, acc]),
        };
        self.g.add(op, &args, label)
    }

    /// The chunk's `(h rows, target rows, logits)`.
    fn logits(
        &mut self,
        args: &[NodeId],
        start: usize,
        len: usize,
        l: &dyn Fn(&str) -> String,
    ) -> Result<(NodeId, NodeId, NodeId), IrError> {
        let h = self.rows_of(args[0], start, len, l("h"))?;
        let t = self.rows_of(args[2], start, len, l("targets"))?;
        let logits = self
            .g
            .add(Op::MatMul { trans_b: true }, &[h, args[1]], l("logits"))?;
        Ok((h, t, self.stored(logits)))
    }

    /// `LinearCrossEntropy(h, w, targets)` as the weighted sum of the chunks' mean losses.
    fn forward(&mut self, args: &[NodeId], label: &str) -> Result<NodeId, IrError> {
        let mut ce = None;
        for (i, start, len) in self.each() {
            let l = |part: &str| format!("{label}.chunk{i}.{part}");
            let (_, t, logits) = self.logits(args, start, len, &l)?;
            let part = self.g.add(Op::CrossEntropy, &[logits, t], l("ce"))?;
            let part = self.share(part, len, l("share"))?;
            ce = Some(self.fold(ce, part, Fold::Sum, l("sum"))?);
        }
        Ok(ce.expect("a fused head has at least one row"))
    }

    /// The adjoints `(dh, dw)` of `LinearCrossEntropy(h, w, targets)` under `g` (`args` =
    /// `h, w, targets, g`), each only when wanted.
    fn backward(
        &mut self,
        args: &[NodeId],
        want_h: bool,
        want_w: bool,
        label: &str,
    ) -> Result<(Option<NodeId>, Option<NodeId>), IrError> {
        let (mut dh, mut dw) = (None, None);
        for (i, start, len) in self.each() {
            let l = |part: &str| format!("{label}.chunk{i}.{part}");
            let (h, t, logits) = self.logits(args, start, len, &l)?;
            let g = self.share(args[3], len, l("seed"))?;
            let dlogits = self
                .g
                .add(Op::CrossEntropyGrad, &[logits, t, g], l("dlogits"))?;
            let dlogits = self.stored(dlogits);
            if want_h {
                let part =
                    self.g
                        .add(Op::MatMul { trans_b: false }, &[dlogits, args[1]], l("dh"))?;
                dh = Some(self.fold(dh, part, Fold::Stack, l("dh_rows"))?);
            }
            if want_w {
                let gt =
                    self.g
                        .add(Op::Permute { perm: vec![1, 0] }, &[dlogits], l("dlogits_t"))?;
                let gt = self.stored(gt);
                let part = self
                    .g
                    .add(Op::MatMul { trans_b: false }, &[gt, h], l("dw"))?;
                dw = Some(self.fold(dw, part, Fold::Sum, l("dw_sum"))?);
            }
        }
        Ok((dh, dw))
    }
}
