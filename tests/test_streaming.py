"""`ria.prune_checkpoint`: the streaming prune writes the checkpoint `save_pruned` writes
after an in-memory `ria.prune`, atomically, with bounded host memory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import (
    FAST_SEARCH,
    VOCAB,
    assert_nm,
    kill_when_it_prints,
    logits,
    pruned_linears,
    tiny_config,
    tiny_model,
)
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GenerationConfig

import ria
import ria.pruning.pipeline
from ria.cli import main
from ria.pruning.spill import SpilledStates
from ria.save import PERMUTATION_FILE

CALIB = dict(calibration="austen", nsamples=4, seqlen=32, progress=False, device="cpu")
CASES = {
    "2:4 free orders": dict(sparsity="2:4", permute="free", permutation_options=FAST_SEARCH),
    "2:4 folded orders": dict(sparsity="2:4", permute="folded", permutation_options=FAST_SEARCH),
    # The checkpoint is float32: this case also casts while loading.
    "50% unstructured in bfloat16": dict(sparsity=0.5, dtype=torch.bfloat16),
}
# A block of tiny_model is ~100 KB: 40 KB shards split every block over several files.
SHARD = "40KB"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama with tied embeddings, saved in many shards with its tokenizer."""
    path = tmp_path_factory.mktemp("src") / "tiny"
    model = tiny_model("llama", tie_word_embeddings=True)
    # As a Hub model's: sampling defaults and several end-of-sequence ids.
    model.generation_config = GenerationConfig(eos_token_id=[2, 7], do_sample=True, temperature=0.6)
    model.save_pretrained(path, max_shard_size=SHARD)
    tokenizer.save_pretrained(path)
    assert len(list(path.glob("model-*.safetensors"))) > 3
    return path


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("model*.safetensors")):
        out.update(load_file(shard))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_streaming_writes_what_save_pruned_writes(tmp_path, checkpoint, tokenizer, case):
    assert_streaming_matches(tmp_path, checkpoint, tokenizer, {**CASES[case], **CALIB})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_streaming_on_the_gpu_writes_what_save_pruned_writes(tmp_path, checkpoint, tokenizer):
    settings = {**CASES["2:4 free orders"], **CALIB, "device": "cuda", "dtype": torch.bfloat16}
    assert_streaming_matches(tmp_path, checkpoint, tokenizer, settings)


def test_offloaded_activations_give_the_same_checkpoint(
    tmp_path, checkpoint, tokenizer, monkeypatch
):
    written = []
    append = SpilledStates.append

    def counting(self, states):
        written.append(states.shape)
        append(self, states)

    monkeypatch.setattr(SpilledStates, "append", counting)
    settings = {**CASES["2:4 folded orders"], **CALIB}
    assert_streaming_matches(tmp_path, checkpoint, tokenizer, settings, offload=True)
    blocks = tiny_config("llama").num_hidden_layers
    # Block 0's inputs, then every block's outputs but the last's, one file per batch.
    assert len(written) == CALIB["nsamples"] * blocks
    assert not list(tmp_path.glob(".*activations*"))  # the files went with their directory


def assert_streaming_matches(tmp_path, checkpoint, tokenizer, settings, offload=False):
    """The streamed checkpoint equals what `save_pruned` writes after `ria.prune`."""
    settings = dict(settings)
    dtype = settings.pop("dtype", torch.float32)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype)
    report = ria.prune(model, tokenizer, **settings)
    in_memory = ria.save_pruned(model, tmp_path / "in_memory", tokenizer, report)

    streamed = tmp_path / "streamed"
    stream_report = ria.prune_checkpoint(
        checkpoint, streamed, dtype=dtype, offload_activations=offload, **settings
    )

    # Bitwise: both paths run the same block code with the same kernels on the same
    # device, in the same order, on the same calibration windows and weights, so no float
    # result may differ (masks, orders, kept values, the reloaded models' logits alike).
    expected, got = tensors(in_memory), tensors(streamed)
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    permuted = bool(settings.get("permute"))
    assert (in_memory / PERMUTATION_FILE).exists() == permuted
    if permuted:
        orders, stream_orders = ria.save.saved_orders(in_memory), ria.save.saved_orders(streamed)
        assert sorted(stream_orders) == sorted(orders)
        assert all(torch.equal(stream_orders[k], v) for k, v in orders.items())
        # ...and how each is applied (the file's metadata).
        infos = [
            ria.save.saved_orders_with_infos(d / PERMUTATION_FILE)[1] for d in (in_memory, streamed)
        ]
        assert infos[0] == infos[1]
    for name in ("config.json", "generation_config.json"):  # the latter was the default one
        assert json.loads((streamed / name).read_text()) == json.loads(
            (in_memory / name).read_text()
        )
    config = json.loads((in_memory / "config.json").read_text())
    assert config["ria"]["sparsity"] == str(settings["sparsity"])
    assert [layer.sparsity for layer in stream_report.layers] == [
        layer.sparsity for layer in report.layers
    ]
    ids = torch.randint(0, VOCAB, (1, 24))
    assert torch.equal(
        logits(ria.load_pruned(streamed), ids), logits(ria.load_pruned(in_memory), ids)
    )
    assert (streamed / "tokenizer.json").exists()  # the checkpoint's own tokenizer


@pytest.mark.parametrize("offload", [False, True])
def test_a_failure_midway_leaves_no_output_and_no_staging(
    tmp_path, checkpoint, monkeypatch, offload
):
    earlier = tmp_path / "out"
    earlier.mkdir()
    (earlier / "config.json").write_text('{"ria": {}}')  # an earlier ria checkpoint
    calls = 0
    score = ria.pruning.pipeline.score_matrix
    linears_per_block = 7  # q, k, v, o, gate, up, down

    def failing_in_block_1(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls > linears_per_block:
            raise RuntimeError("simulated failure in block 1")
        return score(*args, **kwargs)

    monkeypatch.setattr(ria.pruning.pipeline, "score_matrix", failing_in_block_1)
    with pytest.raises(RuntimeError, match="block 1"):
        ria.prune_checkpoint(
            checkpoint,
            earlier,
            overwrite=True,
            offload_activations=offload,
            sparsity="2:4",
            **CALIB,
        )
    assert calls == linears_per_block + 1  # block 0 was pruned (and written) first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging left
    assert [p.name for p in earlier.iterdir()] == ["config.json"]  # the old one, untouched


KILLED_STREAMING = textwrap.dedent(
    """
    import time
    import ria
    import ria.pruning.pipeline

    score, calls = ria.pruning.pipeline.score_matrix, 0

    def stalling(*args, **kwargs):  # in block 1, after block 0's outputs are spilled
        global calls
        calls += 1
        if calls > 7:
            print("pruning", flush=True)
            time.sleep(600)
        return score(*args, **kwargs)

    ria.pruning.pipeline.score_matrix = stalling
    ria.prune_checkpoint({src!r}, {out!r}, offload_activations=True, sparsity="2:4",
                         calibration="austen", nsamples=4, seqlen=32, progress=False,
                         device="cpu")
    """
)


def test_a_killed_streaming_prune_leaves_spilled_activations_the_next_write_removes(
    tmp_path, checkpoint
):
    out = tmp_path / "out"
    kill_when_it_prints(KILLED_STREAMING.format(src=str(checkpoint), out=str(out)), "pruning")
    assert not out.exists()
    spilled = [p for p in tmp_path.iterdir() if p.name.startswith(".out.activations-")]
    assert len(spilled) == 1 and any(spilled[0].iterdir())
    # Spilled activations of a run still alive (pid 1 always is) are left alone.
    alive = tmp_path / ".out.activations-1-0123abcd"
    alive.mkdir()

    ria.prune_checkpoint(checkpoint, out, sparsity="2:4", **CALIB)
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "out"]


def test_a_checkpoint_saved_with_channel_orders_is_refused(tmp_path, checkpoint):
    # Its blocks are stored without their orders, which only `load_pruned` restores.
    src = tmp_path / "permuted"
    shutil.copytree(checkpoint, src)
    save_file({"model.layers.0.mlp.down_proj": torch.arange(32)}, src / PERMUTATION_FILE)
    with pytest.raises(ria.InvalidArgumentError, match=r"channel orders.*ria\.load_pruned"):
        ria.prune_checkpoint(src, tmp_path / "out", sparsity="2:4", **CALIB)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["permuted"]


@pytest.mark.parametrize(
    ("dtype", "strict"),
    # gpt_oss keeps its norms in float32 in float16 (`_keep_in_fp32_modules`); a strict list
    # holds in bfloat16 too (no tiny family that streams has one: gpt_oss's list is made one).
    [(torch.float16, False), (torch.bfloat16, True)],
)
def test_what_from_pretrained_keeps_in_float32_stays_in_float32(
    tmp_path, tokenizer, monkeypatch, dtype, strict
):
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssPreTrainedModel

    if strict:
        keep = GptOssPreTrainedModel._keep_in_fp32_modules
        monkeypatch.setattr(GptOssPreTrainedModel, "_keep_in_fp32_modules", None)
        monkeypatch.setattr(GptOssPreTrainedModel, "_keep_in_fp32_modules_strict", keep)
    model = tiny_model("gpt_oss")
    with torch.no_grad():  # norms of ones would survive any rounding
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.1 * torch.randn_like(param))
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size=SHARD)
    tokenizer.save_pretrained(src)
    assert_streaming_matches(tmp_path, src, tokenizer, {"sparsity": "2:4", "dtype": dtype, **CALIB})
    kept = {k for k, v in tensors(tmp_path / "streamed").items() if v.dtype == torch.float32}
    assert kept and all("norm" in k for k in kept), kept


def test_dtype_auto_without_a_config_dtype_is_the_first_shards_as_in_from_pretrained(tmp_path):
    # The first floating tensor by name over all shards (lm_head, in the last shard) was
    # taken: a bf16 checkpoint with a float32 LM head was pruned and written in float32.
    source = tmp_path / "src"
    tiny_model("llama").to(torch.bfloat16).save_pretrained(source, max_shard_size=SHARD)
    config = json.loads((source / "config.json").read_text())
    config.pop("dtype", None)
    (source / "config.json").write_text(json.dumps(config))
    index = json.loads((source / "model.safetensors.index.json").read_text())
    shard = source / index["weight_map"]["lm_head.weight"]
    stored = load_file(shard)
    stored["lm_head.weight"] = stored["lm_head.weight"].float()
    save_file(stored, shard, metadata={"format": "pt"})
    expected = AutoModelForCausalLM.from_pretrained(source, dtype="auto").dtype
    assert expected == torch.bfloat16
    ria.prune_checkpoint(
        source, tmp_path / "out", sparsity="2:4", method="magnitude", progress=False
    )
    assert tensors(tmp_path / "out")["model.layers.0.mlp.up_proj.weight"].dtype == expected


def test_a_hub_id_is_read_from_the_local_cache_only(tmp_path, checkpoint, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    shutil.copytree(checkpoint, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    report = ria.prune_checkpoint("org/tiny", tmp_path / "out", sparsity="2:4", **CALIB)
    assert report.sparsity == pytest.approx(0.5)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    with pytest.raises(ria.InvalidArgumentError, match="org/absent"):
        ria.prune_checkpoint("org/absent", tmp_path / "out2", sparsity="2:4", **CALIB)
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize(
    ("settings", "error", "match"),
    [
        (dict(sparsity="3:2"), ria.InvalidArgumentError, "N:M"),
        (dict(sparsity="2:4", nsample=4), ria.InvalidArgumentError, "unknown setting 'nsample'"),
        (dict(sparsity="2:4", dtype="int8"), ria.InvalidArgumentError, "dtype"),
    ],
)
def test_bad_settings_are_refused_before_anything_is_written(
    tmp_path, checkpoint, settings, error, match
):
    with pytest.raises(error, match=match):
        ria.prune_checkpoint(checkpoint, tmp_path / "out", **settings)
    assert list(tmp_path.iterdir()) == []


def test_only_safetensors_checkpoints_stream(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ria.InvalidArgumentError, match="safetensors"):
        ria.prune_checkpoint(tmp_path / "bin", tmp_path / "out")
    with pytest.raises(FileExistsError):
        ria.prune_checkpoint(tmp_path / "bin", tmp_path / "bin")


def test_a_single_file_beside_an_index_is_read_as_transformers_reads_it(tmp_path, checkpoint):
    # transformers loads model.safetensors when both it and an index are there; streaming
    # read the index, so the pruned weights were another model's.
    both = tmp_path / "both"
    shutil.copytree(checkpoint, both)
    tiny_model("llama", seed=1, tie_word_embeddings=True).save_pretrained(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "model.safetensors", both)
    ria.prune_checkpoint(both, tmp_path / "out", sparsity="2:4", method="magnitude", progress=False)

    model = AutoModelForCausalLM.from_pretrained(both)
    key = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(model.state_dict()[key], load_file(both / "model.safetensors")[key])
    ria.prune(model, sparsity="2:4", method="magnitude", progress=False)
    written = tensors(tmp_path / "out")
    for name, value in model.state_dict().items():
        if name in written:
            assert torch.equal(written[name], value), name


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_experts_stored_one_by_one_stream_as_from_pretrained_fuses_them(
    tmp_path, tokenizer, family
):
    # transformers 5 saves these models' fused experts one expert at a time and fuses
    # them on loading; the block reader looked for the fused names and refused them.
    # DeepSeek-V3 mixes a dense block (0) with MoE blocks: conversions per block differ.
    source = tmp_path / family
    tiny_model(family).save_pretrained(source, max_shard_size=SHARD)
    tokenizer.save_pretrained(source)
    assert not any("experts.gate_up_proj" in k for k in tensors(source))  # stored unfused
    settings = dict(sparsity="2:4", permute="folded", permutation_options=FAST_SEARCH)
    assert_streaming_matches(tmp_path, source, tokenizer, {**settings, **CALIB})
    assert not any("experts.gate_up_proj" in k for k in tensors(tmp_path / "streamed"))


@pytest.mark.parametrize("stored", ["hub layout", "own names"])
def test_a_vision_language_checkpoint_streams_under_the_names_it_stores(
    tmp_path, tokenizer, stored
):
    # Gemma 3 with a vision tower: `save_pretrained` writes `language_model.model.*`,
    # which the weights outside the blocks were read as (refused: "no tensor"); stored
    # under the model's own names, the streamed copy renamed them (a mixed layout).
    source = tmp_path / "vlm"
    tiny_vlm().save_pretrained(
        source, max_shard_size="100KB", save_original_format=stored == "hub layout"
    )
    tokenizer.save_pretrained(source)
    settings = dict(sparsity="2:4", permute="folded", permutation_options=FAST_SEARCH)
    assert_streaming_matches(tmp_path, source, tokenizer, {**settings, **CALIB})
    hub = any(k.startswith("language_model.") for k in tensors(tmp_path / "streamed"))
    assert hub == (stored == "hub layout")


def tiny_vlm() -> torch.nn.Module:
    """A two-block Gemma 3 with a two-layer vision tower."""
    from transformers import Gemma3Config

    text = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
    )  # fmt: skip
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=28, patch_size=14,
    )  # fmt: skip
    config = Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4,
        image_token_index=VOCAB - 12, boi_token_index=VOCAB - 11, eoi_token_index=VOCAB - 10,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize(
    ("stored", "named"),
    [
        ("model.layers.1.mlp.up_proj.weight",) * 2,
        (
            "model.layers.1.block_sparse_moe.experts.1.w3.weight",
            "model.layers.1.mlp.experts.gate_up_proj",
        ),
    ],
)
def test_a_checkpoint_lacking_a_block_tensor_is_refused_before_calibrating(
    tmp_path, checkpoint, tokenizer, stored, named
):
    # One expert of a fused tensor missing was found at that block, after calibrating and
    # pruning the blocks before it.
    source = tmp_path / "lacking"
    if "experts" in stored:
        tiny_model("mixtral").save_pretrained(source, max_shard_size=SHARD)
        tokenizer.save_pretrained(source)
    else:
        shutil.copytree(checkpoint, source)
    index = json.loads((source / "model.safetensors.index.json").read_text())
    shard = source / index["weight_map"].pop(stored)
    save_file({k: v for k, v in load_file(shard).items() if k != stored}, shard)
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ria.streaming.UnreadableByBlockError, match=f"no tensor '{named}'"):
        ria.prune_checkpoint(source, tmp_path / "out", **CALIB)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lacking"]


def test_cli_low_memory(tmp_path, checkpoint, capsys):
    out = tmp_path / "out"
    common = ["prune", str(checkpoint), "--low-memory", "--no-progress", "--device", "cpu"]
    settings = ["--sparsity", "2:4", "--calibration", "austen", "--nsamples", "4", "--seqlen", "32"]
    assert main([*common, *settings, "--out", str(out), "--json", str(tmp_path / "r.json")]) == 0
    assert f"saved to {out}" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["sparsity"] == pytest.approx(0.5)
    for linear in pruned_linears(ria.load_pruned(out)).values():
        assert_nm(linear.weight, 2, 4)

    assert main([*common, *settings]) == 2
    assert "give --out DIR" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "o2"), "--eval", "austen"]) == 2
    assert "ria eval OUT" in capsys.readouterr().err
    assert main([*common, "--out", str(out)]) == 2  # exists, no --overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.json"]


# The child's own peak RSS: `ru_maxrss` also counts the parent's (pytest's) RSS, which
# Linux carries into a child across fork and exec, and can hide the child's growth.
PEAK = """
def peak():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
"""


def child_growth(code: str) -> int:
    """Run `code` (which prints `{"growth_bytes": ...}` last) in a fresh interpreter.

    glibc raises its mmap threshold after large blocks are freed, so later ones come from
    the heap and their pages stay resident after `free`: peak RSS then depends on what
    earlier work left behind (it moved this test's figures by 30 MiB between runs under
    load). A fixed threshold maps every block >= 128 KiB on its own and returns it when
    freed, so the peak follows the memory the prune actually holds."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    child = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300,
        env=env,
    )  # fmt: skip
    return int(json.loads(child.stdout.strip().splitlines()[-1])["growth_bytes"])


# The child prunes a tiny checkpoint first (so imports and first-use allocations are done),
# then the big one, and reports how much its peak RSS grew during the second prune.
# Magnitude pruning needs no calibration passes, which would only make the test slower.
PEAK_RSS_CHILD = (
    PEAK
    + """
import json, sys
import ria
settings = dict(sparsity=0.5, method="magnitude", progress=False, device="cpu")
ria.prune_checkpoint({warmup!r}, {warmup_out!r}, **settings)
before = peak()
ria.prune_checkpoint({src!r}, {out!r}, **settings)
after = peak()
print(json.dumps({{"growth_bytes": after - before}}))
"""
)


def test_peak_host_memory_stays_near_one_block(tmp_path, checkpoint):
    layers = 12
    config = tiny_config(
        "llama", hidden_size=512, intermediate_size=1536, num_hidden_layers=layers, head_dim=128
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "src")
    size = sum(f.stat().st_size for f in (tmp_path / "src").glob("*.safetensors"))
    block = size / layers
    code = PEAK_RSS_CHILD.format(
        warmup=str(checkpoint),
        warmup_out=str(tmp_path / "warmup"),
        src=str(tmp_path / "src"),
        out=str(tmp_path / "out"),
    )
    growth = child_growth(code)
    # An in-memory prune holds all 12 blocks; streaming holds one block, its float32
    # scores and masks, and its serialised copy while its shard is written.
    assert growth < 5 * block, f"peak RSS grew by {growth / block:.1f} blocks"
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()


OFFLOAD_RSS_CHILD = (
    PEAK
    + """
import json, sys
import torch
import ria
def settings(nsamples, seqlen):
    windows = torch.randint(0, 256, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    return dict(sparsity=0.5, progress=False, device="cpu", calibration=windows,
                nsamples=nsamples, seqlen=seqlen, batch_size=8)
ria.prune_checkpoint({src!r}, {warmup_out!r}, offload_activations={offload}, **settings(8, 16))
before = peak()
ria.prune_checkpoint({src!r}, {out!r}, offload_activations={offload},
                     **settings({nsamples}, {seqlen}))
after = peak()
print(json.dumps({{"growth_bytes": after - before}}))
"""
)


def test_offloading_keeps_the_activations_out_of_memory(tmp_path):
    # Activations of 256 x 64 tokens x 512 float32 channels are 32 MiB, 64 MiB while a
    # block's outputs are computed; a block is ~7 MiB, and short windows keep attention's
    # temporaries small. Offloaded, one batch (8 windows, 1 MiB) at a time is in memory.
    nsamples, seqlen, layers = 256, 64, 2
    config = tiny_config("llama", hidden_size=512, intermediate_size=512, num_hidden_layers=layers)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "src")
    activations = nsamples * seqlen * 512 * 4
    growth = {}
    for offload in (False, True):
        code = OFFLOAD_RSS_CHILD.format(
            nsamples=nsamples,
            seqlen=seqlen,
            warmup_out=str(tmp_path / f"warmup{offload}"),
            src=str(tmp_path / "src"),
            out=str(tmp_path / f"out{offload}"),
            offload=offload,
        )
        growth[offload] = child_growth(code)
    assert growth[True] < growth[False] - activations, growth
