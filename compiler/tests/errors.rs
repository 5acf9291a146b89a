//! Table-driven diagnostics test: each malformed or invalid spec must fail `check` with the expected
//! message, at the expected line:col, and (where given) with the expected help.

use std::path::Path;

use moec_compiler::check::check;

/// A valid spec; most cases edit one line of it. Line numbers are 1-based.
const BASE: &str = "\
model m {
  vocab = 256
  dim = 64
  layers = 4
  heads = 4
  context = 32
  moe {
    experts = 8
    top_k = 2
  }
}
train {
  data = synthetic(kind = markov)
  batch = 4
  steps = 10
}
";

/// (replace this, with this) in BASE, expected message substring, line, col, help substring ("" = any).
type Case = (
    &'static str,
    &'static str,
    &'static str,
    usize,
    usize,
    &'static str,
);

#[rustfmt::skip]
const EDITS: &[Case] = &[
    // Unknown, misplaced, duplicate and missing fields.
    ("    experts = 8", "    expertz = 8", "unknown field `expertz` in `moe` block", 8, 5, "did you mean `experts`?"),
    ("  dim = 64", "  dimm = 64", "unknown field `dimm` in `model` block", 3, 3, "did you mean `dim`?"),
    ("  heads = 4", "  heads = 4\n  steps = 10", "unknown field `steps` in `model` block", 6, 3, "`steps` belongs in the `train` block"),
    ("  heads = 4", "  heads = 4\n  experts = 8", "unknown field `experts` in `model` block", 6, 3, "`experts` belongs in the `moe` block"),
    ("  dim = 64", "  dim = 64\n  dim = 128", "duplicate field `dim` in `model` block", 4, 3, "already set on line 3"),
    ("  dim = 64\n", "", "missing field `dim` in `model` block", 1, 1, "dim = 256"),
    ("    experts = 8\n", "", "missing field `experts` in `moe` block", 7, 3, "experts = 0"),
    ("  steps = 10\n", "", "missing field `steps` in `train` block", 12, 1, "steps = 1000"),
    ("  vocab = 256\n", "", "missing field `vocab` in `model` block", 1, 1, ""),
    // Value types and ranges.
    ("  dim = 64", "  dim = \"64\"", "`dim` must be a number, found a string", 3, 9, ""),
    ("  dim = 64", "  dim = 64.5", "`dim` must be a whole number, found 64.5", 3, 9, ""),
    ("  layers = 4", "  layers = 0", "`layers` must be at least 1, found 0", 4, 12, ""),
    ("  layers = 4", "  layers = -2", "`layers` must not be negative", 4, 12, ""),
    ("  dim = 64", "  dim = 10 / 0", "division by zero", 3, 14, ""),
    ("  context = 32", "  context = 32\n  norm = rmsnrom", "unknown norm `rmsnrom`", 7, 10, "did you mean `rmsnorm`?"),
    ("  context = 32", "  context = 32\n  norm = \"rmsnorm\"", "`norm` must be one of `rmsnorm` or `layernorm`, found a string", 7, 10, "without quotes"),
    ("  context = 32", "  context = 32\n  family = cnn", "unknown family `cnn`", 7, 12, ""),
    ("  context = 32", "  context = 32\n  tie_embeddings = 1", "`tie_embeddings` must be `true` or `false`, found a number", 7, 20, ""),
    ("  context = 32", "  context = 32\n  ffn = swiglu(hidden = 4 * dimm)", "must be a number, found `dimm`", 7, 29, "did you mean `dim`?"),
    ("  context = 32", "  context = 32\n  ffn = geglu(hidden = 128)", "unknown ffn `geglu`", 7, 9, "did you mean `gelu`?"),
    // Attention shape rules.
    ("  heads = 4", "  heads = 5", "`dim = 64` is not divisible by `heads = 5`", 5, 11, "try heads = 4"),
    ("  heads = 4", "  heads = 4\n  kv_heads = 3", "`heads = 4` is not divisible by `kv_heads = 3`", 6, 14, ""),
    ("  heads = 4", "  heads = 4\n  kv_heads = 8", "`kv_heads = 8` is more than `heads = 4`", 6, 14, ""),
    ("  heads = 4", "  heads = 64", "RoPE needs an even head dimension", 5, 11, ""),
    // MoE rules.
    ("    top_k = 2", "    top_k = 9", "`top_k = 9` is more than `experts = 8`", 9, 13, ""),
    ("    top_k = 2", "    top_k = 2\n    groups = 4 x 4", "`groups = 4 x 4` makes 16 experts, but `experts = 8`", 10, 14, "G * M = 8"),
    ("    top_k = 2", "    top_k = 2\n    groups = (2, 4)", "`groups` must be `G x M`, found a tuple", 10, 14, "groups = 8 x 8"),
    ("    top_k = 2", "    top_k = 2\n    groups = 2 x 4\n    top_groups = 3", "`top_groups = 3` is more than the 2 groups", 11, 18, ""),
    ("    top_k = 2", "    top_k = 2\n    hierarchy = two_level", "`hierarchy` needs `groups = G x M`", 10, 5, ""),
    ("    top_k = 2", "    top_k = 4\n    groups = 4 x 2", "`top_k = 4` is more than 2", 9, 13, ""),
    ("    top_k = 2", "    top_k = 2\n    groups = 2 x 4\n    gate = auction", "`groups` works with the token-choice gates, not `gate = auction`", 10, 5, ""),
    ("    top_k = 2", "    top_k = 2\n    layers = [1, 4]", "block index 4 is out of range: the model has 4 layers", 10, 18, "0-based"),
    ("    top_k = 2", "    top_k = 2\n    layers = [1, 1]", "block 1 is listed twice", 10, 18, ""),
    ("    top_k = 2", "    top_k = 2\n    layers = 2", "must be a list of block indices, found a number", 10, 14, "every = N"),
    ("    top_k = 2", "    top_k = 2\n    every = 8", "`every = 8` makes no block MoE", 10, 13, ""),
    ("    top_k = 2", "    top_k = 2\n    first_dense = 4", "`first_dense = 4` leaves no MoE block", 10, 19, ""),
    ("    top_k = 2", "    top_k = 2\n    gate = switch", "`gate = switch` routes each token to one expert, but `top_k = 2`", 9, 13, ""),
    ("    top_k = 2", "    top_k = 2\n    gate = softmux", "unknown gate `softmux`", 10, 12, "did you mean `softmax`?"),
    ("    top_k = 2", "    top_k = 2\n    gate = softmax(renorm = yes)", "`renorm` must be `true` or `false`, found `yes`", 10, 29, ""),
    ("    top_k = 2", "    top_k = 2\n    gate = noisy_top_k(nosie = 1.0)", "unknown argument `nosie` to `noisy_top_k`", 10, 24, "did you mean `noise`?"),
    ("    top_k = 2", "    top_k = 2\n    gate = sigmoid(1)", "`sigmoid` takes no arguments", 10, 20, ""),
    ("    top_k = 2", "    top_k = 2\n    capacity = factor()", "`factor(...)` needs the capacity factor", 10, 16, ""),
    ("    top_k = 2", "    top_k = 2\n    capacity = factor(1.25, drop = random)", "unknown drop `random`", 10, 36, ""),
    ("    top_k = 2", "    top_k = 2\n    balance = aux(0.01) + aux(0.02)", "`aux` appears twice in `balance`", 10, 27, ""),
    ("    top_k = 2", "    top_k = 2\n    balance = aux(0.01) - z(0.001)", "balance terms are joined with `+`, not `-`", 10, 15, ""),
    ("    top_k = 2", "    top_k = 2\n    balance = auxx(0.01)", "unknown balance term `auxx`", 10, 15, "did you mean `aux`?"),
    ("    top_k = 2", "    top_k = 2\n    balance = aux(0.01, 0.02)", "`aux` takes 1 argument (`c`), got 2", 10, 25, ""),
    ("    top_k = 2", "    top_k = 2\n    balance = cv2(importance = 0.1, load = 0.1)", "the `load` term of `cv2` needs `gate = noisy_top_k(...)`", 10, 15, ""),
    ("    top_k = 2", "    top_k = 2\n    balance = aux(0.01) + none", "`none` cannot be part of a sum", 10, 27, ""),
    ("    top_k = 2", "    top_k = 2\n    jitter = 1.5", "`jitter` must be in [0, 1), found 1.5", 10, 14, ""),
    // Train block.
    ("  data = synthetic(kind = markov)", "  data = synthetic(kind = classes)", "this synthetic data does not fit the model", 13, 27, ""),
    ("  data = synthetic(kind = markov)", "  data = text(\"no/such/file.txt\")", "cannot read training data `no/such/file.txt`: no such file or directory", 13, 15, "relative to the spec file"),
    ("  data = synthetic(kind = markov)", "  data = cifar10(\"cifar\")", "`cifar10(...)` needs `family = mlp`", 13, 10, ""),
    ("  data = synthetic(kind = markov)", "  data = text(input)", "`path` must be a string, found `input`", 13, 15, ""),
    ("  data = synthetic(kind = markov)", "  data = \"input.txt\"", "`data` must be one of `text`, `tokens`, `cifar10` or `synthetic`, found a string", 13, 10, ""),
    ("  steps = 10", "  steps = 10\n  optimizer = adam(lr = 1e-3)", "unknown optimizer `adam`", 16, 15, "did you mean `adamw`?"),
    ("  steps = 10", "  steps = 10\n  optimizer = adamw(betas = 0.9)", "`betas` must be a pair `(beta1, beta2)`, found a number", 16, 29, "betas = (0.9, 0.95)"),
    ("  steps = 10", "  steps = 10\n  optimizer = adamw(betas = (0.9, 1.5))", "`beta2` must be in [0, 1), found 1.5", 16, 35, ""),
    ("  steps = 10", "  steps = 10\n  optimizer = sgd(momentum = 0.9)", "`sgd` needs `lr`", 16, 15, ""),
    ("  steps = 10", "  steps = 10\n  optimizer = adamw(lr = 1e-3, 0.9)", "a positional argument cannot follow `key = value` arguments", 16, 32, ""),
    ("  steps = 10", "  steps = 10\n  schedule = cosine(warmup = 100)", "`warmup = 100` is longer than the run (`steps = 10`)", 16, 30, ""),
    ("  steps = 10", "  steps = 10\n  schedule = cosine(min_lr = 1)", "`min_lr = 1` is above the optimizer's `lr = 0.0003`", 16, 30, ""),
    ("  steps = 10", "  steps = 10\n  split = 1.5", "`split` must be between 0 and 1 (exclusive), found 1.5", 16, 11, ""),
    ("  steps = 10", "  steps = 10\n  eval = every(100, batch = 4)", "unknown argument `batch` to `every`", 16, 21, "did you mean `batches`?"),
    ("  steps = 10", "  steps = 10\n  log = every(10, batches = 2)", "unknown argument `batches` to `every`", 16, 19, ""),
    ("  steps = 10", "  steps = 10\n  expert_lr = \"fast\"", "`expert_lr` must be a number or `adaptive(base = x)`, found a string", 16, 15, ""),
    ("  steps = 10", "  steps = 10\n  precision = bf16", "unknown precision `bf16`", 16, 15, "did you mean `f16`?"),
    ("  steps = 10", "  steps = 10\n  seed = -1", "`seed` must not be negative", 16, 10, ""),
    // Syntax errors come through `check` with the file's name.
    ("  dim = 64", "  dim 64", "expected `=`, found `64`", 3, 7, "name = value"),
    ("  dim = 64", "  dim = 64 64", "expected end of line or `}`, found `64`", 3, 12, ""),
];

/// Whole specs for the other families.
#[rustfmt::skip]
const WHOLE: &[(&str, &str, usize, usize, &str)] = &[
    (
        "model r {\n  family = lstm\n  vocab = 256\n  dim = 64\n  layers = 2\n  context = 32\n  heads = 4\n}\n",
        "`heads` applies only to `family = transformer`",
        7,
        3,
        "",
    ),
    (
        "model c {\n  family = mlp\n  dim = 64\n  layers = 2\n  classes = 10\n}\n",
        "missing field `inputs` in `model` block",
        1,
        1,
        "inputs = 3072",
    ),
    (
        "model c {\n  family = mlp\n  inputs = 784\n  classes = 10\n  dim = 64\n  layers = 2\n}\ntrain {\n  data = cifar10(\"x\")\n  batch = 8\n  steps = 1\n}\n",
        "`cifar10(...)` needs `family = mlp` with `inputs = 3072`",
        9,
        10,
        "",
    ),
    (
        "model c {\n  family = mlp\n  inputs = 3072\n  classes = 10\n  dim = 64\n  layers = 2\n  vocab = 256\n}\n",
        "`vocab` applies only to language models",
        7,
        3,
        "",
    ),
    (
        "model c {\n  family = mlp\n  inputs = 8\n  classes = 4\n  dim = 64\n  layers = 2\n}\ntrain {\n  data = text(\"a.txt\")\n  batch = 8\n  steps = 1\n}\n",
        "`text(...)` is language-model data, but this is an `mlp` model",
        9,
        10,
        "",
    ),
];

fn expect_error(src: &str, msg: &str, line: usize, col: usize, help: &str) -> Vec<String> {
    let mut failures = Vec::new();
    match check(src, Path::new("specs/case.moe")) {
        Ok(spec) => failures.push(format!("expected `{msg}`, but it checked: {spec:?}\n{src}")),
        Err(d) => {
            let rendered = d.render();
            if !d.message().contains(msg) {
                failures.push(format!(
                    "message {:?} lacks {msg:?}\n{rendered}",
                    d.message()
                ));
            }
            if (d.line, d.col) != (line, col) {
                failures.push(format!(
                    "`{msg}` at {}:{}, expected {line}:{col}\n{rendered}",
                    d.line, d.col
                ));
            }
            if !help.is_empty() && !d.help_text().is_some_and(|h| h.contains(help)) {
                failures.push(format!("`{msg}`: help {:?} lacks {help:?}", d.help_text()));
            }
            if !rendered.contains(&format!("specs/case.moe:{line}:{col}"))
                || !rendered.contains('^')
            {
                failures.push(format!("rendering lacks location or caret:\n{rendered}"));
            }
            if rendered.contains('\u{1b}') {
                failures.push(format!("rendering has ANSI escapes: {rendered:?}"));
            }
        }
    }
    failures
}

#[test]
fn base_spec_is_valid() {
    check(BASE, Path::new("specs/case.moe")).unwrap_or_else(|d| panic!("{}", d.render()));
}

#[test]
fn every_invalid_spec_reports_the_right_message_at_the_right_place() {
    assert!(EDITS.len() + WHOLE.len() >= 35);
    let mut failures = Vec::new();
    for (from, to, msg, line, col, help) in EDITS {
        assert_eq!(
            BASE.matches(from).count(),
            1,
            "edit target {from:?} must occur once in BASE"
        );
        let src = BASE.replacen(from, to, 1);
        failures.extend(expect_error(&src, msg, *line, *col, help));
    }
    for (src, msg, line, col, help) in WHOLE {
        failures.extend(expect_error(src, msg, *line, *col, help));
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn data_files_are_checked_relative_to_the_spec() {
    let dir = std::env::temp_dir().join(format!("moec-check-data-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::write(dir.join("data/short.txt"), b"too short").unwrap();
    std::fs::write(dir.join("data/long.txt"), vec![b'a'; 100]).unwrap();
    std::fs::write(dir.join("data/odd.bin"), vec![0u8; 101]).unwrap();
    std::fs::write(dir.join("data/ok.bin"), vec![0u8; 200]).unwrap();
    let spec_path = dir.join("spec.moe");
    let with = |data: &str| BASE.replacen("synthetic(kind = markov)", data, 1);

    let ok = check(&with("text(\"data/long.txt\")"), &spec_path)
        .unwrap_or_else(|d| panic!("{}", d.render()));
    assert_eq!(
        ok.train.unwrap().data,
        moec_compiler::spec::Data::Text {
            path: "data/long.txt".into()
        }
    );
    check(&with("tokens(\"data/ok.bin\", dtype = u16)"), &spec_path)
        .unwrap_or_else(|d| panic!("{}", d.render()));

    let short = check(&with("text(\"data/short.txt\")"), &spec_path).unwrap_err();
    assert!(
        short
            .message()
            .contains("the data has 9 tokens, fewer than one sequence of context + 1 = 33"),
        "{}",
        short.render()
    );
    assert_eq!((short.line, short.col), (13, 15));
    let odd = check(&with("tokens(\"data/odd.bin\")"), &spec_path).unwrap_err();
    assert!(
        odd.message()
            .contains("101 bytes, not a whole number of 2-byte tokens"),
        "{}",
        odd.render()
    );
    let dir_not_file = check(&with("text(\"data\")"), &spec_path).unwrap_err();
    assert!(
        dir_not_file.message().contains("is not a file"),
        "{}",
        dir_not_file.render()
    );
    // The same relative path does not resolve from another directory.
    let elsewhere = check(
        &with("text(\"data/long.txt\")"),
        Path::new("/nonexistent/spec.moe"),
    )
    .unwrap_err();
    assert!(
        elsewhere.message().contains("cannot read training data"),
        "{}",
        elsewhere.render()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// CIFAR-10 is a separate download, so a spec naming a directory that does not exist yet checks (the
/// CLI warns, training fails on the missing files); an existing directory without batch files is a
/// wrong path and stays an error (docs/DECISIONS.md, "lstm").
#[test]
fn a_missing_cifar10_directory_checks_but_one_without_batches_does_not() {
    let dir = std::env::temp_dir().join(format!("moec-check-cifar-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("empty")).unwrap();
    let spec_path = dir.join("spec.moe");
    let with = |data: &str| {
        format!(
            "model c {{\n  family = lstm\n  inputs = 96\n  classes = 10\n  context = 32\n  dim = 8\n  layers = 2\n  moe {{\n    experts = 2\n  }}\n}}\ntrain {{\n  data = cifar10(\"{data}\")\n  batch = 8\n  steps = 1\n}}\n"
        )
    };
    let ok =
        check(&with("not/downloaded"), &spec_path).unwrap_or_else(|d| panic!("{}", d.render()));
    assert_eq!(
        ok.train.unwrap().data,
        moec_compiler::spec::Data::Cifar10 {
            dir: "not/downloaded".into()
        }
    );
    let empty = check(&with("empty"), &spec_path).unwrap_err();
    assert!(
        empty.message().contains("holds no CIFAR-10 batch files"),
        "{}",
        empty.render()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
