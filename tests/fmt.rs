//! `moec fmt`: the shipped specs are in the canonical layout, and on generated specs in any layout
//! (spacing, `;` or newlines, blank lines, comments anywhere they may go, values over several lines,
//! redundant parentheses, blocks and fields in any order) and on damaged copies of the shipped
//! specs, formatting is idempotent, keeps every comment, and never changes what `check` makes of
//! the file.

use moec_compiler::check::check;
use proptest::prelude::*;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};
use std::process::Command;

fn shipped_specs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("specs");
    let mut files = Vec::new();
    for dir in [root.clone(), root.join("compare")] {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|x| x == "moe") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// The checked model of `source`; errors compare equal to each other (their locations move with
/// the layout).
fn checked(source: &str) -> Result<moec_compiler::spec::Spec, ()> {
    check(source, Path::new("generated.moe")).map_err(|_| ())
}

/// The properties every input must have; `comments` are texts that must survive.
fn assert_formats_well(source: &str, comments: &[String]) {
    let once = moec_grammar::format(source)
        .unwrap_or_else(|d| panic!("does not parse:\n{source}\n{}", d.render()));
    let twice = moec_grammar::format(&once).unwrap_or_else(|d| {
        panic!(
            "the formatted text does not parse:\n{once}\n{}\nfrom:\n{source}",
            d.render()
        )
    });
    assert_eq!(
        once, twice,
        "formatting is not idempotent; input:\n{source}"
    );
    assert_eq!(
        checked(source),
        checked(&once),
        "formatting changed the checked spec:\n{source}\n---\n{once}"
    );
    for c in comments {
        assert!(
            once.contains(c.as_str()),
            "comment `{c}` lost:\n{source}\n---\n{once}"
        );
    }
}

#[test]
fn the_shipped_specs_are_in_the_canonical_layout() {
    for path in shipped_specs() {
        let source = std::fs::read_to_string(&path).unwrap();
        let formatted = moec_grammar::format(&source).unwrap();
        assert_eq!(formatted, source, "{} is not formatted", path.display());
        assert_formats_well(&source, &[]);
    }
}

#[test]
fn moec_fmt_check_passes_on_specs_and_fails_on_a_messy_spec() {
    let moec = env!("CARGO_BIN_EXE_moec");
    let specs = Path::new(env!("CARGO_MANIFEST_DIR")).join("specs");
    let out = Command::new(moec)
        .args(["fmt", "--check"])
        .arg(&specs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let messy = dir.path().join("messy.moe");
    let text = "model m{dim=64;layers=2 # two\n vocab=256;heads=4;context=16}\n";
    std::fs::write(&messy, text).unwrap();
    let check = Command::new(moec)
        .args(["fmt", "--check"])
        .arg(&messy)
        .output()
        .unwrap();
    assert!(!check.status.success());
    assert!(String::from_utf8_lossy(&check.stdout).contains("messy.moe is not formatted"));
    assert_eq!(
        std::fs::read_to_string(&messy).unwrap(),
        text,
        "--check writes nothing"
    );

    let fmt = Command::new(moec).arg("fmt").arg(&messy).output().unwrap();
    assert!(fmt.status.success());
    assert_eq!(
        std::fs::read_to_string(&messy).unwrap(),
        "model m {\n  dim = 64\n  layers = 2  # two\n  vocab = 256\n  heads = 4\n  context = 16\n}\n"
    );
}

#[test]
fn a_syntax_error_is_reported_with_its_location() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.moe");
    std::fs::write(&bad, "model m {\n  dim = = 64\n}\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_moec"))
        .arg("fmt")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.moe"));
}

/// Fields a generated spec may have, as (block, name, required, values). Values are written with a
/// space between tokens; [`Writer`] re-spaces them at random.
const FIELDS: &[(&str, &str, bool, &[&str])] = &[
    ("model", "family", false, &["transformer"]),
    ("model", "vocab", true, &["256", "16 * 16", "( 256 )"]),
    (
        "model",
        "dim",
        true,
        &["64", "32 * 2", "128 / 2", "( 16 + 16 ) * 2"],
    ),
    ("model", "layers", true, &["2", "4", "1 + 1"]),
    ("model", "heads", true, &["4", "2"]),
    ("model", "kv_heads", false, &["2", "1"]),
    (
        "model",
        "context",
        true,
        &["16", "8 * ( 1 + 1 )", "32 - 8 - 8"],
    ),
    ("model", "norm", false, &["rmsnorm", "layernorm"]),
    (
        "model",
        "rope_theta",
        false,
        &["10000", "1e4", "500_000", "1E+4"],
    ),
    (
        "model",
        "ffn",
        false,
        &[
            "swiglu ( hidden = 4 * dim )",
            "gelu ( 128 )",
            "relu",
            "relu ( )",
        ],
    ),
    ("model", "tie_embeddings", false, &["true", "false"]),
    ("moe", "experts", true, &["4", "8", "0"]),
    ("moe", "top_k", false, &["1", "2"]),
    (
        "moe",
        "gate",
        false,
        &[
            "softmax",
            "softmax ( renorm = false )",
            "sigmoid",
            "noisy_top_k ( noise = 0.5 )",
            "switch",
            "expert_choice ( capacity = 1.5 )",
            "sinkhorn ( iters = 4 )",
            "auction ( rounds = 3 , epsilon = 1e-3 , budget = 2 , price_rate = 0.1 , )",
        ],
    ),
    (
        "moe",
        "balance",
        false,
        &[
            "aux ( 0.01 ) + z ( c = 0.001 )",
            "none",
            "cv2 ( importance = 0.1 , load = 0 )",
            "bias ( rate = 0.001 ) + seq_aux ( 1e-4 )",
            "aux",
        ],
    ),
    (
        "moe",
        "capacity",
        false,
        &[
            "dropless",
            "factor ( 1.25 , drop = probability )",
            "factor ( 2 )",
        ],
    ),
    ("moe", "groups", false, &["2 x 2", "( 2 ) x 4"]),
    ("moe", "every", false, &["2", "1"]),
    ("moe", "layers", false, &["[ 1 ]", "[ 0 , 1 , ]", "[ ]"]),
    (
        "moe",
        "expert",
        false,
        &["swiglu ( hidden = 64 )", "gelu ( hidden = dim * 2 )"],
    ),
    ("moe", "shared_experts", false, &["1"]),
    ("moe", "jitter", false, &["0.01", "-0.5"]),
    ("moe", "router_precision", false, &["f32"]),
    (
        "train",
        "data",
        true,
        &[
            "synthetic ( kind = markov , seed = 3 )",
            "synthetic ( )",
            "synthetic",
            "text ( \"in#put.txt\" )",
        ],
    ),
    ("train", "batch", true, &["2", "4"]),
    ("train", "steps", true, &["10", "1_000"]),
    (
        "train",
        "optimizer",
        false,
        &[
            "adamw ( lr = 1e-3 , betas = ( 0.9 , 0.95 ) , weight_decay = 0.1 )",
            "sgd ( lr = 0.1 , momentum = 0.9 )",
            "adafactor",
            "schedule_free_adamw ( lr = - - 0.002 )",
        ],
    ),
    (
        "train",
        "schedule",
        false,
        &[
            "cosine ( warmup = 2 , min_lr = 1e-5 )",
            "linear ( warmup = 1 )",
            "constant",
        ],
    ),
    ("train", "clip", false, &["1.0", "none"]),
    ("train", "seed", false, &["18446744073709551615", "7"]),
    ("train", "eval", false, &["every ( 5 , batches = 2 )"]),
    ("train", "log", false, &["every ( 1 )"]),
    (
        "train",
        "expert_lr",
        false,
        &["1e-3", "adaptive ( base = 1e-3 )"],
    ),
];

/// Writes a random layout of a random spec, recording the comments it puts in.
struct Writer {
    rng: ChaCha8Rng,
    comments: Vec<String>,
}

impl Writer {
    fn comment(&mut self) -> String {
        let text = format!("# note {} (x = 1; {{ }})", self.comments.len());
        self.comments.push(text.clone());
        text
    }

    /// Space between two tokens; a line break (maybe after a comment) where the grammar allows one:
    /// after an opening bracket, a comma, a binary operator, `x` or a keyword argument's `=`, and
    /// before a closing bracket or a comma.
    fn glue(&mut self, before: &str, after: &str) -> String {
        let breakable = matches!(before, "(" | "[" | "," | "+" | "*" | "/" | "x" | "=")
            || matches!(after, ")" | "]" | ",");
        let wordy = |t: &str| {
            t.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.\"#".contains(c))
        };
        match self.rng.random_range(0..6) {
            0 if breakable => "\n    ".to_string(),
            1 if breakable => format!("  {}\n", self.comment()),
            2 | 3 if !(wordy(before) && wordy(after)) => String::new(),
            4 => "  ".to_string(),
            _ => " ".to_string(),
        }
    }

    fn value(&mut self, spaced: &str) -> String {
        let tokens: Vec<&str> = spaced.split(' ').filter(|t| !t.is_empty()).collect();
        let mut out = tokens[0].to_string();
        for pair in tokens.windows(2) {
            // A unary minus is followed by its operand on the same line (and a binary one here too).
            let glue = if pair[0] == "-" {
                " ".to_string()
            } else {
                self.glue(pair[0], pair[1])
            };
            out.push_str(&glue);
            out.push_str(pair[1]);
        }
        out
    }

    /// Between two members of a block (or after the last): a newline or `;`, maybe with comments
    /// and blank lines.
    fn separator(&mut self) -> String {
        match self.rng.random_range(0..7) {
            0 => ";".to_string(),
            1 => "; ".to_string(),
            2 => "\n\n\n".to_string(),
            3 => format!("  {}\n", self.comment()),
            4 => format!("\n{}\n\n", self.comment()),
            _ => "\n".to_string(),
        }
    }

    fn block(&mut self, header: &str, mut members: Vec<String>) -> String {
        members.shuffle(&mut self.rng);
        let mut out = format!("{header}{}{{", [" ", "", "  "][self.rng.random_range(0..3)]);
        out.push_str(["\n", " ", "", "\n\n"][self.rng.random_range(0..4)]);
        if self.rng.random_bool(0.3) {
            out.push_str(&format!("{}\n", self.comment()));
        }
        let n = members.len();
        for (i, m) in members.into_iter().enumerate() {
            out.push_str(&m);
            if i + 1 < n || self.rng.random_bool(0.5) {
                out.push_str(&self.separator());
            }
        }
        if self.rng.random_bool(0.2) {
            out.push_str(&format!("\n{}\n", self.comment()));
        }
        out.push('}');
        out
    }

    fn fields(&mut self, block: &str) -> Vec<String> {
        let mut out = Vec::new();
        for (b, name, required, values) in FIELDS {
            if *b != block || !(*required || self.rng.random_bool(0.4)) {
                continue;
            }
            let value = values[self.rng.random_range(0..values.len())];
            let eq = ["=", " = ", " =  ", "= "][self.rng.random_range(0..4)];
            out.push(format!("{name}{eq}{}", self.value(value)));
        }
        out
    }

    fn spec(&mut self) -> String {
        let mut model = self.fields("model");
        if self.rng.random_bool(0.8) {
            let moe = self.fields("moe");
            model.push(self.block("moe", moe));
        }
        let mut tops = vec![self.block("model generated-1.x", model)];
        if self.rng.random_bool(0.8) {
            let train = self.fields("train");
            tops.push(self.block("train", train));
        }
        tops.shuffle(&mut self.rng);
        let mut out = String::new();
        if self.rng.random_bool(0.5) {
            out.push_str(&format!("{}\n\n", self.comment()));
        }
        for t in tops {
            out.push_str(&t);
            out.push_str(&self.separator());
        }
        if self.rng.random_bool(0.3) {
            out.push_str(&self.comment());
        }
        out
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn formatting_generated_specs_is_idempotent_and_keeps_the_spec(seed in any::<u64>()) {
        let mut w = Writer { rng: ChaCha8Rng::seed_from_u64(seed), comments: Vec::new() };
        let source = w.spec();
        assert_formats_well(&source, &w.comments);
    }

    /// Damaged shipped specs (a deleted character, a duplicated line): whatever still parses
    /// formats idempotently and to the same check result.
    #[test]
    fn formatting_damaged_specs_is_idempotent_and_keeps_the_spec(
        file in 0usize..64, at in any::<prop::sample::Index>(), duplicate in any::<bool>()
    ) {
        let files = shipped_specs();
        let source = std::fs::read_to_string(&files[file % files.len()]).unwrap();
        let damaged = if duplicate {
            let lines: Vec<&str> = source.lines().collect();
            let i = at.index(lines.len());
            let mut out = lines[..=i].join("\n");
            out.push('\n');
            out.push_str(&lines[i..].join("\n"));
            out
        } else {
            let i = at.index(source.len());
            let mut out = source.clone();
            if out.is_char_boundary(i) && out.is_char_boundary(i + 1) {
                out.remove(i);
            }
            out
        };
        if moec_grammar::parse(&damaged).is_ok() {
            assert_formats_well(&damaged, &[]);
        }
    }
}

/// `editors/vscode-moe` installs as a VS Code extension: its manifest names `.moe` files and a
/// TextMate grammar that exists and is JSON with the same scope.
#[test]
fn the_editor_extension_is_well_formed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("editors/vscode-moe");
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    };
    let package = read(&dir.join("package.json"));
    let language = &package["contributes"]["languages"][0];
    assert_eq!(language["extensions"][0], ".moe");
    read(&dir.join(language["configuration"].as_str().unwrap()));
    let grammar = &package["contributes"]["grammars"][0];
    let tm = read(&dir.join(grammar["path"].as_str().unwrap()));
    assert_eq!(tm["scopeName"], grammar["scopeName"]);
    assert_eq!(grammar["language"], language["id"]);
}
