"""Running decoder blocks on calibration data: the inputs every block is called with,
input statistics of every prunable matrix (each expert's from the tokens routed to it,
pruning/experts.py), and each block's outputs (which feed the next block).

Works with any Hugging Face decoder: the blocks' inputs are caught with every keyword
argument the model passes (attention masks, position ids, `position_embeddings`, cache
positions...), whatever its version, and *per block*: hybrid models (Gemma 2/3, Cohere 2,
Qwen2 with sliding layers) give sliding-window and full-attention layers different masks
and rotary embeddings, computed by the model's own forward, never by ria.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .._torch import module_device, move
from ..arch import fused_experts, linear_at
from ..errors import UnsupportedModelError
from .experts import observing_experts
from .matrices import PrunableMatrix
from .spill import SpilledStates

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = [
    "BlockInputs",
    "CalibrationInputs",
    "InputStats",
    "capture_block_inputs",
    "collecting_stats",
    "run_block",
]

# The hidden states of every calibration batch: in memory, or in files (`SpilledStates`).
HiddenStates = list[torch.Tensor] | SpilledStates

# Keyword arguments that would make a block read or write a KV cache: blocks run statelessly.
_CACHE_KEYS = ("past_key_value", "past_key_values", "cache")


class _Caught(Exception):
    """Raised by a recorder to stop the model's forward once it has what it needs."""


@dataclass
class BlockInputs:
    """What one block is called with: the hidden states `(batch, seqlen, hidden)` of every
    calibration batch, and the keyword arguments the model passes this block, by batch
    size (masks and position embeddings carry the batch dimension)."""

    hidden: HiddenStates
    kwargs: dict[int, dict[str, Any]]

    def kwargs_for(self, states: torch.Tensor) -> dict[str, Any]:
        """The keyword arguments for one batch of hidden states."""
        return self.kwargs[states.shape[0]]


@dataclass
class CalibrationInputs:
    """The hidden states entering the current block, and every block's own keyword
    arguments (`kwargs[i]` for block i, by batch size)."""

    hidden: HiddenStates
    kwargs: list[dict[int, dict[str, Any]]]

    def at(self, i: int) -> BlockInputs:
        """Block i's inputs (the hidden states are those last set by `advanced`)."""
        return BlockInputs(self.hidden, self.kwargs[i])

    def empty(self) -> HiddenStates:
        """An empty store of the same kind as `hidden`, for a block's outputs."""
        return self.hidden.fresh() if isinstance(self.hidden, SpilledStates) else []

    def advanced(self, hidden: HiddenStates) -> CalibrationInputs:
        """The same, with the hidden states a block produced (the next block's input);
        spilled inputs are deleted."""
        if isinstance(self.hidden, SpilledStates):
            self.hidden.discard()
        return replace(self, hidden=hidden)


@torch.no_grad()
def capture_block_inputs(
    model: PreTrainedModel,
    blocks: nn.ModuleList,
    windows: torch.Tensor,
    batch_size: int,
    spill: Path | None = None,
) -> CalibrationInputs:
    """Runs the model on `windows` (`(n, seqlen)` token ids) with every block replaced by a
    recorder: block 0 records the hidden states of each batch, and, for the first batch
    of each size, every block records the keyword arguments the model gives it. No block
    computes anything here; the forward stops at the last recorder it needs. With `spill`,
    hidden states are kept in files in that directory (`SpilledStates`), not in memory."""
    hidden: HiddenStates = [] if spill is None else SpilledStates(spill)
    per_block: list[dict[int, dict[str, Any]]] = [{} for _ in blocks]
    last = len(blocks) - 1
    # The batch size of the forward in flight, as block 0 saw it: later recorders get
    # whatever the model makes of block 0's return value, so their own input says nothing.
    size = 0

    def recorder(i: int) -> Callable[..., torch.Tensor]:
        def record(*args: Any, **kw: Any) -> torch.Tensor:
            nonlocal size
            states: torch.Tensor = args[0] if args else kw.pop("hidden_states")
            if len(args) > 1:
                raise UnsupportedModelError(
                    "decoder blocks called with extra positional arguments; ria replays "
                    "keyword arguments only"
                )
            if i == 0:
                size = states.shape[0]
                hidden.append(states.detach())
            if size not in per_block[i]:
                kw = {k: v for k, v in kw.items() if k not in _CACHE_KEYS}
                kw["use_cache"] = False
                per_block[i][size] = kw
            if i == last or size in per_block[last]:
                raise _Caught
            return states

        return record

    device = module_device(model.get_input_embeddings())
    with _forwards_replaced(blocks, recorder):
        for start in range(0, windows.shape[0], batch_size):
            with suppress(_Caught):
                model(windows[start : start + batch_size].to(device), use_cache=False)
    unreached = [i for i, seen in enumerate(per_block) if not seen]
    if unreached:  # else a block would be calibrated on nothing, or on another's inputs
        raise UnsupportedModelError(
            f"the model's forward on token ids never ran decoder block {unreached[0]} "
            f"(of {len(blocks)} found): ria calibrates the blocks a text forward runs"
        )
    return CalibrationInputs(hidden, per_block)


@contextmanager
def _forwards_replaced(
    blocks: nn.ModuleList, make: Callable[[int], Callable[..., torch.Tensor]]
) -> Iterator[None]:
    """Within the context, block i's `forward` is `make(i)`. The block object stays in
    place, so models that read a block's attributes (its attention type) still work;
    whatever wrapper accelerate put on `forward` is restored afterwards."""
    saved = [block.__dict__.get("forward") for block in blocks]
    try:
        for i, block in enumerate(blocks):
            block.forward = make(i)
        yield
    finally:
        for block, forward in zip(blocks, saved, strict=True):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


@torch.no_grad()
def run_block(
    block: nn.Module, inputs: BlockInputs, into: HiddenStates | None = None
) -> HiddenStates | None:
    """Runs the block on every calibration batch; appends its outputs (on the block's
    device) to `into` and returns it. Without `into` none are kept (a pass for its hooks'
    sake), so at most one batch's outputs exist at a time."""
    device = module_device(block)
    for states in inputs.hidden:
        kwargs = move(inputs.kwargs_for(states), device)
        out = block(states.to(device), **kwargs)
        if into is not None:
            into.append((out[0] if isinstance(out, tuple) else out).detach())
        del out
    return into


_HALF_DTYPES = (torch.bfloat16, torch.float16)

# torch >= 2.8 multiplies half-precision matrices into a float32 result (`out_dtype`).
_GRAM_FROM_HALF = hasattr(torch.ops.aten.mm, "dtype")


@dataclass
class InputStats:
    """Statistics of one matrix's input over the calibration tokens it sees (fp32).

    `sumsq[j]` is the sum of squares of channel j; `hessian` is `X^T X` (`(C, C)`),
    collected only for the OBS (SparseGPT) update (None otherwise); `tokens` counts the
    rows of X (for an expert, the tokens routed to it). `partials`, when a list, also
    keeps each `add`'s own sum of squares (a prune split over processes folds every
    batch's in order, pruning/distributed.py).
    """

    sumsq: torch.Tensor
    hessian: torch.Tensor | None = None
    tokens: int = 0
    partials: list[torch.Tensor] | None = None

    @classmethod
    def zeros(cls, channels: int, device: torch.device, hessian: bool) -> InputStats:
        # X^T X is summed in float64 and rounded once (`finish`): each batch's float32
        # product adds exactly (almost always), so the sum does not depend on how batches
        # are grouped, and a prune split over processes gets the same bits.
        h = torch.zeros(channels, channels, device=device, dtype=torch.float64) if hessian else None
        return cls(torch.zeros(channels, device=device), h)

    @property
    def act_norm(self) -> torch.Tensor:
        """L2 norm of every input channel over all calibration tokens, `(C,)`."""
        return self.sumsq.sqrt()

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        wide = x.float()
        self.tokens += x.shape[0]
        sumsq = (wide * wide).sum(dim=0)
        self.sumsq += sumsq
        if self.partials is not None:
            self.partials.append(sumsq)
        if self.hessian is None:
            return
        if x.is_cuda and x.dtype in _HALF_DTYPES and _GRAM_FROM_HALF:
            # The product of two 16-bit floats is exact in float32, so a half-precision
            # GEMM accumulating in float32 sums the same products as the float32 one, on
            # tensor cores (a 7B block's X^T X: 1.5 s in float32). A separate product and
            # add: addmm's out_dtype form refuses a float32 accumulator in some torch
            # versions ("self and mat2 must have the same dtype").
            self.hessian.add_(torch.mm(x.T, x, out_dtype=torch.float32))
        else:
            self.hessian.add_(wide.T @ wide)

    def finish(self) -> None:
        """Rounds the float64 sum of `hessian` to float32, once all batches are in."""
        if self.hessian is not None and self.hessian.dtype != torch.float32:
            self.hessian = self.hessian.float()

    def reordered(self, order: torch.Tensor) -> InputStats:
        """The same statistics with input channels in `order` (new -> old)."""
        idx = order.to(self.sumsq.device)
        h = self.hessian
        return InputStats(
            self.sumsq.index_select(0, idx),
            None if h is None else h.index_select(0, idx).index_select(1, idx),
            self.tokens,
        )


@contextmanager
def collecting_stats(
    block: nn.Module,
    matrices: Mapping[str, PrunableMatrix],
    groups: list[tuple[str, ...]],
    hessian: bool,
) -> Iterator[dict[str, InputStats]]:
    """Within the context, forward passes of `block` accumulate input statistics for every
    matrix named in `groups`; Linears of one group read the same tensor and share one
    `InputStats` (collected once); each expert's matrices get their own, from its tokens.
    With `hessian`, `X^T X` stays a float64 sum until `InputStats.finish()`."""
    stats: dict[str, InputStats] = {}
    by_expert: dict[tuple[int, int], InputStats] = {}
    with ExitStack() as stack:
        for group in groups:
            first = matrices[group[0]]
            shared = InputStats.zeros(first.shape[1], first.param.device, hessian)
            for name in group:
                stats[name] = shared
            if first.expert is None:
                handle = linear_at(block, group[0]).register_forward_hook(_adder(shared))
                stack.callback(handle.remove)
            else:
                by_expert[(id(first.param), first.expert)] = shared
        for name, experts in fused_experts(block).items():
            stack.enter_context(observing_experts(name, experts, by_expert))
        yield stats


def _adder(stats: InputStats) -> Callable[..., None]:
    def hook(_module: nn.Module, args: tuple[Any, ...], _output: Any) -> None:
        stats.add(args[0].detach())

    return hook
