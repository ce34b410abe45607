"""Deployable channel permutation for N:M sparsity: finding one block's input orders
(`search_block`, on the Rust solver), applying them so the model computes the same
function (`apply_block`, `ChannelGather`, `GatheredLinear`), and taking them out of / back
into plain checkpoints (`plain_state_dict`, `restore_orders`). See ARCHITECTURE.md for the contract:
which orders are shared, folded into weights, or gathered.
"""

from .apply import (
    BlockPermutation,
    ChannelGather,
    GatheredLinear,
    apply_block,
    is_permuted,
    linear_orders,
    permute_columns,
    permute_rows,
)
from .checkpoint import plain_state_dict, restore_orders
from .search import PERMUTATION_MODES, PermutationMode, SearchStats, search_block

__all__ = [
    "PERMUTATION_MODES",
    "BlockPermutation",
    "ChannelGather",
    "GatheredLinear",
    "PermutationMode",
    "SearchStats",
    "apply_block",
    "is_permuted",
    "linear_orders",
    "permute_columns",
    "permute_rows",
    "plain_state_dict",
    "restore_orders",
    "search_block",
]
