"""Fused siblings (`ria.sparse.siblings`): Linears that read the same tensor run as one layer
over their concatenated rows. CPU: finding them from a forward, the fused model's outputs,
one weight copy, the product computed once per group and not kept, eager corner cases,
`torch.compile`; CUDA: `sparsify` fuses by default and matches the masked dense model."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import needs_cuda, prune_model_24, tiny_model
from test_generation import OLD_DYNAMO
from torch import nn

from ria.errors import InvalidArgumentError
from ria.permutation import GatheredLinear, LinearOrder
from ria.sparse import Choice, Sparse24Linear, find_linears, sparsify
from ria.sparse.siblings import (
    FusedLinear,
    SiblingLinear,
    find_siblings,
    fuse_siblings,
    sibling_problem,
)

IDS = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(0))


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits  # type: ignore[no-any-return]


def _tails(groups: list[tuple[str, ...]]) -> set[tuple[str, ...]]:
    return {tuple(n.rpartition(".")[2] for n in g) for g in groups}


def test_sparsify_fuses_only_the_layers_it_would_convert():
    """`sparsify`'s fusion step (bf16 and fp8) applies the test `group_layers` converts by:
    here (on the CPU, so the device reason is set aside) gate/up are refused by shape and
    stay unfused, while q/k/v fuse."""
    from ria.sparse.sparsify import SparsifyReport, fuse_convertible_siblings

    model = tiny_model("llama")
    ref = _logits(model)
    inter = model.config.intermediate_size
    report = SparsifyReport(False, "", "auto", (1,))

    def why_not(why: str | None, n: int, k: int) -> str | None:
        if why is not None and why.startswith("output embedding"):
            return why
        return "refused" if n == inter else None

    fuse_convertible_siblings(model, why_not, report)
    assert _tails(report.fused) == {("q_proj", "k_proj", "v_proj")}
    assert len(report.fused) == model.config.num_hidden_layers and not report.warnings
    assert isinstance(model.model.layers[0].mlp.gate_proj, nn.Linear)
    torch.testing.assert_close(_logits(model), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("llama", {("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")}),
        ("opt", {("q_proj", "k_proj", "v_proj")}),  # fc1 reads its input alone
        # Cohere runs attention and MLP in parallel on one norm: five siblings.
        ("cohere", {("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")}),
        ("deepseek_v3", {("q_a_proj", "kv_a_proj_with_mqa"), ("gate_proj", "up_proj")}),
    ],
)
def test_siblings_are_found_from_the_model_and_fusing_keeps_its_outputs(family, expected):
    model = tiny_model(family)
    ref = _logits(model)
    params = sum(p.numel() for p in model.parameters())
    groups = find_siblings(model, {"input_ids": IDS})
    assert _tails(groups) == expected
    assert len(groups) == len(expected) * model.config.num_hidden_layers
    fused = fuse_siblings(model, groups)
    torch.testing.assert_close(_logits(model), ref, rtol=1e-5, atol=1e-5)
    # One copy of the weights: the siblings hold none, the fused layers hold theirs once.
    assert sum(p.numel() for p in model.parameters()) == params
    for g, group in zip(groups, fused, strict=True):
        assert group.names == g
        assert all(isinstance(model.get_submodule(n), SiblingLinear) for n in g)
    assert not any(isinstance(m, nn.Linear) for n in groups[0] for m in [model.get_submodule(n)])


def test_the_fused_product_is_computed_once_per_group_and_not_kept():
    model = tiny_model("llama")
    fused = fuse_siblings(model, find_siblings(model, {"input_ids": IDS}))
    calls: list[int] = []
    for group in fused:
        group.linear.register_forward_hook(lambda m, i, o: calls.append(o.shape[-1]))
    _logits(model)
    assert calls == [64 + 32 + 32, 2 * 128] * 2  # q/k/v (GQA: k, v 32 wide), gate/up; 2 blocks
    assert all(group._product is None for group in fused)  # no activation outlives the call


def test_a_sibling_called_alone_twice_or_after_an_in_place_change_is_still_right():
    model = tiny_model("llama")
    attn = model.model.layers[0].self_attn
    q, k = copy.deepcopy(attn.q_proj), copy.deepcopy(attn.k_proj)
    fuse_siblings(model, find_siblings(model, {"input_ids": IDS}))
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(attn.k_proj(x), k(x))  # alone, not first in its group
        torch.testing.assert_close(attn.q_proj(x), q(x))
        torch.testing.assert_close(attn.q_proj(x), q(x))  # twice in a row
        x.add_(1.0)  # modified in place after q read it: k must not reuse q's product
        torch.testing.assert_close(attn.k_proj(x), k(x))
        torch.testing.assert_close(attn.q_proj(x.clone()), q(x))


def test_a_copy_of_a_fused_model_has_its_own_group():
    model = tiny_model("llama")
    fuse_siblings(model, find_siblings(model, {"input_ids": IDS}))
    twin = copy.deepcopy(model)
    q = twin.model.layers[0].self_attn.q_proj
    assert q.group is twin.model.layers[0].self_attn.fused_q_proj_k_proj_v_proj
    assert q.group is not model.model.layers[0].self_attn.q_proj.group
    torch.testing.assert_close(_logits(twin), _logits(model))


def test_layers_that_cannot_be_fused_are_named():
    a, b = nn.Linear(8, 4), nn.Linear(8, 6, bias=False)
    assert sibling_problem([a, b]) == "some have a bias, some not"
    assert sibling_problem([a, nn.Linear(6, 4)]) == "different input widths"
    assert "GatheredLinear" in str(sibling_problem([a, GatheredLinear(a, torch.arange(8))]))
    ordered = torch.nn.Linear(8, 4)
    LinearOrder(torch.arange(8).flip(0)).install(ordered)  # a settled free order
    assert "order of its own" in str(sibling_problem([a, ordered]))
    model = nn.Sequential(a, b)
    with pytest.raises(InvalidArgumentError, match=r"cannot fuse \['0', '1'\]"):
        fuse_siblings(model, [("0", "1")])
    with pytest.raises(InvalidArgumentError, match="needs >= 2 siblings"):
        FusedLinear(a, ["0"], [4])


def test_a_fused_model_is_not_saved(tmp_path):
    import ria

    model = tiny_model("llama")
    fuse_siblings(model, find_siblings(model, {"input_ids": IDS}))
    with pytest.raises(InvalidArgumentError, match=r"save it before ria\.sparsify"):
        ria.save_pruned(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _dense_planned(model: nn.Module) -> list[Sparse24Linear]:
    """Every non-lm_head Linear as a dense-planned `Sparse24Linear` (runs on the CPU)."""
    layers = []
    for name, mod, _ in find_linears(model, require_cuda=False):
        if not name.endswith("lm_head"):
            n, k = mod.weight.shape
            layer = Sparse24Linear(k, n, {1: Choice("dense")}, weight=mod.weight.detach())
            model.set_submodule(name, layer)
            layers.append(layer)
    return layers


@pytest.mark.skipif(OLD_DYNAMO, reason="torch < 2.11: dynamo cannot trace transformers' wrapper")
def test_compiled_fused_model_runs_one_sparse_call_per_group():
    model = prune_model_24(tiny_model("llama"))
    ref = _logits(model)
    fuse_siblings(model, find_siblings(model, {"input_ids": IDS}))
    layers = _dense_planned(model)
    calls: list[int] = []
    for layer in layers:  # the custom op calls linear_2d; count what really runs
        real = layer.linear_2d
        layer.linear_2d = lambda x, real=real: calls.append(1) or real(x)  # type: ignore[method-assign]
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        compiled(IDS)
        calls.clear()
        out = compiled(IDS).logits
    assert len(calls) == 2 * 4  # per block: q/k/v, o, gate/up, down
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(OLD_DYNAMO, reason="torch < 2.11: dynamo cannot trace transformers' wrapper")
def test_hf_static_cache_generate_traces_fused_siblings_in_one_graph():
    from transformers import CompileConfig

    model = prune_model_24(tiny_model("llama"))
    fuse_siblings(model, find_siblings(model, {"input_ids": IDS}))
    _dense_planned(model)
    config = CompileConfig(backend="eager", fullgraph=True)
    config._compile_all_devices = True  # transformers compiles on accelerators only
    kw = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    compiled = model.generate(IDS, cache_implementation="static", compile_config=config, **kw)
    assert torch.equal(compiled, model.generate(IDS, **kw))


@needs_cuda
@pytest.mark.parametrize("family", ["llama", "cohere"])
def test_sparsify_fuses_siblings_and_matches_masked_dense(family):
    model = prune_model_24(tiny_model(family).to("cuda", torch.bfloat16))
    ids = IDS.cuda()
    with torch.no_grad():
        ref = model(ids).logits.float()
    report = sparsify(model, batch_sizes=[1, 16, 128], plan_cache=False, fuse_siblings=True)
    assert report.applied and len(report.fused) == 2 * (1 if family == "cohere" else 2)
    for group in report.fused:
        fused = model.get_submodule(group[0]).group
        assert isinstance(fused.linear, Sparse24Linear)
    with torch.no_grad():
        out = model(ids).logits.float()
    assert float((out - ref).norm() / ref.norm()) < 2e-2
    plain = prune_model_24(tiny_model(family).to("cuda", torch.bfloat16))
    unfused = sparsify(plain, batch_sizes=[1, 16, 128], plan_cache=False)
    fewer = 2 * (4 if family == "cohere" else 3)  # 5 layers -> 1, or 3 -> 1 and 2 -> 1
    assert unfused.fused == [] and len(unfused.converted) == len(report.converted) + fewer
