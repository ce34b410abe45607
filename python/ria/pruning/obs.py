"""OBS reconstruction (SparseGPT, Frantar & Alistarh 2023): prune column by column and
update the remaining weights to compensate, using the inverse Hessian of the layer's
input, `H = X^T X` over the calibration tokens.

Two uses: `method="sparsegpt"` chooses the mask as it goes (SparseGPT's adaptive rule,
per block of columns, or per group for N:M); `reconstruct=True` keeps a mask chosen by
another method (RIA) and only applies the update. Mask selection goes through the Rust
core, so counts are exact and ties deterministic, as everywhere else.

With a `refine` callback (`refine=True` together with `reconstruct`), each block's mask
is refined on the block's already-updated weights against the error that remains after
the update, just before the block is pruned (see `block_gram`): the mask is chosen for
the weights the update has produced, not for the original ones.

The column-by-column update only approximates the best weights for the final mask: a
weight pruned early is compensated by the columns after it alone, and kept weights
before it never move again. `refit_iters` finishes the job: conjugate gradient on the
least-squares problem each row poses under the final mask (`least_squares_refit`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..core import nm_mask, unstructured_mask
from ..errors import InvalidArgumentError

__all__ = ["BlockRefiner", "block_gram", "least_squares_refit", "obs_prune"]

# `refine(weight, gram, keep) -> keep`: a keep-mask of `weight` (`(rows, b)` float32,
# numpy bool `keep` of that shape) improved against the error `sum_rows d^T gram d` of its
# pruned part `d = weight * ~keep`, with every row's (and every N:M group's) kept count
# unchanged; `gram` is `(b, b)`. `_BlockStep.refine_rows` (Rust core or GPU) is one.
BlockRefiner = Callable[[torch.Tensor, torch.Tensor, np.ndarray], np.ndarray]


@torch.no_grad()
def obs_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    keep: torch.Tensor | None = None,
    sparsity: float = 0.0,
    n: int = 0,
    m: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    refine: BlockRefiner | None = None,
    refit_iters: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prunes `weight` (`(rows, cols)`) with the OBS update; returns (new weight in the
    input's dtype, keep-mask).

    Args:
        hessian: `X^T X`, `(cols, cols)`, any positive scale (the update is invariant).
        keep: a fixed keep-mask to reconstruct under; None selects one as SparseGPT does:
            with `n, m` set, `n` of every `m` columns per row by `w^2 / [H^-1]_jj^2`, else
            `round(sparsity * rows * blocksize)` weights of every block of columns.
        percdamp: damping added to the diagonal, as a fraction of its mean.
        refine: improves each block's mask (`keep`'s columns of the block, or SparseGPT's
            choice for the whole block at once) on the block's updated weights against
            `block_gram`, before the block is pruned; None keeps the masks as they are.
            The patterns stay exact: the refiner keeps every group's kept count.
        refit_iters: after the update, this many conjugate-gradient steps towards the
            least-squares weights under the final mask (`least_squares_refit`); 0 returns
            SparseGPT's update as published.
    """
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise InvalidArgumentError(
            f"hessian has shape {tuple(hessian.shape)}, expected ({cols}, {cols})"
        )
    if keep is not None and keep.shape != weight.shape:
        raise InvalidArgumentError(
            f"keep-mask has shape {tuple(keep.shape)}, weight has {tuple(weight.shape)}"
        )
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    target = w.clone() if refit_iters else w  # the refit fits these outputs
    h.diagonal().add_(percdamp * torch.mean(torch.diag(h)))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    mask = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)  # True = kept
    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        w1 = w[:, b0:b1].clone()
        err = torch.zeros_like(w1)
        hinv1 = hinv[b0:b1, b0:b1]
        d = torch.diag(hinv1)
        # SparseGPT re-selects N:M per group as the update reaches it; a refined block
        # needs its whole mask first, so it is selected for the block at once.
        per_group = keep is None and m > 0 and refine is None
        if keep is not None:
            keep1 = keep[:, b0:b1].to(w.device)
        elif m == 0:
            keep1 = _keep(unstructured_mask(((w1 / d) ** 2).cpu(), sparsity), w.device)
        elif per_group:
            keep1 = torch.ones_like(w1, dtype=torch.bool)
        else:
            keep1 = _keep(nm_mask(((w1 / d) ** 2).cpu(), n, m), w.device)
        if refine is not None:
            keep1 = _keep(refine(w1, block_gram(hinv1), keep1.cpu().numpy()), w.device)
        for i in range(b1 - b0):
            if per_group and i % m == 0:
                group = (w1[:, i : i + m] / d[i : i + m]) ** 2
                keep1[:, i : i + m] = _keep(nm_mask(group.cpu(), n, m), w.device)
            col = w1[:, i]
            q = col * keep1[:, i]
            e = (col - q) / d[i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err[:, i] = e
        w[:, b0:b1] = w1
        mask[:, b0:b1] = keep1
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
    if refit_iters:
        w = least_squares_refit(target, w, mask, h, iters=refit_iters)
    return w.to(weight.dtype), mask


@torch.no_grad()
def least_squares_refit(
    original: torch.Tensor,
    pruned: torch.Tensor,
    keep: torch.Tensor,
    hessian: torch.Tensor,
    *,
    iters: int = 20,
) -> torch.Tensor:
    """The kept weights moved towards the least-squares fit of the original layer's
    outputs on the calibration data, the mask unchanged; float32, `original`'s shape.

    Each row `w` (with kept set `K`) poses `min ||X (w - w')||^2` over `w'` zero outside
    `K`, i.e. `H_KK w'_K = (H w)_K`: a different system per row, solved for all rows at
    once by conjugate gradient with the masked product `(P H) * keep` (one GEMM a step),
    starting from `pruned` (the OBS update, already close). CG lowers the objective at
    every step, so the result is never worse than `pruned` on it.

    Args:
        original: `(rows, cols)`, the weights before pruning.
        pruned: `(rows, cols)`, the starting point (zero outside `keep` or not: it is
            masked first).
        keep: `(rows, cols)` bool, True = kept.
        hessian: `X^T X`, `(cols, cols)`, as used for the update (damped, dead inputs
            given a unit diagonal); any positive scale.
        iters: conjugate-gradient steps (each: one `(rows, cols) x (cols, cols)` GEMM).
    """
    h = hessian.detach().float()
    k = keep.to(h.device, torch.float32)
    w0 = original.detach().float().to(h.device)
    x = pruned.detach().float().to(h.device) * k
    b = (w0 @ h) * k
    r = b - (x @ h) * k  # the residual of every row's system, zero outside its mask
    p = r.clone()
    rr = (r * r).sum(1, keepdim=True)
    for _ in range(iters):
        ap = (p @ h) * k
        step = rr / (p * ap).sum(1, keepdim=True).clamp_min(1e-30)  # 0 for converged rows
        x += step * p
        r -= step * ap
        rr_new = (r * r).sum(1, keepdim=True)
        p = r + (rr_new / rr.clamp_min(1e-30)) * p
        rr = rr_new
    return x


def block_gram(hinv_block: torch.Tensor) -> torch.Tensor:
    """The Gram matrix `G` (`(b, b)`) of the error that pruning part of one block leaves
    once the columns after the block have compensated for it.

    With `U` the upper Cholesky factor of `H^-1` (what `obs_prune` holds), the rows of `U`
    from the block's first column on factor the inverse of `H` over the columns not yet
    pruned (SparseGPT's identity); changing the block's weights by exactly `-d` and the
    later weights optimally leaves the output error `d^T ((H_rest^-1)_BB)^-1 d`, and
    `(H_rest^-1)_BB = U_BB^T U_BB`. So `G = (U_BB^T U_BB)^-1`, from the block's own
    `(b, b)` corner `hinv_block = U_BB` alone. It bounds the update's error from above:
    the update also lets the block's kept columns to the right of a pruned one compensate.
    """
    g = torch.cholesky_inverse(hinv_block, upper=True)
    return (g + g.T) / 2  # exactly symmetric, as the refiner requires


def _keep(mask: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(mask).to(device)
