"""Free channel orders: every Linear its own input order (a `GatheredLinear` while its block
is pruned, then a plain Linear N:M along its `nm_order`), down's order folded into gate/up
rows where the family allows it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import FAMILIES, FAST_SEARCH, assert_nm, logits, pruned_linears, tiny_model
from transformers import AutoModelForCausalLM

import ria
from ria.arch import block_linears, find_blocks
from ria.permutation import (
    GatheredLinear,
    apply_block,
    block_layout,
    nm_order,
    search_block,
    settle_orders,
    weight_in_nm_order,
)
from ria.save import saved_orders

CALIB = dict(calibration="austen", nsamples=4, seqlen=32, progress=False)


def permute_with_random_scores(model: torch.nn.Module) -> None:
    rng = np.random.default_rng(0)
    for block in find_blocks(model)[1]:
        layout = block_layout(model, block, None)  # free orders need only the folds
        scores = {
            name: rng.random(tuple(lin.weight.shape)).astype(np.float32)
            for name, lin in block_linears(block).items()
        }
        perm, _ = search_block(scores, layout, 2, 4, {"seed": 0, **FAST_SEARCH}, "free")
        assert all(not torch.equal(o, torch.arange(o.numel())) for o in perm.inputs.values())
        apply_block(block, layout, perm)


@pytest.mark.parametrize("family", [*FAMILIES, "gemma3"])
def test_free_orders_alone_leave_logits_unchanged(family):
    model = tiny_model(family)
    ids = torch.randint(0, 512, (2, 24))
    before = logits(model, ids)
    linears = len(pruned_linears(model))
    permute_with_random_scores(model)
    gathered = sum(isinstance(m, GatheredLinear) for m in model.modules())
    # down's order is folded into gate/up rows: one fewer gather per block.
    assert gathered == linears - len(find_blocks(model)[1])
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-5, atol=1e-5)
    settle_orders(model)  # as prune does after each block
    ordered = [m for m in model.modules() if nm_order(m) is not None]
    assert len(ordered) == gathered and all(type(m) is torch.nn.Linear for m in ordered)
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-5, atol=1e-5)


def test_an_edit_of_a_weight_means_the_same_after_free_orders():
    """What PEFT's LoRA merge does (`weight += B @ A`, learned on the Linear's own input)
    adds `x @ (B @ A).T` to every Linear of a freely ordered model: their weights are in
    the columns' original order (a gathered Linear's were not, and the merged model
    computed another function: max logit error 0.9 on a tiny Llama)."""
    model = tiny_model("llama")
    permute_with_random_scores(model)
    settle_orders(model)
    g = torch.Generator().manual_seed(0)
    for name, linear in pruned_linears(model).items():
        x = torch.randn(3, linear.in_features, generator=g)
        delta = torch.randn(linear.out_features, 2, generator=g) @ torch.randn(
            2, linear.in_features, generator=g
        )
        with torch.no_grad():
            expected = linear(x) + x @ delta.T
            linear.weight += delta
            torch.testing.assert_close(linear(x), expected, msg=name)


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_free_prune_is_nm_in_storage_order_and_round_trips(tmp_path, tokenizer, family):
    model = tiny_model(family)
    report = ria.prune(
        model, tokenizer, sparsity="2:4", permute="free", permutation_options=FAST_SEARCH, **CALIB
    )
    assert report.settings["permute"] == "free"
    assert not any(isinstance(m, GatheredLinear) for m in model.modules())  # settled
    for linear in pruned_linears(model).values():
        assert type(linear) is torch.nn.Linear
        assert_nm(weight_in_nm_order(linear), 2, 4)
    assert all(r.permutation is not None and r.permutation["efficacy"] >= 0 for r in report.layers)

    out = ria.save_pruned(model, tmp_path / "out", tokenizer, report)
    ids = torch.randint(0, 512, (1, 20))
    plain = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(plain, ids), logits(model, ids), rtol=1e-5, atol=1e-5)
    # Every Linear's own order is stored under that Linear's path...
    ordered = {n: nm_order(m) for n, m in model.named_modules() if nm_order(m) is not None}
    assert set(saved_orders(out)) == set(ordered)
    # ...and load_pruned gives them back, the weights as stored.
    restored = ria.load_pruned(out)
    for name, linear in pruned_linears(restored).items():
        assert torch.equal(linear.weight, pruned_linears(model)[name].weight)
        own, saved = nm_order(linear), ordered.get(name)  # down's order is in gate/up rows
        assert own is None if saved is None else torch.equal(own, saved)
    torch.testing.assert_close(logits(restored, ids), logits(model, ids), rtol=1e-5, atol=1e-5)


def test_free_orders_keep_at_least_the_folded_score_on_the_shared_groups(tokenizer):
    """A free search on q alone can always do what the shared q/k/v order does for q, so
    over the whole model free masks keep more importance than folded ones here."""
    kept = {}
    for mode in ("folded", "free"):
        model = tiny_model("llama")
        report = ria.prune(
            model, tokenizer, sparsity="2:4", permute=mode, permutation_options=FAST_SEARCH, **CALIB
        )
        kept[mode] = sum(r.kept_score for r in report.layers)
    assert kept["free"] > kept["folded"]


def test_unknown_permutation_mode_is_refused_before_anything_changes(tokenizer):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ria.InvalidArgumentError, match="permute must be"):
        ria.prune(model, tokenizer, sparsity="2:4", permute="shared", **CALIB)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _DoubledLinear(torch.nn.Linear):
    """A Linear subclass with a forward of its own, which a gathered Linear would drop."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def test_a_linear_with_its_own_forward_is_never_gathered(tokenizer):
    model = tiny_model("llama")
    for block in find_blocks(model)[1]:
        up = block.mlp.up_proj
        doubled = _DoubledLinear(up.in_features, up.out_features, bias=False)
        doubled.weight = up.weight
        block.mlp.up_proj = doubled
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ria.UnsupportedModelError, match="_DoubledLinear: it has a forward"):
        ria.prune(model, tokenizer, sparsity="2:4", permute="free", **CALIB)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
