"""Writing a checkpoint shard by shard, in the layout `transformers` reads:
`model-0000k-of-0000n.safetensors` files and `model.safetensors.index.json`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .source import INDEX_FILE, SINGLE_FILE

__all__ = ["ShardWriter"]


class ShardWriter:
    """Writes `shards` shards into `directory`, one `write` call each, then the index.

    Tensors are copied to the CPU shard by shard, so only one shard is ever held twice.
    """

    def __init__(self, directory: Path, shards: int) -> None:
        self.directory, self.shards = directory, shards
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def _next_name(self) -> str:
        written = len(set(self.weight_map.values()))
        if written == self.shards:
            raise RuntimeError(f"all {self.shards} shards are written already")
        return f"model-{written + 1:05d}-of-{self.shards:05d}.safetensors"

    def write(self, state: dict[str, torch.Tensor]) -> None:
        """Writes `state` (tensor name -> tensor, any device) as the next shard."""
        name = self._next_name()
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        save_file(cpu, self.directory / name, metadata={"format": "pt"})
        self._record(name)

    def adopt(self, path: Path) -> None:
        """Makes a safetensors file already written into the directory (by
        `save_pretrained`) the next shard, renaming it."""
        name = self._next_name()
        path.rename(self.directory / name)
        self._record(name)

    def _record(self, name: str) -> None:
        for key, size in _tensor_sizes(self.directory / name).items():
            self.weight_map[key] = name
            self.total_size += size

    def finish(self, total_parameters: int) -> None:
        """Writes the index (the shards must all be written)."""
        if len(set(self.weight_map.values())) != self.shards:
            raise RuntimeError("the index is written after the last shard")
        index = {
            "metadata": {"total_parameters": total_parameters, "total_size": self.total_size},
            "weight_map": dict(sorted(self.weight_map.items())),
        }
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        (self.directory / INDEX_FILE).write_text(text, encoding="utf-8")
        assert not (self.directory / SINGLE_FILE).exists()  # it would shadow the index


def _tensor_sizes(path: Path) -> dict[str, int]:
    """Bytes of every tensor in a safetensors file, from its header (no data is read):
    an 8-byte little-endian header length, then JSON with each tensor's `data_offsets`."""
    with path.open("rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return {
        key: entry["data_offsets"][1] - entry["data_offsets"][0]
        for key, entry in header.items()
        if key != "__metadata__"
    }
