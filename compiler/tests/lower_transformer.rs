//! `lower` on small hand-built Specs: the graphs type-check (they exist: `Graph::add` rejects
//! ill-typed nodes), run in the reference interpreter, give ≈ ln(V) at init, name parameters as HF
//! does, and compute attention, MoE and the balancing losses exactly as naive loops written here.

use moec_compiler::interp::{init_params, run, run_outputs, Value};
use moec_compiler::ir::{Graph, NodeId, Op};
use moec_compiler::lower::{lower, LowerError, ROUTE_TILE};
use moec_compiler::spec::*;
use std::collections::HashMap;

fn model(
    vocab: usize,
    dim: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    context: usize,
) -> Model {
    Model {
        family: Family::Transformer,
        vocab: Some(vocab),
        inputs: None,
        classes: None,
        dim,
        layers,
        heads,
        kv_heads,
        context: Some(context),
        norm: Norm::RmsNorm,
        rope_theta: 10000.0,
        ffn: Ffn {
            activation: Activation::SwiGlu,
            hidden: 2 * dim,
        },
        bidirectional: false,
        tie_embeddings: false,
        qk_norm: false,
    }
}

fn moe(blocks: Vec<usize>, experts: usize, top_k: usize, gate: Gate, balance: Vec<Balance>) -> Moe {
    Moe {
        blocks,
        experts,
        top_k,
        expert: Ffn {
            activation: Activation::SwiGlu,
            hidden: 24,
        },
        shared_experts: 0,
        gate,
        groups: None,
        hierarchy: Hierarchy::TwoLevel,
        top_groups: 1,
        capacity: Capacity::Dropless,
        balance,
        jitter: 0.0,
        router_precision: Precision::F32,
    }
}

fn spec(model: Model, moe: Option<Moe>) -> Spec {
    Spec {
        name: "test".into(),
        model,
        moe,
        train: None,
    }
}

/// Deterministic pseudo-random ids below `bound` (an LCG: no dependency on rand's algorithms).
fn ids(n: usize, bound: usize, seed: u64) -> Vec<u32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) % bound as u64) as u32
        })
        .collect()
}

/// Feeds for a transformer graph: init params (seed 0) plus random tokens and targets, in f64 when
/// `f64` (so comparisons with naive loops can be tight).
fn feeds(g: &Graph, batch: usize, t: usize, vocab: usize, f64: bool) -> HashMap<String, Value> {
    let mut f: HashMap<String, Value> = init_params(g, 0)
        .into_iter()
        .map(|(k, v)| {
            (
                k,
                if f64 {
                    Value::F64(v.iter().map(|&x| x as f64).collect())
                } else {
                    Value::F32(v)
                },
            )
        })
        .collect();
    f.insert("tokens".into(), Value::U32(ids(batch * t, vocab, 1)));
    f.insert("targets".into(), Value::U32(ids(batch * t, vocab, 2)));
    f
}

/// The last node with `label`.
fn node(g: &Graph, label: &str) -> NodeId {
    g.g.node_indices()
        .filter(|&i| g.node(i).label == label)
        .max()
        .unwrap_or_else(|| panic!("no node labelled {label}"))
}

fn scalar(v: &Value) -> f64 {
    let x = v.to_f64();
    assert_eq!(x.len(), 1);
    x[0]
}

fn param_names(g: &Graph) -> Vec<String> {
    g.params().into_iter().map(|(_, n, _)| n).collect()
}

#[test]
fn dense_transformer_runs_and_starts_near_ln_vocab() {
    let s = spec(model(64, 32, 2, 4, 4, 8), None);
    let g = lower(&s, 2).unwrap();
    assert_eq!(g.ty(g.output("logits").unwrap()).shape, vec![16, 64]);
    for out in ["ce", "loss"] {
        assert_eq!(g.ty(g.output(out).unwrap()).shape, vec![1]);
    }
    assert_eq!(g.outputs.len(), 3, "no aux outputs for a dense model");
    let names = param_names(&g);
    for want in [
        "model.embed_tokens.weight",
        "model.layers.1.input_layernorm.weight",
        "model.layers.1.post_attention_layernorm.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "missing {want} in {names:?}"
        );
    }
    assert_eq!(names.len(), 1 + 2 * 9 + 2);
    let out = run_outputs(&g, &feeds(&g, 2, 8, 64, false)).unwrap();
    let (ce, loss) = (scalar(&out["ce"]), scalar(&out["loss"]));
    // Weights N(0, 0.02²) give logits of std ≈ 0.02·√32 ≈ 0.11: CE = ln V + O(var) ≈ ln 64 + 0.006.
    assert!(
        (ce - 64f64.ln()).abs() < 0.05,
        "ce {ce} vs ln 64 = {}",
        64f64.ln()
    );
    assert_eq!(ce, loss);
}

#[test]
fn variants_name_their_parameters() {
    // 32 tokens per run: the CE estimate's sampling error is ≈ 0.08/√32 ≈ 0.015.
    let mut m = model(32, 16, 1, 2, 2, 8);
    m.norm = Norm::LayerNorm;
    m.tie_embeddings = true;
    m.ffn = Ffn {
        activation: Activation::Gelu,
        hidden: 32,
    };
    let g = lower(&spec(m.clone(), None), 4).unwrap();
    let names = param_names(&g);
    assert!(names.contains(&"model.layers.0.input_layernorm.bias".to_string()));
    assert!(names.contains(&"model.norm.bias".to_string()));
    assert!(names.contains(&"model.layers.0.mlp.up_proj.weight".to_string()));
    assert!(
        !names
            .iter()
            .any(|n| n.contains("gate_proj") || n == "lm_head.weight"),
        "{names:?}"
    );
    let out = run_outputs(&g, &feeds(&g, 4, 8, 32, false)).unwrap();
    let ce = scalar(&out["ce"]);
    assert!(
        (ce - 32f64.ln()).abs() < 0.05,
        "ce {ce} vs ln 32 = {}",
        32f64.ln()
    );

    m.ffn.activation = Activation::Relu;
    let g = lower(&spec(m, None), 4).unwrap();
    let out = run_outputs(&g, &feeds(&g, 4, 8, 32, false)).unwrap();
    let ce = scalar(&out["ce"]);
    assert!(
        (ce - 32f64.ln()).abs() < 0.05,
        "ce {ce} vs ln 32 = {}",
        32f64.ln()
    );
}

/// HF rotate_half RoPE on one head vector at position `pos`.
fn rope(x: &[f64], pos: usize, theta: f64) -> Vec<f64> {
    let (hd, half) = (x.len(), x.len() / 2);
    let mut out = x.to_vec();
    for i in 0..half {
        let a = pos as f64 * theta.powf(-2.0 * i as f64 / hd as f64);
        out[i] = x[i] * a.cos() - x[i + half] * a.sin();
        out[i + half] = x[i + half] * a.cos() + x[i] * a.sin();
    }
    out
}

/// `x[rows, in] · w[out, in]ᵀ`.
fn linear(x: &[f64], w: &[f64], inp: usize, out: usize) -> Vec<f64> {
    let rows = x.len() / inp;
    let mut y = vec![0.0; rows * out];
    for r in 0..rows {
        for o in 0..out {
            y[r * out + o] = (0..inp).map(|i| x[r * inp + i] * w[o * inp + i]).sum();
        }
    }
    y
}

#[test]
fn gqa_attention_matches_a_naive_per_head_loop() {
    let (b, t, d, heads, kv) = (2, 5, 16, 4, 2);
    let (hd, group) = (d / heads, heads / kv);
    let s = spec(model(16, d, 1, heads, kv, t), None);
    let g = lower(&s, b).unwrap();
    let f = feeds(&g, b, t, 16, true);
    let vals = run(&g, &f).unwrap();
    let h = vals[&node(&g, "model.layers.0.input_layernorm.scale")].to_f64();
    let got = vals[&node(&g, "model.layers.0.self_attn.o_proj")].to_f64();
    let w = |n: &str| f[&format!("model.layers.0.self_attn.{n}.weight")].to_f64();
    let (q, k, v) = (
        linear(&h, &w("q_proj"), d, heads * hd),
        linear(&h, &w("k_proj"), d, kv * hd),
        linear(&h, &w("v_proj"), d, kv * hd),
    );
    let mut ctx = vec![0.0; b * t * heads * hd];
    for bi in 0..b {
        for head in 0..heads {
            let kvh = head / group; // HF repeat_kv
            let row = |x: &[f64], nh: usize, hh: usize, pos: usize| {
                rope(&x[((bi * t + pos) * nh + hh) * hd..][..hd], pos, 10000.0)
            };
            for i in 0..t {
                let qi = row(&q, heads, head, i);
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        qi.iter()
                            .zip(row(&k, kv, kvh, j))
                            .map(|(a, b)| a * b)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                for (j, s) in scores.iter().enumerate() {
                    let p = (s - m).exp() / z;
                    for c in 0..hd {
                        ctx[(bi * t + i) * heads * hd + head * hd + c] +=
                            p * v[((bi * t + j) * kv + kvh) * hd + c];
                    }
                }
            }
        }
    }
    let want = linear(&ctx, &w("o_proj"), heads * hd, d);
    assert_eq!(got.len(), want.len());
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        assert!((a - b).abs() < 1e-12, "element {i}: {a} vs {b}");
    }
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

#[test]
fn moe_layer_and_balancing_match_naive_formulas() {
    let (b, t, d, e, k) = (2, 6, 16, 4, 2);
    let bal = vec![Balance::Aux(0.01), Balance::Z(0.001), Balance::SeqAux(0.1)];
    let s = spec(
        model(32, d, 2, 2, 1, t),
        Some(moe(vec![1], e, k, Gate::Softmax { renorm: true }, bal)),
    );
    let g = lower(&s, b).unwrap();
    assert!(g.output("aux.1").is_some() && g.output("aux.0").is_none());
    let names = param_names(&g);
    for want in ["gate.weight", "experts.w1", "experts.w2", "experts.w3"] {
        assert!(
            names.contains(&format!("model.layers.1.block_sparse_moe.{want}")),
            "missing {want}"
        );
    }
    let route = g.g.node_weights().find_map(|n| match n.op {
        Op::MoeRoute { layout } => Some(layout),
        _ => None,
    });
    assert_eq!(
        route.map(|l| (l.tokens, l.k, l.experts, l.tile)),
        Some((b * t, k, e, ROUTE_TILE))
    );

    let f = feeds(&g, b, t, 32, true);
    let vals = run(&g, &f).unwrap();
    let p = "model.layers.1.block_sparse_moe";
    let x = vals[&node(&g, "model.layers.1.post_attention_layernorm.scale")].to_f64();
    let logits = linear(&x, &f[&format!("{p}.gate.weight")].to_f64(), d, e);
    let (w1, w2, w3) = (
        f[&format!("{p}.experts.w1")].to_f64(),
        f[&format!("{p}.experts.w2")].to_f64(),
        f[&format!("{p}.experts.w3")].to_f64(),
    );
    let hid = 24;
    let n = b * t;
    let mut y = vec![0.0; n * d];
    let (mut sel, mut probs, mut lse) = (vec![0.0; n * e], vec![0.0; n * e], vec![0.0; n]);
    for tok in 0..n {
        let l = &logits[tok * e..][..e];
        let m = l.iter().cloned().fold(f64::MIN, f64::max);
        let z: f64 = l.iter().map(|v| (v - m).exp()).sum();
        lse[tok] = m + z.ln();
        let pr: Vec<f64> = l.iter().map(|v| (v - m).exp() / z).collect();
        probs[tok * e..][..e].copy_from_slice(&pr);
        let mut order: Vec<usize> = (0..e).collect();
        order.sort_by(|&a, &c| pr[c].partial_cmp(&pr[a]).unwrap());
        let top = &order[..k];
        let norm: f64 = top.iter().map(|&j| pr[j]).sum();
        for &ex in top {
            sel[tok * e + ex] = 1.0;
            let xt = &x[tok * d..][..d];
            let a = linear(xt, &w1[ex * hid * d..][..hid * d], d, hid);
            let u = linear(xt, &w3[ex * hid * d..][..hid * d], d, hid);
            let hmid: Vec<f64> = a.iter().zip(&u).map(|(a, u)| silu(*a) * u).collect();
            let out = linear(&hmid, &w2[ex * d * hid..][..d * hid], hid, d);
            for c in 0..d {
                y[tok * d + c] += pr[ex] / norm * out[c];
            }
        }
    }
    let got = vals[&node(&g, &format!("{p}.combine"))].to_f64();
    for (i, (a, w)) in got.iter().zip(&y).enumerate() {
        assert!((a - w).abs() < 1e-12, "moe output {i}: {a} vs {w}");
    }
    // docs/language.md formulas, over tokens [lo, hi).
    let aux = |c: f64, lo: usize, hi: usize| {
        let tn = (hi - lo) as f64;
        c * e as f64
            * (0..e)
                .map(|ex| {
                    let f_e = (lo..hi).map(|t| sel[t * e + ex]).sum::<f64>() / (tn * k as f64);
                    let p_e = (lo..hi).map(|t| probs[t * e + ex]).sum::<f64>() / tn;
                    f_e * p_e
                })
                .sum::<f64>()
    };
    let z = 0.001 * lse.iter().map(|l| l * l).sum::<f64>() / n as f64;
    let seq = (0..b).map(|bi| aux(0.1, bi * t, (bi + 1) * t)).sum::<f64>() / b as f64;
    let want_aux = aux(0.01, 0, n) + z + seq;
    let out = run_outputs(&g, &f).unwrap();
    let got_aux = scalar(&out["aux.1"]);
    // The coefficients are f32 attributes of Affine nodes: relative error ≤ 1e-7.
    assert!(
        (got_aux - want_aux).abs() < 1e-7 * want_aux,
        "aux.1 {got_aux} vs {want_aux}"
    );
    // Near-uniform router at init: aux ≈ c, seq_aux ≈ c, z ≈ c·(ln E)².
    assert!(
        (want_aux - (0.01 + 0.1 + 0.001 * (e as f64).ln().powi(2))).abs() < 0.01,
        "{want_aux}"
    );
    let (ce, loss) = (scalar(&out["ce"]), scalar(&out["loss"]));
    assert!((loss - (ce + got_aux)).abs() < 1e-12);
    assert!((ce - 32f64.ln()).abs() < 0.05, "ce {ce}");
}

#[test]
fn gates_and_shared_experts() {
    for gate in [Gate::Softmax { renorm: false }, Gate::Switch, Gate::Sigmoid] {
        let top_k = if gate == Gate::Switch { 1 } else { 2 };
        let mut m = moe(vec![0, 1], 4, top_k, gate, vec![Balance::Aux(0.01)]);
        m.shared_experts = 2;
        m.expert.activation = Activation::Gelu;
        let g = lower(&spec(model(32, 16, 2, 2, 2, 4), Some(m)), 2).unwrap();
        let names = param_names(&g);
        assert!(names
            .contains(&"model.layers.0.block_sparse_moe.shared_expert.up_proj.weight".to_string()));
        assert!(
            !names.iter().any(|n| n.ends_with("experts.w3")),
            "gelu experts have no w3: {names:?}"
        );
        assert_eq!(
            g.ty(node(
                &g,
                "model.layers.0.block_sparse_moe.shared_expert.up_proj"
            ))
            .shape,
            vec![8, 48]
        );
        let vals = run(&g, &feeds(&g, 2, 4, 32, false)).unwrap();
        let out = run_outputs(&g, &feeds(&g, 2, 4, 32, false)).unwrap();
        let (ce, a0, a1, loss) = (
            scalar(&out["ce"]),
            scalar(&out["aux.0"]),
            scalar(&out["aux.1"]),
            scalar(&out["loss"]),
        );
        assert!((ce - 32f64.ln()).abs() < 0.05, "{gate:?}: ce {ce}");
        assert!((loss - (ce + a0 + a1)).abs() < 1e-5, "{gate:?}");
        // aux ≈ c for a near-uniform router (tol 5%).
        assert!((a0 - 0.01).abs() < 5e-4, "{gate:?}: aux {a0}");
        if gate == Gate::Sigmoid {
            // DeepSeek-V3: the selected scores renormalised to sum 1.
            let w = vals[&node(&g, "model.layers.0.block_sparse_moe.weights")].to_f64();
            for pair in w.chunks(2) {
                assert!((pair[0] + pair[1] - 1.0).abs() < 1e-6);
            }
        }
    }
}

#[test]
fn mlp_classifier_runs() {
    let mut m = model(0, 16, 2, 1, 1, 0);
    m.family = Family::Mlp;
    m.vocab = None;
    m.context = None;
    m.inputs = Some(12);
    m.classes = Some(10);
    let g = lower(
        &spec(
            m,
            Some(moe(
                vec![1],
                4,
                2,
                Gate::Softmax { renorm: true },
                vec![Balance::Aux(0.01)],
            )),
        ),
        8,
    )
    .unwrap();
    let mut f: HashMap<String, Value> = init_params(&g, 3)
        .into_iter()
        .map(|(k, v)| (k, Value::F32(v)))
        .collect();
    f.insert(
        "features".into(),
        Value::F32(
            ids(8 * 12, 100, 5)
                .iter()
                .map(|&x| x as f32 / 50.0 - 1.0)
                .collect(),
        ),
    );
    f.insert("targets".into(), Value::U32(ids(8, 10, 6)));
    let out = run_outputs(&g, &f).unwrap();
    assert_eq!(out["logits"].len(), 80);
    assert!((scalar(&out["ce"]) - 10f64.ln()).abs() < 0.05);
    assert!(out.contains_key("aux.1"));
}

#[test]
fn unsupported_features_are_named() {
    let base = model(32, 16, 1, 2, 2, 4);
    // Every gate, hierarchy, capacity and balancing term lowers (the last to come was `bias` with
    // `two_level`), and so does every family (the last was `lstm`).
    let two_level_bias = Moe {
        groups: Some((2, 2)),
        ..moe(
            vec![0],
            4,
            2,
            Gate::Sigmoid,
            vec![Balance::Bias { rate: 0.001 }],
        )
    };
    let g = lower(&spec(base.clone(), Some(two_level_bias)), 1).expect("two_level + bias lowers");
    assert!(g.output("router_state.0.bias.next").is_some());
    let mut lstm = base.clone();
    lstm.family = Family::Lstm;
    assert!(lower(&spec(lstm, None), 1).is_ok());
    assert!(matches!(
        lower(&spec(base.clone(), None), 0),
        Err(LowerError::Invalid(_))
    ));
    let mut no_vocab = base;
    no_vocab.vocab = None;
    assert!(matches!(
        lower(&spec(no_vocab, None), 1),
        Err(LowerError::Missing { field: "vocab", .. })
    ));
}

#[test]
fn f32_and_f64_runs_agree() {
    let s = spec(
        model(32, 16, 2, 4, 2, 6),
        Some(moe(
            vec![0, 1],
            4,
            2,
            Gate::Softmax { renorm: true },
            vec![Balance::Aux(0.01), Balance::Z(0.001)],
        )),
    );
    let g = lower(&s, 2).unwrap();
    let lo = run_outputs(&g, &feeds(&g, 2, 6, 32, false)).unwrap();
    let hi = run_outputs(&g, &feeds(&g, 2, 6, 32, true)).unwrap();
    assert!(matches!(lo["loss"], Value::F32(_)) && matches!(hi["loss"], Value::F64(_)));
    for name in ["logits", "ce", "aux.0", "aux.1", "loss"] {
        let (a, b) = (lo[name].to_f64(), hi[name].to_f64());
        // f32 rounding through ~30 ops of width ≤ 32: relative 1e-5 is generous.
        for (x, y) in a.iter().zip(&b) {
            assert!(
                (x - y).abs() <= 1e-5 * y.abs().max(1.0),
                "{name}: {x} vs {y}"
            );
        }
    }
}
