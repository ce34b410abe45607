"""N:M mask refinement on the GPU: the Rust core's `refine_mask` (rust/refine.rs, the
reference) reorganised so every row advances at once.

The objective and the swap rule are the core's: per row `w` with pruned part
`d = w * ~keep`, the output error is `d^T G d` with `G = X^T X`; a sweep visits the N:M
groups in order and makes, in each, the best swap of a kept and a pruned column (ties:
lowest kept column, then lowest pruned one) when it lowers the row's error by more than
`REL_TOL` of it. What changes is when the residual `r = G d` is brought up to date. The
core updates a row's `r` after every swap (O(in) each, bound by memory bandwidth: a 7B
prune spent 35 s of 76 s there). Here the columns are cut into blocks of `BLOCK`: inside
a block a Triton kernel keeps each row's `r` on the block's columns exact in registers
(a swap updates `BLOCK` values), and after the block one GEMM,
`r += dD[:, block] @ G[block, :]`, brings every column up to date for all rows: the lazy
batch update of SparseGPT. The arithmetic is float32 (the core tracks `r` in f64), so a
near-tie may be decided the other way; the error is recomputed exactly at the end and is
never above the start.
"""

# Triton reads kernel parameter annotations (see sparse/_triton_kernels.py), so the
# kernel's stay unannotated.
# mypy: disable-error-code="no-untyped-def,untyped-decorator"

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# The core's acceptance threshold (rust/refine.rs `REL_TOL`): a swap must lower the row's
# error by more than this fraction of it.
REL_TOL = 1e-7

# Columns per block: the kernel holds `ROWS x BLOCK` residuals in registers.
BLOCK = 128
ROWS = 32

# Group sizes the kernel handles: `tl.arange` needs a power of two, and a group's
# `M x M` pairs are spread over registers (other sizes go to the core).
GPU_GROUP_SIZES = (2, 4, 8)

# The delta of a pair that is no swap (both kept, both pruned): above any real one.
NOT_A_SWAP: tl.constexpr = tl.constexpr(3.0e38)


@dataclass(frozen=True)
class GpuRefineStats:
    """What `refine_nm_on_gpu` did; the fields of the core's `RefineStats`."""

    error_before: float
    error_after: float
    swaps: int
    sweeps: int
    converged: bool
    seconds: float


def gpu_refinable(weight: torch.Tensor, m: int) -> bool:
    """Whether `refine_nm_on_gpu` handles an `(out, in)` weight with groups of `m`."""
    return m in GPU_GROUP_SIZES and weight.dim() == 2 and weight.shape[1] % m == 0


@triton.jit
def _refine_block(
    w_ptr,  # (rows, cols) float32
    keep_ptr,  # (rows, cols) int8, updated in place on the block's columns
    r_ptr,  # (rows, cols) float32, exact at the block's start
    g_ptr,  # (cols, cols) float32
    dd_ptr,  # (rows, BLOCK) float32 out: the change of d on the block's columns
    err_ptr,  # (rows,) float32, running error per row, updated
    swaps_ptr,  # (rows,) int32, swaps per row, added to
    rows,
    cols,
    col0,
    rel_tol,
    M: tl.constexpr,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
):
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = row < rows
    col = col0 + tl.arange(0, BLOCK)
    col_ok = col < cols
    r = tl.load(
        r_ptr + row[:, None] * cols + col[None, :],
        mask=row_ok[:, None] & col_ok[None, :],
        other=0.0,
    )
    err = tl.load(err_ptr + row, mask=row_ok, other=0.0)
    swaps = tl.zeros([ROWS], dtype=tl.int32)
    a = tl.arange(0, M)
    pair = tl.arange(0, M * M)
    # Pair p = (j, i): prune kept column j, keep pruned column i; p = j * M + i, so the
    # lowest p among equals is the core's tie rule.
    j_of = pair // M
    i_of = pair % M
    group_of_col = tl.arange(0, BLOCK) // M
    for g in range(0, BLOCK // M):
        c0 = col0 + g * M
        at = row[:, None] * cols + c0 + a[None, :]
        # Past the last column (a partial last block) nothing is kept, so nothing swaps.
        ok_at = row_ok[:, None] & (c0 + a[None, :] < cols)  # (ROWS, M)
        w = tl.load(w_ptr + at, mask=ok_at, other=0.0)
        kept = tl.load(keep_ptr + at, mask=ok_at, other=0) != 0
        in_group = group_of_col[None, :] == g
        # r on the group's columns, from the register tile: (ROWS, M)
        rg = tl.sum(tl.reshape(tl.where(in_group, r, 0.0), (ROWS, BLOCK // M, M)), axis=1)
        diag = tl.load(g_ptr + (c0 + a) * cols + c0 + a)  # (M,)
        own = w * w * diag[None, :]
        drop = 2.0 * w * rg + own  # error change of pruning a column alone (if kept)
        grow = -2.0 * w * rg + own  # error change of keeping a column alone (if pruned)
        # Spread the per-column terms over the pairs: (ROWS, M * M).
        sel_j = (a[None, :] == j_of[:, None]).to(tl.float32)  # (M * M, M)
        sel_i = (a[None, :] == i_of[:, None]).to(tl.float32)
        drop_p = tl.sum(drop[:, None, :] * sel_j[None, :, :], axis=2)
        grow_p = tl.sum(grow[:, None, :] * sel_i[None, :, :], axis=2)
        w_j = tl.sum(w[:, None, :] * sel_j[None, :, :], axis=2)
        w_i = tl.sum(w[:, None, :] * sel_i[None, :, :], axis=2)
        g_ji = tl.load(g_ptr + (c0 + j_of) * cols + c0 + i_of)  # (M * M,)
        kept_f = kept.to(tl.float32)
        kept_j = tl.sum(kept_f[:, None, :] * sel_j[None, :, :], axis=2) > 0.5
        pruned_i = tl.sum(kept_f[:, None, :] * sel_i[None, :, :], axis=2) < 0.5
        delta = drop_p + grow_p - 2.0 * w_i * w_j * g_ji[None, :]
        delta = tl.where(kept_j & pruned_i, delta, NOT_A_SWAP)
        best = tl.min(delta, axis=1)
        p_best = tl.min(tl.where(delta == best[:, None], pair[None, :], M * M), axis=1)
        take = row_ok & (best < tl.minimum(-rel_tol * err, 0.0))
        j = p_best // M
        i = p_best % M
        wj = tl.sum(tl.where(a[None, :] == j[:, None], w, 0.0), axis=1)
        wi = tl.sum(tl.where(a[None, :] == i[:, None], w, 0.0), axis=1)
        is_j = take[:, None] & (a[None, :] == j[:, None])
        is_i = take[:, None] & (a[None, :] == i[:, None])
        tl.store(keep_ptr + at, tl.where(is_j, 0, tl.where(is_i, 1, kept.to(tl.int8))), mask=ok_at)
        dd = tl.where(is_j, w, tl.where(is_i, -w, 0.0))
        tl.store(dd_ptr + row[:, None] * BLOCK + g * M + a[None, :], dd, mask=ok_at)
        # r += w_j G[j, block] - w_i G[i, block], for the rows that swapped
        tile_ok = take[:, None] & col_ok[None, :]
        g_j = tl.load(g_ptr + (c0 + j)[:, None] * cols + col[None, :], mask=tile_ok, other=0.0)
        g_i = tl.load(g_ptr + (c0 + i)[:, None] * cols + col[None, :], mask=tile_ok, other=0.0)
        r += wj[:, None] * g_j - wi[:, None] * g_i
        err += tl.where(take, best, 0.0)
        swaps += take.to(tl.int32)
    tl.store(err_ptr + row, err, mask=row_ok)
    tl.store(swaps_ptr + row, tl.load(swaps_ptr + row, mask=row_ok, other=0) + swaps, mask=row_ok)


def _update_residual(r: torch.Tensor, dd: torch.Tensor, g_rows: torch.Tensor) -> None:
    """`r += dd @ g_rows` over all rows, rows that did not swap adding zeros. Restricting
    it to the rows that swapped needs their count on the host, a sync per column block
    that stalls the queue: a 4-block 7B prune's refinement took 6.7 s that way against
    4.8 s with this GEMM (H200)."""
    r.addmm_(dd, g_rows)


def _errors(
    w: torch.Tensor, keep: torch.Tensor, gram: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual `R = D G` and each row's error `d^T G d`, float32."""
    d = w.masked_fill(keep, 0)
    r = d @ gram
    return r, (d * r).sum(1)


def refine_nm_on_gpu(
    weight: torch.Tensor,
    gram: torch.Tensor,
    keep: torch.Tensor,
    n: int,
    m: int,
    *,
    max_sweeps: int = 16,
) -> tuple[torch.Tensor, GpuRefineStats]:
    """`ria.refine_mask` for an N:M mask, on the weight's device (see the module doc).

    Args:
        weight: `(out, in)`, any float dtype, on a CUDA device (or the CPU under
            `TRITON_INTERPRET=1`); `in` divisible by `m`.
        gram: `X^T X`, `(in, in)`, symmetric, on the same device.
        keep: `(out, in)` bool, True = kept, exactly `n` per group of `m`.
        n, m: the pattern (`m` in `GPU_GROUP_SIZES`).
        max_sweeps: most passes over the groups; the call also stops after a pass that
            makes no swap.

    Returns:
        `(keep, stats)`: the refined mask (a new bool tensor on the weight's device) and
        `GpuRefineStats` (errors in the units of `gram` times the weights squared, summed
        over rows, recomputed from the final mask in float64).
    """
    started = time.perf_counter()
    w = weight.detach().float().contiguous()
    g = gram.detach().to(w.device, torch.float32).contiguous()
    k = keep.to(w.device, torch.bool).contiguous()
    rows, cols = w.shape
    before = _exact_error(w, k, g)
    r, err = _errors(w, k, g)
    keep8 = k.to(torch.int8)
    swaps = torch.zeros(rows, dtype=torch.int32, device=w.device)
    dd = torch.empty(rows, BLOCK, dtype=torch.float32, device=w.device)
    grid = (triton.cdiv(rows, ROWS),)
    sweeps, converged, total = 0, False, 0
    while sweeps < max_sweeps:
        sweeps += 1
        for col0 in range(0, cols, BLOCK):
            width = min(BLOCK, cols - col0)
            _refine_block[grid](
                w, keep8, r, g, dd, err, swaps, rows, cols, col0, REL_TOL,
                M=m, BLOCK=BLOCK, ROWS=ROWS,
            )  # fmt: skip
            _update_residual(r, dd[:, :width], g[col0 : col0 + width])
        made = int(swaps.sum()) - total
        total += made
        if made == 0:
            converged = True
            break
    refined = keep8.bool()
    return refined, GpuRefineStats(
        error_before=before,
        error_after=_exact_error(w, refined, g),
        swaps=total,
        sweeps=sweeps,
        converged=converged,
        seconds=time.perf_counter() - started,
    )


def _exact_error(w: torch.Tensor, keep: torch.Tensor, gram: torch.Tensor) -> float:
    d = w.masked_fill(keep, 0).double()
    return float((d @ gram.double() * d).sum())
