//! `check`: AST → [`Spec`]. Fills every default of docs/language.md and enforces every semantic rule, so
//! that later passes never re-validate. Every error is a [`Diagnostic`] pointing at the field name
//! or value that is wrong (or at the block header when a required field is missing).
//!
//! Defaults chosen here (what a user of HF transformers / PyTorch expects; docs/language.md lists all):
//! - `ffn`: `swiglu` with hidden = ⌊8·dim/3⌋ rounded up to a multiple of 64 (Llama); `gelu`/`relu`
//!   written without `hidden` get 4·dim. `moe.expert` defaults to the model's `ffn`.
//! - Non-transformer families have `heads = kv_heads = 1` (no attention).
//! - `top_k`: 2, or `experts` when there is only one expert; `switch` forces 1.
//! - `gate` arguments: `softmax(renorm = true)`, `noisy_top_k(noise = 1.0)`,
//!   `expert_choice(capacity = 2.0)` (Zhou et al. 2022, EC-CF2), `sinkhorn(iters = 8)`,
//!   `auction(rounds = 10, epsilon = 0.001, budget = 1.0, price_rate = 0.01)`.
//! - Balance coefficients written without a value: `aux` 0.01, `z` 0.001 (ST-MoE), `seq_aux` 0.0001
//!   (DeepSeek-V3), `cv2(importance = 0.1, load = 0.1)` (Shazeer 2017), `bias(rate = 0.001)`
//!   (DeepSeek-V3).
//! - `capacity = factor(F)` drops by `position` unless `drop = probability`.
//! - Optimizers: `adamw(lr = 3e-4, betas = (0.9, 0.999), eps = 1e-8, weight_decay = 0.0)` (PyTorch's
//!   betas and eps, HF Trainer's weight decay); `schedule_free_adamw` the same with `lr = 0.0025`
//!   (the reference implementation's default); `sgd(lr, momentum = 0.0)` needs `lr`;
//!   `adafactor(lr = 0.001, decay = -0.8, eps = 1e-30)` (HF's `decay_rate` and `eps[0]`);
//!   `shampoo(lr, ...)` and `muon(lr, ...)` need `lr` (their other defaults are LANGUAGE.md's); muon's
//!   `adamw = adamw(...)` takes `adamw`'s defaults except `lr`, which defaults to muon's `lr`
//!   (Moonlight: the 0.2·√max(rows, cols) scale matches AdamW's update RMS, so one lr serves both).
//! - `expert_lr = adaptive()` uses the optimizer's `lr` as `base`.
//! - `schedule`: `cosine(warmup = 0, min_lr = 0.0)`, `linear(warmup = 0)`.
//! - `synthetic(...)`: `kind = classes` for `mlp`, `copy` for language models; `seed` = the train `seed`.
//! - `tokens(...)`: `dtype = u16`.
//! - `checkpoint` and `log` carry `batches = 0` (only `eval` uses it).
//!
//! Rules beyond the obvious ones, each because a later pass could not do anything sensible otherwise:
//! - Fields that a family does not use (`heads` on an `lstm`, `vocab` on an `mlp`...) are errors.
//! - `groups` works with the token-choice gates (`softmax`, `sigmoid`, `noisy_top_k`, `switch`);
//!   `two_level` needs `top_k <= M` (the secondary gate picks inside one group), `group_limited`
//!   needs `top_k <= top_groups * M`.
//! - `cv2(load = b)` with `b > 0` needs `gate = noisy_top_k` (the smooth load estimator uses the noise);
//!   `bias(...)` needs a token-choice gate.
//! - `text(...)` needs `vocab >= 256`; `cifar10(...)` needs `family = mlp`, `inputs = 3072` (or
//!   `family = lstm`, `inputs = 96`, `context = 32`: rows of pixels) and `classes = 10`; the data must
//!   hold at least one sequence of `context + 1` tokens.
//! - A `cifar10(dir)` directory that does not exist is accepted (docs/DECISIONS.md, "lstm"): the data
//!   set is a separate 170 MB download, so a spec must check and build without it; `moec check` and
//!   `moec build` warn, and training stops with the runtime's missing-files error. A directory that
//!   exists but holds no batch files is still an error.
//! - An `lstm` model with `vocab` is a language model (no `inputs`/`classes`, no `bidirectional`: it
//!   would see the token it predicts); without one it is a sequence classifier (`inputs`, `classes`,
//!   `context` steps). Its default MoE placement is after every LSTM layer but the last.
//!
//! Arithmetic (`hidden = 4 * dim`) may use `+ - * /`, parentheses and the model's numeric fields
//! written as plain numbers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use moec_grammar::{
    did_you_mean, one_of, parse, Arg, Ast, BinOp, Block, Diagnostic, Expr, ExprKind, Field, Ident,
    Span,
};

use crate::spec::*;

type Result<T> = std::result::Result<T, Diagnostic>;

/// Parses and checks a `.moe` source. `path` names the file in messages and anchors relative data
/// paths (they are resolved against the spec's directory).
pub fn check(source: &str, path: &Path) -> Result<Spec> {
    let ast = parse(source).map_err(|d| d.with_path(path.display().to_string()))?;
    check_ast(&ast, source, path)
}

/// Checks an already parsed file; `source` must be the text `ast` was parsed from.
pub fn check_ast(ast: &Ast, source: &str, path: &Path) -> Result<Spec> {
    let base_dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let cx = Checker {
        src: Arc::new(source.to_owned()),
        path_name: path.display().to_string(),
        base_dir,
    };
    cx.spec(ast)
}

const MODEL_FIELDS: &[&str] = &[
    "family",
    "vocab",
    "inputs",
    "classes",
    "dim",
    "layers",
    "heads",
    "kv_heads",
    "context",
    "norm",
    "rope_theta",
    "ffn",
    "bidirectional",
    "tie_embeddings",
    "qk_norm",
];
const MOE_FIELDS: &[&str] = &[
    "every",
    "layers",
    "first_dense",
    "experts",
    "top_k",
    "expert",
    "shared_experts",
    "gate",
    "groups",
    "hierarchy",
    "top_groups",
    "capacity",
    "balance",
    "jitter",
    "router_precision",
];
const TRAIN_FIELDS: &[&str] = &[
    "data",
    "split",
    "batch",
    "accumulate",
    "steps",
    "optimizer",
    "expert_lr",
    "schedule",
    "clip",
    "precision",
    "recompute",
    "seed",
    "eval",
    "checkpoint",
    "log",
];

/// Upper bound on `layers`: far beyond any real model, and it keeps block resolution cheap.
const MAX_LAYERS: usize = 65_536;

/// Largest integer every f64 represents exactly; whole-number fields must stay below it.
const MAX_EXACT: f64 = 9_007_199_254_740_992.0;

struct Checker {
    src: Arc<String>,
    path_name: String,
    base_dir: PathBuf,
}

/// The fields of one block by name, after unknown and duplicate names were rejected.
struct Fields<'a> {
    block: &'static str,
    header: Span,
    map: HashMap<&'a str, &'a Field>,
}

impl<'a> Fields<'a> {
    fn get(&self, name: &str) -> Option<&'a Field> {
        self.map.get(name).copied()
    }
}

/// A call, or a bare name standing for a call without arguments (`gate = softmax`).
struct CallView<'a> {
    name: &'a str,
    span: Span,
    args: &'a [Arg],
}

/// Where a `moe` block puts its MoE layers: its `layers`, `every` and `first_dense` fields.
struct Placement<'a> {
    /// The listed block indices with their spans.
    layers: Option<(&'a Field, Vec<(usize, Span)>)>,
    every: usize,
    every_field: Option<&'a Field>,
    first_dense: usize,
    first_dense_field: Option<&'a Field>,
}

/// A `moe` block's hierarchical routing fields, kept with their fields for the spans of errors.
struct Grouping<'a> {
    groups: Option<(usize, usize)>,
    groups_field: Option<&'a Field>,
    hierarchy: Hierarchy,
    hierarchy_field: Option<&'a Field>,
    top_groups: usize,
    top_groups_field: Option<&'a Field>,
}

/// Numeric names arithmetic may refer to (the model's fields written as plain numbers).
type Env = HashMap<String, f64>;

impl Checker {
    fn err(&self, span: Span, message: impl Into<String>) -> Diagnostic {
        Diagnostic::with_shared_source(self.src.clone(), span, message).with_path(&self.path_name)
    }

    fn spec(&self, ast: &Ast) -> Result<Spec> {
        let decl = &ast.model;
        let model_fields = self.fields("model", decl.header, &decl.fields, MODEL_FIELDS)?;
        let env = self.env(&model_fields);
        let model = self.model(&model_fields, &env)?;
        let moe = match &decl.moe {
            Some(block) => self.moe(block, &model, &env)?,
            None => None,
        };
        let train = match &ast.train {
            Some(block) => Some(self.train(block, &model, &env)?),
            None => None,
        };
        Ok(Spec {
            name: decl.name.name.clone(),
            model,
            moe,
            train,
        })
    }

    /// Indexes a block's fields, rejecting unknown names (with a suggestion) and duplicates.
    fn fields<'a>(
        &self,
        block: &'static str,
        header: Span,
        fields: &'a [Field],
        known: &[&'static str],
    ) -> Result<Fields<'a>> {
        let mut map: HashMap<&'a str, &'a Field> = HashMap::new();
        for f in fields {
            let name = f.name.name.as_str();
            if !known.contains(&name) {
                return Err(self.unknown_field(block, &f.name, known));
            }
            if let Some(first) = map.get(name) {
                let (line, _) =
                    moec_grammar::diagnostic::line_col(&self.src, first.name.span.start);
                return Err(self
                    .err(
                        f.name.span,
                        format!("duplicate field `{name}` in `{block}` block"),
                    )
                    .with_label("set a second time")
                    .with_help(format!("`{name}` is already set on line {line}; keep one")));
            }
            map.insert(name, f);
        }
        Ok(Fields { block, header, map })
    }

    fn unknown_field(&self, block: &str, name: &Ident, known: &[&'static str]) -> Diagnostic {
        let d = self
            .err(
                name.span,
                format!("unknown field `{}` in `{block}` block", name.name),
            )
            .with_label(format!("not a `{block}` field"));
        // A real field of another block is a misplaced field, not a typo.
        let elsewhere = [
            ("model", MODEL_FIELDS),
            ("moe", MOE_FIELDS),
            ("train", TRAIN_FIELDS),
        ]
        .into_iter()
        .find(|(b, fs)| *b != block && fs.contains(&name.name.as_str()));
        if let Some(s) = did_you_mean(&name.name, known.iter().copied()) {
            d.with_help(format!("did you mean `{s}`?"))
        } else if let Some((other, _)) = elsewhere {
            let hint = if other == "moe" {
                " (inside `model { ... }`)"
            } else {
                ""
            };
            d.with_help(format!(
                "`{}` belongs in the `{other}` block{hint}",
                name.name
            ))
        } else {
            d.with_help(format!("the `{block}` fields are {}", one_of(known)))
        }
    }

    fn missing(&self, fields: &Fields, name: &str, example: &str) -> Diagnostic {
        self.err(
            fields.header,
            format!("missing field `{name}` in `{}` block", fields.block),
        )
        .with_label(format!("this block needs `{name}`"))
        .with_help(format!("add e.g. `{example}`"))
    }

    /// Model fields written as plain numbers, for arithmetic such as `hidden = 4 * dim`.
    fn env(&self, fields: &Fields) -> Env {
        let empty = Env::new();
        fields
            .map
            .iter()
            .filter_map(|(name, f)| {
                self.eval(&f.value, name, &empty)
                    .ok()
                    .map(|v| (name.to_string(), v))
            })
            .collect()
    }

    // ---------------------------------------------------------------- model

    fn model(&self, fs: &Fields, env: &Env) -> Result<Model> {
        let family = match fs.get("family") {
            Some(f) => self.enum_of(
                &f.value,
                "family",
                &[
                    ("transformer", Family::Transformer),
                    ("lstm", Family::Lstm),
                    ("mlp", Family::Mlp),
                ],
            )?,
            None => Family::Transformer,
        };
        let family_name = match family {
            Family::Transformer => "transformer",
            Family::Lstm => "lstm",
            Family::Mlp => "mlp",
        };
        // An `lstm` model is a language model when it has a vocabulary, else a sequence classifier.
        let is_lm = match family {
            Family::Transformer => true,
            Family::Lstm => fs.get("vocab").is_some() || fs.get("inputs").is_none(),
            Family::Mlp => false,
        };
        self.family_fields(fs, family, family_name)?;

        let req = |name: &str, example: &str| self.required(fs, family_name, name, example);
        let dim = self.positive(&req("dim", "dim = 256")?.value, "dim", env)?;
        let layers_field = req("layers", "layers = 4")?;
        let layers = self.positive(&layers_field.value, "layers", env)?;
        if layers > MAX_LAYERS {
            return Err(self
                .err(
                    layers_field.value.span,
                    format!("`layers = {layers}` is more than moec supports ({MAX_LAYERS})"),
                )
                .with_label("too many blocks"));
        }
        if let (Family::Lstm, true) = (family, is_lm) {
            self.lstm_lm_fields(fs)?;
        }
        let vocab = if is_lm {
            Some(self.positive(&req("vocab", "vocab = 256")?.value, "vocab", env)?)
        } else {
            None
        };
        // Sequence length: of every LM, and the time steps of an `lstm` classifier.
        let context = if is_lm || family == Family::Lstm {
            Some(self.positive(&req("context", "context = 128")?.value, "context", env)?)
        } else {
            None
        };
        let (inputs, classes) = if !is_lm {
            let (inputs, classes) = self.classifier_sizes(fs, family_name, env)?;
            (Some(inputs), Some(classes))
        } else {
            (None, None)
        };

        let (heads, kv_heads) = if family == Family::Transformer {
            self.attention_heads(fs, dim, env)?
        } else {
            (1, 1)
        };

        let norm = match fs.get("norm") {
            Some(f) => self.enum_of(
                &f.value,
                "norm",
                &[("rmsnorm", Norm::RmsNorm), ("layernorm", Norm::LayerNorm)],
            )?,
            None => Norm::RmsNorm,
        };
        let rope_theta = match fs.get("rope_theta") {
            Some(f) => {
                self.float_where(&f.value, "rope_theta", env, |v| v > 0.0, "must be positive")?
            }
            None => 10000.0,
        };
        let ffn = match fs.get("ffn") {
            Some(f) => self.ffn(&f.value, "ffn", dim, env)?,
            None => Ffn {
                activation: Activation::SwiGlu,
                hidden: default_hidden(Activation::SwiGlu, dim),
            },
        };
        let bidirectional = match fs.get("bidirectional") {
            Some(f) => self.boolean(&f.value, "bidirectional")?,
            None => false,
        };
        let tie_embeddings = match fs.get("tie_embeddings") {
            Some(f) => self.boolean(&f.value, "tie_embeddings")?,
            None => false,
        };
        let qk_norm = match fs.get("qk_norm") {
            Some(f) => self.boolean(&f.value, "qk_norm")?,
            None => false,
        };
        Ok(Model {
            family,
            vocab,
            inputs,
            classes,
            dim,
            layers,
            heads,
            kv_heads,
            context,
            norm,
            rope_theta,
            ffn,
            bidirectional,
            tie_embeddings,
            qk_norm,
        })
    }

    /// Refuses a field its family does not use, naming the families that do.
    fn family_fields(&self, fs: &Fields, family: Family, family_name: &str) -> Result<()> {
        let only: &[(&str, &[Family], &str)] = &[
            ("heads", &[Family::Transformer], "`family = transformer`"),
            ("kv_heads", &[Family::Transformer], "`family = transformer`"),
            (
                "rope_theta",
                &[Family::Transformer],
                "`family = transformer`",
            ),
            ("bidirectional", &[Family::Lstm], "`family = lstm`"),
            ("qk_norm", &[Family::Transformer], "`family = transformer`"),
            (
                "vocab",
                &[Family::Transformer, Family::Lstm],
                "language models (`transformer`, `lstm`)",
            ),
            (
                "context",
                &[Family::Transformer, Family::Lstm],
                "language models (`transformer`, `lstm`)",
            ),
            (
                "tie_embeddings",
                &[Family::Transformer, Family::Lstm],
                "language models (`transformer`, `lstm`)",
            ),
            (
                "inputs",
                &[Family::Mlp, Family::Lstm],
                "classifiers (`mlp`, `lstm`)",
            ),
            (
                "classes",
                &[Family::Mlp, Family::Lstm],
                "classifiers (`mlp`, `lstm`)",
            ),
        ];
        for (name, families, who) in only {
            if let Some(f) = fs.get(name) {
                if !families.contains(&family) {
                    return Err(self
                        .err(f.name.span, format!("`{name}` applies only to {who}"))
                        .with_label(format!("not used by a `{family_name}` model"))
                        .with_help("remove this field, or change `family`"));
                }
            }
        }
        Ok(())
    }

    /// A required field, or an error that names the family needing it and shows `example`.
    fn required<'a>(
        &self,
        fs: &Fields<'a>,
        family_name: &str,
        name: &str,
        example: &str,
    ) -> Result<&'a Field> {
        fs.get(name).ok_or_else(|| {
            self.missing(fs, name, example)
                .with_label(format!("a `{family_name}` model needs `{name}`"))
        })
    }

    /// A classifier's `inputs` and `classes` (at least 2).
    fn classifier_sizes(
        &self,
        fs: &Fields,
        family_name: &str,
        env: &Env,
    ) -> Result<(usize, usize)> {
        let inputs = self.required(fs, family_name, "inputs", "inputs = 3072")?;
        let i = self.positive(&inputs.value, "inputs", env)?;
        let f = self.required(fs, family_name, "classes", "classes = 10")?;
        let c = self.positive(&f.value, "classes", env)?;
        if c < 2 {
            return Err(self
                .err(f.value.span, "`classes` must be at least 2")
                .with_label("a classifier needs two or more classes"));
        }
        Ok((i, c))
    }

    /// A transformer's `heads` and `kv_heads`: heads divide `dim` into even (RoPE) head
    /// dimensions, and key/value heads divide the heads.
    fn attention_heads(&self, fs: &Fields, dim: usize, env: &Env) -> Result<(usize, usize)> {
        let heads_field = self.required(fs, "transformer", "heads", "heads = 4")?;
        let heads = self.positive(&heads_field.value, "heads", env)?;
        if !dim.is_multiple_of(heads) {
            return Err(self
                .err(
                    heads_field.value.span,
                    format!("`dim = {dim}` is not divisible by `heads = {heads}`"),
                )
                .with_label("must divide `dim`")
                .with_help(format!(
                    "head dimension = dim / heads must be whole; try heads = {}",
                    divisor_near(dim, heads)
                )));
        }
        if !(dim / heads).is_multiple_of(2) {
            return Err(self
                .err(heads_field.value.span, format!("RoPE needs an even head dimension, but dim / heads = {dim} / {heads} = {}", dim / heads))
                .with_label("gives an odd head dimension")
                .with_help("rotary embeddings rotate pairs of channels; choose `heads` so that dim / heads is even"));
        }
        let kv_heads = match fs.get("kv_heads") {
            Some(f) => {
                let kv = self.positive(&f.value, "kv_heads", env)?;
                if kv > heads {
                    return Err(self
                        .err(f.value.span, format!("`kv_heads = {kv}` is more than `heads = {heads}`"))
                        .with_label("must be at most `heads`")
                        .with_help("grouped-query attention shares each key/value head among several query heads"));
                }
                if heads % kv != 0 {
                    return Err(self
                        .err(
                            f.value.span,
                            format!("`heads = {heads}` is not divisible by `kv_heads = {kv}`"),
                        )
                        .with_label("must divide `heads`")
                        .with_help("each key/value head serves the same number of query heads"));
                }
                kv
            }
            None => heads,
        };
        Ok((heads, kv_heads))
    }

    /// Fields an `lstm` language model must not have: classifier fields, and `bidirectional = true`
    /// (the reverse direction would read the very token each position predicts).
    fn lstm_lm_fields(&self, fs: &Fields) -> Result<()> {
        for name in ["inputs", "classes"] {
            if let Some(f) = fs.get(name) {
                return Err(self
                    .err(f.name.span, format!("`{name}` is a classifier field, but this `lstm` model has a `vocab`"))
                    .with_label("an `lstm` model is a language model (`vocab`) or a sequence classifier (`inputs`, `classes`), not both")
                    .with_help("remove `vocab` for a classifier, or this field for a language model"));
            }
        }
        if let Some(f) = fs.get("bidirectional") {
            if let ExprKind::Bool(true) = f.value.kind {
                return Err(self
                    .err(f.value.span, "a bidirectional language model would see the token it predicts")
                    .with_label("the reverse direction reads position t + 1, the target of position t")
                    .with_help("use `bidirectional = true` for sequence classifiers (`inputs`, `classes`), or remove it"));
            }
        }
        Ok(())
    }

    /// `swiglu(hidden = H)`, `gelu(H)`, `relu` (default hidden).
    fn ffn(&self, e: &Expr, what: &str, dim: usize, env: &Env) -> Result<Ffn> {
        let c = self.call_form(e, what, &["swiglu", "gelu", "relu"])?;
        let activation = match c.name {
            "swiglu" => Activation::SwiGlu,
            "gelu" => Activation::Gelu,
            "relu" => Activation::Relu,
            other => unlisted("activation", other),
        };
        let [hidden] = self.bind(&c, &["hidden"])?;
        let hidden = match hidden {
            Some(h) => self.positive(h, "hidden", env)?,
            None => default_hidden(activation, dim),
        };
        Ok(Ffn { activation, hidden })
    }

    // ---------------------------------------------------------------- moe

    fn moe(&self, block: &Block, model: &Model, env: &Env) -> Result<Option<Moe>> {
        let fs = self.fields("moe", block.header, &block.fields, MOE_FIELDS)?;
        let experts_field = fs.get("experts").ok_or_else(|| {
            self.missing(&fs, "experts", "experts = 8")
                .with_help("add e.g. `experts = 8` (or `experts = 0` for a dense model)")
        })?;
        let experts = self.uint(&experts_field.value, "experts", env)?;

        let gate = match fs.get("gate") {
            Some(f) => self.gate(&f.value, env)?,
            None => Gate::Softmax { renorm: true },
        };
        let expert = match fs.get("expert") {
            Some(f) => self.ffn(&f.value, "expert", model.dim, env)?,
            None => model.ffn,
        };
        let shared_experts = match fs.get("shared_experts") {
            Some(f) => self.uint(&f.value, "shared_experts", env)?,
            None => 0,
        };
        let capacity = match fs.get("capacity") {
            Some(f) => self.capacity(&f.value, env)?,
            None => Capacity::Dropless,
        };
        let jitter = match fs.get("jitter") {
            Some(f) => self.float_where(
                &f.value,
                "jitter",
                env,
                |v| (0.0..1.0).contains(&v),
                "must be in [0, 1)",
            )?,
            None => 0.0,
        };
        let router_precision = match fs.get("router_precision") {
            Some(f) => self.enum_of(
                &f.value,
                "router_precision",
                &[("f32", Precision::F32), ("f16", Precision::F16)],
            )?,
            None => Precision::F32,
        };
        let balance = match fs.get("balance") {
            Some(f) => self.balance(&f.value, &gate, env)?,
            None => vec![Balance::Aux(0.01)],
        };
        let placement = self.placement(&fs, env)?;
        let top_k = match fs.get("top_k") {
            Some(f) => Some((f, self.positive(&f.value, "top_k", env)?)),
            None => None,
        };
        let grouping = self.grouping(&fs, env)?;

        if experts == 0 {
            // A dense model: the rest of the block only had to be well-formed.
            return Ok(None);
        }
        let blocks = self.moe_blocks(&placement, block, model)?;
        let top_k_field = top_k.map(|(f, _)| f);
        let top_k = self.top_k(&gate, top_k, experts)?;
        self.check_grouping(&grouping, &gate, experts, top_k, top_k_field)?;
        Ok(Some(Moe {
            blocks,
            experts,
            top_k,
            expert,
            shared_experts,
            gate,
            groups: grouping.groups,
            hierarchy: grouping.hierarchy,
            top_groups: grouping.top_groups,
            capacity,
            balance,
            jitter,
            router_precision,
        }))
    }

    /// A `moe` block's `every`, `first_dense` and `layers` fields.
    fn placement<'a>(&self, fs: &Fields<'a>, env: &Env) -> Result<Placement<'a>> {
        let every_field = fs.get("every");
        let every = match every_field {
            Some(f) => self.positive(&f.value, "every", env)?,
            None => 1,
        };
        let first_dense_field = fs.get("first_dense");
        let first_dense = match first_dense_field {
            Some(f) => self.uint(&f.value, "first_dense", env)?,
            None => 0,
        };
        let layers = match fs.get("layers") {
            Some(f) => Some((f, self.index_list(&f.value, env)?)),
            None => None,
        };
        Ok(Placement {
            layers,
            every,
            every_field,
            first_dense,
            first_dense_field,
        })
    }

    /// A `moe` block's `groups`, `hierarchy` and `top_groups` fields.
    fn grouping<'a>(&self, fs: &Fields<'a>, env: &Env) -> Result<Grouping<'a>> {
        let groups_field = fs.get("groups");
        let groups = match groups_field {
            Some(f) => Some(self.groups(&f.value, env)?),
            None => None,
        };
        let hierarchy_field = fs.get("hierarchy");
        let hierarchy = match hierarchy_field {
            Some(f) => self.enum_of(
                &f.value,
                "hierarchy",
                &[
                    ("two_level", Hierarchy::TwoLevel),
                    ("group_limited", Hierarchy::GroupLimited),
                ],
            )?,
            None => Hierarchy::TwoLevel,
        };
        let top_groups_field = fs.get("top_groups");
        let top_groups = match top_groups_field {
            Some(f) => self.positive(&f.value, "top_groups", env)?,
            None => 1,
        };
        Ok(Grouping {
            groups,
            groups_field,
            hierarchy,
            hierarchy_field,
            top_groups,
            top_groups_field,
        })
    }

    /// The sorted indices of the MoE blocks: the listed `layers`, or by `every` and `first_dense`.
    fn moe_blocks(&self, p: &Placement, block: &Block, model: &Model) -> Result<Vec<usize>> {
        let first_dense = p.first_dense;
        let Some((f, list)) = &p.layers else {
            return self.moe_blocks_every(p, block, model);
        };
        if list.is_empty() {
            return Err(self
                .err(f.value.span, "`layers = []` makes no block MoE")
                .with_label("empty list")
                .with_help(
                    "list block indices such as `[1, 3]`, or set `experts = 0` for a dense model",
                ));
        }
        let mut sorted: Vec<usize> = Vec::with_capacity(list.len());
        for (i, span) in list {
            if *i >= model.layers {
                return Err(self
                    .err(
                        *span,
                        format!(
                            "block index {i} is out of range: the model has {} layers (0..{})",
                            model.layers,
                            model.layers - 1
                        ),
                    )
                    .with_label("no such block")
                    .with_help("MoE block indices are 0-based"));
            }
            if sorted.contains(i) {
                return Err(self
                    .err(*span, format!("block {i} is listed twice"))
                    .with_label("repeated index"));
            }
            if *i < first_dense {
                return Err(self
                    .err(*span, format!("block {i} is listed in `layers`, but `first_dense = {first_dense}` keeps it dense"))
                    .with_label("contradicts `first_dense`")
                    .with_help("remove the index or lower `first_dense`"));
            }
            sorted.push(*i);
        }
        sorted.sort_unstable();
        Ok(sorted)
    }

    /// The MoE blocks without a `layers` list: every `every`-th block from `first_dense` on.
    fn moe_blocks_every(&self, p: &Placement, block: &Block, model: &Model) -> Result<Vec<usize>> {
        let (every, first_dense) = (p.every, p.first_dense);
        if let Some(f) = p.first_dense_field {
            if first_dense >= model.layers {
                return Err(self
                    .err(f.value.span, format!("`first_dense = {first_dense}` leaves no MoE block: the model has {} layers", model.layers))
                    .with_label("keeps every block dense")
                    .with_help("use `experts = 0` for a dense model"));
            }
        }
        // The `lstm` family's default (LANGUAGE.md): an MoE after every LSTM layer but the last.
        let last = if model.family == Family::Lstm && p.every_field.is_none() {
            model.layers - 1
        } else {
            model.layers
        };
        let b: Vec<usize> = (first_dense..last)
            .filter(|i| (i + 1) % every == 0)
            .collect();
        if b.is_empty() && last < model.layers {
            return Err(self
                .err(block.header, format!("an `lstm` model places its MoE layers between LSTM layers by default, which leaves none here ({} layers, `first_dense = {first_dense}`)", model.layers))
                .with_label("no MoE layer")
                .with_help("name the blocks with `layers = [...]` (an MoE after LSTM layer i), or add layers"));
        }
        if b.is_empty() {
            let span = p.every_field.map_or(block.header, |f| f.value.span);
            return Err(self
                .err(
                    span,
                    format!(
                        "`every = {every}` makes no block MoE: the model has {} layers",
                        model.layers
                    ),
                )
                .with_label("no block index matches")
                .with_help(
                    "block i is MoE when (i + 1) % every == 0; lower `every` or add layers",
                ));
        }
        Ok(b)
    }

    /// Experts per token: 1 for `switch`, else `top_k` (at most `experts`) or 2.
    fn top_k(&self, gate: &Gate, top_k: Option<(&Field, usize)>, experts: usize) -> Result<usize> {
        match (gate, top_k) {
            (Gate::Switch, Some((f, k))) if k != 1 => Err(self
                .err(
                    f.value.span,
                    format!("`gate = switch` routes each token to one expert, but `top_k = {k}`"),
                )
                .with_label("must be 1 with `switch`")
                .with_help("remove `top_k`, or use `gate = softmax` for top-k routing")),
            (Gate::Switch, _) => Ok(1),
            (_, Some((f, k))) => {
                if k > experts {
                    return Err(self
                        .err(
                            f.value.span,
                            format!("`top_k = {k}` is more than `experts = {experts}`"),
                        )
                        .with_label("must be at most `experts`")
                        .with_help("each token picks top_k distinct experts"));
                }
                Ok(k)
            }
            (_, None) => Ok(2.min(experts)),
        }
    }

    /// Hierarchical routing's fields need `groups`, whose G * M must be the expert count, a
    /// token-choice gate, and room for `top_k` experts in what the hierarchy keeps.
    fn check_grouping(
        &self,
        grouping: &Grouping,
        gate: &Gate,
        experts: usize,
        top_k: usize,
        top_k_field: Option<&Field>,
    ) -> Result<()> {
        let top_groups = grouping.top_groups;
        if grouping.groups.is_none() {
            for (field, name) in [
                (grouping.hierarchy_field, "hierarchy"),
                (grouping.top_groups_field, "top_groups"),
            ] {
                if let Some(f) = field {
                    return Err(self
                        .err(f.name.span, format!("`{name}` needs `groups = G x M`"))
                        .with_label("no groups are set")
                        .with_help("add e.g. `groups = 4 x 2` (G groups of M experts)"));
                }
            }
        }
        let (Some((g, m)), Some(f)) = (grouping.groups, grouping.groups_field) else {
            return Ok(());
        };
        if g.checked_mul(m) != Some(experts) {
            return Err(self
                .err(
                    f.value.span,
                    format!(
                        "`groups = {g} x {m}` makes {} experts, but `experts = {experts}`",
                        g as u128 * m as u128
                    ),
                )
                .with_label("G * M must equal `experts`")
                .with_help(format!(
                    "choose G and M with G * M = {experts}, e.g. `groups = {} x {}`",
                    divisor_near(experts, g),
                    experts / divisor_near(experts, g)
                )));
        }
        if !matches!(
            gate,
            Gate::Softmax { .. } | Gate::Sigmoid | Gate::NoisyTopK { .. } | Gate::Switch
        ) {
            return Err(self
                .err(
                    f.name.span,
                    format!(
                        "`groups` works with the token-choice gates, not `gate = {}`",
                        gate_name(gate)
                    ),
                )
                .with_label("hierarchical routing needs a top-k gate")
                .with_help(
                    "use `softmax`, `sigmoid`, `noisy_top_k` or `switch`, or remove `groups`",
                ));
        }
        if top_groups > g {
            let span = grouping
                .top_groups_field
                .map_or(f.value.span, |t| t.value.span);
            return Err(self
                .err(span, format!("`top_groups = {top_groups}` is more than the {g} groups of `groups = {g} x {m}`"))
                .with_label(format!("must be at most {g}")));
        }
        let (limit, why) = match grouping.hierarchy {
            Hierarchy::TwoLevel => (
                m,
                format!("the secondary gate picks top_k inside one group of {m} experts"),
            ),
            Hierarchy::GroupLimited => (
                top_groups * m,
                format!("only top_groups * M = {} experts are kept", top_groups * m),
            ),
        };
        if top_k > limit {
            let span = top_k_field.map_or(f.value.span, |t| t.value.span);
            return Err(self
                .err(
                    span,
                    format!("`top_k = {top_k}` is more than {limit}: {why}"),
                )
                .with_label(format!("must be at most {limit}")));
        }
        Ok(())
    }

    fn gate(&self, e: &Expr, env: &Env) -> Result<Gate> {
        let c = self.call_form(
            e,
            "gate",
            &[
                "softmax",
                "sigmoid",
                "noisy_top_k",
                "switch",
                "expert_choice",
                "auction",
                "sinkhorn",
            ],
        )?;
        Ok(match c.name {
            "softmax" => {
                let [renorm] = self.bind(&c, &["renorm"])?;
                Gate::Softmax {
                    renorm: renorm
                        .map(|r| self.boolean(r, "renorm"))
                        .transpose()?
                        .unwrap_or(true),
                }
            }
            "sigmoid" => {
                self.bind::<0>(&c, &[])?;
                Gate::Sigmoid
            }
            "noisy_top_k" => {
                let [noise] = self.bind(&c, &["noise"])?;
                Gate::NoisyTopK {
                    noise: self.opt_float(
                        noise,
                        "noise",
                        env,
                        1.0,
                        |v| v >= 0.0,
                        "must not be negative",
                    )?,
                }
            }
            "switch" => {
                self.bind::<0>(&c, &[])?;
                Gate::Switch
            }
            "expert_choice" => {
                let [cap] = self.bind(&c, &["capacity"])?;
                Gate::ExpertChoice {
                    capacity: self.opt_float(
                        cap,
                        "capacity",
                        env,
                        2.0,
                        |v| v > 0.0,
                        "must be positive",
                    )?,
                }
            }
            "sinkhorn" => {
                let [iters] = self.bind(&c, &["iters"])?;
                Gate::Sinkhorn {
                    iters: iters
                        .map(|i| self.positive(i, "iters", env))
                        .transpose()?
                        .unwrap_or(8),
                }
            }
            "auction" => {
                let [rounds, epsilon, budget, price_rate] =
                    self.bind(&c, &["rounds", "epsilon", "budget", "price_rate"])?;
                Gate::Auction {
                    rounds: rounds
                        .map(|r| self.positive(r, "rounds", env))
                        .transpose()?
                        .unwrap_or(10),
                    epsilon: self.opt_float(
                        epsilon,
                        "epsilon",
                        env,
                        1e-3,
                        |v| v >= 0.0,
                        "must not be negative",
                    )?,
                    budget: self.opt_float(
                        budget,
                        "budget",
                        env,
                        1.0,
                        |v| v > 0.0,
                        "must be positive",
                    )?,
                    price_rate: self.opt_float(
                        price_rate,
                        "price_rate",
                        env,
                        0.01,
                        |v| v >= 0.0,
                        "must not be negative",
                    )?,
                }
            }
            other => unlisted("gate", other),
        })
    }

    fn capacity(&self, e: &Expr, env: &Env) -> Result<Capacity> {
        let c = self.call_form(e, "capacity", &["dropless", "factor"])?;
        if c.name == "dropless" {
            self.bind::<0>(&c, &[])?;
            return Ok(Capacity::Dropless);
        }
        let [factor, drop] = self.bind(&c, &["factor", "drop"])?;
        let factor = factor.ok_or_else(|| {
            self.err(c.span, "`factor(...)` needs the capacity factor")
                .with_label("no factor given")
                .with_help("e.g. `capacity = factor(1.25, drop = position)`")
        })?;
        let factor = self.float_where(factor, "factor", env, |v| v > 0.0, "must be positive")?;
        let drop = match drop {
            Some(d) => self.enum_of(
                d,
                "drop",
                &[
                    ("position", DropPolicy::Position),
                    ("probability", DropPolicy::Probability),
                ],
            )?,
            None => DropPolicy::Position,
        };
        Ok(Capacity::Factor { factor, drop })
    }

    fn balance(&self, e: &Expr, gate: &Gate, env: &Env) -> Result<Vec<Balance>> {
        if matches!(e.kind, ExprKind::None) {
            return Ok(Vec::new());
        }
        if let ExprKind::Binary {
            op: op @ (BinOp::Sub | BinOp::Mul | BinOp::Div),
            ..
        } = &e.kind
        {
            return Err(self
                .err(
                    e.span,
                    format!("balance terms are joined with `+`, not `{}`", op.symbol()),
                )
                .with_label("not a sum of terms")
                .with_help("e.g. `balance = aux(0.01) + z(0.001)`"));
        }
        let mut out: Vec<Balance> = Vec::new();
        let mut seen: Vec<&str> = Vec::new();
        for term in e.sum_terms() {
            if matches!(term.kind, ExprKind::None) {
                return Err(self
                    .err(term.span, "`none` cannot be part of a sum")
                    .with_label("`none` alone turns balancing off"));
            }
            let c = self.call_form(
                term,
                "balance term",
                &["aux", "z", "cv2", "bias", "seq_aux"],
            )?;
            if seen.contains(&c.name) {
                return Err(self
                    .err(c.span, format!("`{}` appears twice in `balance`", c.name))
                    .with_label("repeated term")
                    .with_help("give each kind of term once, with its coefficient"));
            }
            seen.push(c.name);
            out.push(self.balance_term(&c, gate, env)?);
        }
        Ok(out)
    }

    /// One term of `balance`, with its default coefficient; `cv2`'s load term and `bias` need a
    /// gate they can work with.
    fn balance_term(&self, c: &CallView, gate: &Gate, env: &Env) -> Result<Balance> {
        let nonneg = |v: f64| v >= 0.0;
        match c.name {
            "aux" | "z" | "seq_aux" => {
                let [coef] = self.bind(c, &["c"])?;
                let default = match c.name {
                    "aux" => 0.01,
                    "z" => 1e-3,
                    "seq_aux" => 1e-4,
                    other => unlisted("balance term", other),
                };
                let v = self.opt_float(
                    coef,
                    "coefficient",
                    env,
                    default,
                    nonneg,
                    "must not be negative",
                )?;
                Ok(match c.name {
                    "aux" => Balance::Aux(v),
                    "z" => Balance::Z(v),
                    "seq_aux" => Balance::SeqAux(v),
                    other => unlisted("balance term", other),
                })
            }
            "cv2" => {
                let [importance, load] = self.bind(c, &["importance", "load"])?;
                let importance = self.opt_float(
                    importance,
                    "importance",
                    env,
                    0.1,
                    nonneg,
                    "must not be negative",
                )?;
                let load =
                    self.opt_float(load, "load", env, 0.1, nonneg, "must not be negative")?;
                if load > 0.0 && !matches!(gate, Gate::NoisyTopK { .. }) {
                    return Err(self
                        .err(c.span, format!("the `load` term of `cv2` needs `gate = noisy_top_k(...)`, not `{}`", gate_name(gate)))
                        .with_label("its smooth load estimator uses the gate noise")
                        .with_help("use `gate = noisy_top_k(noise = 1.0)`, or `cv2(importance = 0.1, load = 0)`"));
                }
                Ok(Balance::Cv2 { importance, load })
            }
            "bias" => {
                let [rate] = self.bind(c, &["rate"])?;
                if !matches!(
                    gate,
                    Gate::Softmax { .. } | Gate::Sigmoid | Gate::NoisyTopK { .. } | Gate::Switch
                ) {
                    return Err(self
                        .err(
                            c.span,
                            format!(
                                "`bias(...)` steers top-k selection; `gate = {}` has none",
                                gate_name(gate)
                            ),
                        )
                        .with_label("needs a token-choice gate")
                        .with_help("use it with `softmax`, `sigmoid`, `noisy_top_k` or `switch`"));
                }
                Ok(Balance::Bias {
                    rate: self.opt_float(
                        rate,
                        "rate",
                        env,
                        1e-3,
                        nonneg,
                        "must not be negative",
                    )?,
                })
            }
            other => unlisted("balance term", other),
        }
    }

    /// `G x M`.
    fn groups(&self, e: &Expr, env: &Env) -> Result<(usize, usize)> {
        match &e.kind {
            ExprKind::Groups { groups, members } => Ok((
                self.positive(groups, "groups", env)?,
                self.positive(members, "groups", env)?,
            )),
            _ => Err(self
                .err(
                    e.span,
                    format!("`groups` must be `G x M`, found {}", e.describe()),
                )
                .with_label("expected `G x M`")
                .with_help("e.g. `groups = 8 x 8` for 8 groups of 8 experts")),
        }
    }

    /// `[1, 3, 5]`: block indices with their spans.
    fn index_list(&self, e: &Expr, env: &Env) -> Result<Vec<(usize, Span)>> {
        match &e.kind {
            ExprKind::List(items) => items
                .iter()
                .map(|i| Ok((self.uint(i, "layers", env)?, i.span)))
                .collect(),
            _ => Err(self
                .err(
                    e.span,
                    format!(
                        "`layers` in a `moe` block must be a list of block indices, found {}",
                        e.describe()
                    ),
                )
                .with_label("expected a list such as `[1, 3]`")
                .with_help("to make every N-th block MoE, use `every = N`")),
        }
    }

    // ---------------------------------------------------------------- train

    fn train(&self, block: &Block, model: &Model, env: &Env) -> Result<Train> {
        let fs = self.fields("train", block.header, &block.fields, TRAIN_FIELDS)?;
        let req = |name: &str, example: &str| {
            fs.get(name).ok_or_else(|| self.missing(&fs, name, example))
        };
        let seed = match fs.get("seed") {
            Some(f) => self.seed(&f.value, "seed", env)?,
            None => 0,
        };
        let data = self.data(
            &req("data", "data = text(\"input.txt\")")?.value,
            model,
            seed,
            env,
        )?;
        let split = match fs.get("split") {
            Some(f) => self.float_where(
                &f.value,
                "split",
                env,
                |v| v > 0.0 && v < 1.0,
                "must be between 0 and 1 (exclusive)",
            )?,
            None => 0.9,
        };
        let batch = self.positive(&req("batch", "batch = 16")?.value, "batch", env)?;
        let accumulate = match fs.get("accumulate") {
            Some(f) => self.positive(&f.value, "accumulate", env)?,
            None => 1,
        };
        let steps_field = req("steps", "steps = 1000")?;
        let steps = self.positive(&steps_field.value, "steps", env)?;
        let optimizer = match fs.get("optimizer") {
            Some(f) => self.optimizer(&f.value, env)?,
            None => Optimizer::AdamW {
                lr: 3e-4,
                betas: (0.9, 0.999),
                eps: 1e-8,
                weight_decay: 0.0,
            },
        };
        let lr = optimizer.lr();
        let expert_lr = match fs.get("expert_lr") {
            Some(f) => Some(self.expert_lr(&f.value, lr, env)?),
            None => None,
        };
        let schedule = match fs.get("schedule") {
            Some(f) => self.schedule(&f.value, steps, lr, env)?,
            None => Schedule::Constant,
        };
        let clip = match fs.get("clip") {
            Some(f) if matches!(f.value.kind, ExprKind::None) => None,
            Some(f) => {
                Some(self.float_where(&f.value, "clip", env, |v| v > 0.0, "must be positive")?)
            }
            None => None,
        };
        let precision = match fs.get("precision") {
            Some(f) => self.enum_of(
                &f.value,
                "precision",
                &[("f32", Precision::F32), ("f16", Precision::F16)],
            )?,
            None => Precision::F32,
        };
        let recompute = match fs.get("recompute") {
            Some(f) if matches!(f.value.kind, ExprKind::None) => Recompute::None,
            Some(f) => self.enum_of(
                &f.value,
                "recompute",
                &Recompute::ALL.map(|r| (r.name(), r)),
            )?,
            None => Recompute::None,
        };
        let eval = match fs.get("eval") {
            Some(f) => self.every(&f.value, "eval", true, env)?,
            None => Every {
                every: 100,
                batches: 4,
            },
        };
        let checkpoint = match fs.get("checkpoint") {
            Some(f) => self.every(&f.value, "checkpoint", false, env)?,
            None => Every {
                every: 500,
                batches: 0,
            },
        };
        let log = match fs.get("log") {
            Some(f) => self.every(&f.value, "log", false, env)?,
            None => Every {
                every: 10,
                batches: 0,
            },
        };
        Ok(Train {
            data,
            split,
            batch,
            accumulate,
            steps,
            optimizer,
            expert_lr,
            schedule,
            clip,
            precision,
            recompute,
            seed,
            eval,
            checkpoint,
            log,
        })
    }

    fn data(&self, e: &Expr, model: &Model, seed: u64, env: &Env) -> Result<Data> {
        let c = self.call_form(e, "data", &["text", "tokens", "cifar10", "synthetic"])?;
        match c.name {
            "text" => self.text_data(&c, model),
            "tokens" => self.tokens_data(&c, model),
            "cifar10" => self.cifar10_data(&c, model),
            "synthetic" => self.synthetic_data(&c, model, seed, env),
            other => unlisted("data source", other),
        }
    }

    /// Refuses language-model data `kind(...)` for a classifier.
    fn lm_only(&self, c: &CallView, model: &Model, kind: &str) -> Result<()> {
        // Classifiers: `mlp`, and `lstm` without a vocabulary (a sequence classifier).
        if model.vocab.is_none() {
            return Err(self
                .err(
                    c.span,
                    format!(
                        "`{kind}(...)` is language-model data, but this is {}",
                        if model.family == Family::Mlp {
                            "an `mlp` model"
                        } else {
                            "an `lstm` sequence classifier (no `vocab`)"
                        }
                    ),
                )
                .with_label("needs `family = transformer` or `lstm` with a `vocab`")
                .with_help(
                    "an `mlp` trains on `cifar10(\"dir\")` or `synthetic(kind = classes)`",
                ));
        }
        Ok(())
    }

    /// `text("path")`: a byte-level corpus, so the vocabulary must hold all 256 bytes.
    fn text_data(&self, c: &CallView, model: &Model) -> Result<Data> {
        self.lm_only(c, model, "text")?;
        let [path] = self.bind(c, &["path"])?;
        let path = self.required_arg(path, c, "path", "text(\"input.txt\")")?;
        let (text, span) = (self.string(path, "path")?, path.span);
        if model.vocab.is_some_and(|v| v < 256) {
            return Err(self
                .err(
                    c.span,
                    format!(
                        "`text(...)` reads bytes (256 symbols), but `vocab = {}`",
                        model.vocab.unwrap_or(0)
                    ),
                )
                .with_label("needs `vocab >= 256`")
                .with_help("set `vocab = 256`"));
        }
        let len = self.readable_file(&text, span)?;
        self.enough_tokens(len, model, span)?;
        Ok(Data::Text { path: text })
    }

    /// `tokens("path", dtype = u16 | u32)`: pre-tokenized ids, whose file size must be whole tokens.
    fn tokens_data(&self, c: &CallView, model: &Model) -> Result<Data> {
        self.lm_only(c, model, "tokens")?;
        let [path, dtype] = self.bind(c, &["path", "dtype"])?;
        let path = self.required_arg(path, c, "path", "tokens(\"train.bin\", dtype = u16)")?;
        let (text, span) = (self.string(path, "path")?, path.span);
        let dtype = match dtype {
            Some(d) => self.enum_of(
                d,
                "dtype",
                &[("u16", TokenDtype::U16), ("u32", TokenDtype::U32)],
            )?,
            None => TokenDtype::U16,
        };
        let width = match dtype {
            TokenDtype::U16 => 2,
            TokenDtype::U32 => 4,
        };
        let len = self.readable_file(&text, span)?;
        if len % width != 0 {
            return Err(self
                .err(
                    span,
                    format!(
                        "`{text}` has {len} bytes, not a whole number of {}-byte tokens",
                        width
                    ),
                )
                .with_label("size does not match `dtype`")
                .with_help("check `dtype` (u16 for GPT-2 sized vocabularies, u32 above 65536)"));
        }
        self.enough_tokens(len / width, model, span)?;
        Ok(Data::Tokens { path: text, dtype })
    }

    /// `cifar10("dir")`: images for an `mlp` (flat) or an `lstm` (row by row) with 10 classes.
    fn cifar10_data(&self, c: &CallView, model: &Model) -> Result<Data> {
        let [dir] = self.bind(c, &["dir"])?;
        let dir = self.required_arg(dir, c, "dir", "cifar10(\"data/cifar-10-batches-bin\")")?;
        let (text, span) = (self.string(dir, "dir")?, dir.span);
        // An `lstm` reads each image row by row: 32 steps of 32 pixels × RGB.
        let fits = match model.family {
            Family::Mlp => model.inputs == Some(3072),
            Family::Lstm => model.inputs == Some(96) && model.context == Some(32),
            Family::Transformer => false,
        };
        if !fits || model.classes != Some(10) {
            return Err(self
                .err(c.span, "`cifar10(...)` needs `family = mlp` with `inputs = 3072` (32×32×3), or `family = lstm` with `inputs = 96` and `context = 32` (rows of 32 RGB pixels), and `classes = 10`")
                .with_label("does not match the model")
                .with_help("set `family = mlp`, `inputs = 3072` and `classes = 10` in the `model` block"));
        }
        self.readable_dir(&text, span)?;
        Ok(Data::Cifar10 { dir: text })
    }

    /// `synthetic(kind, seed)`: its kind must suit the model (classes for classifiers); the seed
    /// defaults to the run's.
    fn synthetic_data(&self, c: &CallView, model: &Model, seed: u64, env: &Env) -> Result<Data> {
        // Classifiers: `mlp`, and `lstm` without a vocabulary (a sequence classifier).
        let classifier = model.vocab.is_none();
        let [kind, data_seed] = self.bind(c, &["kind", "seed"])?;
        let kind = match kind {
            Some(k) => {
                let kind = self.enum_of(
                    k,
                    "kind",
                    &[
                        ("copy", SyntheticKind::Copy),
                        ("markov", SyntheticKind::Markov),
                        ("classes", SyntheticKind::Classes),
                    ],
                )?;
                if classifier != (kind == SyntheticKind::Classes) {
                    let want = if classifier {
                        "`classes` for a classifier"
                    } else {
                        "`copy` or `markov` for a language model"
                    };
                    return Err(self
                        .err(k.span, "this synthetic data does not fit the model")
                        .with_label(format!("use {want}")));
                }
                kind
            }
            None if classifier => SyntheticKind::Classes,
            None => SyntheticKind::Copy,
        };
        let seed = match data_seed {
            Some(s) => self.seed(s, "seed", env)?,
            None => seed,
        };
        Ok(Data::Synthetic { kind, seed })
    }

    fn resolve(&self, path: &str) -> PathBuf {
        self.base_dir.join(path)
    }

    /// The file's length in bytes, or an error at the path's span if it cannot be opened or is empty.
    fn readable_file(&self, path: &str, span: Span) -> Result<usize> {
        let full = self.resolve(path);
        let meta = std::fs::File::open(&full)
            .and_then(|f| f.metadata())
            .map_err(|e| {
                self.err(
                    span,
                    format!("cannot read training data `{path}`: {}", io_reason(&e)),
                )
                .with_label(format!("looked for {}", full.display()))
                .with_help("data paths are relative to the spec file's directory")
            })?;
        if !meta.is_file() {
            return Err(self
                .err(span, format!("training data `{path}` is not a file"))
                .with_label(format!("{} is a directory", full.display())));
        }
        if meta.len() == 0 {
            return Err(self
                .err(span, format!("training data `{path}` is empty"))
                .with_label("0 bytes"));
        }
        Ok(usize::try_from(meta.len()).unwrap_or(usize::MAX))
    }

    /// A readable directory with CIFAR-10 batch files, or one that does not exist yet (module docs).
    fn readable_dir(&self, path: &str, span: Span) -> Result<()> {
        let full = self.resolve(path);
        let entries = match std::fs::read_dir(&full) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            entries => entries,
        };
        let entries = entries.map_err(|e| {
            self.err(
                span,
                format!(
                    "cannot read training data directory `{path}`: {}",
                    io_reason(&e)
                ),
            )
            .with_label(format!("looked for {}", full.display()))
            .with_help("data paths are relative to the spec file's directory")
        })?;
        let has_batches = entries
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().ends_with(".bin"));
        if !has_batches {
            return Err(self
                .err(span, format!("`{path}` holds no CIFAR-10 batch files (`*.bin`)"))
                .with_label(format!("no .bin files in {}", full.display()))
                .with_help("point at the extracted `cifar-10-batches-bin` directory (data_batch_1.bin ... test_batch.bin)"));
        }
        Ok(())
    }

    /// A language model needs at least one sequence of `context + 1` tokens (inputs and shifted targets).
    fn enough_tokens(&self, tokens: usize, model: &Model, span: Span) -> Result<()> {
        if let Some(context) = model.context {
            if tokens < context + 1 {
                return Err(self
                    .err(span, format!("the data has {tokens} tokens, fewer than one sequence of context + 1 = {}", context + 1))
                    .with_label("too short")
                    .with_help("use more data or a smaller `context`"));
            }
        }
        Ok(())
    }

    fn optimizer(&self, e: &Expr, env: &Env) -> Result<Optimizer> {
        let c = self.call_form(
            e,
            "optimizer",
            &[
                "adamw",
                "sgd",
                "adafactor",
                "schedule_free_adamw",
                "shampoo",
                "muon",
            ],
        )?;
        let lr_ok = |v: f64| v > 0.0;
        Ok(match c.name {
            "adamw" => {
                let a = self.adam_args(&c, 3e-4, env)?;
                Optimizer::AdamW {
                    lr: a.lr,
                    betas: a.betas,
                    eps: a.eps,
                    weight_decay: a.weight_decay,
                }
            }
            "schedule_free_adamw" => {
                let a = self.adam_args(&c, 2.5e-3, env)?;
                Optimizer::ScheduleFreeAdamW {
                    lr: a.lr,
                    betas: a.betas,
                    eps: a.eps,
                    weight_decay: a.weight_decay,
                }
            }
            "shampoo" => self.shampoo(&c, env)?,
            "muon" => self.muon(&c, env)?,
            "sgd" => {
                let [lr, momentum] = self.bind(&c, &["lr", "momentum"])?;
                let lr = self.required_arg(lr, &c, "lr", "sgd(lr = 0.1, momentum = 0.9)")?;
                Optimizer::Sgd {
                    lr: self.float_where(lr, "lr", env, lr_ok, "must be positive")?,
                    momentum: self.opt_float(
                        momentum,
                        "momentum",
                        env,
                        0.0,
                        |v| (0.0..1.0).contains(&v),
                        "must be in [0, 1)",
                    )?,
                }
            }
            "adafactor" => {
                let [lr, decay, eps] = self.bind(&c, &["lr", "decay", "eps"])?;
                Optimizer::Adafactor {
                    lr: self.opt_float(lr, "lr", env, 1e-3, lr_ok, "must be positive")?,
                    decay: self.opt_float(
                        decay,
                        "decay",
                        env,
                        -0.8,
                        |v| (-1.0..0.0).contains(&v),
                        "must be in [-1, 0)",
                    )?,
                    eps: self.opt_float(eps, "eps", env, 1e-30, |v| v > 0.0, "must be positive")?,
                }
            }
            other => unlisted("optimizer", other),
        })
    }

    /// `adamw(lr, betas, eps, weight_decay)` (and `schedule_free_adamw`), `lr` defaulting to
    /// `default_lr`.
    fn adam_args(&self, c: &CallView, default_lr: f64, env: &Env) -> Result<AdamArgs> {
        let [lr, betas, eps, wd] = self.bind(c, &["lr", "betas", "eps", "weight_decay"])?;
        Ok(AdamArgs {
            lr: self.opt_float(lr, "lr", env, default_lr, |v| v > 0.0, "must be positive")?,
            betas: match betas {
                Some(b) => self.betas(b, env)?,
                None => (0.9, 0.999),
            },
            eps: self.opt_float(eps, "eps", env, 1e-8, |v| v > 0.0, "must be positive")?,
            weight_decay: self.non_negative(wd, "weight_decay", env)?,
        })
    }

    fn non_negative(&self, e: Option<&Expr>, what: &str, env: &Env) -> Result<f64> {
        self.opt_float(e, what, env, 0.0, |v| v >= 0.0, "must not be negative")
    }

    /// `shampoo(lr, betas = (0.9, 0.999), eps = 1e-8, decay = 0.9, root_every = 10, max_dim = 1024,
    /// weight_decay = 0)`; `lr` is required.
    fn shampoo(&self, c: &CallView, env: &Env) -> Result<Optimizer> {
        let [lr, betas, eps, decay, root_every, max_dim, wd] = self.bind(
            c,
            &[
                "lr",
                "betas",
                "eps",
                "decay",
                "root_every",
                "max_dim",
                "weight_decay",
            ],
        )?;
        let lr = self.required_arg(lr, c, "lr", "shampoo(lr = 1e-3)")?;
        Ok(Optimizer::Shampoo {
            lr: self.float_where(lr, "lr", env, |v| v > 0.0, "must be positive")?,
            betas: match betas {
                Some(b) => self.betas(b, env)?,
                None => (0.9, 0.999),
            },
            eps: self.opt_float(eps, "eps", env, 1e-8, |v| v > 0.0, "must be positive")?,
            decay: self.opt_float(
                decay,
                "decay",
                env,
                0.9,
                |v| (0.0..1.0).contains(&v),
                "must be in [0, 1)",
            )?,
            root_every: match root_every {
                Some(e) => self.positive(e, "root_every", env)?,
                None => 10,
            },
            max_dim: match max_dim {
                Some(e) => self.positive(e, "max_dim", env)?,
                None => 1024,
            },
            weight_decay: self.non_negative(wd, "weight_decay", env)?,
        })
    }

    /// `muon(lr, momentum = 0.95, nesterov = true, ns_steps = 5, weight_decay = 0, adamw = adamw(...))`;
    /// `lr` is required and the nested `adamw`'s `lr` defaults to it (Moonlight's update scale makes
    /// one learning rate fit both).
    fn muon(&self, c: &CallView, env: &Env) -> Result<Optimizer> {
        let [lr, momentum, nesterov, ns_steps, wd, adamw] = self.bind(
            c,
            &[
                "lr",
                "momentum",
                "nesterov",
                "ns_steps",
                "weight_decay",
                "adamw",
            ],
        )?;
        let lr = self.required_arg(lr, c, "lr", "muon(lr = 0.02)")?;
        let lr = self.float_where(lr, "lr", env, |v| v > 0.0, "must be positive")?;
        let adamw = match adamw {
            Some(e) => {
                let inner = self.call_form(e, "adamw", &["adamw"])?;
                self.adam_args(&inner, lr, env)?
            }
            None => AdamArgs {
                lr,
                betas: (0.9, 0.999),
                eps: 1e-8,
                weight_decay: 0.0,
            },
        };
        Ok(Optimizer::Muon {
            lr,
            momentum: self.opt_float(
                momentum,
                "momentum",
                env,
                0.95,
                |v| (0.0..1.0).contains(&v),
                "must be in [0, 1)",
            )?,
            nesterov: match nesterov {
                Some(e) => self.boolean(e, "nesterov")?,
                None => true,
            },
            ns_steps: match ns_steps {
                Some(e) => self.positive(e, "ns_steps", env)?,
                None => 5,
            },
            weight_decay: self.non_negative(wd, "weight_decay", env)?,
            adamw,
        })
    }

    fn betas(&self, e: &Expr, env: &Env) -> Result<(f64, f64)> {
        match &e.kind {
            ExprKind::Tuple(items) if items.len() == 2 => {
                let ok = |v: f64| (0.0..1.0).contains(&v);
                let b1 = self.float_where(&items[0], "beta1", env, ok, "must be in [0, 1)")?;
                let b2 = self.float_where(&items[1], "beta2", env, ok, "must be in [0, 1)")?;
                Ok((b1, b2))
            }
            _ => Err(self
                .err(
                    e.span,
                    format!(
                        "`betas` must be a pair `(beta1, beta2)`, found {}",
                        e.describe()
                    ),
                )
                .with_label("expected two numbers in parentheses")
                .with_help("e.g. `betas = (0.9, 0.95)`")),
        }
    }

    fn expert_lr(&self, e: &Expr, lr: f64, env: &Env) -> Result<ExpertLr> {
        if matches!(e.kind, ExprKind::Call(_))
            || matches!(&e.kind, ExprKind::Ident(n) if n == "adaptive")
        {
            let c = self.call_form(e, "expert_lr", &["adaptive"])?;
            let [base] = self.bind(&c, &["base"])?;
            return Ok(ExpertLr::Adaptive {
                base: self.opt_float(base, "base", env, lr, |v| v > 0.0, "must be positive")?,
            });
        }
        match self.eval(e, "expert_lr", env) {
            Ok(v) => {
                if v > 0.0 {
                    Ok(ExpertLr::Fixed(v))
                } else {
                    Err(self
                        .err(e.span, format!("`expert_lr` must be positive, found {v}"))
                        .with_label("must be positive"))
                }
            }
            Err(_) => Err(self
                .err(
                    e.span,
                    format!(
                        "`expert_lr` must be a number or `adaptive(base = x)`, found {}",
                        e.describe()
                    ),
                )
                .with_label("expected a learning rate")
                .with_help("e.g. `expert_lr = 1e-3` or `expert_lr = adaptive(base = 1e-3)`")),
        }
    }

    fn schedule(&self, e: &Expr, steps: usize, lr: f64, env: &Env) -> Result<Schedule> {
        let c = self.call_form(e, "schedule", &["constant", "cosine", "linear"])?;
        let warmup = |w: Option<&Expr>| -> Result<usize> {
            let Some(w) = w else { return Ok(0) };
            let v = self.uint(w, "warmup", env)?;
            if v > steps {
                return Err(self
                    .err(
                        w.span,
                        format!("`warmup = {v}` is longer than the run (`steps = {steps}`)"),
                    )
                    .with_label(format!("must be at most {steps}")));
            }
            Ok(v)
        };
        Ok(match c.name {
            "constant" => {
                self.bind::<0>(&c, &[])?;
                Schedule::Constant
            }
            "cosine" => {
                let [w, min_lr] = self.bind(&c, &["warmup", "min_lr"])?;
                let warmup = warmup(w)?;
                let min = self.opt_float(
                    min_lr,
                    "min_lr",
                    env,
                    0.0,
                    |v| v >= 0.0,
                    "must not be negative",
                )?;
                if min > lr {
                    let span = min_lr.map_or(c.span, |m| m.span);
                    return Err(self
                        .err(
                            span,
                            format!("`min_lr = {min}` is above the optimizer's `lr = {lr}`"),
                        )
                        .with_label("must be at most `lr`"));
                }
                Schedule::Cosine {
                    warmup,
                    min_lr: min,
                }
            }
            "linear" => {
                let [w] = self.bind(&c, &["warmup"])?;
                Schedule::Linear { warmup: warmup(w)? }
            }
            other => unlisted("schedule", other),
        })
    }

    /// `every(N, batches = B)`; `batches` only where `with_batches`.
    fn every(&self, e: &Expr, what: &str, with_batches: bool, env: &Env) -> Result<Every> {
        let c = self.call_form(e, what, &["every"])?;
        if with_batches {
            let [n, batches] = self.bind(&c, &["n", "batches"])?;
            let n = self.required_arg(n, &c, "n", "every(100, batches = 4)")?;
            Ok(Every {
                every: self.positive(n, "every", env)?,
                batches: batches
                    .map(|b| self.positive(b, "batches", env))
                    .transpose()?
                    .unwrap_or(4),
            })
        } else {
            let [n] = self.bind(&c, &["n"])?;
            let n = self.required_arg(n, &c, "n", "every(100)")?;
            Ok(Every {
                every: self.positive(n, "every", env)?,
                batches: 0,
            })
        }
    }

    // ---------------------------------------------------------------- value extractors

    /// A call, or a bare name that names a call taking no arguments; `known` are the accepted names.
    fn call_form<'a>(&self, e: &'a Expr, what: &str, known: &[&str]) -> Result<CallView<'a>> {
        let (name, name_span, args): (&'a str, Span, &'a [Arg]) = match &e.kind {
            ExprKind::Call(c) => (c.name.name.as_str(), c.name.span, c.args.as_slice()),
            ExprKind::Ident(n) => (n.as_str(), e.span, &[]),
            _ => {
                let d = self
                    .err(
                        e.span,
                        format!(
                            "`{what}` must be one of {}, found {}",
                            one_of(known),
                            e.describe()
                        ),
                    )
                    .with_label(format!("expected {}", one_of(known)));
                return Err(match &e.kind {
                    ExprKind::Str(s) if known.contains(&s.as_str()) => {
                        d.with_help(format!("write it without quotes: `{s}`"))
                    }
                    _ => d,
                });
            }
        };
        if !known.contains(&name) {
            let d = self
                .err(name_span, format!("unknown {what} `{name}`"))
                .with_label(format!("expected {}", one_of(known)));
            return Err(match did_you_mean(name, known.iter().copied()) {
                Some(s) => d.with_help(format!("did you mean `{s}`?")),
                None => d.with_help(format!("`{what}` is one of {}", one_of(known))),
            });
        }
        Ok(CallView {
            name,
            span: e.span,
            args,
        })
    }

    /// Matches a call's arguments to its parameters: positional ones in order, then `key = value`.
    fn bind<'a, const N: usize>(
        &self,
        c: &CallView<'a>,
        params: &[&str; N],
    ) -> Result<[Option<&'a Expr>; N]> {
        let mut out: [Option<&'a Expr>; N] = [None; N];
        let mut seen_keyword = false;
        for (i, arg) in c.args.iter().enumerate() {
            match &arg.name {
                None => {
                    if seen_keyword {
                        return Err(self
                            .err(
                                arg.span(),
                                "a positional argument cannot follow `key = value` arguments",
                            )
                            .with_label("positional after keyword")
                            .with_help(format!(
                                "write it as `{} = ...`",
                                params.get(i).copied().unwrap_or("name")
                            )));
                    }
                    if i >= N {
                        let takes = match N {
                            0 => format!("`{}` takes no arguments", c.name),
                            1 => format!("`{}` takes 1 argument ({})", c.name, one_of(params)),
                            _ => format!(
                                "`{}` takes at most {N} arguments ({})",
                                c.name,
                                one_of(params)
                            ),
                        };
                        return Err(self
                            .err(arg.span(), format!("{takes}, got {}", c.args.len()))
                            .with_label("extra argument"));
                    }
                    out[i] = Some(&arg.value);
                }
                Some(key) => {
                    seen_keyword = true;
                    let Some(idx) = params.iter().position(|p| *p == key.name) else {
                        let d = self
                            .err(
                                key.span,
                                format!("unknown argument `{}` to `{}`", key.name, c.name),
                            )
                            .with_label(format!("`{}` has no such argument", c.name));
                        return Err(if N == 0 {
                            d.with_help(format!("`{}` takes no arguments", c.name))
                        } else if let Some(s) = did_you_mean(&key.name, params.iter().copied()) {
                            d.with_help(format!("did you mean `{s}`?"))
                        } else {
                            d.with_help(format!("`{}` takes {}", c.name, one_of(params)))
                        });
                    };
                    if out[idx].is_some() {
                        return Err(self
                            .err(key.span, format!("argument `{}` given twice", key.name))
                            .with_label("repeated argument"));
                    }
                    out[idx] = Some(&arg.value);
                }
            }
        }
        Ok(out)
    }

    fn required_arg<'a>(
        &self,
        arg: Option<&'a Expr>,
        c: &CallView,
        name: &str,
        example: &str,
    ) -> Result<&'a Expr> {
        arg.ok_or_else(|| {
            self.err(c.span, format!("`{}` needs `{name}`", c.name))
                .with_label(format!("missing `{name}`"))
                .with_help(format!("e.g. `{example}`"))
        })
    }

    /// Evaluates a numeric expression; bare names refer to the model's numeric fields.
    fn eval(&self, e: &Expr, what: &str, env: &Env) -> Result<f64> {
        let v = match &e.kind {
            ExprKind::Number(n) => n.value,
            ExprKind::Neg(x) => -self.eval(x, what, env)?,
            ExprKind::Binary { op, lhs, rhs } => {
                let (a, b) = (self.eval(lhs, what, env)?, self.eval(rhs, what, env)?);
                match op {
                    BinOp::Add => a + b,
                    BinOp::Sub => a - b,
                    BinOp::Mul => a * b,
                    BinOp::Div => {
                        if b == 0.0 {
                            return Err(self
                                .err(rhs.span, "division by zero")
                                .with_label("this is 0"));
                        }
                        a / b
                    }
                }
            }
            ExprKind::Ident(name) => match env.get(name) {
                Some(v) => *v,
                None => {
                    let d = self
                        .err(e.span, format!("`{what}` must be a number, found `{name}`"))
                        .with_label("not a number");
                    return Err(if MODEL_FIELDS.contains(&name.as_str()) {
                        d.with_help(format!("arithmetic may use model fields written as plain numbers; `{name}` is not one here"))
                    } else if let Some(s) = did_you_mean(name, env.keys().map(String::as_str)) {
                        d.with_help(format!("did you mean `{s}`?"))
                    } else {
                        d
                    });
                }
            },
            _ => {
                return Err(self
                    .err(
                        e.span,
                        format!("`{what}` must be a number, found {}", e.describe()),
                    )
                    .with_label("expected a number"))
            }
        };
        if !v.is_finite() {
            return Err(self
                .err(e.span, format!("`{what}` is not a finite number"))
                .with_label("too large"));
        }
        Ok(v)
    }

    fn float_where(
        &self,
        e: &Expr,
        what: &str,
        env: &Env,
        ok: impl Fn(f64) -> bool,
        rule: &str,
    ) -> Result<f64> {
        let v = self.eval(e, what, env)?;
        if !ok(v) {
            return Err(self
                .err(e.span, format!("`{what}` {rule}, found {v}"))
                .with_label(rule.to_string()));
        }
        Ok(v)
    }

    fn opt_float(
        &self,
        e: Option<&Expr>,
        what: &str,
        env: &Env,
        default: f64,
        ok: impl Fn(f64) -> bool,
        rule: &str,
    ) -> Result<f64> {
        match e {
            Some(e) => self.float_where(e, what, env, ok, rule),
            None => Ok(default),
        }
    }

    /// A whole number ≥ 0.
    fn uint(&self, e: &Expr, what: &str, env: &Env) -> Result<usize> {
        let v = self.eval(e, what, env)?;
        if v < 0.0 {
            return Err(self
                .err(e.span, format!("`{what}` must not be negative, found {v}"))
                .with_label("negative"));
        }
        if v.fract() != 0.0 {
            return Err(self
                .err(
                    e.span,
                    format!("`{what}` must be a whole number, found {v}"),
                )
                .with_label("not a whole number"));
        }
        if v >= MAX_EXACT || v > usize::MAX as f64 {
            return Err(self
                .err(e.span, format!("`{what}` is too large"))
                .with_label("too large"));
        }
        Ok(v as usize)
    }

    /// A whole number ≥ 1.
    fn positive(&self, e: &Expr, what: &str, env: &Env) -> Result<usize> {
        let v = self.uint(e, what, env)?;
        if v == 0 {
            return Err(self
                .err(e.span, format!("`{what}` must be at least 1, found 0"))
                .with_label("must be at least 1"));
        }
        Ok(v)
    }

    /// A seed: any whole number that fits in 64 bits, kept exact when written as a literal.
    fn seed(&self, e: &Expr, what: &str, env: &Env) -> Result<u64> {
        if let ExprKind::Number(n) = &e.kind {
            if let Some(i) = n.int {
                return Ok(i);
            }
        }
        Ok(self.uint(e, what, env)? as u64)
    }

    fn boolean(&self, e: &Expr, what: &str) -> Result<bool> {
        match &e.kind {
            ExprKind::Bool(b) => Ok(*b),
            _ => Err(self
                .err(
                    e.span,
                    format!("`{what}` must be `true` or `false`, found {}", e.describe()),
                )
                .with_label("expected `true` or `false`")),
        }
    }

    fn string(&self, e: &Expr, what: &str) -> Result<String> {
        match &e.kind {
            ExprKind::Str(s) => Ok(s.clone()),
            _ => Err(self
                .err(
                    e.span,
                    format!("`{what}` must be a string, found {}", e.describe()),
                )
                .with_label("expected a quoted path")
                .with_help("e.g. \"data/input.txt\"")),
        }
    }

    /// A bare name among `options`.
    fn enum_of<T: Copy>(&self, e: &Expr, what: &str, options: &[(&str, T)]) -> Result<T> {
        let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
        match &e.kind {
            ExprKind::Ident(name) => match options.iter().find(|(n, _)| n == name) {
                Some((_, v)) => Ok(*v),
                None => {
                    let d = self
                        .err(e.span, format!("unknown {what} `{name}`"))
                        .with_label(format!("expected {}", one_of(&names)));
                    Err(match did_you_mean(name, names.iter().copied()) {
                        Some(s) => d.with_help(format!("did you mean `{s}`?")),
                        None => d.with_help(format!("`{what}` is one of {}", one_of(&names))),
                    })
                }
            },
            _ => {
                let d = self
                    .err(
                        e.span,
                        format!(
                            "`{what}` must be one of {}, found {}",
                            one_of(&names),
                            e.describe()
                        ),
                    )
                    .with_label(format!("expected {}", one_of(&names)));
                Err(match &e.kind {
                    ExprKind::Str(s) if names.contains(&s.as_str()) => {
                        d.with_help(format!("write it without quotes: `{s}`"))
                    }
                    _ => d,
                })
            }
        }
    }
}

/// Default hidden width: Llama's rule for SwiGLU (⌊8·dim/3⌋ rounded up to a multiple of 64, so that
/// the three matrices hold about as many weights as a 4·dim two-matrix FFN), 4·dim otherwise.
pub fn default_hidden(activation: Activation, dim: usize) -> usize {
    match activation {
        Activation::SwiGlu => (8 * dim / 3).div_ceil(64) * 64,
        Activation::Gelu | Activation::Relu => 4 * dim,
    }
}

/// The divisor of `n` closest to `near` (for "try ..." hints).
fn divisor_near(n: usize, near: usize) -> usize {
    (1..=n.min(1 << 20))
        .filter(|d| n.is_multiple_of(*d))
        .min_by_key(|d| d.abs_diff(near))
        .unwrap_or(1)
}

/// The arm of a name that `call_form` admitted but no arm handles. `call_form` accepts only the names
/// it is given, so this is a checker bug (a name added to a list without its arm), never bad input:
/// each match on a call's name lists every name instead of letting a catch-all stand for the last one.
fn unlisted(what: &str, name: &str) -> ! {
    unreachable!("the {what} `{name}` is accepted by `call_form` but has no arm")
}

fn gate_name(g: &Gate) -> &'static str {
    match g {
        Gate::Softmax { .. } => "softmax",
        Gate::Sigmoid => "sigmoid",
        Gate::NoisyTopK { .. } => "noisy_top_k",
        Gate::Switch => "switch",
        Gate::ExpertChoice { .. } => "expert_choice",
        Gate::Sinkhorn { .. } => "sinkhorn",
        Gate::Auction { .. } => "auction",
    }
}

fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file or directory".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(src: &str) -> Spec {
        check(src, Path::new("test.moe")).unwrap_or_else(|d| panic!("{}", d.render()))
    }

    /// A transformer LM header for the one-field variations below.
    fn lm(moe: &str, train: &str) -> String {
        format!(
            "model t {{\n vocab = 256; dim = 64; layers = 4; heads = 4; context = 16\n moe {{\n experts = 8\n {moe}\n }}\n}}\ntrain {{\n data = synthetic(kind = markov)\n batch = 2\n steps = 100\n {train}\n}}\n"
        )
    }

    /// A spec that sets every model, moe and train field, and uses every call form.
    const EVERY_FIELD: &str = r#"
# Every model, moe and train field.
model full {
  family = transformer
  vocab = 1_000
  dim = 128
  layers = 6
  heads = 8
  kv_heads = 2
  context = 64
  norm = layernorm
  rope_theta = 500000
  ffn = gelu(hidden = 4 * dim)
  tie_embeddings = true
  qk_norm = true
  moe {
    layers = [5, 1, 3]
    first_dense = 1
    every = 2
    experts = 16
    top_k = 3
    expert = swiglu(96)
    shared_experts = 2
    gate = softmax(renorm = false)
    groups = 4 x 4
    hierarchy = group_limited
    top_groups = 2
    capacity = factor(1.25, drop = probability)
    balance = aux(0.02) + z(1e-3) + seq_aux(c = 1e-4) + bias(rate = 0.002)
    jitter = 0.01
    router_precision = f16
  }
}
train {
  data = tokens("corpus.bin", dtype = u32)
  split = 0.95
  batch = 8
  accumulate = 4
  steps = 1000
  optimizer = adamw(lr = 1e-3, betas = (0.9, 0.95), eps = 1e-6, weight_decay = 0.1)
  expert_lr = adaptive(base = 5e-4)
  schedule = cosine(warmup = 100, min_lr = 1e-5)
  clip = 1.0
  precision = f16
  recompute = block
  seed = 18446744073709551615
  eval = every(50, batches = 2)
  checkpoint = every(200)
  log = every(5)
}
"#;

    /// What [`EVERY_FIELD`] checks to.
    fn every_field_spec() -> Spec {
        Spec {
            name: "full".into(),
            model: Model {
                family: Family::Transformer,
                vocab: Some(1000),
                inputs: None,
                classes: None,
                dim: 128,
                layers: 6,
                heads: 8,
                kv_heads: 2,
                context: Some(64),
                norm: Norm::LayerNorm,
                rope_theta: 500000.0,
                ffn: Ffn {
                    activation: Activation::Gelu,
                    hidden: 512,
                },
                bidirectional: false,
                tie_embeddings: true,
                qk_norm: true,
            },
            moe: Some(Moe {
                blocks: vec![1, 3, 5],
                experts: 16,
                top_k: 3,
                expert: Ffn {
                    activation: Activation::SwiGlu,
                    hidden: 96,
                },
                shared_experts: 2,
                gate: Gate::Softmax { renorm: false },
                groups: Some((4, 4)),
                hierarchy: Hierarchy::GroupLimited,
                top_groups: 2,
                capacity: Capacity::Factor {
                    factor: 1.25,
                    drop: DropPolicy::Probability,
                },
                balance: vec![
                    Balance::Aux(0.02),
                    Balance::Z(1e-3),
                    Balance::SeqAux(1e-4),
                    Balance::Bias { rate: 0.002 },
                ],
                jitter: 0.01,
                router_precision: Precision::F16,
            }),
            train: Some(Train {
                data: Data::Tokens {
                    path: "corpus.bin".into(),
                    dtype: TokenDtype::U32,
                },
                split: 0.95,
                batch: 8,
                accumulate: 4,
                steps: 1000,
                optimizer: Optimizer::AdamW {
                    lr: 1e-3,
                    betas: (0.9, 0.95),
                    eps: 1e-6,
                    weight_decay: 0.1,
                },
                expert_lr: Some(ExpertLr::Adaptive { base: 5e-4 }),
                schedule: Schedule::Cosine {
                    warmup: 100,
                    min_lr: 1e-5,
                },
                clip: Some(1.0),
                precision: Precision::F16,
                recompute: Recompute::Block,
                seed: u64::MAX,
                eval: Every {
                    every: 50,
                    batches: 2,
                },
                checkpoint: Every {
                    every: 200,
                    batches: 0,
                },
                log: Every {
                    every: 5,
                    batches: 0,
                },
            }),
        }
    }

    #[test]
    fn every_field_and_call_form() {
        let dir = std::env::temp_dir().join(format!("moec-check-full-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("corpus.bin"), vec![0u8; 4096]).unwrap();
        let spec =
            check(EVERY_FIELD, &dir.join("full.moe")).unwrap_or_else(|d| panic!("{}", d.render()));
        std::fs::remove_dir_all(&dir).unwrap();
        // Every value of EVERY_FIELD is a literal or exact arithmetic, so exact equality is the right test.
        assert_eq!(spec, every_field_spec());
    }

    #[test]
    fn defaults_are_filled() {
        let spec = ok("model m {\n vocab = 256\n dim = 96\n layers = 3\n heads = 3\n context = 32\n moe { experts = 4 }\n}\ntrain { data = synthetic(); batch = 1; steps = 10 }\n");
        let m = &spec.model;
        assert_eq!(
            (m.family, m.norm, m.kv_heads, m.rope_theta),
            (Family::Transformer, Norm::RmsNorm, 3, 10000.0)
        );
        assert!(!m.bidirectional && !m.tie_embeddings);
        // Llama rule: floor(8 * 96 / 3) = 256, already a multiple of 64.
        assert_eq!(
            m.ffn,
            Ffn {
                activation: Activation::SwiGlu,
                hidden: 256
            }
        );
        let moe = spec.moe.unwrap();
        assert_eq!(moe.blocks, vec![0, 1, 2]);
        assert_eq!(
            (moe.top_k, moe.shared_experts, moe.top_groups, moe.jitter),
            (2, 0, 1, 0.0)
        );
        assert_eq!(moe.expert, m.ffn);
        assert_eq!(moe.gate, Gate::Softmax { renorm: true });
        assert_eq!((moe.groups, moe.hierarchy), (None, Hierarchy::TwoLevel));
        assert_eq!(moe.capacity, Capacity::Dropless);
        assert_eq!(moe.balance, vec![Balance::Aux(0.01)]);
        assert_eq!(moe.router_precision, Precision::F32);
        let t = spec.train.unwrap();
        assert_eq!(
            t.data,
            Data::Synthetic {
                kind: SyntheticKind::Copy,
                seed: 0
            }
        );
        assert_eq!((t.split, t.accumulate, t.seed, t.clip), (0.9, 1, 0, None));
        assert_eq!(
            t.optimizer,
            Optimizer::AdamW {
                lr: 3e-4,
                betas: (0.9, 0.999),
                eps: 1e-8,
                weight_decay: 0.0
            }
        );
        assert_eq!(
            (t.expert_lr, t.schedule, t.precision),
            (None, Schedule::Constant, Precision::F32)
        );
        assert_eq!(
            t.eval,
            Every {
                every: 100,
                batches: 4
            }
        );
        assert_eq!(
            t.checkpoint,
            Every {
                every: 500,
                batches: 0
            }
        );
        assert_eq!(
            t.log,
            Every {
                every: 10,
                batches: 0
            }
        );
    }

    #[test]
    fn default_hidden_follows_llama() {
        // floor(8*dim/3) rounded up to a multiple of 64 (Llama-7B rounds to 256 and gets 11008).
        assert_eq!(default_hidden(Activation::SwiGlu, 4096), 10944);
        assert_eq!(default_hidden(Activation::SwiGlu, 256), 704);
        assert_eq!(default_hidden(Activation::SwiGlu, 64), 192);
        assert_eq!(default_hidden(Activation::Gelu, 64), 256);
    }

    #[test]
    fn gate_forms() {
        let cases: &[(&str, Gate, usize)] = &[
            ("gate = softmax", Gate::Softmax { renorm: true }, 2),
            ("gate = softmax(false)", Gate::Softmax { renorm: false }, 2),
            ("gate = sigmoid", Gate::Sigmoid, 2),
            ("gate = noisy_top_k", Gate::NoisyTopK { noise: 1.0 }, 2),
            (
                "gate = noisy_top_k(noise = 0.5)",
                Gate::NoisyTopK { noise: 0.5 },
                2,
            ),
            ("gate = switch", Gate::Switch, 1),
            ("gate = switch; top_k = 1", Gate::Switch, 1),
            (
                "gate = expert_choice",
                Gate::ExpertChoice { capacity: 2.0 },
                2,
            ),
            (
                "gate = expert_choice(capacity = 1.5)",
                Gate::ExpertChoice { capacity: 1.5 },
                2,
            ),
            ("gate = sinkhorn(iters = 3)", Gate::Sinkhorn { iters: 3 }, 2),
            ("gate = sinkhorn", Gate::Sinkhorn { iters: 8 }, 2),
            (
                "gate = auction",
                Gate::Auction {
                    rounds: 10,
                    epsilon: 1e-3,
                    budget: 1.0,
                    price_rate: 0.01,
                },
                2,
            ),
            (
                "gate = auction(rounds = 4, epsilon = 0.02, budget = 0.5, price_rate = 0.1)",
                Gate::Auction {
                    rounds: 4,
                    epsilon: 0.02,
                    budget: 0.5,
                    price_rate: 0.1,
                },
                2,
            ),
        ];
        for (line, gate, top_k) in cases {
            let moe = ok(&lm(line, "")).moe.unwrap();
            assert_eq!((moe.gate, moe.top_k), (*gate, *top_k), "{line}");
        }
    }

    #[test]
    fn balance_and_capacity_forms() {
        let cases: &[(&str, Vec<Balance>)] = &[
            ("balance = none", vec![]),
            ("balance = aux", vec![Balance::Aux(0.01)]),
            (
                "balance = z(0.5) + seq_aux",
                vec![Balance::Z(0.5), Balance::SeqAux(1e-4)],
            ),
            ("balance = bias", vec![Balance::Bias { rate: 1e-3 }]),
            (
                "gate = noisy_top_k\n balance = cv2",
                vec![Balance::Cv2 {
                    importance: 0.1,
                    load: 0.1,
                }],
            ),
            (
                "balance = cv2(importance = 0.2, load = 0)",
                vec![Balance::Cv2 {
                    importance: 0.2,
                    load: 0.0,
                }],
            ),
        ];
        for (line, want) in cases {
            assert_eq!(&ok(&lm(line, "")).moe.unwrap().balance, want, "{line}");
        }
        let cap = |line: &str| ok(&lm(line, "")).moe.unwrap().capacity;
        assert_eq!(cap("capacity = dropless"), Capacity::Dropless);
        assert_eq!(
            cap("capacity = factor(2)"),
            Capacity::Factor {
                factor: 2.0,
                drop: DropPolicy::Position
            }
        );
    }

    #[test]
    fn moe_block_selection() {
        let blocks = |line: &str| ok(&lm(line, "")).moe.unwrap().blocks;
        assert_eq!(blocks("every = 2"), vec![1, 3]);
        assert_eq!(blocks("every = 2; first_dense = 2"), vec![3]);
        assert_eq!(blocks("first_dense = 1"), vec![1, 2, 3]);
        assert_eq!(blocks("layers = [3, 0]"), vec![0, 3]);
        assert_eq!(blocks("layers = [2]; every = 3"), vec![2]);
        assert!(ok(&lm("", "").replace("experts = 8", "experts = 0"))
            .moe
            .is_none());
    }

    #[test]
    fn train_call_forms() {
        let t = |line: &str| ok(&lm("", line)).train.unwrap();
        assert_eq!(
            t("optimizer = sgd(0.1)").optimizer,
            Optimizer::Sgd {
                lr: 0.1,
                momentum: 0.0
            }
        );
        assert_eq!(
            t("optimizer = adafactor").optimizer,
            Optimizer::Adafactor {
                lr: 1e-3,
                decay: -0.8,
                eps: 1e-30
            }
        );
        assert_eq!(
            t("optimizer = schedule_free_adamw").optimizer,
            Optimizer::ScheduleFreeAdamW {
                lr: 2.5e-3,
                betas: (0.9, 0.999),
                eps: 1e-8,
                weight_decay: 0.0
            }
        );
        assert_eq!(
            t("optimizer = shampoo(1e-3, root_every = 5, max_dim = 512)").optimizer,
            Optimizer::Shampoo {
                lr: 1e-3,
                betas: (0.9, 0.999),
                eps: 1e-8,
                decay: 0.9,
                root_every: 5,
                max_dim: 512,
                weight_decay: 0.0
            }
        );
        let adam = |lr| AdamArgs {
            lr,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
        };
        assert_eq!(
            t("optimizer = muon(lr = 0.02)").optimizer,
            Optimizer::Muon {
                lr: 0.02,
                momentum: 0.95,
                nesterov: true,
                ns_steps: 5,
                weight_decay: 0.0,
                adamw: adam(0.02)
            }
        );
        assert_eq!(
            t("optimizer = muon(0.02, nesterov = false, adamw = adamw(lr = 3e-4))").optimizer,
            Optimizer::Muon {
                lr: 0.02,
                momentum: 0.95,
                nesterov: false,
                ns_steps: 5,
                weight_decay: 0.0,
                adamw: adam(3e-4)
            }
        );
        assert_eq!(t("expert_lr = 1e-3").expert_lr, Some(ExpertLr::Fixed(1e-3)));
        assert_eq!(
            t("expert_lr = adaptive").expert_lr,
            Some(ExpertLr::Adaptive { base: 3e-4 })
        );
        assert_eq!(
            t("schedule = linear(warmup = 10)").schedule,
            Schedule::Linear { warmup: 10 }
        );
        assert_eq!(
            t("schedule = cosine").schedule,
            Schedule::Cosine {
                warmup: 0,
                min_lr: 0.0
            }
        );
        assert_eq!(t("clip = none").clip, None);
        assert_eq!(
            t("seed = 9").data,
            Data::Synthetic {
                kind: SyntheticKind::Markov,
                seed: 9
            }
        );
    }

    #[test]
    fn other_families() {
        let lstm = ok("model l {\n family = lstm; vocab = 256; dim = 32; layers = 2; context = 8\n moe { experts = 4; layers = [1]; groups = 2 x 2; gate = noisy_top_k; top_k = 2; balance = cv2 }\n}\n");
        assert_eq!(
            (
                lstm.model.family,
                lstm.model.bidirectional,
                lstm.model.heads
            ),
            (Family::Lstm, false, 1)
        );
        let moe = lstm.moe.unwrap();
        assert_eq!(
            (moe.groups, moe.hierarchy, moe.blocks),
            (Some((2, 2)), Hierarchy::TwoLevel, vec![1])
        );
        let mlp = ok("model c {\n family = mlp; inputs = 3072; classes = 10; dim = 64; layers = 2\n}\ntrain { data = synthetic; batch = 4; steps = 3 }\n");
        assert_eq!(
            (
                mlp.model.inputs,
                mlp.model.classes,
                mlp.model.vocab,
                mlp.model.context
            ),
            (Some(3072), Some(10), None, None)
        );
        assert_eq!(
            mlp.train.unwrap().data,
            Data::Synthetic {
                kind: SyntheticKind::Classes,
                seed: 0
            }
        );
        assert!(mlp.moe.is_none());
    }
}
