"""The layer output error from `X^T X`, and what uses it: `alpha="auto"` and
`measure_error`."""

from __future__ import annotations

import time

import pytest
import torch
from helpers import assert_nm, pruned_linears, tiny_model

import ria
from ria.pruning import (
    ALPHA_GRID,
    PruneConfig,
    PruneReport,
    StageTimer,
    prune_with,
    relative_output_error,
)

CALIB = dict(calibration="austen", nsamples=4, seqlen=32, progress=False)


def test_relative_output_error_equals_the_error_of_a_forward_pass():
    torch.manual_seed(0)
    x = torch.randn(300, 24, dtype=torch.float64) * torch.linspace(0.1, 3, 24, dtype=torch.float64)
    w = torch.randn(16, 24, dtype=torch.float64)
    pruned = w * (torch.rand_like(w) > 0.5)
    direct = ((x @ w.T - x @ pruned.T) ** 2).sum() / ((x @ w.T) ** 2).sum()
    gram = (x.T @ x).float()
    assert relative_output_error(w.float(), pruned.float(), gram) == pytest.approx(
        float(direct), rel=1e-4
    )
    assert relative_output_error(w.float(), w.float(), gram) == 0.0


def test_measure_error_reports_every_layer(tokenizer):
    model = tiny_model("llama")
    report = ria.prune(model, tokenizer, sparsity="2:4", measure_error=True, **CALIB)
    errors = [r.output_error for r in report.layers]
    assert all(e is not None and 0 < e < 1 for e in errors)
    assert report.mean_output_error == pytest.approx(sum(errors) / len(errors))


def test_alpha_auto_never_loses_to_the_default_exponent_on_the_first_block(tokenizer):
    """Block 0 sees the same calibration inputs in both runs, so per layer the exponent
    chosen by output error cannot do worse than a = 0.5 (which is in the grid)."""
    assert 0.5 in ALPHA_GRID
    reports = {}
    for alpha in (0.5, "auto"):
        model = tiny_model("llama")
        reports[alpha] = ria.prune(
            model, tokenizer, sparsity="2:4", alpha=alpha, measure_error=True, **CALIB
        )
    first = [r for r in reports["auto"].layers if ".0." in r.name]
    fixed = {r.name: r for r in reports[0.5].layers}
    assert first and all(r.alpha in ALPHA_GRID for r in first)
    for r in first:
        assert r.output_error <= fixed[r.name].output_error * (1 + 1e-6)


def test_alpha_auto_is_deterministic(tokenizer):
    weights = []
    for _ in range(2):
        model = tiny_model("qwen3")
        ria.prune(model, tokenizer, sparsity=0.5, alpha="auto", **CALIB)
        weights.append({k: v.weight.clone() for k, v in pruned_linears(model).items()})
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_alpha_auto_is_refused_for_other_methods(tokenizer):
    with pytest.raises(ria.InvalidArgumentError, match="alpha='auto'"):
        ria.prune(tiny_model("llama"), tokenizer, method="wanda", alpha="auto", **CALIB)


@pytest.mark.parametrize("sparsity", ["2:4", 0.5])
def test_refine_never_raises_a_layers_output_error_on_the_first_block(tokenizer, sparsity):
    """Block 0 is calibrated on the same inputs with and without refinement, so each of
    its masks can only get better (refinement starts from the plain mask)."""
    reports = {}
    for refine in (False, True):
        model = tiny_model("llama")
        reports[refine] = ria.prune(
            model, tokenizer, sparsity=sparsity, refine=refine, measure_error=True, **CALIB
        )
        if sparsity == "2:4":
            for linear in pruned_linears(model).values():
                assert_nm(linear.weight, 2, 4)
    plain = {r.name: r for r in reports[False].layers}
    first = [r for r in reports[True].layers if ".0." in r.name]
    assert first and sum(r.refinement["swaps"] for r in first) > 0
    for r in first:
        assert r.output_error <= plain[r.name].output_error * (1 + 1e-5)
    assert sum(r.output_error for r in first) < sum(plain[r.name].output_error for r in first)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_refine_composes_with_reconstruction_and_other_methods(tokenizer, method):
    model = tiny_model("qwen2")
    report = ria.prune(
        model, tokenizer, sparsity="2:4", method=method, refine=True, reconstruct=True, **CALIB
    )
    assert all(r.refinement is not None for r in report.layers)
    for linear in pruned_linears(model).values():
        assert_nm(linear.weight, 2, 4)


def test_nested_stages_count_each_second_once():
    """`alpha="auto"` selects masks while it scores: the masks' time must not count in
    both stages, or the stages add up to more than the run took."""
    report = PruneReport(settings={})
    timer = StageTimer(report)
    with timer("scores"), timer("masks"):
        time.sleep(0.05)
    assert report.stage_seconds["masks"] >= 0.05
    assert report.stage_seconds["scores"] < report.stage_seconds["masks"]


@pytest.mark.parametrize("sparsity", ["2:4", 0.5])
def test_the_refit_of_reconstruct_lowers_the_first_blocks_output_error(tokenizer, sparsity):
    """Block 0 sees the same inputs with and without the least-squares refit, and the
    refit starts from the OBS update under the same mask."""
    reports = {}
    for iters in (0, 20):
        model = tiny_model("llama")
        config = PruneConfig(
            sparsity=sparsity, reconstruct=True, refine=True, refit_iters=iters,
            measure_error=True, **CALIB,
        )  # fmt: skip
        reports[iters] = prune_with(model, tokenizer, config)
        if sparsity == "2:4":
            for linear in pruned_linears(model).values():
                assert_nm(linear.weight, 2, 4)
    plain = {r.name: r for r in reports[0].layers}
    first = [r for r in reports[20].layers if ".0." in r.name]
    assert first
    for r in first:
        assert r.output_error <= plain[r.name].output_error * (1 + 1e-4)
    assert sum(r.output_error for r in first) < sum(plain[r.name].output_error for r in first)
