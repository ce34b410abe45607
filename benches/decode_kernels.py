"""Decode-size GEMMs, LLaMA-2-7B shapes, bf16: dense cuBLAS vs cuSPARSELt vs the Triton
compact-format kernel vs the mma.sp kernel over its packed fragments (best launch shape, and
with a fused input order) vs the mma.sp kernel reading cuSPARSELt's buffer in place
("mma_cslt", best launch shape: the form a layer keeps with default `sparsify` arguments),
for M > 8 split into the plain kernel ("mma_cslt", old) and the tiled kernel ("mma_tiled":
x and weights staged in shared memory, split-K over a cluster; new), for M <= 8 into the
plain kernel as it was ("mma_cslt", old) and with weight-load cache hints and B per k-step
("mma_gemv", `MmaConfig.hint`, `late_b`; new), and the best of them
("mma_cslt_tuned": what `mma_best_config` picks over `candidates`).

Microseconds per GEMM under CUDA-graph replay, weights rotated over copies > 256 MB so they
stream from HBM; effective TB/s = bytes of the weight form read / time (dense: 2 B per
weight; 2:4 forms: 9/16 of that). Writes JSON to benches/results/ and prints a table.
Usage: python benches/decode_kernels.py [--out PATH] [--ms 1,4,8,16,32,64] [--cslt-sweep]
[--tiled-sweep]

With `--wgmma-sweep` (default --ms 1,8,16,32,64, --out .../decode_kernels_<card>_wgmma.json):
only dense, cuSPARSELt, the best mma.sp kernel on cuSPARSELt's buffer before the wgmma kernels
("old": plain and tiled shapes of `candidates`) and the streaming wgmma kernel ("wgmma",
`wgmma_sp.cu`: its shapes in `candidates` and WGMMA_SWEEP, each timed), side by side, and what
tuning picks ("tuned": the fastest of both). At M <= 8 (no wgmma kernel) only dense and
"tuned", to show those kernels unchanged.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from gpu_speed import default_results_path, distinct_copies, prune_24

from ria.sparse import pack_24, sparse24_linear
from ria.sparse.cslt import cslt_best_config, cslt_compress, cslt_linear, share_cslt_buffer
from ria.sparse.cslt_lib import cusparselt_version
from ria.sparse.format import pack_mma24
from ria.sparse.graphs import time_call
from ria.sparse.mma_sp import MmaConfig, candidates, compile_kernels, mma24_linear, mma_best_config

SHAPES = {"q/k/v/o": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008)}
# Fused siblings (`ria.sparse.siblings`): q/k/v and gate/up as one GEMM each (--shapes).
FUSED = {"qkv": (3 * 4096, 4096), "gateup": (2 * 11008, 4096)}
DTYPE = torch.bfloat16
# Launch shapes timed for mma_cslt (`--cslt-sweep`): each token count's candidates plus
# shapes with fewer rows or pairs in flight per warp (fewer registers). Not yet timed on a
# GPU: r4w8u1 and r2w16u1 (2 blocks per SM at M = 16 by their register counts, so gate/up's
# 172 blocks of r4w8u2 would fit one wave).
CSLT_EXTRA = (
    MmaConfig(1, 8, 2),
    MmaConfig(2, 8, 2),
    MmaConfig(4, 8, 1),
    MmaConfig(2, 16, 1),
    MmaConfig(4, 16, 1),
    *candidates(1),
)


# The tiled kernel's shapes (MmaConfig(R, W, U, stages, split): 16 * R * W rows per block,
# 64 * U columns per stage, a cluster of `split` blocks over K), timed for M > 8 with
# `--tiled-sweep` besides those in `candidates`.
TILED_SWEEP = tuple(
    MmaConfig(*c)
    for c in [
        (2, 4, 2, 4, 4),
        (2, 4, 2, 3, 4),
        (2, 4, 1, 4, 4),
        (1, 4, 2, 4, 4),
        (4, 4, 1, 4, 8),
        *((2, 8, 1, 4, k) for k in (2, 4, 8)),
        (2, 8, 1, 6, 4),
        (2, 8, 2, 3, 4),
        (1, 8, 2, 4, 4),
        (1, 8, 1, 4, 4),
        (1, 16, 1, 4, 4),
        (1, 16, 1, 4, 8),
    ]
)


# The wgmma kernel's shapes (MmaConfig(R, W, U, stages, split, wgmma=True): W / 4 consumer
# warpgroups of R x 64 rows per block, 64 * U columns per stage, a cluster of `split` blocks
# over K; with a 6th field 2, pairs of row blocks share the tokens' copies) timed with
# `--wgmma-sweep` besides those in `candidates`. A first sweep (11:11 UTC
# 2026-12-03) also timed g4w4u2s4k3, g1w8u2s6k4, g4w4u2s4k8, g2w8u2s4k8 and g1w16u2s4k8: never
# within 10% of the best.
WGMMA_SWEEP = tuple(
    MmaConfig(*c[:5], wgmma=True, multicast=c[5] if len(c) > 5 else 1)
    for c in [
        (2, 4, 2, 4, 4),
        (2, 4, 2, 6, 4),
        (1, 8, 2, 4, 4),
        (2, 4, 4, 3, 4),
        (2, 4, 2, 3, 8),
        (1, 4, 2, 8, 2),
        (1, 4, 2, 4, 4),
        (2, 8, 2, 4, 3),
        (3, 4, 2, 5, 2),
        (1, 4, 2, 6, 2),
        (1, 4, 4, 4, 2),
        (1, 4, 2, 5, 4),
        (1, 4, 4, 3, 4),
        (2, 4, 2, 6, 2),
        (3, 4, 2, 4, 2),
        (1, 8, 2, 6, 2),
        (1, 4, 2, 8, 2, 2),
        (1, 4, 2, 6, 2, 2),
        (1, 4, 2, 4, 4, 2),
        (1, 4, 2, 4, 2, 2),
        (3, 4, 2, 5, 2, 2),
        (2, 4, 2, 6, 2, 2),
        (1, 4, 2, 8, 1, 2),
    ]
)


def cslt_configs(m: int, sweep: bool) -> tuple[MmaConfig, ...]:
    """The plain kernel's shapes timed on cuSPARSELt's buffer without the streaming options
    ("old")."""
    plain = tuple(c for c in candidates(m, cslt=True) if not c.tiled)
    shapes = OLD_CSLT_FEW + plain + (CSLT_EXTRA if sweep else ())
    return tuple(c for c in dict.fromkeys(shapes) if not c.streaming)


# The M <= 8 candidates on the buffer before the streaming options (issue 11).
OLD_CSLT_FEW = (MmaConfig(1, 16, 1), MmaConfig(1, 8, 4), MmaConfig(1, 16, 2))


# The plain kernel's streaming options for M <= 8 (`MmaConfig.hint`, `late_b`), timed with
# --cslt-sweep besides those in `candidates`.
GEMV_SWEEP = (
    MmaConfig(1, 16, 4, hint=2, late_b=1),
    MmaConfig(1, 16, 4, hint=1, late_b=1),
    MmaConfig(1, 16, 1, hint=1, late_b=1),
    MmaConfig(1, 16, 2, hint=1),
    MmaConfig(2, 8, 4, hint=2),
    MmaConfig(1, 8, 4, hint=1),
    MmaConfig(1, 16, 1, hint=3),
)


def gemv_configs(m: int, sweep: bool) -> tuple[MmaConfig, ...]:
    """The streaming plain kernel's shapes timed for `m` tokens ("new"; none at m > 8)."""
    if m > 8:
        return ()
    new = tuple(c for c in candidates(m, cslt=True) if c.streaming)
    return tuple(dict.fromkeys(new + (GEMV_SWEEP if sweep else ())))


MAX_SPLIT = 8  # --tiled-max-split: clusters up to this size (1: no cluster launch at all)


def tiled_configs(m: int, sweep: bool) -> tuple[MmaConfig, ...]:
    """The tiled kernel's shapes timed for `m` tokens ("new"; none at m <= 8)."""
    if m <= 8:
        return ()
    tiled = tuple(c for c in candidates(m, cslt=True) if c.tiled and not c.wgmma)
    shapes = tuple(dict.fromkeys(tiled + (TILED_SWEEP if sweep else ())))
    return tuple(c for c in shapes if c.split <= MAX_SPLIT)


STREAM_BYTES = 256 * 2**20


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def buffer_weights(name: str, n: int, k: int) -> tuple[list, list, list, int]:
    """Distinct 2:4 copies of one `(n, k)` weight (> STREAM_BYTES together, so they stream
    from HBM), their cuSPARSELt buffers and the compact forms sharing them; copies."""
    w0 = prune_24(torch.randn(n, k, dtype=DTYPE, device="cuda") * 0.02)
    copies = max(1, math.ceil(STREAM_BYTES / (n * k * 2)))
    ws = distinct_copies(w0, copies, seed=n + k)
    packed = [cslt_compress(w) for w in ws]
    compact = [share_cslt_buffer(pack_24(w), p) for w, p in zip(ws, packed, strict=True)]
    if any(c.layout != "cslt" for c in compact):
        raise RuntimeError(f"{name}: cuSPARSELt's metadata is not in the expected layout")
    return ws, packed, compact, copies


def time_best(
    row: dict, key: str, forms: list, x: torch.Tensor, ref: torch.Tensor, configs=None
) -> MmaConfig:
    """The fastest of `configs` (default: `candidates`) on `forms` for `x`, into `row` as
    `{key}_config`, `{key}_config_us` (every shape's time), `{key}_us`, `{key}_rel_err`
    (against `ref`, the first form's exact product) and `{key}_repeatable` (three more
    calls give the same bits)."""
    best, times = mma_best_config(forms, x, configs=configs)
    row[f"{key}_config"], row[f"{key}_config_us"] = str(best), times
    row[f"{key}_us"] = times[str(best)]
    y = mma24_linear(x, forms[0], config=best)
    row[f"{key}_rel_err"] = float((y.double() - ref).norm() / ref.norm())
    row[f"{key}_repeatable"] = all(
        torch.equal(mma24_linear(x, forms[0], config=best), y) for _ in range(3)
    )
    return best


def bench_shape(
    name: str, n: int, k: int, ms: list[int], sweep: bool, tiled_sweep: bool
) -> list[dict]:
    ws, packed, compact, copies = buffer_weights(name, n, k)
    frags = [pack_mma24(w) for w in ws]
    order = torch.randperm(k, device="cuda", dtype=torch.int32)
    dense_bytes, sparse_bytes = n * k * 2, n * k * 2 * 9 / 16

    def per_call(fn) -> float:
        return 1e3 * time_call(fn) / copies

    rows = []
    for m in ms:
        x = torch.randn(m, k, dtype=DTYPE, device="cuda")
        ref = x.double() @ ws[0].double().t()
        row: dict = {"shape": name, "n": n, "k": k, "m": m, "copies": copies}
        row["dense_us"] = per_call(lambda x=x: [F.linear(x, w) for w in ws])
        cfg = cslt_best_config(packed, x, sweep=False)
        row["cslt_us"] = per_call(lambda x=x, c=cfg: [cslt_linear(x, p, None, c) for p in packed])
        row["triton_us"] = per_call(lambda x=x: [sparse24_linear(x, c) for c in compact])
        best = time_best(row, "mma", frags, x, ref)
        plain = time_best(row, "mma_cslt", compact, x, ref, cslt_configs(m, sweep))
        if gemv_configs(m, sweep):
            time_best(row, "mma_gemv", compact, x, ref, gemv_configs(m, sweep))
        if tiled_configs(m, tiled_sweep):  # (split-K sums in a fixed order: repeatable)
            time_best(row, "mma_tiled", compact, x, ref, tiled_configs(m, tiled_sweep))
        # What tuning picks on the buffer (`candidates`: plain and tiled shapes).
        row["mma_cslt_tuned_us"] = min(
            row["mma_cslt_us"], row.get("mma_tiled_us", math.inf), row.get("mma_gemv_us", math.inf)
        )
        row["mma_order_us"] = per_call(
            lambda x=x, b=best: [mma24_linear(x, f, order=order, config=b) for f in frags]
        )
        yo = mma24_linear(x, frags[0], order=order, config=best)
        ref_o = x[:, order.long()].double() @ ws[0].double().t()
        row["mma_order_rel_err"] = float((yo.double() - ref_o).norm() / ref_o.norm())
        for kind, nbytes in [("dense", dense_bytes), ("cslt", sparse_bytes)]:
            row[f"{kind}_TBps"] = nbytes / row[f"{kind}_us"] / 1e6
        for kind in ("triton", "mma", "mma_order", "mma_cslt", "mma_gemv", "mma_tiled"):
            if f"{kind}_us" in row:
                row[f"{kind}_TBps"] = sparse_bytes / row[f"{kind}_us"] / 1e6
        row["mma_cslt_tuned_TBps"] = sparse_bytes / row["mma_cslt_tuned_us"] / 1e6
        rows.append(row)
        new_msg = ""
        if "mma_gemv_us" in row:
            new_msg = (
                f"  gemv {row['mma_gemv_us']:6.2f} ({row['mma_gemv_config']}, "
                f"{row['mma_gemv_TBps']:.2f} TB/s, err {row['mma_gemv_rel_err']:.1e})"
            )
        if "mma_tiled_us" in row:
            new_msg = (
                f"  tiled {row['mma_tiled_us']:6.1f} ({row['mma_tiled_config']}, "
                f"{row['mma_tiled_TBps']:.2f} TB/s, err {row['mma_tiled_rel_err']:.1e}, "
                f"repeatable {row['mma_tiled_repeatable']})"
            )
        log(
            f"{name} M={m:>2}: dense {row['dense_us']:6.1f}  cslt {row['cslt_us']:6.1f}  "
            f"triton {row['triton_us']:6.1f}  mma {row['mma_us']:6.1f} ({best}, "
            f"{row['mma_TBps']:.2f} TB/s, err {row['mma_rel_err']:.1e})  "
            f"mma+order {row['mma_order_us']:6.1f}  mma_cslt {row['mma_cslt_us']:6.1f} "
            f"({plain}, {row['mma_cslt_TBps']:.2f} TB/s, err {row['mma_cslt_rel_err']:.1e})"
            f"{new_msg} us"
        )
    return rows


def wgmma_configs(m: int) -> tuple[MmaConfig, ...]:
    """The wgmma kernel's shapes timed for `m` tokens ("wgmma")."""
    return tuple(dict.fromkeys([c for c in candidates(m, cslt=True) if c.wgmma] + [*WGMMA_SWEEP]))


WGMMA_KINDS = ("old", "wgmma")


def sweep_configs(m: int) -> dict[str, tuple[MmaConfig, ...]]:
    """Per kind of kernel, the shapes `--wgmma-sweep` times for `m` tokens (M <= 8: only
    what tuning picks from, "tuned")."""
    if m <= 8:
        return {"tuned": candidates(m, cslt=True)}
    return {
        "old": cslt_configs(m, False) + tiled_configs(m, False),
        "wgmma": wgmma_configs(m),
    }


def bench_wgmma_shape(name: str, n: int, k: int, ms: list[int]) -> list[dict]:
    """Dense, cuSPARSELt, the best mma.sp kernel on the buffer before wgmma ("old"), the
    wgmma kernel, and the fastest of both ("tuned"), per token count."""
    ws, packed, compact, copies = buffer_weights(name, n, k)
    dense_bytes, sparse_bytes = n * k * 2, n * k * 2 * 9 / 16
    rows = []
    for m in ms:
        x = torch.randn(m, k, dtype=DTYPE, device="cuda")
        ref = x.double() @ ws[0].double().t()
        row: dict = {"shape": name, "n": n, "k": k, "m": m, "copies": copies}
        row["dense_us"] = 1e3 * time_call(lambda x=x: [F.linear(x, w) for w in ws]) / copies
        cfg = cslt_best_config(packed, x, sweep=False)
        row["cslt_us"] = (
            1e3
            * time_call(lambda x=x, c=cfg: [cslt_linear(x, p, None, c) for p in packed])
            / copies
        )
        kinds = sweep_configs(m)
        for kind, shapes in kinds.items():
            time_best(row, kind, compact, x, ref, shapes)
        if "tuned" not in kinds:
            best = min(kinds, key=lambda kind: row[f"{kind}_us"])
            row["tuned_us"], row["tuned_config"] = row[f"{best}_us"], row[f"{best}_config"]
        row["dense_TBps"] = dense_bytes / row["dense_us"] / 1e6
        for kind in ("cslt", *kinds, "tuned"):
            row[f"{kind}_TBps"] = sparse_bytes / row[f"{kind}_us"] / 1e6
        rows.append(row)
        msg = "  ".join(
            f"{kind} {row[f'{kind}_us']:5.1f} ({row[f'{kind}_config']}, "
            f"err {row[f'{kind}_rel_err']:.1e}, repeatable {row[f'{kind}_repeatable']})"
            for kind in kinds
        )
        log(
            f"{name} M={m:>2}: dense {row['dense_us']:5.1f}  cslt {row['cslt_us']:5.1f}  {msg}  "
            f"tuned vs dense {row['dense_us'] / row['tuned_us']:.2f}x "
            f"({row['tuned_TBps']:.2f} TB/s)"
        )
        if "wgmma" in kinds:
            times = row["wgmma_config_us"].items()
            log("   wgmma: " + " ".join(f"{c} {us:.1f}" for c, us in times))
    return rows


def wgmma_table(rows: list[dict]) -> str:
    out = [
        "| shape | M | dense us (TB/s) | cuSPARSELt us | old us (TB/s) | wgmma us (TB/s) "
        "| tuned vs dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            f"{r[f'{kind}_us']:.1f} ({r[f'{kind}_TBps']:.2f}) {r[f'{kind}_config']}"
            if f"{kind}_us" in r
            else "-"
            for kind in WGMMA_KINDS
        ]
        out.append(
            f"| {r['shape']} {r['n']}x{r['k']} | {r['m']} | {r['dense_us']:.1f} "
            f"({r['dense_TBps']:.2f}) | {r['cslt_us']:.1f} | {' | '.join(cells)} | "
            f"{r['dense_us'] / r['tuned_us']:.2f}x ({r['tuned_config']}) |"
        )
    return "\n".join(out)


def table(rows: list[dict]) -> str:
    out = [
        "| shape | M | dense us | cuSPARSELt us | Triton us | mma us (TB/s) | mma+order us "
        "| mma_cslt us (TB/s) | new: gemv (M <= 8) / tiled us (TB/s) | mma vs dense "
        "| mma_cslt vs dense "
        "| tuned mma_cslt vs dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tiled = "-"
        if "mma_gemv_us" in r:
            tiled = f"{r['mma_gemv_us']:.1f} ({r['mma_gemv_TBps']:.2f}) {r['mma_gemv_config']}"
        if "mma_tiled_us" in r:
            tiled = f"{r['mma_tiled_us']:.1f} ({r['mma_tiled_TBps']:.2f}) {r['mma_tiled_config']}"
        out.append(
            f"| {r['shape']} {r['n']}x{r['k']} | {r['m']} | {r['dense_us']:.1f} | "
            f"{r['cslt_us']:.1f} | {r['triton_us']:.1f} | {r['mma_us']:.1f} "
            f"({r['mma_TBps']:.2f}) | {r['mma_order_us']:.1f} | {r['mma_cslt_us']:.1f} "
            f"({r['mma_cslt_TBps']:.2f}) | {tiled} | {r['dense_us'] / r['mma_us']:.2f}x | "
            f"{r['dense_us'] / r['mma_cslt_us']:.2f}x | "
            f"{r['dense_us'] / r['mma_cslt_tuned_us']:.2f}x |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--out", default=None, help="default: benches/results/decode_kernels_<card>[_wgmma].json"
    )
    ap.add_argument(
        "--ms", default=None, help="default: 1,4,8,16,32,64 (--wgmma-sweep: 1,8,16,32,64)"
    )
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"of {[*SHAPES, *FUSED]}")
    ap.add_argument("--cslt-sweep", action="store_true", help="time more mma_cslt launch shapes")
    ap.add_argument("--tiled-sweep", action="store_true", help="time more tiled launch shapes")
    ap.add_argument("--tiled-max-split", type=int, default=8, help="largest cluster timed")
    ap.add_argument("--wgmma-sweep", action="store_true", help="old vs the wgmma kernel only")
    args = ap.parse_args()
    global MAX_SPLIT
    MAX_SPLIT = args.tiled_max_split
    wg = args.wgmma_sweep
    ms = [int(v) for v in (args.ms or ("1,8,16,32,64" if wg else "1,4,8,16,32,64")).split(",")]
    out = args.out or default_results_path("decode_kernels" + ("_wgmma" if wg else ""))
    t0 = time.perf_counter()
    if wg:
        for m in ms:
            shapes = tuple(c for cs in sweep_configs(m).values() for c in cs)
            compile_kernels(DTYPE, [m], cslt=True, configs=shapes, threads=16)
        log(f"kernels compiled in {time.perf_counter() - t0:.1f}s")
        rows = []
        for name in args.shapes.split(","):
            n, k = {**SHAPES, **FUSED}[name]
            rows += bench_wgmma_shape(name, n, k, ms)
            torch.cuda.empty_cache()
            write(out, rows)  # after each shape: a run cut short keeps what it measured
        print(wgmma_table(rows))
        return
    compile_kernels(DTYPE, ms)
    compile_kernels(DTYPE, ms, order_dtype=torch.int32)
    for m in ms:
        shapes = cslt_configs(m, args.cslt_sweep) + gemv_configs(m, args.cslt_sweep)
        shapes += tiled_configs(m, args.tiled_sweep)
        compile_kernels(DTYPE, [m], cslt=True, configs=shapes, threads=16)
    log(f"kernels compiled in {time.perf_counter() - t0:.1f}s")
    rows = []
    for name in args.shapes.split(","):
        n, k = {**SHAPES, **FUSED}[name]
        rows += bench_shape(name, n, k, ms, args.cslt_sweep, args.tiled_sweep)
        torch.cuda.empty_cache()
    write(out, rows)
    print(table(rows))


def write(out: str, rows: list[dict]) -> None:
    result = {
        "command": " ".join(__import__("sys").argv),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cusparselt": cusparselt_version(),
        "python": platform.python_version(),
        "rows": rows,
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
