//! Property tests of the core's entry points on arbitrary small inputs, NaN, infinities,
//! zeros, subnormals and huge values included: nothing panics, hangs or returns a
//! non-finite value from finite input; masks are exact; permutations are permutations;
//! the search never loses to the identity; refinement never increases the error and keeps
//! the mask's structure; bad input is an error, never a panic.
//!
//! `cargo test --release proptests` runs a few hundred cases per property;
//! `PROPTEST_CASES=100000 cargo test --release proptests` runs a long fuzz.

use crate::mask::{nm_mask, nm_retained, unstructured_mask};
use crate::matrix::MatRef;
use crate::permute::{self, Options, Problem};
use crate::refine::tests::Case;
use crate::refine::{Sparsity, refine};
use crate::score;
use half::{bf16, f16};
use proptest::prelude::*;
use std::time::Duration;

/// Cases per property unless `PROPTEST_CASES` says otherwise.
const DEFAULT_CASES: u32 = 256;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Any float32, weighted towards the awkward ones.
fn any_value() -> BoxedStrategy<f32> {
    prop_oneof![
        4 => -4.0f32..4.0,
        1 => Just(0.0f32),
        1 => Just(-0.0f32),
        1 => Just(f32::NAN),
        1 => Just(f32::INFINITY),
        1 => Just(f32::NEG_INFINITY),
        1 => Just(f32::MIN_POSITIVE / 8.0), // subnormal
        1 => Just(f32::from_bits(1)),       // smallest subnormal
        1 => Just(f32::MAX),
        1 => Just(-f32::MAX),
        1 => Just(1e30f32),
        1 => any::<f32>(),
    ]
    .boxed()
}

/// A finite float32, awkward ones included.
fn finite_value() -> BoxedStrategy<f32> {
    // Mapped, not filtered: rejections count against the whole run's limit.
    any_value()
        .prop_map(|v| if v.is_finite() { v } else { 1.5 })
        .boxed()
}

/// A finite, non-negative score (what the search accepts), huge and tiny included.
fn score_value() -> BoxedStrategy<f32> {
    prop_oneof![
        6 => 0.0f32..1.0,
        1 => Just(0.0f32),
        1 => Just(f32::from_bits(1)),
        1 => Just(f32::MIN_POSITIVE / 8.0),
        1 => (0u32..8).prop_map(|k| k as f32), // ties
        1 => Just(1e30f32),
        1 => Just(f32::MAX),
        1 => any::<f32>().prop_map(f32::abs),
    ]
    .boxed()
}

/// `rows x cols` values from `value`.
fn matrix<S: Strategy<Value = f32> + Clone>(
    value: S,
    rows: impl Strategy<Value = usize>,
    cols: impl Strategy<Value = usize>,
) -> impl Strategy<Value = (Vec<f32>, usize, usize)> {
    (rows, cols).prop_flat_map(move |(r, c)| {
        (
            proptest::collection::vec(value.clone(), r * c),
            Just(r),
            Just(c),
        )
    })
}

fn is_permutation(perm: &[u32]) -> bool {
    let mut seen = vec![false; perm.len()];
    perm.iter()
        .all(|&p| (p as usize) < perm.len() && !std::mem::replace(&mut seen[p as usize], true))
}

/// `(n, m)` with `1 <= n < m <= 8`, and a column count that m divides.
fn pattern() -> impl Strategy<Value = (usize, usize, usize)> {
    (2usize..=8)
        .prop_flat_map(|m| (1..m, Just(m), 1usize..=6))
        .prop_map(|(n, m, g)| (n, m, g * m))
}

proptest! {
    #![proptest_config(config())]

    /// Scores never panic; finite input gives finite scores or an error; any error
    /// is for a reason the input has.
    #[test]
    fn scores_are_finite_or_refused(
        (w, rows, cols) in matrix(any_value(), 1usize..6, 1usize..9),
        act in proptest::collection::vec(any_value(), 1..9),
        alpha in prop_oneof![Just(0.5f32), Just(0.0), Just(-1.0), Just(2.0), Just(40.0), any::<f32>()],
    ) {
        let mat = MatRef::new(&w, rows, cols, "weight").unwrap();
        let finite_w = w.iter().all(|v| v.is_finite());
        let good_act = act.len() == cols && act.iter().all(|v| v.is_finite() && *v >= 0.0);
        for result in [
            score::ria(mat, Some(&act), alpha),
            score::ria(mat, None, alpha),
            score::wanda(mat, &act),
            score::magnitude(mat),
        ] {
            match result {
                Ok(out) => {
                    prop_assert_eq!(out.len(), rows * cols);
                    prop_assert!(out.iter().all(|v| v.is_finite() && *v >= 0.0), "{:?}", out);
                }
                Err(e) => prop_assert!(!e.0.is_empty()),
            }
        }
        if finite_w {
            prop_assert!(score::magnitude(mat).is_ok());
            if alpha.is_finite() {
                prop_assert!(score::ria(mat, None, alpha).is_ok());
            }
        }
        if finite_w && good_act && alpha == 0.5 && act.iter().all(|&a| a <= 1e30) {
            // sqrt keeps act_norm ** alpha far from float32's limit.
            prop_assert!(score::ria(mat, Some(&act), alpha).is_ok());
        }
    }

    /// Half-precision weights score exactly like their float32 values.
    #[test]
    fn half_weights_score_like_f32(
        (w, rows, cols) in matrix(finite_value(), 1usize..5, 1usize..9),
    ) {
        let as_bf16: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let as_f16: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        let back_bf: Vec<f32> = as_bf16.iter().map(|v| v.to_f32()).collect();
        let back_f: Vec<f32> = as_f16.iter().map(|v| v.to_f32()).collect();
        let a = score::ria(MatRef::new(&as_bf16, rows, cols, "w").unwrap(), None, 0.5);
        let b = score::ria(MatRef::new(&back_bf, rows, cols, "w").unwrap(), None, 0.5);
        prop_assert_eq!(a, b);
        // f16 has infinities of its own (from large f32 values): refused the same way.
        let a = score::magnitude(MatRef::new(&as_f16, rows, cols, "w").unwrap());
        let b = score::magnitude(MatRef::new(&back_f, rows, cols, "w").unwrap());
        prop_assert_eq!(a, b);
    }

    /// N:M masks keep exactly n per group, and the kept sum is the group's best.
    #[test]
    fn nm_masks_are_exact(
        ((n, m, cols), rows) in (pattern(), 1usize..6),
        seed in any::<u64>(),
        bad in proptest::option::of((any::<prop::sample::Index>(), any_value())),
    ) {
        let mut s = lcg(rows * cols, seed);
        if let Some((i, v)) = bad {
            let at = i.index(s.len());
            s[at] = v;
        }
        let mat = MatRef::new(&s, rows, cols, "scores").unwrap();
        let finite = s.iter().all(|v| v.is_finite());
        match nm_mask(mat, n, m) {
            Ok(mask) => {
                prop_assert!(finite);
                for (group, values) in mask.chunks(m).zip(s.chunks(m)) {
                    prop_assert_eq!(group.iter().filter(|k| **k).count(), n);
                    // Every kept value >= every dropped one.
                    let kept_min = values.iter().zip(group).filter(|(_, k)| **k).map(|(v, _)| *v).fold(f32::INFINITY, f32::min);
                    let drop_max = values.iter().zip(group).filter(|(_, k)| !**k).map(|(v, _)| *v).fold(f32::NEG_INFINITY, f32::max);
                    prop_assert!(kept_min >= drop_max);
                }
                let kept: f64 = s.iter().zip(&mask).filter(|(_, k)| **k).map(|(v, _)| f64::from(*v)).sum();
                let retained = nm_retained(mat, n, m).unwrap();
                prop_assert!((kept - retained).abs() <= 1e-9 * kept.abs().max(1.0));
            }
            Err(e) => prop_assert!(!finite, "{}", e),
        }
    }

    /// Bad patterns are errors whatever the numbers.
    #[test]
    fn bad_patterns_are_errors(n in any::<usize>(), m in any::<usize>(), cols in 1usize..40) {
        let s = vec![1.0f32; 2 * cols];
        let mat = MatRef::new(&s, 2, cols, "scores").unwrap();
        let valid = (2..=64).contains(&m) && n >= 1 && n < m && cols % m == 0;
        prop_assert_eq!(nm_mask(mat, n, m).is_ok(), valid);
        prop_assert_eq!(nm_retained(mat, n, m).is_ok(), valid);
        prop_assert_eq!(Problem::new(&[mat], n, m).is_ok(), valid && m <= permute::problem::MAX_M);
    }

    /// Unstructured masks prune exactly `prune` (of the matrix, or of every row).
    #[test]
    fn unstructured_masks_are_exact(
        (s, rows, cols) in matrix(any_value(), 1usize..6, 1usize..12),
        frac in 0.0f64..=1.2,
        per_row in any::<bool>(),
    ) {
        let mat = MatRef::new(&s, rows, cols, "scores").unwrap();
        let limit = if per_row { cols } else { rows * cols };
        let prune = (frac * limit as f64).round() as usize;
        let finite = s.iter().all(|v| v.is_finite());
        match unstructured_mask(mat, prune, per_row) {
            Ok(mask) => {
                prop_assert!(finite && prune <= limit);
                if per_row {
                    for row in mask.chunks(cols) {
                        prop_assert_eq!(row.iter().filter(|k| !**k).count(), prune);
                    }
                } else {
                    prop_assert_eq!(mask.iter().filter(|k| !**k).count(), prune);
                }
            }
            Err(_) => prop_assert!(!finite || prune > limit),
        }
    }

    /// The search: a valid permutation, never below the identity, never above the bound,
    /// numbers consistent with `retained`; bad input is an error.
    #[test]
    fn search_is_valid_and_never_loses(
        ((n, m, cols), (s, rows, _)) in pattern().prop_flat_map(|(n, m, cols)| {
            (Just((n, m, cols)), matrix(score_value(), 1usize..7, Just(cols)))
        }),
        seed in any::<u64>(),
        tabu in proptest::option::of(0usize..40),
        block in proptest::option::of(2usize..5),
        tenure in proptest::option::of(prop_oneof![1usize..8, Just(usize::MAX)]),
        chains in 1usize..4,
    ) {
        let mat = MatRef::new(&s, rows, cols, "scores").unwrap();
        let problem = Problem::new(&[mat], n, m).unwrap();
        let options = Options {
            seed,
            tabu_steps: tabu,
            block_groups: block,
            tabu_tenure: tenure,
            chains,
            ..Options::default()
        };
        let huge = s.iter().map(|&v| f64::from(v)).fold(0.0, f64::max) * rows as f64
            > f64::from(f32::MAX) / 4.0;
        match permute::search(&problem, &options) {
            Ok(out) => {
                prop_assert!(!huge);
                prop_assert!(is_permutation(&out.perm));
                let identity: Vec<u32> = (0..cols as u32).collect();
                prop_assert_eq!(out.identity, problem.retained(&identity));
                prop_assert_eq!(out.retained, problem.retained(&out.perm));
                prop_assert!(out.retained >= out.identity, "{} < {}", out.retained, out.identity);
                prop_assert!(out.retained <= out.upper_bound * (1.0 + 1e-9) + 1e-300);
                prop_assert!(out.efficacy().is_finite());
                prop_assert!(out.retained.is_finite());
            }
            Err(e) => prop_assert!(huge, "{}", e),
        }
    }

    /// A stop request ends the search with a valid result.
    #[test]
    fn stopped_search_is_still_valid(
        ((n, m, cols), (s, rows, _)) in pattern().prop_flat_map(|(n, m, cols)| {
            (Just((n, m, cols)), matrix((0.0f32..1.0).boxed(), 1usize..5, Just(cols)))
        }),
        after in 0usize..20,
    ) {
        let mat = MatRef::new(&s, rows, cols, "scores").unwrap();
        let problem = Problem::new(&[mat], n, m).unwrap();
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let stop = || calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= after;
        let out = permute::search_with(&problem, &Options { tabu_steps: Some(50), ..Options::default() }, &stop).unwrap();
        prop_assert!(is_permutation(&out.perm));
        prop_assert!(out.retained >= out.identity);
    }

    /// `Problem` refuses negative and non-finite scores and mismatched lists, naming them.
    #[test]
    fn problem_refuses_bad_scores(
        (s, rows, cols) in matrix(any_value(), 1usize..5, Just(8usize)),
        other_cols in prop_oneof![Just(8usize), 1usize..12],
    ) {
        let mat = MatRef::new(&s, rows, cols, "a").unwrap();
        let other = vec![1.0f32; other_cols];
        let b = MatRef::new(&other, 1, other_cols, "b").unwrap();
        let ok = s.iter().all(|v| v.is_finite() && *v >= 0.0) && other_cols == 8;
        match Problem::new(&[mat, b], 2, 4) {
            Ok(_) => prop_assert!(ok),
            Err(e) => {
                prop_assert!(!ok);
                prop_assert!(e.0.contains("scores["), "{}", e);
            }
        }
    }
}

/// Deterministic values in [0, 1) with ties.
fn lcg(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) % 17) as f32 / 17.0
        })
        .collect()
}

#[test]
fn oversized_options_are_refused_before_any_work() {
    // 1 row x 2^17 columns: 2^15 groups of 4. One assignment over all groups in one block
    // would need 2^30 words (4 GiB, the bound is 1 GiB); tabu's swap matrix 2^34.
    let cols = 1 << 17;
    let s = lcg(cols, 3);
    let mat = MatRef::new(&s, 1, cols, "scores").unwrap();
    let problem = Problem::new(&[mat], 2, 4).unwrap();
    let started = std::time::Instant::now();
    let err = permute::search(
        &problem,
        &Options {
            block_groups: Some(1 << 20),
            ..Options::default()
        },
    )
    .unwrap_err();
    assert!(err.0.contains("block_groups=1048576"), "{err}");
    assert!(err.0.contains("use block_groups <="), "{err}");
    let err = permute::search(
        &problem,
        &Options {
            tabu_steps: Some(1),
            max_steps: 0,
            ..Options::default()
        },
    )
    .unwrap_err();
    assert!(err.0.contains("tabu_steps=1"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn huge_scores_are_refused_by_the_search_not_looped_on() {
    let s = vec![f32::MAX, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    let mat = MatRef::new(&s, 1, 8, "scores").unwrap();
    let problem = Problem::new(&[mat], 2, 4).unwrap();
    let err = permute::search(&problem, &Options::default()).unwrap_err();
    assert!(err.0.contains("too large"), "{err}");
    // retained_score does not need the relu sums: it still works.
    assert!(problem.retained(&(0..8).collect::<Vec<_>>()).is_finite());
}

#[test]
fn subnormal_weights_score_finite() {
    // Column and row sums of subnormals have reciprocals beyond float32: this gave
    // inf, and NaN for the zeros (0 * inf).
    let t = f32::from_bits(3);
    let w = [t, 0.0, t, t];
    let out = score::ria(MatRef::new(&w, 2, 2, "w").unwrap(), None, 0.5).unwrap();
    assert!(out.iter().all(|v| v.is_finite()), "{out:?}");
    assert_eq!(out[1], 0.0);
}

#[test]
fn act_norm_power_overflow_names_alpha() {
    let w = [1.0f32, 2.0];
    let mat = MatRef::new(&w, 1, 2, "w").unwrap();
    let err = score::ria(mat, Some(&[1e20, 1.0]), 2.0).unwrap_err();
    assert!(
        err.0
            .contains("act_norm ** alpha overflows float32 for alpha=2"),
        "{err}"
    );
    assert!(err.0.contains("act_norm[0]"), "{err}");
    // 0 ** negative is infinite.
    let err = score::ria(mat, Some(&[0.0, 1.0]), -0.5).unwrap_err();
    assert!(err.0.contains("alpha=-0.5"), "{err}");
    let err = score::wanda(
        MatRef::new(&[f32::MAX, 1.0], 1, 2, "w").unwrap(),
        &[2.0, 1.0],
    )
    .unwrap_err();
    assert!(err.0.contains("overflows float32 at (0, 0)"), "{err}");
}

#[test]
fn search_never_returns_less_than_the_identity_when_scores_span_many_magnitudes() {
    // Found by the long fuzz run (948,457 cases in): a move gained ~0.1 on its groups,
    // below the rounding of a total near 6.4e16, and the re-summed total came out one
    // ulp under the identity's.
    let s = [
        0.0,
        0.597_614_17,
        0.077_639_87,
        0.0,
        0.0,
        3.0,
        0.0,
        0.0,
        0.449_805,
        0.0,
        6.379_931_3e16,
        0.0,
        0.0,
        0.0,
        0.0,
    ];
    let problem = Problem::new(&[MatRef::new(&s, 1, 15, "scores").unwrap()], 1, 3).unwrap();
    let out = permute::search(
        &problem,
        &Options {
            seed: 1_876_153_802_248_634_252,
            chains: 1,
            ..Options::default()
        },
    )
    .unwrap();
    assert!(
        out.retained >= out.identity,
        "{} < {}",
        out.retained,
        out.identity
    );
    assert_eq!(out.retained, problem.retained(&out.perm));
}

/// Refinement's structures: N:M `(n, m)` with `cols` of at most 48, or unstructured
/// (`None`) with `cols` of at most 32 (where the candidate lists hold the whole row).
fn refine_shape() -> impl Strategy<Value = (Option<(usize, usize)>, usize)> {
    prop_oneof![
        pattern().prop_map(|(n, m, cols)| (Some((n, m)), cols)),
        (1usize..=32).prop_map(|cols| (None, cols)),
    ]
}

/// A calibration input: normal-ish values, zeros (dead channels), ties, a few large.
fn input_value() -> BoxedStrategy<f64> {
    prop_oneof![
        6 => -2.0f64..2.0,
        1 => Just(0.0),
        1 => Just(1.0),
        1 => -100.0f64..100.0,
    ]
    .boxed()
}

proptest! {
    #![proptest_config(config())]

    /// Refinement never increases the error (recomputed from scratch), keeps the N:M
    /// pattern or every row's kept count, and when it converges no single swap improves.
    #[test]
    fn refinement_never_increases_the_error_and_keeps_the_structure(
        ((shape, cols), rows, tokens) in (refine_shape(), 1usize..4, 1usize..10),
        seed in any::<u64>(),
        x_values in proptest::collection::vec(input_value(), 10 * 48),
        w_values in proptest::collection::vec(prop_oneof![4 => -3.0f32..3.0, 1 => Just(0.0f32), 1 => Just(1.0f32)], 3 * 48),
        max_sweeps in 0usize..30,
    ) {
        let case = Case::from_inputs(rows, cols, w_values[..rows * cols].to_vec(), &x_values[..tokens * cols], tokens);
        let noise = lcg(rows * cols, seed);
        let (sparsity, first) = match shape {
            Some((n, m)) => {
                let s = MatRef::new(&noise, rows, cols, "s").unwrap();
                (Sparsity::NM { n, m }, nm_mask(s, n, m).unwrap())
            }
            None => (Sparsity::Unstructured, noise.iter().map(|&v| v < 0.5).collect()),
        };
        let mut keep = first.clone();
        let stats = case.refine(&mut keep, sparsity, max_sweeps).unwrap();
        match sparsity {
            Sparsity::NM { n, m } => {
                for group in keep.chunks(m) {
                    prop_assert_eq!(group.iter().filter(|k| **k).count(), n);
                }
            }
            Sparsity::Unstructured => {
                for (a, b) in keep.chunks(cols).zip(first.chunks(cols)) {
                    prop_assert_eq!(a.iter().filter(|k| **k).count(), b.iter().filter(|k| **k).count());
                }
            }
        }
        for r in 0..rows {
            let (before, after) = (case.row_error(&first, r), case.row_error(&keep, r));
            prop_assert!(after <= before + case.slack(&first, &first, r), "row {}: {} -> {}", r, before, after);
        }
        prop_assert!(stats.error_after <= stats.error_before);
        prop_assert!(stats.sweeps <= max_sweeps);
        if stats.converged {
            prop_assert_eq!(case.improving_swap(&keep, &first, sparsity), None);
        }
    }

    /// Any numbers, NaN and infinities included: a result or an error, never a panic; an
    /// error leaves the mask as it was; finite, symmetric input with a non-negative
    /// diagonal is accepted.
    #[test]
    fn refinement_refuses_bad_numbers_without_panicking(
        ((n, m, cols), rows) in (pattern(), 1usize..4),
        w in proptest::collection::vec(any_value(), 3 * 48),
        g in proptest::collection::vec(any_value(), 48 * 48),
        r in proptest::collection::vec(any_value(), 3 * 48),
        mirror in any::<bool>(),
        unstructured in any::<bool>(),
    ) {
        let (w, r) = (&w[..rows * cols], &r[..rows * cols]);
        let mut g = g[..cols * cols].to_vec();
        if mirror {
            for i in 0..cols {
                for j in 0..i {
                    g[i * cols + j] = g[j * cols + i];
                }
            }
        }
        let first = nm_mask(MatRef::new(&lcg(rows * cols, 1), rows, cols, "s").unwrap(), n, m).unwrap();
        let mut keep = first.clone();
        let sparsity = if unstructured { Sparsity::Unstructured } else { Sparsity::NM { n, m } };
        let out = refine(
            MatRef::new(w, rows, cols, "weight").unwrap(),
            MatRef::new(&g, cols, cols, "gram").unwrap(),
            MatRef::new(r, rows, cols, "residual").unwrap(),
            &mut keep,
            sparsity,
            20,
            &|| false,
        );
        let finite = w.iter().chain(&g).chain(r).all(|v| v.is_finite());
        let valid = finite
            && (0..cols).all(|k| g[k * cols + k] >= 0.0)
            && (0..cols).all(|i| (0..cols).all(|j| g[i * cols + j] == g[j * cols + i]));
        match out {
            Ok(stats) => {
                prop_assert!(finite);
                prop_assert!(stats.error_before.is_finite() && stats.error_after.is_finite());
            }
            Err(e) => {
                prop_assert!(!valid, "{}", e);
                prop_assert_eq!(&keep, &first);
            }
        }
    }
}
