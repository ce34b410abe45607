"""Fused MoE experts (transformers 5's 3-D `gate_up_proj` / `down_proj`) are pruned per
expert along their input dimension, calibrated on the tokens the model's own router sends
each expert; starved experts fall back to magnitude; routers stay dense."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import along_input, rows_in_nm, tiny_model
from torch import nn

import ria
from ria.arch import find_blocks
from ria.core import magnitude_score, nm_mask
from ria.pruning import block_matrices, collecting_stats, run_block
from ria.pruning.capture import BlockInputs

CALIB = dict(calibration="austen", nsamples=4, seqlen=32, progress=False)


def block_inputs(model, tokenizer) -> BlockInputs:
    windows = ria.pruning.calibration_windows("austen", tokenizer, 4, 32, seed=0)
    blocks = find_blocks(model)[1]
    return ria.pruning.capture_block_inputs(model, blocks, windows, batch_size=4).at(0)


def test_each_expert_is_calibrated_on_the_tokens_routed_to_it(tokenizer):
    model = tiny_model("qwen3_moe")
    block = find_blocks(model)[1][0]
    inputs = block_inputs(model, tokenizer)
    # The reference: what the router picked and what reached the MoE, seen from outside.
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        block.mlp.register_forward_pre_hook(lambda _m, a: seen.update(x=a[0].reshape(-1, 64))),
        block.mlp.gate.register_forward_hook(lambda _m, _a, out: seen.update(top_k=out[2])),
    ]
    run_block(block, inputs)
    for h in hooks:
        h.remove()
    matrices = block_matrices(block)
    names = [n for n in matrices if "experts" in n]
    with collecting_stats(block, matrices, [(n,) for n in names], hessian=True) as stats:
        run_block(block, inputs)

    gate_up, inter = block.mlp.experts.gate_up_proj.data, 32
    for e in range(4):
        x = seen["x"][(seen["top_k"] == e).any(dim=-1)]
        hidden = F.silu(x @ gate_up[e, :inter].T) * (x @ gate_up[e, inter:].T)
        for name, reference in (("gate_up_proj", x), ("down_proj", hidden)):
            got = stats[f"mlp.experts.{name}[{e}]"]
            assert got.tokens == x.shape[0] > 0
            torch.testing.assert_close(got.sumsq, (reference**2).sum(dim=0))
            torch.testing.assert_close(got.hessian.float(), reference.T @ reference)  # float64 sum


@pytest.mark.parametrize("method", ["ria", "sparsegpt"])
def test_an_expert_the_router_never_picks_is_pruned_by_magnitude(tokenizer, method):
    model = tiny_model("gpt_oss")
    blocks = find_blocks(model)[1]
    for block in blocks:
        block.mlp.router.bias.data[3] = -1e4  # expert 3 never wins the top-2
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    report = ria.prune(model, tokenizer, sparsity="2:4", method=method, **CALIB)

    starved = [r for r in report.layers if r.weight_only]
    assert {r.name.rpartition(".")[2] for r in starved} == {"gate_up_proj[3]", "down_proj[3]"}
    assert len(starved) == 4 and all(r.routed_tokens == 0 for r in starved)
    assert all(r.routed_tokens > 0 for r in report.layers if r.name.endswith(("[0]", "[1]")))
    assert "4 got too few and were pruned by magnitude" in str(report)
    for i, block in enumerate(blocks):
        experts = block.mlp.experts
        for name in ("gate_up_proj", "down_proj"):
            before = dense[f"model.layers.{i}.mlp.experts.{name}"].transpose(1, 2)[3]
            after = getattr(experts, name).data.transpose(1, 2)[3]  # gpt-oss: (in, out)
            keep = torch.from_numpy(nm_mask(magnitude_score(before), 2, 4))
            torch.testing.assert_close(after, before * keep, rtol=0, atol=0)
            assert rows_in_nm(along_input(experts, getattr(experts, name).data), 2, 4).all()
            if method == "sparsegpt":  # the OBS update moved the kept weights of the others
                calibrated = getattr(experts, name).data[0]
                kept = calibrated != 0
                original = dense[f"model.layers.{i}.mlp.experts.{name}"][0]
                assert not torch.equal(calibrated[kept], original[kept])


def test_a_linear_router_stays_dense(tokenizer):
    model = tiny_model("qwen2_moe")  # shared_expert_gate is an nn.Linear(hidden, 1)
    gates = [b.mlp.shared_expert_gate.weight.detach().clone() for b in find_blocks(model)[1]]
    report = ria.prune(model, tokenizer, sparsity="2:4", **CALIB)
    for block, before in zip(find_blocks(model)[1], gates, strict=True):
        assert torch.equal(block.mlp.shared_expert_gate.weight, before)
        for linear in (block.mlp.shared_expert.gate_proj, block.mlp.shared_expert.down_proj):
            assert rows_in_nm(linear.weight, 2, 4).all()
    assert report.coverage is not None
    reasons = {d.name: d.reason for d in report.coverage.dense}
    assert reasons["model.layers.0.mlp.shared_expert_gate.weight"] == "router (Linear): stays dense"
    assert not [r for r in report.layers if "gate.weight" in r.name or "expert_gate" in r.name]


def test_free_orders_for_fused_experts_are_refused_before_anything_changes(tokenizer):
    model = tiny_model("qwen3_moe")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ria.UnsupportedModelError, match="free channel orders for fused MoE"):
        ria.prune(model, tokenizer, sparsity="2:4", permute="free", **CALIB)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _AllAtOnceExperts(nn.Module):
    """Experts whose forward multiplies every expert at once (no per-expert slice)."""

    is_transposed = False  # the layout flag transformers' use_experts_implementation sets

    def __init__(self) -> None:
        super().__init__()
        self.down_proj = nn.Parameter(torch.randn(4, 8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("td,eod->to", x, self.down_proj)


def test_experts_whose_routed_tokens_cannot_be_seen_are_refused():
    block = nn.Sequential(_AllAtOnceExperts())
    matrices = block_matrices(block)
    assert list(matrices) == [f"0.down_proj[{e}]" for e in range(4)]
    with (
        pytest.raises(ria.UnsupportedModelError, match=r"0 \(_AllAtOnceExperts\): cannot see"),
        collecting_stats(block, matrices, [(n,) for n in matrices], hessian=False),
    ):
        block(torch.randn(5, 8))
    assert "forward" not in block[0].__dict__  # the module's own forward is back


def test_3d_weights_of_an_undeclared_layout_stay_dense(tokenizer):
    model = tiny_model("llama4")  # experts (experts, in, out), no is_transposed flag
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ria.UnsupportedModelError, match="whose layout transformers does not"):
        ria.prune(model, tokenizer, sparsity="2:4", **CALIB)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("dtype", [None, "fp8"])
def test_sparsify_says_experts_run_dense_masked(tokenizer, dtype):
    # The fp8 report left them out.
    model = tiny_model("qwen3_moe")
    ria.prune(model, tokenizer, sparsity="2:4", method="magnitude", progress=False)
    report = ria.sparsify(model, dtype=dtype)
    experts = report.dense_masked_experts
    assert {(e.name, e.out_features, e.in_features) for e in experts} == {
        (f"model.layers.{i}.mlp.experts.{name}", *shape)
        for i in range(2)
        for name, shape in (("gate_up_proj", (64, 64)), ("down_proj", (64, 32)))
    }
    assert "4 fused expert weights run dense-masked" in str(report)
