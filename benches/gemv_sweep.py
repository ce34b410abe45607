"""Sweep of the plain mma.sp kernel's M <= 8 variants on cuSPARSELt's buffer (issue 11):
launch shape (R, W, U) x register prefetch of the next batch (RIA_PF) x weight-load cache
hint (RIA_LDH), against dense cuBLAS and the packed-fragment layout. Microseconds per GEMM
under CUDA-graph replay over weight copies > 256 MB (as benches/decode_kernels.py), effective
TB/s on the 2:4 bytes (9/16 of dense). Kernels are built from `mma_sp.cu` with extra
#defines (RIA_PF, RIA_LDH, RIA_PREFETCH_B, RIA_MINB), so shapes outside `MmaConfig` can be
timed too. Also e4m3 (fp8) 2:4 on the packed fragments at M = 1 against `torch._scaled_mm`
(tokens quantized beforehand; TB/s on 5/8 of the e4m3 bytes). Prints compact lines; JSON
to --out (benches/results/gemv_fp8_h200.json: `--fp8-only`).
Usage: python benches/gemv_sweep.py [--ms 1,4,8] [--out PATH] [--fp8-only]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from ria.sparse import mma_sp, pack_24
from ria.sparse.cslt import cslt_compress, share_cslt_buffer
from ria.sparse.format import pack_mma24
from ria.sparse.graphs import rotation_time_us, time_call

SHAPES = {"q/k/v/o": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008)}
DTYPE = torch.bfloat16
# (name, R, W, U, extra defines)
VARIANTS = [
    ("old " + s, *c, {})
    for s, c in [("r1w16u1", (1, 16, 1)), ("r1w16u2", (1, 16, 2)), ("r1w8u4", (1, 8, 4))]
]
for ldh in (1, 2, 3):
    VARIANTS.append((f"r1w16u1 h{ldh}", 1, 16, 1, {"RIA_LDH": ldh}))
for r, w, u in [(1, 16, 1), (1, 8, 1), (1, 32, 1), (1, 16, 2), (2, 8, 1), (1, 8, 2), (1, 4, 2)]:
    for ldh in (0, 2):
        VARIANTS.append((f"r{r}w{w}u{u} p1h{ldh}", r, w, u, {"RIA_PF": 1, "RIA_LDH": ldh}))
for r, w, u in [(1, 16, 2), (1, 8, 4), (1, 32, 1), (1, 32, 2), (1, 16, 4)]:
    VARIANTS.append((f"r{r}w{w}u{u} h2", r, w, u, {"RIA_LDH": 2}))
NB = {"RIA_PREFETCH_B": 0}  # B loaded per k-step (fewer registers)
for r, w, u, pf in [(1, 16, 4, 0), (1, 16, 2, 0), (1, 16, 1, 1), (1, 8, 4, 0), (1, 8, 2, 1)]:
    for ldh in (0, 2):
        VARIANTS.append(
            (f"r{r}w{w}u{u} nb p{pf}h{ldh}", r, w, u, {**NB, "RIA_PF": pf, "RIA_LDH": ldh})
        )
VARIANTS.append(
    ("r1w16u2 nb p1h2 minb2", 1, 16, 2, {**NB, "RIA_PF": 1, "RIA_LDH": 2, "RIA_MINB": 2})
)
VARIANTS.append(("r1w16u2 h2 minb2", 1, 16, 2, {"RIA_LDH": 2, "RIA_MINB": 2}))


def random_24(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, device="cuda", generator=g, dtype=torch.float32) * 0.02
    groups = w.view(n, k // 4, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return (groups * mask).view(n, k).to(DTYPE)


def load(source: str):
    from torch.cuda import _utils

    binary = mma_sp._compile(source, mma_sp._arch())
    loaded = _utils._cuda_load_module(binary, [mma_sp._ENTRY])
    return loaded[mma_sp._ENTRY] if isinstance(loaded, dict) else getattr(loaded, mma_sp._ENTRY)


def source(cfg: mma_sp.MmaConfig, tiles: int, extra: dict, cslt: bool) -> str:
    head = "".join(f"#define {k} {v}\n" for k, v in extra.items())
    return head + mma_sp._kernel_source(DTYPE, cfg, tiles, 0, cslt=cslt)


FP8_VARIANTS = [
    ("old r1w16u2", 1, 16, 2, {}),
    ("old r2w8u4", 2, 8, 4, {}),
    ("r1w16u1 p1h2", 1, 16, 1, {"RIA_PF": 1, "RIA_LDH": 2}),
    ("r1w16u2 p1h2", 1, 16, 2, {"RIA_PF": 1, "RIA_LDH": 2}),
    ("r1w8u2 p1h2", 1, 8, 2, {"RIA_PF": 1, "RIA_LDH": 2}),
    ("r1w16u2 h2", 1, 16, 2, {"RIA_LDH": 2}),
    ("r1w16u4 h2", 1, 16, 4, {"RIA_LDH": 2}),
    ("r1w8u4 h2", 1, 8, 4, {"RIA_LDH": 2}),
    ("r1w16u4 nb h2", 1, 16, 4, {"RIA_LDH": 2, "RIA_PREFETCH_B": 0}),
    ("r1w16u2 nb p1h2", 1, 16, 2, {"RIA_LDH": 2, "RIA_PREFETCH_B": 0, "RIA_PF": 1}),
]


def fp8_source(v) -> str:
    _, r, w, u, extra = v
    head = "".join(f"#define {k} {val}\n" for k, val in extra.items())
    return head + mma_sp._kernel_source(DTYPE, mma_sp.MmaConfig(r, w, u), 1, 0, e4m3=True)


def fp8_m1(name: str, ws: list, kernels8: dict) -> dict:
    """e4m3 2:4 (packed fragments, the fp8 path's layout) at M = 1 vs torch._scaled_mm."""
    from ria.sparse.format import pack_mma24_e4m3
    from ria.sparse.fp8 import quantize_weight
    from ria.sparse.fp8_kernels import quantize_tokens

    n, k = ws[0].shape
    q8 = [quantize_weight(w) for w in ws]
    frags8 = [pack_mma24_e4m3(q.values) for q in q8]
    x = torch.randn(1, k, dtype=DTYPE, device="cuda")
    qx, sx = quantize_tokens(x)
    cnt = len(ws)
    dense = (
        1e3
        * time_call(
            lambda: [
                torch._scaled_mm(qx, q.values.t(), sx[:, None], q.scale[None, :], out_dtype=DTYPE)
                for q in q8
            ]
        )
        / cnt
    )
    ref = torch._scaled_mm(qx, q8[0].values.t(), sx[:, None], q8[0].scale[None, :], out_dtype=DTYPE)
    res = {}
    for vname, r, w, u, _ in FP8_VARIANTS:
        cfg = mma_sp.MmaConfig(r, w, u)
        kern = kernels8[vname]
        outs = [torch.empty(1, n, dtype=DTYPE, device="cuda") for _ in frags8]
        launches = []
        for f, q, o in zip(frags8, q8, outs, strict=True):
            a = [
                qx,
                k,
                f.values,
                f.meta,
                f.values,
                f.values,
                0,
                o,
                n,
                1,
                n,
                k,
                f.tiles,
                f.pairs,
                sx,
                q.scale,
            ]
            grid, block, smem = mma_sp._launch_shape(cfg, 1, f.tiles)
            launches.append((grid, block, smem, a))

        def call(i, launches=launches, kern=kern):
            grid, block, smem, a = launches[i]
            kern(grid=grid, block=(block, 1, 1), args=a, shared_mem=smem)

        us = rotation_time_us(call, range(cnt), iters=10, repeats=3)
        call(0)
        err = float((outs[0].double() - ref.double()).norm() / ref.double().norm())
        res[vname] = {"us": us, "TBps": n * k * 5 / 8 / us / 1e6, "err_vs_scaled_mm": err}
    best = sorted(res.items(), key=lambda kv: kv[1]["us"])
    print(
        f"fp8 {name} M=1: _scaled_mm {dense:.2f} ({n * k / dense / 1e6:.2f} TB/s) | "
        + "; ".join(
            f"{k_} {v['us']:.2f}/{v['TBps']:.2f} e{v['err_vs_scaled_mm']:.0e}" for k_, v in best
        ),
        flush=True,
    )
    return {"shape": name, "fp8": True, "m": 1, "scaled_mm_us": dense, "variants": res}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1,4,8")
    ap.add_argument("--out", default="gemv_sweep.json")
    ap.add_argument("--fp8-only", action="store_true", help="only the e4m3 M = 1 section")
    args = ap.parse_args()
    ms = [int(v) for v in args.ms.split(",")]
    t0 = time.perf_counter()
    from concurrent.futures import ThreadPoolExecutor

    jobs = [] if args.fp8_only else [(v, cslt) for v in VARIANTS for cslt in (True, False)]
    if args.fp8_only:
        ms = []
    srcs = [source(mma_sp.MmaConfig(r, w, u), 1, ex, c) for (_, r, w, u, ex), c in jobs]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda s: mma_sp._compile(s, mma_sp._arch()), srcs))
    kernels = {(v[0], c): load(s) for (v, c), s in zip(jobs, srcs, strict=True)}
    srcs8 = [fp8_source(v) for v in FP8_VARIANTS]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda s: mma_sp._compile(s, mma_sp._arch()), srcs8))
    kernels8 = {v[0]: load(s) for v, s in zip(FP8_VARIANTS, srcs8, strict=True)}
    print(f"compiled {len(srcs)} in {time.perf_counter() - t0:.1f}s", flush=True)
    rows = []
    for name, (n, k) in SHAPES.items():
        w0 = random_24(n, k, n + k)
        copies = max(1, math.ceil(256 * 2**20 / (n * k * 2)))
        g = torch.Generator(device="cuda").manual_seed(1)
        ws = [w0] + [
            w0[torch.randperm(n, device="cuda", generator=g)].contiguous()
            for _ in range(copies - 1)
        ]
        compact = [share_cslt_buffer(pack_24(w), cslt_compress(w)) for w in ws] if ms else []
        assert all(c.layout == "cslt" for c in compact)
        frags = [pack_mma24(w) for w in ws] if ms else []
        sparse_bytes = n * k * 2 * 9 / 16
        for m in ms:
            x = torch.randn(m, k, dtype=DTYPE, device="cuda")
            ref = x.double() @ ws[0].double().t()
            dense = 1e3 * time_call(lambda x=x, ws=ws: [F.linear(x, w) for w in ws]) / copies
            res = {}
            for (vname, r, wa, u, _), cslt in jobs:
                cfg = mma_sp.MmaConfig(r, wa, u)
                kern = kernels[(vname, cslt)]
                packs = compact if cslt else frags
                outs = [torch.empty(m, n, dtype=DTYPE, device="cuda") for _ in packs]
                launches = []
                for p, o in zip(packs, outs, strict=True):
                    row_tiles, pairs = mma_sp._tiles_pairs(p)
                    v = p.values
                    a = [
                        x,
                        x.stride(0),
                        v,
                        p.meta,
                        v,
                        v,
                        0,
                        o,
                        o.stride(0),
                        m,
                        n,
                        k,
                        row_tiles,
                        pairs,
                        v,
                        v,
                    ]
                    grid, block, smem = mma_sp._launch_shape(cfg, 1, row_tiles)
                    launches.append((grid, block, smem, a))

                def call(i, launches=launches, kern=kern):
                    grid, block, smem, a = launches[i]
                    kern(grid=grid, block=(block, 1, 1), args=a, shared_mem=smem)

                try:
                    us = rotation_time_us(call, range(len(packs)), iters=10, repeats=3)
                except RuntimeError as e:
                    print(f"  {vname} cslt={cslt}: {e}", flush=True)
                    continue
                call(0)
                err = float((outs[0].double() - ref).norm() / ref.norm())
                again = outs[0].clone()
                call(0)
                res[("cslt " if cslt else "pack ") + vname] = {
                    "us": us,
                    "TBps": sparse_bytes / us / 1e6,
                    "err": err,
                    "repeatable": bool(torch.equal(again, outs[0])),
                }
            bad = {k_: v for k_, v in res.items() if not v["err"] < 1e-2 or not v["repeatable"]}
            best = sorted(res.items(), key=lambda kv: kv[1]["us"])
            old = min((v["us"], k_) for k_, v in res.items() if k_.startswith("cslt old"))
            oldp = min((v["us"], k_) for k_, v in res.items() if k_.startswith("pack old"))
            print(
                f"{name} M={m}: dense {dense:.1f} | cslt old {old[0]:.2f} "
                f"({sparse_bytes / old[0] / 1e6:.2f}) {old[1][9:]}"
                f" | pack old {oldp[0]:.2f} ({sparse_bytes / oldp[0] / 1e6:.2f}) | BAD {list(bad)}",
                flush=True,
            )
            print(
                "   " + "; ".join(f"{k_} {v['us']:.2f}/{v['TBps']:.2f}" for k_, v in best[:14]),
                flush=True,
            )
            rows.append(
                {
                    "shape": name,
                    "n": n,
                    "k": k,
                    "m": m,
                    "dense_us": dense,
                    "variants": {k_: v for k_, v in res.items()},
                }
            )
        try:
            rows.append(fp8_m1(name, ws, kernels8))
        except Exception as e:  # a sweep: report and go on
            print(f"fp8 {name}: {type(e).__name__}: {e}", flush=True)
        del ws, compact, frags
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
