"""Shared test helpers: tiny random-weight models of each supported family and a tiny
tokenizer trained on the shipped text sample (fixtures are in conftest.py)."""

from __future__ import annotations

import copy
import subprocess
import sys
from importlib import resources

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    CohereConfig,
    DeepseekV3Config,
    Gemma3TextConfig,
    GptOssConfig,
    Llama4TextConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Olmo2Config,
    OPTConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

import ria
from ria.arch import block_linears, find_blocks
from ria.permutation import (
    BlockLayout,
    apply_recorded_orders,
    block_layout,
    weight_in_nm_order,
)
from ria.pruning import capture_block_inputs, run_block

VOCAB = 512
CUDA = torch.cuda.is_available()

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "opt")
# Families with fused 3-D experts (transformers 5); qwen2_moe adds a Linear shared-expert gate.
MOE_FAMILIES = ("qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3")
# Every family whose tiny config the coverage contract is tested on.
ALL_FAMILIES = (*FAMILIES, "gemma3", "olmo2", "phi3", "cohere", *MOE_FAMILIES)


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
    elif family in _MORE_FAMILIES:
        # Their defaults name special tokens beyond the tiny vocabulary.
        cfg = _MORE_FAMILIES[family](
            **common, **decoder, pad_token_id=0, bos_token_id=1, eos_token_id=2
        )
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


_EXPERTS = dict(num_experts_per_tok=2, moe_intermediate_size=32)
_MORE_FAMILIES = {
    "gemma3": lambda **kw: Gemma3TextConfig(**kw, head_dim=16),
    "olmo2": Olmo2Config,
    "phi3": Phi3Config,
    "cohere": CohereConfig,
    "qwen3_moe": lambda **kw: Qwen3MoeConfig(**kw, **_EXPERTS, head_dim=16, num_experts=4),
    "qwen2_moe": lambda **kw: Qwen2MoeConfig(
        **kw, **_EXPERTS, num_experts=4, shared_expert_intermediate_size=32
    ),
    # Experts stored (experts, in, out) without transformers' layout flag: left dense.
    "llama4": lambda **kw: Llama4TextConfig(
        **kw, head_dim=16, num_local_experts=4, num_experts_per_tok=1
    ),
    "mixtral": lambda **kw: MixtralConfig(**kw, num_local_experts=4, num_experts_per_tok=2),
    "gpt_oss": lambda **kw: GptOssConfig(
        **kw, head_dim=16, num_local_experts=4, num_experts_per_tok=2
    ),
    # Block 0 dense (first_k_dense_replace), block 1 MoE with a shared expert; MLA attention.
    "deepseek_v3": lambda **kw: DeepseekV3Config(
        **kw,
        **_EXPERTS,
        n_routed_experts=4,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
    ),
}


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


def assert_mma_config_matches(x, weight, bias, ref, config) -> torch.Tensor:
    """`ria.sparse.mma_sp.mma24_linear(x, weight, bias, config=config)` is `(M, N)` in x's
    dtype, within 1% (relative) of `ref` (the exact product, float64), and a second call
    gives the same bits; returns it."""
    from ria.sparse.mma_sp import mma24_linear

    y = mma24_linear(x, weight, bias, config=config)
    assert y.shape == (x.shape[0], ref.shape[1]) and y.dtype == x.dtype
    err = float((y.double() - ref).norm() / ref.norm())
    assert err < 1e-2, (tuple(ref.shape), x.shape[0], config, err)
    assert torch.equal(mma24_linear(x, weight, bias, config=config), y), config
    return y


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


def assert_nm_as_sparsified(model: torch.nn.Module, n: int, m: int) -> None:
    """Every pruned Linear of `model` is N:M in the order the sparse runtime reads it: on a
    copy, the recorded shared orders applied (as `ria.sparsify` applies them), each
    Linear through its own `nm_order`."""
    view = copy.deepcopy(model)
    apply_recorded_orders(view)
    for linear in pruned_linears(view).values():
        assert_nm(weight_in_nm_order(linear), n, m)


def along_input(module: torch.nn.Module, param: torch.Tensor) -> torch.Tensor:
    """A weight as `(rows, in)`: a Linear's `(out, in)`, or every expert's rows of a fused
    3-D parameter, read through transformers' own layout flag (`is_transposed`: gpt-oss
    stores `(experts, in, out)`)."""
    if param.dim() == 3 and getattr(module, "is_transposed", False):
        param = param.transpose(1, 2)
    return param.reshape(-1, param.shape[-1])


def rows_in_nm(rows: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Per row of `(rows, in)`: whether every group of m inputs keeps at most n nonzeros."""
    nonzero = (rows != 0).reshape(rows.shape[0], -1, m).sum(dim=-1)
    return (nonzero <= n).all(dim=-1)


def traced_layouts(model: torch.nn.Module) -> list[BlockLayout]:
    """Every block's permutation layout, traced on 16 fixed tokens."""
    ids = torch.arange(16)[None] * 7 % 512
    blocks = find_blocks(model)[1]
    inputs = capture_block_inputs(model, blocks, ids, 1)
    return [
        block_layout(model, b, lambda b=b, i=i: run_block(b, inputs.at(i)))
        for i, b in enumerate(blocks)
    ]


def kill_when_it_prints(script: str, line: str) -> None:
    """Runs Python `script` in a child process and kills it (SIGKILL, no cleanup) as soon
    as it prints `line`: what a killed run leaves behind is then on disk."""
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == line + "\n"
    finally:
        child.kill()
        child.wait()
