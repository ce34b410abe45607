"""What channel orders cost at run time: the same sparsified 7B-shaped model timed without
orders, with folded orders and with free orders, under CUDA-graph replay (and the decode
step compiled, as `ria.generate(compile=True)` runs it), beside the dense model.

- folded (`ria.prune(permute=True)`): per block, one order shared by q/k/v and one by
  gate/up, each applied by a `ChannelGather` on the norm before them (o_proj's and
  down_proj's orders fold into weight rows and cost nothing);
- free (`permute="free"`): an input order on each of q/k/v/o/gate/up, gathered before its
  kernel unless the kernel chosen for that token count reads its input through the order.

Two layouts: `sparsify`'s default buckets (cuSPARSELt's buffer, prefill and decode), and
decode-only buckets (1, 16, 64: the mma.sp layout). Timing only: the orders are random, so
the function differs from the unordered model's; correctness of gathered layers is tested
in tests/test_sparse.py and tests/test_prune.py.

Usage: python benches/gather_cost.py [--layers 32] [--out benches/results/gather_cost_<card>.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from gpu_speed import build_model, default_results_path, environment, log, time_e2e

from ria.permutation import ChannelGather
from ria.sparse import DEFAULT_BATCH_SIZES, Sparse24Linear, sparsify

FREE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")
# The norms whose output a folded order reorders, and the modules reading it (LLaMA).
FOLDED = {
    "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
}


def timings(model: torch.nn.Module, prefill: bool) -> dict[str, float]:
    """Prefill 8x128 (ms) if `prefill`, decode batch 1 and 16 with a 512-token cache (ms per
    step), batch 1 also compiled: `gpu_speed.time_e2e`'s timings."""
    res, _ = time_e2e(
        model,
        decode_steps=8,
        decode_batches=(1, 16),
        prefills=((8, 128),) if prefill else (),
        compiled_batches=(1,),
    )
    return {k: v for k, v in res.items() if k.endswith(("_ms", "_ms_per_step"))}


def set_free_orders(model: torch.nn.Module, on: bool) -> int:
    """Gives every q/k/v/o/gate/up `Sparse24Linear` a random input order (or removes it)."""
    g = torch.Generator().manual_seed(3)
    count = 0
    for name, mod in model.named_modules():
        if isinstance(mod, Sparse24Linear) and name.rsplit(".", 1)[-1] in FREE:
            order = torch.randperm(mod.in_features, generator=g) if on else None
            mod.input_order = None if order is None else order.cuda()
            count += 1
    return count


def set_folded_orders(model: torch.nn.Module, on: bool) -> int:
    """Wraps each block's two norms in a `ChannelGather` with a random order (or unwraps
    them); returns the gathers installed."""
    g = torch.Generator().manual_seed(5)
    count = 0
    for layer in model.model.layers:
        for norm_name, readers in FOLDED.items():
            norm = getattr(layer, norm_name)
            if on:
                order = torch.randperm(norm.weight.numel(), generator=g)
                setattr(layer, norm_name, ChannelGather(norm, order.cuda(), readers))
                count += 1
            elif isinstance(norm, ChannelGather):
                setattr(layer, norm_name, norm.norm)
    return count


def layout_run(layers: int, buckets: tuple[int, ...], prefill: bool) -> dict:
    """Dense, then sparsified with `buckets`: no orders, folded, free, no orders again."""
    t0 = time.perf_counter()
    model = build_model(layers, prune_all=False)
    dense = timings(model, prefill)
    report = sparsify(model, batch_sizes=list(buckets))
    log(f"built, timed dense, sparsified in {time.perf_counter() - t0:.1f}s")
    plain = timings(model, prefill)
    folded_gathers = set_folded_orders(model, True)
    folded = timings(model, prefill)
    set_folded_orders(model, False)
    free_layers = set_free_orders(model, True)
    free = timings(model, prefill)
    set_free_orders(model, False)
    again = timings(model, prefill)  # how much timings drift
    del model
    torch.cuda.empty_cache()
    return {
        "buckets": list(buckets),
        "free_gathered_layers": free_layers,
        "folded_gathers": folded_gathers,
        "plans": {r.name.rsplit(".", 1)[-1]: r.plan for r in report.layers[:7]},
        "dense": dense,
        "plain": plain,
        "folded": folded,
        "free": free,
        "plain_again": again,
        "cost_of_folded": {k: folded[k] / plain[k] - 1 for k in plain},
        "cost_of_free": {k: free[k] / plain[k] - 1 for k in plain},
        "sparse_speedup": {k: dense[k] / plain[k] for k in plain},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--out", default=None, help="default: benches/results/gather_cost_<card>.json")
    args = ap.parse_args()
    result = {"env": environment(), "command": " ".join(__import__("sys").argv)}
    result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    result["layers"] = args.layers
    result["default_layout"] = layout_run(args.layers, DEFAULT_BATCH_SIZES, prefill=True)
    result["decode_layout"] = layout_run(args.layers, (1, 16, 64), prefill=False)
    path = Path(args.out or default_results_path("gather_cost"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print("| layout, workload | dense | 2:4 | 2:4 + folded | 2:4 + free | folded | free |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for layout in ("default_layout", "decode_layout"):
        r = result[layout]
        for k in r["plain"]:
            print(
                f"| {layout}, {k} | {r['dense'][k]:.3f} | {r['plain'][k]:.3f} | "
                f"{r['folded'][k]:.3f} | {r['free'][k]:.3f} | "
                f"{100 * r['cost_of_folded'][k]:+.1f}% | {100 * r['cost_of_free'][k]:+.1f}% |"
            )


if __name__ == "__main__":
    main()
