"""What `ria.prune` did, layer by layer: a table when printed, a dict / JSON to keep."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .coverage import Coverage


@dataclass
class LayerReport:
    """One pruned matrix: a Linear's weight, or one expert's (named `...down_proj[3]`).

    `kept_score` is the sum of the importance scores the mask keeps. For permuted N:M
    layers, `permutation` holds the search's `retained`, `identity` and `upper_bound`
    (score units, for the whole group of Linears that share the order) and `efficacy`.
    `output_error` is `||(W - W') X^T||^2 / ||W X^T||^2` on the calibration inputs, when
    `X^T X` was collected (refine, reconstruct, SparseGPT, alpha="auto", measure_error);
    `alpha` the exponent alpha="auto" chose; `refinement` what mask refinement did.
    For an expert, `routed_tokens` counts the calibration tokens the router sent it.
    `weight_only` says the matrix was scored by magnitude instead of on its inputs: an
    expert routed too few tokens, or a Linear the calibration forward never called.
    """

    name: str
    shape: tuple[int, int]
    sparsity: float
    kept_score: float
    seconds: float
    permutation: dict[str, float] | None = None
    output_error: float | None = None
    alpha: float | None = None
    refinement: dict[str, float] | None = None
    routed_tokens: int | None = None
    weight_only: bool = False


@dataclass
class PruneReport:
    """Settings, per-layer results and time per stage (seconds)."""

    settings: dict[str, Any]
    layers: list[LayerReport] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    total_seconds: float = 0.0
    perplexity: dict[str, float] = field(default_factory=dict)
    # Which of the decoder's matmul weights were pruned, and what stayed dense and why.
    coverage: Coverage | None = None
    # permute="folded": per traced input group of each block, its readers and where their
    # shared order is applied ("gather": "output" of the norm `carrier`, "input" of module
    # `carrier`, "linear"), or why it was left in its order ("reason").
    permutation_groups: list[dict[str, Any]] = field(default_factory=list)

    def permutation_summary(self) -> str | None:
        """One line on where the folded orders were applied, or None without them."""
        if not self.permutation_groups:
            return None
        kinds = {"output": "norm outputs", "input": "module inputs", "linear": "Linear inputs"}
        counts: dict[str, int] = {}
        for g in self.permutation_groups:
            counts[g["gather"] or "left"] = counts.get(g["gather"] or "left", 0) + 1
        parts = [f"{counts[k]} at {label}" for k, label in kinds.items() if k in counts]
        line = f"shared orders gathered: {', '.join(parts) or 'none'}"
        left = [g for g in self.permutation_groups if g["gather"] is None]
        if left:
            line += f"; {len(left)} groups left in their order ({left[0]['reason']}"
            line += ", ...)" if len(left) > 1 else ")"
        return line

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all pruned weights."""
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        zeros = sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.layers)
        return zeros / total if total else 0.0

    @property
    def mean_output_error(self) -> float | None:
        """Mean over layers of the relative output error (None if not measured)."""
        values = [r.output_error for r in self.layers if r.output_error is not None]
        return sum(values) / len(values) if values else None

    @property
    def weight_only_experts(self) -> list[LayerReport]:
        """The experts scored on their weights alone (routed too few calibration tokens)."""
        return [r for r in self.layers if r.weight_only and r.routed_tokens is not None]

    @property
    def uncalibrated(self) -> list[LayerReport]:
        """The Linears the calibration forward never called, scored by magnitude."""
        return [r for r in self.layers if r.weight_only and r.routed_tokens is None]

    def uncalibrated_summary(self) -> str | None:
        """One line naming the Linears pruned without calibration data, or None."""
        unused = self.uncalibrated
        if not unused:
            return None
        shown = ", ".join(r.name for r in unused[:4])
        more = f" and {len(unused) - 4} more" if len(unused) > 4 else ""
        return (
            f"{len(unused)} matrices never ran on the calibration data and were pruned by "
            f"magnitude: {shown}{more}"
        )

    def experts_summary(self) -> str | None:
        """One line on the experts' calibration, or None when there are none."""
        routed = [r.routed_tokens for r in self.layers if r.routed_tokens is not None]
        if not routed:
            return None
        line = (
            f"{len(routed)} expert matrices calibrated on their routed tokens "
            f"({min(routed)}-{max(routed)} each)"
        )
        fallback = self.weight_only_experts
        if fallback:
            shown = ", ".join(f"{r.name} ({r.routed_tokens})" for r in fallback[:4])
            more = f" and {len(fallback) - 4} more" if len(fallback) > 4 else ""
            line += f"; {len(fallback)} got too few and were pruned by magnitude: {shown}{more}"
        return line

    @property
    def mean_efficacy(self) -> float | None:
        values = [r.permutation["efficacy"] for r in self.layers if r.permutation]
        return sum(values) / len(values) if values else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["coverage"] = None if self.coverage is None else self.coverage.to_dict()
        data["sparsity"] = self.sparsity
        data["mean_efficacy"] = self.mean_efficacy
        data["mean_output_error"] = self.mean_output_error
        return data

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    def __str__(self) -> str:
        header = (
            f"{'layer':<44} {'shape':>13} {'sparsity':>8} {'kept score':>12} "
            f"{'efficacy':>8} {'s':>6}"
        )
        lines = [header, "-" * len(header)]
        for r in self.layers:
            eff = f"{100 * r.permutation['efficacy']:7.1f}%" if r.permutation else f"{'-':>8}"
            shape = f"{r.shape[0]}x{r.shape[1]}"
            lines.append(
                f"{r.name[-44:]:<44} {shape:>13} {100 * r.sparsity:7.2f}% {r.kept_score:12.5g} "
                f"{eff} {r.seconds:6.2f}"
            )
        lines.append("-" * len(header))
        settings = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        lines.append(
            f"{len(self.layers)} layers, sparsity {100 * self.sparsity:.2f}%  ({settings})"
        )
        if self.coverage is not None:
            lines.append(self.coverage.summary())
        for summary in (self.experts_summary(), self.uncalibrated_summary()):
            if summary is not None:
                lines.append(summary)
        permutation = self.permutation_summary()
        if permutation is not None:
            lines.append(permutation)
        if self.mean_efficacy is not None:
            lines.append(f"mean permutation efficacy {100 * self.mean_efficacy:.1f}%")
        if self.mean_output_error is not None:
            lines.append(f"mean relative output error {self.mean_output_error:.4g}")
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in self.stage_seconds.items())
        lines.append(f"total {self.total_seconds:.1f}s: {stages}")
        for label, value in self.perplexity.items():
            lines.append(f"perplexity {label}: {value:.3f}")
        return "\n".join(lines)


class StageTimer:
    """Adds wall time per stage to the report (synchronising the GPU at boundaries).

    Stages may nest (`alpha="auto"` selects masks while scoring): a second counts only in
    the innermost open stage, so the stages add up to no more than the total.
    """

    def __init__(self, report: PruneReport) -> None:
        self.report = report
        self._nested: list[float] = []  # per open stage, seconds spent in stages inside it

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        self._nested.append(0.0)
        try:
            yield
        finally:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
            seconds = self.report.stage_seconds
            seconds[stage] = seconds.get(stage, 0.0) + elapsed - self._nested.pop()
            if self._nested:
                self._nested[-1] += elapsed
