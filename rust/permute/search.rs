//! The permutation search, in stages:
//! 1. RIA's snake heuristic (kept only if it beats the identity);
//! 2. block phase: slot-LSA steps on random blocks of `block_groups` groups (the first
//!    sweep moves slots 0..m, as the reference does, then random movers) until
//!    `patience` steps in a row gain less than `tolerance` of the gap;
//! 3. global phase: up to `global_steps` slot-LSA steps over all groups at once;
//! 4. on matrices small enough to afford them: exhaustive pair repartitions and tabu
//!    search over swaps on independent chains, then stages 3-4's polish again.
//!
//! Every stage is deterministic for a fixed seed whatever the thread count: chains have
//! their own seeded generators, their number does not depend on the thread pool, and
//! ties between chains go to the lower chain index. Only `time_budget` makes a result
//! depend on machine speed.

use super::problem::Problem;
use super::tabu::Tabu;
use super::{heuristic, lsa, polish};
use crate::error::{InputError, Result, bail};
use crate::matrix::MatRef;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use rand_pcg::Pcg64Mcg;
use rayon::prelude::*;
use std::time::{Duration, Instant};

/// Search settings. `Default` gives the settings the benchmarks report.
#[derive(Debug, Clone)]
pub struct Options {
    pub seed: u64,
    /// Wall-clock cap for the whole search (makes the result timing-dependent).
    pub time_budget: Option<Duration>,
    /// A slot-LSA step "makes progress" when it gains more than `tolerance` times the
    /// gap `upper_bound - identity`.
    pub tolerance: f64,
    /// Consecutive steps without progress that end a descent.
    pub patience: usize,
    /// Cap on slot-LSA steps in the block phase.
    pub max_steps: usize,
    /// Groups per assignment in the block phase (random blocks each step): on large
    /// matrices many cheap small assignments make faster progress than few large ones.
    /// `None`: as many as keep one block's relu-sum work near `BLOCK_WORK` (all groups,
    /// when that is cheap), at least 64.
    pub block_groups: Option<usize>,
    /// Cap on slot-LSA steps over all groups at once, after the block phase; fewer when
    /// they would exceed `GLOBAL_WORK` (none on the largest matrices, where one step
    /// would take minutes).
    pub global_steps: usize,
    /// Tabu steps per chain; `None` sizes them from the problem (none for large
    /// matrices, where slot-LSA is the better use of time).
    pub tabu_steps: Option<usize>,
    /// Steps a column may not return to a group it left (randomised around this);
    /// `None`: half the number of groups, clamped to 4..=16.
    pub tabu_tenure: Option<usize>,
    /// Independent tabu chains, each with its own seed.
    pub chains: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            seed: 0,
            time_budget: None,
            tolerance: 1e-4,
            patience: 8,
            max_steps: 400,
            block_groups: None,
            global_steps: 8,
            tabu_steps: None,
            tabu_tenure: None,
            chains: 8,
        }
    }
}

/// What the search found, with the numbers needed to judge it.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// New column order: position p holds original column `perm[p]`.
    pub perm: Vec<u32>,
    pub retained: f64,
    pub identity: f64,
    /// Retained score after RIA's heuristic alone.
    pub heuristic: f64,
    pub upper_bound: f64,
    pub lsa_steps: usize,
    /// Tabu steps made, over all chains.
    pub tabu_steps: usize,
    /// True when the result is the proven optimum (small problems solved exhaustively).
    pub exact: bool,
}

impl Outcome {
    /// Share of the gap between identity and the upper bound that the search closed.
    pub fn efficacy(&self) -> f64 {
        efficacy(self.retained, self.identity, self.upper_bound)
    }
}

/// `(retained - identity) / (upper_bound - identity)`; 1 when there is no gap to close.
pub fn efficacy(retained: f64, identity: f64, upper_bound: f64) -> f64 {
    let gap = upper_bound - identity;
    if gap <= 1e-12 * upper_bound.abs().max(f64::MIN_POSITIVE) {
        1.0
    } else {
        (retained - identity) / gap
    }
}

/// A permutation with its per-group kept scores.
#[derive(Clone)]
struct State {
    perm: Vec<u32>,
    values: Vec<f64>,
}

impl State {
    fn new(problem: &Problem, perm: Vec<u32>) -> Self {
        let values = problem.group_values(&perm);
        Self { perm, values }
    }

    fn total(&self) -> f64 {
        self.values.iter().sum()
    }
}

/// Problem size below which exhaustive pair repartitions are worth a full pass.
const POLISH_WORK: f64 = 4e8;
/// Work (relu-sum operations and equivalents) allowed for tabu search, over all chains.
const TABU_WORK: f64 = 4e9;
/// Steps after which a tabu chain has long stopped finding anything new.
const MAX_TABU_STEPS: usize = 20_000;

/// A cancellation check, polled between steps of the search: when it returns true the
/// search stops as if its time budget had run out (the result is still valid).
pub type Stop<'a> = &'a (dyn Fn() -> bool + Sync);

/// [`search_with`] without cancellation.
pub fn search(problem: &Problem, options: &Options) -> Result<Outcome> {
    search_with(problem, options, &|| false)
}

/// Fails when [`search_with`] would refuse `problem` with `options` (see there); does no
/// search work.
pub fn check(problem: &Problem, options: &Options) -> Result<()> {
    check_magnitude(problem)?;
    block_size(problem, options)?;
    tabu_steps(problem, options)?;
    Ok(())
}

/// Independent searches run at once on the current thread pool, each returning exactly
/// what [`search_with`] returns for it alone (every search is deterministic whatever the
/// threads), with its wall-clock time. One search leaves cores idle in its sequential
/// stretches (an assignment, the heuristic's sort, the transposing copy); the others fill
/// them. Every problem is built and checked (in parallel) before any search starts, so a
/// bad input fails fast; the error names the problem's index. Largest problems start
/// first, so the small ones fill the gaps at the end.
pub fn search_all(
    problems: &[Vec<MatRef<'_, f32>>],
    n: usize,
    m: usize,
    options: &Options,
    stop: Stop<'_>,
) -> Result<Vec<(Outcome, Duration)>> {
    let built: Vec<Result<Problem>> = problems
        .par_iter()
        .map(|mats| {
            let problem = Problem::new(mats, n, m)?;
            check(&problem, options)?;
            Ok(problem)
        })
        .collect();
    let built = built
        .into_iter()
        .enumerate()
        .map(|(k, r)| r.map_err(|e| InputError(format!("problems[{k}]: {}", e.0))))
        .collect::<Result<Vec<_>>>()?;
    let mut order: Vec<usize> = (0..built.len()).collect();
    order.sort_by_key(|&k| std::cmp::Reverse(built[k].rows() * built[k].cols()));
    let mut found: Vec<(usize, Result<(Outcome, Duration)>)> = order
        .into_par_iter()
        .with_max_len(1)
        .map(|k| {
            let started = Instant::now();
            let outcome = search_with(&built[k], options, stop);
            (k, outcome.map(|o| (o, started.elapsed())))
        })
        .collect();
    found.sort_by_key(|(k, _)| *k);
    found.into_iter().map(|(_, r)| r).collect()
}

/// The search (module docs). Fails, before any work, when the scores are too large for
/// its float32 sums or when the options would need more scratch memory than
/// [`MAX_SCRATCH`] (see [`check`]); `stop` is polled between steps (see [`Stop`]).
pub fn search_with(problem: &Problem, options: &Options, stop: Stop<'_>) -> Result<Outcome> {
    let started = Instant::now();
    // No deadline when the budget reaches past what an `Instant` can hold.
    let deadline = options.time_budget.and_then(|b| started.checked_add(b));
    let (cols, groups) = (problem.cols(), problem.groups());
    check_magnitude(problem)?;
    let identity_perm: Vec<u32> = (0..cols as u32).collect();
    let identity = problem.retained(&identity_perm);
    let upper_bound = problem.upper_bound();
    let outcome = |state: &State, heuristic: f64, lsa_steps, tabu_steps, exact| {
        Ok(Outcome {
            perm: state.perm.clone(),
            retained: state.total(),
            identity,
            heuristic,
            upper_bound,
            lsa_steps,
            tabu_steps,
            exact,
        })
    };

    let mut state = State::new(problem, identity_perm.clone());
    if groups == 1 {
        return outcome(&state, identity, 0, 0, true);
    }
    if cols <= 12 && groups <= 3 {
        let ids: Vec<usize> = (0..groups).collect();
        polish::repartition(problem, &mut state.perm, &mut state.values, &ids);
        return outcome(&state, identity, 0, 0, true);
    }

    let block = block_size(problem, options)?;
    let steps = tabu_steps(problem, options)?;
    let snake = State::new(problem, heuristic::snake(problem));
    let heuristic_value = snake.total();
    if heuristic_value > state.total() {
        state = snake;
    }
    let min_gain = options.tolerance * (upper_bound - identity).max(0.0);
    let mut rng = Pcg64Mcg::seed_from_u64(options.seed);
    let descent = Descent {
        problem,
        min_gain,
        deadline,
        stop,
    };
    let mut lsa_steps = descent.run(
        &mut state,
        &mut rng,
        options.patience,
        options.max_steps,
        true,
        block,
    );
    let global_steps = options.global_steps.min(affordable_global_steps(problem));
    let polish = polish_pass_work(problem) <= POLISH_WORK;
    lsa_steps += descent.finish(&mut state, &mut rng, options.patience, global_steps, polish);

    let mut tabu_steps = 0;
    if steps > 0 && options.chains > 0 && !descent.expired() {
        let before = state.total();
        tabu_steps = tabu_chains(problem, &mut state, options, steps, deadline, stop);
        if state.total() > before {
            lsa_steps +=
                descent.finish(&mut state, &mut rng, options.patience, global_steps, polish);
        }
    }
    // Every move gains on the groups it changes, but the total is re-summed over all
    // groups: when the scores span many orders of magnitude, a gain below the total's
    // rounding can leave it an ulp under the identity's. Never return less.
    if state.total() < identity {
        state = State::new(problem, identity_perm);
    }
    outcome(&state, heuristic_value, lsa_steps, tabu_steps, false)
}

/// Independent tabu chains from `state` (seeded from `options.seed` and the chain index);
/// keeps the best (ties to the lower chain index). Returns the steps taken in all chains.
fn tabu_chains(
    problem: &Problem,
    state: &mut State,
    options: &Options,
    steps: usize,
    deadline: Option<Instant>,
    stop: Stop<'_>,
) -> usize {
    let tenure = options
        .tabu_tenure
        .unwrap_or_else(|| (problem.groups() / 2).clamp(4, 16));
    let stall = (20 * problem.cols()).max(1000);
    let chains: Vec<(State, usize)> = (0..options.chains)
        .into_par_iter()
        .map(|chain| {
            let seed = options.seed ^ (chain as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut rng = Pcg64Mcg::seed_from_u64(seed);
            let tabu = Tabu::new(problem, state.perm.clone(), state.values.clone());
            let (perm, values, taken) = tabu.run(steps, stall, tenure, &mut rng, deadline, stop);
            (State { perm, values }, taken)
        })
        .collect();
    let mut taken = 0;
    for (chain_state, chain_steps) in chains {
        taken += chain_steps;
        if chain_state.total() > state.total() {
            *state = chain_state;
        }
    }
    taken
}

/// Relu-sum work (pair-rows) of one block's assignment that keeps a step cheap: 2^28,
/// about 15 ms on two cores.
const BLOCK_WORK: f64 = 268_435_456.0;

/// Relu-sum work allowed for the global phase: 2^35 pair-rows, about 2 s on two cores.
const GLOBAL_WORK: f64 = 34_359_738_368.0;

/// Most elements of scratch whose size is quadratic in the problem (the relu-sum and
/// assignment matrices of one slot-LSA step, summed over its blocks; tabu's swap matrix
/// and tables, summed over chains), counted in 4-byte words: 2^28, 1 GiB. Automatic
/// sizes stay below it; explicit options that exceed it are refused before any work, so
/// an oversized search raises instead of aborting the process on a failed allocation.
pub const MAX_SCRATCH: usize = 1 << 28;

/// Largest score the search accepts times the rows summed over: relu sums of one column
/// against another accumulate up to `rows * max` in float32, which must stay finite (with
/// room for rounding) for the assignments to be meaningful.
const MAX_COLUMN_SUM: f64 = f32::MAX as f64 / 4.0;

fn gib(words: f64) -> String {
    format!("{:.1} GiB", words * 4.0 / (1u64 << 30) as f64)
}

/// Fails when relu sums over a column could overflow float32.
fn check_magnitude(problem: &Problem) -> Result<()> {
    let (max, rows) = (problem.max_score(), problem.rows());
    if f64::from(max) * rows as f64 > MAX_COLUMN_SUM {
        bail!(
            "scores are too large for the permutation search: the largest, {max:e}, times \
             {rows} rows overflows its float32 sums (limit {MAX_COLUMN_SUM:e}); divide the \
             scores by a constant (e.g. their maximum), which does not change the best \
             permutation"
        );
    }
    Ok(())
}

/// Words of relu-sum output for one step over all `groups` in blocks of `block`.
fn block_scratch(groups: usize, block: usize) -> f64 {
    let block = block.min(groups);
    groups.div_ceil(block) as f64 * block as f64 * block as f64
}

/// The block size of the block phase: `options.block_groups`, or sized from the problem;
/// either way at least 2 and within [`MAX_SCRATCH`] (an explicit size beyond it fails).
fn block_size(problem: &Problem, options: &Options) -> Result<usize> {
    let groups = problem.groups();
    // Largest block whose step stays within the scratch bound (blocks of b need about
    // groups * b words).
    let fitting = (MAX_SCRATCH / groups).min(groups);
    if options.max_steps == 0 || groups <= 2 {
        return Ok(options.block_groups.unwrap_or(2).clamp(2, groups.max(2)));
    }
    if fitting < 2 {
        bail!(
            "scores have too many column groups for the permutation search: {groups} groups \
             of m={} columns need {} of scratch per step even in blocks of 2; use fewer \
             columns or max_steps=0",
            problem.m(),
            gib(block_scratch(groups, 2))
        );
    }
    match options.block_groups {
        None => Ok(auto_block(problem).min(fitting).max(2)),
        Some(b) if block_scratch(groups, b) > MAX_SCRATCH as f64 => bail!(
            "block_groups={b} needs {} of scratch per step on scores with {groups} column \
             groups ({} columns / m={}), more than the {} allowed; use block_groups <= \
             {fitting}, or None to size blocks from the matrix",
            gib(block_scratch(groups, b)),
            problem.cols(),
            problem.m(),
            gib(MAX_SCRATCH as f64)
        ),
        Some(b) => Ok(b.max(2)),
    }
}

/// Global slot-LSA steps within the work budget and the scratch bound (none when one
/// assignment over all groups would not fit).
fn affordable_global_steps(problem: &Problem) -> usize {
    let g = problem.groups() as f64;
    if g * g > MAX_SCRATCH as f64 {
        return 0;
    }
    (GLOBAL_WORK / (g * g * problem.rows() as f64)) as usize
}

fn auto_block(problem: &Problem) -> usize {
    let groups = problem.groups();
    let per_group = (groups * problem.rows()) as f64;
    ((BLOCK_WORK / per_group) as usize).clamp(64.min(groups), groups)
}

/// Words of scratch one tabu chain holds: the swap matrix (`cols^2`), the leave-one-out
/// thresholds (`cols * rows`) and the tabu table (`cols * groups` of 8 bytes).
fn tabu_scratch(problem: &Problem) -> f64 {
    let (cols, rows, groups) = (
        problem.cols() as f64,
        problem.rows() as f64,
        problem.groups() as f64,
    );
    cols * cols + cols * rows + 2.0 * cols * groups
}

/// Tabu steps per chain: `options.tabu_steps` or sized from the problem; an explicit
/// count whose chains would exceed [`MAX_SCRATCH`] fails, an automatic one becomes 0.
fn tabu_steps(problem: &Problem, options: &Options) -> Result<usize> {
    let words = options.chains as f64 * tabu_scratch(problem);
    let fits = words <= MAX_SCRATCH as f64;
    match options.tabu_steps {
        None if fits => Ok(auto_tabu_steps(problem, options)),
        None => Ok(0),
        Some(steps) if steps > 0 && options.chains > 0 && !fits => bail!(
            "tabu_steps={steps} with chains={} needs {} of scratch on scores with {} \
             columns, more than the {} allowed; use tabu_steps=0 or None (sized from the \
             matrix), or fewer chains",
            options.chains,
            gib(words),
            problem.cols(),
            gib(MAX_SCRATCH as f64)
        ),
        Some(steps) => Ok(steps),
    }
}

/// Estimated work of one full pass of pair repartitions.
fn polish_pass_work(problem: &Problem) -> f64 {
    let m = problem.m();
    if 2 * m > polish::MAX_COLUMNS {
        return f64::INFINITY;
    }
    let g = problem.groups() as f64;
    let subsets = binomial(2 * m, m) as f64;
    g * (g - 1.0) / 2.0 * subsets * (problem.rows() * m * problem.n()) as f64
}

/// Tabu steps per chain: the work budget over the cost of one step (scanning every
/// swap, refreshing `2m` rows of the swap matrix and the two changed groups'
/// leave-one-out tables), or none when that leaves too few steps to matter (large
/// matrices, where slot-LSA is the better use of time).
fn auto_tabu_steps(problem: &Problem, options: &Options) -> usize {
    let cols = problem.cols() as f64;
    let rows = problem.rows() as f64;
    let (n, m) = (problem.n() as f64, problem.m() as f64);
    let setup = cols * cols * rows;
    // Each changed group's leave-one-out tables and value (`leave_one_out`): per row,
    // n + 1 selection passes over m values and n terms for each of the m members, about
    // m * (2n + 1) operations that each cost about two relu-sum ones (a compare-exchange
    // writes two values; a term selects, widens and adds). On 16 x 128 scores that is 29%
    // of a step's work at 16:32 and 3% at 2:4.
    let refresh_groups = 2.0 * 2.0 * m * (2.0 * n + 1.0) * rows;
    let per_step = cols * cols * 2.0 + 2.0 * m * cols * rows + refresh_groups;
    let budget = TABU_WORK / options.chains.max(1) as f64 - setup;
    let steps = (budget / per_step).max(0.0) as usize;
    if steps < problem.cols() {
        0
    } else {
        steps.min(MAX_TABU_STEPS)
    }
}

fn binomial(n: usize, k: usize) -> usize {
    (0..k).fold(1, |acc, i| acc * (n - i) / (i + 1))
}

/// The local-search moves, sharing the problem, the progress threshold and the deadline.
struct Descent<'a> {
    problem: &'a Problem,
    min_gain: f64,
    deadline: Option<Instant>,
    stop: Stop<'a>,
}

impl Descent<'_> {
    /// The deadline has passed or the caller asked to stop.
    fn expired(&self) -> bool {
        (self.stop)() || self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// Slot-LSA steps until `patience` steps in a row make no progress or `max_steps`.
    /// With `sweep_first`, the first `m` steps move slots 0..m (the reference's sweep);
    /// later steps pick a random mover in every group. Each step solves one assignment per
    /// block of `block` groups (random blocks after the sweep; `block >= groups`: one
    /// assignment over all groups). Returns the number of steps.
    fn run(
        &self,
        state: &mut State,
        rng: &mut Pcg64Mcg,
        patience: usize,
        max_steps: usize,
        sweep_first: bool,
        block: usize,
    ) -> usize {
        let (m, groups) = (self.problem.m(), self.problem.groups());
        let (mut steps, mut stale) = (0, 0);
        let mut panels: Vec<lsa::Panels> = (0..groups.div_ceil(block))
            .map(|_| lsa::Panels::default())
            .collect();
        while stale < patience && steps < max_steps && !self.expired() {
            let movers: Vec<usize> = if sweep_first && steps < m {
                vec![steps; groups]
            } else {
                (0..groups).map(|_| rng.random_range(0..m)).collect()
            };
            let mut ids: Vec<usize> = (0..groups).collect();
            if block < groups && !(sweep_first && steps < m) {
                ids.shuffle(rng);
            }
            // Blocks hold disjoint groups: solve them in parallel, then apply in order.
            let found: Vec<lsa::Moves> = ids
                .par_chunks(block)
                .zip(panels.par_iter_mut())
                .map(|(chunk, scratch)| {
                    lsa::step(
                        self.problem,
                        &state.perm,
                        &state.values,
                        &movers,
                        chunk,
                        scratch,
                    )
                })
                .collect();
            let mut gain = 0.0;
            for moves in found {
                gain += moves.gain;
                moves.apply(self.problem, &mut state.perm, &mut state.values);
            }
            stale = if gain > self.min_gain { 0 } else { stale + 1 };
            steps += 1;
        }
        steps
    }

    /// The global phase (slot-LSA over all groups at once, up to `global_steps`), then
    /// pair repartitions when affordable. Returns the slot-LSA steps taken.
    fn finish(
        &self,
        state: &mut State,
        rng: &mut Pcg64Mcg,
        patience: usize,
        global_steps: usize,
        polish: bool,
    ) -> usize {
        let groups = self.problem.groups();
        let steps = self.run(state, rng, patience, global_steps, false, groups);
        if polish {
            self.polish_pairs(state);
        }
        steps
    }

    /// Repartitions every pair of groups optimally, repeating passes while they gain.
    fn polish_pairs(&self, state: &mut State) {
        let groups = self.problem.groups();
        for _ in 0..8 {
            let mut gain = 0.0;
            for g in 0..groups {
                if self.expired() {
                    return;
                }
                for h in g + 1..groups {
                    gain += polish::repartition(
                        self.problem,
                        &mut state.perm,
                        &mut state.values,
                        &[g, h],
                    );
                }
            }
            if gain <= self.min_gain || self.expired() {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matrix::MatRef;

    fn random_scores(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut rng = Pcg64Mcg::seed_from_u64(seed);
        (0..rows * cols).map(|_| rng.random::<f32>()).collect()
    }

    /// Best retained score over every partition of the columns into groups of m.
    fn brute_force(problem: &Problem) -> f64 {
        fn rec(
            problem: &Problem,
            left: &mut Vec<u32>,
            group: &mut Vec<u32>,
            acc: f64,
            best: &mut f64,
        ) {
            let m = problem.m();
            if group.len() == m {
                let v = problem.group_value(group);
                let mut next = Vec::new();
                rec(problem, left, &mut next, acc + v, best);
                return;
            }
            if left.is_empty() {
                *best = best.max(acc);
                return;
            }
            // The first remaining column opens a group; others join in index order.
            let start = if group.is_empty() {
                0
            } else {
                left.iter()
                    .position(|&c| c > *group.last().unwrap())
                    .unwrap_or(left.len())
            };
            let candidates: Vec<u32> = if group.is_empty() {
                vec![left[0]]
            } else {
                left[start..].to_vec()
            };
            for c in candidates {
                let i = left.iter().position(|&x| x == c).unwrap();
                left.remove(i);
                group.push(c);
                rec(problem, left, group, acc, best);
                group.pop();
                left.insert(i, c);
            }
        }
        let mut best = f64::NEG_INFINITY;
        let mut left: Vec<u32> = (0..problem.cols() as u32).collect();
        rec(problem, &mut left, &mut Vec::new(), 0.0, &mut best);
        best
    }

    fn is_permutation(perm: &[u32]) -> bool {
        let mut sorted = perm.to_vec();
        sorted.sort();
        sorted.iter().enumerate().all(|(i, &p)| p as usize == i)
    }

    #[test]
    fn reaches_the_exhaustive_optimum_on_small_matrices() {
        for (cols, n, m) in [
            (8, 2, 4),
            (12, 2, 4),
            (12, 1, 4),
            (12, 3, 4),
            (8, 1, 2),
            (10, 1, 2),
            (12, 1, 2),
            (12, 2, 6),
        ] {
            for seed in 0..4 {
                let s = random_scores(9, cols, seed);
                let p = Problem::new(&[MatRef::new(&s, 9, cols, "s").unwrap()], n, m).unwrap();
                let out = search(
                    &p,
                    &Options {
                        seed,
                        ..Options::default()
                    },
                )
                .unwrap();
                assert!(is_permutation(&out.perm));
                let best = brute_force(&p);
                assert!(
                    (out.retained - best).abs() <= 1e-9 * best,
                    "cols={cols} {n}:{m} seed={seed}: {} vs {best}",
                    out.retained
                );
                assert!((p.retained(&out.perm) - out.retained).abs() <= 1e-9 * best);
            }
        }
    }

    #[test]
    fn never_below_identity_and_reports_consistent_numbers() {
        for (rows, cols, n, m, seed) in [
            (16, 64, 2, 4, 1),
            (40, 96, 4, 8, 2),
            (7, 32, 1, 4, 3),
            (64, 256, 2, 4, 4),
        ] {
            let s = random_scores(rows, cols, seed);
            let p = Problem::new(&[MatRef::new(&s, rows, cols, "s").unwrap()], n, m).unwrap();
            let out = search(
                &p,
                &Options {
                    tabu_steps: Some(300),
                    ..Options::default()
                },
            )
            .unwrap();
            assert!(is_permutation(&out.perm));
            assert!(out.retained >= out.identity);
            assert!(out.retained <= out.upper_bound * (1.0 + 1e-12));
            assert!((p.retained(&out.perm) - out.retained).abs() <= 1e-9 * out.retained);
            assert!((0.0..=1.0).contains(&out.efficacy()));
        }
    }

    #[test]
    fn identity_is_kept_when_it_is_already_optimal() {
        // Every column equal: nothing can beat the identity, so it must be returned as is.
        let s = vec![1.0f32; 8 * 32];
        let p = Problem::new(&[MatRef::new(&s, 8, 32, "s").unwrap()], 2, 4).unwrap();
        let out = search(&p, &Options::default()).unwrap();
        assert_eq!(out.retained, out.identity);
        assert_eq!(out.efficacy(), 1.0);
    }

    #[test]
    fn searches_at_once_equal_each_search_alone() {
        let a = random_scores(48, 128, 1);
        let b = random_scores(16, 64, 2);
        let c = random_scores(8, 64, 3);
        fn mats(s: &[f32], rows: usize, cols: usize) -> MatRef<'_, f32> {
            MatRef::new(s, rows, cols, "s").unwrap()
        }
        let problems = vec![
            vec![mats(&a, 48, 128)],
            vec![mats(&b, 16, 64), mats(&c, 8, 64)],
        ];
        let options = Options {
            seed: 4,
            tabu_steps: Some(200),
            ..Options::default()
        };
        let together = search_all(&problems, 2, 4, &options, &|| false).unwrap();
        for (mats, (outcome, _)) in problems.iter().zip(&together) {
            let alone = search(&Problem::new(mats, 2, 4).unwrap(), &options).unwrap();
            assert_eq!(outcome.perm, alone.perm);
            assert_eq!(outcome.retained, alone.retained);
        }
        let bad = [1.0f32, -1.0, 0.0, 0.0];
        let err = search_all(
            &[vec![mats(&b, 16, 64)], vec![mats(&bad, 1, 4)]],
            2,
            4,
            &options,
            &|| false,
        );
        assert!(err.unwrap_err().0.starts_with("problems[1]: "));
    }

    #[test]
    fn same_result_for_any_thread_count() {
        let s = random_scores(48, 128, 7);
        let p = Problem::new(&[MatRef::new(&s, 48, 128, "s").unwrap()], 2, 4).unwrap();
        let run = |threads| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                search(
                    &p,
                    &Options {
                        seed: 3,
                        tabu_steps: Some(300),
                        ..Options::default()
                    },
                )
                .unwrap()
            })
        };
        let (a, b) = (run(1), run(4));
        assert_eq!(a.perm, b.perm);
        assert_eq!(a.retained, b.retained);
    }
}
