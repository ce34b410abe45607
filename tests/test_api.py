"""The public surface: what `import ria` loads, what it exports, the version, errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tiny_model

import ria
from ria.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_import_ria_loads_no_gpu_runtime():
    code = (
        "import sys, ria; "
        "print(sorted(m for m in ('triton', 'ria.sparse', 'ria.eval', 'lm_eval') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_lazy_attributes_load_on_first_use():
    assert callable(ria.eval.perplexity) and callable(ria.sparsify)
    assert ria.sparse.Sparse24Linear is ria.Sparse24Linear
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        _ = ria.nonexistent  # type: ignore[attr-defined]
    assert set(ria.__all__) <= set(dir(ria))


def test_one_version_from_cargo_toml(capsys):
    cargo = re.search(r'^version = "(.+)"$', (ROOT / "Cargo.toml").read_text(), re.M)[1]
    assert ria.__version__ == cargo
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"ria-rs {cargo}"


def test_errors_share_one_base_and_the_builtins():
    for cls in (ria.InvalidArgumentError, ria.UnsupportedModelError):
        assert issubclass(cls, ria.RiaError) and issubclass(cls, ValueError)
    assert issubclass(ria.InvalidTypeError, TypeError)
    for cls, builtin in [
        (ria.InputNotFoundError, FileNotFoundError),
        (ria.OutputExistsError, FileExistsError),
        (ria.CacheFullError, RuntimeError),
    ]:
        assert issubclass(cls, ria.RiaError) and issubclass(cls, builtin)
    with pytest.raises(ria.InvalidArgumentError, match="not divisible by m=4"):
        ria.nm_mask([[1.0, 2.0, 3.0]], 2, 4)  # raised by the Rust core


def test_sparsity_objects_are_accepted(tokenizer):
    model = tiny_model("llama")
    target = ria.Sparsity.parse("2:4")
    report = ria.prune(model, tokenizer, sparsity=target, method="magnitude", progress=False)
    assert report.settings["sparsity"] == "2:4"
