//! The syntax tree of a `.moe` file. Every node carries the byte span it was parsed from, so that
//! `check` can point its diagnostics at exactly the name or the value that is wrong.

use serde::Serialize;

/// A half-open byte range `start..end` into the source text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

impl Span {
    pub fn new(start: usize, end: usize) -> Self {
        Span { start, end }
    }

    /// The smallest span covering both.
    pub fn join(self, other: Span) -> Span {
        Span {
            start: self.start.min(other.start),
            end: self.end.max(other.end),
        }
    }

    pub fn len(&self) -> usize {
        self.end.saturating_sub(self.start)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl From<Span> for miette::SourceSpan {
    fn from(s: Span) -> Self {
        miette::SourceSpan::new(s.start.into(), s.len())
    }
}

impl<'i> From<pest::Span<'i>> for Span {
    fn from(s: pest::Span<'i>) -> Self {
        Span {
            start: s.start(),
            end: s.end(),
        }
    }
}

/// A whole file: one `model` block and at most one `train` block.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ast {
    pub model: ModelDecl,
    pub train: Option<Block>,
}

/// `model NAME { fields [moe { ... }] }`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelDecl {
    pub name: Ident,
    /// The whole block, `model` keyword to closing brace.
    pub span: Span,
    /// `model NAME`: where "missing field" errors point.
    pub header: Span,
    pub fields: Vec<Field>,
    pub moe: Option<Block>,
}

/// A `moe { ... }` or `train { ... }` block.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Block {
    /// The whole block, keyword to closing brace.
    pub span: Span,
    /// The keyword: where "missing field" errors point.
    pub header: Span,
    pub fields: Vec<Field>,
}

/// A name as written, with its span.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

/// `name = value`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Field {
    pub name: Ident,
    pub value: Expr,
}

impl Field {
    /// The whole field, name to end of value.
    pub fn span(&self) -> Span {
        self.name.span.join(self.value.span)
    }
}

/// A value with its span. Parenthesised expressions `(e)` keep the span of the parentheses.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum ExprKind {
    Number(Number),
    Bool(bool),
    Str(String),
    /// `none`.
    None,
    /// A bare name: an enum value such as `rmsnorm`, a call written without arguments such as
    /// `softmax`, or (inside arithmetic) a model field such as `dim`.
    Ident(String),
    Call(Call),
    /// `(a, b, ...)`, at least one comma.
    Tuple(Vec<Expr>),
    /// `[a, b, ...]`.
    List(Vec<Expr>),
    /// `a + b`, `a - b`, `a * b`, `a / b`; `+` also joins balance terms (`aux(0.01) + z(0.001)`).
    Binary {
        op: BinOp,
        lhs: Box<Expr>,
        rhs: Box<Expr>,
    },
    /// `-a`.
    Neg(Box<Expr>),
    /// `G x M` (hierarchical expert groups).
    Groups {
        groups: Box<Expr>,
        members: Box<Expr>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
}

impl BinOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
        }
    }
}

/// A numeric literal. `int` is `Some` when it was written as a whole number (no `.` and no exponent)
/// that fits in a `u64`, so that large integers (seeds) survive exactly.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Number {
    pub value: f64,
    pub int: Option<u64>,
}

/// `name(arg, key = value)`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Call {
    pub name: Ident,
    pub args: Vec<Arg>,
}

/// One argument of a call; `name` is `Some` for `key = value`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Arg {
    pub name: Option<Ident>,
    pub value: Expr,
}

impl Arg {
    pub fn span(&self) -> Span {
        match &self.name {
            Some(n) => n.span.join(self.value.span),
            None => self.value.span,
        }
    }
}

impl Expr {
    /// Words for "found ..." in type errors: `a number`, `a string`, `` `softmax` ``, ...
    pub fn describe(&self) -> String {
        match &self.kind {
            ExprKind::Number(_) => "a number".into(),
            ExprKind::Bool(b) => format!("`{b}`"),
            ExprKind::Str(_) => "a string".into(),
            ExprKind::None => "`none`".into(),
            ExprKind::Ident(n) => format!("`{n}`"),
            ExprKind::Call(c) => format!("a call to `{}`", c.name.name),
            ExprKind::Tuple(_) => "a tuple".into(),
            ExprKind::List(_) => "a list".into(),
            ExprKind::Binary { op: BinOp::Add, .. } => "a sum".into(),
            ExprKind::Binary { .. } | ExprKind::Neg(_) => "an arithmetic expression".into(),
            ExprKind::Groups { .. } => "a `G x M` group shape".into(),
        }
    }

    /// The terms of a `+` chain, left to right (`a + b + c` → `[a, b, c]`); a single term otherwise.
    pub fn sum_terms(&self) -> Vec<&Expr> {
        match &self.kind {
            ExprKind::Binary {
                op: BinOp::Add,
                lhs,
                rhs,
            } => {
                let mut terms = lhs.sum_terms();
                terms.extend(rhs.sum_terms());
                terms
            }
            _ => vec![self],
        }
    }
}
