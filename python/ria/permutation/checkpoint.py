"""Permuted models as plain Hugging Face checkpoints: `plain_state_dict` returns the state
dict of a pruned model (already plain: its orders are recorded, `settle_orders`; gathers
still in a model, as `apply_block` or `ria.sparsify` leave them, are taken out: the modules
reading a gathered tensor get their original column order back) and its orders, which
`ria.save_pruned` stores beside the weights; `restore_orders` records them again after a
plain load, changing no weight (`ria.sparsify` applies them). An order's key is the path
of the module that carries it: a norm whose output is gathered, a module whose input is
gathered, or a Linear of its own order; its `OrderInfo` says which, and which modules read
it (stored as the file's metadata).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from ..arch import input_params, matrix_dim
from ..errors import InvalidArgumentError
from .apply import (
    ChannelGather,
    GatheredLinear,
    GroupOrder,
    Installed,
    LinearOrder,
    group_order,
    input_gather,
    is_permuted,
    nm_order,
    swap_in,
)
from .wiring import Gather

__all__ = ["OrderInfo", "plain_state_dict", "restore_orders"]


@dataclass(frozen=True)
class OrderInfo:
    """How a saved order is applied: `gather` ("output" of a norm, "input" of a module,
    or a "linear"'s own input) and the modules that read the gathered tensor, named
    relative to the carrier's parent (none for "linear")."""

    gather: Gather
    readers: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps({"gather": self.gather, "readers": list(self.readers)})

    @classmethod
    def from_json(cls, key: str, text: str) -> OrderInfo:
        try:
            data = json.loads(text)
            gather, readers = data["gather"], tuple(data["readers"])
        except (ValueError, KeyError, TypeError):
            raise InvalidArgumentError(f"order {key!r}: invalid record {text!r}") from None
        if gather not in ("output", "input", "linear") or not all(
            isinstance(r, str) for r in readers
        ):
            raise InvalidArgumentError(f"order {key!r}: invalid record {text!r}")
        return cls(gather, readers)


def plain_state_dict(
    model: nn.Module, within: str = "", state: Mapping[str, torch.Tensor] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, OrderInfo]]:
    """The model's state dict as a plain checkpoint of the same architecture, the gather
    orders that were taken out of it (`"<carrier path>": order`) and how each is applied.

    `within` (a submodule's path, e.g. one decoder block) limits all three to that
    submodule, keyed as in the whole model's state dict (the streaming prune writes
    block by block). `state`: a state dict of the model made elsewhere (keyed as its own:
    a training framework's gathered copy), made plain instead of the model's own; keys
    it lacks (frozen parameters left out) are skipped.
    """
    root = model.get_submodule(within)
    if state is None:
        state = root.state_dict(prefix=f"{within}." if within else "")
    state = dict(state)  # (the caller's mapping is not changed)
    orders: dict[str, torch.Tensor] = {}
    infos: dict[str, OrderInfo] = {}
    for path, module in root.named_modules(prefix=within):
        if isinstance(module, GatheredLinear):
            orders[path], infos[path] = module.input_order.detach().cpu(), OrderInfo("linear")
            _unpermute(state, path, module, "weight", module.input_order)
            continue
        if (own := nm_order(module)) is not None:  # its weight is in original order
            orders[path], infos[path] = own.detach().cpu(), OrderInfo("linear")
            continue
        if (record := group_order(module)) is not None:  # its readers' too
            orders[path] = record.order.detach().cpu()
            infos[path] = OrderInfo(cast(Gather, record.gather), record.readers)
            continue
        info: Gather
        if isinstance(module, ChannelGather):
            order, readers, info = module.order, module.readers, "output"
            for key in [k for k in state if k.startswith(f"{path}.norm.")]:
                state[f"{path}." + key[len(f"{path}.norm.") :]] = state.pop(key)
        elif (found := input_gather(module)) is not None:
            (order, readers), info = found, "input"
        else:
            continue
        orders[path], infos[path] = order.detach().cpu(), OrderInfo(info, readers)
        parent = path.rpartition(".")[0]
        for reader in readers:
            where = f"{parent}.{reader}" if parent else reader
            target = model.get_submodule(where)
            for param in input_params(target):
                _unpermute(state, where, target, param, order)
    return state, orders, infos


def _unpermute(
    state: dict[str, torch.Tensor], path: str, module: nn.Module, param: str, order: torch.Tensor
) -> None:
    """Puts the input columns of `path.param` in `state` back in their original order."""
    key = f"{path}.{param}"
    if key not in state:
        return
    dim = matrix_dim(module, getattr(module, param), 1)
    inverse = torch.argsort(order).to(state[key].device)
    state[key] = state[key].index_select(dim, inverse)


def restore_orders(
    model: nn.Module, orders: dict[str, torch.Tensor], infos: dict[str, OrderInfo]
) -> None:
    """Records the orders saved by `plain_state_dict` on a plainly loaded model, as
    `settle_orders` leaves them after pruning: a Linear's own as its `nm_order`, a shared
    one on its carrier (`group_order`); no weight changes (`ria.sparsify` applies them).

    `infos` says how each is applied (an order without one must be on a Linear: its
    own input). Every order is checked first (a permutation of the input channels of every
    matrix it orders, on a module that carries none yet); on any error or Ctrl-C nothing is
    changed.
    """
    records: dict[str, Installed] = {}
    for path, order in orders.items():
        try:
            target = model.get_submodule(path)
        except AttributeError:
            raise InvalidArgumentError(f"order {path!r}: the model has no module {path}") from None
        info = infos.get(path)
        if info is None:
            # Files written before the records: a Linear's order can only be its own.
            if not isinstance(target, nn.Linear):
                raise InvalidArgumentError(
                    f"order {path!r}: no record of the modules it reorders (written by an "
                    "older ria); prune the model again"
                )
            info = OrderInfo("linear")
        if is_permuted(target):
            raise InvalidArgumentError(f"order {path!r}: {path} is already gathered")
        if info.gather == "linear":
            if not isinstance(target, nn.Linear):
                raise InvalidArgumentError(f"order {path!r}: {path} is not an nn.Linear")
            _check_order(order, target.in_features, path)
            records[path] = LinearOrder(order)  # the weight stays as stored
            continue
        parent = model.get_submodule(path.rpartition(".")[0])
        for reader in info.readers:
            try:
                module = parent.get_submodule(reader)
            except AttributeError:
                raise InvalidArgumentError(
                    f"order {path!r}: the model has no module {reader} beside it"
                ) from None
            for param in input_params(module):
                tensor = getattr(module, param)
                _check_order(order, tensor.shape[matrix_dim(module, tensor, 1)], path)
        records[path] = GroupOrder(order, info.readers, info.gather)
    swap_in(model, [], records)


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
