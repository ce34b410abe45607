"""2:4 sparse vs dense on one GPU, LLaMA-2-7B shapes, bf16, everything under CUDA-graph replay.

Sections (`--only` picks some):
  gemm  per-GEMM table: q/k/v/o, gate/up, down at M = 1 .. 16384 tokens, dense cuBLAS vs
        cuSPARSELt (searched algorithm) vs the compact-format Triton kernel (M <= 256);
        weights rotate over copies > 200 MB so they stream from HBM, not L2.
  e2e   whole model (random weights, 2:4 by magnitude): prefill 8x128 and 1x2048, decode
        tokens/s at batch 1 and 16 with a 512-token KV cache, pruned-Linear weight memory,
        and sparse-vs-masked-dense output agreement.
  fusion  whole model, dense vs sparsify with and without fused siblings (q/k/v, gate/up as
        one layer), with prefill-capable buckets (--fusion-buckets: the cuSPARSELt layout)
        and with decode buckets (1, 16, 64: the mma.sp layout): prefill 8x128 and 1x2048,
        decode at batch 1, 4, 16, 64, and the kernel time of one decode step by category.
  user  what a user gets with default arguments: GPU memory allocated dense vs after
        `sparsify(model)`, `sparsify` time cold and with its plan cache, dense vs sparse
        generation in the same mode (--user-modes): Hugging Face `model.generate` in its
        default mode (eager) and with a static cache + its own compile (inductor, CUDA
        graphs), `ria.generate` (static cache + CUDA graphs kept across calls) first and
        next call, with and without `compile=True`; and the host cost of one eager layer
        call per backend at M = 1, 64, 128, before (torch's launch / torch's cuSPARSELt op)
        and after (prepared launch / kept cuSPARSELt plan).

Writes JSON to benches/results/ and prints markdown tables.
Usage: python benches/gpu_speed.py [--only gemm,e2e,user] [--layers 32] [--out PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import re
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import ria
from ria.sparse import (
    DEFAULT_BATCH_SIZES,
    StaticGenerator,
    pack_24,
    sparse24_linear,
    sparsify,
    triton_gemv,
)
from ria.sparse.cslt import (
    cslt_best_config,
    cslt_compress,
    cslt_linear,
    cslt_search,
    share_cslt_buffer,
)
from ria.sparse.cslt_lib import cusparselt_version
from ria.sparse.graphs import time_call, time_graph
from ria.sparse.triton_gemv import MAX_M

HIDDEN, INTER, HEADS, LAYERS, VOCAB = 4096, 11008, 32, 32, 32000
SHAPES = {"q/k/v/o": (HIDDEN, HIDDEN), "gate/up": (INTER, HIDDEN), "down": (HIDDEN, INTER)}
GEMM_MS = [1, 16, 64, 256, 1024, 4096, 16384]
DTYPE = torch.bfloat16
STREAM_BYTES = 256 * 2**20  # weights per rotation: > 4x the H200's 60 MB L2


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prune_24(w: torch.Tensor) -> torch.Tensor:
    """2:4 by magnitude with the Rust core (on the CPU), back on `w`'s device."""
    keep = torch.from_numpy(ria.nm_mask(ria.magnitude_score(w), 2, 4)).to(w.device)
    return w * keep


def distinct_copies(w: torch.Tensor, count: int, seed: int) -> list[torch.Tensor]:
    """`w` and `count - 1` row permutations of it: each a 2:4 magnitude-pruned random matrix."""
    g = torch.Generator(device=w.device).manual_seed(seed)
    perms = [torch.randperm(w.shape[0], generator=g, device=w.device) for _ in range(count - 1)]
    return [w] + [w[p].contiguous() for p in perms]


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (GB/s)."""
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = time_call(lambda: b.copy_(a), iters=10)
    return 2 * a.numel() / ms / 1e6


# -- per-GEMM ----------------------------------------------------------------------------


def bench_shape(name: str, n: int, k: int, ms_list: list[int]) -> list[dict]:
    """One weight shape at every token count; weights rotate over copies > STREAM_BYTES."""
    t0 = time.perf_counter()
    w0 = prune_24(torch.randn(n, k, dtype=DTYPE, device="cuda") * 0.02)
    copies = max(1, math.ceil(STREAM_BYTES / (n * k * 2)))
    ws = distinct_copies(w0, copies, seed=n + k)
    packed = [cslt_compress(w) for w in ws]
    # The decode kernel reads values and indices from the cuSPARSELt buffer, as in the model.
    compact = [share_cslt_buffer(pack_24(w), p) for w, p in zip(ws, packed, strict=True)]
    log(f"gemm {name} {n}x{k}: {copies} copies ready in {time.perf_counter() - t0:.1f}s")

    def per_call(fn) -> float:
        return 1e3 * time_call(fn) / copies

    rows = []
    for m in ms_list:
        x = torch.randn(m, k, dtype=DTYPE, device="cuda")
        found, _ = cslt_search(packed[0], x)
        cfg = cslt_best_config(packed, x, sweep=m >= 1024)
        row = {"shape": name, "n": n, "k": k, "m": m}
        row["dense_us"] = per_call(lambda x=x: [F.linear(x, w) for w in ws])
        row["cslt_us"] = per_call(lambda x=x, c=cfg: [cslt_linear(x, p, None, c) for p in packed])
        row["cslt_alg"] = [cfg.alg_id, cfg.split_k, cfg.split_k_mode]
        row["cslt_search_alg"] = [found.alg_id, found.split_k, found.split_k_mode]
        if found != cfg:
            row["cslt_search_us"] = per_call(
                lambda x=x, c=found: [cslt_linear(x, p, None, c) for p in packed]
            )
        ref = x.float() @ ws[0].float().t()
        got = cslt_linear(x, packed[0], None, cfg).float()
        row["cslt_rel_err"] = float((got - ref).norm() / ref.norm())
        msg = f"  M={m:>5}: dense {row['dense_us']:8.1f} us  cslt {row['cslt_us']:8.1f} us"
        if m <= MAX_M:
            row["triton_us"] = per_call(lambda x=x: [sparse24_linear(x, c) for c in compact])
            row["triton_config"] = str(triton_gemv.tuned_config(m))
            got = sparse24_linear(x, compact[0]).float()
            row["triton_rel_err"] = float((got - ref).norm() / ref.norm())
            msg += f"  triton {row['triton_us']:8.1f} us"
        if m == 1:
            row["dense_GBps"] = n * k * 2 / row["dense_us"] / 1e3
            if "triton_us" in row:  # bytes the kernel reads: values + indices
                row["triton_GBps"] = n * k * 2 * 9 / 16 / row["triton_us"] / 1e3
                row["triton_layout"] = compact[0].layout
        rows.append(row)
        log(msg)
    return rows


def bench_gemm(ms_list: list[int]) -> list[dict]:
    rows = []
    for name, (n, k) in SHAPES.items():
        rows += bench_shape(name, n, k, ms_list)
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def gemm_table(rows: list[dict]) -> str:
    out = [
        "| shape | M | dense us | cuSPARSELt us | speedup | Triton us | speedup |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tri = r.get("triton_us")
        out.append(
            f"| {r['shape']} {r['n']}x{r['k']} | {r['m']} | {r['dense_us']:.1f} | "
            f"{r['cslt_us']:.1f} | {r['dense_us'] / r['cslt_us']:.2f}x | "
            + (f"{tri:.1f} | {r['dense_us'] / tri:.2f}x |" if tri else "- | - |")
        )
    return "\n".join(out)


# -- end to end --------------------------------------------------------------------------


def build_model(layers: int, prune_all: bool) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        num_hidden_layers=layers,
        vocab_size=VOCAB,
        max_position_embeddings=4096,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=DTYPE).eval()
    # Pruning: layer 0 by magnitude with the Rust core; other layers get distinct row
    # permutations of layer 0's pruned matrices (each again a magnitude-pruned random matrix),
    # unless --prune-all prunes every layer itself (slower: ~6.5 G weights through the CPU).
    blocks = model.model.layers
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    names += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    g = torch.Generator(device="cuda").manual_seed(1)
    with torch.no_grad():
        for i, block in enumerate(blocks):
            for nm in names:
                w = block.get_submodule(nm).weight
                if i == 0 or prune_all:
                    w.copy_(prune_24(w))
                else:
                    w0 = blocks[0].get_submodule(nm).weight
                    w.copy_(w0[torch.randperm(w.shape[0], generator=g, device="cuda")])
    return model


def linear_bytes(model: torch.nn.Module) -> int:
    from ria.sparse import Sparse24Linear

    total = 0
    for mod in model.model.layers.modules():
        if isinstance(mod, torch.nn.Linear):
            total += mod.weight.numel() * mod.weight.element_size()
        elif isinstance(mod, Sparse24Linear):
            total += mod.weight_bytes()
    return total


def fp32_reference(model: torch.nn.Module) -> dict:
    """Last-position logits of the masked dense model in fp32 for the prefill prompts."""
    g = torch.Generator(device="cuda").manual_seed(7)  # the prompts time_e2e draws first
    params = list(model.parameters())
    for p in params:
        p.data = p.data.float()
    ref = {}
    with torch.no_grad():
        for b, q in [(8, 128), (1, 2048)]:
            ids = torch.randint(0, VOCAB, (b, q), device="cuda", generator=g)
            out = model(ids, use_cache=False, logits_to_keep=1).logits[:, -1].float()
            ref[f"prefill_{b}x{q}_logits"] = out
    for p in params:
        p.data = p.data.to(DTYPE)  # exact: the weights were bf16
    return ref


def kernel_breakdown(fn) -> dict:
    """GPU time per kernel category (ms) and the top kernels, for one eager call of `fn`."""
    import re

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    cats = {
        "triton_2:4": r"_gemv_kernel|_mm_kernel",
        "mma_2:4": r"ria_mma_sp24",
        "fp8_quantize": r"quantize",
        "silu": r"silu",
        "cusparselt": r"sparse|cusparselt|spmma|_sp_",
        "attention": r"flash|fmha|attention|efficient|softmax",
        "gemm_dense": r"gemm|gemv|cutlass|nvjet|xmma|cublas|sm90_",
    }
    by_cat: dict[str, float] = {}
    kernels = []
    for e in prof.key_averages():
        if e.device_type != DeviceType.CUDA:
            continue
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        cat = next((c for c, rx in cats.items() if re.search(rx, e.key, re.I)), "other")
        by_cat[cat] = by_cat.get(cat, 0.0) + t / 1e3
        kernels.append((t / 1e3, e.count, e.key[:90]))
    kernels.sort(reverse=True)
    return {"ms_by_category": by_cat, "top_kernels": kernels[:12]}


def profile_e2e(model: torch.nn.Module) -> dict:
    """Eager GPU-time breakdown of a prefill 8x128 and one decode step (batch 1, KV 512)."""
    ids = torch.randint(0, VOCAB, (8, 128), device="cuda")
    out = {}
    with torch.no_grad():
        out["prefill_8x128"] = kernel_breakdown(
            lambda: model(ids, use_cache=False, logits_to_keep=1)
        )
        gen = StaticGenerator(model, 1, 600, cuda_graph=False)
        gen.prefill(torch.randint(0, VOCAB, (1, 512), device="cuda"))
        out["decode_b1"] = kernel_breakdown(gen.step)
    return out


def dump_cslt_layout(path: Path) -> None:
    """cuSPARSELt compressed buffers next to the compact format of the same 2:4 weights, for
    working out its metadata layout offline; for e4m3 also probes that name every byte's
    source (`_e4m3_layout_probes`)."""
    dump: dict = {}
    for dtype in (torch.bfloat16, torch.float16):
        for n, k in [(32, 64), (64, 128), (128, 256), (256, 512)]:
            w = prune_24(torch.randn(n, k, dtype=dtype, device="cuda"))
            c = pack_24(w)
            dump[f"{dtype}_{n}x{k}"] = {
                "weight": w.cpu(),
                "packed": cslt_compress(w).cpu(),
                "values": c.values.cpu(),
                "meta": c.meta.cpu(),
            }
    for n, k in [(64, 128), (128, 256), (256, 512)]:
        dump[f"e4m3_{n}x{k}"] = _e4m3_layout_probes(n, k)
    torch.save(dump, path)


def _e4m3_layout_probes(n: int, k: int) -> dict:
    """cuSPARSELt's compressed bytes (uint8) of e4m3 2:4 `(n, k)` weights built so the bytes
    name their source: in "position" probe d, every kept value is the e4m3 integer
    1 + ((p >> 4d) & 15) for p = row * k/2 + its index among the row's kept values (one fixed
    random 2:4 pattern); in "group" probe b, group g = row * k/4 + column // 4 keeps columns
    (2, 3) if bit b of g is set, else (0, 1), values 1.0."""
    g = torch.Generator().manual_seed(0)
    pattern = prune_24(torch.randn(n, k, generator=g)) != 0  # (n, k) bool, 2 per group of 4
    pos = torch.zeros(n, k, dtype=torch.int64)
    pos[pattern] = torch.arange(n * k // 2)  # row-major: row * k/2 + kept index
    out: dict = {"pattern": pattern, "position": [], "group": []}

    def compress(w: torch.Tensor) -> torch.Tensor:
        e4m3 = w.to(torch.float8_e4m3fn).cuda()
        return torch._cslt_compress(e4m3).cpu().view(torch.uint8)

    for d in range((max(n * k // 2 - 1, 1).bit_length() + 3) // 4):
        w = torch.where(pattern, 1.0 + ((pos >> (4 * d)) & 15).float(), 0.0)
        out["position"].append(compress(w))
    groups = torch.arange(n * k // 4).reshape(n, k // 4)
    for b in range(max(n * k // 4 - 1, 1).bit_length()):
        high = ((groups >> b) & 1).bool().repeat_interleave(4, dim=1)
        col = torch.arange(k) % 4
        keep = torch.where(high, col >= 2, col < 2)
        out["group"].append(compress(keep.float()))
    return out


def time_e2e(
    model: torch.nn.Module,
    decode_steps: int,
    decode_batches: tuple[int, ...] = (1, 16),
    prefills: tuple[tuple[int, int], ...] = ((8, 128), (1, 2048)),
    compiled_batches: tuple[int, ...] = (),
    compiled_prefill: bool = False,
    progress: Callable[[dict], None] = lambda timings: None,
) -> tuple[dict, dict]:
    """Graph-replay timings and the outputs used for the correctness check.
    `compiled_batches`: decode batches also timed with the step compiled by inductor before
    capture (`ria.generate(compile=True)`'s mode), keys `decode_b{B}_compiled_*`;
    `compiled_prefill`: the prefills too, keys `prefill_{B}x{Q}_compiled_*`. Each decode
    batch's step and the first prefill, in each mode, also get `kernel_breakdown`'s profile
    (`*_profile` keys). `progress` gets the timings so far after each workload (to save
    them: a run cut short keeps those)."""
    g = torch.Generator(device="cuda").manual_seed(7)
    res: dict = {}
    outs: dict = {}
    for b, q in prefills:
        ids = torch.randint(0, VOCAB, (b, q), device="cuda", generator=g)
        gen = StaticGenerator(model, b, q)
        gen.prefill(ids)
        graph = gen.prefill_graph(q)
        ms = time_graph(graph, iters=10, repeats=3)
        res[f"prefill_{b}x{q}_ms"] = ms
        res[f"prefill_{b}x{q}_tok_s"] = b * q / ms * 1e3
        if (b, q) == prefills[0]:  # where a graph-replayed prefill spends its GPU time
            res[f"prefill_{b}x{q}_profile"] = kernel_breakdown(graph.replay)
        outs[f"prefill_{b}x{q}_logits"] = gen.prefill(ids).float().clone()
        log(f"  prefill {b}x{q}: {ms:.2f} ms")
        progress(res)
        del gen
    for b in decode_batches:
        ids = torch.randint(0, VOCAB, (b, 512), device="cuda", generator=g)
        gen = StaticGenerator(model, b, 512 + max(decode_steps, 32) + 8)  # timing replays too
        gen.prefill(ids)
        tokens = [gen.step().clone() for _ in range(decode_steps)]  # first step captures
        outs[f"decode_b{b}_tokens"] = torch.cat(tokens, dim=1)
        gen.prefill(ids)  # rewind, then time replays of the captured step
        ms = time_graph(gen.step_graph(), iters=5, repeats=3)
        res[f"decode_b{b}_ms_per_step"] = ms
        res[f"decode_b{b}_tok_s"] = b / ms * 1e3
        log(f"  decode b={b}: {ms:.3f} ms/step, {b / ms * 1e3:.1f} tok/s")
        # where one graph-replayed decode step spends its GPU time
        gen.prefill(ids)  # rewind again: the timing replays advanced the cache
        res[f"decode_b{b}_profile"] = kernel_breakdown(gen.step_graph().replay)
        progress(res)
        del gen
    for b, q in prefills if compiled_prefill else ():
        ids = torch.randint(0, VOCAB, (b, q), device="cuda", generator=g)
        gen = StaticGenerator(model, b, q, compile=True)
        gen.prefill(ids)  # creates the cache eagerly
        t0 = time.perf_counter()
        gen.prefill(ids)  # compiles, then captures
        res[f"prefill_{b}x{q}_compiled_first_s"] = time.perf_counter() - t0
        graph = gen.prefill_graph(q)
        ms = time_graph(graph, iters=10, repeats=3)
        res[f"prefill_{b}x{q}_compiled_ms"] = ms
        if (b, q) == prefills[0]:  # what inductor left of the model's other kernels
            res[f"prefill_{b}x{q}_compiled_profile"] = kernel_breakdown(graph.replay)
        outs[f"prefill_{b}x{q}_compiled_logits"] = gen.prefill(ids).float().clone()
        log(f"  prefill {b}x{q}, compiled: {ms:.2f} ms")
        progress(res)
        del gen
        torch._dynamo.reset()  # one static-shape compile per prompt size
    for b in compiled_batches:
        ids = torch.randint(0, VOCAB, (b, 512), device="cuda", generator=g)
        gen = StaticGenerator(model, b, 512 + max(decode_steps, 32) + 8, compile=True)
        gen.prefill(ids)
        t0 = time.perf_counter()
        tokens = [gen.step().clone() for _ in range(decode_steps)]  # compiles, then captures
        res[f"decode_b{b}_compiled_first_steps_s"] = time.perf_counter() - t0
        outs[f"decode_b{b}_compiled_tokens"] = torch.cat(tokens, dim=1)
        gen.prefill(ids)
        ms = time_graph(gen.step_graph(), iters=5, repeats=3)
        res[f"decode_b{b}_compiled_ms_per_step"] = ms
        res[f"decode_b{b}_compiled_tok_s"] = b / ms * 1e3
        log(f"  decode b={b}, compiled: {ms:.3f} ms/step")
        gen.prefill(ids)
        res[f"decode_b{b}_compiled_profile"] = kernel_breakdown(gen.step_graph().replay)
        progress(res)
        del gen
        torch._dynamo.reset()  # drop the compiled code (and its graphs) of this model
    return res, outs


def bench_e2e(layers: int, prune_all: bool, decode_steps: int) -> dict:
    t0 = time.perf_counter()
    model = build_model(layers, prune_all)
    log(f"model built and pruned in {time.perf_counter() - t0:.1f}s")
    dense_bytes = linear_bytes(model)
    ref = fp32_reference(model)
    log("dense timings")
    dense, dense_out = time_e2e(model, decode_steps)
    profiles = {"dense": profile_e2e(model)}
    gc.collect()
    torch.cuda.empty_cache()
    mem0 = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    # No dense copies kept (the default), so the weight memory is that of the 2:4 forms
    # alone; the report still lists the dense time of every bucket.
    report = sparsify(model, batch_sizes=[1, 16, 1024, 2048], plan_cache=False)
    log(f"{report}")
    gc.collect()
    torch.cuda.empty_cache()
    mem1 = torch.cuda.memory_allocated()
    sparse_bytes = linear_bytes(model)
    log("sparse timings")
    sparse, sparse_out = time_e2e(model, decode_steps)
    profiles["sparse"] = profile_e2e(model)
    result = {"dense": dense, "sparse": sparse, "speedup": {}, "correctness": {}}
    result["profiles"] = profiles
    for key, d in dense.items():
        if key.endswith("_ms") or key.endswith("_ms_per_step"):
            result["speedup"][key] = d / sparse[key]
    ref_fp32 = ref
    for key, ref in dense_out.items():
        got = sparse_out[key]
        if key.endswith("logits"):
            r32 = ref_fp32[key]
            result["correctness"][key] = {
                "rel_err_sparse_vs_dense_bf16": float((got - ref).norm() / ref.norm()),
                "rel_err_dense_bf16_vs_fp32": float((ref - r32).norm() / r32.norm()),
                "rel_err_sparse_bf16_vs_fp32": float((got - r32).norm() / r32.norm()),
                "top1_agree_sparse_vs_dense": float(
                    (got.argmax(-1) == ref.argmax(-1)).float().mean()
                ),
                "top1_agree_dense_vs_fp32": float(
                    (ref.argmax(-1) == r32.argmax(-1)).float().mean()
                ),
            }
        else:
            first = (got != ref).float().argmax(1)
            same = (got == ref).all(1)
            result["correctness"][key] = {
                "token_agree": float((got == ref).float().mean()),
                "first_divergence": [
                    int(f) if not s else None for f, s in zip(first, same, strict=True)
                ],
            }
    result["memory"] = {
        "linear_dense_bytes": dense_bytes,
        "linear_sparse_bytes": sparse_bytes,
        "ratio": sparse_bytes / dense_bytes,
        "cuda_allocated_before": mem0,
        "cuda_allocated_after": mem1,
    }
    result["report"] = report.to_dict()
    result["report_markdown"] = report.markdown(max_rows=8)
    result["layers"] = layers
    result["pruning"] = "per layer" if prune_all else "layer 0 + row permutations"
    return result


DECODE_BUCKETS = (1, 16, 64)  # every bucket <= 64 tokens: the mma.sp layout
DECODE_BATCHES = (1, 4, 16, 64)


def _agreement(dense_out: dict, sparse_out: dict) -> dict:
    out = {}
    for key, ref in dense_out.items():
        got = sparse_out[key]
        if key.endswith("logits"):
            out[key] = {
                "rel_err_vs_dense_bf16": float((got - ref).norm() / ref.norm()),
                "top1_agree": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
            }
        else:
            out[key] = {"token_agree": float((got == ref).float().mean())}
    return out


def bench_fusion(
    layers: int,
    decode_steps: int,
    buckets: tuple[int, ...],
    out: dict,
    path: Path,
    fuse_options: tuple[bool, ...] = (False, True),
    compiled_batches: tuple[int, ...] = (),
    decode_layout: bool = True,
    compiled_prefill: bool = False,
) -> dict:
    """Whole model, dense vs `sparsify` with and without fused siblings, with `buckets`
    (prefill sizes included: the cuSPARSELt layout) and with `DECODE_BUCKETS` (the mma.sp
    layout), on a copy of the same pruned model each, all under CUDA-graph replay:
    prefill 8x128 and 1x2048, decode at
    `DECODE_BATCHES` (KV 512), pruned-Linear bytes, agreement with dense, and the kernel
    time of one decode step at batch 1 by category. `fuse_options`: the `fuse_siblings`
    settings run (default both); `compiled_batches`: decode batches also timed compiled
    and `compiled_prefill` (see `time_e2e`); `decode_layout`: also run the `DECODE_BUCKETS`
    plans."""
    import copy
    import tempfile

    plan_dir = tempfile.mkdtemp(prefix="ria-plans-")
    model = build_model(layers, prune_all=False)
    dense_bytes = linear_bytes(model)
    log("fusion: dense timings")
    timings = dict(compiled_batches=compiled_batches, compiled_prefill=compiled_prefill)
    dense, dense_out = time_e2e(model, decode_steps, DECODE_BATCHES, **timings)
    result: dict = {"layers": layers, "dense": dense, "variants": {}}
    out["fusion"] = result
    variants = [
        (f"buckets {list(b)}, {'fused' if fuse else 'unfused'}", b, fuse)
        for b in ((DECODE_BUCKETS,) if decode_layout else ()) + (buckets,)  # decode layout first
        for fuse in fuse_options
    ]
    for label, plan_buckets, fuse in variants:
        twin = None
        try:
            twin = copy.deepcopy(model)
            t0 = time.perf_counter()
            report = sparsify(
                twin, batch_sizes=plan_buckets, fuse_siblings=fuse, plan_cache=plan_dir
            )
            seconds = time.perf_counter() - t0
            log(f"fusion: {label}: {report}")
            timed, sparse_out = time_e2e(twin, decode_steps, DECODE_BATCHES, **timings)
            speedup = {
                k: dense[k] / v for k, v in timed.items() if k.endswith(("_ms", "_ms_per_step"))
            }
            result["variants"][label] = {
                "buckets": list(plan_buckets),
                "fuse_siblings": fuse,
                "sparsify_s": seconds,
                "fused_groups": len(report.fused),
                "sparse": timed,
                "speedup": speedup,
                "linear_bytes_ratio": linear_bytes(twin) / dense_bytes,
                "agreement": _agreement(dense_out, sparse_out),
                "report": _report_per_shape(report.to_dict()),
            }
            log(f"fusion: {label}: " + ", ".join(f"{k} {v:.2f}x" for k, v in speedup.items()))
        except Exception:
            result["variants"][label] = {"error": traceback.format_exc()}
            log(result["variants"][label]["error"])
        del twin
        gc.collect()
        torch.cuda.empty_cache()
        path.write_text(json.dumps(out, indent=1, default=str))
    return result


def fusion_table(r: dict) -> str:
    cols = [("prefill_8x128_ms", "prefill 8x128"), ("prefill_1x2048_ms", "prefill 1x2048")]
    cols += [
        (k, f"prefill {k.split('_')[1]} compiled") for k in r["dense"] if k.endswith("_compiled_ms")
    ]
    cols += [(f"decode_b{b}_ms_per_step", f"decode b{b}") for b in DECODE_BATCHES]
    cols += [
        (k, f"decode b{k.split('_')[1][1:]} compiled")
        for k in r["dense"]
        if k.endswith("_compiled_ms_per_step")
    ]
    head = "| sparsify | " + " | ".join(c[1] for c in cols) + " | Linear bytes |"
    lines = [head, "|---|" + "---:|" * (len(cols) + 1)]
    d = r["dense"]
    lines.append("| dense (ms) | " + " | ".join(f"{d[k]:.2f}" for k, _ in cols) + " | 1.000x |")
    for label, v in r["variants"].items():
        if "error" in v:
            lines.append(f"| {label} | error |")
            continue
        cells = [f"{v['speedup'][k]:.2f}x" for k, _ in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {v['linear_bytes_ratio']:.3f}x |")
    return "\n".join(lines)


def _tok_s(fn, tokens: int, repeats: int = 1) -> tuple[float, float]:
    """(seconds, tokens/s) of the fastest of `repeats` calls of `fn`."""
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, tokens / best


def _allocated() -> int:
    gc.collect()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


USER_MODES = ("hf", "ria", "hf_compile", "ria_compile")


def _generation_speeds(model: torch.nn.Module, new_tokens: int, modes: set[str]) -> dict:
    """Generation speed on a 1x128 prompt, greedy, EOS off so every run makes `new_tokens`
    tokens, in each of `modes`: "hf" (transformers `model.generate` in its default mode:
    dynamic cache, eager; warmed with a whole run, best of 2), "ria" (`ria.generate`: static
    cache, CUDA graphs kept across calls; first and next call), "hf_compile"
    (`model.generate(cache_implementation="static", compile_config=CompileConfig(
    fullgraph=True))`: transformers compiles the decode step with inductor and CUDA graphs;
    first call, which compiles, and best of the next 2), "ria_compile" (`ria.generate(...,
    compile=True)`: the decode step compiled by inductor, then captured; first and next)."""
    from transformers import CompileConfig

    ids = torch.randint(3, VOCAB, (1, 128), device="cuda", generator=torch.Generator("cuda"))
    hf = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    hf["eos_token_id"] = None
    out: dict = {}
    with torch.no_grad():
        if "hf" in modes:
            model.generate(ids, **hf)  # warm: first calls set up kernels and the allocator
            out["hf_generate_s"], out["hf_generate_tok_s"] = _tok_s(
                lambda: model.generate(ids, **hf), new_tokens, repeats=2
            )
        for mode, compile_ in (("ria", False), ("ria_compile", True)):
            if mode not in modes:
                continue

            def run(compile_: bool = compile_) -> None:
                ria.generate(model, ids, new_tokens, eos_token_id=(), compile=compile_)

            key = "ria_generate" if mode == "ria" else "ria_generate_compiled"
            out[f"{key}_first_s"], out[f"{key}_first_tok_s"] = _tok_s(run, new_tokens)
            out[f"{key}_s"], out[f"{key}_tok_s"] = _tok_s(run, new_tokens, repeats=2)
            ria.sparse.clear_generators(model)  # frees the KV cache and graphs
        if "hf_compile" in modes:
            static = dict(hf, cache_implementation="static")
            static["compile_config"] = CompileConfig(fullgraph=True)
            out["hf_compiled_first_s"], _ = _tok_s(lambda: model.generate(ids, **static), 1)
            out["hf_compiled_s"], out["hf_compiled_tok_s"] = _tok_s(
                lambda: model.generate(ids, **static), new_tokens, repeats=2
            )
            torch._dynamo.reset()  # drop the compiled code (and its graphs) of this model
    return out


def _timed_us(fn, iters: int) -> float:
    """Eager microseconds per call (host or GPU, whichever is slower)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - t0) / iters


def _host_cost_us(model: torch.nn.Module) -> dict:
    """Eager microseconds per call of layer 0's q_proj and down_proj at M = 1, 64 and 128
    tokens (decode at batch 1, a decode batch, HF prefill of the 1x128 prompt): the module
    (`mod(x)`), and each backend alone, before (torch's `_CudaKernel` launch for mma.sp,
    `torch._cslt_sparse_mm`, which re-plans every call) and after (`MmaLaunch`: argument
    block built once; `CsltMatmul`: plan kept). Dense: `F.linear`. Where these exceed the
    GEMM's GPU time (7-30 us at M <= 128), the host is the bottleneck."""
    from ria.sparse import Compact24, Sparse24Linear
    from ria.sparse.cslt_lib import CsltMatmul
    from ria.sparse.mma_sp import MAX_TOKENS, MmaLaunch, mma24_linear

    out: dict = {}
    block = model.model.layers[0]
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        mod = block.get_submodule(name)
        if hasattr(mod, "group"):  # a fused sibling: time its group's layer
            mod = mod.group.linear
        rows: dict = {}
        for m in (1, 64, 128):
            x = torch.randn(1, m, mod.in_features, dtype=DTYPE, device="cuda")
            x2 = x.view(m, -1)
            calls = {"module": lambda mod=mod, x=x: mod(x)}
            if isinstance(mod, Sparse24Linear):
                calls["eager_plan"] = mod.choice_for(m, eager=True).backend
                if mod.values is not None:
                    calls["triton"] = lambda mod=mod, x2=x2: sparse24_linear(
                        x2, None, mod.bias, values=mod.values, meta=mod.meta,
                        in_features=mod.in_features, layout=mod.meta_layout,
                    )  # fmt: skip
                    if mod.meta_layout == "cslt" and m <= MAX_TOKENS:
                        frag = Compact24(mod.values, mod.meta, mod.in_features, "cslt")
                        calls["mma_cslt_before"] = lambda f=frag, x2=x2, mod=mod: mma24_linear(
                            x2, f, mod.bias
                        )
                        launch = MmaLaunch(frag, mod.bias, m)
                        calls["mma_cslt_after"] = lambda ln=launch, x2=x2: ln(x2)
                if mod.packed is not None:
                    calls["cusparselt_before"] = lambda mod=mod, x2=x2: cslt_linear(
                        x2, mod.packed, mod.bias
                    )
                    matmul = CsltMatmul(mod.packed, mod.out_features, mod.in_features, mod.bias)
                    calls["cusparselt_after"] = lambda mm=matmul, x2=x2: mm(x2)
            else:
                calls["F.linear"] = lambda mod=mod, x=x: F.linear(x, mod.weight)
            row = {}
            with torch.no_grad():
                for label, fn in calls.items():
                    if isinstance(fn, str):
                        row[label] = fn
                    else:
                        row[label] = _timed_us(fn, 50 if "before" in label else 200)
            rows[f"M={m}"] = row
        out[name] = rows
    return out


def _report_per_shape(report: dict) -> dict:
    """The report with one converted layer per shape (layers of a shape share plan and
    timings), the others counted."""
    shapes: dict[str, dict] = {}
    for lr in report["layers"]:
        key = f"{lr['out_features']}x{lr['in_features']}" if lr["converted"] else lr["reason"]
        shapes.setdefault(key, {**lr, "count": 0})["count"] += 1
    return {**{k: v for k, v in report.items() if k != "layers"}, "layers_per_shape": shapes}


def bench_user(
    layers: int, new_tokens: int, modes: set[str], out: dict | None = None, path: Path | None = None
) -> dict:
    """The user's path with default arguments (see the module docstring); `modes` picks
    the generation modes (`USER_MODES`) and "cached" the second, cached `sparsify`. With
    `out` and `path`, the partial result is written after each stage."""
    import tempfile

    result: dict = {"layers": layers, "new_tokens": new_tokens, "modes": sorted(modes)}

    def save() -> None:
        if out is not None and path is not None:
            out["user"] = result
            path.write_text(json.dumps(out, indent=1, default=str))

    plan_dir = tempfile.mkdtemp(prefix="ria-plans-")
    model = build_model(layers, prune_all=False)
    mem = {"dense": _allocated()}
    result["memory"] = mem
    log(f"user: dense model {mem['dense'] / 2**30:.2f} GiB allocated")
    result["dense"] = {"host_us": _host_cost_us(model)}
    save()
    result["dense"].update(_generation_speeds(model, new_tokens, modes))
    log(f"user: dense {result['dense']}")
    save()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    report = sparsify(model, plan_cache=plan_dir)
    result["sparsify_cold_s"] = time.perf_counter() - t0
    mem["sparsify_peak"] = torch.cuda.max_memory_allocated()
    mem["sparse"] = _allocated()
    result["memory_ratio"] = mem["sparse"] / mem["dense"]
    log(f"user: {report}")
    result["report"] = _report_per_shape(report.to_dict())
    result["report_markdown"] = report.markdown(max_rows=7)
    result["linear_bytes"] = {"dense": report.dense_bytes, "sparse": report.sparse_bytes}
    result["sparse"] = {"host_us": _host_cost_us(model)}
    save()
    result["sparse"].update(_generation_speeds(model, new_tokens, modes))
    log(f"user: sparse {result['sparse']}")
    d, sp = result["dense"], result["sparse"]
    result["speedup"] = {k: sp[k] / d[k] for k in sp if k.endswith("tok_s") and k in d}
    save()
    del model, report
    if "cached" in modes:
        gc.collect()
        torch.cuda.empty_cache()
        model = build_model(layers, prune_all=False)
        t0 = time.perf_counter()
        again = sparsify(model, plan_cache=plan_dir)
        result["sparsify_cached_s"] = time.perf_counter() - t0
        result["plans_from_cache"] = [again.plans_from_cache, len(again.converted)]
        log(f"user: cached {again}")
    return result


USER_ROWS = [
    ("hf_generate_tok_s", "HF model.generate, default mode (dynamic cache, eager) (tok/s)"),
    ("hf_compiled_tok_s", "HF model.generate, static cache + its compile (tok/s)"),
    ("ria_generate_first_tok_s", "ria.generate, first call (tok/s)"),
    ("ria_generate_tok_s", "ria.generate, next calls (tok/s)"),
    ("ria_generate_compiled_tok_s", "ria.generate(compile=True), next calls (tok/s)"),
]


def user_table(r: dict) -> str:
    d, s, m = r["dense"], r["sparse"], r["memory"]
    rows = [
        "| with default arguments | dense | 2:4 | ratio |",
        "|---|---:|---:|---:|",
        f"| GPU memory allocated (GiB) | {m['dense'] / 2**30:.2f} | {m['sparse'] / 2**30:.2f} | "
        f"{r['memory_ratio']:.3f}x |",
        f"| pruned-Linear weights (GiB) | {r['linear_bytes']['dense'] / 2**30:.2f} | "
        f"{r['linear_bytes']['sparse'] / 2**30:.2f} | "
        f"{r['linear_bytes']['sparse'] / r['linear_bytes']['dense']:.3f}x |",
    ]
    for key, label in USER_ROWS:
        if key in d and key in s:
            rows.append(f"| {label} | {d[key]:.1f} | {s[key]:.1f} | {s[key] / d[key]:.2f}x |")
    cached = r.get("sparsify_cached_s")
    cached_text = "" if cached is None else f" / {cached:.1f}"
    rows.append(
        f"| sparsify cold / with its plan cache (s) | | {r['sparsify_cold_s']:.1f}{cached_text} | |"
    )
    return "\n".join(rows)


def e2e_table(r: dict) -> str:
    d, s, sp = r["dense"], r["sparse"], r["speedup"]
    out = ["| workload | dense | sparse | speedup |", "|---|---|---|---|"]
    for b, q in [(8, 128), (1, 2048)]:
        k = f"prefill_{b}x{q}_ms"
        out.append(f"| prefill {b}x{q} (ms) | {d[k]:.2f} | {s[k]:.2f} | {sp[k]:.2f}x |")
    for b in (1, 16):
        k = f"decode_b{b}_ms_per_step"
        t = f"decode_b{b}_tok_s"
        out.append(f"| decode batch {b}, KV 512 (tok/s) | {d[t]:.1f} | {s[t]:.1f} | {sp[k]:.2f}x |")
    m = r["memory"]
    out.append(
        f"| pruned-Linear weights (GiB) | {m['linear_dense_bytes'] / 2**30:.2f} | "
        f"{m['linear_sparse_bytes'] / 2**30:.2f} | {m['ratio']:.3f}x |"
    )
    return "\n".join(out)


def environment() -> dict:
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cusparselt": cusparselt_version(),
        "triton": triton_version,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def default_results_path(stem: str) -> str:
    """`benches/results/{stem}_{card}.json`, `card` the running GPU's model ("h100", "h200";
    "cpu" without CUDA), so a default run never overwrites another card's figures."""
    card = "cpu"
    if torch.cuda.is_available():  # "NVIDIA H100 80GB HBM3" -> h100; "...A100-SXM4-80GB" -> a100
        words = re.findall(r"[a-z0-9]+", torch.cuda.get_device_name().lower())
        card = next((w for w in words if any(c.isdigit() for c in w)), "gpu")
    return f"benches/results/{stem}_{card}.json"


def run_section(
    name: str, body: Callable[[], str | None], out: dict, path: Path, tables: list[str]
) -> None:
    """Runs one bench section: `body` fills `out` and returns its markdown table (or None);
    a failure is logged and kept as `out[name + "_error"]`, so the other sections still run.
    Writes `out` to `path` (JSON) afterwards either way."""
    try:
        table = body()
        if table is not None:
            tables.append(table)
    except Exception:
        out[f"{name}_error"] = traceback.format_exc()
        log(out[f"{name}_error"])
    path.write_text(json.dumps(out, indent=1, default=str))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--only", default="gemm,e2e,user", help="comma list of: gemm, probe, e2e, fusion, user"
    )
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens per generate call (user)")
    ap.add_argument(
        "--user-modes",
        default=",".join((*USER_MODES, "cached")),
        help="user section: comma list of generation modes (hf, ria, hf_compile, ria_compile) "
        "and 'cached' (the second sparsify, from its plan cache)",
    )
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument("--m", default=",".join(map(str, GEMM_MS)), help="GEMM token counts")
    ap.add_argument("--prune-all", action="store_true", help="prune every layer with ria")
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument(
        "--fusion-buckets",
        default=",".join(map(str, DEFAULT_BATCH_SIZES)),
        help="sparsify buckets of the fusion section's prefill-capable plans",
    )
    ap.add_argument(
        "--fusion-fuse",
        choices=("both", "off", "on"),
        default="both",
        help="fusion section: fuse_siblings settings to run",
    )
    ap.add_argument(
        "--fusion-compiled",
        default="",
        help="fusion section: decode batches also timed with the step compiled (e.g. 1,16)",
    )
    ap.add_argument(
        "--fusion-compiled-prefill",
        action="store_true",
        help="fusion section: prefills also timed with the model call compiled",
    )
    ap.add_argument(
        "--fusion-no-decode-layout",
        action="store_true",
        help="fusion section: skip the decode-only buckets' plans",
    )
    ap.add_argument("--out", default=None, help="default: benches/results/gpu_<card>.json")
    args = ap.parse_args()
    only = set(args.only.split(","))
    out: dict = {"env": environment(), "command": " ".join(__import__("sys").argv)}
    out["date_utc"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    out["copy_GBps"] = copy_bandwidth()
    log(f"{out['env']}; D2D copy {out['copy_GBps']:.0f} GB/s")
    tables = []
    path = Path(args.out or default_results_path("gpu"))
    path.parent.mkdir(parents=True, exist_ok=True)

    def gemm() -> str:
        out["gemm"] = bench_gemm([int(m) for m in args.m.split(",")])
        return "### Per GEMM (bf16, CUDA-graph replay)\n\n" + gemm_table(out["gemm"])

    def probe() -> None:
        dump_cslt_layout(path.parent / "cslt_layout.pt")

    def e2e() -> str:
        out["e2e"] = bench_e2e(args.layers, args.prune_all, args.decode_steps)
        return (
            f"### End to end, LLaMA-2-7B shapes, {args.layers} layers\n\n"
            + e2e_table(out["e2e"])
            + "\n\ncorrectness: "
            + json.dumps(out["e2e"]["correctness"])
            + "\n\n"
            + out["e2e"]["report_markdown"]
        )

    def fusion() -> str:
        buckets = tuple(int(b) for b in args.fusion_buckets.split(","))
        fuse = {"both": (False, True), "off": (False,), "on": (True,)}[args.fusion_fuse]
        compiled = tuple(int(b) for b in args.fusion_compiled.split(",") if b)
        bench_fusion(
            args.layers,
            args.decode_steps,
            buckets,
            out,
            path,
            fuse,
            compiled_batches=compiled,
            decode_layout=not args.fusion_no_decode_layout,
            compiled_prefill=args.fusion_compiled_prefill,
        )
        return (
            f"### Fused siblings and layouts, LLaMA-2-7B shapes, {args.layers} layers "
            "(speedup over dense)\n\n" + fusion_table(out["fusion"])
        )

    def user() -> str:
        modes = set(args.user_modes.split(","))
        out["user"] = bench_user(args.layers, args.new_tokens, modes, out, path)
        return (
            f"### With default arguments, LLaMA-2-7B shapes, {args.layers} layers\n\n"
            + user_table(out["user"])
        )

    sections = {"gemm": gemm, "probe": probe, "e2e": e2e, "fusion": fusion, "user": user}
    for name, body in sections.items():
        if name in only:
            run_section(name, body, out, path, tables)
    log(f"wrote {path}")
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
