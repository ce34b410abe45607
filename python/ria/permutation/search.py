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

from collections.abc import Callable, Iterable, Mapping, Sequence
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
    plan = BlockSearch(scores, layout, m, mode)
    problems = plan.problems(scores)
    results = searcher(problems, n, m, options) if problems else []
    return plan.result(results)


@dataclass(frozen=True)
class SearchJob:
    """One search of a block: the score matrices it reads, `(name, columns)` (columns
    None: the whole matrix; a range: one head's columns of o_proj), stacked into one
    problem, and the matrices whose stats it decides (none for one head of o_proj, whose
    stats are those of all its heads)."""

    index: int
    names: tuple[str, ...]
    reads: tuple[tuple[str, range | None], ...]

    def problem(self, scores: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The score matrices searched, from the block's `scores`."""
        return [
            scores[x] if cols is None else scores[x][:, cols.start : cols.stop]
            for x, cols in self.reads
        ]

    @property
    def matrices(self) -> tuple[str, ...]:
        """The names of the score matrices it reads (each once)."""
        return tuple(dict.fromkeys(x for x, _ in self.reads))

    def order(self, results: Sequence[SearchResult]) -> torch.Tensor:
        return torch.from_numpy(results[self.index].perm)


class BlockSearch:
    """A block's searches, planned from the names of its matrices to be permuted (as
    `search_block` takes their scores) before any score exists, so a prune split over
    processes can score only what each one searches (`ria.pruning.distributed`); then
    run at once (`problems`: they do not depend on each other, and together they keep all
    cores busy where one search alone leaves most of them idle in its sequential
    stretches), and their results made into the block's orders (`result`)."""

    def __init__(
        self, names: Iterable[str], layout: BlockLayout, m: int, mode: PermutationMode = "folded"
    ) -> None:
        self.jobs: list[SearchJob] = []
        self.mode = mode
        names = list(names)
        self._hidden = {
            mlp.down: self._add((mlp.down,)) for mlp in layout.mlps if mlp.down in names
        }
        self._inputs: dict[str, SearchJob] = {}
        self._shared: dict[str, SearchJob] = {}
        self._heads: dict[str, list[SearchJob]] = {}
        if mode == "free":
            self._inputs = {x: self._add((x,)) for x in names if x not in self._hidden}
            return
        for group in layout.groups:
            readers = tuple(x for r in group.readers for x in _group_matrices(r, names, layout))
            if group.carrier is not None and readers:
                self._shared[group.carrier] = self._add(readers)
        for fold in layout.experts:
            prefix = f"{fold.experts}.{fold.down}["
            for x in [x for x in names if x.startswith(prefix)]:
                self._hidden[x] = self._add((x,))
        self._heads = {
            head.o_proj: self._head_jobs(head.o_proj, head.heads)
            for head in layout.heads
            if head.o_proj in names and head.heads.head_dim % m == 0
        }

    def _add(
        self, names: tuple[str, ...], reads: tuple[tuple[str, range | None], ...] | None = None
    ) -> SearchJob:
        """A job deciding the orders of `names`; it reads their whole scores (stacked)
        unless `reads` says otherwise."""
        if reads is None:
            reads = tuple((x, None) for x in names)
        job = SearchJob(len(self.jobs), names, reads)
        self.jobs.append(job)
        return job

    def _head_jobs(self, o_proj: str, heads: Heads) -> list[SearchJob]:
        """One within-head order per key/value head: the N:M groups of o_proj never
        straddle heads (m divides head_dim), so the objective splits into one problem per
        key/value head over the column blocks of its query heads."""
        group = heads.num_heads // heads.num_kv_heads
        d = heads.head_dim
        return [
            self._add(
                (),
                tuple(
                    (o_proj, range(h * d, (h + 1) * d)) for h in range(kv * group, (kv + 1) * group)
                ),
            )
            for kv in range(heads.num_kv_heads)
        ]

    def problems(self, scores: Mapping[str, np.ndarray]) -> list[list[np.ndarray]]:
        """Every job's problem, in job order (a searcher's input)."""
        return [job.problem(scores) for job in self.jobs]

    def result(
        self, results: Sequence[SearchResult]
    ) -> tuple[BlockPermutation, dict[str, SearchStats]]:
        """The block's orders from every job's result (in job order), and per matrix
        name the stats of the search that decided its order."""
        perm = BlockPermutation()
        perm.hidden = {x: job.order(results) for x, job in self._hidden.items()}
        stats = {x: SearchStats.of([results[j.index]]) for j in self.jobs for x in j.names}
        if self.mode == "free":
            perm.inputs = {x: job.order(results) for x, job in self._inputs.items()}
            return perm, stats
        perm.shared = {carrier: job.order(results) for carrier, job in self._shared.items()}
        for o_proj, head_jobs in self._heads.items():
            perm.heads[o_proj] = torch.stack([job.order(results) for job in head_jobs])
            stats[o_proj] = SearchStats.of([results[job.index] for job in head_jobs])
        return perm, stats


def _group_matrices(reader: str, names: list[str], layout: BlockLayout) -> list[str]:
    """The scored matrices a group's reader holds: a Linear itself, or every expert's
    slice of fused experts' input parameter (`reader.gate_up_proj[e]`); none for a router."""
    if reader in names:
        return [reader]
    ups = [f"{f.experts}.{f.up}[" for f in layout.experts if f.experts == reader]
    return [x for x in names if x.startswith(tuple(ups))] if ups else []
