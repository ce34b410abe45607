"""Evaluation of (pruned) causal LMs, comparable with SparseGPT, Wanda and RIA.

`perplexity` follows the papers' protocol exactly: the evaluation documents are joined with
blank lines, tokenized once, cut into non-overlapping windows of `seqlen` tokens (the
remainder dropped) and scored with the shifted-label loss, so every window predicts
`seqlen - 1` tokens. `zero_shot` runs lm-evaluation-harness tasks on an in-memory model (an
optional dependency: ``pip install 'ria-rs[eval]'``).
"""

from __future__ import annotations

import copy
import functools
import math
import numbers
import os
import random
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ._checks import require_bool, require_int
from ._torch import module_device
from .data import (
    TextSource,
    check_context,
    check_unpadded,
    check_vocabulary,
    join_documents,
    load_documents,
    token_ids,
)
from .errors import InvalidArgumentError, InvalidTypeError, MissingDependencyError

__all__ = [
    "C4_DOCUMENTS",
    "C4_WINDOWS",
    "ZERO_SHOT_TASKS",
    "check_limit",
    "check_perplexity_args",
    "check_task_dir",
    "check_tasks",
    "perplexity",
    "zero_shot",
]

# SparseGPT's C4 validation protocol: the first 1100 documents of the validation shard,
# joined with single spaces, truncated to 256 windows.
C4_DOCUMENTS = 1100
C4_WINDOWS = 256

# The zero-shot suite of the RIA paper (lm-evaluation-harness task names).
ZERO_SHOT_TASKS = ("boolq", "rte", "hellaswag", "arc_challenge", "winogrande")

LM_EVAL_HINT = "zero-shot evaluation needs lm-evaluation-harness: pip install 'ria-rs[eval]'"


def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    data: TextSource = "wikitext2",
    *,
    seqlen: int = 2048,
    batch_size: int = 1,
    max_windows: int | None = None,
    progress: bool = True,
) -> float:
    """Perplexity of a causal LM, by the SparseGPT/Wanda/RIA protocol.

    The text is tokenized once as a whole (``tokenizer(text, return_tensors="pt")``, so the
    only special tokens are those the tokenizer adds to any text, e.g. one BOS at the very
    start for LLaMA), cut into ``n = len(ids) // seqlen`` non-overlapping windows of
    `seqlen` tokens, and the remainder (fewer than `seqlen` tokens) is dropped. Each window
    is scored independently (no context carried over) with the shifted-label convention of
    those repositories: the logits at positions ``0..seqlen-2`` predict the tokens at
    ``1..seqlen-1``, so every window contributes exactly ``seqlen - 1`` predicted tokens
    and its first token is never predicted. The result is
    ``exp(sum of token NLL / (n * (seqlen - 1)))`` with the NLL (nats) accumulated in fp32
    per window and summed in fp64; this equals SparseGPT's ``exp(mean of window losses)``.

    Args:
        model: a Hugging Face causal LM (``model(input_ids).logits`` of shape
            ``(batch, seqlen, vocab)``). Inputs go to the device of its first parameter,
            which also works for models dispatched over devices by accelerate. Run in eval
            mode under ``torch.inference_mode`` with ``use_cache=False``; its training mode
            is restored afterwards.
        tokenizer: a Hugging Face tokenizer; unused (may be None) when `data` is token ids.
        data: what to evaluate on:

            - ``"wikitext2"``: the test split of wikitext-2-raw-v1 through `datasets`, its
              lines joined with ``"\\n\\n"`` (needs the Hugging Face Hub or its cache);
            - ``"c4"``: SparseGPT's C4 validation protocol: the first 1100 documents of
              ``en/c4-validation.00000-of-00008.json.gz`` joined with ``" "``, the tokens
              truncated to ``256 * seqlen`` (256 windows);
            - anything else `ria.data.load_documents` accepts: ``"austen"`` (the shipped
              sample), a path to a text file or a directory of ``*.txt`` files, the text
              itself (a string with whitespace), a list of strings, a `datasets.Dataset`
              with a "text" column; documents are joined with ``"\\n\\n"``;
            - token ids: an integer tensor of shape ``(n,)`` or ``(rows, n)``. The rows are
              joined in order as one stream (a tokenizer's ``(1, n)`` output works as
              is), so they must not be padded: a batch whose rows start or end with the
              tokenizer's pad token is refused (pass the ids unpadded, as one stream).
        seqlen: tokens per window (>= 2, at most the model's context:
            ``max_position_embeddings`` or ``n_positions`` of its config); the papers use
            2048.
        batch_size: windows per forward pass (>= 1). Changes speed and memory, not the
            result (up to floating-point rounding).
        max_windows: evaluate only the first `max_windows` windows (>= 1); None for all.
        progress: show a tqdm progress bar over windows.

    Returns:
        The perplexity, a float >= 1 (nats-based: ``exp`` of the mean NLL).

    Raises:
        ValueError: seqlen < 2 or longer than the model's context, batch_size or
            max_windows < 1, an unknown dataset name, a text with fewer than `seqlen`
            tokens, padded token ids, or token ids outside the vocabulary.
        TypeError: `tokenizer` is None while `data` is text, or token ids that are not an
            integer tensor of 1 or 2 dimensions.
    """
    seqlen, batch_size, max_windows = check_perplexity_args(seqlen, batch_size, max_windows)
    require_bool("progress", progress)
    check_context(model, seqlen, "evaluation")
    ids = _token_stream(tokenizer, data, seqlen)
    n_tokens = ids.numel()
    n_windows = n_tokens // seqlen
    if n_windows == 0:
        raise InvalidArgumentError(
            f"the evaluation text has {n_tokens} tokens, fewer than one window of "
            f"seqlen={seqlen} tokens; give a longer text or a smaller seqlen"
        )
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    windows = ids[: n_windows * seqlen].view(n_windows, seqlen)
    check_vocabulary(model, windows, "evaluation")

    device = module_device(model)
    was_training = model.training
    model.eval()
    # Kept where the logits are and read once at the end: no host sync per window.
    nll = torch.zeros(n_windows, dtype=torch.float64, device=device)
    try:
        with (
            torch.inference_mode(),
            tqdm(total=n_windows, desc="perplexity", unit="window", disable=not progress) as bar,
        ):
            for start in range(0, n_windows, batch_size):
                batch = windows[start : start + batch_size].to(device)
                logits = model(input_ids=batch, use_cache=False).logits
                # One window at a time, so the fp32 copy of the logits stays one window big.
                for row in range(batch.shape[0]):
                    nll[start + row] = F.cross_entropy(
                        logits[row, :-1].float(),
                        batch[row, 1:].to(logits.device),
                        reduction="sum",
                    ).to(nll.device, torch.float64)
                del logits
                bar.update(batch.shape[0])
    finally:
        model.train(was_training)
    finite = nll.isfinite()
    if not finite.all():
        first = int((~finite).nonzero()[0, 0])
        raise InvalidArgumentError(
            f"the model's logits are not finite on evaluation window {first} (tokens "
            f"{first * seqlen} to {(first + 1) * seqlen - 1}), so perplexity is undefined; "
            "check the model's weights for NaN/inf, or load it in bfloat16 or float32 if "
            "float16 overflows"
        )
    mean_nll = nll.sum().item() / (n_windows * (seqlen - 1))
    return math.exp(mean_nll) if mean_nll < _MAX_EXP else math.inf


# math.exp overflows above this (the perplexity is then reported as inf).
_MAX_EXP = math.log(sys.float_info.max)


def check_perplexity_args(
    seqlen: object, batch_size: object, max_windows: object
) -> tuple[int, int, int | None]:
    """`perplexity`'s numeric arguments, checked (the CLI checks them before loading)."""
    return (
        require_int("seqlen", seqlen, minimum=2),
        require_int("batch_size", batch_size, minimum=1),
        None if max_windows is None else require_int("max_windows", max_windows, minimum=1),
    )


def zero_shot(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: Iterable[str] = ZERO_SHOT_TASKS,
    *,
    limit: int | float | None = None,
    batch_size: int = 8,
    num_fewshot: int = 0,
    task_dir: str | os.PathLike[str] | None = None,
    trust_task_code: bool = False,
) -> dict[str, dict[str, float | None]]:
    """Zero-shot (or few-shot) accuracies through lm-evaluation-harness.

    Wraps the in-memory `model` in ``lm_eval.models.huggingface.HFLM`` and runs
    ``lm_eval.simple_evaluate`` on `tasks` (lm-eval task names; the default is the RIA
    paper's suite: boolq, rte, hellaswag, arc_challenge, winogrande, which need the
    Hugging Face Hub or its cache). The model stays on its device; its training mode is
    restored afterwards. lm-eval gets a copy of `tokenizer` (it sets a pad token on the
    one it is given), and the global random states it reseeds (Python's `random`, NumPy,
    torch on the CPU and CUDA) are put back afterwards, so the caller's are unchanged.

    Args:
        model: a Hugging Face causal LM.
        tokenizer: its tokenizer.
        tasks: lm-eval task (or group) names.
        limit: examples per task: an int (the first `limit`), a float < 1 (that fraction),
            or None for all. Limited results are for testing, not for reporting.
        batch_size: requests per forward pass.
        num_fewshot: in-context examples per prompt (0 for zero-shot). Tasks whose YAML
            fixes ``num_fewshot: 0`` keep it (lm-eval's rule).
        task_dir: a directory of extra lm-eval YAML task definitions (e.g. local tasks
            over local JSON files), searched before the built-in tasks.
        trust_task_code: allow `task_dir` to hold Python files. lm-eval imports and runs
            the code that its YAML names with `!function`, so a directory with `.py`
            files is refused unless this is True.

    Returns:
        ``{task: {metric: value}}`` from lm-eval's per-task results, e.g.
        ``{"rte": {"acc": 0.61, "acc_stderr": 0.03}}`` (``acc_norm`` and its stderr where
        the task reports it). Metric keys drop lm-eval's default filter suffix
        (``"acc,none"`` becomes ``"acc"``; another filter ``f`` gives ``"acc/f"``).
        Values are floats in task units (accuracies in [0, 1]); a stderr lm-eval cannot
        compute (``"N/A"``) becomes None. Groups appear like tasks. JSON-serializable.

    Raises:
        ImportError: lm-evaluation-harness is not installed.
        ValueError: `tasks` is empty or names a task lm-eval does not know, or `task_dir`
            is not a directory or holds Python files without `trust_task_code=True`.
    """
    batch_size = require_int("batch_size", batch_size, minimum=1)
    num_fewshot = require_int("num_fewshot", num_fewshot, minimum=0)
    check_limit(limit)
    task_list = check_tasks(tasks, task_dir, trust_task_code)
    import lm_eval  # check_tasks found it
    from lm_eval.models.huggingface import HFLM

    task_manager = _task_manager(tuple(task_list), None if task_dir is None else str(task_dir))
    was_training = model.training
    try:
        with _kept_random_states():
            lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=task_list,
                limit=limit,
                num_fewshot=num_fewshot,
                task_manager=task_manager,
                log_samples=False,
            )
    finally:
        model.train(was_training)
    if out is None:  # a non-zero rank of a distributed run
        return {}
    return {task: _flatten_metrics(metrics) for task, metrics in out["results"].items()}


def check_tasks(
    tasks: Iterable[str],
    task_dir: str | os.PathLike[str] | None = None,
    trust_task_code: bool = False,
) -> list[str]:
    """`zero_shot`'s task names as a list, each checked to be an lm-eval task, group or tag
    (built in or in `task_dir`) or a task YAML file, so that a typo fails before the model
    is loaded or evaluated. Indexing lm-eval's tasks takes seconds; `zero_shot` reuses it.

    Raises:
        ImportError: lm-evaluation-harness is not installed.
        ValueError: no tasks, an unknown task, or a bad `task_dir` (`check_task_dir`).
    """
    task_list = [tasks] if isinstance(tasks, str) else list(tasks)
    if not task_list:
        raise InvalidArgumentError("no zero-shot tasks given")
    if task_dir is not None:
        check_task_dir(task_dir, trust_task_code)
    try:
        import lm_eval  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(LM_EVAL_HINT) from exc
    manager = _task_manager(tuple(task_list), None if task_dir is None else str(task_dir))
    unknown = [t for t in task_list if t not in manager.all_tasks and not Path(t).is_file()]
    if unknown:
        where = "lm-eval's tasks" + ("" if task_dir is None else f" or {task_dir}")
        raise InvalidArgumentError(
            f"unknown zero-shot task{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))}: not a task, group or tag in {where}, nor a "
            "task YAML file; `lm-eval ls tasks` lists them"
        )
    return task_list


def _task_manager(tasks: tuple[str, ...], task_dir: str | None) -> Any:
    """lm-eval's index of the tasks built in and those of `task_dir`. Indexing the
    thousands of built-in tasks takes seconds: it is skipped when `task_dir` defines every
    task asked for, and without `task_dir` it is built once (`check_tasks` then
    `zero_shot` use the same)."""
    from lm_eval.tasks import TaskManager

    if task_dir is None:
        return _builtin_tasks()
    manager = TaskManager(include_path=task_dir, include_defaults=False)
    if set(tasks) <= set(manager.all_tasks):
        return manager
    return TaskManager(include_path=task_dir)


@functools.cache
def _builtin_tasks() -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager()


@contextmanager
def _kept_random_states() -> Iterator[None]:
    """Puts back the global random states (Python, NumPy, torch CPU and CUDA) on exit."""
    import numpy as np

    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def check_limit(limit: object) -> None:
    """`zero_shot`'s `limit`: None, an integer >= 1, or a fraction in (0, 1)."""
    if limit is None:
        return
    if isinstance(limit, numbers.Integral) and not isinstance(limit, bool):
        require_int("limit", limit, minimum=1)
        return
    if isinstance(limit, bool) or not isinstance(limit, numbers.Real):
        raise InvalidTypeError(f"limit must be None, an integer or a fraction, got {limit!r}")
    if not 0 < float(limit) < 1:
        raise InvalidArgumentError(
            f"limit must be an integer >= 1 (examples) or a fraction in (0, 1), got {limit}"
        )


def check_task_dir(task_dir: str | os.PathLike[str], trust_task_code: bool) -> None:
    """Refuses a task directory that is missing, or that holds Python code (which lm-eval
    would import) unless `trust_task_code`."""
    path = Path(task_dir).expanduser()
    if not path.is_dir():
        raise InvalidArgumentError(f"task directory {path} does not exist or is not a directory")
    if require_bool("trust_task_code", trust_task_code):
        return
    code = sorted(path.rglob("*.py"))
    if code:
        raise InvalidArgumentError(
            f"task directory {path} holds Python files ({code[0].name}"
            f"{f' and {len(code) - 1} more' if len(code) > 1 else ''}), which lm-eval imports "
            "and runs when a task's YAML names them with !function; if you trust that code, "
            "pass trust_task_code=True (CLI: --trust-task-code)"
        )


def _token_stream(tokenizer: Any, data: TextSource, seqlen: int) -> torch.Tensor:
    """The evaluation tokens as one 1-D int64 tensor (CPU), shape ``(n_tokens,)``."""
    if isinstance(data, torch.Tensor):
        given = token_ids(data, "evaluation")
        check_unpadded(given, tokenizer, "evaluation")
        return given.reshape(-1)
    if tokenizer is None:
        raise InvalidTypeError("a tokenizer is needed to evaluate text; pass token ids to skip it")
    is_c4 = isinstance(data, str) and data.lower() == "c4"
    docs = load_documents(data, "test")
    text = " ".join(docs[:C4_DOCUMENTS]) if is_c4 else join_documents(docs)
    ids: torch.Tensor = tokenizer(text, return_tensors="pt", verbose=False)["input_ids"].reshape(-1)
    if is_c4:
        ids = ids[: C4_WINDOWS * seqlen]
    return ids.to(torch.long)


def _flatten_metrics(metrics: Mapping[str, Any]) -> dict[str, float | None]:
    flat: dict[str, float | None] = {}
    for key, value in metrics.items():
        if key == "alias" or key.startswith("sample"):
            continue
        name, _, filt = key.partition(",")
        if filt and filt != "none":
            name = f"{name}/{filt}"
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            flat[name] = float(value) if math.isfinite(value) else None
        elif name.endswith("_stderr"):
            flat[name] = None  # lm-eval writes "N/A" when it cannot compute one
    return flat
