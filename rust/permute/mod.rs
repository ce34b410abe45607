//! Channel permutation for N:M sparsity (README, "The permutation solver"; ARCHITECTURE.md).
//!
//! A permutation `perm` reorders input columns (`scores[:, perm]`); position `p` belongs
//! to group `p / m`. The objective is the score an N:M mask keeps after reordering.

pub mod heuristic;
pub mod kernel;
pub mod lsa;
pub mod polish;
pub mod problem;
pub mod search;
pub mod tabu;

pub use problem::Problem;
pub use search::{
    MAX_SCRATCH, Options, Outcome, Stop, check, efficacy, search, search_all, search_with,
};
