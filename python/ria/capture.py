"""Running decoder blocks on calibration data: the first block's inputs, per-Linear
input statistics, and each block's outputs (which feed the next block).

Works with any Hugging Face decoder: the first block's inputs are caught by a pre-hook
with every positional and keyword argument the model passes (attention masks, position
ids, `position_embeddings`, cache positions...), whatever its version.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class _Caught(Exception):
    """Raised by the pre-hook to stop the forward pass at the first block."""


@dataclass
class BlockInputs:
    """Hidden states entering a block, one tensor `(batch, seqlen, hidden)` per calibration
    batch, and the keyword arguments the model passes to every block."""

    hidden: list[torch.Tensor]
    kwargs: dict[str, Any]


def move(obj: Any, device: torch.device) -> Any:
    """`obj` with every tensor inside (tuples, lists, dicts) on `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(move(o, device) for o in obj)
    if isinstance(obj, list):
        return [move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: move(v, device) for k, v in obj.items()}
    return obj


def module_device(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def capture_first_block_inputs(
    model: nn.Module, first_block: nn.Module, windows: torch.Tensor, batch_size: int
) -> BlockInputs:
    """Runs the model on `windows` (`(n, seqlen)` token ids) up to the first block."""
    hidden: list[torch.Tensor] = []
    kwargs: dict[str, Any] = {}

    def catch(_module: nn.Module, args: tuple, kw: dict) -> None:
        states = args[0] if args else kw["hidden_states"]
        hidden.append(states.detach())
        if not kwargs:
            kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
            if len(args) > 1:
                raise TypeError("decoder blocks called with extra positional arguments")
        raise _Caught

    device = module_device(model.get_input_embeddings())
    handle = first_block.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for start in range(0, windows.shape[0], batch_size):
            with suppress(_Caught):
                model(windows[start : start + batch_size].to(device), use_cache=False)
    finally:
        handle.remove()
    # Nothing in the block's inputs may refer to a cache: blocks run statelessly.
    for key in ("past_key_value", "past_key_values"):
        kwargs.pop(key, None)
    kwargs["use_cache"] = False
    return BlockInputs(hidden, kwargs)


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    """The block's outputs for every calibration batch (on the block's device)."""
    device = module_device(block)
    kwargs = move(inputs.kwargs, device)
    outputs = []
    for states in inputs.hidden:
        out = block(states.to(device), **kwargs)
        outputs.append((out[0] if isinstance(out, tuple) else out).detach())
    return outputs


@dataclass
class InputStats:
    """Statistics of one Linear input over all calibration tokens (fp32).

    `sumsq[j]` is the sum of squares of channel j; `hessian` is `X^T X` (`(C, C)`),
    collected only for the OBS (SparseGPT) update (None otherwise).
    """

    sumsq: torch.Tensor
    hessian: torch.Tensor | None = None

    @property
    def act_norm(self) -> torch.Tensor:
        """L2 norm of every input channel over all calibration tokens, `(C,)`."""
        return self.sumsq.sqrt()

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.sumsq += (x * x).sum(dim=0)
        if self.hessian is not None:
            self.hessian.addmm_(x.T, x)

    def reordered(self, order: torch.Tensor) -> InputStats:
        """The same statistics with input channels in `order` (new -> old)."""
        idx = order.to(self.sumsq.device)
        h = self.hessian
        return InputStats(
            self.sumsq.index_select(0, idx),
            None if h is None else h.index_select(0, idx).index_select(1, idx),
        )


@contextmanager
def collecting_stats(
    block: nn.Module, groups: list[tuple[str, ...]], hessian: bool
) -> Iterator[dict[str, InputStats]]:
    """Within the context, forward passes of `block` accumulate input statistics for every
    Linear named in `groups`; Linears of one group read the same tensor and share one
    `InputStats` (collected once)."""
    stats: dict[str, InputStats] = {}
    handles = []
    for group in groups:
        first = block.get_submodule(group[0])
        c, device = first.in_features, module_device(first)
        shared = InputStats(
            torch.zeros(c, device=device), torch.zeros(c, c, device=device) if hessian else None
        )
        for name in group:
            stats[name] = shared
        handles.append(first.register_forward_hook(_adder(shared)))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def _adder(stats: InputStats) -> Callable:
    def hook(_module: nn.Module, args: tuple, _output: Any) -> None:
        stats.add(args[0].detach())

    return hook
