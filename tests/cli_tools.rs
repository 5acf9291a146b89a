//! `moec generate`, `moec eval` and `moec bench` as a user runs them, on a tiny MoE spec trained
//! for three steps.

use std::path::Path;
use std::process::Command;

const SPEC: &str = "model tools_tiny {
  vocab = 32
  dim = 32
  layers = 1
  heads = 2
  context = 16
  moe {
    experts = 4
    top_k = 2
    expert = swiglu(hidden = 32)
  }
}
train {
  data = synthetic(kind = markov, seed = 5)
  batch = 4
  steps = 3
  optimizer = adamw(lr = 1e-2)
  log = every(3)
  eval = every(3, batches = 1)
  checkpoint = every(3)
}
";

fn moec(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_moec"))
        .args(args)
        .output()
        .expect("runs moec");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The number after `key ` in `text`.
fn field(text: &str, key: &str) -> f64 {
    let rest = &text[text
        .find(key)
        .unwrap_or_else(|| panic!("no `{key}` in {text}"))
        + key.len()..];
    rest.split_whitespace()
        .next()
        .unwrap()
        .trim_end_matches(',')
        .parse()
        .unwrap_or_else(|_| panic!("`{key}` not a number in {text}"))
}

#[test]
fn generate_eval_and_bench_a_trained_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("tiny.moe");
    std::fs::write(&spec, SPEC).unwrap();
    let spec = spec.to_str().unwrap();
    let run = dir.path().join("run");
    let run = run.to_str().unwrap();
    let (ok, out, err) = moec(&["train", spec, "--out", run]);
    assert!(ok, "{out}{err}");
    let trained_val = field(&out, "val loss ");

    // Greedy generation is deterministic and yields exactly the asked number of in-vocab ids.
    let greedy = [
        "generate",
        run,
        "--prompt-ids",
        "1,2,3",
        "--tokens",
        "20",
        "--temperature",
        "0",
    ];
    let (ok, first, err) = moec(&greedy);
    assert!(ok, "{first}{err}");
    let (_, second, _) = moec(&greedy);
    assert_eq!(first, second);
    let ids: Vec<u32> = first
        .trim()
        .split(',')
        .map(|t| t.parse().unwrap())
        .collect();
    assert_eq!(ids.len(), 20);
    assert!(ids.iter().all(|&t| t < 32), "{ids:?}");
    // Seeded sampling is reproducible too; a window longer than the context (3 + 20 > 16) slides.
    let sampled = [
        "generate",
        run,
        "--prompt-ids",
        "1,2,3",
        "--tokens",
        "20",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--seed",
        "7",
    ];
    assert_eq!(moec(&sampled).1, moec(&sampled).1);
    // A text prompt needs a byte vocab: a clear error, not a panic.
    let (ok, _, err) = moec(&["generate", run, "--prompt", "hi"]);
    assert!(!ok && err.contains("--prompt-ids"), "{err}");

    // Eval reproduces the trainer's val_loss (same batches, same weights) to print precision.
    let (ok, out, err) = moec(&["eval", run]);
    assert!(ok, "{out}{err}");
    let (loss, ppl) = (field(&out, "loss "), field(&out, "ppl "));
    assert!(
        loss.is_finite() && (loss - trained_val).abs() < 1e-3,
        "eval {loss} vs trained {trained_val}"
    );
    assert!(
        (ppl - loss.exp()).abs() < 1e-3 * ppl,
        "ppl {ppl} vs e^{loss}"
    );

    let (ok, out, err) = moec(&["bench", spec, "--steps", "2", "--warmup", "1", "--both"]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("on ")
            && out.contains("the plans' steps alternating")
            && out.contains("ms/step")
            && out.contains("GFLOP/s"),
        "{out}"
    );
    for plan in ["fused ", "unfused "] {
        let line = out
            .lines()
            .find(|l| l.starts_with(plan))
            .unwrap_or_else(|| panic!("no {plan}row: {out}"));
        let cols: Vec<f64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|c| c.parse().ok())
            .collect();
        assert!(
            cols.len() >= 4 && cols.iter().all(|&c| c.is_finite() && c > 0.0),
            "{line}"
        );
    }
    assert!(out.contains("fusion speed-up"), "{out}");
    assert!(Path::new(run).join("checkpoint.safetensors").exists());
}

#[test]
fn byte_level_prompt_and_eval_on_a_given_text_file() {
    let dir = tempfile::tempdir().unwrap();
    let text = "the quick brown fox jumps over the lazy dog. ".repeat(40);
    std::fs::write(dir.path().join("corpus.txt"), &text).unwrap();
    let spec = dir.path().join("bytes.moe");
    std::fs::write(
        &spec,
        "model bytes_tiny {\n  vocab = 256\n  dim = 32\n  layers = 1\n  heads = 2\n  context = 16\n}\n\
         train {\n  data = text(\"corpus.txt\")\n  batch = 2\n  steps = 2\n  optimizer = adamw(lr = 1e-2)\n  log = every(2)\n  eval = every(2, batches = 1)\n  checkpoint = every(2)\n}\n",
    )
    .unwrap();
    let run = dir.path().join("run");
    let run = run.to_str().unwrap();
    let (ok, out, err) = moec(&["train", spec.to_str().unwrap(), "--out", run]);
    assert!(ok, "{out}{err}");

    // Greedy from a text prompt: the prompt comes back first, then exactly 12 generated bytes
    // (ASCII here only if the model picks ASCII, so count bytes of the lossy string's source:
    // every byte ≥ 0x80 becomes U+FFFD, at most one replacement per byte).
    let args = [
        "generate",
        run,
        "--prompt",
        "the ",
        "--tokens",
        "12",
        "--temperature",
        "0",
    ];
    let (ok, first, err) = moec(&args);
    assert!(ok, "{first}{err}");
    assert_eq!(first, moec(&args).1);
    let line = first.strip_suffix('\n').unwrap();
    assert!(line.starts_with("the "), "{line:?}");
    assert!(
        (1..=12).contains(&line["the ".len()..].chars().count()),
        "{line:?}"
    );

    // Eval on an explicit file (its validation part): a finite loss, ppl = e^loss.
    let corpus = dir.path().join("corpus.txt");
    let (ok, out, err) = moec(&[
        "eval",
        run,
        "--data",
        corpus.to_str().unwrap(),
        "--batches",
        "2",
    ]);
    assert!(ok, "{out}{err}");
    let (loss, ppl) = (field(&out, "loss "), field(&out, "ppl "));
    assert!(loss.is_finite() && loss > 0.0, "{out}");
    assert!(
        (ppl - loss.exp()).abs() < 1e-3 * ppl,
        "ppl {ppl} vs e^{loss}"
    );
}

/// `moec generate` and `moec eval` on an LSTM language model (noisy top-k MoE between its two LSTM
/// layers): generation runs the sampled-rows head of the recurrent graph, sliding its window past the
/// context; eval reproduces the trainer's val_loss.
#[test]
fn generate_and_eval_an_lstm_language_model() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("lstm.moe");
    std::fs::write(
        &spec,
        "model lstm_tools {\n  family = lstm\n  vocab = 32\n  dim = 16\n  layers = 2\n  context = 8\n  \
         moe {\n    experts = 4\n    top_k = 2\n    expert = relu(hidden = 16)\n    gate = noisy_top_k(noise = 1.0)\n  }\n}\n\
         train {\n  data = synthetic(kind = markov, seed = 5)\n  batch = 4\n  steps = 3\n  optimizer = adamw(lr = 1e-2)\n  log = every(3)\n  eval = every(3, batches = 1)\n  checkpoint = every(3)\n}\n",
    )
    .unwrap();
    let run = dir.path().join("run");
    let run = run.to_str().unwrap();
    let (ok, out, err) = moec(&["train", spec.to_str().unwrap(), "--out", run]);
    assert!(ok, "{out}{err}");
    let trained_val = field(&out, "val loss ");

    // 3 + 10 tokens > context 8: the window slides. Greedy is deterministic and stays in the vocab.
    let greedy = [
        "generate",
        run,
        "--prompt-ids",
        "1,2,3",
        "--tokens",
        "10",
        "--temperature",
        "0",
    ];
    let (ok, first, err) = moec(&greedy);
    assert!(ok, "{first}{err}");
    assert_eq!(first, moec(&greedy).1);
    let ids: Vec<u32> = first
        .trim()
        .split(',')
        .map(|t| t.parse().unwrap())
        .collect();
    assert_eq!(ids.len(), 10);
    assert!(ids.iter().all(|&t| t < 32), "{ids:?}");

    let (ok, out, err) = moec(&["eval", run]);
    assert!(ok, "{out}{err}");
    let loss = field(&out, "loss ");
    assert!(
        loss.is_finite() && (loss - trained_val).abs() < 1e-3,
        "eval {loss} vs trained {trained_val}"
    );
}

/// `moec check --memory`: the exact peak against a budget; a budget under the peak names the change
/// that fits (a recompute level, then f16, then a smaller batch), and one under a single parameter's weights, gradient and AdamW state names that tensor.
#[test]
fn check_compares_the_peak_with_a_memory_budget() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("tools_tiny.moe");
    std::fs::write(&spec, SPEC).unwrap();
    let spec = spec.to_str().unwrap();
    let (ok, out, err) = moec(&["check", spec, "--no-device", "--memory", "1GiB"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("peak (allocated)") && out.contains("fits"),
        "{out}"
    );
    // Peaks (f32 / f16): 573 / 404 KiB without recompute, 549 / 391 KiB with `recompute = block`:
    // at 450 KiB no recompute level fits in f32, so the advice is f16.
    let (ok, _, err) = moec(&["check", spec, "--no-device", "--memory", "450KiB"]);
    assert!(!ok);
    assert!(
        err.contains("recompute = none") && err.contains("precision = f16"),
        "{err}"
    );
    // An expert stack [4, 32, 32] f32: 16 KiB weights + 16 KiB gradient + 32 KiB AdamW state (and
    // its info block) is the largest parameter, over a 40 KiB budget on its own.
    let (ok, _, err) = moec(&["check", spec, "--no-device", "--memory", "40KiB"]);
    assert!(!ok);
    assert!(
        err.contains("block_sparse_moe.experts.w") && err.contains("alone needs 64"),
        "{err}"
    );
}

/// `moec check --max-binding`: an expert stack over the binding limit is split for AdamW, so the
/// spec checks on the adapter (lavapipe: 48 bindings per stage; the portable 8 are too few for a
/// kernel whose three operands are each split); Shampoo must precondition each expert matrix whole, so the same limit is a
/// check-time error naming the parameter, its size and the limit.
#[test]
fn check_refuses_only_matrices_an_optimizer_needs_whole() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("tools_tiny.moe");
    std::fs::write(&spec, SPEC).unwrap();
    let spec = spec.to_str().unwrap();
    let (ok, out, err) = moec(&["check", spec, "--max-binding", "12KiB"]);
    assert!(ok, "{err}");
    assert!(out.contains("peak (allocated)"), "{out}");
    let shampoo = dir.path().join("tools_shampoo.moe");
    std::fs::write(
        &shampoo,
        SPEC.replace("adamw(lr = 1e-2)", "shampoo(lr = 1e-2, root_every = 2)"),
    )
    .unwrap();
    let shampoo = shampoo.to_str().unwrap();
    let (ok, _, err) = moec(&["check", shampoo, "--no-device", "--max-binding", "12KiB"]);
    assert!(!ok);
    assert!(
        err.contains("block_sparse_moe.experts.w")
            && err.contains("16384 bytes")
            && err.contains("12288 bytes"),
        "{err}"
    );
    let (ok, _, err) = moec(&["check", shampoo, "--no-device"]);
    assert!(ok, "{err}");
}

/// `moec forward` on a `precision = f16` spec checks the GPU against the interpreter's f16 mode
/// (f16's tolerance, on routing-stable rows: src/f16_compare.rs) and passes; the quick-start spec,
/// whose f16 top-k routing flips on a few near-tied tokens.
#[test]
fn forward_checks_an_f16_spec_against_the_f16_interpreter() {
    let dir = tempfile::tempdir().unwrap();
    let quickstart = Path::new(env!("CARGO_MANIFEST_DIR")).join("specs/quickstart.moe");
    let text = std::fs::read_to_string(&quickstart).unwrap();
    let text = text.replacen("train {", "train {\n  precision = f16", 1);
    let spec = dir.path().join("quickstart-f16.moe");
    std::fs::write(&spec, text).unwrap();
    let (ok, out, err) = moec(&["forward", spec.to_str().unwrap()]);
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains("f16 plan: errors within the f16 tolerance"),
        "{out}"
    );
}
