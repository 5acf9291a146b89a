//! One test per mapping row (spec → flags and `TransformerConfig` fields) and per refusal.

use super::*;
use moec_compiler::check::check;
use std::path::Path;

/// A small transformer spec with `model` lines, a `moe` block and a `train` block spliced in.
fn spec(model: &str, moe: &str, train: &str) -> Spec {
    let src = format!(
        "model t {{\n vocab = 256\n dim = 64\n layers = 4\n heads = 4\n context = 32\n{model}\n moe {{\n{moe}\n }}\n}}\ntrain {{\n data = synthetic(kind = markov, seed = 1)\n batch = 8\n steps = 100\n{train}\n}}\n"
    );
    check(&src, Path::new("t.moe")).unwrap_or_else(|d| panic!("{d:?}\n{src}"))
}

fn moe_spec(moe: &str) -> Spec {
    spec("", &format!(" experts = 8\n{moe}"), "")
}

fn ok(s: &Spec) -> Export {
    export(s, Parallel::default(), false).unwrap_or_else(|e| panic!("{e}"))
}

/// The value after `name` in the launch arguments (the words of a list joined by spaces), `""`
/// for a switch, `None` when absent.
fn arg(e: &Export, name: &str) -> Option<String> {
    let args = e.args();
    let at = args.iter().position(|a| a == name)?;
    let words: Vec<&str> = args[at + 1..]
        .iter()
        .take_while(|a| !a.starts_with("--"))
        .map(String::as_str)
        .collect();
    Some(words.join(" "))
}

fn field(e: &Export, name: &str) -> Value {
    e.transformer_config()
        .get(name)
        .cloned()
        .unwrap_or(Value::Null)
}

fn fidelity(e: &Export, feature: &str) -> Fidelity {
    e.rows
        .iter()
        .find(|r| r.feature.starts_with(feature))
        .unwrap_or_else(|| panic!("no row `{feature}`"))
        .fidelity
        .clone()
}

fn is_approx(f: &Fidelity) -> bool {
    matches!(f, Fidelity::Approximate(_))
}

/// The refusal of `s`, which must name every feature in `named`.
fn refused(s: &Spec, named: &[&str]) {
    match export(s, Parallel::default(), false) {
        Err(ExportError::Inexpressible(features)) => {
            assert_eq!(features.len(), named.len(), "{features:?}");
            for (f, n) in features.iter().zip(named) {
                assert!(f.starts_with(n), "{f} should name {n}");
            }
        }
        other => panic!("expected a refusal naming {named:?}, got {other:?}"),
    }
    // --allow-approx exports the substitutes and marks them.
    let e = export(s, Parallel::default(), true).expect("allowed");
    for n in named {
        assert!(matches!(fidelity(&e, n), Fidelity::Inexpressible(_)));
    }
}

#[test]
fn model_shape_rows() {
    let e = ok(&spec(
        " kv_heads = 2\n ffn = swiglu(hidden = 96)",
        " experts = 0",
        "",
    ));
    assert_eq!(arg(&e, "--hidden-size").as_deref(), Some("64"));
    assert_eq!(field(&e, "hidden_size"), json!(64));
    assert_eq!(arg(&e, "--num-layers").as_deref(), Some("4"));
    assert_eq!(field(&e, "num_layers"), json!(4));
    assert_eq!(arg(&e, "--num-attention-heads").as_deref(), Some("4"));
    assert_eq!(arg(&e, "--kv-channels").as_deref(), Some("16"));
    assert_eq!(field(&e, "kv_channels"), json!(16));
    assert_eq!(arg(&e, "--group-query-attention").as_deref(), Some(""));
    assert_eq!(arg(&e, "--num-query-groups").as_deref(), Some("2"));
    assert_eq!(field(&e, "num_query_groups"), json!(2));
    assert_eq!(arg(&e, "--seq-length").as_deref(), Some("32"));
    assert_eq!(arg(&e, "--max-position-embeddings").as_deref(), Some("32"));
    assert_eq!(arg(&e, "--ffn-hidden-size").as_deref(), Some("96"));
    assert_eq!(field(&e, "ffn_hidden_size"), json!(96));
    assert_eq!(arg(&e, "--swiglu").as_deref(), Some(""));
    assert_eq!(field(&e, "gated_linear_unit"), json!(true));
    assert_eq!(arg(&e, "--disable-bias-linear").as_deref(), Some(""));
    assert_eq!(field(&e, "add_bias_linear"), json!(false));
    assert_eq!(arg(&e, "--num-experts"), None);
    assert!(is_approx(&fidelity(&e, "init")));
}

#[test]
fn full_attention_has_no_query_groups_flag() {
    let e = ok(&spec("", " experts = 0", ""));
    assert_eq!(arg(&e, "--group-query-attention"), None);
    assert_eq!(field(&e, "num_query_groups"), json!(4));
}

#[test]
fn vocab_row_is_exact_when_tp_divides_it() {
    let e = ok(&spec("", " experts = 0", ""));
    assert_eq!(
        arg(&e, "--tokenizer-type").as_deref(),
        Some("NullTokenizer")
    );
    assert_eq!(arg(&e, "--vocab-size").as_deref(), Some("256"));
    assert_eq!(
        arg(&e, "--make-vocab-size-divisible-by").as_deref(),
        Some("1")
    );
    assert_eq!(fidelity(&e, "model.vocab"), Fidelity::Exact);
    let mut s = spec("", " experts = 0", "");
    s.model.vocab = Some(250);
    let p = Parallel {
        tp: 4,
        gpus: 4,
        ..Parallel::default()
    };
    let e = export(&s, p, false).unwrap();
    assert!(is_approx(&fidelity(&e, "model.vocab")));
}

#[test]
fn norm_rope_and_embedding_rows() {
    let e = ok(&spec(" rope_theta = 500000", " experts = 0", ""));
    assert_eq!(arg(&e, "--normalization").as_deref(), Some("RMSNorm"));
    assert_eq!(field(&e, "normalization"), json!("RMSNorm"));
    assert_eq!(arg(&e, "--norm-epsilon").as_deref(), Some("0.00001"));
    assert_eq!(field(&e, "layernorm_epsilon"), json!(1e-5));
    assert_eq!(
        arg(&e, "--position-embedding-type").as_deref(),
        Some("rope")
    );
    assert_eq!(arg(&e, "--rotary-base").as_deref(), Some("500000"));
    assert_eq!(
        arg(&e, "--untie-embeddings-and-output-weights").as_deref(),
        Some("")
    );
    let e = ok(&spec(
        " norm = layernorm\n tie_embeddings = true\n rope_theta = 10000.5",
        " experts = 0",
        "",
    ));
    assert_eq!(field(&e, "normalization"), json!("LayerNorm"));
    assert_eq!(arg(&e, "--untie-embeddings-and-output-weights"), None);
    assert!(is_approx(&fidelity(&e, "model.rope_theta")));
}

#[test]
fn gelu_is_openai_gelu_and_relu_is_refused() {
    let e = ok(&spec(" ffn = gelu(hidden = 128)", " experts = 0", ""));
    assert_eq!(arg(&e, "--openai-gelu").as_deref(), Some(""));
    assert_eq!(field(&e, "gated_linear_unit"), json!(false));
    assert_eq!(field(&e, "activation_func"), json!("openai_gelu"));
    refused(
        &spec(" ffn = relu(hidden = 128)", " experts = 0", ""),
        &["model.ffn"],
    );
}

#[test]
fn qk_norm_row() {
    let e = ok(&spec(" qk_norm = true", " experts = 0", ""));
    assert_eq!(arg(&e, "--qk-layernorm").as_deref(), Some(""));
    assert_eq!(field(&e, "qk_layernorm"), json!(true));
    assert_eq!(fidelity(&e, "model.qk_norm"), Fidelity::Exact);
    let e = ok(&spec(
        " qk_norm = true\n norm = layernorm",
        " experts = 0",
        "",
    ));
    assert!(is_approx(&fidelity(&e, "model.qk_norm")));
}

#[test]
fn expert_rows() {
    let e = ok(&moe_spec(
        " top_k = 2\n expert = swiglu(hidden = 32)\n shared_experts = 2",
    ));
    assert_eq!(arg(&e, "--num-experts").as_deref(), Some("8"));
    assert_eq!(field(&e, "num_moe_experts"), json!(8));
    assert_eq!(arg(&e, "--moe-router-topk").as_deref(), Some("2"));
    assert_eq!(field(&e, "moe_router_topk"), json!(2));
    assert_eq!(arg(&e, "--moe-ffn-hidden-size").as_deref(), Some("32"));
    assert_eq!(field(&e, "moe_ffn_hidden_size"), json!(32));
    assert_eq!(
        arg(&e, "--moe-shared-expert-intermediate-size").as_deref(),
        Some("64")
    );
    assert_eq!(field(&e, "moe_shared_expert_intermediate_size"), json!(64));
    assert_eq!(arg(&e, "--moe-layer-freq").as_deref(), Some("1"));
    assert_eq!(field(&e, "moe_layer_freq"), json!(1));
    assert_eq!(arg(&e, "--moe-router-dtype").as_deref(), Some("fp32"));
    assert_eq!(
        arg(&e, "--moe-token-dispatcher-type").as_deref(),
        Some("alltoall")
    );
}

#[test]
fn layer_interval_and_first_dense_are_a_layer_pattern() {
    let e = ok(&moe_spec(" every = 2"));
    assert_eq!(arg(&e, "--moe-layer-freq").as_deref(), Some("[0,1,0,1]"));
    assert_eq!(field(&e, "moe_layer_freq"), json!([0, 1, 0, 1]));
    let e = ok(&moe_spec(" first_dense = 1"));
    assert_eq!(field(&e, "moe_layer_freq"), json!([0, 1, 1, 1]));
    assert!(e
        .launch_script(None)
        .contains("--moe-layer-freq '[0,1,1,1]'"));
}

#[test]
fn experts_and_dense_blocks_must_share_an_activation() {
    let s = spec(
        " ffn = gelu(hidden = 128)",
        " experts = 8\n every = 2\n expert = swiglu(hidden = 32)",
        "",
    );
    refused(&s, &["moe.expert ="]);
    // With every block MoE the dense FFN is unused and the experts' activation is the one.
    let s = spec(
        " ffn = gelu(hidden = 128)",
        " experts = 8\n expert = swiglu(hidden = 32)",
        "",
    );
    assert_eq!(arg(&ok(&s), "--swiglu").as_deref(), Some(""));
}

#[test]
fn softmax_gates() {
    let e = ok(&moe_spec(" gate = softmax(renorm = true)"));
    assert_eq!(
        arg(&e, "--moe-router-score-function").as_deref(),
        Some("softmax")
    );
    assert_eq!(arg(&e, "--moe-router-pre-softmax"), None);
    let e = ok(&moe_spec(" gate = softmax(renorm = false)"));
    assert_eq!(arg(&e, "--moe-router-pre-softmax").as_deref(), Some(""));
    assert_eq!(field(&e, "moe_router_pre_softmax"), json!(true));
    let e = ok(&moe_spec(" gate = switch"));
    assert_eq!(arg(&e, "--moe-router-pre-softmax").as_deref(), Some(""));
    assert_eq!(arg(&e, "--moe-router-topk").as_deref(), Some("1"));
}

#[test]
fn sigmoid_gate_and_its_top_1_refusal() {
    let e = ok(&moe_spec(" gate = sigmoid"));
    assert_eq!(
        arg(&e, "--moe-router-score-function").as_deref(),
        Some("sigmoid")
    );
    assert_eq!(field(&e, "moe_router_score_function"), json!("sigmoid"));
    refused(
        &moe_spec(" gate = sigmoid\n top_k = 1"),
        &["moe.gate = sigmoid"],
    );
}

#[test]
fn sinkhorn_gate_is_a_load_balancing_type() {
    let e = ok(&moe_spec(
        " gate = sinkhorn(iters = 30)\n balance = z(0.001)",
    ));
    assert_eq!(
        arg(&e, "--moe-router-load-balancing-type").as_deref(),
        Some("sinkhorn")
    );
    assert_eq!(
        field(&e, "moe_router_load_balancing_type"),
        json!("sinkhorn")
    );
    assert_eq!(field(&e, "moe_aux_loss_coeff"), json!(0.0));
    assert!(is_approx(&fidelity(&e, "moe.gate = sinkhorn")));
    refused(
        &moe_spec(" gate = sinkhorn(iters = 30)\n balance = aux(0.01)"),
        &["moe.balance aux"],
    );
    refused(
        &moe_spec(" gate = sinkhorn(iters = 30)\n capacity = factor(2.0, drop = probability)\n balance = none"),
        &["moe.capacity"],
    );
}

#[test]
fn unexpressible_gates_are_refused_by_name() {
    refused(
        &moe_spec(" gate = noisy_top_k(noise = 1.0)\n balance = cv2(importance = 0.1, load = 0.1)"),
        &["moe.gate = noisy_top_k", "moe.balance cv2"],
    );
    refused(
        &moe_spec(" gate = expert_choice(capacity = 2.0)"),
        &["moe.gate = expert_choice"],
    );
    refused(
        &moe_spec(" gate = auction(rounds = 4, epsilon = 0.01, budget = 1.0, price_rate = 0.1)"),
        &["moe.gate = auction"],
    );
    refused(
        &moe_spec(" groups = 2 x 4\n hierarchy = two_level"),
        &["moe.groups"],
    );
}

#[test]
fn group_limited_routing() {
    let e = ok(&moe_spec(" gate = sigmoid\n top_k = 4\n groups = 4 x 2\n hierarchy = group_limited\n top_groups = 2\n balance = bias(rate = 0.001)"));
    assert_eq!(arg(&e, "--moe-router-num-groups").as_deref(), Some("4"));
    assert_eq!(arg(&e, "--moe-router-group-topk").as_deref(), Some("2"));
    assert_eq!(field(&e, "moe_router_num_groups"), json!(4));
    assert_eq!(field(&e, "moe_router_group_topk"), json!(2));
    assert_eq!(fidelity(&e, "moe.groups"), Fidelity::Exact);
    // Megatron's group score is the top k/top_groups = 1 score, moec's the top 2.
    let e = ok(&moe_spec(
        " gate = sigmoid\n top_k = 2\n groups = 4 x 2\n hierarchy = group_limited\n top_groups = 2",
    ));
    assert!(is_approx(&fidelity(&e, "moe.groups")));
    // Megatron limits groups on the logits under renormalised softmax.
    let e = ok(&moe_spec(
        " top_k = 4\n groups = 4 x 2\n hierarchy = group_limited\n top_groups = 2",
    ));
    assert!(is_approx(&fidelity(&e, "moe.groups")));
}

#[test]
fn capacity_and_drop_policies() {
    let e = ok(&moe_spec(
        " gate = softmax(renorm = false)\n capacity = factor(1.25, drop = probability)",
    ));
    assert_eq!(
        arg(&e, "--moe-expert-capacity-factor").as_deref(),
        Some("1.25")
    );
    assert_eq!(arg(&e, "--moe-token-drop-policy").as_deref(), Some("probs"));
    assert_eq!(field(&e, "moe_expert_capacity_factor"), json!(1.25));
    assert_eq!(fidelity(&e, "moe.capacity"), Fidelity::Exact);
    let e = ok(&moe_spec(" capacity = factor(1.25, drop = probability)"));
    assert!(is_approx(&fidelity(&e, "moe.capacity")));
    let e = ok(&moe_spec(" capacity = factor(1.25, drop = position)"));
    assert_eq!(field(&e, "moe_token_drop_policy"), json!("position"));
    assert!(is_approx(&fidelity(&e, "moe.capacity")));
    assert_eq!(
        field(&ok(&moe_spec("")), "moe_expert_capacity_factor"),
        Value::Null
    );
}

#[test]
fn balancing_terms() {
    let e = ok(&moe_spec(" balance = aux(0.01) + z(0.001)"));
    assert_eq!(
        arg(&e, "--moe-router-load-balancing-type").as_deref(),
        Some("aux_loss")
    );
    assert_eq!(arg(&e, "--moe-aux-loss-coeff").as_deref(), Some("0.01"));
    assert_eq!(arg(&e, "--moe-z-loss-coeff").as_deref(), Some("0.001"));
    assert_eq!(field(&e, "moe_z_loss_coeff"), json!(0.001));
    let e = ok(&moe_spec(" balance = aux(0.01) + seq_aux(0.001)"));
    assert_eq!(
        arg(&e, "--moe-router-load-balancing-type").as_deref(),
        Some("aux_loss seq_aux_loss")
    );
    assert_eq!(field(&e, "moe_aux_loss_coeff"), json!([0.01, 0.001]));
    assert!(e
        .launch_script(None)
        .contains("--moe-router-load-balancing-type aux_loss seq_aux_loss \\"));
    let e = ok(&moe_spec(" balance = none"));
    assert_eq!(field(&e, "moe_router_load_balancing_type"), json!("none"));
    let e = ok(&moe_spec(
        " gate = sigmoid\n balance = bias(rate = 0.002) + seq_aux(0.001)",
    ));
    assert_eq!(
        arg(&e, "--moe-router-enable-expert-bias").as_deref(),
        Some("")
    );
    assert_eq!(
        arg(&e, "--moe-router-bias-update-rate").as_deref(),
        Some("0.002")
    );
    assert_eq!(field(&e, "moe_router_enable_expert_bias"), json!(true));
    // Megatron's seq-aux counts an unbiased top-k.
    assert!(is_approx(&fidelity(&e, "moe.balance seq_aux")));
    refused(
        &moe_spec(" balance = bias(rate = 0.002)"),
        &["moe.balance bias"],
    );
}

#[test]
fn jitter_and_router_precision() {
    let e = ok(&moe_spec(" jitter = 0.01"));
    assert_eq!(arg(&e, "--moe-input-jitter-eps").as_deref(), Some("0.01"));
    assert_eq!(field(&e, "moe_input_jitter_eps"), json!(0.01));
}

#[test]
fn training_rows() {
    let s = spec(
        "",
        " experts = 0",
        " accumulate = 2\n optimizer = adamw(lr = 3e-4, betas = (0.9, 0.95), eps = 1e-8, weight_decay = 0.1)\n schedule = cosine(warmup = 10, min_lr = 3e-5)\n clip = 1.0\n seed = 7\n eval = every(50, batches = 2)\n checkpoint = every(25)\n log = every(5)",
    );
    let e = ok(&s);
    let want = [
        ("--micro-batch-size", "8"),
        ("--global-batch-size", "16"),
        ("--train-iters", "100"),
        ("--seed", "7"),
        ("--clip-grad", "1"),
        ("--optimizer", "adam"),
        ("--lr", "0.0003"),
        ("--adam-beta1", "0.9"),
        ("--adam-beta2", "0.95"),
        ("--adam-eps", "0.00000001"),
        ("--weight-decay", "0.1"),
        ("--lr-decay-style", "cosine"),
        ("--lr-warmup-iters", "10"),
        ("--lr-decay-iters", "99"),
        ("--min-lr", "0.00003"),
        ("--eval-interval", "50"),
        ("--eval-iters", "2"),
        ("--save-interval", "25"),
        ("--log-interval", "5"),
        ("--split", "900,100,0"),
        ("--mock-data", ""),
    ];
    for (flag, value) in want {
        assert_eq!(arg(&e, flag).as_deref(), Some(value), "{flag}");
    }
    assert!(is_approx(&fidelity(&e, "train.schedule")));
    let e = ok(&spec(
        "",
        " experts = 0",
        " optimizer = sgd(lr = 0.1, momentum = 0.9)\n schedule = linear(warmup = 0)",
    ));
    assert_eq!(arg(&e, "--optimizer").as_deref(), Some("sgd"));
    assert_eq!(arg(&e, "--sgd-momentum").as_deref(), Some("0.9"));
    assert_eq!(arg(&e, "--lr-decay-style").as_deref(), Some("linear"));
    assert_eq!(arg(&e, "--lr-decay-iters").as_deref(), Some("100"));
    assert_eq!(fidelity(&e, "train.schedule"), Fidelity::Exact);
    let e = ok(&spec("", " experts = 0", " precision = f16"));
    assert_eq!(arg(&e, "--fp16").as_deref(), Some(""));
    assert_eq!(arg(&e, "--initial-loss-scale").as_deref(), Some("65536"));
}

#[test]
fn unexpressible_training_features_are_refused_by_name() {
    refused(
        &spec("", " experts = 8", " expert_lr = adaptive(base = 1e-3)"),
        &["train.expert_lr"],
    );
    refused(
        &spec("", " experts = 8", " expert_lr = 1e-3"),
        &["train.expert_lr"],
    );
    refused(
        &spec("", " experts = 0", " optimizer = adafactor(lr = 1e-3)"),
        &["train.optimizer"],
    );
    refused(
        &spec(
            "",
            " experts = 0",
            " optimizer = schedule_free_adamw(lr = 1e-3)",
        ),
        &["train.optimizer"],
    );
}

#[test]
fn parallel_layout_rows_and_checks() {
    let s = spec(" kv_heads = 2", " experts = 8", "");
    let p = Parallel {
        tp: 2,
        pp: 2,
        ep: 2,
        gpus: 8,
    };
    let e = export(&s, p, false).unwrap();
    assert_eq!(e.data_parallel, 2);
    assert_eq!(
        arg(&e, "--tensor-model-parallel-size").as_deref(),
        Some("2")
    );
    assert_eq!(
        arg(&e, "--pipeline-model-parallel-size").as_deref(),
        Some("2")
    );
    assert_eq!(
        arg(&e, "--expert-model-parallel-size").as_deref(),
        Some("2")
    );
    assert_eq!(arg(&e, "--sequence-parallel").as_deref(), Some(""));
    assert_eq!(field(&e, "expert_model_parallel_size"), json!(2));
    assert!(e.launch_script(None).contains("GPUS=8"));
    let bad = |p: Parallel| matches!(export(&s, p, true), Err(ExportError::Layout(_)));
    assert!(bad(Parallel {
        tp: 2,
        gpus: 3,
        ..Parallel::default()
    }));
    assert!(bad(Parallel {
        ep: 3,
        gpus: 3,
        ..Parallel::default()
    }));
    assert!(bad(Parallel {
        tp: 4,
        gpus: 4,
        ..Parallel::default()
    })); // 2 kv heads
    assert!(bad(Parallel {
        pp: 3,
        gpus: 3,
        ..Parallel::default()
    })); // 4 layers
    assert!(bad(Parallel {
        ep: 4,
        gpus: 2,
        ..Parallel::default()
    }));
    assert!(bad(Parallel {
        tp: 0,
        ..Parallel::default()
    }));
}

#[test]
fn non_transformers_are_refused() {
    let src = "model c {\n family = mlp\n inputs = 4\n classes = 2\n dim = 8\n layers = 1\n}\n";
    let s = check(src, Path::new("c.moe")).unwrap();
    assert_eq!(
        export(&s, Parallel::default(), true).unwrap_err(),
        ExportError::Family("mlp")
    );
}

#[test]
fn markdown_lists_every_row_and_the_conversions() {
    let s = moe_spec(" gate = softmax(renorm = true)\n balance = aux(0.01) + z(0.001)");
    let e = ok(&s);
    let md = e.markdown(&s, Some("runs/t"));
    for r in &e.rows {
        assert!(md.contains(&r.feature), "{}", r.feature);
    }
    assert!(
        md.contains("AutoBridge.import_ckpt('runs/t', 'megatron_ckpt')"),
        "{md}"
    );
    assert!(md.contains("MixtralForCausalLM"));
    let json = e.json();
    assert_eq!(json["transformer_config"]["num_moe_experts"], json!(8));
    assert_eq!(json["features"].as_array().unwrap().len(), e.rows.len());
}

/// A spec file of the repository, relative to its root.
fn repo_spec(path: &str) -> Spec {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    let source = std::fs::read_to_string(&path).unwrap();
    check(&source, &path).unwrap_or_else(|d| panic!("{d:?}"))
}

#[test]
fn parity_specs_export_and_router_specs_megatron_lacks_are_refused() {
    for path in [
        "specs/mixtral.moe",
        "specs/export/glm4-moe.moe",
        "specs/export/qwen3-moe.moe",
        "specs/export/sinkhorn.moe",
        "specs/export/capacity-probs.moe",
        "specs/export/capacity-position.moe",
        "specs/export/seq-aux.moe",
    ] {
        assert!(
            export(&repo_spec(path), Parallel::default(), false).is_ok(),
            "{path}"
        );
    }
    let e = ok(&repo_spec("specs/mixtral.moe"));
    assert!(e
        .rows
        .iter()
        .filter(|r| r.feature.starts_with("moe"))
        .all(|r| r.fidelity == Fidelity::Exact));
    let e = ok(&repo_spec("specs/export/glm4-moe.moe"));
    assert!(e
        .rows
        .iter()
        .filter(|r| r.feature.starts_with("moe"))
        .all(|r| r.fidelity == Fidelity::Exact));
    match export(&repo_spec("specs/auction.moe"), Parallel::default(), false) {
        Err(ExportError::Inexpressible(f)) => assert!(
            f.iter().any(|f| f.starts_with("moe.gate = auction")),
            "{f:?}"
        ),
        other => panic!("{other:?}"),
    }
    match export(
        &repo_spec("specs/expert-choice.moe"),
        Parallel::default(),
        false,
    ) {
        Err(ExportError::Inexpressible(f)) => assert!(
            f.iter().any(|f| f.starts_with("moe.gate = expert_choice")),
            "{f:?}"
        ),
        other => panic!("{other:?}"),
    }
}
