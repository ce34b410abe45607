"""What free channel orders cost at run time: the same sparsified 7B-shaped model timed
without and with an input order on q/k/v/o/gate/up (what `ria.prune(permute="free")`
gives; down's order is folded into gate/up rows, so it has none), under CUDA-graph replay,
beside the dense model. Two layouts: `sparsify`'s default buckets (1 .. 1024 tokens: the
cuSPARSELt layout), and decode-only buckets (1, 16, 64: the mma.sp decode kernel's layout).

A layer with an order gathers its input (`x[..., order]`) before its kernel, unless the
kernel chosen for that token count reads its input through the order itself.

Timing only: the orders here are random, so the function differs from the unordered
model's; correctness of gathered layers is tested in tests/test_sparse.py.

Usage: python benches/gather_cost.py [--layers 32] [--out benches/results/gather_cost_h200.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from gpu_speed import VOCAB, build_model, environment, log

from ria.sparse import Sparse24Linear, StaticGenerator, sparsify
from ria.sparse.graphs import time_graph

GATHERED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")


def time_workloads(model: torch.nn.Module, prefill: bool = True) -> dict[str, float]:
    """Prefill 8x128 (ms) and decode batch 1 with a 512-token cache (ms per token)."""
    g = torch.Generator(device="cuda").manual_seed(7)
    out = {}
    if prefill:
        ids = torch.randint(0, VOCAB, (8, 128), device="cuda", generator=g)
        gen = StaticGenerator(model, 8, 128)
        gen.prefill(ids)
        out["prefill_8x128_ms"] = time_graph(gen.prefill_graph(128), iters=10, repeats=3)
        del gen
    ids = torch.randint(0, VOCAB, (1, 512), device="cuda", generator=g)
    # Room for the capturing step and 1 + 5 * 3 timed replays, each one token further.
    gen = StaticGenerator(model, 1, 512 + 64)
    gen.prefill(ids)
    gen.step()  # captures the step
    gen.prefill(ids)  # rewinds the cache position
    out["decode_b1_ms_per_token"] = time_graph(gen.step_graph(), iters=5, repeats=3)
    return out


def set_orders(model: torch.nn.Module, on: bool) -> int:
    """Gives every q/k/v/o/gate/up `Sparse24Linear` a random input order (or removes it)."""
    g = torch.Generator(device="cuda").manual_seed(3)
    count = 0
    for name, mod in model.named_modules():
        if isinstance(mod, Sparse24Linear) and name.rsplit(".", 1)[-1] in GATHERED:
            order = torch.randperm(mod.in_features, generator=g, device="cuda") if on else None
            mod.input_order = order
            count += 1
    return count


def layout_run(layers: int, buckets: list[int], prefill: bool) -> dict:
    """Dense, then sparsified with `buckets`, plain and with orders, then plain again."""
    t0 = time.perf_counter()
    model = build_model(layers, prune_all=False)
    dense = time_workloads(model, prefill)
    report = sparsify(model, batch_sizes=buckets)
    log(f"built, timed dense, sparsified in {time.perf_counter() - t0:.1f}s")
    plain = time_workloads(model, prefill)
    gathered_layers = set_orders(model, True)
    gathered = time_workloads(model, prefill)
    set_orders(model, False)
    again = time_workloads(model, prefill)  # how much timings drift
    del model
    torch.cuda.empty_cache()
    return {
        "buckets": buckets,
        "gathered_layers": gathered_layers,
        "plans": {r.name.rsplit(".", 1)[-1]: r.plan for r in report.layers[:7]},
        "dense": dense,
        "plain": plain,
        "gathered": gathered,
        "plain_again": again,
        "cost_of_orders": {k: gathered[k] / plain[k] - 1 for k in plain},
        "sparse_speedup": {k: dense[k] / plain[k] for k in plain},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--out", default="benches/results/gather_cost_h200.json")
    args = ap.parse_args()
    result = {"env": environment(), "layers": args.layers}
    result["default_layout"] = layout_run(args.layers, [1, 16, 1024], prefill=True)
    result["decode_layout"] = layout_run(args.layers, [1, 16, 64], prefill=False)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("| layout, workload | dense | 2:4 | 2:4 + free orders | cost of orders |")
    print("|---|---:|---:|---:|---:|")
    for layout in ("default_layout", "decode_layout"):
        r = result[layout]
        for k in r["plain"]:
            print(
                f"| {layout}, {k} | {r['dense'][k]:.3f} | {r['plain'][k]:.3f} | "
                f"{r['gathered'][k]:.3f} | {100 * r['cost_of_orders'][k]:+.1f}% |"
            )


if __name__ == "__main__":
    main()
