//! Mask selection: N:M (keep `n` of every `m` consecutive input columns in a row) and
//! unstructured (prune exactly `k` weights, per matrix or per row).
//!
//! Ties are broken by position so the result never depends on thread count: the
//! element with the lower column (or flat) index counts as more important.

use crate::error::{Result, bail};
use crate::matrix::MatRef;
use crate::parallel::for_each_row_mut;
use rayon::prelude::*;

/// Checks an N:M pattern against a matrix with `cols` input columns.
pub fn check_pattern(n: usize, m: usize, cols: usize) -> Result<()> {
    if m < 2 {
        bail!("m must be >= 2, got {m}");
    }
    if n < 1 || n >= m {
        bail!("n must satisfy 1 <= n < m, got n={n}, m={m}");
    }
    if cols % m != 0 {
        bail!("the number of input columns ({cols}) is not divisible by m={m}");
    }
    Ok(())
}

/// Keep-bits of one group: bit `i` is set when `group[i]` is among the `n` largest.
///
/// O(m^2) comparisons; groups are small (m = 4 or 8 in practice).
#[inline]
pub fn group_keep_bits(group: &[f32], n: usize) -> u64 {
    assert!(group.len() <= 64, "a group has at most 64 columns");
    let mut bits = 0u64;
    for (i, &v) in group.iter().enumerate() {
        let rank = group
            .iter()
            .enumerate()
            .filter(|&(j, &u)| u > v || (u == v && j < i))
            .count();
        if rank < n {
            bits |= 1 << i;
        }
    }
    bits
}

/// N:M keep-mask of a score matrix (row-major, `true` = kept).
pub fn nm_mask(scores: MatRef<f32>, n: usize, m: usize) -> Result<Vec<bool>> {
    check_pattern(n, m, scores.cols())?;
    if m > 64 {
        bail!("m must be <= 64, got {m}");
    }
    scores.check_finite("scores")?;
    let mut mask = vec![false; scores.rows() * scores.cols()];
    let cols = scores.cols();
    match m {
        2 => for_each_row_mut(&mut mask, cols, |r, keep| {
            keep_fixed::<2>(scores.row(r), n, keep)
        }),
        4 => for_each_row_mut(&mut mask, cols, |r, keep| {
            keep_fixed::<4>(scores.row(r), n, keep)
        }),
        8 => for_each_row_mut(&mut mask, cols, |r, keep| {
            keep_fixed::<8>(scores.row(r), n, keep)
        }),
        _ => for_each_row_mut(&mut mask, cols, |r, keep| {
            keep_any(scores.row(r), n, m, keep)
        }),
    }
    Ok(mask)
}

/// Keep-mask of one row for a group size known at compile time: the rank of each value
/// is counted branch-free (same order as `group_keep_bits`), which the compiler unrolls.
#[inline]
fn keep_fixed<const M: usize>(row: &[f32], n: usize, keep: &mut [bool]) {
    for (group, keep) in row.chunks_exact(M).zip(keep.chunks_exact_mut(M)) {
        let g: &[f32; M] = group.try_into().expect("chunks of M");
        for i in 0..M {
            let mut rank = 0usize;
            for j in 0..M {
                rank += usize::from(g[j] > g[i] || (g[j] == g[i] && j < i));
            }
            keep[i] = rank < n;
        }
    }
}

fn keep_any(row: &[f32], n: usize, m: usize, keep: &mut [bool]) {
    for (group, keep) in row.chunks_exact(m).zip(keep.chunks_exact_mut(m)) {
        let bits = group_keep_bits(group, n);
        for (i, k) in keep.iter_mut().enumerate() {
            *k = bits >> i & 1 == 1;
        }
    }
}

/// Sum of the scores an N:M mask keeps, in f64.
pub fn nm_retained(scores: MatRef<f32>, n: usize, m: usize) -> Result<f64> {
    check_pattern(n, m, scores.cols())?;
    if m > 64 {
        bail!("m must be <= 64, got {m}");
    }
    scores.check_finite("scores")?;
    Ok((0..scores.rows())
        .into_par_iter()
        .map(|r| {
            scores
                .row(r)
                .chunks_exact(m)
                .map(|g| top_n_sum(g, n))
                .sum::<f64>()
        })
        .collect::<Vec<f64>>()
        .iter()
        .sum())
}

/// Sum of the scores a keep-mask (`rows x cols`, row-major, True = kept) keeps, in f64.
/// Rows are summed in parallel and their sums added in row order, so the result does not
/// depend on the thread count.
pub fn kept_sum(scores: MatRef<f32>, keep: &[bool]) -> Result<f64> {
    let cols = scores.cols();
    if keep.len() != scores.rows() * cols {
        bail!(
            "keep has {} entries, expected the scores' {} x {cols}",
            keep.len(),
            scores.rows()
        );
    }
    // A NaN or inf would make the sum NaN or inf, silently.
    scores.check_finite("scores")?;
    Ok((0..scores.rows())
        .into_par_iter()
        .map(|r| kept_row_sum(scores.row(r), &keep[r * cols..(r + 1) * cols]))
        .collect::<Vec<f64>>()
        .iter()
        .sum())
}

/// One row's kept sum over eight interleaved f64 accumulators (a branch-free select the
/// compiler vectorises; a single running sum could not be reordered).
fn kept_row_sum(row: &[f32], keep: &[bool]) -> f64 {
    const LANES: usize = 8;
    let kept = |v: f32, k: bool| if k { f64::from(v) } else { 0.0 };
    let mut acc = [0.0f64; LANES];
    let values = row.chunks_exact(LANES);
    let tail: f64 = values
        .remainder()
        .iter()
        .zip(&keep[row.len() - values.remainder().len()..])
        .map(|(&v, &k)| kept(v, k))
        .sum();
    for (v, k) in values.zip(keep.chunks_exact(LANES)) {
        for lane in 0..LANES {
            acc[lane] += kept(v[lane], k[lane]);
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// Sum of the `n` largest values of a small group, in f64.
#[inline]
pub fn top_n_sum(group: &[f32], n: usize) -> f64 {
    let bits = group_keep_bits(group, n);
    group
        .iter()
        .enumerate()
        .filter(|(i, _)| bits >> i & 1 == 1)
        .map(|(_, &v)| f64::from(v))
        .sum()
}

/// Unstructured keep-mask that prunes exactly `prune` weights: of the whole matrix, or
/// of every row when `per_row` (then `prune` counts per row).
pub fn unstructured_mask(scores: MatRef<f32>, prune: usize, per_row: bool) -> Result<Vec<bool>> {
    scores.check_finite("scores")?;
    let limit = if per_row {
        scores.cols()
    } else {
        scores.rows() * scores.cols()
    };
    if prune > limit {
        bail!("cannot prune {prune} weights of {limit}");
    }
    if per_row && u32::try_from(scores.cols()).is_err() {
        // Per-row keys hold the column index in 32 bits.
        bail!(
            "scores has {} columns; per-row selection supports at most {}",
            scores.cols(),
            u32::MAX
        );
    }
    if per_row {
        let mut mask = vec![true; scores.rows() * scores.cols()];
        for_each_row_mut(&mut mask, scores.cols(), |r, mask_row| {
            prune_row(scores.row(r), prune, mask_row)
        });
        Ok(mask)
    } else {
        Ok(prune_global(scores.data(), prune))
    }
}

/// An unsigned key with the same order as the float (`-0.0` and `0.0` are equal).
#[inline]
fn order_key(v: f32) -> u32 {
    let bits = (v + 0.0).to_bits();
    if bits >> 31 == 1 {
        !bits
    } else {
        bits | 0x8000_0000
    }
}

/// Importance order of `(value, index)`: larger value first, then lower index first.
/// Ascending keys are therefore "least important first".
#[inline]
fn importance_key(v: f32, index: usize) -> u64 {
    (u64::from(order_key(v)) << 32) | u64::from(u32::MAX - index as u32)
}

fn prune_row(row: &[f32], prune: usize, mask_row: &mut [bool]) {
    if prune == 0 {
        return;
    }
    let mut keys: Vec<u64> = row
        .iter()
        .enumerate()
        .map(|(j, &v)| importance_key(v, j))
        .collect();
    let (_, &mut kth, _) = keys.select_nth_unstable(prune - 1);
    for (j, (&v, keep)) in row.iter().zip(mask_row.iter_mut()).enumerate() {
        *keep = importance_key(v, j) > kth;
    }
}

/// Elements per parallel task in the global selection.
const CHUNK: usize = 1 << 16;
const BINS: usize = 1 << 16;

/// Global selection by a two-pass radix select on the 32-bit order key (two 16-bit
/// digits), then a positional cut among the values equal to the threshold.
/// O(len) work, O(threads * 2^16) memory.
fn prune_global(values: &[f32], prune: usize) -> Vec<bool> {
    if prune == 0 {
        return vec![true; values.len()];
    }
    let hist_hi = histogram(values, |k| Some((k >> 16) as usize));
    let (hi, below_hi, _) = find_bin(&hist_hi, prune);
    let hist_lo = histogram(values, |k| {
        ((k >> 16) as usize == hi).then_some((k & 0xFFFF) as usize)
    });
    let (lo, below_lo, _) = find_bin(&hist_lo, prune - below_hi);
    let threshold = ((hi as u32) << 16) | lo as u32;
    // Of the values equal to the threshold, prune `need`, taking the highest indices.
    let need = prune - below_hi - below_lo;
    let equal_per_chunk: Vec<usize> = values
        .par_chunks(CHUNK)
        .map(|c| c.iter().filter(|&&v| order_key(v) == threshold).count())
        .collect();
    let mut remaining = need;
    let mut cut = values.len();
    for (ci, &count) in equal_per_chunk.iter().enumerate().rev() {
        if remaining == 0 {
            break;
        }
        let start = ci * CHUNK;
        if count < remaining {
            remaining -= count;
            cut = start;
            continue;
        }
        let chunk = &values[start..(start + CHUNK).min(values.len())];
        for (j, &v) in chunk.iter().enumerate().rev() {
            if order_key(v) == threshold {
                remaining -= 1;
                if remaining == 0 {
                    cut = start + j;
                    break;
                }
            }
        }
    }
    let mut mask = vec![false; values.len()];
    mask.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(ci, out)| {
            let start = ci * CHUNK;
            for (j, keep) in out.iter_mut().enumerate() {
                let key = order_key(values[start + j]);
                *keep = key > threshold || (key == threshold && start + j < cut);
            }
        });
    mask
}

fn histogram(values: &[f32], digit: impl Fn(u32) -> Option<usize> + Sync) -> Vec<usize> {
    values
        .par_chunks(CHUNK)
        .fold(
            || vec![0usize; BINS],
            |mut h, chunk| {
                for &v in chunk {
                    if let Some(d) = digit(order_key(v)) {
                        h[d] += 1;
                    }
                }
                h
            },
        )
        .reduce(
            || vec![0usize; BINS],
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                a
            },
        )
}

/// The bin holding the `k`-th smallest element (1-based), the count below it, and its own count.
fn find_bin(hist: &[usize], k: usize) -> (usize, usize, usize) {
    let mut below = 0;
    for (bin, &count) in hist.iter().enumerate() {
        if below + count >= k {
            return (bin, below, count);
        }
        below += count;
    }
    unreachable!("k exceeds the histogram total")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator for tests (no dependency on the solver's RNG).
    pub(crate) fn lcg_values(len: usize, seed: u64, levels: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) % levels) as f32 / levels as f32
            })
            .collect()
    }

    #[test]
    fn kept_sum_adds_exactly_the_kept_scores() {
        let (rows, cols) = (7, 13);
        let values = lcg_values(rows * cols, 3, 1000);
        let keep: Vec<bool> = (0..rows * cols).map(|i| i % 3 != 1).collect();
        let scores = MatRef::new(&values, rows, cols, "scores").unwrap();
        let expected: f64 = values
            .iter()
            .zip(&keep)
            .filter(|(_, k)| **k)
            .map(|(&v, _)| f64::from(v))
            .sum();
        let got = kept_sum(scores, &keep).unwrap();
        assert!((got - expected).abs() <= 1e-12 * expected.abs());
        assert!(kept_sum(scores, &keep[1..]).is_err());
    }

    #[test]
    fn kept_sum_refuses_non_finite_scores() {
        let mut values = vec![1.0f32; 12];
        values[7] = f32::NAN;
        let keep = vec![false; 12];
        let scores = MatRef::new(&values, 3, 4, "scores").unwrap();
        let err = kept_sum(scores, &keep).unwrap_err();
        assert_eq!(err.0, "scores contains NaN at (1, 3)");
    }

    #[test]
    fn nm_keeps_the_best_subset_by_brute_force() {
        for (n, m) in [(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (2, 8)] {
            for seed in 0..200 {
                // Few levels force many ties.
                let g = lcg_values(m, seed, 5);
                let bits = group_keep_bits(&g, n);
                assert_eq!(bits.count_ones() as usize, n);
                let kept: f64 = (0..m)
                    .filter(|i| bits >> i & 1 == 1)
                    .map(|i| f64::from(g[i]))
                    .sum();
                let best = (0u64..1 << m)
                    .filter(|b| b.count_ones() as usize == n)
                    .map(|b| {
                        (0..m)
                            .filter(|i| b >> i & 1 == 1)
                            .map(|i| f64::from(g[i]))
                            .sum::<f64>()
                    })
                    .fold(f64::MIN, f64::max);
                assert_eq!(kept, best, "n={n} m={m} group={g:?}");
            }
        }
    }

    #[test]
    fn fixed_size_paths_agree_with_the_generic_one() {
        for (n, m) in [(1, 2), (2, 4), (3, 4), (4, 8), (7, 8)] {
            let row = lcg_values(m * 50, m as u64, 4);
            let (mut fast, mut slow) = (vec![false; row.len()], vec![false; row.len()]);
            match m {
                2 => keep_fixed::<2>(&row, n, &mut fast),
                4 => keep_fixed::<4>(&row, n, &mut fast),
                _ => keep_fixed::<8>(&row, n, &mut fast),
            }
            keep_any(&row, n, m, &mut slow);
            assert_eq!(fast, slow, "{n}:{m}");
        }
    }

    #[test]
    fn nm_ties_keep_the_lower_index() {
        assert_eq!(group_keep_bits(&[1.0, 1.0, 1.0, 1.0], 2), 0b0011);
        assert_eq!(group_keep_bits(&[0.0, 2.0, 2.0, 2.0], 2), 0b0110);
    }

    #[test]
    fn nm_mask_and_retained_agree() {
        let s = lcg_values(6 * 16, 3, 1000);
        let m = MatRef::new(&s, 6, 16, "s").unwrap();
        let mask = nm_mask(m, 2, 4).unwrap();
        let kept: f64 = s
            .iter()
            .zip(&mask)
            .filter(|(_, k)| **k)
            .map(|(v, _)| f64::from(*v))
            .sum();
        assert!((kept - nm_retained(m, 2, 4).unwrap()).abs() < 1e-9);
        for group in mask.chunks(4) {
            assert_eq!(group.iter().filter(|k| **k).count(), 2);
        }
    }

    #[test]
    fn pattern_errors_name_the_problem() {
        assert!(
            check_pattern(2, 4, 10)
                .unwrap_err()
                .0
                .contains("not divisible by m=4")
        );
        assert!(check_pattern(4, 4, 8).unwrap_err().0.contains("1 <= n < m"));
        assert!(check_pattern(0, 4, 8).is_err());
    }

    fn naive_unstructured(values: &[f32], prune: usize) -> Vec<bool> {
        let mut order: Vec<usize> = (0..values.len()).collect();
        // Least important first: smaller value, then higher index.
        order.sort_by(|&a, &b| values[a].partial_cmp(&values[b]).unwrap().then(b.cmp(&a)));
        let mut keep = vec![true; values.len()];
        for &i in &order[..prune] {
            keep[i] = false;
        }
        keep
    }

    #[test]
    fn global_selection_matches_a_sort_with_ties_and_negatives() {
        for (len, levels) in [(1000, 7), (300_000, 1 << 20), (200_000, 3)] {
            let mut v = lcg_values(len, len as u64, levels);
            v.iter_mut().step_by(3).for_each(|x| *x = -*x);
            for frac in [0.0, 0.1, 0.5, 0.77, 1.0] {
                let prune = (frac * len as f64).round() as usize;
                assert!(
                    prune_global(&v, prune) == naive_unstructured(&v, prune),
                    "len={len} frac={frac}"
                );
            }
        }
    }

    #[test]
    fn per_row_selection_matches_a_sort() {
        let (rows, cols) = (5, 33);
        let v = lcg_values(rows * cols, 9, 4);
        let m = MatRef::new(&v, rows, cols, "s").unwrap();
        let mask = unstructured_mask(m, 17, true).unwrap();
        for r in 0..rows {
            assert_eq!(
                &mask[r * cols..(r + 1) * cols],
                naive_unstructured(m.row(r), 17).as_slice()
            );
        }
    }

    #[test]
    fn negative_zero_ties_with_zero() {
        let v = [0.0f32, -0.0, 0.0, -0.0];
        assert_eq!(prune_global(&v, 2), vec![true, true, false, false]);
    }
}
