//! The N:M objective over a (possibly stacked) score matrix, stored column-major so a
//! column's values across all rows are contiguous.

use crate::error::{Result, bail};
use crate::mask::check_pattern;
use crate::matrix::MatRef;
use crate::simd::dispatch;
use rayon::prelude::*;

/// Largest group size the permutation search supports.
pub const MAX_M: usize = 32;

/// Scores `S` (`rows x cols`, the rows of every matrix in a list stacked) and a pattern.
pub struct Problem {
    /// Column-major: column `j` is `data[j * rows..(j + 1) * rows]`.
    data: Vec<f32>,
    rows: usize,
    cols: usize,
    n: usize,
    m: usize,
    upper_bound: f64,
    /// Largest score.
    max_score: f32,
}

impl Problem {
    /// Stacks the rows of `mats` (which must share their column count) into one problem.
    /// Scores must be finite and non-negative: they are importance, and efficacy is a
    /// fraction of importance recovered.
    pub fn new(mats: &[MatRef<f32>], n: usize, m: usize) -> Result<Self> {
        let Some(first) = mats.first() else {
            bail!("scores is an empty list");
        };
        let cols = first.cols();
        for (i, mat) in mats.iter().enumerate() {
            if mat.cols() != cols {
                bail!(
                    "scores[{i}] has {} columns but scores[0] has {cols}: matrices that share \
                     a permutation must share their input columns",
                    mat.cols()
                );
            }
            let name = if mats.len() == 1 {
                "scores".to_string()
            } else {
                format!("scores[{i}]")
            };
            mat.check_non_negative(&name)?;
        }
        check_pattern(n, m, cols)?;
        if m > MAX_M {
            bail!("m must be <= {MAX_M} for the permutation search, got {m}");
        }
        if u32::try_from(cols).is_err() {
            bail!(
                "scores has {cols} columns; the permutation search supports at most {}",
                u32::MAX
            );
        }
        let rows: usize = mats.iter().map(|s| s.rows()).sum();
        let data = column_major(mats, rows, cols);
        let keep = cols / m * n;
        let upper_bound = mats
            .iter()
            .flat_map(|mat| (0..mat.rows()).map(move |i| mat.row(i)))
            .collect::<Vec<_>>()
            .par_iter()
            .map(|row| top_k_sum(row, keep))
            .collect::<Vec<f64>>()
            .iter()
            .sum();
        let max_score = data
            .par_chunks(crate::parallel::PARALLEL_MIN)
            .map(|c| c.iter().copied().fold(0.0f32, f32::max))
            .reduce(|| 0.0, f32::max);
        Ok(Self {
            data,
            rows,
            cols,
            n,
            m,
            upper_bound,
            max_score,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn m(&self) -> usize {
        self.m
    }

    pub fn groups(&self) -> usize {
        self.cols / self.m
    }

    /// Per-row unstructured bound: every row keeps its `cols * n / m` largest scores.
    pub fn upper_bound(&self) -> f64 {
        self.upper_bound
    }

    /// The largest score (scores are finite and non-negative).
    pub fn max_score(&self) -> f32 {
        self.max_score
    }

    /// All columns, column-major (`cols x rows`).
    pub fn columns(&self) -> &[f32] {
        &self.data
    }

    /// Column `j`'s score in every row.
    #[inline]
    pub fn column(&self, j: u32) -> &[f32] {
        let j = j as usize;
        &self.data[j * self.rows..(j + 1) * self.rows]
    }

    /// Score kept by the N:M rule in a group made of `members` (exact, f64).
    pub fn group_value(&self, members: &[u32]) -> f64 {
        let mut columns: [&[f32]; MAX_M] = [&[]; MAX_M];
        for (c, &j) in columns.iter_mut().zip(members) {
            *c = self.column(j);
        }
        kept_sum(&columns[..members.len()], self.n)
    }

    /// Score kept by every group of `perm` (position -> column), in group order.
    pub fn group_values(&self, perm: &[u32]) -> Vec<f64> {
        perm.par_chunks(self.m)
            .map(|g| self.group_value(g))
            .collect()
    }

    /// Total score kept under `perm`, summed in group order (deterministic).
    pub fn retained(&self, perm: &[u32]) -> f64 {
        self.group_values(perm).iter().sum()
    }
}

/// Side of the square tiles the transpose goes through. A tile is copied into a local
/// buffer and written out column by column, so every access to the big arrays is a run of
/// `TILE` floats: going a column at a time, or even `TILE` columns at a time, reads or
/// writes streams whose power-of-two-like strides share cache sets (a 12288x4096 stack
/// took 0.7 s on two cores, most of `Problem::new`).
const TILE: usize = 64;

/// The rows of `mats` stacked, column-major (`cols x rows`); parallel over stripes of
/// `TILE` columns.
fn column_major(mats: &[MatRef<f32>], rows: usize, cols: usize) -> Vec<f32> {
    let stacked: Vec<&[f32]> = mats
        .iter()
        .flat_map(|mat| (0..mat.rows()).map(|i| mat.row(i)))
        .collect();
    let mut data = vec![0.0f32; rows * cols];
    data.par_chunks_mut(TILE * rows)
        .enumerate()
        .for_each(|(stripe, out)| {
            let (j0, width) = (stripe * TILE, out.len() / rows);
            let mut tile = [[0.0f32; TILE]; TILE];
            for r0 in (0..rows).step_by(TILE) {
                let height = TILE.min(rows - r0);
                for (buf, row) in tile.iter_mut().zip(&stacked[r0..r0 + height]) {
                    buf[..width].copy_from_slice(&row[j0..j0 + width]);
                }
                for k in 0..width {
                    let column = &mut out[k * rows + r0..k * rows + r0 + height];
                    for (o, buf) in column.iter_mut().zip(&tile) {
                        *o = buf[k];
                    }
                }
            }
        });
    data
}

/// Rows handled together by the selection network (one AVX-512 register of f32).
const LANES: usize = 16;

/// Partially sorts each lane of `vals` (one array per column) so that `vals[..n]` hold
/// that row's `n` largest values in descending order: `n` bubble passes of
/// compare-exchanges, branch-free so they vectorise across lanes.
#[inline(always)]
fn select_top(vals: &mut [[f32; LANES]], n: usize) {
    for i in 0..n {
        for j in (i + 1..vals.len()).rev() {
            let (a, b) = (vals[j - 1], vals[j]);
            let mut hi = [0.0f32; LANES];
            let mut lo = [0.0f32; LANES];
            for l in 0..LANES {
                hi[l] = if a[l] > b[l] { a[l] } else { b[l] };
                lo[l] = if a[l] > b[l] { b[l] } else { a[l] };
            }
            vals[j - 1] = hi;
            vals[j] = lo;
        }
    }
}

/// Loads rows `r..r + LANES` of `columns` into lanes.
#[inline(always)]
fn load_lanes(columns: &[&[f32]], r: usize, vals: &mut [[f32; LANES]; MAX_M]) {
    for (v, c) in vals.iter_mut().zip(columns) {
        v.copy_from_slice(&c[r..r + LANES]);
    }
}

/// Scalar path for the rows after the last full block of lanes: row `r` sorted descending.
#[inline(always)]
fn tail_sorted(columns: &[&[f32]], r: usize) -> [f32; MAX_M] {
    let mut buf = [0.0f32; MAX_M];
    for (b, c) in buf.iter_mut().zip(columns) {
        *b = c[r];
    }
    buf[..columns.len()].sort_unstable_by(|a, b| b.total_cmp(a));
    buf
}

dispatch! {
    /// `sum_r` of the `n` largest values among `columns[..][r]`, accumulated in f64.
    pub fn kept_sum(columns: &[&[f32]], n: usize) -> f64 => kept_sum_impl
}

#[inline(always)]
fn kept_sum_impl(columns: &[&[f32]], n: usize) -> f64 {
    let rows = columns[0].len();
    let k = columns.len();
    let mut vals = [[0.0f32; LANES]; MAX_M];
    let mut acc = [0.0f64; LANES];
    let full = rows / LANES * LANES;
    for r in (0..full).step_by(LANES) {
        load_lanes(columns, r, &mut vals);
        select_top(&mut vals[..k], n);
        for v in &vals[..n] {
            for l in 0..LANES {
                acc[l] += f64::from(v[l]);
            }
        }
    }
    let mut total: f64 = acc.iter().sum();
    for r in full..rows {
        total += tail_sorted(columns, r)[..n]
            .iter()
            .map(|&v| f64::from(v))
            .sum::<f64>();
    }
    total
}

dispatch! {
    /// `out[r]` = the `n`-th largest value among `columns[..][r]`.
    pub fn nth_largest(columns: &[&[f32]], n: usize, out: &mut [f32]) => nth_largest_impl
}

#[inline(always)]
fn nth_largest_impl(columns: &[&[f32]], n: usize, out: &mut [f32]) {
    let rows = out.len();
    let k = columns.len();
    let mut vals = [[0.0f32; LANES]; MAX_M];
    let full = rows / LANES * LANES;
    for r in (0..full).step_by(LANES) {
        load_lanes(columns, r, &mut vals);
        select_top(&mut vals[..k], n);
        out[r..r + LANES].copy_from_slice(&vals[n - 1]);
    }
    for (r, o) in out.iter_mut().enumerate().skip(full) {
        *o = tail_sorted(columns, r)[n - 1];
    }
}

dispatch! {
    /// Leave-one-out statistics of a group, and the group's own kept score, from one
    /// top-`(n + 1)` selection per row. For each member `k` of `columns` (a group of
    /// `m = columns.len() > n` columns, all with the same rows): `t[k * rows + r]` = the
    /// `n`-th largest value of row `r` among the other `m - 1` columns, and `sums[k]` = the
    /// sum over rows of their `n` largest values. Returns the group's kept score (the `n`
    /// largest of all `m`, summed), as [`kept_sum`] over `columns`.
    ///
    /// Per row, with `v` the group's values sorted descending and `x` the member's value,
    /// the others sorted are `v` without one element equal to `x`: their `i`-th largest
    /// is `v[i]` if `v[i] > x`, else `v[i + 1]` (so only `v[..=n]` is needed). Every value,
    /// and every f64 sum with its additions in the same order, equals what [`nth_largest`]
    /// and [`kept_sum`] over the other `m - 1` columns give (and [`kept_sum`] over
    /// `columns` for the return value), in O(m * n) per row instead of O(m^2 * n).
    pub fn leave_one_out(columns: &[&[f32]], n: usize, t: &mut [f32], sums: &mut [f64]) -> f64 => leave_one_out_impl
}

#[inline(always)]
fn leave_one_out_impl(columns: &[&[f32]], n: usize, t: &mut [f32], sums: &mut [f64]) -> f64 {
    let m = columns.len();
    let rows = columns[0].len();
    assert!(n < m && m <= MAX_M && t.len() == m * rows && sums.len() == m);
    let mut vals = [[0.0f32; LANES]; MAX_M];
    // Per member, per lane: the leave-one-out top-n sums; `group`: the group's own.
    let mut acc = [[0.0f64; LANES]; MAX_M];
    let mut group = [0.0f64; LANES];
    let full = rows / LANES * LANES;
    for r in (0..full).step_by(LANES) {
        load_lanes(columns, r, &mut vals);
        select_top(&mut vals[..m], n + 1);
        for v in &vals[..n] {
            for l in 0..LANES {
                group[l] += f64::from(v[l]);
            }
        }
        for (k, (column, acc)) in columns.iter().zip(&mut acc).enumerate() {
            let x: &[f32; LANES] = column[r..r + LANES].try_into().unwrap();
            let mut nth = [0.0f32; LANES];
            for i in 0..n {
                for l in 0..LANES {
                    nth[l] = if vals[i][l] > x[l] {
                        vals[i][l]
                    } else {
                        vals[i + 1][l]
                    };
                    acc[l] += f64::from(nth[l]);
                }
            }
            t[k * rows + r..k * rows + r + LANES].copy_from_slice(&nth);
        }
    }
    for (s, acc) in sums.iter_mut().zip(&acc) {
        *s = acc.iter().sum();
    }
    let mut total: f64 = group.iter().sum();
    for r in full..rows {
        let v = tail_sorted(columns, r);
        total += v[..n].iter().map(|&v| f64::from(v)).sum::<f64>();
        for (k, (column, s)) in columns.iter().zip(sums.iter_mut()).enumerate() {
            let x = column[r];
            let rest = |i: usize| if v[i] > x { v[i] } else { v[i + 1] };
            *s += (0..n).map(|i| f64::from(rest(i))).sum::<f64>();
            t[k * rows + r] = rest(n - 1);
        }
    }
    total
}

fn top_k_sum(row: &[f32], k: usize) -> f64 {
    if k == 0 {
        return 0.0;
    }
    let mut v = row.to_vec();
    let (top, kth, _) = v.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    top.iter().map(|&x| f64::from(x)).sum::<f64>() + f64::from(*kth)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn naive_retained(
        s: &[f32],
        rows: usize,
        cols: usize,
        n: usize,
        m: usize,
        perm: &[u32],
    ) -> f64 {
        let mut total = 0.0;
        for r in 0..rows {
            for g in perm.chunks(m) {
                let mut v: Vec<f32> = g.iter().map(|&j| s[r * cols + j as usize]).collect();
                v.sort_by(|a, b| b.total_cmp(a));
                total += v[..n].iter().map(|&x| f64::from(x)).sum::<f64>();
            }
        }
        total
    }

    #[test]
    fn retained_matches_a_naive_loop_for_stacked_matrices() {
        let (cols, n, m) = (12, 2, 4);
        let a: Vec<f32> = (0..5 * cols).map(|i| ((i * 7919) % 97) as f32).collect();
        let b: Vec<f32> = (0..3 * cols).map(|i| ((i * 104729) % 89) as f32).collect();
        let p = Problem::new(
            &[
                MatRef::new(&a, 5, cols, "a").unwrap(),
                MatRef::new(&b, 3, cols, "b").unwrap(),
            ],
            n,
            m,
        )
        .unwrap();
        let stacked: Vec<f32> = a.iter().chain(&b).copied().collect();
        let perm: Vec<u32> = vec![3, 0, 11, 5, 1, 2, 4, 10, 9, 8, 7, 6];
        let want = naive_retained(&stacked, 8, cols, n, m, &perm);
        assert!((p.retained(&perm) - want).abs() < 1e-9);
        let identity: Vec<u32> = (0..cols as u32).collect();
        assert!(p.retained(&identity) <= p.upper_bound() + 1e-9);
        assert!(p.retained(&perm) <= p.upper_bound() + 1e-9);
    }

    /// `leave_one_out`'s thresholds and sums for member `skip`, the direct way:
    /// `nth_largest` and `kept_sum` over the other `m - 1` columns.
    pub(crate) fn direct_leave_one_out(
        columns: &[&[f32]],
        n: usize,
        skip: usize,
    ) -> (Vec<f32>, f64) {
        let rest: Vec<&[f32]> = columns
            .iter()
            .enumerate()
            .filter(|&(k, _)| k != skip)
            .map(|(_, &c)| c)
            .collect();
        let mut t = vec![0.0f32; columns[0].len()];
        nth_largest(&rest, n, &mut t);
        (t, kept_sum(&rest, n))
    }

    #[test]
    fn leave_one_out_equals_the_direct_computation() {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(11);
        let patterns = [
            (1, 2),
            (2, 4),
            (3, 4),
            (1, 4),
            (4, 8),
            (7, 8),
            (8, 16),
            (5, 16),
            (16, 32),
            (31, 32),
            (1, 32),
        ];
        for (n, m) in patterns {
            for rows in [1, 5, 16, 37, 48, 100] {
                // Few distinct values (many ties, zeros included), then continuous ones.
                for distinct in [2u32, 4, 0] {
                    let data: Vec<Vec<f32>> = (0..m)
                        .map(|_| {
                            (0..rows)
                                .map(|_| match distinct {
                                    0 => rng.random::<f32>(),
                                    d => rng.random_range(0..d) as f32,
                                })
                                .collect()
                        })
                        .collect();
                    let columns: Vec<&[f32]> = data.iter().map(Vec::as_slice).collect();
                    let mut t = vec![f32::NAN; m * rows];
                    let mut sums = vec![f64::NAN; m];
                    let value = leave_one_out(&columns, n, &mut t, &mut sums);
                    let case = format!("{n}:{m} rows={rows} distinct={distinct}");
                    // Same additions in the same order: equal, not merely close.
                    assert_eq!(value, kept_sum(&columns, n), "{case}");
                    for skip in 0..m {
                        let (want_t, want_sum) = direct_leave_one_out(&columns, n, skip);
                        assert_eq!(&t[skip * rows..(skip + 1) * rows], &want_t[..], "{case}");
                        assert_eq!(sums[skip], want_sum, "{case} member {skip}");
                    }
                }
            }
        }
    }

    #[test]
    fn rejects_mismatched_and_negative_input() {
        let a = [1.0f32; 8];
        let b = [1.0f32; 12];
        let err = Problem::new(
            &[
                MatRef::new(&a, 2, 4, "a").unwrap(),
                MatRef::new(&b, 2, 6, "b").unwrap(),
            ],
            2,
            4,
        );
        assert!(err.err().unwrap().0.contains("scores[1] has 6 columns"));
        let neg = [1.0f32, -1.0, 0.0, 0.0];
        let err = Problem::new(&[MatRef::new(&neg, 1, 4, "s").unwrap()], 2, 4);
        assert!(err.err().unwrap().0.contains(">= 0"));
        assert!(Problem::new(&[], 2, 4).is_err());
    }
}
