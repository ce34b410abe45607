//! RIA's heuristic channel allocation: sort columns by total score, then deal them out
//! so heavy columns land in different groups.

use super::problem::Problem;
use rayon::prelude::*;

/// Chunk `t` of the columns sorted by ascending column sum fills slot `t` of every group;
/// odd chunks are reversed (a snake), as in the reference implementation.
pub fn snake(problem: &Problem) -> Vec<u32> {
    let (cols, m) = (problem.cols(), problem.m());
    let groups = problem.groups();
    let sums: Vec<f64> = (0..cols as u32)
        .into_par_iter()
        .map(|j| problem.column(j).iter().map(|&v| f64::from(v)).sum())
        .collect();
    let mut order: Vec<u32> = (0..cols as u32).collect();
    order.sort_by(|&a, &b| {
        sums[a as usize]
            .total_cmp(&sums[b as usize])
            .then(a.cmp(&b))
    });
    let mut perm = vec![0u32; cols];
    for (slot, chunk) in order.chunks(groups).enumerate() {
        for (g, &col) in chunk.iter().enumerate() {
            let g = if slot % 2 == 1 { groups - 1 - g } else { g };
            perm[g * m + slot] = col;
        }
    }
    perm
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matrix::MatRef;

    #[test]
    fn deals_sorted_columns_as_a_snake() {
        // Column sums 0..8 ascending: chunk 0 = [0, 1], chunk 1 = [2, 3] reversed, ...
        let s: Vec<f32> = (0..8).map(|j| j as f32).collect();
        let p = Problem::new(&[MatRef::new(&s, 1, 8, "s").unwrap()], 1, 4).unwrap();
        assert_eq!(snake(&p), vec![0, 3, 4, 7, 1, 2, 5, 6]);
    }
}
