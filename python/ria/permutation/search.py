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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args

import numpy as np
import torch

from ..arch import Heads
from ..core import SearchOptions, search_permutations
from .apply import BlockPermutation
from .wiring import BlockLayout

PermutationMode = Literal["folded", "free"]
PERMUTATION_MODES: tuple[str, ...] = get_args(PermutationMode)


class SearchResult(Protocol):
    """What a block's search reads of one result (`ria.PermutationResult` has it)."""

    @property
    def perm(self) -> np.ndarray: ...
    @property
    def retained(self) -> float: ...
    @property
    def identity(self) -> float: ...
    @property
    def upper_bound(self) -> float: ...
    @property
    def seconds(self) -> float: ...


# Runs a block's searches: `search_permutations`, or a split over processes
# (ria.pruning.distributed) that returns the same results.
Searcher = Callable[[list[list[np.ndarray]], int, int, SearchOptions], Sequence[SearchResult]]


@dataclass(frozen=True)
class SearchStats:
    """What one permutation search achieved, in score units (see `PermutationResult`).
    `seconds` is the search's own wall-clock time; a block's searches run at once, so
    their seconds overlap and add up to more than the block's permutation stage."""

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
    def of(cls, results: Sequence[SearchResult]) -> SearchStats:
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
    searcher: Searcher = search_permutations,
) -> tuple[BlockPermutation, dict[str, SearchStats]]:
    """Input orders for one block and, per matrix name, the stats of the search that
    decided its order, every search run with `options` (or a dict of their settings).

    `scores` holds every matrix of the block to be permuted, `(out, in)` float32, named
    as `ria.pruning.block_matrices` names them. The "folded" mode permutes the groups
    and folds of `layout` (a group that cannot be applied keeps its order); "free" uses
    only its MLP folds. `searcher` runs the searches (all at once)."""
    if isinstance(options, dict):
        options = SearchOptions(**options)
    jobs = _Jobs()
    hidden = {
        mlp.down: jobs.linears((mlp.down,), scores) for mlp in layout.mlps if mlp.down in scores
    }
    if mode == "free":
        inputs = {name: jobs.linears((name,), scores) for name in scores if name not in hidden}
        results = jobs.run(n, m, options, searcher)
        perm = BlockPermutation()
        perm.hidden = {name: job.order(results) for name, job in hidden.items()}
        perm.inputs = {name: job.order(results) for name, job in inputs.items()}
        return perm, jobs.stats(results)
    shared = {}
    for group in layout.groups:
        names = tuple(x for r in group.readers for x in _group_matrices(r, scores, layout))
        if group.carrier is not None and names:
            shared[group.carrier] = jobs.linears(names, scores)
    for fold in layout.experts:
        prefix = f"{fold.experts}.{fold.down}["
        for name in [x for x in scores if x.startswith(prefix)]:
            hidden[name] = jobs.linears((name,), scores)
    o_heads = {
        head.o_proj: _head_jobs(jobs, scores[head.o_proj], head.heads)
        for head in layout.heads
        if head.o_proj in scores and head.heads.head_dim % m == 0
    }
    results = jobs.run(n, m, options, searcher)
    perm = BlockPermutation()
    perm.shared = {carrier: job.order(results) for carrier, job in shared.items()}
    perm.hidden = {name: job.order(results) for name, job in hidden.items()}
    stats = jobs.stats(results)
    for o_proj, head_jobs in o_heads.items():
        perm.heads[o_proj] = torch.stack([job.order(results) for job in head_jobs])
        stats[o_proj] = SearchStats.of([results[job.index] for job in head_jobs])
    return perm, stats


def _group_matrices(reader: str, scores: dict[str, np.ndarray], layout: BlockLayout) -> list[str]:
    """The scored matrices a group's reader holds: a Linear itself, or every expert's
    slice of fused experts' input parameter (`reader.gate_up_proj[e]`); none for a router."""
    if reader in scores:
        return [reader]
    ups = [f"{f.experts}.{f.up}[" for f in layout.experts if f.experts == reader]
    return [x for x in scores if x.startswith(tuple(ups))] if ups else []


@dataclass(frozen=True)
class _Job:
    """One search of a block: its score matrices, and the matrices whose stats it gives
    (none for one head of o_proj, whose stats are those of all its heads)."""

    index: int
    names: tuple[str, ...]
    matrices: list[np.ndarray]

    def order(self, results: Sequence[SearchResult]) -> torch.Tensor:
        return torch.from_numpy(results[self.index].perm)


class _Jobs:
    """A block's searches, collected and then run at once: they do not depend on each
    other, and together they keep all cores busy where one search alone leaves most of
    them idle in its sequential stretches (`search_permutations`)."""

    def __init__(self) -> None:
        self.jobs: list[_Job] = []

    def linears(self, names: tuple[str, ...], scores: dict[str, np.ndarray]) -> _Job:
        """The search of the matrices `names`, sharing one order (their scores stacked)."""
        return self._add(names, [scores[x] for x in names])

    def matrices(self, matrices: list[np.ndarray]) -> _Job:
        """A search on `matrices` that decides no matrix's stats by itself."""
        return self._add((), matrices)

    def _add(self, names: tuple[str, ...], matrices: list[np.ndarray]) -> _Job:
        job = _Job(len(self.jobs), names, matrices)
        self.jobs.append(job)
        return job

    def run(
        self, n: int, m: int, options: SearchOptions, searcher: Searcher
    ) -> Sequence[SearchResult]:
        if not self.jobs:
            return []
        return searcher([job.matrices for job in self.jobs], n, m, options)

    def stats(self, results: Sequence[SearchResult]) -> dict[str, SearchStats]:
        """Per matrix name, the stats of the search that decided its order."""
        return {x: SearchStats.of([results[j.index]]) for j in self.jobs for x in j.names}


def _head_jobs(jobs: _Jobs, score: np.ndarray, heads: Heads) -> list[_Job]:
    """One within-head order per key/value head: the N:M groups of o_proj never straddle
    heads (m divides head_dim), so the objective splits into one problem per key/value
    head over the column blocks of its query heads."""
    group = heads.num_heads // heads.num_kv_heads
    d = heads.head_dim
    return [
        jobs.matrices([score[:, h * d : (h + 1) * d] for h in range(kv * group, (kv + 1) * group)])
        for kv in range(heads.num_kv_heads)
    ]
