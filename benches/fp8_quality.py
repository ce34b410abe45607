"""What fp8 (e4m3 weights with per-row scales, tokens quantized per call) does to quality,
dense and 2:4: perplexity of SmolLM2-135M on the CPU, with the quantization emulated exactly
(`ria.sparse.fp8.fp8_linear_reference`, which the GPU kernels match).

    python benches/fp8_quality.py

Protocol of benches/quality.py (same settings: brown_calib 64x256 calibration, RIA a=0.5,
one-shot sequential pruning, wiki_eval 16x512 perplexity). Cells: dense in fp32 and bf16,
fp8 dense (every decoder Linear), then RIA 2:4 (no permutation) in fp32 and bf16 and fp8 2:4
(the pruned Linears in fp8). bf16 and fp8 cells run the whole model in bf16 (norms,
attention, lm_head), as on the GPU. Writes benches/results/fp8_quality.json.
"""

from __future__ import annotations

import copy
import json
import platform
import time
from pathlib import Path

import torch
from quality import LOADERS, SETTINGS, evaluate

import ria
from ria.sparse.fp8_linear import quantize_linears

RESULT = Path(__file__).parent / "results" / "fp8_quality.json"
PRUNE = {"method": "ria", "sparsity": "2:4"}


def cell(model, tokenizer, label: str, results: dict) -> None:
    t0 = time.perf_counter()
    ppl = evaluate(model, tokenizer)
    results["perplexity"][label] = ppl
    print(f"{label:<14} ppl {ppl:8.3f}  ({time.perf_counter() - t0:.0f} s)", flush=True)


def variants(model, tokenizer, prefix: str, sparse: bool, results: dict) -> None:
    """`model` (fp32) as is, in bf16, and in bf16 with its (2:4 if `sparse`) Linears in fp8."""
    cell(model, tokenizer, f"{prefix} fp32", results)
    half = copy.deepcopy(model).to(torch.bfloat16)
    cell(half, tokenizer, f"{prefix} bf16", results)
    converted = quantize_linears(half, sparse=sparse)
    results["fp8_layers"][prefix] = len(converted)
    cell(half, tokenizer, f"{prefix} fp8", results)


def main() -> None:
    torch.manual_seed(0)
    results: dict = {
        "settings": {**SETTINGS, "prune": PRUNE},
        "perplexity": {},
        "fp8_layers": {},
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
    }
    model, tokenizer = LOADERS["smollm2"]()
    variants(model, tokenizer, "dense", False, results)
    t0 = time.perf_counter()
    ria.prune(
        model, tokenizer, calibration=SETTINGS["calibration"], nsamples=SETTINGS["nsamples"],
        seqlen=SETTINGS["seqlen"], seed=SETTINGS["seed"], alpha=SETTINGS["alpha"],
        progress=False, **PRUNE,
    )  # fmt: skip
    results["prune_seconds"] = time.perf_counter() - t0
    variants(model, tokenizer, "2:4", True, results)
    ppl = results["perplexity"]
    results["fp8_2:4_over_bf16_2:4"] = ppl["2:4 fp8"] / ppl["2:4 bf16"]
    results["fp8_dense_over_bf16_dense"] = ppl["dense fp8"] / ppl["dense bf16"]
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
