//! Running a graph on the GPU against the f64 interpreter in every (matmul variant, fused)
//! configuration, shared by the GPU test files.
#![allow(dead_code)] // each test file uses a different subset

use moec_compiler::emit::{emit, MatmulVariant, Target};
use moec_compiler::fuse::{fuse, FuseOptions};
use moec_compiler::interp::{self, Precision, Value};
use moec_compiler::ir::{DType, Graph, Init, NodeId, Op, RouteLayout, TensorType};
use moec_runtime::{AdapterChoice, Executor, Gpu};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::sync::OnceLock;

pub fn gpu() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| {
        Gpu::new(&AdapterChoice::default())
            .expect("a wgpu adapter (lavapipe: apt-get install mesa-vulkan-drivers)")
    })
}

/// `g.add`, for graphs a test builds by hand (every op it adds is well-typed).
pub fn add(g: &mut Graph, op: Op, args: &[NodeId], label: &str) -> NodeId {
    g.add(op, args, label).unwrap()
}

/// `n` f32 values drawn from U(−bound, bound).
pub fn uniform(rng: &mut ChaCha8Rng, n: usize, bound: f32) -> Value {
    Value::F32((0..n).map(|_| rng.random_range(-bound..bound)).collect())
}

/// The five adjoints of a routed MoE layer over `route` (`d` the model width, `hidden` the
/// expert's), as named outputs: the grouped matmul's input and weight gradients, the gather's,
/// and the weighted combine's for its rows and its gate weights. Their upstream gradients and
/// operands are fresh inputs, so a test feeds them directly.
pub fn moe_adjoints(
    g: &mut Graph,
    layout: RouteLayout,
    route: NodeId,
    d: usize,
    hidden: usize,
) -> [(&'static str, NodeId); 5] {
    let rows = layout.rows();
    let gh = g.input("gh", TensorType::f32(&[rows, hidden]));
    let xp = g.input("xp", TensorType::f32(&[rows, d]));
    let w = g.param("w", &[layout.experts, hidden, d], Init::Constant(0.0));
    let gp = g.input("gp", TensorType::f32(&[rows, d]));
    let dy = g.input("dy", TensorType::f32(&[layout.tokens, d]));
    let gates = g.input("gates", TensorType::f32(&[layout.tokens, layout.k]));
    let outputs = [
        (
            "grad_x",
            Op::GroupedMatMulGradX { layout },
            vec![gh, w, route],
        ),
        (
            "grad_w",
            Op::GroupedMatMulGradW { layout },
            vec![gh, xp, route],
        ),
        ("gather_grad", Op::MoeGatherGrad { layout }, vec![gp, route]),
        (
            "combine_rows",
            Op::MoeCombineGradRows { layout },
            vec![dy, gates, route],
        ),
        (
            "combine_weights",
            Op::MoeCombineGradWeights { layout },
            vec![dy, xp, route],
        ),
    ];
    outputs.map(|(name, op, args)| {
        let id = add(g, op, &args, name);
        g.set_output(name, id);
        (name, id)
    })
}

pub fn widen(feeds: &HashMap<String, Value>) -> HashMap<String, Value> {
    feeds
        .iter()
        .map(|(k, v)| {
            let v = match v {
                Value::F32(x) => Value::F64(x.iter().map(|&a| f64::from(a)).collect()),
                other => other.clone(),
            };
            (k.clone(), v)
        })
        .collect()
}

/// Runs `graph` on the GPU and returns every named output as f64.
pub fn run_gpu(
    graph: &Graph,
    feeds: &HashMap<String, Value>,
    target: &Target,
    fused: bool,
) -> HashMap<String, Vec<f64>> {
    let opts = FuseOptions {
        enabled: fused,
        max_bindings: target.max_storage_buffers_per_stage,
        max_binding_bytes: target.max_storage_binding_size,
    };
    let plan = emit(graph, &fuse(graph, opts), target).unwrap_or_else(|e| panic!("{e}"));
    let exec = Executor::new(gpu(), &plan).unwrap_or_else(|e| panic!("{e}"));
    for (name, value) in feeds {
        match value {
            Value::F32(v) => exec.write_f32(name, v),
            Value::U32(v) => exec.write_u32(name, v),
            Value::F64(v) => exec.write_f32(name, &v.iter().map(|&x| x as f32).collect::<Vec<_>>()),
        }
        .unwrap_or_else(|e| panic!("feed {name}: {e}"));
    }
    exec.run().unwrap();
    graph
        .outputs
        .iter()
        .map(|(name, id)| {
            let v = match graph.ty(*id).dtype {
                DType::F32 | DType::F16 => exec
                    .read_f32(name)
                    .unwrap()
                    .into_iter()
                    .map(f64::from)
                    .collect(),
                DType::U32 => exec
                    .read_u32(name)
                    .unwrap()
                    .into_iter()
                    .map(f64::from)
                    .collect(),
            };
            (name.clone(), v)
        })
        .collect()
}

/// Every (matmul variant, fused) configuration a graph is checked in.
pub fn configs() -> Vec<(Target, bool)> {
    let mut out = Vec::new();
    for variant in [MatmulVariant::RegisterBlocked, MatmulVariant::SharedTiled] {
        for fused in [true, false] {
            out.push((
                Target {
                    matmul: variant,
                    ..gpu().target()
                },
                fused,
            ));
        }
    }
    out
}

/// Compares every output of `graph` on the GPU with the f64 interpreter, u32 outputs exactly, f32
/// outputs within `tol(reference, max |reference| of that output)`; returns the largest absolute
/// error per output over all configurations.
pub fn compare(
    graph: &Graph,
    feeds: &HashMap<String, Value>,
    tol: &dyn Fn(f64, f64) -> f64,
) -> HashMap<String, f64> {
    compare_lowered(graph, graph, feeds, tol, &configs())
}

/// [`compare`] of `graph` on the GPU, in the given (target, fused) configurations, against another
/// graph with the same outputs in the interpreter: `reference` before a lowering pass (e.g.
/// `head::legalize`) that made `graph`.
pub fn compare_lowered(
    reference: &Graph,
    graph: &Graph,
    feeds: &HashMap<String, Value>,
    tol: &dyn Fn(f64, f64) -> f64,
    configs: &[(Target, bool)],
) -> HashMap<String, f64> {
    let expected = interp::run_outputs_in(reference, &widen(feeds), Precision::F64).unwrap();
    let mut worst: HashMap<String, f64> = HashMap::new();
    for (target, fused) in configs.iter().cloned() {
        let got = run_gpu(graph, feeds, &target, fused);
        for (name, id) in &graph.outputs {
            let want = expected[name].to_f64();
            let have = &got[name];
            assert_eq!(want.len(), have.len(), "{name}");
            let scale = want.iter().fold(0.0f64, |m, w| m.max(w.abs()));
            let exact = graph.ty(*id).dtype == DType::U32;
            for (i, (w, h)) in want.iter().zip(have).enumerate() {
                let err = (w - h).abs();
                let ok = if exact {
                    err == 0.0
                } else {
                    err <= tol(w.abs(), scale)
                };
                assert!(
                    ok,
                    "{name}[{i}]: gpu {h} vs reference {w} ({:?}, fused = {fused})",
                    target.matmul
                );
                let e = worst.entry(name.clone()).or_default();
                *e = e.max(err);
            }
        }
    }
    worst
}

/// Smallest gap, over every `TopK` row and `ExpertChoice` column, between the last kept and the
/// first dropped score (f64).
pub fn selection_margin(g: &Graph, feeds: &HashMap<String, Value>) -> f64 {
    let vals = interp::run_in(g, &widen(feeds), Precision::F64).expect("forward runs");
    let mut margin = f64::INFINITY;
    let mut gap = |mut s: Vec<f64>, k: usize| {
        if k < s.len() {
            s.sort_by(|a, b| b.total_cmp(a));
            margin = margin.min(s[k - 1] - s[k]);
        }
    };
    for id in g.topo_order() {
        match g.node(id).op {
            Op::TopK { k } => {
                let scores = g.inputs(id)[0];
                let e = g.ty(scores).last();
                for row in vals[&scores].to_f64().chunks(e) {
                    gap(row.to_vec(), k);
                }
            }
            Op::ExpertChoice { capacity } => {
                let scores = g.inputs(id)[0];
                let (t, e) = (g.ty(scores).shape[0], g.ty(scores).shape[1]);
                let s = vals[&scores].to_f64();
                for c in 0..e {
                    gap((0..t).map(|r| s[r * e + c]).collect(), capacity);
                }
            }
            _ => {}
        }
    }
    margin
}

/// Unit-variance parameters, drawn first from `rng` in `g.params()` order: weights U(±√(3/fan_in)),
/// constant-initialised params (norm weights, biases) c ± 0.3. The 0.02 init would make every
/// gradient tiny; the callers add their graph's data inputs after these.
pub fn unit_variance_params(g: &Graph, rng: &mut ChaCha8Rng) -> HashMap<String, Value> {
    let mut feeds = HashMap::new();
    for (id, name, ty) in g.params() {
        let v: Vec<f32> = match g.node(id).op {
            Op::Param {
                init: Init::Constant(c),
                ..
            } => (0..ty.numel())
                .map(|_| c + rng.random_range(-0.3..0.3))
                .collect(),
            _ => {
                let bound = (3.0 / ty.last() as f32).sqrt();
                (0..ty.numel())
                    .map(|_| rng.random_range(-bound..bound))
                    .collect()
            }
        };
        feeds.insert(name, Value::F32(v));
    }
    feeds
}
