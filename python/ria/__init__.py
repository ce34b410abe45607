"""ria-rs: RIA post-training pruning for large language models, with a Rust core.

Core API (numpy arrays or torch tensors in, numpy arrays out):
`ria_score`, `wanda_score`, `magnitude_score`, `nm_mask`, `unstructured_mask`,
`retained_score`, `search_permutation`.
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

__all__ = [
    "PermutationResult",
    "__version__",
    "magnitude_score",
    "nm_mask",
    "retained_score",
    "ria_score",
    "search_permutation",
    "unstructured_mask",
    "wanda_score",
]
