//! Invariants of the routing table (`RouteLayout`) over random routings, and of `init_params`.

use moec_compiler::interp::{init_params, init_values, route};
use moec_compiler::ir::{Graph, Init, RouteLayout};
use proptest::prelude::*;

/// Random `(layout, idx)` with distinct experts per token (as TopK produces).
fn routing() -> impl Strategy<Value = (RouteLayout, Vec<u32>)> {
    (
        1usize..12,
        1usize..9,
        prop::sample::select(vec![1usize, 2, 4, 8, 16]),
    )
        .prop_flat_map(|(tokens, experts, tile)| {
            (1..=experts).prop_flat_map(move |k| {
                let layout = RouteLayout::dropless(tokens, k, experts, tile);
                let token = Just((0..experts as u32).collect::<Vec<_>>())
                    .prop_shuffle()
                    .prop_map(move |v| v[..k].to_vec());
                prop::collection::vec(token, tokens).prop_map(move |rows| (layout, rows.concat()))
            })
        })
}

proptest! {
    #[test]
    fn route_layout_invariants((layout, idx) in routing()) {
        let t = route(&idx, &layout).unwrap();
        prop_assert_eq!(t.len(), layout.table_len());
        let e_n = layout.experts;
        let counts = &t[layout.counts_at()..layout.counts_at() + e_n];
        let offsets = &t[layout.offsets_at()..layout.offsets_at() + e_n + 1];
        let slot_row = &t[layout.slot_row_at()..layout.slot_row_at() + layout.tokens * layout.k];
        let row_slot = &t[layout.row_slot_at()..layout.row_slot_at() + layout.rows()];
        let row_expert = &t[layout.row_expert_at()..layout.row_expert_at() + layout.rows()];

        prop_assert_eq!(counts.iter().sum::<u32>() as usize, layout.tokens * layout.k);
        prop_assert_eq!(offsets[0], 0);
        for e in 0..e_n {
            let seg = (offsets[e + 1] - offsets[e]) as usize;
            prop_assert_eq!(seg % layout.tile, 0, "segment of expert {} not tile-aligned", e);
            prop_assert_eq!(seg, (counts[e] as usize).div_ceil(layout.tile) * layout.tile);
        }
        prop_assert!(offsets[e_n] as usize <= layout.rows());
        // slot_row and row_slot are inverse; a slot's row belongs to its expert.
        for (slot, &row) in slot_row.iter().enumerate() {
            prop_assert_eq!(row_slot[row as usize], slot as u32);
            prop_assert_eq!(row_expert[row as usize], idx[slot]);
        }
        let mut real = 0;
        for r in 0..layout.rows() {
            if row_slot[r] == RouteLayout::NONE {
                continue;
            }
            real += 1;
            prop_assert_eq!(slot_row[row_slot[r] as usize], r as u32);
        }
        prop_assert_eq!(real, layout.tokens * layout.k);
        // Within a segment, real rows come first, in ascending slot order; then padding.
        for e in 0..e_n {
            let seg = &row_slot[offsets[e] as usize..offsets[e + 1] as usize];
            let c = counts[e] as usize;
            prop_assert!(seg[..c].windows(2).all(|w| w[0] < w[1]));
            prop_assert!(seg[c..].iter().all(|&s| s == RouteLayout::NONE));
            prop_assert!(row_expert[offsets[e] as usize..offsets[e + 1] as usize].iter().all(|&x| x == e as u32));
        }
        // Unused worst-case rows belong to no expert.
        prop_assert!(row_expert[offsets[e_n] as usize..].iter().all(|&x| x == RouteLayout::NONE));
    }
}

#[test]
fn route_rejects_expert_out_of_range() {
    let layout = RouteLayout::dropless(1, 1, 2, 4);
    assert_eq!(route(&[2], &layout), Err(2));
}

#[test]
fn init_is_deterministic_per_name_and_seed() {
    let mut g = Graph::new();
    g.param("a.weight", &[64, 64], Init::Normal { std: 0.02 });
    g.param("n.weight", &[8], Init::Constant(1.0));
    let p1 = init_params(&g, 7);
    assert_eq!(p1, init_params(&g, 7));
    assert_ne!(p1["a.weight"], init_params(&g, 8)["a.weight"]);
    assert_eq!(p1["n.weight"], vec![1.0; 8]);
    // Adding a parameter leaves the others unchanged.
    g.param("b.weight", &[64, 64], Init::Normal { std: 0.02 });
    let p2 = init_params(&g, 7);
    assert_eq!(p1["a.weight"], p2["a.weight"]);
    assert_ne!(p2["a.weight"], p2["b.weight"]);
    // Odd sizes are filled exactly.
    assert_eq!(init_values("x", Init::Normal { std: 1.0 }, 3, 0).len(), 3);
}

#[test]
fn init_normal_has_the_requested_moments() {
    // 40_000 draws: the sample mean's standard error is 0.02/200 = 1e-4, the std's ≈ 7e-5.
    let v = init_values(
        "model.embed_tokens.weight",
        Init::Normal { std: 0.02 },
        40_000,
        0,
    );
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let std = (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
    assert!(mean.abs() < 5e-4, "mean {mean}");
    assert!((std - 0.02).abs() < 4e-4, "std {std}");
    let within_1sd = v.iter().filter(|&&x| (x as f64).abs() < 0.02).count() as f64 / n;
    assert!(
        (within_1sd - 0.6827).abs() < 0.01,
        "P(|x| < σ) = {within_1sd}"
    );
}

#[test]
fn init_uniform_stays_in_its_bounds_with_the_uniform_moments() {
    // U(±b): mean 0, variance b²/3. 40_000 draws: the mean's standard error is b/√3/200 ≈ 2.9e-3·b,
    // the variance's ≈ b²·√(4/45)/200 ≈ 1.5e-3·b²; tolerances are 4 standard errors.
    let b = 0.125f32;
    let v = init_values("lm_head.weight", Init::Uniform { bound: b }, 40_000, 0);
    assert!(v.iter().all(|&x| x.abs() <= b), "a draw outside ±{b}");
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    let b = b as f64;
    assert!(mean.abs() < 0.012 * b, "mean {mean}");
    assert!((var - b * b / 3.0).abs() < 0.006 * b * b, "variance {var}");
    // Each quarter of the interval gets a quarter of the draws (standard error 2.2e-3).
    let low = v.iter().filter(|&&x| (x as f64) < -b / 2.0).count() as f64 / n;
    assert!((low - 0.25).abs() < 0.009, "P(x < -b/2) = {low}");
    // Deterministic per name and seed, like the normal.
    assert_eq!(
        v,
        init_values("lm_head.weight", Init::Uniform { bound: 0.125 }, 40_000, 0)
    );
    assert_ne!(
        v,
        init_values("lm_head.weight", Init::Uniform { bound: 0.125 }, 40_000, 1)
    );
}
