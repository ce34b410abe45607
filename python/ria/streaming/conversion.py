"""The names a checkpoint stores its tensors under, against the model's own: transformers
renames and converts some on loading (the fused experts of Mixtral, Qwen3-MoE or
DeepSeek-V3, stored one expert at a time; a vision-language model's `language_model.model.*`
prefixes). Its own conversion mapping says which stored tensors make each part of the
model (a block, or the weights outside the blocks), and its loader converts one part at a
time. The transforms that matched a stored name are recorded on the model as
`from_pretrained` records them, so saving reverts exactly those: the streamed checkpoint
keeps the layout of the one read."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch

from .source import CheckpointSource

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["StoredNames"]


class StoredNames:
    """Which stored tensors of `source` make each part of `model` (block i under
    `blocks_path`, or everything outside the blocks) once renamed and converted as
    `from_pretrained` would, and loading a part through them.

    Built from names only (no tensor is read). Sets `model._weight_conversions` to the
    transforms some stored name matched, as `from_pretrained` does, so `save_pretrained`
    and `revert` write the names the checkpoint uses."""

    def __init__(self, model: PreTrainedModel, source: CheckpointSource, blocks_path: str) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            MergeModulelist,
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
        self.made: set[str] = set()  # model tensors some stored tensor makes
        self.parts: dict[str | None, list[str]] = {}  # part (None: outside) -> stored names
        stacked: dict[tuple[str, str], int] = {}  # (fused target, pattern) -> stored pieces
        for key in source.files:
            target, pattern = rename_source_key(
                key, renamings, converters, model.base_model_prefix, expected
            )
            if pattern is None:
                targets = [target]
            else:  # a converter may make several tensors (a fused qkv split in three)
                converter = by_pattern[pattern]
                first, *_ = converter.target_patterns
                targets = [target.replace(first, t) for t in converter.target_patterns]
                if any(isinstance(op, MergeModulelist) for op in converter.operations):
                    stacked[(target, pattern)] = stacked.get((target, pattern), 0) + 1
            self.made.update(t for t in targets if t in expected)
            self.parts.setdefault(self.part_of(target), []).append(key)
        # A fused tensor stacks one stored piece per expert: one missing leaves it unmade.
        for (target, _), pieces in stacked.items():
            if target in expected and pieces != expected[target].shape[0]:
                self.made.discard(target)
        self.used = [t for t in self.mapping if t.was_used()]
        model.__dict__["_weight_conversions"] = self.used  # what from_pretrained records

    def part_of(self, key: str) -> str | None:
        """`blocks_path.i` for a key inside block i, else None (outside the blocks)."""
        head = f"{self.blocks_path}."
        if not key.startswith(head):
            return None
        index, _, _ = key[len(head) :].partition(".")
        return f"{head}{index}" if index.isdigit() else None

    def missing(self, keys: list[str]) -> list[str]:
        """Those of the model's tensors `keys` that no stored tensor makes."""
        return [k for k in keys if k not in self.made]

    def load(self, part: str | None, device: torch.device) -> None:
        """Loads `part` (`blocks_path.i`, or None: the weights outside the blocks) converted
        as `from_pretrained` would, in the skeleton's dtypes, onto `device` (the part's
        tensors the checkpoint lacks stay on the meta device)."""
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        tensors = self.source.load(self.parts.get(part, []))
        config = LoadStateDictConfig(device_map={"": str(device)}, weight_mapping=self.mapping)  # type: ignore[arg-type]
        extra: dict[str, Any] = {}
        if "tp_plan" in inspect.signature(convert_and_load_state_dict_in_model).parameters:
            extra["tp_plan"] = None  # transformers < 5.2x: a required argument
        try:
            convert_and_load_state_dict_in_model(self.model, tensors, config, **extra)
        finally:  # it records the part's transforms only: keep the whole checkpoint's
            self.model.__dict__["_weight_conversions"] = self.used

    def revert(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`state` (the model's names) under the checkpoint's names, as `save_pretrained`
        writes it."""
        from transformers.core_model_loading import revert_weight_conversion

        reverted: dict[str, torch.Tensor] = revert_weight_conversion(self.model, state)
        return reverted
