"""`ria.prune_checkpoint`: prune a checkpoint bigger than host memory, one decoder block at
a time, straight from its safetensors shards into a new checkpoint.

The block loop is `ria.prune`'s own (`prune_with`); only where the weights live differs
(`_StreamedBlocks`): the model is a meta-device skeleton, the weights outside the blocks
are loaded for the calibration capture, written out and freed, and each block is loaded
when the loop visits it and written (then freed) when the visit ends. Host memory holds
the calibration activations and one block with its scores (see `prune_checkpoint`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .._checks import require_bool, require_path
from .._torch import default_device
from ..arch import find_blocks
from ..errors import InvalidArgumentError
from ..permutation import OrderInfo, plain_state_dict
from ..pruning import Placement, PruneConfig, PruneReport, prune_with
from ..pruning.distributed import current
from ..save import (
    PERMUTATION_FILE,
    check_target,
    save_extras,
    save_orders,
    sibling,
    staged,
    write_pretrained,
)
from .conversion import StoredNames
from .memory import release_freed_memory
from .skeleton import (
    build_skeleton,
    check_dtype,
    free_outside,
    load_block,
    load_outside,
    outside_keys,
    stored_names,
)
from .source import SINGLE_FILE, CheckpointSource, resolve_checkpoint
from .writer import ShardWriter

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["prune_checkpoint", "prune_checkpoint_with", "read_by_block"]


def prune_checkpoint(
    src: str | Path,
    out_dir: str | Path,
    *,
    tokenizer: Any = None,
    dtype: str | torch.dtype = "auto",
    overwrite: bool = False,
    offload_activations: bool | None = None,
    **prune_kwargs: Any,
) -> PruneReport:
    """Prunes the checkpoint `src` block by block into `out_dir`, never holding the whole
    model: the result is the checkpoint `ria.save_pruned` writes after `ria.prune` with the
    same settings on the model loaded in memory (same tensors, channel orders and `ria`
    config section), in shards of one decoder block each.

    Args:
        src: a checkpoint directory with safetensors weights (one file or shards with an
            index), or a Hugging Face Hub id already in the local cache (nothing is
            downloaded); not one saved with channel orders (`ria.load_pruned` restores
            them first): prune that in memory.
        out_dir: the output directory, written atomically like `ria.save_pruned`: a hidden
            staging directory beside it is renamed into place only when complete.
        tokenizer: for calibration text, saved with the model; None loads `src`'s own
            (when it has one).
        dtype: "auto" (the checkpoint config's dtype, as `from_pretrained(dtype="auto")`),
            "float32", "bfloat16", "float16" or a `torch.dtype`: the dtype blocks are
            pruned and saved in.
        overwrite: replace `out_dir` if it is an earlier ria checkpoint (or empty).
        offload_activations: keep the calibration hidden states between blocks in files
            (in a temporary directory beside `out_dir`, deleted at the end) instead of
            memory, one batch read at a time; the result is the same. None decides: on
            when blocks run on the CPU and the activations, twice (a block's inputs and
            outputs), would exceed a quarter of the host's physical memory.
        **prune_kwargs: `ria.prune`'s settings (sparsity, method, permute, calibration,
            nsamples, seqlen, device, ...), checked before anything is read.

    Host memory, beyond the imported code: the calibration activations when `device` is
    the CPU and they are not offloaded (`nsamples x seqlen x hidden` in the model's dtype,
    twice while a block's outputs are computed; with CUDA they stay on the GPU), plus the
    larger of the weights outside the blocks (held until the first block) and one block
    with the float32 scores and mask of one matrix at a time (of all its matrices at once
    with `permute`).

    Returns:
        The `PruneReport`, as `ria.prune` returns it (also saved as `ria_report.json`).
    """
    return prune_checkpoint_with(
        src,
        out_dir,
        _config(prune_kwargs),
        tokenizer=tokenizer,
        dtype=dtype,
        overwrite=overwrite,
        offload_activations=offload_activations,
    )


def prune_checkpoint_with(
    src: str | Path,
    out_dir: str | Path,
    config: PruneConfig,
    *,
    tokenizer: Any = None,
    dtype: str | torch.dtype = "auto",
    overwrite: bool = False,
    offload_activations: bool | None = None,
) -> PruneReport:
    """`prune_checkpoint` with `ria.prune`'s settings given as one `PruneConfig`."""
    check_dtype(dtype)
    out = require_path("out_dir", out_dir).resolve()
    require_bool("overwrite", overwrite)
    if offload_activations is not None:
        require_bool("offload_activations", offload_activations)
    check_target(out, overwrite)
    source = _source(src)
    model = build_skeleton(source, dtype)
    if tokenizer is None:
        tokenizer = _own_tokenizer(source.directory)
    device = config.device or default_device()
    path, _ = find_blocks(model)
    names = stored_names(model, source, path)  # fails before calibrating, not at block 0
    if offload_activations is None:
        offload_activations = (
            device.type == "cpu" and 2 * _activation_bytes(model, config) > _physical_memory() / 4
        )
    # Split over processes (ria.pruning.distributed), every rank prunes and rank 0 alone
    # writes; the others learn at the end whether its writing succeeded.
    ranks = current()
    writer = ranks is None or ranks.rank == 0
    output: AbstractContextManager[Path | None] = staged(out) if writer else nullcontext()
    with (
        nullcontext() if ranks is None else ranks.agreeing(f"writing {out}"),
        output as staging,
        ExitStack() as stack,
    ):
        spill = None
        if offload_activations and config.needs_data:
            spill = stack.enter_context(_spill_directory(out))
        load_outside(model, source, path, device, names)
        streamed = _StreamedBlocks(model, source, staging, device, names)
        report = prune_with(model, tokenizer, config, streamed, spill)
        if staging is not None:
            streamed.finish()
            model.config.save_pretrained(staging)
            save_extras(staging, tokenizer, report)
    return report


def read_by_block(
    src: str | Path, dtype: str | torch.dtype, device: torch.device
) -> tuple[PreTrainedModel, Placement]:
    """The model of checkpoint `src` (as `prune_checkpoint` reads it) for a rank other
    than 0 of a prune split over processes: a skeleton whose weights outside the blocks
    are loaded on `device`, and the `Placement` that loads each block from the shards when
    the block loop visits it and frees it afterwards, writing nothing. Every rank visits
    block i while it is still dense, so loading it from the dense checkpoint gives the
    block rank 0 holds; the pruned blocks come to every rank from their owners. Host
    memory: one block and the weights outside the blocks, not the model.

    Raises `UnreadableByBlockError`, before loading anything, for a checkpoint lacking
    block tensors under any name transformers reads (load it whole instead)."""
    check_dtype(dtype)
    source = _source(src)
    model = build_skeleton(source, dtype)
    path, _ = find_blocks(model)
    names = stored_names(model, source, path)
    load_outside(model, source, path, device, names)
    return model, _StreamedBlocks(model, source, None, device, names)


def _source(src: str | Path) -> CheckpointSource:
    """The checkpoint `src`, refused if it was saved with channel orders: its blocks are
    read as stored, but `load_pruned` restores the orders first (the in-memory prune's
    input), and the result would silently differ and lose them."""
    source = CheckpointSource(resolve_checkpoint(src))
    if (source.directory / PERMUTATION_FILE).exists():
        raise InvalidArgumentError(
            f"{source.directory} was saved by ria with channel orders ({PERMUTATION_FILE}), "
            "which the streaming prune cannot apply to its blocks; prune it in memory: "
            "ria.load_pruned then ria.prune (CLI: ria prune without --low-memory)"
        )
    return source


def _activation_bytes(model: PreTrainedModel, config: PruneConfig) -> int:
    """Bytes of the calibration hidden states entering one block."""
    weight = model.get_input_embeddings().weight
    assert isinstance(weight, torch.Tensor)
    return config.nsamples * config.seqlen * int(weight.shape[1]) * int(weight.element_size())


def _physical_memory() -> int:
    """The host's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@contextmanager
def _spill_directory(out: Path) -> Iterator[Path]:
    """A directory beside `out` (same disk as the output), deleted on exit; named with this
    process's id like the staging directory, so that the next write of `out` removes it
    if this process is killed (`ria.save.remove_stale_staging`)."""
    spill = sibling(out, "activations")
    spill.mkdir(parents=True)
    try:
        yield spill
    finally:
        shutil.rmtree(spill, ignore_errors=True)


def _config(prune_kwargs: dict[str, Any]) -> PruneConfig:
    """`ria.prune`'s settings as one validated `PruneConfig`."""
    known = PruneConfig.defaults()
    for name in prune_kwargs:
        if name not in known:
            raise InvalidArgumentError(
                f"unknown setting {name!r}; ria.prune's settings are {', '.join(known)}"
            )
    settings = dict(prune_kwargs)
    if settings.get("permutation_options") is None:
        settings.pop("permutation_options", None)
    return PruneConfig(**settings)


def _own_tokenizer(directory: Path) -> Any:
    """The checkpoint's tokenizer, or None when it has none."""
    if not any(
        (directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")
    ):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


class _StreamedBlocks:
    """A `ria.pruning.Placement` for a skeleton model: visiting block i loads it from the
    source onto the device; a visit that ends without an error writes the block's plain
    tensors as the next shard (its channel orders are kept for the orders file) and
    frees it. The first visit first writes and frees the weights outside the blocks:
    by then the calibration capture, which needs the embeddings, is done. Without
    `staging` (a rank other than 0 of a prune split over processes) nothing is written."""

    def __init__(
        self,
        model: PreTrainedModel,
        source: CheckpointSource,
        staging: Path | None,
        device: torch.device,
        names: StoredNames,
    ) -> None:
        self.model, self.source, self.staging, self.device = model, source, staging, device
        self.names = names
        self.path, blocks = find_blocks(model)
        self.index = {id(block): i for i, block in enumerate(blocks)}
        self.writer = None if staging is None else ShardWriter(staging, len(blocks) + 1)
        self.orders: dict[str, torch.Tensor] = {}
        self.order_infos: dict[str, OrderInfo] = {}
        self.outside_written = False

    @contextmanager
    def __call__(
        self, model: nn.Module, blocks: nn.ModuleList, device: torch.device
    ) -> Iterator[Any]:
        if device != self.device:
            raise InvalidArgumentError(f"streamed blocks run on {self.device}, not {device}")
        yield self.visit

    @contextmanager
    def visit(self, block: nn.Module) -> Iterator[nn.Module]:
        if not self.outside_written:
            self._write_outside()
        where = f"{self.path}.{self.index[id(block)]}"
        try:
            load_block(block, where, self.source, self.device, self.names)
            yield block
            if self.writer is None:
                return
            state, orders, infos = plain_state_dict(self.model, where)
            # under the checkpoint's names, as save_pruned's save_pretrained writes them
            self.writer.write(self.names.revert(state) if self.names.used else state)
            self.orders.update(orders)
            self.order_infos.update(infos)
        finally:
            block.to("meta")
            release_freed_memory()

    def _write_outside(self) -> None:
        """Writes the weights outside the blocks through `save_pretrained` (which drops
        tied aliases and writes the config files) as the first shard, then frees them."""
        if self.staging is not None and self.writer is not None:
            keys = set(outside_keys(self.model, self.path))
            state = {k: v for k, v in self.model.state_dict().items() if k in keys}
            write_pretrained(self.model, self.staging, state)
            self.writer.adopt(self.staging / SINGLE_FILE)
        free_outside(self.model, self.path)
        release_freed_memory()
        self.outside_written = True

    def finish(self) -> None:
        """Writes the index and the channel orders once every block is written."""
        assert self.staging is not None and self.writer is not None
        if not self.outside_written:
            self._write_outside()  # a model without blocks to visit
        self.writer.finish(self.model.num_parameters())
        save_orders(self.staging, self.orders, self.order_infos)
