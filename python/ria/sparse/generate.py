"""Greedy generation over a transformers `StaticCache` with prefill and decode steps replayed
as CUDA graphs, so dense and sparse models run with no per-kernel host overhead.

- Prefill (a fresh sequence, positions 0..q-1) is captured once per prompt length. The
  cache reports a query offset of 0 as a Python int, so transformers picks SDPA's
  `is_causal` path (flash attention) without reading a device tensor.
- A decode step is captured once: it builds its own `(B, 1, 1, L)` mask from a device
  position counter, runs the model, writes the argmax token back into its input buffer and
  advances the counter, so consecutive replays decode consecutive tokens.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..errors import InvalidArgumentError
from .graphs import capture

__all__ = ["StaticGenerator", "generate"]

# A captured prefill: (graph, static input ids, static logits).
_Prefill = tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]


def _static_cache_class() -> type:
    from transformers import StaticCache

    class PinnedOffsetCache(StaticCache):
        """A StaticCache whose query offset can be pinned to a host int (see module doc)."""

        query_offset: int | None = None

        def get_query_offset(self, layer_idx: int = 0) -> int:
            if self.query_offset is not None:
                return self.query_offset
            return super().get_query_offset(layer_idx)

    return PinnedOffsetCache


class StaticGenerator:
    """Greedy decoding for one batch size on a CUDA causal LM (dense or sparsified).

    Args:
        model: a transformers causal LM on CUDA using SDPA or eager attention.
        batch_size: sequences decoded together.
        max_cache_len: KV-cache length (prompt + new tokens must fit).
        cuda_graph: replay prefill and decode steps as CUDA graphs (False: eager, for
            debugging; same numerics).
    """

    def __init__(
        self, model: nn.Module, batch_size: int, max_cache_len: int, *, cuda_graph: bool = True
    ) -> None:
        self.model = model.eval()
        self.batch_size = batch_size
        self.max_cache_len = max_cache_len
        self.cuda_graph = cuda_graph
        device = next(model.parameters()).device
        self.device = device
        self.cache = _static_cache_class()(config=model.config, max_cache_len=max_cache_len)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        impl = getattr(model.config, "_attn_implementation", "sdpa")
        if impl not in ("sdpa", "eager"):
            raise NotImplementedError(f"attention implementation {impl!r}: use sdpa or eager")
        self._additive_mask = impl == "eager"
        self._ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self._pos = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self._kv_arange = torch.arange(max_cache_len, device=device)
        self._prefill_graphs: dict[int, _Prefill] = {}  # by prompt length
        self._step_graph: tuple[torch.cuda.CUDAGraph, torch.Tensor] | None = None
        self.pos = 0  # tokens in the cache (host mirror of self._pos)

    # -- model calls -------------------------------------------------------------------
    def _forward(
        self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        kwargs = {self._cache_kw: self.cache, **self._extra}
        out = self.model(
            input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True, **kwargs
        )
        logits: torch.Tensor = out.logits[:, -1, :]
        return logits

    def _lengths(self) -> list[torch.Tensor]:
        """Each cache layer's device-side token counter (transformers >= 5 StaticLayer)."""
        return [
            layer.cumulative_length
            for layer in self.cache.layers
            if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)
        ]

    def _prefill_call(self, ids: torch.Tensor) -> torch.Tensor:
        lengths = self._lengths()
        if lengths:
            torch._foreach_zero_(lengths)
        q = ids.shape[1]
        positions = torch.arange(q, device=self.device).expand(self.batch_size, q)
        return self._forward(ids, positions, None)

    def _step_call(self) -> torch.Tensor:
        mask = self._kv_arange[None, None, None, :] <= self._pos[:, None, :, None]
        if self._additive_mask:
            dtype = next(self.model.parameters()).dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=self.device).masked_fill(
                ~mask, torch.finfo(dtype).min
            )
        logits = self._forward(self._ids, self._pos, mask)
        self._ids.copy_(logits.argmax(-1, keepdim=True))
        self._pos.add_(1)
        return logits

    # -- public ------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Start new sequences: `input_ids` `(B, q)` -> last-position logits `(B, vocab)`.

        Sets the next decode input to the argmax token.
        """
        b, q = input_ids.shape
        if b != self.batch_size or q > self.max_cache_len:
            raise InvalidArgumentError(
                f"input {tuple(input_ids.shape)} does not fit batch {self.batch_size}"
            )
        self.cache.query_offset = 0
        try:
            if not self.cuda_graph:
                logits = self._prefill_call(input_ids.to(self.device))
            else:
                if not self._prefill_graphs:  # first call initialises the cache eagerly
                    self._prefill_call(input_ids.to(self.device))
                if q not in self._prefill_graphs:
                    buf = input_ids.to(self.device).clone()
                    graph, out = capture(lambda: self._prefill_call(buf), warmup=1)
                    self._prefill_graphs[q] = (graph, buf, out)
                graph, buf, out = self._prefill_graphs[q]
                buf.copy_(input_ids)
                graph.replay()
                logits = out
        finally:
            self.cache.query_offset = None
        self.pos = q
        self._pos.fill_(q)
        self._ids.copy_(logits.argmax(-1, keepdim=True))
        return logits

    def prefill_graph(self, q: int) -> torch.cuda.CUDAGraph | None:
        """The captured prefill graph for prompt length `q` (after one `prefill` of that length)."""
        entry = self._prefill_graphs.get(q)
        return None if entry is None else entry[0]

    def _sync_position(self) -> None:
        self._pos.fill_(self.pos)
        lengths = self._lengths()
        if lengths:
            torch._foreach_zero_(lengths)
            torch._foreach_add_(lengths, self.pos)

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Decode one token for every sequence: returns the new tokens `(B, 1)` (a view of the
        buffer the next step reads, so clone it to keep it)."""
        if self.pos >= self.max_cache_len:
            raise RuntimeError(f"KV cache full ({self.max_cache_len} tokens)")
        if not self.cuda_graph:
            self._step_call()
        else:
            if self._step_graph is None:
                saved = self._ids.clone()
                self._step_graph = capture(self._step_call, warmup=1)
                self._ids.copy_(saved)  # the warm-up step consumed it
                self._sync_position()
            self._step_graph[0].replay()
        self.pos += 1
        return self._ids

    def step_graph(self) -> torch.cuda.CUDAGraph | None:
        """The captured decode-step graph (after the first `step`)."""
        return None if self._step_graph is None else self._step_graph[0]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy continuation: `(B, q)` prompt -> `(B, max_new_tokens)` new tokens."""
        if input_ids.shape[1] + max_new_tokens > self.max_cache_len:
            raise InvalidArgumentError("prompt + max_new_tokens exceeds max_cache_len")
        self.prefill(input_ids)
        out = torch.empty(self.batch_size, max_new_tokens, dtype=torch.long, device=self.device)
        out[:, :1] = self._ids
        for i in range(1, max_new_tokens):
            out[:, i : i + 1] = self.step()
        return out


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int = 32,
    *,
    max_cache_len: int | None = None,
    cuda_graph: bool = True,
) -> torch.Tensor:
    """Greedy generation with a static KV cache and CUDA-graph replay.

    Args:
        model: transformers causal LM on CUDA (dense, or after `ria.sparsify`).
        input_ids: `(B, q)` prompt token ids (no padding).
        max_new_tokens: tokens to generate per sequence.
        max_cache_len: KV-cache length; default `q + max_new_tokens`.
        cuda_graph: replay captured graphs (False: run eagerly).

    Returns:
        `(B, q + max_new_tokens)`: the prompt followed by the generated tokens.
    """
    b, q = input_ids.shape
    gen = StaticGenerator(model, b, max_cache_len or q + max_new_tokens, cuda_graph=cuda_graph)
    new = gen.generate(input_ids, max_new_tokens)
    return torch.cat([input_ids.to(new.device), new], dim=1)
