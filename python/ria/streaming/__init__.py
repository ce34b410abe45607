"""Pruning checkpoints bigger than host memory: `prune_checkpoint` streams decoder blocks
from safetensors shards through `ria.prune`'s block loop into a new checkpoint."""

from .prune import prune_checkpoint, prune_checkpoint_with, read_by_block
from .skeleton import DTYPES, UnreadableByBlockError
from .source import CheckpointSource, resolve_checkpoint

__all__ = [
    "DTYPES",
    "CheckpointSource",
    "UnreadableByBlockError",
    "prune_checkpoint",
    "prune_checkpoint_with",
    "read_by_block",
    "resolve_checkpoint",
]
