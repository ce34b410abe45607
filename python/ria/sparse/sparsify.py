"""`sparsify(model)`: swap every 2:4 `nn.Linear` for a `Sparse24Linear`, choosing per layer
shape and per token-count bucket the kernel that measured fastest under CUDA-graph replay.
Fused MoE experts (3-D parameters) have no sparse kernel yet: they run dense with their
pruned zeros (dense-masked), and the report lists them as such.

Layers of one shape (out, in, dtype, bias) share a plan: they run the same kernels, so they
are timed together (a rotation over up to `tune_layers` of them, so the weights stream from
memory rather than L2, as they do in a real forward). Plans are cached on disk
(`plan_cache.py`), so converting the same model again takes seconds.

Defaults never cost memory: each converted layer keeps only its sparse forms (9/16 of the
dense bytes) and its dense weight is released; a dense copy is kept only with
`allow_dense=True`, for the buckets where cuBLAS measured faster.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .._checks import require_int
from .._torch import replace_module
from ..arch import expert_matrices, fused_experts
from ..errors import InvalidArgumentError, InvalidTypeError
from ..permutation import apply_recorded_orders, nm_order, settle_orders, weight_in_nm_order
from .cslt import (
    CsltConfig,
    cslt_best_config,
    cslt_compress,
    cslt_linear,
    cslt_shape_status,
    cslt_status,
    share_cslt_buffer,
)
from .cslt_lib import cusparselt_version
from .format import COLS_PER_WORD, Compact24, Mma24, check_24, pack_24, pack_mma24, tensor_bytes
from .fp8_linear import sparsify_fp8
from .generate import clear_generators as clear_generators
from .graphs import rotation_time_us
from .linear import (
    BACKENDS,
    CUSPARSELT,
    DENSE,
    EAGER_CALLS,
    MMA,
    MMA_CSLT,
    TRITON,
    Choice,
    Sparse24Linear,
)
from .mma_sp import MAX_TOKENS, MmaConfig, mma24_linear, mma_best_config, mma_status
from .plan_cache import PlanCache, TunedPlan, cached_choices_run, library_versions, plan_key
from .siblings import fuse_model_siblings
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
    "buckets_without_sparse_kernel",
    "build_forms",
    "choose_backend",
    "cusparselt_version_warning",
    "dense_masked_experts",
    "find_linears",
    "fuse_convertible_siblings",
    "group_layers",
    "mma_cslt_shape_status",
    "shape_plan_key",
    "slower_than_dense_warning",
    "sparse_layer",
    "sparsify",
    "token_buckets",
]


@dataclass
class SparseLayerReport:
    """What `sparsify` did with one `nn.Linear`.

    `plan` maps a token-count bucket to the backend chosen for calls inside CUDA graphs,
    `eager_plan` for eager calls; `times_us` / `eager_times_us` hold, per bucket, the
    microseconds per call measured for each candidate backend in that mode (shared by the
    layers of a shape).
    """

    name: str
    out_features: int
    in_features: int
    converted: bool
    reason: str = ""
    plan: dict[int, str] = field(default_factory=dict)
    times_us: dict[int, dict[str, float]] = field(default_factory=dict)
    eager_plan: dict[int, str] = field(default_factory=dict)
    eager_times_us: dict[int, dict[str, float]] = field(default_factory=dict)
    dense_bytes: int = 0
    sparse_bytes: int = 0
    plan_source: str = ""  # "cache" (read from the plan cache) or "tuned" (timed now)

    def speedup(
        self, bucket: int, eager: bool = False, against: Collection[str] = (DENSE,)
    ) -> float | None:
        """Time of the fastest of `against` (cuBLAS in the layer's dtype) over the chosen
        kernel's time at `bucket` under graph replay (or in eager calls), if both were
        measured."""
        times = (self.eager_times_us if eager else self.times_us).get(bucket, {})
        chosen = (self.eager_plan if eager else self.plan).get(bucket)
        base = [times[b] for b in against if b in times]
        if not base or chosen not in times:
            return None
        return min(base) / times[chosen]


@dataclass
class SparsifyReport:
    """Outcome of `sparsify`: whether anything was converted, why not, and per-layer detail."""

    applied: bool
    reason: str
    backend: str
    batch_sizes: tuple[int, ...]
    layers: list[SparseLayerReport] = field(default_factory=list)
    seconds: float = 0.0
    cusparselt_version: int | None = None  # the loaded library's (cslt_lib), e.g. 801
    plan_cache: str | None = None  # the plan cache directory, None when caching is off
    warnings: list[str] = field(default_factory=list)
    fused: list[tuple[str, ...]] = field(default_factory=list)  # sibling groups run as one

    @property
    def cusparselt(self) -> str | None:
        """The loaded cuSPARSELt as "major.minor.patch" (None without it)."""
        v = self.cusparselt_version
        return None if v is None else f"{v // 1000}.{v % 1000 // 100}.{v % 100}"

    @property
    def plans_from_cache(self) -> int:
        """Converted layers whose plan was read from the plan cache (not tuned)."""
        return sum(lr.plan_source == "cache" for lr in self.converted)

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
        """A per-layer table: backend per bucket (with speedup over dense under graph replay,
        and the eager plan's backend where it differs) and bytes."""
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
                cell = lr.plan[b] + ("" if s is None else f" {s:.2f}x")
                eager = lr.eager_plan.get(b, lr.plan[b])
                cells.append(cell if eager == lr.plan[b] else f"{cell} (eager: {eager})")
            ratio = lr.sparse_bytes / max(lr.dense_bytes, 1)
            lines.append(f"| {lr.name} | {shape} | " + " | ".join(cells) + f" | {ratio:.3f} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        experts = self.dense_masked_experts
        note = f"; {len(experts)} fused expert weights run dense-masked" if experts else ""
        if not self.applied:
            return f"sparsify: nothing converted ({self.reason}){note}"
        ratio = self.sparse_bytes / max(self.dense_bytes, 1)
        text = (
            f"sparsify: {len(self.converted)} layers converted, {len(self.skipped)} skipped; "
            f"weights {self.dense_bytes / 2**30:.2f} -> {self.sparse_bytes / 2**30:.2f} GiB "
            f"({ratio:.3f}x) in {self.seconds:.1f}s; {len(self.fused)} sibling groups fused; "
            f"plans of {self.plans_from_cache} layers from the cache; "
            f"cuSPARSELt {self.cusparselt or 'not loaded'}{note}"
        )
        return "\n".join([text, *(f"warning: {w}" for w in self.warnings)])


def token_buckets(batch_sizes: Iterable[int] | None) -> tuple[int, ...]:
    """`batch_sizes` (None: `DEFAULT_BATCH_SIZES`) as sorted distinct ints, each >= 1
    (numpy integers welcome: they key the plan cache's JSON)."""
    values = DEFAULT_BATCH_SIZES if batch_sizes is None else batch_sizes
    try:
        buckets = tuple(sorted({require_int("batch_sizes", b, minimum=1) for b in values}))
    except (InvalidArgumentError, InvalidTypeError):
        buckets = ()
    if not buckets:
        raise InvalidArgumentError(
            f"batch_sizes must be positive integer token counts, got {batch_sizes!r}"
        )
    return buckets


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
            reason = check_24(weight_in_nm_order(mod))
        found.append((name, mod, reason))
    return found


@dataclass
class WeightForms:
    """The weight forms of one layer that the candidate kernels need."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    packed: torch.Tensor | None = None
    compact: Compact24 | None = None
    mma: Mma24 | None = None

    def cslt_packed(self) -> torch.Tensor:
        """`packed`, which `build_forms` makes whenever cuSPARSELt is a candidate."""
        assert self.packed is not None
        return self.packed


def _run(
    backend: str, f: WeightForms, x: torch.Tensor, cfg: CsltConfig | MmaConfig | None
) -> torch.Tensor:
    mcfg = cfg if isinstance(cfg, MmaConfig) else None
    if backend == MMA:
        assert f.mma is not None  # build_forms makes it whenever mma is a candidate
        return mma24_linear(x, f.mma, f.bias, config=mcfg)
    if backend == MMA_CSLT:
        assert f.compact is not None  # in cuSPARSELt's layout: _tune_group checks it
        return mma24_linear(x, f.compact, f.bias, config=mcfg)
    if backend == TRITON:
        return sparse24_linear(x, f.compact, f.bias)
    if backend == CUSPARSELT:
        ccfg = cfg if isinstance(cfg, CsltConfig) else CsltConfig()
        return cslt_linear(x, f.cslt_packed(), f.bias, ccfg)
    return torch.nn.functional.linear(x, f.weight, f.bias)


def _candidates(backend: str, m: int, usable: set[str]) -> list[str]:
    if backend != "auto":
        return [backend]
    too_many = {TRITON: MAX_M, MMA: MAX_TOKENS, MMA_CSLT: MAX_TOKENS}
    return [b for b in BACKENDS if b in usable and m <= too_many.get(b, m)]


def buckets_without_sparse_kernel(
    backend: str, buckets: Sequence[int], usable: set[str]
) -> list[int]:
    """The token-count buckets that no sparse kernel in `usable` serves (with `backend`
    "auto"; a named backend serves them all): only dense cuBLAS could run them."""
    return [m for m in buckets if not set(_candidates(backend, m, usable)) - {DENSE}]


def choose_backend(times_us: dict[str, float], *, allow_dense: bool, dense_margin: float) -> str:
    """The backend to run for one bucket, from its measured microseconds per call.

    The fastest sparse kernel, unless `allow_dense` and dense cuBLAS beats it by more than
    `dense_margin` (a fraction: 0.05 = 5%). Without `allow_dense` a bucket that dense wins
    still runs the best sparse kernel, so no dense copy of the weight is needed.
    """
    sparse = [b for b in times_us if b != DENSE]
    if not sparse:
        raise InvalidArgumentError(f"no sparse kernel among the timed backends {list(times_us)}")
    best = min(sparse, key=lambda b: times_us[b])
    if allow_dense and DENSE in times_us and times_us[DENSE] < times_us[best] * (1 - dense_margin):
        return DENSE
    return best


def _time_us(
    backend: str,
    forms: Sequence[WeightForms],
    x: torch.Tensor,
    cfg: CsltConfig | MmaConfig | None,
) -> float:
    """Microseconds per call of `backend` on `forms` in rotation, under graph replay."""
    return rotation_time_us(lambda f: _run(backend, f, x, cfg), forms)


def _eager_time_us(
    backend: str,
    forms: Sequence[WeightForms],
    x: torch.Tensor,
    cfg: CsltConfig | MmaConfig | None,
    rounds: int = 5,
) -> float:
    """Microseconds per eager call (host and GPU: whichever is slower) over `forms`, each
    run as the `Sparse24Linear` it would become runs an eager call (`linear_2d`: its
    prepared launch, cuSPARSELt with its plan kept)."""
    choice = _make_choice(backend, {} if cfg is None else {backend: cfg})
    plan = {x.shape[0]: choice}
    layers = [sparse_layer(f, TunedPlan(plan, plan)) for f in forms]
    for layer in layers:  # warm: first calls compile, prepare launches and plans
        layer.linear_2d(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(rounds):
        for layer in layers:
            layer.linear_2d(x)
    torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - t0) / (rounds * len(layers))


def _tune_group(
    forms: Sequence[WeightForms],
    batch_sizes: Sequence[int],
    backend: str,
    usable: set[str],
    allow_dense: bool,
    dense_margin: float,
    cslt_sweep: bool,
) -> TunedPlan:
    """Plans for one layer shape: time each candidate at each bucket on `forms` in rotation,
    under graph replay and eagerly (dense too, for the report, whether or not it may be
    chosen)."""
    tuned = TunedPlan({}, {})
    configs: dict[int, BucketConfigs] = {}
    k = forms[0].weight.shape[1]
    dtype, device = forms[0].weight.dtype, forms[0].weight.device
    if not all(_reads_cslt_in_place(f) for f in forms):
        usable = usable - {MMA_CSLT}
    for m in batch_sizes:
        x = torch.randn(m, k, dtype=dtype, device=device)
        cands = _candidates(backend, m, usable)
        timed = len(cands) > 1
        cfgs: BucketConfigs = {}
        if CUSPARSELT in cands:
            packed = [f.cslt_packed() for f in forms]
            sweep = cslt_sweep and timed
            cfgs[CUSPARSELT] = cslt_best_config(packed, x, forms[0].bias, sweep=sweep)
        if MMA in cands and timed:
            frags = [f.mma for f in forms if f.mma is not None]
            cfgs[MMA], _ = mma_best_config(frags, x, forms[0].bias)
        if MMA_CSLT in cands and timed:
            tiled = [f.compact for f in forms if f.compact is not None]
            cfgs[MMA_CSLT], _ = mma_best_config(tiled, x, forms[0].bias)
        configs[m] = cfgs
        if not timed:
            tuned.graph[m] = tuned.eager[m] = _make_choice(cands[0], cfgs)
            continue
        for plan, times, timer in (
            (tuned.graph, tuned.times_us, _time_us),
            (tuned.eager, tuned.eager_times_us, _eager_time_us),
        ):
            times[m] = {b: timer(b, forms, x, cfgs.get(b)) for b in cands}
            plan[m] = _choice(times[m], allow_dense, dense_margin, cfgs)
    keep_one_layout(tuned, configs, allow_dense=allow_dense, dense_margin=dense_margin)
    return tuned


def _reads_cslt_in_place(f: WeightForms) -> bool:
    """Whether the mma.sp kernel can read `f`'s cuSPARSELt buffer in place: its compact
    form is the buffer's "cslt" view (`share_cslt_buffer` checked the layout on its data)."""
    return f.compact is not None and f.compact.layout == "cslt"


# Backends by the 2:4 layout they read: a layer holds one (cuSPARSELt's buffer also serves
# the Triton kernel and mma.sp in place; the mma fragment layout serves only mma).
LAYOUTS = ({CUSPARSELT, TRITON, MMA_CSLT}, {MMA})
# Per bucket, the configuration each tuned backend was timed with (cuSPARSELt: CsltConfig;
# mma, mma_cslt: MmaConfig).
BucketConfigs = dict[str, CsltConfig | MmaConfig]


def keep_one_layout(
    tuned: TunedPlan,
    configs: dict[int, BucketConfigs],
    *,
    allow_dense: bool,
    dense_margin: float,
) -> None:
    """Make `tuned`'s plans (in place) read one 2:4 layout, so a layer holds one sparse copy.

    Where the plans mix backends of both `LAYOUTS`, every timed bucket is re-picked within
    the layout that can serve all of them (mma serves at most `MAX_TOKENS` tokens) and whose
    best graph-replay times add up to less. `configs`: per bucket, the configuration each
    backend's time was measured with.
    """
    if not all(tuned.backends() & layout for layout in LAYOUTS):
        return
    extra = {DENSE} if allow_dense else set()

    def total(layout: set[str]) -> float:
        cost = 0.0
        for times in tuned.times_us.values():
            if not layout & set(times):
                return float("inf")  # a bucket this layout's kernels do not serve
            cost += min(us for b, us in times.items() if b in layout | extra)
        return cost

    layout = min(LAYOUTS, key=total)
    for plan, timings in ((tuned.graph, tuned.times_us), (tuned.eager, tuned.eager_times_us)):
        for m, times in timings.items():
            kept = {b: us for b, us in times.items() if b in layout or b == DENSE}
            plan[m] = _choice(kept, allow_dense, dense_margin, configs[m])


def _choice(
    times: dict[str, float], allow_dense: bool, dense_margin: float, configs: BucketConfigs
) -> Choice:
    best = choose_backend(times, allow_dense=allow_dense, dense_margin=dense_margin)
    return _make_choice(best, configs)


def _make_choice(backend: str, configs: BucketConfigs) -> Choice:
    cfg = configs.get(backend)
    return Choice(
        backend,
        cfg if isinstance(cfg, CsltConfig) else None,
        cfg if isinstance(cfg, MmaConfig) else None,
    )


def build_forms(mod: nn.Linear, need: set[str]) -> WeightForms:
    """The weight forms of `mod` that the backends in `need` read, from its weight in
    `nm_order` (referenced, not copied, when it has none)."""
    f = WeightForms(
        weight=weight_in_nm_order(mod), bias=None if mod.bias is None else mod.bias.detach()
    )
    if need & {CUSPARSELT, MMA_CSLT}:
        f.packed = cslt_compress(f.weight)
    if need & {TRITON, MMA_CSLT}:
        f.compact = pack_24(f.weight)
        if f.packed is not None:  # tune on the layout the layer will run
            f.compact = share_cslt_buffer(f.compact, f.packed)
    if MMA in need:
        f.mma = pack_mma24(f.weight)
    return f


def sparse_layer(
    f: WeightForms, tuned: TunedPlan, input_order: torch.Tensor | None = None
) -> Sparse24Linear:
    """The `Sparse24Linear` for `tuned`, holding only the forms its plans use; it reads its
    input through `input_order` when the weight is stored in a free channel order."""
    used = tuned.backends()
    n, k = f.weight.shape
    return Sparse24Linear(
        k,
        n,
        tuned.graph,
        eager_plan=tuned.eager,
        packed=f.packed if CUSPARSELT in used else None,
        compact=f.compact if used & {TRITON, MMA_CSLT} else None,
        mma=f.mma if MMA in used else None,
        weight=f.weight if DENSE in used else None,
        bias=f.bias,
        input_order=input_order,
    )


# (out_features, in_features, dtype, has bias, device): layers that share one plan.
_ShapeKey = tuple[int, int, torch.dtype, bool, str]
# (name, layer); the layer becomes None once it is replaced.
_Member = tuple[str, nn.Linear | None]


def _usable_backends(backend: str) -> tuple[set[str], str | None]:
    """Backends that can run here (dense included with "auto", for timing), and the reason
    nothing can (or None)."""
    if backend not in ("auto", CUSPARSELT, TRITON, MMA, MMA_CSLT):
        raise InvalidArgumentError(
            f"backend must be 'auto', 'cusparselt', 'triton', 'mma' or 'mma_cslt', got {backend!r}"
        )
    if not torch.cuda.is_available():
        return set(), "CUDA is not available (so no cuSPARSELt): model left unchanged"
    why = {CUSPARSELT: cslt_status(), TRITON: triton_status(), MMA: mma_status()}
    why[MMA_CSLT] = why[CUSPARSELT] or why[MMA]  # mma.sp over cuSPARSELt's buffer
    usable = {b for b, r in why.items() if r is None}
    if backend != "auto":
        if backend not in usable:
            return set(), f"backend {backend!r} unavailable: {why[backend]}"
        return {backend}, None
    if not usable:
        reasons = "; ".join(f"{b}: {r}" for b, r in why.items())
        return set(), f"no sparse kernel can run ({reasons}): model left unchanged"
    return usable | {DENSE}, None


def dense_masked_experts(model: nn.Module) -> list[SparseLayerReport]:
    """One entry per fused experts parameter (shape of one expert's `(out, in)` matrix)."""
    found = []
    for path, experts in fused_experts(model).items():
        for pname, (param, transposed) in expert_matrices(experts).items():
            _, rows, cols = param.shape
            out, in_ = (cols, rows) if transposed else (rows, cols)
            name = f"{path}.{pname}" if path else pname
            found.append(SparseLayerReport(name, out, in_, False, DENSE_MASKED_EXPERTS))
    return found


def apply_orders_for_kernels(
    model: nn.Module, why_not: Callable[[str | None, int, int], str | None], strict: bool
) -> None:
    """Applies the folded orders recorded in `model` (`apply_recorded_orders`: weights N:M
    in storage, one gather a group), as the sparse kernels read them. With `strict`, a
    layer that is not 2:4 along them (`why_not(find_linears' reason, out, in)` says "not
    2:4") raises InvalidArgumentError naming it, the orders taken back out first: a
    refused model is left as it came."""
    apply_recorded_orders(model)
    if not strict:
        return
    for name, mod, why in find_linears(model):
        why = why_not(why, *mod.weight.shape)
        if why is not None and why.startswith("not 2:4"):
            settle_orders(model)
            raise InvalidArgumentError(f"{name}: {why}; nothing was changed")


def settle_orders_if_unconverted(model: nn.Module, report: SparsifyReport) -> None:
    """Takes the gathers `apply_orders_for_kernels` put in the forward back out when no layer
    was converted (nor fused): they would only cost time."""
    if not report.converted and not report.fused:
        settle_orders(model)


def group_layers(
    model: nn.Module,
    why_not: Callable[[str | None, int, int], str | None],
    report: SparsifyReport,
) -> dict[_ShapeKey, list[tuple[str, nn.Linear]]]:
    """Convertible layers grouped by (out, in, dtype, bias, device); the rest go to
    `report`. `why_not(why, out, in)`: the reason a layer is not converted, given
    `find_linears`'s (None: it is)."""
    groups: dict[_ShapeKey, list[tuple[str, nn.Linear]]] = {}
    for name, mod, why in find_linears(model):
        n, k = mod.weight.shape
        why = why_not(why, n, k)
        if why is not None:
            report.layers.append(SparseLayerReport(name, n, k, converted=False, reason=why))
            continue
        key = (n, k, mod.weight.dtype, mod.bias is not None, str(mod.weight.device))
        groups.setdefault(key, []).append((name, mod))
    return groups


def fuse_convertible_siblings(
    model: nn.Module, why_not: Callable[[str | None, int, int], str | None], report: SparsifyReport
) -> None:
    """Fuse the sibling groups (`siblings.fuse_model_siblings`) among the Linears that
    `group_layers` with `why_not` would convert; the groups go to `report.fused`, and why
    none could be looked for, if so, to its warnings."""
    convertible = [
        name for name, mod, why in find_linears(model) if why_not(why, *mod.weight.shape) is None
    ]
    report.fused, note = fuse_model_siblings(model, convertible)
    if note is not None:
        report.warnings.append(note)


def _why_not_for(backend: str) -> Callable[[str | None, int, int], str | None]:
    """`group_layers`'s reasons for `backend`: a backend named alone must fit the shape."""

    def why_not(why: str | None, n: int, k: int) -> str | None:
        if why is None and backend == CUSPARSELT:
            why = cslt_shape_status(n, k)
        if why is None and backend == MMA_CSLT:
            why = mma_cslt_shape_status(n, k)
        return why

    return why_not


def mma_cslt_shape_status(out_features: int, in_features: int) -> str | None:
    """None if mma.sp can read an `(N, K)` layer's cuSPARSELt buffer in place (the tiled
    metadata layout of `format.cslt_nibble_index`), else why not."""
    why = cslt_shape_status(out_features, in_features)
    if why is None and (in_features % COLS_PER_WORD or (out_features % 64 and out_features > 64)):
        why = "mma.sp over cuSPARSELt's buffer needs K % 32 == 0 and N % 64 == 0 (or N < 64)"
    return why


def _for_this_layer(tuned: TunedPlan, f: WeightForms, usable: set[str], name: str) -> TunedPlan:
    """`tuned`, unless it runs mma_cslt and this layer's cuSPARSELt buffer cannot be read in
    place (`share_cslt_buffer` found its metadata in another layout than the tuned layers'):
    then mma_cslt's buckets run the Triton kernel (or cuSPARSELt) for this layer, warned."""
    if MMA_CSLT not in tuned.backends() or _reads_cslt_in_place(f):
        return tuned
    other = Choice(TRITON) if TRITON in usable else Choice(CUSPARSELT, CsltConfig())
    warnings.warn(
        f"sparsify: {name}: cuSPARSELt's metadata is not in the expected layout; "
        f"its mma_cslt buckets run {other.backend}",
        stacklevel=4,
    )

    def swap(plan: dict[int, Choice]) -> dict[int, Choice]:
        return {m: other if c.backend == MMA_CSLT else c for m, c in plan.items()}

    return TunedPlan(swap(tuned.graph), swap(tuned.eager), tuned.times_us, tuned.eager_times_us)


def cusparselt_version_warning(version: int | None) -> str | None:
    """Why the loaded cuSPARSELt (`cslt_lib.cusparselt_version()`) is a bad choice,
    or None."""
    if version == 800:
        return (
            "cuSPARSELt 0.8.0 is loaded: PyTorch notes a Hopper performance regression in it, "
            "fixed in 0.8.1 (install a torch wheel that pins nvidia-cusparselt >= 0.8.1)"
        )
    return None


def slower_than_dense_warning(
    layers: Iterable[SparseLayerReport],
    margin: float,
    *,
    against: Collection[str] = (DENSE,),
    slower: str = "2:4 is slower than dense",
    remedy: str = "calls of those sizes run slower than the dense model; allow_dense=True "
    "keeps dense weights for them (more memory)",
) -> str | None:
    """Which token buckets the converted `layers` run slower than the fastest of `against`
    (the chosen kernel's time over that one's by more than `margin`, a fraction), under
    graph replay and in eager calls, or None: the warning the report carries, `slower`
    (what is slower than what) and `remedy` around the buckets."""
    converted = [lr for lr in layers if lr.converted]
    parts = []
    for eager, mode in ((False, "graph replay"), (True, "eager calls")):
        slow: dict[int, list[float]] = {}
        for lr in converted:
            for bucket in lr.eager_plan if eager else lr.plan:
                s = lr.speedup(bucket, eager, against)
                if s is not None and s < 1 - margin:
                    slow.setdefault(bucket, []).append(s)
        if slow:
            where = "; ".join(
                f"M<={b}: {len(v)} of {len(converted)} layers at {min(v):.2f}-{max(v):.2f}x"
                for b, v in sorted(slow.items())
            )
            parts.append(f"{mode}: {where}")
    if not parts:
        return None
    return f"{slower} in these token buckets ({'; '.join(parts)}): {remedy}"


def _cached_plan_works(entry: TunedPlan, f: WeightForms) -> bool:
    """Each cached cuSPARSELt choice runs once on `f` (`cached_choices_run`)."""
    k = f.weight.shape[1]

    def run(m: int, choice: Choice) -> None:
        x = torch.zeros(m, k, dtype=f.weight.dtype, device=f.weight.device)
        cslt_linear(x, f.cslt_packed(), f.bias, choice.cslt or CsltConfig())

    return cached_choices_run((*entry.graph.items(), *entry.eager.items()), CUSPARSELT, run)


def shape_plan_key(
    shape: _ShapeKey,
    buckets: Sequence[int],
    options: Mapping[str, Any],
    versions: Mapping[str, Any],
    backends: Sequence[str] = BACKENDS,
) -> dict[str, Any]:
    """The plan-cache key of a `group_layers` shape (out, in, dtype, bias, device) on its
    GPU (see `plan_cache.plan_key`)."""
    n, k, dtype, bias, device = shape
    return plan_key(
        device=torch.cuda.get_device_name(torch.device(device)),
        capability=torch.cuda.get_device_capability(torch.device(device)),
        out_features=n,
        in_features=k,
        dtype=dtype,
        bias=bias,
        buckets=buckets,
        options=options,
        versions=versions,
        backends=backends,
    )


class _Planner:
    """Finds (cache) or tunes (and caches) the plan of each layer shape."""

    def __init__(
        self,
        cache: PlanCache | None,
        buckets: tuple[int, ...],
        backend: str,
        options: dict[str, Any],
    ) -> None:
        self.cache, self.buckets, self.backend, self.options = cache, buckets, backend, options
        self.versions = library_versions() if cache is not None else {}

    def key(self, shape: _ShapeKey) -> dict[str, Any]:
        options = {"backend": self.backend, **self.options}
        return shape_plan_key(shape, self.buckets, options, self.versions)

    def cached(
        self, shape: _ShapeKey, first: nn.Linear, usable: set[str]
    ) -> tuple[TunedPlan, WeightForms] | None:
        """The cached plan of `shape` and the forms of its first layer, or None."""
        if self.cache is None:
            return None
        key = self.key(shape)
        allowed = usable if self.options["allow_dense"] else usable - {DENSE}
        entry = self.cache.load(key, self.buckets, allowed)
        if entry is None:
            return None
        f = build_forms(first, entry.backends())
        if not _cached_plan_works(entry, f):
            warnings.warn(
                f"sparsify plan cache: {self.cache.path(key)} names a cuSPARSELt algorithm "
                "this library refuses; tuning again",
                stacklevel=3,
            )
            return None
        return entry, f

    def tune(self, shape: _ShapeKey, sample: Sequence[WeightForms], usable: set[str]) -> TunedPlan:
        entry = _tune_group(
            sample,
            self.buckets,
            self.backend,
            usable,
            self.options["allow_dense"],
            self.options["dense_margin"],
            self.options["cslt_sweep"],
        )
        if self.cache is not None:
            self.cache.store(self.key(shape), entry)
        return entry


def _convert_group(
    model: nn.Module,
    shape: _ShapeKey,
    members: list[_Member],
    planner: _Planner,
    usable: set[str],
    tune_layers: int,
    report: SparsifyReport,
) -> None:
    """Replace every layer of one shape; each dense weight is released once replaced."""
    n, k = shape[0], shape[1]
    first = members[0][1]
    assert first is not None  # none is replaced yet
    found = planner.cached(shape, first, usable)
    sample: list[WeightForms | None]
    if found is not None:
        tuned, f0 = found
        source, sample = "cache", [f0]
    else:
        mods = [mod for _, mod in members[:tune_layers] if mod is not None]
        sample = [build_forms(mod, usable) for mod in mods]
        del mods  # the forms reference the weights; the layers go once replaced
        tuned = planner.tune(shape, [f for f in sample if f is not None], usable)
        source = "tuned"
    used = tuned.backends()
    for i, (name, mod) in enumerate(members):
        assert mod is not None  # each member is replaced once
        members[i] = (name, None)  # drop the dense layer as soon as it is replaced
        f = sample[i] if i < len(sample) else None
        if i < len(sample):
            sample[i] = None  # the new layer holds what it keeps; the rest is freed
        if f is None:
            f = build_forms(mod, used)
        elif used & {TRITON, MMA_CSLT} and f.compact is not None and f.packed is not None:
            f.compact = share_cslt_buffer(f.compact, f.packed)
        layer_plan = _for_this_layer(tuned, f, usable, name)
        # A free channel order (`ria.permutation.nm_order`) travels along.
        new = sparse_layer(f, layer_plan, nm_order(mod))
        replace_module(model, name, new)
        report.layers.append(
            SparseLayerReport(
                name,
                n,
                k,
                converted=True,
                plan={b: c.backend for b, c in layer_plan.graph.items()},
                times_us=tuned.times_us,
                eager_plan={b: c.backend for b, c in layer_plan.eager.items()},
                eager_times_us=tuned.eager_times_us,
                dense_bytes=tensor_bytes(mod.weight),
                sparse_bytes=new.weight_bytes(),
                plan_source=source,
            )
        )
        del mod, f, new, layer_plan


@torch.no_grad()
def sparsify(
    model: nn.Module,
    *,
    backend: str = "auto",
    batch_sizes: Iterable[int] | None = None,
    strict: bool = False,
    allow_dense: bool = False,
    dense_margin: float = 0.05,
    tune_layers: int = 8,
    cslt_sweep: bool = True,
    plan_cache: bool | str | os.PathLike[str] = True,
    fuse_siblings: bool = False,
    verbose: bool = False,
    dtype: str | None = None,
    sparse: bool = True,
) -> SparsifyReport:
    """Replace every 2:4-sparse `nn.Linear` of `model` (in place) by a `Sparse24Linear`.

    With the defaults, GPU memory never grows: each converted layer holds its 2:4 forms
    only (<= 0.6x its dense bytes) and its dense weight is released. Plans are cached on
    disk, so the second `sparsify` of the same model (same GPU, versions, settings) skips
    the tuning.

    Args:
        model: a CUDA model in fp16/bf16 whose pruned layers are 2:4 along their inputs.
        backend: "auto" (time dense, cuSPARSELt and the decode kernels per layer shape and
            bucket, keep the fastest sparse kernel), "cusparselt", "triton", "mma" or
            "mma_cslt" (that kernel everywhere; the mma.sp kernels take at most 64 tokens per
            call and split larger inputs). A layer keeps one 2:4 layout (`keep_one_layout`):
            cuSPARSELt's buffer, which serves cuSPARSELt, Triton and mma.sp ("mma_cslt"), or
            the mma fragments, which "auto" keeps only where they serve every bucket (all
            <= 64 tokens) faster.
        batch_sizes: token counts (batch x new tokens) to tune for; each is the upper bound
            of a bucket. Default `DEFAULT_BATCH_SIZES`.
        strict: raise InvalidArgumentError for a CUDA fp16/bf16 linear layer that is not 2:4
            instead of skipping it (the output embedding is always skipped), before any
            layer is changed.
        allow_dense: opt in to keeping a layer's dense weight beside its sparse forms, run by
            cuBLAS in the buckets where it beats the best sparse kernel by more than
            `dense_margin` (a fraction). Costs the dense bytes of those layers.
        tune_layers: layers of one shape timed in rotation.
        cslt_sweep: time every cuSPARSELt algorithm id per bucket (graph replay) instead of
            trusting cuSPARSELt's eager search alone.
        plan_cache: True (the default directory, `$RIA_CACHE/sparsify-plans`), a directory,
            or False (always tune, write nothing).
        fuse_siblings: run 2:4 Linears that read the same tensor (q/k/v, gate/up) as one
            layer over their concatenated rows (`ria.sparse.siblings`; found by one forward
            on the model's `dummy_inputs`); the report lists the groups in `fused`. Off by
            default: it speeds decode up but slows prefill (README "GPU").
        verbose: print the report table.
        dtype: None (keep the weights' fp16/bf16) or "fp8": e4m3 weights with per-row
            scales, tokens quantized per call, output in the model's dtype; the layers
            become `ria.sparse.fp8_linear.Fp8Linear`, each bucket running whichever
            measured fastest of our mma.sp kernel (<= 64 tokens; over e4m3 fragments or
            cuSPARSELt's e4m3 buffer), cuSPARSELt's fp8 2:4 GEMM and fp8 dense
            (`torch._scaled_mm`; a whole layer falls back to it where it is faster by
            more than `dense_margin`, and with `allow_dense` per bucket beside the 2:4
            form); plans are cached as for fp16/bf16, and `fuse_siblings` fuses as for
            them (one token quantization per group too). `backend` and `cslt_sweep` are for
            the fp16/bf16 kernels and must keep their defaults.
        sparse: with `dtype="fp8"`, False converts every fp16/bf16 Linear (but lm_head)
            to fp8 dense, 2:4 or not. Must be True without `dtype`.

    Returns:
        A `SparsifyReport`. Without CUDA (or without any usable sparse kernel) nothing is
        touched and `report.applied` is False with the reason.
    """
    if not 0 <= dense_margin < 1:
        raise InvalidArgumentError(f"dense_margin must be in [0, 1), got {dense_margin}")
    if dtype is not None or not sparse:
        if dtype != "fp8":
            raise InvalidArgumentError(
                f"dtype must be None or 'fp8' (sparse=False needs dtype='fp8'), got {dtype!r}"
            )
        if backend != "auto" or not cslt_sweep:
            raise InvalidArgumentError(
                "dtype='fp8' takes batch_sizes, strict, allow_dense, dense_margin, "
                "tune_layers, plan_cache, fuse_siblings, verbose and sparse only"
            )
        return sparsify_fp8(
            model, sparse=sparse, batch_sizes=batch_sizes, strict=strict,
            allow_dense=allow_dense, dense_margin=dense_margin, tune_layers=tune_layers,
            plan_cache=plan_cache, fuse_siblings=fuse_siblings, verbose=verbose,
        )  # fmt: skip
    t0 = time.perf_counter()
    buckets = token_buckets(batch_sizes)
    require_int("tune_layers", tune_layers, minimum=1)
    usable, reason = _usable_backends(backend)
    report = SparsifyReport(False, reason or "", backend, buckets)
    report.layers.extend(dense_masked_experts(model))
    if reason is not None:
        return report
    cache = None
    if plan_cache is not False:
        cache = PlanCache(None if plan_cache is True else plan_cache)
        report.plan_cache = str(cache.directory)
    if CUSPARSELT in usable:
        report.cusparselt_version = cusparselt_version()
        note = cusparselt_version_warning(report.cusparselt_version)
        if note is not None:
            report.warnings.append(note)
            warnings.warn(note, stacklevel=2)
    clear_generators(model)  # their graphs replay the layers about to be replaced
    apply_orders_for_kernels(model, _why_not_for(backend), strict)
    if fuse_siblings:
        fuse_convertible_siblings(model, _why_not_for(backend), report)

    options = {
        "allow_dense": allow_dense,
        "dense_margin": dense_margin,
        "tune_layers": tune_layers,
        "cslt_sweep": cslt_sweep,
        "eager_calls": EAGER_CALLS,  # eager plans timed on another call path are stale
    }
    planner = _Planner(cache, buckets, backend, options)
    for shape, members in group_layers(model, _why_not_for(backend), report).items():
        n, k = shape[0], shape[1]
        shape_usable = usable - ({CUSPARSELT} if cslt_shape_status(n, k) else set())
        if mma_cslt_shape_status(n, k) is not None:
            shape_usable -= {MMA_CSLT}
        if max(buckets) > MAX_TOKENS and shape_usable & LAYOUTS[0]:
            # mma's layout cannot serve every bucket, so keep_one_layout would drop it:
            # neither pack nor time it.
            shape_usable -= {MMA}
        # A layer some bucket could run only dense stays an nn.Linear: without allow_dense
        # it would keep a dense copy beside its sparse one, and with no bucket sparse it
        # would be a dense layer in another form.
        bare = buckets_without_sparse_kernel(backend, buckets, shape_usable)
        if bare and (not allow_dense or len(bare) == len(buckets)):
            why = cslt_shape_status(n, k) or "cuSPARSELt is unavailable"
            if len(bare) < len(buckets):
                why = (
                    f"no sparse kernel runs {max(bare)} tokens at this shape ({why}); "
                    "allow_dense=True converts it with dense buckets"
                )
            report.layers.extend(SparseLayerReport(name, n, k, False, why) for name, _ in members)
            continue
        _convert_group(model, shape, [*members], planner, shape_usable, tune_layers, report)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    report.layers.sort(key=lambda lr: order.get(lr.name, len(order)))
    report.applied = bool(report.converted)
    settle_orders_if_unconverted(model, report)
    if not report.applied:
        report.reason = "no 2:4-sparse fp16/bf16 CUDA linear layer found"
    note = slower_than_dense_warning(report.layers, dense_margin)
    if note is not None:
        report.warnings.append(note)
        warnings.warn(note, stacklevel=2)
    report.seconds = time.perf_counter() - t0
    if verbose:
        print(report)
        print(report.markdown())
    return report
