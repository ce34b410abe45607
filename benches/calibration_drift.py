"""How far block-by-block calibration drifts from a true forward on a dense model.

`ria.prune` runs one block at a time on captured inputs. If a block were called with other
arguments than the model's own forward gives it (another layer type's attention mask or
rotary embedding, as when block 0's arguments were replayed everywhere), its outputs, and
every later block's inputs, would drift. This runs the same windows both ways, with nothing
pruned, and prints the relative error of each block's input:

- `per block`: each block gets the keyword arguments the model gives it (what ria does);
- `block 0's`: every block gets block 0's (what ria did before; wrong on hybrid models).

    python benches/calibration_drift.py MODEL_DIR [--gguf FILE] [--text FILE]

Needs a real model; Gemma-3-270m installs offline (see shared/data/README.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ria.arch import find_blocks
from ria.pruning import BlockInputs, calibration_windows, capture_block_inputs, run_block


def true_inputs(model: torch.nn.Module, windows: torch.Tensor) -> list[torch.Tensor]:
    """Each block's input hidden states in a plain forward, windows concatenated."""
    blocks = find_blocks(model)[1]
    seen: list[list[torch.Tensor]] = [[] for _ in blocks]
    handles = [
        block.register_forward_pre_hook(
            lambda _m, args, kw, i=i: seen[i].append((args or (kw["hidden_states"],))[0]),
            with_kwargs=True,
        )
        for i, block in enumerate(blocks)
    ]
    try:
        for w in windows:
            model(w[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(s) for s in seen]


def drift(model: torch.nn.Module, windows: torch.Tensor, replay_block0: bool) -> list[float]:
    """Relative error of each block's calibration input against the true forward."""
    blocks = find_blocks(model)[1]
    inputs = capture_block_inputs(model, blocks, windows, batch_size=1)
    truth = true_inputs(model, windows)
    errors = []
    for i, block in enumerate(blocks):
        got = torch.cat(inputs.hidden)
        errors.append(float((got - truth[i]).norm() / truth[i].norm()))
        kwargs = inputs.at(0).kwargs if replay_block0 else inputs.at(i).kwargs
        inputs = inputs.advanced(run_block(block, BlockInputs(inputs.hidden, kwargs)))
    return errors


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a model directory (or the GGUF file's directory)")
    parser.add_argument("--gguf", help="GGUF file name inside MODEL")
    parser.add_argument("--text", default="../shared/data/wiki_eval.txt")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args()

    kwargs = {"gguf_file": args.gguf} if args.gguf else {}
    tokenizer = AutoTokenizer.from_pretrained(args.model, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, **kwargs)
    model.eval().config.use_cache = False
    windows = calibration_windows(Path(args.text), tokenizer, args.windows, args.seqlen, seed=0)
    result = {
        "model": model.config.model_type,
        "layer_types": getattr(model.config, "layer_types", None),
        "windows": args.windows,
        "seqlen": args.seqlen,
        "per_block": drift(model, windows, replay_block0=False),
        "block0_replayed": drift(model, windows, replay_block0=True),
    }
    print(f"{'block':>5} {'layer type':>18} {'per block':>10} {'block 0 s':>10}")
    types = result["layer_types"] or ["-"] * len(result["per_block"])
    for i, (a, b) in enumerate(zip(result["per_block"], result["block0_replayed"], strict=True)):
        print(f"{i:>5} {types[i]:>18} {a:10.2e} {b:10.2e}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
