"""GPU runtime for 2:4-pruned models: `sparsify` swaps 2:4 `nn.Linear` layers for
`Sparse24Linear` (cuSPARSELt for many tokens, an own Triton kernel over a compact 2:4
format for few, dense cuBLAS where it measures faster), and `generate` decodes with a
static KV cache under CUDA-graph replay.

Importing this package needs neither CUDA nor triton; without CUDA `sparsify` is a no-op
whose report says why.
"""

from .cslt import CsltConfig
from .format import Compact24, check_24, count_24_violations, pack_24, unpack_24
from .generate import StaticGenerator, generate
from .linear import Choice, Sparse24Linear
from .sparsify import DEFAULT_BATCH_SIZES, SparseLayerReport, SparsifyReport, find_linears, sparsify
from .triton_gemv import sparse24_linear

__all__ = [
    "DEFAULT_BATCH_SIZES",
    "Choice",
    "Compact24",
    "CsltConfig",
    "Sparse24Linear",
    "SparseLayerReport",
    "SparsifyReport",
    "StaticGenerator",
    "check_24",
    "count_24_violations",
    "find_linears",
    "generate",
    "pack_24",
    "sparse24_linear",
    "sparsify",
    "unpack_24",
]
