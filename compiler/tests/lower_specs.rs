//! Every example spec in `specs/` and `specs/compare/` checks, lowers, and runs in the reference interpreter at batch 1
//! (64 samples for a classifier), giving a finite loss close to ln(V) (ln(classes) for a classifier)
//! at init (tolerance 0.1: a few hundred tokens of a near-uniform model, plus the balancing terms,
//! which are ≈ their coefficients at init).

use moec_compiler::check::check;
use moec_compiler::interp::{init_params, param_feeds, run_outputs, Value};
use moec_compiler::lower::lower;
use std::collections::HashMap;
use std::path::Path;

#[test]
fn example_specs_lower_and_start_near_ln_vocab() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs");
    let mut seen = 0;
    let entries = std::fs::read_dir(&dir)
        .expect("specs/ exists")
        .chain(std::fs::read_dir(dir.join("compare")).expect("specs/compare/ exists"));
    for entry in entries {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("moe") {
            continue;
        }
        let source = std::fs::read_to_string(&path).unwrap();
        let spec = check(&source, &path).unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
        let mut feeds = HashMap::new();
        let (g, vocab) = match (spec.model.inputs, spec.model.classes) {
            // A classifier's ce is per sample, so one sample would be a noisy check: 64 samples with
            // varied features, labels cycling through the classes.
            (Some(n), Some(classes)) => {
                // An lstm classifier reads `context` steps of `inputs` features per sample.
                let n = n * spec.model.context.unwrap_or(1);
                let rows = 64;
                let x = (0..rows * n)
                    .map(|j| ((j * 7 + 3) % 11) as f32 / 5.0 - 1.0)
                    .collect();
                feeds.insert("features".to_string(), Value::F32(x));
                feeds.insert(
                    "targets".to_string(),
                    Value::U32((0..rows as u32).map(|i| i % classes as u32).collect()),
                );
                (lower(&spec, rows), classes)
            }
            _ => {
                let (vocab, t) = (spec.model.vocab.unwrap(), spec.model.context.unwrap());
                let ids: Vec<u32> = (0..t as u32).map(|i| (i * 7 + 3) % vocab as u32).collect();
                feeds.insert(
                    "targets".to_string(),
                    Value::U32(ids.iter().map(|i| (i * 5 + 1) % vocab as u32).collect()),
                );
                feeds.insert("tokens".to_string(), Value::U32(ids));
                (lower(&spec, 1), vocab)
            }
        };
        let g = g.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        feeds.extend(param_feeds(&init_params(&g, 0)));
        // Eval-mode feeds of the routing inputs: no noise, no jitter, fresh router state.
        for (_, name, ty) in g.data_inputs() {
            let fill = if name.starts_with("jitter.") {
                1.0
            } else {
                0.0
            };
            if name.starts_with("noise.")
                || name.starts_with("jitter.")
                || name.starts_with("router_state.")
            {
                feeds.insert(name, Value::F32(vec![fill; ty.numel()]));
            }
        }
        let out = run_outputs(&g, &feeds).unwrap();
        let loss = out["loss"].to_f64()[0];
        let ce = out["ce"].to_f64()[0];
        assert!(loss.is_finite(), "{}: loss {loss}", path.display());
        assert!(
            (ce - (vocab as f64).ln()).abs() < 0.1,
            "{}: ce {ce} vs ln {vocab}",
            path.display()
        );
        assert!(
            loss >= ce && loss - ce < 0.1,
            "{}: balancing terms {}",
            path.display(),
            loss - ce
        );
        seen += 1;
    }
    assert!(seen >= 20, "only {seen} specs found in {}", dir.display());
}
