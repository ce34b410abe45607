"""The Rust core's public API: importance scores, masks, the permutation search and mask
refinement.

Shapes follow `nn.Linear`: a weight or score matrix is `rows x cols` =
`out_features x in_features`; N:M groups run along the columns (input channels).
Every function accepts numpy arrays or torch tensors (moved to the CPU) and returns
numpy arrays. Work runs in Rust on all cores with the GIL released.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING

import numpy as np

from . import _core
from ._arrays import (
    ArrayLike,
    bool_array,
    c_array,
    float32_array,
    is_tensor,
    score_list,
    weight_array,
)
from ._core import PermutationResult, RefineStats, SearchOptions, __version__
from .errors import InvalidArgumentError, InvalidTypeError

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ._core import _SearchOptionsKwargs

__all__ = [
    "PermutationResult",
    "RefineStats",
    "SearchOptions",
    "__version__",
    "kept_score",
    "magnitude_score",
    "nm_mask",
    "permute_in_place",
    "refine_mask",
    "retained_score",
    "ria_score",
    "search_permutation",
    "search_permutations",
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
        alpha: exponent of the activation term (the paper's `a`, 0.5 by default): a
            finite int or float (numpy scalars too), not a bool.

    Returns:
        float32 scores of the weight's shape. Zero rows/columns score 0.

    Raises:
        InvalidArgumentError when a score would overflow float32 (`act_norm ** alpha`
        too large, or infinite for a zero `act_norm` and a negative `alpha`), naming it.
    """
    w, fmt = weight_array(weight)
    act = None if act_norm is None else float32_array(act_norm, "act_norm", 1)
    return _core.ria_score(w, fmt, act, alpha)


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

    `n` and `m` are ints (Python or numpy integers; a bool or a float is refused with
    InvalidTypeError). Raises InvalidArgumentError (a ValueError) unless `1 <= n < m`
    and `m` divides the number of columns.
    """
    return _core.nm_mask(float32_array(scores, "scores", 2), n, m)


def unstructured_mask(scores: ArrayLike, sparsity: float, per_row: bool = False) -> np.ndarray:
    """Keep-mask that prunes exactly `round(sparsity * count)` weights: of the whole
    matrix (RIA's rule), or of every row when `per_row` (Wanda's rule).

    The lowest scores go first; among equal scores the higher index goes first, so the
    count is exact and the result deterministic.
    """
    s = float32_array(scores, "scores", 2)
    if isinstance(sparsity, (bool, np.bool_)) or not isinstance(sparsity, numbers.Real):
        raise InvalidTypeError(
            f"sparsity must be a number in [0, 1], got {sparsity!r} of type "
            f"{type(sparsity).__name__}"
        )
    if not (math.isfinite(sparsity) and 0 <= sparsity <= 1):
        raise InvalidArgumentError(f"sparsity must be a number in [0, 1], got {sparsity!r}")
    count = s.shape[1] if per_row else s.size
    return _core.unstructured_mask(s, round(float(sparsity) * count), per_row)


def _perm_array(perm: ArrayLike, name: str = "perm") -> np.ndarray:
    p = np.asarray(perm.cpu() if hasattr(perm, "cpu") else perm)
    if p.ndim != 1 or p.dtype.kind not in "iu":
        raise InvalidArgumentError(
            f"{name} must be a 1-D integer array, got {p.dtype} of shape {p.shape}"
        )
    return c_array(p, np.int64)


def kept_score(scores: ArrayLike, keep: ArrayLike) -> float:
    """Sum of the `scores` (`(out, in)`) a keep-mask (`(out, in)` bool, True = kept)
    keeps, in float64: rows summed in parallel in the core, then in row order, so the
    result does not depend on the thread count."""
    s = float32_array(scores, "scores", 2)
    return _core.kept_score(s, bool_array(keep, "keep", s.shape, "the scores'"))


def permute_in_place(
    scores: np.ndarray, rows: ArrayLike | None = None, cols: ArrayLike | None = None
) -> None:
    """Reorders a C-contiguous float32 `(out, in)` matrix in place, `scores[:] =
    scores[rows][:, cols]` (`None`: that axis unchanged), in the core: no matrix-sized
    copy (a new one's fresh memory pages cost more than the gather), rows in parallel."""
    if not isinstance(scores, np.ndarray):
        raise InvalidTypeError(f"scores must be a numpy array, got {type(scores).__name__}")
    if scores.dtype != np.float32:  # permuted in place, so never converted
        raise InvalidTypeError(
            f"scores must be a float32 array (in native byte order), got {scores.dtype}"
        )
    if not scores.flags.writeable:
        raise InvalidArgumentError("scores is read-only; permute_in_place writes into it")
    _core.permute_in_place(
        scores,
        None if rows is None else _perm_array(rows, "rows"),
        None if cols is None else _perm_array(cols, "cols"),
    )


def retained_score(
    scores: ArrayLike | list[ArrayLike], n: int, m: int, perm: ArrayLike | None = None
) -> float:
    """Sum of the scores an N:M mask keeps after reordering columns by `perm`
    (`scores[:, perm]`). A list of matrices sharing their columns counts as their sum.
    """
    mats = score_list(scores)
    return _core.retained_score(mats, n, m, None if perm is None else _perm_array(perm))


def search_permutation(
    scores: ArrayLike | list[ArrayLike],
    n: int,
    m: int,
    options: SearchOptions | None = None,
    **kwargs: Unpack[_SearchOptionsKwargs],
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
        options: the search's settings, a `SearchOptions` (see it for every option, its
            unit and default); None gives the defaults.
        **kwargs: the same settings as keywords (`seed=1, time_budget=5.0`), a shorthand
            for `options=SearchOptions(**kwargs)`; not together with `options`.

    Raises:
        InvalidArgumentError (a ValueError) for a bad input or option value, naming it,
        including scores too large for the search's float32 sums and options whose
        scratch memory would exceed 1 GiB; InvalidTypeError (a TypeError) for an argument
        or option of the wrong type (`n`, `m`: ints, never bools or floats);
        KeyboardInterrupt on Ctrl-C, within a fraction of a second (the search stops).
    """
    if kwargs:
        if options is not None:
            raise InvalidArgumentError(
                "pass the search options either as `options` or as keywords, not both "
                f"(got options and {', '.join(sorted(kwargs))})"
            )
        options = SearchOptions(**kwargs)
    return _core.search_permutation(score_list(scores), n, m, options)


def search_permutations(
    problems: list[list[ArrayLike]],
    n: int,
    m: int,
    options: SearchOptions | None = None,
) -> list[PermutationResult]:
    """`search_permutation` on several independent problems at once, one result each, in
    order; every result equals what `search_permutation(problems[k], n, m, options)`
    returns (except with `time_budget`, whose results depend on timing anyway).

    The searches share one thread pool: while one is in a sequential stretch (an
    assignment solve, a sort), the others use the idle cores, so a block's searches
    (q/k/v, gate/up, down, o_proj's heads) finish sooner together than one after another.
    Each result's `seconds` is that search's own wall-clock time. Every problem is checked
    before any search starts; errors name the problem as `problems[k]`. Holds every
    problem's transposed copy of its scores at once.

    Args:
        problems: a list of problems, each a list of `(rows, cols)` non-negative score
            matrices sharing their `cols` (as `search_permutation`'s `scores`).
        n, m, options: as for `search_permutation`, for every problem.
    """
    if not isinstance(problems, (list, tuple)) or not problems:
        raise InvalidArgumentError("problems must be a non-empty list of lists of score matrices")
    mats = []
    for k, scores in enumerate(problems):
        if not isinstance(scores, (list, tuple)) or not scores:
            raise InvalidArgumentError(f"problems[{k}] must be a non-empty list of score matrices")
        mats.append([float32_array(s, f"problems[{k}][{i}]", 2) for i, s in enumerate(scores)])
    return _core.search_permutations(mats, n, m, options)


def refine_mask(
    weight: ArrayLike,
    gram: ArrayLike,
    keep: ArrayLike,
    n: int = 0,
    m: int = 0,
    *,
    max_sweeps: int = 16,
    residual: ArrayLike | None = None,
) -> tuple[np.ndarray, RefineStats]:
    """Improve a keep-mask against the layer's output error by swapping a kept and a
    pruned weight wherever that lowers it (DSnoT, SparseSwaps).

    The objective: a row `w` of the weight, with pruned part `d = w * ~keep`, changes the
    layer's output on the calibration inputs `X` (`tokens x in`) by `X d`; its squared
    error is `||X d||^2 = d^T G d`, with `G = X^T X` (SparseGPT's Hessian). Swaps keep the
    row's kept count and, with N:M, every group's (only columns of one group swap).

    Why it is fast: with the residual `r = G d` kept up to date, a candidate swap's change
    of the error, `2 (w_j r_j - w_i r_i) + w_j^2 G_jj + w_i^2 G_ii - 2 w_i w_j G_ij`, costs
    O(1); only an accepted swap costs O(in), to update `r`. The starting residual of all
    rows is one GEMM, `(weight * ~keep) @ gram`, done here by torch (on the GPU when the
    tensors are there); the swaps run in Rust, rows in parallel.

    Args:
        weight: `(out, in)`, float32, float16 or bfloat16 (read as is, not upcast).
        gram: `X^T X`, `(in, in)`, symmetric with a non-negative diagonal; any positive
            scale (a mean over tokens is fine).
        keep: `(out, in)` bool, True = kept: an N:M mask when `n` and `m` are given,
            any mask when both are 0 (unstructured: swaps anywhere in a row).
        n, m: the N:M pattern `keep` has (ints), or 0, 0 for unstructured.
        max_sweeps: most passes over a row (an int >= 0); a row also stops when a pass
            finds no improving swap. Most of the gain comes in the first few passes.
        residual: `(weight * ~keep) @ gram`, `(out, in)`, when the caller has it; by
            default it is computed in float32 with torch on the tensors' device (numpy
            for numpy inputs).

    Returns:
        `(keep, stats)`: the refined mask (numpy bool, the weight's shape; the input is
        not changed) and a `RefineStats` (errors before and after, swaps, sweeps).

    Raises:
        InvalidArgumentError (a ValueError), naming the argument, for shapes that do not
        match, a `keep` that is not N:M, non-finite numbers, or a `gram` that is not
        symmetric or has a negative diagonal; InvalidTypeError (a TypeError) for a
        non-bool `keep` or non-int `n`, `m`, `max_sweeps`; KeyboardInterrupt on Ctrl-C
        (the call stops at the rows' next pass).
    """
    w, fmt = weight_array(weight)
    g = float32_array(gram, "gram", 2)
    k = bool_array(keep, "keep", w.shape, "the weight's")
    if g.shape != (w.shape[1], w.shape[1]):
        raise InvalidArgumentError(
            f"gram has shape {g.shape}, expected ({w.shape[1]}, {w.shape[1]}) "
            "(the weight's input columns)"
        )
    if residual is None:
        r = _residual(weight, gram, keep)
    else:
        r = float32_array(residual, "residual", 2)
    return _core.refine_mask(w, fmt, g, r, k, n, m, max_sweeps)


def _residual(weight: ArrayLike, gram: ArrayLike, keep: ArrayLike) -> np.ndarray:
    """`(weight * ~keep) @ gram` in float32: with torch on the device of the first tensor
    argument, else with numpy. Called after the shapes are checked."""
    device = next((x.device for x in (weight, gram, keep) if is_tensor(x)), None)
    if device is None:
        d = np.where(np.asarray(keep), np.float32(0), np.asarray(weight, np.float32))
        return np.ascontiguousarray(d @ np.asarray(gram, np.float32), dtype=np.float32)
    import torch

    def tensor(x: ArrayLike, dtype: torch.dtype) -> torch.Tensor:
        t: torch.Tensor = (
            x.detach()
            if is_tensor(x)
            else torch.from_numpy(np.asarray(x, np.float32 if dtype.is_floating_point else bool))
        )
        return t.to(device=device, dtype=dtype)

    pruned = tensor(weight, torch.float32).masked_fill(tensor(keep, torch.bool), 0)
    return float32_array(pruned @ tensor(gram, torch.float32), "residual", 2)
