"""Finding one block's deployable input orders from its score matrices, in one of two
modes (`PERMUTATION_MODES`):

- "folded": q/k/v share one order (their scores stacked), gate/up share one, down has its
  own, and o_proj gets one within-head order per key/value head, shared by that head's
  query heads. Every order is carried by the modules around it: no run-time cost.
- "free": every Linear its own order, searched on its scores alone, applied by gathering
  its input; where the family allows a free fold (down's order into gate/up rows) it is
  folded instead. Keeps more score; costs a gather per Linear unless a kernel fuses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import torch

from ..arch import BlockSpec, Heads
from ..core import PermutationResult, SearchOptions, search_permutation
from ..errors import InvalidArgumentError
from .apply import BlockPermutation

PermutationMode = Literal["folded", "free"]
PERMUTATION_MODES: tuple[str, ...] = get_args(PermutationMode)


@dataclass(frozen=True)
class SearchStats:
    """What one permutation search achieved, in score units (see `PermutationResult`)."""

    retained: float
    identity: float
    upper_bound: float
    seconds: float

    @property
    def efficacy(self) -> float:
        gap = self.upper_bound - self.identity
        return (
            1.0 if gap <= 1e-12 * abs(self.upper_bound) else (self.retained - self.identity) / gap
        )

    def to_dict(self) -> dict[str, float]:
        """The stats as the report records them (score units; seconds)."""
        return {
            "retained": self.retained,
            "identity": self.identity,
            "upper_bound": self.upper_bound,
            "efficacy": self.efficacy,
            "seconds": self.seconds,
        }

    @classmethod
    def of(cls, results: list[PermutationResult]) -> SearchStats:
        return cls(
            sum(r.retained for r in results),
            sum(r.identity for r in results),
            sum(r.upper_bound for r in results),
            sum(r.seconds for r in results),
        )


def search_block(
    scores: dict[str, np.ndarray],
    spec: BlockSpec | None,
    heads: Heads | None,
    n: int,
    m: int,
    options: SearchOptions | dict[str, Any],
    mode: PermutationMode = "folded",
) -> tuple[BlockPermutation, dict[str, SearchStats]]:
    """Input orders for one block and, per Linear name, the stats of the search that
    decided its order, every search run with `options` (or a dict of their settings).

    `scores` holds every Linear of the block to be permuted, `(out, in)` float32. The
    "folded" mode needs the family's `spec` and `heads`; "free" uses them, when given,
    only to fold down's order into gate/up rows."""
    if isinstance(options, dict):
        options = SearchOptions(**options)
    perm = BlockPermutation()
    stats: dict[str, SearchStats] = {}

    def solve(names: tuple[str, ...]) -> torch.Tensor:
        result = search_permutation([scores[x] for x in names], n, m, options)
        for x in names:
            stats[x] = SearchStats.of([result])
        return torch.from_numpy(result.perm)

    if mode == "free":
        folded = spec.mlp_output if spec is not None else None
        if folded is not None:
            perm.mlp_hidden = solve((folded,))
        perm.inputs = {name: solve((name,)) for name in scores if name != folded}
        return perm, stats
    if spec is None or heads is None:
        raise InvalidArgumentError("the folded mode needs the family's block spec and heads")
    perm.attn = solve(spec.attn_inputs)
    perm.mlp = solve(spec.mlp_inputs)
    perm.mlp_hidden = solve((spec.mlp_output,))
    if heads.head_dim % m == 0:
        perm.o_heads, stats[spec.o_proj] = _search_heads(scores[spec.o_proj], heads, n, m, options)
    return perm, stats


def _search_heads(
    score: np.ndarray, heads: Heads, n: int, m: int, options: SearchOptions
) -> tuple[torch.Tensor, SearchStats]:
    """One within-head order per key/value head: the N:M groups of o_proj never straddle
    heads (m divides head_dim), so the objective splits into one problem per key/value
    head over the column blocks of its query heads."""
    group = heads.num_heads // heads.num_kv_heads
    d = heads.head_dim
    orders, results = [], []
    for kv in range(heads.num_kv_heads):
        blocks = [score[:, h * d : (h + 1) * d] for h in range(kv * group, (kv + 1) * group)]
        result = search_permutation(blocks, n, m, options)
        orders.append(torch.from_numpy(result.perm))
        results.append(result)
    return torch.stack(orders), SearchStats.of(results)
