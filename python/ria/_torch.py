"""Small torch helpers shared by the subsystems: devices, nested moves, module swaps."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["default_device", "module_device", "move", "replace_module"]


def default_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def module_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter, else of its first buffer (rotary
    embeddings hold only buffers), else the CPU."""
    tensor: torch.Tensor | None = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def move(obj: Any, device: torch.device) -> Any:
    """`obj` with every tensor inside (tuples, lists, dicts) on `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(move(o, device) for o in obj)
    if isinstance(obj, list):
        return [move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: move(v, device) for k, v in obj.items()}
    return obj


def replace_module(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Puts `new` at `path` (dotted, relative to `root`) and returns what was there."""
    parent_name, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old: nn.Module = getattr(parent, child)
    setattr(parent, child, new)
    return old
