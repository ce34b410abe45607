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

import torch

from .format import COLS_PER_WORD, Compact24

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only torch builds ship without triton
    triton = None
    tl = None

__all__ = ["MAX_M", "sparse24_linear", "triton_status"]

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

    @triton.jit
    def _gemv_kernel(
        x_ptr,
        v_ptr,
        meta_ptr,
        b_ptr,
        y_ptr,
        N,
        K,
        stride_xm,
        stride_vn,
        stride_mn,
        stride_ym,
        HAS_BIAS: tl.constexpr,
        EVEN_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        G: tl.constexpr = BLOCK_K // 4  # 2:4 groups per K tile
        pid_n = tl.program_id(0)
        row = tl.program_id(1)  # token
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rg = tl.arange(0, G)
        rv = tl.arange(0, 2 * G)
        n_ok = rn < N
        v_rows = v_ptr + rn[:, None].to(tl.int64) * stride_vn
        m_rows = meta_ptr + rn[:, None].to(tl.int64) * stride_mn
        x_row = x_ptr + row * stride_xm
        shift = (rg % 8) * 4
        acc = tl.zeros((BLOCK_N, G), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            g0 = k0 // 4
            v_ok = n_ok[:, None]
            w_ok = n_ok[:, None]
            if not EVEN_K:  # a ragged last K tile: mask whole groups past K
                v_ok = v_ok & ((k0 + 4 * (rv // 2)) < K)[None, :]
                w_ok = w_ok & ((k0 + 4 * rg) < K)[None, :]
            v = tl.load(v_rows + (2 * g0 + rv)[None, :], mask=v_ok, other=0.0)
            v0, v1 = tl.split(tl.reshape(v, (BLOCK_N, G, 2)))
            word = tl.load(m_rows + ((g0 + rg) // 8)[None, :], mask=w_ok, other=0)
            nib = (word >> shift[None, :]) & 15
            i0 = nib & 3
            i1 = nib >> 2
            kk = k0 + 4 * rg
            x0 = tl.load(x_row + kk, mask=kk < K, other=0.0).to(tl.float32)[None, :]
            x1 = tl.load(x_row + kk + 1, mask=kk + 1 < K, other=0.0).to(tl.float32)[None, :]
            x2 = tl.load(x_row + kk + 2, mask=kk + 2 < K, other=0.0).to(tl.float32)[None, :]
            x3 = tl.load(x_row + kk + 3, mask=kk + 3 < K, other=0.0).to(tl.float32)[None, :]
            # i0 is in 0..2 and i1 in 1..3 (i0 < i1): two selects each.
            xs0 = tl.where(i0 == 0, x0, tl.where(i0 == 1, x1, x2))
            xs1 = tl.where(i1 == 3, x3, tl.where(i1 == 2, x2, x1))
            acc += v0.to(tl.float32) * xs0 + v1.to(tl.float32) * xs1
        out = tl.sum(acc, axis=1)
        if HAS_BIAS:
            out += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * stride_ym + rn, out.to(y_ptr.dtype.element_ty), mask=n_ok)

    @triton.jit
    def _mm_kernel(
        x_ptr,
        v_ptr,
        meta_ptr,
        b_ptr,
        y_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_vn,
        stride_mn,
        stride_ym,
        HAS_BIAS: tl.constexpr,
        EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        G: tl.constexpr = BLOCK_K // 4
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rg = tl.arange(0, G)
        rv = tl.arange(0, 2 * G)
        n_ok = rn < N
        m_ok = rm < M
        v_rows = v_ptr + rn[:, None].to(tl.int64) * stride_vn
        m_rows = meta_ptr + rn[:, None].to(tl.int64) * stride_mn
        x_cols = x_ptr + rm[None, :].to(tl.int64) * stride_xm  # (1, BLOCK_M): x^T tiles
        shift = (rg % 8) * 4
        zero = tl.zeros((BLOCK_N, G), dtype=v_ptr.dtype.element_ty)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            g0 = k0 // 4
            v_ok = n_ok[:, None]
            w_ok = n_ok[:, None]
            if not EVEN_K:  # a ragged last K tile: mask whole groups past K
                v_ok = v_ok & ((k0 + 4 * (rv // 2)) < K)[None, :]
                w_ok = w_ok & ((k0 + 4 * rg) < K)[None, :]
            v = tl.load(v_rows + (2 * g0 + rv)[None, :], mask=v_ok, other=0.0)
            v0, v1 = tl.split(tl.reshape(v, (BLOCK_N, G, 2)))
            word = tl.load(m_rows + ((g0 + rg) // 8)[None, :], mask=w_ok, other=0)
            nib = (word >> shift[None, :]) & 15
            i0 = nib & 3
            i1 = nib >> 2
            # Dense column p of every group: column 0 can only be slot 0, column 3 only slot 1.
            d0 = tl.where(i0 == 0, v0, zero)
            d1 = tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, zero))
            d2 = tl.where(i0 == 2, v0, tl.where(i1 == 2, v1, zero))
            d3 = tl.where(i1 == 3, v1, zero)
            kk = (k0 + 4 * rg)[:, None]  # (G, 1)
            x0 = tl.load(x_cols + kk, mask=m_ok[None, :] & (kk < K), other=0.0)
            x1 = tl.load(x_cols + kk + 1, mask=m_ok[None, :] & (kk + 1 < K), other=0.0)
            x2 = tl.load(x_cols + kk + 2, mask=m_ok[None, :] & (kk + 2 < K), other=0.0)
            x3 = tl.load(x_cols + kk + 3, mask=m_ok[None, :] & (kk + 3 < K), other=0.0)
            acc = tl.dot(d0, x0, acc)
            acc = tl.dot(d1, x1, acc)
            acc = tl.dot(d2, x2, acc)
            acc = tl.dot(d3, x3, acc)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        y = y_ptr + rm[None, :].to(tl.int64) * stride_ym + rn[:, None]
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])

    def _configs(pairs: list[tuple[int, int, int, int]]) -> list[triton.Config]:
        return [
            triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bn, bk, w, s in pairs
        ]

    # (BLOCK_N, BLOCK_K, warps, stages). Small BLOCK_N keeps >= 2 programs per SM on
    # 4096-row layers; several K tiles in flight per program saturate HBM. BLOCK_K <= 256
    # divides LLaMA's 11008 = 43 * 256, so those layers take the unmasked path.
    _GEMV_CONFIGS = [(16, 256, 4, 3), (32, 256, 4, 3), (8, 256, 4, 4), (64, 128, 4, 4)]
    _MM_CONFIGS = [(32, 128, 4, 3), (64, 128, 4, 3), (16, 256, 4, 3), (32, 256, 4, 4)]
    _GEMV_DEFAULT = {"BLOCK_N": 32, "BLOCK_K": 256}
    _MM_DEFAULT = {"BLOCK_N": 32, "BLOCK_K": 128}

    _even_k = triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
    _gemv_tuned = triton.autotune(_configs(_GEMV_CONFIGS), key=["N", "K"])(_even_k(_gemv_kernel))
    _mm_tuned = triton.autotune(_configs(_MM_CONFIGS), key=["N", "K", "BLOCK_M"])(
        _even_k(_mm_kernel)
    )
    _gemv_fixed = _even_k(_gemv_kernel)
    _mm_fixed = _even_k(_mm_kernel)


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
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x @ W.T + bias` for `x` `(M, K)` (contiguous rows) and a compact 2:4 weight.

    The weight comes as a `Compact24` or as its parts (`values` may be any `(N, K/2)` view
    with unit column stride, e.g. the values region of cuSPARSELt's compressed buffer).
    Returns `(M, N)` in `x`'s dtype, accumulated in fp32.
    """
    if compact is not None:
        values, meta, in_features = compact.values, compact.meta, compact.in_features
    assert values is not None and meta is not None and in_features is not None
    m, k = x.shape
    n = values.shape[0]
    if k != in_features:
        raise ValueError(f"x has {k} features, the weight {in_features}")
    if meta.shape[1] * COLS_PER_WORD < k or values.stride(1) != 1:
        raise ValueError("values/meta do not cover the weight's columns")
    if x.stride(1) != 1:
        x = x.contiguous()
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    has_bias = bias is not None
    b = bias if has_bias else out  # unused pointer when there is no bias
    args = (x, values, meta, b, out)
    strides = (x.stride(0), values.stride(0), meta.stride(0), out.stride(0))
    tuned = _AUTOTUNE and not _INTERPRET
    if m == 1:
        kernel = _gemv_tuned if tuned else _gemv_fixed
        params = {} if tuned else _GEMV_DEFAULT

        def grid(meta_: dict) -> tuple[int, int]:
            return (triton.cdiv(n, meta_["BLOCK_N"]), m)

        kernel[grid](*args, n, k, *strides, HAS_BIAS=has_bias, **params)
    else:
        block_m = _block_m(m)
        kernel = _mm_tuned if tuned else _mm_fixed
        params = {} if tuned else _MM_DEFAULT

        def grid(meta_: dict) -> tuple[int, int]:
            return (triton.cdiv(n, meta_["BLOCK_N"]), triton.cdiv(m, block_m))

        kernel[grid](*args, m, n, k, *strides, HAS_BIAS=has_bias, BLOCK_M=block_m, **params)
    return out
