"""GPU runtime for 2:4-pruned models: `sparsify` swaps 2:4 `nn.Linear` layers for
`Sparse24Linear` (cuSPARSELt for many tokens; for few, own decode kernels: `mma.sp` sparse
tensor cores over a fragment-packed layout, or Triton over a compact 2:4 format; dense
cuBLAS only where the user opts in), and `generate` decodes with a
static KV cache under CUDA-graph replay (greedy or sampled, EOS, left padding), keeping
its graphs across calls. Linears that read the same tensor (q/k/v, gate/up) run fused, as
one `FusedLinear` served to `SiblingLinear`s.

Importing this package needs neither CUDA nor triton; without CUDA `sparsify` is a no-op
whose report says why.
"""

from .cslt import CsltConfig
from .format import (
    Compact24,
    Mma24,
    check_24,
    count_24_violations,
    pack_24,
    pack_mma24,
    unpack_24,
    unpack_mma24,
)
from .generate import StaticGenerator, cached_generator, clear_generators, generate
from .linear import Choice, Sparse24Linear
from .mma_sp import MmaConfig, mma24_linear
from .plan_cache import PlanCache, TunedPlan
from .sampling import Sampling
from .siblings import FusedLinear, SiblingLinear
from .sparsify import DEFAULT_BATCH_SIZES, SparseLayerReport, SparsifyReport, find_linears, sparsify
from .triton_gemv import sparse24_linear

__all__ = [
    "DEFAULT_BATCH_SIZES",
    "Choice",
    "Compact24",
    "CsltConfig",
    "FusedLinear",
    "Mma24",
    "MmaConfig",
    "PlanCache",
    "Sampling",
    "SiblingLinear",
    "Sparse24Linear",
    "SparseLayerReport",
    "SparsifyReport",
    "StaticGenerator",
    "TunedPlan",
    "cached_generator",
    "check_24",
    "clear_generators",
    "count_24_violations",
    "find_linears",
    "generate",
    "mma24_linear",
    "pack_24",
    "pack_mma24",
    "sparse24_linear",
    "sparsify",
    "unpack_24",
    "unpack_mma24",
]
