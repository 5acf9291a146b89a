//! Source text → [`Ast`], with pest's syntax errors translated into [`Diagnostic`]s in the user's words.

use std::sync::Arc;

use pest::error::{ErrorVariant, InputLocation};
use pest::iterators::Pair;
use pest::Parser as _;

use crate::ast::*;
use crate::diagnostic::{did_you_mean, Diagnostic};

#[derive(pest_derive::Parser)]
#[grammar = "moe.pest"]
struct MoeParser;

/// Brackets may nest this deep. Real specs use two or three levels; the cap keeps the recursive tree
/// walks (here and in `check`) far from the stack limit on hostile input.
pub const MAX_BRACKET_DEPTH: usize = 32;
/// Expression trees may be this deep (a chain `a + b + c` is as deep as it is long).
pub const MAX_EXPR_DEPTH: usize = 64;

/// Parses a whole `.moe` file.
///
/// The returned diagnostic has no file name yet; callers that know the path add it with
/// [`Diagnostic::with_path`].
pub fn parse(source: &str) -> Result<Ast, Diagnostic> {
    let src = Arc::new(source.to_owned());
    let err = |span: Span, msg: String| Diagnostic::with_shared_source(src.clone(), span, msg);
    check_bracket_depth(source).map_err(|(span, msg)| err(span, msg))?;
    let mut pairs = MoeParser::parse(Rule::file, source)
        .map_err(|e| translate_error(source, e).into_diag(src.clone()))?;
    let file = pairs
        .next()
        .expect("the `file` rule always yields one pair on success");
    let builder = Builder { src: src.clone() };
    builder.file(file)
}

/// Rejects absurdly deep bracket nesting before pest (and our recursive walk) sees it.
fn check_bracket_depth(source: &str) -> Result<(), (Span, String)> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut in_comment = false;
    let mut escaped = false;
    for (i, c) in source.char_indices() {
        if in_comment {
            in_comment = c != '\n';
            continue;
        }
        if in_string {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' | '\n' => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '#' => in_comment = true,
            '"' => in_string = true,
            '(' | '[' | '{' => {
                depth += 1;
                if depth > MAX_BRACKET_DEPTH {
                    return Err((
                        Span::new(i, i + 1),
                        format!("brackets nested more than {MAX_BRACKET_DEPTH} deep"),
                    ));
                }
            }
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// A syntax error before it is attached to its source.
struct SyntaxError {
    span: Span,
    message: String,
    label: String,
    help: Option<String>,
}

impl SyntaxError {
    fn into_diag(self, src: Arc<String>) -> Diagnostic {
        let mut d =
            Diagnostic::with_shared_source(src, self.span, self.message).with_label(self.label);
        if let Some(h) = self.help {
            d = d.with_help(h);
        }
        d
    }
}

/// What the user sees at `pos`: a word, a number, a symbol, "end of line" or "end of file", plus
/// the span of that token.
fn found_at(source: &str, pos: usize) -> (String, Span) {
    let rest = &source[pos..];
    let Some(c) = rest.chars().next() else {
        return ("end of file".into(), Span::new(pos, pos));
    };
    if c == '\n' || c == '\r' {
        return ("end of line".into(), Span::new(pos, pos + c.len_utf8()));
    }
    let word_len = rest
        .char_indices()
        .find(|&(_, ch)| !(ch.is_ascii_alphanumeric() || ch == '_'))
        .map_or(rest.len(), |(i, _)| i);
    if word_len > 0 {
        return (
            format!("`{}`", &rest[..word_len]),
            Span::new(pos, pos + word_len),
        );
    }
    (format!("`{c}`"), Span::new(pos, pos + c.len_utf8()))
}

/// The user's words for what a grammar rule expects; `None` for rules that should not be mentioned.
fn expected_words(rule: Rule) -> Option<&'static str> {
    Some(match rule {
        Rule::EOI => "end of file",
        Rule::file | Rule::model_block | Rule::kw_model => "`model`",
        Rule::train_block | Rule::kw_train => "`train`",
        Rule::moe_block | Rule::kw_moe => "`moe { ... }`",
        Rule::body | Rule::field => "a field (`name = value`)",
        Rule::name => "the model's name",
        Rule::ident => "a name",
        Rule::eq => "`=`",
        Rule::expr
        | Rule::sum
        | Rule::product
        | Rule::operand
        | Rule::number
        | Rule::string
        | Rule::call
        | Rule::paren
        | Rule::list => "a value",
        Rule::arg | Rule::kwarg => "an argument",
        Rule::string_inner => "`\"`",
        Rule::sep => "end of line",
        Rule::lbrace => "`{`",
        Rule::rbrace => "`}`",
        Rule::lparen => "`(`",
        Rule::rparen => "`)`",
        Rule::lbracket => "`[`",
        Rule::rbracket => "`]`",
        Rule::comma => "`,`",
        // Operators are always possible after a complete value; listing them would only be noise.
        // Silent and helper rules never appear in pest's positives.
        _ => return None,
    })
}

fn translate_error(source: &str, e: pest::error::Error<Rule>) -> SyntaxError {
    let pos = match e.location {
        InputLocation::Pos(p) => p,
        InputLocation::Span((s, _)) => s,
    };
    let pos = pos.min(source.len());
    let (found, found_span) = found_at(source, pos);
    let positives = match &e.variant {
        ErrorVariant::ParsingError { positives, .. } => positives.clone(),
        ErrorVariant::CustomError { .. } => Vec::new(),
    };

    // An unterminated string: the parser fails at its opening quote.
    if source[pos..].starts_with('"') {
        let line_end = source[pos + 1..]
            .find('\n')
            .map_or(source.len(), |i| pos + 1 + i);
        if !source[pos + 1..line_end].contains('"') {
            return SyntaxError {
                span: Span::new(pos, pos + 1),
                message: "unterminated string".into(),
                label: "this string has no closing `\"` on its line".into(),
                help: Some("strings end on the line they start: `\"path/to/file.txt\"`".into()),
            };
        }
    }

    let mut words: Vec<&str> = Vec::new();
    for r in &positives {
        if let Some(w) = expected_words(*r) {
            if !words.contains(&w) {
                words.push(w);
            }
        }
    }
    // A field and a `moe` block can both start here; "a field" is what users mean nearly always.
    if words.contains(&"a field (`name = value`)") {
        words.retain(|w| *w != "`moe { ... }`");
    }
    if words.is_empty() {
        words.push("something else");
    }
    let expected = match words.len() {
        1 => words[0].to_string(),
        n => format!("{} or {}", words[..n - 1].join(", "), words[n - 1]),
    };

    let mut help = None;
    if found == "end of file" && words.contains(&"`}`") {
        let help = unclosed_brace(source).map(|open| {
            let (line, _) = crate::diagnostic::line_col(source, open);
            format!("the `{{` on line {line} is never closed")
        });
        return SyntaxError {
            span: found_span,
            message: "expected `}` to close the block, found end of file".into(),
            label: "expected `}`".into(),
            help,
        };
    } else if words.contains(&"`model`") || words.contains(&"`train`") {
        let word = found.trim_matches('`');
        if let Some(s) = did_you_mean(word, ["model", "train"]) {
            help = Some(format!("did you mean `{s}`?"));
        } else {
            help = Some(
                "a file is `model NAME { ... }` followed by an optional `train { ... }`".into(),
            );
        }
    } else if words.contains(&"end of line") {
        help = Some("put each field on its own line, or separate fields with `;`".into());
    } else if words.contains(&"`=`") && found == "`{`" {
        // `name {`: a block where a field was expected; only `moe` nests, inside `model`.
        let before = source[..pos].trim_end();
        let word_start = before
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(0, |i| i + 1);
        let word = &before[word_start..];
        help = Some(match did_you_mean(word, ["moe"]) {
            Some(s) => format!("did you mean `{s}`? (`{s} {{ ... }}` inside the `model` block)"),
            None => "only a `moe { ... }` block can be nested, inside `model`".into(),
        });
    } else if words.contains(&"`=`") {
        help = Some("fields are written `name = value`".into());
    }

    SyntaxError {
        span: found_span,
        message: format!("expected {expected}, found {found}"),
        label: format!("expected {expected}"),
        help,
    }
}

/// Byte offset of the last `{` that has no matching `}` (strings and comments skipped).
fn unclosed_brace(source: &str) -> Option<usize> {
    let mut open = Vec::new();
    let mut in_string = false;
    let mut in_comment = false;
    for (i, c) in source.char_indices() {
        match c {
            _ if in_comment => in_comment = c != '\n',
            '"' | '\n' if in_string => in_string = false,
            _ if in_string => {}
            '#' => in_comment = true,
            '"' => in_string = true,
            '{' => open.push(i),
            '}' => {
                open.pop();
            }
            _ => {}
        }
    }
    open.pop()
}

/// Walks pest's pairs into the AST. Also enforces the one-model/one-train/one-moe structure, which
/// the grammar leaves open so these mistakes get a clear message instead of a syntax error.
struct Builder {
    src: Arc<String>,
}

type PResult<T> = Result<T, Diagnostic>;

impl Builder {
    fn error(&self, span: Span, message: impl Into<String>) -> Diagnostic {
        Diagnostic::with_shared_source(self.src.clone(), span, message)
    }

    fn file(&self, pair: Pair<Rule>) -> PResult<Ast> {
        let mut model: Option<ModelDecl> = None;
        let mut train: Option<Block> = None;
        for p in pair.into_inner() {
            match p.as_rule() {
                Rule::model_block => {
                    let m = self.model_block(p)?;
                    if let Some(first) = &model {
                        let (line, _) = crate::diagnostic::line_col(&self.src, first.span.start);
                        return Err(self
                            .error(m.header, "a file declares exactly one model")
                            .with_label("second `model` block")
                            .with_help(format!("the first `model` block is on line {line}")));
                    }
                    model = Some(m);
                }
                Rule::train_block => {
                    let b = self.block(p)?;
                    if let Some(first) = &train {
                        let (line, _) = crate::diagnostic::line_col(&self.src, first.span.start);
                        return Err(self
                            .error(b.header, "duplicate `train` block")
                            .with_label("second `train` block")
                            .with_help(format!("the first `train` block is on line {line}")));
                    }
                    train = Some(b);
                }
                _ => {}
            }
        }
        let Some(model) = model else {
            let at = train.as_ref().map_or(Span::new(0, 0), |t| t.header);
            return Err(self
                .error(at, "missing `model` block")
                .with_label("expected `model NAME { ... }`")
                .with_help("a spec starts with `model NAME { dim = ..., layers = ..., ... }`"));
        };
        Ok(Ast { model, train })
    }

    fn model_block(&self, pair: Pair<Rule>) -> PResult<ModelDecl> {
        let span: Span = pair.as_span().into();
        let mut inner = pair.into_inner();
        let kw = inner.next().expect("model_block starts with `model`");
        let name_pair = inner.next().expect("model_block has a name");
        let name = Ident {
            name: name_pair.as_str().to_owned(),
            span: name_pair.as_span().into(),
        };
        let header = Span::from(kw.as_span()).join(name.span);
        let body = inner
            .find(|p| p.as_rule() == Rule::body)
            .expect("model_block has a body");
        let (fields, moe) = self.body(body, true)?;
        Ok(ModelDecl {
            name,
            span,
            header,
            fields,
            moe,
        })
    }

    fn block(&self, pair: Pair<Rule>) -> PResult<Block> {
        let span: Span = pair.as_span().into();
        let mut inner = pair.into_inner();
        let header: Span = inner
            .next()
            .expect("a block starts with its keyword")
            .as_span()
            .into();
        let body = inner
            .find(|p| p.as_rule() == Rule::body)
            .expect("a block has a body");
        let (fields, _) = self.body(body, false)?;
        Ok(Block {
            span,
            header,
            fields,
        })
    }

    /// Fields of a block; a nested `moe` block is allowed only in `model`.
    fn body(&self, pair: Pair<Rule>, allow_moe: bool) -> PResult<(Vec<Field>, Option<Block>)> {
        let mut fields = Vec::new();
        let mut moe: Option<Block> = None;
        for p in pair.into_inner() {
            match p.as_rule() {
                Rule::field => fields.push(self.field(p)?),
                Rule::moe_block => {
                    let b = self.block(p)?;
                    if !allow_moe {
                        return Err(self
                            .error(b.header, "a `moe` block belongs inside the `model` block")
                            .with_label("not allowed here"));
                    }
                    if let Some(first) = &moe {
                        let (line, _) = crate::diagnostic::line_col(&self.src, first.span.start);
                        return Err(self
                            .error(b.header, "duplicate `moe` block")
                            .with_label("second `moe` block")
                            .with_help(format!("the first `moe` block is on line {line}")));
                    }
                    moe = Some(b);
                }
                _ => {}
            }
        }
        Ok((fields, moe))
    }

    fn field(&self, pair: Pair<Rule>) -> PResult<Field> {
        let mut inner = pair.into_inner();
        let name = ident(inner.next().expect("field starts with a name"));
        let value = inner
            .find(|p| p.as_rule() == Rule::expr)
            .expect("field has a value");
        Ok(Field {
            name,
            value: self.expr(value)?,
        })
    }

    /// Checks the depth bound of a freshly built node.
    fn bounded(&self, e: Expr, depth: usize) -> PResult<(Expr, usize)> {
        if depth > MAX_EXPR_DEPTH {
            return Err(self
                .error(
                    e.span,
                    format!("expression nested more than {MAX_EXPR_DEPTH} levels deep"),
                )
                .with_label("too deep")
                .with_help("write the value as a literal"));
        }
        Ok((e, depth))
    }

    fn expr(&self, pair: Pair<Rule>) -> PResult<Expr> {
        self.expr_d(pair).map(|(e, _)| e)
    }

    /// Builds an expression-like pair, returning it with its tree depth.
    fn expr_d(&self, pair: Pair<Rule>) -> PResult<(Expr, usize)> {
        let span: Span = pair.as_span().into();
        match pair.as_rule() {
            Rule::expr => self.groups_expr(pair, span),
            Rule::sum | Rule::product => self.binary_chain(pair),
            Rule::operand => self.negated(pair),
            Rule::number => Ok((
                Expr {
                    kind: ExprKind::Number(number(pair.as_str())),
                    span,
                },
                1,
            )),
            Rule::string => {
                let raw = pair.into_inner().next().map_or("", |p| p.as_str());
                Ok((
                    Expr {
                        kind: ExprKind::Str(unescape(raw)),
                        span,
                    },
                    1,
                ))
            }
            Rule::ident => {
                let kind = match pair.as_str() {
                    "true" => ExprKind::Bool(true),
                    "false" => ExprKind::Bool(false),
                    "none" => ExprKind::None,
                    other => ExprKind::Ident(other.to_owned()),
                };
                Ok((Expr { kind, span }, 1))
            }
            Rule::call => self.call_expr(pair, span),
            Rule::paren | Rule::list => self.bracketed(pair, span),
            other => unreachable!("rule {other:?} is not an expression"),
        }
    }

    /// A sum, or `G x M` groups of two sums.
    fn groups_expr(&self, pair: Pair<Rule>, span: Span) -> PResult<(Expr, usize)> {
        let mut sums = pair.into_inner().filter(|p| p.as_rule() == Rule::sum);
        let (first, d1) = self.expr_d(sums.next().expect("expr has a sum"))?;
        match sums.next() {
            None => Ok((first, d1)),
            Some(second) => {
                let (members, d2) = self.expr_d(second)?;
                let e = Expr {
                    kind: ExprKind::Groups {
                        groups: Box::new(first),
                        members: Box::new(members),
                    },
                    span,
                };
                self.bounded(e, d1.max(d2) + 1)
            }
        }
    }

    /// A left-associative chain of `+ -` (sum) or `* /` (product).
    fn binary_chain(&self, pair: Pair<Rule>) -> PResult<(Expr, usize)> {
        let mut inner = pair.into_inner();
        let (mut acc, mut depth) = self.expr_d(inner.next().expect("chain has an operand"))?;
        while let Some(op) = inner.next() {
            let op = match op.as_rule() {
                Rule::plus => BinOp::Add,
                Rule::minus => BinOp::Sub,
                Rule::star => BinOp::Mul,
                _ => BinOp::Div,
            };
            let (rhs, d) = self.expr_d(inner.next().expect("operator has a right operand"))?;
            let span = acc.span.join(rhs.span);
            let e = Expr {
                kind: ExprKind::Binary {
                    op,
                    lhs: Box::new(acc),
                    rhs: Box::new(rhs),
                },
                span,
            };
            (acc, depth) = self.bounded(e, depth.max(d) + 1)?;
        }
        Ok((acc, depth))
    }

    /// An atom under its leading minus signs, innermost first.
    fn negated(&self, pair: Pair<Rule>) -> PResult<(Expr, usize)> {
        let parts: Vec<Pair<Rule>> = pair.into_inner().collect();
        let (atom_pair, minuses) = parts.split_last().expect("operand has an atom");
        let (mut acc, mut depth) = self.expr_d(atom_pair.clone())?;
        for m in minuses.iter().rev() {
            let span = Span::from(m.as_span()).join(acc.span);
            (acc, depth) = self.bounded(
                Expr {
                    kind: ExprKind::Neg(Box::new(acc)),
                    span,
                },
                depth + 1,
            )?;
        }
        Ok((acc, depth))
    }

    /// `name(args)`, each argument positional or `key = value`.
    fn call_expr(&self, pair: Pair<Rule>, span: Span) -> PResult<(Expr, usize)> {
        let mut inner = pair.into_inner();
        let name = ident(inner.next().expect("call starts with a name"));
        let mut args = Vec::new();
        let mut depth = 1;
        for p in inner.filter(|p| p.as_rule() == Rule::arg) {
            let a = p.into_inner().next().expect("arg has content");
            let (arg, d) = match a.as_rule() {
                Rule::kwarg => {
                    let mut kw = a.into_inner();
                    let key = ident(kw.next().expect("kwarg has a name"));
                    let v = kw
                        .find(|p| p.as_rule() == Rule::expr)
                        .expect("kwarg has a value");
                    let (value, d) = self.expr_d(v)?;
                    (
                        Arg {
                            name: Some(key),
                            value,
                        },
                        d,
                    )
                }
                _ => {
                    let (value, d) = self.expr_d(a)?;
                    (Arg { name: None, value }, d)
                }
            };
            depth = depth.max(d + 1);
            args.push(arg);
        }
        self.bounded(
            Expr {
                kind: ExprKind::Call(Call { name, args }),
                span,
            },
            depth,
        )
    }

    /// `[a, b]` lists, `(a, b)` tuples, and `(e)`, which only groups.
    fn bracketed(&self, pair: Pair<Rule>, span: Span) -> PResult<(Expr, usize)> {
        let is_list = pair.as_rule() == Rule::list;
        let mut items = Vec::new();
        let mut commas = 0;
        let mut depth = 1;
        for p in pair.into_inner() {
            match p.as_rule() {
                Rule::comma => commas += 1,
                Rule::expr => {
                    let (e, d) = self.expr_d(p)?;
                    depth = depth.max(d + 1);
                    items.push(e);
                }
                _ => {}
            }
        }
        let kind = if is_list {
            ExprKind::List(items)
        } else if items.len() == 1 && commas == 0 {
            // `(e)` only groups: keep e, but with the parentheses' span.
            let inner = items.pop().expect("one item");
            return self.bounded(
                Expr {
                    kind: inner.kind,
                    span,
                },
                depth,
            );
        } else {
            ExprKind::Tuple(items)
        };
        self.bounded(Expr { kind, span }, depth)
    }
}

fn ident(pair: Pair<Rule>) -> Ident {
    Ident {
        name: pair.as_str().to_owned(),
        span: pair.as_span().into(),
    }
}

fn number(text: &str) -> Number {
    let clean: String = text.chars().filter(|&c| c != '_').collect();
    let whole = !clean.contains(['.', 'e', 'E']);
    // The grammar only admits digit strings here, so parsing as f64 cannot fail; overflow gives inf,
    // which `check` rejects as "not a finite number".
    let value = clean.parse::<f64>().unwrap_or(f64::INFINITY);
    let int = if whole {
        clean.parse::<u64>().ok()
    } else {
        None
    };
    Number { value, int }
}

fn unescape(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}
