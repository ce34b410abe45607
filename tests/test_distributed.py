"""Pruning split over 2 gloo processes (pruning/distributed.py): the same masks, orders
and logits as one process; rank 0 alone writes; a rank failing mid-run stops both with
a `DistributedError` and leaves no output. The ranks run every case in one spawn (a
process start costs seconds here)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import FAST_SEARCH, VOCAB, tiny_model
from safetensors.torch import load_file

import ria
from ria import cli
from ria.cli import main
from ria.pruning import pipeline
from ria.pruning.config import ALPHA_GRID
from ria.pruning.distributed import balanced, batch_ranges, launched, split_block
from ria.pruning.report import LayerReport

WORLD = 2
# 7 windows in batches of 2: rank 0 runs batches 0-1, rank 1 batches 2-3 (the last holds
# one window, so the ranks also see different batch sizes).
CALIB = dict(nsamples=7, seqlen=32, batch_size=2, progress=False, device="cpu")
FOLDED = dict(sparsity="2:4", permute="folded", permutation_options=FAST_SEARCH)
# Case: (model family, `ria.prune` settings).
CASES = {
    "ria 2:4 folded": ("llama", FOLDED),
    "ria 2:4 free": ("llama", dict(FOLDED, permute="free")),
    # The Gram matrices X^T X are reduced too (and the least-squares refit, which would
    # turn any rounding difference of theirs into different weights, runs on them).
    "ria 2:4 refine + reconstruct": ("llama", dict(sparsity="2:4", refine=True, reconstruct=True)),
    "sparsegpt 50%": ("llama", dict(sparsity=0.5, method="sparsegpt")),
    # Scores chosen per matrix by output error, and each layer's error in the report.
    "ria 2:4 alpha auto + errors": (
        "llama",
        dict(FOLDED, alpha="auto", measure_error=True),
    ),
    # Fused 3-D experts: routed token counts summed, one folded order over all experts.
    "qwen3_moe ria 2:4 folded": ("qwen3_moe", dict(FOLDED, measure_error=True)),
    "mixtral ria 2:4 reconstruct": ("mixtral", dict(sparsity="2:4", reconstruct=True)),
}
STREAMED = FOLDED
IDS = torch.arange(24)[None] * 13 % VOCAB
# `ria prune` on the source (its path second). No --permute: the CLI's full search takes
# 20 s on 2 cores (the API cases cover it).
CLI_SETTINGS = [
    "prune", "--sparsity", "2:4", "--calibration", "austen", "--nsamples", "4",
    "--seqlen", "32", "--device", "cpu", "--no-progress",
]  # fmt: skip


def windows() -> torch.Tensor:
    return torch.randint(0, VOCAB, (7, 32), generator=torch.Generator().manual_seed(0))


def prune_case(case: str) -> dict:
    """One process's (or rank's) result of one case: its weights, logits and report."""
    family, settings = CASES[case]
    model = tiny_model(family)
    with scoring() as scored, keeping_grams() as grams:
        report = ria.prune(model, calibration=windows(), **CALIB, **settings)
    with torch.no_grad():
        logits = model(IDS).logits
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "logits": logits,
        "layers": [timeless(r) for r in report.layers],
        "scored": scored,
        "grams": grams,
    }


@contextmanager
def scoring() -> Iterator[list[str]]:
    """Yields the list of the matrices this process scores in the body, by full name."""
    scored: list[str] = []
    score = pipeline._BlockStep.score

    def counting(self, stats, names=None):
        out = score(self, stats, names)
        scored.extend(f"{self.prefix}.{x}" for x in out)
        return out

    pipeline._BlockStep.score = counting
    try:
        yield scored
    finally:
        pipeline._BlockStep.score = score


@contextmanager
def keeping_grams() -> Iterator[list[str]]:
    """Yields the list of the matrices whose Gram matrix X^T X this process holds after
    each block's statistics, by full name."""
    kept: list[str] = []
    gather = pipeline._BlockStep.gather_statistics

    def recording(self, *args):
        stats = gather(self, *args)
        kept.extend(f"{self.prefix}.{x}" for x, s in stats.items() if s.hessian is not None)
        return stats

    pipeline._BlockStep.gather_statistics = recording
    try:
        yield kept
    finally:
        pipeline._BlockStep.gather_statistics = gather


def timeless(layer: LayerReport) -> dict:
    """A layer's report without its times (which differ between any two runs)."""
    out = asdict(layer)
    del out["seconds"]
    for key in ("permutation", "refinement"):
        if out[key] is not None:
            out[key] = {k: v for k, v in out[key].items() if k != "seconds"}
    return out


def stream(src: Path, out: Path, spill: bool = False) -> None:
    """The streamed prune; `spill`: the activations between blocks kept in files."""
    ria.prune_checkpoint(
        src, out, calibration=windows(), offload_activations=spill, **CALIB, **STREAMED
    )


def _worker(rank: int, work: str) -> None:
    """One rank: every case, a streamed prune, then a prune where rank 1 fails."""
    torch.set_num_threads(1)  # as the reference: the same kernels, the same rounding
    # A file rendezvous: no port to pick (a port picked free may be taken before use).
    store = Path(work) / "rendezvous"
    dist.init_process_group("gloo", f"file://{store}", rank=rank, world_size=WORLD)
    work_dir = Path(work)
    results = {case: prune_case(case) for case in CASES}
    stream(work_dir / "src", work_dir / "streamed")
    stream(work_dir / "src", work_dir / "spilled", spill=True)
    results["loaded whole"] = cli_loads(work_dir)
    results["moe loaded whole"] = cli_loads(work_dir, "moe")
    results["mismatched"] = mismatched(rank)
    results["cli failing to load"] = cli_failing_to_load(work_dir, rank)

    # Every rank searches and applies block 1's orders (whatever it prunes): rank 1 fails
    # there, between the ranks' meetings.
    permute = pipeline._BlockStep.permute

    def failing(self, *args):
        if rank == 1 and self.prefix.endswith(".1"):
            raise RuntimeError("simulated failure on rank 1")
        return permute(self, *args)

    pipeline._BlockStep.permute = failing
    try:
        stream(work_dir / "src", work_dir / "failed")
    except ria.DistributedError as exc:
        results["error"] = str(exc)
    finally:
        pipeline._BlockStep.permute = permute
    torch.save(results, work_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


def mismatched(rank: int) -> dict[str, str]:
    """The errors of prunes where rank 1 alone has another seed, its own windows (a
    data-parallel habit) or other weights (another revision of the checkpoint), and
    whether the model was left untouched."""
    errors = {}
    cases = [
        ("seed", dict(seed=1), 0),
        ("windows", dict(calibration=windows() + 1), 0),
        ("weights", {}, 1),
    ]
    for what, change, model_seed in cases:
        settings = {"calibration": windows(), **CALIB, "sparsity": "2:4"}
        model = tiny_model("llama", seed=model_seed if rank == 1 else 0)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            ria.prune(model, **{**settings, **(change if rank == 1 else {})})
        except ria.DistributedError as exc:
            errors[what] = str(exc)
        after = model.state_dict()
        errors[f"{what} untouched"] = all(torch.equal(v, after[k]) for k, v in before.items())
    return errors


def keep(work: Path) -> list[str]:
    """What `ria prune` is told to keep when a test needs no checkpoint: the report."""
    return ["--json", str(work / "report.json")]


def cli_loads(work: Path, checkpoint: str = "src") -> int:
    """How many times `ria prune` (in memory, without permutation) of `work/checkpoint`
    loads the whole model in this process."""
    loads = []
    load = cli._load

    def counting(*args):
        loads.append(args)
        return load(*args)

    cli._load = counting
    try:
        argv = [*CLI_SETTINGS[:1], str(work / checkpoint), *CLI_SETTINGS[1:], *keep(work)]
        assert main(argv) == 0
    finally:
        cli._load = load
    return len(loads)


def cli_failing_to_load(work: Path, rank: int) -> tuple[int, str]:
    """`ria prune`'s exit code and error output when rank 0 fails to load the model (rank
    1 reads it block by block and waits for rank 0 where they meet)."""
    load = cli._load

    def failing(*args):
        raise OSError("simulated unreadable model")

    cli._load = failing
    err = io.StringIO()
    try:
        with redirect_stderr(err):
            code = main([*CLI_SETTINGS[:1], str(work / "src"), *CLI_SETTINGS[1:], *keep(work)])
    finally:
        cli._load = load
    return code, err.getvalue()


@pytest.fixture(scope="module")
def source(tmp_path_factory, tokenizer) -> Path:
    work = tmp_path_factory.mktemp("dist")
    tiny_model("llama").save_pretrained(work / "src")
    tokenizer.save_pretrained(work / "src")
    # Saved with its experts one by one, fused by transformers on loading.
    tiny_model("mixtral").save_pretrained(work / "moe")
    tokenizer.save_pretrained(work / "moe")
    return work


@pytest.fixture(scope="module")
def ranks(source) -> list[dict]:
    """What each of the 2 ranks returned."""
    mp.spawn(_worker, args=(str(source),), nprocs=WORLD)
    return [torch.load(source / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def alone(source) -> dict:
    """The same cases in this process, without a process group."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {case: prune_case(case) for case in CASES}
        stream(source / "src", source / "alone")
    finally:
        torch.set_num_threads(threads)
    return out


def test_torchrun_groups_outwait_rank_0_loading_or_saving_alone(monkeypatch):
    # NCCL's default (10 minutes) aborted the ranks waiting while rank 0 loaded, evaluated
    # or saved a large model by itself.
    made = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RAYON_NUM_THREADS", "1")  # restored after the test
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: made.update(kw))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: None)
    monkeypatch.setattr(dist, "barrier", lambda: None)
    with launched(torch.device("cpu")) as device:
        assert device == torch.device("cpu")
    assert made["timeout"] >= timedelta(hours=1)


def test_ranks_meet_before_the_group_is_torn_down(monkeypatch):
    # Under torchrun at torch 2.6, a rank whose peer had already destroyed the gloo group
    # and exited could hang for good in its own destroy_process_group (2 of 15 CLI runs, two
    # at a time on 2 cores; 0 of 24 with the barrier).
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RAYON_NUM_THREADS", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: None)
    monkeypatch.setattr(dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    with launched(torch.device("cpu")):
        pass
    assert calls == ["barrier", "destroy"]
    calls.clear()  # a rank that failed: no waiting for ranks that may never arrive
    with pytest.raises(RuntimeError, match="rank failed"), launched(torch.device("cpu")):
        raise RuntimeError("rank failed")
    assert calls == ["destroy"]
    calls.clear()  # a barrier that fails (a peer gone) still frees this rank's group

    def lost_peer() -> None:
        raise RuntimeError("connection closed by peer")

    monkeypatch.setattr(dist, "barrier", lost_peer)
    with pytest.raises(RuntimeError, match="closed by peer"), launched(torch.device("cpu")):
        pass
    assert calls == ["destroy"]


def test_the_split_is_fixed_and_balanced():
    assert batch_ranges(4, 2) == [range(0, 2), range(2, 4)]
    assert batch_ranges(5, 3) == [range(0, 2), range(2, 4), range(4, 5)]
    assert balanced([4, 1, 1, 1, 1, 3], 2) == [0, 1, 0, 1, 0, 1]  # loads 6 and 5


# A LLaMA-7B block (millions of weights) and its folded searches: q/k/v share one, gate/up
# one, down its own, o_proj one per head (reading o_proj's columns).
SEVEN_B = {"q": 16, "k": 16, "v": 16, "o": 16, "gate": 45, "up": 45, "down": 45}
FOLDED_JOBS = [("q", "k", "v"), ("gate", "up"), ("down",), *[("o",)] * 32]


def test_without_searches_matrices_are_balanced_one_by_one():
    split = split_block(SEVEN_B, [], 2)
    assert split.owners == dict(zip(SEVEN_B, [1, 1, 1, 0, 0, 1, 0], strict=True))  # 106 / 93
    assert split.scored_by(0) == split.pruned_by(0) == ["o", "gate", "down"]


def test_two_ranks_score_every_matrix_once():
    split = split_block(SEVEN_B, FOLDED_JOBS, 2)
    # Units: gate/up (90) to rank 0, q/k/v (48) and down (45) to 1, o (16) to 0.
    assert split.pruned_by(0) == ["o", "gate", "up"]
    assert split.pruned_by(1) == ["q", "k", "v", "down"]
    assert split.searches == [1, 0, 1, *[0] * 32]
    for rank in range(2):
        assert split.scored_by(rank) == split.pruned_by(rank)


def test_coarse_units_are_evened_out_by_scoring_a_moved_matrix_twice():
    split = split_block(SEVEN_B, FOLDED_JOBS, 4)
    # gate/up's unit (90) alone would load rank 0 with 90 against 48, 45 and 16.
    assert split.searches[:3] == [1, 0, 2]
    pruned = [sum(SEVEN_B[x] for x in split.pruned_by(r)) for r in range(4)]
    assert max(pruned) == 61 and sorted(pruned) == [45, 45, 48, 61]
    assert split.pruned_by(3) == ["o", "gate"]  # the earliest of the largest moved
    assert split.scored_by(0) == ["gate", "up"]  # its search reads both
    scored = sum(len(split.scored_by(r)) for r in range(4))
    assert scored == len(SEVEN_B) + 1


def test_measured_costs_split_the_next_block():
    # Seconds measured on a tiny Llama (1 thread): o_proj's 4 per-head searches cost most,
    # although o_proj is the smallest matrix.
    jobs = [("q", "k", "v"), ("gate", "up"), ("down",), *[("o",)] * 4]
    split = split_block(
        dict.fromkeys(SEVEN_B, 0.01), jobs, 2, [2.9, 0.18, 0.23, 2, 2, 2, 2],
        dict.fromkeys(SEVEN_B, 0.005),
    )  # fmt: skip
    # By units: o_proj's (8 s) on rank 0, the rest (3.4 s) on rank 1; then one head's
    # search moves (rank 1 scores o_proj too), and o_proj's pruning follows it.
    assert split.searches == [1, 1, 1, 1, 0, 0, 0]
    assert split.pruned_by(0) == [] and split.scored_by(0) == ["o"]
    assert split.scored_by(1) == split.pruned_by(1) == list(SEVEN_B)


@pytest.mark.parametrize("case", list(CASES))
def test_every_rank_ends_with_the_same_model(ranks, case):
    first, second = (r[case] for r in ranks)
    assert first["state"].keys() == second["state"].keys()
    for name, tensor in first["state"].items():
        assert torch.equal(tensor, second["state"][name]), name
    assert first["layers"] == second["layers"]


@pytest.mark.parametrize("case", list(CASES))
def test_same_masks_orders_and_logits_as_one_process(ranks, alone, case):
    split, single = ranks[0][case], alone[case]
    assert split["state"].keys() == single["state"].keys()
    for name, tensor in single["state"].items():
        # Weights, norms, orders: every bit (X^T X is a float64 sum, rounded once).
        assert torch.equal(split["state"][name], tensor), name
    assert torch.equal(split["logits"], single["logits"])
    assert split["layers"] == single["layers"]
    assert any(r["permutation"] for r in split["layers"]) == ("permute" in CASES[case][1])


@pytest.mark.parametrize("case", [c for c in CASES if "permute" in CASES[c][1]])
def test_each_rank_scores_its_share_of_a_permuted_block(ranks, alone, case):
    everything = alone[case]["scored"]
    assert len(set(everything)) == len(everything)  # one process scores each matrix once
    mine, theirs = (r[case]["scored"] for r in ranks)
    assert set(mine) | set(theirs) == set(everything)
    # The first block is split by size (later ones by what the block before cost, which
    # on a tiny model is noise: matrices may move and be scored twice).
    first = [[x for x in scored if ".layers.0." in x] for scored in (mine, theirs, everything)]
    assert first[0] and first[1]
    assert len(first[0]) < len(first[2]) and len(first[1]) < len(first[2])
    if case.startswith("ria"):  # LLaMA's units balance over 2 ranks without a move
        assert len(first[0]) + len(first[1]) == len(first[2])


@pytest.mark.parametrize(
    "case", ["ria 2:4 refine + reconstruct", "ria 2:4 alpha auto + errors", "sparsegpt 50%"]
)
def test_a_rank_keeps_only_the_gram_matrices_it_uses(ranks, alone, case):
    everything = alone[case]["grams"]
    assert everything  # one process keeps every calibrated matrix's
    mine, theirs = (r[case]["grams"] for r in ranks)
    assert set(mine) | set(theirs) == set(everything)
    assert len(mine) < len(everything) and len(theirs) < len(everything)


def test_the_cases_exercise_what_they_name(alone):
    layers = {case: alone[case]["layers"] for case in CASES}
    assert all(r["alpha"] in ALPHA_GRID for r in layers["ria 2:4 alpha auto + errors"])
    assert len({r["alpha"] for r in layers["ria 2:4 alpha auto + errors"]}) > 1
    assert all(r["output_error"] > 0 for r in layers["ria 2:4 alpha auto + errors"])
    for case in ("qwen3_moe ria 2:4 folded", "mixtral ria 2:4 reconstruct"):
        experts = [r for r in layers[case] if r["routed_tokens"] is not None]
        assert experts and not all(r["weight_only"] for r in experts), case


def test_rank_0_alone_writes_the_streamed_checkpoint(ranks, alone, source):
    written = {p.name for p in (source / "streamed").iterdir()}
    assert written == {p.name for p in (source / "alone").iterdir()}
    assert not [p for p in source.iterdir() if p.name.startswith(".")]  # no staging left
    assert_same_tensors(source / "streamed", source / "alone")


def test_spilled_activations_give_the_same_checkpoint(ranks, alone, source):
    assert_same_tensors(source / "spilled", source / "alone")


def assert_same_tensors(ours: Path, theirs: Path) -> None:
    shards = sorted(p.name for p in theirs.glob("*.safetensors"))
    assert shards and shards == sorted(p.name for p in ours.glob("*.safetensors"))
    for shard in shards:
        a, b = load_file(ours / shard), load_file(theirs / shard)
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), name


def test_a_rank_failing_midway_stops_every_rank_and_leaves_no_output(ranks, source):
    for r in ranks:
        assert r["error"].startswith("rank 1 of 2 failed while working on model.layers.1")
        assert "simulated failure on rank 1" in r["error"]
    assert not (source / "failed").exists()
    assert not [p for p in source.iterdir() if p.name.startswith(".failed")]


def test_only_rank_0_loads_the_whole_model_in_the_cli(ranks):
    # Rank 1 reads each block from the checkpoint's shards when it visits it.
    assert [r["loaded whole"] for r in ranks] == [1, 0]
    # Experts stored one by one (fused by transformers on loading) too: it stopped every
    # rank at block 0, then was loaded whole; now converted block by block.
    assert [r["moe loaded whole"] for r in ranks] == [1, 0]


def test_ranks_given_other_settings_windows_or_weights_are_refused_before_pruning(ranks):
    for r in ranks:
        errors = r["mismatched"]
        assert "ranks [1] of 2 disagree with rank 0 in their settings" in errors["seed"]
        assert (
            "ranks [1] of 2 disagree with rank 0 in their calibration windows" in errors["windows"]
        )
        assert "disagree with rank 0 in their input embeddings" in errors["weights"]
        assert errors["seed untouched"] and errors["windows untouched"]
        assert errors["weights untouched"]


def test_rank_0_failing_to_load_stops_every_rank_of_the_cli(ranks):
    for r in ranks:
        code, err = r["cli failing to load"]
        assert code == 2
        assert "rank 0 of 2 failed" in err and "simulated unreadable model" in err


def test_torchrun_runs_the_cli_and_rank_0_writes(source, tmp_path):
    settings = [*CLI_SETTINGS[:1], str(source / "src"), *CLI_SETTINGS[1:]]
    launch = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD),
        "--standalone", "-m", "ria",  # torchrun picks its own free port
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [*launch, *settings, "--out", str(tmp_path / "split")]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("saved to") == 1  # rank 0 alone
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*settings, "--out", str(tmp_path / "alone")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert_same_tensors(tmp_path / "split", tmp_path / "alone")


# Run by torchrun in a fresh interpreter: a module binding `group.WORLD` as a default
# argument, imported inside `launched` (transformers does, loading a model), must not keep
# the group alive past it.
OUTLIVES = """
import gc, sys, weakref
import torch, torch.distributed as dist
from ria.pruning.distributed import launched
if "torch.distributed.nn" in sys.modules:
    sys.exit("torch.distributed.nn was imported before launched(): nothing to test")
with launched(torch.device("cpu")):
    rank, group = dist.get_rank(), weakref.ref(dist.group.WORLD)
    import torch.distributed.nn
gc.collect()
with open(f"{sys.argv[1]}/rank{rank}.txt", "w") as out:  # not stdout: the ranks share it
    out.write("alive" if group() is not None else "freed")
"""


def test_the_group_is_freed_when_launched_ends_whatever_was_imported_inside(tmp_path):
    # Otherwise gloo's threads outlive it into interpreter shutdown, where they can abort
    # a rank that finished ("terminate called without an active exception", seen in CI).
    script = tmp_path / "outlives.py"
    script.write_text(OUTLIVES)
    launch = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD),
        "--standalone", str(script), str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(launch, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    groups = [(tmp_path / f"rank{r}.txt").read_text() for r in range(WORLD)]
    assert groups == ["freed"] * WORLD
