"""`Fp8Linear` and `sparsify_fp8`: linear layers in fp8 (e4m3 weights with per-row scales,
tokens quantized per call), 2:4 sparse or dense, bf16/fp16 out.

Per layer shape and token-count bucket the plan runs the kernel that measured fastest under
CUDA-graph replay (`choose_fp8_plan`): for 2:4 layers cuSPARSELt's fp8 2:4 GEMM or the own
`mma.sp` / wgmma kernels (`mma_sp.mma24_fp8_linear`), which read either their e4m3
fragments (`FP8_MMA`, M <= 64) or cuSPARSELt's e4m3 buffer in place (`FP8_MMA_CSLT`: one
copy serves decode and prefill, any M on sm_90 through the wgmma kernel's token blocks; the
buffer's layout is checked per layer); fp8 dense (`torch._scaled_mm`,
with the scales in its epilogue or, often faster, unscaled and scaled by a second kernel) is
the per-layer fallback where it is faster over all buckets. Each candidate's output is
checked against `fp8.fp8_linear_reference` once before it is timed (`AGREE_TOLERANCE`).
By default a layer holds one form: a compressed e4m3 weight in one 2:4 layout (0.5625 bytes
per weight, like `sparsify.keep_one_layout`) or the dense e4m3 weight (1 byte); with
`allow_dense` a 2:4 layer may hold both (never more than 1.5625 bytes, under bf16's 2).
Off CUDA the layer runs `fp8.fp8_linear_reference`, the definition the kernels match
(cuSPARSELt's within its coarser accumulation: `AGREE_TOLERANCE`).

The plan is timed for graph replay only: eager calls use it too, and eager cuSPARSELt pays
its host set-up on every call, so fp8 2:4 layers are for `ria.generate` / CUDA graphs.
Under `torch.compile` the tokens are quantized by traced code (`fp8.quantize_rows`, the same
bits as `quantize_tokens`), which inductor fuses into the kernel that made the input, and
the plan's GEMM is one custom op on them (`ria::fp8_quantized_linear`). Where the token count's
bucket runs a kernel that leaves its product unscaled (cuSPARSELt's,
`_scaled_mm`'s tensor-wise path: `FP8_UNSCALED_KERNELS`), the op returns that product
(`ria::fp8_unscaled_linear`) and the scaling is traced too (`fp8.apply_scales`, the same
arithmetic as the scaling kernel eager calls launch), so inductor fuses it into the kernel
that reads the output instead of running a kernel of its own.
Plans are cached on disk like the fp16/bf16 ones (`plan_cache.py`; their keys name the fp8
backends, so the two never mix).
"""

from __future__ import annotations

import bisect
import os
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import require_int
from .._torch import replace_module
from ..errors import InvalidArgumentError
from ..permutation import apply_recorded_orders, nm_order, weight_in_nm_order
from .cslt import CsltConfig, cslt_view, share_cslt_buffer
from .cslt_lib import cusparselt_version
from .format import MMA_PAIR_COLS, Compact24, Mma24, pack_24, pack_mma24_e4m3, tensor_bytes
from .fp8 import (
    Fp8Weight,
    apply_scales,
    fp8_linear_reference,
    fp8_quantized_reference,
    fp8_unscaled_reference,
    quantize_rows,
    quantize_weight,
    unscaled_dtype,
)
from .fp8_kernels import (
    cslt_rows,
    fp8_cslt_best_config,
    fp8_cslt_compress,
    fp8_cslt_gemm,
    fp8_cslt_linear,
    fp8_cslt_product,
    fp8_cslt_shape_status,
    fp8_dense_gemm,
    fp8_dense_linear,
    fp8_dense_product,
    fp8_dense_shape_status,
    fp8_dense_unscaled_gemm,
    fp8_dense_unscaled_linear,
    fp8_status,
    quantize_tokens,
)
from .generate import clear_generators
from .graphs import rotation_time_us
from .linear import DENSE, Choice, compiled_layer, register_compiled_layer, storage_bytes
from .mma_sp import (
    MAX_TOKENS,
    MmaConfig,
    MmaWeight,
    e4m3_candidates,
    mma24_fp8_linear,
    mma_best_config,
    mma_status,
)
from .plan_cache import PlanCache, TunedPlan, cached_choices_run, library_versions

if TYPE_CHECKING:
    from .sparsify import SparseLayerReport, SparsifyReport

FP8_DENSE = "fp8_dense"
FP8_DENSE_UNSCALED = "fp8_dense_unscaled"
FP8_CUSPARSELT = "fp8_cusparselt"
FP8_MMA = "fp8_mma"
FP8_MMA_CSLT = "fp8_mma_cslt"  # the mma.sp kernel reading cuSPARSELt's e4m3 buffer in place
FP8_BACKENDS = (FP8_DENSE, FP8_DENSE_UNSCALED, FP8_CUSPARSELT, FP8_MMA, FP8_MMA_CSLT)
# The kernels that read cuSPARSELt's compressed e4m3 buffer.
FP8_CSLT_KERNELS = frozenset({FP8_CUSPARSELT, FP8_MMA_CSLT})
# The kernels that read the dense e4m3 weight.
FP8_DENSE_KERNELS = frozenset({FP8_DENSE, FP8_DENSE_UNSCALED})
# The kernels whose product is scaled afterwards (by a second kernel, or by traced code
# under torch.compile): cuSPARSELt refuses a per-row alpha for fp8; the other is faster so.
FP8_UNSCALED_KERNELS = frozenset({FP8_CUSPARSELT, FP8_DENSE_UNSCALED})

__all__ = [
    "FP8_BACKENDS",
    "FP8_CSLT_KERNELS",
    "FP8_CUSPARSELT",
    "FP8_DENSE",
    "FP8_DENSE_KERNELS",
    "FP8_DENSE_UNSCALED",
    "FP8_MMA",
    "FP8_MMA_CSLT",
    "FP8_UNSCALED_KERNELS",
    "Fp8Linear",
    "choose_fp8_plan",
    "fp8_layer",
    "fp8_quantized_linear",
    "fp8_slower_warnings",
    "fp8_unscaled_linear",
    "quantize_linears",
    "sparsify_fp8",
]


class Fp8Linear(nn.Module):
    """`y = x @ W.T + b` with `W` in e4m3 (per-output-row power-of-two scales) and `x`
    quantized per token to e4m3 at each call; output in `x`'s dtype.

    Args:
        weight: the e4m3 weight and its scales (`values` is dropped on CUDA when the plan
            does not use fp8 dense; kept for the CPU reference otherwise).
        plan: token-count bucket upper bound -> `Choice` (one of `FP8_BACKENDS`); an input
            of `M` tokens uses the smallest bucket `>= M`, else the largest.
        packed: cuSPARSELt's compressed weight (needed if the plan uses `FP8_CUSPARSELT` or
            `FP8_MMA_CSLT`; for the latter its layout must be checked first, as `fp8_layer`
            does with `cslt.share_cslt_buffer`).
        mma: the e4m3 mma.sp fragments (`format.pack_mma24_e4m3`; if the plan uses `FP8_MMA`).
        bias: `(out_features,)` or None.
        input_order: the channel order the weight is stored in (a free permutation).
    """

    values: torch.Tensor | None
    scale: torch.Tensor
    packed: torch.Tensor | None
    mma_values: torch.Tensor | None
    mma_meta: torch.Tensor | None
    unit: torch.Tensor | None
    bias: torch.Tensor | None
    input_order: torch.Tensor | None

    def __init__(
        self,
        weight: Fp8Weight,
        plan: Mapping[int, Choice],
        *,
        packed: torch.Tensor | None = None,
        mma: Mma24 | None = None,
        bias: torch.Tensor | None = None,
        input_order: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if not plan:
            raise InvalidArgumentError("plan must name at least one bucket")
        used = {c.backend for c in plan.values()}
        if not used <= set(FP8_BACKENDS):
            raise InvalidArgumentError(f"plan uses {sorted(used)}; fp8 backends: {FP8_BACKENDS}")
        if used & FP8_CSLT_KERNELS and packed is None:
            raise InvalidArgumentError(
                f"plan uses {sorted(used & FP8_CSLT_KERNELS)} but no packed weight is given"
            )
        if FP8_MMA in used and mma is None:
            raise InvalidArgumentError("plan uses fp8_mma but no mma fragments are given")
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self._buckets = sorted(plan)
        self._choices = [plan[b] for b in self._buckets]
        # (bound, unscaled) where the buckets up to bound (and above the previous bound) run
        # unscaled kernels or not, and the next bucket does the other; the last run has none.
        unscaled = [c.backend in FP8_UNSCALED_KERNELS for c in self._choices]
        self._unscaled_edges = tuple(
            (b, u)
            for b, u, after in zip(self._buckets[:-1], unscaled[:-1], unscaled[1:], strict=True)
            if u != after
        )
        keep_values = bool(used & FP8_DENSE_KERNELS) or not weight.values.is_cuda
        # Non-persistent: a checkpoint of the converted model is not mistaken for a bf16 one.
        self.register_buffer("values", weight.values if keep_values else None, persistent=False)
        self.register_buffer("scale", weight.scale, persistent=False)
        self.register_buffer(
            "packed", packed if used & FP8_CSLT_KERNELS else None, persistent=False
        )
        frag = mma if FP8_MMA in used else None
        self.register_buffer("mma_values", None if frag is None else frag.values, persistent=False)
        self.register_buffer("mma_meta", None if frag is None else frag.meta, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.register_buffer("input_order", input_order, persistent=False)
        # The unit scale of the unscaled fp8 dense kernel (made here: not inside a capture).
        unit = torch.ones(1, device=weight.scale.device) if FP8_DENSE_UNSCALED in used else None
        self.register_buffer("unit", unit, persistent=False)
        self._handle = register_compiled_layer(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[no-untyped-call]
        self._handle = register_compiled_layer(self)  # a copy (deepcopy, pickle) is another

    def _apply(self, fn: Any, recurse: bool = True) -> Fp8Linear:
        # The output follows the input's dtype, so .half()/.to(dtype) may cast the bias; the
        # weight's forms (e4m3 values, cuSPARSELt's buffer, float32 scales) only move.
        def move(t: torch.Tensor) -> torch.Tensor:
            if t is self.bias:
                return cast(torch.Tensor, fn(t))
            target = fn(torch.empty(0, dtype=t.dtype, device=t.device))
            return cast(torch.Tensor, fn(t)) if target.dtype == t.dtype else t.to(target.device)

        moved: Fp8Linear = super()._apply(move, recurse)  # type: ignore[no-untyped-call]
        return moved

    @property
    def plan(self) -> dict[int, Choice]:
        """Bucket -> kernel."""
        return dict(zip(self._buckets, self._choices, strict=True))

    def choice_for(self, m: int) -> Choice:
        """The kernel used for an input of `m` tokens."""
        i = min(bisect.bisect_left(self._buckets, m), len(self._buckets) - 1)
        return self._choices[i]

    def _unscaled_for(self, m: int | torch.SymInt) -> bool:
        """Whether `m` tokens run a kernel of `FP8_UNSCALED_KERNELS`, tested only against the
        bucket bounds where that changes: under dynamo a test on a symbolic token count is a
        guard, so a prompt length on the same side reuses the compiled graph. A loop over
        `_unscaled_edges`: dynamo does not trace bisect."""
        for bound, unscaled in self._unscaled_edges:
            if m <= bound:
                return unscaled
        return self._choices[-1].backend in FP8_UNSCALED_KERNELS

    def weight_bytes(self) -> int:
        """Bytes of the weight forms held (values, compressed weight, scales), bias excluded."""
        return storage_bytes(self.values, self.packed, self.mma_values, self.mma_meta, self.scale)

    def linear_2d(self, x: torch.Tensor) -> torch.Tensor:
        """`(M, K)` contiguous -> `(M, N)`: the tokens quantized (`quantize_tokens`), then
        the plan's GEMM."""
        if not x.is_cuda:
            return fp8_linear_reference(x, self._reference_weight(), self.bias)
        m = x.shape[0]
        choice = self.choice_for(m)
        q, q_scale = quantize_tokens(x, cslt_rows(m) if choice.backend == FP8_CUSPARSELT else m)
        return self._gemm(choice, q, q_scale, m, x.dtype)

    def quantized_2d(
        self, q: torch.Tensor, q_scale: torch.Tensor, out_dtype: torch.dtype
    ) -> torch.Tensor:
        """The layer on tokens already quantized (`fp8.quantize_rows`: `q` `(M, K)` e4m3,
        `q_scale` `(M,)` fp32) -> `(M, N)` in `out_dtype`; what a compiled forward calls."""
        if not q.is_cuda:
            return fp8_quantized_reference(
                q, q_scale, self._reference_weight(), self.bias, out_dtype
            )
        m = q.shape[0]
        return self._gemm(self.choice_for(m), q.contiguous(), q_scale, m, out_dtype)

    def unscaled_2d(self, q: torch.Tensor, raw_dtype: torch.dtype) -> torch.Tensor:
        """The unscaled product `q @ W.T` `(M, N)` in `raw_dtype` (`fp8.unscaled_dtype`) of
        the plan's kernel for `M` tokens, one of `FP8_UNSCALED_KERNELS`; what a compiled
        forward calls before scaling it in traced code (`fp8.apply_scales`)."""
        m = q.shape[0]
        if not q.is_cuda:
            return fp8_unscaled_reference(q, self._reference_weight()).to(raw_dtype)
        choice = self.choice_for(m)
        if choice.backend == FP8_CUSPARSELT:
            assert self.packed is not None
            return fp8_cslt_product(q.contiguous(), m, self.packed, choice.cslt, raw_dtype)
        if choice.backend != FP8_DENSE_UNSCALED:
            raise InvalidArgumentError(
                f"{choice.backend} scales its own output; unscaled_2d takes the buckets of "
                f"{sorted(FP8_UNSCALED_KERNELS)}"
            )
        assert self.values is not None and self.unit is not None
        dense = Fp8Weight(self.values, self.scale)
        return fp8_dense_product(q.contiguous(), dense, self.unit, raw_dtype)

    def _reference_weight(self) -> Fp8Weight:
        if self.values is None:
            raise InvalidArgumentError("Fp8Linear: no e4m3 values held for a CPU call")
        return Fp8Weight(self.values, self.scale)

    def _gemm(
        self,
        choice: Choice,
        q: torch.Tensor,
        q_scale: torch.Tensor,
        m: int,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        """`choice`'s GEMM on the first `m` of the quantized rows `q`, `q_scale` (CUDA)."""
        if choice.backend in (FP8_MMA, FP8_MMA_CSLT):
            weight: MmaWeight
            if choice.backend == FP8_MMA:
                assert self.mma_values is not None and self.mma_meta is not None
                weight = Mma24(self.mma_values, self.mma_meta, self.out_features, self.in_features)
            else:
                assert self.packed is not None
                weight = cslt_view(self.packed, self.out_features, self.in_features)
            # (a decode shape takes at most MAX_TOKENS; a prefill shape any count at once)
            step = m if choice.mma is not None and choice.mma.token_tiles else MAX_TOKENS
            ys = [
                mma24_fp8_linear(
                    q[i : i + step],
                    q_scale[i : i + step],
                    weight,
                    self.scale,
                    self.bias,
                    out_dtype=out_dtype,
                    config=choice.mma,
                )
                for i in range(0, m, step)
            ]
            return ys[0] if len(ys) == 1 else torch.cat(ys)
        if choice.backend == FP8_CUSPARSELT:
            assert self.packed is not None  # __init__ checks the plan's forms are given
            return fp8_cslt_gemm(
                q, q_scale, m, self.packed, self.scale, self.bias, choice.cslt, out_dtype
            )
        assert self.values is not None
        dense = Fp8Weight(self.values, self.scale)
        if choice.backend == FP8_DENSE_UNSCALED:
            assert self.unit is not None
            return fp8_dense_unscaled_gemm(q, q_scale, dense, self.unit, self.bias, out_dtype)
        return fp8_dense_gemm(q, q_scale, dense, self.bias, out_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise InvalidArgumentError(
                f"input has {x.shape[-1]} features in its last dimension; this layer takes "
                f"{self.in_features}"
            )
        x2 = x.reshape(-1, self.in_features)
        if self.input_order is not None:
            x2 = x2.index_select(1, self.input_order)
        if torch.compiler.is_compiling():
            # The quantization as traced code, which inductor fuses into the kernel that
            # made x (a norm, SiLU-mul, the attention's output copy), and the kernel choice
            # and launches as one op: one kernel less per layer than eager calls.
            q, q_scale = quantize_rows(x2)
            if self._unscaled_for(x2.shape[0]):
                # Its scaling traced too: fused into the kernel that reads y (SiLU-mul,
                # the residual add, the next quantization), not a kernel of its own.
                raw = unscaled_dtype(x2.dtype, self.bias is not None)
                acc = torch.ops.ria.fp8_unscaled_linear(q, self._handle, raw)
                y: torch.Tensor = apply_scales(acc, q_scale, self.scale, self.bias, x2.dtype)
            else:
                y = torch.ops.ria.fp8_quantized_linear(q, q_scale, self._handle, x2.dtype)
        else:
            y = self.linear_2d(x2.contiguous())
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        plan = ", ".join(f"<={b}:{c.backend}" for b, c in self.plan.items())
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, gathered={self.input_order is not None}, "
            f"plan=[{plan}]"
        )


@torch.library.custom_op("ria::fp8_quantized_linear", mutates_args=())
def fp8_quantized_linear(
    q: torch.Tensor, q_scale: torch.Tensor, layer: int, out_dtype: torch.dtype
) -> torch.Tensor:
    """`Fp8Linear.quantized_2d` of the layer registered as `layer`
    (`linear.register_compiled_layer`): the op `torch.compile` sees for an fp8 layer, after
    the traced quantization of its input."""
    return _fp8_layer(layer).quantized_2d(q, q_scale, out_dtype)


@fp8_quantized_linear.register_fake
def _fp8_quantized_linear_fake(
    q: torch.Tensor, q_scale: torch.Tensor, layer: int, out_dtype: torch.dtype
) -> torch.Tensor:
    return q.new_empty(q.shape[0], _fp8_layer(layer).out_features, dtype=out_dtype)


@torch.library.custom_op("ria::fp8_unscaled_linear", mutates_args=())
def fp8_unscaled_linear(q: torch.Tensor, layer: int, raw_dtype: torch.dtype) -> torch.Tensor:
    """`Fp8Linear.unscaled_2d` of the layer registered as `layer`: the op `torch.compile`
    sees for an fp8 layer whose bucket leaves its product unscaled, before the traced
    scaling (`fp8.apply_scales`)."""
    return _fp8_layer(layer).unscaled_2d(q, raw_dtype)


@fp8_unscaled_linear.register_fake
def _fp8_unscaled_linear_fake(q: torch.Tensor, layer: int, raw_dtype: torch.dtype) -> torch.Tensor:
    return q.new_empty(q.shape[0], _fp8_layer(layer).out_features, dtype=raw_dtype)


def _fp8_layer(handle: int) -> Fp8Linear:
    layer = compiled_layer(handle)
    assert isinstance(layer, Fp8Linear)
    return layer


def _mma(
    x: torch.Tensor,
    weight: MmaWeight,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    config: MmaConfig | None,
) -> torch.Tensor:
    q, q_scale = quantize_tokens(x)
    return mma24_fp8_linear(q, q_scale, weight, scale, bias, out_dtype=x.dtype, config=config)


def fp8_layer(linear: nn.Linear, plan: Mapping[int, Choice] | None = None) -> Fp8Linear:
    """`linear` as an `Fp8Linear` on its own device (default plan: fp8 dense for every
    token count; a plan with `FP8_CUSPARSELT` or `FP8_MMA_CSLT` compresses the weight, CUDA
    only). Where the plan reads cuSPARSELt's buffer with our kernel but this layer's buffer
    is not in the layout it reads (`cslt.share_cslt_buffer`), its buckets run cuSPARSELt."""
    plan = plan or {1: Choice(FP8_DENSE)}
    used = {c.backend for c in plan.values()}
    # Only 2:4 kernels need a free order (`nm_order`) and its gather: fp8 dense reads any.
    ordered = not used <= FP8_DENSE_KERNELS
    weight = quantize_weight(weight_in_nm_order(linear) if ordered else linear.weight.detach())
    packed = fp8_cslt_compress(weight) if used & FP8_CSLT_KERNELS else None
    if packed is not None and FP8_MMA_CSLT in used and _cslt_layout(weight, packed) is None:
        plan = {
            m: Choice(FP8_CUSPARSELT) if c.backend == FP8_MMA_CSLT else c for m, c in plan.items()
        }
        used = {c.backend for c in plan.values()}
    return Fp8Linear(
        weight,
        plan,
        packed=packed,
        mma=pack_mma24_e4m3(weight.values) if FP8_MMA in used else None,
        bias=None if linear.bias is None else linear.bias.detach(),
        input_order=nm_order(linear) if ordered else None,
    )


def _cslt_layout(weight: Fp8Weight, packed: torch.Tensor) -> Compact24 | None:
    """cuSPARSELt's e4m3 buffer `packed` of `weight` as the "cslt" `Compact24` our kernel
    reads, if it decodes to this weight in that layout (checked on its data), else None."""
    shared = share_cslt_buffer(pack_24(weight.values), packed)
    return shared if shared.layout == "cslt" else None


@dataclass
class _Forms:
    weight: Fp8Weight
    bias: torch.Tensor | None
    dense: torch.Tensor  # the original (bf16) weight, timed for the report
    unit: torch.Tensor  # 1.0, fp32, for FP8_DENSE_UNSCALED
    packed: torch.Tensor | None = None
    mma: Mma24 | None = None
    cslt: Compact24 | None = None  # `packed` as the mma.sp kernel reads it, where it can


# A bucket's launch settings: cuSPARSELt's per FP8_CUSPARSELT, mma.sp's per mma backend.
_Configs = Mapping[str, CsltConfig | MmaConfig]


def _run(backend: str, f: _Forms, x: torch.Tensor, configs: _Configs) -> torch.Tensor:
    config = configs.get(backend)
    if backend in (FP8_MMA, FP8_MMA_CSLT):
        weight = f.mma if backend == FP8_MMA else f.cslt
        assert weight is not None and (config is None or isinstance(config, MmaConfig))
        return _mma(x, weight, f.weight.scale, f.bias, config)
    if backend == FP8_CUSPARSELT:
        assert f.packed is not None and (config is None or isinstance(config, CsltConfig))
        return fp8_cslt_linear(x, f.packed, f.weight.scale, f.bias, config)
    if backend == FP8_DENSE:
        return fp8_dense_linear(x, f.weight, f.bias)
    if backend == FP8_DENSE_UNSCALED:
        return fp8_dense_unscaled_linear(x, f.weight, f.unit, f.bias)
    return F.linear(x, f.dense, f.bias)


def _time_us(backend: str, forms: Sequence[_Forms], x: torch.Tensor, configs: _Configs) -> float:
    """Microseconds per call of `backend` on `forms` in rotation, under graph replay."""
    return rotation_time_us(lambda f: _run(backend, f, x, configs), forms)


# How far a candidate's output may be from `fp8_linear_reference`'s, as a fraction of the
# largest output. cuSPARSELt's fp8 GEMM sums with fewer bits than fp32: measured on an H200
# (cuSPARSELt 0.8.0, `python benches/fp8_speed.py --only accuracy`), up to 1/126 of the
# largest output at K = 11008 (a mean bias of -2e-4 toward zero), where the widened mma.sp
# and row-wise `_scaled_mm` stay within bf16's rounding (1/256); our wgmma e4m3 form, on the
# same FP8 tensor cores, sums like cuSPARSELt (`mma_sp.E4M3_AGREE_TOLERANCE`). A kernel
# reading a layout wrongly is off by whole products: far more.
AGREE_TOLERANCE = 2**-6


def _agrees(backend: str, f: _Forms, x: torch.Tensor, configs: _Configs) -> bool:
    """`backend`'s output on `x` is within AGREE_TOLERANCE of `fp8_linear_reference`'s."""
    got = _run(backend, f, x, configs).float()
    ref = fp8_linear_reference(x, f.weight, f.bias).float()
    return bool((got - ref).abs().max() <= AGREE_TOLERANCE * ref.abs().max())


def _tune(
    forms: Sequence[_Forms],
    buckets: Sequence[int],
    sparse: bool,
    allow_dense: bool,
    dense_margin: float,
) -> tuple[dict[int, Choice], dict[int, dict[str, float]]]:
    """Per bucket, the fp8 kernel `choose_fp8_plan` picks from graph-replay times over `forms`
    in rotation, and every candidate's microseconds per call (bf16 dense cuBLAS too, for the
    report)."""
    times: dict[int, dict[str, float]] = {}
    configs: dict[int, dict[str, CsltConfig | MmaConfig]] = {}
    k = forms[0].dense.shape[1]
    for m in buckets:
        x = torch.randn(m, k, dtype=forms[0].dense.dtype, device=forms[0].dense.device)
        cands = [FP8_DENSE, FP8_DENSE_UNSCALED]
        cfgs: dict[str, CsltConfig | MmaConfig] = {}
        if sparse:
            cands.append(FP8_CUSPARSELT)
            cfgs[FP8_CUSPARSELT] = fp8_cslt_best_config(
                [f.packed for f in forms if f.packed is not None], x
            )
            q, q_scale = quantize_tokens(x)
            scales = [f.weight.scale for f in forms]
            for backend, weights in (
                (FP8_MMA, [f.mma for f in forms]),
                (FP8_MMA_CSLT, [f.cslt for f in forms]),
            ):
                shapes = e4m3_candidates(m, cslt=backend == FP8_MMA_CSLT)
                if not shapes or any(w is None for w in weights):
                    continue  # (above MAX_TOKENS only the buffer's prefill shapes, on sm_90)
                mweights = [w for w in weights if w is not None]
                cfgs[backend], _ = mma_best_config(
                    mweights,
                    q,
                    forms[0].bias,
                    configs=shapes,
                    fp8_scales=(q_scale, scales),
                    out_dtype=x.dtype,
                )
                cands.append(backend)
        for b in [c for c in cands if c != FP8_DENSE]:
            if not _agrees(b, forms[0], x, cfgs):
                warnings.warn(
                    f"sparsify(dtype='fp8'): {b} is more than {AGREE_TOLERANCE:g} of the largest "
                    "output away from the fp8 reference on a "
                    f"{forms[0].weight.out_features}x{k} layer at {m} tokens; not used",
                    stacklevel=3,
                )
                cands.remove(b)
        configs[m] = cfgs
        times[m] = {b: _time_us(b, forms, x, cfgs) for b in (*cands, DENSE)}
    chosen = choose_fp8_plan(times, sparse=sparse, allow_dense=allow_dense, margin=dense_margin)
    plan = {}
    for m, best in chosen.items():
        config = configs[m].get(best)
        plan[m] = Choice(
            best,
            config if isinstance(config, CsltConfig) else None,
            config if isinstance(config, MmaConfig) else None,
        )
    return plan, times


def choose_fp8_plan(
    times_us: Mapping[int, Mapping[str, float]],
    *,
    sparse: bool,
    allow_dense: bool = False,
    margin: float = 0.05,
) -> dict[int, str]:
    """Per bucket, the fp8 backend a layer runs, from every candidate's graph-replay
    microseconds per bucket (`times_us[m][backend]`; other keys, e.g. bf16 `DENSE`, ignored).

    A layer holds one weight form: one 2:4 layout (cuSPARSELt's buffer, read by cuSPARSELt
    and by our mma.sp kernel, or the mma fragments where they serve every bucket) or, where
    its buckets add up to more than `margin` (a fraction) faster, the dense e4m3 weight
    alone. With `allow_dense` a 2:4 layer
    may also keep the dense e4m3 weight beside its 2:4 layout for the buckets fp8 dense wins
    by more than `margin` (up to 1.5625 bytes per weight). Without `sparse`: fp8 dense only.
    """
    dense = set(FP8_DENSE_KERNELS)

    def pick(layout: set[str], t: Mapping[str, float]) -> str | None:
        def best(kinds: set[str]) -> str | None:
            found = [b for b in t if b in kinds]
            return min(found, key=lambda b: t[b]) if found else None

        sparse_best, dense_best = best(layout - dense), best(layout & dense)
        if sparse_best is None or dense_best is None:
            return sparse_best or dense_best
        return dense_best if t[dense_best] < t[sparse_best] * (1 - margin) else sparse_best

    def plan_and_total(layout: set[str]) -> tuple[dict[int, str], float]:
        plan = {m: pick(layout, t) for m, t in times_us.items()}
        if any(b is None for b in plan.values()):
            return {}, float("inf")  # a bucket this layout's kernels do not serve
        chosen = {m: b for m, b in plan.items() if b is not None}
        return chosen, sum(times_us[m][b] for m, b in chosen.items())

    dense_plan, dense_total = plan_and_total(dense)
    if not sparse:
        return dense_plan
    sparse_layouts = [set(FP8_CSLT_KERNELS), {FP8_MMA}]
    layouts = sparse_layouts + ([lay | dense for lay in sparse_layouts] if allow_dense else [])
    plan, total = min((plan_and_total(lay) for lay in layouts), key=lambda pt: pt[1])
    if dense_total < total * (1 - margin) or not plan:
        return dense_plan
    return plan


def _plan_runs(layer: Fp8Linear, dtype: torch.dtype) -> bool:
    """Each cuSPARSELt bucket of `layer`'s (cached) plan runs once on `dtype` inputs
    (`cached_choices_run`)."""

    def run(m: int, _choice: Choice) -> None:
        x = torch.zeros(m, layer.in_features, dtype=dtype, device=layer.scale.device)
        layer.linear_2d(x)

    return cached_choices_run(layer.plan.items(), FP8_CUSPARSELT, run)


@torch.no_grad()
def sparsify_fp8(
    model: nn.Module,
    *,
    sparse: bool = True,
    batch_sizes: Iterable[int] | None = None,
    strict: bool = False,
    allow_dense: bool = False,
    dense_margin: float = 0.05,
    tune_layers: int = 8,
    plan_cache: bool | str | os.PathLike[str] = True,
    fuse_siblings: bool = False,
    verbose: bool = False,
) -> SparsifyReport:
    """Replace the Linears of `model` (in place) by `Fp8Linear`s; see `ria.sparsify(model,
    dtype="fp8")`. With `sparse`, the 2:4 layers (others are skipped with their reason);
    without, every fp16/bf16 CUDA Linear but the output embedding (fp8 dense). With
    `fuse_siblings`, convertible Linears that read the same tensor are fused first
    (`sparsify.fuse_convertible_siblings`): one quantization of their input and one GEMM."""
    from .sparsify import (
        SparseLayerReport,
        SparsifyReport,
        apply_orders_for_kernels,
        cusparselt_version_warning,
        dense_masked_experts,
        fuse_convertible_siblings,
        group_layers,
        settle_orders_if_unconverted,
        shape_plan_key,
        token_buckets,
    )

    t0 = time.perf_counter()
    buckets = token_buckets(batch_sizes)
    require_int("tune_layers", tune_layers, minimum=1)
    label = "fp8" if sparse else "fp8 dense"
    report = SparsifyReport(False, "", label, buckets)
    report.layers.extend(dense_masked_experts(model))
    reason = fp8_status()
    if reason is not None:
        report.reason = f"{reason}: model left unchanged"
        return report
    if sparse and torch.backends.cusparselt.is_available():
        report.cusparselt_version = cusparselt_version()
        note = cusparselt_version_warning(report.cusparselt_version)
        if note is not None:
            report.warnings.append(note)
            warnings.warn(note, stacklevel=2)
    cache = None if plan_cache is False else PlanCache(None if plan_cache is True else plan_cache)
    report.plan_cache = None if cache is None else str(cache.directory)
    clear_generators(model)

    def why_not(why: str | None, n: int, k: int) -> str | None:
        if not sparse:
            why = _dense_fp8_reason(why)
        why = why or fp8_dense_shape_status(n, k)
        if why is None and sparse:
            why = fp8_cslt_shape_status(n, k)
        return why

    if sparse:  # fp8 dense reads any column order
        apply_orders_for_kernels(model, why_not, strict)
    if fuse_siblings:
        fuse_convertible_siblings(model, why_not, report)
    groups = group_layers(model, why_not, report)
    use_mma = sparse and mma_status() is None
    usable = set(FP8_DENSE_KERNELS)
    if sparse:
        usable |= {FP8_CUSPARSELT, FP8_MMA, FP8_MMA_CSLT} if use_mma else {FP8_CUSPARSELT}
    options = {
        "fp8": True,
        "sparse": sparse,
        "tune_layers": tune_layers,
        "allow_dense": allow_dense,
        "dense_margin": dense_margin,
    }
    versions = library_versions() if cache is not None else {}

    def forms(mod: nn.Linear) -> _Forms:
        w = quantize_weight(weight_in_nm_order(mod) if sparse else mod.weight.detach())
        bias = None if mod.bias is None else mod.bias.detach()
        f = _Forms(w, bias, mod.weight.detach(), torch.ones(1, device=w.scale.device))
        if sparse:
            f.packed = fp8_cslt_compress(w)
        if use_mma:
            f.mma = pack_mma24_e4m3(w.values)
            if f.packed is not None and w.in_features % MMA_PAIR_COLS == 0:
                f.cslt = _cslt_layout(w, f.packed)
        return f

    for shape, members in groups.items():
        n, k = shape[0], shape[1]
        key = shape_plan_key(shape, buckets, options, versions, FP8_BACKENDS)
        entry = None if cache is None else cache.load(key, buckets, usable)
        first = None if entry is None else fp8_layer(members[0][1], entry.graph)
        if cache is not None and first is not None and not _plan_runs(first, shape[2]):
            warnings.warn(
                f"sparsify plan cache: {cache.path(key)} names a cuSPARSELt algorithm this "
                "library refuses; tuning again",
                stacklevel=2,
            )
            entry, first = None, None
        source = "cache"
        if entry is None:
            tuned = [forms(mod) for _, mod in members[:tune_layers]]
            plan, times = _tune(tuned, buckets, sparse, allow_dense, dense_margin)
            entry = TunedPlan(graph=plan, eager=plan, times_us=times)
            if cache is not None:
                cache.store(key, entry)
            source = "tuned"
        for i, (name, mod) in enumerate(members):
            new = first if i == 0 and first is not None else fp8_layer(mod, entry.graph)
            replace_module(model, name, new)
            report.layers.append(
                SparseLayerReport(
                    name,
                    n,
                    k,
                    converted=True,
                    plan={b: c.backend for b, c in new.plan.items()},
                    times_us=entry.times_us,
                    dense_bytes=tensor_bytes(mod.weight),
                    sparse_bytes=new.weight_bytes(),
                    plan_source=source,
                )
            )
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    report.layers.sort(key=lambda lr: order.get(lr.name, len(order)))
    report.applied = bool(report.converted)
    if sparse:
        settle_orders_if_unconverted(model, report)
    if not report.applied:
        report.reason = f"no {'2:4-sparse ' if sparse else ''}fp16/bf16 CUDA linear layer found"
    for note in fp8_slower_warnings(report.layers, sparse, dense_margin):
        report.warnings.append(note)
        warnings.warn(note, stacklevel=2)
    report.seconds = time.perf_counter() - t0
    if verbose:
        print(report)
        print(report.markdown())
    return report


def fp8_slower_warnings(
    layers: Sequence[SparseLayerReport], sparse: bool, margin: float
) -> list[str]:
    """The fp8 report's speed warnings, from the tuning times of the converted `layers`:
    token buckets where the chosen fp8 kernel is slower (by more than `margin`, a
    fraction) than the layer before conversion (cuBLAS in its own dtype), and, for 2:4
    layers, than fp8 dense (the same quantization without pruning)."""
    from .sparsify import slower_than_dense_warning

    notes = [
        slower_than_dense_warning(
            layers,
            margin,
            slower="fp8 is slower than the unconverted layers (cuBLAS in their dtype)",
            remedy="calls of those sizes run slower than before ria.sparsify",
        )
    ]
    if sparse:
        notes.append(
            slower_than_dense_warning(
                layers,
                margin,
                against=FP8_DENSE_KERNELS,
                slower="fp8 2:4 is slower than fp8 dense",
                remedy="allow_dense=True keeps the dense e4m3 weight for them (more memory)",
            )
        )
    return [note for note in notes if note is not None]


@torch.no_grad()
def _dense_fp8_reason(why: str | None) -> str | None:
    """Why a Linear cannot run fp8 dense, from why it cannot run 2:4 (`find_linears`):
    fp8 dense takes any pattern and any width."""
    return None if why is not None and why.startswith(("not 2:4", "in_features=")) else why


def quantize_linears(model: nn.Module, *, sparse: bool = True) -> list[str]:
    """Replace (in place) the fp16/bf16 Linears of `model` on any device by `Fp8Linear`s
    with the default plan (fp8 dense; off CUDA the reference), untuned: for measuring what
    fp8 does to a model's quality. With `sparse`, only the 2:4 ones. The output embedding
    stays. Returns the names converted."""
    from .sparsify import find_linears

    if sparse:  # folded orders applied as sparsify applies them
        apply_recorded_orders(model)
    done = []
    for name, mod, why in find_linears(model, require_cuda=False):
        if (why if sparse else _dense_fp8_reason(why)) is None:
            replace_module(model, name, fp8_layer(mod))
            done.append(name)
    return done
