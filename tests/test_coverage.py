"""The coverage report cannot lie: for every family, 2:4 pruning reaches at least 95% of
the decoder's matmul parameters (counted from the zeros in the weights, not from the
report), the report says exactly what was pruned and what stayed dense and why, and the
saved checkpoint reloads with plain transformers to the same logits."""

from __future__ import annotations

import pytest
import torch
from helpers import ALL_FAMILIES, along_input, logits, rows_in_nm, tiny_model
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

import ria
from ria.arch import find_blocks
from ria.pruning import MIN_COVERAGE, decoder_coverage


@pytest.fixture(scope="module")
def windows(tokenizer) -> torch.Tensor:
    """4 x 32 calibration tokens, tokenized once for every family."""
    return ria.pruning.calibration_windows("austen", tokenizer, 4, 32, seed=0)


def measured_24(model: torch.nn.Module) -> tuple[int, int, set[str]]:
    """(parameters in 2:4 rows along their input, the decoder's matmul parameters, names
    of the matmul weights that are not all 2:4), read from the weights themselves."""
    path, blocks = find_blocks(model)
    in_24 = total = 0
    not_24 = set()
    for i, block in enumerate(blocks):
        for module_name, module in block.named_modules():
            for name, param in module.named_parameters(recurse=False):
                if param.dim() < 2 or name.endswith("bias"):
                    continue  # norms, biases (gpt-oss's experts keep 2-D ones)
                rows = along_input(module, param.detach())
                ok = rows_in_nm(rows, 2, 4)
                total += param.numel()
                in_24 += int(ok.sum()) * rows.shape[1]
                if not ok.all():
                    not_24.add(f"{path}.{i}.{module_name}.{name}")
    return in_24, total, not_24


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_2_4_reaches_the_decoder_and_the_report_says_so(family, tokenizer, windows, tmp_path):
    model = tiny_model(family)
    report = ria.prune(
        model, sparsity="2:4", calibration=windows, nsamples=4, seqlen=32, progress=False
    )
    in_24, total, not_24 = measured_24(model)
    assert in_24 >= 0.95 * total
    coverage = report.coverage
    assert coverage is not None
    assert (coverage.pruned_params, coverage.decoder_params) == (in_24, total)
    path = find_blocks(model)[0]
    assert {d.name for d in coverage.dense if d.name.startswith(path + ".")} == not_24
    assert all("router" in d.reason for d in coverage.dense if d.name in not_24)

    out = ria.save_pruned(model, tmp_path / family, tokenizer, report)
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(plain, ids), logits(model, ids), rtol=1e-4, atol=1e-4)


def test_a_dense_decoder_lists_only_embeddings_and_head():
    model = tiny_model("llama")
    coverage = decoder_coverage(model, *find_blocks(model))
    assert coverage.fraction == 1.0
    reasons = {d.name: d.reason for d in coverage.dense}
    assert reasons == {
        "model.embed_tokens.weight": "input embedding: never pruned",
        "lm_head.weight": "output head (lm_head): never pruned",
    }


def test_fused_experts_are_covered_and_routers_stay_dense():
    model = tiny_model("qwen3_moe")
    coverage = decoder_coverage(model, *find_blocks(model))
    assert not [d for d in coverage.dense if ".experts." in d.name]
    routers = {d.name: d.reason for d in coverage.dense if ".layers." in d.name}
    assert routers == {
        f"model.layers.{i}.mlp.gate.weight": "router (Qwen3MoeTopKRouter): stays dense"
        for i in range(2)
    }
    router_params = 2 * 4 * 64
    assert coverage.decoder_params - coverage.pruned_params == router_params


def with_conv1d_mlps(model: torch.nn.Module) -> torch.nn.Module:
    """The MLPs' Linears swapped for GPT-2's Conv1D (the same function, a bare weight)."""
    for block in find_blocks(model)[1]:
        for name in ("gate_proj", "up_proj", "down_proj"):
            linear = getattr(block.mlp, name)
            conv = Conv1D(linear.out_features, linear.in_features)
            conv.weight.data.copy_(linear.weight.data.T)
            conv.bias.data.zero_()
            setattr(block.mlp, name, conv)
    return model


def test_prune_refuses_a_partial_prune_unless_allowed():
    model = with_conv1d_mlps(tiny_model("llama"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ria.UnsupportedModelError, match=r"only 33\.3% of the decoder"):
        ria.prune(model, sparsity=0.5, method="magnitude", progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    report = ria.prune(model, sparsity=0.5, method="magnitude", progress=False, allow_partial=True)
    assert report.coverage is not None and report.coverage.fraction < MIN_COVERAGE
    assert "Conv1D is neither an nn.Linear nor fused experts: not pruned" in str(report)


def test_the_report_states_the_coverage(tokenizer):
    model = tiny_model("llama")
    report = ria.prune(model, tokenizer, sparsity="2:4", method="magnitude", progress=False)
    assert report.coverage is not None and report.coverage.fraction == 1.0
    assert report.to_dict()["coverage"]["fraction"] == 1.0
    assert "pruned 100.0% of the decoder's matmul parameters" in str(report)
