//! The canonical layout of a `.moe` file, as `moec fmt` writes it.
//!
//! - One field per line, `name = value`, indented two spaces per block level; `;` separators become
//!   line breaks. Blocks open with `{` on their header line and close with `}` on a line of its own.
//! - Values on one line with single spaces around `=`, `+ - * /` and `x`, after commas and none
//!   inside brackets; parentheses only where the expression needs them. Literals are kept as written
//!   (`1_000`, `3e-4`, string escapes), as are the order of blocks and fields and zero-argument calls
//!   (`softmax` vs `softmax()`), so the file checks to exactly the same model.
//! - Comments are kept: a comment on a line of its own stays before the item it preceded, at that
//!   item's indentation; a comment after code stays at the end of that line. A comment inside a value
//!   written over several lines moves to its own line before the field, because the value is joined
//!   onto one line.
//! - A blank line (one, however many there were) is kept where the source had one between two items,
//!   except right after `{` and before `}`; top-level blocks are separated by exactly one blank line.
//!
//! Formatting is idempotent: the output formats to itself.

use crate::ast::*;
use crate::diagnostic::Diagnostic;
use crate::parser::parse;

const INDENT: &str = "  ";

/// `source` in the canonical layout, or the syntax error that prevents parsing it.
pub fn format(source: &str) -> Result<String, Diagnostic> {
    let ast = parse(source)?;
    let mut f = Formatter {
        src: source,
        comments: comments(source, &ast),
        next_comment: 0,
        out: String::new(),
        emitted_to: 0,
        depth: 0,
        blank: Blank::Never,
    };
    f.file(&ast);
    Ok(f.out)
}

/// Whether the next line may, must or must not be preceded by a blank line.
#[derive(Clone, Copy, PartialEq)]
enum Blank {
    /// Right after `{`, or at the start of the file.
    Never,
    /// Where the source had one.
    AsInSource,
    /// After a top-level block.
    Always,
}

struct Formatter<'a> {
    src: &'a str,
    /// Every comment, `#` to the end of its line, in source order.
    comments: Vec<Span>,
    /// The first comment not yet written.
    next_comment: usize,
    out: String,
    /// The source offset up to which everything has been written.
    emitted_to: usize,
    depth: usize,
    blank: Blank,
}

/// A block member in source order: a field or the `moe` block.
enum Member<'a> {
    Field(&'a Field),
    Block(&'static str, &'a Block),
}

impl Member<'_> {
    fn start(&self) -> usize {
        match self {
            Member::Field(f) => f.span().start,
            Member::Block(_, b) => b.span.start,
        }
    }
}

impl Formatter<'_> {
    fn file(&mut self, ast: &Ast) {
        let mut tops: Vec<(usize, Option<&Block>)> = vec![(ast.model.span.start, None)];
        if let Some(t) = &ast.train {
            tops.push((t.span.start, Some(t)));
        }
        tops.sort_by_key(|(start, _)| *start);
        for (_, top) in tops {
            match top {
                None => {
                    let decl = &ast.model;
                    let mut members: Vec<Member> = decl.fields.iter().map(Member::Field).collect();
                    if let Some(moe) = &decl.moe {
                        members.push(Member::Block("moe", moe));
                    }
                    let header = format!("model {}", decl.name.name);
                    self.block(&header, decl.header.start, decl.span, members);
                }
                Some(train) => {
                    let members = train.fields.iter().map(Member::Field).collect();
                    self.block("train", train.span.start, train.span, members);
                }
            }
            self.blank = Blank::Always;
        }
        self.comments_before(self.src.len());
    }

    /// `header {`, the members, `}`; `span` runs from the header to the closing brace.
    fn block(&mut self, header: &str, start: usize, span: Span, mut members: Vec<Member>) {
        members.sort_by_key(Member::start);
        let open = self.src[start..span.end]
            .find('{')
            .map_or(start, |i| start + i + 1);
        self.code_line(start, open, &format!("{header} {{"));
        self.blank = Blank::Never;
        self.depth += 1;
        for m in members {
            match m {
                Member::Field(f) => {
                    let text = format!("{} = {}", f.name.name, self.expr(&f.value));
                    self.code_line(f.span().start, f.span().end, &text);
                }
                Member::Block(name, b) => {
                    let fields = b.fields.iter().map(Member::Field).collect();
                    self.block(name, b.span.start, b.span, fields);
                }
            }
        }
        let close = span.end.saturating_sub(1);
        self.comments_before(close);
        self.depth -= 1;
        self.blank = Blank::Never;
        self.code_line(close, span.end, "}");
    }

    /// One line of code for the source range `start..end`: the comments before it, the comments
    /// inside it (moved before it), the line, and a comment that follows it on the same line.
    fn code_line(&mut self, start: usize, end: usize, text: &str) {
        self.comments_before(start);
        let mut anchor = start;
        while let Some(&c) = self.comments.get(self.next_comment) {
            if c.start >= end {
                break;
            }
            self.line(anchor, c.end, &self.comment_text(c));
            self.next_comment += 1;
            anchor = c.start;
        }
        self.line(anchor, end, text);
        if let Some(&c) = self.comments.get(self.next_comment) {
            let between = &self.src[end.min(c.start)..c.start];
            if between
                .chars()
                .all(|ch| matches!(ch, ' ' | '\t' | '\r' | ';'))
            {
                self.out.pop(); // the newline `line` wrote
                self.out.push_str("  ");
                self.out.push_str(&self.comment_text(c));
                self.out.push('\n');
                self.emitted_to = self.emitted_to.max(c.end);
                self.next_comment += 1;
            }
        }
    }

    /// The not yet written comments that start before `pos`, each on its own line.
    fn comments_before(&mut self, pos: usize) {
        while let Some(&c) = self.comments.get(self.next_comment) {
            if c.start >= pos {
                break;
            }
            self.line(c.start, c.end, &self.comment_text(c));
            self.next_comment += 1;
        }
    }

    /// Writes `text` as a line at the current depth, preceded by a blank line as `self.blank` says
    /// (`AsInSource`: when the source between what was written last and `anchor` has a blank line).
    fn line(&mut self, anchor: usize, end: usize, text: &str) {
        let blank = match self.blank {
            Blank::Never => false,
            Blank::Always => true,
            Blank::AsInSource => {
                anchor > self.emitted_to && has_blank_line(&self.src[self.emitted_to..anchor])
            }
        };
        if blank && !self.out.is_empty() {
            self.out.push('\n');
        }
        for _ in 0..self.depth {
            self.out.push_str(INDENT);
        }
        self.out.push_str(text);
        self.out.push('\n');
        self.emitted_to = self.emitted_to.max(end);
        self.blank = Blank::AsInSource;
    }

    fn comment_text(&self, c: Span) -> String {
        self.src[c.start..c.end].trim_end().to_string()
    }

    fn expr(&self, e: &Expr) -> String {
        match &e.kind {
            ExprKind::Number(_) => number_text(&self.src[e.span.start..e.span.end]).to_string(),
            ExprKind::Bool(b) => b.to_string(),
            ExprKind::Str(_) => string_text(&self.src[e.span.start..e.span.end]).to_string(),
            ExprKind::None => "none".to_string(),
            ExprKind::Ident(name) => name.clone(),
            ExprKind::Call(call) => {
                let args: Vec<String> = call
                    .args
                    .iter()
                    .map(|a| match &a.name {
                        Some(key) => format!("{} = {}", key.name, self.expr(&a.value)),
                        None => self.expr(&a.value),
                    })
                    .collect();
                format!("{}({})", call.name.name, args.join(", "))
            }
            ExprKind::Tuple(items) => {
                let items: Vec<String> = items.iter().map(|i| self.expr(i)).collect();
                match items.len() {
                    1 => format!("({},)", items[0]),
                    _ => format!("({})", items.join(", ")),
                }
            }
            ExprKind::List(items) => {
                let items: Vec<String> = items.iter().map(|i| self.expr(i)).collect();
                format!("[{}]", items.join(", "))
            }
            ExprKind::Binary { op, lhs, rhs } => {
                let p = binary_precedence(*op);
                // Left-associative: a right operand of the same precedence keeps its parentheses.
                format!(
                    "{} {} {}",
                    self.operand(lhs, precedence(lhs) < p),
                    op.symbol(),
                    self.operand(rhs, precedence(rhs) <= p)
                )
            }
            ExprKind::Neg(x) => format!("-{}", self.operand(x, precedence(x) < ATOM)),
            ExprKind::Groups { groups, members } => format!(
                "{} x {}",
                // `G x M` does not nest without parentheses (nothing binds looser).
                self.operand(groups, precedence(groups) == GROUPS),
                self.operand(members, precedence(members) == GROUPS)
            ),
        }
    }

    fn operand(&self, e: &Expr, parenthesise: bool) -> String {
        if parenthesise {
            format!("({})", self.expr(e))
        } else {
            self.expr(e)
        }
    }
}

/// Binding strength in the grammar: `G x M` loosest, then sums, then products, then operands.
const GROUPS: u8 = 0;
const ATOM: u8 = 3;

fn binary_precedence(op: BinOp) -> u8 {
    match op {
        BinOp::Add | BinOp::Sub => 1,
        BinOp::Mul | BinOp::Div => 2,
    }
}

fn precedence(e: &Expr) -> u8 {
    match &e.kind {
        ExprKind::Groups { .. } => GROUPS,
        ExprKind::Binary { op, .. } => binary_precedence(*op),
        _ => ATOM,
    }
}

/// Whether `gap` (source between two lines of code or comments) contains an empty line.
fn has_blank_line(gap: &str) -> bool {
    let pieces: Vec<&str> = gap.split('\n').collect();
    pieces.len() > 2
        && pieces[1..pieces.len() - 1]
            .iter()
            .any(|p| p.trim().is_empty())
}

/// The literal inside a number's span, which also covers any parentheses written around it.
fn number_text(span_text: &str) -> &str {
    let body = skip_open_parens(span_text);
    let bytes = body.as_bytes();
    let mut end = 0;
    let digits = |end: &mut usize| {
        while *end < bytes.len() && (bytes[*end].is_ascii_digit() || bytes[*end] == b'_') {
            *end += 1;
        }
    };
    digits(&mut end);
    if end < bytes.len() && bytes[end] == b'.' {
        end += 1;
        digits(&mut end);
    }
    if end < bytes.len() && matches!(bytes[end], b'e' | b'E') {
        end += 1;
        if end < bytes.len() && matches!(bytes[end], b'+' | b'-') {
            end += 1;
        }
        digits(&mut end);
    }
    &body[..end]
}

/// The quoted literal inside a string's span (which also covers any parentheses around it).
fn string_text(span_text: &str) -> &str {
    let body = skip_open_parens(span_text);
    let mut escaped = false;
    for (i, c) in body.char_indices().skip(1) {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => return &body[..=i],
            _ => {}
        }
    }
    body
}

/// `span_text` after the `(`, whitespace and comments that may precede a parenthesised literal.
fn skip_open_parens(span_text: &str) -> &str {
    let mut rest = span_text;
    loop {
        let trimmed = rest.trim_start_matches(|c: char| c == '(' || c.is_whitespace());
        match trimmed.strip_prefix('#') {
            Some(comment) => rest = comment.split_once('\n').map_or("", |(_, after)| after),
            None => return trimmed,
        }
    }
}

/// Every comment of `source`: a `#` outside a string literal, to the end of its line. (No other
/// token contains `#`, and string literals are the AST's `Str` spans.)
fn comments(source: &str, ast: &Ast) -> Vec<Span> {
    let mut strings = Vec::new();
    let mut collect = |fields: &[Field]| {
        for f in fields {
            string_spans(source, &f.value, &mut strings);
        }
    };
    collect(&ast.model.fields);
    if let Some(moe) = &ast.model.moe {
        collect(&moe.fields);
    }
    if let Some(train) = &ast.train {
        collect(&train.fields);
    }
    let mut out = Vec::new();
    let mut pos = 0;
    while let Some(i) = source[pos..].find('#').map(|i| pos + i) {
        match strings.iter().find(|s| s.start <= i && i < s.end) {
            Some(s) => pos = s.end,
            None => {
                let end = source[i..].find('\n').map_or(source.len(), |n| i + n);
                out.push(Span::new(i, end));
                pos = end;
            }
        }
    }
    out
}

/// The spans of the string literals in `e`, quotes included and parentheses around them excluded.
fn string_spans(source: &str, e: &Expr, out: &mut Vec<Span>) {
    let mut walk = |x: &Expr| string_spans(source, x, out);
    match &e.kind {
        ExprKind::Str(_) => {
            let text = &source[e.span.start..e.span.end];
            let start = e.span.end - skip_open_parens(text).len();
            out.push(Span::new(
                start,
                start + string_text(&source[start..e.span.end]).len(),
            ));
        }
        ExprKind::Call(c) => c.args.iter().for_each(|a| walk(&a.value)),
        ExprKind::Tuple(items) | ExprKind::List(items) => items.iter().for_each(walk),
        ExprKind::Binary { lhs, rhs, .. } => {
            walk(lhs);
            walk(rhs);
        }
        ExprKind::Groups { groups, members } => {
            walk(groups);
            walk(members);
        }
        ExprKind::Neg(x) => walk(x),
        ExprKind::Number(_) | ExprKind::Bool(_) | ExprKind::None | ExprKind::Ident(_) => {}
    }
}
