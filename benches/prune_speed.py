"""Wall time of `ria.prune(..., sparsity="2:4", permute=...)` on a LLaMA-2-7B-shaped
model (random bf16 weights) on one GPU, stage by stage, then `ria.sparsify` on the
result (the permuted model must convert and compute the same logits).

    python benches/prune_speed.py                      # 32 layers, 128 x 2048 tokens
    python benches/prune_speed.py --layers 2 --nsamples 8   # a quick check
    python benches/prune_speed.py --layers 8 --refine   # what mask refinement adds
    python benches/prune_speed.py --layers 4 --refine --reconstruct   # + OBS update and refit
    python benches/prune_speed.py --nproc 4 --no-sparsify   # split over 4 GPUs (torchrun)
    python benches/prune_speed.py --shape 70b --layers 4 --nproc 8 --no-sparsify
    python benches/prune_speed.py --nproc 1,2 --device cpu --shape tiny   # side by side

With `--nproc N` the bench launches itself N times through torchrun (NCCL, one GPU per
rank; gloo with `--device cpu`) and `ria.prune` splits each block's work over the ranks
(ria.pruning.distributed); the stages are rank 0's, `wall_seconds` the slowest rank's,
and `ranks` holds every rank's stage times and peak host memory (`VmHWM`). With
`--load streamed` rank 0 writes its model as a checkpoint and the other ranks read each
block from it when they visit it, as `ria prune` does under torchrun; `--load whole`
(the default): every rank builds the whole model, as a caller of `ria.prune` does. A list
(`--nproc 1,2`) runs each count in turn and prints every rank's stage times side by side.
Writes benches/results/prune_<device>[_xN].json. Calibration windows are random token
ids: the weights are random, so real text would measure nothing more.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, LlamaConfig

import ria
from ria.pruning import PruneConfig, prune_with
from ria.pruning.distributed import launched
from ria.streaming import read_by_block

RESULTS = Path(__file__).parent / "results"
GIB = 2**30
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
    parser.add_argument("--permute", default="folded", choices=["folded", "free", "none"])
    parser.add_argument("--refine", action="store_true", help="ria.prune(refine=True)")
    parser.add_argument(
        "--reconstruct", action="store_true", help="ria.prune(reconstruct=True): OBS + refit"
    )
    parser.add_argument("--tag", default="", help="suffix of the JSON file name")
    parser.add_argument(
        "--no-sparsify", action="store_true", help="skip the sparsify check (times pruning only)"
    )
    parser.add_argument(
        "--nproc", default="1", help="processes (GPUs) to split over, or a list: 1,2,4"
    )
    parser.add_argument(
        "--load",
        default="whole",
        choices=["whole", "streamed"],
        help="ranks other than 0 build the whole model, or read its blocks from a checkpoint",
    )
    parser.add_argument("--device", default="cuda", help="cuda, or cpu (gloo) to check the bench")
    args = parser.parse_args()
    counts = [int(n) for n in args.nproc.split(",")]
    if len(counts) > 1:
        side_by_side(counts)
        return
    if counts[0] > 1 and "WORLD_SIZE" not in os.environ:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command = [*launcher, "--nproc-per-node", str(counts[0]), *_without_nproc(sys.argv)]
        os.execv(sys.executable, command)  # every rank runs this script again
    args.nproc = int(os.environ.get("WORLD_SIZE", "1"))
    with launched(torch.device(args.device)) as device:
        run(args, device)


def side_by_side(counts: list[int]) -> None:
    """Runs the bench once per process count (each in a child, writing its JSON into a
    temporary directory) and prints every rank's stage seconds in one table."""
    results = []
    with tempfile.TemporaryDirectory() as out:
        for n in counts:
            argv = [*_without_nproc(sys.argv), "--nproc", str(n)]
            subprocess.run([sys.executable, *argv], check=True, env={**os.environ, "OUT": out})
            (path,) = Path(out).glob("prune_*.json")
            results.append(json.loads(path.read_text()))
            path.unlink()
    columns = [(r["nproc"], rank) for r in results for rank in range(r["nproc"])]
    per_rank = {(r["nproc"], i): x for r in results for i, x in enumerate(r["ranks"])}
    stages = list(dict.fromkeys(s for x in per_rank.values() for s in x["stage_seconds"]))
    print("seconds per stage, per rank (nproc/rank)")
    print(f"{'':14}" + "".join(f"{f'{n}/{rank}':>9}" for n, rank in columns))
    for stage in [*stages, "prune"]:
        row = [
            per_rank[c]["prune_seconds"]
            if stage == "prune"
            else per_rank[c]["stage_seconds"].get(stage, 0.0)
            for c in columns
        ]
        print(f"{stage:14}" + "".join(f"{v:9.2f}" for v in row))
    rss = [per_rank[c]["peak_host_rss_bytes"] / GIB for c in columns]
    print(f"{'peak RSS GiB':14}" + "".join(f"{v:9.2f}" for v in rss))
    for r in results:
        print(f"nproc {r['nproc']}: wall {r['wall_seconds']:.2f} s (slowest rank)")


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


def peak_rss_bytes() -> int:
    """This process's own peak resident memory (`ru_maxrss` would count what Linux carries
    over from the parent across fork and exec)."""
    with open("/proc/self/status") as status:
        line = next(x for x in status if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def run(args: argparse.Namespace, device: torch.device) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(0)  # every rank builds the same weights
    t0 = time.perf_counter()
    on = device if device.type == "cuda" else torch.device("cpu")
    with ExitStack() as stack:
        placement = None
        if args.load == "streamed" and args.nproc > 1:
            # Rank 0 writes the checkpoint the others read (a directory every rank sees).
            name = [tempfile.mkdtemp(prefix="ria_prune_speed_") if rank == 0 else None]
            dist.broadcast_object_list(name)
            checkpoint = Path(str(name[0]))
            if rank == 0:
                stack.callback(shutil.rmtree, checkpoint, True)
                model = llama(args.shape, args.layers, on)
                model.save_pretrained(checkpoint)
            dist.barrier()
            if rank != 0:
                model, placement = read_by_block(checkpoint, "bfloat16", device)
        else:
            model = llama(args.shape, args.layers, on)
        build = time.perf_counter() - t0
        report, wall = prune(args, model, placement, device, rank)
    ranks: list[Any] = [ranks_entry(report)]
    if dist.is_initialized():
        ranks = [None] * args.nproc
        dist.all_gather_object(ranks, ranks_entry(report))
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
        "load": args.load,
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
        "wall_seconds": wall,
        "stage_seconds": report.stage_seconds,
        "ranks": ranks,
        "mean_efficacy": report.mean_efficacy,
        "mean_output_error": report.mean_output_error,
        "peak_host_rss_bytes": peak_rss_bytes(),
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


def ranks_entry(report: Any) -> dict[str, Any]:
    """What every rank reports of itself: its stage seconds and peak host memory."""
    return {
        "stage_seconds": report.stage_seconds,
        "prune_seconds": report.total_seconds,
        "peak_host_rss_bytes": peak_rss_bytes(),
    }


def prune(
    args: argparse.Namespace,
    model: torch.nn.Module,
    placement: Any,
    device: torch.device,
    rank: int,
) -> tuple[Any, float]:
    """`ria.prune` with the bench's settings (through `prune_with` to give the streamed
    ranks their placement); returns the report and the slowest rank's wall seconds."""
    windows = torch.randint(0, 32000, (args.nsamples, args.seqlen))
    config = PruneConfig(
        sparsity=ria.Sparsity.parse("2:4"), method=args.method,
        permute=False if args.permute == "none" else args.permute, refine=args.refine,
        reconstruct=args.reconstruct,
        calibration=windows, nsamples=args.nsamples, seqlen=args.seqlen, device=device,
        progress=rank == 0,
    )  # fmt: skip
    if dist.is_initialized():
        dist.barrier()  # time the prune alone, not the slowest rank's start
    t0 = time.perf_counter()
    report = prune_with(model, None, config, placement)  # type: ignore[arg-type]
    wall = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    if dist.is_initialized():
        wall = wall.to(device)
        dist.all_reduce(wall, op=dist.ReduceOp.MAX)
    return report, float(wall.item())


if __name__ == "__main__":
    main()
