"""Fused siblings: `nn.Linear`s that read the very same tensor (q/k/v, gate/up) run as one
GEMM over their rows concatenated, so a 2:4 model launches one kernel instead of three and
streams one larger weight (2:4 along the input is kept by stacking rows).

Siblings are found from the model, not from name tables: one short forward with hooks
records which Linears receive the same input object (`find_siblings`). `fuse_siblings`
then puts one `FusedLinear` (holding the concatenated weight: one copy, the siblings'
weights are released) at the siblings' common parent, and replaces each sibling by a
`SiblingLinear` that returns its column slice of the fused product. The model's own
forward is untouched:

the first sibling called with a tensor computes the fused product, the others read their
slice of it (matched by tensor identity and version), and the product is dropped once every
sibling has read it. The same Python runs under CUDA-graph capture and is traced by
`torch.compile` (`fullgraph=True`): the compiled graph holds one fused call per group.

`sparsify` then converts the fused `nn.Linear` like any other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._torch import replace_module
from ..errors import InvalidArgumentError
from ..permutation import nm_order

__all__ = [
    "FusedLinear",
    "SiblingLinear",
    "find_siblings",
    "fuse_model_siblings",
    "fuse_siblings",
    "sibling_problem",
]


@dataclass
class _Product:
    """The fused output for one input tensor, until every sibling has read its slice."""

    x: torch.Tensor
    version: int
    y: torch.Tensor
    pending: set[int]


def _version(x: torch.Tensor) -> int:
    if torch.compiler.is_compiling():
        return 0  # a traced graph is functional: its tensors are not modified in place
    try:
        return x._version
    except RuntimeError:  # inference tensors keep no version counter
        return -1


class FusedLinear(nn.Module):
    """The siblings' rows stacked in one layer: `linear` (an `nn.Linear`, or the
    `Sparse24Linear` that `sparsify` puts in its place) maps `(..., in_features)` to
    `(..., sum(splits))`; sibling `i` owns output columns `[offsets[i], offsets[i + 1])`.

    Args:
        linear: the fused layer.
        names: the siblings' paths in the model (for reports and errors).
        splits: each sibling's `out_features`, in `names` order.
    """

    def __init__(self, linear: nn.Module, names: Sequence[str], splits: Sequence[int]) -> None:
        super().__init__()
        if len(names) != len(splits) or len(names) < 2:
            raise InvalidArgumentError(f"a fused layer needs >= 2 siblings, got {list(names)}")
        self.linear = linear
        self.names = tuple(names)
        self.offsets = [0]
        for n in splits:
            self.offsets.append(self.offsets[-1] + n)
        self._product: _Product | None = None

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Sibling `index`'s output for `x`: a view (columns) of the fused product."""
        start, stop = self.offsets[index], self.offsets[index + 1]
        p = self._product
        if p is not None and p.x is x and p.version == _version(x) and index in p.pending:
            p.pending.discard(index)
            if not p.pending:
                self._product = None
            return p.y[..., start:stop]
        y = self.linear(x)
        pending = set(range(len(self.names))) - {index}
        self._product = _Product(x, _version(x), y, pending)
        return y[..., start:stop]  # type: ignore[no-any-return]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_product"] = None  # a copy starts without a cached activation
        return state

    def extra_repr(self) -> str:
        return "siblings=[" + ", ".join(self.names) + "]"


class SiblingLinear(nn.Module):
    """Stands in for one fused sibling: `forward(x)` is its slice of the group's product.
    The group is registered at the siblings' common parent, not here, so its weight
    appears once in the module tree."""

    def __init__(self, group: FusedLinear, index: int, in_features: int, out_features: int):
        super().__init__()
        object.__setattr__(self, "group", group)  # a reference, not a submodule
        self.index = index
        self.in_features = in_features
        self.out_features = out_features

    group: FusedLinear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.output(x, self.index)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"fused_in={self.group.names[0]}+{len(self.group.names) - 1}"
        )


def find_siblings(
    model: nn.Module, inputs: Mapping[str, Any], linears: Sequence[str] | None = None
) -> list[tuple[str, ...]]:
    """Groups (>= 2, in call order) of `nn.Linear` paths that read the same tensor object in
    one forward `model(**inputs)` (no gradients). A Linear called more than once, or not
    at all, joins no group. `linears` restricts the candidates (default: every
    `nn.Linear`)."""
    names = dict.fromkeys(
        linears
        if linears is not None
        else [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    )
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    order: list[str] = []

    def hook(name: str) -> Any:
        def record(_: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], torch.Tensor):
                seen[name].append(args[0])  # kept alive, so ids are not reused
                order.append(name)

        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    by_input: dict[int, list[str]] = {}
    for name in dict.fromkeys(order):
        if len(seen[name]) == 1:
            by_input.setdefault(id(seen[name][0]), []).append(name)
    return [tuple(g) for g in by_input.values() if len(g) >= 2]


def sibling_problem(layers: Sequence[nn.Module]) -> str | None:
    """Why `layers` cannot be fused into one (None if they can): they must be plain
    `nn.Linear`s (no input order) with one input width, dtype and device, and all or none
    with a bias."""
    for layer in layers:
        if type(layer) is not nn.Linear:
            return f"a {type(layer).__name__} is not a plain nn.Linear"
        if nm_order(layer) is not None:
            return "a layer is N:M along an input order of its own (free permutation)"
    first = layers[0]
    assert isinstance(first, nn.Linear)
    for layer in layers[1:]:
        assert isinstance(layer, nn.Linear)
        if layer.in_features != first.in_features:
            return "different input widths"
        if layer.weight.dtype != first.weight.dtype or layer.weight.device != first.weight.device:
            return "different dtypes or devices"
        if (layer.bias is None) != (first.bias is None):
            return "some have a bias, some not"
    return None


def _common_parent(names: Sequence[str]) -> str:
    parts = [n.split(".")[:-1] for n in names]
    common: list[str] = []
    for level in zip(*parts, strict=False):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common)


@torch.no_grad()
def fuse_siblings(model: nn.Module, groups: Sequence[Sequence[str]]) -> list[FusedLinear]:
    """Replace each group of sibling `nn.Linear`s (paths from `find_siblings`) by one
    `FusedLinear` at their common parent, named `fused_<sibling paths>`, and the siblings
    by `SiblingLinear`s. Each group's weights are concatenated once and the originals
    released (the model holds one copy). Groups that `sibling_problem` refuses raise
    InvalidArgumentError naming them."""
    fused = []
    for names in groups:
        layers = [model.get_submodule(n) for n in names]
        why = sibling_problem(layers)
        if why is not None:
            raise InvalidArgumentError(f"cannot fuse {list(names)}: {why}")
        linears = [m for m in layers if isinstance(m, nn.Linear)]
        first = linears[0]
        rows = sum(m.out_features for m in linears)
        with torch.device("meta"):  # allocated below, once, without an initialisation pass
            big = nn.Linear(first.in_features, rows, bias=first.bias is not None)
        big.weight = nn.Parameter(
            torch.cat([m.weight for m in linears]), requires_grad=first.weight.requires_grad
        )
        if first.bias is not None:
            biases: list[torch.Tensor] = [m.bias for m in linears if m.bias is not None]
            big.bias = nn.Parameter(torch.cat(biases), requires_grad=first.bias.requires_grad)
        parent = _common_parent(names)
        prefix = f"{parent}." if parent else ""
        local = [n[len(prefix) :].replace(".", "_") for n in names]
        group = FusedLinear(big, names, [m.out_features for m in linears])
        parent_mod = model.get_submodule(parent) if parent else model
        parent_mod.add_module("fused_" + "_".join(local), group)
        for i, (name, m) in enumerate(zip(names, linears, strict=True)):
            replace_module(model, name, SiblingLinear(group, i, m.in_features, m.out_features))
        fused.append(group)
        del layers, linears, first
    return fused


def fuse_model_siblings(
    model: nn.Module, candidates: Sequence[str]
) -> tuple[list[tuple[str, ...]], str | None]:
    """Find (with the model's `dummy_inputs`, a Hugging Face model's short example batch)
    and fuse the sibling groups among the `candidates` Linear paths that `sibling_problem`
    accepts. Returns the fused groups and, when none could be looked for, why."""
    example = getattr(model, "dummy_inputs", None)
    if not isinstance(example, Mapping):
        return [], "siblings not fused: the model has no dummy_inputs to find them with"
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in example.items()}
    try:
        groups = find_siblings(model, inputs, candidates)
    except Exception as err:  # a model that cannot run its dummy batch: no fusion, say so
        return [], f"siblings not fused: the forward on dummy_inputs failed ({err!r})"
    groups = [g for g in groups if sibling_problem([model.get_submodule(n) for n in g]) is None]
    fuse_siblings(model, groups)
    return groups, None
