"""A model built from a checkpoint's config with no memory behind its weights (meta
device), and the few weights outside the decoder blocks (embeddings, final norm, LM head)
loaded for real; the blocks are loaded one at a time by the streaming prune."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..errors import InvalidArgumentError
from .conversion import StoredNames
from .source import CheckpointSource

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = [
    "DTYPES",
    "UnreadableByBlockError",
    "build_skeleton",
    "check_dtype",
    "free_outside",
    "load_block",
    "load_outside",
    "outside_keys",
    "stored_names",
]

DTYPES = ("auto", "float32", "bfloat16", "float16")


def build_skeleton(source: CheckpointSource, dtype: str | torch.dtype = "auto") -> PreTrainedModel:
    """The causal LM of `source`'s config, every weight on the meta device, in `dtype`
    ("auto": the config's dtype, else the checkpoint's first floating tensor's, as
    `from_pretrained(dtype="auto")` chooses), but what `from_pretrained` keeps in
    float32. Buffers computed at construction (rotary frequencies) are real; the
    checkpoint's generation config (sampling defaults, end-of-sequence ids) is read as
    `from_pretrained` reads it."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source.directory)
    resolved = _resolve(dtype, config, source)
    with init_empty_weights(include_buffers=False):
        model: PreTrainedModel = AutoModelForCausalLM.from_config(config, dtype=resolved)
    if (source.directory / "generation_config.json").is_file():  # as from_pretrained reads it
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(source.directory)
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
    model: PreTrainedModel,
    source: CheckpointSource,
    blocks_path: str,
    device: torch.device,
    names: StoredNames,
) -> None:
    """Loads the weights outside the blocks onto `device` (tied ones, like an LM head
    sharing the embedding, are tied again rather than read; stored under other names,
    through `names`) and moves the buffers there."""
    expected = model.state_dict()
    keys = outside_keys(model, blocks_path)
    tied = _tied_aliases(model)
    if all(k in source for k in keys if k not in tied):
        tensors = source.load(k for k in keys if k in source)
        model.load_state_dict(
            {k: _cast(t, expected[k].dtype).to(device) for k, t in tensors.items()},
            strict=False,
            assign=True,
        )
    else:
        names.load(None, device)
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


def _tied_aliases(model: PreTrainedModel) -> set[str]:
    """State-dict keys that alias another parameter (a tied LM head): read through it."""
    seen: dict[int, str] = {}
    aliases = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.add(name)
        seen.setdefault(id(param), name)
    return aliases


class UnreadableByBlockError(InvalidArgumentError):
    """A checkpoint whose blocks cannot be read by name: some block tensor the model
    expects is stored neither under its own name nor under one transformers converts."""


def stored_names(model: PreTrainedModel, source: CheckpointSource, blocks_path: str) -> StoredNames:
    """The names `source` stores the model's tensors under (`StoredNames`, which the
    loaders below read through). Fails, before any work, when some block tensor is made
    by no stored tensor."""
    names = StoredNames(model, source, blocks_path)
    head = f"{blocks_path}."
    missing = names.missing([k for k in model.state_dict() if k.startswith(head)])
    if missing:
        raise UnreadableByBlockError(
            f"{source.directory} has no tensor {missing[0]!r} ({len(missing)} block tensors "
            "missing), which the model built from its config expects, under that name or "
            "one transformers converts on loading"
        )
    return names


def load_block(
    block: torch.nn.Module,
    prefix: str,
    source: CheckpointSource,
    device: torch.device,
    names: StoredNames,
) -> None:
    """Loads one block's weights (state-dict keys under `prefix.`) onto `device`: by name,
    or through `names` when the checkpoint stores them under other names."""
    expected = block.state_dict()
    if all(f"{prefix}.{k}" in source for k in expected):
        tensors = source.load(f"{prefix}.{k}" for k in expected)
        block.load_state_dict(
            {k: _cast(tensors[f"{prefix}.{k}"], t.dtype) for k, t in expected.items()},
            assign=True,
        )
        block.to(device)
        return
    names.load(prefix, device)
    unloaded = [k for k, t in block.state_dict(keep_vars=True).items() if t.is_meta]
    if unloaded:
        raise UnreadableByBlockError(
            f"transformers' conversion left {prefix}.{unloaded[0]} unloaded: a stored "
            f"tensor of {source.directory} is missing or of the wrong shape"
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
