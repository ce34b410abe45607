"""Writing and reading pruned models as plain Hugging Face checkpoints.

The directory is written atomically: everything goes to a hidden staging directory
beside the target, which is renamed into place only once complete, so a crash or Ctrl-C
never leaves a half-written model that looks complete. Channel orders that live in
`ChannelGather` wrappers are taken out of the weights (see `ria.permute`) and saved to
`ria_permutation.safetensors`; `load_pruned` puts them back.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .permute import plain_state_dict, restore_orders
from .report import PruneReport

PERMUTATION_FILE = "ria_permutation.safetensors"
REPORT_FILE = "ria_report.json"


def save_pruned(
    model: nn.Module,
    out_dir: str | Path,
    tokenizer: Any = None,
    report: PruneReport | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Saves model (+ tokenizer, + report) to `out_dir`; reloadable with plain
    `AutoModelForCausalLM.from_pretrained` (same function; `load_pruned` also restores
    the storage order the sparse kernels need)."""
    from .sparse import Sparse24Linear

    if any(isinstance(m, Sparse24Linear) for m in model.modules()):
        raise ValueError(
            "the model has been sparsified (its weights are in GPU kernel formats); "
            "save it before ria.sparsify, and sparsify again after loading"
        )
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (CLI: --overwrite) to replace it")
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


def _swap_into_place(staging: Path, out: Path) -> None:
    if not out.exists():
        staging.rename(out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def load_pruned(path: str | Path, **kwargs: Any) -> nn.Module:
    """Loads a model saved by `save_pruned`, with its channel orders restored (so pruned
    weights are N:M in storage order again). `kwargs` go to `from_pretrained`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    orders_file = Path(path) / PERMUTATION_FILE
    if orders_file.exists():
        restore_orders(model, load_file(orders_file))
    return model


def saved_orders(path: str | Path) -> dict[str, torch.Tensor]:
    """The channel orders stored with a saved model (empty if it was not permuted)."""
    orders_file = Path(path) / PERMUTATION_FILE
    return load_file(orders_file) if orders_file.exists() else {}
