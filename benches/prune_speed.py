"""Wall time of `ria.prune(..., sparsity="2:4", permute=...)` on a LLaMA-2-7B-shaped
model (random bf16 weights) on one GPU, stage by stage, then `ria.sparsify` on the
result (the permuted model must convert and compute the same logits).

    python benches/prune_speed.py                      # 32 layers, 128 x 2048 tokens
    python benches/prune_speed.py --layers 2 --nsamples 8   # a quick check
    python benches/prune_speed.py --layers 8 --refine   # what mask refinement adds

Writes benches/results/prune_<device>.json. Calibration windows are random token ids:
the weights are random, so real text would measure nothing more.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import ria

RESULTS = Path(__file__).parent / "results"


def llama7b(layers: int) -> torch.nn.Module:
    config = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
        num_key_value_heads=32, num_hidden_layers=layers, vocab_size=32000,
        max_position_embeddings=4096,
    )  # fmt: skip
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--method", default="ria")
    parser.add_argument("--permute", default="folded", choices=["folded", "free"])
    parser.add_argument("--refine", action="store_true", help="ria.prune(refine=True)")
    parser.add_argument("--tag", default="", help="suffix of the JSON file name")
    parser.add_argument(
        "--no-sparsify", action="store_true", help="skip the sparsify check (times pruning only)"
    )
    args = parser.parse_args()

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = llama7b(args.layers)
    build = time.perf_counter() - t0
    windows = torch.randint(0, 32000, (args.nsamples, args.seqlen))
    report = ria.prune(
        model, None, sparsity="2:4", method=args.method, permute=args.permute,
        refine=args.refine, calibration=windows, nsamples=args.nsamples, seqlen=args.seqlen,
        device="cuda",
    )  # fmt: skip
    print(report)

    converted, sparsify_seconds, rel_err = None, None, None
    if not args.no_sparsify:
        ids = torch.randint(0, 32000, (1, 128), device="cuda")
        with torch.no_grad():
            ref = model(ids).logits.float()
        sparse = ria.sparsify(model, batch_sizes=[1, 16, 128])
        with torch.no_grad():
            out = model(ids).logits.float()
        rel_err = float((out - ref).norm() / ref.norm())
        converted, sparsify_seconds = len(sparse.converted), sparse.seconds
        print(f"sparsify: {converted} layers converted, logits rel. error {rel_err:.4f}")

    result = {
        "device": torch.cuda.get_device_name(),
        "cpu_cores": os.cpu_count(),
        "layers": args.layers,
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "method": args.method,
        "permute": args.permute,
        "refine": args.refine,
        "model_build_seconds": build,
        "prune_seconds": report.total_seconds,
        "stage_seconds": report.stage_seconds,
        "mean_efficacy": report.mean_efficacy,
        "mean_output_error": report.mean_output_error,
        "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_gpu_allocated_bytes": torch.cuda.max_memory_allocated(),
        "refine_swaps": sum((r.refinement or {}).get("swaps", 0) for r in report.layers),
        "sparsity": report.sparsity,
        "sparsify_converted": converted,
        "sparsify_seconds": sparsify_seconds,
        "logits_rel_error_after_sparsify": rel_err,
    }
    name = torch.cuda.get_device_name().split()[-1].lower()
    out_dir = Path(os.environ.get("OUT", RESULTS))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"prune_{name}{args.tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
