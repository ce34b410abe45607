"""`ria.prune`, the pruning pipeline, stage by stage (DESIGN §1, §3, §4).

Per decoder block, in order: collect input statistics on the dense block, score every
Linear (Rust), optionally find and apply the deployable channel permutation, select and
apply the masks (optionally with the OBS update), then re-run the pruned block so the
next block is calibrated on what it will really see.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ._core import __version__
from .arch import attention_heads, block_linears, find_blocks, input_groups, require_permutable
from .block_perm import SearchStats, search_block
from .calibration import calibration_windows
from .capture import (
    BlockInputs,
    InputStats,
    capture_first_block_inputs,
    collecting_stats,
    module_device,
    run_block,
)
from .core import magnitude_score, nm_mask, ria_score, unstructured_mask, wanda_score
from .permute import apply_block, linear_orders
from .report import LayerReport, PruneReport
from .sparsegpt import obs_prune

Method = Literal["ria", "wanda", "magnitude", "sparsegpt"]
METHODS: tuple[str, ...] = get_args(Method)


@dataclass(frozen=True)
class Sparsity:
    """A target: `fraction` of weights pruned, as N:M (keep n of every m) or unstructured."""

    fraction: float
    n: int = 0
    m: int = 0

    @property
    def structured(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else f"{self.fraction:g}"

    @classmethod
    def parse(cls, value: float | str) -> Sparsity:
        """0.5 (unstructured) or "2:4" / "4:8" / "N:M" (keep N of every M)."""
        if isinstance(value, str):
            match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", value)
            if match is None:
                try:
                    value = float(value)
                except ValueError:
                    raise ValueError(
                        f"bad sparsity {value!r}: use a fraction like 0.5 or N:M like '2:4'"
                    ) from None
            else:
                n, m = int(match[1]), int(match[2])
                if not 1 <= n < m:
                    raise ValueError(f"bad sparsity {value!r}: N:M keeps N of every M, 1 <= N < M")
                return cls(1 - n / m, n, m)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"sparsity must be a float or an 'N:M' string, got {value!r}")
        if not (math.isfinite(value) and 0 <= value < 1):
            raise ValueError(f"sparsity must be in [0, 1), got {value}")
        return cls(float(value))


def prune(
    model: nn.Module,
    tokenizer: Any = None,
    *,
    sparsity: float | str = 0.5,
    method: Method = "ria",
    permute: bool = False,
    calibration: Any = "c4",
    nsamples: int = 128,
    seqlen: int = 2048,
    alpha: float = 0.5,
    per_row: bool | None = None,
    reconstruct: bool = False,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    batch_size: int = 1,
    permutation_options: dict[str, Any] | None = None,
) -> PruneReport:
    """Prunes every `nn.Linear` inside the decoder blocks of a causal LM, in place.

    Embeddings and the LM head are never pruned. The model keeps its class, dtype and
    devices, and stays a normal Hugging Face model (`ria.save_pruned` writes it).

    Args:
        sparsity: fraction of weights to prune (unstructured), or "N:M" to keep N of every
            M consecutive input weights per row ("2:4" runs on sparse tensor cores).
        method: "ria" (relative importance x activations, the paper), "wanda",
            "magnitude" (no calibration data needed) or "sparsegpt" (OBS, baseline).
        permute: N:M only. Find and apply channel permutations that raise the importance
            an N:M mask keeps; the model computes the same function (norm outputs are
            gathered once per block, other orders are folded into weights).
        calibration: "c4", "wikitext2", "austen" (shipped sample), a text file or
            directory, a list of strings, a `datasets.Dataset`, or token ids.
        nsamples, seqlen: calibration windows and their length in tokens.
        alpha: RIA's activation exponent (`a` in the paper).
        per_row: unstructured selection per output row; None uses each method's own rule
            (per row for Wanda, per matrix for RIA, magnitude and SparseGPT).
        reconstruct: apply SparseGPT's OBS weight update under the chosen mask (for
            unstructured and N:M).
        seed: calibration windows and permutation searches depend on it alone.
        device: where blocks run ("cuda" if available). A model on the CPU stays there
            and each block visits the device in turn; a model dispatched by accelerate
            (`device_map`) is used where it is and `device` is ignored.
        batch_size: calibration windows per forward pass.
        permutation_options: extra arguments for `ria.search_permutation` (e.g.
            `{"max_steps": 8}` or `{"time_budget": 5.0}` to bound the search per matrix).
    """
    started = time.perf_counter()
    target = Sparsity.parse(sparsity)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if permute and not target.structured:
        raise ValueError("permute=True needs an N:M sparsity such as '2:4'")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    spec = require_permutable(model) if permute else None
    blocks_path, blocks = find_blocks(model)
    _check_layers(blocks_path, blocks, target)
    if per_row is None:
        per_row = method == "wanda"
    compute = torch.device(device) if device is not None else default_device()
    dispatched = bool(getattr(model, "hf_device_map", None))
    if compute.type == "cuda" and not dispatched and not torch.cuda.is_available():
        raise ValueError(f"device={str(compute)!r} but CUDA is not available here")

    settings = {
        "method": method,
        "sparsity": str(target),
        "permute": permute,
        "reconstruct": reconstruct,
        "alpha": alpha,
        "per_row": per_row,
        "calibration": _describe(calibration),
        "nsamples": nsamples,
        "seqlen": seqlen,
        "seed": seed,
    }
    report = PruneReport(settings)
    timer = _StageTimer(report)
    needs_data = method != "magnitude" or reconstruct
    hessian = method == "sparsegpt" or reconstruct
    search_options = {"seed": seed, **(permutation_options or {})}

    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _placement(model, blocks, compute) as visit:
            inputs = None
            if needs_data:
                with timer("calibration"):
                    windows = calibration_windows(calibration, tokenizer, nsamples, seqlen, seed)
                    inputs = capture_first_block_inputs(model, blocks[0], windows, batch_size)
            bar = tqdm(range(len(blocks)), desc="pruning", unit="block", disable=not progress)
            for i in bar:
                with visit(blocks[i]) as block:
                    layers = _prune_block(
                        model,
                        block,
                        f"{blocks_path}.{i}",
                        inputs,
                        target,
                        method,
                        spec,
                        alpha,
                        per_row,
                        hessian,
                        reconstruct,
                        search_options,
                        timer,
                    )
                    report.layers.extend(layers)
                    if inputs is not None and i + 1 < len(blocks):
                        with timer("propagation"):
                            inputs = BlockInputs(run_block(block, inputs), inputs.kwargs)
                bar.set_postfix(sparsity=f"{100 * report.sparsity:.1f}%")
    finally:
        model.train(was_training)
        if use_cache is not None:
            model.config.use_cache = use_cache
    model.config.ria = {**settings, "version": __version__}
    report.total_seconds = time.perf_counter() - started
    return report


def _prune_block(
    model: nn.Module,
    block: nn.Module,
    prefix: str,
    inputs: BlockInputs | None,
    target: Sparsity,
    method: str,
    spec,
    alpha: float,
    per_row: bool,
    hessian: bool,
    reconstruct: bool,
    search_options: dict[str, Any],
    timer: _StageTimer,
) -> list[LayerReport]:
    linears = block_linears(block)
    names = list(linears)
    stats: dict[str, InputStats] = {}
    if inputs is not None:
        with (
            timer("statistics"),
            collecting_stats(block, input_groups(model, names), hessian) as stats,
        ):
            run_block(block, inputs)

    with timer("scores"):
        scores = {name: _score(linears[name], stats.get(name), method, alpha) for name in names}
    searched: dict[str, SearchStats] = {}
    if spec is not None:
        with timer("permutation"):
            heads = attention_heads(model)
            perm, searched = search_block(scores, spec, heads, target.n, target.m, search_options)
            apply_block(block, spec, heads, perm)
            # Scores and input statistics follow the weights into storage order.
            orders = linear_orders(spec, heads, perm)
            scores = {
                name: _reorder(s, *orders.get(name, (None, None))) for name, s in scores.items()
            }
            stats = _reorder_stats(stats, orders)

    layers = []
    for name in names:
        t0 = time.perf_counter()
        linear, score = linears[name], scores[name]
        with timer("masks"):
            keep = _select(score, target, per_row) if method != "sparsegpt" else None
        if method == "sparsegpt" or reconstruct:
            with timer("reconstruction"):
                h = stats[name].hessian
                new_weight, keep_t = obs_prune(
                    linear.weight.data,
                    h,
                    keep=None if keep is None else torch.from_numpy(keep),
                    sparsity=target.fraction,
                    n=target.n,
                    m=target.m,
                )
                linear.weight.data.copy_(new_weight)
                keep = keep_t.cpu().numpy()
        else:
            with timer("masks"):
                linear.weight.data.mul_(torch.from_numpy(keep).to(linear.weight.device))
        permutation = None
        if name in searched:
            s = searched[name]
            permutation = {
                "retained": s.retained,
                "identity": s.identity,
                "upper_bound": s.upper_bound,
                "efficacy": s.efficacy,
                "seconds": s.seconds,
            }
        layers.append(
            LayerReport(
                name=f"{prefix}.{name}",
                shape=tuple(linear.weight.shape),
                sparsity=1.0 - int(torch.count_nonzero(linear.weight)) / linear.weight.numel(),
                kept_score=float(score[keep].sum(dtype=np.float64)),
                seconds=time.perf_counter() - t0,
                permutation=permutation,
            )
        )
    return layers


def _score(linear: nn.Linear, stats: InputStats | None, method: str, alpha: float) -> np.ndarray:
    weight = linear.weight.data
    if method == "magnitude":
        return magnitude_score(weight)
    act = stats.act_norm
    if method == "ria":
        return ria_score(weight, act, alpha)
    # Wanda's score; for SparseGPT (whose mask is chosen inside the OBS loop) it is the
    # diagonal-Hessian saliency |W_ij| * sqrt(H_jj), used for reporting and permutation.
    return wanda_score(weight, act)


def _select(score: np.ndarray, target: Sparsity, per_row: bool) -> np.ndarray:
    if target.structured:
        return nm_mask(score, target.n, target.m)
    return unstructured_mask(score, target.fraction, per_row=per_row)


def _reorder(score: np.ndarray, rows: torch.Tensor | None, cols: torch.Tensor | None) -> np.ndarray:
    """A score matrix in a permuted storage order (scores are equivariant to it)."""
    if rows is not None:
        score = score[rows.numpy()]
    if cols is not None:
        score = score[:, cols.numpy()]
    return score


def _reorder_stats(
    stats: dict[str, InputStats], orders: dict[str, tuple[torch.Tensor | None, ...]]
) -> dict[str, InputStats]:
    """Input statistics in the permuted order of each Linear's input channels; Linears
    that share an input (and an order) keep sharing one `InputStats`."""
    out: dict[str, InputStats] = {}
    done: dict[int, InputStats] = {}
    for name, s in stats.items():
        cols = orders.get(name, (None, None))[1]
        if cols is None:
            out[name] = s
            continue
        if id(s) not in done:
            done[id(s)] = s.reordered(cols)
        out[name] = done[id(s)]
    return out


def _check_layers(blocks_path: str, blocks: nn.ModuleList, target: Sparsity) -> None:
    if not target.structured:
        return
    for i, block in enumerate(blocks):
        for name, linear in block_linears(block).items():
            if linear.in_features % target.m:
                raise ValueError(
                    f"{blocks_path}.{i}.{name} has {linear.in_features} input features, "
                    f"not divisible by M={target.m} of {target}"
                )


def default_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _describe(calibration: Any) -> str:
    if isinstance(calibration, str):
        return calibration if len(calibration) < 200 else f"text ({len(calibration)} chars)"
    if isinstance(calibration, torch.Tensor):
        return f"token ids {tuple(calibration.shape)}"
    return type(calibration).__name__


@contextmanager
def _placement(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> Iterator:
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


class _StageTimer:
    """Adds wall time per stage to the report (synchronising the GPU at boundaries)."""

    def __init__(self, report: PruneReport) -> None:
        self.report = report

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            seconds = self.report.stage_seconds
            seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - t0
