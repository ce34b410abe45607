"""Fixtures: the tiny tokenizer and the real offline model (SmolLM2-135M)."""

from __future__ import annotations

import pytest
from helpers import build_tokenizer
from transformers import PreTrainedTokenizerFast


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M, fp32, converted once per machine."""
    from ria.demo import load_smollm2

    model, tok = load_smollm2()
    return model.eval(), tok
