"""Peak host memory of `ria.prune_checkpoint` (the streaming prune) on a random
checkpoint of a ~2B-parameter LLaMA shape, against the issue's target: peak RSS <= 30% of
the checkpoint's size plus the calibration activations.

    python benches/stream_memory.py                     # 28 layers, hidden 2048, bf16
    python benches/stream_memory.py --layers 4          # a quick check
    python benches/stream_memory.py --in-memory         # also ria.prune + save_pruned

The checkpoint is written block by block (never held whole) into --workdir; each prune
runs in a fresh child process, whose peak RSS (`VmHWM`: `ru_maxrss` would include the
parent's RSS, which Linux carries into a child's across fork and exec) is reported, next to
the RSS after its imports (torch, transformers and the LLaMA modeling code: what any
prune of this model needs before it reads a weight). Calibration windows are random token
ids. Writes benches/results/stream_memory.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig

RESULTS = Path(__file__).parent / "results"
GIB = 2**30


def shape(layers: int) -> LlamaConfig:
    """~2B parameters at 28 layers: hidden 2048, MLP 8192, GQA (16 heads, 8 KV heads)."""
    return LlamaConfig(
        hidden_size=2048, intermediate_size=8192, num_attention_heads=16,
        num_key_value_heads=8, num_hidden_layers=layers, vocab_size=32000,
        max_position_embeddings=4096, tie_word_embeddings=False, dtype="bfloat16",
    )  # fmt: skip


def write_checkpoint(config: LlamaConfig, path: Path, blocks_per_shard: int) -> int:
    """A random bf16 checkpoint in shards of `blocks_per_shard` blocks; returns its bytes.
    Only one shard is in memory at a time (the model is built on the meta device)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from ria.streaming.writer import ShardWriter

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    state = model.state_dict()
    layers = config.num_hidden_layers
    groups = [[k for k in state if not k.startswith("model.layers.")]]
    for first in range(0, layers, blocks_per_shard):
        prefixes = tuple(f"model.layers.{i}." for i in range(first, first + blocks_per_shard))
        groups.append([k for k in state if k.startswith(prefixes)])
    path.mkdir(parents=True)
    writer = ShardWriter(path, len(groups))
    generator = torch.Generator().manual_seed(0)
    for keys in groups:
        shard = {}
        for key in keys:
            meta = state[key]
            if meta.dim() == 1:  # norms
                shard[key] = torch.ones(meta.shape, dtype=meta.dtype)
            else:
                shard[key] = (torch.randn(meta.shape, generator=generator) * 0.02).to(meta.dtype)
        writer.write(shard)
    writer.finish(sum(t.numel() for t in state.values()))
    config.save_pretrained(path)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


# The child: imports and RSS after them, then one prune; prints one JSON line.
CHILD = """
import json, resource, sys, time
import torch, transformers, accelerate, ria
import transformers.models.llama.modeling_llama  # ~0.2 GiB of code either way
from transformers import AutoModelForCausalLM

def rss_bytes():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()

def peak_rss_bytes():  # this process's own peak (ru_maxrss counts the parent's too)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024

src, out, mode, nsamples, seqlen, vocab = sys.argv[1:7]
after_imports = rss_bytes()
windows = torch.randint(0, int(vocab), (int(nsamples), int(seqlen)),
                        generator=torch.Generator().manual_seed(0))
settings = dict(sparsity="2:4", calibration=windows, nsamples=int(nsamples),
                seqlen=int(seqlen), progress=False, device="cpu")
t0 = time.perf_counter()
if mode == "stream":
    report = ria.prune_checkpoint(src, out, **settings)
else:
    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    report = ria.prune(model, None, **settings)
    ria.save_pruned(model, out, None, report)
seconds = time.perf_counter() - t0
print(json.dumps({
    "after_imports_bytes": after_imports,
    "peak_rss_bytes": peak_rss_bytes(),
    "seconds": seconds,
    "stage_seconds": report.stage_seconds,
    "sparsity": report.sparsity,
}))
"""


def run_child(src: Path, out: Path, mode: str, args: argparse.Namespace, vocab: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    argv = [str(src), str(out), mode, str(args.nsamples), str(args.seqlen), str(vocab)]
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        sys.exit(f"{mode} prune failed:\n{done.stderr[-4000:]}")
    result: dict = json.loads(done.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--nsamples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--blocks-per-shard", type=int, default=4)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ria_stream_memory"))
    parser.add_argument("--in-memory", action="store_true", help="also measure ria.prune")
    args = parser.parse_args()

    config = shape(args.layers)
    shutil.rmtree(args.workdir, ignore_errors=True)
    src = args.workdir / "src"
    t0 = time.perf_counter()
    size = write_checkpoint(config, src, args.blocks_per_shard)
    params = size // 2
    print(f"checkpoint: {params / 1e9:.2f}B parameters, {size / GIB:.2f} GiB bf16, "
          f"written in {time.perf_counter() - t0:.0f} s")  # fmt: skip

    # Block 0's inputs, bf16: (nsamples, seqlen, hidden); held twice while a block's
    # outputs are computed (its inputs and its outputs).
    activations = args.nsamples * args.seqlen * config.hidden_size * 2
    target = 0.3 * size + activations
    results: dict = {
        "shape": config.to_diff_dict() | {"num_hidden_layers": args.layers},
        "checkpoint_bytes": size,
        "parameters": params,
        "activation_bytes": activations,
        "target_bytes": target,
        "calibration": f"{args.nsamples} x {args.seqlen} random token ids",
        "host": f"{resource.getpagesize()}-byte pages, {torch.get_num_threads()} threads",
    }
    modes = ["stream", "in_memory"] if args.in_memory else ["stream"]
    for mode in modes:
        r = run_child(src, args.workdir / f"out_{mode}", mode, args, config.vocab_size)
        results[mode] = r
        peak, imports = r["peak_rss_bytes"], r["after_imports_bytes"]
        r["peak_above_imports_bytes"] = peak - imports
        print(
            f"{mode}: peak RSS {peak / GIB:.2f} GiB = {100 * peak / size:.1f}% of the "
            f"checkpoint ({'met' if peak <= target else 'MISSED'}: target {target / GIB:.2f} "
            f"GiB); above the {imports / GIB:.2f} GiB after imports: "
            f"{(peak - imports) / GIB:.2f} GiB = {100 * (peak - imports) / size:.1f}%; "
            f"{r['seconds']:.0f} s"
        )
    shutil.rmtree(args.workdir, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    name = "stream_memory.json" if args.layers == 28 else f"stream_memory_{args.layers}l.json"
    (RESULTS / name).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
