//! Data sets and the batcher: every error case, file formats (token files, CIFAR-10 batches), split
//! sizes, determinism of the generators and exact resume of the batcher.

use moec_compiler::spec::{Data, SyntheticKind, TokenDtype};
use moec_runtime::data::{
    class_clusters, Batch, Batcher, BatcherState, DataError, Dataset, Samples, TrainData,
    CIFAR_TEST_FILE, CIFAR_TRAIN_FILES, CLASS_SAMPLES, FINEWEB_MAGIC_U16, FINEWEB_MAGIC_U32,
};
use std::path::Path;

/// The tokens and targets of a language-model batch.
fn lm(batch: &Batch) -> (&[u32], &[u32]) {
    match batch {
        Batch::Tokens { tokens, targets } => (tokens, targets),
        Batch::Samples { .. } => panic!("expected a token batch"),
    }
}

/// The features and labels of a classifier batch.
fn samples(batch: &Batch) -> (&[f32], &[u32]) {
    match batch {
        Batch::Samples { features, targets } => (features, targets),
        Batch::Tokens { .. } => panic!("expected a sample batch"),
    }
}

fn tokens(path: &str, dtype: TokenDtype) -> Data {
    Data::Tokens {
        path: path.into(),
        dtype,
    }
}

fn markov(seed: u64) -> Data {
    Data::Synthetic {
        kind: SyntheticKind::Markov,
        seed,
    }
}

fn write_u16(path: &Path, header: Option<(i32, i32, i32)>, toks: &[u16]) {
    let mut bytes = Vec::new();
    if let Some((magic, version, count)) = header {
        let mut h = [0i32; 256];
        h[0] = magic;
        h[1] = version;
        h[2] = count;
        bytes.extend(h.iter().flat_map(|v| v.to_le_bytes()));
    }
    bytes.extend(toks.iter().flat_map(|v| v.to_le_bytes()));
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn missing_file_names_the_resolved_path() {
    let dir = tempfile::tempdir().unwrap();
    let err = Dataset::load(
        &Data::Text {
            path: "nope.txt".into(),
        },
        dir.path(),
        256,
        8,
        0.9,
    )
    .unwrap_err();
    assert!(matches!(err, DataError::Read { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains(&dir.path().join("nope.txt").display().to_string()),
        "{msg}"
    );
}

#[test]
fn text_is_bytes_and_splits_first_part_train() {
    let dir = tempfile::tempdir().unwrap();
    let text: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(dir.path().join("t.txt"), &text).unwrap();
    let ds = Dataset::load(
        &Data::Text {
            path: "t.txt".into(),
        },
        dir.path(),
        256,
        16,
        0.9,
    )
    .unwrap();
    assert_eq!(ds.train_tokens().len(), 900);
    assert_eq!(ds.val_tokens().len(), 100);
    assert_eq!(ds.train_tokens()[..5], [0, 1, 2, 3, 4]);
    assert_eq!(ds.val_tokens()[0], 900 % 251);
    assert!(ds.conditional_entropy().is_none());

    let err = Dataset::load(
        &Data::Text {
            path: "t.txt".into(),
        },
        dir.path(),
        100,
        16,
        0.9,
    )
    .unwrap_err();
    assert!(matches!(err, DataError::TextVocab { vocab: 100 }), "{err}");
}

#[test]
fn too_short_says_which_part_and_how_many() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("t.txt"), vec![b'a'; 100]).unwrap();
    // 100 tokens, split 0.9: train 90, val 10; context 16 needs 17 per part.
    let err = Dataset::load(
        &Data::Text {
            path: "t.txt".into(),
        },
        dir.path(),
        256,
        16,
        0.9,
    )
    .unwrap_err();
    match &err {
        DataError::TooShort {
            part,
            have,
            needed,
            total,
            ..
        } => {
            assert_eq!((*part, *have, *needed, *total), ("validation", 10, 17, 100));
        }
        other => panic!("{other}"),
    }
    assert!(
        err.to_string().contains("validation part has 10 tokens"),
        "{err}"
    );
    let err = Dataset::load(
        &Data::Text {
            path: "t.txt".into(),
        },
        dir.path(),
        256,
        16,
        0.1,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            DataError::TooShort {
                part: "training",
                have: 10,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn flat_u16_and_u32_files() {
    let dir = tempfile::tempdir().unwrap();
    let toks: Vec<u16> = (0..200).map(|i| (i * 7 % 300) as u16).collect();
    write_u16(&dir.path().join("a.bin"), None, &toks);
    let ds = Dataset::load(&tokens("a.bin", TokenDtype::U16), dir.path(), 300, 8, 0.5).unwrap();
    let all: Vec<u32> = ds
        .train_tokens()
        .iter()
        .chain(ds.val_tokens())
        .copied()
        .collect();
    assert_eq!(all, toks.iter().map(|&t| t as u32).collect::<Vec<_>>());
    assert_eq!(ds.train_tokens().len(), 100);

    let wide: Vec<u8> = [70_000u32, 3, 5, 9, 1, 2, 3, 4]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    std::fs::write(dir.path().join("w.bin"), &wide).unwrap();
    let ds = Dataset::load(
        &tokens("w.bin", TokenDtype::U32),
        dir.path(),
        100_000,
        2,
        0.5,
    )
    .unwrap();
    assert_eq!(ds.train_tokens(), &[70_000, 3, 5, 9]);
}

#[test]
fn odd_byte_length_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("odd.bin"), [1u8, 0, 2, 0, 3]).unwrap();
    let err =
        Dataset::load(&tokens("odd.bin", TokenDtype::U16), dir.path(), 300, 1, 0.5).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::Misaligned {
                bytes: 5,
                width: 2,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("5 bytes") && err.to_string().contains("u16"),
        "{err}"
    );
}

#[test]
fn token_out_of_range_names_position_and_value() {
    let dir = tempfile::tempdir().unwrap();
    write_u16(
        &dir.path().join("a.bin"),
        None,
        &[1, 2, 3, 500, 4, 900, 1, 1],
    );
    let err =
        Dataset::load(&tokens("a.bin", TokenDtype::U16), dir.path(), 256, 2, 0.5).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::TokenOutOfRange {
                position: 3,
                value: 500,
                vocab: 256,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("token 500 at position 3"), "{err}");
}

/// A directory holding `NAME` (a u16 FineWeb shard of the 64 tokens 50 000..50 063) with header
/// `version` and token count `count`, and the result of loading it as `dtype` (vocab 50 257,
/// context 4, 75 % train).
fn load_fineweb_u16(
    name: &str,
    version: i32,
    count: i32,
    dtype: TokenDtype,
) -> Result<Dataset, DataError> {
    let dir = tempfile::tempdir().unwrap();
    let toks: Vec<u16> = (0..64).map(|i| 50_000 + i).collect();
    write_u16(
        &dir.path().join(name),
        Some((FINEWEB_MAGIC_U16, version, count)),
        &toks,
    );
    Dataset::load(&tokens(name, dtype), dir.path(), 50_257, 4, 0.75)
}

#[test]
fn fineweb_header_files() {
    let ds = load_fineweb_u16("fw.bin", 1, 64, TokenDtype::U16).unwrap();
    assert_eq!(ds.train_tokens().len(), 48);
    assert_eq!(ds.train_tokens()[0], 50_000);
    assert_eq!(ds.val_tokens()[15], 50_063);
}

#[test]
fn fineweb_header_count_must_match_the_body() {
    // A truncated file: the header counts more tokens than follow it.
    let err = load_fineweb_u16("cut.bin", 1, 100, TokenDtype::U16).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::HeaderCount {
                header: 100,
                actual: 64,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn fineweb_header_dtype_must_match_the_spec() {
    // A u16 shard read as u32, and a u32 (Llama-3) shard read as u16.
    let err = load_fineweb_u16("fw.bin", 1, 64, TokenDtype::U32).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::HeaderDtype {
                header: "u16",
                spec: "u32",
                ..
            }
        ),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let mut bytes: Vec<u8> = [FINEWEB_MAGIC_U32, 7, 8]
        .iter()
        .chain([0i32; 253].iter())
        .flat_map(|v| v.to_le_bytes())
        .collect();
    bytes.extend((0..8u32).flat_map(|v| (100_000 + v).to_le_bytes()));
    std::fs::write(dir.path().join("llama.bin"), &bytes).unwrap();
    let err = Dataset::load(
        &tokens("llama.bin", TokenDtype::U16),
        dir.path(),
        128_256,
        2,
        0.5,
    )
    .unwrap_err();
    assert!(
        matches!(err, DataError::HeaderDtype { header: "u32", .. }),
        "{err}"
    );
    let ds = Dataset::load(
        &tokens("llama.bin", TokenDtype::U32),
        dir.path(),
        128_256,
        2,
        0.5,
    )
    .unwrap();
    assert_eq!(ds.train_tokens(), &[100_000, 100_001, 100_002, 100_003]);
}

#[test]
fn fineweb_header_version_is_checked() {
    let err = load_fineweb_u16("v9.bin", 9, 64, TokenDtype::U16).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::HeaderVersion {
                version: 9,
                expected: 1,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn classifier_data_is_refused_for_lms() {
    let dir = tempfile::tempdir().unwrap();
    let err = Dataset::load(
        &Data::Synthetic {
            kind: SyntheticKind::Classes,
            seed: 0,
        },
        dir.path(),
        256,
        8,
        0.9,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("synthetic(kind = classes)") && err.to_string().contains("mlp"),
        "{err}"
    );
    let err =
        Dataset::load(&Data::Cifar10 { dir: "c".into() }, dir.path(), 256, 8, 0.9).unwrap_err();
    assert!(matches!(err, DataError::NotForLm { .. }), "{err}");
}

#[test]
fn markov_is_deterministic_and_predictable() {
    let here = Path::new(".");
    let a = Dataset::load(&markov(7), here, 64, 32, 0.9).unwrap();
    let b = Dataset::load(&markov(7), here, 64, 32, 0.9).unwrap();
    let c = Dataset::load(&markov(8), here, 64, 32, 0.9).unwrap();
    assert_eq!(a.train_tokens(), b.train_tokens());
    assert_ne!(a.train_tokens()[..1000], c.train_tokens()[..1000]);
    let n = a.train_tokens().len() + a.val_tokens().len();
    assert_eq!(a.train_tokens().len(), (n as f64 * 0.9).floor() as usize);

    let h_uni = a.unigram_entropy();
    let h_cond = a.conditional_entropy().unwrap();
    // Every token is visited (the chain is irreducible), so the unigram entropy is near ln 64 = 4.16,
    // while each row has 4 successors: H(next | cur) <= ln 4 = 1.39.
    assert!(
        h_uni > 3.5 && h_uni <= 64f64.ln() + 1e-12,
        "unigram {h_uni}"
    );
    assert!(h_cond > 0.5 && h_cond < 4f64.ln(), "conditional {h_cond}");

    // The stated conditional entropy matches the empirical bigram entropy of the sample (~940k
    // transitions over 256 bigrams: sampling error well under 0.01 nats).
    let t = a.train_tokens();
    let mut counts = vec![0u64; 64 * 64];
    let mut row = vec![0u64; 64];
    for w in t.windows(2) {
        counts[w[0] as usize * 64 + w[1] as usize] += 1;
        row[w[0] as usize] += 1;
    }
    let total = (t.len() - 1) as f64;
    let empirical: f64 = counts
        .iter()
        .enumerate()
        .filter(|(_, &c)| c > 0)
        .map(|(i, &c)| -(c as f64 / total) * (c as f64 / row[i / 64] as f64).ln())
        .sum();
    assert!(
        (empirical - h_cond).abs() < 0.01,
        "empirical {empirical} vs stated {h_cond}"
    );
}

#[test]
fn copy_windows_repeat_their_first_half() {
    let ds = Dataset::load(
        &Data::Synthetic {
            kind: SyntheticKind::Copy,
            seed: 3,
        },
        Path::new("."),
        50,
        9,
        0.9,
    )
    .unwrap();
    // Sequences of 10 tokens: first half 5, then those 5 again; the split is on sequence boundaries.
    assert_eq!(ds.train_tokens().len() % 10, 0);
    assert_eq!(ds.val_tokens().len() % 10, 0);
    let data = TrainData::Tokens(ds.clone());
    let mut batcher = Batcher::new(&data, 1);
    let batch = batcher.next_train_batch(8);
    let (tokens, targets) = lm(&batch);
    for r in 0..8 {
        let mut seq = tokens[r * 9..(r + 1) * 9].to_vec();
        seq.push(targets[r * 9 + 8]);
        assert_eq!(seq[..5], seq[5..], "row {r}: {seq:?}");
    }
    // Targets 1..4 are random (4 of 9): optimal loss 4/9 · ln 50.
    assert!((ds.conditional_entropy().unwrap() - 4.0 / 9.0 * 50f64.ln()).abs() < 1e-12);
}

fn check_shifted(batch: &Batch, rows: usize, context: usize) {
    let (tokens, targets) = lm(batch);
    assert_eq!(tokens.len(), rows * context);
    assert_eq!(targets.len(), rows * context);
    for r in 0..rows {
        for i in 0..context - 1 {
            assert_eq!(tokens[r * context + i + 1], targets[r * context + i]);
        }
    }
}

#[test]
fn batcher_is_deterministic_and_resumes_exactly() {
    let ds = Dataset::load(&markov(1), Path::new("."), 128, 16, 0.9).unwrap();
    let t = ds.train_tokens().to_vec();
    let ds = TrainData::Tokens(ds);
    let mut a = Batcher::new(&ds, 42);
    let mut b = Batcher::new(&ds, 42);
    let first: Vec<Batch> = (0..3).map(|_| a.next_train_batch(4)).collect();
    for batch in &first {
        check_shifted(batch, 4, 16);
        assert_eq!(*batch, b.next_train_batch(4));
    }
    // Every window comes from the training part: its 17 tokens appear there contiguously.
    let (tokens, targets) = lm(&first[0]);
    let row: Vec<u32> = tokens[..16]
        .iter()
        .chain(&targets[15..16])
        .copied()
        .collect();
    assert!(t.windows(17).any(|w| w == row.as_slice()));

    let saved = serde_json::to_string(&a.state()).unwrap();
    let expected: Vec<Batch> = (0..5).map(|_| a.next_train_batch(4)).collect();
    let state: BatcherState = serde_json::from_str(&saved).unwrap();
    let mut resumed = Batcher::new(&ds, 0);
    resumed.restore(&state).unwrap();
    for batch in &expected {
        assert_eq!(*batch, resumed.next_train_batch(4));
    }
    assert_ne!(
        Batcher::new(&ds, 43).next_train_batch(4),
        Batcher::new(&ds, 42).next_train_batch(4)
    );

    // A state taken on different data is refused.
    let other = TrainData::Tokens(Dataset::load(&markov(1), Path::new("."), 128, 16, 0.8).unwrap());
    let err = Batcher::new(&other, 42).restore(&state).unwrap_err();
    assert!(matches!(err, DataError::StateMismatch { .. }), "{err}");
}

#[test]
fn val_batches_are_fixed_and_span_the_validation_part() {
    let dir = tempfile::tempdir().unwrap();
    let text: Vec<u8> = (0..=255u8).cycle().take(2000).collect();
    std::fs::write(dir.path().join("t.txt"), &text).unwrap();
    let ds = Dataset::load(
        &Data::Text {
            path: "t.txt".into(),
        },
        dir.path(),
        256,
        8,
        0.9,
    )
    .unwrap();
    let v1 = ds.val_batches(2, 3);
    assert_eq!(v1, ds.val_batches(2, 3));
    assert_eq!(v1.len(), 3);
    for b in &v1 {
        check_shifted(b, 2, 8);
    }
    let val = ds.val_tokens();
    // The first window starts at the start of the validation part, the last ends at its end.
    assert_eq!(lm(&v1[0]).0[..8], val[..8]);
    assert_eq!(lm(&v1[2]).1[8..], val[val.len() - 8..]);
}

#[test]
fn in_memory_tokens_are_checked_and_split() {
    let ds =
        Dataset::from_tokens((0..40).map(|i| i % 10).collect(), "test tokens", 10, 3, 0.5).unwrap();
    assert_eq!((ds.train_tokens().len(), ds.val_tokens().len()), (20, 20));
    let err = Dataset::from_tokens(vec![1, 2, 10], "test tokens", 10, 1, 0.5).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("test tokens: token 10 at position 2"),
        "{err}"
    );
}

fn classes(seed: u64) -> Data {
    Data::Synthetic {
        kind: SyntheticKind::Classes,
        seed,
    }
}

/// Nearest-class-mean accuracy on the validation part with means from the training part: a
/// linear classifier, the yardstick for "overlapping but learnable".
fn nearest_mean_accuracy(s: &Samples) -> f64 {
    let (d, k, cut) = (s.inputs(), s.classes(), s.train_labels().len());
    let mut means = vec![0.0f64; k * d];
    let mut counts = vec![0usize; k];
    for (i, &l) in s.train_labels().iter().enumerate() {
        counts[l as usize] += 1;
        for (m, x) in means[l as usize * d..][..d].iter_mut().zip(s.features(i)) {
            *m += x as f64;
        }
    }
    for (c, &n) in counts.iter().enumerate() {
        means[c * d..][..d].iter_mut().for_each(|m| *m /= n as f64);
    }
    let correct = s
        .val_labels()
        .iter()
        .enumerate()
        .filter(|(j, &l)| {
            let x = s.features(cut + j);
            let dist = |c: usize| -> f64 {
                means[c * d..][..d]
                    .iter()
                    .zip(&x)
                    .map(|(m, &v)| (m - v as f64).powi(2))
                    .sum()
            };
            (0..k).min_by(|&a, &b| dist(a).total_cmp(&dist(b))) == Some(l as usize)
        })
        .count();
    correct as f64 / s.val_labels().len() as f64
}

#[test]
fn synthetic_classes_are_deterministic_split_and_learnable() {
    let here = Path::new(".");
    let a = Samples::load(&classes(3), here, 32, 10, 0.9).unwrap();
    let b = Samples::load(&classes(3), here, 32, 10, 0.9).unwrap();
    let c = Samples::load(&classes(4), here, 32, 10, 0.9).unwrap();
    // Positional split of CLASS_SAMPLES samples.
    assert_eq!(CLASS_SAMPLES, 20_000);
    assert_eq!(
        (a.train_labels().len(), a.val_labels().len()),
        (18_000, 2_000)
    );
    assert_eq!(a.train_labels(), b.train_labels());
    assert_eq!(a.features(123), b.features(123));
    assert_eq!(a.features(19_999), b.features(19_999));
    assert_ne!(a.features(0), c.features(0));
    assert_eq!(a.features(0).len(), 32);
    // The generator itself: the same seed gives the same arrays, and the data set is exactly them.
    let (f, l) = class_clusters(32, 10, CLASS_SAMPLES, 3);
    assert_eq!(l[..18_000], *a.train_labels());
    assert_eq!(f[18_000 * 32..18_001 * 32], a.features(18_000)[..]);
    // Labels uniform over the 10 classes: each within 5 standard deviations of 2000 (sd ≈ 42).
    let mut counts = [0usize; 10];
    l.iter().for_each(|&c| counts[c as usize] += 1);
    assert!(
        counts.iter().all(|&n| n.abs_diff(2_000) < 212),
        "{counts:?}"
    );
    assert!(
        (a.label_entropy() - 10f64.ln()).abs() < 0.01,
        "{}",
        a.label_entropy()
    );
    // Features have unit variance by construction ((1 + σ²) / (1 + σ²) in expectation; the 40
    // centres are a small sample of N(0, 1), so the tolerance is loose).
    let var = f.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / f.len() as f64;
    assert!((var - 1.0).abs() < 0.15, "E[x²] = {var}");
    // Overlapping but learnable: a linear classifier is far above chance (10%) and far below 100%.
    let acc = nearest_mean_accuracy(&a);
    eprintln!("synthetic classes (32 inputs, 10 classes): nearest-class-mean accuracy {acc:.3}");
    assert!((0.3..0.9).contains(&acc), "nearest-mean accuracy {acc}");

    let err = Samples::load(&classes(3), here, 32, 10, 1.0).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::EmptyPart {
                part: "validation",
                ..
            }
        ),
        "{err}"
    );
    let err = Samples::load(&classes(3), here, 32, 1, 0.9).unwrap_err();
    assert!(err.to_string().contains("classes = 1"), "{err}");
    let err = Samples::load(&markov(1), here, 32, 10, 0.9).unwrap_err();
    assert!(
        matches!(err, DataError::NotForClassifier { .. })
            && err.to_string().contains("synthetic(kind = markov)"),
        "{err}"
    );
}

#[test]
fn sample_batches_are_fixed_seeded_and_resume_exactly() {
    let s = Samples::load(&classes(1), Path::new("."), 4, 3, 0.9).unwrap();
    let cut = s.train_labels().len();
    let val = s.val_batches(5, 2);
    assert_eq!(val, s.val_batches(5, 2));
    let (features, labels) = samples(&val[0]);
    assert_eq!((features.len(), labels.len()), (20, 5));
    // The first validation row is the first validation sample; the last row the last one.
    assert_eq!(features[..4], s.features(cut)[..]);
    assert_eq!(labels[0], s.val_labels()[0]);
    assert_eq!(samples(&val[1]).0[16..], s.features(CLASS_SAMPLES - 1)[..]);

    let data = TrainData::Samples(s.clone());
    assert_eq!(
        (
            data.train_len(),
            data.val_len(),
            data.targets_per_row(),
            data.unit()
        ),
        (18_000, 2_000, 1, "samples")
    );
    let mut a = Batcher::new(&data, 9);
    let first = a.next_train_batch(6);
    assert_eq!(first, Batcher::new(&data, 9).next_train_batch(6));
    assert_ne!(first, Batcher::new(&data, 10).next_train_batch(6));
    // Every row is a training sample, features and label together.
    let (features, labels) = samples(&first);
    for (row, &label) in features.chunks(4).zip(labels) {
        let i = (0..cut)
            .find(|&i| s.features(i) == row)
            .expect("a training sample");
        assert_eq!(s.train_labels()[i], label);
    }
    let state = a.state();
    assert_eq!(state.train_tokens, 18_000);
    let expected: Vec<Batch> = (0..3).map(|_| a.next_train_batch(6)).collect();
    let mut resumed = Batcher::new(&data, 0);
    resumed.restore(&state).unwrap();
    for batch in &expected {
        assert_eq!(*batch, resumed.next_train_batch(6));
    }
}

/// Writes one CIFAR-10 batch file: record `r` has label `labels[r]` and pixel `k` = (r·7 + k) mod 256.
fn write_cifar(path: &Path, labels: &[u8]) {
    let mut bytes = Vec::new();
    for (r, &l) in labels.iter().enumerate() {
        bytes.push(l);
        bytes.extend((0..3072).map(|k| ((r * 7 + k) % 256) as u8));
    }
    std::fs::write(path, bytes).unwrap();
}

fn cifar_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("c")).unwrap();
    for (i, f) in CIFAR_TRAIN_FILES.iter().enumerate() {
        write_cifar(&dir.path().join("c").join(f), &[i as u8, 9 - i as u8]);
    }
    write_cifar(&dir.path().join("c").join(CIFAR_TEST_FILE), &[7, 0, 3]);
    dir
}

#[test]
fn cifar10_batches_read_with_their_own_split_and_scaled_pixels() {
    let dir = cifar_dir();
    let data = Data::Cifar10 { dir: "c".into() };
    // `split` does not apply: the five data batches train, the test batch validates.
    let s = Samples::load(&data, dir.path(), 3072, 10, 0.5).unwrap();
    assert_eq!(s.train_labels(), &[0, 9, 1, 8, 2, 7, 3, 6, 4, 5]);
    assert_eq!(s.val_labels(), &[7, 0, 3]);
    // Pixels are byte / 255: record 1 of data_batch_1 starts at byte 7; byte 255 is exactly 1.
    let x = s.features(1);
    assert_eq!(x.len(), 3072);
    assert_eq!(x[0], 7.0 / 255.0);
    assert_eq!(x[248], 1.0);
    assert_eq!(x[249], 0.0);
    assert_eq!(s.features(10)[5], 5.0 / 255.0);
    assert!(s.description().contains("cifar10"), "{}", s.description());
    let val = s.val_batches(3, 1);
    let (features, labels) = samples(&val[0]);
    assert_eq!(labels, &[7, 0, 3]);
    assert_eq!(features[3072 + 1], 8.0 / 255.0);
}

#[test]
fn cifar10_errors_name_the_problem() {
    let dir = cifar_dir();
    let data = Data::Cifar10 { dir: "c".into() };
    let err = Samples::load(&data, dir.path(), 3000, 10, 0.9).unwrap_err();
    assert!(
        err.to_string().contains("inputs = 3000") && err.to_string().contains("inputs = 3072"),
        "{err}"
    );
    let err = Samples::load(&data, dir.path(), 3072, 100, 0.9).unwrap_err();
    assert!(
        err.to_string().contains("classes = 100") && err.to_string().contains("classes = 10"),
        "{err}"
    );
    let err = Samples::load(
        &Data::Cifar10 {
            dir: "nowhere".into(),
        },
        dir.path(),
        3072,
        10,
        0.9,
    )
    .unwrap_err();
    assert!(
        matches!(err, DataError::CifarMissing { .. })
            && err
                .to_string()
                .contains("data_batch_1.bin, data_batch_2.bin"),
        "{err}"
    );

    std::fs::remove_file(dir.path().join("c").join(CIFAR_TEST_FILE)).unwrap();
    let err = Samples::load(&data, dir.path(), 3072, 10, 0.9).unwrap_err();
    assert!(err.to_string().contains("lacks test_batch.bin;"), "{err}");

    write_cifar(&dir.path().join("c").join(CIFAR_TEST_FILE), &[1, 10]);
    let err = Samples::load(&data, dir.path(), 3072, 10, 0.9).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::LabelOutOfRange {
                value: 10,
                position: 11,
                ..
            }
        ),
        "{err}"
    );

    let bad = dir.path().join("c").join(CIFAR_TRAIN_FILES[2]);
    std::fs::write(&bad, vec![0u8; 3073 * 2 - 1]).unwrap();
    let err = Samples::load(&data, dir.path(), 3072, 10, 0.9).unwrap_err();
    assert!(
        matches!(err, DataError::CifarRecords { bytes: 6145, .. })
            && err.to_string().contains("data_batch_3.bin"),
        "{err}"
    );

    let err = Samples::load(
        &Data::Text {
            path: "t.txt".into(),
        },
        dir.path(),
        3072,
        10,
        0.9,
    )
    .unwrap_err();
    assert!(matches!(err, DataError::NotForClassifier { .. }), "{err}");
}

#[test]
fn train_data_follows_the_model_family() {
    let check = |text: &str| moec_compiler::check::check(text, Path::new("spec.moe")).unwrap();
    let mlp = check("model c {\n family = mlp; inputs = 8; classes = 3; dim = 16; layers = 1\n}\ntrain { data = synthetic(kind = classes, seed = 2); batch = 4; steps = 3 }\n");
    let train = mlp.train.as_ref().unwrap();
    let data = TrainData::load(&train.data, Path::new("."), &mlp.model, train.split).unwrap();
    assert!(matches!(&data, TrainData::Samples(s) if s.inputs() == 8 && s.classes() == 3));
    assert_eq!(data.description(), "synthetic(kind = classes, seed = 2)");
    assert!(data.conditional_entropy().is_none());
    assert!((data.unigram_entropy() - 3f64.ln()).abs() < 0.01);

    let mut model = mlp.model.clone();
    model.classes = None;
    let err = TrainData::load(&train.data, Path::new("."), &model, train.split).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the `mlp` model has no `classes`, which its data needs"
    );
}
