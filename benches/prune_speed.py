"""Wall time of `ria.prune(..., sparsity="2:4", permute=...)` on a LLaMA-2-7B-shaped
model (random bf16 weights) on one GPU, stage by stage, then `ria.sparsify` on the
result (the permuted model must convert and compute the same logits).

    python benches/prune_speed.py                      # 32 layers, 128 x 2048 tokens
    python benches/prune_speed.py --layers 2 --nsamples 8   # a quick check
    python benches/prune_speed.py --layers 8 --refine   # what mask refinement adds
    python benches/prune_speed.py --layers 4 --refine --reconstruct   # + OBS update and refit
    python benches/prune_speed.py --nproc 4 --no-sparsify   # split over 4 GPUs (torchrun)
    python benches/prune_speed.py --shape 70b --layers 4 --nproc 8 --no-sparsify

With `--nproc N` the bench launches itself N times through torchrun (NCCL, one GPU per
rank; gloo with `--device cpu`) and `ria.prune` splits each block's work over the ranks
(ria.pruning.distributed); the stages are rank 0's, `wall_seconds` the slowest rank's.
Writes benches/results/prune_<device>[_xN].json. Calibration windows are random token
ids: the weights are random, so real text would measure nothing more.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, LlamaConfig

import ria
from ria.pruning.distributed import launched

RESULTS = Path(__file__).parent / "results"
# LLaMA-2-7B, LLaMA-2-70B (grouped-query attention) and a tiny shape to check the bench
# runs (on the CPU too).
SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
               num_key_value_heads=32),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                num_key_value_heads=8),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                 num_key_value_heads=4),
}  # fmt: skip


def llama(shape: str, layers: int, device: torch.device) -> torch.nn.Module:
    config = LlamaConfig(
        **SHAPES[shape], num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=4096
    )
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="7b", choices=list(SHAPES))
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--method", default="ria")
    parser.add_argument("--permute", default="folded", choices=["folded", "free"])
    parser.add_argument("--refine", action="store_true", help="ria.prune(refine=True)")
    parser.add_argument(
        "--reconstruct", action="store_true", help="ria.prune(reconstruct=True): OBS + refit"
    )
    parser.add_argument("--tag", default="", help="suffix of the JSON file name")
    parser.add_argument(
        "--no-sparsify", action="store_true", help="skip the sparsify check (times pruning only)"
    )
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) to split over")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu (gloo) to check the bench")
    args = parser.parse_args()
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command = [*launcher, "--nproc-per-node", str(args.nproc), *_without_nproc(sys.argv)]
        os.execv(sys.executable, command)  # every rank runs this script again
    args.nproc = int(os.environ.get("WORLD_SIZE", "1"))
    with launched(torch.device(args.device)) as device:
        run(args, device)


def _without_nproc(argv: list[str]) -> list[str]:
    """`argv` without `--nproc N` (torchrun would take it for its own `--nproc-per-node`)."""
    out, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--nproc="):
            skip = False
        elif arg == "--nproc":
            skip = True
        else:
            out.append(arg)
    return out


def run(args: argparse.Namespace, device: torch.device) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(0)  # every rank builds the same weights
    t0 = time.perf_counter()
    model = llama(args.shape, args.layers, device if device.type == "cuda" else torch.device("cpu"))
    build = time.perf_counter() - t0
    windows = torch.randint(0, 32000, (args.nsamples, args.seqlen))
    if dist.is_initialized():
        dist.barrier()  # time the prune alone, not the slowest rank's start
    t0 = time.perf_counter()
    report = ria.prune(
        model, None, sparsity="2:4", method=args.method, permute=args.permute,
        refine=args.refine, reconstruct=args.reconstruct, calibration=windows,
        nsamples=args.nsamples, seqlen=args.seqlen,
        device=device, progress=rank == 0,
    )  # fmt: skip
    wall = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    if dist.is_initialized():
        wall = wall.to(device)
        dist.all_reduce(wall, op=dist.ReduceOp.MAX)
    if rank != 0:
        return
    print(report)

    converted, sparsify_seconds, rel_err = None, None, None
    if not args.no_sparsify and device.type == "cuda":
        ids = torch.randint(0, 32000, (1, 128), device=device)
        with torch.no_grad():
            ref = model(ids).logits.float()
        sparse = ria.sparsify(model, batch_sizes=[1, 16, 128])
        with torch.no_grad():
            out = model(ids).logits.float()
        rel_err = float((out - ref).norm() / ref.norm())
        converted, sparsify_seconds = len(sparse.converted), sparse.seconds
        print(f"sparsify: {converted} layers converted, logits rel. error {rel_err:.4f}")

    cuda = device.type == "cuda"
    result = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "cpu_cores": os.cpu_count(),
        "nproc": args.nproc,
        "shape": args.shape,
        "layers": args.layers,
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "method": args.method,
        "permute": args.permute,
        "refine": args.refine,
        "reconstruct": args.reconstruct,
        "model_build_seconds": build,
        "prune_seconds": report.total_seconds,
        "wall_seconds": float(wall.item()),
        "stage_seconds": report.stage_seconds,
        "mean_efficacy": report.mean_efficacy,
        "mean_output_error": report.mean_output_error,
        "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_gpu_allocated_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
        "refine_swaps": sum((r.refinement or {}).get("swaps", 0) for r in report.layers),
        "sparsity": report.sparsity,
        "sparsify_converted": converted,
        "sparsify_seconds": sparsify_seconds,
        "logits_rel_error_after_sparsify": rel_err,
    }
    name = result["device"].split()[-1].lower() + (f"_x{args.nproc}" if args.nproc > 1 else "")
    out_dir = Path(os.environ.get("OUT", RESULTS))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"prune_{name}{args.tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
