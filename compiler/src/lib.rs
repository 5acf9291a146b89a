//! moec's compiler passes, in pipeline order (DESIGN.md):
//! `check` (AST → [`spec::Spec`]) → `lower` (Spec → [`ir::Graph`]) → `fuse` (Graph → kernel groups)
//! → `emit` (groups → WGSL + [`plan::Plan`]), plus `interp`, the reference interpreter every kernel
//! is tested against, and `stats`, the numbers `moec check` prints.

pub mod check;
pub mod emit;
pub mod fuse;
pub mod interp;
pub mod ir;
pub mod lower;
pub mod plan;
pub mod spec;
pub mod stats;
