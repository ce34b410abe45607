"""Nothing lost, nothing silently wrong: every bad input is refused with a `ria.errors`
class whose message names the argument, layer, file or key (one table row each), and the
stateful cases (a refused re-permutation, interrupted prunes and permutations, a killed
save, the CLI's outputs) leave the model and the disk as they were or complete."""

from __future__ import annotations

import copy
import gc
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import (
    FAST_SEARCH,
    kill_when_it_prints,
    logits,
    sample_text,
    tiny_model,
    traced_layouts,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ria
from ria.arch import attention_heads, block_linears, find_blocks
from ria.cli import main, run
from ria.errors import InputNotFoundError, InvalidArgumentError, InvalidTypeError
from ria.permutation import (
    BlockPermutation,
    ChannelGather,
    apply_block,
    apply_recorded_orders,
)
from ria.save import PERMUTATION_FILE

CALIB = dict(calibration="austen", nsamples=4, seqlen=32, progress=False)
IDS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
ORDER_KEY = "model.layers.0.input_layernorm"  # permute=True: folded, gathered norms


@pytest.fixture(scope="module")
def permuted_checkpoint(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama pruned 2:4 with permutation, saved (4 orders in PERMUTATION_FILE)."""
    model = tiny_model("llama")
    report = ria.prune(
        model, tokenizer, sparsity="2:4", permute=True, permutation_options=FAST_SEARCH, **CALIB
    )
    return ria.save_pruned(model, tmp_path_factory.mktemp("perm") / "ckpt", tokenizer, report)


class Env:
    """What a table row works on: a fresh tiny model, files under `tmp`, checkpoints."""

    def __init__(self, tmp: Path, tokenizer: Any, permuted: Path) -> None:
        self.tmp, self.tokenizer, self._permuted = tmp, tokenizer, permuted

    @cached_property
    def model(self) -> torch.nn.Module:
        return tiny_model("llama")

    @cached_property
    def checkpoint(self) -> Path:
        path = self.tmp / "tiny"
        tiny_model("qwen2").save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        return path

    def permuted_copy(self) -> Path:
        return Path(shutil.copytree(self._permuted, self.tmp / "permuted"))

    def directory(self, name: str, *files: str) -> Path:
        path = self.tmp / name
        path.mkdir(exist_ok=True)
        for f in files:
            (path / f).write_text("x")
        return path

    def argv(self, template: list[str]) -> list[str]:
        values = {"tmp": str(self.tmp), "missing": str(self.tmp / "missing-model")}
        if any("{ckpt}" in a for a in template):
            values["ckpt"] = str(self.checkpoint)
        if any("{file}" in a for a in template):
            (self.tmp / "file").write_text("x")
            values["file"] = str(self.tmp / "file")
        if any("{pytasks}" in a for a in template):
            values["pytasks"] = str(self.directory("tasks", "task.yaml", "utils.py"))
        if any("{foreign}" in a for a in template):
            values["foreign"] = str(self.directory("mine", "thesis.tex"))
        return [a.format(**values) for a in template]


@pytest.fixture
def env(tmp_path, tokenizer, permuted_checkpoint, monkeypatch) -> Env:
    monkeypatch.chdir(tmp_path)
    return Env(tmp_path, tokenizer, permuted_checkpoint)


# --- rows that need some setup ----------------------------------------------------------


def overwrite_foreign_directory(e: Env) -> None:
    ria.save_pruned(e.model, e.directory("mine", "thesis.tex"), overwrite=True)


def tamper_orders(change: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Env], Any]:
    def row(e: Env) -> Any:
        path = e.permuted_copy()
        orders = load_file(path / PERMUTATION_FILE)
        with safe_open(path / PERMUTATION_FILE, "pt") as f:
            metadata = f.metadata()  # how each order is applied: kept as it was
        orders[ORDER_KEY] = change(orders[ORDER_KEY])
        save_file(orders, path / PERMUTATION_FILE, metadata=metadata)
        return ria.load_pruned(path)

    return row


def tamper_records(change: Callable[[dict[str, str]], dict[str, str]]) -> Callable[[Env], Any]:
    """Changes the file's metadata: how each order is applied."""

    def row(e: Env) -> Any:
        path = e.permuted_copy()
        orders = load_file(path / PERMUTATION_FILE)
        with safe_open(path / PERMUTATION_FILE, "pt") as f:
            metadata = f.metadata()
        save_file(orders, path / PERMUTATION_FILE, metadata=change(metadata))
        return ria.load_pruned(path)

    return row


def drop_orders(e: Env) -> Any:
    path = e.permuted_copy()
    (path / PERMUTATION_FILE).unlink()
    return ria.load_pruned(path)


def bad_weight(value: float, method: str) -> Callable[[Env], Any]:
    def row(e: Env) -> Any:
        e.model.model.layers[1].mlp.down_proj.weight.data[3, 5] = value
        return ria.prune(e.model, e.tokenizer, sparsity="2:4", method=method, **CALIB)

    return row


def inf_embedding(e: Env) -> Any:
    e.model.model.embed_tokens.weight.data[:] = float("inf")
    return ria.prune(e.model, e.tokenizer, sparsity=0.5, **CALIB)


def nan_logits(e: Env) -> Any:
    e.model.lm_head.weight.data[0, 0] = float("nan")
    return ria.eval.perplexity(
        e.model, e.tokenizer, sample_text(), seqlen=16, max_windows=3, progress=False
    )


def ppl(**kwargs: Any) -> Callable[[Env], Any]:
    settings = {"seqlen": 16, "max_windows": 2, "progress": False, **kwargs}
    return lambda e: ria.eval.perplexity(e.model, e.tokenizer, sample_text(), **settings)


def zero_shot(**kwargs: Any) -> Callable[[Env], Any]:
    return lambda e: ria.eval.zero_shot(e.model, e.tokenizer, ["t"], **kwargs)


def python_task_dir(e: Env) -> Any:
    tasks = e.directory("tasks", "task.yaml", "utils.py")
    return ria.eval.zero_shot(e.model, e.tokenizer, ["t"], task_dir=tasks)


@dataclass
class Bad:
    id: str
    call: Callable[[Env], Any] | list[str]  # a callable, or CLI argv ({tmp}, {ckpt}, ...)
    error: type[Exception]
    message: str  # a regular expression the message must contain


NOT_PERMUTATION = rf"{PERMUTATION_FILE}: order '{ORDER_KEY}' is not a permutation"

TABLE = [
    # overwrite replaces only an earlier ria checkpoint, never the current directory
    Bad("save-overwrite-foreign", overwrite_foreign_directory, InvalidArgumentError,
        "not a checkpoint written by ria"),
    Bad("cli-out-foreign", ["prune", "{missing}", "--out", "{foreign}", "--overwrite"],
        InvalidArgumentError, "not a checkpoint written by ria"),
    Bad("cli-out-cwd", ["prune", "{missing}", "--out", "{tmp}", "--overwrite"],
        InvalidArgumentError, "current directory"),
    Bad("cli-out-dot", ["prune", "{missing}", "--out", ".", "--overwrite"],
        InvalidArgumentError, "current directory"),
    # the saved channel orders are checked; errors name the file and the key
    Bad("orders-duplicate", tamper_orders(lambda o: torch.cat([o[:1], o[:-1]])),
        InvalidArgumentError, NOT_PERMUTATION),
    Bad("orders-short", tamper_orders(lambda o: o[:-1]), InvalidArgumentError, NOT_PERMUTATION),
    Bad("orders-doubled", tamper_orders(lambda o: torch.cat([o, o])), InvalidArgumentError,
        NOT_PERMUTATION),
    Bad("orders-float", tamper_orders(lambda o: o.float()), InvalidArgumentError,
        rf"{PERMUTATION_FILE}: order '{ORDER_KEY}' must be a 1-D integer tensor"),
    Bad("orders-missing", drop_orders, InvalidArgumentError, f"{PERMUTATION_FILE} is missing"),
    Bad("orders-no-record", tamper_records(lambda m: {}), InvalidArgumentError,
        rf"{PERMUTATION_FILE}: order '{ORDER_KEY}': no record of the modules it reorders"),
    Bad("orders-bad-record", tamper_records(lambda m: {**m, ORDER_KEY: "{}"}),
        InvalidArgumentError, rf"{PERMUTATION_FILE}: order '{ORDER_KEY}': invalid record"),
    # non-finite numbers are refused, naming the layer / window and the cause
    Bad("prune-nan-weight", bad_weight(float("nan"), "magnitude"), InvalidArgumentError,
        r"model\.layers\.1\.mlp\.down_proj: weight contains NaN at \(3, 5\)"),
    Bad("prune-inf-weight", bad_weight(float("inf"), "ria"), InvalidArgumentError,
        r"model\.layers\.1\.mlp\.down_proj: weight contains inf at \(3, 5\)"),
    Bad("prune-inf-activation", inf_embedding, InvalidArgumentError,
        r"model\.layers\.0\.self_attn\.q_proj: its input activations .* NaN or inf .* bfloat16"),
    Bad("ppl-nan-logits", nan_logits, InvalidArgumentError,
        "logits are not finite on evaluation window 0"),
    # mask refinement needs the Gram matrix X^T X, not any square matrix
    Bad("refine-gram-not-gram", lambda e: ria.refine_mask(
        torch.ones(4, 8), torch.arange(64.0).reshape(8, 8), np.ones((4, 8), bool)),
        InvalidArgumentError, r"gram is not symmetric: gram\[0, 1\] = 1 but gram\[1, 0\] = 8"),
    # types: a bool is not a number, a float is not a count
    Bad("ppl-seqlen-bool", ppl(seqlen=True), InvalidTypeError, "seqlen must be an integer"),
    Bad("ppl-batch-bool", ppl(batch_size=True), InvalidTypeError, "batch_size must be an integer"),
    Bad("ppl-windows-float", ppl(max_windows=2.0), InvalidTypeError, "max_windows must be an"),
    Bad("ppl-progress-str", ppl(progress="no"), InvalidTypeError, "progress must be True or"),
    Bad("prune-nsamples-float", lambda e: ria.prune(e.model, e.tokenizer, nsamples=4.0),
        InvalidTypeError, "nsamples must be an integer"),
    Bad("prune-seqlen-bool", lambda e: ria.prune(e.model, e.tokenizer, seqlen=True),
        InvalidTypeError, "seqlen must be an integer"),
    Bad("save-path-int", lambda e: ria.save_pruned(e.model, 123), InvalidTypeError,
        "out_dir must be a str or a path"),
    Bad("save-path-empty", lambda e: ria.save_pruned(e.model, ""), InvalidArgumentError,
        "out_dir is empty"),
    Bad("save-overwrite-str", lambda e: ria.save_pruned(e.model, "x", overwrite="no"),
        InvalidTypeError, "overwrite must be True or False"),
    Bad("load-missing-dir", lambda e: ria.load_pruned(e.tmp / "nope"), InvalidArgumentError,
        "nope is not a directory; load_pruned reads a directory"),
    Bad("calibration-mistyped-path",
        lambda e: ria.prune(e.model, e.tokenizer, calibration=f"{e.tmp}/my calib.txt"),
        InputNotFoundError, "no such text file or directory: .*my calib.txt"),
    Bad("calibration-missing-file",
        lambda e: ria.prune(e.model, e.tokenizer, calibration=e.tmp / "nope.txt", progress=False),
        InputNotFoundError, "no such text file: .*nope.txt"),
    Bad("zero-shot-limit-bool", zero_shot(limit=True), InvalidTypeError, "limit must be"),
    Bad("zero-shot-batch-zero", zero_shot(batch_size=0), InvalidArgumentError,
        "batch_size must be >= 1"),
    # lm-eval runs Python from a task directory only when told to
    Bad("zero-shot-python-tasks", python_task_dir, InvalidArgumentError,
        r"holds Python files \(utils\.py\).*trust_task_code=True"),
    Bad("cli-python-tasks", ["eval", "{missing}", "--zero-shot", "t", "--task-dir", "{pytasks}"],
        InvalidArgumentError, r"holds Python files .*--trust-task-code"),
    Bad("cli-trusted-tasks",
        ["eval", "{missing}", "--zero-shot", "t", "--task-dir", "{pytasks}", "--trust-task-code"],
        InvalidArgumentError, "missing-model' does not exist"),
    # CLI: a mistyped local model path is an error, not a Hub lookup
    Bad("cli-model-dot-path", ["prune", "./no-such-model"], InvalidArgumentError,
        r"model '\./no-such-model' does not exist"),
    Bad("cli-model-home-path", ["eval", "~/no-such-model", "--ppl", "austen"],
        InvalidArgumentError, r"model '~/no-such-model' does not exist"),
    Bad("cli-model-nested-path", ["prune", "models/tiny/v2"], InvalidArgumentError,
        "model 'models/tiny/v2' does not exist"),
    # CLI: every setting and output is checked before the model loads (the model here
    # does not exist, so its error would win otherwise)
    Bad("cli-sparsity-first", ["prune", "{missing}", "--sparsity", "3/4"], InvalidArgumentError,
        "bad sparsity '3/4'"),
    Bad("cli-nsamples-zero", ["prune", "{missing}", "--nsamples", "0"], InvalidArgumentError,
        "nsamples must be >= 1"),
    Bad("cli-seqlen-zero", ["prune", "{missing}", "--seqlen", "0"], InvalidArgumentError,
        "seqlen must be >= 1"),
    Bad("cli-eval-seqlen", ["prune", "{missing}", "--eval", "austen", "--eval-seqlen", "1"],
        InvalidArgumentError, "seqlen must be >= 2"),
    Bad("cli-prune-windows", ["prune", "{missing}", "--eval", "austen", "--max-windows", "0"],
        InvalidArgumentError, "max_windows must be >= 1"),
    Bad("cli-eval-seqlen-one", ["eval", "{missing}", "--ppl", "austen", "--seqlen", "1"],
        InvalidArgumentError, "seqlen must be >= 2"),
    Bad("cli-eval-limit", ["eval", "{missing}", "--zero-shot", "t", "--limit", "0"],
        InvalidArgumentError, "limit must be >= 1"),
    Bad("cli-out-empty", ["prune", "{missing}", "--out", ""], InvalidArgumentError,
        "--out is empty"),
    Bad("cli-out-under-file", ["prune", "{missing}", "--out", "{file}/pruned"],
        InvalidArgumentError, "file is not a directory"),
    Bad("cli-nothing-kept", ["prune", "{ckpt}", "--sparsity", "2:4"], InvalidArgumentError,
        "nothing of the prune would be kept: give --out DIR"),
    Bad("cli-eval-flags-alone", ["prune", "{missing}", "--max-windows", "5"],
        InvalidArgumentError, "--max-windows sets the --eval perplexity; add --eval DATA"),
    Bad("cli-json-no-dir", ["prune", "{missing}", "--json", "{tmp}/no-dir/r.json"],
        InvalidArgumentError, "cannot write the JSON report"),
    Bad("cli-eval-json-dir", ["eval", "{missing}", "--ppl", "austen", "--json", "{tmp}"],
        InvalidArgumentError, "cannot write the JSON report"),
]  # fmt: skip


@pytest.mark.parametrize("bad", TABLE, ids=[b.id for b in TABLE])
def test_bad_input_is_refused_with_a_named_error(env, bad, capsys):
    with pytest.raises(bad.error, match=bad.message):
        if isinstance(bad.call, list):
            run(env.argv(bad.call))
        else:
            bad.call(env)
    if isinstance(bad.call, list):  # the CLI prints one line, no traceback, exit code 2
        capsys.readouterr()
        assert main(env.argv(bad.call)) == 2
        err = capsys.readouterr().err
        assert err.startswith("ria: error: ") and "Traceback" not in err


def test_numpy_integers_are_numbers():
    model = tiny_model("llama")
    plain = ria.eval.perplexity(model, None, torch.arange(64) % 512, seqlen=16, progress=False)
    numpy = ria.eval.perplexity(
        model,
        None,
        torch.arange(64) % 512,
        seqlen=np.int64(16),
        batch_size=np.int32(2),
        max_windows=np.int64(4),
        progress=False,
    )
    assert numpy == pytest.approx(plain)


# --- a refused second permutation changes nothing ---------------------------------------


def prune_4of8(model, tokenizer) -> Any:
    return ria.prune(
        model, tokenizer, sparsity="4:8", permute=True, permutation_options=FAST_SEARCH, **CALIB
    )


def assert_second_permutation_refused(model, tokenizer, second: str) -> None:
    before = logits(model, IDS)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InvalidArgumentError, match="already permuted"):
        ria.prune(
            model, tokenizer, sparsity=second, permute=True, permutation_options=FAST_SEARCH,
            **CALIB,
        )  # fmt: skip
    torch.testing.assert_close(logits(model, IDS), before, rtol=0, atol=0)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert model.config.ria.get("status") != "incomplete"


# 2:4 after 4:8 needs new orders (a search on 4:8 masks finds them); a re-run cell with
# the same pattern finds the identity, which hid the defect.
@pytest.mark.parametrize("second", ["2:4", "4:8"])
def test_a_refused_second_permutation_leaves_the_model_unchanged(tokenizer, second):
    model = tiny_model("llama")
    prune_4of8(model, tokenizer)
    assert_second_permutation_refused(model, tokenizer, second)


def test_a_loaded_permuted_model_is_not_permuted_again(tokenizer, tmp_path):
    model = tiny_model("llama")
    report = prune_4of8(model, tokenizer)
    loaded = ria.load_pruned(ria.save_pruned(model, tmp_path / "ckpt", tokenizer, report))
    assert_second_permutation_refused(loaded, tokenizer, "2:4")


@pytest.mark.parametrize("mode, carrier", [("free", "q_proj"), ("folded", "input_layernorm")])
def test_nm_pruning_a_permuted_model_without_permutation_is_refused(tokenizer, mode, carrier):
    # Its weights are N:M along recorded orders (a Linear's own, or its group's on the
    # norm): N:M masks along the plain columns would leave them N:M in neither (sparsify
    # would then keep every layer dense).
    model = tiny_model("llama")
    ria.prune(
        model, tokenizer, sparsity="2:4", permute=mode, permutation_options=FAST_SEARCH,
        **CALIB,
    )  # fmt: skip
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InvalidArgumentError, match=rf"{carrier} carries a channel order"):
        ria.prune(model, tokenizer, sparsity="2:4", **CALIB)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    ria.prune(model, tokenizer, sparsity=0.6, **CALIB)  # unstructured: any column order


class _Packed(torch.Tensor):
    """A tensor subclass, as quantization libraries' packed weights are (optimum-quanto's:
    index_select dequantizes, and an assignment to .data is dropped)."""


def test_recorded_orders_refuse_a_weight_they_cannot_reorder(tokenizer):
    model = tiny_model("llama")
    ria.prune(
        model, tokenizer, sparsity="2:4", permute="folded", permutation_options=FAST_SEARCH,
        **CALIB,
    )  # fmt: skip
    k = model.model.layers[1].self_attn.k_proj
    packed = torch.Tensor._make_subclass(_Packed, k.weight.data)
    k.weight = torch.nn.Parameter(packed, requires_grad=False)  # (as quantizers install theirs)
    before = logits(model, IDS)
    with pytest.raises(ria.UnsupportedModelError, match=r"k_proj\.weight is a _Packed"):
        apply_recorded_orders(model)
    torch.testing.assert_close(logits(model, IDS), before, rtol=0, atol=0)  # nothing changed


@pytest.mark.parametrize("how", ["config", "fp8 weight", "int8 weight"])
def test_a_quantized_model_is_refused_before_anything_changes(tokenizer, how):
    # Its stored numbers are not its weights (packs, fp8 with block scales): pruned as
    # numbers, with a success report.
    model = tiny_model("llama")
    down = model.model.layers[1].mlp.down_proj
    if how == "config":  # how transformers marks GPTQ, AWQ, bitsandbytes, fp8 checkpoints
        model.config.quantization_config = {"quant_method": "gptq", "bits": 4}
        match = r"quantized \(gptq\)"
    else:
        dtype = torch.float8_e4m3fn if how == "fp8 weight" else torch.int8
        down.weight = torch.nn.Parameter(down.weight.data.to(dtype), requires_grad=False)
        match = rf"model\.layers\.1\.mlp\.down_proj holds {dtype}"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ria.UnsupportedModelError, match=match):
        ria.prune(model, tokenizer, sparsity="2:4", nsamples=2, seqlen=16, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_quantized_checkpoint_is_refused_by_the_streaming_prune(tmp_path, tokenizer):
    source = tmp_path / "quantized"
    model = tiny_model("llama")
    model.config.quantization_config = {"quant_method": "fp8", "weight_block_size": [8, 8]}
    model.save_pretrained(source)
    with pytest.raises(ria.UnsupportedModelError, match=r"quantized \(fp8\)"):
        ria.prune_checkpoint(source, tmp_path / "out", tokenizer=tokenizer, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quantized"]


# --- an interrupted prune is marked, and not saved --------------------------------------


@pytest.mark.parametrize("failure", [RuntimeError("boom"), KeyboardInterrupt()])
def test_a_prune_that_fails_midway_is_marked_and_not_saved(
    tokenizer, tmp_path, monkeypatch, failure
):
    from ria.pruning import pipeline

    model = tiny_model("llama")
    real, calls = pipeline.score_matrix, []

    def failing_in_block_1(linear, stats, config):
        calls.append(linear)
        if len(calls) > 7:  # a Llama block has 7 Linears
            raise failure
        return real(linear, stats, config)

    monkeypatch.setattr(pipeline, "score_matrix", failing_in_block_1)
    with pytest.raises(type(failure)):
        ria.prune(model, tokenizer, sparsity="2:4", **CALIB)
    assert model.config.ria["status"] == "incomplete"
    with pytest.raises(InvalidArgumentError, match="only partly pruned"):
        ria.save_pruned(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# --- Ctrl-C anywhere inside a block's permutation ---------------------------------------


def random_permutation(model) -> BlockPermutation:
    g = torch.Generator().manual_seed(1)
    heads = attention_heads(model)
    return BlockPermutation(
        shared={
            "input_layernorm": torch.randperm(64, generator=g),
            "post_attention_layernorm": torch.randperm(64, generator=g),
        },
        heads={
            "self_attn.o_proj": torch.stack(
                [torch.randperm(heads.head_dim, generator=g) for _ in range(heads.num_kv_heads)]
            )
        },
        hidden={"mlp.down_proj": torch.randperm(128, generator=g)},
    )


def interrupt_at_line(k: int, files: tuple[str, ...], body: Callable[[], None]) -> int:
    """Runs `body`, sending SIGINT to this process at the k-th line executed in `files`;
    returns how many such lines ran (so k beyond it sends nothing)."""
    seen = 0

    def local(frame, event, _arg):
        nonlocal seen
        if event == "line":
            seen += 1
            if seen == k:
                os.kill(os.getpid(), signal.SIGINT)
        return local

    def tracer(frame, _event, _arg):
        return local if frame.f_code.co_filename.startswith(files) else None

    # A garbage collection inside `body` can run other objects' clean-up in ria's files
    # (an abandoned generator's `finally` from an earlier test), so the lines counted
    # would differ from call to call: collect first, and not during the call.
    gc.collect()
    gc.disable()
    # A process started with SIGINT ignored (a background job of a non-interactive shell)
    # would drop the simulated Ctrl-C: use Python's own handler for the call.
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.settrace(tracer)
    try:
        body()
    finally:
        sys.settrace(None)
        signal.signal(signal.SIGINT, handler)
        gc.enable()
    return seen


def test_ctrl_c_anywhere_in_apply_block_leaves_the_block_whole():
    """Whenever Ctrl-C arrives, the block's orders are applied either completely or not at
    all (the permutation alone keeps the function: test_prune.py), never in between."""
    files = (str(Path(ria.__file__).parent),)  # every line of ria that apply_block runs
    model = tiny_model("llama")
    layout, perm = traced_layouts(model)[0], random_permutation(model)
    dense = find_blocks(model)[1][0]

    def weights(block: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {
            name: linear.weight.detach().clone() for name, linear in block_linears(block).items()
        }

    def gathers(block: torch.nn.Module) -> int:
        return sum(isinstance(m, ChannelGather) for m in block.modules())

    done = copy.deepcopy(dense)
    lines = interrupt_at_line(0, files, lambda: apply_block(done, layout, perm))
    assert lines > 20 and gathers(done) == 2
    expected = {0: weights(dense), 2: weights(done)}
    for k in range(1, lines + 1):
        block = copy.deepcopy(dense)
        try:
            with pytest.raises(KeyboardInterrupt):
                interrupt_at_line(k, files, lambda b=block: apply_block(b, layout, perm))
        finally:
            sys.settrace(None)  # in case the interrupt came before interrupt_at_line's own
        n = gathers(block)
        assert n in expected, f"Ctrl-C at line {k}: {n} of 2 norms gathered"
        got = weights(block)
        changed = [name for name, w in expected[n].items() if not torch.equal(got[name], w)]
        assert not changed, f"Ctrl-C at line {k}: {n} gathers but {changed} half permuted"


# --- a killed save leaves nothing at the target, and the next save cleans up -------------

KILLED_SAVE = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    import ria
    from helpers import tiny_model

    class Stalling:  # a report whose writing never ends
        def to_json(self, path):
            print("saving", flush=True)
            time.sleep(600)

    ria.save_pruned(tiny_model("llama"), {out!r}, report=Stalling())
    """
)


def test_a_killed_save_leaves_nothing_and_the_next_save_cleans_up(tmp_path):
    out = tmp_path / "out"
    kill_when_it_prints(
        KILLED_SAVE.format(tests=str(Path(__file__).parent), out=str(out)), "saving"
    )
    assert not out.exists()
    staged = [p for p in tmp_path.iterdir() if p.name.startswith(".out.incomplete-")]
    assert len(staged) == 1 and (staged[0] / "config.json").exists()
    # A staging directory whose writer is alive (pid 1 always is) is left alone, and so is
    # one another host wrote on a shared filesystem: its pid means nothing here.
    alive = tmp_path / ".out.incomplete-1-0123abcd"
    alive.mkdir()
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    elsewhere = tmp_path / f".out.incomplete-other_host-{finished.pid}-0123abcd"
    elsewhere.mkdir()
    host = staged[0].name.removeprefix(".out.incomplete-").rsplit("-", 2)[0]
    (tmp_path / f".out.incomplete-{host}-{finished.pid}-4567abcd").mkdir()  # this host's: gone

    ria.save_pruned(tiny_model("llama"), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, elsewhere.name, "out"]


# --- the CLI never discards a finished prune --------------------------------------------


def test_cli_writes_both_the_checkpoint_and_the_json(env, capsys):
    out, report = env.tmp / "pruned", env.tmp / "sub" / "report.json"
    report.parent.mkdir()
    argv = ["prune", str(env.checkpoint), "--sparsity", "2:4", "--calibration", "austen",
            "--nsamples", "2", "--seqlen", "16", "--no-progress",
            "--out", str(out), "--json", str(report)]  # fmt: skip
    assert main(argv) == 0
    assert (out / "config.json").exists() and report.exists()
    assert f"saved to {out}" in capsys.readouterr().out


def test_cli_writes_the_json_where_it_checked_it(env, monkeypatch):
    """`--json=~/r.json` reaches ria unexpanded (the shell leaves `~` after `=`)."""
    monkeypatch.setenv("HOME", str(env.tmp / "home"))
    (env.tmp / "home").mkdir()
    monkeypatch.chdir(env.tmp)
    argv = ["prune", str(env.checkpoint), "--sparsity", "2:4", "--method", "magnitude",
            "--no-progress", "--json=~/r.json"]  # fmt: skip
    assert main(argv) == 0
    assert (env.tmp / "home" / "r.json").exists() and not (env.tmp / "~").exists()
