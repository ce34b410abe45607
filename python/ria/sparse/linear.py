"""`Sparse24Linear`: a 2:4-sparse `nn.Linear` that runs, per token count, the kernel that
measured fastest for its shape: dense cuBLAS, cuSPARSELt, the compact-format Triton decode
kernel, or the sparse-tensor-core decode kernel (`mma_sp`), over the mma fragment layout
("mma") or over cuSPARSELt's compressed buffer in place ("mma_cslt").

It keeps only the weight forms its plans use: cuSPARSELt's compressed buffer, the compact
format (values + 2-bit indices; the values are shared with cuSPARSELt's buffer when its
layout allows, and so are its 2-bit indices: a layer using both kernels then holds no
second copy), and the dense weight only where dense won a token-count bucket (opt-in).

Two plans: one for calls captured in a CUDA graph (GPU time decides), one for eager calls,
where a kernel's host cost counts too. Each (token count, mode) gets a runner made once:
the mma.sp kernels launch from an argument block built once (`mma_sp.MmaLaunch`), and eager
cuSPARSELt calls keep their matmul plan (`cslt_lib.CsltMatmul`; torch's op builds it on
every call, 0.5-1.5 ms), so the per-call Python is a dictionary look-up and a launch.
Under `torch.compile` the layer is one opaque custom op (`torch.ops.ria.sparse_linear`),
so models compile with `fullgraph=True` and `mode="reduce-overhead"` captures it in graphs.
"""

from __future__ import annotations

import bisect
import itertools
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidArgumentError
from .cslt import CsltConfig, cslt_linear
from .cslt_lib import CsltMatmul, cslt_lib_status
from .format import Compact24, Mma24
from .graphs import graph_mode
from .mma_sp import MAX_TOKENS, MmaConfig, MmaLaunch, mma24_linear
from .triton_gemv import sparse24_linear

DENSE = "dense"
CUSPARSELT = "cusparselt"
TRITON = "triton"
MMA = "mma"
MMA_CSLT = "mma_cslt"  # the mma.sp kernel reading cuSPARSELt's buffer (the compact "cslt" form)
BACKENDS = (DENSE, CUSPARSELT, TRITON, MMA, MMA_CSLT)
# Prepared calls kept per layer (distinct token counts and modes) before they are rebuilt.
MAX_RUNNERS = 128
# The eager call path's version (prepared launches, kept cuSPARSELt plans): part of the
# plan cache's key, so eager plans timed on an older path are tuned again.
EAGER_CALLS = 2

__all__ = [
    "BACKENDS",
    "CUSPARSELT",
    "DENSE",
    "EAGER_CALLS",
    "MMA",
    "MMA_CSLT",
    "TRITON",
    "Choice",
    "ConvertedLinear",
    "Sparse24Linear",
    "compiled_layer",
    "register_compiled_layer",
    "sparse_linear",
]


@dataclass(frozen=True)
class Choice:
    """The kernel for one token-count bucket (and its cuSPARSELt algorithm or mma.sp launch
    shape, if any)."""

    backend: str
    cslt: CsltConfig | None = None
    mma: MmaConfig | None = None


class Sparse24Linear(nn.Module):
    """`y = x @ W.T + b` for a 2:4-sparse weight, on CUDA, fp16/bf16.

    Args:
        in_features, out_features: as `nn.Linear`.
        plan: token-count bucket upper bound -> `Choice`, for calls inside a CUDA graph. An
            input of `M` tokens (all leading dimensions flattened) uses the smallest bucket
            `>= M`, else the largest.
        eager_plan: the same for eager calls (default: `plan`).
        packed: cuSPARSELt's compressed weight (needed if the plan uses cuSPARSELt).
        compact: the compact 2:4 weight (needed if the plan uses the Triton kernel, or
            mma_cslt: then in cuSPARSELt's layout, as `cslt.share_cslt_buffer` gives it).
        mma: the weight in the mma.sp fragment layout (needed if the plan uses mma).
        weight: the dense (masked) weight (needed if the plan uses dense).
        bias: `(out_features,)` or None.
        input_order: the channel order the weight is stored in (a free permutation: a
            Linear's `ria.permutation.nm_order`): the layer computes `x[..., order] @ W.T`.
    """

    # Buffers (registered in __init__): the weight forms the plan uses, None for the others.
    packed: torch.Tensor | None
    values: torch.Tensor | None
    meta: torch.Tensor | None
    mma_values: torch.Tensor | None
    mma_meta: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    input_order: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        plan: Mapping[int, Choice],
        *,
        eager_plan: Mapping[int, Choice] | None = None,
        packed: torch.Tensor | None = None,
        compact: Compact24 | None = None,
        mma: Mma24 | None = None,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        input_order: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if not plan or (eager_plan is not None and not eager_plan):
            raise InvalidArgumentError("plan and eager_plan must name at least one bucket")
        self.in_features = in_features
        self.out_features = out_features
        self._buckets = sorted(plan)
        self._choices = [plan[b] for b in self._buckets]
        eager = plan if eager_plan is None else eager_plan
        self._eager_buckets = sorted(eager)
        self._eager_choices = [eager[b] for b in self._eager_buckets]
        used = {c.backend for c in (*self._choices, *self._eager_choices)}
        need = {CUSPARSELT: packed, TRITON: compact, MMA: mma, MMA_CSLT: compact, DENSE: weight}
        missing = [b for b in used if need.get(b, 0) is None]
        if missing or not used <= set(BACKENDS):
            raise InvalidArgumentError(f"plan uses {sorted(used)} but no weight form for {missing}")
        if MMA_CSLT in used and compact is not None and compact.layout != "cslt":
            raise InvalidArgumentError(
                "plan uses mma_cslt but the compact weight is not in cuSPARSELt's layout"
            )
        # Non-persistent buffers: they follow .to()/.cuda() but stay out of state_dict, so a
        # checkpoint of the sparsified model is not mistaken for a dense one.
        self.register_buffer("packed", packed if CUSPARSELT in used else None, persistent=False)
        kept = compact if used & {TRITON, MMA_CSLT} else None
        self.register_buffer("values", None if kept is None else kept.values, persistent=False)
        self.register_buffer("meta", None if kept is None else kept.meta, persistent=False)
        self.meta_layout = "rows" if kept is None else kept.layout
        frag = mma if MMA in used else None
        self.register_buffer("mma_values", None if frag is None else frag.values, persistent=False)
        self.register_buffer("mma_meta", None if frag is None else frag.meta, persistent=False)
        self.register_buffer("weight", weight if DENSE in used else None, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.register_buffer("input_order", input_order, persistent=False)
        self._by_m: dict[tuple[int, bool], Choice] = {}
        # (tokens, eager) -> the prepared call (holds raw addresses of the buffers above)
        self._runners: dict[tuple[int, bool], Runner] = {}
        self._matmuls: dict[Choice, CsltMatmul] = {}  # eager cuSPARSELt: plans by token count
        self._handle = register_compiled_layer(self)

    def __getstate__(self) -> dict[str, Any]:
        state: dict[str, Any] = super().__getstate__()  # type: ignore[no-untyped-call]
        state["_runners"] = {}  # ctypes argument blocks: rebuilt on the copy's first call
        state["_matmuls"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[no-untyped-call]
        self._handle = register_compiled_layer(self)  # a copy (deepcopy, pickle) is another

    def _apply(self, fn: Any, recurse: bool = True) -> Sparse24Linear:
        # .to()/.cuda()/.half() move or cast the buffers; the other forms cast value by
        # value, but a cast would read cuSPARSELt's buffer (metadata bits after the values)
        # as numbers and split the values view that shares it.
        packed = self.packed
        target = None if packed is None else fn(packed.new_empty(0)).dtype
        if packed is not None and target != packed.dtype:
            raise InvalidArgumentError(
                f"a Sparse24Linear holding cuSPARSELt's {packed.dtype} buffer cannot be cast "
                f"to {target}: cast the model before ria.sparsify (a model cast halfway by "
                f"this call can be cast back to {packed.dtype})"
            )
        self._runners = {}  # they hold the buffers' addresses
        self._matmuls = {}
        moved: Sparse24Linear = super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        return moved

    @property
    def buckets(self) -> list[int]:
        """The token-count buckets of the plan, ascending."""
        return list(self._buckets)

    @property
    def plan(self) -> dict[int, Choice]:
        """Bucket -> kernel for calls inside a CUDA graph."""
        return dict(zip(self._buckets, self._choices, strict=True))

    @property
    def eager_plan(self) -> dict[int, Choice]:
        """Bucket -> kernel for eager calls."""
        return dict(zip(self._eager_buckets, self._eager_choices, strict=True))

    def choice_for(self, m: int, *, eager: bool = False) -> Choice:
        """The kernel used for an input of `m` tokens (in a CUDA graph, or `eager`)."""
        choice = self._by_m.get((m, eager))
        if choice is None:
            buckets = self._eager_buckets if eager else self._buckets
            choices = self._eager_choices if eager else self._choices
            i = min(bisect.bisect_left(buckets, m), len(buckets) - 1)
            choice = self._by_m[(m, eager)] = choices[i]
        return choice

    def weight_bytes(self) -> int:
        """Bytes of the weight forms held (shared storage counted once), bias excluded."""
        return storage_bytes(
            self.packed, self.values, self.meta, self.mma_values, self.mma_meta, self.weight
        )

    def linear_2d(self, x: torch.Tensor) -> torch.Tensor:
        """`(M, K)` contiguous -> `(M, N)` with the kernel planned for `M` in the current
        mode (graph capture or eager)."""
        key = (x.shape[0], not (x.is_cuda and graph_mode()))
        if not x.is_cuda and (backend := self.choice_for(x.shape[0], eager=True).backend) != DENSE:
            raise InvalidArgumentError(
                f"this layer's {backend} kernel runs on CUDA only and the input is on "
                f"{x.device}: move the model to the GPU (a model for the CPU is one before "
                "ria.sparsify)"
            )
        run = self._runners.get(key)
        if run is None:
            if len(self._runners) >= MAX_RUNNERS:  # many distinct token counts: start over
                self._runners.clear()
            run = self._runners[key] = self.runner(*key)
        return run(x)

    def runner(self, m: int, eager: bool) -> Runner:
        """The call that computes this layer for `m` tokens in a mode (eager, or under graph
        capture): the planned kernel with its launch prepared. It holds the buffers' raw
        addresses, so it is remade after `.to()`; it falls back to the checked path for an
        input its prepared launch does not fit (dtype, device, strides)."""
        choice = self.choice_for(m, eager=eager)
        bias = self.bias
        if choice.backend == TRITON:
            values, meta, k, layout = self.values, self.meta, self.in_features, self.meta_layout

            def triton(x: torch.Tensor) -> torch.Tensor:
                return sparse24_linear(
                    x, None, bias, values=values, meta=meta, in_features=k, layout=layout
                )

            return triton
        if choice.backend in (MMA, MMA_CSLT):
            frag: Mma24 | Compact24
            if choice.backend == MMA:
                assert self.mma_values is not None and self.mma_meta is not None
                frag = Mma24(self.mma_values, self.mma_meta, self.out_features, self.in_features)
            else:
                assert self.values is not None and self.meta is not None
                frag = Compact24(self.values, self.meta, self.in_features, self.meta_layout)
            return _mma_runner(frag, bias, m, choice.mma)
        if choice.backend == CUSPARSELT:
            packed = self.packed
            assert packed is not None  # __init__ checks the plan's forms are given
            config = choice.cslt or CsltConfig()
            if eager and cslt_lib_status() is None:
                matmul = self._matmuls.get(choice)
                if matmul is None:  # one per choice: its plans (per token count) are bounded
                    n, k = self.out_features, self.in_features
                    matmul = self._matmuls[choice] = CsltMatmul(packed, n, k, bias, config)
                return _cslt_runner(matmul)

            def cslt(x: torch.Tensor) -> torch.Tensor:
                return cslt_linear(x, packed, bias, config)

            return cslt
        weight = self.weight
        assert weight is not None

        def dense(x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, weight, bias)

        return dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise InvalidArgumentError(
                f"input has {x.shape[-1]} features in its last dimension; this layer takes "
                f"{self.in_features}"
            )
        x2 = x.reshape(-1, self.in_features)
        if self.input_order is not None:
            x2 = x2.index_select(1, self.input_order)  # a gather per call (contiguous)
        elif not x2.is_contiguous():
            x2 = x2.contiguous()
        if torch.compiler.is_compiling():
            y: torch.Tensor = torch.ops.ria.sparse_linear(x2, self._handle)
        else:
            y = self.linear_2d(x2)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        plan = ", ".join(f"<={b}:{c.backend}" for b, c in self.plan.items())
        text = (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, gathered={self.input_order is not None}, "
            f"plan=[{plan}]"
        )
        if self.eager_plan != self.plan:
            text += (
                ", eager_plan=["
                + ", ".join(f"<={b}:{c.backend}" for b, c in self.eager_plan.items())
                + "]"
            )
        return text


# One layer's computation for one token count and mode: (M, K) -> (M, N).
Runner = Callable[[torch.Tensor], torch.Tensor]


def _mma_runner(
    frag: Mma24 | Compact24, bias: torch.Tensor | None, m: int, config: MmaConfig | None
) -> Runner:
    """mma.sp for `m` tokens: the prepared launch, or 64 rows at a time past its bucket
    (inputs larger than the plan's largest bucket)."""
    if m > MAX_TOKENS:

        def chunked(x: torch.Tensor) -> torch.Tensor:
            parts = [x[i : i + MAX_TOKENS] for i in range(0, x.shape[0], MAX_TOKENS)]
            return torch.cat([mma24_linear(p, frag, bias, config=config) for p in parts])

        return chunked
    launch = MmaLaunch(frag, bias, m, config=config)

    def mma(x: torch.Tensor) -> torch.Tensor:
        if launch.fits(x):
            return launch(x)
        return mma24_linear(x, frag, bias, config=launch.config)

    return mma


def _cslt_runner(matmul: CsltMatmul) -> Runner:
    """cuSPARSELt with its matmul plans kept (eager calls)."""

    def cslt(x: torch.Tensor) -> torch.Tensor:
        if matmul.fits(x):
            return matmul(x)
        return cslt_linear(x, matmul.packed, matmul.bias, matmul.config)

    return cslt


# The layers `torch.ops.ria.sparse_linear` can name (by handle), without keeping them alive.
class ConvertedLinear(Protocol):
    """What `torch.ops.ria.sparse_linear` calls on a registered layer."""

    @property
    def out_features(self) -> int: ...

    def linear_2d(self, x: torch.Tensor) -> torch.Tensor: ...


_LAYERS: weakref.WeakValueDictionary[int, ConvertedLinear] = weakref.WeakValueDictionary()
_HANDLES = itertools.count()


def register_compiled_layer(layer: ConvertedLinear) -> int:
    """A handle under which `torch.ops.ria.sparse_linear` runs `layer`, a converted linear
    layer (`Sparse24Linear`, `fp8_linear.Fp8Linear`) with `linear_2d(x)` and `out_features`;
    the registry holds it weakly. A copy of the layer needs its own handle."""
    handle = next(_HANDLES)
    _LAYERS[handle] = layer
    return handle


def compiled_layer(handle: int) -> ConvertedLinear:
    """The layer registered under `handle` (`register_compiled_layer`), for custom ops that
    name a layer by handle."""
    return _LAYERS[handle]


@torch.library.custom_op("ria::sparse_linear", mutates_args=())
def sparse_linear(x: torch.Tensor, layer: int) -> torch.Tensor:
    """Converted layer number `layer` (`register_compiled_layer`) on `(M, K)` contiguous
    `x`: the op `torch.compile` sees in place of the layer's Python (its kernel choice and
    launches, which dynamo cannot trace)."""
    return compiled_layer(layer).linear_2d(x)


@sparse_linear.register_fake
def _sparse_linear_fake(x: torch.Tensor, layer: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], compiled_layer(layer).out_features)


def storage_bytes(*tensors: torch.Tensor | None) -> int:
    """Bytes of the distinct storages behind `tensors` (None skipped)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())
