"""Generation over a transformers `StaticCache` with prefill and decode steps replayed as
CUDA graphs, so dense and sparse models run with no per-kernel host overhead.

- Prefill (a fresh sequence, positions 0..q-1) is captured once per prompt length (and
  padding). Without padding the cache reports a query offset of 0 as a Python int, so
  transformers picks SDPA's `is_causal` path (flash attention) without reading a device
  tensor; a left-padded batch passes its own 4-D mask.
- A decode step is captured once per sampling setting: it builds its own `(B, 1, 1, L)`
  mask from a device slot counter and the padding, runs the model, chooses the next token
  (greedy or sampled from noise filled before each replay, see `sampling.py`), emits the pad
  token for finished sequences, and advances the counters, so consecutive replays decode
  consecutive tokens.
- Sliding-window layers get a full-length cache layer and their window from the masks
  (`_unslid_layers`): transformers' own sliding layer counts tokens on the host, which
  replays do not advance.
- `generate` keeps its `StaticGenerator`s (and so their graphs) per model, batch size and
  cache length, and drops them when the model changes (`model_fingerprint`) or on
  `clear_generators`, which `sparsify` calls.
- `compile=True` runs the model calls of prefill and decode steps through `torch.compile`
  (inductor, `fullgraph=True`) before capturing them: norms, rotary embedding, residual
  adds and SiLU-and-multiply fuse into few kernels, which a graph-replayed step spends as
  much time in as in its GEMMs. The 2:4 layers stay one custom op each. The first prefill
  of a generator runs eagerly (it creates the KV cache's tensors, which a compiled graph
  cannot); a new prompt length compiles again (dynamo's automatic dynamic shapes then
  make the prompt length symbolic, guarded only where an fp8 layer's kernel changes between
  scaling its own output and leaving that to traced code: `Fp8Linear.forward`).
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import nn

from .._checks import require_int
from ..arch import fused_experts
from ..errors import CacheFullError, InvalidArgumentError, UnsupportedModelError
from .graphs import capture
from .sampling import Sampling, next_tokens

T = TypeVar("T")

__all__ = [
    "CACHE_LEN_STEP",
    "MAX_CACHED_GENERATORS",
    "MAX_PREFILL_GRAPHS",
    "StaticGenerator",
    "cached_generator",
    "clear_generators",
    "generate",
    "model_fingerprint",
]

# Default cache lengths are rounded up to this, so calls with similar lengths share graphs.
CACHE_LEN_STEP = 256
# Generators kept per model (least recently used dropped first): each holds a KV cache.
MAX_CACHED_GENERATORS = 4
# Prefill graphs kept per generator, by prompt length: each holds its activations' memory.
MAX_PREFILL_GRAPHS = 8

# A captured prefill: (graph, static input ids, static padding mask or None, static logits).
_Prefill = tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor | None, torch.Tensor]


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
    """Decoding for one batch size on a causal LM (dense or sparsified), greedy or sampled,
    with EOS and left-padded prompts.

    Args:
        model: a transformers causal LM using SDPA or eager attention; held by weak
            reference (the generator does not keep the model alive).
        batch_size: sequences decoded together.
        max_cache_len: KV-cache length (prompt + new tokens must fit).
        cuda_graph: replay prefill and decode steps as CUDA graphs (needs CUDA; False: eager,
            same numerics, runs on any device; None: on CUDA only).
        compile: run the model calls compiled (`torch.compile`, inductor,
            `fullgraph=True`) once the KV cache exists: prefill from the second call of a
            generator (the first creates the cache eagerly), every decode step.
    """

    def __init__(
        self,
        model: nn.Module,
        batch_size: int,
        max_cache_len: int,
        *,
        cuda_graph: bool | None = None,
        compile: bool = False,
    ) -> None:
        if batch_size < 1 or max_cache_len < 1:
            raise InvalidArgumentError(
                f"batch_size and max_cache_len must be >= 1, got {batch_size}, {max_cache_len}"
            )
        self._model = weakref.ref(model.eval())
        self.batch_size = batch_size
        self.max_cache_len = max_cache_len
        device = next(model.parameters()).device
        self.cuda_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
        self._graphs_asked = cuda_graph is True  # else a model that cannot be captured runs eagerly
        if self.cuda_graph and device.type != "cuda":
            raise InvalidArgumentError(
                f"cuda_graph=True needs a CUDA model, this one is on {device}"
            )
        self.device = device
        self.cache = _static_cache_class()(config=model.config, max_cache_len=max_cache_len)
        self._window, self._mixed = _unslid_layers(self.cache, model.config, max_cache_len)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        impl = getattr(model.config, "_attn_implementation", "sdpa")
        if impl not in ("sdpa", "eager"):
            raise UnsupportedModelError(f"attention implementation {impl!r}: use sdpa or eager")
        self._additive_mask = impl == "eager"
        self._dtype = next(model.parameters()).dtype
        b, length = batch_size, max_cache_len
        self._ids = torch.zeros(b, 1, dtype=torch.long, device=device)  # next input token
        self._pos = torch.zeros(b, 1, dtype=torch.long, device=device)  # its position id
        self._slot = torch.zeros(1, dtype=torch.long, device=device)  # its cache slot
        self._valid = torch.ones(b, length, dtype=torch.bool, device=device)  # not padding
        self._done = torch.zeros(b, 1, dtype=torch.bool, device=device)  # EOS emitted
        self._eos = torch.full((1,), -1, dtype=torch.long, device=device)  # -1 pads: never
        self._pad = torch.zeros(1, 1, dtype=torch.long, device=device)
        self._noise: torch.Tensor | None = None  # Exp(1) draws, (B, vocab), when sampling
        self._vocab = 0  # logits per token, known after the first prefill
        self._kv_arange = torch.arange(length, device=device)
        # by (length, padded), least recently used first
        self._prefill_graphs: OrderedDict[tuple[int, bool], _Prefill] = OrderedDict()
        self._cache_ready = False  # the KV cache's tensors exist (made by a first eager call)
        self._step_graphs: dict[Sampling | None, torch.cuda.CUDAGraph] = {}
        self.pos = 0  # tokens in the cache (host mirror of self._slot)
        self.compile = compile
        # The model is an argument, not a bound `self`: the generator holds it weakly.
        self._compiled_model = torch.compile(_call_model, fullgraph=True) if compile else None

    @property
    def model(self) -> nn.Module:
        model = self._model()
        if model is None:
            raise ReferenceError("the generator's model was deleted")
        return model

    # -- model calls -------------------------------------------------------------------
    def _forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        query_slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The model's last-position logits for `ids` at `positions`; `mask` `(B, 1, q, L)`
        (True: may attend) is the full-attention mask of queries in cache slots
        `query_slots` `(q,)` (None: the model builds its own masks)."""
        masks: torch.Tensor | dict[str, torch.Tensor] | None = mask
        if mask is not None and self._window is not None:
            assert query_slots is not None
            # Sliding layers see only the last `window` slots: transformers'
            # `kv_idx > q_idx - window` on cache slots.
            band = self._kv_arange[None, :] > query_slots[:, None] - self._window
            sliding = mask & band
            masks = {"full_attention": mask, "sliding_attention": sliding}
            if not self._mixed:
                masks = sliding
        if masks is not None and self._additive_mask:
            masks = (
                {kind: self._additive(m) for kind, m in masks.items()}
                if isinstance(masks, dict)
                else self._additive(masks)
            )
        kwargs = {self._cache_kw: self.cache, **self._extra}
        call = _call_model
        if self._compiled_model is not None and self._cache_ready:
            call = self._compiled_model
        logits: torch.Tensor = call(
            self.model,
            input_ids=ids,
            position_ids=positions,
            attention_mask=masks,
            use_cache=True,
            **kwargs,
        )
        return logits

    def _additive(self, mask: torch.Tensor) -> torch.Tensor:
        """A boolean mask as eager attention adds it: 0 where allowed, the dtype's min not."""
        blocked = torch.finfo(self._dtype).min
        return torch.zeros(mask.shape, dtype=self._dtype, device=self.device).masked_fill(
            ~mask, blocked
        )

    def _lengths(self) -> list[torch.Tensor]:
        """Each cache layer's device-side token counter (transformers >= 5 StaticLayer)."""
        return [
            layer.cumulative_length
            for layer in self.cache.layers
            if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)
        ]

    def _prefill_call(self, ids: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        lengths = self._lengths()
        if lengths:
            torch._foreach_zero_(lengths)
        b, q = ids.shape
        if padding is None:
            positions = torch.arange(q, device=self.device).expand(b, q)
            return self._forward(ids, positions, None)
        # as transformers: positions count real tokens; pads get 1 (never read)
        positions = (padding.cumsum(-1) - 1).masked_fill(~padding, 1)
        rows = torch.arange(q, device=self.device)
        causal = rows[None, :] <= rows[:, None]  # (q, q): key j <= query i
        allowed = causal & padding[:, None, :]
        allowed |= torch.eye(q, dtype=torch.bool, device=self.device)  # no all-masked row
        mask = torch.zeros(b, 1, q, self.max_cache_len, dtype=torch.bool, device=self.device)
        mask[:, 0, :, :q] = allowed
        return self._forward(ids, positions, mask, rows)

    def _select(self, logits: torch.Tensor, sampling: Sampling | None) -> None:
        """Write the next tokens into `_ids`: chosen for running sequences, pad for finished."""
        chosen = next_tokens(logits, sampling, self._noise)
        chosen = torch.where(self._done, self._pad, chosen)
        self._done |= (chosen == self._eos).any(-1, keepdim=True)
        self._ids.copy_(chosen)

    def _step_call(self, sampling: Sampling | None) -> torch.Tensor:
        mask = (self._kv_arange <= self._slot) & self._valid
        logits = self._forward(self._ids, self._pos, mask[:, None, None, :], self._slot)
        self._select(logits, sampling)
        self._pos.add_(1)
        self._slot.add_(1)
        return logits

    def _set_eos(self, ids: list[int]) -> None:
        """Write the EOS ids into `_eos` in place (captured steps read that buffer); a longer
        list needs a bigger buffer, and so new step graphs."""
        if len(ids) > self._eos.numel():
            self._eos = torch.full((len(ids),), -1, dtype=torch.long, device=self.device)
            self._step_graphs.clear()
        self._eos.fill_(-1)
        if ids:
            self._eos[: len(ids)] = torch.tensor(ids, dtype=torch.long)

    def _draw_noise(self, sampling: Sampling | None, generator: torch.Generator | None) -> None:
        if sampling is None:
            return
        if self._noise is None:
            self._noise = torch.empty(
                self.batch_size, self._vocab, dtype=torch.float32, device=self.device
            )
        self._noise.exponential_(generator=generator)

    # -- public ------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        sampling: Sampling | None = None,
        generator: torch.Generator | None = None,
        eos_token_id: Sequence[int] = (),
        pad_token_id: int = 0,
    ) -> torch.Tensor:
        """Start new sequences: `input_ids` `(B, q)` -> last-position logits `(B, vocab)`.

        `attention_mask` `(B, q)` (1 = token, 0 = padding) allows left-padded prompts.
        Chooses the first new token (greedy, or with `sampling` from `generator`); a
        sequence that emits one of `eos_token_id` continues with `pad_token_id`.
        """
        b, q = input_ids.shape
        if b != self.batch_size or q > self.max_cache_len:
            raise InvalidArgumentError(
                f"input {tuple(input_ids.shape)} does not fit batch {self.batch_size} "
                f"and cache length {self.max_cache_len}"
            )
        ids = input_ids.to(self.device)
        padding = _padding(attention_mask, ids.shape, self.device)
        self.cache.query_offset = 0
        try:
            logits = self._graphed_prefill(ids, padding) if self.cuda_graph else None
            if logits is None:  # eager, or the model could not be captured
                logits = self._prefill_call(ids, padding)
                self._cache_ready = True
        finally:
            self.cache.query_offset = None
        self.pos = q
        self._vocab = logits.shape[-1]
        self._slot.fill_(q)
        self._valid.fill_(True)
        if padding is None:
            self._pos.fill_(q)
        else:
            self._valid[:, :q] = padding
            self._pos.copy_(padding.sum(-1, keepdim=True))
        self._set_eos(list(eos_token_id))
        self._pad.fill_(pad_token_id)
        self._done.zero_()
        self._draw_noise(sampling, generator)
        self._select(logits, sampling)
        return logits

    def _graphed_prefill(
        self, ids: torch.Tensor, padding: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The prefill logits by graph replay (captured for this prompt length first), or
        None when the model cannot be captured (`_captured`)."""
        key = (ids.shape[1], padding is not None)
        if not self._cache_ready:  # the first call initialises the cache eagerly
            self._prefill_call(ids, padding)
            self._cache_ready = True
        if key not in self._prefill_graphs:
            while len(self._prefill_graphs) >= MAX_PREFILL_GRAPHS:
                self._prefill_graphs.popitem(last=False)
            buf = ids.clone()
            pbuf = None if padding is None else padding.clone()
            captured = self._captured(lambda: self._prefill_call(buf, pbuf))
            if captured is None:
                return None
            graph, out = captured
            self._prefill_graphs[key] = (graph, buf, pbuf, out)
        self._prefill_graphs.move_to_end(key)
        graph, buf, pbuf, out = self._prefill_graphs[key]
        buf.copy_(ids)
        if pbuf is not None and padding is not None:
            pbuf.copy_(padding)
        graph.replay()
        return out

    def _captured(self, call: Callable[[], T]) -> tuple[torch.cuda.CUDAGraph, T] | None:
        """`call` captured as a CUDA graph (after one warm-up call), or None when the model
        cannot be captured (host copies or syncs inside its forward, such as MoE experts
        that loop over the experts hit): graphs are then off for this generator, with a
        warning, unless they were asked for (`cuda_graph=True`: an error)."""
        try:
            return capture(call, warmup=1)
        except RuntimeError as exc:  # torch.AcceleratorError is one too
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            experts = getattr(self.model.config, "_experts_implementation", None)
            hint = (
                f"; its MoE experts run {experts!r}: "
                'model.set_experts_implementation("batched_mm") can be captured'
                if fused_experts(self.model) and experts != "batched_mm"
                else ""
            )
            if self._graphs_asked:
                raise UnsupportedModelError(
                    f"this model cannot be captured in a CUDA graph ({why}){hint}; "
                    "generate with cuda_graph=False"
                ) from exc
            warnings.warn(
                f"this model cannot be captured in a CUDA graph ({why}){hint}: it runs "
                "eagerly, without graphs (slower)",
                stacklevel=4,
            )
            self.cuda_graph = False
            self._prefill_graphs.clear()
            self._step_graphs.clear()
            return None

    def prefill_graph(self, q: int, padded: bool = False) -> torch.cuda.CUDAGraph | None:
        """The captured prefill graph for prompt length `q` (after one `prefill` of that
        length, with or without padding)."""
        entry = self._prefill_graphs.get((q, padded))
        return None if entry is None else entry[0]

    @torch.no_grad()
    def step(
        self, *, sampling: Sampling | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Decode one token for every sequence: returns the new tokens `(B, 1)` (a view of the
        buffer the next step reads, so clone it to keep it)."""
        if self.pos >= self.max_cache_len:
            raise CacheFullError(f"KV cache full ({self.max_cache_len} tokens)")
        self._draw_noise(sampling, generator)
        graph = self._step_graph(sampling) if self.cuda_graph else None
        if graph is None:  # eager, or the model could not be captured
            self._step_call(sampling)
        else:
            graph.replay()
        self.pos += 1
        return self._ids

    def _step_graph(self, sampling: Sampling | None) -> torch.cuda.CUDAGraph | None:
        """The decode-step graph for `sampling`, captured on first use; None when the
        model cannot be captured (`_captured`)."""
        graph = self._step_graphs.get(sampling)
        if graph is None:
            state = [self._ids, self._pos, self._slot, self._done, *self._lengths()]
            saved = [t.clone() for t in state]
            try:
                captured = self._captured(lambda: self._step_call(sampling))
            finally:
                for t, s in zip(state, saved, strict=True):  # undo the warm-up step
                    t.copy_(s)
            if captured is None:
                return None
            graph = self._step_graphs[sampling] = captured[0]
        return graph

    def step_graph(self, sampling: Sampling | None = None) -> torch.cuda.CUDAGraph | None:
        """The captured decode-step graph for `sampling` (after the first such `step`)."""
        return self._step_graphs.get(sampling)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        attention_mask: torch.Tensor | None = None,
        sampling: Sampling | None = None,
        generator: torch.Generator | None = None,
        eos_token_id: Sequence[int] = (),
        pad_token_id: int = 0,
    ) -> torch.Tensor:
        """Continue `(B, q)` prompts: returns `(B, n)` new tokens, `n <= max_new_tokens`.

        Stops early once every sequence has emitted one of `eos_token_id` (finished
        sequences emit `pad_token_id` meanwhile). Greedy unless `sampling` is given.
        """
        if max_new_tokens < 1:
            raise InvalidArgumentError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if input_ids.shape[1] + max_new_tokens > self.max_cache_len:
            raise InvalidArgumentError("prompt + max_new_tokens exceeds max_cache_len")
        self.prefill(
            input_ids,
            attention_mask,
            sampling=sampling,
            generator=generator,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )
        out = torch.empty(self.batch_size, max_new_tokens, dtype=torch.long, device=self.device)
        out[:, :1] = self._ids
        watch_eos = bool(eos_token_id)
        for i in range(1, max_new_tokens):
            if watch_eos and bool(self._done.all()):  # one sync per token, only with EOS
                return out[:, :i]
            out[:, i : i + 1] = self.step(sampling=sampling, generator=generator)
        return out


def _unslid_layers(cache: object, config: object, max_cache_len: int) -> tuple[int | None, bool]:
    """Gives every sliding-window layer of `cache` a full-length `StaticLayer`, in place:
    transformers' sliding layer keeps a host-side token count the generator's replays
    would not advance (and calls on a kept generator would not reset), and holds fewer
    slots than the generator's masks. The window is then applied by the masks
    (`_forward`). Returns the window (None: no sliding layers) and whether full-attention
    layers are there too.

    Raises UnsupportedModelError for any attention other than full and sliding-window
    (chunked, linear, hybrid): their caches and masks are not the generator's.
    """
    from transformers.cache_utils import StaticLayer, get_layer_types_and_kwargs

    text = config.get_text_config(decoder=True)  # type: ignore[attr-defined]
    kinds, _ = get_layer_types_and_kwargs(text)
    other = sorted(set(kinds) - {"full_attention", "sliding_attention"})
    if other:
        raise UnsupportedModelError(
            f"attention layers of type {', '.join(map(repr, other))}: ria's generator runs "
            "full and sliding-window attention only"
        )
    layers = cache.layers  # type: ignore[attr-defined]
    if len(layers) != len(kinds):
        raise UnsupportedModelError(
            f"the KV cache has {len(layers)} layers for {len(kinds)} attention layers"
        )
    if "sliding_attention" not in kinds:
        return None, False
    window = getattr(text, "sliding_window", None)
    if not isinstance(window, int) or window < 1:
        raise UnsupportedModelError(f"sliding-window layers with sliding_window={window!r}")
    for i, kind in enumerate(kinds):
        if kind == "sliding_attention":
            layers[i] = StaticLayer(max_cache_len=max_cache_len)
    return window, "full_attention" in kinds


def _call_model(model: nn.Module, **kwargs: object) -> torch.Tensor:
    """The model's last-position logits `(B, vocab)` for one forward."""
    logits: torch.Tensor = model(**kwargs).logits[:, -1, :]
    return logits


def _padding(
    attention_mask: torch.Tensor | None, shape: torch.Size, device: torch.device
) -> torch.Tensor | None:
    """The prompt's padding as a bool `(B, q)` tensor, or None when there is none."""
    if attention_mask is None:
        return None
    if tuple(attention_mask.shape) != tuple(shape):
        raise InvalidArgumentError(
            f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {tuple(shape)}"
        )
    padding = attention_mask.to(device).bool()
    if bool(padding.all()):
        return None
    if not bool(padding[:, -1].all()):
        raise InvalidArgumentError("attention_mask: pad on the left (every last token real)")
    return padding


# -- generators kept across calls ----------------------------------------------------------


def model_fingerprint(model: nn.Module) -> tuple[object, ...]:
    """What a captured graph depends on: the modules and the addresses of every parameter
    and buffer. Any change (a replaced layer, `.to()`, new weights) changes it; writing
    into existing weights in place does not, and the graphs then read the new values."""
    tensors = [t.data_ptr() for t in model.parameters()]
    tensors += [t.data_ptr() for t in model.buffers()]
    modules = tuple(id(m) for m in model.modules())
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return modules, tuple(tensors), impl


class _ModelGenerators:
    def __init__(self, fingerprint: tuple[object, ...]) -> None:
        self.fingerprint = fingerprint
        self.by_key: OrderedDict[tuple[int, int, bool, bool, bool], StaticGenerator] = OrderedDict()


_GENERATORS: weakref.WeakKeyDictionary[nn.Module, _ModelGenerators] = weakref.WeakKeyDictionary()


def cached_generator(
    model: nn.Module,
    batch_size: int,
    max_cache_len: int,
    *,
    cuda_graph: bool | None = None,
    compile: bool = False,
) -> StaticGenerator:
    """The `StaticGenerator` kept for (model, batch size, cache length), made on first use.

    Kept while the model lives and is unchanged (see `model_fingerprint`); at most
    `MAX_CACHED_GENERATORS` per model, the least recently used dropped first.
    """
    fingerprint = model_fingerprint(model)
    entry = _GENERATORS.get(model)
    if entry is None or entry.fingerprint != fingerprint:
        entry = _GENERATORS[model] = _ModelGenerators(fingerprint)
    use_graphs = (
        next(model.parameters()).device.type == "cuda" if cuda_graph is None else cuda_graph
    )
    # Graphs asked for (True) and graphs by default (None) are kept apart: under None a model
    # that cannot be captured falls back to eager, under True that is an error.
    key = (batch_size, max_cache_len, use_graphs, cuda_graph is True, compile)
    gen = entry.by_key.get(key)
    if gen is None:
        while len(entry.by_key) >= MAX_CACHED_GENERATORS:
            entry.by_key.popitem(last=False)
        gen = entry.by_key[key] = StaticGenerator(
            model, batch_size, max_cache_len, cuda_graph=cuda_graph, compile=compile
        )
    entry.by_key.move_to_end(key)
    return gen


def clear_generators(model: nn.Module | None = None) -> None:
    """Drop the kept generators (their graphs and KV caches) of `model`, or of all models."""
    if model is None:
        _GENERATORS.clear()
    else:
        _GENERATORS.pop(model, None)


def _token_ids(value: int | Sequence[int] | torch.Tensor | None) -> list[int]:
    """Token ids as a list: one id (a Python, numpy or 0-d tensor int) or several."""
    if value is None:
        return []
    try:
        ids = torch.as_tensor(value).flatten()
    except (TypeError, ValueError, RuntimeError):
        ids = None
    if ids is not None and ids.numel() == 0:
        return []  # `()`: never stop early
    if ids is None or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise InvalidArgumentError(f"token ids must be ints, got {value!r}")
    return [int(v) for v in ids.tolist()]


# What transformers' `generate` samples with when neither the call nor the model's
# generation config sets a value (`GenerationConfig`'s defaults for unset fields).
_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}


def _sampling(
    config: object, temperature: float | None, top_k: int | None, top_p: float | None
) -> Sampling:
    """The sampling settings `model.generate(do_sample=True, ...)` would use: the call's,
    else the generation config's, else transformers' defaults; top_k 0 and top_p 1.0
    filter nothing, as there."""
    given = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    chosen: dict[str, object] = {}
    for name, value in given.items():
        if value is None:
            value = getattr(config, name, None)
        chosen[name] = _SAMPLING_DEFAULTS[name] if value is None else value
    k = chosen["top_k"]
    return Sampling(
        float(chosen["temperature"]),  # type: ignore[arg-type]
        None if k == 0 and not isinstance(k, bool) else k,  # type: ignore[arg-type]
        float(chosen["top_p"]),  # type: ignore[arg-type]
    )


def _check_prompt(input_ids: object) -> None:
    if not isinstance(input_ids, torch.Tensor):
        raise InvalidArgumentError(
            f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}"
        )
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise InvalidArgumentError(
            f"input_ids must be (batch, tokens) with at least one token, got "
            f"{tuple(input_ids.shape)}"
        )
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise InvalidArgumentError(f"input_ids must hold integer token ids, got {input_ids.dtype}")


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int = 32,
    *,
    attention_mask: torch.Tensor | None = None,
    do_sample: bool = False,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    eos_token_id: int | Sequence[int] | torch.Tensor | None = None,
    pad_token_id: int | None = None,
    max_cache_len: int | None = None,
    cuda_graph: bool | None = None,
    compile: bool = False,
) -> torch.Tensor:
    """Generation with a static KV cache and CUDA-graph replay; the graphs are kept for the
    next call with the same model, batch size and cache length.

    Args:
        model: transformers causal LM (dense, or after `ria.sparsify`).
        input_ids: `(B, q)` prompt token ids.
        max_new_tokens: most tokens to generate per sequence.
        attention_mask: `(B, q)`, 0 marks padding; prompts must be padded on the left.
        do_sample: sample (with `temperature`, `top_k`, `top_p`) instead of greedy. Not
            read from the generation config: greedy unless asked.
        temperature: the logits are divided by it before sampling (> 0).
        top_k: sample among the k most likely tokens (0: all).
        top_p: sample among the fewest most likely tokens whose probabilities add up to
            at least p, in (0, 1] (1.0: all).
            Each of the three left None is the model's generation config's, or
            transformers' default (1.0, 50, 1.0), as in `model.generate`; the config's
            other logits processors (repetition penalty, ...) are not applied.
        generator: the random source of sampling, on the model's device (None: torch's
            default generator).
        eos_token_id: token(s) that end a sequence (None: the model's generation config;
            `()` never stops early). Finished sequences continue with `pad_token_id`.
        pad_token_id: None: the generation config's pad token, else the first EOS, else 0.
        max_cache_len: KV-cache length; default `q + max_new_tokens` rounded up to
            `CACHE_LEN_STEP`.
        cuda_graph: replay captured graphs (False: run eagerly, on any device; None: replay
            on CUDA, eager elsewhere).
        compile: compile the model calls with `torch.compile` (inductor, `fullgraph=True`)
            before capturing them (fuses the non-GEMM work): decode steps from the first
            call, prefill from the second call with the same batch size and cache length;
            each new prompt length compiles (and captures) once.

    Returns:
        `(B, q + n)`: the prompts followed by `n <= max_new_tokens` tokens (fewer when
        every sequence stopped at EOS).
    """
    _check_prompt(input_ids)
    max_new_tokens = require_int("max_new_tokens", max_new_tokens, minimum=1)
    b, q = input_ids.shape
    config = getattr(model, "generation_config", None)
    sampling = _sampling(config, temperature, top_k, top_p) if do_sample else None
    eos = _token_ids(
        getattr(config, "eos_token_id", None) if eos_token_id is None else eos_token_id
    )
    if pad_token_id is None:
        pad_token_id = getattr(config, "pad_token_id", None)
        pad_token_id = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    if max_cache_len is None:
        max_cache_len = -(-(q + max_new_tokens) // CACHE_LEN_STEP) * CACHE_LEN_STEP
    gen = cached_generator(model, b, max_cache_len, cuda_graph=cuda_graph, compile=compile)
    new = gen.generate(
        input_ids,
        max_new_tokens,
        attention_mask=attention_mask,
        sampling=sampling,
        generator=generator,
        eos_token_id=eos,
        pad_token_id=_token_ids(pad_token_id)[0],
    )
    return torch.cat([input_ids.to(new.device), new], dim=1)
