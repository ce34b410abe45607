"""Decode kernels on sparse tensor cores: `y = x[:, order] @ W.T (+ bias)` for 1..64 tokens
(any count with the streaming wgmma kernel's prefill shapes, `MmaConfig.token_tiles`).

The weight is `mma.sp`'s sparse operand A (m16n8k32, fp16/bf16), either packed once by
`format.pack_mma24` into exactly the fragments the instruction takes, or read in place from
cuSPARSELt's compressed buffer (a `Compact24` in the "cslt" layout, as
`cslt.share_cslt_buffer` makes it: the layer then needs no second copy); the tokens are the
operand N, padded to 8 per tile (see `mma_sp.cu` for the kernel's plan). The CUDA source is
compiled on first use with NVRTC (through torch), per (dtype, configuration, token tiles,
order type), and the compiled module is cached on disk under `kernel_cache_dir()`, keyed by
a hash of the source, the options, the GPU architecture and the torch/CUDA versions.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..demo import cache_dir
from ..errors import InvalidArgumentError
from .format import COLS_PER_WORD, MMA_PAIR_COLS, MMA_TILE_ROWS, Compact24, Mma24
from .graphs import rotation_time_us

__all__ = [
    "BF16_AGREE_TOLERANCE",
    "CONFIGS",
    "E4M3_AGREE_TOLERANCE",
    "MAX_TOKENS",
    "SMEM_LIMIT",
    "MmaConfig",
    "MmaLaunch",
    "MmaWeight",
    "candidates",
    "compile_kernels",
    "cslt_meta_words",
    "default_config",
    "e4m3_candidates",
    "kernel_cache_dir",
    "kernel_fingerprint",
    "kernel_source",
    "mma24_fp8_linear",
    "mma24_linear",
    "mma_best_config",
    "mma_status",
    "nvrtc_cubin",
    "token_blocks",
    "token_tiles",
]

MAX_TOKENS = 64  # 8 token tiles of 8: beyond this the weight is re-read per 64 tokens
SMEM_LIMIT = 227 * 1024  # dynamic shared memory a block may have on sm_90
TOKEN_TILE = 8  # mma.sp's N
# How far an unproven e4m3 shape's output (k64, wgmma) may be from a plain (widened) one's, as
# a fraction of the largest output. The wgmma form sums on Hopper's FP8 tensor cores with
# fewer bits than fp32, as cuSPARSELt's fp8 GEMM does: up to 7.1e-3 at K = 4096 on an H100
# (2026-12-06), and every shape tuning picked on the 7B shapes (K up to 11008) was within
# this. A layout error is off by whole products.
E4M3_AGREE_TOLERANCE = 1e-2
# The same for bf16's wgmma shapes: exact products summed in fp32 in another order, each
# output rounded to bf16, so one ulp apart (2**-7 of a value) and a little; doubled.
BF16_AGREE_TOLERANCE = 2**-6
_ENTRY = "ria_mma_sp24"


@dataclass(frozen=True)
class MmaConfig:
    """Launch shape. With `stages == 0` (the plain kernel): `row_tiles` tiles of 16 rows per
    block, `warps` warps per block splitting the input columns, `unroll` units of weight
    loaded per warp before they are multiplied (a unit: a pair of k-steps, 64 columns; on
    cuSPARSELt's e4m3 buffer four k-steps, 128 columns, so that a lane loads 16 bytes).

    With `stages >= 2` (the tiled kernel, weights in cuSPARSELt's buffer only, no input
    order; `mma_sp.cu`, RIA_TILED): each of `warps` warps owns `row_tiles` tiles of 16 rows
    (a block: 16 * row_tiles * warps rows, a multiple of 64), `unroll` pairs of k-steps per
    shared-memory stage, `stages` stages in flight, and a cluster of `split` blocks
    splitting the input columns (1..8; > 1 needs compute capability 9.0).

    Plain kernel only (`mma_sp.cu`): `hint` is the weight loads' cache hint (RIA_LDH: 0
    none, 1 no L1 allocation, 2 that and a 256-byte L2 fetch around each load, 3 the L2
    fetch alone); `late_b` = 1 loads the tokens' B fragments per k-step instead of with
    the batch (fewer registers, so more pairs in flight per warp); `min_blocks` > 0 asks
    the compiler for registers that let that many blocks share an SM (RIA_MINB: at most
    65536 / (min_blocks * 32 * warps) per thread, spilling if it must).

    `k64` (plain kernel, e4m3 only): the e4m3 operands go to mma.sp m16n8k64 as they are,
    instead of being widened to fp16 for two m16n8k32 (`mma_sp.cu`, RIA_K64); the same
    weight forms. One native instruction on compute capability 8.9 and 12.x only (ptxas
    emulates it on 9.0 and 10.0), where `e4m3_candidates` offers it. Not yet run on a GPU
    (host emulation only): `mma_best_config` times a k64 shape only after its output
    agreed with a widened one's.

    With `wgmma` (the streaming warpgroup kernel, `wgmma_sp.cu`, compute capability 9.0
    only, the tiled kernel's inputs): a producer warp fills `stages` shared-memory stages of
    `unroll` (even) pairs of k-steps with the copy engine (TMA), `warps // 4` consumer
    warpgroups of `row_tiles` 64-row tiles each (at most 256 rows per block) run wgmma.sp
    with both operands in shared memory, `split` blocks of a cluster split the input
    columns; with `multicast` = 2, pairs of row blocks share each stage's token copies (a
    cluster of 2 x `split` blocks). `token_tiles` = t > 0 (wgmma only) gives each block
    8t tokens (t <= 32: wgmma's N <= 256) and the grid a block per 8t tokens, for any token
    count (prefill); 0: one block holds all the call's tokens (at most `MAX_TOKENS`)."""

    row_tiles: int = 1
    warps: int = 16
    unroll: int = 2
    stages: int = 0
    split: int = 1
    hint: int = 0
    late_b: int = 0
    wgmma: bool = False
    multicast: int = 1
    min_blocks: int = 0
    k64: bool = False
    token_tiles: int = 0

    def __post_init__(self) -> None:
        if self.k64 and (self.tiled or self.wgmma):
            raise InvalidArgumentError(f"k64 is the plain kernel's e4m3 form: {self!r}")
        if min(self.row_tiles, self.warps, self.unroll, self.split) < 1 or self.warps > 32:
            raise InvalidArgumentError(
                f"MmaConfig needs positive fields and at most 32 warps, got {self!r}"
            )
        if self.late_b not in (0, 1) or self.hint not in range(4):
            raise InvalidArgumentError(f"late_b is 0 or 1, hint 0..3: {self!r}")
        if self.stages and (self.late_b or self.hint or self.min_blocks):
            raise InvalidArgumentError(
                f"hint, late_b and min_blocks are the plain kernel's: {self!r}"
            )
        if self.min_blocks < 0 or self.min_blocks * self.warps > 64:
            raise InvalidArgumentError(
                f"min_blocks * warps must be at most 64 warps per SM, got {self!r}"
            )
        if self.stages == 0 and self.split != 1:
            raise InvalidArgumentError(f"split > 1 needs the tiled kernel (stages >= 2): {self!r}")
        if self.stages and (self.stages < 2 or self.split > 8 or (self.row_tiles * self.warps) % 4):
            raise InvalidArgumentError(
                "the tiled kernel needs stages >= 2, split <= 8 and row_tiles * warps a "
                f"multiple of 4 (whole 64-row blocks), got {self!r}"
            )
        if self.wgmma and (
            self.stages < 2 or self.warps % 4 or self.unroll % 2 or self.row_tiles * self.warps > 16
        ):
            raise InvalidArgumentError(
                "the wgmma kernel needs stages >= 2, whole warpgroups (warps % 4 == 0), an even "
                f"unroll and at most 256 rows per block (row_tiles * warps <= 16), got {self!r}"
            )
        if self.multicast not in (1, 2) or (
            self.multicast > 1 and (not self.wgmma or self.multicast * self.split > 8)
        ):
            raise InvalidArgumentError(
                f"multicast is 1 or 2, the wgmma kernel's, in clusters of <= 8 blocks: {self!r}"
            )
        if self.token_tiles and (not self.wgmma or not 1 <= self.token_tiles <= 32):
            raise InvalidArgumentError(
                f"token_tiles is the wgmma kernel's, 1..32 tiles of 8 tokens: {self!r}"
            )

    @property
    def tiled(self) -> bool:
        """Whether this is the tiled kernel's shape (x and weights staged in shared memory)."""
        return self.stages > 0

    def __str__(self) -> str:
        if self.wgmma:
            mc = f"m{self.multicast}" if self.multicast > 1 else ""
            mc += f"t{self.token_tiles}" if self.token_tiles else ""
            return f"g{self.row_tiles}w{self.warps}u{self.unroll}s{self.stages}k{self.split}{mc}"
        if self.tiled:
            return f"t{self.row_tiles}w{self.warps}u{self.unroll}s{self.stages}k{self.split}"
        extra = (f"h{self.hint}" if self.hint else "") + ("b" if self.late_b else "")
        extra += f"n{self.min_blocks}" if self.min_blocks else ""
        extra += "k64" if self.k64 else ""
        return f"r{self.row_tiles}w{self.warps}u{self.unroll}{extra}"

    @property
    def streaming(self) -> bool:
        """Whether this plain shape uses either of the M <= 8 streaming options (a cache
        hint, late B loads)."""
        return bool(self.hint or self.late_b)


def token_tiles(config: MmaConfig, m: int) -> int:
    """8-token tiles one block of `config` holds for a call on `m` tokens."""
    return config.token_tiles or -(-m // TOKEN_TILE)


def token_blocks(config: MmaConfig, m: int) -> int:
    """Blocks along the tokens (the grid's third dimension) for a call on `m` tokens."""
    return -(-m // (TOKEN_TILE * config.token_tiles)) if config.token_tiles else 1


def _check_tokens(m: int, config: MmaConfig) -> None:
    """A token count the launch shape serves: 1..MAX_TOKENS, or any with `token_tiles`."""
    if m < 1 or (m > MAX_TOKENS and not config.token_tiles):
        raise InvalidArgumentError(
            f"{m} tokens; the {config} kernel takes 1..{MAX_TOKENS} (a wgmma shape with "
            "token_tiles takes any count)"
        )


# Launch shapes timed by `mma_best_config`, per token count: the ones that won a shape on
# an H200 (benches/results/decode_kernels_h200*.json; the first of each is the default).
# (1, 8, 8), (1, 16, 4) and, at M = 16, (2, 8, 4) were timed too and never won.
# M <= 8: one token tile; the hinted shapes won e4m3 (fp8) M = 1 on q/k/v/o and down.
_FEW = (
    MmaConfig(1, 16, 2),
    MmaConfig(2, 8, 4),
    MmaConfig(1, 16, 4, hint=2),
    MmaConfig(1, 16, 2, hint=2),
)
_SOME = (MmaConfig(2, 16, 2), MmaConfig(4, 8, 2))  # M <= 16
_MANY = (MmaConfig(2, 8, 4), MmaConfig(4, 8, 2), MmaConfig(2, 16, 2))  # M <= 64
# M <= 8 on cuSPARSELt's buffer: the streaming options (`MmaConfig.hint`, `late_b`) won
# every shape in a sweep on an H200 (benches/results/decode_kernels_h200_gemv.json; before:
# r1w16u1, r1w8u4, r1w16u2): no L1 allocation for the weight (h1) at M = 2..8, the 256-byte
# L2 fetch (h2) on down (K = 11008) and, at M = 1, two pairs per batch with B per k-step
# (u2h2b); r2w8u4 (no hint) won gate/up at M = 8. The first of each is the default (M = 1
# has its own order). Prefetching the next batch into registers and a cluster splitting K
# were slower on every shape (that JSON; the variants were removed since).
_CSLT_FEW = (
    MmaConfig(1, 16, 1, hint=1),
    MmaConfig(1, 16, 2, hint=2, late_b=1),
    MmaConfig(1, 16, 1, hint=2),
    MmaConfig(2, 8, 4),
)
_CSLT_ONE = (_CSLT_FEW[1], _CSLT_FEW[0], _CSLT_FEW[2])
# The tiled kernel (MmaConfig(R, W, U, stages, split), cuSPARSELt's buffer only) for M > 8:
# x staged once per block of rows instead of re-read per 16 rows. The shapes that won a
# shape and token count in a sweep on an H200 (benches/results/decode_kernels_h200_tiled.json):
# against the plain kernel it wins gate/up at M = 16 and 32 and every shape at M = 64
# (1.4-1.7x there), and loses q/k/v/o and down at M = 16 and 32 (by up to 23%), so both are
# timed; at M > 32 the tiled t2w4u2s3k4 (faster than the plain kernel on all three LLaMA
# shapes at M = 64) is the default.
_T1 = MmaConfig(2, 4, 2, 3, 4)  # 128 rows, 3 stages of 128 columns, a cluster of 4
_CSLT_SOME = (*_SOME, _T1, MmaConfig(1, 4, 2, 4, 4))
_CSLT_HALF = (  # M <= 32
    MmaConfig(2, 8, 2),
    MmaConfig(4, 8, 2),
    MmaConfig(2, 8, 4),
    MmaConfig(1, 4, 2, 4, 4),
    MmaConfig(1, 8, 1, 4, 4),
    _T1,
)
_CSLT_MANY = (_T1, MmaConfig(2, 8, 2, 3, 4), MmaConfig(2, 8, 2), MmaConfig(4, 8, 2))
# The streaming warpgroup kernel (MmaConfig(R, W, U, stages, split, wgmma=True), sm_90
# only) for M > 8 (e4m3: any M, below): a producer warp streams the weight and tokens with
# TMA into `stages` shared-memory stages, 64 * R * W / 4 rows per block. On an H200
# (benches/results/decode_kernels_h200_wgmma.json) it beat every other kernel on the three
# LLaMA shapes at M = 16, 32 and 64 (1.23-1.57x dense), so it leads the candidates (the
# untuned default there); these shapes won a shape and count or came within 5%: 64-row
# blocks with 256-byte row pieces per stage and a cluster of 2 over K on 4096 rows, token
# multicast between row-block pairs (`multicast=2`) on 11008. The shapes after those four
# (three) come from e4m3's sweep (`_E4M3_WG_HALF` below), timed for bf16 on an H100
# (2026-12-06, `python benches/decode_kernels.py --wgmma-sweep --ms 16,32,64`,
# benches/results/decode_kernels_h100_wgmma.json): fewer stages, and no K split on q/k/v/o
# and gate/up, 4.6-20% faster than the first four there (gate/up M = 64: 22.7 against 27.3
# us), 2% on down at M = 16-32, none on down at 64.
_WG_HALF = (  # M <= 32
    MmaConfig(1, 4, 4, 4, 2, wgmma=True),
    MmaConfig(1, 4, 2, 4, 2, wgmma=True, multicast=2),
    MmaConfig(1, 4, 2, 4, 4, wgmma=True),
    MmaConfig(3, 4, 2, 5, 2, wgmma=True),
    MmaConfig(1, 4, 8, 3, 1, wgmma=True),
    MmaConfig(1, 8, 4, 3, 1, wgmma=True),
    MmaConfig(1, 4, 8, 3, 2, wgmma=True),
)
_WG_MANY = (  # M <= 64
    MmaConfig(1, 4, 4, 4, 2, wgmma=True),
    MmaConfig(3, 4, 2, 5, 2, wgmma=True, multicast=2),
    MmaConfig(3, 4, 2, 5, 2, wgmma=True),
    MmaConfig(1, 4, 4, 3, 2, wgmma=True),
    MmaConfig(1, 8, 4, 3, 1, wgmma=True),
)


# e4m3 on the streaming kernel, from its own sweep (H100, 2026-12-06, `python
# benches/fp8_speed.py --only shapes --m 16,32,64`, benches/results/fp8_shapes_h100.json:
# 128-233 shapes per LLaMA-2-7B shape and token count, each timed with the token
# quantization before it): no K split won q/k/v/o and gate/up at 16-64 tokens and down at
# 16-32 (a cluster's start and its partial sums' exchange cost more than the SMs it adds),
# with 64 or 128 rows per block and as few stages as keep the copies streaming; down at 64
# kept a split of 2. Against the bf16-picked shapes above, with quantization: q/k/v/o
# 7.95 / 8.41 / 9.65 us at M = 16 / 32 / 64 (9.25 / 9.72 / 10.48 before), gate/up 14.09 /
# 14.62 / 15.71 (17.38 / 16.74 / 20.05), down 14.66 / 15.26 / 16.56 (15.59 / 16.42 /
# 17.34). These lead the e4m3 wgmma candidates; at 1-8 tokens (one token tile)
# `_E4M3_WG_HALF` are the only ones, not swept there: with them on an H100 (2026-12-06,
# `python benches/fp8_speed.py --only gemm --m 1,8`, benches/results/fp8_gemm_h100_m1_8.json)
# tuning picked wgmma for gate/up and down at M = 1 and 8 (M = 8: 14.2 against 21.5 and
# 15.5 against 19.9 us with quantization) and for q/k/v/o at 8.
_E4M3_WG_HALF = (  # M <= 32
    MmaConfig(1, 4, 8, 3, 1, wgmma=True),
    MmaConfig(1, 8, 2, 5, 1, wgmma=True),
    MmaConfig(1, 8, 4, 3, 1, wgmma=True),
    MmaConfig(1, 4, 2, 4, 1, wgmma=True),
    MmaConfig(1, 4, 4, 3, 2, wgmma=True),
)
_E4M3_WG_MANY = (  # M <= 64
    MmaConfig(1, 4, 4, 3, 1, wgmma=True),
    MmaConfig(1, 4, 2, 4, 1, wgmma=True),
    MmaConfig(1, 8, 2, 5, 1, wgmma=True),
    MmaConfig(1, 4, 4, 3, 2, wgmma=True),
    MmaConfig(1, 4, 2, 6, 2, wgmma=True),
)


# e4m3 prefill (M > MAX_TOKENS) on the streaming kernel with blocks of 128-256 tokens over the
# grid (`token_tiles`): from `python benches/fp8_speed.py --only shapes --m 1024,2048` (82
# shapes on the LLaMA-2-7B shapes, H100, 2026-12-06, benches/results/fp8_shapes_prefill_h100.json),
# each case's fastest with the token quantization (the first two), then the two next by mean
# time relative to each case's fastest.
_E4M3_WG_PREFILL = (
    MmaConfig(2, 8, 2, 3, 1, wgmma=True, token_tiles=16),
    MmaConfig(1, 8, 2, 2, 1, wgmma=True, token_tiles=16),
    MmaConfig(2, 4, 2, 2, 1, wgmma=True, token_tiles=16),
    MmaConfig(1, 8, 2, 2, 1, wgmma=True, token_tiles=32),
)


def wgmma_stage_bytes(config: MmaConfig, tiles: int, e4m3: bool = False) -> int:
    """Bytes of one stage of the streaming kernel (RIA_STAGE_BYTES in wgmma_sp.cu): values
    (rows x 64 * unroll bytes: half the stage's columns, 2 bytes each), tokens (8 * tiles x
    128 * unroll bytes) and metadata (256 bytes per 64 rows and k-tile of 32 columns). With
    `e4m3` a k-tile is 64 columns of 1-byte values: the same bytes, and 512 of metadata."""
    rows, u = 16 * config.row_tiles * config.warps, config.unroll
    meta = 512 if e4m3 else 256
    return rows * 64 * u + 8 * tiles * 128 * u + rows // 64 * 2 * u * meta


def wgmma_smem_bytes(config: MmaConfig, tiles: int, e4m3: bool = False) -> int:
    """Dynamic shared memory of the streaming kernel: its stages and two 8-byte barriers per
    stage, plus 1024 bytes to align the swizzled boxes; the stages also hold the block's fp32
    sums (tokens x (rows + 4)) at the end."""
    rows = 16 * config.row_tiles * config.warps
    stages = config.stages * wgmma_stage_bytes(config, tiles, e4m3)
    return max(stages, 4 * 8 * tiles * (rows + 4)) + 16 * config.stages + 1024


def _with_stages_that_fit_e4m3(config: MmaConfig, tiles: int) -> MmaConfig:
    """`config`, or for a wgmma shape whose stages do not fit in `SMEM_LIMIT` with e4m3's
    metadata at `tiles` token tiles, the same shape with as many stages as fit (at least 2)."""
    while config.wgmma and config.stages > 2 and wgmma_smem_bytes(config, tiles, True) > SMEM_LIMIT:
        config = replace(config, stages=config.stages - 1)
    return config


# e4m3's metadata is twice bf16's: at 57-64 tokens the 5-stage 192-row shapes above need
# 235 KB, more than `SMEM_LIMIT`, and e4m3 times them with 4 stages (189 KB) instead (bf16's
# fastest gate/up shape at M = 64 on an H200 was the multicast one): every wgmma shape with
# the stages that fit at each token count it serves (`e4m3_candidates`).
_E4M3_WG_FITTING = tuple(
    dict.fromkeys(
        _with_stages_that_fit_e4m3(c, tiles)
        for shapes, tokens in (
            (_WG_HALF + _E4M3_WG_HALF, 32),
            (_WG_MANY + _E4M3_WG_MANY, MAX_TOKENS),
        )
        for c in shapes
        for tiles in range(2, -(-tokens // TOKEN_TILE) + 1)
    )
)


# e4m3 at M <= 8 with a register cap (`min_blocks`): the capped shapes that beat every
# uncapped one on a shape in a sweep on an H200 (2026-12-04, us per GEMM alone, weights
# streaming): on the fragments r1w16u4h2n2 (q/k/v/o M = 1: 5.0 against 5.3) and
# r1w16u2h2n3 (q/k/v/o M = 8: 6.8 against 7.0); on cuSPARSELt's buffer r1w16u2h2n2
# (q/k/v/o M = 1: 5.7 against 6.0; down M = 1: 13.3 against 13.9), r2w8u2n4 (gate/up M = 8:
# 17.9 against 20.8) and r1w16u1h1n2 (down M = 8: 18.2 against 18.5). Capping did not
# help gate/up at M = 1 in either form (the buffer's 2.6-wave tail there stays).
_E4M3_CAPPED = (
    MmaConfig(1, 16, 4, hint=2, min_blocks=2),
    MmaConfig(1, 16, 2, hint=2, min_blocks=3),
)
_E4M3_CSLT_CAPPED = (
    MmaConfig(1, 16, 2, hint=2, min_blocks=2),
    MmaConfig(2, 8, 2, min_blocks=4),
    MmaConfig(1, 16, 1, hint=1, min_blocks=2),
)


def _per_e4m3_unit(shapes: tuple[MmaConfig, ...]) -> tuple[MmaConfig, ...]:
    """`shapes` with half the unroll (at least 1): the same k-steps per batch where a unit
    is four k-steps (cuSPARSELt's e4m3 buffer) instead of two."""
    return tuple(replace(c, unroll=max(1, c.unroll // 2)) for c in shapes)


def _k64(shapes: tuple[MmaConfig, ...]) -> tuple[MmaConfig, ...]:
    """`shapes` (plain ones) fed to mma.sp m16n8k64 on the e4m3 operands (`MmaConfig.k64`)."""
    return tuple(replace(c, k64=True) for c in shapes)


CONFIGS = tuple(
    dict.fromkeys(
        _k64(_FEW[:1] + _SOME + _MANY + _CSLT_ONE[:1] + _CSLT_FEW[:1])
        + _k64(_per_e4m3_unit(_SOME + _MANY))
        + _FEW
        + _SOME
        + _MANY
        + _per_e4m3_unit(_FEW + _SOME + _MANY)
        + _CSLT_ONE
        + _CSLT_FEW
        + _CSLT_SOME
        + _CSLT_HALF
        + _CSLT_MANY
        + _WG_HALF
        + _WG_MANY
        + _E4M3_WG_FITTING
        + _E4M3_CAPPED
        + _E4M3_CSLT_CAPPED
        + _E4M3_WG_PREFILL
    )
)


def candidates(m: int, cslt: bool = False) -> tuple[MmaConfig, ...]:
    """The launch shapes worth timing for `m` tokens (weights in cuSPARSELt's buffer if
    `cslt`), less those the current GPU cannot launch (clusters before compute capability
    9.0, the wgmma kernel on anything but 9.0)."""
    if cslt:
        shapes: tuple[MmaConfig, ...]
        if m > 16:
            shapes = _CSLT_HALF if m <= 32 else _CSLT_MANY
        else:
            shapes = (_CSLT_ONE if m == 1 else _CSLT_FEW) if m <= 8 else _CSLT_SOME
        shapes = (*_streaming_shapes(m), *shapes)  # first: the default where it runs
        return shapes if _has_clusters() else tuple(c for c in shapes if c.split == 1)
    return _FEW if m <= 8 else _SOME if m <= 16 else _MANY


def _streaming_shapes(m: int, e4m3: bool = False) -> tuple[MmaConfig, ...]:
    """The streaming wgmma kernel's shapes for `m` tokens (none off sm_90): bf16's (none at
    M <= 8), or with `e4m3` e4m3's own sweep's first, then bf16's."""
    if not _has_wgmma():
        return ()
    bf16 = () if m <= 8 else _WG_HALF if m <= 32 else _WG_MANY
    return (*(_E4M3_WG_HALF if m <= 32 else _E4M3_WG_MANY), *bf16) if e4m3 else bf16


def _has_clusters() -> bool:
    """Whether the current GPU launches thread-block clusters (sm_90+); True without CUDA,
    where nothing is launched and the shapes are only listed."""
    capability = _capability()
    return capability is None or capability >= (9, 0)


def _has_wgmma() -> bool:
    """Whether the current GPU runs wgmma (compute capability 9.0, the sm_90a target);
    True without CUDA, where the shapes are only listed."""
    return _capability() in (None, (9, 0))


def _capability() -> tuple[int, int] | None:
    """The current CUDA device's compute capability (None without CUDA)."""
    if not torch.cuda.is_available():
        return None
    return _device_capability(torch.cuda.current_device())


@functools.cache
def _device_capability(device: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def default_config(m: int, cslt: bool = False, ordered: bool = False) -> MmaConfig:
    """The configuration used without tuning for `m` tokens (the fastest on an H200 for the
    LLaMA-2-7B shapes in benches/results/decode_kernels_h200*.json); with an input order
    (`ordered`), the fastest plain one (the tiled kernel reads no order)."""
    shapes = candidates(m, cslt)
    return next((c for c in shapes if not c.tiled), shapes[0]) if ordered else shapes[0]


def mma_status(device: torch.device | None = None) -> str | None:
    """None if the kernel can run on `device` (default: the current CUDA device), else why
    not. The first call on a GPU compiles one kernel (or reads it from the disk cache), so
    a missing or broken NVRTC shows here rather than in the middle of `sparsify`."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"mma.sp needs compute capability >= 8.0, device has {major}.x"
    return _nvrtc_status(f"{major}{minor}")


@functools.cache
def _nvrtc_status(arch: str) -> str | None:
    try:
        _compile(kernel_source(torch.bfloat16, default_config(1), 1, 0), arch)
    except (ImportError, OSError, RuntimeError) as err:  # no NVRTC library, or it failed
        return f"NVRTC cannot compile the mma.sp kernel for sm_{arch}: {err}"
    return None


def kernel_cache_dir() -> Path:
    """Where compiled kernels are kept: `<ria cache>/kernels` (`$RIA_CACHE` or the user cache)."""
    return cache_dir() / "kernels"


@functools.cache
def kernel_fingerprint() -> str:
    """A short hash of the kernel sources, of every launch shape tuning may time (`CONFIGS`)
    and of which ones it times per token count on this GPU (`candidates`,
    `e4m3_candidates`): it changes whenever any does, so a cached plan is retuned when a
    token count gains a shape that `CONFIGS` already held."""
    per_count = [
        (m, cslt, candidates(m, cslt), e4m3_candidates(m, cslt))
        for m in range(1, MAX_TOKENS + 2)  # (every count above MAX_TOKENS has the same lists)
        for cslt in (False, True)
    ]
    text = "\0".join([*(_source(f) for f in _SOURCES), repr(CONFIGS), repr(per_count)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_SOURCES = ("mma_sp.cu", "wgmma_sp.cu")


def _source(name: str = "mma_sp.cu") -> str:
    return resources.files("ria.sparse").joinpath(name).read_text("utf-8")


_ORDER_BITS = {None: 0, torch.int32: 32, torch.int64: 64}
# (dtype, config, token tiles, order bits, e4m3, cslt, device index) -> loaded kernel
_KERNELS: dict[tuple[torch.dtype, MmaConfig, int, int, bool, bool, int], Any] = {}
# A weight the kernel reads: the mma fragments, or cuSPARSELt's buffer as a "cslt" Compact24.
MmaWeight = Mma24 | Compact24


def _compile(source: str, arch: str) -> bytes:
    """NVRTC output (PTX or cubin, whichever this torch returns) for `source`, from the disk
    cache when it holds it."""
    from torch.cuda import _utils

    options = ["-std=c++17"]
    key = "\0".join([source, arch, *options, torch.__version__, str(torch.version.cuda)])
    path = kernel_cache_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.bin"
    if path.is_file():
        return path.read_bytes()
    result = _utils._nvrtc_compile(source, _ENTRY, compute_capability=arch, nvcc_options=options)
    binary: bytes = result[0] if isinstance(result, tuple) else result
    try:  # written atomically: concurrent processes may compile the same kernel
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(binary)
        os.replace(tmp, path)
    except OSError:  # a read-only cache only costs the next process a compile
        pass
    return binary


def nvrtc_cubin(source: str, arch: str) -> tuple[bytes, str]:
    """(cubin, ptxas's log with its register and spill counts) of a kernel `source` for
    `arch` (e.g. "sm_90a"), through NVRTC from `cuda-bindings` (which torch's CUDA wheels
    install): no GPU needed, so kernels are checked for every target on any machine.
    Raises RuntimeError with NVRTC's log when it fails, ImportError without cuda-bindings."""
    from cuda.bindings import nvrtc

    _, prog = nvrtc.nvrtcCreateProgram(source.encode(), b"ria_kernel.cu", 0, [], [])
    try:
        options = [b"-std=c++17", f"-arch={arch}".encode(), b"--ptxas-options=-v"]
        (result,) = nvrtc.nvrtcCompileProgram(prog, len(options), options)
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, log)
        if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"NVRTC ({arch}): {log.decode(errors='replace')}")
        _, size = nvrtc.nvrtcGetCUBINSize(prog)
        cubin = b" " * size
        nvrtc.nvrtcGetCUBIN(prog, cubin)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    return cubin, log.decode(errors="replace")


def kernel_source(
    dtype: torch.dtype,
    config: MmaConfig,
    tiles: int,
    order_bits: int = 0,
    e4m3: bool = False,
    cslt: bool = False,
) -> str:
    """The CUDA source NVRTC compiles for output (and, unless `e4m3`, operand) `dtype`, the
    launch shape and `tiles` 8-token tiles, reading the input through an order of
    `order_bits` (0: none, 32, 64) and the weight from cuSPARSELt's buffer if `cslt`."""
    defines = {
        "RIA_F16": int(dtype == torch.float16),
        "RIA_R": config.row_tiles,
        "RIA_W": config.warps,
        "RIA_U": config.unroll,
        "RIA_NT": tiles,
        "RIA_ORDER": order_bits,
        "RIA_E4M3": int(e4m3),
        "RIA_CSLT": int(cslt),
    }
    if config.wgmma:
        return _wgmma_source(dtype, config, tiles, e4m3)
    # (only when set: the other kernels' sources and disk cache keys stay)
    if config.hint:
        defines["RIA_LDH"] = config.hint
    if config.late_b:
        defines["RIA_PREFETCH_B"] = 0
    if config.min_blocks:
        defines["RIA_MINB"] = config.min_blocks
    if config.k64:
        if not e4m3:
            raise InvalidArgumentError(f"{config}: k64 is the e4m3 kernel's form")
        defines["RIA_K64"] = 1
    if config.tiled:  # (only then: the plain kernels' sources and disk cache keys stay)
        defines |= {"RIA_TILED": 1, "RIA_S": config.stages, "RIA_SK": config.split}
    return "".join(f"#define {k} {v}\n" for k, v in defines.items()) + _source()


def _wgmma_source(dtype: torch.dtype, config: MmaConfig, tiles: int, e4m3: bool = False) -> str:
    """`wgmma_sp.cu` for `tiles` token tiles (e4m3 operands if `e4m3`), with its settings and
    `wgmma_wrapper`."""
    defines = {
        "RIA_F16": int(dtype == torch.float16),
        "RIA_R": config.row_tiles,
        "RIA_WG": config.warps // 4,
        "RIA_U": config.unroll,
        "RIA_S": config.stages,
        "RIA_SK": config.split,
        "RIA_NT": tiles,
        "RIA_NACC": 4 * tiles,
    }
    if config.multicast > 1:  # (only then: the other shapes' sources and cache keys stay)
        defines["RIA_MC"] = config.multicast
    if e4m3:
        defines["RIA_E4M3"] = 1
    head = "".join(f"#define {k} {v}\n" for k, v in defines.items())
    return head + wgmma_wrapper(tiles, dtype, e4m3) + _source("wgmma_sp.cu")


def wgmma_wrapper(tiles: int, dtype: torch.dtype, e4m3: bool = False) -> str:
    """CUDA source of `wgmma_ss<SEL>(acc, da, db, e)`: one m64nNk32 sparse wgmma (with
    `e4m3`: m64nNk64 on e4m3 operands, which have no transpose operands) with A and B
    through the shared-memory descriptors `da`, `db` (both K-major), the metadata word `e`
    (sparsity selector SEL) from a register, fp32 accumulators `acc` (N / 2 per thread,
    added to: scale-d 1)."""
    n_acc = 4 * tiles
    ab = "e4m3" if e4m3 else "f16" if dtype == torch.float16 else "bf16"
    shape, transposes = ("k64", "") if e4m3 else ("k32", ", 0, 0")
    acc = ", ".join(f"%{i}" for i in range(n_acc))
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(n_acc))
    return (
        "template <int SEL>\n"
        "__device__ __forceinline__ void wgmma_ss(float (&d)[RIA_NACC], "
        "unsigned long long da, unsigned long long db, unsigned int e) {\n"
        '  asm volatile("{\\n.reg .pred p;\\n'
        f"setp.ne.b32 p, %{n_acc + 3}, 0;\\n"
        f"wgmma.mma_async.sp.sync.aligned.m64n{8 * tiles}{shape}.f32.{ab}.{ab} "
        f"{{{acc}}}, %{n_acc}, %{n_acc + 1}, %{n_acc + 2}, %{n_acc + 4}, "
        f'p, 1, 1{transposes};\\n}}\\n"\n'
        f"      : {outs}\n"
        '      : "l"(da), "l"(db), "r"(e), "r"(1), "n"(SEL));\n'
        "}\n"
    )


def _arch(config: MmaConfig | None = None) -> str:
    """NVRTC's target for the current GPU: sm_90a (Hopper's own instructions) for the wgmma
    kernel."""
    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}" + ("a" if config is not None and config.wgmma else "")


def compile_kernels(
    dtype: torch.dtype,
    token_counts: Iterable[int] = (1, 16, 64),
    order_dtype: torch.dtype | None = None,
    threads: int = 8,
    *,
    cslt: bool = False,
    configs: Iterable[MmaConfig] | None = None,
    e4m3: bool = False,
) -> None:
    """Compile (or find in the disk cache) the kernels `mma_best_config` times for these
    token counts (for weights in cuSPARSELt's buffer if `cslt`; `configs` instead of each
    count's `candidates`, or `e4m3_candidates` with `e4m3`: e4m3 operands, `dtype` out),
    in parallel threads (NVRTC runs outside the GIL), so first calls do not."""
    bits = _ORDER_BITS[order_dtype]
    shapes = None if configs is None else tuple(configs)
    listed = e4m3_candidates if e4m3 else candidates
    jobs = {
        (c, token_tiles(c, m))
        for m in token_counts
        for c in (listed(m, cslt) if shapes is None else shapes)
    }
    sources = [
        (kernel_source(dtype, c, t, bits, e4m3=e4m3, cslt=cslt), _arch(c))
        for c, t in sorted(jobs, key=str)
    ]
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda job: _compile(*job), sources))


def _kernel(
    dtype: torch.dtype,
    config: MmaConfig,
    tiles: int,
    order_bits: int,
    e4m3: bool = False,
    cslt: bool = False,
) -> Any:
    device = torch.cuda.current_device()
    key = (dtype, config, tiles, order_bits, e4m3, cslt, device)
    kernel = _KERNELS.get(key)
    if kernel is None:
        from torch.cuda import _utils

        if config.wgmma and not _has_wgmma():
            raise InvalidArgumentError(f"{config} needs wgmma (compute capability 9.0)")
        source = kernel_source(dtype, config, tiles, order_bits, e4m3, cslt)
        binary = _compile(source, _arch(config))
        loaded = _utils._cuda_load_module(binary, [_ENTRY])
        kernel = loaded[_ENTRY] if isinstance(loaded, dict) else getattr(loaded, _ENTRY)
        smem = _smem_bytes(config, tiles, e4m3)
        if smem >= 48 * 1024:
            kernel.set_shared_memory_config(smem)
        _KERNELS[key] = kernel
    return kernel


def _smem_bytes(config: MmaConfig, tiles: int, e4m3: bool = False) -> int:
    """Dynamic shared memory per block. Plain kernel: the warps' partial sums, fp32 per
    warp, row tile, token tile, lane. Tiled kernel (as RIA_STAGE_BYTES in mma_sp.cu):
    `stages` stages of values (rows x (64 * unroll + 16) bytes), tokens (8 * tiles x
    (128 * unroll + 16) bytes) and metadata (256 bytes per 64 rows and 32 columns), and with
    `split > 1` at least the block's fp32 sums (rows x tokens) for the cluster's reduction.
    Wgmma kernel: `wgmma_smem_bytes`."""
    if config.wgmma:
        return wgmma_smem_bytes(config, tiles, e4m3)
    if not config.tiled:
        return 4 * config.warps * config.row_tiles * tiles * 4 * 32
    rows, u = 16 * config.row_tiles * config.warps, config.unroll
    stage = rows * (64 * u + 16) + 8 * tiles * (128 * u + 16) + rows // 64 * 2 * u * 256
    sums = 4 * rows * 8 * tiles if config.split > 1 else 0
    return max(config.stages * stage, sums)


def _grid(config: MmaConfig, row_tiles: int, blocks_z: int = 1) -> tuple[int, int, int]:
    """Blocks: one per `config.row_tiles` row tiles (plain kernel), or per block of
    16 * row_tiles * warps rows (tiled kernel; wgmma kernel: 64 * row_tiles * warps / 4,
    rounded up to whole multicast pairs) times `split`, times the wgmma kernel's token
    blocks `blocks_z` (`token_blocks`)."""
    if not config.tiled:
        return (-(-row_tiles // config.row_tiles), 1, 1)
    blocks = -(-row_tiles // (config.row_tiles * config.warps))
    return (-(-blocks // config.multicast) * config.multicast, config.split, blocks_z)


def _check(
    x: torch.Tensor,
    packed: MmaWeight,
    bias: torch.Tensor | None,
    order: torch.Tensor | None,
) -> None:
    if isinstance(packed, Compact24):
        _check_cslt(packed)
    if x.dim() != 2 or x.shape[1] != packed.in_features:
        raise InvalidArgumentError(f"x must be (M, {packed.in_features}), got {tuple(x.shape)}")
    if x.dtype != packed.values.dtype or x.dtype not in (torch.float16, torch.bfloat16):
        raise InvalidArgumentError(
            f"x is {x.dtype}, the weight {packed.values.dtype}; both must be fp16 or bf16"
        )
    if x.device != packed.values.device or x.device.type != "cuda":
        raise InvalidArgumentError(f"x is on {x.device}, the weight on {packed.values.device}")
    if packed.in_features % 4:
        raise InvalidArgumentError(f"in_features={packed.in_features} is not a multiple of 4")
    if bias is not None and (bias.shape != (packed.out_features,) or bias.dtype != x.dtype):
        raise InvalidArgumentError(
            f"bias must be ({packed.out_features},) {x.dtype}, got {tuple(bias.shape)} {bias.dtype}"
        )
    if order is not None:
        if order.dtype not in (torch.int32, torch.int64):
            raise InvalidArgumentError(f"order must be int32 or int64, got {order.dtype}")
        if order.shape != (packed.in_features,) or order.device != x.device:
            raise InvalidArgumentError(
                f"order must be ({packed.in_features},) on {x.device}, "
                f"got {tuple(order.shape)} on {order.device}"
            )


def cslt_meta_words(out_features: int, in_features: int) -> int:
    """int32 words of cuSPARSELt's metadata for an `(N, K)` weight (`format.to_cslt_layout`):
    64 per 64-row block (rounded up) and 32-column k-tile."""
    return 64 * (in_features // COLS_PER_WORD) * -(-out_features // 64)


def _check_cslt(w: Compact24) -> None:
    """A `Compact24` the kernel can read as cuSPARSELt's buffer (see `mma_sp.cu`)."""
    n, k = w.out_features, w.in_features
    if w.layout != "cslt":
        raise InvalidArgumentError(
            f"a Compact24 weight must be in cuSPARSELt's layout ('cslt'), got {w.layout!r}"
        )
    k_align = MMA_PAIR_COLS if w.values.dtype == torch.float8_e4m3fn else COLS_PER_WORD
    if n % MMA_TILE_ROWS or k % k_align:
        raise InvalidArgumentError(
            f"cuSPARSELt's {w.values.dtype} layout needs N % {MMA_TILE_ROWS} == 0 and "
            f"K % {k_align} == 0, got ({n}, {k})"
        )
    if w.values.shape != (n, k // 2) or w.values.stride() != (k // 2, 1):
        raise InvalidArgumentError(f"values must be a row-major ({n}, {k // 2}) tensor")
    if w.values.data_ptr() % 16:  # the kernel reads 16 bytes of a row at a time
        raise InvalidArgumentError("values must start at a 16-byte aligned address")
    if w.meta.dtype != torch.int32 or w.meta.dim() != 1 or w.meta.stride() != (1,):
        raise InvalidArgumentError("meta must be 1-D contiguous int32 (cuSPARSELt's order)")
    if w.meta.numel() < cslt_meta_words(n, k):
        raise InvalidArgumentError(
            f"meta holds {w.meta.numel()} words, ({n}, {k}) needs {cslt_meta_words(n, k)}"
        )
    if w.values.data_ptr() % 16 or w.meta.data_ptr() % 4:
        raise InvalidArgumentError("values must be 16-byte and meta 4-byte aligned")


def _tiles_pairs(packed: MmaWeight) -> tuple[int, int]:
    """Row tiles of 16 and pairs of k-steps (64 columns) the kernel walks."""
    if isinstance(packed, Mma24):
        return packed.tiles, packed.pairs
    n, k = packed.out_features, packed.in_features
    return -(-n // MMA_TILE_ROWS), -(-k // MMA_PAIR_COLS)


def mma24_linear(
    x: torch.Tensor,
    packed: MmaWeight,
    bias: torch.Tensor | None = None,
    *,
    order: torch.Tensor | None = None,
    config: MmaConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x[:, order] @ W.T + bias` on sparse tensor cores, accumulated in fp32.

    Args:
        x: `(M, K)` CUDA activations, fp16/bf16, `1 <= M <= MAX_TOKENS` (any M for a wgmma
            shape with `token_tiles`), unit column stride (copied otherwise).
        packed: the 2:4 weight `(N, K)`, same dtype and device: an `Mma24` from
            `format.pack_mma24`, or a `Compact24` in cuSPARSELt's layout (`layout="cslt"`,
            values `(N, K/2)` row-major, `N % 16 == 0`, `K % 32 == 0`; e.g. from
            `cslt.share_cslt_buffer`), read in place.
        bias: `(N,)` or None.
        order: optional int32/int64 `(K,)` input order: column `k` of the product reads
            `x[:, order[k]]` (gathered while loading; not checked to be a permutation).
        config: launch shape (default `default_config(M)`, for the weight's form).
        out: optional `(M, N)` output with unit column stride.

    Returns:
        `(M, N)` in `x`'s dtype.
    """
    if config is not None and config.k64:
        raise InvalidArgumentError(f"{config}: k64 is the e4m3 kernel's form (mma24_fp8_linear)")
    if config is not None and config.tiled and (order is not None or isinstance(packed, Mma24)):
        raise InvalidArgumentError(
            f"the tiled kernel ({config}) reads cuSPARSELt's buffer without an input order"
        )
    if config is not None and config.split > 1 and not _has_clusters():
        raise InvalidArgumentError(f"{config} needs thread-block clusters (compute capability 9.0)")
    m = x.shape[0]
    config = config or default_config(m, isinstance(packed, Compact24), order is not None)
    _check_tokens(m, config)
    _check(x, packed, bias, order)
    n = packed.out_features
    align = _x_alignment(config)
    if x.stride(1) != 1 or x.stride(0) * x.element_size() % align or x.data_ptr() % align:
        x = x.clone(memory_format=torch.contiguous_format)  # a fresh, aligned copy
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.stride(1) != 1 or out.dtype != x.dtype:
        raise InvalidArgumentError(f"out must be ({m}, {n}) {x.dtype} with unit column stride")
    kernel, config, tiles, row_tiles, args = _prepare(x, packed, bias, order, config, out)
    if config.wgmma:  # tensor maps are by-value parameters: torch's kernel call takes none
        from .launch import PreparedLaunch, raw_stream

        grid, block, smem = _launch_shape(config, tiles, row_tiles, False, token_blocks(config, m))
        PreparedLaunch(kernel.func, grid, block, smem, args, patched=())(
            stream=raw_stream(x.device.index if x.device.index is not None else 0)
        )
    else:
        _launch(kernel, config, tiles, row_tiles, args)
    return out


def _prepare(
    x: torch.Tensor,
    packed: MmaWeight,
    bias: torch.Tensor | None,
    order: torch.Tensor | None,
    config: MmaConfig | None,
    out: torch.Tensor,
) -> tuple[Any, MmaConfig, int, int, list[Any]]:
    """The kernel, launch shape, token tiles, row tiles and argument list for checked
    inputs (`x` at index 0 and `out` at index 7 of the arguments; the wgmma kernel's:
    `_wgmma_args`)."""
    m = x.shape[0]
    cslt = isinstance(packed, Compact24)
    config = config or default_config(m, cslt, order is not None)
    _check_tokens(m, config)
    tiles = token_tiles(config, m)
    bits = _ORDER_BITS[None if order is None else order.dtype]
    kernel = _kernel(x.dtype, config, tiles, bits, cslt=cslt)
    row_tiles, pairs = _tiles_pairs(packed)
    if config.wgmma:
        assert isinstance(packed, Compact24)
        return kernel, config, tiles, row_tiles, _wgmma_args(x, packed, bias, out, config)
    unused = packed.values  # stands in for absent pointers (the kernel never reads it)
    args = [
        x,
        x.stride(0),
        packed.values,
        packed.meta,
        unused if order is None else order,
        unused if bias is None else bias,
        int(bias is not None),
        out,
        out.stride(0),
        m,
        packed.out_features,
        packed.in_features,
        row_tiles,
        pairs,
        unused,  # the e4m3 kernel's scales
        unused,
    ]
    return kernel, config, tiles, row_tiles, args


def _x_map(x_ptr: int, m: int, k: int, ldx: int, tiles: int, out: Any = None) -> Any:
    """The wgmma kernel's tensor map of the tokens: `(m, k)` at `x_ptr`, `ldx` elements
    between rows, boxes of 64 columns x 8 * `tiles` tokens (zeros past m and k)."""
    from .tma import encode_2d

    box = (64, TOKEN_TILE * tiles)
    return encode_2d(x_ptr, k, m, 2 * ldx, box, l2_promotion=128, out=out)


def _wgmma_args(
    x: torch.Tensor,
    packed: Compact24,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    config: MmaConfig,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[Any]:
    """Arguments of the wgmma kernel (`wgmma_sp.cu`): the tokens' and the values'
    tensor maps (the values `(N, K/2)`, boxes of 64 compressed columns x the block's rows,
    streamed with 256-byte L2 fetches; e4m3 tensors are described as 2-byte elements, half
    as many), the metadata, bias, output (`out` at index 5), then the e4m3 form's token and
    row `scales` (None: 16-bit operands)."""
    from .tma import encode_2d

    n, k = packed.out_features, packed.in_features
    if packed.meta.data_ptr() % 16:
        raise InvalidArgumentError(f"{config} copies the metadata in bulk: align it to 16 bytes")
    rows = 16 * config.row_tiles * config.warps
    tiles = token_tiles(config, x.shape[0])
    width = 1 if scales is None else 2  # values per 2-byte element the copy engine moves
    row_bytes = k // 2 * packed.values.element_size()
    wmap = encode_2d(
        packed.values.data_ptr(), k // 2 // width, n, row_bytes, (64, rows), l2_promotion=256
    )
    unused = packed.values  # (never read: the 16-bit form has no scales)
    return [
        _x_map(x.data_ptr(), x.shape[0], k // width, x.stride(0) // width, tiles),
        wmap,
        packed.meta,
        packed.values if bias is None else bias,  # (never read without bias)
        int(bias is not None),
        out,
        out.stride(0),
        x.shape[0],
        n,
        k,
        *(scales or (unused, unused)),
    ]


def _x_alignment(config: MmaConfig) -> int:
    """Bytes the start and row stride of `x` must be multiples of: the plain kernel loads
    pairs of values (4 bytes), the tiled kernel copies 16 bytes at a time."""
    return 16 if config.tiled else 4


def _launch_shape(
    config: MmaConfig, tiles: int, row_tiles: int, e4m3: bool = False, blocks_z: int = 1
) -> tuple[tuple[int, int, int], int, int]:
    """(grid, threads per block, dynamic shared memory bytes) of one launch (`blocks_z`:
    the wgmma kernel's token blocks)."""
    threads = 32 * config.warps + (32 if config.wgmma else 0)  # + the wgmma kernel's producer
    return _grid(config, row_tiles, blocks_z), threads, _smem_bytes(config, tiles, e4m3)


def _launch(kernel: Any, config: MmaConfig, tiles: int, row_tiles: int, args: list[Any]) -> None:
    grid, block, smem = _launch_shape(config, tiles, row_tiles)
    kernel(grid=grid, block=(block, 1, 1), args=args, shared_mem=smem)


class MmaLaunch:
    """`mma24_linear(x, packed, bias, order=order, config=config)` for `m`-token inputs,
    with its checks done and its argument block built once (`launch.PreparedLaunch`): a
    call allocates the output and launches, for eager calls whose host time counts.

    The weight, bias and order tensors must stay in place while the launch is used.
    """

    def __init__(
        self,
        packed: MmaWeight,
        bias: torch.Tensor | None,
        m: int,
        *,
        order: torch.Tensor | None = None,
        config: MmaConfig | None = None,
    ) -> None:
        from .launch import PreparedLaunch

        dtype, device = packed.values.dtype, packed.values.device
        x = torch.empty(m, packed.in_features, dtype=dtype, device=device)
        _check(x, packed, bias, order)
        out = torch.empty(m, packed.out_features, dtype=dtype, device=device)
        with torch.cuda.device(device):  # the kernel is loaded per device
            kernel, self.config, tiles, row_tiles, args = _prepare(
                x, packed, bias, order, config, out
            )
        blocks = token_blocks(self.config, m)
        grid, block, smem = _launch_shape(self.config, tiles, row_tiles, False, blocks)
        self.m, self.n, self.k = m, packed.out_features, packed.in_features
        self._tiles = tiles
        self.dtype, self.device = dtype, device
        self._device_index = device.index if device.index is not None else 0
        self._align = _x_alignment(self.config)
        # The wgmma kernel reads x through a tensor map, rewritten when x moves.
        self._xmap: Any = args[0] if self.config.wgmma else None
        self._x_ptr = x.data_ptr()
        patched = (5,) if self.config.wgmma else (0, 7)
        self._launch = PreparedLaunch(kernel.func, grid, block, smem, args, patched=patched)

    def fits(self, x: torch.Tensor) -> bool:
        """Whether `x` can take the prepared launch: `(m, K)`, contiguous, aligned, the
        weight's dtype and device (else use `mma24_linear`, which checks and copies)."""
        return (
            x.shape == (self.m, self.k)
            and x.dtype == self.dtype
            and x.is_contiguous()
            and x.device == self.device
            and x.data_ptr() % self._align == 0
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """`(m, K)` `x` for which `fits(x)` holds -> `(m, N)`."""
        from .launch import raw_stream

        out = torch.empty(self.m, self.n, dtype=self.dtype, device=self.device)
        stream = raw_stream(self._device_index)
        if self._xmap is None:
            self._launch(x.data_ptr(), out.data_ptr(), stream=stream)
            return out
        if x.data_ptr() != self._x_ptr:
            _x_map(x.data_ptr(), self.m, self.k, self.k, self._tiles, out=self._xmap)
            self._x_ptr = x.data_ptr()
        self._launch(out.data_ptr(), stream=stream)
        return out


def mma24_fp8_linear(
    q: torch.Tensor,
    q_scale: torch.Tensor,
    packed: MmaWeight,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
    config: MmaConfig | None = None,
    programmatic: bool | None = None,
) -> torch.Tensor:
    """`(q * q_scale[:, None]) @ (W * scale[:, None]).T + bias` for e4m3 tokens and an e4m3
    2:4 weight, as `fp8.fp8_linear_reference` defines it: the e4m3 values are widened
    exactly to fp16 for an f16 mma.sp, summed in fp32, scaled, biased, cast once.

    By default the launch is programmatic where the GPU allows (`launch.py`): the kernel's
    blocks are launched while the kernel before it (the quantization of `q`, which signals
    its dependents as it starts) still runs, and wait for it before they read `q` (H200:
    0.4-1.0 us less per quantize + GEMM at 1-64 tokens, `benches/fp8_speed.py`).

    Args:
        q: `(M, K)` float8_e4m3fn tokens, contiguous, `1 <= M <= MAX_TOKENS` (any M for a
            wgmma shape with `token_tiles`) (`fp8_kernels.quantize_tokens`); q_scale: `(M,)`
            fp32.
        packed: the weight from `format.pack_mma24_e4m3` (e4m3 values), or cuSPARSELt's
            e4m3 buffer as a "cslt" `Compact24` (`cslt.share_cslt_buffer`; K % 64 == 0),
            read in place; scale: `(N,)` fp32.
        bias: `(N,)` in `out_dtype`, or None.
        out_dtype: bf16 or fp16.
        config: launch shape (default the first of `e4m3_candidates(M)`).
        programmatic: launch programmatically (None: where the GPU takes it).
    """
    from .launch import PreparedLaunch, programmatic_launches, raw_stream

    m, k = q.shape
    n = packed.out_features
    cslt = isinstance(packed, Compact24)
    if isinstance(packed, Compact24):
        _check_cslt(packed)
    if q.dtype != torch.float8_e4m3fn or packed.values.dtype != torch.float8_e4m3fn:
        raise InvalidArgumentError(f"q is {q.dtype}, the weight {packed.values.dtype}; need e4m3")
    if k != packed.in_features or not q.is_contiguous():
        raise InvalidArgumentError(
            f"q must be contiguous (M, {packed.in_features}), got {tuple(q.shape)}"
        )
    if out_dtype not in (torch.float16, torch.bfloat16):
        raise InvalidArgumentError(f"out_dtype must be fp16 or bf16, got {out_dtype}")
    if bias is not None and (bias.shape != (n,) or bias.dtype != out_dtype):
        raise InvalidArgumentError(f"bias must be ({n},) {out_dtype}")
    if config is None:
        listed = e4m3_candidates(m, cslt)
        if not listed:
            raise InvalidArgumentError(
                f"no e4m3 launch shape takes {m} tokens on this weight form and GPU (above "
                f"{MAX_TOKENS}: the wgmma kernel on cuSPARSELt's buffer, compute capability 9.0)"
            )
        config = listed[0]
    _check_tokens(m, config)
    if not _has_e4m3_form(config):
        raise InvalidArgumentError(f"the {config} kernel has no e4m3 form")
    if config.wgmma and not isinstance(packed, Compact24):
        raise InvalidArgumentError(f"the {config} kernel reads cuSPARSELt's e4m3 buffer only")
    out = torch.empty(m, n, dtype=out_dtype, device=q.device)
    tiles = token_tiles(config, m)
    kernel = _kernel(out_dtype, config, tiles, 0, e4m3=True, cslt=cslt)
    row_tiles, pairs = _tiles_pairs(packed)
    unused = packed.values
    if isinstance(packed, Compact24) and config.wgmma:
        args = _wgmma_args(q, packed, bias, out, config, scales=(q_scale, scale))
    else:
        args = [
            q, k, packed.values, packed.meta, unused, unused if bias is None else bias,
            int(bias is not None), out, n, m, n, k, row_tiles, pairs, q_scale, scale,
        ]  # fmt: skip
    device = q.device.index if q.device.index is not None else torch.cuda.current_device()
    if programmatic is None:
        programmatic = programmatic_launches(device)
    grid, block, smem = _launch_shape(config, tiles, row_tiles, True, token_blocks(config, m))
    launch = PreparedLaunch(kernel.func, grid, block, smem, args, (), programmatic=programmatic)
    launch(stream=raw_stream(device))
    return out


def _unproven(config: MmaConfig) -> bool:
    """Shapes `mma_best_config` checks against a plain one before timing them: the wgmma
    kernel's (bf16 and e4m3: one kernel for every stage count, token count and cluster, too
    many forms for the tests to run each on every GPU) and e4m3's k64 (operand layouts read
    from the PTX ISA and CUTLASS, emulated on the one GPU it ran on, an H100)."""
    return config.k64 or config.wgmma


def _agrees(
    y: torch.Tensor, plain: torch.Tensor | None, config: MmaConfig, tolerance: float
) -> bool:
    """Whether an unproven shape's output equals a plain shape's on the same call within
    `tolerance` of the largest output (`E4M3_AGREE_TOLERANCE`, `BF16_AGREE_TOLERANCE`):
    such a shape is timed only after agreeing here, and otherwise left out with a warning."""
    if plain is None:
        return False  # nothing to check it against: not timed
    bound = tolerance * float(plain.float().abs().max()) + 1e-6
    if float((y.float() - plain.float()).abs().max()) <= bound:
        return True
    warnings.warn(
        f"the mma.sp kernel's {config} shape disagrees with its plain form on this GPU; "
        "not used (please report it)",
        stacklevel=4,
    )
    return False


def _plain_output(
    packed: MmaWeight,
    x: torch.Tensor,
    bias: torch.Tensor | None,
    order: torch.Tensor | None,
    fp8_scales: tuple[torch.Tensor, list[torch.Tensor]] | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The first plain shape's output on `x` (any number of tokens, `MAX_TOKENS` at a time;
    arguments as `mma_best_config`'s, on its first weight): what the unproven shapes are
    checked against before they are timed."""
    cslt = isinstance(packed, Compact24)
    m = min(x.shape[0], MAX_TOKENS)
    if fp8_scales is None:
        plain = next(
            c for c in candidates(m, cslt)
            if not _unproven(c) and not (c.tiled and (order is not None or not cslt))
        )  # fmt: skip
    else:
        plain = next(c for c in e4m3_candidates(m, cslt) if not _unproven(c))

    def run(rows: slice) -> torch.Tensor:
        if fp8_scales is None:
            return mma24_linear(x[rows], packed, bias, order=order, config=plain)
        q_scale, scale = fp8_scales[0][rows], fp8_scales[1][0]
        return mma24_fp8_linear(
            x[rows], q_scale, packed, scale, bias, out_dtype=out_dtype, config=plain
        )

    return torch.cat([run(slice(i, i + MAX_TOKENS)) for i in range(0, x.shape[0], MAX_TOKENS)])


def e4m3_candidates(m: int, cslt: bool = False) -> tuple[MmaConfig, ...]:
    """The launch shapes worth timing for the e4m3 kernel at `m` tokens: the plain ones of
    `candidates(m)`; on cuSPARSELt's buffer (`cslt`) also the fragments' with half the
    unroll (a unit there is four k-steps: the same k-steps and registers per batch), as the
    buffer's own shapes were picked for bf16. On an H200 (benches/results/fp8_gemm_h200.json)
    the halved shapes won at 16-64 tokens (gate/up 22.4 against 28.7 us at M = 16), the
    buffer's own at 1-8. At M <= 8 also the register-capped shapes that won a shape there
    (`_E4M3_CAPPED`, `_E4M3_CSLT_CAPPED`). On cuSPARSELt's buffer on sm_90 the buffer's
    own shapes include the streaming wgmma kernel's (its e4m3 form: wgmma.sp m64nNk64,
    Hopper's native FP8, which `mma_best_config` times only after it agreed with a widened
    shape), e4m3's own sweep's first (`_E4M3_WG_HALF`, `_E4M3_WG_MANY`; at M <= 8, one
    token tile of 8, those of `_E4M3_WG_HALF` alone), then bf16's above 8 tokens, with
    fewer stages where theirs do not fit in `SMEM_LIMIT` with e4m3's larger metadata
    (`_with_stages_that_fit_e4m3`). Then the k64 form (`MmaConfig.k64`) of the first plain
    shape at M <= 8 and of every plain shape above, where
    the widening it saves grows with the token tiles, on GPUs where it is one instruction
    (`_has_native_k64`). Above `MAX_TOKENS` (prefill): the streaming kernel's shapes with
    token blocks (`_E4M3_WG_PREFILL`) on cuSPARSELt's buffer on sm_90, else none."""
    if m > MAX_TOKENS:
        return _E4M3_WG_PREFILL if cslt and _has_wgmma() else ()
    plain = tuple(c for c in candidates(m) if _has_e4m3_form(c))
    if not cslt:
        widened = (*plain, *_E4M3_CAPPED) if m <= 8 else plain
        native = plain[:1] if m <= 8 else plain
    else:
        tiles = -(-m // TOKEN_TILE)
        own = tuple(
            dict.fromkeys(
                _with_stages_that_fit_e4m3(c, tiles)
                for c in (*_streaming_shapes(m, e4m3=True), *candidates(m, cslt=True))
                if _has_e4m3_form(c)
            )
        )
        capped = _E4M3_CSLT_CAPPED if m <= 8 else ()
        widened = tuple(dict.fromkeys((*_per_e4m3_unit(plain), *own, *capped)))
        native = tuple(c for c in own if not c.wgmma)[:1] if m <= 8 else _per_e4m3_unit(plain)
    return (*widened, *_k64(native)) if _has_native_k64() else widened


def _has_native_k64() -> bool:
    """Whether mma.sp m16n8k64 .e4m3 is one instruction on the current GPU (QMMA.SP in
    ptxas 13's output for sm_89 and sm_120; sm_90 and sm_100 get an emulation); True
    without CUDA, where the shapes are only listed."""
    capability = _capability()
    return capability is None or capability == (8, 9) or capability[0] == 12


def _has_e4m3_form(config: MmaConfig) -> bool:
    """The plain mma.sp kernel and the streaming wgmma kernel (on cuSPARSELt's buffer) have
    an e4m3 form; the tiled one does not."""
    return config.wgmma or not config.tiled


def mma_best_config(
    packed: Sequence[MmaWeight],
    x: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    order: torch.Tensor | None = None,
    configs: tuple[MmaConfig, ...] | None = None,
    fp8_scales: tuple[torch.Tensor, list[torch.Tensor]] | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> tuple[MmaConfig, dict[str, float]]:
    """The fastest configuration for `x` on weights of one shape, timed under CUDA-graph
    replay over `packed` in rotation (default candidates: `candidates(M)`, for e4m3
    `e4m3_candidates(M)`); also every candidate's microseconds per call. With `fp8_scales`
    = (token scales, each weight's row scales), `x` holds e4m3 tokens and `packed` e4m3
    weights (`mma24_fp8_linear`, output and bias in `out_dtype`). `packed` may hold
    cuSPARSELt buffers ("cslt" `Compact24`s) instead of fragments. The wgmma and k64 shapes
    are timed only after their output on the first weight agreed with the first plain
    shape's (`E4M3_AGREE_TOLERANCE`, `BF16_AGREE_TOLERANCE`); one that disagrees is left out
    with a warning."""
    cslt = isinstance(packed[0], Compact24)
    m = x.shape[0]
    if fp8_scales is not None:
        configs = tuple(c for c in configs or e4m3_candidates(m, cslt) if _has_e4m3_form(c))
    else:
        configs = configs or candidates(m, cslt=cslt)
        if order is not None or not cslt:  # shapes the tiled kernel lacks
            configs = tuple(c for c in configs if not c.tiled)
    if not configs:
        raise InvalidArgumentError(f"no launch shape to time at {m} tokens on this weight form")
    with contextlib.suppress(RuntimeError):  # a shape NVRTC refuses is skipped below
        compile_kernels(
            out_dtype if fp8_scales is not None else x.dtype, (m,),
            None if order is None else order.dtype, cslt=cslt, configs=configs,
            e4m3=fp8_scales is not None,
        )  # fmt: skip
    times: dict[str, float] = {}
    best, best_us = configs[0], float("inf")
    plain: torch.Tensor | None = None  # a plain shape's output, for the unproven ones
    if any(_unproven(c) for c in configs):
        plain = _plain_output(packed[0], x, bias, order, fp8_scales, out_dtype)
    tolerance = BF16_AGREE_TOLERANCE if fp8_scales is None else E4M3_AGREE_TOLERANCE
    for cfg in configs:

        def call(i: int, cfg: MmaConfig = cfg) -> torch.Tensor:
            p = packed[i]
            if fp8_scales is None:
                return mma24_linear(x, p, bias, order=order, config=cfg)
            scale = fp8_scales[1][i]
            return mma24_fp8_linear(
                x, fp8_scales[0], p, scale, bias, out_dtype=out_dtype, config=cfg
            )

        try:
            if _unproven(cfg) and not _agrees(call(0), plain, cfg, tolerance):
                continue
            us = rotation_time_us(call, range(len(packed)), iters=10, repeats=3)
        except RuntimeError:  # a launch shape this GPU refuses (registers, shared memory)
            continue
        times[str(cfg)] = us
        if us < best_us:
            best, best_us = cfg, us
    return best, times
