"""The reference RIA channel permutation, in numpy + scipy: the baseline for our solver.

Faithful to `lib/prune.py` of the RIA repository (Zhang et al., ICLR 2024): columns
sorted by ascending column sum of the score, dealt out as a snake (chunk t fills slot t
of every group, odd chunks reversed), then ONE sweep of slot-LSA: for every slot p the
G x G matrix value[g, h] = score kept by group g with its slot-p column replaced by
group h's, solved with `scipy.optimize.linear_sum_assignment(maximize=True)`.

One deliberate difference, which only makes the baseline faster: the reference builds
each value matrix by sorting every candidate group row by row; here it is built from the
identity top_N(rest + x) = T + max(0, x - t) (README, "The permutation solver"), blocked
numpy, same numbers.
`check_against_sorting()` verifies that on a small matrix.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def retained(scores: np.ndarray, n: int, m: int, perm: np.ndarray | None = None) -> float:
    """Score kept by the N:M rule after reordering columns by `perm`."""
    s = scores if perm is None else scores[:, perm]
    groups = s.reshape(s.shape[0], -1, m)
    return float(np.sort(groups, axis=-1)[..., m - n :].sum(dtype=np.float64))


def upper_bound(scores: np.ndarray, n: int, m: int) -> float:
    keep = scores.shape[1] // m * n
    return float(np.sort(scores, axis=1)[:, scores.shape[1] - keep :].sum(dtype=np.float64))


def heuristic(scores: np.ndarray, m: int) -> np.ndarray:
    """RIA's heuristic channel reallocation (the 'sum' importance)."""
    cols = scores.shape[1]
    sorted_idx = np.argsort(scores.sum(axis=0), kind="stable")
    index = np.zeros(cols, dtype=np.int64)
    for ii in range(1, m + 1):
        chunk = sorted_idx[cols * (ii - 1) // m : cols * ii // m]
        index[ii - 1 :: m] = chunk if ii % 2 == 1 else chunk[::-1]
    return index


def value_matrix(s: np.ndarray, n: int, m: int, slot: int) -> np.ndarray:
    """value[g, h] for slot `slot` of the column order already applied to `s`."""
    rows, cols = s.shape
    g_count = cols // m
    grouped = s.reshape(rows, g_count, m)
    movers = np.ascontiguousarray(grouped[:, :, slot].T)  # G x rows
    rest = np.delete(grouped, slot, axis=2)  # rows x G x (m-1)
    rest_sorted = np.sort(rest, axis=2)[:, :, ::-1]
    top_sum = rest_sorted[:, :, :n].sum(axis=2, dtype=np.float64).sum(axis=0)  # G
    nth = np.ascontiguousarray(rest_sorted[:, :, n - 1].T)  # G x rows
    value = np.empty((g_count, g_count))
    buffer = np.empty_like(movers)
    for g in range(g_count):
        np.subtract(movers, nth[g], out=buffer)
        np.maximum(buffer, 0.0, out=buffer)
        value[g] = top_sum[g] + buffer.sum(axis=1)
    return value


def lsa_sweep(scores: np.ndarray, n: int, m: int, index: np.ndarray) -> np.ndarray:
    """One sweep of slot-LSA over slots 0..m-1, as the reference (blocks=1)."""
    index = index.copy()
    g_count = scores.shape[1] // m
    rows = np.arange(g_count)
    for slot in range(m):
        value = value_matrix(scores[:, index], n, m, slot)
        _, col_indices = linear_sum_assignment(value, maximize=True)
        idx = np.arange(scores.shape[1])
        idx[rows * m + slot] = col_indices * m + slot
        index = index[idx]
    return index


def reference_permutation(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """Heuristic + one slot-LSA sweep: the permutation the reference RIA finds."""
    return lsa_sweep(scores, n, m, heuristic(scores, m))


def check_against_sorting(seed: int = 0) -> None:
    """The identity-based value matrix equals the reference's sort-based one."""
    rng = np.random.default_rng(seed)
    n, m = 2, 4
    s = rng.random((16, 32)).astype(np.float32)
    g_count = s.shape[1] // m
    for slot in range(m):
        fast = value_matrix(s, n, m, slot)
        slow = np.empty_like(fast)
        grouped = s.reshape(16, g_count, m)
        for g in range(g_count):
            for h in range(g_count):
                group = grouped[:, g, :].copy()
                group[:, slot] = grouped[:, h, slot]
                slow[g, h] = np.sort(group, axis=1)[:, m - n :].sum(dtype=np.float64)
        np.testing.assert_allclose(fast, slow, rtol=1e-5)
