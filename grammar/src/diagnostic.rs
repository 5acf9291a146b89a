//! Errors a user reads: one message, one labelled span in the source, an optional help line.
//!
//! A [`Diagnostic`] implements [`miette::Diagnostic`] (with a [`NamedSource`]) so the CLI can print it
//! with miette's fancy handler, and [`Diagnostic::render`] gives a plain, colour-free, rustc-style
//! rendering (`file:line:col`, the line, a caret under the span) that tests and logs can compare.

use std::fmt;
use std::sync::Arc;

use miette::{LabeledSpan, NamedSource, SourceCode};

use crate::ast::Span;

/// Name used for the source until [`Diagnostic::with_path`] gives the real file name.
pub const DEFAULT_SOURCE_NAME: &str = "<spec>";

/// An error in a `.moe` file, located at a byte span.
#[derive(Debug, Clone)]
pub struct Diagnostic {
    /// Boxed so that `Result<_, Diagnostic>` stays small on the happy path.
    inner: Box<Inner>,
    /// 1-based line of the span's start.
    pub line: usize,
    /// 1-based column (in characters) of the span's start.
    pub col: usize,
}

#[derive(Debug, Clone)]
struct Inner {
    message: String,
    label: String,
    help: Option<String>,
    span: Span,
    source: NamedSource<Arc<String>>,
}

impl Diagnostic {
    /// An error at `span` of `source`. The span is clamped to the source and to char boundaries, so
    /// any span is safe to pass.
    pub fn new(source: &str, span: Span, message: impl Into<String>) -> Self {
        Self::with_shared_source(Arc::new(source.to_owned()), span, message)
    }

    /// As [`Diagnostic::new`], sharing an already allocated source text.
    pub fn with_shared_source(source: Arc<String>, span: Span, message: impl Into<String>) -> Self {
        let span = clamp_span(&source, span);
        let (line, col) = line_col(&source, span.start);
        Diagnostic {
            inner: Box::new(Inner {
                message: message.into(),
                label: String::new(),
                help: None,
                span,
                source: NamedSource::new(DEFAULT_SOURCE_NAME, source),
            }),
            line,
            col,
        }
    }

    /// The short text shown under the caret.
    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.inner.label = label.into();
        self
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.inner.help = Some(help.into());
        self
    }

    /// Names the source (normally the spec's path as the user typed it).
    pub fn with_path(mut self, path: impl AsRef<str>) -> Self {
        self.inner.source = NamedSource::new(path, self.inner.source.inner().clone());
        self
    }

    /// The main message, without location or colours.
    pub fn message(&self) -> &str {
        &self.inner.message
    }

    pub fn label(&self) -> &str {
        &self.inner.label
    }

    pub fn help_text(&self) -> Option<&str> {
        self.inner.help.as_deref()
    }

    pub fn span(&self) -> Span {
        self.inner.span
    }

    /// The source's name as given by [`Diagnostic::with_path`].
    pub fn path(&self) -> &str {
        self.inner.source.name()
    }

    /// Plain rustc-style rendering, no ANSI colours:
    /// ```text
    /// error: unknown field `expertz` in `moe` block
    ///  --> specs/mixtral.moe:7:5
    ///   |
    /// 7 |     expertz = 8
    ///   |     ^^^^^^^ not a `moe` field
    ///   |
    ///   = help: did you mean `experts`?
    /// ```
    pub fn render(&self) -> String {
        let src = self.inner.source.inner();
        let line_start = src[..self.inner.span.start]
            .rfind('\n')
            .map_or(0, |i| i + 1);
        let line_end = src[self.inner.span.start..]
            .find('\n')
            .map_or(src.len(), |i| self.inner.span.start + i);
        let text = src[line_start..line_end].trim_end_matches('\r');
        let gutter = self.line.to_string().len();
        let pad = " ".repeat(gutter);
        let caret_end = self.inner.span.end.min(line_start + text.len());
        let width = src
            .get(self.inner.span.start..caret_end.max(self.inner.span.start))
            .map_or(0, |s| s.chars().count())
            .max(1);
        // Tabs before the caret are kept as tabs so the caret lines up in a terminal.
        let lead: String = src[line_start..self.inner.span.start]
            .chars()
            .map(|c| if c == '\t' { '\t' } else { ' ' })
            .collect();
        let mut out = format!(
            "error: {}\n{pad}--> {}:{}:{}\n{pad} |\n{} | {}\n{pad} | {}{}",
            self.inner.message,
            self.path(),
            self.line,
            self.col,
            self.line,
            text,
            lead,
            "^".repeat(width)
        );
        if !self.inner.label.is_empty() {
            out.push(' ');
            out.push_str(&self.inner.label);
        }
        out.push('\n');
        if let Some(help) = &self.inner.help {
            out.push_str(&format!("{pad} |\n{pad} = help: {help}\n"));
        }
        out
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.inner.message)
    }
}

impl std::error::Error for Diagnostic {}

impl miette::Diagnostic for Diagnostic {
    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.inner
            .help
            .as_ref()
            .map(|h| Box::new(h) as Box<dyn fmt::Display>)
    }

    fn source_code(&self) -> Option<&dyn SourceCode> {
        Some(&self.inner.source)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        let label = (!self.inner.label.is_empty()).then(|| self.inner.label.clone());
        Some(Box::new(std::iter::once(
            LabeledSpan::new_primary_with_span(label, self.inner.span),
        )))
    }
}

/// 1-based line and column (in chars) of byte offset `pos`.
pub fn line_col(source: &str, pos: usize) -> (usize, usize) {
    let pos = floor_char_boundary(source, pos);
    let before = &source[..pos];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

fn floor_char_boundary(s: &str, mut pos: usize) -> usize {
    pos = pos.min(s.len());
    while !s.is_char_boundary(pos) {
        pos -= 1;
    }
    pos
}

fn clamp_span(s: &str, span: Span) -> Span {
    let start = floor_char_boundary(s, span.start);
    let end = floor_char_boundary(s, span.end.max(start));
    Span { start, end }
}

/// The candidate closest to `word`, if it is close enough to be a plausible typo: same word up to
/// case, or within an edit distance (Damerau–Levenshtein, so swapped letters count once) of about a
/// third of its length.
pub fn did_you_mean<'a, I>(word: &str, candidates: I) -> Option<&'a str>
where
    I: IntoIterator<Item = &'a str>,
{
    let lower = word.to_ascii_lowercase();
    let limit = (word.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .map(|c| {
            let d = if c == lower {
                0
            } else {
                strsim::damerau_levenshtein(&lower, c)
            };
            (d, c.len().abs_diff(lower.len()), c)
        })
        .filter(|&(d, _, c)| {
            d <= limit || (d <= limit + 1 && (c.starts_with(&lower) || lower.starts_with(c)))
        })
        // On equal distance prefer a candidate of the same length: `expertz` means `experts`.
        .min_by_key(|&(d, len_diff, _)| (d, len_diff))
        .map(|(_, _, c)| c)
}

/// `` `a`, `b` or `c` `` for messages.
pub fn one_of(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    match quoted.len() {
        0 => String::new(),
        1 => quoted[0].clone(),
        n => format!("{} or {}", quoted[..n - 1].join(", "), quoted[n - 1]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_are_one_based_chars() {
        let src = "model m {\n  dim = é4\n}";
        assert_eq!(line_col(src, 0), (1, 1));
        let pos = src.find('4').unwrap();
        assert_eq!(line_col(src, pos), (2, 10));
    }

    #[test]
    fn render_shows_path_line_caret_and_help() {
        let src = "model m {\n  dimm = 4\n}\n";
        let d = Diagnostic::new(
            src,
            Span::new(12, 16),
            "unknown field `dimm` in `model` block",
        )
        .with_label("not a `model` field")
        .with_help("did you mean `dim`?")
        .with_path("a.moe");
        assert_eq!((d.line, d.col), (2, 3));
        let r = d.render();
        assert_eq!(
            r,
            "error: unknown field `dimm` in `model` block\n --> a.moe:2:3\n  |\n2 |   dimm = 4\n  |   ^^^^ not a `model` field\n  |\n  = help: did you mean `dim`?\n"
        );
    }

    #[test]
    fn out_of_range_spans_are_clamped() {
        let d = Diagnostic::new("ab", Span::new(10, 20), "x");
        assert_eq!((d.line, d.col), (1, 3));
        assert!(d.render().contains("^"));
        // A span on the `\r` of a CRLF line ending, and one on the newline itself.
        for at in [2, 3] {
            let d = Diagnostic::new("ab\r\ncd", Span::new(at, at + 1), "x");
            assert!(d.render().contains("1 | ab\n"), "{}", d.render());
        }
    }

    #[test]
    fn suggestions() {
        let fields = ["experts", "every", "expert", "top_k"];
        assert_eq!(did_you_mean("expertz", fields), Some("experts"));
        assert_eq!(did_you_mean("topk", fields), Some("top_k"));
        assert_eq!(did_you_mean("banana", fields), None);
        assert_eq!(did_you_mean("TOP_K", fields), Some("top_k"));
    }
}

#[cfg(test)]
mod miette_tests {
    use super::*;

    /// The CLI prints diagnostics with miette's handler; it must see the file name, the labelled
    /// span and the help.
    #[test]
    fn miette_rendering_has_location_label_and_help() {
        let src = "model m {\n  dimm = 4\n}\n";
        let d = Diagnostic::new(
            src,
            Span::new(12, 16),
            "unknown field `dimm` in `model` block",
        )
        .with_label("not a `model` field")
        .with_help("did you mean `dim`?")
        .with_path("specs/a.moe");
        let handler =
            miette::GraphicalReportHandler::new_themed(miette::GraphicalTheme::unicode_nocolor());
        let mut out = String::new();
        handler.render_report(&mut out, &d).unwrap();
        for part in [
            "unknown field `dimm` in `model` block",
            "specs/a.moe:2:3",
            "dimm = 4",
            "not a `model` field",
            "did you mean `dim`?",
        ] {
            assert!(out.contains(part), "missing {part:?} in:\n{out}");
        }
    }
}
