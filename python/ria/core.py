"""The Rust core's public API: importance scores, masks and the permutation search.

Shapes follow `nn.Linear`: a weight or score matrix is `rows x cols` =
`out_features x in_features`; N:M groups run along the columns (input channels).
Every function accepts numpy arrays or torch tensors (moved to the CPU) and returns
numpy arrays. Work runs in Rust on all cores with the GIL released.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import _core
from ._arrays import ArrayLike, float32_array, score_list, weight_array

__all__ = [
    "PermutationResult",
    "magnitude_score",
    "nm_mask",
    "retained_score",
    "ria_score",
    "search_permutation",
    "unstructured_mask",
    "wanda_score",
]


def ria_score(
    weight: ArrayLike, act_norm: ArrayLike | None = None, alpha: float = 0.5
) -> np.ndarray:
    """RIA importance, `(|W| / colsum|W| + |W| / rowsum|W|) * act_norm ** alpha`, in f32.

    Args:
        weight: `(out_features, in_features)`, float32, float16 or bfloat16.
        act_norm: `(in_features,)`, the L2 norm of each input channel over all
            calibration tokens. None gives relative importance alone (no data).
        alpha: exponent of the activation term (the paper's `a`, 0.5 by default).

    Returns:
        float32 scores of the weight's shape. Zero rows/columns score 0.
    """
    w, fmt = weight_array(weight)
    act = None if act_norm is None else float32_array(act_norm, "act_norm", 1)
    return _core.ria_score(w, fmt, act, float(alpha))


def wanda_score(weight: ArrayLike, act_norm: ArrayLike) -> np.ndarray:
    """Wanda importance `|W| * act_norm` (Sun et al., 2023), float32, weight's shape."""
    w, fmt = weight_array(weight)
    return _core.wanda_score(w, fmt, float32_array(act_norm, "act_norm", 1))


def magnitude_score(weight: ArrayLike) -> np.ndarray:
    """Magnitude importance `|W|`, float32, weight's shape."""
    w, fmt = weight_array(weight)
    return _core.magnitude_score(w, fmt)


def nm_mask(scores: ArrayLike, n: int, m: int) -> np.ndarray:
    """Keep-mask with, in every row and every group of `m` consecutive columns, the `n`
    highest scores True (2:4 keeps 2 of 4). Ties keep the lower column index.

    Raises ValueError unless `1 <= n < m` and `m` divides the number of columns.
    """
    return _core.nm_mask(float32_array(scores, "scores", 2), int(n), int(m))


def unstructured_mask(scores: ArrayLike, sparsity: float, per_row: bool = False) -> np.ndarray:
    """Keep-mask that prunes exactly `round(sparsity * count)` weights: of the whole
    matrix (RIA's rule), or of every row when `per_row` (Wanda's rule).

    The lowest scores go first; among equal scores the higher index goes first, so the
    count is exact and the result deterministic.
    """
    s = float32_array(scores, "scores", 2)
    if not (isinstance(sparsity, (int, float)) and math.isfinite(sparsity) and 0 <= sparsity <= 1):
        raise ValueError(f"sparsity must be a number in [0, 1], got {sparsity!r}")
    count = s.shape[1] if per_row else s.size
    return _core.unstructured_mask(s, round(sparsity * count), bool(per_row))


def _perm_array(perm: ArrayLike) -> np.ndarray:
    p = np.asarray(perm.cpu() if hasattr(perm, "cpu") else perm)
    if p.ndim != 1 or p.dtype.kind not in "iu":
        raise ValueError(f"perm must be a 1-D integer array, got {p.dtype} of shape {p.shape}")
    return np.ascontiguousarray(p, dtype=np.int64)


def retained_score(
    scores: ArrayLike | list[ArrayLike], n: int, m: int, perm: ArrayLike | None = None
) -> float:
    """Sum of the scores an N:M mask keeps after reordering columns by `perm`
    (`scores[:, perm]`). A list of matrices sharing their columns counts as their sum.
    """
    mats = score_list(scores)
    return _core.retained_score(mats, int(n), int(m), None if perm is None else _perm_array(perm))


@dataclass(frozen=True)
class PermutationResult:
    """A column permutation for N:M sparsity and how good it is.

    `perm` is the new column order (`scores[:, perm]`). `efficacy` is the share of the
    gap between the identity and the per-row unstructured upper bound that it closes
    (NVIDIA apex's measure); 1.0 when there is no gap.
    """

    perm: np.ndarray
    retained: float
    identity_retained: float
    upper_bound: float
    efficacy: float
    heuristic_retained: float
    lsa_steps: int
    tabu_steps: int
    exact: bool
    seconds: float

    def __str__(self) -> str:
        return (
            f"PermutationResult(efficacy={100 * self.efficacy:.2f}%, retained={self.retained:.6g}, "
            f"identity={self.identity_retained:.6g}, upper_bound={self.upper_bound:.6g}, "
            f"columns={self.perm.size}, {self.seconds:.2f}s)"
        )


def search_permutation(
    scores: ArrayLike | list[ArrayLike],
    n: int,
    m: int,
    *,
    seed: int = 0,
    time_budget: float | None = None,
    threads: int | None = None,
    patience: int | None = None,
    max_steps: int | None = None,
    block_groups: int | None = None,
    global_steps: int | None = None,
    tabu_steps: int | None = None,
    chains: int | None = None,
) -> PermutationResult:
    """Find a column permutation that maximises the score kept by an N:M mask.

    RIA's heuristic allocation, then slot-LSA (exact linear assignment) on random blocks
    of groups with randomised slots until it stops gaining, a few slot-LSA steps over all
    groups at once, and, for matrices small enough to afford it, tabu search over swaps
    and exhaustive pair repartitions. Never worse than the identity.

    Args:
        scores: `(rows, cols)` non-negative importance, or a list of such matrices with
            the same `cols` (layers reading one input share one permutation; the
            objective is their sum).
        n, m: the pattern, keep `n` of every `m` (1 <= n < m, m divides cols).
        seed: the result is identical for a fixed seed on any number of threads.
        time_budget: wall-clock cap in seconds (the result then depends on speed).
        threads: worker threads (default: all cores).
        patience: block-phase steps in a row without progress that end it (default 8).
        max_steps: cap on block-phase steps (400).
        block_groups: groups per assignment in the block phase (default: all groups when
            one assignment over all is cheap, else as few as keep a step cheap, >= 64).
        global_steps: cap on steps over all groups at once, after the blocks (8).
        tabu_steps: tabu steps per chain (default: sized from the matrix, 0 for large).
        chains: independent tabu chains (8).
    """
    mats = score_list(scores)
    raw = _core.search_permutation(
        mats,
        int(n),
        int(m),
        seed=int(seed),
        time_budget=time_budget,
        threads=threads,
        patience=patience,
        max_steps=max_steps,
        block_groups=block_groups,
        global_steps=global_steps,
        tabu_steps=tabu_steps,
        chains=chains,
    )
    return PermutationResult(**raw)
