"""What `prune` prunes: every matrix a decoder block multiplies its activations by, seen
the same way whether it is an `nn.Linear`'s weight or one expert's slice of a fused 3-D
experts parameter, so every stage of the block loop handles both alike.

Routers (and the gates of shared experts) stay dense: a pruned router sends tokens to
other experts, which no calibration of the experts accounts for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..arch import block_linears, expert_matrices, fused_experts, is_router

__all__ = ["PrunableMatrix", "block_matrices", "is_matmul_weight"]


@dataclass(frozen=True)
class PrunableMatrix:
    """One weight matrix, `(out, in)`: a Linear's weight (`expert` None), or expert
    `expert`'s slice of a fused parameter, stored `(in, out)` when `transposed`."""

    param: torch.Tensor
    expert: int | None = None
    transposed: bool = False

    @property
    def weight(self) -> torch.Tensor:
        """The matrix as an `(out, in)` view of the parameter's data: in-place writes
        (masks, the OBS update) change the model."""
        w = self.param.data if self.expert is None else self.param.data[self.expert]
        return w.T if self.transposed else w

    @property
    def shape(self) -> tuple[int, int]:
        """`(out, in)`."""
        out, in_ = self.weight.shape
        return out, in_


def block_matrices(block: nn.Module) -> dict[str, PrunableMatrix]:
    """Every matrix `prune` prunes in a block, by name relative to the block: Linears
    (routers excepted) as `"mlp.down_proj"`, experts as `"mlp.experts.down_proj[3]"`."""
    out = {
        name: PrunableMatrix(linear.weight)
        for name, linear in block_linears(block).items()
        if not is_router(block, name)
    }
    for path, experts in fused_experts(block).items():
        for pname, (param, transposed) in expert_matrices(experts).items():
            prefix = f"{path}.{pname}" if path else pname
            for e in range(param.shape[0]):
                out[f"{prefix}[{e}]"] = PrunableMatrix(param, e, transposed)
    return out


def is_matmul_weight(name: str, param: torch.Tensor) -> bool:
    """Whether a block parameter multiplies activations: 2 or more dimensions and not a
    bias (gpt-oss's experts keep their biases as 2-D `(experts, out)` parameters)."""
    leaf = name.rpartition(".")[2]
    return param.dim() >= 2 and leaf != "bias" and not leaf.endswith("_bias")
