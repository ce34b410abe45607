"""`ria.prune` on tiny random models of every supported family (fast, offline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import (
    FAMILIES,
    FAST_SEARCH,
    assert_nm,
    assert_nm_as_sparsified,
    logits,
    pruned_linears,
    tiny_model,
)

import ria
from ria.arch import block_linears, find_blocks
from ria.pruning import DEFAULT_PERMUTATION, pipeline

CALIB = dict(calibration="austen", nsamples=4, seqlen=32, progress=False)


@pytest.mark.parametrize("method", ["ria", "wanda", "magnitude", "sparsegpt"])
@pytest.mark.parametrize("sparsity", [0.5, "2:4", "4:8"])
def test_exact_sparsity_for_every_method_and_pattern(tokenizer, method, sparsity):
    model = tiny_model("llama")
    report = ria.prune(model, tokenizer, sparsity=sparsity, method=method, **CALIB)
    layers = pruned_linears(model)
    assert [r.name for r in report.layers] == list(layers)
    for name, linear in layers.items():
        w = linear.weight
        if isinstance(sparsity, str):
            n, m = map(int, sparsity.split(":"))
            assert_nm(w, n, m)
        per_row = method == "wanda"
        zeros = (w == 0).sum(dim=1) if per_row else (w == 0).sum()
        expected = round(0.5 * w.shape[1]) if per_row else round(0.5 * w.numel())
        if method == "sparsegpt" and not isinstance(sparsity, str):
            # SparseGPT prunes exactly half of every block of 128 columns.
            expected = sum(
                round(0.5 * w.shape[0] * min(128, w.shape[1] - b))
                for b in range(0, w.shape[1], 128)
            )
        assert (zeros == expected).all(), f"{name}: {zeros} zeros, expected {expected}"
    assert report.sparsity == pytest.approx(0.5)


def test_per_row_override(tokenizer):
    model = tiny_model("llama")
    ria.prune(model, tokenizer, sparsity=0.3, method="ria", per_row=True, **CALIB)
    for linear in pruned_linears(model).values():
        zeros = (linear.weight == 0).sum(dim=1)
        assert (zeros == round(0.3 * linear.weight.shape[1])).all()


def test_embeddings_and_head_are_never_pruned(tokenizer):
    model = tiny_model("llama")
    ria.prune(model, tokenizer, sparsity="2:4", **CALIB)
    assert (model.get_input_embeddings().weight != 0).all()
    assert (model.lm_head.weight != 0).all()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_permuted_prune_is_nm_in_storage_order_and_keeps_more(tokenizer, family, pattern):
    n, m = map(int, pattern.split(":"))
    plain = tiny_model(family)
    plain_report = ria.prune(plain, tokenizer, sparsity=pattern, **CALIB)
    model = tiny_model(family)
    report = ria.prune(
        model, tokenizer, sparsity=pattern, permute=True, permutation_options=FAST_SEARCH, **CALIB
    )
    assert_nm_as_sparsified(model, n, m)
    # Every permutation search found at least the identity's score...
    for r in report.layers:
        assert r.permutation is not None and r.permutation["efficacy"] >= 0
    # ...and in total the permuted masks keep more importance than the plain ones.
    assert sum(r.kept_score for r in report.layers) > sum(r.kept_score for r in plain_report.layers)
    assert np.isfinite(logits(model, torch.randint(0, 512, (1, 16))).numpy()).all()


def test_sequential_calibration_sees_the_pruned_outputs(tokenizer, monkeypatch):
    """Block 1 must be scored on what pruned block 0 outputs, not on dense activations."""
    seen: list[torch.Tensor] = []
    original = pipeline.score_matrix

    def spy(linear, stats, config):
        if stats is not None:
            seen.append(stats.act_norm.clone())
        return original(linear, stats, config)

    monkeypatch.setattr(pipeline, "score_matrix", spy)
    model = tiny_model("llama")
    dense = tiny_model("llama")
    windows = ria.pruning.calibration_windows("austen", tokenizer, 4, 32, seed=0)
    ria.prune(model, tokenizer, sparsity=0.5, **CALIB)
    # The first Linear scored in block 1 is q_proj; its input is block 1's input_layernorm.
    block1_q = seen[len(block_linears(find_blocks(model)[1][0]))]

    def q_input_norm(m) -> torch.Tensor:
        acc = []
        handle = find_blocks(m)[1][1].self_attn.q_proj.register_forward_hook(
            lambda _mod, args, _out: acc.append(args[0].reshape(-1, args[0].shape[-1]))
        )
        with torch.no_grad():
            for w in windows:
                m(w[None])
        handle.remove()
        return torch.cat(acc).float().pow(2).sum(0).sqrt()

    torch.testing.assert_close(block1_q, q_input_norm(model), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(block1_q, q_input_norm(dense), rtol=1e-3)


def test_reconstruct_updates_kept_weights_under_the_same_mask(tokenizer):
    plain, updated = tiny_model("llama"), tiny_model("llama")
    ria.prune(plain, tokenizer, sparsity="2:4", **CALIB)
    ria.prune(updated, tokenizer, sparsity="2:4", reconstruct=True, **CALIB)
    for name, lb in pruned_linears(updated).items():
        assert_nm(lb.weight, 2, 4)
        if ".layers.0." in name:  # same inputs, so the same RIA mask; only the values move
            la = pruned_linears(plain)[name]
            assert ((lb.weight != 0) <= (la.weight != 0)).all()
            assert not torch.equal(la.weight, lb.weight)


def test_config_records_the_settings(tokenizer):
    model = tiny_model("qwen2")
    ria.prune(
        model, tokenizer, sparsity="2:4", permute=True, permutation_options=FAST_SEARCH, **CALIB
    )
    assert model.config.ria["method"] == "ria"
    assert model.config.ria["sparsity"] == "2:4"
    assert model.config.ria["permute"] == DEFAULT_PERMUTATION == "folded"


def test_magnitude_needs_no_calibration_data():
    model = tiny_model("llama")
    report = ria.prune(
        model, None, sparsity="2:4", method="magnitude", calibration=None, progress=False
    )
    assert report.sparsity == pytest.approx(0.5)
    assert "calibration" not in report.stage_seconds


def test_deterministic_for_a_seed(tokenizer):
    a, b = tiny_model("llama"), tiny_model("llama")
    for model in (a, b):
        ria.prune(
            model,
            tokenizer,
            sparsity="2:4",
            permute=True,
            seed=3,
            permutation_options=FAST_SEARCH,
            **CALIB,
        )
    for la, lb in zip(pruned_linears(a).values(), pruned_linears(b).values(), strict=True):
        assert torch.equal(la.weight, lb.weight)


def test_the_search_seed_is_the_prune_seed_unless_the_options_name_one():
    """The CLI and prune_checkpoint build a PruneConfig without search options."""
    assert ria.PruneConfig(seed=5).permutation_options.seed == 5
    assert ria.PruneConfig(seed=5, permutation_options={"seed": 2}).permutation_options.seed == 2
    own = ria.SearchOptions(seed=7)
    assert ria.PruneConfig(seed=5, permutation_options=own).permutation_options.seed == 7


def test_settings_that_change_the_weights_are_recorded(tokenizer):
    model = tiny_model("llama")
    report = ria.prune(model, tokenizer, sparsity="2:4", reconstruct=True, refit_iters=3, **CALIB)
    settings = model.config.ria
    assert settings["refit_iters"] == 3 and report.settings["refit_iters"] == 3
    assert settings["refine_sweeps"] is None and settings["measure_error"] is False
    wanda = ria.prune(tiny_model("llama"), tokenizer, method="wanda", **CALIB)
    assert wanda.settings["alpha"] is None and wanda.settings["refit_iters"] is None


# --- errors -------------------------------------------------------------------------


def test_settings_a_method_would_ignore_are_refused():
    with pytest.raises(ria.InvalidArgumentError, match="method 'wanda' does not use it"):
        ria.PruneConfig(method="wanda", alpha=1.0)
    with pytest.raises(ria.InvalidArgumentError, match="per_row=True is not available"):
        ria.PruneConfig(method="sparsegpt", per_row=True)
    ria.PruneConfig(method="sparsegpt", sparsity="2:4", per_row=True)  # N:M is per row anyway


def test_a_prune_refused_before_any_block_leaves_the_record_as_it_was(tokenizer):
    model = tiny_model("llama")
    with pytest.raises(ria.InvalidArgumentError, match="tokenizer"):
        ria.prune(model, None, sparsity="2:4", **CALIB)
    assert not hasattr(model.config, "ria")
    ria.prune(model, tokenizer, sparsity="2:4", **CALIB)
    record = dict(model.config.ria)
    with pytest.raises(ria.InvalidArgumentError, match="tokenizer"):
        ria.prune(model, None, sparsity=0.7, **CALIB)
    assert model.config.ria == record


@pytest.mark.parametrize("method", ["ria", "sparsegpt"])
def test_a_linear_the_forward_never_calls_is_pruned_by_magnitude(tokenizer, method):
    # All-zero statistics would give every RIA score 0 (an arbitrary mask) and have the
    # OBS update zero the whole matrix.
    model = tiny_model("llama")
    for block in find_blocks(model)[1]:
        block.mlp.unused = torch.nn.Linear(64, 64, bias=False)  # a branch nothing takes
    before = [b.mlp.unused.weight.detach().clone() for b in find_blocks(model)[1]]
    report = ria.prune(model, tokenizer, sparsity="2:4", method=method, **CALIB)

    for block, dense in zip(find_blocks(model)[1], before, strict=True):
        keep = torch.from_numpy(ria.core.nm_mask(ria.core.magnitude_score(dense), 2, 4))
        torch.testing.assert_close(block.mlp.unused.weight, dense * keep, rtol=0, atol=0)
    unused = [r.name for r in report.uncalibrated]
    assert unused == [f"model.layers.{i}.mlp.unused" for i in range(len(before))]
    assert not report.weight_only_experts
    assert f"{len(before)} matrices never ran on the calibration data" in str(report)
    called = [r for r in report.layers if not r.name.endswith("unused")]
    assert called and not any(r.weight_only for r in called)


def test_unknown_method(tokenizer):
    with pytest.raises(ValueError, match="unknown method 'obd'"):
        ria.prune(tiny_model("llama"), tokenizer, method="obd", **CALIB)


@pytest.mark.parametrize("bad", ["2/4", "4:4", "0:4", "half", 1.5, -0.1])
def test_bad_sparsity(tokenizer, bad):
    with pytest.raises(ValueError, match="sparsity"):
        ria.prune(tiny_model("llama"), tokenizer, sparsity=bad, **CALIB)


def test_nm_with_in_features_not_divisible_by_m(tokenizer):
    model = tiny_model("llama", intermediate_size=130)
    with pytest.raises(
        ValueError, match=r"mlp.down_proj has 130 input features, not divisible by M=4"
    ):
        ria.prune(model, tokenizer, sparsity="2:4", **CALIB)


def test_permute_needs_nm(tokenizer):
    with pytest.raises(ValueError, match="permute=True needs an N:M sparsity"):
        ria.prune(tiny_model("llama"), tokenizer, sparsity=0.5, permute=True, **CALIB)


@pytest.mark.parametrize("empty", ["", [], ["", ""]])
def test_empty_calibration(tokenizer, empty):
    with pytest.raises(ValueError, match=r"empty|unknown text source"):
        ria.prune(
            tiny_model("llama"), tokenizer, calibration=empty, nsamples=2, seqlen=16, progress=False
        )


def test_text_calibration_needs_a_tokenizer():
    with pytest.raises(ValueError, match="tokenizer"):
        ria.prune(tiny_model("llama"), None, **CALIB)


def test_permutation_needs_no_table_of_families(tokenizer):
    """The wiring is traced, so a family ria has never heard of is permuted too."""
    model = tiny_model("llama")
    model.config.model_type = "mystery"
    report = ria.prune(
        model, tokenizer, sparsity="2:4", permute=True, permutation_options=FAST_SEARCH, **CALIB
    )
    assert [g["gather"] for g in report.permutation_groups] == ["output"] * 4
    assert_nm_as_sparsified(model, 2, 4)


def test_a_dispatched_model_is_pruned_where_it_is(tokenizer, monkeypatch):
    """With accelerate's `hf_device_map` set, no module is moved (each block runs on its
    own device); the result is the same as for an undispatched model."""
    plain, dispatched = tiny_model("llama"), tiny_model("llama")
    dispatched.hf_device_map = {"": "cpu"}
    moves = []
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moves.append(a) or self)
    ria.prune(dispatched, tokenizer, sparsity="2:4", device="cuda", **CALIB)
    assert moves == []
    monkeypatch.undo()
    ria.prune(plain, tokenizer, sparsity="2:4", device="cpu", **CALIB)
    for a, b in zip(plain.state_dict().values(), dispatched.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_device_without_cuda_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="CUDA is not available"):
        ria.prune(tiny_model("llama"), tokenizer, device="cuda", **CALIB)
