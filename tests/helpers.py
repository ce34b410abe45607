"""Shared test helpers: tiny random-weight models of each supported family and a tiny
tokenizer trained on the shipped text sample (fixtures are in conftest.py)."""

from __future__ import annotations

from importlib import resources

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

import ria
from ria.arch import block_linears, find_blocks

VOCAB = 512
CUDA = torch.cuda.is_available()

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "opt")


def sample_text() -> str:
    return resources.files("ria.samples").joinpath("austen_sample.txt").read_text("utf-8")


def tiny_config(family: str, **overrides):
    """A 2-layer config with the family's real structure (GQA where it has it)."""
    common = dict(vocab_size=VOCAB, max_position_embeddings=512, tie_word_embeddings=False)
    decoder = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    if family == "llama":
        cfg = LlamaConfig(**common, **decoder)
    elif family == "mistral":
        cfg = MistralConfig(**common, **decoder, sliding_window=None)
    elif family == "qwen2":
        cfg = Qwen2Config(**common, **decoder)
    elif family == "qwen3":
        cfg = Qwen3Config(**common, **decoder, head_dim=16)
    elif family == "opt":
        cfg = OPTConfig(
            **common,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
        )
    else:
        raise ValueError(family)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    return model.eval()


def needs_cuda(test):
    """Marks a test `gpu` (select with `-m gpu`) and skips it without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")(test))


def random_24(n: int, k: int, dtype=torch.bfloat16, device="cpu", seed: int = 0) -> torch.Tensor:
    """A random `(n, k)` weight pruned 2:4 by magnitude with the Rust core."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    keep = torch.from_numpy(ria.nm_mask(ria.magnitude_score(w), 2, 4))
    return (w * keep).to(device)


def prune_model_24(model: torch.nn.Module) -> torch.nn.Module:
    """Prune every decoder Linear to 2:4 by magnitude (no data needed), in place."""
    ria.prune(model, sparsity="2:4", method="magnitude", calibration=None, progress=False)
    return model


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A 512-token BPE trained on the shipped Austen sample (offline, ~1 s)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(sample_text().split("\n\n"), trainer=trainer)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


# Small searches keep the tests fast; the search itself is tested in test_core.py.
FAST_SEARCH = {"tabu_steps": 20, "max_steps": 8}


def pruned_linears(model) -> dict[str, torch.nn.Linear]:
    path, blocks = find_blocks(model)
    return {
        f"{path}.{i}.{name}": linear
        for i, block in enumerate(blocks)
        for name, linear in block_linears(block).items()
    }


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def assert_nm(weight: torch.Tensor, n: int, m: int) -> None:
    nonzero = (weight != 0).reshape(weight.shape[0], -1, m).sum(dim=-1)
    assert (nonzero <= n).all(), "a group of m keeps more than n weights"
