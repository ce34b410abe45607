"""Writing and reading pruned models as plain Hugging Face checkpoints.

The directory is written atomically: everything goes to a hidden staging directory
beside the target, which is renamed into place only once complete, so a crash or Ctrl-C
never leaves a half-written model that looks complete; what a killed save (or streaming
prune) leaves there, named with its process id, is removed by the next save of the same
target.

Channel orders that live in gathers (`ChannelGather`, gathered module inputs,
`GatheredLinear`) are taken out of the weights (see `ria.permutation`) and saved to
`ria_permutation.safetensors`, with how each is applied as the file's metadata;
`load_pruned` puts them back.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ._checks import require_bool, require_path
from .errors import InvalidArgumentError, OutputExistsError
from .permutation import OrderInfo, is_permuted, plain_state_dict, restore_orders
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
    the channel orders the sparse kernels read the weights in).

    `overwrite=True` replaces only an earlier checkpoint (a directory whose config.json
    has a `ria` section) or an empty directory, never anything else.
    """
    out = require_path("out_dir", out_dir).resolve()
    require_bool("overwrite", overwrite)
    check_savable(model)
    check_target(out, overwrite)
    with staged(out) as staging:
        state, orders, infos = plain_state_dict(model)
        write_pretrained(model, staging, state)
        save_orders(staging, orders, infos)
        save_extras(staging, tokenizer, report)
    return out


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A fresh staging directory beside `out` to write a checkpoint into; renamed into
    place as `out` when the body completes, removed on any error or Ctrl-C. What killed
    writers of `out` left behind is removed first. The caller checks `out` before
    (`check_target`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    staging = sibling(out, "incomplete")
    try:
        staging.mkdir()
        yield staging
        _swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_orders(
    directory: Path, orders: dict[str, torch.Tensor], infos: dict[str, OrderInfo]
) -> None:
    """Writes the channel orders `plain_state_dict` took out of the weights, and how each
    is applied as the file's metadata (nothing when there are none)."""
    if orders:
        save_file(
            {k: v.contiguous() for k, v in orders.items()},
            directory / PERMUTATION_FILE,
            metadata={k: infos[k].to_json() for k in orders},
        )


def save_extras(directory: Path, tokenizer: Any = None, report: PruneReport | None = None) -> None:
    """Writes what a checkpoint carries beside the weights: the tokenizer and the report."""
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if report is not None:
        report.to_json(directory / REPORT_FILE)


class PlainSavePretrained:
    """`save_pretrained` of a model that may carry channel orders (`ria.prune` with
    `permute`, `load_pruned` install it on the model as an instance attribute): the model
    is written as `save_pruned` writes it, plain weights that `from_pretrained` reads as the
    same function plus the orders file `load_pruned` restores, instead of weights in the
    permuted order (a different function once reloaded). Held by the model, so a deepcopy
    or pickle of the model holds its own."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model

    def __call__(self, save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
        model = self.model
        save = type(model).save_pretrained
        if not is_permuted(model):
            return save(model, save_directory, *args, **kwargs)
        if kwargs.get("push_to_hub"):
            raise InvalidArgumentError(
                "save_pretrained(push_to_hub=True) would upload before the channel orders "
                "are written: save the model, then upload the directory (or use push_to_hub)"
            )
        check_savable(model)
        # A state dict passed in (Trainer under FSDP or DeepSpeed passes its gathered copy)
        # is the model's, in permuted order: made plain as the model's own would be.
        state, orders, infos = plain_state_dict(model, state=kwargs.get("state_dict"))
        kwargs["state_dict"] = state
        result = save(model, save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):  # (the ranks that write the weights)
            save_orders(Path(save_directory), orders, infos)
        return result


def write_pretrained(
    model: PreTrainedModel, directory: Path, state: dict[str, torch.Tensor]
) -> None:
    """The class's own `save_pretrained` of `state`, already plain (ria's writers): the
    instance's `PlainSavePretrained` would take it for the model's permuted state."""
    type(model).save_pretrained(model, directory, state_dict=state)


def keep_plain_on_save(model: PreTrainedModel) -> None:
    """Makes `model.save_pretrained` write a model carrying channel orders as a plain
    checkpoint with its orders file (`PlainSavePretrained`)."""
    if hasattr(type(model), "save_pretrained"):
        model.save_pretrained = PlainSavePretrained(model)  # type: ignore[method-assign]


def check_savable(model: nn.Module) -> None:
    """Refuses a model that a plain checkpoint would misrepresent."""
    status = (getattr(model.config, "ria", None) or {}).get("status")
    if status == INCOMPLETE:
        raise InvalidArgumentError(
            "the model is only partly pruned (a ria.prune call was interrupted or failed); "
            "load the dense model and prune it again"
        )
    # A model can hold converted layers (their buffers are not saved) or fused siblings only
    # if the GPU runtime was imported.
    kinds = tuple(
        getattr(sys.modules[module], cls)
        for module, cls in (
            ("ria.sparse.linear", "Sparse24Linear"),
            ("ria.sparse.fp8_linear", "Fp8Linear"),
            ("ria.sparse.siblings", "FusedLinear"),
        )
        if module in sys.modules
    )
    if kinds and any(isinstance(m, kinds) for m in model.modules()):
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
        raise OutputExistsError(
            f"{out} exists; pass overwrite=True (CLI: --overwrite) to replace it"
        )
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


def sibling(out: Path, kind: str) -> Path:
    """A hidden directory name beside `out` for this process's writes (staging: "incomplete",
    a replaced checkpoint: "old", the streaming prune's spilled activations: "activations");
    the host and pid say whether its writer is still alive (on a shared filesystem, only
    its own host can tell)."""
    return out.parent / f".{out.name}.{kind}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _host() -> str:
    """This machine's name as a directory name can hold it."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "_"


def remove_stale_staging(out: Path) -> list[Path]:
    """Removes what saves of `out` killed midway left beside it: staging directories (and
    a streaming prune's spilled activations), and replaced checkpoints once `out` exists
    again. Only those whose writing process is gone: written on this host (other hosts'
    on a shared filesystem are left alone) by a process that no longer runs. Returns what
    was removed."""
    removed = []
    for path in out.parent.glob(f".{glob.escape(out.name)}.*-*-*"):
        kind, host, pid = _stale_kind(path, out.name)
        if kind is None or (kind == "old" and not out.exists()):
            continue
        if host not in (None, _host()) or _alive(pid):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _stale_kind(path: Path, name: str) -> tuple[str | None, str | None, int]:
    """The kind, host (None: written before names had one) and pid of a `sibling` name."""
    kinds = "incomplete|old|activations"
    pattern = rf"\.{re.escape(name)}\.({kinds})-(?:([A-Za-z0-9_.]+)-)?(\d+)-[0-9a-f]{{8}}"
    match = re.fullmatch(pattern, path.name)
    if match is None or not path.is_dir():
        return None, None, 0
    return match[1], match[2], int(match[3])


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process: alive
        return True
    return True


def _swap_into_place(staging: Path, out: Path) -> None:
    if not out.exists():
        staging.rename(out)
        return
    old = sibling(out, "old")
    out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def load_pruned(path: str | Path, **kwargs: Any) -> PreTrainedModel:
    """Loads a model saved by `save_pruned`, with its channel orders recorded as pruning
    left them (`ria.permutation.nm_order`, `group_order`; no weight changes: the model is
    the plain checkpoint in memory, and `ria.sparsify` applies the orders so the pruned
    weights are N:M in storage order). `kwargs` go to `from_pretrained`."""
    from transformers import AutoModelForCausalLM

    path = require_path("path", path)
    if not path.is_dir():
        raise InvalidArgumentError(
            f"{path} is not a directory; load_pruned reads a directory written by "
            "ria.save_pruned (use transformers' from_pretrained for a Hub model)"
        )
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    orders_file = path / PERMUTATION_FILE
    if not orders_file.exists():
        if (getattr(model.config, "ria", None) or {}).get("permute"):
            raise InvalidArgumentError(
                f"{path} was pruned with channel permutation but {PERMUTATION_FILE} is "
                "missing: its weights would load without the orders they are N:M along"
            )
        return model
    try:
        orders, infos = saved_orders_with_infos(orders_file)
        restore_orders(model, orders, infos)
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"{orders_file}: {exc}") from None
    keep_plain_on_save(model)
    return model


def saved_orders_with_infos(
    orders_file: Path,
) -> tuple[dict[str, torch.Tensor], dict[str, OrderInfo]]:
    """The orders in a `PERMUTATION_FILE` and how each is applied (its metadata)."""
    with safe_open(orders_file, "pt") as f:
        metadata = f.metadata() or {}
    orders = load_file(orders_file)
    return orders, {k: OrderInfo.from_json(k, metadata[k]) for k in orders if k in metadata}


def saved_orders(path: str | Path) -> dict[str, torch.Tensor]:
    """The channel orders stored with a saved model (empty if it was not permuted)."""
    orders_file = Path(path) / PERMUTATION_FILE
    return load_file(orders_file) if orders_file.exists() else {}
