"""Decode kernel: `y = x @ W.T (+ bias)` for few tokens, reading the compact 2:4 format.

At decode sizes (M <= 64 tokens) a linear layer is bound by reading its weight, so the
limit is set by bytes: the compact format is 9/16 of dense (see `format.py`), a ~1.78x
ceiling over a dense GEMV. Two kernels, both streaming the weight once per M tile:

- `_gemv_kernel` (M = 1): per 2:4 group, pick the two activations the kept indices point to
  with selects (no tensor cores, no dense tile): `acc += v0 * x[i0] + v1 * x[i1]`.
- `_mm_kernel` (M > 1): expand each group into its 4 dense columns in registers and feed
  four tensor-core dots `W[:, 4g + p] @ x[:, 4g + p].T`, p = 0..3, so no dense tile is built.

Triton is optional: `triton_status()` says why the kernels cannot run.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..errors import InvalidArgumentError
from .format import COLS_PER_WORD, Compact24

try:
    import triton
except ImportError:  # pragma: no cover - CPU-only torch builds ship without triton
    triton = None

__all__ = ["MAX_M", "sparse24_linear", "triton_status", "tuned_config"]

# Largest token count the kernels are offered for; beyond this they are compute-bound
# and cuSPARSELt / cuBLAS win.
MAX_M = 256
_AUTOTUNE = os.environ.get("RIA_TRITON_AUTOTUNE", "1") != "0"
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_status(device: torch.device | None = None) -> str | None:
    """None if the decode kernels can run (on `device`'s type), else why not."""
    if triton is None:
        return "triton is not installed"
    if _INTERPRET:
        return None
    if not torch.cuda.is_available():
        return "CUDA is not available"
    return None


if triton is not None:
    from ._triton_kernels import _gemv_kernel, _mm_kernel

    def _configs(rows: list[tuple[int, int, int, int, int]], flag: str) -> list[triton.Config]:
        return [
            triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, flag: f}, num_warps=w, num_stages=s)
            for bn, bk, w, s, f in rows
        ]

    # (BLOCK_N, BLOCK_K, warps, stages, variant flag). Decode is latency-bound unless each
    # SM keeps ~20-40 KB of weight loads in flight: short-and-wide tiles (few rows, 512-1024
    # columns) with >= 2 programs per SM on 4096-row layers.
    _GEMV_CONFIGS = _configs(
        [
            (4, 1024, 4, 1, 1),
            (8, 1024, 4, 1, 1),
            (8, 512, 4, 1, 1),
            (16, 512, 4, 1, 1),
            (16, 1024, 8, 1, 1),
            (4, 1024, 4, 1, 0),
            (8, 512, 4, 1, 0),
            (16, 256, 4, 1, 0),
        ],
        "X_VEC",
    )
    _MM_CONFIGS = _configs(
        [
            (16, 512, 4, 1, 1),
            (16, 1024, 8, 1, 1),
            (32, 512, 8, 1, 1),
            (16, 256, 4, 2, 1),
            (32, 256, 4, 2, 1),
            (16, 512, 4, 1, 0),
            (32, 256, 4, 2, 0),
        ],
        "DENSE_TILE",
    )
    _GEMV_DEFAULT = {"BLOCK_N": 8, "BLOCK_K": 512, "X_VEC": 1}
    _MM_DEFAULT = {"BLOCK_N": 16, "BLOCK_K": 256, "DENSE_TILE": 1}

# The autotuned kernels, built on first use: older triton releases need an active GPU
# driver to build an autotuner, and importing this module must work on any machine.
_TUNED: dict[str, Any] = {}


def _tuned_kernel(m: int) -> Any:
    kind = "gemv" if m == 1 else "mm"
    if kind not in _TUNED:
        if kind == "gemv":
            _TUNED[kind] = triton.autotune(_GEMV_CONFIGS, key=["N", "K"])(_gemv_kernel)
        else:
            _TUNED[kind] = triton.autotune(_MM_CONFIGS, key=["N", "K", "BLOCK_M"])(_mm_kernel)
    return _TUNED[kind]


def tuned_config(m: int) -> str | None:
    """The autotuner's last choice for the kernel that serves `m` tokens (None before
    any tuned call)."""
    tuned = _TUNED.get("gemv" if m == 1 else "mm")
    best = getattr(tuned, "best_config", None)
    return None if best is None else str(best)


def _block_m(m: int) -> int:
    return 16 if m <= 16 else 64


def sparse24_linear(
    x: torch.Tensor,
    compact: Compact24 | None = None,
    bias: torch.Tensor | None = None,
    *,
    values: torch.Tensor | None = None,
    meta: torch.Tensor | None = None,
    in_features: int | None = None,
    layout: str = "rows",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x @ W.T + bias` for `x` `(M, K)` (contiguous rows) and a compact 2:4 weight.

    The weight comes as a `Compact24` or as its parts (`values` may be any `(N, K/2)` view
    with unit column stride and `meta` either layout, e.g. both regions of cuSPARSELt's
    compressed buffer with `layout="cslt"`). Returns `(M, N)` in `x`'s dtype, accumulated
    in fp32.
    """
    if compact is not None:
        values, meta = compact.values, compact.meta
        in_features, layout = compact.in_features, compact.layout
    assert values is not None and meta is not None and in_features is not None
    m, k = x.shape
    n = values.shape[0]
    if k != in_features:
        raise InvalidArgumentError(f"x has {k} features, the weight {in_features}")
    cslt_meta = layout == "cslt"
    if cslt_meta and k % COLS_PER_WORD:
        raise InvalidArgumentError("the cuSPARSELt metadata layout needs in_features % 32 == 0")
    if values.stride(1) != 1 or (not cslt_meta and meta.shape[1] * COLS_PER_WORD < k):
        raise InvalidArgumentError("values/meta do not cover the weight's columns")
    if x.stride(1) != 1:
        x = x.contiguous()
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    has_bias = bias is not None
    b = bias if has_bias else out  # unused pointer when there is no bias
    args = (x, values, meta, b, out)
    strides = (x.stride(0), values.stride(0), meta.stride(0), out.stride(0))
    flags = {"HAS_BIAS": has_bias, "META_CSLT": cslt_meta}
    tuned = _AUTOTUNE and not _INTERPRET
    if m == 1:
        kernel = _tuned_kernel(m) if tuned else _gemv_kernel
        params = {} if tuned else _GEMV_DEFAULT

        def grid(meta_: dict[str, int]) -> tuple[int, int]:
            return (triton.cdiv(n, meta_["BLOCK_N"]), m)

        kernel[grid](*args, n, k, *strides, **flags, **params)
    else:
        block_m = _block_m(m)
        kernel = _tuned_kernel(m) if tuned else _mm_kernel
        params = {} if tuned else _MM_DEFAULT

        def grid(meta_: dict[str, int]) -> tuple[int, int]:
            return (triton.cdiv(n, meta_["BLOCK_N"]), triton.cdiv(m, block_m))

        kernel[grid](*args, m, n, k, *strides, BLOCK_M=block_m, **flags, **params)
    return out
