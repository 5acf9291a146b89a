//! Hand-computed cases for the interpreter's gradient ops (the adjoints `autodiff` emits), in f64
//! (tolerance 1e-12) and once in f32 (1e-6), plus their out-of-range errors.

use moec_compiler::interp::{run_in, InterpError, Precision, Value};
use moec_compiler::ir::{Graph, NodeId, Op, RouteLayout, TensorType};
use std::collections::HashMap;

/// An argument of the op under test: a fed tensor, or the routing table of `idx` (built by a
/// `MoeRoute` node, so the table is exactly what the forward pass would hand the adjoint).
enum Arg {
    F(Vec<usize>, Vec<f64>),
    U(Vec<usize>, Vec<u32>),
    Route(RouteLayout, Vec<u32>),
}

fn eval_in(op: Op, args: Vec<Arg>, precision: Precision) -> Result<Vec<f64>, InterpError> {
    let mut g = Graph::new();
    let mut ids: Vec<NodeId> = Vec::new();
    let mut feeds = HashMap::new();
    for (i, arg) in args.into_iter().enumerate() {
        let name = format!("a{i}");
        let id = match arg {
            Arg::F(shape, v) => {
                feeds.insert(name.clone(), Value::F64(v));
                g.input(&name, TensorType::f32(&shape))
            }
            Arg::U(shape, v) => {
                feeds.insert(name.clone(), Value::U32(v));
                g.input(&name, TensorType::u32(&shape))
            }
            Arg::Route(layout, idx) => {
                feeds.insert(name.clone(), Value::U32(idx));
                let idx = g.input(&name, TensorType::u32(&[layout.tokens, layout.k]));
                g.add(Op::MoeRoute { layout }, &[idx], "route")
                    .expect("well-typed route")
            }
        };
        ids.push(id);
    }
    let out = g.add(op, &ids, "out").expect("well-typed test graph");
    let mut vals = run_in(&g, &feeds, precision)?;
    Ok(vals.remove(&out).expect("every node has a value").to_f64())
}

fn eval(op: Op, args: Vec<Arg>) -> Vec<f64> {
    eval_in(op, args, Precision::F64).expect("runs")
}

fn f(shape: &[usize], v: &[f64]) -> Arg {
    Arg::F(shape.to_vec(), v.to_vec())
}

fn u(shape: &[usize], v: &[u32]) -> Arg {
    Arg::U(shape.to_vec(), v.to_vec())
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
fn sum_to_reduces_broadcast_axes() {
    let x = || f(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    close(
        &eval(Op::SumTo { shape: vec![3] }, vec![x()]),
        &[5.0, 7.0, 9.0],
        1e-12,
    );
    close(
        &eval(Op::SumTo { shape: vec![2, 1] }, vec![x()]),
        &[6.0, 15.0],
        1e-12,
    );
    close(
        &eval(Op::SumTo { shape: vec![1, 3] }, vec![x()]),
        &[5.0, 7.0, 9.0],
        1e-12,
    );
    close(
        &eval(Op::SumTo { shape: vec![1] }, vec![x()]),
        &[21.0],
        1e-12,
    );
    close(
        &eval(Op::SumTo { shape: vec![2, 3] }, vec![x()]),
        &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        0.0,
    );
}

#[test]
fn broadcast_to_repeats() {
    close(
        &eval(
            Op::BroadcastTo { shape: vec![2, 3] },
            vec![f(&[3], &[1.0, 2.0, 3.0])],
        ),
        &[1.0, 2.0, 3.0, 1.0, 2.0, 3.0],
        0.0,
    );
    close(
        &eval(
            Op::BroadcastTo { shape: vec![2, 3] },
            vec![f(&[2, 1], &[1.0, 2.0])],
        ),
        &[1.0, 1.0, 1.0, 2.0, 2.0, 2.0],
        0.0,
    );
    close(
        &eval(Op::BroadcastTo { shape: vec![2, 2] }, vec![f(&[1], &[7.0])]),
        &[7.0; 4],
        0.0,
    );
}

#[test]
fn embedding_grad_scatter_adds_rows() {
    let got = eval(
        Op::EmbeddingGrad { vocab: 3 },
        vec![
            u(&[3], &[2, 0, 2]),
            f(&[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
        ],
    );
    close(&got, &[3.0, 4.0, 0.0, 0.0, 6.0, 8.0], 0.0);
    // ids keep their batch shape: [1, 2] ids with g [1, 2, 1]
    let got = eval(
        Op::EmbeddingGrad { vocab: 2 },
        vec![u(&[1, 2], &[1, 1]), f(&[1, 2, 1], &[1.5, 2.0])],
    );
    close(&got, &[0.0, 3.5], 0.0);
}

#[test]
fn embedding_grad_rejects_ids_out_of_range() {
    let err = eval_in(
        Op::EmbeddingGrad { vocab: 3 },
        vec![u(&[2], &[1, 3]), f(&[2, 1], &[1.0, 1.0])],
        Precision::F64,
    )
    .unwrap_err();
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
fn rope_grad_is_the_inverse_rotation() {
    // [B=1, T=2, H=1, hd=2]: position 0 is the identity; position 1 rotates by angle 1 (inv_freq 1).
    let (c, s) = (1f64.cos(), 1f64.sin());
    let got = eval(
        Op::RopeGrad { theta: 10000.0 },
        vec![f(&[1, 2, 1, 2], &[1.0, 2.0, 3.0, 4.0])],
    );
    close(
        &got,
        &[1.0, 2.0, 3.0 * c + 4.0 * s, 4.0 * c - 3.0 * s],
        1e-12,
    );

    // RopeGrad ∘ Rope = identity (a rotation's adjoint is its inverse), on [2, 3, 2, 4].
    let shape = [2, 3, 2, 4];
    let x: Vec<f64> = (0..48)
        .map(|i| ((i * 37 % 11) as f64 - 5.0) / 3.0)
        .collect();
    let mut g = Graph::new();
    let xi = g.input("x", TensorType::f32(&shape));
    let r = g.add(Op::Rope { theta: 100.0 }, &[xi], "rope").unwrap();
    let back = g.add(Op::RopeGrad { theta: 100.0 }, &[r], "back").unwrap();
    let vals = run_in(
        &g,
        &HashMap::from([("x".to_string(), Value::F64(x.clone()))]),
        Precision::F64,
    )
    .unwrap();
    close(&vals[&back].to_f64(), &x, 1e-12);
    assert!(
        vals[&r]
            .to_f64()
            .iter()
            .zip(&x)
            .any(|(a, b)| (a - b).abs() > 0.1),
        "rope moved something"
    );
}

#[test]
fn cross_entropy_grad_is_softmax_minus_onehot_over_n() {
    let logits = f(&[2, 2], &[0.0, 0.0, 3f64.ln(), 0.0]);
    let got = eval(
        Op::CrossEntropyGrad,
        vec![logits, u(&[2], &[0, 1]), f(&[1], &[2.0])],
    );
    // row 0: [.5, .5] − [1, 0]; row 1: [.75, .25] − [0, 1]; times g / N = 1
    close(&got, &[-0.5, 0.5, 0.75, -0.75], 1e-12);
    let f32_run = eval_in(
        Op::CrossEntropyGrad,
        vec![
            f(&[2, 2], &[0.0, 0.0, 3f64.ln(), 0.0]),
            u(&[2], &[0, 1]),
            f(&[1], &[1.0]),
        ],
        Precision::F32,
    )
    .unwrap();
    close(&f32_run, &[-0.25, 0.25, 0.375, -0.375], 1e-6);
    let err = eval_in(
        Op::CrossEntropyGrad,
        vec![f(&[1, 2], &[0.0, 0.0]), u(&[1], &[2]), f(&[1], &[1.0])],
        Precision::F64,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            InterpError::OutOfRange {
                index: 2,
                bound: 2,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn scatter_cols_places_gathered_values() {
    let got = eval(
        Op::ScatterCols { cols: 3 },
        vec![f(&[2, 2], &[1.0, 2.0, 3.0, 4.0]), u(&[2, 2], &[2, 0, 1, 2])],
    );
    close(&got, &[2.0, 0.0, 1.0, 0.0, 3.0, 4.0], 0.0);
    let err = eval_in(
        Op::ScatterCols { cols: 3 },
        vec![f(&[1, 1], &[1.0]), u(&[1, 1], &[3])],
        Precision::F64,
    )
    .unwrap_err();
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

/// 3 tokens, top-2 of 2 experts, tile 2: expert 0 holds slots 0, 3, 4 in rows 0, 1, 2 (row 3 is
/// padding); expert 1 holds slots 1, 2, 5 in rows 4, 5, 6 (row 7 padding). So
/// `slot_row = [0, 4, 5, 1, 2, 6]`.
fn layout() -> RouteLayout {
    RouteLayout::dropless(3, 2, 2, 2)
}

fn route() -> Arg {
    Arg::Route(layout(), vec![0, 1, 1, 0, 0, 1])
}

/// Row r holds r + 1.
fn rows_plus_one() -> Arg {
    f(&[8, 1], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
}

#[test]
fn moe_gather_grad_sums_each_tokens_rows() {
    let got = eval(
        Op::MoeGatherGrad { layout: layout() },
        vec![rows_plus_one(), route()],
    );
    // t0: rows 0, 4; t1: rows 5, 1; t2: rows 2, 6
    close(&got, &[1.0 + 5.0, 6.0 + 2.0, 3.0 + 7.0], 0.0);
}

#[test]
fn grouped_matmul_grad_x_uses_each_rows_expert() {
    let w = f(&[2, 1, 2], &[1.0, 2.0, 3.0, 4.0]);
    let got = eval(
        Op::GroupedMatMulGradX { layout: layout() },
        vec![rows_plus_one(), w, route()],
    );
    let want: Vec<f64> = (0..8)
        .flat_map(|r| {
            let g = (r + 1) as f64;
            if r < 4 {
                [g, 2.0 * g]
            } else {
                [3.0 * g, 4.0 * g]
            }
        })
        .collect();
    close(&got, &want, 0.0);
}

#[test]
fn grouped_matmul_grad_w_sums_over_each_experts_rows() {
    let x: Vec<f64> = (0..8).flat_map(|r| [r as f64, 1.0]).collect();
    let got = eval(
        Op::GroupedMatMulGradW { layout: layout() },
        vec![rows_plus_one(), f(&[8, 2], &x), route()],
    );
    // dw[0] = Σ_{r<4} (r+1)·[r, 1] = [20, 10]; dw[1] = Σ_{4≤r<8} (r+1)·[r, 1] = [148, 26]
    close(&got, &[20.0, 10.0, 148.0, 26.0], 0.0);
}

#[test]
fn moe_combine_grad_rows_scales_by_the_gate_weight() {
    let dy = f(&[3, 1], &[1.0, 2.0, 3.0]);
    let w = f(&[3, 2], &[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]);
    let got = eval(
        Op::MoeCombineGradRows { layout: layout() },
        vec![dy, w, route()],
    );
    // dyp[slot_row[s]] = w[s]·dy[t]; padding rows 3 and 7 stay 0
    close(&got, &[0.1, 0.8, 1.5, 0.0, 0.2, 0.6, 1.8, 0.0], 1e-12);
}

#[test]
fn moe_combine_grad_weights_dots_dy_with_the_rows() {
    let dy = f(&[3, 1], &[1.0, 2.0, 3.0]);
    let got = eval(
        Op::MoeCombineGradWeights { layout: layout() },
        vec![dy, rows_plus_one(), route()],
    );
    close(&got, &[1.0, 5.0, 12.0, 4.0, 9.0, 21.0], 0.0);
    let f32_run = eval_in(
        Op::MoeCombineGradWeights { layout: layout() },
        vec![f(&[3, 1], &[1.0, 2.0, 3.0]), rows_plus_one(), route()],
        Precision::F32,
    )
    .unwrap();
    close(&f32_run, &[1.0, 5.0, 12.0, 4.0, 9.0, 21.0], 1e-6);
}
