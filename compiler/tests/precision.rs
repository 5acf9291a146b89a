//! `precision = f16`: which values the marking pass stores in f16, what the plan and kernels make
//! of it, and the interpreter's f16 mode.

use moec_compiler::autodiff::training_graph;
use moec_compiler::check::check;
use moec_compiler::emit::Target;
use moec_compiler::interp::{run_outputs_in, Precision, Value};
use moec_compiler::ir::{DType, Graph, Op, TensorType};
use moec_compiler::lower::lower;
use moec_compiler::precision::{mark_f16, uses_f16};
use moec_compiler::spec::Spec;
use moec_compiler::{compile, compile_training};
use std::collections::HashMap;
use std::path::Path;

const SPEC: &str = "model m {\n  vocab = 32\n  dim = 16\n  layers = 2\n  heads = 2\n  context = 8\n  moe {\n    experts = 4\n    top_k = 2\n    every = 2\n    expert = swiglu(hidden = 32)\n    balance = aux(0.01) + z(0.001)\n  }\n}\ntrain {\n  data = synthetic(kind = copy)\n  batch = 2\n  steps = 1\n  precision = f16\n}\n";

fn spec() -> Spec {
    check(SPEC, Path::new("f16.moe")).unwrap_or_else(|d| panic!("{d:?}"))
}

fn by_label<'g>(g: &'g Graph, label: &str) -> &'g TensorType {
    let id =
        g.g.node_indices()
            .find(|&id| g.node(id).label == label)
            .unwrap_or_else(|| panic!("no node `{label}`"));
    g.ty(id)
}

#[test]
fn activations_are_f16_and_router_statistics_loss_and_interfaces_stay_f32() {
    let mut g = training_graph(&lower(&spec(), 2).unwrap()).unwrap();
    mark_f16(&mut g);
    assert!(uses_f16(&g));
    let p = "model.layers.0.self_attn";
    for label in [
        &format!("{p}.q_proj") as &str,
        &format!("{p}.scores"),
        &format!("{p}.probs"),
        &format!("{p}.context"),
        "model.layers.1.block_sparse_moe.gather",
    ] {
        assert_eq!(by_label(&g, label).dtype, DType::F16, "{label}");
    }
    assert_eq!(
        by_label(&g, "model.layers.1.block_sparse_moe.gate").dtype,
        DType::F32,
        "router logits"
    );
    assert_eq!(g.ty(g.output("logits").unwrap()).dtype, DType::F32);
    for id in g.g.node_indices() {
        let n = g.node(id);
        match &n.op {
            // The interface with the host and the optimizer, and row statistics, stay f32.
            Op::Param { .. } | Op::Input { .. } | Op::Reduce(_) | Op::CrossEntropy => {
                assert_ne!(n.ty.dtype, DType::F16, "{}", n.label)
            }
            _ if n.ty.last() == 1 => assert_ne!(n.ty.dtype, DType::F16, "{}", n.label),
            _ => {}
        }
        // Everything computed from the router's logits, and their adjoints, stays f32.
        if n.label.contains(".block_sparse_moe.gate") || n.label.contains(".block_sparse_moe.probs")
        {
            assert_ne!(n.ty.dtype, DType::F16, "{}", n.label);
        }
    }
    for (name, id) in &g.outputs {
        assert_ne!(g.ty(*id).dtype, DType::F16, "output {name}");
    }
    // A reshape is stored where its operand is.
    for id in g.g.node_indices() {
        if let Op::Reshape { .. } = g.node(id).op {
            assert_eq!(g.ty(id).dtype, g.ty(g.inputs(id)[0]).dtype);
        }
    }
}

/// The planned scratch of an f16 plan shrinks by at least a quarter. Not by half at this size: row
/// statistics, router values and the head stay f32, and the whole-step planner (`emit::alloc`) puts
/// f16 values into dead f32 buffers only when those are free for their whole lifetime.
#[test]
fn f16_plans_halve_activation_buffers_and_enable_f16_in_their_kernels() {
    let mut s32 = spec();
    s32.train.as_mut().unwrap().precision = moec_compiler::spec::Precision::F32;
    let target = Target::default();
    for fusion in [true, false] {
        let half = compile_training(&spec(), 2, &target, fusion).unwrap();
        let full = compile_training(&s32, 2, &target, fusion).unwrap();
        let f16_buffers = half.plan.buffers.iter().filter(|b| b.dtype == DType::F16);
        assert!(f16_buffers.count() > 0);
        let scratch = |c: &moec_compiler::Compiled| -> u64 {
            c.plan
                .buffers
                .iter()
                .filter(|b| matches!(b.role, moec_compiler::plan::BufferRole::Scratch))
                .map(|b| b.size)
                .sum()
        };
        assert!(
            scratch(&half) < scratch(&full) * 3 / 4,
            "fusion {fusion}: {} vs {}",
            scratch(&half),
            scratch(&full)
        );
        let with_f16 = half
            .plan
            .kernels
            .iter()
            .filter(|k| k.wgsl.contains("array<f16>"));
        for k in with_f16 {
            assert!(k.wgsl.starts_with("enable f16;"), "{}", k.name);
        }
        // Outputs (weights' gradients, losses) and params are f32 for the host and the optimizer.
        for b in &half.plan.buffers {
            if !matches!(b.role, moec_compiler::plan::BufferRole::Scratch) {
                assert_ne!(b.dtype, DType::F16, "{}", b.label);
            }
            assert_eq!(b.size % 4, 0, "{}", b.label);
        }
        // f32 specs are untouched.
        assert!(full.plan.buffers.iter().all(|b| b.dtype != DType::F16));
    }
    // The forward plan (evaluation) follows the same dtypes.
    let forward = compile(&spec(), 2, &target, true).unwrap();
    assert!(uses_f16(&forward.graph));
}

/// The LSTM kernels (`emit/lstm.rs`, fixed templates over f32 bindings) are deliberately left out of
/// the marking pass: the scans, their records and adjoints, and every operand they read stay f32,
/// while the MoE blocks between LSTM layers store their activations in f16; the mixed plan is
/// valid WGSL (compile validates every kernel).
#[test]
fn lstm_scans_and_what_they_read_stay_f32_in_an_f16_plan() {
    let text = include_str!("../../specs/shazeer-lstm-flat.moe")
        .replace("  batch = 32\n", "  batch = 2\n  precision = f16\n")
        .replace("dim = 128", "dim = 16")
        .replace("hidden = 128", "hidden = 16")
        .replace("context = 50", "context = 4");
    let spec = check(&text, Path::new("lstm.moe")).unwrap_or_else(|d| panic!("{d:?}"));
    let compiled = compile_training(&spec, 2, &Target::default(), true).unwrap();
    let g = &compiled.graph;
    let mut scans = 0;
    for id in g.g.node_indices() {
        let op = &g.node(id).op;
        let lstm = matches!(
            op,
            Op::LstmScan { .. }
                | Op::LstmHidden
                | Op::LstmScanGrad { .. }
                | Op::LstmScanGradW { .. }
                | Op::LstmLast { .. }
                | Op::LstmLastGrad { .. }
        );
        if lstm {
            scans += 1;
            assert_ne!(g.ty(id).dtype, DType::F16, "{}", g.node(id).label);
            for arg in g.inputs(id) {
                assert_ne!(g.ty(arg).dtype, DType::F16, "operand {}", g.node(arg).label);
            }
        }
    }
    assert!(scans > 0);
    assert!(uses_f16(g), "the MoE activations are f16");
}

#[test]
fn the_interpreter_rounds_values_the_graph_stores_in_f16() {
    let mut g = Graph::new();
    let x = g.input("x", TensorType::f32(&[4]));
    let third = g
        .add(
            Op::Affine {
                mul: 1.0 / 3.0,
                add: 0.0,
            },
            &[x],
            "third",
        )
        .unwrap();
    let out = g
        .add(Op::Affine { mul: 1.0, add: 0.0 }, &[third], "out")
        .unwrap();
    g.set_output("out", out);
    let feeds = HashMap::from([("x".to_string(), Value::F64(vec![1.0, -2.0, 3e5, 1e-9]))]);
    let exact = run_outputs_in(&g, &feeds, Precision::F64).unwrap()["out"].to_f64();
    mark_f16(&mut g);
    assert_eq!(g.ty(third).dtype, DType::F16);
    assert_eq!(g.ty(out).dtype, DType::F32, "outputs stay f32");
    let rounded = run_outputs_in(&g, &feeds, Precision::F64).unwrap()["out"].to_f64();
    for (e, r) in exact.iter().zip(&rounded) {
        let want = half::f16::from_f64(*e).to_f64();
        assert!(
            want == *r || (want.is_nan() && r.is_nan()),
            "{e}: {r} vs {want}"
        );
    }
    // 1e5 overflows f16 (max 65504); 3.3e-10 flushes to 0 (below the smallest subnormal).
    assert_eq!(rounded[2], f64::INFINITY);
    assert_eq!(rounded[3], 0.0);
    assert_ne!(exact[0], rounded[0]);
}

/// The chunked head (`head::legalize`) of an f16 graph stores each chunk's logits and their adjoint
/// in f16, while `h`, the loss, `dh` and the weight gradient stay f32; and the interpreter's f16
/// mode rounds the unchunked fused head's logits and adjoint the same way, so the legalized graph
/// (whose chunk nodes the interpreter rounds by dtype) and the fused one agree to f64 round-off.
#[test]
fn the_chunked_head_stores_logits_and_their_adjoint_in_f16() {
    let spec = spec();
    let forward =
        moec_compiler::lower::lower_with(&spec, 2, moec_compiler::lower::Head::Loss).unwrap();
    let mut train = training_graph(&forward).unwrap();
    let f32_chunked = moec_compiler::head::legalize_in_chunks(&train, 5).unwrap();
    assert!(!uses_f16(&f32_chunked), "f32 graphs keep an f32 head");
    // Without the f16 mode's rounding of the fused head the two differ by ~2⁻¹¹ relative.
    mark_f16(&mut train);
    let chunked = moec_compiler::head::legalize_in_chunks(&train, 5).unwrap();
    for chunk in 0..4 {
        for (part, dtype) in [
            ("logits", DType::F16),
            ("ce", DType::F32),
            ("h", DType::F32),
        ] {
            let label = format!("ce.chunk{chunk}.{part}");
            assert_eq!(by_label(&chunked, &label).dtype, dtype, "{label}");
        }
        for (part, dtype) in [
            ("logits", DType::F16),
            ("dlogits", DType::F16),
            ("dlogits_t", DType::F16),
            ("dh", DType::F32),
            ("dw", DType::F32),
        ] {
            let label = format!("grad.ce.chunk{chunk}.{part}");
            assert_eq!(by_label(&chunked, &label).dtype, dtype, "{label}");
        }
    }
    let mut feeds: HashMap<String, Value> = HashMap::new();
    let mut x = 0.37f64;
    let mut next = || {
        x = (x * 7919.0 + 0.123).fract();
        x - 0.5
    };
    for (_, name, ty) in forward.params() {
        feeds.insert(name, Value::F64((0..ty.numel()).map(|_| next()).collect()));
    }
    for (_, name, ty) in forward.data_inputs() {
        let ids = (0..ty.numel()).map(|i| (i * 7 % 32) as u32).collect();
        feeds.insert(name, Value::U32(ids));
    }
    feeds.insert(
        moec_compiler::autodiff::SEED.into(),
        Value::F64(vec![1024.0]),
    );
    let fused = run_outputs_in(&train, &feeds, Precision::F64).unwrap();
    let legal = run_outputs_in(&chunked, &feeds, Precision::F64).unwrap();
    for (name, want) in &fused {
        let (want, got) = (want.to_f64(), legal[name].to_f64());
        let scale = want.iter().fold(0.0f64, |m, w| m.max(w.abs()));
        for (w, g) in want.iter().zip(&got) {
            assert!((w - g).abs() <= 1e-9 * scale.max(1.0), "{name}: {g} vs {w}");
        }
    }
}
