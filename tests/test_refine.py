"""Mask refinement through `ria.refine_mask`: the output error `d^T G d`, recomputed here
with torch in float64, never rises; N:M patterns and kept counts stay exact; inputs of
every kind give the same answer; bad inputs are refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ria
from ria.errors import InvalidArgumentError, InvalidTypeError

ROWS, COLS, TOKENS = 24, 64, 96


def calibration(seed: int = 0, cols: int = COLS) -> tuple[torch.Tensor, torch.Tensor]:
    """`(weight, gram)`: a normal weight and `X^T X` of heavy-tailed inputs (a few
    channels carry most of the energy, as in LLM activations)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.randn(cols, generator=g).exp()
    x = torch.randn(TOKENS, cols, generator=g) * scale
    weight = torch.randn(ROWS, cols, generator=g)
    return weight, (x.T @ x).float()


def output_error(weight: torch.Tensor, gram: torch.Tensor, keep: np.ndarray) -> float:
    """`sum over rows of d^T G d`, `d = weight * ~keep`, in float64."""
    d = weight.double().masked_fill(torch.from_numpy(keep), 0)
    return float(((d @ gram.double()) * d).sum())


def magnitude_nm(weight: torch.Tensor, n: int, m: int) -> np.ndarray:
    return ria.nm_mask(ria.magnitude_score(weight), n, m)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8)])
def test_nm_refinement_lowers_the_error_and_keeps_the_pattern(n, m):
    weight, gram = calibration()
    first = magnitude_nm(weight, n, m)
    keep, stats = ria.refine_mask(weight, gram, first, n, m)
    assert keep.dtype == np.bool_ and keep.shape == first.shape
    assert (keep.reshape(-1, m).sum(axis=1) == n).all()
    before, after = output_error(weight, gram, first), output_error(weight, gram, keep)
    assert after < 0.95 * before
    assert stats.error_before == pytest.approx(before, rel=1e-5)
    assert stats.error_after == pytest.approx(after, rel=1e-5)
    assert 0 < (keep != first).sum() <= 2 * stats.swaps
    assert stats.converged and 1 <= stats.sweeps < 16


def test_unstructured_refinement_keeps_every_rows_count():
    weight, gram = calibration(1)
    # A matrix-wide selection: rows keep different counts.
    first = ria.unstructured_mask(ria.magnitude_score(weight), 0.6)
    assert len(set(first.sum(axis=1))) > 1
    keep, stats = ria.refine_mask(weight, gram, first, max_sweeps=50)
    assert (keep.sum(axis=1) == first.sum(axis=1)).all()
    assert output_error(weight, gram, keep) < 0.95 * output_error(weight, gram, first)
    assert stats.converged


def test_refinement_never_raises_any_rows_error():
    # Random (not magnitude) masks, many seeds, per row: the guarantee is per row.
    for seed in range(8):
        weight, gram = calibration(seed)
        first = ria.nm_mask(
            torch.rand(ROWS, COLS, generator=torch.Generator().manual_seed(seed)), 2, 4
        )
        keep, _ = ria.refine_mask(weight, gram, first, 2, 4, max_sweeps=3)
        for r in range(ROWS):
            row = slice(r, r + 1)
            before = output_error(weight[row], gram, first[row])
            assert output_error(weight[row], gram, keep[row]) <= before * (1 + 1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_refine_like_their_float32_values(dtype):
    weight, gram = calibration(2)
    half = weight.to(dtype)
    first = magnitude_nm(half, 2, 4)
    keep_half, stats_half = ria.refine_mask(half, gram, first, 2, 4)
    keep_f32, stats_f32 = ria.refine_mask(half.float(), gram, first, 2, 4)
    assert (keep_half == keep_f32).all()
    assert (stats_half.error_after, stats_half.swaps) == (stats_f32.error_after, stats_f32.swaps)


def test_numpy_inputs_a_given_residual_and_torch_tensors_agree():
    weight, gram = calibration(3)
    first = magnitude_nm(weight, 2, 4)
    frozen = first.copy()
    by_torch, _ = ria.refine_mask(weight, gram, torch.from_numpy(first), 2, 4)
    by_numpy, _ = ria.refine_mask(weight.numpy(), gram.numpy(), first, 2, 4)
    residual = (weight.masked_fill(torch.from_numpy(first), 0) @ gram).numpy()
    given, _ = ria.refine_mask(weight.numpy(), gram.numpy(), first, 2, 4, residual=residual)
    assert (by_torch == by_numpy).all() and (by_torch == given).all()
    assert (first == frozen).all(), "the input mask was changed"


def test_refinement_is_deterministic():
    weight, gram = calibration(4, cols=256)  # 24 x 256: large enough to run in parallel
    first = magnitude_nm(weight, 2, 4)
    runs = [ria.refine_mask(weight, gram, first, 2, 4) for _ in range(3)]
    assert all((keep == runs[0][0]).all() for keep, _ in runs)
    assert len({(s.error_after, s.swaps, s.sweeps) for _, s in runs}) == 1


def test_zero_sweeps_report_the_error_and_change_nothing():
    weight, gram = calibration(5)
    first = magnitude_nm(weight, 2, 4)
    keep, stats = ria.refine_mask(weight, gram, first, 2, 4, max_sweeps=0)
    assert (keep == first).all()
    assert (stats.swaps, stats.sweeps, stats.converged) == (0, 0, False)
    assert stats.error_after == stats.error_before > 0
    assert repr(stats).startswith("RefineStats(error ") and "(+0.00%)" in repr(stats)


def _bad(**change):
    weight, gram = calibration(6)
    args = {"weight": weight, "gram": gram, "keep": magnitude_nm(weight, 2, 4), "n": 2, "m": 4}
    args.update(change)
    return args


def _with(t: torch.Tensor, at: tuple[int, int], value: float) -> torch.Tensor:
    t = t.clone()
    t[at] = value
    return t


WEIGHT, GRAM = calibration(6)
THREE_KEPT = magnitude_nm(WEIGHT, 2, 4)
THREE_KEPT[1, 4:8] = [True, True, True, False]

BAD = [
    ("keep-float", _bad(keep=np.ones((ROWS, COLS), np.float32)), InvalidTypeError,
     "keep must be a bool array, got float32"),
    ("keep-shape", _bad(keep=np.ones((COLS, ROWS), bool)), InvalidArgumentError,
     r"keep has shape \(64, 24\), expected the weight's \(24, 64\)"),
    ("keep-not-nm", _bad(keep=THREE_KEPT), InvalidArgumentError,
     "keep is not 2:4: row 1 keeps 3 of columns 4..8"),
    ("gram-shape", _bad(gram=GRAM[:32, :32]), InvalidArgumentError,
     r"gram has shape \(32, 32\), expected \(64, 64\)"),
    ("gram-asymmetric", _bad(gram=_with(GRAM, (2, 9), 1e6)), InvalidArgumentError,
     r"gram is not symmetric: gram\[2, 9\] = 1000000 but gram\[9, 2\] = "),
    ("gram-negative-diagonal", _bad(gram=_with(GRAM, (5, 5), -1.0)), InvalidArgumentError,
     r"gram\[5, 5\] = -1 is negative"),
    ("weight-nan", _bad(weight=_with(WEIGHT, (3, 7), float("nan"))), InvalidArgumentError,
     r"weight contains NaN at \(3, 7\)"),
    ("residual-shape", _bad(residual=np.zeros((ROWS, 8), np.float32)), InvalidArgumentError,
     "residual has shape 24 x 8, expected the weight's 24 x 64"),
    ("pattern-half-given", _bad(n=2, m=0), InvalidArgumentError, "m must be >= 2"),
    ("n-bool", _bad(n=True), InvalidTypeError, "n must be of type int"),
    ("sweeps-negative", _bad(max_sweeps=-1), InvalidArgumentError, "max_sweeps must be >= 0"),
    ("sweeps-float", _bad(max_sweeps=2.0), InvalidTypeError, "max_sweeps must be of type int"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "error", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_bad_inputs_are_refused_by_name_and_change_nothing(args, error, message):
    keep = args["keep"]
    frozen = keep.copy()
    with pytest.raises(error, match=message):
        ria.refine_mask(**args)
    assert (keep == frozen).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_residual_is_computed_on_the_tensors_device():
    weight, gram = calibration(7)
    first = magnitude_nm(weight, 2, 4)
    _, on_cpu = ria.refine_mask(weight, gram, first, 2, 4)
    keep, on_gpu = ria.refine_mask(weight.cuda(), gram.cuda(), torch.from_numpy(first).cuda(), 2, 4)
    assert on_gpu.error_before == pytest.approx(on_cpu.error_before, rel=1e-4)
    assert (keep.reshape(-1, 4).sum(axis=1) == 2).all()
    assert output_error(weight, gram, keep) < 0.95 * output_error(weight, gram, first)
