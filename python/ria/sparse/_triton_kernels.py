"""The Triton kernels behind `triton_gemv.sparse24_linear` (device code; that module
describes them and holds the host side). Imported only when triton is installed.

Triton reads kernel parameter annotations (`tl.constexpr` marks compile-time constants,
other hints change how arguments are specialised), so the other parameters stay
unannotated and mypy is told not to ask for types in this file.
"""

# mypy: disable-error-code="no-untyped-def,untyped-decorator"

from __future__ import annotations

import triton
import triton.language as tl


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
