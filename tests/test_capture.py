"""Every block is calibrated with the arguments the model's own forward gives it: on
hybrid models (sliding-window and full-attention layers with different masks and rotary
embeddings) block i's calibration input must equal its input in a true forward."""

from __future__ import annotations

import pytest
import torch
from helpers import VOCAB, needs_cuda
from transformers import AutoModelForCausalLM, Gemma3TextConfig, Qwen2Config

import ria
from ria.arch import find_blocks
from ria.pruning import InputStats, pipeline

LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]
SEQLEN = 32


def hybrid(family: str) -> torch.nn.Module:
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=len(LAYER_TYPES),
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        sliding_window=8,
        layer_types=LAYER_TYPES,
        tie_word_embeddings=False,
    )
    if family == "gemma3":
        # Full-attention layers use another RoPE base than sliding ones, as in Gemma 3.
        config = Gemma3TextConfig(
            **common,
            head_dim=16,
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        )
    else:
        config = Qwen2Config(**common, use_sliding_window=True, max_window_layers=0)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def true_block_io(model: torch.nn.Module, windows: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """(input, output) hidden states of each block in a plain forward of every window."""
    blocks = find_blocks(model)[1]
    ins: list[list[torch.Tensor]] = [[] for _ in blocks]
    outs: list[list[torch.Tensor]] = [[] for _ in blocks]

    def first(x):
        return (x[0] if isinstance(x, tuple) else x).detach().clone()

    handles = []
    for i, block in enumerate(blocks):
        handles.append(
            block.register_forward_pre_hook(
                lambda _m, args, kw, i=i: ins[i].append(first(args or (kw["hidden_states"],))),
                with_kwargs=True,
            )
        )
        handles.append(
            block.register_forward_hook(lambda _m, _a, out, i=i: outs[i].append(first(out)))
        )
    try:
        with torch.no_grad():
            for w in windows:
                model(w[None])
    finally:
        for h in handles:
            h.remove()
    return [(torch.cat(a), torch.cat(b)) for a, b in zip(ins, outs, strict=True)]


@pytest.mark.parametrize("family", ["gemma3", "qwen2"])
@pytest.mark.parametrize("batch_size", [1, 2])
def test_calibration_inputs_equal_a_true_forward(family, batch_size, monkeypatch):
    model = hybrid(family)
    windows = torch.randint(0, VOCAB, (3, SEQLEN), generator=torch.Generator().manual_seed(1))
    true = true_block_io(model, windows)
    # What each block is run on, and gives, in its first (statistics) pass of calibration.
    blocks = list(find_blocks(model)[1])
    calibrated: dict[int, tuple[torch.Tensor, ...]] = {}
    real_run_block = pipeline.run_block

    batches = -(-windows.shape[0] // batch_size)

    def spy(block, inputs, into=None):
        outputs = real_run_block(block, inputs, [] if into is None else into)
        if len(inputs.hidden) == batches:  # not the one-batch forward that traces the wiring
            calibrated.setdefault(
                blocks.index(block), (torch.cat(inputs.hidden), torch.cat(outputs))
            )
        return into  # the statistics pass keeps no outputs (into=None)

    monkeypatch.setattr(pipeline, "run_block", spy)
    # Nothing pruned, so every block sees and gives what it does in the dense model.
    ria.prune(
        model,
        sparsity=0.0,
        method="wanda",
        calibration=windows,
        nsamples=3,
        seqlen=SEQLEN,
        batch_size=batch_size,
        progress=False,
        device="cpu",
    )
    assert sorted(calibrated) == list(range(len(blocks)))
    for i, want in enumerate(true):
        got = calibrated[i]
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5, msg=f"block {i} input")
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5, msg=f"block {i} output")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gram_of_half_activations_sums_the_float32_products(dtype):
    """X^T X of 16-bit activations, taken by a half-precision GEMM accumulating in float32
    where torch has one, against the exact sum: float32 sums of K exact products in any
    order, rounding by truncation or to nearest, stay within K * 2**-23 of the largest
    entry (the diagonal's |x|^T |x|); a lost or doubled batch is off by 1/4 or more."""
    x = (torch.randn(3, 700, 96) * torch.linspace(0.1, 8, 96)).to(dtype)
    stats = InputStats.zeros(96, torch.device("cuda"), hessian=True)
    stats.add(x.cuda())
    stats.add(x[:1].cuda())
    wide = torch.cat([x, x[:1]]).reshape(-1, 96).double()
    exact = wide.T @ wide
    assert stats.hessian is not None and stats.tokens == 4 * 700
    error = (stats.hessian.cpu().double() - exact).abs().max() / exact.abs().max()
    assert error <= wide.shape[0] * 2.0**-23
