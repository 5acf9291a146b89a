//! docs/language.md is the reference users read, so it must document everything moec accepts. This
//! test asks the checker itself what it accepts, rather than keeping a second list that could drift:
//! given an unknown name in any position, `check` answers with the names it knows (the unknown-field
//! help lists a block's fields, an unknown value lists the field's values, an unknown argument lists
//! the call's parameters). Every name it lists must be in the reference:
//! - a field: a row of its block's table (`| \`field\` | ...`);
//! - a value of a field (gate, balance term, optimizer, data source, schedule, enum value...): a code
//!   span in that field's row, `` `name` `` or `` `name(...)` ``;
//! - a call's parameters: some code span `` `name(...)` `` in the reference naming every one of them
//!   (its signature).
//!
//! The JSON-lines metrics keys are taken from the runtime's own records the same way.

use moec_compiler::check::check;
use moec_grammar::Diagnostic;
use moec_runtime::metrics::{MoeLayerMetrics, Record, RouterLogitStats};
use std::collections::BTreeMap;
use std::path::Path;

const DOC: &str = include_str!("../docs/language.md");

/// A name no block, field or call uses, and far enough from every real name that the checker
/// lists the known names instead of suggesting the nearest one.
const PROBE: &str = "qqqqqqqqqqqq";

const BLOCKS: [&str; 3] = ["model", "moe", "train"];

/// A valid transformer MoE spec whose fields can each be replaced; data moec generates itself, so
/// no file is needed.
fn base(block: &str) -> Vec<(&'static str, &'static str)> {
    match block {
        "model" => vec![
            ("vocab", "256"),
            ("dim", "64"),
            ("layers", "2"),
            ("heads", "4"),
            ("context", "16"),
        ],
        "moe" => vec![("experts", "4"), ("top_k", "2")],
        _ => vec![
            ("data", "synthetic(kind = markov, seed = 1)"),
            ("batch", "2"),
            ("steps", "10"),
        ],
    }
}

/// The base spec with `block.field = value` set (replacing the base's value, if any).
fn spec_with(block: &str, field: &str, value: &str) -> String {
    let render = |b: &str| -> String {
        let mut fields = base(b);
        fields.retain(|(f, _)| b != block || *f != field);
        let mut text: String = fields
            .iter()
            .map(|(f, v)| format!("  {f} = {v}\n"))
            .collect();
        if b == block {
            text.push_str(&format!("  {field} = {value}\n"));
        }
        text
    };
    format!(
        "model probe {{\n{}  moe {{\n{}  }}\n}}\ntrain {{\n{}}}\n",
        render("model"),
        render("moe"),
        render("train")
    )
}

fn check_err(source: &str) -> Option<Diagnostic> {
    check(source, Path::new("probe.moe")).err()
}

/// The code spans of `text`: what is between backticks (outside fenced blocks).
fn code_spans(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

/// The fields the checker accepts in `block`: its unknown-field help lists them.
fn accepted_fields(block: &str) -> Vec<String> {
    let d = check_err(&spec_with(block, PROBE, "1")).expect("an unknown field is an error");
    assert!(d.message().starts_with("unknown field"), "{}", d.render());
    let help = d.help_text().unwrap_or_default();
    let list = help
        .split_once(" fields are ")
        .unwrap_or_else(|| panic!("the unknown-field help lists the fields: {}", d.render()))
        .1;
    code_spans(list).into_iter().map(String::from).collect()
}

/// The values the checker accepts for `block.field`, when it names them: an unknown name (bare, or
/// called) is answered with "unknown ..." and a label "expected `a`, `b` or `c`".
fn accepted_values(block: &str, field: &str) -> Option<Vec<String>> {
    [PROBE.to_string(), format!("{PROBE}()")]
        .iter()
        .filter_map(|value| check_err(&spec_with(block, field, value)))
        .find(|d| d.message().starts_with("unknown ") && d.label().starts_with("expected `"))
        .map(|d| {
            code_spans(d.label())
                .into_iter()
                .map(String::from)
                .collect()
        })
}

/// The parameters of the call `name(...)` as the value of `block.field`, when it is a call: an
/// unknown argument is answered with "`name` takes `a`, `b`" or "takes no arguments".
fn accepted_args(block: &str, field: &str, name: &str) -> Option<Vec<String>> {
    let d = check_err(&spec_with(block, field, &format!("{name}({PROBE} = 1)")))?;
    if !d.message().starts_with("unknown argument") {
        return None;
    }
    let help = d.help_text().unwrap_or_default();
    Some(
        code_spans(help)
            .into_iter()
            .skip(1) // the call's own name
            .map(String::from)
            .collect(),
    )
}

/// The reference without its fenced code blocks (examples, not definitions).
fn doc_text() -> String {
    let mut out = String::new();
    let mut fenced = false;
    for line in DOC.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The `## ` section whose title contains `title`.
fn section(doc: &str, title: &str) -> String {
    let start = doc
        .split("\n## ")
        .find(|s| s.lines().next().is_some_and(|h| h.contains(title)))
        .unwrap_or_else(|| panic!("docs/language.md has no section `{title}`"));
    start.to_string()
}

/// The table row documenting `name` in `section`: the line starting `` | `name` | ``.
fn row<'a>(section: &'a str, name: &str) -> Option<&'a str> {
    let head = format!("| `{name}` |");
    section.lines().find(|l| l.starts_with(&head))
}

fn block_section(block: &str) -> String {
    section(&doc_text(), &format!("The `{block}` block"))
}

fn is_word_in(word: &str, text: &str) -> bool {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .any(|w| w == word)
}

/// Whether some code span of the reference is a signature of `name` naming every one of `params`.
fn has_signature(doc: &str, name: &str, params: &[String]) -> bool {
    let open = format!("{name}(");
    code_spans(doc).into_iter().any(|span| {
        span.strip_prefix(&open)
            .is_some_and(|args| params.iter().all(|p| is_word_in(p, args)))
    })
}

#[test]
fn every_field_value_and_argument_the_checker_accepts_is_documented() {
    let base = spec_with("train", "seed", "1");
    if let Some(d) = check_err(&base) {
        panic!("the probes' base spec must check:\n{}", d.render());
    }
    let doc = doc_text();
    let mut missing: Vec<String> = Vec::new();
    let mut valued: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for block in BLOCKS {
        let section = block_section(block);
        let fields = accepted_fields(block);
        assert!(fields.len() >= 10, "{block}: the checker lists its fields");
        for field in fields {
            let Some(row) = row(&section, &field) else {
                missing.push(format!("field `{field}` of the `{block}` block"));
                continue;
            };
            let Some(values) = accepted_values(block, &field) else {
                continue;
            };
            for value in &values {
                let listed = code_spans(row)
                    .into_iter()
                    .any(|s| s == value || s.starts_with(&format!("{value}(")));
                if !listed {
                    missing.push(format!("value `{value}` of `{block}.{field}` (in its row)"));
                }
                let Some(params) = accepted_args(block, &field, value) else {
                    continue;
                };
                if !params.is_empty() && !has_signature(&doc, value, &params) {
                    missing.push(format!(
                        "signature `{value}({})` of `{block}.{field}`",
                        params.join(", ")
                    ));
                }
            }
            valued.insert(format!("{block}.{field}"), values);
        }
    }
    // The probes must reach the kinds of names the reference is required to document.
    for field in ["moe.gate", "moe.balance", "train.optimizer", "train.data"] {
        assert!(
            valued.get(field).is_some_and(|v| v.len() >= 2),
            "the checker did not list the values of `{field}`: {valued:?}"
        );
    }
    assert!(
        missing.is_empty(),
        "docs/language.md does not document what the checker accepts:\n  {}",
        missing.join("\n  ")
    );
}

/// Every key a `metrics.jsonl` line can carry, per line and per MoE layer, has a row in "Metrics".
#[test]
fn every_metrics_key_is_documented() {
    let mut layer = MoeLayerMetrics::from_counts(&[3, 1], 0.0, 1.0, 0.01);
    layer.bias = Some(vec![0.0, 0.0]);
    layer.prices = Some(vec![0.0, 0.0]);
    layer.router_logits = Some(RouterLogitStats::from_logits(&[0.5, -0.5], 2));
    let mut record = Record::new(1, 2.0, 1e-3, 100.0).with_val_loss(2.0);
    record.aux = Some(0.01);
    record.val_acc = Some(0.5);
    record.loss_scale = Some(65536.0);
    record.skipped = Some(0);
    record.moe = Some(BTreeMap::from([("0".to_string(), layer.clone())]));
    let keys = |v: serde_json::Value| -> Vec<String> {
        v.as_object().expect("an object").keys().cloned().collect()
    };
    let line_keys = keys(serde_json::to_value(&record).unwrap());
    let layer_keys = keys(serde_json::to_value(&layer).unwrap());
    assert!(line_keys.contains(&"moe".to_string()) && layer_keys.len() >= 10);
    let metrics = section(&doc_text(), "Metrics");
    let missing: Vec<&String> = line_keys
        .iter()
        .chain(&layer_keys)
        .filter(|k| row(&metrics, k).is_none())
        .collect();
    assert!(
        missing.is_empty(),
        "docs/language.md \"Metrics\" has no row for the metrics.jsonl keys {missing:?}"
    );
}
