//! `moec train` as a user runs it: a tiny spec trains, logs, checkpoints, resumes, and the common
//! mistakes (no `train` block, resuming a changed spec) are clear errors, not panics.

use std::path::Path;
use std::process::Command;

const SPEC: &str = "model cli_tiny {
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
  steps = 6
  optimizer = adamw(lr = 1e-2)
  log = every(2)
  eval = every(3, batches = 1)
  checkpoint = every(3)
}
";

fn moec(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_moec"))
        .args(args)
        .output()
        .expect("runs moec");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn trains_resumes_and_refuses_a_changed_spec() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write(dir.path(), "tiny.moe", SPEC);
    let run = dir.path().join("run");
    let run = run.to_str().unwrap();

    let (ok, out) = moec(&["train", &spec, "--out", run, "--steps", "3"]);
    assert!(ok, "{out}");
    assert!(out.contains("step 2 | loss "), "log line: {out}");
    assert!(out.contains("| aux ") && out.contains(" tok/s"), "{out}");
    assert!(
        out.contains("final: train loss") && out.contains("unigram entropy"),
        "summary: {out}"
    );
    assert!(Path::new(run).join("checkpoint.safetensors").exists());
    assert_eq!(
        std::fs::read_to_string(Path::new(run).join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        2,
        "steps 2 and 3"
    );

    let (ok, out) = moec(&["train", &spec, "--out", run, "--resume"]);
    assert!(ok, "{out}");
    assert!(out.contains("resuming from step 3 of 6"), "{out}");
    assert!(
        out.contains("step 6 | loss ") && out.contains("val_loss"),
        "{out}"
    );

    let changed = write(
        dir.path(),
        "tiny.moe",
        &SPEC.replace("lr = 1e-2", "lr = 2e-2"),
    );
    let (ok, out) = moec(&["train", &changed, "--out", run, "--resume"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("refusing to resume") && out.contains("lr = 2e-2"),
        "{out}"
    );
}

#[test]
fn a_spec_without_train_block_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let text = &SPEC[..SPEC.find("train {").unwrap()];
    let spec = write(dir.path(), "model_only.moe", text);
    let (ok, out) = moec(&[
        "train",
        &spec,
        "--out",
        dir.path().join("r").to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(out.contains("no `train` block"), "{out}");
    assert!(!out.contains("panicked"), "{out}");
}

#[test]
fn adafactor_with_adaptive_expert_lr_learns_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let text = SPEC
        .replace(
            "optimizer = adamw(lr = 1e-2)",
            "optimizer = adafactor(lr = 1e-2)\n  expert_lr = adaptive(base = 1e-3)",
        )
        .replace("log = every(2)", "log = every(1)");
    let spec = write(dir.path(), "adafactor.moe", &text);
    let losses = |run: &Path| -> Vec<f64> {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                    .as_f64()
                    .unwrap()
            })
            .collect()
    };
    let full = dir.path().join("full");
    let (ok, out) = moec(&["train", &spec, "--out", full.to_str().unwrap()]);
    assert!(ok, "{out}");
    let full = losses(&full);
    assert_eq!(full.len(), 6, "{out}");
    assert!(full.iter().all(|l| l.is_finite()), "{full:?}");
    // Markov data from a uniform start: the mean of the last two steps is below the first two's.
    assert!(
        full[4] + full[5] < full[0] + full[1],
        "loss does not decrease: {full:?}"
    );

    // The Adafactor moments round-trip through the checkpoint: a resumed run logs the same losses.
    let resumed = dir.path().join("resumed");
    let resumed = resumed.to_str().unwrap();
    let (ok, out) = moec(&["train", &spec, "--out", resumed, "--steps", "3"]);
    assert!(ok, "{out}");
    let (ok, out) = moec(&["train", &spec, "--out", resumed, "--resume"]);
    assert!(ok, "{out}");
    assert_eq!(losses(Path::new(resumed)), full);
}

/// The shipped classifier spec (mlp family, an MoE block, synthetic Gaussian-cluster classes)
/// learns in a short run: the last eval's `val_acc` is far above chance (1/10), and `moec eval` on
/// the checkpoint reproduces that eval (same validation batches, same weights).
#[test]
fn the_classifier_spec_learns_above_chance() {
    let dir = tempfile::tempdir().unwrap();
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("specs/classifier.moe");
    let run = dir.path().join("run");
    let run = run.to_str().unwrap();
    let (ok, out) = moec(&[
        "train",
        spec.to_str().unwrap(),
        "--out",
        run,
        "--steps",
        "80",
    ]);
    assert!(ok, "{out}");
    assert!(
        out.contains("18000 training / 2000 validation samples") && out.contains("label entropy"),
        "{out}"
    );
    let log = std::fs::read_to_string(Path::new(run).join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!(last["step"], 80);
    assert!(
        last.get("val_ppl").is_none(),
        "a classifier logs val_acc, not val_ppl: {last}"
    );
    let (acc, loss) = (
        last["val_acc"].as_f64().unwrap(),
        last["val_loss"].as_f64().unwrap(),
    );
    eprintln!("classifier after 80 steps: val_acc {acc:.4}, val_loss {loss:.4} (chance 0.1, ln 10 = 2.3026)");
    assert!(acc > 0.3, "val_acc {acc} is not clearly above chance (0.1)");
    assert!(loss < 10f64.ln() - 0.5, "val_loss {loss}");
    assert!(
        out.contains(&format!("val_acc {:.2}%", 100.0 * acc)),
        "console line: {out}"
    );

    let (ok, out) = moec(&["eval", run]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("loss {loss:.4} accuracy {:.2}%", 100.0 * acc)),
        "{out}"
    );
}

/// The `loss` of every line of `run/metrics.jsonl`.
fn logged_losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

/// Shampoo (roots every 2 steps, so the resume at step 3 restarts between root steps) and Muon
/// (adaptive expert lr, 2 micro-steps, clip) train, learn, and resume exactly; `moec report` on
/// the two runs draws each block's router-logit bands, and the CSV beside each plot holds exactly
/// the statistics the runs logged.
#[test]
fn shampoo_and_muon_resume_exactly_and_report_router_logits() {
    let dir = tempfile::tempdir().unwrap();
    let optimizers = [
        ("shampoo", "optimizer = shampoo(lr = 1e-2, root_every = 2)"),
        (
            "muon",
            "optimizer = muon(lr = 2e-2)\n  expert_lr = adaptive\n  accumulate = 2\n  clip = 1.0",
        ),
    ];
    let mut runs = Vec::new();
    for (name, line) in optimizers {
        let text = SPEC
            .replace("optimizer = adamw(lr = 1e-2)", line)
            .replace("log = every(2)", "log = every(1)");
        let spec = write(dir.path(), &format!("{name}.moe"), &text);
        let full = dir.path().join(format!("{name}_full"));
        let (ok, out) = moec(&["train", &spec, "--out", full.to_str().unwrap()]);
        assert!(ok, "{out}");
        let losses = logged_losses(&full);
        assert_eq!(losses.len(), 6, "{out}");
        assert!(
            losses[4] + losses[5] < losses[0] + losses[1],
            "{name}: loss does not decrease: {losses:?}"
        );
        let resumed = dir.path().join(format!("{name}_resumed"));
        let resumed = resumed.to_str().unwrap();
        let (ok, out) = moec(&["train", &spec, "--out", resumed, "--steps", "3"]);
        assert!(ok, "{out}");
        let (ok, out) = moec(&["train", &spec, "--out", resumed, "--resume"]);
        assert!(ok, "{out}");
        assert_eq!(logged_losses(Path::new(resumed)), losses, "{name}");
        runs.push(full);
    }

    let report = dir.path().join("report");
    let mut args = vec!["report".to_string()];
    args.extend(runs.iter().map(|r| r.to_string_lossy().into_owned()));
    args.extend(["--out".into(), report.to_string_lossy().into_owned()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out) = moec(&args);
    assert!(ok, "{out}");
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    assert!(md.contains("## Router logits"), "{md}");
    for (name, _) in optimizers {
        let records: Vec<serde_json::Value> =
            std::fs::read_to_string(dir.path().join(format!("{name}_full/metrics.jsonl")))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
        // The tiny spec has one MoE block, block 0, of 4 experts.
        let stem = format!("router_logits_{name}_full_block0");
        for ext in ["png", "svg"] {
            let plot = report.join(format!("{stem}.{ext}"));
            assert!(
                std::fs::metadata(&plot).is_ok_and(|m| m.len() > 1000),
                "{}",
                plot.display()
            );
        }
        let csv = std::fs::read_to_string(report.join(format!("{stem}.csv"))).unwrap();
        let mut lines = csv.lines();
        assert_eq!(
            lines.next(),
            Some("step,expert,mean,std,min,max,p5,p50,p95")
        );
        let rows: Vec<Vec<f64>> = lines
            .map(|l| l.split(',').map(|v| v.parse().unwrap()).collect())
            .collect();
        assert_eq!(rows.len(), records.len() * 4, "every logged step × expert");
        for row in rows {
            let record = records
                .iter()
                .find(|r| r["step"].as_f64() == Some(row[0]))
                .unwrap();
            let stats = &record["moe"]["0"]["router_logits"];
            for (k, key) in ["mean", "std", "min", "max", "p5", "p50", "p95"]
                .iter()
                .enumerate()
            {
                let logged = stats[key][row[1] as usize].as_f64().unwrap();
                assert_eq!(row[2 + k], logged, "{name} step {} {key}", row[0]);
            }
            assert!(row[6] <= row[7] && row[7] <= row[8] && row[4] <= row[6] && row[8] <= row[5]);
        }
    }
}

const LSTM_LM: &str = "model lstm_tiny {
  family = lstm
  vocab = 32
  dim = 16
  layers = 2
  context = 8
  moe {
    experts = 4
    top_k = 2
    expert = relu(hidden = 16)
    gate = noisy_top_k(noise = 1.0)
    balance = cv2(importance = 0.1, load = 0.1)
  }
}
train {
  data = synthetic(kind = markov, seed = 5)
  batch = 4
  steps = 6
  optimizer = adamw(lr = 1e-2)
  log = every(1)
  eval = every(6, batches = 1)
  checkpoint = every(3)
}
";

/// An LSTM LM with a noisy gate killed after 3 of 6 steps and resumed logs the losses of the run that
/// was never stopped, bit for bit: the checkpoint holds every LSTM weight and the noise is replayed.
#[test]
fn an_lstm_lm_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write(dir.path(), "lstm.moe", LSTM_LM);
    let full = dir.path().join("full");
    let (ok, out) = moec(&["train", &spec, "--out", full.to_str().unwrap()]);
    assert!(ok, "{out}");
    let losses = logged_losses(&full);
    assert_eq!(losses.len(), 6, "{out}");
    let resumed = dir.path().join("resumed");
    let resumed = resumed.to_str().unwrap();
    let (ok, out) = moec(&["train", &spec, "--out", resumed, "--steps", "3"]);
    assert!(ok, "{out}");
    let (ok, out) = moec(&["train", &spec, "--out", resumed, "--resume"]);
    assert!(ok, "{out}");
    assert!(out.contains("resuming from step 3 of 6"), "{out}");
    assert_eq!(logged_losses(Path::new(resumed)), losses);
}

/// specs/lstm-cifar10.moe checks and builds without the CIFAR-10 download (with a warning), and
/// training it without the data is an error naming the missing files, not a panic.
#[test]
fn the_lstm_cifar10_spec_checks_without_its_data_and_training_says_what_is_missing() {
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("specs/lstm-cifar10.moe");
    let dir = tempfile::tempdir().unwrap();
    let copy = write(
        dir.path(),
        "lstm-cifar10.moe",
        &std::fs::read_to_string(&spec).unwrap(),
    );
    let (ok, out) = moec(&["check", &copy, "--no-device"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("lstm_cifar10") && out.contains("warning: the CIFAR-10 directory"),
        "{out}"
    );
    let run = dir.path().join("run");
    let (ok, out) = moec(&["train", &copy, "--out", run.to_str().unwrap()]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("lacks") && out.contains("data_batch_1.bin") && !out.contains("panicked"),
        "{out}"
    );
}
