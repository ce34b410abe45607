"""The OBS (SparseGPT) update on a single layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ria
from ria.pruning import obs_prune
from ria.pruning.obs import block_gram


def correlated_inputs(tokens: int, features: int, rank: int = 16, seed: int = 0) -> torch.Tensor:
    """Inputs close to a low-rank subspace, like LLM activations: redundant channels let
    the OBS update move a pruned weight's contribution onto the kept ones."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(tokens, rank, generator=g) @ torch.randn(rank, features, generator=g)
    return latent + 0.1 * torch.randn(tokens, features, generator=g)


def test_update_reduces_reconstruction_error_under_the_same_mask():
    x = correlated_inputs(512, 64)
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    keep = torch.from_numpy(ria.nm_mask(ria.ria_score(w, x.norm(dim=0)), 2, 4))
    masked = w * keep
    updated, kept = obs_prune(w, x.T @ x, keep=keep)
    assert torch.equal(kept, keep)
    assert ((updated != 0) <= keep).all()  # nothing outside the mask comes back
    error_masked = (x @ (w - masked).T).norm()
    error_updated = (x @ (w - updated).T).norm()
    assert error_updated < 0.8 * error_masked


def test_own_selection_is_exact_for_unstructured_and_nm():
    x = correlated_inputs(256, 256)
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(2))
    h = x.T @ x
    updated, keep = obs_prune(w, h, sparsity=0.5)
    for b in range(0, 256, 128):
        assert int((~keep[:, b : b + 128]).sum()) == 32 * 64
    updated, keep = obs_prune(w, h, n=2, m=4)
    assert (keep.reshape(32, -1, 4).sum(-1) == 2).all()
    assert ((updated != 0) <= keep).all()


def test_dead_inputs_are_handled():
    x = correlated_inputs(128, 32)
    x[:, 5] = 0
    w = torch.randn(8, 32)
    updated, _ = obs_prune(w, x.T @ x, n=2, m=4)
    assert torch.isfinite(updated).all()
    assert (updated[:, 5] == 0).all()
    assert np.isfinite(updated.numpy()).all()


def test_block_gram_is_the_error_left_after_the_later_columns_compensate():
    """Changing one block's weights by exactly `-d` and the later columns optimally (least
    squares) leaves the error `d^T G d`, with `G` from the Cholesky factor's block alone."""
    x = correlated_inputs(400, 24).double()
    h = x.T @ x
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    b0, b1 = 8, 16
    d = torch.randn(b1 - b0, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    target = x[:, b0:b1] @ d
    later = x[:, b1:]
    fit = torch.linalg.lstsq(later, target.unsqueeze(1)).solution[:, 0]
    left = float(((target - later @ fit) ** 2).sum())
    g = block_gram(hinv[b0:b1, b0:b1])
    assert float(d @ g @ d) == pytest.approx(left, rel=1e-6)
    assert left < 0.9 * float((target**2).sum())  # the later columns did compensate


def rust_refiner(n: int, m: int):
    def refine(w: torch.Tensor, gram: torch.Tensor, keep: np.ndarray) -> np.ndarray:
        return ria.refine_mask(w, gram, keep, n, m)[0]

    return refine


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8)])
def test_refining_inside_the_update_keeps_nm_and_never_loses_to_the_plain_update(seed, n, m):
    x = correlated_inputs(1024, 128, rank=32, seed=seed)
    x = x * torch.linspace(0.2, 3, 128)  # uneven channel norms, as in LLMs
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(seed + 10))
    h = x.T @ x
    keep = torch.from_numpy(ria.nm_mask(ria.ria_score(w, x.norm(dim=0)), n, m))

    def error(updated: torch.Tensor) -> float:
        return float(((x @ (w - updated).T) ** 2).sum())

    plain, _ = obs_prune(w, h, keep=keep, n=n, m=m, blocksize=32)
    refined, kept = obs_prune(w, h, keep=keep, n=n, m=m, blocksize=32, refine=rust_refiner(n, m))
    again, kept_again = obs_prune(
        w, h, keep=keep, n=n, m=m, blocksize=32, refine=rust_refiner(n, m)
    )
    assert (kept.reshape(64, -1, m).sum(-1) == n).all()
    assert ((refined != 0) <= kept).all()
    assert not torch.equal(kept, keep)  # refinement did something
    assert error(refined) < error(plain)
    assert error(refined) < error(w * keep)  # nor to the mask without any update
    assert torch.equal(kept, kept_again) and torch.equal(refined, again)  # deterministic


def test_sparsegpt_refined_inside_the_update_keeps_nm():
    x = correlated_inputs(512, 64, seed=4)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(5))
    updated, keep = obs_prune(w, x.T @ x, n=2, m=4, blocksize=32, refine=rust_refiner(2, 4))
    assert (keep.reshape(32, -1, 4).sum(-1) == 2).all()
    assert ((updated != 0) <= keep).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_refit_lowers_the_error_of_the_update_under_the_same_mask(seed):
    x = correlated_inputs(1024, 128, rank=32, seed=seed) * torch.linspace(0.2, 3, 128)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(seed + 20))
    h = x.T @ x

    def error(updated: torch.Tensor) -> float:
        return float(((x @ (w - updated).T) ** 2).sum())

    for keep in (torch.from_numpy(ria.nm_mask(ria.ria_score(w, x.norm(dim=0)), 2, 4)), None):
        plain, kept = obs_prune(w, h, keep=keep, n=2, m=4)
        refit, kept_refit = obs_prune(w, h, keep=keep, n=2, m=4, refit_iters=20)
        assert torch.equal(kept, kept_refit)  # the mask is the update's
        assert ((refit != 0) <= kept).all()
        assert error(refit) < 0.97 * error(plain)
        # the exact least-squares fit under the mask, row by row, is the floor
        exact = torch.zeros_like(w)
        for r in range(w.shape[0]):
            cols = kept[r].nonzero()[:, 0]
            sol = torch.linalg.lstsq(x[:, cols].double(), (x @ w[r]).double().unsqueeze(1))
            exact[r, cols] = sol.solution[:, 0].float()
        assert error(exact) <= error(refit) * (1 + 1e-3)


def test_refit_keeps_dead_inputs_dead():
    x = correlated_inputs(128, 32)
    x[:, 5] = 0
    w = torch.randn(8, 32)
    updated, _ = obs_prune(w, x.T @ x, n=2, m=4, refit_iters=20)
    assert torch.isfinite(updated).all()
    assert (updated[:, 5] == 0).all()
