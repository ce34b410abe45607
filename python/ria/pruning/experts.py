"""Input statistics of each expert of a fused experts module, from the tokens the model's
own router sends to it.

transformers owns the routing; ria only watches. While a block runs on calibration data,
its experts module runs its eager forward (the class's own per-expert loop, which
transformers' `use_experts_implementation` keeps as `forward.__wrapped__`), and a torch
function mode sees it take one expert's slice of a fused parameter (`gate_up_proj[e]`)
and multiply an input by it (`F.linear(x, w)` or `x @ w`): that input is what expert `e`
receives, and it goes into that expert's statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import UnsupportedModelError

if TYPE_CHECKING:
    from .capture import InputStats

__all__ = ["observing_experts"]

# The ways an eager experts forward multiplies an input by an expert's weight; the weight
# is the second operand in each.
_MATMULS = (F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)


class _ExpertMatmuls(TorchFunctionMode):
    """Adds the input of every matmul by `param[e]` to `stats[(id(param), e)]`."""

    def __init__(self, stats: dict[tuple[int, int], InputStats]) -> None:
        super().__init__()
        self.stats = stats
        self.params = {key[0] for key in stats}
        # id of a live slice -> (the slice, kept alive so its id is not reused; its stats)
        self.slices: dict[int, tuple[torch.Tensor, InputStats]] = {}
        self.observed = 0

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        if func is torch.Tensor.__getitem__ and id(args[0]) in self.params:
            expert = _single_index(args[1])
            if expert is not None and (id(args[0]), expert) in self.stats:
                self.slices[id(out)] = (out, self.stats[(id(args[0]), expert)])
        elif func in _MATMULS and len(args) >= 2 and id(args[1]) in self.slices:
            self.slices[id(args[1])][1].add(args[0].detach())
            self.observed += 1
        return out


def _single_index(index: Any) -> int | None:
    """`index` as an expert number when it selects one expert (an int or a 0-d tensor)."""
    if isinstance(index, int):
        return index
    if isinstance(index, torch.Tensor) and index.dim() == 0 and not index.is_floating_point():
        return int(index)
    return None


@contextmanager
def observing_experts(
    name: str, experts: nn.Module, stats: dict[tuple[int, int], InputStats]
) -> Iterator[None]:
    """Within the context, forward passes of `experts` (named `name` in errors) run its
    eager per-expert loop and add each expert's routed inputs to `stats[(id(param), e)]`.

    Raises UnsupportedModelError on leaving when the module ran but no
    per-expert matmul was seen (its eager forward multiplies all experts at once).
    """
    eager = getattr(type(experts).forward, "__wrapped__", type(experts).forward)
    mode = _ExpertMatmuls(stats)
    calls = 0

    def forward(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        try:
            with mode:
                return eager(experts, *args, **kwargs)
        finally:
            mode.slices.clear()

    saved = experts.__dict__.get("forward")  # a wrapper accelerate may have installed
    experts.forward = forward
    try:
        yield
    finally:
        if saved is None:
            del experts.forward
        else:
            experts.forward = saved
    if calls and not mode.observed:
        raise UnsupportedModelError(
            f"{name} ({type(experts).__name__}): cannot see which tokens reach each expert; "
            "its eager forward does not multiply by one expert's slice at a time"
        )
