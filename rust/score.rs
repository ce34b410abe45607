//! Importance scores of a weight matrix `W` (`C_out x C_in`, row-major).
//!
//! Scores are float32 whatever the weight type; sums and RIA's ratios are computed in f64.
//! `act_norm[j]` is the L2 norm of input channel `j` over every calibration token.
//!
//! Finite inputs give finite scores or an error that names the argument: a score that
//! would overflow float32 is refused, never returned as infinity (or NaN).

use crate::error::{Result, bail};
use crate::matrix::{Element, MatRef};
use crate::parallel::{for_each_row_mut, position_first};
use rayon::prelude::*;

/// Columns per parallel task when summing down columns.
const COLUMN_CHUNK: usize = 64;

/// RIA (Zhang et al., ICLR 2024):
/// `S_ij = (|W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|) * act_norm_j ^ alpha`.
///
/// Without `act_norm` this is relative importance alone. A row or column of zeros
/// scores zero (instead of 0/0).
pub fn ria<T: Element>(w: MatRef<T>, act_norm: Option<&[f32]>, alpha: f32) -> Result<Vec<f32>> {
    w.check_finite("weight")?;
    if !alpha.is_finite() {
        bail!("alpha must be finite, got {alpha}");
    }
    let act_pow: Vec<f64> = match act_norm {
        Some(a) => {
            check_act_norm(a, w.cols())?;
            // `abs`: -0.0 passes the `>= 0` check, and (-0.0) ** -1 is -inf.
            let pow: Vec<f64> = a
                .iter()
                .map(|&s| f64::from(s).abs().powf(f64::from(alpha)))
                .collect();
            // |W_ij| / colsum + |W_ij| / rowsum <= 2, so half of float32's range is safe.
            let limit = f64::from(f32::MAX) / 2.0;
            if let Some(j) = pow.iter().position(|p| !(p.is_finite() && *p <= limit)) {
                bail!(
                    "act_norm ** alpha overflows float32 for alpha={alpha}: act_norm[{j}] = {} \
                     gives {:e} (scores must stay below {limit:e}); rescale act_norm or use a \
                     smaller alpha",
                    a[j],
                    pow[j]
                );
            }
            pow
        }
        None => vec![1.0; w.cols()],
    };
    // Reciprocals in f64: a row or column of tiny (e.g. subnormal) weights has a sum
    // whose reciprocal overflows float32, and `0 * inf` would make its zeros NaN.
    let row_inv: Vec<f64> = (0..w.rows())
        .into_par_iter()
        .map(|r| reciprocal(w.row(r).iter().map(|v| f64::from(v.to_f32().abs())).sum()))
        .collect();
    let col_inv: Vec<f64> = column_abs_sums(w).into_iter().map(reciprocal).collect();

    let mut out = vec![0.0f32; w.rows() * w.cols()];
    for_each_row_mut(&mut out, w.cols(), |r, out_row| {
        let ri = row_inv[r];
        for (((o, v), &ci), &p) in out_row.iter_mut().zip(w.row(r)).zip(&col_inv).zip(&act_pow) {
            let a = f64::from(v.to_f32().abs());
            *o = ((a * ci + a * ri) * p) as f32;
        }
    });
    Ok(out)
}

/// Wanda (Sun et al., 2023): `S_ij = |W_ij| * act_norm_j`.
pub fn wanda<T: Element>(w: MatRef<T>, act_norm: &[f32]) -> Result<Vec<f32>> {
    w.check_finite("weight")?;
    check_act_norm(act_norm, w.cols())?;
    let mut out = vec![0.0f32; w.rows() * w.cols()];
    for_each_row_mut(&mut out, w.cols(), |r, out_row| {
        for ((o, v), &a) in out_row.iter_mut().zip(w.row(r)).zip(act_norm) {
            *o = v.to_f32().abs() * a;
        }
    });
    // The product of two finite float32 values can overflow; say where instead of
    // returning infinity.
    if let Some(i) = position_first(&out, |v| !v.is_finite()) {
        let (r, c) = (i / w.cols(), i % w.cols());
        bail!(
            "wanda score |weight| * act_norm overflows float32 at ({r}, {c}): |weight| = {:e}, \
             act_norm[{c}] = {:e}; rescale act_norm",
            w.row(r)[c].to_f32().abs(),
            act_norm[c]
        );
    }
    Ok(out)
}

/// Magnitude: `S_ij = |W_ij|`.
pub fn magnitude<T: Element>(w: MatRef<T>) -> Result<Vec<f32>> {
    w.check_finite("weight")?;
    let mut out = vec![0.0f32; w.rows() * w.cols()];
    for_each_row_mut(&mut out, w.cols(), |r, out_row| {
        for (o, v) in out_row.iter_mut().zip(w.row(r)) {
            *o = v.to_f32().abs();
        }
    });
    Ok(out)
}

fn check_act_norm(act_norm: &[f32], cols: usize) -> Result<()> {
    if act_norm.len() != cols {
        bail!(
            "act_norm has {} entries but the weight has {cols} input columns",
            act_norm.len()
        );
    }
    if let Some((j, v)) = act_norm
        .iter()
        .enumerate()
        .find(|(_, v)| !(v.is_finite() && **v >= 0.0))
    {
        bail!("act_norm must be finite and >= 0, found {v} at index {j}");
    }
    Ok(())
}

/// `1 / s`, or 0 for an all-zero row/column (whose scores are zero anyway).
fn reciprocal(s: f64) -> f64 {
    if s > 0.0 { 1.0 / s } else { 0.0 }
}

/// `sum_k |W_kj|` for every column j, in f64, summed in row order (deterministic).
fn column_abs_sums<T: Element>(w: MatRef<T>) -> Vec<f64> {
    let mut sums = vec![0.0f64; w.cols()];
    sums.par_chunks_mut(COLUMN_CHUNK)
        .enumerate()
        .for_each(|(chunk, out)| {
            let c0 = chunk * COLUMN_CHUNK;
            for r in 0..w.rows() {
                let row = &w.row(r)[c0..c0 + out.len()];
                for (s, v) in out.iter_mut().zip(row) {
                    *s += f64::from(v.to_f32().abs());
                }
            }
        });
    sums
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    fn naive_ria(w: &[f32], rows: usize, cols: usize, act: &[f32], alpha: f32) -> Vec<f32> {
        let mut out = vec![0.0; rows * cols];
        for i in 0..rows {
            for j in 0..cols {
                let a = w[i * cols + j].abs();
                let col: f32 = (0..rows).map(|k| w[k * cols + j].abs()).sum();
                let row: f32 = (0..cols).map(|k| w[i * cols + k].abs()).sum();
                out[i * cols + j] = (a / col + a / row) * act[j].powf(alpha);
            }
        }
        out
    }

    #[test]
    fn ria_matches_the_formula() {
        let (rows, cols) = (7, 5);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3 + 0.01)
            .collect();
        let act: Vec<f32> = (0..cols).map(|j| 0.5 + j as f32).collect();
        let got = ria(MatRef::new(&w, rows, cols, "w").unwrap(), Some(&act), 0.5).unwrap();
        for (g, e) in got.iter().zip(naive_ria(&w, rows, cols, &act, 0.5)) {
            assert!((g - e).abs() <= 1e-6 * e.abs().max(1.0), "{g} vs {e}");
        }
    }

    #[test]
    fn zero_column_scores_zero_not_nan() {
        let w = [0.0f32, 1.0, 0.0, 2.0];
        let got = ria(MatRef::new(&w, 2, 2, "w").unwrap(), None, 0.5).unwrap();
        assert_eq!(got[0], 0.0);
        assert_eq!(got[2], 0.0);
        assert!(got.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn bf16_weights_score_like_their_f32_values() {
        let w32: Vec<f32> = (0..12).map(|i| (i as f32 - 6.0) * 0.125).collect();
        let w16: Vec<bf16> = w32.iter().map(|&v| bf16::from_f32(v)).collect();
        let a = ria(MatRef::new(&w32, 3, 4, "w").unwrap(), None, 0.5).unwrap();
        let b = ria(MatRef::new(&w16, 3, 4, "w").unwrap(), None, 0.5).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn rejects_bad_act_norm() {
        let w = [1.0f32; 4];
        let m = MatRef::new(&w, 2, 2, "w").unwrap();
        assert!(
            ria(m, Some(&[1.0]), 0.5)
                .unwrap_err()
                .0
                .contains("act_norm has 1")
        );
        assert!(
            ria(m, Some(&[1.0, -1.0]), 0.5)
                .unwrap_err()
                .0
                .contains(">= 0")
        );
        assert!(wanda(m, &[f32::NAN, 1.0]).is_err());
    }

    #[test]
    fn rejects_nan_weight() {
        let w = [1.0f32, f32::NAN, 0.0, 1.0];
        let err = magnitude(MatRef::new(&w, 2, 2, "weight").unwrap()).unwrap_err();
        assert!(err.0.contains("NaN at (0, 1)"), "{err}");
    }
}
