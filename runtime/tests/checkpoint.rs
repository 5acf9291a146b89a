//! Checkpoints: safetensors round trip, HF split/stack of expert params, atomic writes, spec diffs.

use moec_runtime::checkpoint::{
    diff_specs, from_hf, hf_config, to_hf, Checkpoint, CheckpointError, HF_CONFIG_FILE,
    HF_INDEX_FILE, HF_WEIGHTS_FILE,
};
use moec_runtime::data::BatcherState;
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;

fn ramp(n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|i| i as f32 * scale - 1.5).collect()
}

fn sample() -> Checkpoint {
    let mut ck = Checkpoint {
        step: 1234,
        spec_text: "model m {\n  dim = 8\n}\n".into(),
        ..Default::default()
    };
    ck.insert_ir("model.embed_tokens.weight", &[5, 4], &ramp(20, 0.25));
    // Stacked experts: E = 3, hidden = 2, dim = 4.
    ck.insert_ir(
        "model.layers.0.block_sparse_moe.experts.w1",
        &[3, 2, 4],
        &ramp(24, 0.5),
    );
    ck.insert_ir(
        "model.layers.0.block_sparse_moe.experts.w2",
        &[3, 4, 2],
        &ramp(24, -0.5),
    );
    ck.insert_ir(
        "model.layers.0.block_sparse_moe.gate.weight",
        &[3, 4],
        &ramp(12, 1.0),
    );
    // Optimizer state of a stacked param keeps its IR name and shape.
    ck.insert_ir(
        "optim.exp_avg.model.layers.0.block_sparse_moe.experts.w1",
        &[3, 2, 4],
        &ramp(24, 0.125),
    );
    ck.insert_ir(
        "router_state.model.layers.0.bias",
        &[3],
        &[0.1, -0.2, f32::MIN_POSITIVE],
    );
    let state = BatcherState {
        seed: 1,
        word_pos: (1u128 << 70) + 3,
        train_tokens: 10,
    };
    ck.put_json("batcher", &state).unwrap();
    ck
}

#[test]
fn json_metadata_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ck.safetensors");
    sample().save(&path).unwrap();
    let back = Checkpoint::load(&path).unwrap();
    let state: BatcherState = back.get_json("batcher").unwrap().unwrap();
    assert_eq!(
        state,
        BatcherState {
            seed: 1,
            word_pos: (1u128 << 70) + 3,
            train_tokens: 10
        }
    );
    assert_eq!(back.get_json::<BatcherState>("absent").unwrap(), None);
    let err = back.get_json::<u32>("batcher").unwrap_err();
    assert!(matches!(err, CheckpointError::Meta { .. }), "{err}");
}

#[test]
fn round_trip_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ck.safetensors");
    let ck = sample();
    ck.save(&path).unwrap();
    let back = Checkpoint::load(&path).unwrap();
    assert_eq!(back, ck); // bit-exact f32, shapes, step, spec text, meta
                          // No temporary file is left next to the checkpoint.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["ck.safetensors".to_string()]);
}

#[test]
fn file_is_hf_shaped_f32_with_pt_format() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ck.safetensors");
    sample().save(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone().unwrap();
    assert_eq!(meta["format"], "pt");
    assert_eq!(meta["moec.step"], "1234");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let w1_2 = st
        .tensor("model.layers.0.block_sparse_moe.experts.2.w1.weight")
        .unwrap();
    assert_eq!(w1_2.dtype(), Dtype::F32);
    assert_eq!(w1_2.shape(), &[2, 4]);
    // Expert 2's slice of the stack: elements 16..24 of the ramp.
    let first = f32::from_le_bytes(w1_2.data()[..4].try_into().unwrap());
    assert_eq!(first, 16.0 * 0.5 - 1.5);
    assert_eq!(
        st.tensor("model.layers.0.block_sparse_moe.experts.1.w2.weight")
            .unwrap()
            .shape(),
        &[4, 2]
    );
    assert!(st
        .tensor("model.layers.0.block_sparse_moe.experts.w1")
        .is_err());
    assert_eq!(
        st.tensor("optim.exp_avg.model.layers.0.block_sparse_moe.experts.w1")
            .unwrap()
            .shape(),
        &[3, 2, 4]
    );
}

#[test]
fn hf_split_and_stack_are_inverse() {
    let data = ramp(24, 1.0);
    let split = to_hf(
        "model.layers.3.block_sparse_moe.experts.w3",
        &[2, 3, 4],
        &data,
    );
    assert_eq!(split.len(), 2);
    assert_eq!(
        split[1].0,
        "model.layers.3.block_sparse_moe.experts.1.w3.weight"
    );
    assert_eq!(split[1].1, vec![3, 4]);
    assert_eq!(split[1].2, data[12..]);
    // Non-stacked names pass through.
    let same = to_hf("model.norm.weight", &[4], &[1.0; 4]);
    assert_eq!(
        same,
        vec![("model.norm.weight".to_string(), vec![4], vec![1.0; 4])]
    );

    let map: BTreeMap<String, (Vec<usize>, Vec<f32>)> = split
        .into_iter()
        .map(|(n, s, d)| (n, (s, d)))
        .chain([("lm_head.weight".to_string(), (vec![1], vec![2.0]))])
        .collect();
    let stacked = from_hf(map).unwrap();
    assert_eq!(
        stacked["model.layers.3.block_sparse_moe.experts.w3"],
        (vec![2, 3, 4], data)
    );
    assert_eq!(stacked["lm_head.weight"], (vec![1], vec![2.0]));
    assert_eq!(stacked.len(), 2);

    // More than 10 experts: numeric, not lexicographic, order.
    let data = ramp(12 * 2, 1.0);
    let map: BTreeMap<_, _> = to_hf(
        "model.layers.0.block_sparse_moe.experts.w1",
        &[12, 1, 2],
        &data,
    )
    .into_iter()
    .map(|(n, s, d)| (n, (s, d)))
    .collect();
    assert_eq!(
        from_hf(map).unwrap()["model.layers.0.block_sparse_moe.experts.w1"].1,
        data
    );

    let ck = sample();
    let ir = ck.ir_tensors().unwrap();
    assert_eq!(
        ir["model.layers.0.block_sparse_moe.experts.w2"],
        (vec![3, 4, 2], ramp(24, -0.5))
    );
}

#[test]
fn stacking_reports_gaps_and_shape_mismatches() {
    let mut map = BTreeMap::new();
    map.insert(
        "model.layers.0.block_sparse_moe.experts.0.w1.weight".to_string(),
        (vec![1, 2], vec![0.0; 2]),
    );
    map.insert(
        "model.layers.0.block_sparse_moe.experts.2.w1.weight".to_string(),
        (vec![1, 2], vec![0.0; 2]),
    );
    let err = from_hf(map.clone()).unwrap_err();
    assert!(err.to_string().contains("expert 1 is missing"), "{err}");
    map.insert(
        "model.layers.0.block_sparse_moe.experts.1.w1.weight".to_string(),
        (vec![2, 1], vec![0.0; 2]),
    );
    let err = from_hf(map).unwrap_err();
    assert!(
        err.to_string().contains("expert 1 has shape [2, 1]"),
        "{err}"
    );
}

#[test]
fn save_refuses_bad_input_and_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.safetensors");
    let mut ck = Checkpoint::default();
    ck.tensors.insert("x".into(), (vec![2, 2], vec![1.0; 3]));
    assert!(matches!(
        ck.save(&path).unwrap_err(),
        CheckpointError::ShapeData {
            expected: 4,
            actual: 3,
            ..
        }
    ));
    let mut ck = Checkpoint::default();
    ck.meta.insert("moec.step".into(), "7".into());
    assert!(matches!(
        ck.save(&path).unwrap_err(),
        CheckpointError::ReservedKey(_)
    ));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn overwrite_replaces_whole_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/ck.safetensors");
    let mut ck = sample();
    ck.save(&path).unwrap();
    ck.step = 2000;
    ck.tensors.retain(|n, _| n.starts_with("model.embed"));
    ck.save(&path).unwrap();
    assert_eq!(Checkpoint::load(&path).unwrap(), ck);
    assert_eq!(
        std::fs::read_dir(dir.path().join("sub")).unwrap().count(),
        1
    );
}

#[test]
fn load_errors_are_values() {
    let dir = tempfile::tempdir().unwrap();
    let err = Checkpoint::load(&dir.path().join("missing.safetensors")).unwrap_err();
    assert!(
        matches!(err, CheckpointError::Io { .. })
            && err.to_string().contains("missing.safetensors"),
        "{err}"
    );
    std::fs::write(dir.path().join("junk"), b"not a safetensors file at all").unwrap();
    assert!(matches!(
        Checkpoint::load(&dir.path().join("junk")).unwrap_err(),
        CheckpointError::Format { .. }
    ));
}

#[test]
fn loads_hf_half_precision_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hf.safetensors");
    let bf: Vec<u8> = [1.5f32, -2.0]
        .iter()
        .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
        .collect();
    let f16: Vec<u8> = [0.25f32]
        .iter()
        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
        .collect();
    let views = vec![
        (
            "a",
            safetensors::tensor::TensorView::new(Dtype::BF16, vec![2], &bf).unwrap(),
        ),
        (
            "b",
            safetensors::tensor::TensorView::new(Dtype::F16, vec![1], &f16).unwrap(),
        ),
    ];
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
    let ck = Checkpoint::load(&path).unwrap();
    assert_eq!(ck.tensors["a"], (vec![2], vec![1.5, -2.0]));
    assert_eq!(ck.tensors["b"], (vec![1], vec![0.25]));
    assert_eq!((ck.step, ck.spec_text.as_str()), (0, ""));
}

#[test]
fn spec_diff_names_lines() {
    let a = "model m {\n  dim = 64\n  layers = 2\n  moe {\n    experts = 8\n  }\n}\n";
    assert_eq!(diff_specs(a, a), None);
    // Trailing whitespace and trailing blank lines do not count.
    assert_eq!(
        diff_specs(
            a,
            &a.replace("= 64\n", "= 64   \n")
                .replace("}\n}\n", "}\n}\n\n\n")
        ),
        None
    );
    let b = a.replace("experts = 8", "experts = 16");
    let d = diff_specs(a, &b).unwrap();
    assert!(d.contains("-   5 |     experts = 8"), "{d}");
    assert!(d.contains("+   5 |     experts = 16"), "{d}");
    assert_eq!(d.lines().count(), 3, "{d}");

    // An inserted line shifts numbering on the + side only.
    let c = a.replace("  layers = 2\n", "  layers = 2\n  heads = 4\n");
    let d = diff_specs(a, &c).unwrap();
    assert!(d.contains("+   4 |   heads = 4"), "{d}");
    assert_eq!(d.lines().count(), 2, "{d}");

    // Long diffs are cut after 12 lines.
    let many_a: String = (0..40).map(|i| format!("a{i}\n")).collect();
    let many_b: String = (0..40).map(|i| format!("b{i}\n")).collect();
    let d = diff_specs(&many_a, &many_b).unwrap();
    assert!(d.ends_with("... and 68 more differing lines"), "{d}");
}

/// `specs/mixtral.moe` with `edit` applied to its text (synthetic data, so checking reads no file).
fn mixtral_with(edit: (&str, &str)) -> moec_compiler::spec::Spec {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs/mixtral.moe");
    let source = std::fs::read_to_string(&path).unwrap();
    assert!(source.contains(edit.0), "mixtral.moe has no `{}`", edit.0);
    moec_compiler::check::check(&source.replace(edit.0, edit.1), &path).unwrap()
}

#[test]
fn hf_config_of_mixtral_spec_is_a_mixtral_config() {
    let config = hf_config(&mixtral_with(("", ""))).unwrap();
    let expected = serde_json::json!({
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "vocab_size": 256, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "hidden_act": "silu",
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": false, "num_local_experts": 8, "num_experts_per_tok": 2,
        "router_jitter_noise": 0.0, "router_aux_loss_coef": 0.005, "output_router_logits": false,
        "sliding_window": null, "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": true,
        "bos_token_id": null, "eos_token_id": null, "pad_token_id": null, "torch_dtype": "float32",
    });
    assert_eq!(config, expected);

    let dense = hf_config(&mixtral_with(("experts = 8", "experts = 0"))).unwrap();
    assert_eq!(dense["architectures"][0], "LlamaForCausalLM");
    // The default dense FFN: swiglu with 8·128/3 rounded up to a multiple of 64.
    assert_eq!(dense["intermediate_size"], 384);
    assert_eq!(dense["num_key_value_heads"], 2);
    assert!(dense.get("num_local_experts").is_none());
}

#[test]
fn hf_config_refuses_what_mixtral_does_not_compute() {
    for (edit, what) in [
        (("norm = rmsnorm", "norm = layernorm"), "norm = layernorm"),
        (
            (
                "gate = softmax(renorm = true)",
                "gate = softmax(renorm = false)",
            ),
            "gate = Softmax { renorm: false }",
        ),
        (
            ("gate = softmax(renorm = true)", "gate = sigmoid"),
            "gate = Sigmoid",
        ),
        (
            (
                "expert = swiglu(hidden = 256)",
                "expert = gelu(hidden = 256)",
            ),
            "expert = Gelu",
        ),
        (
            (
                "capacity = dropless",
                "capacity = factor(1.25, drop = position)",
            ),
            "capacity factor",
        ),
        (
            (
                "balance = aux(0.01)",
                "balance = bias(rate = 0.001) + aux(0.01)",
            ),
            "bias balancing",
        ),
        (
            ("experts = 8", "experts = 8\n    every = 2"),
            "MoE on 1 of 2 blocks",
        ),
    ] {
        let err = hf_config(&mixtral_with(edit)).unwrap_err();
        assert!(matches!(err, CheckpointError::NotHf(_)), "{edit:?}: {err}");
        assert!(err.to_string().contains(what), "{edit:?}: {err}");
    }
}

#[test]
fn hf_files_point_every_weight_at_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("checkpoint.safetensors");
    let ck = sample();
    ck.save(&path).unwrap();
    let config = serde_json::json!({ "model_type": "mixtral" });
    ck.save_hf_files(&path, &config).unwrap();
    let read = |name: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(name)).unwrap()).unwrap()
    };
    assert_eq!(read(HF_CONFIG_FILE), config);
    let index = read(HF_INDEX_FILE);
    let map = index["weight_map"].as_object().unwrap();
    // The model weights, split per expert as in the file; no optimizer or router state.
    let expected: Vec<&str> = ck
        .tensors
        .keys()
        .map(String::as_str)
        .filter(|n| n.starts_with("model."))
        .collect();
    assert_eq!(map.keys().map(String::as_str).collect::<Vec<_>>(), expected);
    assert!(map.values().all(|v| v == "checkpoint.safetensors"));
    // 20 + 3·(8 + 8) + 12 f32 values.
    assert_eq!(index["metadata"]["total_size"], (20 + 48 + 12) * 4);
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 3, "no temporary files left: {names:?}");
}

#[test]
fn renamed_architectures_get_a_renamed_copy_of_the_weights() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("checkpoint.safetensors");
    let mut ck = sample();
    ck.insert_ir("router_state.0.bias", &[3], &[0.5, -0.5, 0.25]);
    ck.save(&path).unwrap();
    let config = serde_json::json!({ "model_type": "glm4_moe" });
    ck.save_hf_files(&path, &config).unwrap();
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(HF_INDEX_FILE)).unwrap())
            .unwrap();
    let map = index["weight_map"].as_object().unwrap();
    assert!(map.values().all(|v| v == HF_WEIGHTS_FILE));
    let copy = Checkpoint::load(&dir.path().join(HF_WEIGHTS_FILE)).unwrap();
    assert_eq!(
        copy.tensors.keys().collect::<Vec<_>>(),
        map.keys().collect::<Vec<_>>()
    );
    assert_eq!(
        copy.tensors["model.layers.0.mlp.experts.2.gate_proj.weight"],
        ck.tensors["model.layers.0.block_sparse_moe.experts.2.w1.weight"]
    );
    assert_eq!(
        copy.tensors["model.layers.0.mlp.gate.e_score_correction_bias"].1,
        vec![0.5, -0.5, 0.25]
    );
    assert!(copy.tensors.keys().all(|n| n.starts_with("model.")));
}

/// `specs/export/NAME.moe`.
fn export_spec(name: &str) -> moec_compiler::spec::Spec {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("../specs/export/{name}.moe"));
    let source = std::fs::read_to_string(&path).unwrap();
    moec_compiler::check::check(&source, &path).unwrap()
}

#[test]
fn hf_config_of_a_qwen3_moe_shaped_spec() {
    let config = hf_config(&export_spec("qwen3-moe")).unwrap();
    assert_eq!(config["architectures"][0], "Qwen3MoeForCausalLM");
    assert_eq!(config["decoder_sparse_step"], 2);
    assert_eq!(config["mlp_only_layers"], serde_json::json!([]));
    assert_eq!(config["norm_topk_prob"], true);
    assert_eq!(config["num_experts"], 8);
    assert_eq!(config["moe_intermediate_size"], 64);
    assert_eq!(config["intermediate_size"], 128);
    assert_eq!(config["num_key_value_heads"], 2);
    // renorm = false, and a first dense block under `every = 1`.
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs/export/qwen3-moe.moe");
    let source = std::fs::read_to_string(&path)
        .unwrap()
        .replace("renorm = true", "renorm = false")
        .replace("every = 2", "first_dense = 1");
    let spec = moec_compiler::check::check(&source, &path).unwrap();
    let config = hf_config(&spec).unwrap();
    assert_eq!(config["norm_topk_prob"], false);
    assert_eq!(config["decoder_sparse_step"], 1);
    assert_eq!(config["mlp_only_layers"], serde_json::json!([0]));
}

#[test]
fn hf_config_of_a_glm4_moe_shaped_spec() {
    let config = hf_config(&export_spec("glm4-moe")).unwrap();
    assert_eq!(config["architectures"][0], "Glm4MoeForCausalLM");
    assert_eq!(config["first_k_dense_replace"], 1);
    assert_eq!(config["n_group"], 4);
    assert_eq!(config["topk_group"], 2);
    assert_eq!(config["n_shared_experts"], 1);
    assert_eq!(config["n_routed_experts"], 8);
    assert_eq!(config["num_experts_per_tok"], 4);
    assert_eq!(config["norm_topk_prob"], true);
    assert_eq!(config["use_qk_norm"], false);
    assert_eq!(config["partial_rotary_factor"], 1.0);
}

#[test]
fn qk_norm_dense_spec_is_qwen3_and_qk_norm_is_not_mixtral() {
    let qk = hf_config(&mixtral_with((
        "context = 64",
        "context = 64\n  qk_norm = true",
    )));
    assert_eq!(qk.unwrap()["model_type"], "qwen3_moe");
    let dense = mixtral_with(("experts = 8", "experts = 0"));
    let mut qk_dense = dense.clone();
    qk_dense.model.qk_norm = true;
    assert_eq!(hf_config(&dense).unwrap()["model_type"], "llama");
    assert_eq!(hf_config(&qk_dense).unwrap()["model_type"], "qwen3");
}

#[test]
fn hf_config_refuses_what_qwen3_and_glm_do_not_compute() {
    let qwen = |edit: (&str, &str)| {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs/export/qwen3-moe.moe");
        let source = std::fs::read_to_string(&path)
            .unwrap()
            .replace(edit.0, edit.1);
        hf_config(&moec_compiler::check::check(&source, &path).unwrap())
    };
    let glm = |edit: (&str, &str)| {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs/export/glm4-moe.moe");
        let source = std::fs::read_to_string(&path)
            .unwrap()
            .replace(edit.0, edit.1);
        hf_config(&moec_compiler::check::check(&source, &path).unwrap())
    };
    for (result, what) in [
        (
            qwen(("    balance = aux(0.01)", "    shared_experts = 1")),
            "Qwen3-MoE has one flat set",
        ),
        (
            qwen(("qk_norm = true", "qk_norm = false")),
            "MoE on 2 of 4 blocks",
        ),
        (
            glm(("shared_experts = 1", "shared_experts = 0")),
            "always has them",
        ),
        (glm(("first_dense = 1", "every = 2")), "MoE blocks [1]"),
        (
            glm((
                "groups = 4 x 2\n    hierarchy = group_limited\n    top_groups = 2",
                "groups = 8 x 1\n    hierarchy = group_limited\n    top_groups = 4",
            )),
            "top 2 experts",
        ),
        (
            glm((
                "top_k = 4\n    groups = 4 x 2\n    hierarchy = group_limited",
                "top_k = 2\n    groups = 4 x 2\n    hierarchy = two_level",
            )),
            "two-level",
        ),
    ] {
        let err = result.unwrap_err();
        assert!(err.to_string().contains(what), "{err}");
    }
}
