//! Slot-LSA: one column of every group (its "mover") is taken out, and the movers are
//! reassigned to the groups by an exact linear assignment (DESIGN §4).
//!
//! `value[g][h]` = score kept by group g with its mover replaced by group h's mover
//! = `sum_r T_g[r] + sum_r max(0, x_h[r] - t_g[r])`, where `T_g`/`t_g` are the top-N sum
//! and N-th largest of g's other columns. The second term is the relu-sum kernel.

use super::kernel::relu_sum;
use super::problem::{Problem, nth_largest};
use crate::lap;
use rayon::prelude::*;

/// Relative gain below which a reassignment is treated as float noise.
const NOISE: f64 = 1e-12;

/// One slot-LSA step on `perm` (position -> column) with `values` the per-group kept
/// score, among the groups `ids`. `movers[g]` is the slot of group g that moves. Applies
/// every cycle of the optimal assignment whose exactly recomputed gain is positive;
/// returns the total gain.
pub fn step(
    problem: &Problem,
    perm: &mut [u32],
    values: &mut [f64],
    movers: &[usize],
    ids: &[usize],
) -> f64 {
    let gain_matrix = value_matrix(problem, perm, movers, ids);
    let sigma = lap::solve_max(&gain_matrix, ids.len());
    apply_cycles(problem, perm, values, movers, ids, &sigma)
}

/// The `ids.len()` square matrix `sum_r max(0, x_h[r] - t_g[r])` over groups `ids`: the
/// value of giving group g the mover of group h, less a constant per g (which no
/// assignment can change).
pub fn value_matrix(problem: &Problem, perm: &[u32], movers: &[usize], ids: &[usize]) -> Vec<f32> {
    let (rows, m, n) = (problem.rows(), problem.m(), problem.n());
    let mut x = vec![0.0f32; ids.len() * rows];
    let mut t = vec![0.0f32; ids.len() * rows];
    x.par_chunks_mut(rows)
        .zip(t.par_chunks_mut(rows))
        .zip(ids.par_iter())
        .for_each(|((x_g, t_g), &g)| {
            let members = &perm[g * m..(g + 1) * m];
            x_g.copy_from_slice(problem.column(members[movers[g]]));
            let rest: Vec<&[f32]> = (0..m)
                .filter(|&s| s != movers[g])
                .map(|s| problem.column(members[s]))
                .collect();
            nth_largest(&rest, n, t_g);
        });
    relu_sum(&t, &x, rows)
}

/// Applies each cycle of `sigma` (group `ids[i]` receives the mover of group
/// `ids[sigma[i]]`) whose exact gain is positive.
fn apply_cycles(
    problem: &Problem,
    perm: &mut [u32],
    values: &mut [f64],
    movers: &[usize],
    ids: &[usize],
    sigma: &[usize],
) -> f64 {
    let m = problem.m();
    let mover_col = |i: usize, perm: &[u32]| perm[ids[i] * m + movers[ids[i]]];
    let mut seen = vec![false; sigma.len()];
    let mut total_gain = 0.0;
    for start in 0..sigma.len() {
        if seen[start] || sigma[start] == start {
            continue;
        }
        let mut cycle = Vec::new();
        let mut i = start;
        while !seen[i] {
            seen[i] = true;
            cycle.push(i);
            i = sigma[i];
        }
        let updated: Vec<(Vec<u32>, f64)> = cycle
            .par_iter()
            .map(|&i| {
                let g = ids[i];
                let mut members = perm[g * m..(g + 1) * m].to_vec();
                members[movers[g]] = mover_col(sigma[i], perm);
                let value = problem.group_value(&members);
                (members, value)
            })
            .collect();
        let old: f64 = cycle.iter().map(|&i| values[ids[i]]).sum();
        let new: f64 = updated.iter().map(|(_, v)| v).sum();
        if new - old > NOISE * old.abs().max(f64::MIN_POSITIVE) {
            for (&i, (members, value)) in cycle.iter().zip(updated) {
                let g = ids[i];
                perm[g * m..(g + 1) * m].copy_from_slice(&members);
                values[g] = value;
            }
            total_gain += new - old;
        }
    }
    total_gain
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matrix::MatRef;

    #[test]
    fn a_step_never_loses_and_keeps_a_permutation() {
        let (rows, cols) = (20, 32);
        let s: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 + 13) % 101) as f32)
            .collect();
        let p = Problem::new(&[MatRef::new(&s, rows, cols, "s").unwrap()], 2, 4).unwrap();
        let mut perm: Vec<u32> = (0..cols as u32).collect();
        let mut values = p.group_values(&perm);
        for slot in 0..4 {
            let before = p.retained(&perm);
            let all: Vec<usize> = (0..cols / 4).collect();
            let gain = step(&p, &mut perm, &mut values, &vec![slot; cols / 4], &all);
            let after = p.retained(&perm);
            assert!(gain >= 0.0 && (after - before - gain).abs() < 1e-6);
            let mut sorted = perm.clone();
            sorted.sort();
            assert_eq!(sorted, (0..cols as u32).collect::<Vec<_>>());
        }
    }
}
