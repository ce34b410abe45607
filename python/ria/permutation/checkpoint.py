"""Permuted models as plain Hugging Face checkpoints: `plain_state_dict` takes the
`ChannelGather`s and `GatheredLinear`s out (the Linears reading a gathered norm, and each
gathered Linear, get their original column order back, so the checkpoint computes the same
function without them) and returns the orders, which `ria.save_pruned` stores beside the
weights; `restore_orders` puts them back after a plain load, so pruned weights are N:M in
storage order again. An order's key is the path of the module that carries it: a norm
(folded mode) or a Linear (free mode).
"""

from __future__ import annotations

import torch
from torch import nn

from ..arch import block_spec, linear_at
from ..errors import InvalidArgumentError, UnsupportedModelError
from .apply import ChannelGather, GatheredLinear, Swaps, gathered, reordered, swap_in

__all__ = ["plain_state_dict", "restore_orders"]


def plain_state_dict(
    model: nn.Module, within: str = ""
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The model's state dict as a plain checkpoint of the same architecture, and the
    gather orders that were taken out of it (`"<norm path>": order`).

    For each `ChannelGather`, the Linears that read the norm get their original column
    order back, so the checkpoint computes the same function without the gather.
    `within` (a submodule's path, e.g. one decoder block) limits both to that submodule,
    keyed as in the whole model's state dict (the streaming prune writes block by block).
    """
    root = model.get_submodule(within)
    state = root.state_dict(prefix=f"{within}." if within else "")
    orders: dict[str, torch.Tensor] = {}
    for path, module in root.named_modules(prefix=within):
        if isinstance(module, GatheredLinear):
            orders[path] = module.input_order.detach().cpu()
            key = f"{path}.weight"
            inverse = torch.argsort(module.input_order)
            state[key] = state[key].index_select(1, inverse.to(state[key].device))
            continue
        if not isinstance(module, ChannelGather):
            continue
        orders[path] = module.order.detach().cpu()
        for key in [k for k in state if k.startswith(f"{path}.norm.")]:
            state[f"{path}." + key[len(f"{path}.norm.") :]] = state.pop(key)
        inverse = torch.argsort(module.order)
        block_path, _, norm_name = path.rpartition(".")
        for name in _readers(model, norm_name):
            key = f"{block_path}.{name}.weight"
            state[key] = state[key].index_select(1, inverse.to(state[key].device))
    return state, orders


def _readers(model: nn.Module, norm_name: str) -> tuple[str, ...]:
    """The Linears (names within a block) fed by the block's norm `norm_name`."""
    spec = block_spec(model)
    if spec is None:
        raise UnsupportedModelError("the model has gathered norms but no architecture adapter")
    if norm_name == spec.attn_norm:
        return spec.attn_inputs
    if norm_name == spec.mlp_norm:
        return spec.mlp_inputs
    raise InvalidArgumentError(f"{norm_name} is not a norm that channel permutation gathers")


def restore_orders(model: nn.Module, orders: dict[str, torch.Tensor]) -> None:
    """Re-applies gather orders saved by `plain_state_dict` to a plainly loaded model.

    Every order is checked and every new tensor computed first (each order must be a
    permutation of the input features of each Linear it reorders, on a norm that is not
    gathered yet); on any error or Ctrl-C nothing is changed.
    """
    swaps: Swaps = []
    gathers: dict[str, nn.Module] = {}
    for path, order in orders.items():
        try:
            target = model.get_submodule(path)
        except AttributeError:
            raise InvalidArgumentError(f"order {path!r}: the model has no module {path}") from None
        if isinstance(target, GatheredLinear):
            raise InvalidArgumentError(f"order {path!r}: {path} is already gathered")
        if isinstance(target, nn.Linear):
            _check_order(order, target.in_features, path)
            swaps += reordered(target, None, order)
            gathers[path] = GatheredLinear(target, order)
            continue
        block_path, _, norm_name = path.rpartition(".")
        try:
            block = model.get_submodule(block_path)
            norm = block.get_submodule(norm_name)
        except AttributeError:
            raise InvalidArgumentError(f"order {path!r}: the model has no module {path}") from None
        if isinstance(norm, ChannelGather):
            raise InvalidArgumentError(f"order {path!r}: {path} is already gathered")
        for name in _readers(model, norm_name):
            linear = linear_at(block, name)
            _check_order(order, linear.in_features, path)
            swaps += reordered(linear, None, order)
        gathers[path] = gathered(block, norm_name, order)
    swap_in(model, swaps, gathers)


def _check_order(order: torch.Tensor, size: int, key: str) -> None:
    if order.dim() != 1 or order.dtype not in (torch.int64, torch.int32):
        raise InvalidArgumentError(
            f"order {key!r} must be a 1-D integer tensor, got {order.dtype} of shape "
            f"{tuple(order.shape)}"
        )
    if order.numel() != size or not torch.equal(torch.sort(order).values, torch.arange(size)):
        raise InvalidArgumentError(
            f"order {key!r} is not a permutation of the {size} input features it reorders"
        )
