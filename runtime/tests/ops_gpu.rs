//! Per-op GPU tests: every kernel the emitter generates, run on the adapter wgpu finds (lavapipe on a
//! machine without a GPU), against the reference interpreter in f64 on random inputs.
//!
//! Each graph runs in six configurations: register-blocked with and without subgroup-shared loads
//! and shared-tiled (whatever the adapter) × fused and unfused. Shapes are deliberately odd (not
//! multiples of the workgroup or block sizes). Tolerance: |gpu - ref| ≤ 1e-5 + 1e-4·|ref| for f32 (the GPU computes in
//! f32 with a different summation order), exact equality for u32 outputs (indices, routing table).

use moec_compiler::emit::{emit, MatmulVariant, Target};
use moec_compiler::fuse::{fuse, FuseOptions, GroupKind};
use moec_compiler::interp::{self, Value};
use moec_compiler::ir::{
    BinaryOp, DType, Graph, Init, Op, ReduceOp, RouteLayout, TensorType, UnaryOp,
};
use moec_runtime::Executor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use support::{add, gpu, moe_adjoints, run_gpu};

mod support;

const ABS: f64 = 1e-5;
const REL: f64 = 1e-4;

/// Random feeds for every Param and Input: f32 ~ U(-2, 2), u32 < `bound` (per name, else 7).
fn feeds(graph: &Graph, seed: u64, bounds: &[(&str, u32)]) -> HashMap<String, Value> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = HashMap::new();
    let leaves = graph
        .params()
        .into_iter()
        .map(|(_, n, t)| (n, t))
        .chain(graph.data_inputs().into_iter().map(|(_, n, t)| (n, t)));
    for (name, ty) in leaves {
        let v = match ty.dtype {
            DType::F32 | DType::F16 => Value::F32(
                (0..ty.numel())
                    .map(|_| rng.random_range(-2.0f32..2.0))
                    .collect(),
            ),
            DType::U32 => {
                let bound = bounds
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, b)| *b)
                    .unwrap_or(7);
                Value::U32(
                    (0..ty.numel())
                        .map(|_| rng.random_range(0..bound))
                        .collect(),
                )
            }
        };
        out.insert(name, v);
    }
    out
}

/// The adapter's target with `variant`, every product on the block that runs fastest (these ops
/// are small enough that a CPU adapter would give them all its compile-bound block, which the
/// training-graph tests cover).
fn target(variant: MatmulVariant) -> Target {
    Target {
        matmul: variant,
        small_product_macs: 0,
        ..gpu().target()
    }
}

/// The adapter's targets for both matmul variants, plus register blocking without subgroup sharing
/// (what GPUs run for grouped matmuls, and CPU adapters without fixed-size subgroups).
fn targets() -> [Target; 3] {
    [
        target(MatmulVariant::RegisterBlocked),
        Target {
            subgroup_size: 0,
            ..target(MatmulVariant::RegisterBlocked)
        },
        target(MatmulVariant::SharedTiled),
    ]
}

/// Compares every output of `graph` on the GPU (each of [`targets`], fused and unfused) with the f64
/// interpreter.
fn check(graph: &Graph, feeds: &HashMap<String, Value>) {
    let wide: HashMap<String, Value> = feeds
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                match v {
                    Value::F32(x) => Value::F64(x.iter().map(|&a| f64::from(a)).collect()),
                    other => other.clone(),
                },
            )
        })
        .collect();
    let expected = interp::run_outputs(graph, &wide).unwrap();
    for t in targets() {
        for fused in [true, false] {
            let got = run_gpu(graph, feeds, &t, fused);
            for (name, id) in &graph.outputs {
                let want = expected[name].to_f64();
                let have = &got[name];
                assert_eq!(want.len(), have.len(), "{name}");
                let exact = graph.ty(*id).dtype == DType::U32;
                for (i, (w, h)) in want.iter().zip(have).enumerate() {
                    let ok = if exact {
                        w == h
                    } else {
                        (w - h).abs() <= ABS + REL * w.abs()
                    };
                    assert!(ok, "{name}[{i}]: gpu {h} vs reference {w} ({:?}, subgroups {}, fused = {fused})", t.matmul, t.subgroup_size);
                }
            }
        }
    }
}

#[test]
fn elementwise_ops_with_broadcasting() {
    let mut g = Graph::new();
    let x = g.input("x", TensorType::f32(&[3, 37, 5]));
    let row = g.input("row", TensorType::f32(&[37, 1]));
    let col = g.param("col", &[5], Init::Constant(0.0));
    let one = g.param("one", &[1], Init::Constant(0.0));
    let mid = g.param("mid", &[3, 1, 5], Init::Constant(0.0));
    let pos = add(&mut g, Op::Unary(UnaryOp::Square), &[x], "sq");
    let pos = add(
        &mut g,
        Op::Affine {
            mul: 1.5,
            add: 0.25,
        },
        &[pos],
        "pos",
    );
    let mut outs = Vec::new();
    for u in [UnaryOp::Log, UnaryOp::Sqrt, UnaryOp::Rsqrt, UnaryOp::Recip] {
        outs.push(add(&mut g, Op::Unary(u), &[pos], &format!("{u:?}")));
    }
    for u in [
        UnaryOp::Neg,
        UnaryOp::Exp,
        UnaryOp::Tanh,
        UnaryOp::Relu,
        UnaryOp::Silu,
        UnaryOp::Gelu,
        UnaryOp::Sigmoid,
        UnaryOp::Softplus,
    ] {
        outs.push(add(&mut g, Op::Unary(u), &[x], &format!("{u:?}")));
    }
    for (i, (bop, other)) in [
        (BinaryOp::Add, row),
        (BinaryOp::Sub, col),
        (BinaryOp::Mul, one),
        (BinaryOp::Div, pos),
        (BinaryOp::Max, mid),
    ]
    .into_iter()
    .enumerate()
    {
        outs.push(add(
            &mut g,
            Op::Binary(bop),
            &[x, other],
            &format!("bin{i}"),
        ));
    }
    // Broadcast the other way round: the smaller operand first.
    outs.push(add(&mut g, Op::Binary(BinaryOp::Sub), &[row, x], "rev"));
    for (i, o) in outs.into_iter().enumerate() {
        g.set_output(&format!("o{i}"), o);
    }
    check(&g, &feeds(&g, 1, &[]));
}

#[test]
fn elementwise_grid_past_65535_workgroups() {
    // 65536 · 256 + 77 elements: more than 65535 workgroups of 256 in x, folded into y.
    let n = 65_536 * 256 + 77;
    let mut g = Graph::new();
    let x = g.input("x", TensorType::f32(&[n]));
    let y = add(
        &mut g,
        Op::Affine {
            mul: 2.0,
            add: -1.0,
        },
        &[x],
        "y",
    );
    let y = add(&mut g, Op::Unary(UnaryOp::Relu), &[y], "relu");
    g.set_output("y", y);
    let xs: Vec<f32> = (0..n).map(|i| ((i % 1013) as f32) / 1013.0).collect();
    let t = target(MatmulVariant::RegisterBlocked);
    let plan = emit(&g, &fuse(&g, FuseOptions::for_target(&t)), &t).unwrap();
    assert!(
        plan.dispatches[0].workgroups[1] > 1,
        "grid {:?} was not folded",
        plan.dispatches[0].workgroups
    );
    let got = run_gpu(
        &g,
        &HashMap::from([("x".to_string(), Value::F32(xs.clone()))]),
        &t,
        true,
    );
    for (i, (&a, &h)) in xs.iter().zip(&got["y"]).enumerate() {
        assert_eq!(h as f32, (a * 2.0 - 1.0).max(0.0), "y[{i}]");
    }
}

#[test]
fn grids_fold_into_z_on_small_limits() {
    // A target that allows only 7 workgroups per dimension forces x, y and z folding on small shapes.
    let mut g = Graph::new();
    let x = g.input("x", TensorType::f32(&[61, 67]));
    let w = g.param("w", &[45, 67], Init::Constant(0.0));
    let s = add(&mut g, Op::Unary(UnaryOp::Silu), &[x], "s");
    let m = add(&mut g, Op::MatMul { trans_b: true }, &[s, w], "m");
    let r = add(&mut g, Op::Softmax { causal: false }, &[m], "r");
    g.set_output("s", s);
    g.set_output("r", r);
    let f = feeds(&g, 2, &[]);
    let wide: HashMap<String, Value> = f
        .iter()
        .map(|(k, v)| (k.clone(), Value::F64(v.to_f64())))
        .collect();
    let want = interp::run_outputs(&g, &wide).unwrap();
    for variant in [MatmulVariant::RegisterBlocked, MatmulVariant::SharedTiled] {
        let t = Target {
            max_workgroups_per_dim: 7,
            ..target(variant)
        };
        let got = run_gpu(&g, &f, &t, false);
        for name in ["s", "r"] {
            for (w, h) in want[name].to_f64().iter().zip(&got[name]) {
                assert!(
                    (w - h).abs() <= ABS + REL * w.abs(),
                    "{name}: {h} vs {w} ({variant:?})"
                );
            }
        }
    }
}

#[test]
fn reductions_and_fused_rmsnorm() {
    let mut g = Graph::new();
    let x = g.input("x", TensorType::f32(&[3, 5, 67]));
    let w = g.param("w", &[67], Init::Constant(1.0));
    for (i, r) in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max]
        .into_iter()
        .enumerate()
    {
        let y = add(&mut g, Op::Reduce(r), &[x], &format!("r{i}"));
        g.set_output(&format!("r{i}"), y);
    }
    // RMSNorm with the residual add as prologue; the residual is also an output (materialised).
    let res = g.input("res", TensorType::f32(&[3, 5, 67]));
    let h = add(&mut g, Op::Binary(BinaryOp::Add), &[x, res], "h");
    let sq = add(&mut g, Op::Unary(UnaryOp::Square), &[h], "sq");
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
    let rs = add(&mut g, Op::Unary(UnaryOp::Rsqrt), &[eps], "rs");
    let xn = add(&mut g, Op::Binary(BinaryOp::Mul), &[h, rs], "xn");
    let y = add(&mut g, Op::Binary(BinaryOp::Mul), &[xn, w], "y");
    g.set_output("h", h);
    g.set_output("rs", rs);
    g.set_output("y", y);
    // A reduction over a one-column axis.
    let ms1 = add(&mut g, Op::Reduce(ReduceOp::Sum), &[ms], "ms1");
    g.set_output("ms1", ms1);
    check(&g, &feeds(&g, 3, &[]));
}

#[test]
fn softmax_plain_causal_and_grouped_query() {
    let mut g = Graph::new();
    let s = g.input("s", TensorType::f32(&[2, 3, 9, 9]));
    let gq = g.input("gq", TensorType::f32(&[2, 18, 9]));
    let wide = g.input("wide", TensorType::f32(&[5, 131]));
    let scaled = add(
        &mut g,
        Op::Affine {
            mul: 0.35,
            add: 0.0,
        },
        &[s],
        "scaled",
    );
    let p = add(&mut g, Op::Softmax { causal: true }, &[scaled], "p");
    let pg = add(&mut g, Op::Softmax { causal: true }, &[gq], "pg");
    let pw = add(&mut g, Op::Softmax { causal: false }, &[wide], "pw");
    // Epilogue: the probabilities feed another elementwise op in the same row kernel.
    let pe = add(&mut g, Op::Unary(UnaryOp::Sqrt), &[pw], "pe");
    g.set_output("p", p);
    g.set_output("pg", pg);
    g.set_output("pe", pe);
    check(&g, &feeds(&g, 4, &[]));
}

#[test]
fn matmuls_batched_shared_transposed_with_epilogues() {
    let mut g = Graph::new();
    // Batched, B batched, odd sizes.
    let a = g.input("a", TensorType::f32(&[3, 13, 17]));
    let b = g.input("b", TensorType::f32(&[3, 17, 11]));
    let ab = add(&mut g, Op::MatMul { trans_b: false }, &[a, b], "ab");
    g.set_output("ab", ab);
    // Batched A, shared transposed weight, crossing the 64-wide tile, with bias + gelu + residual.
    let x = g.input("x", TensorType::f32(&[2, 67, 45]));
    let w = g.param("w", &[71, 45], Init::Constant(0.0));
    let bias = g.param("bias", &[71], Init::Constant(0.0));
    let res = g.input("res", TensorType::f32(&[2, 67, 71]));
    let xw = add(&mut g, Op::MatMul { trans_b: true }, &[x, w], "xw");
    let xb = add(&mut g, Op::Binary(BinaryOp::Add), &[xw, bias], "xb");
    let ge = add(&mut g, Op::Unary(UnaryOp::Gelu), &[xb], "gelu");
    let out = add(&mut g, Op::Binary(BinaryOp::Add), &[res, ge], "out");
    g.set_output("out", out);
    g.set_output("xw", xw);
    // Shared non-transposed B and a 1-row matmul.
    let v = g.input("v", TensorType::f32(&[1, 45]));
    let wn = g.param("wn", &[45, 9], Init::Constant(0.0));
    let vw = add(&mut g, Op::MatMul { trans_b: false }, &[v, wn], "vw");
    g.set_output("vw", vw);
    // SwiGLU from two matmuls: silu(a) * b fuses into the second one's epilogue.
    let w1 = g.param("w1", &[19, 45], Init::Constant(0.0));
    let w3 = g.param("w3", &[19, 45], Init::Constant(0.0));
    let h1 = add(&mut g, Op::MatMul { trans_b: true }, &[x, w1], "h1");
    let h3 = add(&mut g, Op::MatMul { trans_b: true }, &[x, w3], "h3");
    let si = add(&mut g, Op::Unary(UnaryOp::Silu), &[h1], "silu");
    let sw = add(&mut g, Op::Binary(BinaryOp::Mul), &[si, h3], "swiglu");
    g.set_output("swiglu", sw);
    check(&g, &feeds(&g, 5, &[]));
}

#[test]
fn layout_and_nn_composites() {
    let mut g = Graph::new();
    let x = g.input("x", TensorType::f32(&[2, 3, 4, 5]));
    let p1 = add(
        &mut g,
        Op::Permute {
            perm: vec![0, 2, 1, 3],
        },
        &[x],
        "p1",
    );
    let p2 = add(
        &mut g,
        Op::Permute {
            perm: vec![3, 1, 0, 2],
        },
        &[x],
        "p2",
    );
    let ids = g.input("ids", TensorType::u32(&[3, 7]));
    let pu = add(&mut g, Op::Permute { perm: vec![1, 0] }, &[ids], "pu");
    let table = g.param("table", &[11, 6], Init::Constant(0.0));
    let e = add(&mut g, Op::Embedding, &[table, ids], "emb");
    let q = g.input("q", TensorType::f32(&[2, 7, 3, 6]));
    let r = add(&mut g, Op::Rope { theta: 10000.0 }, &[q], "rope");
    let logits = g.input("logits", TensorType::f32(&[37, 13]));
    let tg = g.input("targets", TensorType::u32(&[37]));
    let ce = add(&mut g, Op::CrossEntropy, &[logits, tg], "ce");
    for (name, id) in [
        ("p1", p1),
        ("p2", p2),
        ("pu", pu),
        ("emb", e),
        ("rope", r),
        ("ce", ce),
    ] {
        g.set_output(name, id);
    }
    check(&g, &feeds(&g, 6, &[("ids", 11), ("targets", 13)]));
}

#[test]
fn topk_gather_mask_with_ties() {
    let mut g = Graph::new();
    let s = g.input("s", TensorType::f32(&[29, 7]));
    let idx = add(&mut g, Op::TopK { k: 3 }, &[s], "idx");
    let gc = add(&mut g, Op::GatherCols, &[s, idx], "gc");
    let m = add(&mut g, Op::TopKMask { experts: 7 }, &[idx], "mask");
    g.set_output("idx", idx);
    g.set_output("gc", gc);
    g.set_output("mask", m);
    let mut f = feeds(&g, 7, &[]);
    if let Some(Value::F32(v)) = f.get_mut("s") {
        // Row 0: all equal (ties go to the lower index); row 1: a tie at the k-th place.
        v[..7].fill(0.5);
        v[7..14].copy_from_slice(&[0.1, 0.9, 0.3, 0.9, 0.3, 0.3, -1.0]);
    }
    check(&g, &f);
}

#[test]
fn moe_route_gather_grouped_matmul_combine() {
    let (t, k, e, d, hidden) = (23, 2, 5, 9, 13);
    let layout = RouteLayout::dropless(t, k, e, 4);
    let mut g = Graph::new();
    let x = g.input("x", TensorType::f32(&[t, d]));
    let idx = g.input("idx", TensorType::u32(&[t, k]));
    let gates = g.input("gates", TensorType::f32(&[t, k]));
    let w1 = g.param("w1", &[e, hidden, d], Init::Constant(0.0));
    let w3 = g.param("w3", &[e, hidden, d], Init::Constant(0.0));
    let w2 = g.param("w2", &[e, d, hidden], Init::Constant(0.0));
    let route = add(&mut g, Op::MoeRoute { layout }, &[idx], "route");
    let xp = add(&mut g, Op::MoeGather { layout }, &[x, route], "xp");
    let a = add(&mut g, Op::GroupedMatMul { layout }, &[xp, w1, route], "a");
    let b = add(&mut g, Op::GroupedMatMul { layout }, &[xp, w3, route], "b");
    let sa = add(&mut g, Op::Unary(UnaryOp::Silu), &[a], "silu");
    let h = add(&mut g, Op::Binary(BinaryOp::Mul), &[sa, b], "h");
    let y = add(&mut g, Op::GroupedMatMul { layout }, &[h, w2, route], "y");
    let out = add(&mut g, Op::MoeCombine { layout }, &[y, gates, route], "out");
    for (name, id) in [
        ("route", route),
        ("xp", xp),
        ("h", h),
        ("y", y),
        ("out", out),
    ] {
        g.set_output(name, id);
    }
    // Expert 4 gets no token: an empty segment.
    let mut f = feeds(&g, 8, &[("idx", 4)]);
    check(&g, &f);
    // Routing is rewritten on every run: a second, different routing through the same executor.
    let t_ = target(MatmulVariant::RegisterBlocked);
    let plan = emit(&g, &fuse(&g, FuseOptions::for_target(&t_)), &t_).unwrap();
    let exec = Executor::new(gpu(), &plan).unwrap();
    for seed in [9, 10] {
        f = feeds(&g, seed, &[("idx", if seed == 9 { 5 } else { 2 })]);
        for (name, value) in &f {
            match value {
                Value::F32(v) => exec.write_f32(name, v).unwrap(),
                Value::U32(v) => exec.write_u32(name, v).unwrap(),
                Value::F64(_) => unreachable!(),
            }
        }
        exec.run().unwrap();
        let want = interp::run_outputs(&g, &f).unwrap();
        assert_eq!(
            exec.read_u32("route").unwrap(),
            want["route"].as_u32().unwrap(),
            "seed {seed}"
        );
    }
}

#[test]
fn gradient_ops() {
    let mut g = Graph::new();
    let x = g.input("x", TensorType::f32(&[3, 5, 7]));
    for (i, to) in [vec![5, 1], vec![7], vec![1], vec![3, 1, 7]]
        .into_iter()
        .enumerate()
    {
        let s = add(&mut g, Op::SumTo { shape: to }, &[x], &format!("sum_to{i}"));
        g.set_output(&format!("sum_to{i}"), s);
    }
    let r = g.input("r", TensorType::f32(&[5, 1]));
    let bt = add(
        &mut g,
        Op::BroadcastTo {
            shape: vec![3, 5, 7],
        },
        &[r],
        "bcast",
    );
    // Fused: the broadcast joins an elementwise chain.
    let bx = add(&mut g, Op::Binary(BinaryOp::Mul), &[bt, x], "bx");
    let st = add(&mut g, Op::Unary(UnaryOp::Step), &[x], "step");
    let gg = add(&mut g, Op::Unary(UnaryOp::GeluGrad), &[x], "gelu_grad");
    let ge = add(&mut g, Op::Binary(BinaryOp::Ge), &[x, r], "ge");
    for (name, id) in [
        ("bcast", bt),
        ("bx", bx),
        ("step", st),
        ("gelu_grad", gg),
        ("ge", ge),
    ] {
        g.set_output(name, id);
    }
    let ids = g.input("ids", TensorType::u32(&[3, 7]));
    let gemb = g.input("gemb", TensorType::f32(&[3, 7, 6]));
    let eg = add(
        &mut g,
        Op::EmbeddingGrad { vocab: 11 },
        &[ids, gemb],
        "emb_grad",
    );
    let q = g.input("q", TensorType::f32(&[2, 7, 3, 6]));
    let rg = add(&mut g, Op::RopeGrad { theta: 500.0 }, &[q], "rope_grad");
    let logits = g.input("logits", TensorType::f32(&[37, 13]));
    let tg = g.input("targets", TensorType::u32(&[37]));
    let seed = g.input("seed", TensorType::f32(&[1]));
    let ceg = add(&mut g, Op::CrossEntropyGrad, &[logits, tg, seed], "ce_grad");
    let gk = g.input("gk", TensorType::f32(&[29, 3]));
    let idx = g.input("idx", TensorType::u32(&[29, 3]));
    let sc = add(&mut g, Op::ScatterCols { cols: 7 }, &[gk, idx], "scatter");
    for (name, id) in [
        ("emb_grad", eg),
        ("rope_grad", rg),
        ("ce_grad", ceg),
        ("scatter", sc),
    ] {
        g.set_output(name, id);
    }
    check(
        &g,
        &feeds(&g, 11, &[("ids", 11), ("targets", 13), ("idx", 7)]),
    );
}

#[test]
fn moe_gradient_ops() {
    let (t, k, e, d, hidden) = (23, 2, 5, 9, 13);
    let layout = RouteLayout::dropless(t, k, e, 4);
    let mut g = Graph::new();
    let idx = g.input("idx", TensorType::u32(&[t, k]));
    let route = add(&mut g, Op::MoeRoute { layout }, &[idx], "route");
    let [(_, grad_x), ..] = moe_adjoints(&mut g, layout, route, d, hidden);
    // A consumer of the input gradient, so fusion has an epilogue to fold into its kernel.
    let negated = add(&mut g, Op::Unary(UnaryOp::Neg), &[grad_x], "grad_x_neg");
    g.set_output("grad_x_neg", negated);
    check(&g, &feeds(&g, 12, &[("idx", 4)]));
}

#[test]
fn matmuls_read_permuted_operands_in_place() {
    let mut g = Graph::new();
    // Batch axes permuted in A, last two axes swapped in B.
    let a_src = g.input("a_src", TensorType::f32(&[5, 3, 7]));
    let b_src = g.input("b_src", TensorType::f32(&[3, 6, 7]));
    let a = add(
        &mut g,
        Op::Permute {
            perm: vec![1, 0, 2],
        },
        &[a_src],
        "a",
    );
    let b = add(
        &mut g,
        Op::Permute {
            perm: vec![0, 2, 1],
        },
        &[b_src],
        "b",
    );
    let ab = add(&mut g, Op::MatMul { trans_b: false }, &[a, b], "ab");
    // A weight gradient: gᵀ · x.
    let gr = g.input("g", TensorType::f32(&[13, 9]));
    let x = g.input("x", TensorType::f32(&[13, 11]));
    let gt = add(&mut g, Op::Permute { perm: vec![1, 0] }, &[gr], "gt");
    let dw = add(&mut g, Op::MatMul { trans_b: false }, &[gt, x], "dw");
    // The same transpose read by a second matmul (forward and backward uses of one permute).
    let x2 = g.input("x2", TensorType::f32(&[5, 13]));
    let dw2 = add(&mut g, Op::MatMul { trans_b: true }, &[gt, x2], "dw2");
    // A permuted B read transposed, with an epilogue.
    let v = g.input("v", TensorType::f32(&[4, 9]));
    let w = g.param("w", &[9, 6], Init::Constant(0.0));
    let wt = add(&mut g, Op::Permute { perm: vec![1, 0] }, &[w], "wt");
    let vw = add(&mut g, Op::MatMul { trans_b: true }, &[v, wt], "vw");
    let vr = add(&mut g, Op::Unary(UnaryOp::Relu), &[vw], "relu");
    // Through a reshape that drops a size-1 axis (a view: absorbed).
    let q_src = g.input("q_src", TensorType::f32(&[2, 5, 1, 3, 4]));
    let q = add(
        &mut g,
        Op::Permute {
            perm: vec![0, 3, 2, 1, 4],
        },
        &[q_src],
        "q",
    );
    let q4 = add(
        &mut g,
        Op::Reshape {
            shape: vec![2, 3, 5, 4],
        },
        &[q],
        "q4",
    );
    let kb = g.input("kb", TensorType::f32(&[2, 3, 4, 6]));
    let qk = add(&mut g, Op::MatMul { trans_b: false }, &[q4, kb], "qk");
    // Through a reshape that merges transposed axes (not a view: the permute is materialised).
    let o_src = g.input("o_src", TensorType::f32(&[2, 3, 5, 4]));
    let o = add(
        &mut g,
        Op::Permute {
            perm: vec![0, 2, 1, 3],
        },
        &[o_src],
        "o",
    );
    let o2 = add(
        &mut g,
        Op::Reshape {
            shape: vec![10, 12],
        },
        &[o],
        "o2",
    );
    let wo = g.param("wo", &[7, 12], Init::Constant(0.0));
    let ow = add(&mut g, Op::MatMul { trans_b: true }, &[o2, wo], "ow");
    for (name, id) in [
        ("ab", ab),
        ("dw", dw),
        ("dw2", dw2),
        ("relu", vr),
        ("qk", qk),
        ("ow", ow),
    ] {
        g.set_output(name, id);
    }
    let t = target(MatmulVariant::RegisterBlocked);
    let fused = fuse(&g, FuseOptions::for_target(&t));
    assert_eq!(
        fused.len(),
        7,
        "every permute but the last is absorbed:\n{}",
        fused.dump(&g)
    );
    check(&g, &feeds(&g, 13, &[]));
}

#[test]
fn elementwise_and_row_kernels_read_permuted_operands_in_place() {
    let mut g = Graph::new();
    // A mean over a non-last axis (lowered as permute + last-axis reduce), as the balancing losses do.
    let load = g.input("load", TensorType::f32(&[1, 37, 5]));
    let by_expert = add(
        &mut g,
        Op::Permute {
            perm: vec![0, 2, 1],
        },
        &[load],
        "by_expert",
    );
    let mean = add(&mut g, Op::Reduce(ReduceOp::Mean), &[by_expert], "mean");
    // A softmax over a permuted operand.
    let probs = add(&mut g, Op::Softmax { causal: false }, &[by_expert], "probs");
    // An elementwise consumer with a broadcast operand, through a reshape that drops a size-1 axis.
    let flat = add(
        &mut g,
        Op::Reshape { shape: vec![5, 37] },
        &[by_expert],
        "flat",
    );
    let bias = g.input("bias", TensorType::f32(&[37]));
    let shifted = add(&mut g, Op::Binary(BinaryOp::Add), &[flat, bias], "shifted");
    // A permuted operand broadcast along a leading axis of the consumer.
    let small = g.input("small", TensorType::f32(&[3, 4]));
    let small_t = add(
        &mut g,
        Op::Permute { perm: vec![1, 0] },
        &[small],
        "small_t",
    );
    let big = g.input("big", TensorType::f32(&[2, 4, 3]));
    let scaled = add(&mut g, Op::Binary(BinaryOp::Mul), &[big, small_t], "scaled");
    for (name, id) in [
        ("mean", mean),
        ("probs", probs),
        ("shifted", shifted),
        ("scaled", scaled),
    ] {
        g.set_output(name, id);
    }
    let t = target(MatmulVariant::RegisterBlocked);
    let fused = fuse(&g, FuseOptions::for_target(&t));
    assert!(
        fused.groups.iter().all(
            |grp| grp.nodes.len() > 1 || !matches!(g.node(grp.nodes[0]).op, Op::Permute { .. })
        ),
        "no permute gets a kernel of its own:\n{}",
        fused.dump(&g)
    );
    check(&g, &feeds(&g, 17, &[]));
}

#[test]
fn matmul_and_elementwise_groups_write_permuted_outputs() {
    let mut g = Graph::new();
    // Attention's context: [B, H, T, D] → [B, T, H, D] through a view with a size-1 axis.
    let probs = g.input("probs", TensorType::f32(&[2, 3, 5, 5]));
    let v = g.input("v", TensorType::f32(&[2, 3, 5, 4]));
    let ctx = add(&mut g, Op::MatMul { trans_b: false }, &[probs, v], "ctx");
    let ctx5 = add(
        &mut g,
        Op::Reshape {
            shape: vec![2, 3, 1, 5, 4],
        },
        &[ctx],
        "ctx5",
    );
    let unstack = add(
        &mut g,
        Op::Permute {
            perm: vec![0, 3, 1, 2, 4],
        },
        &[ctx5],
        "unstack",
    );
    // An elementwise value both permuted and used as it is.
    let x = g.input("x", TensorType::f32(&[7, 6]));
    let e = add(&mut g, Op::Unary(UnaryOp::Exp), &[x], "e");
    let et = add(&mut g, Op::Permute { perm: vec![1, 0] }, &[e], "et");
    let doubled = add(&mut g, Op::Binary(BinaryOp::Add), &[e, e], "doubled");
    for (name, id) in [("unstack", unstack), ("et", et), ("doubled", doubled)] {
        g.set_output(name, id);
    }
    let t = target(MatmulVariant::RegisterBlocked);
    let fused = fuse(&g, FuseOptions::for_target(&t));
    assert_eq!(
        fused.len(),
        2,
        "both permutes are epilogues:\n{}",
        fused.dump(&g)
    );
    check(&g, &feeds(&g, 19, &[]));
}

#[test]
fn matmuls_compute_rope_prologues_in_their_loads() {
    // Attention's shape: q and k rotated, stacked by head and multiplied; the adjoint rotation read by
    // a matmul directly (dh = dq · W) and transposed (dW = dqᵀ · h). Odd sizes with hd = 6, then
    // sizes whose rotations the register-blocked schedule computes 4 at a time (`rope_a4`) on
    // adapters with fixed subgroups.
    for (b, t, h, hd) in [(2, 5, 3, 6), (2, 8, 3, 8)] {
        let mut g = Graph::new();
        let q_src = g.input("q", TensorType::f32(&[b, t, h, hd]));
        let k_src = g.input("k", TensorType::f32(&[b, t, h, hd]));
        let q = add(&mut g, Op::Rope { theta: 10000.0 }, &[q_src], "q_rope");
        let k = add(&mut g, Op::Rope { theta: 500.0 }, &[k_src], "k_rope");
        let perm = Op::Permute {
            perm: vec![0, 2, 1, 3],
        };
        let qt = add(&mut g, perm.clone(), &[q], "q_t");
        let kt = add(&mut g, perm, &[k], "k_t");
        let scores = add(&mut g, Op::MatMul { trans_b: true }, &[qt, kt], "scores");
        let dq_src = g.input("dq", TensorType::f32(&[b, t, h, hd]));
        let dq = add(&mut g, Op::RopeGrad { theta: 10000.0 }, &[dq_src], "dq");
        let dq2 = add(
            &mut g,
            Op::Reshape {
                shape: vec![b * t, h * hd],
            },
            &[dq],
            "dq_rows",
        );
        let w = g.param("w", &[h * hd, 7], Init::Constant(0.0));
        let dh = add(&mut g, Op::MatMul { trans_b: false }, &[dq2, w], "dh");
        let x = g.input("x", TensorType::f32(&[b * t, 4]));
        let dqt = add(&mut g, Op::Permute { perm: vec![1, 0] }, &[dq2], "dq_t");
        let dw = add(&mut g, Op::MatMul { trans_b: false }, &[dqt, x], "dw");
        // A rotation that is also an output stays a kernel of its own; its matmul reads the buffer.
        let r_src = g.input("r_src", TensorType::f32(&[1, t, 1, hd]));
        let r = add(&mut g, Op::Rope { theta: 10000.0 }, &[r_src], "r_rope");
        let r2 = add(&mut g, Op::Reshape { shape: vec![t, hd] }, &[r], "r_rows");
        let rr = add(&mut g, Op::MatMul { trans_b: true }, &[r2, r2], "rr");
        for (name, id) in [
            ("scores", scores),
            ("dh", dh),
            ("dw", dw),
            ("r", r),
            ("rr", rr),
        ] {
            g.set_output(name, id);
        }
        let t_ = target(MatmulVariant::RegisterBlocked);
        let fused = fuse(&g, FuseOptions::for_target(&t_));
        let alone = |grp: &moec_compiler::fuse::Group| {
            grp.nodes.len() == 1
                && matches!(
                    g.node(grp.nodes[0]).op,
                    Op::Rope { .. } | Op::RopeGrad { .. }
                )
        };
        assert_eq!(
            (
                fused.len(),
                fused.groups.iter().filter(|grp| alone(grp)).count()
            ),
            (5, 1),
            "only the rotation that is an output gets a kernel:\n{}",
            fused.dump(&g)
        );
        let plan = emit(&g, &fused, &t_).unwrap();
        let vec4 = plan
            .kernels
            .iter()
            .any(|kernel| kernel.wgsl.contains("rope_a4("));
        assert_eq!(vec4, hd == 8 && t_.subgroup_size > 1, "hd = {hd}");
        check(&g, &feeds(&g, 23, &[]));
    }
}

#[test]
fn grouped_matmuls_gather_their_rows_in_their_loads() {
    // An expert layer and its adjoint as training has them: the gathered token rows are read by the
    // forward product and the weight gradient, the gate-weighted output gradient rows by the input and
    // weight gradients; none of them is materialised. Expert 4 gets no token (an empty segment).
    let (t, k, e, d, hidden) = (23, 2, 5, 9, 13);
    let layout = RouteLayout::dropless(t, k, e, 4);
    let mut g = Graph::new();
    let x = g.input("x", TensorType::f32(&[t, d]));
    let idx = g.input("idx", TensorType::u32(&[t, k]));
    let wt = g.input("wt", TensorType::f32(&[t, k]));
    let dy = g.input("dy", TensorType::f32(&[t, hidden]));
    let w = g.param("w", &[e, hidden, d], Init::Constant(0.0));
    let route = add(&mut g, Op::MoeRoute { layout }, &[idx], "route");
    let xp = add(&mut g, Op::MoeGather { layout }, &[x, route], "xp");
    let yp = add(&mut g, Op::GroupedMatMul { layout }, &[xp, w, route], "yp");
    let y = add(&mut g, Op::MoeCombine { layout }, &[yp, wt, route], "y");
    let dyp = add(
        &mut g,
        Op::MoeCombineGradRows { layout },
        &[dy, wt, route],
        "dyp",
    );
    let dxp = add(
        &mut g,
        Op::GroupedMatMulGradX { layout },
        &[dyp, w, route],
        "dxp",
    );
    let dw = add(
        &mut g,
        Op::GroupedMatMulGradW { layout },
        &[dyp, xp, route],
        "dw",
    );
    for (name, id) in [("y", y), ("dxp", dxp), ("dw", dw)] {
        g.set_output(name, id);
    }
    let t_ = target(MatmulVariant::RegisterBlocked);
    let fused = fuse(&g, FuseOptions::for_target(&t_));
    assert_eq!(
        fused.len(),
        5,
        "route, product, combine, input and weight gradients:\n{}",
        fused.dump(&g)
    );
    check(&g, &feeds(&g, 29, &[("idx", 4)]));
}

#[test]
fn routing_variants_capacity_priority_expert_choice_sinkhorn() {
    let (t, k, e) = (19, 2, 4);
    let mut g = Graph::new();
    let s = g.input("s", TensorType::f32(&[t, e]));
    let both = add(&mut g, Op::TopK { k: 3 }, &[s], "top3");
    let idx = add(&mut g, Op::SliceCols { start: 1, len: k }, &[both], "idx");
    let prio = add(&mut g, Op::GatherCols, &[s, idx], "prio");
    // capacity 7 < 19·2/4: some experts drop slots, first-come and by priority.
    let cap = RouteLayout {
        capacity: 7,
        ..RouteLayout::dropless(t, k, e, 4)
    };
    let r_first = add(&mut g, Op::MoeRoute { layout: cap }, &[idx], "route_first");
    let r_prio = add(
        &mut g,
        Op::MoeRoute { layout: cap },
        &[idx, prio],
        "route_prio",
    );
    let load = add(&mut g, Op::RouteLoad { layout: cap }, &[r_prio], "load");
    let ec = add(
        &mut g,
        Op::ExpertChoice { capacity: 5 },
        &[s],
        "expert_choice",
    );
    let sk = add(&mut g, Op::Sinkhorn { iters: 3 }, &[s], "sinkhorn");
    let cdf = add(&mut g, Op::Unary(UnaryOp::NormalCdf), &[s], "cdf");
    let pdf = add(&mut g, Op::Unary(UnaryOp::NormalPdf), &[s], "pdf");
    for (name, id) in [
        ("idx", idx),
        ("route_first", r_first),
        ("route_prio", r_prio),
        ("load", load),
        ("expert_choice", ec),
        ("sinkhorn", sk),
        ("cdf", cdf),
        ("pdf", pdf),
    ] {
        g.set_output(name, id);
    }
    check(&g, &feeds(&g, 14, &[]));
}

#[test]
fn auction_router_matches_the_interpreter() {
    // Compared with the interpreter in f32 (the same arithmetic as the kernel), exactly: bids are
    // compared for ordering, so an f64 reference could break a near tie differently.
    let (t, e) = (13, 4);
    let mut g = Graph::new();
    let v = g.input("v", TensorType::f32(&[t, e]));
    let p = g.input("p", TensorType::f32(&[e]));
    let a = add(
        &mut g,
        Op::Auction {
            rounds: 6,
            epsilon: 0.02,
            budget: 1.0,
            capacity: 5,
            k: 2,
        },
        &[v, p],
        "auction",
    );
    g.set_output("auction", a);
    for seed in [15, 16] {
        let f = feeds(&g, seed, &[]);
        let want = interp::run_outputs(&g, &f).unwrap();
        for variant in [MatmulVariant::RegisterBlocked, MatmulVariant::SharedTiled] {
            let got = run_gpu(&g, &f, &target(variant), true);
            assert_eq!(
                got["auction"],
                want["auction"].to_f64(),
                "seed {seed}, {variant:?}"
            );
        }
    }
}

#[test]
fn routers_run_as_one_kernel_per_token_row() {
    // A softmax gate (renormalised top-k weights, dense gates, the z-loss row statistic, the top-k
    // mask) and a sigmoid gate (scores over their sum, a bias on the selection only), each one router
    // kernel.
    let (t, d, e, k) = (37, 11, 6, 2);
    let mut g = Graph::new();
    let x = g.input("x", TensorType::f32(&[t, d]));
    let w = g.param("w", &[e, d], Init::Constant(0.0));
    let logits = add(&mut g, Op::MatMul { trans_b: true }, &[x, w], "logits");
    let probs = add(&mut g, Op::Softmax { causal: false }, &[logits], "probs");
    let idx = add(&mut g, Op::TopK { k }, &[probs], "idx");
    let picked = add(&mut g, Op::GatherCols, &[probs, idx], "picked");
    let total = add(&mut g, Op::Reduce(ReduceOp::Sum), &[picked], "total");
    let weights = add(
        &mut g,
        Op::Binary(BinaryOp::Div),
        &[picked, total],
        "weights",
    );
    let gates = add(
        &mut g,
        Op::ScatterCols { cols: e },
        &[weights, idx],
        "gates",
    );
    let m = add(&mut g, Op::Reduce(ReduceOp::Max), &[logits], "max");
    let centred = add(&mut g, Op::Binary(BinaryOp::Sub), &[logits, m], "centred");
    let ex = add(&mut g, Op::Unary(UnaryOp::Exp), &[centred], "exp");
    let se = add(&mut g, Op::Reduce(ReduceOp::Sum), &[ex], "sum_exp");
    let lse = add(&mut g, Op::Unary(UnaryOp::Log), &[se], "log");
    let z = add(&mut g, Op::Binary(BinaryOp::Add), &[lse, m], "lse");
    let z2 = add(&mut g, Op::Unary(UnaryOp::Square), &[z], "z2");
    let mask = add(&mut g, Op::TopKMask { experts: e }, &[idx], "mask");
    let w2 = g.param("w2", &[e, d], Init::Constant(0.0));
    let bias = g.input("bias", TensorType::f32(&[e]));
    let l2 = add(&mut g, Op::MatMul { trans_b: true }, &[x, w2], "logits2");
    let s = add(&mut g, Op::Unary(UnaryOp::Sigmoid), &[l2], "scores");
    let ssum = add(&mut g, Op::Reduce(ReduceOp::Mean), &[s], "scores_mean");
    let p2 = add(&mut g, Op::Binary(BinaryOp::Div), &[s, ssum], "probs2");
    let sel = add(&mut g, Op::Binary(BinaryOp::Add), &[s, bias], "biased");
    let idx2 = add(&mut g, Op::TopK { k }, &[sel], "idx2");
    let pick2 = add(&mut g, Op::GatherCols, &[s, idx2], "picked2");
    for (name, id) in [
        ("probs", probs),
        ("idx", idx),
        ("weights", weights),
        ("gates", gates),
        ("z2", z2),
        ("mask", mask),
        ("probs2", p2),
        ("idx2", idx2),
        ("picked2", pick2),
    ] {
        g.set_output(name, id);
    }
    let fused = fuse(&g, FuseOptions::for_target(&gpu().target()));
    assert!(
        fused.len() == 2 && fused.groups.iter().all(|gr| gr.kind == GroupKind::Router),
        "two router kernels:\n{}",
        fused.dump(&g)
    );
    check(&g, &feeds(&g, 31, &[]));
}

#[test]
fn gate_weight_adjoints_run_as_one_router_kernel() {
    // The backward of renormalised top-k weights through the softmax, as training has it: a row
    // group (the weights' adjoint) becomes a router kernel when the scatter to expert columns reads
    // it, and the softmax adjoint joins, reading the balance term's gradient through a permute.
    let (t, e, k) = (41, 7, 3);
    let mut g = Graph::new();
    let dw = g.input("dw", TensorType::f32(&[t, k]));
    let total = g.input("total", TensorType::f32(&[t, 1]));
    let weights = g.input("weights", TensorType::f32(&[t, k]));
    let idx = g.input("idx", TensorType::u32(&[t, k]));
    let probs = g.input("probs", TensorType::f32(&[t, e]));
    let by_expert = g.input("by_expert", TensorType::f32(&[1, e, t]));
    let q = add(&mut g, Op::Binary(BinaryOp::Div), &[dw, total], "q");
    let r = add(&mut g, Op::Binary(BinaryOp::Mul), &[q, weights], "r");
    let rs = add(&mut g, Op::Reduce(ReduceOp::Sum), &[r], "rs");
    let nrs = add(&mut g, Op::Unary(UnaryOp::Neg), &[rs], "nrs");
    let dpick = add(&mut g, Op::Binary(BinaryOp::Add), &[q, nrs], "dpick");
    let dprobs = add(&mut g, Op::ScatterCols { cols: e }, &[dpick, idx], "dprobs");
    let p = add(
        &mut g,
        Op::Permute {
            perm: vec![0, 2, 1],
        },
        &[by_expert],
        "by_token",
    );
    let p = add(
        &mut g,
        Op::Reshape { shape: vec![t, e] },
        &[p],
        "by_token_rows",
    );
    let gy = add(&mut g, Op::Binary(BinaryOp::Add), &[p, dprobs], "gy");
    let gp = add(&mut g, Op::Binary(BinaryOp::Mul), &[gy, probs], "gp");
    let dot = add(&mut g, Op::Reduce(ReduceOp::Sum), &[gp], "dot");
    let c = add(&mut g, Op::Binary(BinaryOp::Sub), &[gy, dot], "centred");
    let dl = add(&mut g, Op::Binary(BinaryOp::Mul), &[probs, c], "dlogits");
    g.set_output("dlogits", dl);
    let fused = fuse(&g, FuseOptions::for_target(&gpu().target()));
    assert!(
        fused.len() == 1 && fused.groups[0].kind == GroupKind::Router,
        "one router kernel:\n{}",
        fused.dump(&g)
    );
    check(&g, &feeds(&g, 37, &[("idx", e as u32)]));
}

#[test]
fn products_of_one_operand_share_one_dispatch() {
    // q, k and v of one normed input (one transposed): one horizontal kernel; a product with an
    // epilogue and one of another width keep their own kernels. The second shape is one whose
    // weights the register-blocked schedule reads as vec4s, through `hb4`, on adapters with fixed
    // subgroups.
    for (m, k, n) in [(37, 19, 13), (40, 32, 12)] {
        let mut g = Graph::new();
        let x = g.input("x", TensorType::f32(&[m, k]));
        let mut outs = Vec::new();
        for name in ["q", "k", "v"] {
            let w = g.param(&format!("w{name}"), &[n, k], Init::Constant(0.0));
            outs.push((
                name,
                add(&mut g, Op::MatMul { trans_b: true }, &[x, w], name),
            ));
        }
        let wg = g.param("wg", &[n, k], Init::Constant(0.0));
        let gate = add(&mut g, Op::MatMul { trans_b: true }, &[x, wg], "gate");
        let act = add(&mut g, Op::Unary(UnaryOp::Silu), &[gate], "act");
        let wo = g.param("wo", &[k, 5], Init::Constant(0.0));
        let o = add(&mut g, Op::MatMul { trans_b: false }, &[x, wo], "o");
        outs.extend([("act", act), ("o", o)]);
        for (name, id) in outs {
            g.set_output(name, id);
        }
        let fused = fuse(&g, FuseOptions::for_target(&gpu().target()));
        assert_eq!(fused.len(), 3, "q/k/v, gate + silu, o:\n{}", fused.dump(&g));
        let blocked = target(MatmulVariant::RegisterBlocked);
        let plan = emit(&g, &fused, &blocked).unwrap();
        let vec4 = plan
            .kernels
            .iter()
            .any(|kernel| kernel.wgsl.contains("hb4(bi, "));
        assert_eq!(
            vec4,
            k % 4 == 0 && blocked.subgroup_size > 1,
            "{m} x {k} x {n}"
        );
        check(&g, &feeds(&g, 41, &[]));
    }
}
