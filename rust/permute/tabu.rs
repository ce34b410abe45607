//! Tabu search over swaps of two columns between two groups.
//!
//! The whole swap neighbourhood comes from one relu-sum matrix: with `t_a` / `T_a` the
//! N-th largest value and the top-N sum of column a's group *without a* (row by row),
//! group(a) with b in a's place keeps `T_a + sum_r max(0, S_b[r] - t_a[r])`, so
//! `swap_gain(a, b) = T_a + D[a][b] + T_b + D[b][a] - V(group a) - V(group b)` with
//! `D[a][b] = sum_r max(0, S_b[r] - t_a[r])`. A swap changes two groups, so only the
//! `2m` rows of D that belong to their columns are recomputed.
//!
//! Each step takes the best swap that is not tabu (a column may not return to a group
//! it just left for a few steps) unless it beats the best state seen (aspiration).

use super::kernel::relu_sum;
use super::problem::{MAX_M, Problem, leave_one_out};
use rand::RngExt;
use rand_pcg::Pcg64Mcg;
use std::time::Instant;

use super::search::Stop;

pub struct Tabu<'a> {
    problem: &'a Problem,
    perm: Vec<u32>,
    /// Column -> position in `perm`.
    pos: Vec<usize>,
    values: Vec<f64>,
    /// Column-indexed leave-one-out N-th largest values (`cols x rows`) and top-N sums.
    loo_t: Vec<f32>,
    loo_sum: Vec<f64>,
    /// One group's `loo_t`, member by member (`m x rows`), before it is scattered.
    scratch: Vec<f32>,
    /// `d[a * cols + b]`, see the module docs.
    d: Vec<f32>,
    /// `tabu_until[col * groups + g]`: step before which `col` may not enter group g.
    tabu_until: Vec<usize>,
}

impl<'a> Tabu<'a> {
    pub fn new(problem: &'a Problem, perm: Vec<u32>, values: Vec<f64>) -> Self {
        let (cols, rows, groups) = (problem.cols(), problem.rows(), problem.groups());
        let mut pos = vec![0; cols];
        for (p, &c) in perm.iter().enumerate() {
            pos[c as usize] = p;
        }
        let mut tabu = Self {
            problem,
            perm,
            pos,
            values,
            loo_t: vec![0.0; cols * rows],
            loo_sum: vec![0.0; cols],
            scratch: vec![0.0; problem.m() * rows],
            d: Vec::new(),
            tabu_until: vec![0; cols * groups],
        };
        for g in 0..groups {
            tabu.refresh_leave_one_out(g);
        }
        tabu.d = relu_sum(&tabu.loo_t, problem.columns(), rows);
        tabu
    }

    pub fn into_state(self) -> (Vec<u32>, Vec<f64>) {
        (self.perm, self.values)
    }

    fn total(&self) -> f64 {
        self.values.iter().sum()
    }

    /// Recomputes `loo_t` / `loo_sum` for the columns of group `g`; returns the group's
    /// value, bit for bit what [`Problem::group_value`] gives.
    fn refresh_leave_one_out(&mut self, g: usize) -> f64 {
        let (m, n, rows) = (self.problem.m(), self.problem.n(), self.problem.rows());
        let members = &self.perm[g * m..(g + 1) * m];
        let mut columns: [&[f32]; MAX_M] = [&[]; MAX_M];
        for (c, &j) in columns.iter_mut().zip(members) {
            *c = self.problem.column(j);
        }
        let mut sums = [0.0f64; MAX_M];
        let value = leave_one_out(&columns[..m], n, &mut self.scratch, &mut sums[..m]);
        for (k, &c) in members.iter().enumerate() {
            let c = c as usize;
            self.loo_t[c * rows..(c + 1) * rows]
                .copy_from_slice(&self.scratch[k * rows..(k + 1) * rows]);
            self.loo_sum[c] = sums[k];
        }
        value
    }

    /// Recomputes the rows of `d` for the columns of groups `g` and `h`.
    fn refresh_rows(&mut self, g: usize, h: usize) {
        let (m, rows, cols) = (self.problem.m(), self.problem.rows(), self.problem.cols());
        let changed: Vec<usize> = [g, h]
            .iter()
            .flat_map(|&k| self.perm[k * m..(k + 1) * m].to_vec())
            .map(|c| c as usize)
            .collect();
        let t: Vec<f32> = changed
            .iter()
            .flat_map(|&c| self.loo_t[c * rows..(c + 1) * rows].to_vec())
            .collect();
        let fresh = relu_sum(&t, self.problem.columns(), rows);
        for (k, &c) in changed.iter().enumerate() {
            self.d[c * cols..(c + 1) * cols].copy_from_slice(&fresh[k * cols..(k + 1) * cols]);
        }
    }

    fn gain(&self, a: usize, b: usize) -> f64 {
        let (cols, m) = (self.problem.cols(), self.problem.m());
        let (ga, gb) = (self.pos[a] / m, self.pos[b] / m);
        self.loo_sum[a]
            + f64::from(self.d[a * cols + b])
            + self.loo_sum[b]
            + f64::from(self.d[b * cols + a])
            - self.values[ga]
            - self.values[gb]
    }

    /// Runs up to `steps` tabu steps, stopping early after `stall` steps without a new
    /// best; returns the best permutation and group values seen, and the steps taken.
    pub fn run(
        mut self,
        steps: usize,
        stall: usize,
        tenure: usize,
        rng: &mut Pcg64Mcg,
        deadline: Option<Instant>,
        stop: Stop<'_>,
    ) -> (Vec<u32>, Vec<f64>, usize) {
        let (cols, m, groups) = (self.problem.cols(), self.problem.m(), self.problem.groups());
        let mut best = (self.perm.clone(), self.values.clone());
        let mut best_total = self.total();
        let mut best_step = 0;
        let mut step = 0;
        while step < steps {
            // A step scans all column pairs (cols^2): poll `stop` every step.
            if step - best_step > stall
                || stop()
                || (step % 256 == 0 && deadline.is_some_and(|d| Instant::now() >= d))
            {
                break;
            }
            let current = self.total();
            let mut choice: Option<(f64, usize, usize)> = None;
            for a in 0..cols {
                let ga = self.pos[a] / m;
                for b in a + 1..cols {
                    let gb = self.pos[b] / m;
                    if ga == gb {
                        continue;
                    }
                    let gain = self.gain(a, b);
                    let tabu = self.tabu_until[a * groups + gb] > step
                        || self.tabu_until[b * groups + ga] > step;
                    if tabu && current + gain <= best_total * (1.0 + 1e-12) {
                        continue;
                    }
                    if choice.is_none_or(|(best_gain, _, _)| gain > best_gain) {
                        choice = Some((gain, a, b));
                    }
                }
            }
            let Some((_, a, b)) = choice else { break };
            let (pa, pb) = (self.pos[a], self.pos[b]);
            let (ga, gb) = (pa / m, pb / m);
            self.perm.swap(pa, pb);
            self.pos.swap(a, b);
            for g in [ga, gb] {
                self.values[g] = self.refresh_leave_one_out(g);
            }
            self.refresh_rows(ga, gb);
            // Saturating: `tenure` may be any positive count.
            let stay = (tenure / 2).saturating_add(rng.random_range(0..=tenure));
            self.tabu_until[a * groups + ga] = step.saturating_add(stay);
            self.tabu_until[b * groups + gb] = step.saturating_add(stay);
            let total = self.total();
            if total > best_total * (1.0 + 1e-12) {
                best_step = step;
                best_total = total;
                best = (self.perm.clone(), self.values.clone());
            }
            step += 1;
        }
        (best.0, best.1, step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matrix::MatRef;
    use crate::permute::problem::tests::direct_leave_one_out;
    use rand::SeedableRng;
    use rand::seq::SliceRandom;

    /// Every column's `loo_t` / `loo_sum` and every group's value equal the direct
    /// computation over the other columns of its group.
    fn assert_consistent(tabu: &Tabu) {
        let (p, m, rows) = (tabu.problem, tabu.problem.m(), tabu.problem.rows());
        for (g, members) in tabu.perm.chunks(m).enumerate() {
            let columns: Vec<&[f32]> = members.iter().map(|&c| p.column(c)).collect();
            assert_eq!(tabu.values[g], p.group_value(members));
            for (k, &c) in members.iter().enumerate() {
                let c = c as usize;
                let (t, sum) = direct_leave_one_out(&columns, p.n(), k);
                assert_eq!(&tabu.loo_t[c * rows..(c + 1) * rows], &t[..]);
                assert_eq!(tabu.loo_sum[c], sum);
            }
        }
    }

    #[test]
    fn leave_one_out_tables_stay_exact_through_swaps() {
        let mut rng = Pcg64Mcg::seed_from_u64(5);
        for (n, m) in [(1, 2), (2, 4), (3, 4), (4, 8), (8, 16), (16, 32)] {
            let (rows, cols) = (21, 4 * m);
            // Values from a small set: many ties within a row.
            let s: Vec<f32> = (0..rows * cols)
                .map(|_| rng.random_range(0..5u32) as f32)
                .collect();
            let p = Problem::new(&[MatRef::new(&s, rows, cols, "s").unwrap()], n, m).unwrap();
            let mut perm: Vec<u32> = (0..cols as u32).collect();
            perm.shuffle(&mut rng);
            let values = p.group_values(&perm);
            let mut tabu = Tabu::new(&p, perm, values);
            assert_consistent(&tabu);
            for _ in 0..10 {
                let (pa, pb) = (rng.random_range(0..cols), rng.random_range(0..cols));
                let (ga, gb) = (pa / m, pb / m);
                if ga == gb {
                    continue;
                }
                let (a, b) = (tabu.perm[pa] as usize, tabu.perm[pb] as usize);
                tabu.perm.swap(pa, pb);
                tabu.pos.swap(a, b);
                for g in [ga, gb] {
                    tabu.values[g] = tabu.refresh_leave_one_out(g);
                }
                assert_consistent(&tabu);
            }
        }
    }
}
