//! ria-rs core: RIA importance scores, N:M and unstructured mask selection, the
//! channel-permutation search for N:M sparsity, and mask refinement against a layer's
//! output error.
//!
//! Pure functions over row-major slices; nothing here knows about models or Python.
//! The Python bindings live in [`python`] behind the `python` feature.

pub mod error;
pub mod lap;
pub mod mask;
pub mod matrix;
mod parallel;
pub mod permute;
pub mod refine;
pub mod score;
mod simd;

#[cfg(feature = "python")]
mod python;

pub use error::{InputError, Result};
pub use matrix::{Element, MatRef};

#[cfg(test)]
mod proptests;
