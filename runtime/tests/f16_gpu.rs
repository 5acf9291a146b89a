//! `precision = f16` kernels on the GPU against the interpreter's f16 mode (values the graph stores
//! in f16 rounded where they are computed), op by op, in every (matmul variant, fused)
//! configuration of `support::compare`.
//!
//! Each op under test reads operands stored in f16 (its float inputs pass through an identity
//! `Affine` first) and its result is stored in f16 (an identity `Affine` after it makes it a
//! non-output); the pass must mark both. Tolerance: 2⁻⁹·(|reference| + max |reference|), a couple
//! of f16 rounding steps at the output's scale. The kernels compute in f32 and round where they
//! store, while the f64 interpreter rounds exact values, so the two may round to neighbouring
//! halves; fused groups keep their inner values in f32 registers where the interpreter rounds them.

mod support;

use moec_compiler::interp::Value;
use moec_compiler::ir::{
    BinaryOp, DType, Graph, Init, NodeId, Op, ReduceOp, RouteLayout, TensorType, UnaryOp,
};
use moec_compiler::precision::mark_f16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use support::add;

const TOL: f64 = 1.0 / 512.0;

fn tol(w: f64, scale: f64) -> f64 {
    TOL * (w + scale)
}

/// An identity copy: its result is stored in f16 when its consumers can read f16.
fn stored(g: &mut Graph, x: NodeId, label: &str) -> NodeId {
    add(g, Op::Affine { mul: 1.0, add: 0.0 }, &[x], label)
}

/// An f32 input read by the op under test from an f16 copy.
fn input(g: &mut Graph, name: &str, shape: &[usize]) -> NodeId {
    let x = g.input(name, TensorType::f32(shape));
    stored(g, x, &format!("{name}.f16"))
}

/// Makes `y` (the op under test) a stored value read by an f32 output named `name`.
fn output(g: &mut Graph, name: &str, y: NodeId) {
    let out = stored(g, y, &format!("{name}.out"));
    g.set_output(name, out);
}

fn feeds(g: &Graph, seed: u64, bounds: &[(&str, u32)]) -> HashMap<String, Value> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = HashMap::new();
    let leaves = g
        .params()
        .into_iter()
        .map(|(_, n, t)| (n, t))
        .chain(g.data_inputs().into_iter().map(|(_, n, t)| (n, t)));
    for (name, ty) in leaves {
        let v = match ty.dtype {
            DType::U32 => {
                let bound = bounds.iter().find(|(n, _)| *n == name).map_or(7, |b| b.1);
                Value::U32(
                    (0..ty.numel())
                        .map(|_| rng.random_range(0..bound))
                        .collect(),
                )
            }
            _ => Value::F32(
                (0..ty.numel())
                    .map(|_| rng.random_range(-2.0f32..2.0))
                    .collect(),
            ),
        };
        out.insert(name, v);
    }
    out
}

/// Marks the graph, checks that `f16` nodes are stored in f16, and compares with the f16 mode.
fn check(mut g: Graph, f16: &[NodeId], feeds: &HashMap<String, Value>) {
    mark_f16(&mut g);
    for &n in f16 {
        assert_eq!(g.ty(n).dtype, DType::F16, "{}", g.node(n).label);
    }
    let worst = support::compare(&g, feeds, &tol);
    let mut worst: Vec<_> = worst.into_iter().collect();
    worst.sort_by(|a, b| a.0.cmp(&b.0));
    eprintln!("largest |gpu - f16 interpreter| per output: {worst:?}");
}

#[test]
fn f16_elementwise_row_softmax_matmul_and_layout_kernels() {
    let mut g = Graph::new();
    let x = input(&mut g, "x", &[3, 5, 8]);
    let r = input(&mut g, "r", &[5, 1]);
    let silu = add(&mut g, Op::Unary(UnaryOp::Silu), &[x], "silu");
    let gelu = add(&mut g, Op::Unary(UnaryOp::Gelu), &[silu], "gelu");
    let mul = add(&mut g, Op::Binary(BinaryOp::Mul), &[gelu, r], "mul");
    // RMSNorm: the statistic stays f32, the normalised rows are stored f16.
    let sq = add(&mut g, Op::Unary(UnaryOp::Square), &[x], "sq");
    let ms = add(&mut g, Op::Reduce(ReduceOp::Mean), &[sq], "ms");
    let eps = add(
        &mut g,
        Op::Affine {
            mul: 1.0,
            add: 1e-5,
        },
        &[ms],
        "eps",
    );
    let inv = add(&mut g, Op::Unary(UnaryOp::Rsqrt), &[eps], "inv");
    let norm = add(&mut g, Op::Binary(BinaryOp::Mul), &[x, inv], "norm");
    let s = input(&mut g, "s", &[2, 2, 6, 6]);
    let causal = add(&mut g, Op::Softmax { causal: true }, &[s], "softmax");
    let a = input(&mut g, "a", &[2, 5, 7]);
    let b = input(&mut g, "b", &[2, 6, 7]);
    let mm = add(&mut g, Op::MatMul { trans_b: true }, &[a, b], "matmul");
    let w = g.param("w", &[7, 9], Init::Constant(0.0));
    let shared = add(
        &mut g,
        Op::MatMul { trans_b: false },
        &[a, w],
        "matmul_shared",
    );
    let perm = add(
        &mut g,
        Op::Permute {
            perm: vec![2, 0, 1],
        },
        &[x],
        "permute",
    );
    let q = input(&mut g, "q", &[2, 7, 3, 6]);
    let rope = add(&mut g, Op::Rope { theta: 500.0 }, &[q], "rope");
    let rope_grad = add(&mut g, Op::RopeGrad { theta: 500.0 }, &[q], "rope_grad");
    let table = g.param("table", &[11, 6], Init::Constant(0.0));
    let ids = g.input("ids", TensorType::u32(&[3, 7]));
    let emb = add(&mut g, Op::Embedding, &[table, ids], "embedding");
    let tested = [
        ("mul", mul),
        ("norm", norm),
        ("softmax", causal),
        ("matmul", mm),
        ("matmul_shared", shared),
        ("permute", perm),
        ("rope", rope),
        ("rope_grad", rope_grad),
        ("embedding", emb),
    ];
    for (name, id) in tested {
        output(&mut g, name, id);
    }
    let sum = add(&mut g, Op::SumTo { shape: vec![5, 1] }, &[x], "sum_to");
    g.set_output("sum_to", sum);
    let f = feeds(&g, 3, &[("ids", 11)]);
    check(g, &tested.map(|(_, id)| id), &f);
}

#[test]
fn f16_moe_forward_and_gradient_kernels() {
    let (t, k, e, d, hidden) = (23, 2, 5, 9, 13);
    let layout = RouteLayout::dropless(t, k, e, 4);
    let mut g = Graph::new();
    let x = input(&mut g, "x", &[t, d]);
    let idx = g.input("idx", TensorType::u32(&[t, k]));
    let gates = g.input("gates", TensorType::f32(&[t, k]));
    let w1 = g.param("w1", &[e, hidden, d], Init::Constant(0.0));
    let route = add(&mut g, Op::MoeRoute { layout }, &[idx], "route");
    let xp = add(&mut g, Op::MoeGather { layout }, &[x, route], "gather");
    let h = add(
        &mut g,
        Op::GroupedMatMul { layout },
        &[xp, w1, route],
        "grouped",
    );
    let yp = input(&mut g, "yp", &[layout.rows(), d]);
    let comb = add(
        &mut g,
        Op::MoeCombine { layout },
        &[yp, gates, route],
        "combine",
    );
    let gh = input(&mut g, "gh", &[layout.rows(), hidden]);
    let gx = add(
        &mut g,
        Op::GroupedMatMulGradX { layout },
        &[gh, w1, route],
        "grad_x",
    );
    let gw = add(
        &mut g,
        Op::GroupedMatMulGradW { layout },
        &[gh, xp, route],
        "grad_w",
    );
    let gg = add(
        &mut g,
        Op::MoeGatherGrad { layout },
        &[yp, route],
        "gather_grad",
    );
    let dy = input(&mut g, "dy", &[t, d]);
    let rows = add(
        &mut g,
        Op::MoeCombineGradRows { layout },
        &[dy, gates, route],
        "combine_rows",
    );
    let cw = add(
        &mut g,
        Op::MoeCombineGradWeights { layout },
        &[dy, yp, route],
        "combine_w",
    );
    let ids = g.input("ids", TensorType::u32(&[t]));
    let eg = add(
        &mut g,
        Op::EmbeddingGrad { vocab: 11 },
        &[ids, dy],
        "embedding_grad",
    );
    let tested = [
        ("gather", xp),
        ("grouped", h),
        ("combine", comb),
        ("grad_x", gx),
        ("gather_grad", gg),
        ("combine_rows", rows),
    ];
    for (name, id) in tested {
        output(&mut g, name, id);
    }
    // f32 results of f16 operands: parameter gradients and router-weight gradients.
    for (name, id) in [("grad_w", gw), ("combine_w", cw), ("embedding_grad", eg)] {
        g.set_output(name, id);
    }
    let f = feeds(&g, 4, &[("idx", 5), ("ids", 11)]);
    check(g, &tested.map(|(_, id)| id), &f);
}
