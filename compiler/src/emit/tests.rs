//! Emitter unit tests: every kernel validates with naga (emit validates before it returns), grids
//! fold, buffers are planned and reused correctly.

use super::*;
use crate::fuse::{fuse, FuseOptions, GroupKind};
use crate::ir::{BinaryOp, Init, ReduceOp, RouteLayout, TensorType, UnaryOp};

fn targets() -> Vec<Target> {
    let rb = Target {
        matmul: MatmulVariant::RegisterBlocked,
        max_storage_buffers_per_stage: 32,
        ..Target::default()
    };
    vec![Target::default(), rb]
}

/// Sizes of [`every_op_graph`] (odd, so no size hides another): batch, context, heads, head size,
/// vocabulary, experts, experts per token, expert hidden size.
const B: usize = 2;
const T: usize = 5;
const H: usize = 2;
const HD: usize = 4;
const V: usize = 11;
const E: usize = 3;
const K: usize = 2;
const HIDDEN: usize = 6;
const DIM: usize = H * HD;
const TOKENS: usize = B * T;

/// Inputs and parameters of [`every_op_graph`], created before any op (the graph's node order).
struct Leaves {
    ids: NodeId,
    targets: NodeId,
    emb: NodeId,
    nw: NodeId,
    wq: NodeId,
    wg: NodeId,
    w1: NodeId,
    w3: NodeId,
    w2: NodeId,
    head: NodeId,
}

/// The MoE section's nodes that later sections read.
struct Moe {
    logits_r: NodeId,
    pr: NodeId,
    idx: NodeId,
    mask: NodeId,
    route: NodeId,
    h2: NodeId,
}

fn add(g: &mut Graph, op: Op, args: &[NodeId], l: &str) -> NodeId {
    g.add(op, args, l).unwrap()
}

/// A graph touching every op of ir.rs, with odd sizes: embedding → rmsnorm → rope'd attention with a
/// causal softmax → MoE (router softmax, top-k, route, gather, grouped SwiGLU, combine) → logits → CE,
/// then every unary and binary op and the routing variants. Built by section.
pub(crate) fn every_op_graph() -> Graph {
    let mut g = Graph::new();
    let l = Leaves {
        ids: g.input("ids", TensorType::u32(&[B, T])),
        targets: g.input("targets", TensorType::u32(&[TOKENS])),
        emb: g.param("embed", &[V, DIM], Init::Normal { std: 0.02 }),
        nw: g.param("norm", &[DIM], Init::Constant(1.0)),
        wq: g.param("wq", &[DIM, DIM], Init::Normal { std: 0.02 }),
        wg: g.param("gate", &[E, DIM], Init::Normal { std: 0.02 }),
        w1: g.param("w1", &[E, HIDDEN, DIM], Init::Normal { std: 0.02 }),
        w3: g.param("w3", &[E, HIDDEN, DIM], Init::Normal { std: 0.02 }),
        w2: g.param("w2", &[E, DIM, HIDDEN], Init::Normal { std: 0.02 }),
        head: g.param("head", &[V, DIM], Init::Normal { std: 0.02 }),
    };
    let h1 = attention_section(&mut g, &l);
    let m = moe_section(&mut g, &l, h1);
    let (logits, ce, zs) = head_section(&mut g, &l, &m);
    let (load, ec, pdf) = routing_section(&mut g, &m);
    g.set_output("load", load);
    g.set_output("expert_choice", ec);
    g.set_output("pdf", pdf);
    g.set_output("ce", ce);
    g.set_output("logits", logits);
    g.set_output("z", zs);
    g.set_output("route", m.route);
    g
}

/// Embedding, rmsnorm, a RoPE'd causal self-attention (one projection for q and k) and its residual.
fn attention_section(g: &mut Graph, l: &Leaves) -> NodeId {
    let x = add(g, Op::Embedding, &[l.emb, l.ids], "x");
    let sq = add(g, Op::Unary(UnaryOp::Square), &[x], "sq");
    let ms = add(g, Op::Reduce(ReduceOp::Mean), &[sq], "ms");
    let eps = add(
        g,
        Op::Affine {
            mul: 1.0,
            add: 1e-5,
        },
        &[ms],
        "eps",
    );
    let rs = add(g, Op::Unary(UnaryOp::Rsqrt), &[eps], "rs");
    let xn = add(g, Op::Binary(BinaryOp::Mul), &[x, rs], "xn");
    let xw = add(g, Op::Binary(BinaryOp::Mul), &[xn, l.nw], "xw");
    let q = add(g, Op::MatMul { trans_b: true }, &[xw, l.wq], "q");
    let q4 = add(
        g,
        Op::Reshape {
            shape: vec![B, T, H, HD],
        },
        &[q],
        "q4",
    );
    let qr = add(g, Op::Rope { theta: 10000.0 }, &[q4], "qr");
    let qp = add(
        g,
        Op::Permute {
            perm: vec![0, 2, 1, 3],
        },
        &[qr],
        "qp",
    );
    let kt = add(
        g,
        Op::Permute {
            perm: vec![0, 1, 3, 2],
        },
        &[qp],
        "kt",
    );
    let s = add(g, Op::MatMul { trans_b: false }, &[qp, kt], "scores");
    let ss = add(g, Op::Affine { mul: 0.5, add: 0.0 }, &[s], "scaled");
    let p = add(g, Op::Softmax { causal: true }, &[ss], "probs");
    let o = add(g, Op::MatMul { trans_b: false }, &[p, qp], "attn");
    let op = add(
        g,
        Op::Permute {
            perm: vec![0, 2, 1, 3],
        },
        &[o],
        "attn_t",
    );
    let o2 = add(
        g,
        Op::Reshape {
            shape: vec![TOKENS, DIM],
        },
        &[op],
        "attn_flat",
    );
    let x2 = add(
        g,
        Op::Reshape {
            shape: vec![TOKENS, DIM],
        },
        &[x],
        "x_flat",
    );
    add(g, Op::Binary(BinaryOp::Add), &[x2, o2], "resid")
}

/// Router softmax, top-k, gate weights and mask, the routing table, gather, grouped SwiGLU experts,
/// combine and the residual.
fn moe_section(g: &mut Graph, l: &Leaves, h1: NodeId) -> Moe {
    let logits_r = add(g, Op::MatMul { trans_b: true }, &[h1, l.wg], "router");
    let pr = add(g, Op::Softmax { causal: false }, &[logits_r], "router_p");
    let idx = add(g, Op::TopK { k: K }, &[pr], "topk");
    let gw = add(g, Op::GatherCols, &[pr, idx], "gates");
    let mask = add(g, Op::TopKMask { experts: E }, &[idx], "mask");
    let layout = RouteLayout::dropless(TOKENS, K, E, 4);
    let route = add(g, Op::MoeRoute { layout }, &[idx], "route");
    let xp = add(g, Op::MoeGather { layout }, &[h1, route], "xp");
    let a = add(g, Op::GroupedMatMul { layout }, &[xp, l.w1, route], "w1x");
    let c = add(g, Op::GroupedMatMul { layout }, &[xp, l.w3, route], "w3x");
    let sa = add(g, Op::Unary(UnaryOp::Silu), &[a], "silu");
    let hh = add(g, Op::Binary(BinaryOp::Mul), &[sa, c], "swiglu");
    let y = add(g, Op::GroupedMatMul { layout }, &[hh, l.w2, route], "w2x");
    let yc = add(g, Op::MoeCombine { layout }, &[y, gw, route], "combine");
    let h2 = add(g, Op::Binary(BinaryOp::Add), &[h1, yc], "resid2");
    Moe {
        logits_r,
        pr,
        idx,
        mask,
        route,
        h2,
    }
}

/// Logits, cross-entropy, row reductions and a chain through every unary and binary op.
fn head_section(g: &mut Graph, l: &Leaves, m: &Moe) -> (NodeId, NodeId, NodeId) {
    let logits = add(g, Op::MatMul { trans_b: true }, &[m.h2, l.head], "logits");
    let mx = add(g, Op::Reduce(ReduceOp::Max), &[logits], "maxlogit");
    let sm = add(g, Op::Reduce(ReduceOp::Sum), &[m.mask], "kcount");
    let ce = add(g, Op::CrossEntropy, &[logits, l.targets], "ce");
    let th = add(g, Op::Unary(UnaryOp::Tanh), &[mx], "tanh");
    let misc = [
        UnaryOp::Neg,
        UnaryOp::Exp,
        UnaryOp::Log,
        UnaryOp::Sqrt,
        UnaryOp::Recip,
        UnaryOp::Relu,
        UnaryOp::Gelu,
        UnaryOp::Sigmoid,
        UnaryOp::Softplus,
    ];
    let mut z = add(g, Op::Unary(UnaryOp::Square), &[th], "z0");
    for (i, u) in misc.iter().enumerate() {
        z = add(g, Op::Unary(*u), &[z], format!("z{}", i + 1).as_str());
    }
    let zz = add(g, Op::Binary(BinaryOp::Max), &[z, sm], "zmax");
    let zd = add(g, Op::Binary(BinaryOp::Div), &[zz, th], "zdiv");
    let zs = add(g, Op::Binary(BinaryOp::Sub), &[zd, mx], "zsub");
    (logits, ce, zs)
}

/// Routing variants: capacity with priorities, expert choice, Sinkhorn, the normal CDF/PDF.
fn routing_section(g: &mut Graph, m: &Moe) -> (NodeId, NodeId, NodeId) {
    let idx1 = add(g, Op::SliceCols { start: 0, len: 1 }, &[m.idx], "idx1");
    let cap = RouteLayout {
        capacity: 3,
        ..RouteLayout::dropless(TOKENS, 1, E, 4)
    };
    let prio = add(g, Op::GatherCols, &[m.pr, idx1], "prio");
    let route_c = add(g, Op::MoeRoute { layout: cap }, &[idx1, prio], "route_cap");
    let load = add(g, Op::RouteLoad { layout: cap }, &[route_c], "load");
    let ec = add(
        g,
        Op::ExpertChoice { capacity: 2 },
        &[m.pr],
        "expert_choice",
    );
    let sk = add(g, Op::Sinkhorn { iters: 2 }, &[m.logits_r], "sinkhorn");
    let cdf = add(g, Op::Unary(UnaryOp::NormalCdf), &[sk], "cdf");
    let pdf = add(g, Op::Unary(UnaryOp::NormalPdf), &[cdf], "pdf");
    (load, ec, pdf)
}

#[test]
fn every_kernel_of_every_op_validates_fused_and_unfused() {
    let g = every_op_graph();
    for target in targets() {
        for enabled in [false, true] {
            let fused = fuse(
                &g,
                FuseOptions {
                    enabled,
                    max_bindings: target.max_storage_buffers_per_stage,
                    max_binding_bytes: target.max_storage_binding_size,
                },
            );
            let plan = emit(&g, &fused, &target).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(plan.dispatches.len(), fused.len());
            for k in &plan.kernels {
                validate_wgsl(&k.wgsl).unwrap();
            }
        }
    }
}

#[test]
fn fusion_cuts_dispatches() {
    let g = every_op_graph();
    let t = Target::default();
    let unfused = emit(&g, &fuse(&g, FuseOptions::unfused(&t)), &t).unwrap();
    let fused = emit(&g, &fuse(&g, FuseOptions::for_target(&t)), &t).unwrap();
    // 57 non-free nodes; fusion merges rmsnorm (6 → 1), scale+softmax, residuals, SwiGLU, the z chain.
    assert_eq!(unfused.dispatches.len(), 57);
    assert!(
        fused.dispatches.len() <= 35,
        "{} fused dispatches",
        fused.dispatches.len()
    );
}

/// Two products of one shape share a kernel, named after the first; each dispatch keeps its own
/// name, so profiles and the non-finite report say which product ran.
#[test]
fn dispatches_sharing_a_kernel_keep_their_own_names() {
    let mut g = Graph::new();
    // Different operands on both sides, so the two are not one horizontal product.
    let x1 = g.input("x1", TensorType::f32(&[6, 8]));
    let x2 = g.input("x2", TensorType::f32(&[6, 8]));
    let w1 = g.param("w1", &[5, 8], Init::Constant(0.0));
    let w2 = g.param("w2", &[5, 8], Init::Constant(0.0));
    let a = g
        .add(Op::MatMul { trans_b: true }, &[x1, w1], "first")
        .unwrap();
    let b = g
        .add(Op::MatMul { trans_b: true }, &[x2, w2], "second")
        .unwrap();
    g.set_output("a", a);
    g.set_output("b", b);
    let t = Target::default();
    let plan = emit(&g, &fuse(&g, FuseOptions::for_target(&t)), &t).unwrap();
    assert_eq!(plan.kernels.len(), 1, "one kernel for both products");
    let names: Vec<&str> = plan.dispatches.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["000_matmul_first", "001_matmul_second"]);
    assert_eq!(plan.kernels[0].name, "000_matmul_first");
}

#[test]
fn grid_folds_past_65535_workgroups() {
    let mut g = Graph::new();
    let n = 70_000 * 256 + 3;
    let x = g.input("x", TensorType::f32(&[n]));
    let y = g.add(Op::Unary(UnaryOp::Relu), &[x], "y").unwrap();
    g.set_output("y", y);
    let t = Target::default();
    let plan = emit(&g, &fuse(&g, FuseOptions::for_target(&t)), &t).unwrap();
    assert_eq!(plan.dispatches[0].workgroups, [65535, 2, 1]);
    let wgsl = &plan.kernels[0].wgsl;
    assert!(wgsl.contains("const GX: u32 = 65535u;"));
    assert!(wgsl.contains(&format!("if (i >= {n}u)")));
    // A count too large even for a folded grid is an error, not a panic.
    let small = Target {
        max_workgroups_per_dim: 4,
        ..Target::default()
    };
    match emit(&g, &fuse(&g, FuseOptions::for_target(&small)), &small) {
        Err(EmitError::GridTooLarge { workgroups, .. }) => assert_eq!(workgroups, 70_001),
        other => panic!("expected GridTooLarge, got {other:?}"),
    }
}

#[test]
fn broadcast_indices_collapse_runs() {
    assert_eq!(expr::bcast_index(&[4, 8], &[4, 8], "i"), "i");
    assert_eq!(expr::bcast_index(&[4, 8], &[8], "i"), "(i % 8u)");
    assert_eq!(expr::bcast_index(&[4, 8], &[4, 1], "i"), "(i / 8u)");
    assert_eq!(expr::bcast_index(&[4, 8], &[1], "i"), "0u");
    assert_eq!(
        expr::bcast_index(&[2, 3, 4, 5], &[3, 1, 5], "i"),
        "((i / 20u) % 3u) * 5u + (i % 5u)"
    );
}

#[test]
fn scratch_buffers_are_reused_and_never_alias_within_a_dispatch() {
    // A chain of 6 unfused relus: with reuse, two buffers suffice, the output sharing one of them
    // with the values that died before it was written.
    let mut g = Graph::new();
    let mut x = g.input("x", TensorType::f32(&[100]));
    for i in 0..6 {
        x = g
            .add(Op::Unary(UnaryOp::Relu), &[x], format!("r{i}"))
            .unwrap();
    }
    g.set_output("y", x);
    let t = Target::default();
    let plan = emit(&g, &fuse(&g, FuseOptions::unfused(&t)), &t).unwrap();
    let scratch = plan
        .buffers
        .iter()
        .filter(|b| b.role == BufferRole::Scratch)
        .count();
    assert_eq!(scratch, 1);
    assert_eq!(plan.buffers.len(), 3);
    for d in &plan.dispatches {
        assert_ne!(d.bindings[0].buffer, d.bindings[1].buffer);
    }
    assert!(matches!(
        plan.buffers[plan.dispatches[5].bindings.last().unwrap().buffer].role,
        BufferRole::Output { .. }
    ));
}

#[test]
fn outputs_that_name_params_or_repeat_get_copies() {
    let mut g = Graph::new();
    let p = g.param("w", &[3], Init::Constant(1.0));
    let y = g.add(Op::Unary(UnaryOp::Exp), &[p], "y").unwrap();
    g.set_output("w_out", p);
    g.set_output("y", y);
    g.set_output("y_again", y);
    let t = Target::default();
    let plan = emit(&g, &fuse(&g, FuseOptions::for_target(&t)), &t).unwrap();
    assert_eq!(plan.dispatches.len(), 3);
    for name in ["w", "w_out", "y", "y_again"] {
        assert!(plan.buffer_named(name).is_some(), "{name}");
    }
}

#[test]
fn rmsnorm_is_one_row_kernel_and_ffn_epilogues_fuse() {
    let g = every_op_graph();
    let t = Target::default();
    let fused = fuse(&g, FuseOptions::for_target(&t));
    let first = &fused
        .groups
        .iter()
        .find(|gr| gr.kind == GroupKind::Row)
        .unwrap();
    let labels: Vec<&str> = first
        .nodes
        .iter()
        .map(|n| g.node(*n).label.as_str())
        .collect();
    assert_eq!(labels, ["sq", "ms", "eps", "rs", "xn", "xw"]);
    let outs: Vec<&str> = first
        .outputs
        .iter()
        .map(|n| g.node(*n).label.as_str())
        .collect();
    assert_eq!(outs, ["xw"]);
    // SwiGLU: silu(w1x) * w3x fuses into the second grouped matmul's epilogue; the gather of its
    // rows is a prologue of both grouped matmuls.
    let swiglu = fused
        .groups
        .iter()
        .find(|gr| gr.nodes.iter().any(|n| g.node(*n).label == "swiglu"))
        .unwrap();
    let labels: Vec<&str> = swiglu
        .nodes
        .iter()
        .map(|n| g.node(*n).label.as_str())
        .collect();
    assert_eq!(swiglu.kind, GroupKind::Matmul);
    assert!(
        labels == ["xp", "w1x", "silu", "swiglu"] || labels == ["xp", "w3x", "swiglu"],
        "{labels:?}"
    );
}

/// Every example spec lowers, fuses and emits naga-valid kernels for both matmul variants.
#[test]
fn example_specs_emit_valid_kernels() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "moe"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty());
    for path in paths {
        let source = std::fs::read_to_string(&path).unwrap();
        let spec = crate::check::check(&source, &path)
            .unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
        let graph =
            crate::lower::lower(&spec, 2).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for target in targets() {
            let unfused = emit(
                &graph,
                &fuse(&graph, FuseOptions::unfused(&target)),
                &target,
            )
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let fused_groups = fuse(&graph, FuseOptions::for_target(&target));
            let fused = emit(&graph, &fused_groups, &target)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            eprintln!(
                "{}: {:?} {} unfused / {} fused dispatches, {} kernels",
                path.display(),
                target.matmul,
                unfused.dispatches.len(),
                fused.dispatches.len(),
                fused.kernels.len()
            );
            assert!(fused.dispatches.len() < unfused.dispatches.len());
        }
    }
}

/// Training graphs (forward + backward) of every example spec emit valid kernels, and fusion cuts
/// the dispatch count.
#[test]
fn example_training_graphs_emit_valid_kernels() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "moe"))
        .collect();
    paths.sort();
    for path in paths {
        let source = std::fs::read_to_string(&path).unwrap();
        let spec = crate::check::check(&source, &path).unwrap();
        for target in targets() {
            let unfused = crate::compile_training(&spec, 2, &target, false)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let fused = crate::compile_training(&spec, 2, &target, true)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let (u, f) = (unfused.plan.dispatches.len(), fused.plan.dispatches.len());
            eprintln!(
                "{}: {:?} training {u} unfused / {f} fused dispatches",
                path.display(),
                target.matmul
            );
            assert!(f < u);
        }
    }
}

/// The quickstart spec's training step under a 4 KiB binding limit: every value over it (the
/// embedding and head weights, their gradients, expert stacks, activations) is bound as consecutive
/// 4 KiB segments at 256-aligned offsets that tile the value exactly, and the kernels reach it
/// through accessors; with the adapter's real limit nothing is split.
#[test]
fn values_over_the_binding_limit_are_split_across_segments() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs/quickstart.moe");
    let source = std::fs::read_to_string(&path).unwrap();
    let spec = crate::check::check(&source, &path).unwrap();
    for target in targets() {
        let small = Target {
            max_storage_binding_size: 4096,
            max_storage_buffers_per_stage: 1000,
            ..target.clone()
        };
        let plan = crate::compile_training(&spec, 2, &small, true)
            .unwrap()
            .plan;
        let mut split = 0;
        for d in &plan.dispatches {
            for run in d
                .bindings
                .chunk_by(|a, b| a.buffer == b.buffer && b.offset > a.offset)
            {
                assert!(run.iter().all(|b| b.size <= 4096 && b.offset % 256 == 0));
                for (j, b) in run.iter().enumerate() {
                    assert_eq!(b.offset, 4096 * j as u64, "segments tile the value");
                }
                if run.len() > 1 {
                    split += 1;
                    assert!(plan.buffers[run[0].buffer].size > 4096);
                }
            }
        }
        assert!(split > 0, "{:?}: nothing was split", small.matmul);
        assert!(plan.kernels.iter().any(|k| k.wgsl.contains("_ld(")));
        let whole = Target {
            max_storage_buffers_per_stage: 1000,
            ..target
        };
        let unsplit = crate::compile_training(&spec, 2, &whole, true)
            .unwrap()
            .plan;
        assert!(unsplit
            .dispatches
            .iter()
            .all(|d| d.bindings.iter().all(|b| b.offset == 0)));
    }
}

/// A fixed-function kernel that indexes its arrays directly (the MoE route template) cannot take a
/// split value: emit refuses with the kernel, the value, its size and the limit.
#[test]
fn a_template_over_the_binding_limit_is_refused_by_name() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs/mixtral.moe");
    let source = std::fs::read_to_string(&path).unwrap();
    let spec = crate::check::check(&source, &path).unwrap();
    let target = Target {
        max_storage_binding_size: 4096,
        max_storage_buffers_per_stage: 1000,
        ..Target::default()
    };
    let err = crate::compile_training(&spec, 2, &target, true)
        .err()
        .expect("the route does not fit")
        .to_string();
    assert!(
        err.contains("moe_route") && err.contains("bytes") && err.contains("4096"),
        "{err}"
    );
}
