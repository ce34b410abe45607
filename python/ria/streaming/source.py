"""Reading a safetensors checkpoint tensor by tensor: where it is (a local directory, or a
Hub id resolved to the files already in the local Hugging Face cache, never downloaded),
which shard holds each tensor, and loading only the tensors asked for."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import InvalidArgumentError

__all__ = ["CheckpointSource", "resolve_checkpoint"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_FLOAT_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


def resolve_checkpoint(src: str | Path) -> Path:
    """The local directory of checkpoint `src`: an existing directory, or a Hub id
    (`org/name`) whose snapshot is in the local Hugging Face cache (nothing is
    downloaded: the streaming prune is for checkpoints too big to fetch casually)."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path.resolve()
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(src), local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError) as exc:
        raise InvalidArgumentError(
            f"checkpoint {str(src)!r} is neither a directory nor a Hub id in the local "
            f"Hugging Face cache ({type(exc).__name__}); download it first "
            f"(`hf download {src}`) or give its directory"
        ) from None


class CheckpointSource:
    """The tensors of a safetensors checkpoint directory (one file, or shards with an
    index), read on demand: only the requested keys are copied into memory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.files, self.index_metadata = _weight_map(directory)

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def first_float_dtype(self) -> torch.dtype | None:
        """What `dtype="auto"` falls back to when the config names no dtype, as in
        transformers: the index's `metadata.dtype`, else the first floating-point tensor of
        the first file (in that file's order)."""
        named = self.index_metadata.get("dtype")
        if isinstance(named, str) and isinstance(getattr(torch, named, None), torch.dtype):
            return getattr(torch, named)  # type: ignore[no-any-return]
        with safe_open(self.directory / min(self.files.values()), framework="pt") as f:
            names = f.keys()  # in the file's order, as transformers reads them
            for key in names:
                dtype = f.get_slice(key).get_dtype()
                if dtype in _FLOAT_DTYPES:
                    return _FLOAT_DTYPES[dtype]
        return None

    def load(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors named `keys`, on the CPU, each shard opened once."""
        by_file: dict[str, list[str]] = {}
        for key in keys:
            if key not in self.files:
                raise InvalidArgumentError(
                    f"{self.directory} has no tensor {key!r}, which the model built from its "
                    "config expects (checkpoints whose tensor names transformers converts on "
                    "loading are not supported by the streaming prune)"
                )
            by_file.setdefault(self.files[key], []).append(key)
        out = {}
        for name, names in by_file.items():
            with safe_open(self.directory / name, framework="pt", device="cpu") as f:
                for key in names:
                    out[key] = f.get_tensor(key)
        return out


def _weight_map(directory: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """Tensor name -> file name (relative to `directory`), and the index's `metadata` (empty
    for a single file). A single file wins over an index beside it, as in transformers'
    `from_pretrained`."""
    single = directory / SINGLE_FILE
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), SINGLE_FILE), {}
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            content = json.loads(index.read_text("utf-8"))
            weight_map = content["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidArgumentError(f"{index} is not a safetensors index: {exc}") from None
        if not isinstance(weight_map, dict):
            raise InvalidArgumentError(f"{index}: 'weight_map' is not an object")
        metadata = content.get("metadata")
        return (
            {str(k): str(v) for k, v in weight_map.items()},
            metadata if isinstance(metadata, dict) else {},
        )
    raise InvalidArgumentError(
        f"{directory} has neither {INDEX_FILE} nor {SINGLE_FILE}: the streaming prune reads "
        "safetensors checkpoints only"
    )
