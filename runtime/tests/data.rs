//! Data sets and the batcher: every error case, file formats, split sizes, determinism and exact
//! resume of the batcher.

use moec_compiler::spec::{Data, SyntheticKind, TokenDtype};
use moec_runtime::data::{Batch, Batcher, BatcherState, DataError, Dataset, FINEWEB_MAGIC_U16, FINEWEB_MAGIC_U32};
use std::path::Path;

fn tokens(path: &str, dtype: TokenDtype) -> Data {
    Data::Tokens { path: path.into(), dtype }
}

fn markov(seed: u64) -> Data {
    Data::Synthetic { kind: SyntheticKind::Markov, seed }
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
    let err = Dataset::load(&Data::Text { path: "nope.txt".into() }, dir.path(), 256, 8, 0.9).unwrap_err();
    assert!(matches!(err, DataError::Read { .. }));
    let msg = err.to_string();
    assert!(msg.contains(&dir.path().join("nope.txt").display().to_string()), "{msg}");
}

#[test]
fn text_is_bytes_and_splits_first_part_train() {
    let dir = tempfile::tempdir().unwrap();
    let text: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(dir.path().join("t.txt"), &text).unwrap();
    let ds = Dataset::load(&Data::Text { path: "t.txt".into() }, dir.path(), 256, 16, 0.9).unwrap();
    assert_eq!(ds.train_tokens().len(), 900);
    assert_eq!(ds.val_tokens().len(), 100);
    assert_eq!(ds.train_tokens()[..5], [0, 1, 2, 3, 4]);
    assert_eq!(ds.val_tokens()[0], 900 % 251);
    assert!(ds.conditional_entropy().is_none());

    let err = Dataset::load(&Data::Text { path: "t.txt".into() }, dir.path(), 100, 16, 0.9).unwrap_err();
    assert!(matches!(err, DataError::TextVocab { vocab: 100 }), "{err}");
}

#[test]
fn too_short_says_which_part_and_how_many() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("t.txt"), vec![b'a'; 100]).unwrap();
    // 100 tokens, split 0.9: train 90, val 10; context 16 needs 17 per part.
    let err = Dataset::load(&Data::Text { path: "t.txt".into() }, dir.path(), 256, 16, 0.9).unwrap_err();
    match &err {
        DataError::TooShort { part, have, needed, total, .. } => {
            assert_eq!((*part, *have, *needed, *total), ("validation", 10, 17, 100));
        }
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains("validation part has 10 tokens"), "{err}");
    let err = Dataset::load(&Data::Text { path: "t.txt".into() }, dir.path(), 256, 16, 0.1).unwrap_err();
    assert!(matches!(err, DataError::TooShort { part: "training", have: 10, .. }), "{err}");
}

#[test]
fn flat_u16_and_u32_files() {
    let dir = tempfile::tempdir().unwrap();
    let toks: Vec<u16> = (0..200).map(|i| (i * 7 % 300) as u16).collect();
    write_u16(&dir.path().join("a.bin"), None, &toks);
    let ds = Dataset::load(&tokens("a.bin", TokenDtype::U16), dir.path(), 300, 8, 0.5).unwrap();
    let all: Vec<u32> = ds.train_tokens().iter().chain(ds.val_tokens()).copied().collect();
    assert_eq!(all, toks.iter().map(|&t| t as u32).collect::<Vec<_>>());
    assert_eq!(ds.train_tokens().len(), 100);

    let wide: Vec<u8> = [70_000u32, 3, 5, 9, 1, 2, 3, 4].iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(dir.path().join("w.bin"), &wide).unwrap();
    let ds = Dataset::load(&tokens("w.bin", TokenDtype::U32), dir.path(), 100_000, 2, 0.5).unwrap();
    assert_eq!(ds.train_tokens(), &[70_000, 3, 5, 9]);
}

#[test]
fn odd_byte_length_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("odd.bin"), [1u8, 0, 2, 0, 3]).unwrap();
    let err = Dataset::load(&tokens("odd.bin", TokenDtype::U16), dir.path(), 300, 1, 0.5).unwrap_err();
    assert!(matches!(err, DataError::Misaligned { bytes: 5, width: 2, .. }), "{err}");
    assert!(err.to_string().contains("5 bytes") && err.to_string().contains("u16"), "{err}");
}

#[test]
fn token_out_of_range_names_position_and_value() {
    let dir = tempfile::tempdir().unwrap();
    write_u16(&dir.path().join("a.bin"), None, &[1, 2, 3, 500, 4, 900, 1, 1]);
    let err = Dataset::load(&tokens("a.bin", TokenDtype::U16), dir.path(), 256, 2, 0.5).unwrap_err();
    assert!(matches!(err, DataError::TokenOutOfRange { position: 3, value: 500, vocab: 256, .. }), "{err}");
    assert!(err.to_string().contains("token 500 at position 3"), "{err}");
}

#[test]
fn fineweb_header_files() {
    let dir = tempfile::tempdir().unwrap();
    let toks: Vec<u16> = (0..64).map(|i| 50_000 + i).collect();
    write_u16(&dir.path().join("fw.bin"), Some((FINEWEB_MAGIC_U16, 1, 64)), &toks);
    let ds = Dataset::load(&tokens("fw.bin", TokenDtype::U16), dir.path(), 50_257, 4, 0.75).unwrap();
    assert_eq!(ds.train_tokens().len(), 48);
    assert_eq!(ds.train_tokens()[0], 50_000);
    assert_eq!(ds.val_tokens()[15], 50_063);

    // Header count disagrees with the body (truncated file).
    write_u16(&dir.path().join("cut.bin"), Some((FINEWEB_MAGIC_U16, 1, 100)), &toks);
    let err = Dataset::load(&tokens("cut.bin", TokenDtype::U16), dir.path(), 50_257, 4, 0.75).unwrap_err();
    assert!(matches!(err, DataError::HeaderCount { header: 100, actual: 64, .. }), "{err}");

    // A u16 shard read as u32, and a u32 (Llama-3) shard read as u16.
    let err = Dataset::load(&tokens("fw.bin", TokenDtype::U32), dir.path(), 50_257, 4, 0.75).unwrap_err();
    assert!(matches!(err, DataError::HeaderDtype { header: "u16", spec: "u32", .. }), "{err}");
    let mut bytes: Vec<u8> = [FINEWEB_MAGIC_U32, 7, 8].iter().chain([0i32; 253].iter()).flat_map(|v| v.to_le_bytes()).collect();
    bytes.extend((0..8u32).flat_map(|v| (100_000 + v).to_le_bytes()));
    std::fs::write(dir.path().join("llama.bin"), &bytes).unwrap();
    let err = Dataset::load(&tokens("llama.bin", TokenDtype::U16), dir.path(), 128_256, 2, 0.5).unwrap_err();
    assert!(matches!(err, DataError::HeaderDtype { header: "u32", .. }), "{err}");
    let ds = Dataset::load(&tokens("llama.bin", TokenDtype::U32), dir.path(), 128_256, 2, 0.5).unwrap();
    assert_eq!(ds.train_tokens(), &[100_000, 100_001, 100_002, 100_003]);

    // Unknown version.
    write_u16(&dir.path().join("v9.bin"), Some((FINEWEB_MAGIC_U16, 9, 64)), &toks);
    let err = Dataset::load(&tokens("v9.bin", TokenDtype::U16), dir.path(), 50_257, 4, 0.75).unwrap_err();
    assert!(matches!(err, DataError::HeaderVersion { version: 9, expected: 1, .. }), "{err}");
}

#[test]
fn classifier_data_is_refused_for_lms() {
    let dir = tempfile::tempdir().unwrap();
    let err = Dataset::load(&Data::Synthetic { kind: SyntheticKind::Classes, seed: 0 }, dir.path(), 256, 8, 0.9).unwrap_err();
    assert!(err.to_string().contains("synthetic(kind = classes)") && err.to_string().contains("mlp"), "{err}");
    let err = Dataset::load(&Data::Cifar10 { dir: "c".into() }, dir.path(), 256, 8, 0.9).unwrap_err();
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
    assert!(h_uni > 3.5 && h_uni <= 64f64.ln() + 1e-12, "unigram {h_uni}");
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
    let empirical: f64 =
        counts.iter().enumerate().filter(|(_, &c)| c > 0).map(|(i, &c)| -(c as f64 / total) * (c as f64 / row[i / 64] as f64).ln()).sum();
    assert!((empirical - h_cond).abs() < 0.01, "empirical {empirical} vs stated {h_cond}");
}

#[test]
fn copy_windows_repeat_their_first_half() {
    let ds = Dataset::load(&Data::Synthetic { kind: SyntheticKind::Copy, seed: 3 }, Path::new("."), 50, 9, 0.9).unwrap();
    // Sequences of 10 tokens: first half 5, then those 5 again; the split is on sequence boundaries.
    assert_eq!(ds.train_tokens().len() % 10, 0);
    assert_eq!(ds.val_tokens().len() % 10, 0);
    let mut batcher = Batcher::new(&ds, 1);
    let batch = batcher.next_train_batch(8);
    for r in 0..8 {
        let mut seq = batch.tokens[r * 9..(r + 1) * 9].to_vec();
        seq.push(batch.targets[r * 9 + 8]);
        assert_eq!(seq[..5], seq[5..], "row {r}: {seq:?}");
    }
    // Targets 1..4 are random (4 of 9): optimal loss 4/9 · ln 50.
    assert!((ds.conditional_entropy().unwrap() - 4.0 / 9.0 * 50f64.ln()).abs() < 1e-12);
}

fn check_shifted(batch: &Batch, rows: usize, context: usize) {
    assert_eq!(batch.tokens.len(), rows * context);
    assert_eq!(batch.targets.len(), rows * context);
    for r in 0..rows {
        for i in 0..context - 1 {
            assert_eq!(batch.tokens[r * context + i + 1], batch.targets[r * context + i]);
        }
    }
}

#[test]
fn batcher_is_deterministic_and_resumes_exactly() {
    let ds = Dataset::load(&markov(1), Path::new("."), 128, 16, 0.9).unwrap();
    let mut a = Batcher::new(&ds, 42);
    let mut b = Batcher::new(&ds, 42);
    let first: Vec<Batch> = (0..3).map(|_| a.next_train_batch(4)).collect();
    for batch in &first {
        check_shifted(batch, 4, 16);
        assert_eq!(*batch, b.next_train_batch(4));
    }
    // Every window comes from the training part: its 17 tokens appear there contiguously.
    let t = ds.train_tokens();
    let row: Vec<u32> = first[0].tokens[..16].iter().chain(&first[0].targets[15..16]).copied().collect();
    assert!(t.windows(17).any(|w| w == row.as_slice()));

    let saved = serde_json::to_string(&a.state()).unwrap();
    let expected: Vec<Batch> = (0..5).map(|_| a.next_train_batch(4)).collect();
    let state: BatcherState = serde_json::from_str(&saved).unwrap();
    let mut resumed = Batcher::new(&ds, 0);
    resumed.restore(&state).unwrap();
    for batch in &expected {
        assert_eq!(*batch, resumed.next_train_batch(4));
    }
    assert_ne!(Batcher::new(&ds, 43).next_train_batch(4), Batcher::new(&ds, 42).next_train_batch(4));

    // A state taken on different data is refused.
    let other = Dataset::load(&markov(1), Path::new("."), 128, 16, 0.8).unwrap();
    let err = Batcher::new(&other, 42).restore(&state).unwrap_err();
    assert!(matches!(err, DataError::StateMismatch { .. }), "{err}");
}

#[test]
fn val_batches_are_fixed_and_span_the_validation_part() {
    let dir = tempfile::tempdir().unwrap();
    let text: Vec<u8> = (0..=255u8).cycle().take(2000).collect();
    std::fs::write(dir.path().join("t.txt"), &text).unwrap();
    let ds = Dataset::load(&Data::Text { path: "t.txt".into() }, dir.path(), 256, 8, 0.9).unwrap();
    let v1 = ds.val_batches(2, 3);
    assert_eq!(v1, ds.val_batches(2, 3));
    assert_eq!(v1.len(), 3);
    for b in &v1 {
        check_shifted(b, 2, 8);
    }
    let val = ds.val_tokens();
    // The first window starts at the start of the validation part, the last ends at its end.
    assert_eq!(v1[0].tokens[..8], val[..8]);
    assert_eq!(v1[2].targets[8..], val[val.len() - 8..]);
}

#[test]
fn in_memory_tokens_are_checked_and_split() {
    let ds = Dataset::from_tokens((0..40).map(|i| i % 10).collect(), "test tokens", 10, 3, 0.5).unwrap();
    assert_eq!((ds.train_tokens().len(), ds.val_tokens().len()), (20, 20));
    let err = Dataset::from_tokens(vec![1, 2, 10], "test tokens", 10, 1, 0.5).unwrap_err();
    assert!(err.to_string().starts_with("test tokens: token 10 at position 2"), "{err}");
}
