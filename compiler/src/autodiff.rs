//! Autodiff: a graph-to-graph pass (docs/DECISIONS.md, "Architecture") that appends the backward pass to a forward graph.
//!
//! [`differentiate`] returns ONE graph: the forward graph unchanged (same node ids, same outputs) plus
//! backward nodes built from the IR's ordinary ops and its gradient ops, so fusion, planning and
//! emission treat the backward pass exactly as the forward pass. There is no runtime tape.
//!
//! # Interface with the runtime
//! - The seed is a new `Input` named [`SEED`] (`grad_seed`, f32`[1]`): the adjoint of the loss. The
//!   runtime writes `1.0` for a plain step, `1/accumulate` under gradient accumulation (so summed
//!   micro-step gradients are the mean), or the loss scale under f16 loss scaling. Every gradient is
//!   linear in the seed.
//! - For every `Param` whose value reaches the loss through differentiable edges, an output
//!   `grad.<param name>` with the parameter's shape. A parameter that does not reach the loss (or only
//!   through non-differentiable edges) gets NO output: its gradient is identically zero, and the
//!   optimizer skips it (weight decay aside). Each `grad.*` output is its own node, never a node that
//!   is already an output, an input or a parameter (an identity `Affine` is added if needed), so every
//!   output name owns one buffer.
//!
//! # What is differentiated
//! Gradients flow through every f32 edge of every forward op except: `TopK`, `TopKMask`, `MoeRoute`,
//! `ExpertChoice`, `Sinkhorn`, `Auction` (selection itself is not differentiated; gradients reach the
//! router through the gate weights of the selected experts, `GatherCols`/`ScatterCols`, and through
//! balancing losses; `Sinkhorn` is thus a stop-gradient), u32 operands (ids, targets,
//! routing tables), `Step` and `Ge` (their derivative is 0 almost everywhere). Ties follow the forward
//! conventions: `Max(x, y)` sends the gradient to `x` where `x ≥ y`; `Reduce(Max)` sends it to every
//! element equal to the row max. The gradient ops themselves (second order) are not differentiated,
//! except `SumTo`/`BroadcastTo`, which are each other's adjoint, and `ScatterCols`, whose adjoint is
//! `GatherCols` (lowering uses it forward to build dense gate matrices). `LinearCrossEntropy` gets the
//! pair `LinearCrossEntropyGradH`/`GradW` on the same operands, which `head::legalize` later runs as
//! one chunked loop; `SliceRows` and `ConcatRows` only appear after autodiff (that legalization) and
//! have no adjoint.
//!
//! # Shape of the backward graph
//! A reverse topological sweep over the nodes that both depend on a parameter and reach the loss;
//! several uses of a value sum their gradients with `Binary(Add)`. Adjoints reuse forward values (the
//! output `y` where that is cheaper: `Exp`, `Sigmoid`, `Tanh`, `Rsqrt`, `Softmax`...) instead of
//! recomputing them, skip identities (`SumTo`/`BroadcastTo` to the same shape, `Affine` by 1), and
//! compute only the operands' gradients that are needed. Two choices keep it fusable:
//! - the adjoint of `Reduce(Sum | Mean)` is left un-broadcast (`[..., 1]`) while its consumers are
//!   elementwise, which broadcast for free; a `BroadcastTo` is added only before an op that needs the
//!   full shape (`Reshape`, `Permute`, matmuls...) and for a parameter's output;
//! - a `SumTo` that only sums the last axis is emitted as `Reduce(Sum)`, which fuses with the
//!   elementwise ops feeding it (RMSNorm, softmax-renorm and z-loss adjoints).
//!
//! Constants are f32 as everywhere in the IR (`Affine { mul }`): the `Reduce(Mean)` adjoint scales by
//! f32(1/n), exact when n is a power of two. Backward nodes are labelled `grad.<forward label>[.part]`.

use crate::ir::{
    BinaryOp, DType, Graph, InputRole, IrError, Node, NodeId, Op, ReduceOp, RouteLayout,
    TensorType, UnaryOp,
};
use std::collections::{HashMap, HashSet};

/// Name of the seed input: the adjoint of the loss, f32`[1]` (see the module doc).
pub const SEED: &str = "grad_seed";

/// Prefix of the gradient outputs: `grad.<param name>`.
pub const GRAD_PREFIX: &str = "grad.";

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AutodiffError {
    #[error("the graph has no output named `{0}` to differentiate")]
    NoLoss(String),
    #[error("the loss `{name}` must be a one-element f32 tensor, got {ty}")]
    LossNotScalar { name: String, ty: TensorType },
    #[error("the graph already has an input named `{SEED}`")]
    SeedTaken,
    #[error("`{label}` ({op}) lies between a parameter and the loss but has no adjoint")]
    NotDifferentiable { label: String, op: String },
    #[error(transparent)]
    Ir(#[from] IrError),
}

/// The training graph of a lowered forward graph: [`differentiate`] with respect to its `loss` output.
pub fn training_graph(forward: &Graph) -> Result<Graph, AutodiffError> {
    differentiate(forward, "loss")
}

/// `forward` plus the backward pass of its output `loss`: outputs `grad.<param>` (see the module doc).
pub fn differentiate(forward: &Graph, loss: &str) -> Result<Graph, AutodiffError> {
    let loss_id = forward
        .output(loss)
        .ok_or_else(|| AutodiffError::NoLoss(loss.into()))?;
    let loss_ty = forward.ty(loss_id).clone();
    if loss_ty.dtype != DType::F32 || loss_ty.numel() != 1 {
        return Err(AutodiffError::LossNotScalar {
            name: loss.into(),
            ty: loss_ty,
        });
    }
    if forward
        .data_inputs()
        .iter()
        .any(|(_, name, _)| name == SEED)
    {
        return Err(AutodiffError::SeedTaken);
    }
    let order = forward.topo_order();
    let needed = needs_grad(forward, &order, loss_id);

    let mut b = Backward {
        g: forward.clone(),
        adj: HashMap::new(),
        needed,
    };
    let mut seed =
        b.g.input_as(SEED, InputRole::LossSeed, TensorType::f32(&[1]));
    if loss_ty.shape != [1] {
        seed = b.g.add(
            Op::Reshape {
                shape: loss_ty.shape.clone(),
            },
            &[seed],
            "grad.seed",
        )?;
    }
    if b.needed.contains(&loss_id) {
        b.adj.insert(loss_id, seed);
    }
    for &id in order.iter().rev() {
        if !b.needed.contains(&id) {
            continue;
        }
        if let Some(&g) = b.adj.get(&id) {
            b.node(id, g)?;
        }
    }

    for (id, name, ty) in forward.params() {
        let Some(&g) = b.adj.get(&id) else { continue };
        let g = b.broadcast_to(g, &ty.shape, format!("grad.{name}.full"))?;
        let taken = b.g.outputs.iter().any(|(_, o)| *o == g)
            || matches!(b.g.node(g).op, Op::Input { .. } | Op::Param { .. });
        let g = if taken {
            b.g.add(
                Op::Affine { mul: 1.0, add: 0.0 },
                &[g],
                format!("grad.{name}"),
            )?
        } else {
            g
        };
        b.g.set_output(&format!("{GRAD_PREFIX}{name}"), g);
    }
    Ok(b.g)
}

/// Whether gradient flows from argument `slot` of `op` (whose argument has type `arg`) to its output.
fn differentiable(op: &Op, slot: usize, arg: &TensorType) -> bool {
    if arg.dtype != DType::F32 {
        return false;
    }
    match op {
        Op::Unary(UnaryOp::Step) | Op::Binary(BinaryOp::Ge) => false,
        Op::TopK { .. }
        | Op::TopKMask { .. }
        | Op::MoeRoute { .. }
        | Op::SliceCols { .. }
        | Op::RouteLoad { .. }
        | Op::ExpertChoice { .. }
        | Op::Sinkhorn { .. }
        | Op::Auction { .. } => false,
        Op::Embedding
        | Op::CrossEntropy
        | Op::GatherCols
        | Op::ScatterCols { .. }
        | Op::MoeGather { .. } => slot == 0,
        Op::GroupedMatMul { .. } | Op::MoeCombine { .. } | Op::LinearCrossEntropy => slot < 2,
        Op::Input { .. }
        | Op::Param { .. }
        | Op::Affine { .. }
        | Op::Unary(_)
        | Op::Binary(_)
        | Op::Reduce(_)
        | Op::Reshape { .. }
        | Op::Permute { .. }
        | Op::MatMul { .. }
        | Op::Rope { .. }
        | Op::Softmax { .. }
        | Op::SliceRows { .. }
        | Op::ConcatRows
        | Op::SumTo { .. }
        | Op::BroadcastTo { .. }
        | Op::EmbeddingGrad { .. }
        | Op::RopeGrad { .. }
        | Op::CrossEntropyGrad
        | Op::LinearCrossEntropyGradH
        | Op::LinearCrossEntropyGradW
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
        | Op::LstmLastGrad { .. } => true,
    }
}

/// `inv` with `inv[perm[i]] = i`: the permutation that undoes `perm`.
fn inverse_permutation(perm: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        inv[p] = i;
    }
    inv
}

/// Nodes on a differentiable path from some `Param` to `loss` (the loss included when one exists).
fn needs_grad(g: &Graph, order: &[NodeId], loss: NodeId) -> HashSet<NodeId> {
    let mut from_param = HashSet::new();
    for &id in order {
        let node = g.node(id);
        let fed =
            g.inputs(id).iter().enumerate().any(|(slot, a)| {
                from_param.contains(a) && differentiable(&node.op, slot, g.ty(*a))
            });
        if matches!(node.op, Op::Param { .. }) || fed {
            from_param.insert(id);
        }
    }
    let mut to_loss = HashSet::from([loss]);
    for &id in order.iter().rev() {
        if !to_loss.contains(&id) {
            continue;
        }
        let node = g.node(id);
        for (slot, a) in g.inputs(id).into_iter().enumerate() {
            if differentiable(&node.op, slot, g.ty(a)) {
                to_loss.insert(a);
            }
        }
    }
    from_param.intersection(&to_loss).copied().collect()
}

/// The graph being extended and the accumulated adjoint of every forward node seen so far.
struct Backward {
    g: Graph,
    adj: HashMap<NodeId, NodeId>,
    needed: HashSet<NodeId>,
}

impl Backward {
    fn add(&mut self, op: Op, args: &[NodeId], label: String) -> Result<NodeId, AutodiffError> {
        Ok(self.g.add(op, args, label)?)
    }
    fn unary(&mut self, u: UnaryOp, x: NodeId, label: String) -> Result<NodeId, AutodiffError> {
        self.add(Op::Unary(u), &[x], label)
    }
    fn binary(
        &mut self,
        b: BinaryOp,
        x: NodeId,
        y: NodeId,
        label: String,
    ) -> Result<NodeId, AutodiffError> {
        self.add(Op::Binary(b), &[x, y], label)
    }
    fn affine(
        &mut self,
        x: NodeId,
        mul: f32,
        add: f32,
        label: String,
    ) -> Result<NodeId, AutodiffError> {
        if mul == 1.0 && add == 0.0 {
            return Ok(x);
        }
        self.add(Op::Affine { mul, add }, &[x], label)
    }
    fn shape(&self, x: NodeId) -> Vec<usize> {
        self.g.ty(x).shape.clone()
    }
    /// `x` summed down to `shape` (no node when the shapes already agree, or when `x` is a broadcast
    /// adjoint that `shape` need not sum).
    fn sum_to(
        &mut self,
        x: NodeId,
        shape: &[usize],
        label: String,
    ) -> Result<NodeId, AutodiffError> {
        let from = self.shape(x);
        // Equal shapes, or a broadcast adjoint (see `takes_broadcast_adjoint`) of a value of `shape`.
        if from.len() == shape.len() && from.iter().zip(shape).all(|(&f, &s)| f == s || f == 1) {
            return Ok(x);
        }
        // Summing only the last axis is a `Reduce`, which fuses with the elementwise ops feeding it.
        let (n, r) = (from.len(), shape.len());
        if n == r && n > 0 && shape[r - 1] == 1 && from[..n - 1] == shape[..r - 1] {
            return self.add(Op::Reduce(ReduceOp::Sum), &[x], label);
        }
        self.add(
            Op::SumTo {
                shape: shape.to_vec(),
            },
            &[x],
            label,
        )
    }
    /// `x` broadcast up to `shape` (no node when the shapes already agree).
    fn broadcast_to(
        &mut self,
        x: NodeId,
        shape: &[usize],
        label: String,
    ) -> Result<NodeId, AutodiffError> {
        if self.g.ty(x).shape == shape {
            return Ok(x);
        }
        self.add(
            Op::BroadcastTo {
                shape: shape.to_vec(),
            },
            &[x],
            label,
        )
    }
    fn reshape(
        &mut self,
        x: NodeId,
        shape: &[usize],
        label: String,
    ) -> Result<NodeId, AutodiffError> {
        if self.g.ty(x).shape == shape {
            return Ok(x);
        }
        self.add(
            Op::Reshape {
                shape: shape.to_vec(),
            },
            &[x],
            label,
        )
    }
    /// Swaps the last two axes.
    fn transpose(&mut self, x: NodeId, label: String) -> Result<NodeId, AutodiffError> {
        let r = self.g.ty(x).shape.len();
        let mut perm: Vec<usize> = (0..r).collect();
        perm.swap(r - 2, r - 1);
        self.add(Op::Permute { perm }, &[x], label)
    }

    /// Whether `op` can take an adjoint `g` that is not yet broadcast to its output's shape.
    ///
    /// The adjoints of `Reduce(Sum | Mean)` are left as `[..., 1]` ("broadcast adjoints": same rank,
    /// each axis equal to the value's or 1) because their consumers are mostly elementwise, and
    /// `Binary` broadcasts for free where a `BroadcastTo` would be a kernel of its own. `Affine` and
    /// `Unary` adjoints are `g` times a full-shaped factor (or `g` scaled), and a `Binary` whose
    /// operands both have the output's shape needs no `SumTo`, so all of them accept one; every
    /// other op (and every parameter's output) gets `g` materialised with `BroadcastTo` first.
    fn takes_broadcast_adjoint(&self, op: &Op, args: &[NodeId], out: &TensorType) -> bool {
        match op {
            Op::Affine { .. } | Op::Unary(_) => true,
            Op::Binary(_) => args.iter().all(|&a| self.g.ty(a).shape == out.shape),
            Op::Input { .. }
            | Op::Param { .. }
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
            | Op::LstmLastGrad { .. } => false,
        }
    }

    /// Adds `contribution` to the adjoint of `x` (a sum when `x` has several uses).
    fn accumulate(&mut self, x: NodeId, contribution: NodeId) -> Result<(), AutodiffError> {
        let total = match self.adj.get(&x) {
            None => contribution,
            Some(&prev) => {
                let label = format!("grad.{}.sum", self.g.node(x).label);
                self.binary(BinaryOp::Add, prev, contribution, label)?
            }
        };
        self.adj.insert(x, total);
        Ok(())
    }

    /// Propagates `g`, the complete adjoint of forward node `id`, to its arguments that need one.
    fn node(&mut self, id: NodeId, g: NodeId) -> Result<(), AutodiffError> {
        let node = self.g.node(id).clone();
        let args = self.g.inputs(id);
        let want: Vec<bool> = args
            .iter()
            .enumerate()
            .map(|(slot, a)| {
                self.needed.contains(a) && differentiable(&node.op, slot, self.g.ty(*a))
            })
            .collect();
        if !want.contains(&true) {
            return Ok(());
        }
        let l = |part: &str| format!("grad.{}{}", node.label, part);
        let y = id;
        let g = if self.g.ty(g).shape == node.ty.shape
            || self.takes_broadcast_adjoint(&node.op, &args, &node.ty)
        {
            g
        } else {
            self.broadcast_to(g, &node.ty.shape, l(".full"))?
        };
        let grads = self.adjoints(&node, &args, y, g, &want)?;
        for (slot, grad) in grads.into_iter().enumerate() {
            if let (true, Some(grad)) = (want[slot], grad) {
                self.accumulate(args[slot], grad)?;
            }
        }
        Ok(())
    }

    /// The adjoints of `node`'s operands `args` (`None` where none is wanted or the op passes none
    /// on), given `g`, the adjoint of its value `y`: one arm per op, the longer rules in methods of
    /// their own.
    fn adjoints(
        &mut self,
        node: &Node,
        args: &[NodeId],
        y: NodeId,
        g: NodeId,
        want: &[bool],
    ) -> Result<Vec<Option<NodeId>>, AutodiffError> {
        let l = |part: &str| format!("grad.{}{}", node.label, part);
        let mut grads: Vec<Option<NodeId>> = vec![None; args.len()];
        match &node.op {
            Op::Input { .. } | Op::Param { .. } => {}
            Op::Affine { mul, .. } => grads[0] = Some(self.affine(g, *mul, 0.0, l(""))?),
            Op::Unary(u) => grads[0] = Some(self.unary_adjoint(*u, args[0], y, g, node)?),
            Op::Binary(op) => grads = self.binary_adjoint(*op, args, y, g, want, node)?,
            Op::Reduce(r) => grads[0] = Some(self.reduce_adjoint(*r, args[0], y, g, node)?),
            Op::Reshape { .. } => {
                let shape = self.shape(args[0]);
                grads[0] = Some(self.reshape(g, &shape, l(""))?);
            }
            Op::Permute { perm } => {
                let inv = inverse_permutation(perm);
                grads[0] = Some(self.add(Op::Permute { perm: inv }, &[g], l(""))?);
            }
            Op::MatMul { trans_b } => {
                grads = self.matmul_adjoint(*trans_b, args[0], args[1], g, want, node)?
            }
            Op::Embedding => {
                let vocab = self.g.ty(args[0]).shape[0];
                grads[0] = Some(self.add(Op::EmbeddingGrad { vocab }, &[args[1], g], l(""))?);
            }
            Op::Rope { theta } => {
                grads[0] = Some(self.add(Op::RopeGrad { theta: *theta }, &[g], l(""))?)
            }
            Op::Softmax { .. } => grads[0] = Some(self.softmax_adjoint(y, g, node)?),
            Op::CrossEntropy => {
                grads[0] = Some(self.add(Op::CrossEntropyGrad, &[args[0], args[1], g], l(""))?);
            }
            Op::LinearCrossEntropy => grads = self.head_adjoint(args, g, want, node)?,
            Op::GatherCols => {
                let cols = self.g.ty(args[0]).shape[1];
                grads[0] = Some(self.add(Op::ScatterCols { cols }, &[g, args[1]], l(""))?);
            }
            Op::MoeGather { layout } => {
                grads[0] =
                    Some(self.add(Op::MoeGatherGrad { layout: *layout }, &[g, args[1]], l(""))?);
            }
            // The dense gate matrix built from selected weights: gather the adjoint back.
            Op::ScatterCols { .. } => {
                grads[0] = Some(self.add(Op::GatherCols, &[g, args[1]], l(""))?);
            }
            Op::GroupedMatMul { layout } => {
                grads = self.grouped_matmul_adjoint(*layout, args, g, want, node)?
            }
            Op::MoeCombine { layout } => {
                grads = self.moe_combine_adjoint(*layout, args, g, want, node)?
            }
            Op::SumTo { .. } => {
                let shape = self.shape(args[0]);
                grads[0] = Some(self.broadcast_to(g, &shape, l(""))?);
            }
            Op::BroadcastTo { .. } => {
                let shape = self.shape(args[0]);
                grads[0] = Some(self.sum_to(g, &shape, l(""))?);
            }
            Op::LstmHidden => self.lstm_adjoint(args, g, want, node)?,
            Op::LstmLast { dirs } => {
                let steps = self.shape(args[0])[1];
                let op = Op::LstmLastGrad { dirs: *dirs, steps };
                grads[0] = Some(self.add(op, &[g], l(""))?);
            }
            Op::LstmScan { .. }
            | Op::LstmScanGrad { .. }
            | Op::LstmScanGradW { .. }
            | Op::LstmLastGrad { .. }
            | Op::TopK { .. }
            | Op::TopKMask { .. }
            | Op::MoeRoute { .. }
            | Op::EmbeddingGrad { .. }
            | Op::RopeGrad { .. }
            | Op::SliceCols { .. }
            | Op::RouteLoad { .. }
            | Op::ExpertChoice { .. }
            | Op::Sinkhorn { .. }
            | Op::Auction { .. }
            | Op::CrossEntropyGrad
            | Op::SliceRows { .. }
            | Op::ConcatRows
            | Op::LinearCrossEntropyGradH
            | Op::LinearCrossEntropyGradW
            | Op::MoeGatherGrad { .. }
            | Op::GroupedMatMulGradX { .. }
            | Op::GroupedMatMulGradW { .. }
            | Op::MoeCombineGradRows { .. }
            | Op::MoeCombineGradWeights { .. } => {
                return Err(AutodiffError::NotDifferentiable {
                    label: node.label.clone(),
                    op: node.op.mnemonic(),
                })
            }
        }
        Ok(grads)
    }

    /// `LinearCrossEntropy`: both adjoints read the same operands and each recomputes the logits it
    /// needs, chunk by chunk (`head::legalize` runs the pair as one loop over the chunks).
    fn head_adjoint(
        &mut self,
        args: &[NodeId],
        g: NodeId,
        want: &[bool],
        node: &Node,
    ) -> Result<Vec<Option<NodeId>>, AutodiffError> {
        let l = |part: &str| format!("grad.{}{}", node.label, part);
        let operands = vec![args[0], args[1], args[2], g];
        self.adjoint_pair(
            want,
            [
                (Op::LinearCrossEntropyGradH, operands.clone(), l(".dh")),
                (Op::LinearCrossEntropyGradW, operands, l(".dw")),
            ],
        )
    }

    /// `GroupedMatMul` `(x, w, route)`: the adjoints of `x` and `w`.
    fn grouped_matmul_adjoint(
        &mut self,
        layout: RouteLayout,
        args: &[NodeId],
        g: NodeId,
        want: &[bool],
        node: &Node,
    ) -> Result<Vec<Option<NodeId>>, AutodiffError> {
        let l = |part: &str| format!("grad.{}{}", node.label, part);
        let (x, w, route) = (args[0], args[1], args[2]);
        self.adjoint_pair(
            want,
            [
                (
                    Op::GroupedMatMulGradX { layout },
                    vec![g, w, route],
                    l(".dx"),
                ),
                (
                    Op::GroupedMatMulGradW { layout },
                    vec![g, x, route],
                    l(".dw"),
                ),
            ],
        )
    }

    /// `MoeCombine` `(yp, weights, route)`: the adjoints of the expert rows and of the weights.
    fn moe_combine_adjoint(
        &mut self,
        layout: RouteLayout,
        args: &[NodeId],
        g: NodeId,
        want: &[bool],
        node: &Node,
    ) -> Result<Vec<Option<NodeId>>, AutodiffError> {
        let l = |part: &str| format!("grad.{}{}", node.label, part);
        let (yp, weights, route) = (args[0], args[1], args[2]);
        self.adjoint_pair(
            want,
            [
                (
                    Op::MoeCombineGradRows { layout },
                    vec![g, weights, route],
                    l(".rows"),
                ),
                (
                    Op::MoeCombineGradWeights { layout },
                    vec![g, yp, route],
                    l(".weights"),
                ),
            ],
        )
    }

    /// The adjoints of the first two operands of an op whose two adjoints are gradient ops of their
    /// own, `(op, operands, label suffix)` each, built only where wanted.
    fn adjoint_pair(
        &mut self,
        want: &[bool],
        adjoints: [(Op, Vec<NodeId>, String); 2],
    ) -> Result<Vec<Option<NodeId>>, AutodiffError> {
        let mut grads = vec![None; want.len()];
        for (slot, (op, operands, label)) in adjoints.into_iter().enumerate() {
            if want[slot] {
                grads[slot] = Some(self.add(op, &operands, label)?);
            }
        }
        Ok(grads)
    }

    /// `Reduce` over the last axis of `x` (value `y`).
    fn reduce_adjoint(
        &mut self,
        r: ReduceOp,
        x: NodeId,
        y: NodeId,
        g: NodeId,
        node: &Node,
    ) -> Result<NodeId, AutodiffError> {
        let l = |part: &str| format!("grad.{}{}", node.label, part);
        match r {
            // Left un-broadcast: see `takes_broadcast_adjoint`.
            ReduceOp::Sum => Ok(g),
            ReduceOp::Mean => {
                let n = *self.shape(x).last().unwrap_or(&1);
                self.affine(g, 1.0 / n as f32, 0.0, l(""))
            }
            ReduceOp::Max => {
                let mask = self.binary(BinaryOp::Ge, x, y, l(".argmax"))?;
                self.binary(BinaryOp::Mul, mask, g, l(""))
            }
        }
    }

    /// dx = y · (g − Σ g·y); masked (causal) entries have y = 0, so they get 0.
    fn softmax_adjoint(
        &mut self,
        y: NodeId,
        g: NodeId,
        node: &Node,
    ) -> Result<NodeId, AutodiffError> {
        let l = |part: &str| format!("grad.{}{}", node.label, part);
        let gy = self.binary(BinaryOp::Mul, g, y, l(".gy"))?;
        let s = self.add(Op::Reduce(ReduceOp::Sum), &[gy], l(".dot"))?;
        let centred = self.binary(BinaryOp::Sub, g, s, l(".centred"))?;
        self.binary(BinaryOp::Mul, y, centred, l(""))
    }

    /// Backpropagation through time: `LstmHidden ∘ LstmScan` is differentiated as one unit, straight
    /// to each scan's operands (`xg`, `w_hh`), so a record never carries an adjoint of its own (an
    /// `LstmScan` reached by any other adjoint is an error above). Direction `d` of the hidden
    /// states is columns `d·H..(d + 1)·H` of `g`.
    fn lstm_adjoint(
        &mut self,
        records: &[NodeId],
        g: NodeId,
        want: &[bool],
        node: &Node,
    ) -> Result<(), AutodiffError> {
        for (d, &rec) in records.iter().enumerate() {
            if !want[d] {
                continue;
            }
            let not_scan = || AutodiffError::NotDifferentiable {
                label: node.label.clone(),
                op: node.op.mnemonic(),
            };
            let Op::LstmScan { reverse } = self.g.node(rec).op else {
                return Err(not_scan());
            };
            let [xg, w] = self.g.inputs(rec)[..] else {
                return Err(not_scan());
            };
            let h = crate::ir::lstm::hidden_of(self.g.ty(rec));
            let label = format!("grad.{}", self.g.node(rec).label);
            let op = Op::LstmScanGrad {
                reverse,
                col: d * h,
            };
            let dgates = self.add(op, &[g, rec, w], format!("{label}.gates"))?;
            if self.needed.contains(&w) {
                let op = Op::LstmScanGradW { reverse };
                let dw = self.add(op, &[dgates, rec], format!("{label}.w_hh"))?;
                self.accumulate(w, dw)?;
            }
            if self.needed.contains(&xg) {
                self.accumulate(xg, dgates)?;
            }
        }
        Ok(())
    }

    /// dx of `y = u(x)` given `g = dy`, in the cheapest form (from `y` where it suffices).
    fn unary_adjoint(
        &mut self,
        u: UnaryOp,
        x: NodeId,
        y: NodeId,
        g: NodeId,
        node: &Node,
    ) -> Result<NodeId, AutodiffError> {
        let l = |part: &str| format!("grad.{}{}", node.label, part);
        let mul =
            |b: &mut Self, a: NodeId, c: NodeId, part: &str| b.binary(BinaryOp::Mul, a, c, l(part));
        match u {
            UnaryOp::Neg => self.unary(UnaryOp::Neg, g, l("")),
            // g·y
            UnaryOp::Exp => mul(self, g, y, ""),
            // g / x
            UnaryOp::Log => self.binary(BinaryOp::Div, g, x, l("")),
            // g / (2y)
            UnaryOp::Sqrt => {
                let q = self.binary(BinaryOp::Div, g, y, l(".q"))?;
                self.affine(q, 0.5, 0.0, l(""))
            }
            // −½·g·y³
            UnaryOp::Rsqrt => {
                let y2 = self.unary(UnaryOp::Square, y, l(".y2"))?;
                let y3 = mul(self, y2, y, ".y3")?;
                let gy3 = mul(self, g, y3, ".gy3")?;
                self.affine(gy3, -0.5, 0.0, l(""))
            }
            // −g·y²
            UnaryOp::Recip => {
                let y2 = self.unary(UnaryOp::Square, y, l(".y2"))?;
                let gy2 = mul(self, g, y2, ".gy2")?;
                self.affine(gy2, -1.0, 0.0, l(""))
            }
            // 2·g·x
            UnaryOp::Square => {
                let gx = mul(self, g, x, ".gx")?;
                self.affine(gx, 2.0, 0.0, l(""))
            }
            // g·(1 − y²)
            UnaryOp::Tanh => {
                let y2 = self.unary(UnaryOp::Square, y, l(".y2"))?;
                let d = self.affine(y2, -1.0, 1.0, l(".d"))?;
                mul(self, g, d, "")
            }
            // g·step(x)
            UnaryOp::Relu => {
                let d = self.unary(UnaryOp::Step, x, l(".d"))?;
                mul(self, g, d, "")
            }
            // silu' = σ(x)·(1 + x·(1 − σ(x))) = σ + y·(1 − σ)
            UnaryOp::Silu => {
                let s = self.unary(UnaryOp::Sigmoid, x, l(".sigmoid"))?;
                let oms = self.affine(s, -1.0, 1.0, l(".one_minus"))?;
                let t = mul(self, y, oms, ".t")?;
                let d = self.binary(BinaryOp::Add, s, t, l(".d"))?;
                mul(self, g, d, "")
            }
            UnaryOp::Gelu => {
                let d = self.unary(UnaryOp::GeluGrad, x, l(".d"))?;
                mul(self, g, d, "")
            }
            // g·y·(1 − y)
            UnaryOp::Sigmoid => {
                let oms = self.affine(y, -1.0, 1.0, l(".one_minus"))?;
                let d = mul(self, y, oms, ".d")?;
                mul(self, g, d, "")
            }
            // g·σ(x)
            UnaryOp::Softplus => {
                let d = self.unary(UnaryOp::Sigmoid, x, l(".d"))?;
                mul(self, g, d, "")
            }
            // g·φ(x)
            UnaryOp::NormalCdf => {
                let d = self.unary(UnaryOp::NormalPdf, x, l(".d"))?;
                mul(self, g, d, "")
            }
            // φ'(x) = −x·φ(x): g·(−x·y)
            UnaryOp::NormalPdf => {
                let xy = mul(self, x, y, ".xy")?;
                let gxy = mul(self, g, xy, ".gxy")?;
                self.affine(gxy, -1.0, 0.0, l(""))
            }
            UnaryOp::Step | UnaryOp::GeluGrad => Err(AutodiffError::NotDifferentiable {
                label: node.label.clone(),
                op: node.op.mnemonic(),
            }),
        }
    }

    /// Adjoints of a broadcasting binary op `out = a ∘ b`, each summed back to its operand's shape.
    fn binary_adjoint(
        &mut self,
        op: BinaryOp,
        args: &[NodeId],
        out: NodeId,
        g: NodeId,
        want: &[bool],
        node: &Node,
    ) -> Result<Vec<Option<NodeId>>, AutodiffError> {
        let l = |part: &str| format!("grad.{}{}", node.label, part);
        let (a, b) = (args[0], args[1]);
        let (sa, sb) = (self.shape(a), self.shape(b));
        let mut da = None;
        let mut db = None;
        match op {
            BinaryOp::Add => {
                if want[0] {
                    da = Some(self.sum_to(g, &sa, l(".lhs"))?);
                }
                if want[1] {
                    db = Some(self.sum_to(g, &sb, l(".rhs"))?);
                }
            }
            BinaryOp::Sub => {
                if want[0] {
                    da = Some(self.sum_to(g, &sa, l(".lhs"))?);
                }
                if want[1] {
                    let s = self.sum_to(g, &sb, l(".rhs_sum"))?;
                    db = Some(self.unary(UnaryOp::Neg, s, l(".rhs"))?);
                }
            }
            BinaryOp::Mul => {
                if want[0] {
                    let p = self.binary(BinaryOp::Mul, g, b, l(".lhs_prod"))?;
                    da = Some(self.sum_to(p, &sa, l(".lhs"))?);
                }
                if want[1] {
                    let p = self.binary(BinaryOp::Mul, g, a, l(".rhs_prod"))?;
                    db = Some(self.sum_to(p, &sb, l(".rhs"))?);
                }
            }
            // da = g / b;  db = −Σ g·a/b² = −Σ (g / b)·out
            BinaryOp::Div => {
                let q = self.binary(BinaryOp::Div, g, b, l(".q"))?;
                if want[0] {
                    da = Some(self.sum_to(q, &sa, l(".lhs"))?);
                }
                if want[1] {
                    let p = self.binary(BinaryOp::Mul, q, out, l(".rhs_prod"))?;
                    let s = self.sum_to(p, &sb, l(".rhs_sum"))?;
                    db = Some(self.unary(UnaryOp::Neg, s, l(".rhs"))?);
                }
            }
            // The lhs wins ties (where a ≥ b), as `Binary(Ge)` says.
            BinaryOp::Max => {
                let mask = self.binary(BinaryOp::Ge, a, b, l(".mask"))?;
                if want[0] {
                    let p = self.binary(BinaryOp::Mul, g, mask, l(".lhs_prod"))?;
                    da = Some(self.sum_to(p, &sa, l(".lhs"))?);
                }
                if want[1] {
                    let inv = self.affine(mask, -1.0, 1.0, l(".rhs_mask"))?;
                    let p = self.binary(BinaryOp::Mul, g, inv, l(".rhs_prod"))?;
                    db = Some(self.sum_to(p, &sb, l(".rhs"))?);
                }
            }
            BinaryOp::Ge => {
                return Err(AutodiffError::NotDifferentiable {
                    label: node.label.clone(),
                    op: node.op.mnemonic(),
                })
            }
        }
        Ok(vec![da, db])
    }

    /// Adjoints of `C = A · B` (or `A · Bᵀ` with `trans_b`): `dA = g · Bᵀ` (`g · B`), and
    /// `dB = Aᵀ · g` (`gᵀ · A`). A `B` shared across A's batch axes gets the sum over the batch by
    /// viewing A and g as 2-D (`[batch·M, K]`, `[batch·M, N]`), which is one plain matmul.
    fn matmul_adjoint(
        &mut self,
        trans_b: bool,
        a: NodeId,
        b: NodeId,
        g: NodeId,
        want: &[bool],
        node: &Node,
    ) -> Result<Vec<Option<NodeId>>, AutodiffError> {
        let l = |part: &str| format!("grad.{}{}", node.label, part);
        let mut da = None;
        let mut db = None;
        if want[0] {
            da = Some(self.add(Op::MatMul { trans_b: !trans_b }, &[g, b], l(".lhs"))?);
        }
        if want[1] {
            let (sa, sg) = (self.shape(a), self.shape(g));
            let (a2, g2) = if self.g.ty(b).shape.len() == 2 && sa.len() > 2 {
                let rows: usize = sa[..sa.len() - 1].iter().product();
                let a2 = self.reshape(a, &[rows, sa[sa.len() - 1]], l(".lhs_rows"))?;
                let g2 = self.reshape(g, &[rows, sg[sg.len() - 1]], l(".out_rows"))?;
                (a2, g2)
            } else {
                (a, g)
            };
            db = Some(if trans_b {
                let gt = self.transpose(g2, l(".out_t"))?;
                self.add(Op::MatMul { trans_b: false }, &[gt, a2], l(".rhs"))?
            } else {
                let at = self.transpose(a2, l(".lhs_t"))?;
                self.add(Op::MatMul { trans_b: false }, &[at, g2], l(".rhs"))?
            });
        }
        Ok(vec![da, db])
    }
}
