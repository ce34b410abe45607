"""Tuned `sparsify` plans cached on disk, so converting the same model again skips tuning.

One JSON file per layer shape and setting, named by a hash of its key. The key names
everything a plan depends on: the GPU (name and compute capability), the layer shape,
dtype and bias, the token buckets, the tuning options, the candidate backends and the
versions of torch, CUDA, cuSPARSELt, triton and ria. A file whose content does not parse,
whose key differs from the one asked for, or whose plan does not fit the request (other
buckets, an unknown or unusable backend) is ignored with a warning and replaced by a fresh
tuning: the cache can make `sparsify` faster, never wrong.

The directory is `$RIA_CACHE/sparsify-plans` (default: the platform cache, see
`ria.demo.cache_dir`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._core import __version__ as ria_version
from ..demo import cache_dir
from .cslt import CsltConfig
from .cslt_lib import cusparselt_version
from .linear import BACKENDS, MMA, MMA_CSLT, Choice
from .mma_sp import MmaConfig, kernel_fingerprint

FORMAT = 2  # bump when the file layout changes: old files then read as stale

__all__ = [
    "FORMAT",
    "PlanCache",
    "TunedPlan",
    "cached_choices_run",
    "default_plan_dir",
    "library_versions",
    "plan_key",
]


def cached_choices_run(
    choices: Iterable[tuple[int, Choice]], backend: str, run: Callable[[int, Choice], object]
) -> bool:
    """Run each cached `(bucket, choice)` of `backend` once through `run`: False when the
    library refuses one (a RuntimeError: e.g. a cuSPARSELt algorithm id another version
    does not have), which makes the cached plan stale."""
    for m, choice in choices:
        if choice.backend != backend:
            continue
        try:
            run(m, choice)
        except RuntimeError:
            return False
    return True


@dataclass
class TunedPlan:
    """One layer shape's kernels per token-count bucket, and the timings they were chosen
    from (microseconds per call, by backend).

    `graph` is for calls inside a CUDA graph (timed by graph replay: GPU time only);
    `eager` for calls outside one, timed call by call so each kernel's host cost counts
    (eager cuSPARSELt sets up its plan on every call).
    """

    graph: dict[int, Choice]
    eager: dict[int, Choice]
    times_us: dict[int, dict[str, float]] = field(default_factory=dict)
    eager_times_us: dict[int, dict[str, float]] = field(default_factory=dict)

    def backends(self) -> set[str]:
        """Every backend either plan runs."""
        return {c.backend for c in (*self.graph.values(), *self.eager.values())}


def default_plan_dir() -> Path:
    """`<ria cache>/sparsify-plans`, the cache used by `sparsify` by default."""
    return cache_dir() / "sparsify-plans"


def library_versions() -> dict[str, Any]:
    """Versions of everything whose kernels a plan was timed on."""
    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:  # pragma: no cover - CPU-only torch builds ship without triton
        triton_version = None
    cslt = cusparselt_version()
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cusparselt": cslt,
        "triton": triton_version,
        "ria": ria_version,
        # our kernels' sources and the launch shapes tuning times: a plan timed before a
        # kernel or shape was added or changed is re-tuned, not reused
        "kernels": kernel_fingerprint(),
    }


def plan_key(
    *,
    device: str,
    capability: tuple[int, int],
    out_features: int,
    in_features: int,
    dtype: torch.dtype,
    bias: bool,
    buckets: Sequence[int],
    options: Mapping[str, Any],
    versions: Mapping[str, Any],
    backends: Sequence[str] = BACKENDS,
) -> dict[str, Any]:
    """The JSON-able key of one layer shape's plan (see the module docstring);
    `backends`: every backend the plan could name (the fp16/bf16 ones by default)."""
    return {
        "format": FORMAT,
        "device": device,
        "capability": list(capability),
        "shape": [out_features, in_features],
        "dtype": str(dtype),
        "bias": bias,
        "buckets": list(buckets),
        "options": dict(sorted(options.items())),
        "backends": list(backends),
        "versions": dict(sorted(versions.items())),
    }


def _file_name(key: Mapping[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return f"plan-{digest[:32]}.json"


def _encode_choice(c: Choice) -> list[Any]:
    if c.mma is not None:
        # A launch shape by its fields that differ from MmaConfig's defaults.
        fields = {
            f.name: getattr(c.mma, f.name)
            for f in dataclasses.fields(c.mma)
            if getattr(c.mma, f.name) != f.default
        }
        return [c.backend, fields]
    if c.cslt is None:
        return [c.backend]
    return [c.backend, c.cslt.alg_id, c.cslt.split_k, c.cslt.split_k_mode]


def _encode_times(times: Mapping[int, Mapping[str, float]]) -> dict[str, Any]:
    return {str(b): dict(t) for b, t in times.items()}


def _encode(entry: TunedPlan) -> dict[str, Any]:
    return {
        "graph": {str(b): _encode_choice(c) for b, c in entry.graph.items()},
        "eager": {str(b): _encode_choice(c) for b, c in entry.eager.items()},
        "times_us": _encode_times(entry.times_us),
        "eager_times_us": _encode_times(entry.eager_times_us),
    }


def _decode_plan(
    raw: Mapping[str, Any], buckets: Sequence[int], usable: set[str]
) -> dict[int, Choice]:
    if sorted(int(b) for b in raw) != sorted(buckets):
        raise ValueError(f"buckets {sorted(int(b) for b in raw)} differ from {list(buckets)}")
    plan: dict[int, Choice] = {}
    for b, cell in raw.items():
        backend, *config = cell
        if backend not in usable:
            raise ValueError(f"backend {backend!r} cannot run here")
        if backend in (MMA, MMA_CSLT) and config and not isinstance(config[0], dict):
            raise ValueError(f"an mma.sp launch shape is one object of fields, got {config}")
        if len(config) == 1 and isinstance(config[0], dict):  # an mma.sp launch shape
            known = {f.name for f in dataclasses.fields(MmaConfig)}
            if not config[0].keys() <= known:
                raise ValueError(f"unknown launch-shape fields {sorted(config[0].keys() - known)}")
            plan[int(b)] = Choice(backend, mma=MmaConfig(**config[0]))  # validates the values
        elif config:  # a cuSPARSELt algorithm: id, split-k, split-k mode
            alg, split_k, mode = (int(v) for v in config)
            plan[int(b)] = Choice(backend, CsltConfig(alg, split_k, mode))
        else:
            plan[int(b)] = Choice(backend)
    return plan


def _decode_times(raw: Mapping[str, Any]) -> dict[int, dict[str, float]]:
    return {int(b): {str(k): float(us) for k, us in row.items()} for b, row in raw.items()}


def _decode(data: Mapping[str, Any], buckets: Sequence[int], usable: set[str]) -> TunedPlan:
    """The plan in `data`; raises ValueError/TypeError/KeyError if it does not fit."""
    return TunedPlan(
        graph=_decode_plan(data["graph"], buckets, usable),
        eager=_decode_plan(data["eager"], buckets, usable),
        times_us=_decode_times(data["times_us"]),
        eager_times_us=_decode_times(data["eager_times_us"]),
    )


class PlanCache:
    """Plans on disk under `directory` (created on first store)."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_plan_dir()

    def path(self, key: Mapping[str, Any]) -> Path:
        """The file that holds (or will hold) the plan of `key`."""
        return self.directory / _file_name(key)

    def load(
        self, key: Mapping[str, Any], buckets: Sequence[int], usable: set[str]
    ) -> TunedPlan | None:
        """The cached plan of `key`, or None (missing, or unusable with a warning)."""
        path = self.path(key)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            warnings.warn(
                f"sparsify plan cache: cannot read {path} ({e}); tuning again", stacklevel=2
            )
            return None
        try:
            data = json.loads(raw.decode("utf-8"))  # a bad byte is a ValueError too
            if data.get("key") != json.loads(json.dumps(key)):
                raise ValueError("its key differs from this layer's (stale or foreign file)")
            return _decode(data, buckets, usable)
        except (ValueError, TypeError, KeyError, AttributeError, IndexError, RecursionError) as e:
            warnings.warn(f"sparsify plan cache: ignoring {path}: {e}; tuning again", stacklevel=2)
            return None

    def store(self, key: Mapping[str, Any], entry: TunedPlan) -> Path | None:
        """Write `entry` atomically; returns the file, or None (with a warning) on failure."""
        path = self.path(key)
        data = {"key": key, **_encode(entry)}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".plan-", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1)
            os.replace(tmp, path)
        except OSError as e:
            warnings.warn(f"sparsify plan cache: cannot write {path} ({e})", stacklevel=2)
            return None
        return path
