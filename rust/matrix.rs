//! Borrowed row-major matrices and the element types the core reads.

use crate::error::{Result, bail};
use crate::parallel::position_first;
use half::{bf16, f16};

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
