"""A model built from a checkpoint's config with no memory behind its weights (meta
device), and the few weights outside the decoder blocks (embeddings, final norm, LM head)
loaded for real; the blocks are loaded one at a time by the streaming prune."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..errors import InvalidArgumentError
from .conversion import ConvertedBlocks
from .source import CheckpointSource

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = [
    "DTYPES",
    "UnreadableByBlockError",
    "block_reader",
    "build_skeleton",
    "check_dtype",
    "free_outside",
    "load_block",
    "load_outside",
    "outside_keys",
]

DTYPES = ("auto", "float32", "bfloat16", "float16")


def build_skeleton(source: CheckpointSource, dtype: str | torch.dtype = "auto") -> PreTrainedModel:
    """The causal LM of `source`'s config, every weight on the meta device, in `dtype`
    ("auto": the config's dtype, else the checkpoint's first floating tensor's, as
    `from_pretrained(dtype="auto")` chooses), but what `from_pretrained` keeps in
    float32. Buffers computed at construction (rotary frequencies) are real."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source.directory)
    resolved = _resolve(dtype, config, source)
    with init_empty_weights(include_buffers=False):
        model: PreTrainedModel = AutoModelForCausalLM.from_config(config, dtype=resolved)
    _keep_in_fp32(model, resolved)
    model.eval()
    return model


def _keep_in_fp32(model: PreTrainedModel, dtype: torch.dtype) -> None:
    """Gives the weights `from_pretrained(dtype=dtype)` keeps in float32 (the model's
    `_keep_in_fp32_modules` in float16, `_keep_in_fp32_modules_strict` in float16 and
    bfloat16) that dtype here too: `from_config` ignores those lists, and blocks must be
    pruned and saved as the in-memory prune does. Transformers' own rule and matching."""
    from accelerate.utils import set_module_tensor_to_device
    from transformers.core_model_loading import build_glob_alternation

    plan: dict[str, torch.dtype] = model._get_dtype_plan(dtype)
    if not plan:
        return
    pattern, group_to_key = build_glob_alternation(list(plan))[:2]
    for name, tensor in model.state_dict(keep_vars=True).items():
        match = pattern.search(name)
        if match is None or match.lastgroup is None or not tensor.is_floating_point():
            continue
        kept = plan[group_to_key[match.lastgroup]]
        set_module_tensor_to_device(model, name, tensor.device, value=tensor.to(kept), dtype=kept)


def check_dtype(dtype: object) -> None:
    """Refuses a dtype that is neither a floating `torch.dtype` nor one of `DTYPES`."""
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise InvalidArgumentError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")


def _resolve(dtype: str | torch.dtype, config: Any, source: CheckpointSource) -> torch.dtype:
    check_dtype(dtype)
    if isinstance(dtype, torch.dtype):
        return dtype
    named: Any = getattr(config, "dtype", None) if dtype == "auto" else dtype
    if isinstance(named, str):
        named = getattr(torch, named, None)
    if isinstance(named, torch.dtype):
        return named
    return source.first_float_dtype() or torch.float32


def outside_keys(model: torch.nn.Module, blocks_path: str) -> list[str]:
    """The state-dict keys of everything outside the decoder blocks."""
    return [k for k in model.state_dict() if not k.startswith(f"{blocks_path}.")]


def load_outside(
    model: PreTrainedModel, source: CheckpointSource, blocks_path: str, device: torch.device
) -> None:
    """Loads the weights outside the blocks onto `device` (tied ones, like an LM head
    sharing the embedding, are tied again rather than read) and moves the buffers there."""
    expected = model.state_dict()
    keys = outside_keys(model, blocks_path)
    tensors = source.load(k for k in keys if k in source)
    model.load_state_dict(
        {k: _cast(t, expected[k].dtype).to(device) for k, t in tensors.items()},
        strict=False,
        assign=True,
    )
    model.tie_weights()
    from accelerate.utils import set_module_tensor_to_device

    for name, buffer in model.named_buffers():
        if not name.startswith(f"{blocks_path}.") and buffer.device != device:
            set_module_tensor_to_device(model, name, device)
    missing = [
        name
        for name, param in model.named_parameters()
        if param.is_meta and not name.startswith(f"{blocks_path}.")
    ]
    if missing:
        raise UnreadableByBlockError(
            f"{source.directory} has no tensor {missing[0]!r} (and it is not tied to one "
            "that it has)"
        )


class UnreadableByBlockError(InvalidArgumentError):
    """A checkpoint whose blocks cannot be read by name: some block tensor the model
    expects is stored neither under its own name nor under one transformers converts."""


def block_reader(
    model: torch.nn.Module, source: CheckpointSource, blocks_path: str
) -> ConvertedBlocks | None:
    """How `load_block` reads the blocks under `blocks_path`: None when every block
    tensor is stored under the model's own name, else the conversions transformers applies
    on loading (experts stored one by one, say). Fails, before any work, when some block
    tensor is made by no checkpoint tensor."""
    head = f"{blocks_path}."
    if all(k in source for k in model.state_dict() if k.startswith(head)):
        return None
    converted = ConvertedBlocks(model, source, blocks_path)  # type: ignore[arg-type]
    missing = converted.missing()
    if missing:
        raise UnreadableByBlockError(
            f"{source.directory} has no tensor {missing[0]!r} ({len(missing)} block tensors "
            "missing), which the model built from its config expects, under that name or "
            "one transformers converts on loading"
        )
    return converted


def load_block(
    block: torch.nn.Module,
    prefix: str,
    source: CheckpointSource,
    device: torch.device,
    converted: ConvertedBlocks | None = None,
) -> None:
    """Loads one block's weights (state-dict keys under `prefix.`) onto `device`, through
    `converted` (from `block_reader`) when given."""
    if converted is not None:
        converted.load(block, prefix, device)
        return
    expected = block.state_dict()
    tensors = source.load(f"{prefix}.{k}" for k in expected)
    block.load_state_dict(
        {k: _cast(tensors[f"{prefix}.{k}"], t.dtype) for k, t in expected.items()},
        assign=True,
    )
    block.to(device)


def free_outside(model: torch.nn.Module, blocks_path: str) -> None:
    """Puts every parameter outside the blocks (tied aliases included) back on the meta
    device, releasing its memory."""
    from accelerate.utils import set_module_tensor_to_device

    for name, _ in model.named_parameters(remove_duplicate=False):
        if not name.startswith(f"{blocks_path}."):
            set_module_tensor_to_device(model, name, "meta")


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in the model's dtype (floating tensors only, as `from_pretrained` does)."""
    return tensor.to(dtype) if tensor.is_floating_point() and dtype.is_floating_point else tensor
