//! The `.moe` spec language front end: a pest grammar (`moe.pest`), the [`Ast`] with a byte
//! [`Span`] on every node, and [`Diagnostic`], the located, user-facing error every later stage of
//! `moec check` reports through.
//!
//! ```
//! let ast = moec_grammar::parse("model tiny { dim = 64; layers = 2 }").unwrap();
//! assert_eq!(ast.model.name.name, "tiny");
//! assert_eq!(ast.model.fields[0].name.name, "dim");
//! ```

pub mod ast;
pub mod diagnostic;
mod format;
mod parser;

pub use ast::*;
pub use diagnostic::{did_you_mean, one_of, Diagnostic};
pub use format::format;
pub use parser::{parse, MAX_BRACKET_DEPTH, MAX_EXPR_DEPTH};
