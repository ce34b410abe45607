"""ria-rs: RIA post-training pruning for large language models, with a Rust core.

Pipeline: `prune(model, tokenizer, sparsity="2:4", permute=True)`, then `save_pruned` /
`load_pruned`; `prune_checkpoint(src, out_dir, ...)` does both for a checkpoint bigger
than host memory, one decoder block at a time. On NVIDIA GPUs `sparsify(model)` swaps 2:4
layers for sparse kernels and `generate` decodes under CUDA graphs; `ria.eval` measures
perplexity and zero-shot accuracy. Core API (numpy arrays or torch tensors in, numpy
arrays out): `ria_score`, `wanda_score`, `magnitude_score`, `nm_mask`, `unstructured_mask`,
`kept_score`, `retained_score`, `search_permutation`, `search_permutations`,
`refine_mask`. Every error raised on purpose is a `ria.RiaError`.

The GPU runtime (`ria.sparse`, which imports triton) and `ria.eval` load on first use,
so `import ria` stays light on machines that only prune.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._core import __version__
from .core import (
    PermutationResult,
    RefineStats,
    SearchOptions,
    kept_score,
    magnitude_score,
    nm_mask,
    refine_mask,
    retained_score,
    ria_score,
    search_permutation,
    search_permutations,
    unstructured_mask,
    wanda_score,
)
from .errors import (
    CacheFullError,
    DistributedError,
    InputNotFoundError,
    InvalidArgumentError,
    InvalidTypeError,
    MissingDependencyError,
    OutputExistsError,
    RiaError,
    UnsupportedModelError,
)
from .pruning import LayerReport, PruneConfig, PruneReport, Sparsity, prune
from .save import load_pruned, save_pruned
from .streaming import prune_checkpoint

if TYPE_CHECKING:
    from . import eval, sparse
    from .sparse.generate import StaticGenerator, generate
    from .sparse.linear import Sparse24Linear
    from .sparse.sparsify import SparsifyReport, sparsify

# Attributes loaded on first access: name -> module that defines it.
_LAZY = {
    "eval": "ria.eval",
    "sparse": "ria.sparse",
    "Sparse24Linear": "ria.sparse",
    "SparsifyReport": "ria.sparse",
    "StaticGenerator": "ria.sparse",
    "generate": "ria.sparse",
    "sparsify": "ria.sparse",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'ria' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = module if module_name == f"ria.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CacheFullError",
    "DistributedError",
    "InputNotFoundError",
    "InvalidArgumentError",
    "InvalidTypeError",
    "LayerReport",
    "MissingDependencyError",
    "OutputExistsError",
    "PermutationResult",
    "PruneConfig",
    "PruneReport",
    "RefineStats",
    "RiaError",
    "SearchOptions",
    "Sparse24Linear",
    "SparsifyReport",
    "Sparsity",
    "StaticGenerator",
    "UnsupportedModelError",
    "__version__",
    "eval",
    "generate",
    "kept_score",
    "load_pruned",
    "magnitude_score",
    "nm_mask",
    "prune",
    "prune_checkpoint",
    "refine_mask",
    "retained_score",
    "ria_score",
    "save_pruned",
    "search_permutation",
    "search_permutations",
    "sparse",
    "sparsify",
    "unstructured_mask",
    "wanda_score",
]
