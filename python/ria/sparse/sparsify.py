"""`sparsify(model)`: swap every 2:4 `nn.Linear` for a `Sparse24Linear`, choosing per layer
shape and per token-count bucket the kernel that measured fastest under CUDA-graph replay.
Fused MoE experts (3-D parameters) have no sparse kernel yet: they run dense with their
pruned zeros (dense-masked), and the report lists them as such.

Layers of one shape (out, in, dtype, bias) share a plan: they run the same kernels, so they
are timed together (a rotation over up to `tune_layers` of them, so the weights stream from
memory rather than L2, as they do in a real forward).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .._torch import replace_module
from ..arch import expert_matrices, fused_experts
from ..errors import InvalidArgumentError
from .cslt import (
    CsltConfig,
    cslt_best_config,
    cslt_compress,
    cslt_linear,
    cslt_shape_status,
    cslt_status,
    share_cslt_buffer,
)
from .format import Compact24, check_24, pack_24, tensor_bytes
from .graphs import time_call
from .linear import BACKENDS, CUSPARSELT, DENSE, TRITON, Choice, Sparse24Linear
from .triton_gemv import MAX_M, sparse24_linear, triton_status

DEFAULT_BATCH_SIZES = (1, 16, 64, 256, 1024, 4096)
DENSE_MASKED_EXPERTS = (
    "fused MoE experts: run dense-masked (dense kernels over the pruned zeros); "
    "no 2:4 kernel for experts yet"
)
HALF_TYPES = (torch.float16, torch.bfloat16)

__all__ = [
    "DEFAULT_BATCH_SIZES",
    "SparseLayerReport",
    "SparsifyReport",
    "WeightForms",
    "find_linears",
    "sparsify",
]


@dataclass
class SparseLayerReport:
    """What `sparsify` did with one `nn.Linear`.

    `plan` maps a token-count bucket to the backend chosen; `times_us` holds, per bucket, the
    microseconds per call measured for each candidate backend (shared by layers of a shape).
    """

    name: str
    out_features: int
    in_features: int
    converted: bool
    reason: str = ""
    plan: dict[int, str] = field(default_factory=dict)
    times_us: dict[int, dict[str, float]] = field(default_factory=dict)
    dense_bytes: int = 0
    sparse_bytes: int = 0

    def speedup(self, bucket: int) -> float | None:
        """Dense time over the chosen kernel's time at `bucket`, if both were measured."""
        times = self.times_us.get(bucket, {})
        chosen = self.plan.get(bucket)
        if DENSE not in times or chosen not in times:
            return None
        return times[DENSE] / times[chosen]


@dataclass
class SparsifyReport:
    """Outcome of `sparsify`: whether anything was converted, why not, and per-layer detail."""

    applied: bool
    reason: str
    backend: str
    batch_sizes: tuple[int, ...]
    layers: list[SparseLayerReport] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def converted(self) -> list[SparseLayerReport]:
        return [lr for lr in self.layers if lr.converted]

    @property
    def skipped(self) -> list[SparseLayerReport]:
        return [lr for lr in self.layers if not lr.converted]

    @property
    def dense_masked_experts(self) -> list[SparseLayerReport]:
        """Fused expert weights, which run dense with their pruned zeros."""
        return [lr for lr in self.layers if lr.reason == DENSE_MASKED_EXPERTS]

    @property
    def dense_bytes(self) -> int:
        """Dense weight bytes of the converted layers (before)."""
        return sum(lr.dense_bytes for lr in self.converted)

    @property
    def sparse_bytes(self) -> int:
        """Weight bytes the converted layers hold now (all kept forms)."""
        return sum(lr.sparse_bytes for lr in self.converted)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dense_bytes"], d["sparse_bytes"] = self.dense_bytes, self.sparse_bytes
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def markdown(self, max_rows: int | None = None) -> str:
        """A per-layer table: backend per bucket (with speedup over dense) and bytes."""
        head = "| layer | shape | " + " | ".join(f"M<={b}" for b in self.batch_sizes)
        lines = [head + " | weight bytes (sparse/dense) |"]
        lines.append("|" + "---|" * (3 + len(self.batch_sizes)))
        rows = self.layers if max_rows is None else self.layers[:max_rows]
        for lr in rows:
            shape = f"{lr.out_features}x{lr.in_features}"
            if not lr.converted:
                cells = ["-"] * len(self.batch_sizes)
                lines.append(f"| {lr.name} | {shape} | " + " | ".join(cells) + f" | {lr.reason} |")
                continue
            cells = []
            for b in self.batch_sizes:
                s = lr.speedup(b)
                cells.append(lr.plan[b] + ("" if s is None else f" {s:.2f}x"))
            ratio = lr.sparse_bytes / max(lr.dense_bytes, 1)
            lines.append(f"| {lr.name} | {shape} | " + " | ".join(cells) + f" | {ratio:.3f} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        experts = self.dense_masked_experts
        note = f"; {len(experts)} fused expert weights run dense-masked" if experts else ""
        if not self.applied:
            return f"sparsify: nothing converted ({self.reason}){note}"
        ratio = self.sparse_bytes / max(self.dense_bytes, 1)
        return (
            f"sparsify: {len(self.converted)} layers converted, {len(self.skipped)} skipped; "
            f"weights {self.dense_bytes / 2**30:.2f} -> {self.sparse_bytes / 2**30:.2f} GiB "
            f"({ratio:.3f}x) in {self.seconds:.1f}s{note}"
        )


def find_linears(
    model: nn.Module, *, require_cuda: bool = True
) -> list[tuple[str, nn.Linear, str | None]]:
    """Every `nn.Linear` of `model` as (name, module, reason it cannot be converted or None).

    The output embedding (lm_head) is never converted; fp32 layers, layers off CUDA (when
    `require_cuda`) and layers that are not 2:4 sparse get a one-line reason.
    """
    get_out_emb = getattr(model, "get_output_embeddings", None)  # Hugging Face models have it
    out_emb = get_out_emb() if get_out_emb is not None else None
    found: list[tuple[str, nn.Linear, str | None]] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        reason: str | None
        if mod is out_emb:
            reason = "output embedding (lm_head) stays dense"
        elif mod.weight.dtype not in HALF_TYPES:
            reason = f"dtype {mod.weight.dtype}: 2:4 kernels need float16 or bfloat16"
        elif require_cuda and mod.weight.device.type != "cuda":
            reason = f"on {mod.weight.device.type}, not CUDA"
        else:
            reason = check_24(mod.weight)
        found.append((name, mod, reason))
    return found


@dataclass
class WeightForms:
    """The weight forms of one layer that the candidate kernels need."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    packed: torch.Tensor | None = None
    compact: Compact24 | None = None

    def cslt_packed(self) -> torch.Tensor:
        """`packed`, which `_build_forms` makes whenever cuSPARSELt is a candidate."""
        assert self.packed is not None
        return self.packed


def _run(backend: str, f: WeightForms, x: torch.Tensor, cfg: CsltConfig | None) -> torch.Tensor:
    if backend == TRITON:
        return sparse24_linear(x, f.compact, f.bias)
    if backend == CUSPARSELT:
        return cslt_linear(x, f.cslt_packed(), f.bias, cfg or CsltConfig())
    return torch.nn.functional.linear(x, f.weight, f.bias)


def _candidates(backend: str, m: int, usable: set[str]) -> list[str]:
    if backend != "auto":
        return [backend]
    return [b for b in BACKENDS if b in usable and not (b == TRITON and m > MAX_M)]


def _time_us(
    backend: str, forms: Sequence[WeightForms], x: torch.Tensor, cfg: CsltConfig | None, **kw: int
) -> float:
    """Microseconds per call of `backend` on `forms` in rotation, under graph replay."""

    def call() -> None:
        for f in forms:
            _run(backend, f, x, cfg)

    return 1000.0 * time_call(call, **kw) / len(forms)


def _tune_group(
    forms: Sequence[WeightForms],
    batch_sizes: Sequence[int],
    backend: str,
    usable: set[str],
    dense_margin: float,
    cslt_sweep: bool,
) -> tuple[dict[int, Choice], dict[int, dict[str, float]]]:
    """Plan for one layer shape: time each candidate at each bucket on `forms` in rotation."""
    plan: dict[int, Choice] = {}
    times: dict[int, dict[str, float]] = {}
    k = forms[0].weight.shape[1]
    dtype, device = forms[0].weight.dtype, forms[0].weight.device
    for m in batch_sizes:
        x = torch.randn(m, k, dtype=dtype, device=device)
        cands = _candidates(backend, m, usable)
        timed = len(cands) > 1
        cfg = None
        if CUSPARSELT in cands:
            packed = [f.cslt_packed() for f in forms]
            cfg = cslt_best_config(packed, x, forms[0].bias, sweep=cslt_sweep and timed)
        if not timed:
            plan[m] = Choice(cands[0], cfg)
            continue
        times[m] = {b: _time_us(b, forms, x, cfg) for b in cands}
        sparse = [b for b in cands if b != DENSE]
        best = min(sparse, key=lambda b: times[m][b])
        if DENSE in cands and times[m][DENSE] < times[m][best] * (1.0 - dense_margin):
            best = DENSE
        plan[m] = Choice(best, cfg if best == CUSPARSELT else None)
    return plan, times


def _build_forms(mod: nn.Linear, need: set[str]) -> WeightForms:
    f = WeightForms(
        weight=mod.weight.detach(), bias=None if mod.bias is None else mod.bias.detach()
    )
    if CUSPARSELT in need:
        f.packed = cslt_compress(f.weight)
    if TRITON in need:
        f.compact = pack_24(f.weight)
        if f.packed is not None:  # tune on the layout the layer will run
            f.compact = share_cslt_buffer(f.compact, f.packed)
    return f


# (out_features, in_features, dtype, has bias, device): layers that share one plan.
_ShapeKey = tuple[int, int, torch.dtype, bool, str]
# (name, layer); the layer becomes None once it is replaced.
_Member = tuple[str, nn.Linear | None]


def _usable_backends(backend: str, allow_dense: bool) -> tuple[set[str], str | None]:
    """Backends that can run here, and the reason nothing can (or None)."""
    if backend not in ("auto", CUSPARSELT, TRITON):
        raise InvalidArgumentError(
            f"backend must be 'auto', 'cusparselt' or 'triton', got {backend!r}"
        )
    if not torch.cuda.is_available():
        return set(), "CUDA is not available (so no cuSPARSELt): model left unchanged"
    why = {CUSPARSELT: cslt_status(), TRITON: triton_status()}
    usable = {b for b, r in why.items() if r is None}
    if backend != "auto":
        if backend not in usable:
            return set(), f"backend {backend!r} unavailable: {why[backend]}"
        return {backend}, None
    if not usable:
        reasons = "; ".join(f"{b}: {r}" for b, r in why.items())
        return set(), f"no sparse kernel can run ({reasons}): model left unchanged"
    if allow_dense:
        usable.add(DENSE)
    return usable, None


def _dense_masked_experts(model: nn.Module) -> list[SparseLayerReport]:
    """One entry per fused experts parameter (shape of one expert's `(out, in)` matrix)."""
    found = []
    for path, experts in fused_experts(model).items():
        for pname, (param, transposed) in expert_matrices(experts).items():
            _, rows, cols = param.shape
            out, in_ = (cols, rows) if transposed else (rows, cols)
            name = f"{path}.{pname}" if path else pname
            found.append(SparseLayerReport(name, out, in_, False, DENSE_MASKED_EXPERTS))
    return found


def _group_layers(
    model: nn.Module, backend: str, strict: bool, report: SparsifyReport
) -> dict[_ShapeKey, list[_Member]]:
    """Convertible layers grouped by (out, in, dtype, bias, device); the rest go to `report`."""
    groups: dict[_ShapeKey, list[_Member]] = {}
    for name, mod, why in find_linears(model):
        n, k = mod.weight.shape
        if why is None and backend == CUSPARSELT:
            why = cslt_shape_status(n, k)
        if why is not None:
            if strict and why.startswith("not 2:4"):
                raise InvalidArgumentError(f"{name}: {why}")
            report.layers.append(SparseLayerReport(name, n, k, converted=False, reason=why))
            continue
        key = (n, k, mod.weight.dtype, mod.bias is not None, str(mod.weight.device))
        groups.setdefault(key, []).append((name, mod))
    return groups


@torch.no_grad()
def sparsify(
    model: nn.Module,
    *,
    backend: str = "auto",
    batch_sizes: Iterable[int] | None = None,
    strict: bool = False,
    allow_dense: bool = True,
    dense_margin: float = 0.05,
    tune_layers: int = 8,
    cslt_sweep: bool = True,
    verbose: bool = False,
) -> SparsifyReport:
    """Replace every 2:4-sparse `nn.Linear` of `model` (in place) by a `Sparse24Linear`.

    Args:
        model: a CUDA model in fp16/bf16 whose pruned layers are 2:4 along their inputs.
        backend: "auto" (time dense, cuSPARSELt and the decode kernel per layer shape and
            bucket, keep the fastest), "cusparselt" or "triton" (that kernel everywhere).
        batch_sizes: token counts (batch x new tokens) to tune for; each is the upper bound
            of a bucket. Default `DEFAULT_BATCH_SIZES`.
        strict: raise InvalidArgumentError for a CUDA fp16/bf16 linear layer that is not 2:4
            instead of skipping it (the output embedding is always skipped).
        allow_dense: let "auto" keep a layer's dense weight for buckets where cuBLAS beats
            the sparse kernels by more than `dense_margin` (costs the dense bytes).
        tune_layers: layers of one shape timed in rotation.
        cslt_sweep: time every cuSPARSELt algorithm id per bucket (graph replay) instead of
            trusting cuSPARSELt's eager search alone.
        verbose: print the report table.

    Returns:
        A `SparsifyReport`. Without CUDA (or without any usable sparse kernel) nothing is
        touched and `report.applied` is False with the reason.
    """
    t0 = time.perf_counter()
    buckets = tuple(sorted(set(DEFAULT_BATCH_SIZES if batch_sizes is None else batch_sizes)))
    if not buckets or buckets[0] < 1:
        raise InvalidArgumentError(f"batch_sizes must be positive token counts, got {buckets}")
    usable, reason = _usable_backends(backend, allow_dense)
    report = SparsifyReport(False, reason or "", backend, buckets)
    report.layers.extend(_dense_masked_experts(model))
    if reason is not None:
        return report

    groups = _group_layers(model, backend, strict, report)
    for (n, k, *_), members in groups.items():
        shape_usable = set(usable)
        if cslt_shape_status(n, k) is not None:
            shape_usable.discard(CUSPARSELT)
        if not shape_usable - {DENSE}:
            for name, _ in members:
                report.layers.append(
                    SparseLayerReport(name, n, k, False, cslt_shape_status(n, k) or "")
                )
            continue
        sample = []
        for _, mod in members[:tune_layers]:
            assert mod is not None  # none is replaced yet
            sample.append(_build_forms(mod, shape_usable))
        plan, times = _tune_group(sample, buckets, backend, shape_usable, dense_margin, cslt_sweep)
        used = {c.backend for c in plan.values()}
        for i in range(len(members)):
            name, mod = members[i]
            assert mod is not None  # each member is replaced once
            members[i] = (name, None)  # drop the dense layer as soon as it is replaced
            f = sample[i] if i < len(sample) else _build_forms(mod, used)
            if CUSPARSELT not in used:
                f.packed = None
            compact = f.compact if TRITON in used else None
            if compact is not None and f.packed is not None:
                compact = share_cslt_buffer(compact, f.packed)
            new = Sparse24Linear(
                k,
                n,
                plan,
                packed=f.packed,
                compact=compact,
                weight=f.weight if DENSE in used else None,
                bias=f.bias,
            )
            replace_module(model, name, new)
            report.layers.append(
                SparseLayerReport(
                    name,
                    n,
                    k,
                    converted=True,
                    plan={b: c.backend for b, c in plan.items()},
                    times_us=times,
                    dense_bytes=tensor_bytes(mod.weight),
                    sparse_bytes=new.weight_bytes(),
                )
            )
            if i < len(sample):
                sample[i] = None  # type: ignore[call-overload]  # the new module holds it
            del mod, f
        del sample
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    report.layers.sort(key=lambda lr: order.get(lr.name, len(order)))
    report.applied = bool(report.converted)
    if not report.applied:
        report.reason = "no 2:4-sparse fp16/bf16 CUDA linear layer found"
    report.seconds = time.perf_counter() - t0
    if verbose:
        print(report)
        print(report.markdown())
    return report
