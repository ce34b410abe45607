"""Deployable channel permutation for N:M sparsity: finding which modules of a block read
the same tensor (`block_layout`, by tracing one forward), finding the block's input
orders (`search_block`, on the Rust solver), applying them so the model computes the same
function (`apply_block`, `ChannelGather`, `GatheredLinear`, then `settle_orders`: a
Linear's own order as its `nm_order`), and taking them out of / back
into plain checkpoints (`plain_state_dict`, `restore_orders`). See ARCHITECTURE.md for the
contract: which orders are shared, folded into weights, or gathered.
"""

from .apply import (
    BlockPermutation,
    ChannelGather,
    GatheredLinear,
    GroupOrder,
    LinearOrder,
    Orders,
    apply_block,
    apply_recorded_orders,
    group_order,
    input_gather,
    is_permuted,
    matrix_orders,
    nm_order,
    reorders,
    settle_orders,
    weight_in_nm_order,
)
from .checkpoint import OrderInfo, plain_state_dict, restore_orders
from .search import (
    PERMUTATION_MODES,
    BlockSearch,
    PermutationMode,
    SearchJob,
    SearchStats,
    search_block,
)
from .wiring import BlockLayout, InputGroup, block_layout, block_readers

__all__ = [
    "PERMUTATION_MODES",
    "BlockLayout",
    "BlockPermutation",
    "BlockSearch",
    "ChannelGather",
    "GatheredLinear",
    "GroupOrder",
    "InputGroup",
    "LinearOrder",
    "OrderInfo",
    "Orders",
    "PermutationMode",
    "SearchJob",
    "SearchStats",
    "apply_block",
    "apply_recorded_orders",
    "block_layout",
    "block_readers",
    "group_order",
    "input_gather",
    "is_permuted",
    "matrix_orders",
    "nm_order",
    "plain_state_dict",
    "reorders",
    "restore_orders",
    "search_block",
    "settle_orders",
    "weight_in_nm_order",
]
