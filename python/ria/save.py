"""Writing and reading pruned models as plain Hugging Face checkpoints.

The directory is written atomically: everything goes to a hidden staging directory
beside the target, which is renamed into place only once complete, so a crash or Ctrl-C
never leaves a half-written model that looks complete. Channel orders that live in
`ChannelGather` wrappers are taken out of the weights (see `ria.permute`) and saved to
`ria_permutation.safetensors`; `load_pruned` puts them back.
"""

from __future__ import annotations

import json
import shutil
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import InvalidArgumentError
from .permutation import plain_state_dict, restore_orders
from .pruning import INCOMPLETE, PruneReport

if TYPE_CHECKING:
    from transformers import PreTrainedModel

PERMUTATION_FILE = "ria_permutation.safetensors"
REPORT_FILE = "ria_report.json"


def save_pruned(
    model: PreTrainedModel,
    out_dir: str | Path,
    tokenizer: Any = None,
    report: PruneReport | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Saves model (+ tokenizer, + report) to `out_dir`; reloadable with plain
    `AutoModelForCausalLM.from_pretrained` (same function; `load_pruned` also restores
    the storage order the sparse kernels need).

    `overwrite=True` replaces only an earlier checkpoint (a directory whose config.json
    has a `ria` section) or an empty directory, never anything else.
    """
    check_savable(model)
    out = Path(out_dir).expanduser().resolve()
    check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.incomplete-{uuid.uuid4().hex[:8]}"
    try:
        state, orders = plain_state_dict(model)
        model.save_pretrained(staging, state_dict=state)
        if orders:
            save_file({k: v.contiguous() for k, v in orders.items()}, staging / PERMUTATION_FILE)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if report is not None:
            report.to_json(staging / REPORT_FILE)
        _swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def check_savable(model: nn.Module) -> None:
    """Refuses a model that a plain checkpoint would misrepresent."""
    status = (getattr(model.config, "ria", None) or {}).get("status")
    if status == INCOMPLETE:
        raise InvalidArgumentError(
            "the model is only partly pruned (a ria.prune call was interrupted or failed); "
            "load the dense model and prune it again"
        )
    # A model can hold Sparse24Linear only if the GPU runtime was imported.
    runtime = sys.modules.get("ria.sparse.linear")
    if runtime is not None and any(isinstance(m, runtime.Sparse24Linear) for m in model.modules()):
        raise InvalidArgumentError(
            "the model has been sparsified (its weights are in GPU kernel formats); "
            "save it before ria.sparsify, and sparsify again after loading"
        )


def check_target(out: Path, overwrite: bool) -> None:
    """Refuses an output directory that exists, unless `overwrite` and it is an earlier
    checkpoint (or empty); refuses the current directory and its parents always."""
    if not out.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise InvalidArgumentError(f"refusing to replace {out}: it holds the current directory")
    if not out.is_dir() or not (_is_checkpoint(out) or not any(out.iterdir())):
        raise InvalidArgumentError(
            f"refusing to replace {out}: it is not a checkpoint written by ria "
            "(no config.json with a 'ria' section); choose another output directory"
        )


def _is_checkpoint(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_text("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "ria" in config


def _swap_into_place(staging: Path, out: Path) -> None:
    if not out.exists():
        staging.rename(out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def load_pruned(path: str | Path, **kwargs: Any) -> PreTrainedModel:
    """Loads a model saved by `save_pruned`, with its channel orders restored (so pruned
    weights are N:M in storage order again). `kwargs` go to `from_pretrained`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    orders_file = Path(path) / PERMUTATION_FILE
    if not orders_file.exists():
        if (getattr(model.config, "ria", None) or {}).get("permute"):
            raise InvalidArgumentError(
                f"{path} was pruned with channel permutation but {PERMUTATION_FILE} is "
                "missing: its weights would load without their N:M storage order"
            )
        return model
    try:
        restore_orders(model, load_file(orders_file))
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"{orders_file}: {exc}") from None
    return model


def saved_orders(path: str | Path) -> dict[str, torch.Tensor]:
    """The channel orders stored with a saved model (empty if it was not permuted)."""
    orders_file = Path(path) / PERMUTATION_FILE
    return load_file(orders_file) if orders_file.exists() else {}
