"""A layer's output error on the calibration data, from the Gram matrix of its inputs.

For a Linear with weight `W` (out, in) and calibration inputs `X` (tokens, in), replacing
`W` by `W'` changes its outputs by `(W - W') X^T`; with `G = X^T X` (`InputStats.hessian`)
the squared error is `sum_rows d^T G d` for each row `d` of `W - W'`: one GEMM, no pass
over the tokens. Reported relative to the output energy `sum_rows w^T G w`, so it reads
the same at any calibration size and `G`'s scale does not matter.
"""

from __future__ import annotations

import torch

__all__ = ["relative_output_error"]


@torch.no_grad()
def relative_output_error(
    original: torch.Tensor, pruned: torch.Tensor, gram: torch.Tensor
) -> float:
    """`||(W - W') X^T||^2 / ||W X^T||^2` for `W = original`, `W' = pruned` (both
    `(out, in)`), `gram = X^T X` `(in, in)`; computed in float32 on `gram`'s device."""
    w = original.to(gram.device, torch.float32)
    d = w - pruned.to(gram.device, torch.float32)
    energy = float(((w @ gram) * w).sum())
    error = float(((d @ gram) * d).sum())
    return error / energy if energy > 0 else 0.0
