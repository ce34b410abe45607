"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and
top-p, in the order transformers applies them.

Sampling draws with the exponential race: `argmax(p / E)` with `E ~ Exp(1)` i.i.d. picks
token `i` with probability `p_i`, like `torch.multinomial`, but the randomness is a plain
tensor of noise. The caller fills it (from its own `torch.Generator`) before each step, so
a step captured in a CUDA graph samples fresh tokens on every replay, and eager and graph
replay draw the same tokens from the same seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._checks import require_int
from ..errors import InvalidArgumentError

__all__ = ["Sampling", "filter_logits", "next_tokens"]


@dataclass(frozen=True)
class Sampling:
    """Sampling settings (greedy decoding is `None` in place of a `Sampling`).

    Attributes:
        temperature: logits are divided by it (> 0).
        top_k: keep the k most likely tokens (None: all).
        top_p: keep the smallest set of most likely tokens whose probability reaches p,
            in (0, 1] (None or 1.0: all).
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise InvalidArgumentError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k is not None:  # a numpy int becomes an int (hashes as one)
            object.__setattr__(self, "top_k", require_int("top_k", self.top_k, minimum=1))
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InvalidArgumentError(f"top_p must be in (0, 1] or None, got {self.top_p}")


def filter_logits(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """`(B, V)` logits scaled by the temperature, with the tokens top-k / top-p remove set
    to -inf (the most likely token always stays)."""
    scores = logits.float() / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < scores.shape[-1]:
        kth = torch.topk(scores, sampling.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1:
        ordered, order = torch.sort(scores, dim=-1, descending=True)
        probs = ordered.softmax(-1)
        # drop a token when the tokens before it already reach top_p
        drop_sorted = (probs.cumsum(-1) - probs) >= sampling.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def next_tokens(
    logits: torch.Tensor, sampling: Sampling | None, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """The next token of every sequence, `(B, 1)` int64, from `(B, V)` logits.

    Greedy (`sampling` None): the argmax. Otherwise `noise` must be `(B, V)` float32 drawn
    from Exp(1) (e.g. `noise.exponential_(generator=g)`).
    """
    if sampling is None:
        return logits.argmax(-1, keepdim=True)
    if noise is None or noise.shape != logits.shape:
        raise InvalidArgumentError("sampling needs Exp(1) noise of the logits' shape")
    probs = filter_logits(logits, sampling).softmax(-1)
    # Exp(1) draws can be exactly 0; 0/0 would be NaN, which argmax ranks first
    return (probs / noise.clamp_min(torch.finfo(torch.float32).tiny)).argmax(-1, keepdim=True)
