"""ria-rs: RIA post-training pruning for large language models, with a Rust core.

Pipeline: `prune(model, tokenizer, sparsity="2:4", permute=True)`, then `save_pruned` /
`load_pruned`; on NVIDIA GPUs `sparsify(model)` swaps 2:4 layers for sparse kernels and
`generate` decodes under CUDA graphs; `ria.eval` measures perplexity and zero-shot
accuracy. Core API (numpy arrays or torch tensors in, numpy arrays out): `ria_score`,
`wanda_score`, `magnitude_score`, `nm_mask`, `unstructured_mask`, `retained_score`,
`search_permutation`.
"""

from ._core import __version__
from .core import (
    PermutationResult,
    magnitude_score,
    nm_mask,
    retained_score,
    ria_score,
    search_permutation,
    unstructured_mask,
    wanda_score,
)
from .pipeline import Sparsity, prune
from .report import LayerReport, PruneReport
from .save import load_pruned, save_pruned
from .sparse import Sparse24Linear, SparsifyReport, StaticGenerator, generate, sparsify

__all__ = [
    "LayerReport",
    "PermutationResult",
    "PruneReport",
    "Sparse24Linear",
    "SparsifyReport",
    "Sparsity",
    "StaticGenerator",
    "__version__",
    "generate",
    "load_pruned",
    "magnitude_score",
    "nm_mask",
    "prune",
    "retained_score",
    "ria_score",
    "save_pruned",
    "search_permutation",
    "sparsify",
    "unstructured_mask",
    "wanda_score",
]
