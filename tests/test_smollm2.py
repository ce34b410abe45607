"""The pipeline on the real offline model, SmolLM2-135M (LLaMA architecture, GQA 9/3
heads), truncated to its first two decoder blocks so the test stays fast."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import FAST_SEARCH, assert_nm_as_sparsified, traced_layouts
from transformers import AutoModelForCausalLM, AutoTokenizer

import ria
from ria.arch import attention_heads, block_linears, find_blocks
from ria.demo import smollm2_path
from ria.permutation import apply_block, search_block

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def checkpoint():
    return smollm2_path()


def two_blocks(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, num_hidden_layers=2).eval()


def test_real_scores_permutation_keeps_logits(checkpoint):
    model = two_blocks(checkpoint)
    heads = attention_heads(model)
    assert (heads.num_heads, heads.num_kv_heads, heads.head_dim) == (9, 3, 64)
    ids = torch.randint(0, model.config.vocab_size, (1, 48))
    with torch.no_grad():
        before = model(ids).logits
    for block, layout in zip(find_blocks(model)[1], traced_layouts(model), strict=True):
        scores = {n: ria.magnitude_score(lin.weight) for n, lin in block_linears(block).items()}
        perm, stats = search_block(scores, layout, 2, 4, {"seed": 0, **FAST_SEARCH})
        assert all(s.retained > s.identity for s in stats.values())
        apply_block(block, layout, perm)
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_prune_real_blocks_and_reload(checkpoint, tmp_path):
    model = two_blocks(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    report = ria.prune(
        model, tokenizer, sparsity="2:4", permute=True, calibration="austen", nsamples=8,
        seqlen=64, progress=False, permutation_options=FAST_SEARCH,
    )  # fmt: skip
    assert report.sparsity == pytest.approx(0.5)
    assert report.mean_efficacy > 0.05
    assert_nm_as_sparsified(model, 2, 4)
    out = ria.save_pruned(model, tmp_path / "smol", tokenizer, report)
    plain = AutoModelForCausalLM.from_pretrained(out)
    ids = tokenizer("It is a truth universally acknowledged", return_tensors="pt").input_ids
    with torch.no_grad():
        np.testing.assert_allclose(
            plain(ids).logits.numpy(), model(ids).logits.numpy(), rtol=1e-4, atol=1e-4
        )
