"""Perplexity (SparseGPT/Wanda/RIA protocol) and the lm-evaluation-harness wrapper, offline:
tiny random models, the tokenizer trained on the shipped sample, and a multiple-choice task
built from that sample at test time."""

from __future__ import annotations

import copy
import json
import math
import random
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import VOCAB, sample_text, tiny_model

import ria
import ria.cli
import ria.eval
from ria.data import load_documents
from ria.errors import InvalidArgumentError, InvalidTypeError
from ria.eval import perplexity, zero_shot
from ria.pruning import calibration_windows

SEQLEN = 128


@pytest.fixture(scope="module")
def text() -> str:
    """The first ~1000 tokens' worth of the sample (about 4 characters per token)."""
    return sample_text()[:6000]


@pytest.fixture(scope="module")
def ids(tokenizer, text) -> torch.Tensor:
    """Token ids of `text`, shape (n_tokens,), with n_tokens > 8 * SEQLEN."""
    out = tokenizer(text, return_tensors="pt")["input_ids"][0]
    assert out.numel() > 8 * SEQLEN
    return out


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return tiny_model("llama")


def reference_ppl(model: torch.nn.Module, ids: torch.Tensor, seqlen: int, n_windows: int) -> float:
    """The protocol written out: one window at a time, log_softmax, the seqlen - 1 shifted
    targets of each window, fp64 mean over all predicted tokens."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(n_windows):
            window = ids[w * seqlen : (w + 1) * seqlen]
            logprobs = torch.log_softmax(model(window[None]).logits[0].double(), dim=-1)
            for pos in range(seqlen - 1):
                total -= logprobs[pos, window[pos + 1]].item()
                count += 1
    return math.exp(total / count)


@contextmanager
def forward_shapes(model: torch.nn.Module):
    """Collects the (batch, seqlen) shape of every forward call of `model`."""
    shapes: list[tuple[int, ...]] = []
    handle = model.register_forward_hook(
        lambda m, args, kw, out: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    try:
        yield shapes
    finally:
        handle.remove()


# --------------------------------------------------------------------------- perplexity


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_perplexity_equals_hand_computed_nll(family, tokenizer, text, ids):
    model = tiny_model(family)
    n_windows = ids.numel() // SEQLEN
    expected = reference_ppl(model, ids, SEQLEN, n_windows)
    got = perplexity(model, tokenizer, text, seqlen=SEQLEN, progress=False)
    assert got == pytest.approx(expected, rel=1e-5)
    # A random model over a 512-token vocabulary: near-uniform, far from a trained model.
    assert 0.5 * VOCAB < got < 2 * VOCAB


def test_windows_and_remainder(llama, ids):
    stream = ids[:1000]  # 7 windows of 128 tokens and a remainder of 104
    with forward_shapes(llama) as shapes:
        base = perplexity(llama, None, stream, seqlen=SEQLEN, progress=False)
    assert shapes == [(1, SEQLEN)] * 7
    assert base == pytest.approx(reference_ppl(llama, stream, SEQLEN, 7), rel=1e-5)

    garbage = torch.randint(0, VOCAB, (SEQLEN - 1,), generator=torch.Generator().manual_seed(1))
    exact = perplexity(llama, None, stream[: 7 * SEQLEN], seqlen=SEQLEN, progress=False)
    padded = perplexity(
        llama, None, torch.cat([stream[: 7 * SEQLEN], garbage]), seqlen=SEQLEN, progress=False
    )
    assert base == exact == padded
    # One more full window does count.
    eight = perplexity(llama, None, ids[: 8 * SEQLEN], seqlen=SEQLEN, progress=False)
    assert eight != pytest.approx(base, rel=1e-6)


def test_max_windows(llama, ids):
    first3 = perplexity(llama, None, ids, seqlen=SEQLEN, max_windows=3, progress=False)
    assert first3 == pytest.approx(reference_ppl(llama, ids, SEQLEN, 3), rel=1e-5)
    assert first3 == perplexity(llama, None, ids[: 3 * SEQLEN], seqlen=SEQLEN, progress=False)
    everything = perplexity(llama, None, ids, seqlen=SEQLEN, progress=False)
    assert perplexity(llama, None, ids, seqlen=SEQLEN, max_windows=10**6, progress=False) == (
        everything
    )
    assert first3 != pytest.approx(everything, rel=1e-6)


def test_batch_size_does_not_change_the_result(llama, ids):
    one = perplexity(llama, None, ids[:1000], seqlen=SEQLEN, batch_size=1, progress=False)
    with forward_shapes(llama) as shapes:
        three = perplexity(llama, None, ids[:1000], seqlen=SEQLEN, batch_size=3, progress=True)
    assert shapes == [(3, SEQLEN), (3, SEQLEN), (1, SEQLEN)]
    assert three == pytest.approx(one, rel=1e-5)


def test_token_ids_and_files_equal_text(llama, tokenizer, text, ids, tmp_path):
    from_text = perplexity(llama, tokenizer, text, seqlen=SEQLEN, progress=False)
    assert perplexity(llama, None, ids, seqlen=SEQLEN, progress=False) == from_text
    assert perplexity(llama, tokenizer, ids[None], seqlen=SEQLEN, progress=False) == from_text
    path = tmp_path / "eval.txt"
    path.write_text(text, encoding="utf-8")
    assert perplexity(llama, tokenizer, str(path), seqlen=SEQLEN, progress=False) == from_text
    assert perplexity(llama, tokenizer, path, seqlen=SEQLEN, progress=False) == from_text


def test_documents_are_joined_with_blank_lines(llama, tokenizer, text):
    docs = text.split("\n\n")
    assert len(docs) > 3
    joined = perplexity(llama, tokenizer, docs, seqlen=SEQLEN, progress=False)
    assert joined == perplexity(llama, tokenizer, text, seqlen=SEQLEN, progress=False)


def test_training_mode_restored(tokenizer, text):
    model = tiny_model("llama", attention_dropout=0.5)
    model.train()
    first = perplexity(model, tokenizer, text, seqlen=SEQLEN, max_windows=2, progress=False)
    assert model.training
    # Evaluated in eval mode: dropout off, so two runs agree.
    assert first == perplexity(model, tokenizer, text, seqlen=SEQLEN, max_windows=2, progress=False)
    model.eval()
    perplexity(model, tokenizer, text, seqlen=SEQLEN, max_windows=1, progress=False)
    assert not model.training


def test_wikitext2_protocol(llama, tokenizer, text, monkeypatch):
    calls = []
    lines = text.split("\n\n")

    def fake_load(source, split):
        calls.append((source, split))
        return lines

    monkeypatch.setattr(ria.eval, "load_documents", fake_load)
    got = perplexity(llama, tokenizer, "wikitext2", seqlen=SEQLEN, progress=False)
    assert calls == [("wikitext2", "test")]
    ids = tokenizer("\n\n".join(lines), return_tensors="pt")["input_ids"]
    assert got == perplexity(llama, None, ids, seqlen=SEQLEN, progress=False)


def test_a_dataset_keeps_its_empty_rows_as_the_named_datasets_do():
    """WikiText-2's rows include empty lines and the protocol joins them all (the named
    dataset keeps them): the same rows given as a `datasets.Dataset` or a list read the same."""
    import datasets

    rows = ["", " = Title = ", "", "Some text.", ""]
    assert load_documents(datasets.Dataset.from_dict({"text": rows}), "test") == rows
    assert load_documents(rows, "test") == rows


def test_c4_protocol(llama, tokenizer, monkeypatch):
    """SparseGPT's C4 validation: first 1100 documents joined with " ", 256 * seqlen tokens."""
    seqlen = 4
    docs = [f"Document number {i} says hello." for i in range(1200)]
    calls = []

    def fake_load(source, split):
        calls.append((source, split))
        return docs

    monkeypatch.setattr(ria.eval, "load_documents", fake_load)
    with forward_shapes(llama) as shapes:
        got = perplexity(llama, tokenizer, "c4", seqlen=seqlen, batch_size=64, progress=False)
    assert calls == [("c4", "test")]
    assert shapes == [(64, seqlen)] * 4  # 256 windows
    ids = tokenizer(" ".join(docs[:1100]), return_tensors="pt")["input_ids"][0]
    assert ids.numel() > 256 * seqlen
    expected = perplexity(llama, None, ids[: 256 * seqlen], seqlen=seqlen, progress=False)
    assert got == pytest.approx(expected, rel=1e-6)


def test_errors(llama, tokenizer, text, ids):
    with pytest.raises(ValueError, match="wikitext3"):
        perplexity(llama, tokenizer, "wikitext3", seqlen=SEQLEN, progress=False)
    short = "It was a truth universally acknowledged."
    n_short = tokenizer(short, return_tensors="pt")["input_ids"].numel()
    with pytest.raises(ValueError, match=rf"has {n_short} tokens.*seqlen={SEQLEN}"):
        perplexity(llama, tokenizer, short, seqlen=SEQLEN, progress=False)
    with pytest.raises(ValueError, match="seqlen"):
        perplexity(llama, tokenizer, text, seqlen=1, progress=False)
    for bad in (0, -2):
        with pytest.raises(ValueError, match="batch_size"):
            perplexity(llama, tokenizer, text, seqlen=SEQLEN, batch_size=bad, progress=False)
    with pytest.raises(TypeError, match="batch_size"):
        perplexity(llama, tokenizer, text, seqlen=SEQLEN, batch_size=1.5, progress=False)
    with pytest.raises(ValueError, match="max_windows"):
        perplexity(llama, tokenizer, text, seqlen=SEQLEN, max_windows=0, progress=False)
    with pytest.raises(TypeError, match="tokenizer"):
        perplexity(llama, None, text, seqlen=SEQLEN, progress=False)
    with pytest.raises(ValueError, match="vocabulary"):
        perplexity(llama, None, ids + VOCAB, seqlen=SEQLEN, progress=False)
    with pytest.raises(TypeError, match="integer"):
        perplexity(llama, None, ids.float(), seqlen=SEQLEN, progress=False)


def test_padded_token_ids_are_refused(llama, tokenizer, text, ids):
    # A padded batch: its rows would be joined with their padding scored as text.
    docs = [d for d in text.split("\n\n") if d.strip()][:8]
    padded = tokenizer(docs, padding=True, return_tensors="pt").input_ids
    assert (padded == tokenizer.pad_token_id).any()
    with pytest.raises(InvalidArgumentError, match=r"look padded.*unpadded ids as one stream"):
        perplexity(llama, tokenizer, padded, seqlen=SEQLEN, progress=False)
    windows = tokenizer(
        docs, padding="max_length", max_length=SEQLEN, truncation=True, return_tensors="pt"
    ).input_ids
    with pytest.raises(InvalidArgumentError, match="look padded"):
        calibration_windows(windows, tokenizer, len(docs), SEQLEN)
    # Unpadded inputs pass: a (1, n) tokenizer output, a stream, windows cut from a stream.
    one_row = tokenizer(text, return_tensors="pt").input_ids
    assert perplexity(llama, tokenizer, one_row, seqlen=SEQLEN, progress=False) == perplexity(
        llama, tokenizer, ids, seqlen=SEQLEN, progress=False
    )
    cut = ids[: 4 * SEQLEN].view(4, SEQLEN)
    perplexity(llama, tokenizer, cut, seqlen=SEQLEN, progress=False)
    assert torch.equal(calibration_windows(cut, tokenizer, 4, SEQLEN), cut)


def test_seqlen_beyond_the_model_context_is_refused_before_any_forward(tokenizer, text):
    # OPT's positions are learned (an IndexError past them); LLaMA's RoPE would compute on.
    for family in ("opt", "llama"):
        model = tiny_model(family)
        context = model.config.max_position_embeddings
        with (
            forward_shapes(model) as shapes,
            pytest.raises(InvalidArgumentError, match=rf"seqlen={2 * context}.*{context} tokens"),
        ):
            perplexity(model, tokenizer, text * 3, seqlen=2 * context, progress=False)
        with pytest.raises(InvalidArgumentError, match=rf"seqlen={2 * context}.*{context} tokens"):
            ria.prune(
                model, tokenizer, sparsity=0.5, method="wanda", calibration=text * 3,
                nsamples=2, seqlen=2 * context, progress=False,
            )  # fmt: skip
        assert shapes == []


def test_cli_default_seqlen_is_capped_at_the_model_context(tokenizer, tmp_path, capsys):
    path = tmp_path / "opt"
    tiny_model("opt").save_pretrained(path)  # learned positions, 512 of them
    tokenizer.save_pretrained(path)
    args = ["eval", str(path), "--ppl", "austen", "--max-windows", "1", "--device", "cpu"]
    assert ria.cli.main([*args, "--no-progress"]) == 0
    assert "seqlen 512)" in capsys.readouterr().out
    assert ria.cli.main([*args, "--seqlen", "1024"]) == 2  # the user's own is not capped
    assert "seqlen=1024 is longer than the model's context of 512" in capsys.readouterr().err
    report = tmp_path / "report.json"
    prune = ["prune", str(path), "--method", "wanda", "--calibration", "austen"]
    code = ria.cli.main(
        [*prune, "--nsamples", "1", "--json", str(report), "--device", "cpu", "--no-progress"]
    )
    assert code == 0
    assert json.loads(report.read_text())["settings"]["seqlen"] == 512


def test_a_file_that_is_not_utf8_is_refused(llama, tokenizer, tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("Émma Woodhouse, handsome, clever, and rich".encode("latin-1"))
    with pytest.raises(InvalidArgumentError, match=r"latin1.txt is not UTF-8 text \(byte 0"):
        perplexity(llama, tokenizer, str(path), seqlen=SEQLEN, progress=False)
    with pytest.raises(InvalidArgumentError, match="is not UTF-8 text"):
        load_documents(tmp_path, "train")  # a directory of .txt files


def test_a_dataset_with_missing_text_is_refused():
    datasets = pytest.importorskip("datasets")
    rows = datasets.Dataset.from_dict({"text": ["Emma Woodhouse,", None, "handsome"]})
    with pytest.raises(InvalidTypeError, match=r"'text' column must contain only strings"):
        load_documents(rows, "test")


@pytest.mark.parametrize(
    "args",
    [
        ["prune", "--calibration", "", "--out", "OUT"],
        ["prune", "--eval", "", "--out", "OUT"],
        ["eval", "--ppl", ""],
        ["eval", "--ppl", "austen", "--zero-shot", ""],
    ],
    ids=["calibration", "eval", "ppl", "zero-shot"],
)
def test_cli_refuses_empty_data_flags(args, tokenizer, tmp_path, capsys, monkeypatch):
    def load(*_):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(ria.cli, "_load", load)
    command, *flags = args
    flags = [str(tmp_path / "out") if f == "OUT" else f for f in flags]
    assert ria.cli.main([command, "demo", *flags, "--device", "cpu"]) == 2
    flag = flags[flags.index("") - 1]
    assert f"{flag} is empty" in capsys.readouterr().err


# --------------------------------------------------------------------------- zero-shot

TASK = "austen_next_word"


def build_next_word_task(directory: Path, n_docs: int = 16) -> list[dict]:
    """A 2-choice lm-eval task over a local JSONL file: given the start of a sentence from
    the shipped sample, is the next word the real one or one taken from another sentence?
    Returns the documents; writes `TASK`.yaml and its data into `directory`."""
    sentences = [
        s.strip().replace("\n", " ")
        for s in sample_text().split(". ")
        if 8 <= len(s.split()) <= 30 and "_" not in s
    ]
    docs = []
    for i in range(n_docs):
        words = sentences[i].split()
        cut = len(words) // 2
        real = words[cut]
        distractor = next(w for w in sentences[i + n_docs].split()[2:] if w != real)
        choices = [real, distractor] if i % 2 == 0 else [distractor, real]
        docs.append({"context": " ".join(words[:cut]), "choices": choices, "label": i % 2})
    data = directory / f"{TASK}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    (directory / f"{TASK}.yaml").write_text(
        f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data))}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
        encoding="utf-8",
    )
    return docs


def choice_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context), split as lm-eval's HFLM splits."""
    whole = tokenizer(context + continuation)["input_ids"]
    n_ctx = len(tokenizer(context)["input_ids"])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), dim=-1)
    return sum(logprobs[pos - 1, whole[pos]].item() for pos in range(n_ctx, len(whole)))


def test_zero_shot_on_a_local_task(llama, tokenizer, tmp_path):
    pytest.importorskip("lm_eval")
    docs = build_next_word_task(tmp_path)
    limit = 8
    llama.train()
    results = zero_shot(llama, tokenizer, [TASK], limit=limit, batch_size=4, task_dir=tmp_path)
    assert llama.training
    llama.eval()

    assert set(results) == {TASK}
    metrics = results[TASK]
    assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} <= set(metrics)
    json.dumps(results)
    for name in ("acc", "acc_norm"):
        assert 0.0 <= metrics[name] <= 1.0
        assert (metrics[name] * limit) == pytest.approx(round(metrics[name] * limit))
    # The same accuracy by hand: the choice with the higher log-likelihood of " word".
    correct = 0
    for doc in docs[:limit]:
        scores = [choice_logprob(llama, tokenizer, doc["context"], " " + c) for c in doc["choices"]]
        correct += int(max(range(2), key=scores.__getitem__) == doc["label"])
    assert metrics["acc"] == pytest.approx(correct / limit)


def test_zero_shot_leaves_the_tokenizer_and_the_global_random_states(llama, tokenizer, tmp_path):
    pytest.importorskip("lm_eval")
    build_next_word_task(tmp_path)
    tok = copy.deepcopy(tokenizer)
    tok.pad_token = None  # lm-eval sets one on the tokenizer it is given
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    zero_shot(llama, tok, [TASK], limit=2, batch_size=2, task_dir=tmp_path)
    assert tok.pad_token is None
    got = (random.random(), np.random.random(), torch.rand(1).item())
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    assert got == (random.random(), np.random.random(), torch.rand(1).item())


def test_unknown_zero_shot_tasks_are_refused_before_loading(
    llama, tokenizer, tmp_path, capsys, monkeypatch
):
    pytest.importorskip("lm_eval")

    def load(*_):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(ria.cli, "_load", load)
    code = ria.cli.main(
        ["eval", "demo", "--ppl", "austen", "--zero-shot", "rte,nosuchtask", "--device", "cpu"]
    )
    assert code == 2
    assert "unknown zero-shot task 'nosuchtask'" in capsys.readouterr().err
    with pytest.raises(InvalidArgumentError, match="unknown zero-shot task 'nosuchtask'"):
        zero_shot(llama, tokenizer, ["nosuchtask"])


def test_zero_shot_needs_lm_eval(llama, tokenizer, monkeypatch):
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match=r"pip install 'ria-rs\[eval\]'"):
        zero_shot(llama, tokenizer, ["boolq"])


def test_flatten_metrics():
    flat = ria.eval._flatten_metrics(
        {
            "alias": "x",
            "acc,none": 0.5,
            "acc_stderr,none": "N/A",
            "exact_match,strict-match": 1,
        }
    )
    assert flat == {"acc": 0.5, "acc_stderr": None, "exact_match/strict-match": 1.0}
