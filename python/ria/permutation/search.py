"""Finding one block's deployable input orders from its score matrices, in one of two
modes (`PERMUTATION_MODES`):

- "folded": the matrices of every traced input group share one order (their scores
  stacked: q/k/v; gate/up; a MoE block's experts with its shared experts), applied once
  per group; each fold's down (a Linear, or every expert's own) has its own order, and
  o_proj one within-head order per key/value head, shared by that head's query heads,
  both carried by the rows that make their input: no run-time cost.
- "free": every Linear its own order, searched on its scores alone, applied by gathering
  its input; where the block has an MLP fold (down's order into gate/up rows) it is
  folded instead. Keeps more score; costs a gather per Linear unless a kernel fuses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import torch

from ..arch import Heads
from ..core import PermutationResult, SearchOptions, search_permutation
from .apply import BlockPermutation
from .wiring import BlockLayout

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
    layout: BlockLayout,
    n: int,
    m: int,
    options: SearchOptions | dict[str, Any],
    mode: PermutationMode = "folded",
) -> tuple[BlockPermutation, dict[str, SearchStats]]:
    """Input orders for one block and, per matrix name, the stats of the search that
    decided its order, every search run with `options` (or a dict of their settings).

    `scores` holds every matrix of the block to be permuted, `(out, in)` float32, named
    as `ria.pruning.block_matrices` names them. The "folded" mode permutes the groups
    and folds of `layout` (a group that cannot be applied keeps its order); "free" uses
    only its MLP folds."""
    if isinstance(options, dict):
        options = SearchOptions(**options)
    perm = BlockPermutation()
    stats: dict[str, SearchStats] = {}

    def solve(names: list[str]) -> torch.Tensor:
        result = search_permutation([scores[x] for x in names], n, m, options)
        for x in names:
            stats[x] = SearchStats.of([result])
        return torch.from_numpy(result.perm)

    for mlp in layout.mlps:
        if mlp.down in scores:
            perm.hidden[mlp.down] = solve([mlp.down])
    if mode == "free":
        perm.inputs = {name: solve([name]) for name in scores if name not in perm.hidden}
        return perm, stats
    for group in layout.groups:
        names = [x for r in group.readers for x in _group_matrices(r, scores, layout)]
        if group.carrier is not None and names:
            perm.shared[group.carrier] = solve(names)
    for fold in layout.experts:
        prefix = f"{fold.experts}.{fold.down}["
        for name in [x for x in scores if x.startswith(prefix)]:
            perm.hidden[name] = solve([name])
    for head in layout.heads:
        if head.o_proj in scores and head.heads.head_dim % m == 0:
            score = scores[head.o_proj]
            perm.heads[head.o_proj], stats[head.o_proj] = _search_heads(
                score, head.heads, n, m, options
            )
    return perm, stats


def _group_matrices(reader: str, scores: dict[str, np.ndarray], layout: BlockLayout) -> list[str]:
    """The scored matrices a group's reader holds: a Linear itself, or every expert's
    slice of fused experts' input parameter (`reader.gate_up_proj[e]`); none for a router."""
    if reader in scores:
        return [reader]
    ups = [f"{f.experts}.{f.up}[" for f in layout.experts if f.experts == reader]
    return [x for x in scores if x.startswith(tuple(ups))] if ups else []


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
