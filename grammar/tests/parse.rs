//! Parser tests: every value form of docs/language.md, spans, separators, and syntax-error translation.

use moec_grammar::{parse, BinOp, Expr, ExprKind, Number};

/// Parses `model m { f = <value> }` and returns the value of `f`.
fn value(v: &str) -> (String, Expr) {
    let src = format!("model m {{ f = {v} }}");
    let ast = parse(&src).unwrap_or_else(|d| panic!("{v:?} did not parse:\n{}", d.render()));
    let e = ast.model.fields[0].value.clone();
    (src, e)
}

fn num(e: &Expr) -> Number {
    match &e.kind {
        ExprKind::Number(n) => *n,
        other => panic!("expected a number, got {other:?}"),
    }
}

#[test]
fn numbers() {
    let cases: [(&str, f64, Option<u64>); 7] = [
        ("256", 256.0, Some(256)),
        ("1.5", 1.5, None),
        ("3e-4", 3e-4, None),
        ("1_000", 1000.0, Some(1000)),
        ("1E3", 1000.0, None),
        ("2.5e+2", 250.0, None),
        (
            "18446744073709551615",
            18446744073709551615.0,
            Some(u64::MAX),
        ),
    ];
    for (text, v, int) in cases {
        let (_, e) = value(text);
        let n = num(&e);
        assert!(
            (n.value - v).abs() <= 1e-12 * v.abs(),
            "{text}: {} != {v}",
            n.value
        );
        assert_eq!(n.int, int, "{text}");
    }
    // Too big for u64: kept as a float, `int` is None.
    let (_, e) = value("99999999999999999999999");
    assert_eq!(num(&e).int, None);
}

#[test]
fn booleans_none_strings_names() {
    assert_eq!(value("true").1.kind, ExprKind::Bool(true));
    assert_eq!(value("false").1.kind, ExprKind::Bool(false));
    assert_eq!(value("none").1.kind, ExprKind::None);
    assert_eq!(value("rmsnorm").1.kind, ExprKind::Ident("rmsnorm".into()));
    assert_eq!(
        value(r#""data/in.txt""#).1.kind,
        ExprKind::Str("data/in.txt".into())
    );
    assert_eq!(
        value(r#""a\"b\\c""#).1.kind,
        ExprKind::Str("a\"b\\c".into())
    );
    assert_eq!(value(r#""""#).1.kind, ExprKind::Str(String::new()));
}

#[test]
fn calls_with_positional_and_keyword_args() {
    let (src, e) = value("factor(1.25, drop = position)");
    let ExprKind::Call(c) = &e.kind else {
        panic!("not a call: {e:?}")
    };
    assert_eq!(c.name.name, "factor");
    assert_eq!(&src[c.name.span.start..c.name.span.end], "factor");
    assert_eq!(c.args.len(), 2);
    assert!(c.args[0].name.is_none());
    assert_eq!(num(&c.args[0].value).value, 1.25);
    let key = c.args[1].name.as_ref().unwrap();
    assert_eq!(key.name, "drop");
    assert_eq!(c.args[1].value.kind, ExprKind::Ident("position".into()));
    assert_eq!(
        &src[c.args[1].span().start..c.args[1].span().end],
        "drop = position"
    );
    assert_eq!(
        &src[e.span.start..e.span.end],
        "factor(1.25, drop = position)"
    );

    // No arguments, and a call spread over lines with a trailing comma.
    let (_, e) = value("softmax()");
    assert!(matches!(&e.kind, ExprKind::Call(c) if c.args.is_empty()));
    let (_, e) = value("auction(\n    rounds = 4,   # comment\n    epsilon = 0.01,\n  )");
    assert!(matches!(&e.kind, ExprKind::Call(c) if c.args.len() == 2));
}

#[test]
fn tuples_lists_and_grouping() {
    let (_, e) = value("(0.9, 0.95)");
    let ExprKind::Tuple(items) = &e.kind else {
        panic!("{e:?}")
    };
    assert_eq!((num(&items[0]).value, num(&items[1]).value), (0.9, 0.95));
    let (_, e) = value("(7,)");
    assert!(matches!(&e.kind, ExprKind::Tuple(v) if v.len() == 1));
    let (_, e) = value("[1, 3, 5]");
    let ExprKind::List(items) = &e.kind else {
        panic!("{e:?}")
    };
    assert_eq!(
        items
            .iter()
            .map(|i| num(i).int.unwrap())
            .collect::<Vec<_>>(),
        vec![1, 3, 5]
    );
    assert!(matches!(value("[]").1.kind, ExprKind::List(ref v) if v.is_empty()));
    assert!(matches!(value("[\n 1,\n 2,\n]").1.kind, ExprKind::List(ref v) if v.len() == 2));
    // `(e)` only groups, and keeps the parentheses' span.
    let (src, e) = value("(42)");
    assert_eq!(num(&e).int, Some(42));
    assert_eq!(&src[e.span.start..e.span.end], "(42)");
}

#[test]
fn sums_arithmetic_and_negation() {
    let (src, e) = value("aux(0.01) + z(0.001) + cv2(importance = 0.1, load = 0.1)");
    let terms = e.sum_terms();
    assert_eq!(terms.len(), 3);
    let names: Vec<&str> = terms
        .iter()
        .map(|t| match &t.kind {
            ExprKind::Call(c) => c.name.name.as_str(),
            _ => panic!("{t:?}"),
        })
        .collect();
    assert_eq!(names, ["aux", "z", "cv2"]);
    assert_eq!(&src[terms[1].span.start..terms[1].span.end], "z(0.001)");

    // `*` binds tighter than `+`.
    let (_, e) = value("2 + 3 * 4");
    let ExprKind::Binary {
        op: BinOp::Add,
        lhs,
        rhs,
    } = &e.kind
    else {
        panic!("{e:?}")
    };
    assert_eq!(num(lhs).value, 2.0);
    assert!(matches!(&rhs.kind, ExprKind::Binary { op: BinOp::Mul, .. }));

    let (_, e) = value("4 * dim / 3");
    assert!(matches!(&e.kind, ExprKind::Binary { op: BinOp::Div, .. }));
    let (_, e) = value("-3");
    assert!(matches!(&e.kind, ExprKind::Neg(x) if num(x).value == 3.0));
    // A sum may continue on the next line after its `+`.
    let (_, e) = value("aux(0.01) +\n    z(0.001)");
    assert_eq!(e.sum_terms().len(), 2);
}

#[test]
fn group_shapes() {
    for text in ["8 x 8", "8x8", "8 x\n 8", "2*4 x 8"] {
        let (_, e) = value(text);
        let ExprKind::Groups { groups, members } = &e.kind else {
            panic!("{text}: {e:?}")
        };
        assert_eq!(num(members).value, 8.0, "{text}");
        if text.starts_with('8') {
            assert_eq!(num(groups).value, 8.0, "{text}");
        }
    }
}

#[test]
fn whole_file_structure_and_spans() {
    let src = "# a comment line\r\nmodel mixtral-8x7b {\r\n  dim = 64 ; layers = 2  # trailing\n\n  moe {\n    experts = 8\n  }\n  heads = 4\n}\n\ntrain {\n  steps = 10\n}\n";
    let ast = parse(src).unwrap_or_else(|d| panic!("{}", d.render()));
    assert_eq!(ast.model.name.name, "mixtral-8x7b");
    let names: Vec<&str> = ast
        .model
        .fields
        .iter()
        .map(|f| f.name.name.as_str())
        .collect();
    assert_eq!(names, ["dim", "layers", "heads"]);
    let f = &ast.model.fields[1];
    assert_eq!(&src[f.name.span.start..f.name.span.end], "layers");
    assert_eq!(&src[f.value.span.start..f.value.span.end], "2");
    assert_eq!(&src[f.span().start..f.span().end], "layers = 2");
    let moe = ast.model.moe.as_ref().unwrap();
    assert_eq!(&src[moe.header.start..moe.header.end], "moe");
    assert_eq!(moe.fields[0].name.name, "experts");
    let train = ast.train.as_ref().unwrap();
    assert_eq!(train.fields[0].name.name, "steps");
    assert_eq!(
        &src[ast.model.header.start..ast.model.header.end],
        "model mixtral-8x7b"
    );
    // One-line forms.
    assert!(parse("model m {}").is_ok());
    assert!(parse("model m { dim = 1; layers = 2; }").is_ok());
    assert!(parse("train { steps = 1 }\nmodel m { dim = 1 }").is_ok());
}

/// (source, expected message substring, line, col)
const SYNTAX_ERRORS: &[(&str, &str, usize, usize)] = &[
    ("model m {\n  dim 256\n}", "expected `=`, found `256`", 2, 7),
    (
        "model m {\n  dim =\n}",
        "expected a value, found end of line",
        2,
        8,
    ),
    (
        "model m {\n  dim = 256 256\n}",
        "expected end of line or `}`, found `256`",
        2,
        13,
    ),
    (
        "model m {\n  dim = 256\n",
        "expected `}` to close the block, found end of file",
        3,
        1,
    ),
    ("modle m {\n}", "expected `model`", 1, 1),
    ("model {\n}", "expected the model's name, found `{`", 1, 7),
    (
        "model m {\n  data = text(\"abc)\n}",
        "unterminated string",
        2,
        15,
    ),
    (
        "model m {\n  balance = aux(0.01) +\n}",
        "expected a value, found `}`",
        3,
        1,
    ),
    (
        "model m {\n  x = aux(0.01 z)\n}",
        "expected `)` or `,`, found `z`",
        2,
        16,
    ),
    (
        "model m {\n  layers = [1, 2\n}",
        "expected `]` or `,`, found `}`",
        3,
        1,
    ),
    (
        "model m {\n  dim = 12abc\n}",
        "expected a value, found `12abc`",
        2,
        9,
    ),
    (
        "model m {\n  dim = @\n}",
        "expected a value, found `@`",
        2,
        9,
    ),
    (
        "model m {}\nmodel n {}",
        "a file declares exactly one model",
        2,
        1,
    ),
    (
        "model m {}\ntrain {}\ntrain {}",
        "duplicate `train` block",
        3,
        1,
    ),
    (
        "model m {\n moe {}\n moe {}\n}",
        "duplicate `moe` block",
        3,
        2,
    ),
    ("train { steps = 1 }", "missing `model` block", 1, 1),
    ("", "missing `model` block", 1, 1),
    (
        "model m {}\ntrain {\n moe { }\n}",
        "a `moe` block belongs inside the `model` block",
        3,
        2,
    ),
];

#[test]
fn syntax_errors_say_what_was_expected_and_where() {
    for (src, msg, line, col) in SYNTAX_ERRORS {
        let d = parse(src).expect_err(src);
        assert!(
            d.message().contains(msg),
            "{src:?}: message {:?} lacks {msg:?}",
            d.message()
        );
        assert_eq!((d.line, d.col), (*line, *col), "{src:?}: {}", d.render());
        let text = d.with_path("t.moe").render();
        assert!(text.contains(&format!("t.moe:{line}:{col}")), "{text}");
        assert!(!text.contains('\u{1b}'), "no ANSI escapes: {text:?}");
    }
}

#[test]
fn misspelled_keyword_gets_a_suggestion() {
    let d = parse("modle m {}").unwrap_err();
    assert_eq!(d.help_text(), Some("did you mean `model`?"));
    let d = parse("model m {}\ntrian {}").unwrap_err();
    assert_eq!(d.help_text(), Some("did you mean `train`?"));
    let d = parse("model m {\n  mo {\n  }\n}").unwrap_err();
    assert_eq!((d.line, d.col), (2, 6));
    assert!(
        d.help_text().unwrap().starts_with("did you mean `moe`?"),
        "{}",
        d.render()
    );
}

#[test]
fn hostile_nesting_is_an_error_not_a_crash() {
    let deep = format!(
        "model m {{ f = {}1{} }}",
        "(".repeat(10_000),
        ")".repeat(10_000)
    );
    assert!(parse(&deep)
        .unwrap_err()
        .message()
        .contains("nested more than"));
    let long = format!("model m {{ f = {} }}", vec!["1"; 10_000].join(" + "));
    assert!(parse(&long)
        .unwrap_err()
        .message()
        .contains("nested more than"));
    let neg = format!("model m {{ f = {}1 }}", "-".repeat(10_000));
    assert!(parse(&neg).is_err());
}
