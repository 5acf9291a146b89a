//! Hand-computed cases for every op of the reference interpreter (tiny shapes, exact numbers), in
//! f32 and f64. Tolerances: 1e-6 absolute in f32 unless said, 1e-12 in f64.

use moec_compiler::interp::{run, run_in, InterpError, Precision, Value};
use moec_compiler::ir::{BinaryOp, Graph, NodeId, Op, ReduceOp, RouteLayout, TensorType, UnaryOp};
use std::collections::HashMap;

/// Builds a graph of inputs `a0, a1, ...` feeding one `op`, runs it, returns the op's value.
fn eval_in(
    op: Op,
    args: &[(TensorType, Value)],
    precision: Precision,
) -> Result<Value, InterpError> {
    let mut g = Graph::new();
    let mut ids = Vec::new();
    let mut feeds = HashMap::new();
    for (i, (ty, v)) in args.iter().enumerate() {
        let name = format!("a{i}");
        ids.push(g.input(&name, ty.clone()));
        feeds.insert(name, v.clone());
    }
    let out: NodeId = g.add(op, &ids, "out").expect("well-typed test graph");
    let mut vals = run_in(&g, &feeds, precision)?;
    Ok(vals.remove(&out).expect("every node has a value"))
}

fn eval(op: Op, args: &[(TensorType, Value)]) -> Vec<f64> {
    eval_in(op, args, Precision::F32).expect("runs").to_f64()
}

fn f(shape: &[usize], v: &[f32]) -> (TensorType, Value) {
    (TensorType::f32(shape), Value::F32(v.to_vec()))
}

fn u(shape: &[usize], v: &[u32]) -> (TensorType, Value) {
    (TensorType::u32(shape), Value::U32(v.to_vec()))
}

fn close(got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "length: got {got:?}, want {want:?}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol,
            "element {i}: got {g}, want {w} (tol {tol}); all: {got:?}"
        );
    }
}

#[test]
fn affine() {
    close(
        &eval(Op::Affine { mul: 2.0, add: 1.0 }, &[f(&[2], &[1.0, -2.0])]),
        &[3.0, -3.0],
        0.0,
    );
}

#[test]
fn unary_ops() {
    let cases: Vec<(UnaryOp, f32, f64)> = vec![
        (UnaryOp::Neg, 2.0, -2.0),
        (UnaryOp::Exp, 0.0, 1.0),
        (UnaryOp::Exp, 1.0, std::f64::consts::E),
        (UnaryOp::Log, 1.0, 0.0),
        (UnaryOp::Sqrt, 4.0, 2.0),
        (UnaryOp::Rsqrt, 4.0, 0.5),
        (UnaryOp::Recip, 4.0, 0.25),
        (UnaryOp::Square, -3.0, 9.0),
        (UnaryOp::Tanh, 0.0, 0.0),
        (UnaryOp::Relu, -1.0, 0.0),
        (UnaryOp::Relu, 2.0, 2.0),
        (UnaryOp::Silu, 1.0, 0.731_058_578_630_004_9),
        // tanh approximation: 0.5·(1 + tanh(√(2/π)·(1 + 0.044715)))
        (UnaryOp::Gelu, 1.0, 0.841_191_990_607_477_2),
        (UnaryOp::Gelu, -1.0, -0.158_808_009_392_522_8),
        (UnaryOp::Sigmoid, 0.0, 0.5),
        (UnaryOp::Sigmoid, -200.0, 0.0),
        (UnaryOp::Softplus, 0.0, std::f64::consts::LN_2),
        (UnaryOp::Softplus, 100.0, 100.0),
        (UnaryOp::Softplus, -100.0, 0.0),
    ];
    for (op, x, want) in cases {
        let got = eval(Op::Unary(op), &[f(&[1], &[x])]);
        assert!(
            (got[0] - want).abs() <= 1e-6 * want.abs().max(1.0),
            "{op:?}({x}) = {}, want {want}",
            got[0]
        );
    }
}

#[test]
fn binary_broadcasting() {
    let a = f(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    close(
        &eval(
            Op::Binary(BinaryOp::Add),
            &[a.clone(), f(&[3], &[10.0, 20.0, 30.0])],
        ),
        &[11.0, 22.0, 33.0, 14.0, 25.0, 36.0],
        0.0,
    );
    close(
        &eval(
            Op::Binary(BinaryOp::Sub),
            &[a.clone(), f(&[2, 1], &[1.0, 2.0])],
        ),
        &[0.0, 1.0, 2.0, 2.0, 3.0, 4.0],
        0.0,
    );
    close(
        &eval(
            Op::Binary(BinaryOp::Mul),
            &[f(&[2, 1], &[1.0, 2.0]), f(&[1, 3], &[1.0, 10.0, 100.0])],
        ),
        &[1.0, 10.0, 100.0, 2.0, 20.0, 200.0],
        0.0,
    );
    close(
        &eval(Op::Binary(BinaryOp::Div), &[a.clone(), f(&[1], &[2.0])]),
        &[0.5, 1.0, 1.5, 2.0, 2.5, 3.0],
        0.0,
    );
    close(
        &eval(Op::Binary(BinaryOp::Max), &[a, f(&[3], &[2.0, 0.0, 7.0])]),
        &[2.0, 2.0, 7.0, 4.0, 5.0, 7.0],
        0.0,
    );
}

#[test]
fn reductions_keep_the_last_axis() {
    let a = f(&[2, 3], &[1.0, 5.0, 3.0, -4.0, -2.0, -6.0]);
    close(
        &eval(Op::Reduce(ReduceOp::Sum), std::slice::from_ref(&a)),
        &[9.0, -12.0],
        0.0,
    );
    close(
        &eval(Op::Reduce(ReduceOp::Mean), std::slice::from_ref(&a)),
        &[3.0, -4.0],
        0.0,
    );
    close(&eval(Op::Reduce(ReduceOp::Max), &[a]), &[5.0, -2.0], 0.0);
}

#[test]
fn reshape_and_permute() {
    let a = f(&[2, 3], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    close(
        &eval(Op::Reshape { shape: vec![3, 2] }, std::slice::from_ref(&a)),
        &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0],
        0.0,
    );
    close(
        &eval(Op::Permute { perm: vec![1, 0] }, &[a]),
        &[0.0, 3.0, 1.0, 4.0, 2.0, 5.0],
        0.0,
    );
    // [2, 3, 4] → perm [2, 0, 1]: out[i, j, k] = in[j, k, i].
    let data: Vec<f32> = (0..24).map(|x| x as f32).collect();
    let got = eval(
        Op::Permute {
            perm: vec![2, 0, 1],
        },
        &[f(&[2, 3, 4], &data)],
    );
    for i in 0..4 {
        for j in 0..2 {
            for k in 0..3 {
                assert_eq!(got[(i * 2 + j) * 3 + k], ((j * 3 + k) * 4 + i) as f64);
            }
        }
    }
    // u32 tensors permute too.
    let got = eval(
        Op::Permute { perm: vec![1, 0] },
        &[u(&[2, 2], &[1, 2, 3, 4])],
    );
    close(&got, &[1.0, 3.0, 2.0, 4.0], 0.0);
}

#[test]
fn matmul_plain_transposed_and_batched() {
    let a = f(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let b = f(&[3, 2], &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
    close(
        &eval(Op::MatMul { trans_b: false }, &[a.clone(), b]),
        &[4.0, 5.0, 10.0, 11.0],
        0.0,
    );
    // w [out=2, in=3] read transposed: y = a · wᵀ.
    let w = f(&[2, 3], &[1.0, 1.0, 1.0, 0.0, 1.0, -1.0]);
    close(
        &eval(Op::MatMul { trans_b: true }, &[a.clone(), w.clone()]),
        &[6.0, -1.0, 15.0, -1.0],
        0.0,
    );
    // batched A with a shared B.
    let a3 = f(&[2, 1, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    close(
        &eval(Op::MatMul { trans_b: true }, &[a3.clone(), w]),
        &[6.0, -1.0, 15.0, -1.0],
        0.0,
    );
    // batched A and B: each batch its own B.
    let b3 = f(&[2, 3, 1], &[1.0, 1.0, 1.0, 2.0, 0.0, 0.0]);
    close(
        &eval(Op::MatMul { trans_b: false }, &[a3, b3]),
        &[6.0, 8.0],
        0.0,
    );
}

#[test]
fn embedding_and_bad_ids() {
    let table = f(&[3, 2], &[0.0, 1.0, 10.0, 11.0, 20.0, 21.0]);
    close(
        &eval(Op::Embedding, &[table.clone(), u(&[2], &[2, 0])]),
        &[20.0, 21.0, 0.0, 1.0],
        0.0,
    );
    let err = eval_in(Op::Embedding, &[table, u(&[1], &[3])], Precision::F32).unwrap_err();
    assert!(
        matches!(
            err,
            InterpError::OutOfRange {
                index: 3,
                bound: 3,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn rope_rotate_half() {
    // [B=1, T=2, H=1, hd=4], theta 10000: inv_freq = [1, 0.01].
    let x = f(&[1, 2, 1, 4], &[1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0]);
    let got = eval_in(Op::Rope { theta: 10000.0 }, &[x], Precision::F64)
        .unwrap()
        .to_f64();
    let (c1, s1, c2, s2) = (1f64.cos(), 1f64.sin(), 0.01f64.cos(), 0.01f64.sin());
    let want = [
        1.0,
        2.0,
        3.0,
        4.0,
        1.0 * c1 - 3.0 * s1,
        2.0 * c2 - 4.0 * s2,
        3.0 * c1 + 1.0 * s1,
        4.0 * c2 + 2.0 * s2,
    ];
    close(&got, &want, 1e-12);
}

#[test]
fn softmax_plain_causal_and_grouped() {
    let e = |x: f64| x.exp();
    let z = e(1.0) + e(2.0) + e(3.0);
    close(
        &eval(Op::Softmax { causal: false }, &[f(&[3], &[1.0, 2.0, 3.0])]),
        &[e(1.0) / z, e(2.0) / z, e(3.0) / z],
        1e-6,
    );
    // causal [3, 3]: row r sees columns <= r; masked entries are 0.
    let s = f(&[3, 3], &[5.0, 9.0, 9.0, 0.0, 0.0, 9.0, 0.0, 0.0, 0.0]);
    let third = 1.0 / 3.0;
    close(
        &eval(Op::Softmax { causal: true }, &[s]),
        &[1.0, 0.0, 0.0, 0.5, 0.5, 0.0, third, third, third],
        1e-6,
    );
    // grouped-query: two heads stacked along rows, [R = 2·S, S] with S = 2: row 2 is position 0 again.
    let s = f(&[1, 4, 2], &[0.0, 7.0, 0.0, 0.0, 3.0, 7.0, 0.0, 0.0]);
    close(
        &eval(Op::Softmax { causal: true }, &[s]),
        &[1.0, 0.0, 0.5, 0.5, 1.0, 0.0, 0.5, 0.5],
        1e-6,
    );
}

#[test]
fn cross_entropy_mean_over_tokens() {
    let logits = f(&[2, 2], &[0.0, 0.0, 3f32.ln(), 0.0]);
    let got = eval(Op::CrossEntropy, &[logits.clone(), u(&[2], &[0, 0])]);
    close(&got, &[(2f64.ln() + (4.0f64 / 3.0).ln()) / 2.0], 1e-6);
    let err = eval_in(
        Op::CrossEntropy,
        &[logits, u(&[2], &[0, 2])],
        Precision::F32,
    )
    .unwrap_err();
    assert!(
        matches!(err, InterpError::OutOfRange { index: 2, .. }),
        "{err}"
    );
}

#[test]
fn topk_descending_ties_to_lower_index() {
    let s = f(
        &[3, 4],
        &[
            1.0, 3.0, 3.0, 0.0, 5.0, 5.0, 5.0, 5.0, -1.0, -3.0, 2.0, -2.0,
        ],
    );
    close(
        &eval(Op::TopK { k: 2 }, std::slice::from_ref(&s)),
        &[1.0, 2.0, 0.0, 1.0, 2.0, 0.0],
        0.0,
    );
    close(
        &eval(Op::TopK { k: 4 }, &[s]),
        &[1.0, 2.0, 0.0, 3.0, 0.0, 1.0, 2.0, 3.0, 2.0, 0.0, 3.0, 1.0],
        0.0,
    );
}

#[test]
fn gather_cols_and_topk_mask() {
    let x = f(&[2, 3], &[0.1, 0.2, 0.7, 0.5, 0.3, 0.2]);
    let idx = u(&[2, 2], &[2, 0, 0, 1]);
    close(
        &eval(Op::GatherCols, &[x, idx.clone()]),
        &[0.7, 0.1, 0.5, 0.3],
        1e-7,
    );
    close(
        &eval(Op::TopKMask { experts: 3 }, &[idx]),
        &[1.0, 0.0, 1.0, 1.0, 1.0, 0.0],
        0.0,
    );
}

/// T = 3 tokens, k = 2, E = 3, tile 2; slots (t·k + j) → experts [0, 1 | 1, 0 | 1, 2].
fn small_route() -> (RouteLayout, (TensorType, Value)) {
    (
        RouteLayout::dropless(3, 2, 3, 2),
        u(&[3, 2], &[0, 1, 1, 0, 1, 2]),
    )
}

#[test]
fn route_table_by_hand() {
    let (layout, idx) = small_route();
    let got: Vec<u32> = eval(Op::MoeRoute { layout }, &[idx])
        .into_iter()
        .map(|x| x as u32)
        .collect();
    const N: u32 = RouteLayout::NONE;
    assert_eq!(layout.rows(), 9);
    assert_eq!(&got[layout.counts_at()..layout.offsets_at()], &[2, 3, 1]);
    assert_eq!(
        &got[layout.offsets_at()..layout.slot_row_at()],
        &[0, 2, 6, 8]
    );
    assert_eq!(
        &got[layout.slot_row_at()..layout.row_slot_at()],
        &[0, 2, 3, 1, 4, 6]
    );
    assert_eq!(
        &got[layout.row_slot_at()..layout.row_expert_at()],
        &[0, 3, 1, 2, 4, N, 5, N, N]
    );
    assert_eq!(
        &got[layout.row_expert_at()..layout.table_len()],
        &[0, 0, 1, 1, 1, 1, 2, 2, N]
    );
}

#[test]
fn moe_gather_grouped_matmul_combine_by_hand() {
    let (layout, idx) = small_route();
    let mut g = Graph::new();
    let x = g.input("x", TensorType::f32(&[3, 1]));
    let w = g.input("w", TensorType::f32(&[3, 1, 1]));
    let wt = g.input("wt", TensorType::f32(&[3, 2]));
    let i = g.input("idx", idx.0);
    let route = g.add(Op::MoeRoute { layout }, &[i], "route").unwrap();
    let xp = g
        .add(Op::MoeGather { layout }, &[x, route], "gather")
        .unwrap();
    let yp = g
        .add(Op::GroupedMatMul { layout }, &[xp, w, route], "gmm")
        .unwrap();
    let y = g
        .add(Op::MoeCombine { layout }, &[yp, wt, route], "combine")
        .unwrap();
    let feeds: HashMap<String, Value> = [
        ("x", Value::F32(vec![1.0, 2.0, 3.0])),
        ("w", Value::F32(vec![10.0, 100.0, 1000.0])),
        ("wt", Value::F32(vec![0.5, 0.5, 0.25, 0.75, 1.0, 2.0])),
        ("idx", idx.1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let vals = run(&g, &feeds).unwrap();
    close(
        &vals[&xp].to_f64(),
        &[1.0, 2.0, 1.0, 2.0, 3.0, 0.0, 3.0, 0.0, 0.0],
        0.0,
    );
    close(
        &vals[&yp].to_f64(),
        &[10.0, 20.0, 100.0, 200.0, 300.0, 0.0, 3000.0, 0.0, 0.0],
        0.0,
    );
    // y0 = .5·10 + .5·100; y1 = .25·200 + .75·20; y2 = 1·300 + 2·3000.
    close(&vals[&y].to_f64(), &[55.0, 65.0, 6300.0], 0.0);
}

#[test]
fn f64_precision_is_used_and_agrees_with_f32() {
    let a = [(TensorType::f32(&[3]), Value::F32(vec![0.1, 0.2, 0.3]))];
    let v64 = eval_in(Op::Softmax { causal: false }, &a, Precision::F64).unwrap();
    let v32 = eval_in(Op::Softmax { causal: false }, &a, Precision::F32).unwrap();
    assert!(matches!(v64, Value::F64(_)) && matches!(v32, Value::F32(_)));
    close(&v32.to_f64(), &v64.to_f64(), 1e-7);
    // `run` picks f64 when any feed is f64.
    let mut g = Graph::new();
    let x = g.input("x", TensorType::f32(&[1]));
    let y = g.add(Op::Unary(UnaryOp::Exp), &[x], "y").unwrap();
    let vals = run(
        &g,
        &HashMap::from([("x".to_string(), Value::F64(vec![1.0]))]),
    )
    .unwrap();
    assert_eq!(vals[&y], Value::F64(vec![std::f64::consts::E]));
}

#[test]
fn feed_errors_are_values() {
    let mut g = Graph::new();
    let x = g.input("x", TensorType::f32(&[2]));
    g.add(Op::Unary(UnaryOp::Exp), &[x], "y").unwrap();
    assert_eq!(
        run(&g, &HashMap::new()).unwrap_err(),
        InterpError::MissingFeed { name: "x".into() }
    );
    let short = HashMap::from([("x".to_string(), Value::F32(vec![1.0]))]);
    assert!(matches!(
        run(&g, &short).unwrap_err(),
        InterpError::BadFeed { .. }
    ));
    let wrong = HashMap::from([("x".to_string(), Value::U32(vec![1, 2]))]);
    assert!(matches!(
        run(&g, &wrong).unwrap_err(),
        InterpError::BadFeed { .. }
    ));
}
