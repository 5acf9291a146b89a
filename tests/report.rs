//! `moec report`: two synthetic runs (2 MoE blocks × 4 experts, val lines, one with router biases, a
//! diverged line and a spec) → plots exist and are real images, the table holds the hand-computed
//! numbers; and every bad input is a clear error, not a panic.

use moec_runtime::metrics::{MetricsLog, MoeLayerMetrics, Record};
use moec_runtime::report::{load_runs, summarize, write_report, ReportError, Run};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A fresh, empty directory under the system temp dir, unique per test and process.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("moec-report-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn moe(blocks: &[(&str, [u64; 4], f64)]) -> Option<BTreeMap<String, MoeLayerMetrics>> {
    Some(
        blocks
            .iter()
            .map(|(b, counts, dropped)| {
                (
                    b.to_string(),
                    MoeLayerMetrics::from_counts(counts, *dropped, 1.0, 0.01),
                )
            })
            .collect(),
    )
}

/// `alpha`: steps 10..=100 (every 10), MoE blocks 1 and 3, val at 50 and 100. Only step 100 is in
/// the last 10% (step ≥ 100 − 90/10 = 91): block 1 [6,14,10,10] (CV² 0.08, Gini 0.15, 100% used,
/// 2% dropped), block 3 [0,10,10,20] (CV² 0.5, Gini 0.375, 75% used, 4% dropped).
fn write_alpha(dir: &Path) {
    let mut log = MetricsLog::create(dir).unwrap();
    for i in 1..=10u64 {
        let step = 10 * i;
        let mut r = Record::new(step, 4.0 - 0.025 * step as f64, 3e-4, 1000.0 * i as f64);
        r.moe = if step == 100 {
            moe(&[("1", [6, 14, 10, 10], 2.0), ("3", [0, 10, 10, 20], 4.0)])
        } else {
            moe(&[("1", [40, 0, 0, 0], 50.0), ("3", [10, 10, 10, 10], 0.0)])
        };
        if step == 50 {
            r = r.with_val_loss(2.5);
        }
        if step == 100 {
            r = r.with_val_loss(2.0);
        }
        log.write(&r).unwrap();
    }
}

/// `beta`: steps 1..=20, MoE blocks 0 and 2 with a selection bias logged, loss NaN at step 5, val
/// at 10 and 20, a spec naming the model. Last 10%: steps ≥ 18.1, i.e. 19 and 20. Block 0 is even
/// at 19 and [0,0,20,20] at 20 (CV² 1, Gini 0.5, 50% used); block 2 is always even.
fn write_beta(dir: &Path) {
    let mut log = MetricsLog::create(dir).unwrap();
    for step in 1..=20u64 {
        let loss = if step == 5 {
            f64::NAN
        } else {
            3.0 - 0.0375 * step as f64
        };
        let mut r = Record::new(step, loss, 1e-3, 200.0);
        let block0 = if step == 20 {
            [0, 0, 20, 20]
        } else {
            [10, 10, 10, 10]
        };
        r.moe = moe(&[("0", block0, 0.0), ("2", [10, 10, 10, 10], 0.0)]);
        if let Some(m) = r.moe.as_mut() {
            let s = step as f64 * 1e-3;
            m.get_mut("0").unwrap().bias = Some(vec![s, -s, 2.0 * s, -2.0 * s]);
        }
        if step == 10 {
            r = r.with_val_loss(2.6);
        }
        if step == 20 {
            r = r.with_val_loss(2.4);
        }
        log.write(&r).unwrap();
    }
    std::fs::write(
        dir.join("spec.moe"),
        "# a synthetic spec\nmodel beta_model {\n  dim = 8\n}\n",
    )
    .unwrap();
}

fn close(a: f64, b: f64, tol: f64) {
    assert!((a - b).abs() <= tol, "{a} vs {b} (tol {tol})");
}

#[test]
fn two_runs_side_by_side() {
    let root = temp_dir("two");
    let (alpha, beta, out) = (root.join("alpha"), root.join("beta"), root.join("out"));
    write_alpha(&alpha);
    write_beta(&beta);
    let runs = load_runs(&[alpha, beta]).unwrap();
    assert_eq!(runs[0].name, "alpha");
    assert_eq!(runs[1].model.as_deref(), Some("beta_model"));
    assert!(
        runs[1].records[4].loss.is_nan(),
        "the null loss of a diverged line reads back as NaN"
    );

    // Summaries against hand-computed values; 1e-9 covers CV²'s 1e-10 guard in the denominator.
    let a = summarize(&runs[0]);
    assert_eq!(a.steps, 100);
    close(a.final_loss, 1.5, 1e-12);
    assert_eq!(a.final_val_loss, Some(2.0));
    close(a.final_val_ppl.unwrap(), 2f64.exp(), 1e-12);
    assert_eq!(a.best_val_loss, Some(2.0));
    let load = a.load.as_ref().unwrap();
    assert_eq!(load.steps_averaged, 1);
    close(load.cv2, (0.08 + 0.5) / 2.0, 1e-9);
    close(load.gini, (0.15 + 0.375) / 2.0, 1e-12);
    close(load.experts_used, 87.5, 1e-12);
    close(load.dropped, 3.0, 1e-12);
    close(a.tokens_per_s.unwrap(), 5500.0, 1e-9); // median of 1000..=10000 step 1000
    let b = summarize(&runs[1]);
    let load = b.load.as_ref().unwrap();
    assert_eq!(load.steps_averaged, 2);
    close(load.cv2, (0.0 + 0.5) / 2.0, 1e-9); // step 19: 0; step 20: (1 + 0) / 2
    close(load.gini, (0.0 + 0.25) / 2.0, 1e-12);
    close(load.experts_used, (100.0 + 75.0) / 2.0, 1e-12);
    assert_eq!(b.best_val_loss, Some(2.4));

    let report = write_report(&runs, &out).unwrap();
    let md = std::fs::read_to_string(&report.markdown).unwrap();
    assert!(md.contains("| run | model | steps | final train loss | final val loss | final val ppl | best val loss | load CV² | Gini | dropped % | experts used % | tokens/s (median) |"), "{md}");
    assert!(md.contains("| alpha | — | 100 | 1.5000 | 2.0000 | 7.39 | 2.0000 | 0.2900 | 0.2625 | 3.00 | 87.5 | 5,500 |"), "{md}");
    assert!(md.contains("| beta | beta_model | 20 | 2.2500 | 2.4000 | 11.02 | 2.4000 | 0.2500 | 0.1250 | 0.00 | 87.5 | 200 |"), "{md}");
    assert_eq!(report.table.lines().count(), 4, "header, rule, two rows");

    let mut expected = vec![
        "loss".to_string(),
        "balance".into(),
        "bias_beta_block0".into(),
    ];
    expected.extend(
        [
            "util_alpha_block1",
            "util_alpha_block3",
            "util_beta_block0",
            "util_beta_block2",
        ]
        .map(String::from),
    );
    assert_eq!(report.plots.len(), 2 * expected.len(), "{:?}", report.plots);
    for stem in &expected {
        let png = std::fs::read(out.join(format!("{stem}.png"))).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{stem}.png is a PNG");
        assert!(png.len() > 5_000, "{stem}.png has {} bytes", png.len());
        let svg = std::fs::read_to_string(out.join(format!("{stem}.svg"))).unwrap();
        assert!(
            svg.contains("<svg") && svg.len() > 2_000,
            "{stem}.svg has {} bytes",
            svg.len()
        );
        assert!(
            md.contains(&format!("({stem}.png)")),
            "report.md embeds {stem}.png"
        );
    }
    // Legends and captions are text in the SVG (and drawn with the built-in font in the PNG).
    let loss_svg = std::fs::read_to_string(out.join("loss.svg")).unwrap();
    assert!(loss_svg.contains("alpha train") && loss_svg.contains("beta val"));
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn bad_inputs_are_errors() {
    let root = temp_dir("errors");
    let missing = root.join("nope");
    assert!(matches!(
        Run::load(&missing),
        Err(ReportError::MissingDir(_))
    ));
    assert!(matches!(
        Run::load(&root),
        Err(ReportError::NoMetrics { .. })
    ));
    let err = Run::load(&root).unwrap_err().to_string();
    assert!(
        err.contains("no metrics log") && err.contains("metrics.jsonl"),
        "{err}"
    );

    let file = root.join("plain.txt");
    std::fs::write(&file, "x").unwrap();
    assert!(matches!(Run::load(&file), Err(ReportError::NotADir(_))));

    std::fs::write(root.join("metrics.jsonl"), "\n").unwrap();
    assert!(matches!(Run::load(&root), Err(ReportError::Empty(_))));

    let good = serde_json::to_string(&Record::new(1, 2.0, 1e-3, 10.0)).unwrap();
    std::fs::write(
        root.join("metrics.jsonl"),
        format!("{good}\n\n{{\"step\": 2, \"loss\": \n"),
    )
    .unwrap();
    let err = Run::load(&root).unwrap_err();
    assert!(
        matches!(err, ReportError::Malformed { line: 3, .. }),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("metrics.jsonl:3: not a metrics record"),
        "{err}"
    );
    std::fs::write(
        root.join("metrics.jsonl"),
        format!("{good}\n{{\"step\": 2}}\n"),
    )
    .unwrap();
    let err = Run::load(&root).unwrap_err().to_string();
    assert!(
        err.contains("metrics.jsonl:2:") && err.contains("loss"),
        "names the missing field: {err}"
    );

    assert!(matches!(load_runs(&[]), Err(ReportError::NoRuns)));
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn cli_reports_and_fails_cleanly() {
    let root = temp_dir("cli");
    let run = root.join("run");
    write_beta(&run);
    let out = root.join("report");
    let ok = Command::new(env!("CARGO_BIN_EXE_moec"))
        .arg("report")
        .arg(&run)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(
        stdout.contains("| run | beta_model | 20 | 2.2500 |"),
        "{stdout}"
    );
    assert!(out.join("report.md").is_file() && out.join("loss.png").is_file());

    let missing = Command::new(env!("CARGO_BIN_EXE_moec"))
        .arg("report")
        .arg(root.join("nope"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success());
    assert!(
        stderr.contains("does not exist") && !stderr.contains("panicked"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&root).unwrap();
}
