"""Blocks of checkpoints stored under the names transformers converts on loading (the fused
experts of Mixtral, Qwen3-MoE or DeepSeek-V3, saved one expert at a time and fused by
`from_pretrained`): transformers' own conversion mapping says which checkpoint tensors
make each block, and its loader converts one block's tensors at a time. Saving reverts
the conversion as `save_pretrained` does, so the streamed checkpoint keeps the layout of
the one read."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch

from .source import CheckpointSource

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["ConvertedBlocks"]

_ABSENT = object()


class ConvertedBlocks:
    """Which checkpoint tensors of `source` make each block under `blocks_path` once
    renamed and converted as `from_pretrained` would, and loading them block by block.

    Only names are read here (no tensor): `missing` tells, before any work, which block
    tensors of `model` no checkpoint tensor makes."""

    def __init__(self, model: PreTrainedModel, source: CheckpointSource, blocks_path: str) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )

        self.model, self.source, self.blocks_path = model, source, blocks_path
        self.mapping = get_model_conversion_mapping(model)
        renamings = [t for t in self.mapping if isinstance(t, WeightRenaming)]
        converters = [t for t in self.mapping if isinstance(t, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        expected = model.state_dict()
        self.made: set[str] = set()  # block tensors some checkpoint tensor makes
        self.sources: dict[str, list[str]] = {}  # block prefix -> its checkpoint tensors
        for key in source.files:
            target, pattern = rename_source_key(
                key, renamings, converters, model.base_model_prefix, expected
            )
            if pattern is None:
                targets = [target]
            else:  # a converter may make several tensors (a fused qkv split in three)
                first, *_ = by_pattern[pattern].target_patterns
                targets = [target.replace(first, t) for t in by_pattern[pattern].target_patterns]
            prefix = self._block_of(target)
            if prefix is not None:
                self.made.update(t for t in targets if t in expected)
                self.sources.setdefault(prefix, []).append(key)

    def _block_of(self, key: str) -> str | None:
        """`blocks_path.i` for a key inside block i, else None."""
        head = f"{self.blocks_path}."
        if not key.startswith(head):
            return None
        index, _, _ = key[len(head) :].partition(".")
        return f"{head}{index}" if index.isdigit() else None

    def missing(self) -> list[str]:
        """The block tensors of the model that no checkpoint tensor makes."""
        head = f"{self.blocks_path}."
        return [k for k in self.model.state_dict() if k.startswith(head) and k not in self.made]

    def load(self, block: torch.nn.Module, prefix: str, device: torch.device) -> None:
        """Loads block `prefix` (`blocks_path.i`) converted as `from_pretrained` would, in
        the skeleton's dtypes, onto `device`."""
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        tensors = self.source.load(self.sources.get(prefix, []))
        config = LoadStateDictConfig(device_map={"": "cpu"}, weight_mapping=self.mapping)  # type: ignore[arg-type]
        extra: dict[str, Any] = {}
        if "tp_plan" in inspect.signature(convert_and_load_state_dict_in_model).parameters:
            extra["tp_plan"] = None  # transformers < 5.2x: a required argument
        before = self.model.__dict__.get("_weight_conversions", _ABSENT)
        try:
            convert_and_load_state_dict_in_model(self.model, tensors, config, **extra)
        finally:  # it records the block's conversions, which `revert` must not take alone
            if before is _ABSENT:
                self.model.__dict__.pop("_weight_conversions", None)
            else:
                self.model.__dict__["_weight_conversions"] = before
        for name, tensor in block.state_dict(keep_vars=True).items():
            if tensor.is_meta:
                raise RuntimeError(
                    f"transformers' conversion left {prefix}.{name} unloaded (a tensor of "
                    f"the wrong shape in {self.source.directory}?)"
                )
        block.to(device)

    def revert(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`state` (the model's names) under the checkpoint's names, as `save_pretrained`
        writes it."""
        from transformers.core_model_loading import revert_weight_conversion

        reverted: dict[str, torch.Tensor] = revert_weight_conversion(self.model, state)
        return reverted
