"""Applying channel permutations to modules so a model computes the same function with
its pruned weights N:M in storage order (ARCHITECTURE.md, "The permutation contract").

Two kinds of order, which a block may mix:
- gathered (`BlockPermutation.inputs`, the "free" mode): a Linear of its own input order,
  replaced by a `GatheredLinear` that reads its input through the order. Works for any
  Linear of any family; costs one gather of the input per call unless a kernel fuses it.
- folded (the "folded" mode): orders shared by the Linears that read one tensor and
  carried by the modules around them at no run-time cost. Per decoder block there are
  four:
- `attn`: q/k/v input columns. The input is the residual stream after the attention
  norm, so the norm is wrapped in `ChannelGather`, which reorders its output once.
- `o_heads`: o_proj input columns, restricted to one within-head order per key/value
  head (shared by that head's query heads). It is folded into v_proj's output rows, so
  it costs nothing at run time. Reordering whole heads would change no N:M group (groups
  never straddle heads), so it is not needed.
- `mlp`: gate/up (fc1) input columns, applied like `attn` with the MLP norm.
- `mlp_hidden`: down (fc2) input columns, folded into gate/up (fc1) output rows: free.

Plain Hugging Face checkpoints cannot hold `ChannelGather`; `ria.permutation.checkpoint`
takes the gathers out for saving and puts them back after loading.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .._interrupts import interrupts_deferred
from .._torch import replace_module
from ..arch import BlockSpec, Heads, linear_at
from ..errors import InvalidArgumentError


class GatheredLinear(nn.Linear):
    """An `nn.Linear` that reads its input through a channel order:
    `F.linear(x[..., order], W, b)`, with `W` stored in that order (so an N:M mask chosen
    in permuted order is N:M in storage order). Same parameters and state-dict keys as
    the `nn.Linear` it replaces; the order is a non-persistent buffer (checkpoints store
    the weight in original order and the order separately, see `checkpoint.py`)."""

    input_order: torch.Tensor  # a buffer, registered in __init__

    def __init__(self, linear: nn.Linear, order: torch.Tensor) -> None:
        nn.Module.__init__(self)  # adopts `linear`'s parameters instead of allocating new ones
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        self.register_buffer(
            "input_order", order.to(linear.weight.device, torch.long), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.index_select(-1, self.input_order))


class ChannelGather(nn.Module):
    """Runs `norm`, then reorders the channels of its output: `norm(x)[..., order]`."""

    order: torch.Tensor  # a buffer, registered in __init__

    def __init__(self, norm: nn.Module, order: torch.Tensor) -> None:
        super().__init__()
        self.norm = norm
        # Not persistent: the order is saved separately so checkpoints stay plain.
        self.register_buffer("order", order.long(), persistent=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        normed: torch.Tensor = self.norm(hidden_states)
        return normed.index_select(-1, self.order)


@dataclass
class BlockPermutation:
    """The input orders of one block (None: left as is). Each is a LongTensor `new -> old`:
    position p of the permuted input holds original channel `order[p]`.

    `inputs` maps a Linear's name (relative to the block) to its own gathered input order;
    the other fields are the folded orders (module doc)."""

    attn: torch.Tensor | None = None
    o_heads: torch.Tensor | None = None  # (num_kv_heads, head_dim)
    mlp: torch.Tensor | None = None
    mlp_hidden: torch.Tensor | None = None
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)


def o_proj_order(o_heads: torch.Tensor, heads: Heads) -> torch.Tensor:
    """o_proj's full input order from one within-head order per key/value head."""
    group = heads.num_heads // heads.num_kv_heads
    return torch.cat(
        [h * heads.head_dim + o_heads[h // group] for h in range(heads.num_heads)]
    ).long()


def v_proj_order(o_heads: torch.Tensor, heads: Heads) -> torch.Tensor:
    """v_proj's output-row order that produces o_proj's permuted input."""
    return torch.cat([j * heads.head_dim + o_heads[j] for j in range(heads.num_kv_heads)]).long()


@torch.no_grad()
def permute_columns(linear: nn.Linear, order: torch.Tensor) -> None:
    linear.weight.data = linear.weight.data.index_select(1, order.to(linear.weight.device))


@torch.no_grad()
def permute_rows(linear: nn.Linear, order: torch.Tensor) -> None:
    order = order.to(linear.weight.device)
    linear.weight.data = linear.weight.data.index_select(0, order)
    if linear.bias is not None:
        linear.bias.data = linear.bias.data.index_select(0, order)


Orders = tuple[torch.Tensor | None, torch.Tensor | None]
Swaps = list[tuple[torch.Tensor, torch.Tensor]]


def linear_orders(
    spec: BlockSpec | None, heads: Heads | None, perm: BlockPermutation
) -> dict[str, Orders]:
    """For each Linear the permutation touches: its (output-row order, input-column order).
    The one place that says which Linear carries which order. `spec` and `heads` may be
    None only when `perm` holds gathered orders alone."""
    orders: dict[str, list[torch.Tensor | None]] = {}

    def put(name: str, axis: int, order: torch.Tensor | None) -> None:
        if order is not None:
            orders.setdefault(name, [None, None])[axis] = order

    for name, order in perm.inputs.items():
        put(name, 1, order)
    if spec is None or heads is None:
        if any(o is not None for o in (perm.attn, perm.o_heads, perm.mlp, perm.mlp_hidden)):
            raise InvalidArgumentError("folded orders need the family's block spec")
        return {name: (rows, cols) for name, (rows, cols) in orders.items()}
    for name in spec.attn_inputs:
        put(name, 1, perm.attn)
    if perm.o_heads is not None:
        put(spec.v_proj, 0, v_proj_order(perm.o_heads, heads))
        put(spec.o_proj, 1, o_proj_order(perm.o_heads, heads))
    for name in spec.mlp_inputs:
        put(name, 1, perm.mlp)
        put(name, 0, perm.mlp_hidden)
    put(spec.mlp_output, 1, perm.mlp_hidden)
    return {name: (rows, cols) for name, (rows, cols) in orders.items()}


def is_permuted(block: nn.Module) -> bool:
    """Whether a block already carries gathered norms or Linears (it was permuted before)."""
    return any(isinstance(m, (ChannelGather, GatheredLinear)) for m in block.modules())


def gathered(block: nn.Module, name: str, order: torch.Tensor) -> ChannelGather:
    """A `ChannelGather` of the norm at `name` (relative to `block`), not yet installed."""
    norm = block.get_submodule(name)
    device = next(norm.parameters(), torch.empty(0)).device
    return ChannelGather(norm, order.to(device))


def reordered(linear: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> Swaps:
    """The new weight (and bias) of `linear` with output rows and input columns in the
    given orders (None: unchanged), as `(parameter, new data)` pairs; nothing is changed."""
    weight = linear.weight.data
    swaps: Swaps = []
    if rows is not None:
        rows = rows.to(weight.device)
        weight = weight.index_select(0, rows)
        if linear.bias is not None:
            swaps.append((linear.bias, linear.bias.data.index_select(0, rows)))
    if cols is not None:
        weight = weight.index_select(1, cols.to(weight.device))
    swaps.append((linear.weight, weight))
    return swaps


def swap_in(root: nn.Module, swaps: Swaps, gathers: dict[str, nn.Module]) -> None:
    """Installs new parameter data and gathered modules (paths relative to `root`) as one
    step: Ctrl-C is deferred until all are in place, so the model never computes a
    half-permuted function. Everything passed in must be computed beforehand."""
    with interrupts_deferred():
        for param, data in swaps:
            param.data = data
        for path, gather in gathers.items():
            replace_module(root, path, gather)


def apply_block(
    block: nn.Module, spec: BlockSpec | None, heads: Heads | None, perm: BlockPermutation
) -> None:
    """Reorders one block's weights by `perm`; its outputs are unchanged (up to rounding).

    Atomic: every new tensor is computed first and swapped in by `swap_in`, so an error or
    Ctrl-C leaves the block either untouched or fully permuted, never in between. Raises
    `InvalidArgumentError` before changing anything if the block was permuted before.
    """
    if is_permuted(block):
        raise InvalidArgumentError(
            "the block already carries channel orders (the model was pruned with "
            "permutation before); nothing was changed"
        )
    swaps: Swaps = []
    for name, (rows, cols) in linear_orders(spec, heads, perm).items():
        swaps += reordered(linear_at(block, name), rows, cols)
    gathers: dict[str, nn.Module] = {
        name: GatheredLinear(linear_at(block, name), order) for name, order in perm.inputs.items()
    }
    if spec is not None:
        for norm, order in ((spec.attn_norm, perm.attn), (spec.mlp_norm, perm.mlp)):
            if order is not None:
                gathers[norm] = gathered(block, norm, order)
    swap_in(block, swaps, gathers)
