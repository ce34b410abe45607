"""fp8 vs bf16, dense vs 2:4, on one GPU: LLaMA-2-7B shapes, everything under CUDA-graph replay.

Sections (`--only` picks some):
  gemm  per GEMM (q/k/v/o, gate/up, down at M tokens; weights rotate over copies > 256 MB
        so they stream from HBM): bf16 dense (cuBLAS), bf16 2:4 (cuSPARSELt, searched; and
        at M <= 64 the mma.sp / wgmma kernels, over their own fragments and over
        cuSPARSELt's buffer: the faster counts), fp8 dense (`torch._scaled_mm` with
        row-wise scales, and unscaled with a scaling kernel: the baseline is the faster)
        and fp8 2:4 (cuSPARSELt e4m3 + scale epilogue; at M <= 64 the e4m3 mma.sp kernel
        over its fragments and over cuSPARSELt's e4m3 buffer, the faster counts), each
        whole (token
        quantization included) and its GEMM alone (tokens quantized beforehand), and the
        quantization kernel alone.
  e2e   whole model (random weights, 2:4 by magnitude, as benches/gpu_speed.py): prefill
        8x128 and 1x2048, decode batch 1 and 16 (KV 512) for bf16 dense, fp8 dense
        (`sparsify(dtype="fp8", sparse=False)`), bf16 2:4 (`sparsify()`) and fp8 2:4
        (`sparsify(dtype="fp8")`), with the Linear weight bytes and the prefill logits'
        error against bf16 dense and against the dense model of the same precision (fp8
        2:4 against fp8 dense: the same e4m3 weights and tokens, so a kernel check).
        With --fuse, also the three sparsified variants with `fuse_siblings=True` (q/k/v
        and gate/up as one layer each). --prefills and --decode-batches pick the
        workloads; --compiled (decode batches) and --compiled-prefill also time them with
        the model compiled by inductor before capture (`ria.generate(compile=True)`'s
        mode; 100-160 s of compiling each on an H100).
  accuracy  per GEMM and fp8 kernel, the output's error against the exact sum of the same
        e4m3 operands (float64): largest error over the largest output, and the mean signed
        error over the mean magnitude (negative: sums pulled toward zero, as an accumulator
        that truncates does), for each kernel sparsify may pick; cuSPARSELt with the
        configuration it searched and with its default, in bf16 and (a zero bias) fp32;
        our kernel on cuSPARSELt's buffer with its default shape and its tuned one.
  shapes  the streaming wgmma kernel's e4m3 launch shapes (`wgmma_e4m3_grid`: rows per
        block, unroll, stages, K split, token multicast) on cuSPARSELt's e4m3 buffer at
        each M: every shape's GEMM alone (`mma_best_config`, which first checks each
        wgmma shape's output against a widened one), then the fastest of them and every
        shape `e4m3_candidates` times (what tuning picks from now) with the token
        quantization before each GEMM, as a layer runs it, in two rounds; fp8 dense (the
        faster form) with its quantization beside them.
  launch  fp8 2:4 and fp8 dense whole models with their kernels launched programmatically
        (the default on sm_90) and plainly (`ria.sparse.launch.plain_launches`), in
        alternating rounds, side by side.

Timing helpers, model and workloads are benches/gpu_speed.py's. Writes JSON (default
benches/results/fp8_<card>.json) and prints markdown tables.
Usage: python benches/fp8_speed.py [--only gemm,e2e,shapes,accuracy,launch] [--layers 32]
    [--m 1,16,64,1024]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import itertools
import json
import math
import re
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from gpu_speed import (
    SHAPES,
    STREAM_BYTES,
    build_model,
    default_results_path,
    distinct_copies,
    environment,
    log,
    prune_24,
    run_section,
    time_e2e,
)

from ria.sparse import Sparse24Linear, pack_mma24, sparsify
from ria.sparse.cslt import (
    CsltConfig,
    cslt_best_config,
    cslt_compress,
    cslt_linear,
    share_cslt_buffer,
)
from ria.sparse.format import pack_24, pack_mma24_e4m3
from ria.sparse.fp8 import quantize_weight
from ria.sparse.fp8_kernels import (
    fp8_cslt_best_config,
    fp8_cslt_compress,
    fp8_cslt_linear,
    fp8_dense_linear,
    fp8_dense_unscaled_linear,
    quantize_tokens,
)
from ria.sparse.fp8_linear import Fp8Linear
from ria.sparse.graphs import rotation_time_us, time_call
from ria.sparse.launch import plain_launches
from ria.sparse.mma_sp import (
    MAX_TOKENS,
    SMEM_LIMIT,
    MmaConfig,
    e4m3_candidates,
    mma24_fp8_linear,
    mma24_linear,
    mma_best_config,
    wgmma_smem_bytes,
    wgmma_stage_bytes,
)

DTYPE = torch.bfloat16


def bench_shape(name: str, n: int, k: int, ms_list: list[int]) -> list[dict]:
    """One weight shape at every token count; weights rotate over copies > STREAM_BYTES."""
    w0 = prune_24(torch.randn(n, k, dtype=DTYPE, device="cuda") * 0.02)
    copies = max(1, math.ceil(STREAM_BYTES / (n * k * 2)))
    ws = distinct_copies(w0, copies, seed=n + k)
    forms = {
        "bf16": ws,
        "cslt": [cslt_compress(w) for w in ws],
        "mma": [pack_mma24(w) for w in ws],
        "fp8": [quantize_weight(w) for w in ws],
    }
    forms["cslt8"] = [fp8_cslt_compress(q) for q in forms["fp8"]]
    forms["mma8"] = [pack_mma24_e4m3(q.values) for q in forms["fp8"]]
    # cuSPARSELt's buffers as our kernels read them in place (checked per weight)
    forms["cslt_view"] = _views([pack_24(w) for w in ws], forms["cslt"])
    forms["cslt8_view"] = _views([pack_24(q.values) for q in forms["fp8"]], forms["cslt8"])
    rows = [bench_m(name, torch.randn(m, k, dtype=DTYPE, device="cuda"), forms) for m in ms_list]
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def _views(compacts: list, buffers: list) -> list | None:
    """`share_cslt_buffer` of each weight, or None unless every buffer is read in place."""
    views = [share_cslt_buffer(c, p) for c, p in zip(compacts, buffers, strict=True)]
    return views if all(v.layout == "cslt" for v in views) else None


def bench_m(name: str, x: torch.Tensor, forms: dict[str, list]) -> dict:
    """Every kernel at `x`'s token count over the weight copies in `forms`."""
    m, k = x.shape
    ws, packed, frags, q8, packed8 = (forms[f] for f in ("bf16", "cslt", "mma", "fp8", "cslt8"))

    def per_call(fn) -> float:
        return 1e3 * time_call(fn) / len(ws)

    cfg = cslt_best_config(packed, x, sweep=m >= 1024)  # as benches/gpu_speed.py
    cfg8 = fp8_cslt_best_config(packed8, x)
    qx, sx = quantize_tokens(x)
    qxp, _ = quantize_tokens(x, -(-m // 16) * 16)
    row: dict = {"shape": name, "n": ws[0].shape[0], "k": k, "m": m}
    row["bf16_dense_us"] = per_call(lambda: [F.linear(x, w) for w in ws])
    row["bf16_cslt_us"] = per_call(lambda: [cslt_linear(x, p, None, cfg) for p in packed])
    if m <= MAX_TOKENS:
        mcfg, _ = mma_best_config(frags, x, None)
        row["bf16_mma_us"] = per_call(
            lambda: [mma24_linear(x, f, None, config=mcfg) for f in frags]
        )
        views = forms["cslt_view"]
        if views is not None:  # what sparsify() runs: mma.sp / wgmma on cuSPARSELt's buffer
            ccfg, _ = mma_best_config(views, x, None)
            row["bf16_mma_cslt_us"] = per_call(
                lambda: [mma24_linear(x, v, None, config=ccfg) for v in views]
            )
            row["bf16_mma_cslt_config"] = str(ccfg)
    row["bf16_24_us"] = min(
        row["bf16_cslt_us"], row.get("bf16_mma_us", math.inf), row.get("bf16_mma_cslt_us", math.inf)
    )
    # fp8 dense, both forms: row-wise scales in _scaled_mm's epilogue, and unit tensor-wise
    # scales with a second scaling kernel; the baseline is the faster (what sparsify picks).
    unit = torch.ones(1, device=x.device)
    row["fp8_dense_rowwise_us"] = per_call(lambda: [fp8_dense_linear(x, q) for q in q8])
    row["fp8_dense_unscaled_us"] = per_call(
        lambda: [fp8_dense_unscaled_linear(x, q, unit) for q in q8]
    )
    row["fp8_dense_us"] = min(row["fp8_dense_rowwise_us"], row["fp8_dense_unscaled_us"])
    row["fp8_dense_rowwise_gemm_us"] = per_call(
        lambda: [
            torch._scaled_mm(qx, q.values.t(), sx[:, None], q.scale[None, :], out_dtype=DTYPE)
            for q in q8
        ]
    )
    row["fp8_dense_tensorwise_gemm_us"] = per_call(
        lambda: [torch._scaled_mm(qx, q.values.t(), unit, unit, out_dtype=DTYPE) for q in q8]
    )
    row["fp8_dense_gemm_us"] = min(
        row["fp8_dense_rowwise_gemm_us"], row["fp8_dense_tensorwise_gemm_us"]
    )
    row["fp8_24_us"] = per_call(
        lambda: [
            fp8_cslt_linear(x, p, q.scale, None, cfg8) for p, q in zip(packed8, q8, strict=True)
        ]
    )
    row["fp8_24_gemm_us"] = per_call(
        lambda: [
            torch._cslt_sparse_mm(
                p, qxp.t(), out_dtype=DTYPE, transpose_result=True, alg_id=cfg8.alg_id
            )
            for p in packed8
        ]
    )
    scales = [q.scale for q in q8]
    row["fp8_cslt_us"] = row["fp8_24_us"]
    # fp8_mma: over the e4m3 fragments (M <= 64); fp8_mma_cslt: over cuSPARSELt's e4m3
    # buffer (any M on sm_90: the wgmma kernel's prefill shapes above 64)
    for key, weights in (("fp8_mma", forms["mma8"]), ("fp8_mma_cslt", forms["cslt8_view"])):
        if weights is not None and e4m3_candidates(m, cslt=key == "fp8_mma_cslt"):
            row |= time_fp8_mma(key, weights, scales, x, per_call)
            row["fp8_24_us"] = min(row["fp8_24_us"], row[f"{key}_us"])
    row["quantize_us"] = 1e3 * time_call(lambda: quantize_tokens(x))
    row["fp8_cslt_alg"] = [cfg8.alg_id, cfg8.split_k, cfg8.split_k_mode]
    row["fp8_24_over_fp8_dense"] = row["fp8_dense_us"] / row["fp8_24_us"]
    row["fp8_24_over_bf16_dense"] = row["bf16_dense_us"] / row["fp8_24_us"]
    log(
        f"{name} M={m}: bf16 {row['bf16_dense_us']:.1f} bf16-2:4 {row['bf16_24_us']:.1f} "
        f"fp8 row-wise {row['fp8_dense_rowwise_us']:.1f} unscaled "
        f"{row['fp8_dense_unscaled_us']:.1f} (gemm {row['fp8_dense_gemm_us']:.1f}) "
        f"fp8-2:4 {row['fp8_24_us']:.1f} (cslt gemm {row['fp8_24_gemm_us']:.1f}, "
        f"mma gemm {row.get('fp8_mma_gemm_us', math.nan):.1f}, "
        f"buffer {row.get('fp8_mma_cslt_us', math.nan):.1f} / plain launch "
        f"{row.get('fp8_mma_cslt_plain_us', math.nan):.1f}) "
        f"quant {row['quantize_us']:.1f} us"
    )
    return row


def time_fp8_mma(
    key: str, weights: list, scales: list, x: torch.Tensor, per_call: Callable
) -> dict:
    """The e4m3 mma.sp kernel over `weights` (fragments or cuSPARSELt buffers) at `x`'s token
    count, its launch shape tuned: the GEMM alone on quantized tokens (`{key}_gemm_us`) and
    with the quantization kernel (`{key}_us`; the kernel launched programmatically, as
    `Fp8Linear` does on sm_90, and `{key}_plain_us` with a plain launch)."""
    qx, sx = quantize_tokens(x)
    pairs = list(zip(weights, scales, strict=True))
    cfg, _ = mma_best_config(weights, qx, None, fp8_scales=(sx, scales))
    out: dict = {f"{key}_config": str(cfg)}
    out[f"{key}_gemm_us"] = per_call(
        lambda: [mma24_fp8_linear(qx, sx, w, sc, None, config=cfg) for w, sc in pairs]
    )
    out[f"{key}_us"] = per_call(
        lambda: [mma24_fp8_linear(*quantize_tokens(x), w, sc, None, config=cfg) for w, sc in pairs]
    )
    out[f"{key}_plain_us"] = per_call(
        lambda: [
            mma24_fp8_linear(*quantize_tokens(x), w, sc, None, config=cfg, programmatic=False)
            for w, sc in pairs
        ]
    )
    return out


# The streaming kernel's e4m3 shapes swept by `--only shapes`: (row tiles, warps) give 64,
# 128, 192 or 256 rows per block; unroll, stages, K split and token multicast around the
# shapes bf16's H200 sweep kept (`mma_sp._WG_HALF`, `_WG_MANY`).
SWEEP_ROWS = ((1, 4), (2, 4), (3, 4), (4, 4), (1, 8), (2, 8))
SWEEP_UNROLL = (2, 4, 8)
SWEEP_STAGES = (2, 3, 4, 5, 6, 8)
SWEEP_SPLIT = (1, 2, 4, 8)
SWEEP_MULTICAST = (1, 2)
# Prefill (M > MAX_TOKENS): blocks of 8 * token_tiles tokens over the grid, two consumer
# warpgroups at most, no K split (the grid has blocks enough), up to 128 fp32 sums a thread.
SWEEP_PREFILL_ROWS = ((1, 4), (2, 4), (1, 8), (2, 8))
SWEEP_TOKEN_TILES = (8, 16, 32)


def wgmma_e4m3_grid(n: int, k: int, m: int, sms: int) -> tuple[MmaConfig, ...]:
    """The wgmma e4m3 shapes worth timing for an `(n, k)` weight at `m` tokens on a GPU of
    `sms` multiprocessors: those whose stages fit in `SMEM_LIMIT`, with no more stages than
    a block has k-chunks (more would change nothing but the shared memory), every block of
    the K split given a chunk, and between 48 and 2 x `sms` blocks in all. Above MAX_TOKENS:
    `wgmma_e4m3_prefill_grid`."""
    if m > MAX_TOKENS:
        return wgmma_e4m3_prefill_grid()
    tiles, k_tiles = -(-m // 8), k // 64  # token tiles of 8; e4m3 k-tiles of 64 columns
    shapes = []
    for (r, w), u, s, sk, mc in itertools.product(
        SWEEP_ROWS, SWEEP_UNROLL, SWEEP_STAGES, SWEEP_SPLIT, SWEEP_MULTICAST
    ):
        if sk * mc > 8:
            continue
        config = MmaConfig(r, w, u, s, sk, wgmma=True, multicast=mc)
        chunks = -(-k_tiles // (2 * u))
        row_blocks = -(-n // (16 * r * w))
        row_blocks += row_blocks % mc  # (a multicast pair is completed by an idle block)
        if (
            sk <= chunks
            and s <= max(2, -(-chunks // sk))
            and 48 <= row_blocks * sk <= 2 * sms
            and wgmma_smem_bytes(config, tiles, e4m3=True) <= SMEM_LIMIT
        ):
            shapes.append(config)
    return tuple(shapes)


def wgmma_e4m3_prefill_grid() -> tuple[MmaConfig, ...]:
    """The prefill shapes (`MmaConfig.token_tiles`) worth timing: up to 256 rows and 128
    sums a thread (row tiles x token tiles <= 32), unroll 2 or 4, 2-5 stages, token multicast
    or none, stages fitting in `SMEM_LIMIT` and holding the block's fp32 sums."""
    shapes = []
    for (r, w), nt, u, s, mc in itertools.product(
        SWEEP_PREFILL_ROWS, SWEEP_TOKEN_TILES, (2, 4), (2, 3, 4, 5), SWEEP_MULTICAST
    ):
        config = MmaConfig(r, w, u, s, 1, wgmma=True, multicast=mc, token_tiles=nt)
        stages = s * wgmma_stage_bytes(config, nt, e4m3=True)
        sums = 4 * 8 * nt * (16 * r * w + 4)
        if r * nt <= 32 and sums <= stages and wgmma_smem_bytes(config, nt, True) <= SMEM_LIMIT:
            shapes.append(config)
    return tuple(shapes)


def bench_wgmma_shapes(name: str, n: int, k: int, ms_list: list[int]) -> list[dict]:
    """`wgmma_e4m3_grid` at each of `ms_list` on one weight shape (cuSPARSELt's e4m3 buffer,
    copies rotating over > STREAM_BYTES), `wgmma_shapes_at` each count."""
    w0 = prune_24(torch.randn(n, k, dtype=DTYPE, device="cuda") * 0.02)
    ws = distinct_copies(w0, max(1, math.ceil(STREAM_BYTES / (n * k * 2))), seed=n + k)
    q8 = [quantize_weight(w) for w in ws]
    packed8 = [fp8_cslt_compress(q) for q in q8]
    views = _views([pack_24(q.values) for q in q8], packed8)
    del ws, w0
    if views is None:
        raise RuntimeError(f"{name}: cuSPARSELt's e4m3 buffer is not read in place here")
    rows = []
    for m in ms_list:
        row = wgmma_shapes_at(torch.randn(m, k, dtype=DTYPE, device="cuda"), q8, views, packed8)
        rows.append({"shape": name, "n": n, "k": k, "m": m, **row})
        q, best, cand = row["with_quantization_us"], row["best"], row["candidates_best"]
        q = {**q, None: math.nan}
        log(
            f"{name} M={m}: {row['checked_and_timed']} shapes checked and timed (the grid's "
            f"{row['grid']} and the candidates'); with "
            f"quantization best {best} {q[best]:.2f}, candidates' {cand} {q[cand]:.2f}; "
            f"fp8 dense {row['fp8_dense_us']:.2f}, cuSPARSELt {row['fp8_cslt_us']:.2f} us"
        )
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def wgmma_shapes_at(x: torch.Tensor, q8: list, views: list, packed8: list, top: int = 8) -> dict:
    """Each shape of `wgmma_e4m3_grid` and of `e4m3_candidates` at `x`'s token count over
    `views` (e4m3 weights `q8` in cuSPARSELt's buffer `packed8`): the GEMM alone on
    quantized tokens (`mma_best_config`, which checks each wgmma shape's output against a
    widened one first), then the `top` fastest and the candidates' wgmma shapes with the
    quantization before each GEMM (two rounds, the faster kept), and fp8 dense (the faster
    form) and cuSPARSELt's fp8 2:4 GEMM (searched) with their quantization."""
    m, k = x.shape
    n = q8[0].values.shape[0]
    qx, sx = quantize_tokens(x)
    scales = [q.scale for q in q8]
    listed = e4m3_candidates(m, cslt=True)
    current = [c for c in listed if c.wgmma]
    grid = wgmma_e4m3_grid(
        n, k, m, torch.cuda.get_device_properties(x.device).multi_processor_count
    )
    # the proven default, what each wgmma shape is checked against (above MAX_TOKENS
    # mma_best_config runs the plain kernel per 64 tokens for that)
    widened = () if m > MAX_TOKENS else (listed[0],)
    shapes = {str(c): c for c in (*widened, *current, *grid)}
    _, alone = mma_best_config(
        views, qx, None, configs=tuple(shapes.values()), fp8_scales=(sx, scales)
    )
    ranked = sorted((us, key) for key, us in alone.items() if shapes[key].wgmma)
    timed = list(dict.fromkeys([key for _, key in ranked[:top]] + [str(c) for c in current]))
    with_quant: dict[str, float] = {}
    for _ in range(2):
        for key in timed:
            if key in alone:  # (not: failed its check or its launch above)

                def call(i: int, cfg: MmaConfig = shapes[key]) -> None:
                    mma24_fp8_linear(*quantize_tokens(x), views[i], scales[i], None, config=cfg)

                us = rotation_time_us(call, range(len(views)), iters=10, repeats=3)
                with_quant[key] = min(with_quant.get(key, math.inf), us)
    unit = torch.ones(1, device=x.device)
    dense = min(
        rotation_time_us(lambda i: fp8_dense_linear(x, q8[i]), range(len(q8))),
        rotation_time_us(lambda i: fp8_dense_unscaled_linear(x, q8[i], unit), range(len(q8))),
    )
    cfg8 = fp8_cslt_best_config(packed8, x)
    cslt = rotation_time_us(
        lambda i: fp8_cslt_linear(x, packed8[i], scales[i], None, cfg8), range(len(packed8))
    )
    in_current = [str(c) for c in current if str(c) in with_quant]
    return {
        "grid": len(grid),
        "checked_and_timed": len(alone) - sum(str(c) in alone for c in widened),
        "gemm_alone_us": alone,
        "with_quantization_us": with_quant,
        "fp8_dense_us": dense,
        "fp8_cslt_us": cslt,
        "best": min(with_quant, key=with_quant.__getitem__) if with_quant else None,
        # (None: no candidate passed its check here, which the log and table show)
        "candidates_best": min(in_current, key=with_quant.__getitem__) if in_current else None,
    }


def wgmma_shapes_table(rows: list[dict]) -> str:
    out = [
        "| shape | M | shapes timed | fastest, with quantization (us) | of the candidates "
        "(us) | fp8 dense (us) | cuSPARSELt fp8 2:4 (us) | fp8 2:4 / fp8 dense: fastest, "
        "candidates |",
        "|---|---:|---:|---|---|---:|---:|---:|",
    ]
    for r in rows:
        q, d = r["with_quantization_us"], r["fp8_dense_us"]
        b, c = r["best"], r["candidates_best"]
        q = {**q, None: math.nan}
        out.append(
            f"| {r['shape']} {r['n']}x{r['k']} | {r['m']} | {r['checked_and_timed']} | "
            f"{b} {q[b]:.2f} | {c} {q[c]:.2f} | {d:.2f} | {r['fp8_cslt_us']:.2f} | "
            f"{d / q[b]:.2f}x, {d / q[c]:.2f}x |"
        )
    return "\n".join(out)


def bench_accuracy(name: str, n: int, k: int, ms_list: list[int]) -> list[dict]:
    """Each fp8 kernel's output on one random 2:4 weight against the exact float64 sum."""
    torch.manual_seed(n + k)
    w = quantize_weight(prune_24(torch.randn(n, k, dtype=DTYPE, device="cuda") * 0.02))
    packed = fp8_cslt_compress(w)
    views = _views([pack_24(w.values)], [packed])
    frags = pack_mma24_e4m3(w.values)
    zero = torch.zeros(n, dtype=DTYPE, device="cuda")
    unit = torch.ones(1, device="cuda")
    rows = []
    for m in ms_list:
        x = torch.randn(m, k, dtype=DTYPE, device="cuda")
        qx, sx = quantize_tokens(x)
        exact = (qx.double() @ w.values.double().t()) * sx.double()[:, None] * w.scale.double()
        searched = fp8_cslt_best_config([packed], x)
        outs = {
            "fp8 dense row-wise": fp8_dense_linear(x, w),
            "fp8 dense unscaled": fp8_dense_unscaled_linear(x, w, unit),
            "_scaled_mm use_fast_accum": torch._scaled_mm(
                qx, w.values.t(), sx[:, None], w.scale[None, :], out_dtype=DTYPE,
                use_fast_accum=True,
            ),
            f"cuSPARSELt {searched}": fp8_cslt_linear(x, packed, w.scale, None, searched),
            f"cuSPARSELt {searched} fp32": fp8_cslt_linear(x, packed, w.scale, zero, searched),
            "cuSPARSELt default": fp8_cslt_linear(x, packed, w.scale, None, CsltConfig()),
        }  # fmt: skip
        if m <= MAX_TOKENS:
            outs["mma.sp fragments"] = mma24_fp8_linear(qx, sx, frags, w.scale, None)
            if views is not None:
                outs["mma.sp cuSPARSELt buffer"] = mma24_fp8_linear(qx, sx, views[0], w.scale, None)
                # The shape sparsify would pick (a wgmma one at 9-64 tokens on sm_90).
                tuned, _ = mma_best_config(views, qx, None, fp8_scales=(sx, [w.scale]))
                outs[f"mma.sp cuSPARSELt buffer, tuned {tuned}"] = mma24_fp8_linear(
                    qx, sx, views[0], w.scale, None, config=tuned
                )
        for kernel, got in outs.items():
            err = got.double() - exact
            row = {
                "shape": name, "n": n, "k": k, "m": m, "kernel": kernel,
                "max_err_over_max": float(err.abs().max() / exact.abs().max()),
                "mean_signed_err_over_mean": float(
                    (err * exact.sign()).mean() / exact.abs().mean()
                ),
            }  # fmt: skip
            log(f"{name} M={m} {kernel}: {row['max_err_over_max']:.2e} "
                f"{row['mean_signed_err_over_mean']:+.2e}")  # fmt: skip
            rows.append(row)
    return rows


def accuracy_table(rows: list[dict]) -> str:
    out = [
        "| shape | M | kernel | max error / max output | mean signed error / mean output |",
        "|---|---:|---|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['shape']} {r['n']}x{r['k']} | {r['m']} | {r['kernel']} | "
            f"{r['max_err_over_max']:.1e} | {r['mean_signed_err_over_mean']:+.1e} |"
        )
    return "\n".join(out)


def gemm_table(rows: list[dict]) -> str:
    out = [
        "| shape | M | bf16 dense | bf16 2:4 | fp8 dense, faster of row-wise and unscaled "
        "(GEMM alone) | fp8 2:4 cuSPARSELt "
        "(GEMM alone) | fp8 2:4 mma.sp (GEMM alone) | fp8 2:4 mma.sp on cuSPARSELt's buffer "
        "(GEMM alone) | quantize | fp8 2:4 / fp8 dense | fp8 2:4 / bf16 dense |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['shape']} {r['n']}x{r['k']} | {r['m']} | {r['bf16_dense_us']:.1f} | "
            f"{r['bf16_24_us']:.1f} | {r['fp8_dense_us']:.1f} ({r['fp8_dense_gemm_us']:.1f}) | "
            f"{r.get('fp8_cslt_us', r['fp8_24_us']):.1f} ({r['fp8_24_gemm_us']:.1f}) | "
            + (
                f"{r['fp8_mma_us']:.1f} ({r['fp8_mma_gemm_us']:.1f}) | "
                if "fp8_mma_us" in r
                else "- | "
            )
            + (
                f"{r['fp8_mma_cslt_us']:.1f} ({r['fp8_mma_cslt_gemm_us']:.1f}) | "
                if "fp8_mma_cslt_us" in r
                else "- | "
            )
            + f"{r['quantize_us']:.1f} | "
            f"{r['fp8_24_over_fp8_dense']:.2f}x | {r['fp8_24_over_bf16_dense']:.2f}x |"
        )
    return "\n".join(out)


def weight_bytes(model: torch.nn.Module) -> int:
    total = 0
    for mod in model.model.layers.modules():
        if isinstance(mod, torch.nn.Linear):
            total += mod.weight.numel() * mod.weight.element_size()
        elif isinstance(mod, (Sparse24Linear, Fp8Linear)):
            total += mod.weight_bytes()
    return total


# The comparison that matters first (each saved as soon as it is timed).
VARIANTS = {
    "fp8 2:4": dict(dtype="fp8"),
    "fp8 dense": dict(dtype="fp8", sparse=False),
    "bf16 dense": None,
    "bf16 2:4": dict(plan_cache=False),
}


def variant_labels(spec: str) -> tuple[str, ...]:
    """`--variants`' comma list as labels; "fused" after a comma belongs to the label before
    it ("fp8 2:4, fused,bf16 dense" -> ("fp8 2:4, fused", "bf16 dense"))."""
    labels: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if part == "fused" and labels:
            labels[-1] += ", fused"
        elif part:
            labels.append(part)
    return tuple(labels)


def bench_e2e(
    layers: int,
    decode_steps: int,
    save,
    workloads: dict | None = None,
    fuse: bool = False,
    only: tuple[str, ...] = (),
) -> dict:
    """The variants in turn (each a copy of one model); `save(result)` after each.
    `workloads`: `gpu_speed.time_e2e`'s keyword arguments (prefills, decode batches, which
    of them also compiled; its defaults when None). `fuse`: also the three sparsified
    variants with `fuse_siblings=True`. `only`: these labels alone (all of VARIANTS when
    empty), a sparsified one's fused form by its label + ", fused" ("fp8 2:4, fused")."""
    workloads = workloads or {}
    uncompiled = {**workloads, "compiled_batches": (), "compiled_prefill": False}
    fused = {f"{k}, fused": {**v, "fuse_siblings": True} for k, v in VARIANTS.items() if v}
    every = {**VARIANTS, **fused}
    if unknown := set(only) - set(every):
        raise SystemExit(f"unknown variants {sorted(unknown)}: of {list(every)}")
    variants = {k: every[k] for k in only or VARIANTS}  # in the order asked for
    if fuse:
        variants |= {
            f"{k}, fused": fused[f"{k}, fused"] for k in variants if f"{k}, fused" in fused
        }
    base = build_model(layers, prune_all=False)
    result: dict = {"layers": layers, "variants": {}}
    outs = {}
    for label, options in variants.items():
        model = base if options is None else copy.deepcopy(base)  # base stays bf16 dense
        row: dict = {}
        if options is not None:
            report = sparsify(model, batch_sizes=[1, 16, 1024, 2048], **options)
            row["sparsify_s"] = report.seconds
            row["plans"] = {
                f"{lr.out_features}x{lr.in_features}": lr.plan for lr in report.converted
            }
            log(f"{label}: {report}")
        row["linear_bytes"] = weight_bytes(model)
        row["timings"] = {}
        result["variants"][label] = row

        def keep(timings: dict, row: dict = row) -> None:  # saved per workload, not per variant
            row["timings"] = timings
            save(result)

        try:
            row["timings"], outs[label] = time_e2e(model, decode_steps, **workloads, progress=keep)
        except Exception:  # e.g. a compile failure: the graph-replay timings still count
            row["compiled_error"] = traceback.format_exc()
            log(row["compiled_error"])
            row["timings"], outs[label] = time_e2e(model, decode_steps, **uncompiled, progress=keep)
        save(result)
        if model is not base:
            del model
        gc.collect()
        torch.cuda.empty_cache()
    del base
    # Against bf16 dense, and against the dense model of the variant's own precision: fp8
    # dense holds the same e4m3 weights and quantizes tokens the same way, so only a wrong
    # fp8 kernel (not e4m3 rounding, large on this random model) moves fp8 2:4 away from it.
    for label, out in outs.items():
        row = result["variants"][label]
        own = "fp8 dense" if label.startswith("fp8") else "bf16 dense"
        for ref_label in dict.fromkeys(["bf16 dense", own]):
            if ref_label != label and ref_label in outs:
                row[f"vs_{ref_label.replace(' ', '_')}"] = logits_error(out, outs[ref_label])
    return result


def logits_error(got: dict, ref: dict) -> dict:
    """Per logits key of `got`: the relative error (norm of the difference over the norm of
    `ref`) and the share of positions whose top-1 token agrees."""
    return {
        key: {
            "rel_err": float((g - ref[key]).norm() / ref[key].norm()),
            "top1_agree": float((g.argmax(-1) == ref[key].argmax(-1)).float().mean()),
        }
        for key, g in got.items()
        if key.endswith("logits")
    }


def error_table(r: dict) -> str:
    """Each variant's logits against bf16 dense and against the dense model of its own
    precision: relative error, then top-1 agreement, per prefill workload."""
    rows = [
        (label, key[3:].replace("_", " "), errs)
        for label, row in r["variants"].items()
        for key, errs in row.items()
        if key.startswith("vs_") and errs  # empty: no prefill ran, so no logits to compare
    ]
    if not rows:
        return ""
    keys = list(rows[0][2])
    out = ["| variant | against | " + " | ".join(k.removesuffix("_logits") for k in keys) + " |"]
    out.append("|---|---|" + "---:|" * len(keys))
    for label, against, errs in rows:
        cells = [f"{errs[k]['rel_err']:.4f} ({errs[k]['top1_agree']:.2f})" for k in keys]
        out.append(f"| {label} | {against} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def workload_name(key: str) -> str | None:
    """The table's name of a `gpu_speed.time_e2e` timing key (None: not a time)."""
    if m := re.fullmatch(r"prefill_(\d+)x(\d+)(_compiled)?_ms", key):
        return f"prefill {m[1]}x{m[2]}{', compiled' if m[3] else ''} (ms)"
    if m := re.fullmatch(r"decode_b(\d+)(_compiled)?_ms_per_step", key):
        return f"decode batch {m[1]}{', compiled' if m[2] else ''} (ms/step)"
    return None


def ratio_pairs(labels: Sequence[str]) -> list[tuple[str, str]]:
    """The (2:4 variant, baseline) pairs the e2e table compares, where both ran: each fp8
    2:4 form against fp8 dense of the same form (fused or not) and against bf16 dense."""
    pairs = []
    for label in labels:
        if label.startswith("fp8 2:4"):
            form = label.removeprefix("fp8 2:4")  # "" or ", fused"
            pairs += [(label, b) for b in (f"fp8 dense{form}", "bf16 dense") if b in labels]
    return pairs


def e2e_table(r: dict) -> str:
    """Each workload's time per variant, then each of `ratio_pairs`' speedups (the
    baseline's time over the 2:4 variant's)."""
    v = r["variants"]
    labels = list(v)
    pairs = ratio_pairs(labels)
    out = ["| workload | " + " | ".join([*labels, *(f"{a} / {b}" for a, b in pairs)]) + " |"]
    out.append("|---|" + "---:|" * (len(labels) + len(pairs)))
    timed = [k for k in v[labels[0]]["timings"] if all(k in v[x]["timings"] for x in labels)]
    for key in timed:
        if (name := workload_name(key)) is None:
            continue
        t = {label: v[label]["timings"][key] for label in labels}
        cells = [f"{t[x]:.2f}" for x in labels] + [f"{t[b] / t[a]:.2f}x" for a, b in pairs]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    gib = [f"{v[label]['linear_bytes'] / 2**30:.2f}" for label in labels]
    out.append("| decoder Linear weights (GiB) | " + " | ".join(gib) + " |" + " |" * len(pairs))
    return "\n".join(out)


def bench_launch(layers: int, decode_steps: int, rounds: int = 4) -> dict:
    """fp8 2:4 and fp8 dense (default `sparsify`, buckets 1, 16, 1024, 2048) with their
    kernels launched programmatically and plainly (`launch.plain_launches`), alternating
    over `rounds` rounds so drift shows; graph replay, timings per round."""
    base = build_model(layers, prune_all=False)
    models = {}
    for label in ("fp8 2:4", "fp8 dense"):
        models[label] = copy.deepcopy(base)
        sparsify(
            models[label], dtype="fp8", sparse=label == "fp8 2:4", batch_sizes=[1, 16, 1024, 2048]
        )
    del base
    result: dict = {"layers": layers, "rounds": []}
    for i in range(rounds):
        programmatic = i % 2 == 0
        for label, model in models.items():
            with contextlib.nullcontext() if programmatic else plain_launches():
                timings, _ = time_e2e(model, decode_steps)
            keep = {k: v for k, v in timings.items() if k.endswith(("_ms", "_ms_per_step"))}
            result["rounds"].append({"variant": label, "programmatic": programmatic, **keep})
            log(f"{label} programmatic={programmatic}: {keep}")
    return result


def launch_table(r: dict) -> str:
    keys = (
        "prefill_8x128_ms",
        "prefill_1x2048_ms",
        "decode_b1_ms_per_step",
        "decode_b16_ms_per_step",
    )
    out = [
        "| variant | launches | " + " | ".join(keys) + " |",
        "|---|---|" + "---:|" * len(keys),
    ]
    for row in r["rounds"]:
        kind = "programmatic" if row["programmatic"] else "plain"
        out.append(
            f"| {row['variant']} | {kind} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--only", default="gemm,e2e", help="comma list of: gemm, e2e, shapes, accuracy, launch"
    )
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--m", default="1,16,64,1024", help="GEMM token counts")
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument(
        "--compiled", default="", help="decode batches also timed with the step compiled (1,16)"
    )
    ap.add_argument(
        "--compiled-prefill", action="store_true", help="e2e: prefills also timed compiled"
    )
    ap.add_argument("--prefills", default="8x128,1x2048", help="e2e: prefill workloads, BxQ")
    ap.add_argument(
        "--decode-batches", default="1,16", help="e2e: decode batch sizes (empty: none)"
    )
    ap.add_argument(
        "--fuse", action="store_true", help="e2e: also each sparsified variant with fused siblings"
    )
    ap.add_argument(
        "--variants",
        default="",
        help='e2e: comma list of VARIANTS labels, or one + ", fused" (default: all)',
    )
    ap.add_argument("--out", default=None, help="default: benches/results/fp8_<card>.json")
    args = ap.parse_args()
    only = set(args.only.split(","))
    out: dict = {"env": environment(), "command": " ".join(__import__("sys").argv)}
    out["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    path = Path(args.out or default_results_path("fp8"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tables = []

    def gemm() -> str:
        ms = [int(m) for m in args.m.split(",")]
        out["gemm"] = [r for nm, (n, k) in SHAPES.items() for r in bench_shape(nm, n, k, ms)]
        return "### Per GEMM (us, CUDA-graph replay)\n\n" + gemm_table(out["gemm"])

    def e2e() -> str:
        def save(partial: dict) -> None:
            path.write_text(json.dumps({**out, "e2e": partial}, indent=1))

        workloads = {
            "prefills": tuple(
                (int(b), int(q)) for b, q in (p.split("x") for p in args.prefills.split(",") if p)
            ),
            "decode_batches": tuple(int(b) for b in args.decode_batches.split(",") if b),
            "compiled_batches": tuple(int(b) for b in args.compiled.split(",") if b),
            "compiled_prefill": args.compiled_prefill,
        }
        labels = variant_labels(args.variants)
        out["e2e"] = bench_e2e(args.layers, args.decode_steps, save, workloads, args.fuse, labels)
        errors = error_table(out["e2e"])
        return (
            f"### End to end, LLaMA-2-7B shapes, {args.layers} layers\n\n"
            + e2e_table(out["e2e"])
            + (f"\n\n### Logits: relative error (top-1 agreement)\n\n{errors}" if errors else "")
        )

    def accuracy() -> str:
        ms = [int(m) for m in args.m.split(",")]
        out["accuracy"] = [r for nm, (n, k) in SHAPES.items() for r in bench_accuracy(nm, n, k, ms)]
        return "### fp8 kernels against the exact sum\n\n" + accuracy_table(out["accuracy"])

    def launch() -> str:
        out["launch"] = bench_launch(args.layers, args.decode_steps)
        return (
            f"### Programmatic against plain launches, {args.layers} layers (ms, graph replay)\n\n"
            + launch_table(out["launch"])
        )

    def shapes() -> str:
        ms = [int(m) for m in args.m.split(",")]
        out["shapes"] = []
        for nm, (n, k) in SHAPES.items():  # saved after each: the sweep is long
            out["shapes"] += bench_wgmma_shapes(nm, n, k, ms)
            path.write_text(json.dumps(out, indent=1))
        return "### wgmma e4m3 launch shapes\n\n" + wgmma_shapes_table(out["shapes"])

    sections = {
        "gemm": gemm, "e2e": e2e, "shapes": shapes, "accuracy": accuracy, "launch": launch,
    }  # fmt: skip
    for name, body in sections.items():
        if name in only:
            run_section(name, body, out, path, tables)
    log(f"wrote {path}")
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
