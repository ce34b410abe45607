"""OBS reconstruction (SparseGPT, Frantar & Alistarh 2023): prune column by column and
update the remaining weights to compensate, using the inverse Hessian of the layer's
input, `H = X^T X` over the calibration tokens.

Two uses: `method="sparsegpt"` chooses the mask as it goes (SparseGPT's adaptive rule,
per block of columns, or per group for N:M); `reconstruct=True` keeps a mask chosen by
another method (RIA) and only applies the update. Mask selection goes through the Rust
core, so counts are exact and ties deterministic, as everywhere else.
"""

from __future__ import annotations

import numpy as np
import torch

from ..core import nm_mask, unstructured_mask
from ..errors import InvalidArgumentError


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prunes `weight` (`(rows, cols)`) with the OBS update; returns (new weight in the
    input's dtype, keep-mask).

    Args:
        hessian: `X^T X`, `(cols, cols)`, any positive scale (the update is invariant).
        keep: a fixed keep-mask to reconstruct under; None selects one as SparseGPT does:
            with `n, m` set, `n` of every `m` columns per row by `w^2 / [H^-1]_jj^2`, else
            `round(sparsity * rows * blocksize)` weights of every block of columns.
        percdamp: damping added to the diagonal, as a fraction of its mean.
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
    h.diagonal().add_(percdamp * torch.mean(torch.diag(h)))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    mask = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)  # True = kept
    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        w1 = w[:, b0:b1].clone()
        err = torch.zeros_like(w1)
        hinv1 = hinv[b0:b1, b0:b1]
        d = torch.diag(hinv1)
        if keep is not None:
            keep1 = keep[:, b0:b1].to(w.device)
        elif m == 0:
            keep1 = _keep(unstructured_mask(((w1 / d) ** 2).cpu(), sparsity), w.device)
        else:
            keep1 = torch.ones_like(w1, dtype=torch.bool)
        for i in range(b1 - b0):
            if keep is None and m and i % m == 0:
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
    return w.to(weight.dtype), mask


def _keep(mask: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(mask).to(device)
