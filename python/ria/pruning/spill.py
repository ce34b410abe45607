"""Calibration hidden states kept on disk instead of in memory (`prune_checkpoint` on a
model whose activations do not fit next to its blocks: 128 x 2048 tokens of an
8192-wide model are 4 GiB in bf16, twice while a block's outputs are computed)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["SpilledStates"]

_GENERATION = itertools.count()


class SpilledStates:
    """Hidden states of the calibration batches, one file per batch in `directory`.

    Behaves like the list of tensors the block loop keeps otherwise: `append` writes a
    batch (from any device) and iterating reads one batch at a time, on the CPU, so only
    the batch in use is in memory. Files round-trip tensors exactly, so a prune gives the
    same result either way. `discard` deletes the files (the loop calls it when a block's
    outputs have replaced its inputs)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.generation = next(_GENERATION)
        self.paths: list[Path] = []

    def fresh(self) -> SpilledStates:
        """An empty store in the same directory (for the next block's inputs)."""
        return SpilledStates(self.directory)

    def append(self, states: torch.Tensor) -> None:
        path = self.directory / f"hidden-{self.generation}-{len(self.paths)}.pt"
        torch.save(states.detach().cpu(), path)
        self.paths.append(path)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for path in self.paths:
            states: torch.Tensor = torch.load(path, weights_only=True)
            yield states

    def __len__(self) -> int:
        return len(self.paths)

    def discard(self) -> None:
        for path in self.paths:
            path.unlink(missing_ok=True)
        self.paths = []
