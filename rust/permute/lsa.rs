//! Slot-LSA: one column of every group (its "mover") is taken out, and the movers are
//! reassigned to the groups by an exact linear assignment (README, "The permutation solver").
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

/// A reassignment found by one slot-LSA: the new members and kept score of each group
/// that changes, and the total gain.
#[derive(Default)]
pub struct Moves {
    pub groups: Vec<(usize, Vec<u32>, f64)>,
    pub gain: f64,
}

impl Moves {
    /// Writes the moves into `perm` and `values`.
    pub fn apply(self, problem: &Problem, perm: &mut [u32], values: &mut [f64]) {
        let m = problem.m();
        for (g, members, value) in self.groups {
            perm[g * m..(g + 1) * m].copy_from_slice(&members);
            values[g] = value;
        }
    }
}

/// One slot-LSA step among the groups `ids` of `perm` (position -> column), with
/// `values` the per-group kept score and `movers[g]` the slot of group g that moves.
/// Returns every cycle of the optimal assignment whose exactly recomputed gain is
/// positive. Reads only the groups in `ids`, so steps on disjoint blocks can run in
/// parallel.
pub fn step(
    problem: &Problem,
    perm: &[u32],
    values: &[f64],
    movers: &[usize],
    ids: &[usize],
    panels: &mut Panels,
) -> Moves {
    let gain_matrix = value_matrix(problem, perm, movers, ids, panels);
    let sigma = lap::solve_max(&gain_matrix, ids.len());
    gaining_cycles(problem, perm, values, movers, ids, &sigma)
}

/// Scratch for the movers (`x`) and thresholds (`t`) of one block, `ids.len() x rows`
/// each, reused across steps: fresh allocations of this size cost page faults.
#[derive(Default)]
pub struct Panels {
    x: Vec<f32>,
    t: Vec<f32>,
}

/// The `ids.len()` square matrix `sum_r max(0, x_h[r] - t_g[r])` over groups `ids`: the
/// value of giving group g the mover of group h, less a constant per g (which no
/// assignment can change).
pub fn value_matrix(
    problem: &Problem,
    perm: &[u32],
    movers: &[usize],
    ids: &[usize],
    panels: &mut Panels,
) -> Vec<f32> {
    let (rows, m, n) = (problem.rows(), problem.m(), problem.n());
    let len = ids.len() * rows;
    panels.x.resize(len, 0.0);
    panels.t.resize(len, 0.0);
    let (x, t) = (&mut panels.x[..len], &mut panels.t[..len]);
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
    relu_sum(t, x, rows)
}

/// The cycles of `sigma` (group `ids[i]` receives the mover of group `ids[sigma[i]]`)
/// whose exact gain is positive.
fn gaining_cycles(
    problem: &Problem,
    perm: &[u32],
    values: &[f64],
    movers: &[usize],
    ids: &[usize],
    sigma: &[usize],
) -> Moves {
    let m = problem.m();
    let mover_col = |i: usize| perm[ids[i] * m + movers[ids[i]]];
    let mut seen = vec![false; sigma.len()];
    let mut moves = Moves::default();
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
        let updated: Vec<(usize, Vec<u32>, f64)> = cycle
            .par_iter()
            .map(|&i| {
                let g = ids[i];
                let mut members = perm[g * m..(g + 1) * m].to_vec();
                members[movers[g]] = mover_col(sigma[i]);
                let value = problem.group_value(&members);
                (g, members, value)
            })
            .collect();
        let old: f64 = cycle.iter().map(|&i| values[ids[i]]).sum();
        let new: f64 = updated.iter().map(|(_, _, v)| v).sum();
        if new - old > NOISE * old.abs().max(f64::MIN_POSITIVE) {
            moves.groups.extend(updated);
            moves.gain += new - old;
        }
    }
    moves
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
            let moves = step(
                &p,
                &perm,
                &values,
                &vec![slot; cols / 4],
                &all,
                &mut Panels::default(),
            );
            let gain = moves.gain;
            moves.apply(&p, &mut perm, &mut values);
            let after = p.retained(&perm);
            assert!(gain >= 0.0 && (after - before - gain).abs() < 1e-6);
            let mut sorted = perm.clone();
            sorted.sort();
            assert_eq!(sorted, (0..cols as u32).collect::<Vec<_>>());
        }
    }
}
