"""Saving pruned models (atomic, plain Hugging Face checkpoints) and the `ria` CLI."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import FAST_SEARCH, assert_nm_as_sparsified, pruned_linears, tiny_model
from transformers import AutoModelForCausalLM

import ria
from ria.cli import main
from ria.permutation import (
    ChannelGather,
    GatheredLinear,
    group_order,
    nm_order,
)
from ria.save import PERMUTATION_FILE

CALIB = dict(calibration="austen", nsamples=4, seqlen=32, progress=False)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# How many modules carry a tiny Llama's orders (2 blocks): the attention and MLP norms
# (folded), or q/k/v/o/gate/up (free; down's order is folded into gate/up rows).
CARRIERS = {"folded": 4, "free": 12}


def carries_order(module: torch.nn.Module) -> bool:
    return nm_order(module) is not None or group_order(module) is not None


@pytest.fixture(params=["folded", "free"])
def permuted(request, tokenizer):
    model = tiny_model("llama")
    report = ria.prune(
        model,
        tokenizer,
        sparsity="2:4",
        permute=request.param,
        permutation_options=FAST_SEARCH,
        **CALIB,
    )
    return model, report


def test_saved_model_reloads_with_plain_transformers(tmp_path, tokenizer, permuted):
    model, report = permuted
    ids = torch.randint(0, 512, (1, 20))
    out = ria.save_pruned(model, tmp_path / "out", tokenizer, report)
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert not any(isinstance(m, (ChannelGather, GatheredLinear)) for m in plain.modules())
    torch.testing.assert_close(logits(plain, ids), logits(model, ids), rtol=1e-5, atol=1e-5)
    assert plain.config.ria["sparsity"] == "2:4"
    mode = report.settings["permute"]
    assert json.loads((out / "ria_report.json").read_text())["settings"]["permute"] == mode
    assert (out / PERMUTATION_FILE).exists()


def test_load_pruned_restores_the_storage_order(tmp_path, tokenizer, permuted):
    model, report = permuted
    out = ria.save_pruned(model, tmp_path / "out", tokenizer, report)
    restored = ria.load_pruned(out)
    assert sum(map(carries_order, restored.modules())) == CARRIERS[report.settings["permute"]]
    for name, linear in pruned_linears(restored).items():
        assert torch.equal(linear.weight, pruned_linears(model)[name].weight)  # as saved
    assert_nm_as_sparsified(restored, 2, 4)
    ids = torch.randint(0, 512, (1, 20))
    torch.testing.assert_close(logits(restored, ids), logits(model, ids), rtol=1e-5, atol=1e-5)


def test_offloaded_weights_load_with_their_orders_and_prune_refuses_them(
    tmp_path, tokenizer, permuted
):
    # accelerate keeps block 1 on disk and its parameters on the meta device. Orders used to
    # be applied to the weights on loading: folded ones went to the placeholders (the
    # offloaded weights stayed in plain order, giving garbage logits without an error, then
    # refused). Now loading only records them: both modes load and compute the same.
    model, report = permuted
    out = ria.save_pruned(model, tmp_path / "out", tokenizer, report)
    where = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
             "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}  # fmt: skip
    offloaded = ria.load_pruned(out, device_map=where, offload_folder=tmp_path / "offload")
    assert sum(map(carries_order, offloaded.modules())) == CARRIERS[report.settings["permute"]]
    ids = torch.randint(0, 512, (1, 20))
    torch.testing.assert_close(logits(offloaded, ids), logits(model, ids), rtol=1e-5, atol=1e-5)
    # Nor does prune reach them: refused before anything changes (it failed at block 1
    # with torch's "Cannot copy out of meta tensor").
    plain = AutoModelForCausalLM.from_pretrained(
        out, device_map=where, offload_folder=tmp_path / "offload2"
    )
    with pytest.raises(ria.UnsupportedModelError, match=r"model\.layers\.1\..* is offloaded"):
        ria.prune(plain, tokenizer, sparsity="2:4", **CALIB)


def test_an_interrupted_save_leaves_nothing_that_looks_complete(
    tmp_path, tokenizer, permuted, monkeypatch
):
    model, report = permuted

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenizer, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ria.save_pruned(model, tmp_path / "out", tokenizer, report)
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_to_overwrite_unless_asked(tmp_path, tokenizer, permuted):
    model, report = permuted
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ria.OutputExistsError, match="overwrite"):  # a FileExistsError too
        ria.save_pruned(model, tmp_path / "out", tokenizer, report)
    assert (tmp_path / "out" / "keep.txt").exists()
    # overwrite replaces an earlier checkpoint of ours, never a directory of other files.
    with pytest.raises(ria.InvalidArgumentError, match="not a checkpoint written by ria"):
        ria.save_pruned(model, tmp_path / "out", tokenizer, report, overwrite=True)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    ria.save_pruned(model, tmp_path / "ckpt", tokenizer, report)
    (tmp_path / "ckpt" / "stale.txt").write_text("from an earlier save")
    ria.save_pruned(model, tmp_path / "ckpt", tokenizer, report, overwrite=True)
    assert not (tmp_path / "ckpt" / "stale.txt").exists()
    assert (tmp_path / "ckpt" / "config.json").exists()


def test_overwrite_never_replaces_the_current_directory(tmp_path, tokenizer, permuted, monkeypatch):
    model, report = permuted
    ria.save_pruned(model, tmp_path / "ckpt", tokenizer, report)
    monkeypatch.chdir(tmp_path / "ckpt")
    with pytest.raises(ria.InvalidArgumentError, match="current directory"):
        ria.save_pruned(model, ".", tokenizer, report, overwrite=True)
    assert (tmp_path / "ckpt" / "config.json").exists()


def test_a_sparsified_model_is_not_saved(tmp_path, permuted):
    from ria.sparse import Choice, Sparse24Linear

    model, _ = permuted
    linear = model.model.layers[0].mlp.down_proj
    model.model.layers[0].mlp.down_proj = Sparse24Linear(
        linear.in_features, linear.out_features, {1: Choice("dense")}, weight=linear.weight.data
    )
    with pytest.raises(ValueError, match=r"save it before ria\.sparsify"):
        ria.save_pruned(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def tiny_checkpoint(tmp_path, tokenizer):
    path = tmp_path / "tiny"
    tiny_model("qwen2").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_cli_prune_end_to_end(tmp_path, tiny_checkpoint, capsys):
    from importlib import resources

    sample = resources.files("ria.samples").joinpath("austen_sample.txt")
    out = tmp_path / "pruned"
    code = main(
        [
            "prune", str(tiny_checkpoint), "--sparsity", "2:4", "--permute", "--method", "ria",
            "--calibration", str(sample), "--nsamples", "4", "--seqlen", "32",
            "--eval", str(sample), "--max-windows", "2", "--out", str(out), "--no-progress",
            "--json", str(tmp_path / "report.json"),
        ]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "perplexity dense" in printed and "perplexity pruned" in printed
    assert "mean permutation efficacy" in printed
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["sparsity"] == pytest.approx(0.5)
    assert report["perplexity"]["pruned"] > 0
    assert_nm_as_sparsified(ria.load_pruned(out), 2, 4)


def test_cli_eval(tiny_checkpoint, capsys):
    from importlib import resources

    sample = str(resources.files("ria.samples").joinpath("austen_sample.txt"))
    args = ["eval", str(tiny_checkpoint), "--ppl", sample, "--seqlen", "64", "--max-windows", "2"]
    assert main([*args, "--no-progress"]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_cli_eval_under_torchrun_is_refused(tiny_checkpoint, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # every rank would evaluate and write the JSON
    assert main(["eval", str(tiny_checkpoint), "--ppl", "austen"]) == 2
    assert "run it without torchrun" in capsys.readouterr().err


def test_cli_reports_bad_input_without_a_traceback(tiny_checkpoint, capsys):
    assert main(["prune", str(tiny_checkpoint), "--sparsity", "3/4", "--no-progress"]) == 2
    assert "bad sparsity '3/4'" in capsys.readouterr().err
    assert main(["eval", str(tiny_checkpoint)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
