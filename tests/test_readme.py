"""Every Python snippet in README.md runs as written, offline.

The Hub is out of reach here, so three things are swapped, and nothing else: the model
name becomes a tiny local checkpoint, and `datasets.load_dataset` serves local text for
C4 and WikiText-2 (ria's own loading code still runs). The core API snippet gets its
input arrays (`W`, `act_norm`, `s_q`...) defined beforehand.
"""

from __future__ import annotations

import re
from pathlib import Path

import datasets
import numpy as np
import pytest
from helpers import build_tokenizer, sample_text, tiny_model

import ria

README = Path(__file__).resolve().parent.parent / "README.md"
HUB_NAME = "meta-llama/Llama-3.2-1B"


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text("utf-8"), flags=re.S)


def local_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    """C4 and WikiText-2 served from the shipped text sample, as `datasets` objects."""
    text = sample_text()
    # C4 documents must be longer than one 2048-token window; WikiText rows are lines.
    docs = [text[i : i + 40_000] for i in range(0, len(text) - 40_000, 40_000)]
    rows = text.split("\n")

    def load_dataset(path: str, *args: object, **kwargs: object) -> datasets.Dataset:
        if path == "allenai/c4":
            return datasets.Dataset.from_dict({"text": docs})
        if path == "wikitext":
            return datasets.Dataset.from_dict({"text": rows})
        raise AssertionError(f"unexpected dataset {path!r}")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


def test_the_readme_has_snippets():
    found = snippets()
    assert len(found) >= 2 and HUB_NAME in found[0]


def test_usage_snippet(tmp_path, monkeypatch):
    checkpoint = tmp_path / "tiny"
    # The snippet keeps ria.prune's default 2048-token windows, as a 7B model's context allows.
    tiny_model("llama", max_position_embeddings=4096).save_pretrained(checkpoint)
    build_tokenizer().save_pretrained(checkpoint)
    local_datasets(monkeypatch)
    monkeypatch.chdir(tmp_path)
    code = snippets()[0].replace(HUB_NAME, str(checkpoint))
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md (usage)", "exec"), namespace)
    report = namespace["report"]
    assert isinstance(report, ria.PruneReport) and report.sparsity == pytest.approx(0.5)
    assert report.settings["calibration"] == "c4" and report.settings["nsamples"] == 128
    assert (tmp_path / "out" / "config.json").exists()


def test_core_api_snippet():
    rng = np.random.default_rng(0)
    namespace: dict[str, object] = {
        "W": rng.standard_normal((32, 64)).astype(np.float32),
        "act_norm": rng.random(64).astype(np.float32),
        **{f"s_{x}": rng.random((16, 64)).astype(np.float32) for x in "qkv"},
    }
    exec(compile(snippets()[1], "README.md (core API)", "exec"), namespace)
    res = namespace["res"]
    assert isinstance(res, ria.PermutationResult) and res.retained >= res.identity


def test_gpu_runtime_snippet():
    """On the CPU: sparsify reports why it changed nothing, generate runs eagerly."""
    namespace: dict[str, object] = {"model": tiny_model("llama"), "tokenizer": build_tokenizer()}
    exec(compile(snippets()[2], "README.md (GPU runtime)", "exec"), namespace)
    out, hf, prompts = namespace["out"], namespace["hf"], namespace["prompts"]
    assert out.shape[0] == 2 and out.shape[1] <= prompts.input_ids.shape[1] + 16  # type: ignore[attr-defined]
    assert hf.shape[0] == 2  # type: ignore[attr-defined]
