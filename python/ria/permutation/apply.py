"""Applying channel permutations to modules so a model computes the same function with
its pruned weights N:M in storage order (ARCHITECTURE.md, "The permutation contract").

Two kinds of order, which a block may mix:
- a Linear's own (`BlockPermutation.inputs`, the "free" mode): while its block is pruned,
  the Linear is a `GatheredLinear` (weight stored in the order, input gathered through it,
  so every pruning stage works in storage order); `settle_orders` then hands the plain
  Linear back with its weight in original order and the order as its `nm_order`, the
  order along which the weight is N:M. Works for any Linear of any family; costs nothing
  in PyTorch, a gather of the input per call in the sparse runtime unless a kernel fuses it.
- folded (the "folded" mode): orders shared by the modules that read one tensor (an
  `InputGroup` of `wiring.py`), applied once per group where the trace says
  (`ChannelGather` on the norm that makes the tensor, `gather_input` on the module that
  receives it, or a `GatheredLinear` for a group of one) while the block is pruned, then
  settled like a Linear's own: the readers' weights back in original column order and the
  order recorded on the module that carried it (`group_order`), which `ria.sparsify` applies
  again (`apply_recorded_orders`); and orders carried at no run-time cost by the folds of
  `ria.arch` (o_proj's within-head order in v's rows; down's in gate/up's rows, per expert
  for fused experts), which stay in the weights.

Plain Hugging Face checkpoints cannot hold these gathers; `ria.permutation.checkpoint`
takes them out for saving and puts them back after loading.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .._interrupts import interrupts_deferred
from .._torch import replace_module
from ..arch import input_params, matrix_dim
from ..errors import InvalidArgumentError, UnsupportedModelError
from .wiring import BlockLayout


class GatheredLinear(nn.Linear):
    """An `nn.Linear` that reads its input through a channel order:
    `F.linear(x[..., order], W, b)`, with `W` stored in that order (so an N:M mask chosen
    in permuted order is N:M in storage order). Same parameters and state-dict keys as
    the `nn.Linear` it replaces; the order is a non-persistent buffer (checkpoints store
    the weight in original order and the order separately, see `checkpoint.py`).

    The working form of a free order while its block is pruned: `settle_orders` puts the
    replaced Linear back afterwards. Left in a model, PEFT's LoRA merge and any tool that
    edits `weight` as a plain Linear's would write in the wrong column order."""

    input_order: torch.Tensor  # a buffer, registered in __init__
    replaced: nn.Linear  # the Linear it stands for, sharing its parameters

    def __init__(self, linear: nn.Linear, order: torch.Tensor) -> None:
        if type(linear).forward is not nn.Linear.forward:  # it would compute F.linear instead
            raise UnsupportedModelError(
                f"cannot gather the input of a {type(linear).__name__}: it has a forward of "
                "its own, which a gathered Linear would replace; use permute=False"
            )
        nn.Module.__init__(self)  # adopts `linear`'s parameters instead of allocating new ones
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        self.register_buffer(
            "input_order", order.to(linear.weight.device, torch.long), persistent=False
        )
        self.__dict__["replaced"] = linear  # not a submodule: its parameters are ours

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.index_select(-1, self.input_order))


# A Linear whose weight is N:M along an order of its input columns (a settled free order)
# carries that order in this non-persistent buffer; it computes plain `F.linear(x, W, b)`.
NM_ORDER = "ria_nm_order"


def nm_order(module: nn.Module) -> torch.Tensor | None:
    """The input-column order along which a settled Linear's weight is N:M (`weight[:,
    order]` is N:M; a LongTensor `new -> old`), or None when the module has none."""
    order = getattr(module, NM_ORDER, None)
    return order if isinstance(order, torch.Tensor) else None


def weight_in_nm_order(linear: nn.Linear) -> torch.Tensor:
    """`linear`'s weight (detached) with its columns in `nm_order` (a copy), or the weight
    itself when it has none: the form in which it is N:M, which the sparse kernels read."""
    weight = linear.weight.detach()
    order = nm_order(linear)
    return weight if order is None else weight.index_select(1, order.to(weight.device))


# A settled folded order, recorded on the module that carried its gather (a norm whose
# output, or a module whose input, was gathered): the order in GROUP_ORDER (a non-persistent
# buffer), how it is applied and the modules that read it (relative to the carrier's parent)
# in GROUP_GATHER and GROUP_READERS. The readers' weights are in original column order, N:M
# along the order.
GROUP_ORDER = "ria_group_order"
GROUP_GATHER = "ria_group_gather"
GROUP_READERS = "ria_group_readers"


@dataclass(frozen=True)
class GroupOrder:
    """A folded order as recorded on its carrier: `gather` ("output": the carrier's output
    is gathered, by a `ChannelGather`; "input": its input, by `InputGather`), `readers`."""

    order: torch.Tensor
    readers: tuple[str, ...]
    gather: str

    def install(self, module: nn.Module) -> None:
        _register_order(module, GROUP_ORDER, self.order)
        setattr(module, GROUP_GATHER, self.gather)
        setattr(module, GROUP_READERS, self.readers)


def group_order(module: nn.Module) -> GroupOrder | None:
    """The settled folded order recorded on `module` (see GROUP_ORDER), else None."""
    order = getattr(module, GROUP_ORDER, None)
    if not isinstance(order, torch.Tensor):
        return None
    return GroupOrder(order, tuple(getattr(module, GROUP_READERS)), getattr(module, GROUP_GATHER))


def _remove_group_order(module: nn.Module) -> None:
    for name in (GROUP_ORDER, GROUP_GATHER, GROUP_READERS):
        delattr(module, name)


@dataclass(frozen=True)
class LinearOrder:
    """An `nm_order` to be installed on a Linear by `swap_in` (its weight unchanged)."""

    order: torch.Tensor

    def install(self, module: nn.Module) -> None:
        _register_order(module, NM_ORDER, self.order)


def _register_order(module: nn.Module, name: str, order: torch.Tensor) -> None:
    """`order` as the module's non-persistent buffer `name` (int64, on the module's device;
    on the CPU for an offloaded module, where it is only read on conversion)."""
    device = next(module.parameters(), torch.empty(0)).device
    if device.type == "meta":
        device = torch.device("cpu")
    module.register_buffer(name, order.to(device, torch.long), persistent=False)


class ChannelGather(nn.Module):
    """Runs `norm`, then reorders the channels of its output: `norm(x)[..., order]`.
    `readers` are the modules that read it, named relative to the norm's parent."""

    order: torch.Tensor  # a buffer, registered in __init__

    def __init__(self, norm: nn.Module, order: torch.Tensor, readers: tuple[str, ...]) -> None:
        super().__init__()
        self.norm = norm
        self.readers = tuple(readers)
        # Not persistent: the order is saved separately so checkpoints stay plain.
        self.register_buffer("order", order.long(), persistent=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        normed: torch.Tensor = self.norm(hidden_states)
        return normed.index_select(-1, self.order)


# A module whose input is gathered (`gather_input`) carries its order in this buffer and
# the modules reading it (relative to the module's parent) in `INPUT_READERS`.
INPUT_ORDER = "ria_input_order"
INPUT_READERS = "ria_input_readers"


def _gather_input_hook(
    module: nn.Module, args: tuple[object, ...], kwargs: dict[str, object]
) -> tuple[tuple[object, ...], dict[str, object]]:
    """Reorders the channels of the module's input: its first argument, else its
    `hidden_states` keyword (how the trace found the tensor passed)."""
    order = getattr(module, INPUT_ORDER)
    if args and isinstance(args[0], torch.Tensor):
        # .to: a dispatched model (accelerate) moves inputs only after the pre-hooks.
        x = args[0]
        return (x.index_select(-1, order.to(x.device)), *args[1:]), kwargs
    states = kwargs["hidden_states"]
    assert isinstance(states, torch.Tensor)
    gathered = states.index_select(-1, order.to(states.device))
    return args, {**kwargs, "hidden_states": gathered}


# Where InputGather.install keeps its hook's handle (so that settling can remove it).
_INPUT_HOOK = "_ria_input_gather_hook"


@dataclass(frozen=True)
class InputGather:
    """A gather of a module's input, to be installed on it by `swap_in`."""

    order: torch.Tensor
    readers: tuple[str, ...]

    def install(self, module: nn.Module) -> None:
        _register_order(module, INPUT_ORDER, self.order)  # (the hook moves it to the input)
        setattr(module, INPUT_READERS, self.readers)
        handle = module.register_forward_pre_hook(_gather_input_hook, with_kwargs=True)
        module.__dict__[_INPUT_HOOK] = handle


def _remove_input_gather(module: nn.Module) -> None:
    module.__dict__.pop(_INPUT_HOOK).remove()
    delattr(module, INPUT_ORDER)  # (the buffer)
    delattr(module, INPUT_READERS)


def input_gather(module: nn.Module) -> tuple[torch.Tensor, tuple[str, ...]] | None:
    """The order and readers of a module whose input is gathered, else None."""
    order = getattr(module, INPUT_ORDER, None)
    if not isinstance(order, torch.Tensor):
        return None
    return order, tuple(getattr(module, INPUT_READERS))


@dataclass
class BlockPermutation:
    """The input orders of one block (absent: left as is). Each is a LongTensor `new ->
    old`: position p of the permuted input holds original channel `order[p]`.

    `shared`: by the carrier of an `InputGroup`, the order its readers share. `heads`: by
    o_proj name, one within-head order per key/value head, `(num_kv_heads, head_dim)`.
    `hidden`: by the name of a down matrix of an MLP fold (`"mlp.down_proj"`, or one
    expert's `"mlp.experts.down_proj[3]"`), its order. `inputs`: by Linear name, its own
    gathered order (the "free" mode)."""

    shared: dict[str, torch.Tensor] = field(default_factory=dict)
    heads: dict[str, torch.Tensor] = field(default_factory=dict)
    hidden: dict[str, torch.Tensor] = field(default_factory=dict)
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Reorder:
    """One order applied to axis `axis` (0: output rows, 1: input columns) of the
    `(out, in)` matrices in parameter `param` of module `module` (relative to the block):
    every expert's when `expert` is None, else expert `expert`'s. Reordering rows
    reorders the matching bias too."""

    module: str
    param: str
    axis: int
    order: torch.Tensor
    expert: int | None = None


def reorders(block: nn.Module, layout: BlockLayout, perm: BlockPermutation) -> list[Reorder]:
    """Every reorder `perm` makes in the block's parameters. The one place that says
    which parameter carries which order."""
    out: list[Reorder] = []
    for group in layout.groups:
        order = perm.shared.get(group.carrier or "")
        if order is None:
            continue
        for reader in group.readers:
            for param in input_params(block.get_submodule(reader)):
                out.append(Reorder(reader, param, 1, order))
    for head in layout.heads:
        o_heads = perm.heads.get(head.o_proj)
        if o_heads is None:
            continue
        rows = int(_linear(block, head.v_source).out_features)
        out.append(Reorder(head.o_proj, "weight", 1, head.o_order(o_heads)))
        out.append(Reorder(head.v_source, "weight", 0, head.v_rows(o_heads, rows)))
    for mlp in layout.mlps:
        hidden = perm.hidden.get(mlp.down)
        if hidden is None:
            continue
        out.append(Reorder(mlp.down, "weight", 1, hidden))
        out += [Reorder(up, "weight", 0, mlp.up_rows(hidden)) for up in mlp.ups]
    for fold in layout.experts:
        count = getattr(block.get_submodule(fold.experts), fold.down).shape[0]
        for e in range(count):
            hidden = perm.hidden.get(f"{fold.experts}.{fold.down}[{e}]")
            if hidden is None:
                continue
            out.append(Reorder(fold.experts, fold.down, 1, hidden, e))
            out.append(Reorder(fold.experts, fold.up, 0, fold.up_rows(hidden), e))
    out += [Reorder(name, "weight", 1, order) for name, order in perm.inputs.items()]
    return out


Orders = tuple[torch.Tensor | None, torch.Tensor | None]


def matrix_orders(block: nn.Module, changes: list[Reorder]) -> dict[str, Orders]:
    """For each matrix the reorders touch: its (output-row order, input-column order),
    named as `ria.pruning.block_matrices` names them (`"mlp.experts.down_proj[3]"`)."""
    orders: dict[str, list[torch.Tensor | None]] = {}
    for change in changes:
        param = getattr(block.get_submodule(change.module), change.param)
        if param.dim() == 2:
            names = [change.module]
        elif change.expert is not None:
            names = [f"{change.module}.{change.param}[{change.expert}]"]
        else:
            names = [f"{change.module}.{change.param}[{e}]" for e in range(param.shape[0])]
        for name in names:
            slot = orders.setdefault(name, [None, None])
            if slot[change.axis] is not None:
                raise InvalidArgumentError(f"{name}: two orders for the same axis")
            slot[change.axis] = change.order
    return {name: (rows, cols) for name, (rows, cols) in orders.items()}


Swaps = list[tuple[torch.Tensor, torch.Tensor]]


def reordered_params(block: nn.Module, changes: list[Reorder]) -> Swaps:
    """The new data of every parameter (and bias) the reorders touch, as `(parameter,
    new data)` pairs; nothing is changed."""
    new: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def update(module: nn.Module, key: str, name: str, dim: int, change: Reorder) -> None:
        param = getattr(module, name)
        data = new[(key, name)][1] if (key, name) in new else None
        order = change.order.to(param.device)
        if change.expert is None:
            data = (param.data if data is None else data).index_select(dim, order)
        else:
            data = param.data.clone() if data is None else data  # a copy of our own
            data[change.expert] = data[change.expert].index_select(dim - 1, order)
        new[(key, name)] = (param, data)

    for change in changes:
        module = block.get_submodule(change.module)
        param = getattr(module, change.param)
        update(module, change.module, change.param, matrix_dim(module, param, change.axis), change)
        if change.axis == 0:
            bias = "bias" if param.dim() == 2 else f"{change.param}_bias"
            if isinstance(getattr(module, bias, None), torch.Tensor):
                update(module, change.module, bias, param.dim() - 2, change)
    return list(new.values())


def is_permuted(block: nn.Module) -> bool:
    """Whether a block already carries gathers or recorded orders (it was permuted before)."""
    return any(
        isinstance(m, (ChannelGather, GatheredLinear))
        or input_gather(m) is not None
        or nm_order(m) is not None
        or group_order(m) is not None
        for m in block.modules()
    )


def gathered(
    block: nn.Module, name: str, order: torch.Tensor, readers: tuple[str, ...]
) -> ChannelGather:
    """A `ChannelGather` of the norm at `name` (relative to `block`), not yet installed."""
    norm = block.get_submodule(name)
    device = next(norm.parameters(), torch.empty(0)).device
    return ChannelGather(norm, order.to(device), readers)


def relative_to_parent(carrier: str, readers: tuple[str, ...]) -> tuple[str, ...]:
    """Reader names relative to the carrier's parent module (how gathers store them)."""
    parent = carrier.rpartition(".")[0]
    if parent and not all(r.startswith(f"{parent}.") for r in readers):
        raise InvalidArgumentError(f"{carrier}: its readers {readers} are not beside it")
    return tuple(r[len(parent) + 1 :] if parent else r for r in readers)


# What `swap_in` puts at a path: a module in place of the one there, or something installed
# on the module there.
Installed = nn.Module | InputGather | LinearOrder | GroupOrder


def swap_in(root: nn.Module, swaps: Swaps, gathers: dict[str, Installed]) -> None:
    """Installs new parameter data and gathers (paths relative to `root`) as one step:
    Ctrl-C is deferred until all are in place, so the model never computes a
    half-permuted function. Everything passed in must be computed beforehand."""
    with interrupts_deferred():
        for param, data in swaps:
            param.data = data
        for path, gather in gathers.items():
            if isinstance(gather, nn.Module):
                replace_module(root, path, gather)
            else:
                gather.install(root.get_submodule(path))


def settle_orders(root: nn.Module) -> None:
    """Takes every gather under `root` out of the forward, after its block is pruned: each
    `GatheredLinear` becomes the Linear it replaced, its weight columns in original order
    and its order kept as `nm_order`; each `ChannelGather` gives its norm back and each
    gathered module input loses its gather, their readers' input columns back in original
    order and the order recorded on the norm or module (`group_order`). The same function,
    with no gather in PyTorch, and modules whose weights mean what they say to every tool
    that edits, saves, loads or quantizes them (PEFT merges and adapters, Trainer resumes,
    accelerate's `save_model`, quantizers). `ria.sparsify` applies the recorded orders
    again (`apply_recorded_orders`). Atomic like `apply_block`."""
    swaps: Swaps = []
    linears: list[tuple[str, nn.Linear, GatheredLinear]] = []
    norms: list[tuple[str, nn.Module, GroupOrder]] = []
    inputs: list[tuple[nn.Module, GroupOrder]] = []
    for path, module in root.named_modules():
        if isinstance(module, GatheredLinear):
            plain = module.replaced
            inverse = torch.argsort(module.input_order)
            swaps.append((module.weight, module.weight.data.index_select(1, inverse)))
            linears.append((path, plain, module))
            continue
        record: GroupOrder
        if isinstance(module, ChannelGather):
            record = GroupOrder(module.order, module.readers, "output")
            norms.append((path, module.norm, record))
        elif (found := input_gather(module)) is not None:
            record = GroupOrder(found[0], found[1], "input")
            inputs.append((module, record))
        else:
            continue
        swaps += _reader_swaps(root, path, record, torch.argsort(record.order))
    with interrupts_deferred():
        for param, data in swaps:
            param.data = data
        for path, plain, gathered_linear in linears:
            plain.weight, plain.bias = gathered_linear.weight, gathered_linear.bias
            replace_module(root, path, plain)
            LinearOrder(gathered_linear.input_order).install(plain)
        for path, norm, record in norms:
            replace_module(root, path, norm)
            record.install(norm)
        for module, record in inputs:
            _remove_input_gather(module)
            record.install(module)


def apply_recorded_orders(root: nn.Module) -> None:
    """Applies every folded order recorded under `root` (`group_order`, left by
    `settle_orders` or `ria.load_pruned`) again: its readers' input columns in the order,
    N:M in storage order, and one gather per group (a `ChannelGather` on the norm, or the
    module's input gathered), as `ria.sparsify` runs them; the same function. Linears'
    own orders (`nm_order`) stay: the sparse kernels gather their input per layer. Atomic
    like `apply_block`."""
    swaps: Swaps = []
    found: list[tuple[str, nn.Module, GroupOrder]] = []
    for path, module in root.named_modules():
        record = group_order(module)
        if record is not None:
            swaps += _reader_swaps(root, path, record, record.order)
            found.append((path, module, record))
    with interrupts_deferred():
        for param, data in swaps:
            param.data = data
        for path, module, record in found:
            _remove_group_order(module)
            if record.gather == "output":
                order = record.order.to(next(module.parameters(), record.order).device)
                replace_module(root, path, ChannelGather(module, order, record.readers))
            else:
                InputGather(record.order, record.readers).install(module)


def _reader_swaps(root: nn.Module, carrier: str, record: GroupOrder, order: torch.Tensor) -> Swaps:
    """`(parameter, data)` with the input columns of every parameter of the carrier's
    readers taken through `order`."""
    parent = root.get_submodule(carrier.rpartition(".")[0])
    swaps: Swaps = []
    for reader in record.readers:
        module = parent.get_submodule(reader)
        for name in input_params(module):
            param = getattr(module, name)
            if type(param.data) is not torch.Tensor:  # its data would not take the order
                raise UnsupportedModelError(
                    f"{reader}.{name} is a {type(param.data).__name__} (a quantized weight?): "
                    "the channel order its weights are N:M along cannot be applied to it; "
                    "nothing was changed"
                )
            dim = matrix_dim(module, param, 1)
            swaps.append((param, param.data.index_select(dim, order.to(param.device))))
    return swaps


def apply_block(block: nn.Module, layout: BlockLayout, perm: BlockPermutation) -> None:
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
    swaps = reordered_params(block, reorders(block, layout, perm))
    gathers: dict[str, Installed] = {}
    for name, own in perm.inputs.items():
        gathers[name] = GatheredLinear(_linear(block, name), own)
    for group in layout.groups:
        shared = perm.shared.get(group.carrier or "")
        if shared is None or group.carrier is None:
            continue
        readers = relative_to_parent(group.carrier, group.readers)
        if group.gather == "output":
            gathers[group.carrier] = gathered(block, group.carrier, shared, readers)
        elif group.gather == "input":
            gathers[group.carrier] = InputGather(shared, readers)
        else:
            gathers[group.carrier] = GatheredLinear(_linear(block, group.carrier), shared)
    swap_in(block, swaps, gathers)


def _linear(block: nn.Module, name: str) -> nn.Linear:
    module = block.get_submodule(name)
    if not isinstance(module, nn.Linear):
        raise InvalidArgumentError(f"{name} is a {type(module).__name__}, not an nn.Linear")
    return module
