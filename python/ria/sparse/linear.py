"""`Sparse24Linear`: a 2:4-sparse `nn.Linear` that runs, per token count, the kernel that
measured fastest for its shape: dense cuBLAS, cuSPARSELt, or the compact-format decode kernel.

It keeps only the weight forms its plan uses: cuSPARSELt's compressed buffer, the compact
format (values + 2-bit indices; the values are shared with cuSPARSELt's buffer when its
layout allows, and so are its 2-bit indices: a layer using both kernels then holds no
second copy), and the dense weight only where dense won a token-count bucket.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidArgumentError
from .cslt import CsltConfig, cslt_linear
from .format import Compact24
from .triton_gemv import sparse24_linear

DENSE = "dense"
CUSPARSELT = "cusparselt"
TRITON = "triton"
BACKENDS = (DENSE, CUSPARSELT, TRITON)

__all__ = ["BACKENDS", "CUSPARSELT", "DENSE", "TRITON", "Choice", "Sparse24Linear"]


@dataclass(frozen=True)
class Choice:
    """The kernel for one token-count bucket (and its cuSPARSELt algorithm, if any)."""

    backend: str
    cslt: CsltConfig | None = None


class Sparse24Linear(nn.Module):
    """`y = x @ W.T + b` for a 2:4-sparse weight, on CUDA, fp16/bf16.

    Args:
        in_features, out_features: as `nn.Linear`.
        plan: token-count bucket upper bound -> `Choice`. An input of `M` tokens (all leading
            dimensions flattened) uses the smallest bucket `>= M`, else the largest.
        packed: cuSPARSELt's compressed weight (needed if the plan uses cuSPARSELt).
        compact: the compact 2:4 weight (needed if the plan uses the decode kernel).
        weight: the dense (masked) weight (needed if the plan uses dense).
        bias: `(out_features,)` or None.
        input_order: the channel order the weight is stored in (a free permutation, from
            a `ria.permutation.GatheredLinear`): the layer computes `x[..., order] @ W.T`.
    """

    # Buffers (registered in __init__): the weight forms the plan uses, None for the others.
    packed: torch.Tensor | None
    values: torch.Tensor | None
    meta: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    input_order: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        plan: Mapping[int, Choice],
        *,
        packed: torch.Tensor | None = None,
        compact: Compact24 | None = None,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        input_order: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if not plan:
            raise InvalidArgumentError("plan must name at least one bucket")
        self.in_features = in_features
        self.out_features = out_features
        self._buckets = sorted(plan)
        self._choices = [plan[b] for b in self._buckets]
        used = {c.backend for c in self._choices}
        need = {CUSPARSELT: packed, TRITON: compact, DENSE: weight}
        missing = [b for b in used if need.get(b, 0) is None]
        if missing or not used <= set(BACKENDS):
            raise InvalidArgumentError(f"plan uses {sorted(used)} but no weight form for {missing}")
        # Non-persistent buffers: they follow .to()/.cuda() but stay out of state_dict, so a
        # checkpoint of the sparsified model is not mistaken for a dense one.
        self.register_buffer("packed", packed if CUSPARSELT in used else None, persistent=False)
        kept = compact if TRITON in used else None
        self.register_buffer("values", None if kept is None else kept.values, persistent=False)
        self.register_buffer("meta", None if kept is None else kept.meta, persistent=False)
        self.meta_layout = "rows" if kept is None else kept.layout
        self.register_buffer("weight", weight if DENSE in used else None, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.register_buffer("input_order", input_order, persistent=False)
        self._by_m: dict[int, Choice] = {}

    @property
    def buckets(self) -> list[int]:
        """The token-count buckets of the plan, ascending."""
        return list(self._buckets)

    @property
    def plan(self) -> dict[int, Choice]:
        return dict(zip(self._buckets, self._choices, strict=True))

    def choice_for(self, m: int) -> Choice:
        """The kernel used for an input of `m` tokens."""
        choice = self._by_m.get(m)
        if choice is None:
            i = min(bisect.bisect_left(self._buckets, m), len(self._buckets) - 1)
            choice = self._by_m[m] = self._choices[i]
        return choice

    def weight_bytes(self) -> int:
        """Bytes of the weight forms held (shared storage counted once), bias excluded."""
        return storage_bytes(self.packed, self.values, self.meta, self.weight)

    def linear_2d(self, x: torch.Tensor) -> torch.Tensor:
        """`(M, K)` -> `(M, N)` with the kernel planned for `M`."""
        choice = self.choice_for(x.shape[0])
        if choice.backend == TRITON:
            return sparse24_linear(
                x,
                None,
                self.bias,
                values=self.values,
                meta=self.meta,
                in_features=self.in_features,
                layout=self.meta_layout,
            )
        if choice.backend == CUSPARSELT:
            assert self.packed is not None  # __init__ checks the plan's forms are given
            return cslt_linear(x, self.packed, self.bias, choice.cslt or CsltConfig())
        assert self.weight is not None
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        if self.input_order is not None:
            x = x.index_select(1, self.input_order)  # a gather per call; no kernel fuses it yet
        y = self.linear_2d(x.contiguous())
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        plan = ", ".join(f"<={b}:{c.backend}" for b, c in self.plan.items())
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, gathered={self.input_order is not None}, "
            f"plan=[{plan}]"
        )


def storage_bytes(*tensors: torch.Tensor | None) -> int:
    """Bytes of the distinct storages behind `tensors` (None skipped)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())
