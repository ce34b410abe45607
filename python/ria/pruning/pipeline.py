"""`ria.prune`: the block loop (ARCHITECTURE.md, "One block's data flow").

Per decoder block, in order: gather input statistics on the dense block, score every
Linear (Rust), find and apply the deployable channel permutation (optional), select the
masks, reconstruct the weights under them (optional OBS update) and apply them; then re-run
the pruned block so the next block is calibrated on what it will really see.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .._torch import default_device, module_device
from ..arch import find_blocks, fused_experts, quantization_method
from ..core import (
    PermutationResult,
    RefineStats,
    SearchOptions,
    __version__,
    kept_score,
    magnitude_score,
    nm_mask,
    permute_in_place,
    refine_mask,
    ria_score,
    search_permutations,
    unstructured_mask,
    wanda_score,
)
from ..data import check_context, check_vocabulary
from ..errors import DistributedError, InvalidArgumentError, RiaError, UnsupportedModelError
from ..permutation import (
    BlockLayout,
    BlockSearch,
    Orders,
    SearchStats,
    apply_block,
    block_layout,
    group_order,
    is_permuted,
    matrix_orders,
    nm_order,
    reorders,
    settle_orders,
)
from .calibration import calibration_windows
from .capture import BlockInputs, InputStats, capture_block_inputs, collecting_stats, run_block
from .config import ALPHA_GRID, DEFAULT_ALPHA, Method, PruneConfig, Sparsity
from .coverage import MIN_COVERAGE, Coverage, decoder_coverage
from .distributed import BlockCosts, BlockSplit, Ranks, SharedSearch, current
from .error import relative_output_error
from .matrices import PrunableMatrix, block_matrices
from .obs import obs_prune
from .report import LayerReport, PruneReport, StageTimer

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from .refine_gpu import GpuRefineStats

__all__ = ["INCOMPLETE", "MIN_ROUTED_TOKENS", "Placement", "prune", "prune_with"]

# `model.config.ria["status"]` while a prune is under way or after one was interrupted:
# the model is part pruned and `ria.save_pruned` refuses it.
INCOMPLETE = "incomplete"

# An expert routed fewer calibration tokens than this is scored on its weights alone
# (magnitude): so few tokens say more about the sampled windows than about the expert.
MIN_ROUTED_TOKENS = 32


def prune(
    model: PreTrainedModel,
    tokenizer: Any = None,
    *,
    sparsity: Sparsity | float | str = 0.5,
    method: Method = "ria",
    permute: bool | str = False,
    calibration: Any = "c4",
    nsamples: int = 128,
    seqlen: int = 2048,
    alpha: float | str = DEFAULT_ALPHA,
    per_row: bool | None = None,
    reconstruct: bool = False,
    refine: bool = False,
    refit_iters: int = 20,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    batch_size: int = 1,
    permutation_options: dict[str, Any] | SearchOptions | None = None,
    allow_partial: bool = False,
    measure_error: bool = False,
) -> PruneReport:
    """Prunes every matrix inside the decoder blocks of a causal LM, in place: each
    `nn.Linear`, and each expert of fused MoE experts (calibrated on the tokens the
    model's router sends it; an expert routed fewer than `MIN_ROUTED_TOKENS` is pruned by
    magnitude, and the report says which). A Linear the calibration forward never calls
    is pruned by magnitude too, and named in the report.

    Routers, embeddings and the LM head are never pruned. The model keeps its class, dtype and
    devices, and stays a normal Hugging Face model (`ria.save_pruned` writes it). Every
    argument is checked before the model is touched.

    Args:
        sparsity: fraction of weights to prune (unstructured), or "N:M" to keep N of every
            M consecutive input weights per row ("2:4" runs on sparse tensor cores), or a
            `ria.Sparsity`.
        method: "ria" (relative importance x activations, the paper), "wanda",
            "magnitude" (no calibration data needed) or "sparsegpt" (OBS, baseline).
        permute: N:M only. Find and apply channel permutations that raise the importance
            an N:M mask keeps; the model computes the same function. "free": every Linear
            its own input order, applied by gathering its input (one gather per
            Linear and call), down's order folded into gate/up rows; any family without
            fused experts. "folded": one order shared by the modules that read one tensor
            (traced: q/k/v, gate/up, a MoE block's router and experts...), gathered once
            per group at the norm before them (or the module receiving the tensor);
            o_proj's restricted to heads and folded into v's rows, down's into gate/up's
            rows (per expert for experts): no other run-time cost, less quality; any
            family. True means "folded", the cheaper at run time ("free" gives the better
            model, README "Quality", but costs a gather per Linear).
        calibration: "c4", "wikitext2", "austen" (shipped sample), a text file or
            directory, a list of strings, a `datasets.Dataset`, or token ids.
        nsamples, seqlen: calibration windows and their length in tokens.
        alpha: RIA's activation exponent (`a` in the paper), or "auto": per layer, the
            exponent in `ria.pruning.ALPHA_GRID` whose mask gives the lowest output error
            on the calibration data (collects `X^T X`, like `reconstruct`).
        per_row: unstructured selection per output row; None uses each method's own rule
            (per row for Wanda, per matrix for RIA, magnitude and SparseGPT).
        reconstruct: update the kept weights to make up for the pruned ones: SparseGPT's
            OBS update under the chosen mask, then a least-squares refit of the kept
            weights under that mask (a few conjugate-gradient steps; the OBS update alone
            is an approximation of it). With method="sparsegpt", adds the refit to
            SparseGPT's own update (which alone is the published method).
        refine: improve every mask against the layer's output error on the calibration
            data by swapping kept and pruned weights within an N:M group (or a row), in
            the Rust core (DSnoT / SparseSwaps), or on the GPU for N:M layers there
            (pruning/refine_gpu.py, same rule). With `reconstruct`, inside the OBS update:
            each block of 128 columns is refined on its already-updated weights against
            the error left after the update (`ria.pruning.obs.block_gram`), just before
            it is pruned.
        refit_iters: conjugate-gradient steps of `reconstruct`'s least-squares refit
            (each one GEMM of the matrix by `X^T X`); 0 keeps the OBS update alone.
        seed: calibration windows and permutation searches depend on it alone.
        device: where blocks run ("cuda" if available). A model on the CPU stays there
            and each block visits the device in turn; a model dispatched by accelerate
            (`device_map`) is used where it is and `device` is ignored.
        progress: show a progress bar over the blocks.
        batch_size: calibration windows per forward pass.
        permutation_options: a `ria.SearchOptions`, or a dict of its settings, for every
            search (e.g. `{"max_steps": 8}` or `{"time_budget": 5.0}` to bound the search
            per matrix); its seed defaults to `seed`.
        allow_partial: prune even when the prunable matrices hold less than 90% of the
            decoder blocks' matmul parameters; the report lists what stayed dense and why.
        measure_error: report each layer's relative output error on the calibration data
            (`LayerReport.output_error`); collects `X^T X` per Linear input.

    Returns:
        A `PruneReport`: per-layer sparsity, kept score, permutation efficacy and time,
        and seconds per stage.
    """
    config = PruneConfig(
        sparsity=Sparsity.parse(sparsity),
        method=method,
        permute=permute,  # type: ignore[arg-type]  # __post_init__ checks the mode
        calibration=calibration,
        nsamples=nsamples,
        seqlen=seqlen,
        alpha=alpha,  # type: ignore[arg-type]  # __post_init__ checks "auto"
        per_row=per_row,
        reconstruct=reconstruct,
        refine=refine,
        refit_iters=refit_iters,
        measure_error=measure_error,
        seed=seed,
        device=device,  # type: ignore[arg-type]  # __post_init__ turns a str into a device
        progress=progress,
        batch_size=batch_size,
        allow_partial=allow_partial,
        permutation_options=permutation_options or {},  # type: ignore[arg-type]
    )
    return prune_with(model, tokenizer, config)


def _restore_record(model: PreTrainedModel, previous: dict[str, Any] | None) -> None:
    """Puts back the `config.ria` record a model had before a prune that changed nothing."""
    if previous is not None:
        model.config.ria = previous
    elif hasattr(model.config, "ria"):
        del model.config.ria


def prune_with(
    model: PreTrainedModel,
    tokenizer: Any,
    config: PruneConfig,
    placement: Placement | None = None,
    spill: Path | None = None,
) -> PruneReport:
    """`ria.prune` with its settings given as one `PruneConfig`.

    `placement` decides where the blocks' weights are while each one is pruned (see
    `Placement`); by default the model's own, each block visiting `config.device`. With
    `spill`, the calibration hidden states between blocks are kept in files in that
    directory instead of memory (`SpilledStates`; same result).
    """
    started = time.perf_counter()
    ranks = current()  # None: this process prunes alone
    plan = _plan(model, config, placed=placement is not None)
    report = PruneReport(config.to_dict(), coverage=plan.coverage)
    timer = StageTimer(report)

    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    was_training = model.training
    model.eval()
    # Marked incomplete until the last block is done; a failure before the first block is
    # touched (calibration text, vocabulary) puts the previous record back.
    previous = getattr(model.config, "ria", None)
    model.config.ria = {**config.to_dict(), "status": INCOMPLETE, "version": __version__}
    if config.permutation_mode is not None:
        from ..save import keep_plain_on_save  # ria.save imports this package

        keep_plain_on_save(model)  # so model.save_pretrained writes the orders out
    touched = False
    try:
        with (
            torch.no_grad(),
            (placement or _placement)(model, plan.blocks, plan.device) as visit,
            nullcontext() if ranks is None else ranks.agreeing("the end of the prune"),
        ):
            inputs = probe = None
            if ranks is not None:  # each rank's own: a rank given others prunes wrongly
                _check_group_device(plan.device, ranks.device)
                settings = {**config.to_dict(), "batch_size": config.batch_size}
                ranks.check_same("in their settings", settings)
                embeddings = model.get_input_embeddings().weight
                assert isinstance(embeddings, torch.Tensor)
                ranks.check_same_weights("in their input embeddings", embeddings)
            if config.needs_data:
                with timer("calibration"):
                    windows = calibration_windows(
                        config.calibration, tokenizer, config.nsamples, config.seqlen, config.seed
                    )
                    check_context(model, config.seqlen, "calibration")
                    check_vocabulary(model, windows, "calibration")
                    if ranks is not None:
                        windows = ranks.windows(windows, config.batch_size)
                    inputs = capture_block_inputs(
                        model, plan.blocks, windows, config.batch_size, spill
                    )
            elif config.permutation_mode is not None:
                # No calibration data, but orders need a traced forward per block: folded
                # ones for their groups, both for checking the folds on real outputs.
                probe = capture_block_inputs(model, plan.blocks, _probe_tokens(model), 1)
            quiet = not config.progress or (ranks is not None and ranks.rank != 0)
            bar = tqdm(range(len(plan.blocks)), desc="pruning", unit="block", disable=quiet)
            for i in bar:
                if ranks is not None:
                    ranks.doing = f"working on {plan.path}.{i}"
                with visit(plan.blocks[i]) as block:
                    touched = True
                    step = _BlockStep(model, block, f"{plan.path}.{i}", config, plan, timer, ranks)
                    traced = inputs.at(i) if inputs else probe.at(i) if probe else None
                    report.layers.extend(step.run(inputs.at(i) if inputs else None, traced))
                    report.permutation_groups.extend(step.permutation_groups())
                    if inputs is not None and i + 1 < len(plan.blocks):
                        with timer("propagation"):
                            outputs = inputs.empty()
                            run_block(block, inputs.at(i), outputs)
                            inputs = inputs.advanced(outputs)
                bar.set_postfix(sparsity=f"{100 * report.sparsity:.1f}%")
    except BaseException:
        if not touched:
            _restore_record(model, previous)
        raise
    finally:
        model.train(was_training)
        if use_cache is not None:
            model.config.use_cache = use_cache
    model.config.ria = {**config.to_dict(), "version": __version__}
    report.total_seconds = time.perf_counter() - started
    return report


@dataclass(frozen=True)
class _Plan:
    """What `prune` found out about the model before changing anything."""

    path: str
    blocks: nn.ModuleList
    device: torch.device
    coverage: Coverage


def _plan(model: PreTrainedModel, config: PruneConfig, placed: bool = False) -> _Plan:
    """Checks everything that can be checked before the first block is changed; `placed`:
    a `Placement` brings each block's weights (the streaming prune's meta skeleton)."""
    mode = config.permutation_mode
    path, blocks = find_blocks(model)
    _refuse_quantized(model, path, blocks)
    if mode == "free":
        _refuse_freely_permuting_experts(path, blocks)
    target = config.sparsity
    for i, block in enumerate(blocks):
        offloaded = next((n for n, p in block.named_parameters() if p.is_meta), None)
        if offloaded is not None and not placed:
            raise UnsupportedModelError(
                f"{path}.{i}.{offloaded} is offloaded (on the meta device: a device_map with "
                "'cpu' or 'disk' offload), where ria cannot prune it; for a model bigger "
                "than memory use ria.prune_checkpoint (ria prune --low-memory). Nothing was "
                "changed"
            )
        if mode is not None and is_permuted(block):
            raise InvalidArgumentError(
                f"{path}.{i} is already permuted (this model was pruned with permutation "
                "before); load the dense model to prune it again. Nothing was changed"
            )
        if not target.structured:
            continue
        ordered = next(
            (n for n, m in block.named_modules() if nm_order(m) is not None or group_order(m)),
            None,
        )
        if ordered is not None:  # N:M groups along the order, not the plain columns
            raise InvalidArgumentError(
                f"{path}.{i}.{ordered} carries a channel order its weights are N:M along (this "
                "model was pruned with permutation before); N:M masks along the plain columns "
                "would be N:M in neither order. Load the dense model to prune it to N:M "
                "again. Nothing was changed"
            )
        for name, matrix in block_matrices(block).items():
            if matrix.shape[1] % target.m:
                raise InvalidArgumentError(
                    f"{path}.{i}.{name} has {matrix.shape[1]} input features, "
                    f"not divisible by M={target.m} of {target}"
                )
    coverage = decoder_coverage(model, path, blocks)
    if coverage.fraction < MIN_COVERAGE and not config.allow_partial:
        raise UnsupportedModelError(
            f"ria would prune only {100 * coverage.fraction:.1f}% of the decoder's matmul "
            f"parameters ({coverage.summary()}); pass allow_partial=True to prune what it "
            "can anyway. Nothing was changed"
        )
    device = config.device or default_device()
    dispatched = bool(getattr(model, "hf_device_map", None))
    if device.type == "cuda" and not dispatched and not torch.cuda.is_available():
        raise InvalidArgumentError(f"device={str(device)!r} but CUDA is not available here")
    return _Plan(path, blocks, device, coverage)


# Weights ria's scores, masks and updates are defined on.
_FLOAT_WEIGHTS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _refuse_quantized(model: PreTrainedModel, path: str, blocks: nn.ModuleList) -> None:
    """Refuses a quantized model: its stored numbers are not its weights (int8 or 4-bit
    packs, fp8 with block scales), so scores, masks and updates on them would be wrong.
    GGUF checkpoints pass when transformers dequantized them on loading (float weights)."""
    fix = (
        "load it unquantized (dequantized), prune it, then quantize it (ria.sparsify(model, "
        'dtype="fp8") runs fp8 2:4). Nothing was changed'
    )
    method = quantization_method(model.config)
    if method is not None and method != "gguf":
        raise UnsupportedModelError(
            f"this model is quantized ({method}); ria prunes float weights: {fix}"
        )
    for i, block in enumerate(blocks):
        for name, matrix in block_matrices(block).items():
            if matrix.param.dtype not in _FLOAT_WEIGHTS:
                raise UnsupportedModelError(
                    f"{path}.{i}.{name} holds {matrix.param.dtype} weights (quantized); ria "
                    f"prunes float weights: {fix}"
                )


def _refuse_freely_permuting_experts(path: str, blocks: nn.ModuleList) -> None:
    for i, block in enumerate(blocks):
        for name in fused_experts(block):
            raise UnsupportedModelError(
                f"free channel orders for fused MoE experts ({path}.{i}.{name}) are not "
                "supported (each expert would gather its tokens' input); use "
                'permute="folded" (permute=True)'
            )


def _check_group_device(device: torch.device, group: torch.device) -> None:
    """Refuses a CUDA device other than the one NCCL's collectives run on (the current
    CUDA device): they would move every statistic and weight between GPUs, or hang."""
    if device.type == group.type == "cuda" and device.index not in (None, group.index):
        raise InvalidArgumentError(
            f"this rank prunes on {device} but its current CUDA device, which NCCL uses, "
            f"is {group}: call torch.cuda.set_device({str(device)!r}) before the prune"
        )


def _probe_tokens(model: PreTrainedModel, tokens: int = 16) -> torch.Tensor:
    """A few token ids, `(1, tokens)`, to trace the blocks' wiring when there is no
    calibration data (the wiring does not depend on the values)."""
    weight = model.get_input_embeddings().weight
    assert isinstance(weight, torch.Tensor)
    vocab = int(weight.shape[0])
    return (torch.arange(tokens) * 7919 % vocab)[None]


NON_FINITE_ACTIVATIONS = (
    "its input activations on the calibration data contain NaN or inf (the blocks before "
    "it overflow in the model's dtype, or the model is damaged); load the model in "
    "bfloat16 or float32, or check its weights"
)


class _BlockStep:
    """One decoder block through the named stages of `run`; with `ranks`, its work split
    over processes (pruning/distributed.py)."""

    def __init__(
        self,
        model: PreTrainedModel,
        block: nn.Module,
        prefix: str,
        config: PruneConfig,
        plan: _Plan,
        timer: StageTimer,
        ranks: Ranks | None = None,
    ) -> None:
        self.model, self.block, self.prefix = model, block, prefix
        self.config, self.plan, self.timer = config, plan, timer
        self.ranks = ranks  # the processes sharing the work, None alone
        self.matrices = block_matrices(block)
        self.layout = BlockLayout()
        self.alphas: dict[str, float] = {}
        self.search_seconds: list[float] = []  # each search job's, in the plan's order
        self.score_seconds: dict[str, float] = {}  # each matrix's scoring here
        # Experts routed fewer than MIN_ROUTED_TOKENS calibration tokens, and matrices
        # that saw none: their scores are weight-only, and no mask refinement or OBS
        # update fits them to so few tokens.
        self.weight_only: set[str] = set()

    def run(self, inputs: BlockInputs | None, traced: BlockInputs | None) -> list[LayerReport]:
        """Prunes the block on calibration `inputs` (None: without data); `traced`
        (calibration or probe inputs) is what its wiring is traced on."""
        self.layout = self.trace(traced)
        target, mode = self.config.sparsity, self.config.permutation_mode
        plan = None if mode is None else BlockSearch(self.matrices, self.layout, target.m, mode)
        split = None
        names = list(self.matrices)  # the matrices this process prunes
        needed = None  # the matrices it scores (None: all, or each when its turn comes)
        if self.ranks is not None:  # who searches, scores and prunes what
            split = self.ranks.split(
                {x: math.prod(matrix.shape) for x, matrix in self.matrices.items()},
                [job.matrices for job in plan.jobs] if plan else [],
            )
            names = split.pruned_by(self.ranks.rank)
            needed = tuple(split.scored_by(self.ranks.rank))
        stats = self.gather_statistics(inputs, split)
        # The search reads every score at once; otherwise each matrix is scored when its
        # turn comes and its score freed after it, so the block's float32 scores (twice
        # its bf16 weights) never all exist at once.
        scores: dict[str, np.ndarray] = {}
        searched: dict[str, SearchStats] = {}
        if plan is not None:
            scores = self.score(stats, needed)
            with naming(self.prefix):
                scores, stats, searched = self.permute(scores, stats, plan, split, names)
        layers = {name: self.prune_matrix(name, scores, stats, searched) for name in names}
        if self.ranks is not None:
            assert split is not None
            with self.timer("communication"):
                # With what scoring each matrix cost its owner, to split the next block.
                shared = self.ranks.share_matrices(
                    f"sending {self.prefix}'s pruned matrices",
                    self.matrices,
                    split.owners,
                    {x: (layers[x], self.score_seconds.get(x, 0.0)) for x in names},
                )
            layers = {name: layer for name, (layer, _) in shared.items()}
            self.ranks.costs = BlockCosts(
                [tuple(j) for j in split.reads],
                self.search_seconds,
                {name: layers[name].seconds for name in self.matrices},
                {name: shared[name][1] for name in self.matrices},
            )
        settle_orders(self.block)  # no gathers in the forward: orders recorded, weights plain
        return [layers[name] for name in self.matrices]

    def prune_matrix(
        self,
        name: str,
        scores: dict[str, np.ndarray],
        stats: dict[str, InputStats],
        searched: dict[str, SearchStats],
    ) -> LayerReport:
        """Selects, refines and reconstructs the mask of one matrix and applies it; its
        score is taken out of `scores` (or computed, when not there)."""
        matrix = self.matrices[name]
        t0 = time.perf_counter()
        score = scores.pop(name) if name in scores else self.score(stats, (name,))[name]
        with naming(f"{self.prefix}.{name}"):
            calibrated = name in stats and name not in self.weight_only
            hessian = stats[name].hessian if calibrated else None
            original = matrix.weight.clone() if hessian is not None else None
            # SparseGPT chooses its mask inside the OBS loop; other methods here.
            own = self.config.method == "sparsegpt" and hessian is not None
            keep = None if own else self.select(score)
            refined = None
            if self.config.needs_reconstruction and hessian is not None:
                # With refine, inside the OBS loop, against the error after the update.
                keep, refined = self.reconstruct(matrix, hessian, keep)
            else:
                assert keep is not None  # only SparseGPT leaves the mask to its OBS loop
                if self.config.refine and hessian is not None:
                    keep, refined = self.refine(matrix, hessian, keep)
                self.apply(matrix, keep)
            error = None
            if original is not None and hessian is not None:
                error = relative_output_error(original, matrix.weight, hessian)
        return self.layer_report(name, score, keep, stats, searched, t0, error, refined)

    def trace(self, traced: BlockInputs | None) -> BlockLayout:
        """The block's folds and, given inputs, its traced input groups (one forward of
        the dense block on the first batch)."""
        if traced is None:
            return block_layout(self.model, self.block, None)
        first = BlockInputs([next(iter(traced.hidden))], traced.kwargs)  # list or spilled
        with self.timer("statistics"), naming(self.prefix):
            layout = block_layout(
                self.model,
                self.block,
                lambda: run_block(self.block, first),
                check_folds=self.config.permutation_mode is not None,
            )
        if self.ranks is not None:  # each traced its own first batch: the wiring must agree
            with self.timer("communication"):
                self.ranks.check_same(f"tracing {self.prefix}", repr(layout))
        return layout

    def permutation_groups(self) -> list[dict[str, Any]]:
        """How each traced group of the block was permuted (folded mode), for the report."""
        if self.config.permutation_mode != "folded":
            return []
        return [
            {
                "readers": [f"{self.prefix}.{r}" for r in g.readers],
                "gather": g.gather,
                "carrier": None if g.carrier is None else f"{self.prefix}.{g.carrier}",
                "reason": g.reason,
            }
            for g in self.layout.groups
        ]

    def gather_statistics(
        self, inputs: BlockInputs | None, split: BlockSplit | None = None
    ) -> dict[str, InputStats]:
        """Input statistics of every matrix on the dense block (empty without data);
        notes the matrices that saw too few tokens to use theirs. Split over ranks, a rank
        keeps only the Gram matrices of what `split` has it score (alpha="auto") or prune."""
        if inputs is None:
            return {}
        groups = self.layout.stat_groups(list(self.matrices))
        with (
            self.timer("statistics"),
            collecting_stats(self.block, self.matrices, groups, self.config.needs_hessian) as stats,
        ):
            if self.ranks is not None:
                self.ranks.track(stats)
            run_block(self.block, inputs)
        if self.ranks is not None:  # each ran its share of the batches: sum them
            with self.timer("communication"):
                assert split is not None
                gram_ranks = {
                    x: split.gram_ranks(x, scoring=self.config.alpha == "auto") for x in stats
                }
                self.ranks.reduce_stats(f"summing {self.prefix}'s statistics", stats, gram_ranks)
        for s in {id(s): s for s in stats.values()}.values():
            s.finish()
        # A Linear the block's forward never called (a branch calibration text does not
        # take) has all-zero statistics: its RIA scores would all be zero and its OBS
        # update would zero it, so it is scored by magnitude like a starved expert.
        self.weight_only = {
            name
            for name, s in stats.items()
            if s.tokens < (MIN_ROUTED_TOKENS if self.matrices[name].expert is not None else 1)
        }
        return stats

    def score(
        self, stats: dict[str, InputStats], names: tuple[str, ...] | None = None
    ) -> dict[str, np.ndarray]:
        """Importance of every weight of the matrices `names` (all by default), `(out,
        in)` float32 per matrix; all finite. Matrices that saw too few tokens get their
        weights' magnitude."""
        scores = {}
        with self.timer("scores"):
            for name in self.matrices if names is None else names:
                matrix = self.matrices[name]
                started = time.perf_counter()
                with naming(f"{self.prefix}.{name}"):
                    # The core refuses non-finite weights and scores that would overflow,
                    # naming the entry; activations are checked here to say where they
                    # come from.
                    if name in stats and not stats[name].sumsq.isfinite().all():
                        raise InvalidArgumentError(NON_FINITE_ACTIVATIONS)
                    if name in self.weight_only:
                        scores[name] = magnitude_score(matrix.weight)
                    elif self.config.alpha == "auto":
                        self.alphas[name], scores[name] = self.best_alpha(matrix, stats[name])
                    else:
                        scores[name] = score_matrix(matrix, stats.get(name), self.config)
                self.score_seconds[name] = time.perf_counter() - started
        return scores

    def best_alpha(self, matrix: PrunableMatrix, stats: InputStats) -> tuple[float, np.ndarray]:
        """The exponent of `ALPHA_GRID` whose RIA mask (in storage order, no update) has
        the lowest output error on the calibration data, and its scores."""
        assert stats.hessian is not None  # collected whenever alpha="auto"
        weight = matrix.weight
        best: tuple[float, float, np.ndarray] | None = None
        for alpha in ALPHA_GRID:
            score = ria_score(weight, stats.act_norm, alpha)
            pruned = weight * torch.from_numpy(self.select(score)).to(weight.device)
            error = relative_output_error(weight, pruned, stats.hessian)
            if best is None or error < best[0]:
                best = (error, alpha, score)
        assert best is not None
        return best[1], best[2]

    def permute(
        self,
        scores: dict[str, np.ndarray],
        stats: dict[str, InputStats],
        plan: BlockSearch,
        split: BlockSplit | None,
        keep: list[str],
    ) -> tuple[dict[str, np.ndarray], dict[str, InputStats], dict[str, SearchStats]]:
        """Runs the block's searches (`plan`; split over the ranks by `split`) and applies
        the orders; the scores and statistics of the matrices `keep` follow the weights
        into storage order (scores are equivariant to it, so nothing is recomputed), the
        others are dropped (another process prunes them)."""
        target = self.config.sparsity
        options = self.config.permutation_options
        with self.timer("permutation"):
            if self.ranks is None or split is None:
                problems = plan.problems(scores)
                results: Sequence[PermutationResult | SharedSearch] = (
                    search_permutations(problems, target.n, target.m, options) if problems else []
                )
            else:
                results = self.ranks.search(
                    f"searching {self.prefix}'s permutations",
                    [  # another rank's searches may read scores this one has not computed
                        job.problem(scores) if set(job.matrices) <= scores.keys() else None
                        for job in plan.jobs
                    ],
                    split.searches,
                    target.n,
                    target.m,
                    options,
                )
            self.search_seconds = [r.seconds for r in results]
            perm, searched = plan.result(results)
            orders = matrix_orders(self.block, reorders(self.block, self.layout, perm))
            apply_block(self.block, self.layout, perm)
            kept = set(keep)
            scores = {
                name: _reorder(s, *orders.get(name, (None, None)))
                for name, s in scores.items()
                if name in kept
            }
            stats = {name: s for name, s in stats.items() if name in kept}
        return scores, _reorder_stats(stats, orders), searched

    def select(self, score: np.ndarray) -> np.ndarray:
        """The keep-mask: N:M, or unstructured per row or per matrix."""
        target = self.config.sparsity
        with self.timer("masks"):
            if target.structured:
                return nm_mask(score, target.n, target.m)
            return unstructured_mask(score, target.fraction, per_row=bool(self.config.per_row))

    def refine(
        self, matrix: PrunableMatrix, hessian: torch.Tensor, keep: np.ndarray
    ) -> tuple[np.ndarray, dict[str, float]]:
        """The mask improved against the output error without a weight update."""
        with self.timer("refinement"):
            keep, result = self.refine_rows(matrix.weight, hessian, keep)
        return keep, _refinement_dict([result])

    def refine_rows(
        self, weight: torch.Tensor, gram: torch.Tensor, keep: np.ndarray
    ) -> tuple[np.ndarray, RefineStats | GpuRefineStats]:
        """`keep` (`weight`'s shape) improved against `sum_rows d^T gram d` of the pruned
        part `d`: on the GPU for N:M weights there, else in the Rust core."""
        target = self.config.sparsity
        on_gpu = target.structured and weight.is_cuda
        if on_gpu:
            # The same swaps, all rows at once; imported here because it loads triton.
            from .refine_gpu import gpu_refinable, refine_nm_on_gpu

            on_gpu = gpu_refinable(weight, target.m)
        if on_gpu:
            refined, gpu_result = refine_nm_on_gpu(
                weight,
                gram,
                torch.from_numpy(keep).to(weight.device),
                target.n,
                target.m,
                max_sweeps=self.config.refine_sweeps,
            )
            return refined.cpu().numpy(), gpu_result
        return refine_mask(
            weight, gram, keep, target.n, target.m, max_sweeps=self.config.refine_sweeps
        )

    def reconstruct(
        self, matrix: PrunableMatrix, hessian: torch.Tensor, keep: np.ndarray | None
    ) -> tuple[np.ndarray, dict[str, float] | None]:
        """The OBS update under `keep` (or SparseGPT's own mask), each block's mask refined
        on its updated weights first when `refine` is on; returns the mask used and what
        refinement did (summed over the blocks; None without refinement)."""
        target = self.config.sparsity
        results: list[RefineStats | GpuRefineStats] = []

        def refine_block(w: torch.Tensor, gram: torch.Tensor, k: np.ndarray) -> np.ndarray:
            with self.timer("refinement"):
                k, result = self.refine_rows(w, gram, k)
            results.append(result)
            return k

        with self.timer("reconstruction"):
            new_weight, keep_t = obs_prune(
                matrix.weight,
                hessian,
                keep=None if keep is None else torch.from_numpy(keep),
                sparsity=target.fraction,
                n=target.n,
                m=target.m,
                refine=refine_block if self.config.refine else None,
                # SparseGPT as published unless `reconstruct` asks for the full job.
                refit_iters=self.config.refit_iters if self.config.reconstruct else 0,
            )
        matrix.weight.copy_(new_weight)
        return keep_t.cpu().numpy(), _refinement_dict(results) if results else None

    def apply(self, matrix: PrunableMatrix, keep: np.ndarray) -> None:
        """Zeroes the pruned weights."""
        with self.timer("masks"):
            weight = matrix.weight
            # In place, through a bool mask: `mul_` by the mask made a temporary copy of
            # it in the weight's dtype.
            weight.masked_fill_(torch.from_numpy(~keep).to(weight.device), 0)

    def layer_report(
        self,
        name: str,
        score: np.ndarray,
        keep: np.ndarray,
        stats: dict[str, InputStats],
        searched: dict[str, SearchStats],
        started: float,
        output_error: float | None,
        refined: dict[str, float] | None,
    ) -> LayerReport:
        matrix = self.matrices[name]
        weight = matrix.weight
        s = searched.get(name)
        routed = stats.get(name) if matrix.expert is not None else None
        return LayerReport(
            name=f"{self.prefix}.{name}",
            shape=matrix.shape,
            sparsity=1.0 - int(torch.count_nonzero(weight)) / weight.numel(),
            kept_score=kept_score(score, keep),
            seconds=time.perf_counter() - started,
            permutation=None if s is None else s.to_dict(),
            routed_tokens=None if routed is None else routed.tokens,
            weight_only=name in self.weight_only,
            output_error=output_error,
            alpha=self.alphas.get(name),
            refinement=refined,
        )


def _refinement_dict(results: list[RefineStats | GpuRefineStats]) -> dict[str, float]:
    """What refinement did, summed over calls (one per matrix, or one per OBS block):
    errors in the units of the Gram matrices they were measured on."""
    return {
        "error_before": sum(r.error_before for r in results),
        "error_after": sum(r.error_after for r in results),
        "swaps": sum(r.swaps for r in results),
        "sweeps": max(r.sweeps for r in results),
        "seconds": sum(r.seconds for r in results),
    }


def score_matrix(
    matrix: PrunableMatrix, stats: InputStats | None, config: PruneConfig
) -> np.ndarray:
    """The importance of every weight of `matrix` under `config.method`, `(out, in)` f32."""
    weight = matrix.weight
    if config.method == "magnitude":
        return magnitude_score(weight)
    if stats is None:
        raise InvalidArgumentError(f"method {config.method!r} needs calibration statistics")
    act = stats.act_norm
    if config.method == "ria":
        assert config.alpha != "auto"  # chosen per matrix by `_BlockStep.best_alpha`
        return ria_score(weight, act, config.alpha)
    # Wanda's score; for SparseGPT (whose mask is chosen inside the OBS loop) it is the
    # diagonal-Hessian saliency |W_ij| * sqrt(H_jj), used for reporting and permutation.
    return wanda_score(weight, act)


@contextmanager
def naming(where: str) -> Iterator[None]:
    """ria's errors raised in the body (the Rust core's included) start with `where`."""
    try:
        yield
    except RiaError as exc:
        # A DistributedError names the rank and block that failed (maybe not this one).
        if str(exc).startswith(where) or isinstance(exc, DistributedError):
            raise
        raise type(exc)(f"{where}: {exc}") from exc


def _reorder(score: np.ndarray, rows: torch.Tensor | None, cols: torch.Tensor | None) -> np.ndarray:
    """A score matrix in a permuted storage order (scores are equivariant to it), reordered
    in place by the core: a gather into a new matrix (torch's `index_select`) spent most of
    its 0.54 s per 7B block faulting in the new matrix's pages."""
    permute_in_place(score, rows, cols)
    return score


def _reorder_stats(
    stats: dict[str, InputStats], orders: dict[str, Orders]
) -> dict[str, InputStats]:
    """Input statistics in the permuted order of each Linear's input channels; Linears
    that share an input and an order keep sharing one `InputStats`."""
    out: dict[str, InputStats] = {}
    done: dict[tuple[int, int], InputStats] = {}
    for name, s in stats.items():
        cols = orders.get(name, (None, None))[1]
        if cols is None:
            out[name] = s
            continue
        key = (id(s), id(cols))  # free orders: one copy per Linear; folded: per group
        if key not in done:
            done[key] = s.reordered(cols)
        out[name] = done[key]
    return out


# `placement(model, blocks, device)` is entered once around the whole prune (the calibration
# capture runs inside it) and yields `visit`; `with visit(block) as b:` holds one block
# while it is pruned and propagated, its weights on `device`. `_placement` moves the model's
# own weights; the streaming prune (ria.streaming) loads each block from the checkpoint's
# shards and writes it out when the visit ends without an error.
Visit = Callable[[nn.Module], AbstractContextManager[nn.Module]]
Placement = Callable[[nn.Module, nn.ModuleList, torch.device], AbstractContextManager[Visit]]


@contextmanager
def _placement(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> Iterator[Visit]:
    """Puts everything but the blocks on `device` for the duration, and yields a context
    that brings one block to `device` and back. Models dispatched by accelerate stay
    where they are."""
    if getattr(model, "hf_device_map", None):

        @contextmanager
        def in_place(block: nn.Module) -> Iterator[nn.Module]:
            yield block

        yield in_place
        return

    block_ids = {id(b) for b in blocks}
    moved = []
    for module in _outside_blocks(model, block_ids):
        moved.append((module, module_device(module)))
        module.to(device)

    @contextmanager
    def visit(block: nn.Module) -> Iterator[nn.Module]:
        home = module_device(block)
        block.to(device)
        try:
            yield block
        finally:
            block.to(home)

    try:
        yield visit
    finally:
        for module, home in moved:
            module.to(home)


def _outside_blocks(module: nn.Module, block_ids: set[int]) -> list[nn.Module]:
    """The largest submodules that contain no block (their union is everything else)."""
    out = []
    for child in module.children():
        if id(child) in block_ids:
            continue
        if any(id(m) in block_ids for m in child.modules()):
            out.extend(_outside_blocks(child, block_ids))
        else:
            out.append(child)
    return out
