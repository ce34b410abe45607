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

from ..errors import InvalidArgumentError
from .format import COLS_PER_WORD, Compact24

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only torch builds ship without triton
    triton = None
    tl = None

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

    @triton.jit
    def _load_groups(
        v_rows,
        m_rows,
        m_shift,
        k0,
        K,
        n_ok,
        G: tl.constexpr,
        MASK_K: tl.constexpr,
        META_CSLT: tl.constexpr,
    ):
        """Kept values `v0, v1` and in-group columns `i0 < i1` of the G groups from column k0.

        All `(BLOCK_N, G)`. Values load as one contiguous `(BLOCK_N, 2G)` tile (16-byte
        vectors); metadata words are addressed per group (several groups share a word, so
        the compiler merges those loads). `m_rows`/`m_shift`: per-row word pointer and bit
        shift of the metadata layout (see `_meta_rows`).
        """
        rg = tl.arange(0, G)
        rv = tl.arange(0, 2 * G)
        if MASK_K:  # the ragged last tile: whole groups past K read as zero
            v_ok = n_ok[:, None] & ((k0 + 2 * rv) < K)[None, :]
            w_ok = n_ok[:, None] & ((k0 + 4 * rg) < K)[None, :]
        else:
            v_ok = n_ok[:, None]
            w_ok = n_ok[:, None]
        g0 = k0 // 4  # a multiple of 8: rg % 8 is the group's place in its 32-column tile
        v = tl.load(v_rows + (2 * g0 + rv)[None, :], mask=v_ok, other=0.0)
        v0, v1 = tl.split(tl.reshape(v, (v.shape[0], G, 2)))
        if META_CSLT:  # cuSPARSELt's tiled order (format.cslt_nibble_index)
            gi = g0 + rg
            word = tl.load(m_rows + (64 * (gi // 8) + (gi % 4) // 2)[None, :], mask=w_ok, other=0)
            shift = (16 * (rg % 2) + 8 * ((rg % 8) // 4))[None, :] + m_shift
        else:  # own layout: 8 nibbles per int32, row-major
            word = tl.load(m_rows + ((g0 + rg) // 8)[None, :], mask=w_ok, other=0)
            shift = ((rg % 8) * 4)[None, :] + m_shift
        nib = (word >> shift) & 15
        return v0, v1, nib & 3, nib >> 2

    @triton.jit
    def _meta_rows(meta_ptr, rn, K, stride_mn, META_CSLT: tl.constexpr):
        """Per-row metadata word pointer `(BLOCK_N, 1)` and bit shift `(BLOCK_N, 1)`."""
        if META_CSLT:
            tiles = K // 32
            word = 16 * ((rn // 64) * 4 * tiles + (rn % 64) // 16) + 2 * (rn % 8)
            return meta_ptr + word[:, None].to(tl.int64), (4 * ((rn % 16) // 8))[:, None]
        return meta_ptr + rn[:, None].to(tl.int64) * stride_mn, (rn * 0)[:, None]

    @triton.jit
    def _gemv_step(
        acc,
        v_rows,
        m_rows,
        m_shift,
        x_row,
        k0,
        K,
        n_ok,
        G: tl.constexpr,
        MASK_K: tl.constexpr,
        X_VEC: tl.constexpr,
        META_CSLT: tl.constexpr,
    ):
        v0, v1, i0, i1 = _load_groups(v_rows, m_rows, m_shift, k0, K, n_ok, G, MASK_K, META_CSLT)
        rg = tl.arange(0, G)
        kk = k0 + 4 * rg
        if X_VEC:  # one contiguous load of the x tile, split into its 4 columns per group
            rk = k0 + tl.arange(0, 4 * G)
            xt = tl.load(x_row + rk, mask=rk < K, other=0.0).to(tl.float32)
            xa, xb = tl.split(tl.reshape(xt, (G, 2, 2)))
            x0, x2 = tl.split(xa)
            x1, x3 = tl.split(xb)
        else:
            x0 = tl.load(x_row + kk, mask=kk < K, other=0.0).to(tl.float32)
            x1 = tl.load(x_row + kk + 1, mask=kk < K, other=0.0).to(tl.float32)
            x2 = tl.load(x_row + kk + 2, mask=kk < K, other=0.0).to(tl.float32)
            x3 = tl.load(x_row + kk + 3, mask=kk < K, other=0.0).to(tl.float32)
        # i0 is in 0..2 and i1 in 1..3 (i0 < i1): two selects each.
        xs0 = tl.where(i0 == 0, x0[None, :], tl.where(i0 == 1, x1[None, :], x2[None, :]))
        xs1 = tl.where(i1 == 3, x3[None, :], tl.where(i1 == 2, x2[None, :], x1[None, :]))
        return acc + v0.to(tl.float32) * xs0 + v1.to(tl.float32) * xs1

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
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        X_VEC: tl.constexpr,
        META_CSLT: tl.constexpr = False,
    ):
        G: tl.constexpr = BLOCK_K // 4  # 2:4 groups per K tile
        pid_n = tl.program_id(0)
        row = tl.program_id(1)  # token
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        v_rows = v_ptr + rn[:, None].to(tl.int64) * stride_vn
        m_rows, m_shift = _meta_rows(meta_ptr, rn, K, stride_mn, META_CSLT)
        x_row = x_ptr + row * stride_xm
        acc = tl.zeros((BLOCK_N, G), dtype=tl.float32)
        k_main = K - K % BLOCK_K
        for k0 in range(0, k_main, BLOCK_K):
            acc = _gemv_step(
                acc, v_rows, m_rows, m_shift, x_row, k0, K, n_ok, G, False, X_VEC, META_CSLT
            )
        if k_main < K:
            acc = _gemv_step(
                acc, v_rows, m_rows, m_shift, x_row, k_main, K, n_ok, G, True, X_VEC, META_CSLT
            )
        out = tl.sum(acc, axis=1)
        if HAS_BIAS:
            out += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * stride_ym + rn, out.to(y_ptr.dtype.element_ty), mask=n_ok)

    @triton.jit
    def _mm_step(
        acc,
        v_rows,
        m_rows,
        m_shift,
        x_cols,
        k0,
        K,
        n_ok,
        m_ok,
        G: tl.constexpr,
        MASK_K: tl.constexpr,
        DENSE_TILE: tl.constexpr,
        META_CSLT: tl.constexpr,
    ):
        v0, v1, i0, i1 = _load_groups(v_rows, m_rows, m_shift, k0, K, n_ok, G, MASK_K, META_CSLT)
        zero = tl.zeros(v0.shape, dtype=v0.dtype)
        # Dense column p of every group: column 0 can only be slot 0, column 3 only slot 1.
        d0 = tl.where(i0 == 0, v0, zero)
        d1 = tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, zero))
        d2 = tl.where(i0 == 2, v0, tl.where(i1 == 2, v1, zero))
        d3 = tl.where(i1 == 3, v1, zero)
        if DENSE_TILE:  # interleave to the (BLOCK_N, 4G) dense tile, one dot with x^T
            w = tl.join(tl.join(d0, d2), tl.join(d1, d3))  # [n, g, a, b] = d_{2a+b}
            w = tl.reshape(w, (w.shape[0], 4 * G))
            rk = k0 + tl.arange(0, 4 * G)
            xt = tl.load(x_cols + rk[:, None], mask=m_ok[None, :] & (rk < K)[:, None], other=0.0)
            acc = tl.dot(w, xt, acc)
        else:  # four dots, one per in-group column, over stride-4 slices of x^T
            kk = (k0 + 4 * tl.arange(0, G))[:, None]
            ok = m_ok[None, :] & (kk < K)
            acc = tl.dot(d0, tl.load(x_cols + kk, mask=ok, other=0.0), acc)
            acc = tl.dot(d1, tl.load(x_cols + kk + 1, mask=ok, other=0.0), acc)
            acc = tl.dot(d2, tl.load(x_cols + kk + 2, mask=ok, other=0.0), acc)
            acc = tl.dot(d3, tl.load(x_cols + kk + 3, mask=ok, other=0.0), acc)
        return acc

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
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        DENSE_TILE: tl.constexpr,
        META_CSLT: tl.constexpr = False,
    ):
        G: tl.constexpr = BLOCK_K // 4
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n_ok = rn < N
        m_ok = rm < M
        v_rows = v_ptr + rn[:, None].to(tl.int64) * stride_vn
        m_rows, m_shift = _meta_rows(meta_ptr, rn, K, stride_mn, META_CSLT)
        x_cols = x_ptr + rm[None, :].to(tl.int64) * stride_xm  # (1, BLOCK_M): x^T tiles
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        k_main = K - K % BLOCK_K
        for k0 in range(0, k_main, BLOCK_K):
            acc = _mm_step(
                acc,
                v_rows,
                m_rows,
                m_shift,
                x_cols,
                k0,
                K,
                n_ok,
                m_ok,
                G,
                False,
                DENSE_TILE,
                META_CSLT,
            )
        if k_main < K:
            acc = _mm_step(
                acc,
                v_rows,
                m_rows,
                m_shift,
                x_cols,
                k_main,
                K,
                n_ok,
                m_ok,
                G,
                True,
                DENSE_TILE,
                META_CSLT,
            )
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        y = y_ptr + rm[None, :].to(tl.int64) * stride_ym + rn[:, None]
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])

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

    _gemv_tuned = triton.autotune(_GEMV_CONFIGS, key=["N", "K"])(_gemv_kernel)
    _mm_tuned = triton.autotune(_MM_CONFIGS, key=["N", "K", "BLOCK_M"])(_mm_kernel)


def tuned_config(m: int) -> str | None:
    """The autotuner's last choice for the kernel that serves `m` tokens (None before
    any tuned call)."""
    if triton is None:
        return None
    tuned = _gemv_tuned if m == 1 else _mm_tuned
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
        kernel = _gemv_tuned if tuned else _gemv_kernel
        params = {} if tuned else _GEMV_DEFAULT

        def grid(meta_: dict) -> tuple[int, int]:
            return (triton.cdiv(n, meta_["BLOCK_N"]), m)

        kernel[grid](*args, n, k, *strides, **flags, **params)
    else:
        block_m = _block_m(m)
        kernel = _mm_tuned if tuned else _mm_kernel
        params = {} if tuned else _MM_DEFAULT

        def grid(meta_: dict) -> tuple[int, int]:
            return (triton.cdiv(n, meta_["BLOCK_N"]), triton.cdiv(m, block_m))

        kernel[grid](*args, m, n, k, *strides, BLOCK_M=block_m, **flags, **params)
    return out
