//! Borrowed row-major matrices and the element types the core reads.

use crate::error::{Result, bail};
use crate::parallel::{PARALLEL_MIN, position_first};
use half::{bf16, f16};
use rayon::prelude::*;

/// An element that converts losslessly to `f32` (weights arrive as f32, f16 or bf16).
pub trait Element: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
}

impl Element for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl Element for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

impl Element for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

/// A borrowed, row-major `rows x cols` matrix.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
}

impl<'a, T: Element> MatRef<'a, T> {
    /// Wraps `data` as a `rows x cols` matrix; `name` is used in error messages.
    pub fn new(data: &'a [T], rows: usize, cols: usize, name: &str) -> Result<Self> {
        if rows == 0 || cols == 0 {
            bail!("{name} is empty (shape {rows} x {cols})");
        }
        if data.len() != rows * cols {
            bail!(
                "{name} has {} elements, expected {rows} x {cols} = {}",
                data.len(),
                rows * cols
            );
        }
        Ok(Self { data, rows, cols })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn data(&self) -> &'a [T] {
        self.data
    }

    pub fn row(&self, r: usize) -> &'a [T] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }

    /// Fails on the first NaN or infinity, naming its position.
    pub fn check_finite(&self, name: &str) -> Result<()> {
        check_finite(self.data, self.cols, name)
    }

    /// Fails on the first value that is not finite and non-negative.
    pub fn check_non_negative(&self, name: &str) -> Result<()> {
        self.check_finite(name)?;
        let bad = position_first(self.data, |v| v.to_f32() < 0.0);
        if let Some(i) = bad {
            bail!(
                "{name} must be >= 0, found {} at ({}, {})",
                self.data[i].to_f32(),
                i / self.cols,
                i % self.cols
            );
        }
        Ok(())
    }
}

/// Fails on the first NaN or infinity of a row-major array with `cols` columns.
pub fn check_finite<T: Element>(data: &[T], cols: usize, name: &str) -> Result<()> {
    let bad = position_first(data, |v| !v.to_f32().is_finite());
    if let Some(i) = bad {
        let cols = cols.max(1);
        bail!(
            "{name} contains {} at ({}, {})",
            data[i].to_f32(),
            i / cols,
            i % cols
        );
    }
    Ok(())
}

/// Reorders a row-major `rows x cols` matrix in place: afterwards row `r`, column `c` holds
/// what row `row_order[r]`, column `col_order[c]` held (`None`: that axis unchanged). Both
/// orders must be permutations (the caller checks). Rows move by following the
/// permutation's cycles (one spare row); columns are gathered row by row in parallel. No
/// matrix-sized allocation: the fresh pages of a new matrix cost more than the copy.
pub fn permute_in_place<T: Copy + Default + Send + Sync>(
    data: &mut [T],
    cols: usize,
    row_order: Option<&[u32]>,
    col_order: Option<&[u32]>,
) {
    if data.is_empty() {
        return; // nothing moves; and `chunks_mut(0)` panics when `cols` is 0
    }
    if let Some(order) = row_order {
        permute_rows(data, cols, order);
    }
    if let Some(order) = col_order {
        let gather = |spare: &mut Vec<T>, row: &mut [T]| {
            spare.clear();
            spare.extend(order.iter().map(|&c| row[c as usize]));
            row.copy_from_slice(spare);
        };
        if data.len() < PARALLEL_MIN {
            let mut spare = Vec::with_capacity(cols);
            data.chunks_mut(cols)
                .for_each(|row| gather(&mut spare, row));
        } else {
            data.par_chunks_mut(cols)
                .for_each_init(|| Vec::with_capacity(cols), gather);
        }
    }
}

fn permute_rows<T: Copy + Default>(data: &mut [T], cols: usize, order: &[u32]) {
    let mut done = vec![false; order.len()];
    let mut spare = vec![T::default(); cols];
    for start in 0..order.len() {
        if done[start] || order[start] as usize == start {
            continue;
        }
        spare.copy_from_slice(&data[start * cols..(start + 1) * cols]);
        let mut at = start;
        loop {
            done[at] = true;
            let from = order[at] as usize;
            if from == start {
                data[at * cols..(at + 1) * cols].copy_from_slice(&spare);
                break;
            }
            data.copy_within(from * cols..(from + 1) * cols, at * cols);
            at = from;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_in_place_equals_a_gather() {
        for (rows, cols) in [(5, 7), (300, 130)] {
            let data: Vec<u32> = (0..(rows * cols) as u32).collect();
            // Two cycles and fixed points on both axes.
            let row_order: Vec<u32> = (0..rows as u32)
                .map(|r| (r * 7 + 1) % rows as u32)
                .collect();
            let col_order: Vec<u32> = (0..cols as u32).rev().collect();
            for (ro, co) in [
                (Some(&row_order), None),
                (None, Some(&col_order)),
                (Some(&row_order), Some(&col_order)),
            ] {
                let mut got = data.clone();
                permute_in_place(
                    &mut got,
                    cols,
                    ro.map(|v| v.as_slice()),
                    co.map(|v| v.as_slice()),
                );
                for r in 0..rows {
                    for c in 0..cols {
                        let from_r = ro.map_or(r, |o| o[r] as usize);
                        let from_c = co.map_or(c, |o| o[c] as usize);
                        assert_eq!(got[r * cols + c], data[from_r * cols + from_c]);
                    }
                }
            }
        }
    }

    #[test]
    fn permute_in_place_of_an_empty_matrix_does_nothing() {
        let mut data: Vec<u32> = Vec::new();
        permute_in_place(&mut data, 0, Some(&[0, 1, 2]), Some(&[]));
        permute_in_place(&mut data, 3, Some(&[]), Some(&[2, 1, 0]));
        assert!(data.is_empty());
    }
}
