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
from ..core import PermutationResult, SearchOptions, search_permutations
from ..errors import InvalidArgumentError
from .apply import BlockPermutation

PermutationMode = Literal["folded", "free"]
PERMUTATION_MODES: tuple[str, ...] = get_args(PermutationMode)


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
    jobs = _Jobs()
    if mode == "free":
        folded = spec.mlp_output if spec is not None else None
        hidden = jobs.linears((folded,), scores) if folded is not None else None
        inputs = {name: jobs.linears((name,), scores) for name in scores if name != folded}
        results = jobs.run(n, m, options)
        perm = BlockPermutation()
        if hidden is not None:
            perm.mlp_hidden = hidden.order(results)
        perm.inputs = {name: job.order(results) for name, job in inputs.items()}
        return perm, jobs.stats(results)
    if spec is None or heads is None:
        raise InvalidArgumentError("the folded mode needs the family's block spec and heads")
    attn = jobs.linears(spec.attn_inputs, scores)
    mlp = jobs.linears(spec.mlp_inputs, scores)
    hidden = jobs.linears((spec.mlp_output,), scores)
    o_heads = _head_jobs(jobs, scores[spec.o_proj], heads) if heads.head_dim % m == 0 else []
    results = jobs.run(n, m, options)
    perm = BlockPermutation(
        attn=attn.order(results), mlp=mlp.order(results), mlp_hidden=hidden.order(results)
    )
    stats = jobs.stats(results)
    if o_heads:
        perm.o_heads = torch.stack([job.order(results) for job in o_heads])
        stats[spec.o_proj] = SearchStats.of([results[job.index] for job in o_heads])
    return perm, stats


@dataclass(frozen=True)
class _Job:
    """One search of a block: its score matrices, and the Linears whose stats it gives
    (none for one head of o_proj, whose stats are those of all its heads)."""

    index: int
    names: tuple[str, ...]
    matrices: list[np.ndarray]

    def order(self, results: list[PermutationResult]) -> torch.Tensor:
        return torch.from_numpy(results[self.index].perm)


class _Jobs:
    """A block's searches, collected and then run at once: they do not depend on each
    other, and together they keep all cores busy where one search alone leaves most of
    them idle in its sequential stretches (`search_permutations`)."""

    def __init__(self) -> None:
        self.jobs: list[_Job] = []

    def linears(self, names: tuple[str, ...], scores: dict[str, np.ndarray]) -> _Job:
        """The search of the Linears `names`, sharing one order (their scores stacked)."""
        return self._add(names, [scores[x] for x in names])

    def matrices(self, matrices: list[np.ndarray]) -> _Job:
        """A search on `matrices` that decides no Linear's stats by itself."""
        return self._add((), matrices)

    def _add(self, names: tuple[str, ...], matrices: list[np.ndarray]) -> _Job:
        job = _Job(len(self.jobs), names, matrices)
        self.jobs.append(job)
        return job

    def run(self, n: int, m: int, options: SearchOptions) -> list[PermutationResult]:
        if not self.jobs:
            return []
        return search_permutations([job.matrices for job in self.jobs], n, m, options)

    def stats(self, results: list[PermutationResult]) -> dict[str, SearchStats]:
        """Per Linear name, the stats of the search that decided its order."""
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
