"""fp8 GEMMs on CUDA for `Fp8Linear`, each equal to `fp8.fp8_linear_reference` up to the
order of the fp32 sums, except cuSPARSELt's (below):

- `quantize_tokens`: one Triton kernel per call: each token's amax, its power-of-two scale
  (the same bit arithmetic as `fp8.pow2_scale`) and the e4m3 cast; it can write zero rows
  up to a padded row count, so cuSPARSELt's operand needs no second copy. On sm_90+ it
  signals its dependents as it starts, so the mma.sp kernel after it (a programmatic
  launch) is launched meanwhile.
- `fp8_dense_linear`: `torch._scaled_mm` with row-wise scales (a per-token `(M, 1)` and a
  per-channel `(1, N)` fp32 vector, weight column-major), bf16 out, scales in its epilogue.
- `fp8_dense_unscaled_linear`: `torch._scaled_mm` with unit tensor-wise scales (cuBLAS's
  fast fp8 path: row-wise scales measured about twice as slow at decode sizes on an H200),
  the scales and bias applied by a second Triton kernel, as for cuSPARSELt below.
- `fp8_cslt_linear`: cuSPARSELt's fp8 2:4 GEMM (`torch._cslt_sparse_mm`, tokens padded to
  16, the transposes fused as in `cslt.py`), which refuses a per-row `alpha` for fp8, so
  the scales and bias are applied by a second Triton kernel to its unscaled output: bf16
  without bias (both scales are powers of two: multiplying them in is exact), fp32 with a
  bias (so the output is rounded once, after the bias). Its GEMM sums the e4m3 products
  with fewer bits than fp32 (as `_scaled_mm(use_fast_accum=True)` does): up to 1/126 of the
  largest output off at K = 11008, a mean bias of -2e-4 toward zero (H200, cuSPARSELt 0.8.0,
  `python benches/fp8_speed.py --only accuracy`).

Each `*_linear(x, ...)` is `quantize_tokens` and then its `*_gemm(q, q_scale, ...)`; a
compiled model calls the latter on tokens its traced code quantized (`fp8.quantize_rows`,
which inductor fuses into the kernel that made `x`: `fp8_linear.Fp8Linear.forward`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .cslt import CsltConfig, alignment_status
from .fp8 import E4M3, Fp8Weight, unscaled_dtype
from .graphs import time_call
from .launch import programmatic_launches

try:
    import triton
except ImportError:  # pragma: no cover - CPU-only torch builds ship without triton
    triton = None

__all__ = [
    "CSLT_M_ALIGN",
    "cslt_rows",
    "fp8_cslt_best_config",
    "fp8_cslt_compress",
    "fp8_cslt_gemm",
    "fp8_cslt_linear",
    "fp8_cslt_product",
    "fp8_cslt_shape_status",
    "fp8_dense_gemm",
    "fp8_dense_linear",
    "fp8_dense_product",
    "fp8_dense_shape_status",
    "fp8_dense_unscaled_gemm",
    "fp8_dense_unscaled_linear",
    "fp8_status",
    "quantize_tokens",
]

# cuSPARSELt with 8-bit operands: the dense operand's rows a multiple of 16 (torch's
# dense_min_rows for e4m3; M = 1 is refused), the sparse weight's sides multiples of 32.
CSLT_M_ALIGN = 16
CSLT_W_ALIGN = 32
# torch._scaled_mm: K and N multiples of 16.
SCALED_MM_ALIGN = 16


def fp8_status(device: torch.device | None = None) -> str | None:
    """None if the fp8 kernels can run on `device` (default: current CUDA device), else why."""
    if triton is None:
        return "triton is not installed"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return f"fp8 tensor cores need compute capability >= 8.9, device has {major}.{minor}"
    return None


def fp8_dense_shape_status(out_features: int, in_features: int) -> str | None:
    return alignment_status(out_features, in_features, SCALED_MM_ALIGN, "torch._scaled_mm")


def fp8_cslt_shape_status(out_features: int, in_features: int) -> str | None:
    return alignment_status(out_features, in_features, CSLT_W_ALIGN, "cuSPARSELt fp8")


if triton is not None:
    from ._fp8_triton import HAS_LAUNCH_DEPENDENTS, quantize_kernel, scale_kernel


def quantize_tokens(x: torch.Tensor, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` `(M, K)` CUDA (row stride free, unit column stride) as e4m3 `(rows, K)` and fp32
    scales `(rows,)`, bit-identical to `fp8.quantize_rows` for the first `M` rows; rows
    `M..rows` (default `rows = M`) are zeros with scale 0. On sm_90+ the kernel lets a
    programmatic launch after it start at once (`mma_sp.mma24_fp8_linear`'s)."""
    m, k = x.shape
    rows = m if rows is None else rows
    q = torch.empty(rows, k, dtype=E4M3, device=x.device)
    s = torch.empty(rows, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(k)
    # One program per token row (K <= 16384 in registers: 4096 values in a 7B model).
    warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    dependents = HAS_LAUNCH_DEPENDENTS and programmatic_launches(x.device)
    quantize_kernel[(rows,)](
        x, q, s, m, k, x.stride(0), BLOCK_K=block, LAUNCH_DEPENDENTS=dependents, num_warps=warps
    )
    return q, s


def fp8_dense_linear(
    x: torch.Tensor, weight: Fp8Weight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`x @ W.T + bias` for `x` `(M, K)` bf16/fp16 CUDA, with `torch._scaled_mm` (fp8 dense);
    out in `x`'s dtype."""
    return fp8_dense_gemm(*quantize_tokens(x), weight, bias, x.dtype)


def fp8_dense_gemm(
    q: torch.Tensor,
    q_scale: torch.Tensor,
    weight: Fp8Weight,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """`fp8_dense_linear` on tokens already quantized (`quantize_tokens`: `q` `(M, K)` e4m3,
    `q_scale` `(M,)` fp32)."""
    return torch._scaled_mm(
        q,
        weight.values.t(),  # (K, N) column-major: the layout _scaled_mm wants
        scale_a=q_scale[:, None],
        scale_b=weight.scale[None, :],
        bias=bias,
        out_dtype=out_dtype,
    )


def _scale_on_gpu(
    acc: torch.Tensor,
    sx: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """`fp8.apply_scales` as one Triton kernel: `acc * sx[:, None] * scale[None, :] + bias`
    in `dtype` for an unscaled product `acc` `(M, N)` (any strides). Eager and
    graph-replayed calls launch it; a compiled layer traces `apply_scales` instead."""
    m, n = acc.shape
    out = torch.empty(m, n, dtype=dtype, device=acc.device)
    block_m = 16 if m <= 16 else 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, 128))
    scale_kernel[grid](
        acc, sx, scale, bias if bias is not None else scale, out, m, n, acc.stride(0),
        acc.stride(1), HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=128,
    )  # fmt: skip
    return out


def fp8_dense_unscaled_linear(
    x: torch.Tensor, weight: Fp8Weight, unit: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`fp8_dense_linear`'s result with `torch._scaled_mm`'s tensor-wise path: `unit` is a
    one-element fp32 tensor holding 1.0 on `x`'s device (made once, outside graph capture)."""
    return fp8_dense_unscaled_gemm(*quantize_tokens(x), weight, unit, bias, x.dtype)


def fp8_dense_unscaled_gemm(
    q: torch.Tensor,
    q_scale: torch.Tensor,
    weight: Fp8Weight,
    unit: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """`fp8_dense_unscaled_linear` on tokens already quantized (as `fp8_dense_gemm`)."""
    acc = fp8_dense_product(q, weight, unit, unscaled_dtype(out_dtype, bias is not None))
    return _scale_on_gpu(acc, q_scale, weight.scale, bias, out_dtype)


def fp8_dense_product(
    q: torch.Tensor, weight: Fp8Weight, unit: torch.Tensor, raw_dtype: torch.dtype
) -> torch.Tensor:
    """The unscaled `q @ W.T` `(M, N)` in `raw_dtype` (`fp8.unscaled_dtype`), with
    `torch._scaled_mm`'s tensor-wise path (`unit` as in `fp8_dense_unscaled_linear`)."""
    return torch._scaled_mm(q, weight.values.t(), scale_a=unit, scale_b=unit, out_dtype=raw_dtype)


def fp8_cslt_compress(weight: Fp8Weight) -> torch.Tensor:
    """cuSPARSELt's compressed form of a 2:4 e4m3 weight."""
    return torch._cslt_compress(weight.values)


def _cslt_raw(
    packed: torch.Tensor, q: torch.Tensor, config: CsltConfig, raw_dtype: torch.dtype
) -> torch.Tensor:
    """cuSPARSELt's unscaled `q @ W.T` `(rows, N)` for padded e4m3 `q` in `fp8.unscaled_dtype`."""
    extra: dict[str, Any] = {}
    if config.split_k > 1:
        extra = {"split_k": config.split_k, "split_k_mode": config.split_k_mode}
    return torch._cslt_sparse_mm(
        packed,
        q.t(),
        out_dtype=raw_dtype,
        transpose_result=True,
        alg_id=config.alg_id,
        **extra,
    )


def fp8_cslt_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: CsltConfig | None = None,
) -> torch.Tensor:
    """`x @ W.T + bias` for `x` `(M, K)` bf16/fp16 CUDA with cuSPARSELt's fp8 2:4 GEMM over
    `packed` (`fp8_cslt_compress`) and the weight's row scales `scale` `(N,)`."""
    m = x.shape[0]
    q, q_scale = quantize_tokens(x, cslt_rows(m))
    return fp8_cslt_gemm(q, q_scale, m, packed, scale, bias, config, x.dtype)


def cslt_rows(m: int) -> int:
    """The rows of cuSPARSELt's fp8 token operand for `m` tokens (zero rows after them)."""
    return -(-m // CSLT_M_ALIGN) * CSLT_M_ALIGN


def fp8_cslt_gemm(
    q: torch.Tensor,
    q_scale: torch.Tensor,
    m: int,
    packed: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    config: CsltConfig | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """`fp8_cslt_linear` on tokens already quantized: `q` `(R, K)` e4m3 and `q_scale` `(R,)`
    whose first `m` rows are the tokens; with `R == cslt_rows(m)` the rows after them must
    be zeros (`quantize_tokens(x, R)` writes them), otherwise they are copied into such an
    operand first."""
    acc = fp8_cslt_product(q, m, packed, config, unscaled_dtype(out_dtype, bias is not None))
    return _scale_on_gpu(acc, q_scale, scale, bias, out_dtype)


def fp8_cslt_product(
    q: torch.Tensor,
    m: int,
    packed: torch.Tensor,
    config: CsltConfig | None,
    raw_dtype: torch.dtype,
) -> torch.Tensor:
    """cuSPARSELt's unscaled `q @ W.T` `(m, N)` in `raw_dtype` (`fp8.unscaled_dtype`) for
    the first `m` rows of `q` (padded as `fp8_cslt_gemm` says)."""
    rows = cslt_rows(m)
    if q.shape[0] != rows:
        padded = torch.zeros(rows, q.shape[1], dtype=torch.uint8, device=q.device)
        padded[:m] = q[:m].view(torch.uint8)  # e4m3 zeros are zero bytes
        q = padded.view(q.dtype)
    acc = _cslt_raw(packed, q, config or CsltConfig(), raw_dtype)
    return acc if rows == m else acc[:m]


def fp8_cslt_best_config(
    packed: Sequence[torch.Tensor], x: torch.Tensor, *, max_algs: int = 16
) -> CsltConfig:
    """The fastest cuSPARSELt fp8 configuration for `x`'s token count on weights of one
    shape: cuSPARSELt's own search, then every algorithm id timed under graph replay over
    `packed` in rotation (the search times eagerly)."""
    q, _ = quantize_tokens(x, cslt_rows(x.shape[0]))
    search = getattr(getattr(torch._C, "_cusparselt", None), "mm_search", None)
    configs = {CsltConfig(a) for a in range(max_algs)}  # ids past the last one raise, skipped
    if search is not None:
        alg, split_k, mode, max_alg = search(packed[0], q.t(), None, None, torch.bfloat16, True)
        configs = {CsltConfig(a) for a in range(min(int(max_alg), max_algs - 1) + 1)}
        configs |= {CsltConfig(int(alg), int(split_k), int(mode)), CsltConfig(int(alg))}
    best, best_ms = CsltConfig(), float("inf")
    for cfg in sorted(configs, key=lambda c: (c.alg_id, c.split_k)):

        def call(cfg: CsltConfig = cfg) -> None:
            for p in packed:
                _cslt_raw(p, q, cfg, unscaled_dtype(x.dtype, False))  # bias: fp32, same GEMM

        try:
            ms = time_call(call, iters=3, repeats=1)
        except RuntimeError:  # an algorithm id this shape does not support
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    return best
