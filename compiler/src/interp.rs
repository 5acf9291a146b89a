//! The reference interpreter: a plain-Rust CPU evaluator of the whole Graph IR, forward and gradient ops.
//!
//! It is the oracle every WGSL kernel, every gradient and every balancing formula is checked against
//! (docs/DECISIONS.md, "Architecture"), so it is written to be obviously right, not fast: one loop nest per op, no fusion, no
//! reuse of buffers. It runs in f32 (to mirror the GPU) or in f64 (for finite-difference gradient
//! checks); the arithmetic is the same generic code, instantiated for the [`Float`] trait. Values a
//! graph stores in f16 (`precision = f16`, [`crate::precision::mark_f16`]) are rounded to f16 where
//! they are computed, which is where the kernels store them: the interpreter's f16 mode. In a graph
//! that stores anything in f16 the fused LM head's logits and their adjoint are rounded too, as
//! the chunked head (`head::legalize`) stores them in f16.
//!
//! Also here: [`init_params`], the deterministic parameter initialisation that both the CPU and the
//! GPU paths use, so a model trained on either starts from bit-identical weights.

use crate::ir::{
    BinaryOp, DType, Graph, Init, NodeId, Op, ReduceOp, RouteLayout, TensorType, UnaryOp,
};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::fmt::Debug;
use std::ops::{Add, AddAssign, Div, Mul, Neg, Sub};

mod lstm;

/// A host tensor: the flat, row-major elements of one node's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    F32(Vec<f32>),
    F64(Vec<f64>),
    U32(Vec<u32>),
}

impl Value {
    pub fn len(&self) -> usize {
        match self {
            Value::F32(v) => v.len(),
            Value::F64(v) => v.len(),
            Value::U32(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements as f64 (u32 ids converted exactly), for comparisons in tests and tools.
    pub fn to_f64(&self) -> Vec<f64> {
        match self {
            Value::F32(v) => v.iter().map(|&x| x as f64).collect(),
            Value::F64(v) => v.clone(),
            Value::U32(v) => v.iter().map(|&x| x as f64).collect(),
        }
    }

    /// The elements as f32 (f64 rounded), for feeding the GPU from an f64 run.
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            Value::F32(v) => v.clone(),
            Value::F64(v) => v.iter().map(|&x| x as f32).collect(),
            Value::U32(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }

    pub fn as_u32(&self) -> Option<&[u32]> {
        match self {
            Value::U32(v) => Some(v),
            _ => None,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Value::F32(_) => "f32",
            Value::F64(_) => "f64",
            Value::U32(_) => "u32",
        }
    }
}

/// The float type the interpreter computes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    F64,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InterpError {
    #[error("no value fed for `{name}`")]
    MissingFeed { name: String },
    #[error("`{name}` was fed {got} but the graph wants {want}")]
    BadFeed {
        name: String,
        want: String,
        got: String,
    },
    #[error("`{label}` ({op}): {what} {index} is out of range (must be < {bound})")]
    OutOfRange {
        label: String,
        op: String,
        what: &'static str,
        index: u64,
        bound: u64,
    },
    /// The graph handed to the interpreter is not what its builder guarantees (a pass built nodes
    /// around `Graph::add`); reported as a value so a caller can show which node.
    #[error("`{label}` ({op}): {message}")]
    Malformed {
        label: String,
        op: String,
        message: String,
    },
}

/// The arithmetic the interpreter needs, implemented for f32 and f64.
pub trait Float:
    Copy
    + PartialOrd
    + Debug
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn ln_1p(self) -> Self;
    fn sqrt(self) -> Self;
    fn tanh(self) -> Self;
    fn abs(self) -> Self;
    /// IEEE maxNum-like: the larger operand (NaN-free inputs assumed, as on the GPU).
    fn max(self, other: Self) -> Self;
    fn wrap(v: Vec<Self>) -> Value;
}

macro_rules! impl_float {
    ($t:ty, $variant:ident) => {
        impl Float for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            fn ln_1p(self) -> Self {
                <$t>::ln_1p(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            fn max(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
            fn wrap(v: Vec<Self>) -> Value {
                Value::$variant(v)
            }
        }
    };
}
impl_float!(f32, F32);
impl_float!(f64, F64);

/// A node's value during evaluation: floats in the run's precision, or u32 ids.
#[derive(Debug, Clone)]
enum Tensor<F> {
    F(Vec<F>),
    U(Vec<u32>),
}

impl<F: Float> Tensor<F> {
    fn into_value(self) -> Value {
        match self {
            Tensor::F(v) => F::wrap(v),
            Tensor::U(v) => Value::U32(v),
        }
    }
}

/// Evaluates every node of `graph`. `feeds` holds one value per `Input` and per `Param`, keyed by
/// name. The precision is f64 when any feed is `Value::F64`, else f32 (f32 feeds are widened in an f64
/// run, so `init_params` output can feed either).
pub fn run(
    graph: &Graph,
    feeds: &HashMap<String, Value>,
) -> Result<HashMap<NodeId, Value>, InterpError> {
    let precision = if feeds.values().any(|v| matches!(v, Value::F64(_))) {
        Precision::F64
    } else {
        Precision::F32
    };
    run_in(graph, feeds, precision)
}

/// [`run`] with the precision chosen by the caller.
pub fn run_in(
    graph: &Graph,
    feeds: &HashMap<String, Value>,
    precision: Precision,
) -> Result<HashMap<NodeId, Value>, InterpError> {
    let values = match precision {
        Precision::F32 => eval::<f32>(graph, feeds)?
            .into_iter()
            .map(|(k, v)| (k, v.into_value()))
            .collect(),
        Precision::F64 => eval::<f64>(graph, feeds)?
            .into_iter()
            .map(|(k, v)| (k, v.into_value()))
            .collect(),
    };
    Ok(values)
}

/// The graph's named outputs (`logits`, `loss`, ...) after [`run`].
pub fn run_outputs(
    graph: &Graph,
    feeds: &HashMap<String, Value>,
) -> Result<HashMap<String, Value>, InterpError> {
    let mut all = run(graph, feeds)?;
    Ok(named_outputs(graph, &mut all))
}

/// [`run_outputs`] with the precision chosen by the caller.
pub fn run_outputs_in(
    graph: &Graph,
    feeds: &HashMap<String, Value>,
    precision: Precision,
) -> Result<HashMap<String, Value>, InterpError> {
    let mut all = run_in(graph, feeds, precision)?;
    Ok(named_outputs(graph, &mut all))
}

fn named_outputs(graph: &Graph, all: &mut HashMap<NodeId, Value>) -> HashMap<String, Value> {
    graph
        .outputs
        .iter()
        .filter_map(|(name, id)| all.get(id).map(|v| (name.clone(), v.clone())))
        .collect()
}

/// Turns [`init_params`] output into feeds for [`run`].
pub fn param_feeds(params: &HashMap<String, Vec<f32>>) -> HashMap<String, Value> {
    params
        .iter()
        .map(|(k, v)| (k.clone(), Value::F32(v.clone())))
        .collect()
}

/// Deterministic initial values of every parameter of `graph`, by name.
///
/// Each parameter draws from its own ChaCha8 stream, seeded from `seed` and a stable (FNV-1a) hash
/// of its name, so adding or reordering parameters never changes the others, and the CPU and GPU
/// paths (both call this) start from identical weights. Normals come from Box-Muller on 53-bit
/// uniforms, uniforms from one 53-bit uniform each, computed in f64 and rounded to f32.
pub fn init_params(graph: &Graph, seed: u64) -> HashMap<String, Vec<f32>> {
    graph
        .g
        .node_weights()
        .filter_map(|node| match &node.op {
            Op::Param { name, init } => Some((
                name.clone(),
                init_values(name, *init, node.ty.numel(), seed),
            )),
            _ => None,
        })
        .collect()
}

/// Values of one parameter; public so a runtime can re-initialise a single tensor.
pub fn init_values(name: &str, init: Init, numel: usize, seed: u64) -> Vec<f32> {
    match init {
        Init::Constant(c) => vec![c; numel],
        Init::Normal { std } => {
            let mut rng = param_rng(name, seed);
            let mut out = Vec::with_capacity(numel);
            while out.len() < numel {
                let u1 = 1.0 - unit_f64(&mut rng); // (0, 1]: ln is finite
                let u2 = unit_f64(&mut rng);
                let r = (-2.0 * u1.ln()).sqrt();
                let a = 2.0 * std::f64::consts::PI * u2;
                out.push((r * a.cos() * std as f64) as f32);
                if out.len() < numel {
                    out.push((r * a.sin() * std as f64) as f32);
                }
            }
            out
        }
        Init::Uniform { bound } => {
            let mut rng = param_rng(name, seed);
            (0..numel)
                .map(|_| ((2.0 * unit_f64(&mut rng) - 1.0) * bound as f64) as f32)
                .collect()
        }
    }
}

/// The parameter's own stream: keyed by the seed and the FNV-1a hash of its name.
fn param_rng(name: &str, seed: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&fnv1a(name.as_bytes()).to_le_bytes());
    ChaCha8Rng::from_seed(key)
}

fn unit_f64(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn eval<F: Float>(
    graph: &Graph,
    feeds: &HashMap<String, Value>,
) -> Result<HashMap<NodeId, Tensor<F>>, InterpError> {
    let mut vals: HashMap<NodeId, Tensor<F>> = HashMap::new();
    let f16 = crate::precision::uses_f16(graph);
    for id in graph.topo_order() {
        let node = graph.node(id);
        let args = graph.inputs(id);
        let arg_vals: Vec<&Tensor<F>> = args.iter().map(|a| &vals[a]).collect();
        let arg_tys: Vec<&TensorType> = args.iter().map(|&a| graph.ty(a)).collect();
        let ctx = Ctx {
            label: &node.label,
            op: &node.op,
            f16,
        };
        let mut out = eval_node(&ctx, &node.ty, &arg_vals, &arg_tys, feeds)?;
        if node.ty.dtype == DType::F16 {
            out = round_f16(out);
        }
        vals.insert(id, out);
    }
    Ok(vals)
}

/// The f16 mode: a value the graph stores in f16 (`precision::mark_f16`) is rounded to the nearest
/// f16 where it is computed, as the kernel that stores it does (values beyond ±65504 become ±inf);
/// everything else is computed in the run's precision, as the kernels compute in f32.
fn round_f16<F: Float>(t: Tensor<F>) -> Tensor<F> {
    match t {
        Tensor::F(v) => Tensor::F(rounded_f16(v)),
        u => u,
    }
}

fn rounded_f16<F: Float>(v: Vec<F>) -> Vec<F> {
    v.into_iter()
        .map(|x| F::from_f64(half::f16::from_f64(x.to_f64()).to_f64()))
        .collect()
}

/// Node identity for error messages, and whether the graph runs in f16 mode.
struct Ctx<'a> {
    label: &'a str,
    op: &'a Op,
    /// The graph stores values in f16: the fused head's logits and their adjoint are rounded, as
    /// `head::legalize` stores them in f16.
    f16: bool,
}

impl Ctx<'_> {
    /// An intermediate of a fused op as its kernels store it: rounded to f16 in f16 mode.
    fn stored<F: Float>(&self, v: Vec<F>) -> Vec<F> {
        if self.f16 {
            rounded_f16(v)
        } else {
            v
        }
    }

    fn malformed(&self, message: impl Into<String>) -> InterpError {
        InterpError::Malformed {
            label: self.label.into(),
            op: self.op.mnemonic(),
            message: message.into(),
        }
    }
    fn out_of_range(&self, what: &'static str, index: u64, bound: u64) -> InterpError {
        InterpError::OutOfRange {
            label: self.label.into(),
            op: self.op.mnemonic(),
            what,
            index,
            bound,
        }
    }
    fn f<'v, F>(&self, t: &'v Tensor<F>) -> Result<&'v [F], InterpError> {
        match t {
            Tensor::F(v) => Ok(v),
            Tensor::U(_) => Err(self.malformed("expected a float operand, got u32")),
        }
    }
    fn u<'v, F>(&self, t: &'v Tensor<F>) -> Result<&'v [u32], InterpError> {
        match t {
            Tensor::U(v) => Ok(v),
            Tensor::F(_) => Err(self.malformed("expected a u32 operand, got float")),
        }
    }
    fn argc(&self, n: usize, got: usize) -> Result<(), InterpError> {
        if n == got {
            Ok(())
        } else {
            Err(self.malformed(format!("expected {n} arguments, got {got}")))
        }
    }
}

fn feed<F: Float>(
    name: &str,
    ty: &TensorType,
    feeds: &HashMap<String, Value>,
) -> Result<Tensor<F>, InterpError> {
    let v = feeds
        .get(name)
        .ok_or_else(|| InterpError::MissingFeed { name: name.into() })?;
    let bad = || InterpError::BadFeed {
        name: name.into(),
        want: ty.to_string(),
        got: format!("{}[{}]", v.kind(), v.len()),
    };
    if v.len() != ty.numel() {
        return Err(bad());
    }
    match (ty.dtype, v) {
        (DType::U32, Value::U32(x)) => Ok(Tensor::U(x.clone())),
        (DType::F32, Value::F32(x)) => Ok(Tensor::F(
            x.iter().map(|&e| F::from_f64(e as f64)).collect(),
        )),
        (DType::F32, Value::F64(x)) => Ok(Tensor::F(x.iter().map(|&e| F::from_f64(e)).collect())),
        _ => Err(bad()),
    }
}

/// One node's value: every op names its semantics here (each as its doc comment in `ir.rs` says,
/// forward ops, the adjoints `autodiff` emits, the LSTM ops in [`lstm`]), so a new op is a
/// compile error until it has one.
fn eval_node<F: Float>(
    ctx: &Ctx,
    ty: &TensorType,
    args: &[&Tensor<F>],
    arg_tys: &[&TensorType],
    feeds: &HashMap<String, Value>,
) -> Result<Tensor<F>, InterpError> {
    match ctx.op {
        Op::Input { name, .. } | Op::Param { name, .. } => feed(name, ty, feeds),
        Op::Affine { mul, add } => eval_affine(ctx, args, *mul, *add),
        Op::Unary(u) => eval_unary(ctx, args, *u),
        Op::Binary(b) => eval_binary(ctx, ty, args, arg_tys, *b),
        Op::Reduce(r) => eval_reduce(ctx, ty, args, arg_tys, *r),
        Op::Reshape { .. } => eval_reshape(ctx, args),
        Op::Permute { perm } => eval_permute(ctx, args, arg_tys, perm),
        Op::MatMul { trans_b } => eval_matmul(ctx, args, arg_tys, *trans_b),
        Op::Embedding => eval_embedding(ctx, args, arg_tys),
        Op::Rope { theta } => eval_rope(ctx, args, arg_tys, *theta, false),
        Op::Softmax { causal } => eval_softmax(ctx, args, arg_tys, *causal),
        Op::CrossEntropy => eval_cross_entropy(ctx, args, arg_tys),
        Op::LinearCrossEntropy => eval_linear_cross_entropy(ctx, args, arg_tys),
        Op::SliceRows { start, .. } => eval_slice_rows(ctx, ty, args, arg_tys, *start),
        Op::ConcatRows => eval_concat_rows(ctx, args),
        Op::TopK { k } => eval_topk(ctx, args, arg_tys, *k),
        Op::GatherCols => eval_gather_cols(ctx, args, arg_tys),
        Op::TopKMask { experts } => eval_topk_mask(ctx, args, arg_tys, *experts),
        Op::MoeRoute { layout } => eval_moe_route(ctx, args, layout),
        Op::SliceCols { start, len } => eval_slice_cols(ctx, ty, args, arg_tys, *start, *len),
        Op::RouteLoad { layout } => eval_route_load(ctx, args, layout),
        Op::ExpertChoice { capacity } => eval_expert_choice(ctx, args, arg_tys, *capacity),
        Op::Sinkhorn { iters } => eval_sinkhorn(ctx, args, arg_tys, *iters),
        Op::Auction {
            rounds,
            epsilon,
            budget,
            capacity,
            k,
        } => {
            let params = AuctionParams {
                rounds: *rounds,
                epsilon: *epsilon as f64,
                budget: *budget as f64,
                capacity: *capacity,
                k: *k,
            };
            eval_auction(ctx, args, arg_tys, &params)
        }
        Op::MoeGather { layout } => eval_moe_gather(ctx, args, arg_tys, layout),
        Op::GroupedMatMul { layout } => eval_grouped_matmul(ctx, args, arg_tys, layout),
        Op::MoeCombine { layout } => eval_moe_combine(ctx, args, arg_tys, layout),
        Op::LstmScan { reverse } => lstm::eval_scan(ctx, ty, args, *reverse),
        Op::LstmHidden => lstm::hidden(ctx, ty, args, arg_tys[0]),
        Op::LstmScanGrad { reverse, col } => {
            lstm::eval_scan_grad(ctx, args, arg_tys, *reverse, *col)
        }
        Op::LstmScanGradW { reverse } => lstm::eval_scan_grad_w(ctx, args, arg_tys, *reverse),
        Op::LstmLast { dirs } => lstm::eval_last(ctx, ty, args, arg_tys, *dirs),
        Op::LstmLastGrad { dirs, steps } => {
            lstm::eval_last_grad(ctx, ty, args, arg_tys, *dirs, *steps)
        }
        Op::SumTo { shape } => eval_sum_to(ctx, ty, args, arg_tys, shape),
        Op::BroadcastTo { shape } => eval_broadcast_to(ctx, args, arg_tys, shape),
        Op::EmbeddingGrad { vocab } => eval_embedding_grad(ctx, args, arg_tys, *vocab),
        Op::RopeGrad { theta } => eval_rope(ctx, args, arg_tys, *theta, true),
        Op::CrossEntropyGrad => eval_cross_entropy_grad(ctx, args, arg_tys),
        Op::LinearCrossEntropyGradH => eval_linear_cross_entropy_grad_h(ctx, args, arg_tys),
        Op::LinearCrossEntropyGradW => eval_linear_cross_entropy_grad_w(ctx, args, arg_tys),
        Op::ScatterCols { cols } => eval_scatter_cols(ctx, ty, args, arg_tys, *cols),
        Op::MoeGatherGrad { layout } => eval_moe_gather_grad(ctx, args, arg_tys, layout),
        Op::GroupedMatMulGradX { layout } => eval_grouped_matmul_grad_x(ctx, args, arg_tys, layout),
        Op::GroupedMatMulGradW { layout } => eval_grouped_matmul_grad_w(ctx, args, arg_tys, layout),
        Op::MoeCombineGradRows { layout } => eval_moe_combine_grad_rows(ctx, args, arg_tys, layout),
        Op::MoeCombineGradWeights { layout } => {
            eval_moe_combine_grad_weights(ctx, args, arg_tys, layout)
        }
    }
}

/// `G = ∂ce/∂logits` of the fused head, stored as its kernels store it (both head adjoints read it).
fn head_dlogits<F: Float>(
    ctx: &Ctx,
    args: &[&Tensor<F>],
    arg_tys: &[&TensorType],
) -> Result<Vec<F>, InterpError> {
    ctx.argc(4, args.len())?;
    let logits = head_logits(ctx, args, arg_tys)?;
    let g = ctx.f(args[3])?;
    let v = arg_tys[1].shape[0];
    Ok(ctx.stored(cross_entropy_grad(ctx, &logits, ctx.u(args[2])?, v, g[0])?))
}

/// dh = G · w.
fn eval_linear_cross_entropy_grad_h<F: Float>(
    ctx: &Ctx,
    args: &[&Tensor<F>],
    arg_tys: &[&TensorType],
) -> Result<Tensor<F>, InterpError> {
    let dlogits = head_dlogits(ctx, args, arg_tys)?;
    let w = ctx.f(args[1])?;
    let (n, v) = (arg_tys[0].shape[0], arg_tys[1].shape[0]);
    let gt = TensorType::f32(&[n, v]);
    Ok(Tensor::F(matmul(&dlogits, &gt, w, arg_tys[1], false)))
}

/// dw = Gᵀ · h, summed over rows in ascending order.
fn eval_linear_cross_entropy_grad_w<F: Float>(
    ctx: &Ctx,
    args: &[&Tensor<F>],
    arg_tys: &[&TensorType],
) -> Result<Tensor<F>, InterpError> {
    let dlogits = head_dlogits(ctx, args, arg_tys)?;
    let h = ctx.f(args[0])?;
    let (v, d) = (arg_tys[1].shape[0], arg_tys[0].shape[1]);
    let mut dw = vec![F::ZERO; v * d];
    for (r, grow) in dlogits.chunks_exact(v).enumerate() {
        let hrow = &h[r * d..(r + 1) * d];
        for (c, &gv) in grow.iter().enumerate() {
            for (o, &hv) in dw[c * d..(c + 1) * d].iter_mut().zip(hrow) {
                *o += gv * hv;
            }
        }
    }
    Ok(Tensor::F(dw))
}

fn eval_affine<F: Float>(
    ctx: &Ctx,
    args: &[&Tensor<F>],
    mul: f32,
    add: f32,
) -> Result<Tensor<F>, InterpError> {
    ctx.argc(1, args.len())?;
    let (m, a) = (F::from_f64(mul as f64), F::from_f64(add as f64));
    Ok(Tensor::F(
        ctx.f(args[0])?.iter().map(|&x| x * m + a).collect(),
    ))
}

fn eval_unary<F: Float>(
    ctx: &Ctx,
    args: &[&Tensor<F>],
    u: UnaryOp,
) -> Result<Tensor<F>, InterpError> {
    ctx.argc(1, args.len())?;
    Ok(Tensor::F(
        ctx.f(args[0])?.iter().map(|&x| unary(u, x)).collect(),
    ))
}

fn eval_binary<F: Float>(
    ctx: &Ctx,
    ty: &TensorType,
    args: &[&Tensor<F>],
    arg_tys: &[&TensorType],
    b: BinaryOp,
) -> Result<Tensor<F>, InterpError> {
    ctx.argc(2, args.len())?;
    let (x, y) = (ctx.f(args[0])?, ctx.f(args[1])?);
    let ix = broadcast_index(&ty.shape, &arg_tys[0].shape);
    let iy = broadcast_index(&ty.shape, &arg_tys[1].shape);
    Ok(Tensor::F(
        ix.iter()
            .zip(&iy)
            .map(|(&i, &j)| binary(b, x[i], y[j]))
            .collect(),
    ))
}

fn eval_reduce<F: Float>(
    ctx: &Ctx,
    ty: &TensorType,
    args: &[&Tensor<F>],
    arg_tys: &[&TensorType],
    r: ReduceOp,
) -> Result<Tensor<F>, InterpError> {
    ctx.argc(1, args.len())?;
    let x = ctx.f(args[0])?;
    let n = arg_tys[0].last();
    let out = (0..ty.numel())
        .map(|i| &x[i * n..(i + 1) * n])
        .map(|row| match r {
            ReduceOp::Sum => sum(row),
            ReduceOp::Mean => sum(row) / F::from_f64(n as f64),
            ReduceOp::Max => row
                .iter()
                .copied()
                .fold(F::from_f64(f64::NEG_INFINITY), F::max),
        })
        .collect();
    Ok(Tensor::F(out))
}

fn eval_reshape<F: Float>(ctx: &Ctx, args: &[&Tensor<F>]) -> Result<Tensor<F>, InterpError> {
    ctx.argc(1, args.len())?;
    Ok(args[0].clone())
}

fn eval_permute<F: Float>(
    ctx: &Ctx,
    args: &[&Tensor<F>],
    arg_tys: &[&TensorType],
    perm: &[usize],
) -> Result<Tensor<F>, InterpError> {
    ctx.argc(1, args.len())?;
    let src = permute_index(&arg_tys[0].shape, perm);
    Ok(match args[0] {
        Tensor::F(x) => Tensor::F(src.iter().map(|&i| x[i]).collect()),
        Tensor::U(x) => Tensor::U(src.iter().map(|&i| x[i]).collect()),
    })
}

fn eval_matmul<F: Float>(
    ctx: &Ctx,
    args: &[&Tensor<F>],
    arg_tys: &[&TensorType],
    trans_b: bool,
) -> Result<Tensor<F>, InterpError> {
    ctx.argc(2, args.len())?;
    Ok(Tensor::F(matmul(
        ctx.f(args[0])?,
        arg_tys[0],
        ctx.f(args[1])?,
        arg_tys[1],
        trans_b,
    )))
}

fn eval_embedding<F: Float>(
    ctx: &Ctx,
    args: &[&Tensor<F>],
    arg_tys: &[&TensorType],
) -> Result<Tensor<F>, InterpError> {
    ctx.argc(2, args.len())?;
    let (table, ids) = (ctx.f(args[0])?, ctx.u(args[1])?);
    let (v, d) = (arg_tys[0].shape[0], arg_tys[0].shape[1]);
    let mut out = Vec::with_capacity(ids.len() * d);
    for &id in ids {
        if id as usize >= v {
            return Err(ctx.out_of_range("token id", id as u64, v as u64));
        }
        out.extend_from_slice(&table[id as usize * d..(id as usize + 1) * d]);
    }
    Ok(Tensor::F(out))
}

/// `Rope`, or its adjoint `RopeGrad` (`inverse`: the rotation by −θ).
fn eval_rope<F: Float>(
    ctx: &Ctx,
    args: &[&Tensor<F>],
    arg_tys: &[&TensorType],
    theta: f32,
    inverse: bool,
) -> Result<Tensor<F>, InterpError> {
    ctx.argc(1, args.len())?;
    Ok(Tensor::F(rope(
        ctx.f(args[0])?,
        &arg_tys[0].shape,
        theta as f64,
        inverse,
    )))
}

fn eval_softmax<F: Float>(
    ctx: &Ctx,
    args: &[&Tensor<F>],
    arg_tys: &[&TensorType],
    causal: bool,
) -> Result<Tensor<F>, InterpError> {
    ctx.argc(1, args.len())?;
    Ok(Tensor::F(softmax(
        ctx.f(args[0])?,
        &arg_tys[0].shape,
        causal,
    )))
}

fn eval_cross_entropy<F: Float>(
    ctx: &Ctx,
    args: &[&Tensor<F>],
    arg_tys: &[&TensorType],
) -> Result<Tensor<F>, InterpError> {
    ctx.argc(2, args.len())?;
    let (logits, targets) = (ctx.f(args[0])?, ctx.u(args[1])?);
    let ce = cross_entropy(ctx, logits, targets, arg_tys[0].shape[1])?;
    Ok(Tensor::F(vec![ce]))
}

fn eval_linear_cross_entropy<F: Float>(
    ctx: &Ctx,
    args: &[&Tensor<F>],
    arg_tys: &[&TensorType],
) -> Result<Tensor<F>, InterpError> {
    ctx.argc(3, args.len())?;
    let logits = head_logits(ctx, args, arg_tys)?;
    let v = arg_tys[1].shape[0];
    let ce = cross_entropy(ctx, &logits, ctx.u(args[2])?, v)?;
    Ok(Tensor::F(vec![ce]))
}

fn eval_slice_rows<F: Float>(
    ctx: &Ctx,
    ty: &TensorType,
    args: &[&Tensor<F>],
    arg_tys: &[&TensorType],
    start: usize,
) -> Result<Tensor<F>, InterpError> {
    ctx.argc(1, args.len())?;
    let row = arg_tys[0].numel() / arg_tys[0].shape[0].max(1);
    let range = start * row..start * row + ty.numel();
    Ok(match args[0] {
        Tensor::F(x) => Tensor::F(x[range].to_vec()),
        Tensor::U(x) => Tensor::U(x[range].to_vec()),
    })
}

fn eval_concat_rows<F: Float>(ctx: &Ctx, args: &[&Tensor<F>]) -> Result<Tensor<F>, InterpError> {
    ctx.argc(2, args.len())?;
    Ok(Tensor::F([ctx.f(args[0])?, ctx.f(args[1])?].concat()))
}

fn eval_topk<F: Float>(
    ctx: &Ctx,
    args: &[&Tensor<F>],
    arg_tys: &[&TensorType],
    k: usize,
) -> Result<Tensor<F>, InterpError> {
    ctx.argc(1, args.len())?;
    Ok(Tensor::U(topk(ctx.f(args[0])?, arg_tys[0].shape[1], k)))
}

fn eval_gather_cols<F: Float>(
    ctx: &Ctx,
    args: &[&Tensor<F>],
    arg_tys: &[&TensorType],
) -> Result<Tensor<F>, InterpError> {
    ctx.argc(2, args.len())?;
    let (x, idx) = (ctx.f(args[0])?, ctx.u(args[1])?);
    let (e, k) = (arg_tys[0].shape[1], arg_tys[1].shape[1]);
    let mut out = Vec::with_capacity(idx.len());
    for (i, &c) in idx.iter().enumerate() {
        if c == RouteLayout::NONE {
            out.push(F::ZERO);
            continue;
        }
        if c as usize >= e {
            return Err(ctx.out_of_range("column", c as u64, e as u64));
        }
        out.push(x[(i / k) * e + c as usize]);
    }
    Ok(Tensor::F(out))
}

fn eval_topk_mask<F: Float>(
    ctx: &Ctx,
    args: &[&Tensor<F>],
    arg_tys: &[&TensorType],
    experts: usize,
) -> Result<Tensor<F>, InterpError> {
    ctx.argc(1, args.len())?;
    let idx = ctx.u(args[0])?;
    let k = arg_tys[0].shape[1];
    let mut out = vec![F::ZERO; arg_tys[0].shape[0] * experts];
    for (i, &e) in idx.iter().enumerate() {
        if e == RouteLayout::NONE {
            continue;
        }
        if e as usize >= experts {
            return Err(ctx.out_of_range("expert", e as u64, experts as u64));
        }
        out[(i / k) * experts + e as usize] = F::ONE;
    }
    Ok(Tensor::F(out))
}

fn eval_moe_route<F: Float>(
    ctx: &Ctx,
    args: &[&Tensor<F>],
    layout: &RouteLayout,
) -> Result<Tensor<F>, InterpError> {
    let prio = match args.len() {
        1 => None,
        2 => Some(
            ctx.f(args[1])?
                .iter()
                .map(|&p| p.to_f64())
                .collect::<Vec<f64>>(),
        ),
        n => return Err(ctx.malformed(format!("expected 1 or 2 arguments, got {n}"))),
    };
    route_with(ctx.u(args[0])?, prio.as_deref(), layout)
        .map(Tensor::U)
        .map_err(|e| ctx.out_of_range("expert", e as u64, layout.experts as u64))
}

fn eval_slice_cols<F: Float>(
    ctx: &Ctx,
    ty: &TensorType,
    args: &[&Tensor<F>],
    arg_tys: &[&TensorType],
    start: usize,
    len: usize,
) -> Result<Tensor<F>, InterpError> {
    ctx.argc(1, args.len())?;
    let x = ctx.u(args[0])?;
    let c = arg_tys[0].shape[1];
    let out = (0..ty.numel())
        .map(|i| x[(i / len) * c + start + i % len])
        .collect();
    Ok(Tensor::U(out))
}

fn eval_route_load<F: Float>(
    ctx: &Ctx,
    args: &[&Tensor<F>],
    layout: &RouteLayout,
) -> Result<Tensor<F>, InterpError> {
    ctx.argc(1, args.len())?;
    let table = ctx.u(args[0])?;
    let counts = &table[layout.counts_at()..layout.counts_at() + layout.experts];
    Ok(Tensor::F(
        counts.iter().map(|&c| F::from_f64(c as f64)).collect(),
    ))
}

fn eval_expert_choice<F: Float>(
    ctx: &Ctx,
    args: &[&Tensor<F>],
    arg_tys: &[&TensorType],
    capacity: usize,
) -> Result<Tensor<F>, InterpError> {
    ctx.argc(1, args.len())?;
    let (t, e) = (arg_tys[0].shape[0], arg_tys[0].shape[1]);
    Ok(Tensor::U(expert_choice(ctx.f(args[0])?, t, e, capacity)))
}

fn eval_sinkhorn<F: Float>(
    ctx: &Ctx,
    args: &[&Tensor<F>],
    arg_tys: &[&TensorType],
    iters: usize,
) -> Result<Tensor<F>, InterpError> {
    ctx.argc(1, args.len())?;
    let (t, e) = (arg_tys[0].shape[0], arg_tys[0].shape[1]);
    Ok(Tensor::F(sinkhorn(ctx.f(args[0])?, t, e, iters)))
}

fn eval_auction<F: Float>(
    ctx: &Ctx,
    args: &[&Tensor<F>],
    arg_tys: &[&TensorType],
    params: &AuctionParams,
) -> Result<Tensor<F>, InterpError> {
    ctx.argc(2, args.len())?;
    let (t, e) = (arg_tys[0].shape[0], arg_tys[0].shape[1]);
    Ok(Tensor::U(auction(
        ctx.f(args[0])?,
        ctx.f(args[1])?,
        t,
        e,
        params,
    )))
}

fn eval_moe_gather<F: Float>(
    ctx: &Ctx,
    args: &[&Tensor<F>],
    arg_tys: &[&TensorType],
    layout: &RouteLayout,
) -> Result<Tensor<F>, InterpError> {
    ctx.argc(2, args.len())?;
    let (x, table) = (ctx.f(args[0])?, ctx.u(args[1])?);
    let d = arg_tys[0].shape[1];
    let row_slot = &table[layout.row_slot_at()..layout.row_slot_at() + layout.rows()];
    let mut out = vec![F::ZERO; layout.rows() * d];
    for (r, &slot) in row_slot.iter().enumerate() {
        if slot == RouteLayout::NONE {
            continue;
        }
        let t = slot as usize / layout.k.max(1);
        if t >= layout.tokens {
            return Err(ctx.out_of_range(
                "row_slot",
                slot as u64,
                (layout.tokens * layout.k) as u64,
            ));
        }
        out[r * d..(r + 1) * d].copy_from_slice(&x[t * d..(t + 1) * d]);
    }
    Ok(Tensor::F(out))
}

fn eval_grouped_matmul<F: Float>(
    ctx: &Ctx,
    args: &[&Tensor<F>],
    arg_tys: &[&TensorType],
    layout: &RouteLayout,
) -> Result<Tensor<F>, InterpError> {
    ctx.argc(3, args.len())?;
    let (x, w, table) = (ctx.f(args[0])?, ctx.f(args[1])?, ctx.u(args[2])?);
    let (n, k) = (arg_tys[1].shape[1], arg_tys[1].shape[2]);
    let used = table[layout.offsets_at() + layout.experts] as usize;
    if used > layout.rows() {
        return Err(ctx.out_of_range("used rows", used as u64, layout.rows() as u64 + 1));
    }
    let row_expert = &table[layout.row_expert_at()..layout.row_expert_at() + layout.rows()];
    let mut out = vec![F::ZERO; layout.rows() * n];
    for r in 0..used {
        let e = row_expert[r] as usize;
        if e >= layout.experts {
            return Err(ctx.out_of_range("row_expert", e as u64, layout.experts as u64));
        }
        let xr = &x[r * k..(r + 1) * k];
        for c in 0..n {
            let wr = &w[(e * n + c) * k..(e * n + c + 1) * k];
            out[r * n + c] = dot(xr, wr);
        }
    }
    Ok(Tensor::F(out))
}

fn eval_moe_combine<F: Float>(
    ctx: &Ctx,
    args: &[&Tensor<F>],
    arg_tys: &[&TensorType],
    layout: &RouteLayout,
) -> Result<Tensor<F>, InterpError> {
    ctx.argc(3, args.len())?;
    let (yp, wt, table) = (ctx.f(args[0])?, ctx.f(args[1])?, ctx.u(args[2])?);
    let d = arg_tys[0].shape[1];
    let slot_row = &table[layout.slot_row_at()..layout.slot_row_at() + layout.tokens * layout.k];
    let mut out = vec![F::ZERO; layout.tokens * d];
    for (slot, &row) in slot_row.iter().enumerate() {
        if row == RouteLayout::NONE {
            continue;
        }
        if row as usize >= layout.rows() {
            return Err(ctx.out_of_range("slot_row", row as u64, layout.rows() as u64));
        }
        let t = slot / layout.k;
        let g = wt[slot];
        for i in 0..d {
            out[t * d + i] += g * yp[row as usize * d + i];
        }
    }
    Ok(Tensor::F(out))
}

fn eval_sum_to<F: Float>(
    ctx: &Ctx,
    ty: &TensorType,
    args: &[&Tensor<F>],
    arg_tys: &[&TensorType],
    shape: &[usize],
) -> Result<Tensor<F>, InterpError> {
    ctx.argc(1, args.len())?;
    let x = ctx.f(args[0])?;
    let mut out = vec![F::ZERO; ty.numel()];
    for (&dst, &v) in broadcast_index(&arg_tys[0].shape, shape).iter().zip(x) {
        out[dst] += v;
    }
    Ok(Tensor::F(out))
}

fn eval_broadcast_to<F: Float>(
    ctx: &Ctx,
    args: &[&Tensor<F>],
    arg_tys: &[&TensorType],
    shape: &[usize],
) -> Result<Tensor<F>, InterpError> {
    ctx.argc(1, args.len())?;
    let x = ctx.f(args[0])?;
    Ok(Tensor::F(
        broadcast_index(shape, &arg_tys[0].shape)
            .iter()
            .map(|&i| x[i])
            .collect(),
    ))
}

fn eval_embedding_grad<F: Float>(
    ctx: &Ctx,
    args: &[&Tensor<F>],
    arg_tys: &[&TensorType],
    vocab: usize,
) -> Result<Tensor<F>, InterpError> {
    ctx.argc(2, args.len())?;
    let (ids, g) = (ctx.u(args[0])?, ctx.f(args[1])?);
    let d = arg_tys[1].last();
    let mut out = vec![F::ZERO; vocab * d];
    for (i, &id) in ids.iter().enumerate() {
        if id as usize >= vocab {
            return Err(ctx.out_of_range("token id", id as u64, vocab as u64));
        }
        let row = &mut out[id as usize * d..(id as usize + 1) * d];
        for (o, &v) in row.iter_mut().zip(&g[i * d..(i + 1) * d]) {
            *o += v;
        }
    }
    Ok(Tensor::F(out))
}

fn eval_cross_entropy_grad<F: Float>(
    ctx: &Ctx,
    args: &[&Tensor<F>],
    arg_tys: &[&TensorType],
) -> Result<Tensor<F>, InterpError> {
    ctx.argc(3, args.len())?;
    let (logits, targets, g) = (ctx.f(args[0])?, ctx.u(args[1])?, ctx.f(args[2])?);
    let v = arg_tys[0].shape[1];
    Ok(Tensor::F(cross_entropy_grad(
        ctx, logits, targets, v, g[0],
    )?))
}

fn eval_scatter_cols<F: Float>(
    ctx: &Ctx,
    ty: &TensorType,
    args: &[&Tensor<F>],
    arg_tys: &[&TensorType],
    cols: usize,
) -> Result<Tensor<F>, InterpError> {
    ctx.argc(2, args.len())?;
    let (g, idx) = (ctx.f(args[0])?, ctx.u(args[1])?);
    let k = arg_tys[1].shape[1];
    let mut out = vec![F::ZERO; ty.numel()];
    for (i, &c) in idx.iter().enumerate() {
        if c == RouteLayout::NONE {
            continue;
        }
        if c as usize >= cols {
            return Err(ctx.out_of_range("column", c as u64, cols as u64));
        }
        out[(i / k) * cols + c as usize] += g[i];
    }
    Ok(Tensor::F(out))
}

fn eval_moe_gather_grad<F: Float>(
    ctx: &Ctx,
    args: &[&Tensor<F>],
    arg_tys: &[&TensorType],
    layout: &RouteLayout,
) -> Result<Tensor<F>, InterpError> {
    ctx.argc(2, args.len())?;
    let (gp, table) = (ctx.f(args[0])?, ctx.u(args[1])?);
    let d = arg_tys[0].shape[1];
    let mut out = vec![F::ZERO; layout.tokens * d];
    for (slot, row) in assigned_slots(ctx, table, layout)? {
        let t = slot / layout.k;
        for i in 0..d {
            out[t * d + i] += gp[row * d + i];
        }
    }
    Ok(Tensor::F(out))
}

fn eval_grouped_matmul_grad_x<F: Float>(
    ctx: &Ctx,
    args: &[&Tensor<F>],
    arg_tys: &[&TensorType],
    layout: &RouteLayout,
) -> Result<Tensor<F>, InterpError> {
    ctx.argc(3, args.len())?;
    let (g, w, table) = (ctx.f(args[0])?, ctx.f(args[1])?, ctx.u(args[2])?);
    let (n, k) = (arg_tys[1].shape[1], arg_tys[1].shape[2]);
    let mut out = vec![F::ZERO; layout.rows() * k];
    for (r, e) in used_rows(ctx, table, layout)? {
        let o = &mut out[r * k..(r + 1) * k];
        for c in 0..n {
            let gv = g[r * n + c];
            for (ov, &wv) in o.iter_mut().zip(&w[(e * n + c) * k..(e * n + c + 1) * k]) {
                *ov += gv * wv;
            }
        }
    }
    Ok(Tensor::F(out))
}

fn eval_grouped_matmul_grad_w<F: Float>(
    ctx: &Ctx,
    args: &[&Tensor<F>],
    arg_tys: &[&TensorType],
    layout: &RouteLayout,
) -> Result<Tensor<F>, InterpError> {
    ctx.argc(3, args.len())?;
    let (g, x, table) = (ctx.f(args[0])?, ctx.f(args[1])?, ctx.u(args[2])?);
    let (n, k) = (arg_tys[0].shape[1], arg_tys[1].shape[1]);
    let mut out = vec![F::ZERO; layout.experts * n * k];
    for (r, e) in used_rows(ctx, table, layout)? {
        let xr = &x[r * k..(r + 1) * k];
        for c in 0..n {
            let gv = g[r * n + c];
            for (ov, &xv) in out[(e * n + c) * k..(e * n + c + 1) * k].iter_mut().zip(xr) {
                *ov += gv * xv;
            }
        }
    }
    Ok(Tensor::F(out))
}

fn eval_moe_combine_grad_rows<F: Float>(
    ctx: &Ctx,
    args: &[&Tensor<F>],
    arg_tys: &[&TensorType],
    layout: &RouteLayout,
) -> Result<Tensor<F>, InterpError> {
    ctx.argc(3, args.len())?;
    let (dy, wt, table) = (ctx.f(args[0])?, ctx.f(args[1])?, ctx.u(args[2])?);
    let d = arg_tys[0].shape[1];
    let mut out = vec![F::ZERO; layout.rows() * d];
    for (slot, row) in assigned_slots(ctx, table, layout)? {
        let t = slot / layout.k;
        for i in 0..d {
            out[row * d + i] += wt[slot] * dy[t * d + i];
        }
    }
    Ok(Tensor::F(out))
}

fn eval_moe_combine_grad_weights<F: Float>(
    ctx: &Ctx,
    args: &[&Tensor<F>],
    arg_tys: &[&TensorType],
    layout: &RouteLayout,
) -> Result<Tensor<F>, InterpError> {
    ctx.argc(3, args.len())?;
    let (dy, yp, table) = (ctx.f(args[0])?, ctx.f(args[1])?, ctx.u(args[2])?);
    let d = arg_tys[0].shape[1];
    let mut out = vec![F::ZERO; layout.tokens * layout.k];
    for (slot, row) in assigned_slots(ctx, table, layout)? {
        let t = slot / layout.k;
        out[slot] = dot(&dy[t * d..(t + 1) * d], &yp[row * d..(row + 1) * d]);
    }
    Ok(Tensor::F(out))
}

/// `(slot, padded row)` of every assigned token slot of a routing table (unassigned slots skipped).
fn assigned_slots(
    ctx: &Ctx,
    table: &[u32],
    layout: &RouteLayout,
) -> Result<Vec<(usize, usize)>, InterpError> {
    let slot_row = &table[layout.slot_row_at()..layout.slot_row_at() + layout.tokens * layout.k];
    let mut out = Vec::with_capacity(slot_row.len());
    for (slot, &row) in slot_row.iter().enumerate() {
        if row == RouteLayout::NONE {
            continue;
        }
        if row as usize >= layout.rows() {
            return Err(ctx.out_of_range("slot_row", row as u64, layout.rows() as u64));
        }
        out.push((slot, row as usize));
    }
    Ok(out)
}

/// `(padded row, expert)` of every used padded row (below `offsets[experts]`), as `GroupedMatMul`
/// visits them.
fn used_rows(
    ctx: &Ctx,
    table: &[u32],
    layout: &RouteLayout,
) -> Result<Vec<(usize, usize)>, InterpError> {
    let used = table[layout.offsets_at() + layout.experts] as usize;
    if used > layout.rows() {
        return Err(ctx.out_of_range("used rows", used as u64, layout.rows() as u64 + 1));
    }
    let row_expert = &table[layout.row_expert_at()..layout.row_expert_at() + layout.rows()];
    let mut out = Vec::with_capacity(used);
    for (r, &e) in row_expert[..used].iter().enumerate() {
        if e as usize >= layout.experts {
            return Err(ctx.out_of_range("row_expert", e as u64, layout.experts as u64));
        }
        out.push((r, e as usize));
    }
    Ok(out)
}

fn unary<F: Float>(u: UnaryOp, x: F) -> F {
    let sigmoid = |x: F| F::ONE / (F::ONE + (-x).exp());
    match u {
        UnaryOp::Neg => -x,
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => x.ln(),
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Rsqrt => F::ONE / x.sqrt(),
        UnaryOp::Recip => F::ONE / x,
        UnaryOp::Square => x * x,
        UnaryOp::Tanh => x.tanh(),
        UnaryOp::Relu => x.max(F::ZERO),
        UnaryOp::Silu => x * sigmoid(x),
        UnaryOp::Gelu => {
            let c = F::from_f64((2.0 / std::f64::consts::PI).sqrt());
            let half = F::from_f64(0.5);
            half * x * (F::ONE + (c * (x + F::from_f64(0.044715) * x * x * x)).tanh())
        }
        UnaryOp::Sigmoid => sigmoid(x),
        // max(x, 0) + ln(1 + e^-|x|): no overflow for large |x|.
        UnaryOp::Softplus => x.max(F::ZERO) + (-x.abs()).exp().ln_1p(),
        UnaryOp::Step => {
            if x > F::ZERO {
                F::ONE
            } else {
                F::ZERO
            }
        }
        UnaryOp::NormalCdf => F::from_f64(0.5 * erfc(-x.to_f64() / std::f64::consts::SQRT_2)),
        UnaryOp::NormalPdf => F::from_f64(
            (-0.5 * x.to_f64() * x.to_f64()).exp() / (2.0 * std::f64::consts::PI).sqrt(),
        ),
        UnaryOp::GeluGrad => {
            let c = F::from_f64((2.0 / std::f64::consts::PI).sqrt());
            let a = F::from_f64(0.044715);
            let half = F::from_f64(0.5);
            let t = (c * (x + a * x * x * x)).tanh();
            half * (F::ONE + t)
                + half * x * (F::ONE - t * t) * c * (F::ONE + F::from_f64(3.0) * a * x * x)
        }
    }
}

fn binary<F: Float>(b: BinaryOp, x: F, y: F) -> F {
    match b {
        BinaryOp::Add => x + y,
        BinaryOp::Sub => x - y,
        BinaryOp::Mul => x * y,
        BinaryOp::Div => x / y,
        BinaryOp::Max => x.max(y),
        BinaryOp::Ge => {
            if x >= y {
                F::ONE
            } else {
                F::ZERO
            }
        }
    }
}

fn sum<F: Float>(xs: &[F]) -> F {
    xs.iter().fold(F::ZERO, |a, &b| a + b)
}

fn dot<F: Float>(a: &[F], b: &[F]) -> F {
    a.iter().zip(b).fold(F::ZERO, |s, (&x, &y)| s + x * y)
}

/// Logits `h · wᵀ` of the fused LM head (operands `h, w, ...`), computed whole: the interpreter
/// is the unchunked reference of `head::legalize`.
fn head_logits<F: Float>(
    ctx: &Ctx,
    args: &[&Tensor<F>],
    arg_tys: &[&TensorType],
) -> Result<Vec<F>, InterpError> {
    let (h, w) = (ctx.f(args[0])?, ctx.f(args[1])?);
    Ok(ctx.stored(matmul(h, arg_tys[0], w, arg_tys[1], true)))
}

/// Mean over rows of `logsumexp(row) − row[target]` for `logits[N, V]`.
fn cross_entropy<F: Float>(
    ctx: &Ctx,
    logits: &[F],
    targets: &[u32],
    v: usize,
) -> Result<F, InterpError> {
    let mut total = F::ZERO;
    for (i, &t) in targets.iter().enumerate() {
        if t as usize >= v {
            return Err(ctx.out_of_range("target", t as u64, v as u64));
        }
        let row = &logits[i * v..(i + 1) * v];
        total += logsumexp(row) - row[t as usize];
    }
    Ok(total / F::from_f64(targets.len().max(1) as f64))
}

/// The logits' adjoint of [`cross_entropy`] under the loss adjoint `g`:
/// `(softmax(row) − onehot(target)) · g / N`.
fn cross_entropy_grad<F: Float>(
    ctx: &Ctx,
    logits: &[F],
    targets: &[u32],
    v: usize,
    g: F,
) -> Result<Vec<F>, InterpError> {
    let scale = g / F::from_f64(targets.len().max(1) as f64);
    let mut out = Vec::with_capacity(logits.len());
    for (i, &t) in targets.iter().enumerate() {
        if t as usize >= v {
            return Err(ctx.out_of_range("target", t as u64, v as u64));
        }
        let row = &logits[i * v..(i + 1) * v];
        let lse = logsumexp(row);
        for (j, &x) in row.iter().enumerate() {
            let onehot = if j == t as usize { F::ONE } else { F::ZERO };
            out.push(((x - lse).exp() - onehot) * scale);
        }
    }
    Ok(out)
}

fn logsumexp<F: Float>(row: &[F]) -> F {
    let m = row
        .iter()
        .copied()
        .fold(F::from_f64(f64::NEG_INFINITY), F::max);
    m + sum(&row.iter().map(|&x| (x - m).exp()).collect::<Vec<_>>()).ln()
}

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// For each flat index of `out`, the flat index of the broadcast operand of shape `inp`.
fn broadcast_index(out: &[usize], inp: &[usize]) -> Vec<usize> {
    let n: usize = out.iter().product();
    let pad = out.len() - inp.len();
    let in_strides = strides(inp);
    let out_strides = strides(out);
    (0..n)
        .map(|flat| {
            let mut src = 0;
            for (ax, &dim) in inp.iter().enumerate() {
                let coord = (flat / out_strides[ax + pad]) % out[ax + pad];
                if dim != 1 {
                    src += coord * in_strides[ax];
                }
            }
            src
        })
        .collect()
}

/// For each flat index of the permuted tensor, the flat index in the source of shape `shape`.
fn permute_index(shape: &[usize], perm: &[usize]) -> Vec<usize> {
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let in_strides = strides(shape);
    let out_strides = strides(&out_shape);
    let n: usize = shape.iter().product();
    (0..n)
        .map(|flat| {
            perm.iter()
                .enumerate()
                .map(|(i, &p)| ((flat / out_strides[i]) % out_shape[i]) * in_strides[p])
                .sum()
        })
        .collect()
}

fn matmul<F: Float>(a: &[F], at: &TensorType, b: &[F], bt: &TensorType, trans_b: bool) -> Vec<F> {
    let r = at.shape.len();
    let (m, k) = (at.shape[r - 2], at.shape[r - 1]);
    let br = bt.shape.len();
    let n = if trans_b {
        bt.shape[br - 2]
    } else {
        bt.shape[br - 1]
    };
    let batch: usize = at.shape[..r - 2].iter().product();
    let b_batched = br > 2;
    let mut out = vec![F::ZERO; batch * m * n];
    // Both loop orders sum over k in ascending order; they differ only in memory access (rows of B
    // are contiguous when transposed, so a dot product; otherwise accumulate scaled rows of B).
    for bi in 0..batch {
        let b0 = if b_batched { bi * k * n } else { 0 };
        for i in 0..m {
            let a_row = &a[(bi * m + i) * k..][..k];
            let o_row = &mut out[(bi * m + i) * n..][..n];
            if trans_b {
                for (j, o) in o_row.iter_mut().enumerate() {
                    *o = dot(a_row, &b[b0 + j * k..][..k]);
                }
            } else {
                for (p, &av) in a_row.iter().enumerate() {
                    for (o, &bv) in o_row.iter_mut().zip(&b[b0 + p * n..][..n]) {
                        *o += av * bv;
                    }
                }
            }
        }
    }
    out
}

/// RoPE (rotate_half) on `x[B, T, H, hd]`; `inverse` rotates by the negated angle, which is both the
/// inverse and the adjoint (the transpose of a rotation), i.e. `RopeGrad`.
fn rope<F: Float>(x: &[F], shape: &[usize], theta: f64, inverse: bool) -> Vec<F> {
    let (bsz, t, h, hd) = (shape[0], shape[1], shape[2], shape[3]);
    let half = hd / 2;
    let mut out = x.to_vec();
    for b in 0..bsz {
        for pos in 0..t {
            for head in 0..h {
                let base = ((b * t + pos) * h + head) * hd;
                for i in 0..half {
                    let inv_freq = theta.powf(-2.0 * i as f64 / hd as f64);
                    let angle = pos as f64 * inv_freq;
                    let angle = if inverse { -angle } else { angle };
                    let (cos, sin) = (F::from_f64(angle.cos()), F::from_f64(angle.sin()));
                    let (x1, x2) = (x[base + i], x[base + i + half]);
                    out[base + i] = x1 * cos - x2 * sin;
                    out[base + i + half] = x2 * cos + x1 * sin;
                }
            }
        }
    }
    out
}

fn softmax<F: Float>(x: &[F], shape: &[usize], causal: bool) -> Vec<F> {
    let s = shape.last().copied().unwrap_or(1).max(1);
    let rows_per_matrix = if shape.len() >= 2 {
        shape[shape.len() - 2].max(1)
    } else {
        1
    };
    let mut out = vec![F::ZERO; x.len()];
    for (row_i, (row, o)) in x.chunks(s).zip(out.chunks_mut(s)).enumerate() {
        let visible = if causal {
            (row_i % rows_per_matrix) % s + 1
        } else {
            s
        };
        let m = row[..visible]
            .iter()
            .copied()
            .fold(F::from_f64(f64::NEG_INFINITY), F::max);
        let e: Vec<F> = row[..visible].iter().map(|&v| (v - m).exp()).collect();
        let total = sum(&e);
        for (oi, ei) in o.iter_mut().zip(e) {
            *oi = ei / total;
        }
    }
    out
}

/// Row-wise top-k indices, descending by score, ties to the lower index (a stable sort).
fn topk<F: Float>(x: &[F], e: usize, k: usize) -> Vec<u32> {
    let mut out = Vec::with_capacity(x.len() / e.max(1) * k);
    for row in x.chunks(e) {
        let mut order: Vec<usize> = (0..e).collect();
        order.sort_by(|&i, &j| row[j].to_f64().total_cmp(&row[i].to_f64()));
        out.extend(order[..k].iter().map(|&i| i as u32));
    }
    out
}

/// Builds the dropless routing table of [`RouteLayout`] from `idx[T, k]` (see [`route_with`]).
pub fn route(idx: &[u32], layout: &RouteLayout) -> Result<Vec<u32>, u32> {
    route_with(idx, None, layout)
}

/// Builds the routing table of [`RouteLayout`] from `idx[T, k]`; `Err(expert)` for an id out of
/// range (other than `NONE`, which leaves its slot unassigned).
///
/// An expert keeps at most `layout.capacity` of the slots routed to it: those of highest `prio`
/// (ties to the lower slot) when given, else the first in slot order (`t * k + j`: token order).
/// Kept slots are placed in each expert's segment in ascending slot order, so routing is
/// deterministic; dropped and `NONE` slots get `slot_row = NONE`. Padding rows have `row_slot = NONE`
/// and belong to the segment's expert; rows at and past `offsets[experts]` (unused worst-case rows)
/// have `row_slot = NONE` and `row_expert = NONE`.
pub fn route_with(
    idx: &[u32],
    prio: Option<&[f64]>,
    layout: &RouteLayout,
) -> Result<Vec<u32>, u32> {
    let (e_n, tile) = (layout.experts, layout.tile.max(1));
    let mut table = vec![0u32; layout.table_len()];
    let mut slots: Vec<Vec<usize>> = vec![Vec::new(); e_n];
    for (s, &e) in idx.iter().enumerate() {
        if e == RouteLayout::NONE {
            continue;
        }
        if e as usize >= e_n {
            return Err(e);
        }
        slots[e as usize].push(s);
    }
    for list in &mut slots {
        if list.len() > layout.capacity {
            if let Some(p) = prio {
                list.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
            }
            list.truncate(layout.capacity);
            list.sort_unstable();
        }
    }
    let mut offsets = vec![0usize; e_n + 1];
    for e in 0..e_n {
        offsets[e + 1] = offsets[e] + slots[e].len().div_ceil(tile) * tile;
    }
    for e in 0..e_n {
        table[layout.counts_at() + e] = slots[e].len() as u32;
    }
    for (e, &o) in offsets.iter().enumerate() {
        table[layout.offsets_at() + e] = o as u32;
    }
    let rows = layout.rows();
    let (rs, re, sr) = (
        layout.row_slot_at(),
        layout.row_expert_at(),
        layout.slot_row_at(),
    );
    table[rs..rs + rows].fill(RouteLayout::NONE);
    table[re..re + rows].fill(RouteLayout::NONE);
    table[sr..sr + layout.tokens * layout.k].fill(RouteLayout::NONE);
    for e in 0..e_n {
        table[re + offsets[e]..re + offsets[e + 1]].fill(e as u32);
        for (i, &slot) in slots[e].iter().enumerate() {
            let row = offsets[e] + i;
            table[sr + slot] = row as u32;
            table[rs + row] = slot as u32;
        }
    }
    Ok(table)
}

/// [`Op::ExpertChoice`]: `[t, e] = e` when `t` is among the `capacity` tokens of highest
/// `scores[·, e]` (ties to the lower token), else `NONE`.
pub fn expert_choice<F: Float>(scores: &[F], t_n: usize, e_n: usize, capacity: usize) -> Vec<u32> {
    let mut out = vec![RouteLayout::NONE; t_n * e_n];
    for e in 0..e_n {
        for t in 0..t_n {
            let s = scores[t * e_n + e];
            let rank = (0..t_n)
                .filter(|&u| {
                    let o = scores[u * e_n + e];
                    o > s || (o == s && u < t)
                })
                .count();
            if rank < capacity {
                out[t * e_n + e] = e as u32;
            }
        }
    }
    out
}

/// [`Op::Sinkhorn`] with exactly the arithmetic its doc comment gives (the GPU kernel mirrors it).
pub fn sinkhorn<F: Float>(logits: &[F], t_n: usize, e_n: usize, iters: usize) -> Vec<F> {
    let eps = F::from_f64(1e-8);
    let c: Vec<F> = logits
        .chunks(e_n.max(1))
        .flat_map(|row| {
            let m = row
                .iter()
                .copied()
                .fold(F::from_f64(f64::NEG_INFINITY), F::max);
            row.iter().map(move |&x| (x - m).exp()).collect::<Vec<F>>()
        })
        .collect();
    let (inv_t, inv_e) = (
        F::ONE / F::from_f64(t_n as f64),
        F::ONE / F::from_f64(e_n as f64),
    );
    let mut d1 = vec![F::ONE; e_n];
    let mut d0 = vec![F::ONE; t_n];
    for _ in 0..iters {
        for t in 0..t_n {
            let mut s = F::ZERO;
            for e in 0..e_n {
                s += d1[e] * c[t * e_n + e];
            }
            d0[t] = inv_t / (s + eps);
        }
        for e in 0..e_n {
            let mut s = F::ZERO;
            for t in 0..t_n {
                s += d0[t] * c[t * e_n + e];
            }
            d1[e] = inv_e / (s + eps);
        }
    }
    (0..t_n * e_n)
        .map(|i| d1[i % e_n] * c[i] * d0[i / e_n])
        .collect()
}

/// The knobs of [`Op::Auction`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AuctionParams {
    pub rounds: usize,
    pub epsilon: f64,
    pub budget: f64,
    pub capacity: usize,
    pub k: usize,
}

/// Standing-bid sentinel of the auction: "token does not hold this expert" (−FLT_MAX, as on the GPU).
const NO_BID: f64 = -3.402_823_466e38;

/// [`Op::Auction`]: the Jacobi auction of docs/language.md, steps 1–2, from values `v[T, E]` and start
/// prices `[E]`. Returns u32 `[T, k + E]`: per token the won experts ascending, then `NONE`, then `E`
/// zeros (the GPU's working space, cleared).
///
/// Each of `rounds` rounds has two phases, both against the state at the phase's start (Jacobi):
/// 1. Bids. A token holding `h < k` experts has `u = k − h` open slots. Its candidates are the
///    experts it does not hold, ordered by net value `n_e = v[t,e] − price_e` (descending, ties to the
///    lower expert). With `n_next` the net of the `(u+1)`-th candidate, or `−budget` when there is
///    none, floored at `−budget` (the outside option: staying unassigned), it bids on each of its
///    first `u` candidates with `n_e ≥ −budget` the amount
///    `min(price_e + (n_e − n_next) + epsilon, v[t,e] + budget)` (raising the price by the margin over
///    the next-best option plus epsilon, never paying more than its value plus its budget).
/// 2. Acceptance. Each expert ranks its standing bids and the new ones by (amount descending, token
///    ascending) and keeps the first `capacity`; the rest (displaced holders included) are dropped
///    and bid again next round. An expert holding `capacity` bids prices at its lowest kept bid.
///
/// No expert ever holds more than `capacity` tokens, and no token holds an expert twice.
pub fn auction<F: Float>(
    v: &[F],
    prices: &[F],
    t_n: usize,
    e_n: usize,
    p: &AuctionParams,
) -> Vec<u32> {
    let no_bid = F::from_f64(NO_BID);
    let (eps, budget) = (F::from_f64(p.epsilon), F::from_f64(p.budget));
    let mut price: Vec<F> = prices.to_vec();
    let mut bid = vec![no_bid; t_n * e_n];
    for _ in 0..p.rounds {
        // 1. Bids, all against this round's prices.
        for t in 0..t_n {
            let row = &bid[t * e_n..(t + 1) * e_n];
            let held = row.iter().filter(|&&b| b != no_bid).count();
            let open = p.k.saturating_sub(held);
            if open == 0 {
                continue;
            }
            let mut cand: Vec<usize> = (0..e_n).filter(|&e| row[e] == no_bid).collect();
            let net = |e: usize| v[t * e_n + e] - price[e];
            cand.sort_by(|&a, &b| {
                net(b)
                    .partial_cmp(&net(a))
                    .unwrap_or(std::cmp::Ordering::Equal)
                    .then(a.cmp(&b))
            });
            let mut n_next = cand.get(open).map_or(-budget, |&e| net(e));
            if n_next < -budget {
                n_next = -budget;
            }
            for &e in cand.iter().take(open) {
                let n = net(e);
                if n < -budget {
                    break;
                }
                let amount = price[e] + (n - n_next) + eps;
                let cap = v[t * e_n + e] + budget;
                bid[t * e_n + e] = if amount < cap { amount } else { cap };
            }
        }
        // 2. Acceptance: each expert keeps its best `capacity` bids.
        for e in 0..e_n {
            let mut holders: Vec<(usize, F)> = (0..t_n)
                .map(|t| (t, bid[t * e_n + e]))
                .filter(|&(_, b)| b != no_bid)
                .collect();
            holders.sort_by(|a, b| {
                b.1.partial_cmp(&a.1)
                    .unwrap_or(std::cmp::Ordering::Equal)
                    .then(a.0.cmp(&b.0))
            });
            for &(t, _) in holders.iter().skip(p.capacity) {
                bid[t * e_n + e] = no_bid;
            }
            if holders.len() >= p.capacity {
                price[e] = holders[p.capacity - 1].1;
            }
        }
    }
    let mut out = vec![0u32; t_n * (p.k + e_n)];
    for t in 0..t_n {
        let row = &mut out[t * (p.k + e_n)..t * (p.k + e_n) + p.k];
        row.fill(RouteLayout::NONE);
        let won = (0..e_n).filter(|&e| bid[t * e_n + e] != no_bid);
        for (slot, e) in row.iter_mut().zip(won) {
            *slot = e as u32;
        }
    }
    out
}

/// erfc in f64 to ~1e-13: the Maclaurin series of erf for |x| < 3, Laplace's continued fraction
/// beyond (both converge fast there), so that `NormalCdf` and its derivative `NormalPdf` agree under
/// finite differences.
fn erfc(x: f64) -> f64 {
    if x.abs() < 3.0 {
        let (mut term, mut sum, x2) = (x, x, x * x);
        for n in 1..200 {
            term *= -x2 / n as f64;
            let add = term / (2 * n + 1) as f64;
            sum += add;
            if add.abs() < 1e-17 * sum.abs() {
                break;
            }
        }
        1.0 - sum * 2.0 / std::f64::consts::PI.sqrt()
    } else if x > 0.0 {
        // erfc(x) = e^{-x²}/√π · 1/(x + (1/2)/(x + 1/(x + (3/2)/(x + …)))), evaluated bottom-up.
        let mut f = x;
        for n in (1..60).rev() {
            f = x + (n as f64 / 2.0) / f;
        }
        (-x * x).exp() / std::f64::consts::PI.sqrt() / f
    } else {
        2.0 - erfc(-x)
    }
}
