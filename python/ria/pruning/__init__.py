"""Pruning: `prune` (the block loop), its validated settings (`PruneConfig`, `Sparsity`),
calibration windows, block inputs and statistics (`capture`), the OBS update
(`obs_prune`), the layer output error (`relative_output_error`) and the report
(`PruneReport`)."""

from .calibration import calibration_windows
from .capture import (
    BlockInputs,
    CalibrationInputs,
    InputStats,
    capture_block_inputs,
    collecting_stats,
    run_block,
)
from .config import ALPHA_GRID, DEFAULT_PERMUTATION, METHODS, Method, PruneConfig, Sparsity
from .coverage import MIN_COVERAGE, Coverage, DenseWeight, decoder_coverage
from .error import relative_output_error
from .matrices import PrunableMatrix, block_matrices
from .obs import obs_prune
from .pipeline import INCOMPLETE, MIN_ROUTED_TOKENS, Placement, prune, prune_with, score_matrix
from .report import LayerReport, PruneReport, StageTimer

__all__ = [
    "ALPHA_GRID",
    "DEFAULT_PERMUTATION",
    "INCOMPLETE",
    "METHODS",
    "MIN_COVERAGE",
    "MIN_ROUTED_TOKENS",
    "BlockInputs",
    "CalibrationInputs",
    "Coverage",
    "DenseWeight",
    "InputStats",
    "LayerReport",
    "Method",
    "Placement",
    "PrunableMatrix",
    "PruneConfig",
    "PruneReport",
    "Sparsity",
    "StageTimer",
    "block_matrices",
    "calibration_windows",
    "capture_block_inputs",
    "collecting_stats",
    "decoder_coverage",
    "obs_prune",
    "prune",
    "prune_with",
    "relative_output_error",
    "run_block",
    "score_matrix",
]
