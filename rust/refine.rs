//! Mask refinement against a layer's output error, by swaps (DSnoT, 2023; SparseSwaps,
//! 2025).
//!
//! # The objective
//! For one output row `w` (length `cols`, the Linear's input features) and its keep-mask
//! `m`, the pruned part is `d = w * (1 - m)`, and the row's squared output error over the
//! calibration tokens `X` (`tokens x cols`) is `E = ||X d||^2 = d^T G d`, with the Gram
//! matrix `G = X^T X` (`cols x cols`; SparseGPT's Hessian up to scale). Refinement swaps a
//! kept weight `j` (it becomes pruned) with a pruned weight `i` (it becomes kept) whenever
//! that lowers `E`, so the row's kept count, and with N:M the count of every group, never
//! changes.
//!
//! # Why a candidate swap costs O(1)
//! A swap changes `d` by `w_j e_j - w_i e_i`. With the residual `r = G d` kept up to date,
//! the change of the error is
//! `dE = 2 (w_j r_j - w_i r_i) + w_j^2 G_jj + w_i^2 G_ii - 2 w_i w_j G_ij`:
//! a few numbers per pair, no pass over the row. Only an accepted swap costs O(cols), to
//! update `r += w_j G[j, :] - w_i G[i, :]`. The starting residual of all rows, `R = D G`,
//! is one GEMM, which the caller computes (torch, on the GPU when there is one).
//!
//! # The search
//! - N:M: a sweep visits the groups in order and applies, in each, the best improving swap
//!   of a kept and a pruned column of that group; the pattern stays exact by construction.
//! - Unstructured: see [`sweep_unstructured`].
//!
//! A swap is accepted only when it lowers the row's error by more than [`REL_TOL`] of it.
//! A row stops after a sweep that finds no such swap (a swap-local optimum) or after
//! `max_sweeps` sweeps. Rows are independent and run in parallel; each row's work is
//! sequential, so the result does not depend on the number of threads.
//!
//! # Precision
//! `r` is tracked in f64 from the f32 `R`, so the updates add no rounding of their own;
//! errors are exact up to the rounding of the inputs (`G` and `R` in f32).

use crate::error::{Result, bail};
use crate::mask::check_pattern;
use crate::matrix::{Element, MatRef};
use crate::parallel::PARALLEL_MIN;
use crate::permute::Stop;
use crate::simd::dispatch;
use rayon::prelude::*;

/// A swap must lower its row's error by more than this fraction of the error. Not 0: a
/// gain below the rounding of the f32 inputs may be no gain at all, and one this small is
/// not worth an O(cols) update.
pub const REL_TOL: f64 = 1e-7;

/// Unstructured refinement: candidates per side (kept to drop, pruned to grow) in a sweep.
pub const CANDIDATES: usize = 32;

/// Largest `m` of an N:M pattern (as for [`crate::mask::nm_mask`]).
const MAX_M: usize = 64;

/// `gram` counts as symmetric when `|G_ij - G_ji| <= SYMMETRY_TOL * sqrt(G_ii G_jj)`: far
/// above the rounding of a float32 (or TF32) `X^T X`, far below a wrong matrix.
const SYMMETRY_TOL: f64 = 1e-3;

/// Which swaps keep the mask's structure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sparsity {
    /// Keep `n` of every `m` consecutive columns: swaps stay inside a group.
    NM { n: usize, m: usize },
    /// Any mask: swaps anywhere in a row keep the row's kept count.
    Unstructured,
}

/// What a call did. Errors are `sum over rows of d^T G d`, in the units of `G` times the
/// weights squared.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Stats {
    /// Output error of the given mask.
    pub error_before: f64,
    /// Output error of the refined mask (never above `error_before`).
    pub error_after: f64,
    /// Swaps made, over all rows.
    pub swaps: usize,
    /// Most sweeps any row ran (the last one of a converged row finds nothing).
    pub sweeps: usize,
    /// True when every row stopped at a swap-local optimum rather than at `max_sweeps`.
    pub converged: bool,
}

/// Refines the keep-mask `keep` (row-major, `true` = kept, the weight's shape) in place.
///
/// - `weight`: `(rows, cols)`, finite.
/// - `gram`: `G = X^T X`, `(cols, cols)`, finite and symmetric.
/// - `residual`: `R = D G`, `(rows, cols)`, with `D = weight * !keep`.
/// - `sparsity`: with N:M, `keep` must hold exactly `n` per group.
///
/// `stop` is polled before every sweep (of a row, or of a batch of N:M rows); when it
/// returns true the rows stop where they are (every swap made is still an improvement).
/// Fails, before changing anything, on bad input, naming the argument.
pub fn refine<T: Element>(
    weight: MatRef<T>,
    gram: MatRef<f32>,
    residual: MatRef<f32>,
    keep: &mut [bool],
    sparsity: Sparsity,
    max_sweeps: usize,
    stop: Stop<'_>,
) -> Result<Stats> {
    check_inputs(weight, gram, residual, keep, sparsity)?;
    let cols = weight.cols();
    let diag: Vec<f64> = (0..cols).map(|k| f64::from(gram.row(k)[k])).collect();
    let task = Task {
        gram,
        diag: &diag,
        sparsity,
        max_sweeps,
        stop,
    };
    let refine_batch = |scratch: &mut Scratch, (b, keep_rows): (usize, &mut [bool])| {
        task.batch(b * BATCH, weight, residual, keep_rows, scratch)
    };
    let batches: Vec<Vec<RowStats>> = if keep.len() < PARALLEL_MIN {
        let mut scratch = Scratch::default();
        keep.chunks_mut(BATCH * cols)
            .enumerate()
            .map(|item| refine_batch(&mut scratch, item))
            .collect()
    } else {
        keep.par_chunks_mut(BATCH * cols)
            .enumerate()
            .map_init(Scratch::default, refine_batch)
            .collect()
    };
    let rows = batches.iter().flatten();
    // Summed in row order, so the totals do not depend on the thread count either.
    Ok(rows.fold(
        Stats {
            converged: true,
            ..Stats::default()
        },
        |total, row| Stats {
            error_before: total.error_before + row.before,
            error_after: total.error_after + row.after,
            swaps: total.swaps + row.swaps,
            sweeps: total.sweeps.max(row.sweeps),
            converged: total.converged && row.converged,
        },
    ))
}

fn check_inputs<T: Element>(
    weight: MatRef<T>,
    gram: MatRef<f32>,
    residual: MatRef<f32>,
    keep: &[bool],
    sparsity: Sparsity,
) -> Result<()> {
    let (rows, cols) = (weight.rows(), weight.cols());
    if (gram.rows(), gram.cols()) != (cols, cols) {
        bail!(
            "gram has shape {} x {}, expected {cols} x {cols} (the weight's input columns)",
            gram.rows(),
            gram.cols()
        );
    }
    if (residual.rows(), residual.cols()) != (rows, cols) {
        bail!(
            "residual has shape {} x {}, expected the weight's {rows} x {cols}",
            residual.rows(),
            residual.cols()
        );
    }
    if keep.len() != rows * cols {
        bail!(
            "keep has {} elements, expected the weight's {rows} x {cols} = {}",
            keep.len(),
            rows * cols
        );
    }
    if let Sparsity::NM { n, m } = sparsity {
        check_pattern(n, m, cols)?;
        if m > MAX_M {
            bail!("m must be <= {MAX_M}, got {m}");
        }
        if let Some(g) = keep.chunks_exact(m).position(|g| kept(g) != n) {
            let (r, c) = (g * m / cols, g * m % cols);
            bail!(
                "keep is not {n}:{m}: row {r} keeps {} of columns {c}..{}",
                kept(&keep[g * m..(g + 1) * m]),
                c + m
            );
        }
    }
    weight.check_finite("weight")?;
    gram.check_finite("gram")?;
    residual.check_finite("residual")?;
    check_gram(gram)
}

fn kept(keep: &[bool]) -> usize {
    keep.iter().filter(|&&k| k).count()
}

/// Rows per tile of the symmetry check: `G[j, i0..i0 + 16]` is one cache line, so the
/// transposed reads cost no more than the direct ones.
const TILE: usize = 16;

/// `gram` must look like `X^T X`: a non-negative diagonal and symmetric (the swap delta
/// and the residual update both rely on `G_ij = G_ji`).
fn check_gram(gram: MatRef<f32>) -> Result<()> {
    let n = gram.cols();
    if let Some(k) = (0..n).find(|&k| gram.row(k)[k] < 0.0) {
        bail!(
            "gram[{k}, {k}] = {} is negative; a Gram matrix X^T X has no negative diagonal entry",
            gram.row(k)[k]
        );
    }
    let asymmetric = |i: usize, j: usize| {
        let (a, b) = (f64::from(gram.row(i)[j]), f64::from(gram.row(j)[i]));
        let scale = (f64::from(gram.row(i)[i]) * f64::from(gram.row(j)[j])).sqrt();
        (a - b).abs() > SYMMETRY_TOL * scale
    };
    let tile_is_asymmetric = |t: usize| {
        let (i0, i1) = (t * TILE, ((t + 1) * TILE).min(n));
        (i0 + 1..n).any(|j| (i0..i1.min(j)).any(|i| asymmetric(i, j)))
    };
    let tiles = n.div_ceil(TILE);
    let bad_tile = if n * n < PARALLEL_MIN {
        (0..tiles).find(|&t| tile_is_asymmetric(t))
    } else {
        (0..tiles)
            .into_par_iter()
            .find_first(|&t| tile_is_asymmetric(t))
    };
    if let Some(t) = bad_tile {
        let (i, j) = (t * TILE..((t + 1) * TILE).min(n))
            .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
            .find(|&(i, j)| asymmetric(i, j))
            .expect("the tile holds an asymmetric pair");
        bail!(
            "gram is not symmetric: gram[{i}, {j}] = {} but gram[{j}, {i}] = {}; \
             refinement needs the Gram matrix X^T X",
            gram.row(i)[j],
            gram.row(j)[i]
        );
    }
    Ok(())
}

/// Rows refined together. In an N:M sweep every row of a batch visits a group in turn,
/// and their swaps read only that group's `m` rows of `G`, which stay in cache from one
/// row to the next: `G` (64 MiB at 4096 columns) is streamed about once per batch and
/// sweep instead of twice per swap, which made refinement bound by memory bandwidth.
const BATCH: usize = 16;

/// What one row's refinement did.
#[derive(Clone, Copy, Debug, Default)]
struct RowStats {
    before: f64,
    /// The running error while the row is refined, recomputed from `r` at the end.
    after: f64,
    swaps: usize,
    sweeps: usize,
    converged: bool,
}

/// The arguments every row shares.
struct Task<'a> {
    gram: MatRef<'a, f32>,
    /// `G_kk`, in f64.
    diag: &'a [f64],
    sparsity: Sparsity,
    max_sweeps: usize,
    stop: Stop<'a>,
}

/// Per-thread buffers, reused from batch to batch.
#[derive(Default)]
struct Scratch {
    rows: Rows,
    drops: Vec<(f64, usize)>,
    grows: Vec<(f64, usize)>,
}

/// The f64 state of a batch of rows, row-major.
#[derive(Default)]
struct Rows {
    cols: usize,
    w: Vec<f64>,
    r: Vec<f64>,
    /// `w_k^2 G_kk`: the pair delta's diagonal terms.
    own: Vec<f64>,
}

impl Rows {
    /// Row `b` of the batch, with its slice of the mask `keep`.
    fn row<'s>(&'s mut self, keep: &'s mut [bool], gram: MatRef<'s, f32>, b: usize) -> Row<'s> {
        let at = b * self.cols..(b + 1) * self.cols;
        Row {
            w: &self.w[at.clone()],
            r: &mut self.r[at.clone()],
            own: &self.own[at.clone()],
            keep: &mut keep[at],
            gram,
        }
    }
}

impl Task<'_> {
    /// Refines the rows `first..` that `keep` (a batch of whole rows) covers.
    fn batch<T: Element>(
        &self,
        first: usize,
        weight: MatRef<T>,
        residual: MatRef<f32>,
        keep: &mut [bool],
        scratch: &mut Scratch,
    ) -> Vec<RowStats> {
        let cols = self.diag.len();
        let count = keep.len() / cols;
        let Scratch { rows, drops, grows } = scratch;
        rows.cols = cols;
        rows.w.clear();
        rows.r.clear();
        for b in first..first + count {
            rows.w
                .extend(weight.row(b).iter().map(|v| f64::from(v.to_f32())));
            rows.r.extend(residual.row(b).iter().map(|&v| f64::from(v)));
        }
        rows.own.clear();
        let diag = self.diag.iter().cycle();
        rows.own
            .extend(rows.w.iter().zip(diag).map(|(w, g)| w * w * g));
        let mut stats: Vec<RowStats> = (0..count)
            .map(|b| {
                let before = rows.row(keep, self.gram, b).error();
                RowStats {
                    before,
                    after: before,
                    ..RowStats::default()
                }
            })
            .collect();
        match self.sparsity {
            Sparsity::NM { m, .. } => self.sweep_nm(rows, keep, m, &mut stats),
            Sparsity::Unstructured => {
                for (b, row_stats) in stats.iter_mut().enumerate() {
                    let mut row = rows.row(keep, self.gram, b);
                    while row_stats.sweeps < self.max_sweeps && !(self.stop)() {
                        let made = sweep_unstructured(&mut row, &mut row_stats.after, drops, grows);
                        row_stats.sweeps += 1;
                        row_stats.swaps += made;
                        if made == 0 {
                            row_stats.converged = true;
                            break;
                        }
                    }
                }
            }
        }
        for (b, row_stats) in stats.iter_mut().enumerate() {
            row_stats.after = rows.row(keep, self.gram, b).error();
        }
        stats
    }

    /// N:M sweeps over a batch, group-major (see [`BATCH`]); each row's own sequence of
    /// swaps is what row-by-row sweeps would make.
    fn sweep_nm(&self, rows: &mut Rows, keep: &mut [bool], m: usize, stats: &mut [RowStats]) {
        let mut made = vec![0usize; stats.len()];
        for _ in 0..self.max_sweeps {
            if (self.stop)() || stats.iter().all(|s| s.converged) {
                return;
            }
            made.fill(0);
            for start in (0..rows.cols).step_by(m) {
                for (b, row_stats) in stats.iter_mut().enumerate() {
                    if !row_stats.converged {
                        let mut row = rows.row(keep, self.gram, b);
                        made[b] +=
                            usize::from(improve_group(&mut row, start, m, &mut row_stats.after));
                    }
                }
            }
            for (row_stats, &made) in stats.iter_mut().zip(&made) {
                if !row_stats.converged {
                    row_stats.sweeps += 1;
                    row_stats.swaps += made;
                    row_stats.converged = made == 0;
                }
            }
        }
    }
}

/// One row being refined: its weights, the residual `r = G d`, its mask.
struct Row<'a> {
    w: &'a [f64],
    r: &'a mut [f64],
    own: &'a [f64],
    keep: &'a mut [bool],
    gram: MatRef<'a, f32>,
}

impl Row<'_> {
    /// `d^T G d = d . r`.
    fn error(&self) -> f64 {
        self.keep
            .iter()
            .zip(self.w.iter().zip(self.r.iter()))
            .filter(|(k, _)| !**k)
            .map(|(_, (w, r))| w * r)
            .sum()
    }

    /// Change of the error when kept `j` is pruned (alone).
    #[inline]
    fn drop_delta(&self, j: usize) -> f64 {
        2.0 * self.w[j] * self.r[j] + self.own[j]
    }

    /// Change of the error when pruned `i` is kept (alone).
    #[inline]
    fn grow_delta(&self, i: usize) -> f64 {
        -2.0 * self.w[i] * self.r[i] + self.own[i]
    }

    /// Change of the error when kept `j` and pruned `i` swap: the two alone, plus their
    /// interaction through `G_ij`.
    #[inline]
    fn swap_delta(&self, j: usize, i: usize) -> f64 {
        self.drop_delta(j) + self.grow_delta(i)
            - 2.0 * self.w[i] * self.w[j] * f64::from(self.gram.row(j)[i])
    }

    /// Prunes `j`, keeps `i`, and updates `r` (O(cols)).
    fn swap(&mut self, j: usize, i: usize) {
        self.keep[j] = false;
        self.keep[i] = true;
        add_scaled_rows(
            self.r,
            self.w[j],
            self.gram.row(j),
            -self.w[i],
            self.gram.row(i),
        );
    }
}

/// Whether a swap changing the error by `delta` is taken, at error `error`.
#[inline]
fn improves(delta: f64, error: f64) -> bool {
    delta < (-REL_TOL * error).min(0.0)
}

/// Makes the best improving swap inside the group of columns `start..start + m`, if
/// there is one, keeping `error` up to date. Ties keep the first pair (lowest j, then i).
fn improve_group(row: &mut Row<'_>, start: usize, m: usize, error: &mut f64) -> bool {
    let mut best: Option<(f64, usize, usize)> = None;
    for j in (start..start + m).filter(|&j| row.keep[j]) {
        for i in (start..start + m).filter(|&i| !row.keep[i]) {
            let delta = row.swap_delta(j, i);
            if best.is_none_or(|(b, _, _)| delta < b) {
                best = Some((delta, j, i));
            }
        }
    }
    match best {
        Some((delta, j, i)) if improves(delta, *error) => {
            row.swap(j, i);
            *error += delta;
            true
        }
        _ => false,
    }
}

/// One unstructured sweep. All kept x pruned pairs of a row are O(cols^2): too many. So a
/// sweep ranks every weight by its delta alone (O(cols): pruning kept `j` alone, keeping
/// pruned `i` alone), takes the [`CANDIDATES`] best of each side, and swaps inside that
/// set, exactly (every pair's full delta, `G_ij` included), best pair first, until no
/// pair there improves. A pair's delta is its two lone deltas plus `-2 w_i w_j G_ij`, and
/// `|G_ij| <= sqrt(G_ii G_jj)`, so the lone deltas dominate and good pairs are found among
/// good singles; DSnoT takes one per side, the lists also find pairs whose interaction
/// matters. Rows of at most `CANDIDATES` kept and pruned weights are searched exhaustively.
fn sweep_unstructured(
    row: &mut Row<'_>,
    error: &mut f64,
    drops: &mut Vec<(f64, usize)>,
    grows: &mut Vec<(f64, usize)>,
) -> usize {
    drops.clear();
    grows.clear();
    for k in 0..row.w.len() {
        if row.keep[k] {
            drops.push((row.drop_delta(k), k));
        } else {
            grows.push((row.grow_delta(k), k));
        }
    }
    best_first(drops, CANDIDATES);
    best_first(grows, CANDIDATES);
    let mut swaps = 0;
    // The lists were ranked at the sweep's start; past this many swaps, rank again.
    while swaps < CANDIDATES {
        let mut best: Option<(f64, usize, usize)> = None;
        for (a, &(_, j)) in drops.iter().enumerate() {
            for (b, &(_, i)) in grows.iter().enumerate() {
                let delta = row.swap_delta(j, i);
                if best.is_none_or(|(d, _, _)| delta < d) {
                    best = Some((delta, a, b));
                }
            }
        }
        let Some((delta, a, b)) = best.filter(|&(delta, _, _)| improves(delta, *error)) else {
            break;
        };
        let (j, i) = (drops[a].1, grows[b].1);
        row.swap(j, i);
        *error += delta;
        swaps += 1;
        // Same positions, roles exchanged: j may come back, i may go again.
        drops[a].1 = i;
        grows[b].1 = j;
    }
    swaps
}

/// Keeps the `count` smallest `(delta, index)` of `items` (ties: lower index), in order.
fn best_first(items: &mut Vec<(f64, usize)>, count: usize) {
    let order = |a: &(f64, usize), b: &(f64, usize)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
    if items.len() > count {
        items.select_nth_unstable_by(count - 1, order);
        items.truncate(count);
    }
    items.sort_unstable_by(order);
}

dispatch! {
    /// `r += a x + b y`, in f64.
    fn add_scaled_rows(r: &mut [f64], a: f64, x: &[f32], b: f64, y: &[f32]) => add_scaled_rows_impl
}

#[inline(always)]
fn add_scaled_rows_impl(r: &mut [f64], a: f64, x: &[f32], b: f64, y: &[f32]) {
    for ((r, &x), &y) in r.iter_mut().zip(x).zip(y) {
        *r += a * f64::from(x) + b * f64::from(y);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::mask::nm_mask;
    use half::bf16;
    use rand::{RngExt, SeedableRng};
    use rand_distr::{Distribution, StandardNormal};
    use rand_pcg::Pcg64Mcg;

    /// A refinement problem with its exact reference numbers: `G = X^T X` of heavy-tailed
    /// `X`, computed in f64 and stored in f32 (exactly symmetric); the error of a mask is
    /// recomputed from scratch, in f64, from these f32 values.
    pub(crate) struct Case {
        pub rows: usize,
        pub cols: usize,
        pub w: Vec<f32>,
        pub gram: Vec<f32>,
    }

    impl Case {
        pub fn random(rows: usize, cols: usize, tokens: usize, seed: u64) -> Self {
            let mut rng = Pcg64Mcg::seed_from_u64(seed);
            // Heavy-tailed channels: a few carry most of the energy, as in LLM activations.
            let scale: Vec<f64> = (0..cols)
                .map(|_| (2.0 * rng.random::<f64>() - 1.0).exp2().powi(3))
                .collect();
            let x: Vec<f64> = (0..tokens * cols)
                .map(|k| {
                    let z: f64 = StandardNormal.sample(&mut rng);
                    z * scale[k % cols]
                })
                .collect();
            let w = (0..rows * cols)
                .map(|_| StandardNormal.sample(&mut rng))
                .collect();
            Self::from_inputs(rows, cols, w, &x, tokens)
        }

        /// `G = X^T X` of `x` (`tokens x cols`, row-major).
        pub fn from_inputs(
            rows: usize,
            cols: usize,
            w: Vec<f32>,
            x: &[f64],
            tokens: usize,
        ) -> Self {
            let mut gram = vec![0.0f32; cols * cols];
            for i in 0..cols {
                for j in 0..cols {
                    let g: f64 = (0..tokens).map(|t| x[t * cols + i] * x[t * cols + j]).sum();
                    gram[i * cols + j] = g as f32;
                }
            }
            Self {
                rows,
                cols,
                w,
                gram,
            }
        }

        fn g(&self, i: usize, j: usize) -> f64 {
            f64::from(self.gram[i * self.cols + j])
        }

        /// `d = w * !keep` of row `r`, in f64.
        fn pruned(&self, keep: &[bool], r: usize) -> Vec<f64> {
            (0..self.cols)
                .map(|k| {
                    let at = r * self.cols + k;
                    if keep[at] { 0.0 } else { f64::from(self.w[at]) }
                })
                .collect()
        }

        /// `r = G d` of row `r`, in f64.
        pub fn residual_row(&self, keep: &[bool], r: usize) -> Vec<f64> {
            let d = self.pruned(keep, r);
            (0..self.cols)
                .map(|j| (0..self.cols).map(|k| d[k] * self.g(k, j)).sum())
                .collect()
        }

        /// `R = D G`, rounded to f32 (what a caller passes).
        pub fn residual(&self, keep: &[bool]) -> Vec<f32> {
            (0..self.rows)
                .flat_map(|r| self.residual_row(keep, r))
                .map(|v| v as f32)
                .collect()
        }

        /// `d^T G d` of row `r`, from scratch.
        pub fn row_error(&self, keep: &[bool], r: usize) -> f64 {
            let d = self.pruned(keep, r);
            let rr = self.residual_row(keep, r);
            d.iter().zip(&rr).map(|(a, b)| a * b).sum()
        }

        pub fn error(&self, keep: &[bool]) -> f64 {
            (0..self.rows).map(|r| self.row_error(keep, r)).sum()
        }

        /// The rounding the core's numbers may carry for row `r` (from `R`'s f32
        /// rounding): a small multiple of `sum |w| (|r| + |r0|)` plus the error itself.
        pub fn slack(&self, keep: &[bool], first: &[bool], r: usize) -> f64 {
            let (now, then) = (self.residual_row(keep, r), self.residual_row(first, r));
            let scale: f64 = (0..self.cols)
                .map(|k| {
                    f64::from(self.w[r * self.cols + k]).abs() * (now[k].abs() + then[k].abs())
                })
                .sum();
            1e-6 * (scale + self.row_error(keep, r).abs())
        }

        pub fn refine(
            &self,
            keep: &mut [bool],
            sparsity: Sparsity,
            max_sweeps: usize,
        ) -> Result<Stats> {
            let residual = self.residual(keep);
            refine(
                MatRef::new(&self.w, self.rows, self.cols, "weight").unwrap(),
                MatRef::new(&self.gram, self.cols, self.cols, "gram").unwrap(),
                MatRef::new(&residual, self.rows, self.cols, "residual").unwrap(),
                keep,
                sparsity,
                max_sweeps,
                &|| false,
            )
        }

        /// The first swap (kept j, pruned i, in the same row and, for N:M, the same
        /// group) that lowers row `r`'s error by more than the slack, recomputed from
        /// scratch: None at a swap-local optimum.
        pub fn improving_swap(
            &self,
            keep: &[bool],
            first: &[bool],
            sparsity: Sparsity,
        ) -> Option<(usize, usize)> {
            let span = match sparsity {
                Sparsity::NM { m, .. } => m,
                Sparsity::Unstructured => self.cols,
            };
            let mut trial = keep.to_vec();
            for r in 0..self.rows {
                let (error, slack) = (self.row_error(keep, r), self.slack(keep, first, r));
                for start in (r * self.cols..(r + 1) * self.cols).step_by(span) {
                    for j in (start..start + span).filter(|&j| keep[j]) {
                        for i in (start..start + span).filter(|&i| !keep[i]) {
                            trial[j] = false;
                            trial[i] = true;
                            let better = self.row_error(&trial, r) < error - slack;
                            trial[j] = true;
                            trial[i] = false;
                            if better {
                                return Some((j, i));
                            }
                        }
                    }
                }
            }
            None
        }
    }

    fn magnitude_nm(case: &Case, n: usize, m: usize) -> Vec<bool> {
        let s: Vec<f32> = case.w.iter().map(|v| v.abs()).collect();
        nm_mask(MatRef::new(&s, case.rows, case.cols, "s").unwrap(), n, m).unwrap()
    }

    fn assert_nm(keep: &[bool], n: usize, m: usize) {
        assert!(keep.chunks(m).all(|g| kept(g) == n));
    }

    #[test]
    fn nm_refinement_lowers_the_error_keeps_the_pattern_and_stops_at_a_local_optimum() {
        for (n, m) in [(2, 4), (4, 8), (1, 4), (3, 4), (1, 2)] {
            let case = Case::random(6, 32, 48, m as u64 * 10 + n as u64);
            let first = magnitude_nm(&case, n, m);
            let mut keep = first.clone();
            let stats = case.refine(&mut keep, Sparsity::NM { n, m }, 100).unwrap();
            assert_nm(&keep, n, m);
            let (before, after) = (case.error(&first), case.error(&keep));
            assert!(after < 0.99 * before, "{n}:{m}: {before} -> {after}");
            assert!((stats.error_before - before).abs() <= 1e-5 * before);
            assert!((stats.error_after - after).abs() <= 1e-5 * before);
            assert!(stats.converged && stats.sweeps < 100 && stats.swaps > 0);
            let sparsity = Sparsity::NM { n, m };
            assert_eq!(
                case.improving_swap(&keep, &first, sparsity),
                None,
                "{n}:{m}"
            );
        }
    }

    #[test]
    fn unstructured_refinement_keeps_every_row_count_and_is_exhaustive_on_short_rows() {
        // 24 columns: both candidate lists hold the whole row, so the stop is a
        // swap-local optimum over all pairs.
        let case = Case::random(8, 24, 40, 7);
        let first: Vec<bool> = (0..case.w.len())
            .map(|k| (k * 7 + k / 24) % 5 < 2)
            .collect();
        let mut keep = first.clone();
        let stats = case.refine(&mut keep, Sparsity::Unstructured, 100).unwrap();
        for (a, b) in keep.chunks(24).zip(first.chunks(24)) {
            assert_eq!(kept(a), kept(b));
        }
        assert!(case.error(&keep) < 0.99 * case.error(&first));
        assert!(stats.converged);
        assert_eq!(
            case.improving_swap(&keep, &first, Sparsity::Unstructured),
            None
        );
    }

    #[test]
    fn unstructured_refinement_of_long_rows_never_increases_the_error() {
        // 160 columns: only the candidate lists are searched.
        let case = Case::random(3, 160, 200, 8);
        let first: Vec<bool> = (0..case.w.len()).map(|k| k % 3 == 0).collect();
        let mut keep = first.clone();
        let stats = case.refine(&mut keep, Sparsity::Unstructured, 200).unwrap();
        for (a, b) in keep.chunks(160).zip(first.chunks(160)) {
            assert_eq!(kept(a), kept(b));
        }
        assert!(case.error(&keep) < 0.95 * case.error(&first));
        assert!(stats.converged && stats.swaps > CANDIDATES);
    }

    /// All masks of a row with `kept` of `cols` kept, as bit sets.
    fn masks(cols: usize, kept: usize) -> impl Iterator<Item = u32> {
        (0u32..1 << cols).filter(move |b| b.count_ones() as usize == kept)
    }

    #[test]
    fn one_swap_from_every_other_mask_is_the_global_optimum() {
        // With 1 of m kept (or m - 1), every mask is one swap from every other, so a
        // swap-local optimum is the global one: compare with all masks.
        for (n, m, sparsity) in [
            (1, 4, Sparsity::NM { n: 1, m: 4 }),
            (3, 4, Sparsity::NM { n: 3, m: 4 }),
            (1, 8, Sparsity::Unstructured),
            (7, 8, Sparsity::Unstructured),
        ] {
            for seed in 0..20 {
                let case = Case::random(1, m, 12, seed);
                let mut keep: Vec<bool> = (0..m).map(|k| k < n).collect();
                case.refine(&mut keep, sparsity, 50).unwrap();
                let best = masks(m, n)
                    .map(|b| case.error(&(0..m).map(|k| b >> k & 1 == 1).collect::<Vec<_>>()))
                    .fold(f64::INFINITY, f64::min);
                let got = case.error(&keep);
                assert!(
                    got <= best + 1e-9 * best.abs().max(1.0),
                    "{n}/{m} seed {seed}: {got} vs {best}"
                );
            }
        }
    }

    #[test]
    fn a_local_optimum_is_never_below_the_global_one_and_the_stats_agree() {
        // 2:4 over two groups: swaps inside groups only; the exhaustive optimum bounds it.
        for seed in 0..20 {
            let case = Case::random(1, 8, 10, 100 + seed);
            let mut keep = magnitude_nm(&case, 2, 4);
            let stats = case
                .refine(&mut keep, Sparsity::NM { n: 2, m: 4 }, 50)
                .unwrap();
            let best = masks(8, 4)
                .filter(|b| (b & 0xF).count_ones() == 2)
                .map(|b| case.error(&(0..8).map(|k| b >> k & 1 == 1).collect::<Vec<_>>()))
                .fold(f64::INFINITY, f64::min);
            assert!(stats.error_after >= best - 1e-6 * best.abs().max(1.0));
            assert!((stats.error_after - case.error(&keep)).abs() <= 1e-6 * best.abs().max(1.0));
        }
    }

    #[test]
    fn the_result_does_not_depend_on_the_thread_count() {
        // 128 x 256 reaches the parallel path.
        let case = Case::random(128, 256, 300, 5);
        let first = magnitude_nm(&case, 2, 4);
        let run = |threads: usize, sparsity: Sparsity| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut keep = first.clone();
            let stats = pool
                .install(|| case.refine(&mut keep, sparsity, 20))
                .unwrap();
            (keep, stats)
        };
        for sparsity in [Sparsity::NM { n: 2, m: 4 }, Sparsity::Unstructured] {
            let (one, three) = (run(1, sparsity), run(3, sparsity));
            assert_eq!(one, three);
            assert!(one.1.swaps > 0);
        }
    }

    #[test]
    fn a_row_refines_the_same_alone_as_in_a_batch() {
        // 40 rows: two full batches and a short one, refined group-major.
        let case = Case::random(40, 32, 40, 9);
        let first = magnitude_nm(&case, 2, 4);
        let sparsity = Sparsity::NM { n: 2, m: 4 };
        let mut together = first.clone();
        let stats = case.refine(&mut together, sparsity, 5).unwrap();
        let mut swaps = 0;
        for r in 0..case.rows {
            let at = r * case.cols..(r + 1) * case.cols;
            let alone = Case {
                rows: 1,
                w: case.w[at.clone()].to_vec(),
                gram: case.gram.clone(),
                ..case
            };
            let mut keep = first[at.clone()].to_vec();
            swaps += alone.refine(&mut keep, sparsity, 5).unwrap().swaps;
            assert_eq!(keep, &together[at], "row {r}");
        }
        assert_eq!(swaps, stats.swaps);
    }

    #[test]
    fn half_precision_weights_refine_like_their_f32_values() {
        let mut case = Case::random(4, 16, 20, 3);
        case.w
            .iter_mut()
            .for_each(|v| *v = bf16::from_f32(*v).to_f32());
        let halves: Vec<bf16> = case.w.iter().map(|&v| bf16::from_f32(v)).collect();
        let first = magnitude_nm(&case, 2, 4);
        let residual = case.residual(&first);
        let gram = MatRef::new(&case.gram, 16, 16, "gram").unwrap();
        let r = MatRef::new(&residual, 4, 16, "residual").unwrap();
        let sparsity = Sparsity::NM { n: 2, m: 4 };
        let (mut a, mut b) = (first.clone(), first.clone());
        let sa = refine(
            MatRef::new(&halves, 4, 16, "weight").unwrap(),
            gram,
            r,
            &mut a,
            sparsity,
            9,
            &|| false,
        );
        let sb = refine(
            MatRef::new(&case.w, 4, 16, "weight").unwrap(),
            gram,
            r,
            &mut b,
            sparsity,
            9,
            &|| false,
        );
        assert_eq!((a, sa), (b, sb));
    }

    #[test]
    fn zero_sweeps_or_a_stop_change_nothing_and_report_the_error() {
        let case = Case::random(4, 16, 20, 4);
        let first = magnitude_nm(&case, 2, 4);
        let mut keep = first.clone();
        let stats = case
            .refine(&mut keep, Sparsity::NM { n: 2, m: 4 }, 0)
            .unwrap();
        assert_eq!(keep, first);
        assert_eq!((stats.swaps, stats.sweeps, stats.converged), (0, 0, false));
        assert!((stats.error_before - case.error(&first)).abs() <= 1e-5 * stats.error_before);
        assert_eq!(stats.error_after, stats.error_before);

        let residual = case.residual(&first);
        let stopped = refine(
            MatRef::new(&case.w, 4, 16, "weight").unwrap(),
            MatRef::new(&case.gram, 16, 16, "gram").unwrap(),
            MatRef::new(&residual, 4, 16, "residual").unwrap(),
            &mut keep,
            Sparsity::Unstructured,
            10,
            &|| true,
        )
        .unwrap();
        assert_eq!(keep, first);
        assert_eq!((stopped.swaps, stopped.sweeps), (0, 0));
    }

    #[test]
    fn bad_inputs_are_errors_that_name_them_and_change_nothing() {
        let case = Case::random(2, 8, 10, 6);
        let first = magnitude_nm(&case, 2, 4);
        let residual = case.residual(&first);
        let nm = Sparsity::NM { n: 2, m: 4 };
        let call = |w: &[f32], g: &[f32], gcols: usize, r: &[f32], keep: &[bool], sparsity| {
            let mut keep = keep.to_vec();
            let before = keep.clone();
            let out = refine(
                MatRef::new(w, 2, 8, "weight").unwrap(),
                MatRef::new(g, g.len() / gcols, gcols, "gram").unwrap(),
                MatRef::new(r, r.len() / 8, 8, "residual").unwrap(),
                &mut keep,
                sparsity,
                10,
                &|| false,
            );
            assert_eq!(keep, before, "an error changed the mask");
            out.unwrap_err().0
        };
        let with = |v: &[f32], at: usize, x: f32| {
            let mut v = v.to_vec();
            v[at] = x;
            v
        };
        let (w, g, r) = (&case.w[..], &case.gram[..], &residual[..]);
        let mut three = first.clone();
        three[first.iter().position(|k| !k).unwrap()] = true;
        let mut asym = g.to_vec();
        asym[8 + 3] *= 1.5;
        asym[8 + 3] += 1.0;
        for (message, got) in [
            (
                "gram has shape 4 x 8, expected 8 x 8",
                call(w, &g[..32], 8, r, &first, nm),
            ),
            (
                "residual has shape 1 x 8, expected the weight's 2 x 8",
                call(w, g, 8, &r[..8], &first, nm),
            ),
            (
                "keep has 15 elements, expected the weight's 2 x 8 = 16",
                call(w, g, 8, r, &first[..15], nm),
            ),
            (
                "keep is not 2:4: row 0 keeps 3 of columns 0..4",
                call(w, g, 8, r, &three, nm),
            ),
            (
                "not divisible by m=3",
                call(w, g, 8, r, &first, Sparsity::NM { n: 1, m: 3 }),
            ),
            (
                "weight contains NaN at (1, 2)",
                call(&with(w, 10, f32::NAN), g, 8, r, &first, nm),
            ),
            (
                "gram contains inf at (0, 5)",
                call(w, &with(g, 5, f32::INFINITY), 8, r, &first, nm),
            ),
            (
                "residual contains -inf at (1, 0)",
                call(w, g, 8, &with(r, 8, f32::NEG_INFINITY), &first, nm),
            ),
            (
                "gram[2, 2] = -1 is negative",
                call(w, &with(g, 18, -1.0), 8, r, &first, nm),
            ),
            (
                "gram is not symmetric: gram[1, 3] = ",
                call(w, &asym, 8, r, &first, Sparsity::Unstructured),
            ),
        ] {
            assert!(got.contains(message), "expected {message:?}, got {got:?}");
        }
    }
}
