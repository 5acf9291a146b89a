//! Mutation fuzzing of `check`: valid specs covering docs/language.md's fields are damaged thousands of
//! times (characters deleted, inserted, replaced; tokens swapped; lines duplicated; truncation) and
//! `check` must return `Ok` or `Err` every time, never panic, and every error must render with a
//! location inside the source.

use std::path::Path;

use proptest::prelude::*;

use moec_compiler::check::check;

const SEEDS: &[&str] = &[
    // Mixtral-style transformer, every option of the attention block and softmax gating.
    r#"model mixtral {
  family = transformer
  vocab = 256; dim = 128; layers = 4; heads = 4; kv_heads = 2; context = 64
  norm = rmsnorm
  rope_theta = 10000
  ffn = swiglu(hidden = 4 * dim / 2)
  tie_embeddings = false
  moe {
    every = 2
    first_dense = 1
    experts = 8
    top_k = 2
    expert = swiglu(hidden = 256)
    gate = softmax(renorm = true)
    capacity = factor(1.25, drop = position)
    balance = aux(0.01) + z(0.001)
    jitter = 0.01
    router_precision = f32
  }
}
train {
  data = synthetic(kind = markov, seed = 3)
  split = 0.9
  batch = 8; accumulate = 2; steps = 300
  optimizer = adamw(lr = 1e-3, betas = (0.9, 0.95), eps = 1e-8, weight_decay = 0.1)
  schedule = cosine(warmup = 20, min_lr = 1e-4)
  clip = 1.0
  precision = f32
  seed = 7
  eval = every(100, batches = 4)
  checkpoint = every(500)
  log = every(10)
}
"#,
    // Shazeer 2017 LSTM LM with hierarchical noisy top-k.
    r#"# hierarchical MoE between LSTM layers
model shazeer {
  family = lstm
  vocab = 256
  dim = 64
  layers = 2
  context = 32
  bidirectional = false
  moe {
    layers = [1]
    experts = 16
    groups = 4 x 4
    hierarchy = two_level
    top_groups = 2
    top_k = 2
    gate = noisy_top_k(noise = 1.0)
    balance = cv2(importance = 0.1, load = 0.1)
    expert = relu(hidden = 128)
  }
}
train {
  data = synthetic(kind = copy)
  batch = 4
  steps = 50
  optimizer = sgd(lr = 0.1, momentum = 0.9)
  expert_lr = adaptive(base = 0.05)
}
"#,
    // CIFAR-style classifier, auction routing.
    r#"model classifier {
  family = mlp
  inputs = 3072
  classes = 10
  dim = 128
  layers = 3
  norm = layernorm
  ffn = gelu(hidden = 512)
  moe {
    experts = 4
    top_k = 1
    gate = auction(rounds = 4, epsilon = 0.01, budget = 1.0, price_rate = 0.01)
    capacity = factor(1.0, drop = probability)
    balance = none
  }
}
train {
  data = synthetic(kind = classes, seed = 1)
  batch = 32
  steps = 100
  optimizer = adafactor(lr = 1e-3)
  schedule = linear(warmup = 10)
}
"#,
    // DeepSeek-style sigmoid gating with loss-free bias, group-limited routing.
    r#"model deepseek {
  vocab = 256
  dim = 64
  layers = 2
  heads = 2
  context = 16
  moe {
    experts = 8
    groups = 4 x 2
    hierarchy = group_limited
    top_groups = 2
    top_k = 2
    shared_experts = 1
    gate = sigmoid
    balance = bias(rate = 0.001) + seq_aux(0.0001)
  }
}
train {
  data = tokens("missing.bin", dtype = u16)
  batch = 2
  steps = 10
  expert_lr = 1e-3
  optimizer = schedule_free_adamw(lr = 2e-3)
  precision = f16
}
"#,
    // Other gates, and a dense baseline.
    "model e { vocab = 256; dim = 32; layers = 2; heads = 2; context = 8\n moe { experts = 4; gate = expert_choice(capacity = 2.0) } }\n",
    "model s { vocab = 256; dim = 32; layers = 2; heads = 2; context = 8\n moe { experts = 4; gate = sinkhorn(iters = 3); top_k = 1 } }\n",
    "model w { vocab = 256; dim = 32; layers = 2; heads = 2; context = 8\n moe { experts = 4; gate = switch } }\n",
    "model d { vocab = 256; dim = 32; layers = 2; heads = 2; context = 8\n moe { experts = 0 } }\ntrain { data = text(\"in.txt\"); batch = 1; steps = 1 }\n",
];

/// Characters that matter to the grammar, plus some that do not belong at all.
const ALPHABET: &[char] = &[
    '{', '}', '(', ')', '[', ']', '=', ',', ';', '#', '"', '\\', '\n', ' ', '+', '-', '*', '/',
    'x', '.', '_', '0', '1', '9', 'e', 'a', 'z', 'K', 'é', '\t', '\r', '@',
];

#[derive(Debug, Clone)]
enum Mutation {
    Delete {
        at: usize,
        len: usize,
    },
    Insert {
        at: usize,
        c: char,
    },
    Replace {
        at: usize,
        c: char,
    },
    SwapTokens {
        a: usize,
        b: usize,
    },
    DuplicateLine {
        line: usize,
    },
    Truncate {
        at: usize,
    },
    /// Replaces the n-th number with an edge value, to reach the semantic checks past the parser.
    ReplaceNumber {
        nth: usize,
        with: &'static str,
    },
}

const EDGE_NUMBERS: &[&str] = &[
    "0",
    "1",
    "3",
    "-1",
    "2.5",
    "1e30",
    "1e400",
    "99999999999999999999",
    "65537",
    "1_0",
    "0.0",
];

fn mutation() -> impl Strategy<Value = Mutation> {
    let c = proptest::sample::select(ALPHABET);
    prop_oneof![
        (any::<usize>(), 1usize..8).prop_map(|(at, len)| Mutation::Delete { at, len }),
        (any::<usize>(), c.clone()).prop_map(|(at, c)| Mutation::Insert { at, c }),
        (any::<usize>(), c).prop_map(|(at, c)| Mutation::Replace { at, c }),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::SwapTokens { a, b }),
        any::<usize>().prop_map(|line| Mutation::DuplicateLine { line }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        (any::<usize>(), proptest::sample::select(EDGE_NUMBERS))
            .prop_map(|(nth, with)| Mutation::ReplaceNumber { nth, with }),
    ]
}

/// Applies a mutation on char boundaries (indices are taken modulo the current length).
fn apply(src: &str, m: &Mutation) -> String {
    let chars: Vec<char> = src.chars().collect();
    let n = chars.len();
    let pick = |i: usize| if n == 0 { 0 } else { i % n };
    let mut out = chars.clone();
    match *m {
        Mutation::Delete { at, len } => {
            let at = pick(at);
            out.drain(at..(at + len).min(n));
        }
        Mutation::Insert { at, c } => out.insert(if n == 0 { 0 } else { at % (n + 1) }, c),
        Mutation::Replace { at, c } => {
            if n > 0 {
                out[pick(at)] = c;
            }
        }
        Mutation::SwapTokens { a, b } => {
            let mut tokens: Vec<&str> = src.split(' ').collect();
            let k = tokens.len();
            tokens.swap(a % k, b % k);
            return tokens.join(" ");
        }
        Mutation::DuplicateLine { line } => {
            let mut lines: Vec<&str> = src.lines().collect();
            if !lines.is_empty() {
                let i = line % lines.len();
                lines.insert(i, lines[i]);
            }
            return lines.join("\n");
        }
        Mutation::Truncate { at } => out.truncate(pick(at)),
        Mutation::ReplaceNumber { nth, with } => {
            // Runs of ASCII digits (and '.'), found on char boundaries.
            let mut runs = Vec::new();
            let mut start = None;
            for (i, c) in src.char_indices().chain(std::iter::once((src.len(), ' '))) {
                match (c.is_ascii_digit() || c == '.', start) {
                    (true, None) => start = Some(i),
                    (false, Some(s)) => {
                        runs.push((s, i));
                        start = None;
                    }
                    _ => {}
                }
            }
            if runs.is_empty() {
                return src.to_string();
            }
            let (s, e) = runs[nth % runs.len()];
            return format!("{}{}{}", &src[..s], with, &src[e..]);
        }
    }
    out.into_iter().collect()
}

#[test]
fn seeds_are_valid_where_their_data_exists() {
    for (i, s) in SEEDS.iter().enumerate() {
        let r = check(s, Path::new("fuzz/seed.moe"));
        // Seeds 3 and 7 name data files that do not exist: they exercise the data-file error path.
        match (i, r) {
            (3 | 7, Err(d)) => assert!(
                d.message().contains("cannot read training data"),
                "{}",
                d.render()
            ),
            (_, Ok(_)) => {}
            (_, Err(d)) => panic!("seed {i} should check:\n{}", d.render()),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 20_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn check_never_panics_on_mutated_specs(
        seed in 0..SEEDS.len(),
        mutations in proptest::collection::vec(mutation(), 1..5),
    ) {
        let mut src = SEEDS[seed].to_string();
        for m in &mutations {
            src = apply(&src, m);
        }
        if let Err(d) = check(&src, Path::new("fuzz/mutated.moe")) {
            // Errors must be located inside the (mutated) source and render with their location.
            let r = d.render();
            prop_assert!(r.contains("fuzz/mutated.moe:"), "{}", r);
            prop_assert!(d.line >= 1 && d.line <= src.lines().count().max(1) + 1, "line {} of {:?}", d.line, src);
            prop_assert!(d.span().end <= src.len());
            prop_assert!(!d.message().is_empty());
        }
    }
}
