//! The relu-sum kernel: `out[g][h] = sum_r max(0, x[h][r] - t[g][r])`.
//!
//! Every slot-LSA cost matrix and every swap delta of the N:M objective reduces to this
//! (README, "The permutation solver": inserting `x` into a group whose other values in row r have top-N sum
//! `T_r` and N-th largest `t_r` gives `T_r + max(0, x_r - t_r)`). It has the shape of a
//! matrix product, so it is blocked like one: row blocks of `r` that stay in L1/L2,
//! register tiles of `TG x TH` outputs, rayon over stripes of `g`.
//!
//! Each output is summed in a fixed order (row blocks in sequence, SIMD lanes reduced in
//! sequence), so results are bit-identical for any number of threads.

use crate::simd::dispatch;
use rayon::prelude::*;

/// SIMD lanes of one accumulator (16 f32 = one AVX-512 register, two AVX2 registers).
const LANES: usize = 16;
/// Register tile: `TG` rows of `t` against `TH` rows of `x`.
const TG: usize = 4;
const TH: usize = 4;
/// Rows of `r` per cache block.
const RB: usize = 1024;
/// Rows of `t` (outputs' first index) per parallel task.
const STRIPE: usize = 16;

/// Computes `out[g * h_count + h] = sum_r max(0, x[h * len + r] - t[g * len + r])`.
///
/// `t` is `g_count x len`, `x` is `h_count x len`, both row-major; `len` is the number
/// of score rows being summed over.
pub fn relu_sum(t: &[f32], x: &[f32], len: usize) -> Vec<f32> {
    assert!(len > 0 && t.len() % len == 0 && x.len() % len == 0);
    let g_count = t.len() / len;
    let h_count = x.len() / len;
    let mut out = vec![0.0f32; g_count * h_count];
    out.par_chunks_mut(STRIPE * h_count)
        .enumerate()
        .for_each(|(stripe, out_stripe)| {
            let g0 = stripe * STRIPE;
            let g_here = out_stripe.len() / h_count;
            let t_stripe = &t[g0 * len..(g0 + g_here) * len];
            for r0 in (0..len).step_by(RB) {
                let r1 = (r0 + RB).min(len);
                block(t_stripe, x, len, r0, r1, out_stripe, h_count);
            }
        });
    out
}

dispatch! {
    /// Adds rows `r0..r1` of every `(g, h)` pair of this stripe to `out`.
    fn block(t: &[f32], x: &[f32], len: usize, r0: usize, r1: usize, out: &mut [f32], h_count: usize) => block_impl
}

#[inline(always)]
fn block_impl(
    t: &[f32],
    x: &[f32],
    len: usize,
    r0: usize,
    r1: usize,
    out: &mut [f32],
    h_count: usize,
) {
    let g_count = t.len() / len;
    let mut g = 0;
    while g < g_count {
        let tg = TG.min(g_count - g);
        let mut h = 0;
        while h < h_count {
            let th = TH.min(h_count - h);
            if tg == TG && th == TH {
                let sums = tile::<TG, TH>(t, x, len, g, h, r0, r1);
                for a in 0..TG {
                    for b in 0..TH {
                        out[(g + a) * h_count + h + b] += sums[a][b];
                    }
                }
            } else {
                for a in 0..tg {
                    for b in 0..th {
                        out[(g + a) * h_count + h + b] +=
                            tile::<1, 1>(t, x, len, g + a, h + b, r0, r1)[0][0];
                    }
                }
            }
            h += th;
        }
        g += tg;
    }
}

/// One register tile over rows `r0..r1`: lane-wise accumulators, reduced at the end.
#[inline(always)]
fn tile<const A: usize, const B: usize>(
    t: &[f32],
    x: &[f32],
    len: usize,
    g: usize,
    h: usize,
    r0: usize,
    r1: usize,
) -> [[f32; B]; A] {
    let t_rows: [&[f32]; A] = std::array::from_fn(|a| &t[(g + a) * len + r0..(g + a) * len + r1]);
    let x_rows: [&[f32]; B] = std::array::from_fn(|b| &x[(h + b) * len + r0..(h + b) * len + r1]);
    let mut acc = [[[0.0f32; LANES]; B]; A];
    let steps = (r1 - r0) / LANES;
    let full = steps * LANES;
    for step in 0..steps {
        let r = step * LANES;
        // SAFETY: every row slice has length `r1 - r0 >= full >= r + LANES`.
        let tv: [[f32; LANES]; A] =
            std::array::from_fn(|a| unsafe { *(t_rows[a].as_ptr().add(r) as *const [f32; LANES]) });
        let xv: [[f32; LANES]; B] =
            std::array::from_fn(|b| unsafe { *(x_rows[b].as_ptr().add(r) as *const [f32; LANES]) });
        for a in 0..A {
            for b in 0..B {
                for l in 0..LANES {
                    let d = xv[b][l] - tv[a][l];
                    acc[a][b][l] += if d > 0.0 { d } else { 0.0 };
                }
            }
        }
    }
    let mut sums = [[0.0f32; B]; A];
    for a in 0..A {
        for b in 0..B {
            let mut s: f32 = acc[a][b].iter().sum();
            for rr in full..(r1 - r0) {
                let d = x_rows[b][rr] - t_rows[a][rr];
                s += if d > 0.0 { d } else { 0.0 };
            }
            sums[a][b] = s;
        }
    }
    sums
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 250.0)
            .collect()
    }

    #[test]
    fn matches_a_naive_loop_on_ragged_shapes() {
        for (g, h, len) in [(1, 1, 1), (5, 3, 37), (17, 9, 2100), (4, 2, 16)] {
            let t = values(g * len, 1);
            let x = values(h * len, 2);
            let got = relu_sum(&t, &x, len);
            for a in 0..g {
                for b in 0..h {
                    let want: f64 = (0..len)
                        .map(|r| f64::from((x[b * len + r] - t[a * len + r]).max(0.0)))
                        .sum();
                    let g = f64::from(got[a * h + b]);
                    assert!(
                        (g - want).abs() <= 1e-4 * want.max(1.0),
                        "({a},{b}) {g} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn identical_for_any_thread_count() {
        let (g, h, len) = (40, 40, 3000);
        let t = values(g * len, 7);
        let x = values(h * len, 8);
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let three = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let a = one.install(|| relu_sum(&t, &x, len));
        let b = three.install(|| relu_sum(&t, &x, len));
        assert_eq!(a, b);
    }
}
