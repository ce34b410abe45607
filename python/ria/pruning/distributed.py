"""Pruning split over the processes of an initialised torch.distributed process group
(`torchrun --nproc-per-node N -m ria prune ...`, or `ria.prune` under a group the caller
initialised): gloo on CPUs, NCCL on GPUs (each rank on its own device).

The block loop stays sequential over blocks; within a block:
- calibration: each rank runs a fixed contiguous share of the calibration batches through
  the block (`Ranks.windows`); the activation sums of squares are folded from every
  batch's partial sum in batch order, exactly as one process folds them (`reduce_stats`);
  token counts are summed; the `X^T X` Gram matrices, float64 sums of float32 products in
  one process too, are summed in float64 (almost always exactly) and rounded once, so they
  agree with one process's to the bit; each goes only to the ranks that use it (the block's
  split is made first: `BlockSplit.gram_ranks`), the others drop theirs;
- per-matrix work (`split_block`): the block's permutation searches and the matrices
  they read go to ranks as units; a unit's rank scores its matrices, searches their
  orders and prunes them (selects the mask, refines, updates); searches and matrices of
  coarse units then move to less loaded ranks, which score what they need again. The
  first block is split by size, later ones by what the block before cost (`BlockCosts`,
  `Ranks.split`). The searches' orders (`search`) and the pruned weights
  (`share_matrices`) are sent to every rank, so every rank holds the same block before
  the next one. Scores never travel: each rank computes the ones it needs from the same
  weights and statistics, so they are the bits one process computes, whoever computes
  them.

Failures: every collective here starts with `sync`, where each rank says whether it failed;
a rank that raises anywhere inside `agreeing` says so at its next `sync` instead of leaving
the others waiting, and every rank then raises the same `DistributedError`.

Without a process group (or with one rank) `current()` is None and the pipeline runs its
one-process code unchanged.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from ..core import SearchOptions, search_permutations
from ..errors import DistributedError, InvalidArgumentError

if TYPE_CHECKING:
    from .capture import InputStats
    from .matrices import PrunableMatrix

__all__ = [
    "GROUP_TIMEOUT",
    "BlockCosts",
    "BlockSplit",
    "Ranks",
    "SharedSearch",
    "agreeing",
    "balanced",
    "batch_ranges",
    "current",
    "is_writer",
    "launched",
    "split_block",
]

T = TypeVar("T")

# How long a rank waits for the others in one collective before its group gives up. The
# other ranks wait while rank 0 alone loads, evaluates or saves the whole model, which
# takes longer than NCCL's default 10 minutes for the largest models.
GROUP_TIMEOUT = timedelta(hours=2)

# torch modules whose functions take `group=dist.group.WORLD` as a default argument, which
# Python evaluates once, at import. Imported after `launched` creates the group
# (transformers imports torch.distributed.nn, through FSDP, when it loads a model), they
# would hold the group past `destroy_process_group`: it would then be freed during
# interpreter shutdown, where its gloo threads can abort a finished rank ("terminate
# called without an active exception"). Imported before, their defaults are None.
_BIND_WORLD_AT_IMPORT = (
    "torch.distributed.nn",
    "torch.distributed.fsdp.sharded_grad_scaler",
    "torch.distributed.optim.zero_redundancy_optimizer",
)


def current() -> Ranks | None:
    """The process group this process prunes in, or None when it prunes alone (no group
    initialised, or a group of one)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return Ranks(dist.get_rank(), dist.get_world_size(), device)


@contextmanager
def launched(device: torch.device) -> Iterator[torch.device]:
    """Under torchrun (`WORLD_SIZE` > 1, no process group yet): initialises the group from
    torchrun's environment, NCCL with this rank on `cuda:LOCAL_RANK` when `device` is a
    CUDA device, gloo otherwise; yields the device this rank prunes on and destroys the
    group at the end (freed then, not at interpreter shutdown; after a barrier unless the
    body raised). The Rust core's worker
    threads are split between the node's ranks (`RAYON_NUM_THREADS`, unless set).
    Otherwise yields `device` and does nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield device
        return
    # The Rust core's searches run on the CPU: the ranks of one node share its cores
    # instead of each starting a worker per core (read when the core's pool starts).
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, (cores or 1) // local)))
    for module in _BIND_WORLD_AT_IMPORT:
        with suppress(ImportError):  # a torch without it cannot capture the group either
            importlib.import_module(module)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=GROUP_TIMEOUT)
    else:
        dist.init_process_group("gloo", timeout=GROUP_TIMEOUT)
    try:
        yield device
    except BaseException:
        dist.destroy_process_group()
        raise
    # Every rank done with the group before any tears it down: gloo's teardown on one rank
    # could hang for good once its peer had already destroyed the group and exited.
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


def agreeing(what: str) -> AbstractContextManager[None]:
    """`Ranks.agreeing` of this process's group; nothing when it works alone."""
    ranks = current()
    return nullcontext() if ranks is None else ranks.agreeing(what)


def is_writer() -> bool:
    """Whether this process writes outputs: rank 0, or the only process."""
    ranks = current()
    return ranks is None or ranks.rank == 0


def batch_ranges(batches: int, world: int) -> list[range]:
    """A contiguous split of `batches` batch indices over `world` ranks, the first
    `batches % world` ranks one batch more; the same for every run."""
    base, extra = divmod(batches, world)
    out, start = [], 0
    for r in range(world):
        size = base + (r < extra)
        out.append(range(start, start + size))
        start += size
    return out


def balanced(sizes: Sequence[float], world: int) -> list[int]:
    """The rank of every job, balancing the sum of sizes per rank: largest job first to the
    least loaded rank (ties: earlier job, lower rank). Deterministic."""
    load = [0.0] * world
    owner = [0] * len(sizes)
    for job in sorted(range(len(sizes)), key=lambda j: (-sizes[j], j)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[job] = rank
        load[rank] += sizes[job]
    return owner


@dataclass(frozen=True)
class BlockSplit:
    """Who does what of one block: `searches[k]` is the rank that runs search job k,
    `owners[name]` the rank that prunes matrix `name`; `reads[k]` names the matrices
    search job k reads."""

    searches: list[int]
    owners: dict[str, int]
    reads: list[tuple[str, ...]]

    def pruned_by(self, rank: int) -> list[str]:
        """The matrices `rank` prunes, in the block's order."""
        return [name for name, r in self.owners.items() if r == rank]

    def gram_ranks(self, name: str, scoring: bool) -> set[int]:
        """The ranks that use matrix `name`'s Gram matrix: its owner (OBS update,
        refinement, output error), and with `scoring` (alpha="auto" scores by output
        error) every rank that scores it."""
        if not scoring:
            return {self.owners[name]}
        read = {r for k, r in enumerate(self.searches) if name in self.reads[k]}
        return {self.owners[name]} | read

    def scored_by(self, rank: int) -> list[str]:
        """The matrices `rank` scores (those its searches read, and those it prunes), in
        the block's order."""
        read = {x for k, r in enumerate(self.searches) if r == rank for x in self.reads[k]}
        return [name for name, r in self.owners.items() if r == rank or name in read]


def split_block(
    costs: Mapping[str, float],
    jobs: Sequence[Sequence[str]],
    world: int,
    job_costs: Sequence[float] | None = None,
    score_costs: Mapping[str, float] | None = None,
) -> BlockSplit:
    """Splits one block's work over `world` ranks: `costs` maps every matrix (in the
    block's order) to the cost of pruning it (its entries, or the seconds it took in the
    block before); `jobs` names the matrices each permutation search reads (none without
    permutation); `job_costs` and `score_costs` are the searches' and the scores' costs
    (none: nothing, beyond the matrices' `costs`).

    Matrices read by a common search form a unit with their searches; units go to the
    least loaded rank, costliest first (`balanced`), and a unit's rank scores, searches
    and prunes it: nothing is scored twice. Where units are coarse (one search over
    q/k/v, every expert of a MoE block under one folded order, o_proj's per-head
    searches), the load is then evened out: while the most loaded rank holds a search
    or a matrix to prune that the least loaded one could take (scoring what it reads or
    prunes, unless it does already) and still end below the former's load, the move
    that lowers the former's load most is made. Deterministic."""
    names = list(costs)
    job_costs = [0.0] * len(jobs) if job_costs is None else job_costs
    score = {x: 0.0 for x in names} if score_costs is None else score_costs
    unit = {name: i for i, name in enumerate(names)}  # union-find over matrix names

    def root(name: str) -> str:
        while names[unit[name]] != name:
            name = names[unit[name]]
        return name

    for reads in jobs:
        for x in reads[1:]:
            a, b = sorted((unit[root(reads[0])], unit[root(x)]))
            unit[names[b]] = a  # the earlier matrix roots the merged unit
    roots = list(dict.fromkeys(root(x) for x in names))
    unit_cost = {r: 0.0 for r in roots}
    for x in names:
        unit_cost[root(x)] += costs[x] + score[x]
    for reads, cost in zip(jobs, job_costs, strict=True):
        unit_cost[root(reads[0])] += cost
    unit_rank = dict(zip(roots, balanced([unit_cost[r] for r in roots], world), strict=True))
    return _evened(
        names, costs, score, jobs, job_costs, world,
        searches=[unit_rank[root(reads[0])] for reads in jobs],
        owners={x: unit_rank[root(x)] for x in names},
    )  # fmt: skip


def _evened(
    names: list[str],
    costs: Mapping[str, float],
    score: Mapping[str, float],
    jobs: Sequence[Sequence[str]],
    job_costs: Sequence[float],
    world: int,
    searches: list[int],
    owners: dict[str, int],
) -> BlockSplit:
    """`split_block`'s moves from the split by units (`searches`, `owners`). A rank's
    load: its searches, its pruning, and scoring every matrix it needs once (`needs`
    counts why: each search of its reading it, and pruning it)."""
    needs = [dict.fromkeys(names, 0) for _ in range(world)]
    load = [0.0] * world
    for k, reads in enumerate(jobs):
        load[searches[k]] += job_costs[k]
        for x in reads:
            needs[searches[k]][x] += 1
    for x in names:
        load[owners[x]] += costs[x]
        needs[owners[x]][x] += 1
    for r in range(world):
        load[r] += sum(score[x] for x in names if needs[r][x])

    def change(reads: Sequence[str], cost: float, src: int, dst: int) -> tuple[float, float]:
        """How moving work of `cost` that needs the scores of `reads` changes the loads
        of `src` and `dst`."""
        lost = cost + sum(score[x] for x in reads if needs[src][x] == 1)
        return -lost, cost + sum(score[x] for x in reads if not needs[dst][x])

    while True:
        heavy = max(range(world), key=lambda r: (load[r], -r))
        light = min(range(world), key=lambda r: (load[r], r))
        moves = [  # (heavy's change, kind, index)
            (change(reads, job_costs[k], heavy, light), "search", k)
            for k, reads in enumerate(jobs)
            if searches[k] == heavy and job_costs[k] > 0
        ] + [
            (change((x,), costs[x], heavy, light), "prune", i)
            for i, x in enumerate(names)
            if owners[x] == heavy and costs[x] > 0
        ]
        useful = [(d, kind, i) for d, kind, i in moves if load[light] + d[1] < load[heavy]]
        if not useful:
            break
        (lost, gained), kind, i = min(useful, key=lambda m: (m[0][0], m[1], m[2]))
        reads = jobs[i] if kind == "search" else (names[i],)
        for x in reads:
            needs[heavy][x] -= 1
            needs[light][x] += 1
        if kind == "search":
            searches[i] = light
        else:
            owners[names[i]] = light
        load[heavy] += lost
        load[light] += gained
    return BlockSplit(searches, owners, [tuple(reads) for reads in jobs])


@dataclass(frozen=True)
class BlockCosts:
    """What one block's work cost in seconds, as every rank knows it (from the results
    shared between them): each search job's (`jobs[k]` the matrices it read) and each
    matrix's pruning. The next block, built alike, is split by them (`Ranks.split`)."""

    jobs: list[tuple[str, ...]]
    job_seconds: list[float]
    matrix_seconds: dict[str, float]
    score_seconds: dict[str, float]


@dataclass(frozen=True)
class SharedSearch:
    """A permutation search's result as sent between ranks (the fields of
    `ria.PermutationResult` that the pipeline reads)."""

    perm: np.ndarray
    retained: float
    identity: float
    upper_bound: float
    seconds: float


@dataclass
class Ranks:
    """This process's place in the group: `rank` of `world`; collectives' tensors live on
    `device` (the CPU for gloo, this rank's GPU for NCCL). `doing` says what the rank is
    working on, for the error if it fails."""

    rank: int
    world: int
    device: torch.device
    doing: str = "starting"
    # The previous block's costs: searches cost nothing like their size (a tiny Llama's
    # o_proj heads took 40 times gate/up's search), so blocks after the first are split
    # by what the one before measured; every rank has the same numbers, and the results
    # do not depend on who computes them.
    costs: BlockCosts | None = None

    # ---- failures

    def sync(self, what: str, failure: BaseException | None = None) -> None:
        """A point every rank reaches: raises `DistributedError` on every rank if one of
        them failed (its `failure`), naming the first failed rank and its error."""
        said = None
        if failure is not None:
            said = f"while {self.doing}: {type(failure).__name__}: {failure}"
        with self._talking(what):
            heard: list[str | None] = [None] * self.world
            dist.all_gather_object(heard, said)
        failed = [(r, s) for r, s in enumerate(heard) if s is not None]
        if failed:
            rank, message = failed[0]
            raise DistributedError(f"rank {rank} of {self.world} failed {message}") from failure

    @contextmanager
    def agreeing(self, what: str) -> Iterator[None]:
        """Runs the body; an error in it is told to every rank at this rank's next `sync`
        (here), so the others stop at theirs instead of waiting forever. Ends with a
        `sync` named `what` when the body succeeds."""
        try:
            yield
        except DistributedError:
            raise  # every rank knows already (or contact is lost)
        except Exception as exc:
            self.sync(what, exc)
            raise  # unreachable: sync raises when a rank failed
        self.sync(what)

    @contextmanager
    def _talking(self, what: str) -> Iterator[None]:
        """Turns a failed collective (a rank exited, the group timed out) into a
        `DistributedError`."""
        try:
            yield
        except RuntimeError as exc:  # torch's DistBackendError and DistNetworkError are
            raise DistributedError(
                f"rank {self.rank} of {self.world} lost contact with the other ranks during "
                f"{what} (a rank exited or the process group timed out): {exc}"
            ) from exc

    def gather_objects(self, what: str, value: T) -> list[T]:
        """Every rank's `value` (picklable), by rank."""
        self.sync(what)
        with self._talking(what):
            out: list[T] = [value] * self.world
            dist.all_gather_object(out, value)
        return out

    def check_same(self, what: str, value: Any) -> None:
        """Raises `DistributedError` on every rank unless every rank has the same
        `value` (what must not depend on a rank's share of the data)."""
        values = self.gather_objects(what, value)
        differ = [r for r, v in enumerate(values) if v != values[0]]
        if differ:
            raise DistributedError(
                f"ranks {differ} of {self.world} disagree with rank 0 {what}; a prune split "
                "over processes needs the same result on every rank"
            )

    def check_same_weights(self, what: str, weight: torch.Tensor) -> None:
        """Raises `DistributedError` on every rank unless `weight` looks the same on every
        rank (shape, dtype and the SHA-256 of 65536 evenly spaced values, exact bits: rank 0
        may hold it on the CPU and the others on a GPU, where a sum would round
        differently): a rank that read another revision of the checkpoint (a stale Hub
        cache beside a fresh download) would prune a silent mix of both."""
        flat = weight.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 65536)].to("cpu", torch.float64)
        digest = hashlib.sha256(sample.numpy().tobytes()).hexdigest()
        self.check_same(what, (tuple(weight.shape), str(weight.dtype), digest))

    # ---- calibration windows

    def windows(self, windows: torch.Tensor, batch_size: int) -> torch.Tensor:
        """This rank's contiguous share of the calibration windows `(n, seqlen)`: whole
        batches of `batch_size`, so every batch is the one a single process runs. Every
        rank must have made the same windows (its own data shard would be a silent mix)."""
        digest = hashlib.sha256(windows.cpu().numpy().tobytes()).hexdigest()
        self.check_same("in their calibration windows", (tuple(windows.shape), digest))
        batches = math.ceil(windows.shape[0] / batch_size)
        if batches < self.world:
            raise InvalidArgumentError(
                f"{batches} calibration batches (nsamples / batch_size) cannot be split over "
                f"{self.world} processes; use more samples or a smaller batch_size"
            )
        mine = batch_ranges(batches, self.world)[self.rank]
        return windows[mine.start * batch_size : mine.stop * batch_size]

    # ---- statistics

    def track(self, stats: Mapping[str, InputStats]) -> None:
        """Makes every `InputStats` keep each batch's partial sum of squares (see
        `reduce_stats`)."""
        for s in _unique(stats):
            s.partials = []

    def reduce_stats(
        self,
        what: str,
        stats: Mapping[str, InputStats],
        gram_ranks: Mapping[str, set[int]] | None = None,
    ) -> None:
        """Every rank's statistics summed, in place, on every rank: sums of squares folded
        from every batch's partial in global batch order (bit-identical to one process),
        token counts summed exactly, Gram matrices summed in float64. `gram_ranks[name]`:
        the ranks that use `stats[name]`'s Gram matrix (default: all); a Gram shared by
        several matrices goes to the union of theirs, and the other ranks drop it (a 70B
        down_proj's is 6.6 GB in float64)."""
        unique = _unique(stats)
        users: dict[int, set[int]] = {id(s): set() for s in unique}
        for name, s in stats.items():
            users[id(s)] |= set(range(self.world)) if gram_ranks is None else gram_ranks[name]
        counts = [v for s in unique for v in (len(s.partials or ()), s.tokens)]
        local = [torch.stack(s.partials) for s in unique if s.partials]
        flat = torch.cat([p.reshape(-1) for p in local]) if local else torch.zeros(0)
        all_counts = self.gather_objects(what, counts)
        # Every buffer before the ranks meet again: a failure here (out of memory) reaches
        # the others at that `sync`, not as a collective that never completes.
        sizes = [
            sum(c[2 * i] * unique[i].sumsq.numel() for i in range(len(unique))) for c in all_counts
        ]
        padded = torch.zeros(max(sizes), dtype=torch.float32, device=self.device)
        padded[: flat.numel()] = flat.to(self.device, torch.float32)
        all_flat = [torch.empty_like(padded) for _ in range(self.world)]
        # float64 on the device already (no copy) unless collected elsewhere
        totals = {
            id(s): s.hessian.to(self.device, torch.float64)
            for s in unique
            if s.hessian is not None and users[id(s)]
        }
        self.sync(what)
        with self._talking(what):
            dist.all_gather(all_flat, padded)
            for s in unique:
                if id(s) not in totals:
                    continue
                ranks = users[id(s)]  # the same sets on every rank: split is deterministic
                if len(ranks) == 1:
                    dist.reduce(totals[id(s)], dst=min(ranks))
                else:
                    dist.all_reduce(totals[id(s)])
        for s in unique:
            if s.hessian is None:
                continue
            if self.rank in users[id(s)]:
                s.hessian.copy_(totals.pop(id(s)))  # a no-op when it was reduced in place
            else:
                s.hessian = None
        del totals
        offsets = [0] * self.world
        for i, s in enumerate(unique):
            channels = s.sumsq.numel()
            acc = torch.zeros(channels, dtype=torch.float32, device=self.device)
            tokens = 0
            for r in range(self.world):
                k = all_counts[r][2 * i]
                tokens += all_counts[r][2 * i + 1]
                rows = all_flat[r][offsets[r] : offsets[r] + k * channels].view(k, channels)
                offsets[r] += k * channels
                for row in rows:  # one process adds the batches' partials in this order
                    acc += row
            s.sumsq.copy_(acc)
            s.tokens = tokens
            s.partials = None

    # ---- per-matrix work

    def split(self, sizes: Mapping[str, int], jobs: Sequence[Sequence[str]]) -> BlockSplit:
        """`split_block` over this group's ranks, by the previous block's `costs` when it
        had the same matrices and searches, else by `sizes` (each matrix's entries)."""
        c = self.costs
        if (
            c is not None
            and c.jobs == [tuple(j) for j in jobs]
            and c.matrix_seconds.keys() == sizes.keys()
        ):
            seconds = {x: c.matrix_seconds[x] for x in sizes}
            scores = {x: c.score_seconds.get(x, 0.0) for x in sizes}
            return split_block(seconds, jobs, self.world, c.job_seconds, scores)
        return split_block(sizes, jobs, self.world)

    def search(
        self,
        what: str,
        problems: Sequence[list[np.ndarray] | None],
        owners: Sequence[int],
        n: int,
        m: int,
        options: SearchOptions,
    ) -> list[SharedSearch]:
        """`ria.search_permutations` on the `problems` this rank owns (`owners[k]`, the
        rank of problem k; the others may be None); every rank gets every result, in
        order (each search's result does not depend on the others searched with it)."""
        mine = [k for k, r in enumerate(owners) if r == self.rank]
        own = [problems[k] for k in mine]
        if any(p is None for p in own):
            raise AssertionError("a rank was given a search without its scores")
        results = search_permutations(own, n, m, options) if own else []  # type: ignore[arg-type]
        found = {
            k: SharedSearch(r.perm, r.retained, r.identity, r.upper_bound, r.seconds)
            for k, r in zip(mine, results, strict=True)
        }
        merged: dict[int, SharedSearch] = {}
        for part in self.gather_objects(what, found):
            merged.update(part)
        return [merged[k] for k in range(len(problems))]

    def share_matrices(
        self,
        what: str,
        matrices: Mapping[str, PrunableMatrix],
        owners: Mapping[str, int],
        results: dict[str, T],
    ) -> dict[str, T]:
        """Sends every matrix's pruned weight from its owner (`owners[name]`, a rank) to
        every rank (in place, bit for bit) and returns every matrix's `results` entry
        (made by its owner)."""
        # The wire buffers before the ranks meet (a failure here reaches the others at
        # that `sync`): the weights themselves where they are contiguous on the group's
        # device, received in place, so no memory is needed.
        wire, in_place = {}, set()
        for name, matrix in matrices.items():
            weight = matrix.weight.detach()
            if weight.device == self.device and weight.is_contiguous():
                wire[name] = weight
                in_place.add(name)
            elif owners[name] == self.rank:
                wire[name] = weight.to(self.device).contiguous()
            else:
                wire[name] = torch.empty(weight.shape, dtype=weight.dtype, device=self.device)
        merged: dict[str, T] = {}
        for part in self.gather_objects(what, results):
            merged.update(part)
        with self._talking(what):
            for name in matrices:
                # As bytes: exact for any dtype, and gloo reduces no bfloat16.
                dist.broadcast(wire[name].view(-1).view(torch.uint8), src=owners[name])
        for name, matrix in matrices.items():
            if owners[name] != self.rank and name not in in_place:
                matrix.weight.detach().copy_(wire[name])
        return merged


def _unique(stats: Mapping[str, InputStats]) -> list[InputStats]:
    """The distinct `InputStats` of `stats` (Linears reading one tensor share one), in a
    fixed order (the dict's, the same on every rank)."""
    seen: dict[int, InputStats] = {}
    for s in stats.values():
        seen.setdefault(id(s), s)
    return list(seen.values())
