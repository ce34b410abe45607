"""Which modules of a decoder block read the same tensor, and where a shared order for
them can be applied: found by tracing one forward of the block, not by a table per family.

During the traced forward, hooks note the tensor every *reader* (an `nn.Linear`, a fused
experts module, a router) takes as input and the tensor every module returns, and a
torch function mode notes every other operation that reads a tensor (outside the
readers' own forwards). Readers of one tensor form an `InputGroup`; their shared order is
applied, in this order of preference (each one gather of the tensor per call, as the
norm gather of the Llama family):

- "output": the tensor is the output of one module (a norm) that nothing but the group
  reads afterwards: that module's output is gathered (`ChannelGather`).
- "input": the tensor is the input (first argument or `hidden_states`) of the smallest
  module that holds every reader, and inside it nothing else reads it (OLMo 2's attention
  and MLP read the raw residual stream: their post-norms leave no norm before them): that
  module's input is gathered (`gather_input`).
- "linear": a group of one Linear: its own input is gathered (`GatheredLinear`).

A group with none of these is left in its order and says why (`InputGroup.reason`).
Tensors are told apart by address, element count and width, so a view
(`x.view(-1, hidden)`, as MoE blocks do before routing) is the same tensor and a slice
is not; the tensors groups and producers are found by (module inputs, outputs of modules
other than readers) are kept alive until the trace ends, so no address is reused while
it runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from ..arch import (
    ExpertFold,
    Fold,
    HeadFold,
    MlpFold,
    block_folds,
    fused_experts,
    is_router,
)

__all__ = ["BlockLayout", "Gather", "InputGroup", "block_layout", "block_readers"]

Gather = Literal["output", "input", "linear"]
_Key = tuple[int, int, int]


@dataclass(frozen=True)
class InputGroup:
    """Modules of a block (names relative to it) that read one tensor, in the order the
    forward calls them, and where their shared order is applied: `gather` at module
    `carrier`; both None when it cannot be (`reason` says why)."""

    readers: tuple[str, ...]
    carrier: str | None = None
    gather: Gather | None = None
    reason: str | None = None


@dataclass(frozen=True)
class BlockLayout:
    """What the permutation of one block works with: the traced input groups and the
    family's folds (`ria.arch.block_folds`). Readers that a fold reorders (o_proj, down)
    are in no group."""

    groups: tuple[InputGroup, ...] = ()
    folds: tuple[Fold, ...] = ()

    @property
    def heads(self) -> list[HeadFold]:
        return [f for f in self.folds if isinstance(f, HeadFold)]

    @property
    def mlps(self) -> list[MlpFold]:
        return [f for f in self.folds if isinstance(f, MlpFold)]

    @property
    def experts(self) -> list[ExpertFold]:
        return [f for f in self.folds if isinstance(f, ExpertFold)]

    def stat_groups(self, names: list[str]) -> list[tuple[str, ...]]:
        """Partition of a block's matrix names into groups that read the same input
        (they share statistics): Linears of one traced group; every other matrix (each
        expert, a Linear the trace did not see) alone."""
        wanted = set(names)
        groups = [tuple(r for r in g.readers if r in wanted) for g in self.groups]
        groups = [g for g in groups if g]
        grouped = {n for g in groups for n in g}
        return groups + [(n,) for n in names if n not in grouped]


def block_readers(block: nn.Module) -> dict[str, nn.Module]:
    """The modules of a block that read a tensor through a matrix: Linears, fused
    experts modules and routers with a weight of their own (none inside experts)."""
    experts = fused_experts(block)
    readers: dict[str, nn.Module] = dict(experts)
    for name, module in block.named_modules():
        if any(name.startswith(f"{e}.") for e in experts) or name in experts:
            continue
        if isinstance(module, nn.Linear):
            readers[name] = module
        elif name and is_router(block, name):
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dim() == 2:
                readers[name] = module
    order = {name: i for i, (name, _) in enumerate(block.named_modules())}
    return dict(sorted(readers.items(), key=lambda kv: order[kv[0]]))


def block_layout(
    model: nn.Module, block: nn.Module, run: Callable[[], Any] | None, check_folds: bool = True
) -> BlockLayout:
    """The block's layout: its folds, and, when `run` (one forward of `block` on real
    inputs) is given, its input groups traced from that forward and the folds that agree
    with it (`check_folds`: also run once per fold with the fold's weights in a random
    order; needed only for permuting)."""
    folds = tuple(block_folds(model, block))  # type: ignore[arg-type]
    if run is None:
        return BlockLayout((), folds)
    targets = {_fold_target(f) for f in folds if not isinstance(f, ExpertFold)}
    traced, made_from, outputs = _trace(block, run, targets if check_folds else set())
    alone = {g.readers[0] for g in traced if len(g.readers) == 1}
    # A fold whose names match a rule but whose forward does not (its target's input is
    # not made from the fold's rows, or is shared with other readers, or passes through an
    # operation that depends on channel order on the way) is left out: its target is then
    # placed like any other reader.
    kept = tuple(
        f
        for f in folds
        if isinstance(f, ExpertFold)
        or (
            _fold_target(f) in alone
            and _fold_holds(f, made_from)
            and (not check_folds or _fold_keeps_output(block, f, run, outputs[_fold_target(f)]))
        )
    )
    targets = {_fold_target(f) for f in kept}
    groups = tuple(g for g in traced if not set(g.readers) <= targets)
    return BlockLayout(groups, kept)


def _fold_target(fold: Fold) -> str:
    """The reader whose input order a fold carries."""
    if isinstance(fold, HeadFold):
        return fold.o_proj
    return fold.down if isinstance(fold, MlpFold) else fold.experts


def _fold_holds(fold: Fold, made_from: dict[str, frozenset[str]]) -> bool:
    """Whether the traced forward agrees with a fold: down's input is made from exactly
    its `ups`' outputs, o_proj's from (among others) v's. Experts folds are inside
    transformers' own forward, which declares its layout (`is_concatenated`)."""
    if isinstance(fold, MlpFold):
        return made_from.get(fold.down) == frozenset(fold.ups)
    if isinstance(fold, HeadFold):
        return fold.v_source in made_from.get(fold.o_proj, frozenset())
    return True


# Largest change of a fold target's output, relative to its norm, that a random fold
# order may make: a valid fold changes only the order of its target's sums (the last bit
# of some outputs in the model's dtype, 2**-8 relative in bfloat16 at most); an operation
# with per-channel weights between the fold's rows and its target (BitNet's sub-norms,
# Qwen3-Next's output gate) changes it by the spread of those weights.
_FOLD_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
_HALF_FOLD_TOLERANCE = 1e-2


def _fold_keeps_output(
    block: nn.Module, fold: Fold, run: Callable[[], Any], reference: torch.Tensor
) -> bool:
    """Whether the fold's target computes what it computed in the traced forward
    (`reference`) when the fold's weights carry a random order: checks what the trace
    cannot see, the operations between the fold's rows and its target."""
    from .apply import BlockPermutation, reordered_params, reorders  # apply imports this

    g = torch.Generator().manual_seed(0)
    perm = BlockPermutation()
    if isinstance(fold, MlpFold):
        down = block.get_submodule(fold.down)
        assert isinstance(down, nn.Linear)  # a traced fold's target is a Linear
        perm.hidden[fold.down] = torch.randperm(down.in_features, generator=g)
    else:
        assert isinstance(fold, HeadFold)
        h = fold.heads
        perm.heads[fold.o_proj] = torch.stack(
            [torch.randperm(h.head_dim, generator=g) for _ in range(h.num_kv_heads)]
        )
    swaps = reordered_params(block, reorders(block, BlockLayout((), (fold,)), perm))
    saved = [(param, param.data) for param, _ in swaps]
    try:
        for param, data in swaps:
            param.data = data
        with _first_outputs(block, {_fold_target(fold)}) as outputs, torch.no_grad():
            run()
        output = outputs[_fold_target(fold)]
    finally:
        for param, data in saved:
            param.data = data
    change = (output.double() - reference.double()).norm() / reference.double().norm()
    tolerance = _FOLD_TOLERANCE.get(reference.dtype, _HALF_FOLD_TOLERANCE)
    return bool(change <= tolerance) or not bool(reference.any())


@contextmanager
def _first_outputs(block: nn.Module, names: set[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Within the context, keeps the output of each module `names` (relative to `block`)
    at its first call. Entered before `_tracing`, so the trace's hooks run after these and
    see no read in their copies."""
    outputs: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        for name in names:

            def keep(_m: nn.Module, _a: Any, out: Any, name: str = name) -> None:
                if name not in outputs:
                    outputs[name] = _output_tensor(out).detach().clone()

            stack.callback(block.get_submodule(name).register_forward_hook(keep).remove)
        yield outputs


@dataclass
class _Call:
    """One call of a module during the trace."""

    input: _Key | None  # its first argument or `hidden_states`
    output: _Key | None
    start: int  # clock when it began and ended
    end: int = -1


@dataclass
class _Trace:
    calls: dict[str, list[_Call]] = field(default_factory=dict)
    # key -> clock of every read outside the readers' own forwards (views are no reads)
    reads: dict[_Key, list[int]] = field(default_factory=dict)
    # key -> the readers whose outputs the tensor was computed from (outside readers)
    sources: dict[_Key, frozenset[str]] = field(default_factory=dict)
    clock: int = 0
    active_readers: int = 0
    alive: list[torch.Tensor] = field(default_factory=list)

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def key(self, value: Any, keep: bool = False) -> _Key | None:
        """The tensor's key; `keep` holds it until the trace ends, so no later tensor
        gets its address (module inputs and non-reader outputs: the keys groups and
        producers are found by; a read of another tensor that had the address before is
        told apart by its time)."""
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            return None
        if keep:
            self.alive.append(value)
        return (value.data_ptr(), value.numel(), value.shape[-1])


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    return kwargs.get("hidden_states")


def _output_tensor(out: Any) -> Any:
    return out[0] if isinstance(out, (tuple, list)) and out else out


_IN_PLACE_OPERATORS = {"add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul"}


def _writes(name: str) -> bool:
    """Whether an operation of this name writes its first input (`add_`, `+=`, `x[i] = v`)."""
    if name.startswith("__"):
        return name == "__setitem__" or (name[3:-2] in _IN_PLACE_OPERATORS and name[2] == "i")
    return name.endswith("_")


class _Reads(TorchFunctionMode):
    """Notes every operation that reads a tensor outside the readers' forwards."""

    def __init__(self, trace: _Trace) -> None:
        super().__init__()
        self.trace = trace

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.trace.active_readers:
            return out
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if not outs:
            return out  # shape, size, dtype...: no values read
        # A view of the same tensor reads nothing; an in-place operation writes it.
        in_place = _writes(getattr(func, "__name__", ""))
        out_keys = {self.trace.key(t) for t in outs}
        in_keys = [self.trace.key(v) for v in tree_leaves((args, kwargs))]
        now = self.trace.tick()
        sources: frozenset[str] = frozenset()
        for key in in_keys:
            if key is None:
                continue
            sources |= self.trace.sources.get(key, frozenset())
            if in_place or key not in out_keys:
                self.trace.reads.setdefault(key, []).append(now)
        for key in out_keys - {None}:
            assert key is not None
            # A new tensor (perhaps at a freed one's address) is made from the inputs alone.
            old = self.trace.sources.get(key, frozenset()) if key in in_keys else frozenset()
            self.trace.sources[key] = old | sources
        return out


@contextmanager
def _tracing(block: nn.Module, readers: set[str]) -> Iterator[_Trace]:
    trace = _Trace()
    inside_experts = tuple(f"{e}." for e in fused_experts(block))
    with ExitStack() as stack:
        for name, module in block.named_modules():
            if name.startswith(inside_experts):
                continue
            is_reader = int(name in readers)

            def pre(
                _m: nn.Module, args: Any, kwargs: Any, name: str = name, r: int = is_reader
            ) -> None:
                call = _Call(trace.key(_first_tensor(args, kwargs), True), None, trace.tick())
                trace.calls.setdefault(name, []).append(call)
                trace.active_readers += r

            def post(
                _m: nn.Module, _a: Any, _k: Any, out: Any, name: str = name, r: int = is_reader
            ) -> None:
                trace.active_readers -= r
                call = trace.calls[name][-1]
                call.output = trace.key(_output_tensor(out), keep=not r)
                call.end = trace.tick()
                if r and call.output is not None:
                    trace.sources[call.output] = frozenset([name])

            stack.callback(module.register_forward_pre_hook(pre, with_kwargs=True).remove)
            stack.callback(module.register_forward_hook(post, with_kwargs=True).remove)
        stack.enter_context(_Reads(trace))
        yield trace


def _trace(
    block: nn.Module, run: Callable[[], Any], kept: set[str]
) -> tuple[list[InputGroup], dict[str, frozenset[str]], dict[str, torch.Tensor]]:
    """The block's input groups, for each reader the readers whose outputs its input
    was computed from, and the output of each module `kept` at its first call."""
    readers = block_readers(block)
    with _first_outputs(block, kept) as outputs, _tracing(block, set(readers)) as trace:
        run()
    block_call = trace.calls[""][0]
    # The block's output leaves it: a read by whatever comes next.
    if block_call.output is not None:
        trace.reads.setdefault(block_call.output, []).append(block_call.end)
    by_input: dict[_Key, list[str]] = {}
    groups: list[InputGroup] = []
    for name in readers:
        calls = trace.calls.get(name, [])
        if len(calls) != 1 or calls[0].input is None:
            why = "it was not called" if not calls else f"it was called {len(calls)} times"
            groups.append(InputGroup((name,), reason=f"{name}: {why} in the traced forward"))
            continue
        by_input.setdefault(calls[0].input, []).append(name)
    for key, names in by_input.items():
        names.sort(key=lambda n: trace.calls[n][0].start)  # in the order the forward reads
        groups.append(_placed(tuple(names), key, trace, readers))
    made_from = {
        name: trace.sources.get(key, frozenset()) for key, ns in by_input.items() for name in ns
    }
    return groups, made_from, outputs


def _placed(
    names: tuple[str, ...], key: _Key, trace: _Trace, readers: dict[str, nn.Module]
) -> InputGroup:
    """Where the shared order of readers `names` of tensor `key` can be applied."""
    reads = trace.reads.get(key, [])
    producers = [
        (n, c)
        for n, cs in trace.calls.items()
        if n and n not in readers
        for c in cs
        if c.output == key
    ]
    if producers:
        # The innermost module that returned it (its hook ran first); others returned it on.
        name, call = min(producers, key=lambda p: p[1].end)
        once = len(trace.calls[name]) == 1
        alone = _returned_alone(trace, key, name, call.start) and _beside(name, names)
        if once and alone and not [t for t in reads if t > call.end]:
            return InputGroup(names, name, "output")
    container = _container(names, key, trace, reads)
    if container is not None:
        return InputGroup(names, container, "input")
    if len(names) == 1 and isinstance(readers[names[0]], nn.Linear):
        return InputGroup(names, names[0], "linear")
    return InputGroup(
        names,
        reason=f"{', '.join(names)}: the tensor they read is read by other operations too, "
        "and no module produces or receives it for them alone",
    )


def _beside(carrier: str, names: tuple[str, ...]) -> bool:
    """Whether every reader is inside the carrier's parent (how gathers name them)."""
    parent = carrier.rpartition(".")[0]
    return not parent or all(n.startswith(f"{parent}.") for n in names)


def _returned_alone(trace: _Trace, key: _Key, producer: str, since: int) -> bool:
    """Whether every other module returning the tensor holds the producer (returns it on).
    Calls that ended before the producer began returned an earlier tensor at the same
    address (readers' outputs are not kept alive)."""
    return all(
        producer.startswith(f"{n}.")
        for n, cs in trace.calls.items()
        if n and n != producer
        for c in cs
        if c.output == key and c.end > since
    )


def _container(names: tuple[str, ...], key: _Key, trace: _Trace, reads: list[int]) -> str | None:
    """The smallest module holding all `names`, called once with the tensor as its input,
    inside which nothing but them reads it; None when there is none (the block itself
    does not count: its input is the residual stream, which it also adds to)."""
    parts = [n.split(".") for n in names]
    common: list[str] = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    if len(names) == 1:
        common = common[:-1]  # the reader itself is the "linear" case
    for depth in range(len(common), 0, -1):
        name = ".".join(common[:depth])
        calls = trace.calls.get(name, [])
        if len(calls) != 1 or calls[0].input != key:
            continue
        if not [t for t in reads if calls[0].start < t < calls[0].end]:
            return name
    return None
