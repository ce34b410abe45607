"""The coverage report cannot lie: fused MoE experts (3-D parameters, not nn.Linear) are
counted as dense, and `prune` refuses a model it would only partly prune."""

from __future__ import annotations

import pytest
import torch
from helpers import VOCAB, tiny_model
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

import ria
from ria.arch import find_blocks
from ria.pruning import MIN_COVERAGE, decoder_coverage


def tiny_moe() -> torch.nn.Module:
    config = Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_a_dense_decoder_is_fully_covered():
    model = tiny_model("llama")
    coverage = decoder_coverage(model, *find_blocks(model))
    assert coverage.fraction == 1.0
    reasons = {d.name: d.reason for d in coverage.dense}
    assert reasons == {
        "model.embed_tokens.weight": "input embedding: never pruned",
        "lm_head.weight": "output head (lm_head): never pruned",
    }


def test_fused_experts_count_as_dense():
    model = tiny_moe()
    coverage = decoder_coverage(model, *find_blocks(model))
    experts = [d for d in coverage.dense if ".mlp.experts." in d.name]
    assert len(experts) == 4 and all("fused 3-D expert" in d.reason for d in experts)
    routers = [d for d in coverage.dense if d.name.endswith("mlp.gate.weight")]
    assert len(routers) == 2 and all("router" in d.reason for d in routers)
    attention = sum(
        p.numel() for n, p in model.named_parameters() if "self_attn" in n and p.dim() == 2
    )
    assert coverage.pruned_params == attention
    assert coverage.fraction < MIN_COVERAGE


def test_prune_refuses_a_partial_prune_unless_allowed():
    model = tiny_moe()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ria.UnsupportedModelError, match=r"only \d+\.\d% of the decoder"):
        ria.prune(model, sparsity=0.5, method="magnitude", progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    report = ria.prune(model, sparsity=0.5, method="magnitude", progress=False, allow_partial=True)
    assert report.coverage is not None and report.coverage.fraction < MIN_COVERAGE
    assert "fused 3-D expert" in str(report)


def test_the_report_states_the_coverage(tokenizer):
    model = tiny_model("llama")
    report = ria.prune(model, tokenizer, sparsity="2:4", method="magnitude", progress=False)
    assert report.coverage is not None and report.coverage.fraction == 1.0
    assert report.to_dict()["coverage"]["fraction"] == 1.0
    assert "pruned 100.0% of the decoder's matmul parameters" in str(report)
