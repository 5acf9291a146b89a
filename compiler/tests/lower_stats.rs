//! `stats`: parameter counts against a hand count and against the lowered graph, FLOPs, memory, and
//! the printed summary.

use moec_compiler::lower::lower;
use moec_compiler::spec::*;
use moec_compiler::stats::{human_bytes, human_count, stats, thousands};

fn small(moe: Option<Moe>) -> Spec {
    Spec {
        name: "small".into(),
        model: Model {
            family: Family::Transformer,
            vocab: Some(10),
            inputs: None,
            classes: None,
            dim: 4,
            layers: 2,
            heads: 2,
            kv_heads: 1,
            context: Some(8),
            norm: Norm::RmsNorm,
            rope_theta: 10000.0,
            ffn: Ffn {
                activation: Activation::SwiGlu,
                hidden: 8,
            },
            bidirectional: false,
            tie_embeddings: false,
            qk_norm: false,
        },
        moe,
        train: None,
    }
}

fn moe(blocks: Vec<usize>) -> Moe {
    Moe {
        blocks,
        experts: 4,
        top_k: 2,
        expert: Ffn {
            activation: Activation::SwiGlu,
            hidden: 6,
        },
        shared_experts: 1,
        gate: Gate::Softmax { renorm: true },
        groups: None,
        hierarchy: Hierarchy::TwoLevel,
        top_groups: 1,
        capacity: Capacity::Dropless,
        balance: vec![Balance::Aux(0.01)],
        jitter: 0.0,
        router_precision: Precision::F32,
    }
}

#[test]
fn hand_count_of_a_small_moe_transformer() {
    let st = stats(&small(Some(moe(vec![1]))));
    // embed 10·4 = 40; per block: norms 2·4, q 4·4, k 2·4, v 2·4, o 4·4 → 56;
    // block 0 dense SwiGLU 3·8·4 = 96; block 1: gate 4·4 + experts 4·(3·6·4) + shared 3·6·4 = 376;
    // final norm 4; lm_head 40.
    assert_eq!(st.total_params, 40 + 2 * 56 + 96 + 376 + 4 + 40);
    assert_eq!(st.total_params, 668);
    // Two of the four experts (72 params each) are idle per token.
    assert_eq!(st.active_params, 668 - 2 * 72);
    assert_eq!(st.embedding_params, 40);
    assert_eq!(st.moe_blocks.len(), 1);
    let b = &st.moe_blocks[0];
    assert_eq!(
        (b.block, b.experts, b.top_k, b.shared_experts),
        (1, 4, 2, 1)
    );
    assert_eq!(
        (b.params_per_expert, b.params, b.active_params),
        (72, 376, 232)
    );
    // matmul params active: 524 - 40 (embedding) - 20 (norms) = 464; attention 4·T·dim·layers = 256.
    assert_eq!(st.flops_forward_per_token, 2 * 464 + 4 * 8 * 4 * 2);
    assert_eq!(st.flops_train_per_token, 3 * st.flops_forward_per_token);
    // Memory with no train block: batch 1, AdamW.
    let m = &st.memory;
    assert_eq!((m.batch, m.tokens), (1, 8));
    assert_eq!(
        (m.weights, m.grads, m.optimizer_state),
        (4 * 668, 4 * 668, 8 * 668)
    );
    let acts = *m.activations.as_ref().unwrap();
    assert!(acts > 0 && m.total() == 16 * 668 + acts);
}

#[test]
fn counts_agree_with_the_lowered_graph() {
    let mut specs = vec![small(None), small(Some(moe(vec![0, 1])))];
    let mut s = small(Some(moe(vec![1])));
    s.model.tie_embeddings = true;
    s.model.norm = Norm::LayerNorm;
    s.model.ffn.activation = Activation::Gelu;
    s.moe.as_mut().unwrap().expert.activation = Activation::Relu;
    s.moe.as_mut().unwrap().shared_experts = 0;
    specs.push(s);
    let mut mlp = small(Some(moe(vec![0])));
    mlp.model.family = Family::Mlp;
    mlp.model.inputs = Some(7);
    mlp.model.classes = Some(3);
    specs.push(mlp);
    for spec in specs {
        let g = lower(&spec, 2).unwrap();
        let lowered: usize = g.params().iter().map(|(_, _, t)| t.numel()).sum();
        assert_eq!(
            stats(&spec).total_params,
            lowered as u64,
            "{:?}",
            spec.model
        );
    }
}

#[test]
fn optimizer_state_and_unlowered_families() {
    let mut s = small(None);
    s.train = Some(Train {
        data: Data::Synthetic {
            kind: SyntheticKind::Copy,
            seed: 0,
        },
        split: 0.9,
        batch: 3,
        accumulate: 1,
        steps: 1,
        optimizer: Optimizer::Sgd {
            lr: 0.1,
            momentum: 0.9,
        },
        expert_lr: None,
        schedule: Schedule::Constant,
        clip: None,
        precision: Precision::F32,
        seed: 0,
        eval: Every {
            every: 100,
            batches: 4,
        },
        checkpoint: Every {
            every: 500,
            batches: 0,
        },
        log: Every {
            every: 10,
            batches: 0,
        },
    });
    let st = stats(&s);
    assert_eq!(st.memory.optimizer_state, st.memory.weights);
    assert_eq!(st.memory.tokens, 24);
    // The largest tensor of this model is the attention score matrix or the logits [24, 10].
    assert!(
        st.memory.largest_tensor.1 >= 24 * 10 * 4,
        "{:?}",
        st.memory.largest_tensor
    );

    s.train.as_mut().unwrap().optimizer = Optimizer::Adafactor {
        lr: 0.01,
        decay: 0.8,
        eps: 1e-30,
    };
    let st = stats(&s);
    assert!(st.memory.optimizer_state < st.memory.weights);

    // PyTorch LSTM layers: W_ih, W_hh and two biases per layer; activations from the lowered graph.
    let mut lstm = small(None);
    lstm.model.family = Family::Lstm;
    let st = stats(&lstm);
    // embed 40 + 2 layers · (4·4·4 + 4·4·4 + 2·4·4) + head 40
    assert_eq!(st.total_params, 40 + 2 * 160 + 40);
    assert!(st.memory.activations.is_ok());
}

#[test]
fn summary_is_readable() {
    let text = stats(&small(Some(moe(vec![1])))).to_string();
    println!("{text}");
    for want in [
        "model small (transformer)",
        "668",
        "524",
        "MoE blocks",
        "FLOPs/token, training",
        "KiB",
        "largest tensor",
    ] {
        assert!(text.contains(want), "summary lacks {want}:\n{text}");
    }
    assert_eq!(thousands(0), "0");
    assert_eq!(thousands(999), "999");
    assert_eq!(thousands(1_234_567), "1,234,567");
    assert_eq!(human_count(999), "999");
    assert_eq!(human_count(1_234_567), "1.23M");
    assert_eq!(human_count(45_600), "45.6K");
    assert_eq!(human_bytes(512), "512 B");
    assert_eq!(human_bytes(47_815_065), "45.6 MiB");
    assert_eq!(human_bytes(3 << 30), "3.00 GiB");
}
