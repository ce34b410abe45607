"""The OBS (SparseGPT) update on a single layer."""

from __future__ import annotations

import numpy as np
import torch

import ria
from ria.pruning import obs_prune


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
