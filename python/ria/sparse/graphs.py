"""CUDA-graph helpers: capture a call once, replay it without host overhead, and time it.

Sparse kernels only pay off without per-call host cost (eager cuSPARSELt spends ~0.5 ms of
host time per matmul on plan set-up), so every timing here is of graph replays, dense and
sparse alike.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

import torch

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE  # what graph_pool_handle() and CUDAGraph.pool() return

T = TypeVar("T")

__all__ = ["capture", "graph_mode", "rotation_time_us", "time_call", "time_graph"]

_warming = threading.local()  # .active: `capture` is running its warm-up calls


_streams: dict[int, torch.cuda.Stream] = {}


def _warmup_stream() -> torch.cuda.Stream:
    """One side stream per device for every warm-up: cuBLAS keeps a workspace (tens of MB,
    from torch's allocator, never freed) per stream it runs on, so a fresh stream per
    capture would leak one per timing (~0.4 GiB over a 7B `sparsify`, measured)."""
    device = torch.cuda.current_device()
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device)
    return _streams[device]


def graph_mode() -> bool:
    """True while a CUDA graph is captured on this stream, or `capture` warms up the call it
    will capture: layers then run the kernels planned for graphs, so the warm-up compiles
    and tunes exactly what the capture records."""
    return getattr(_warming, "active", False) or torch.cuda.is_current_stream_capturing()


def capture(
    fn: Callable[[], T], *, warmup: int = 2, pool: _POOL_HANDLE | None = None
) -> tuple[torch.cuda.CUDAGraph, T]:
    """Run `fn` `warmup` times on a side stream (compiles kernels, runs autotuning, creates
    library handles), then capture one call. Returns the graph and `fn`'s static output,
    which every `graph.replay()` rewrites in place."""
    stream = _warmup_stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _warming.active = True
        try:
            for _ in range(warmup):
                fn()
        finally:
            _warming.active = False
    caller_stream = torch.cuda.current_stream()
    caller_stream.wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    pool = torch.cuda.graph_pool_handle() if pool is None else pool
    try:
        with torch.cuda.graph(graph, pool=pool):
            out = fn()
    except BaseException:
        _undo_failed_capture(caller_stream, pool)
        raise
    return graph, out


def _undo_failed_capture(caller_stream: torch.cuda.Stream, pool: _POOL_HANDLE) -> None:
    """Before torch 2.12 (pytorch PR #180395), `capture_end` raised on a capture that failed
    (a host sync inside it) before it finished: the allocator kept a capture underway (the
    next `empty_cache`, which every capture starts with, fails `captures_underway.empty()`),
    the device's default CUDA generator stayed in capture mode (every later random op on the
    device raises "Offset increment outside graph capture"), and `torch.cuda.graph` left the
    capture stream current. Undo all three; on a torch that finished, ending the allocator's
    capture again raises and is ignored, and the small capture that ends the generator's
    capture mode (capture_begin starts it, a completed capture_end ends it) changes nothing."""
    torch.cuda.set_stream(caller_stream)
    end_routing = getattr(torch._C, "_cuda_endAllocateToPool", None) or getattr(
        torch._C, "_cuda_endAllocateCurrentStreamToPool", None
    )  # private (no public way to undo a failed capture), under its newer or older name
    if end_routing is not None:
        with contextlib.suppress(RuntimeError):
            end_routing(caller_stream.device_index, pool)
    with contextlib.suppress(RuntimeError), torch.cuda.graph(torch.cuda.CUDAGraph()):
        torch.zeros(1, device=caller_stream.device)  # a broken context: the caller's error stands


def time_graph(graph: torch.cuda.CUDAGraph, *, iters: int = 20, repeats: int = 3) -> float:
    """Median over `repeats` of the mean milliseconds per replay over `iters` replays."""
    graph.replay()  # warm: first replay uploads the graph
    torch.cuda.synchronize()
    samples: list[float] = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / iters)
    samples.sort()
    return samples[len(samples) // 2]


def time_call(fn: Callable[[], object], *, iters: int = 20, repeats: int = 3) -> float:
    """Milliseconds per call of `fn` under CUDA-graph replay (see `capture`, `time_graph`)."""
    graph, _ = capture(fn)
    try:
        return time_graph(graph, iters=iters, repeats=repeats)
    finally:
        del graph


def rotation_time_us(
    call_one: Callable[[T], object], items: Sequence[T], *, iters: int = 20, repeats: int = 3
) -> float:
    """Microseconds per `call_one(item)`, called on every item of `items` in turn under
    CUDA-graph replay: copies of a weight in rotation, so each call streams its weight
    from memory as a model's layers do instead of finding it in L2."""

    def call() -> None:
        for item in items:
            call_one(item)

    return 1000.0 * time_call(call, iters=iters, repeats=repeats) / len(items)
