//! Exhaustive moves on a few groups at once: the best partition of the columns of `k`
//! groups into `k` groups of `m` (apex's "optimal stripe group" idea, 2 or 3 groups).

use super::problem::Problem;

/// Largest number of columns a repartition may enumerate (memo size 2^MAX_COLUMNS).
pub const MAX_COLUMNS: usize = 16;

/// Repartitions the columns of the groups `ids` optimally; returns the gain (0 if the
/// current partition is already best).
pub fn repartition(problem: &Problem, perm: &mut [u32], values: &mut [f64], ids: &[usize]) -> f64 {
    let m = problem.m();
    let columns: Vec<u32> = ids
        .iter()
        .flat_map(|&g| perm[g * m..(g + 1) * m].to_vec())
        .collect();
    assert!(
        columns.len() <= MAX_COLUMNS,
        "repartition of {} columns",
        columns.len()
    );
    let mut memo = vec![f64::NAN; 1 << columns.len()];
    let mut value_of = |mask: u32| -> f64 {
        let cached = memo[mask as usize];
        if !cached.is_nan() {
            return cached;
        }
        let members: Vec<u32> = (0..columns.len())
            .filter(|i| mask >> i & 1 == 1)
            .map(|i| columns[i])
            .collect();
        let v = problem.group_value(&members);
        memo[mask as usize] = v;
        v
    };
    let old: f64 = ids.iter().map(|&g| values[g]).sum();
    let full = (1u32 << columns.len()) - 1;
    let mut best = (old, Vec::new());
    let mut chosen = Vec::with_capacity(ids.len());
    search(full, m, 0.0, &mut chosen, &mut value_of, &mut best);
    let (best_value, masks) = best;
    if masks.is_empty() || best_value - old <= 1e-12 * old.abs().max(f64::MIN_POSITIVE) {
        return 0.0;
    }
    for (&g, &mask) in ids.iter().zip(&masks) {
        let members: Vec<u32> = (0..columns.len())
            .filter(|i| mask >> i & 1 == 1)
            .map(|i| columns[i])
            .collect();
        perm[g * m..(g + 1) * m].copy_from_slice(&members);
        values[g] = value_of(mask);
    }
    best_value - old
}

/// Enumerates partitions of `remaining` into groups of `m`; the lowest remaining column
/// always opens the next group, so each partition is visited once.
fn search(
    remaining: u32,
    m: usize,
    acc: f64,
    chosen: &mut Vec<u32>,
    value_of: &mut impl FnMut(u32) -> f64,
    best: &mut (f64, Vec<u32>),
) {
    if remaining == 0 {
        if acc > best.0 {
            *best = (acc, chosen.clone());
        }
        return;
    }
    let first = remaining & remaining.wrapping_neg();
    let rest = remaining & !first;
    for_each_subset(rest, m - 1, |others| {
        let mask = first | others;
        let v = value_of(mask);
        chosen.push(mask);
        search(remaining & !mask, m, acc + v, chosen, value_of, best);
        chosen.pop();
    });
}

/// Calls `f` with every subset of `set` that has exactly `k` elements.
fn for_each_subset(set: u32, k: usize, mut f: impl FnMut(u32)) {
    fn rec(set: u32, k: usize, acc: u32, f: &mut impl FnMut(u32)) {
        if k == 0 {
            f(acc);
            return;
        }
        if (set.count_ones() as usize) < k {
            return;
        }
        let low = set & set.wrapping_neg();
        rec(set & !low, k - 1, acc | low, f);
        rec(set & !low, k, acc, f);
    }
    rec(set, k, 0, &mut f);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subsets_are_enumerated_once() {
        let mut seen = Vec::new();
        for_each_subset(0b10110110, 3, |s| seen.push(s));
        assert_eq!(seen.len(), 10); // C(5, 3)
        assert!(
            seen.iter()
                .all(|s| s.count_ones() == 3 && s & !0b10110110 == 0)
        );
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 10);
    }
}
