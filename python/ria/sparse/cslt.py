"""cuSPARSELt through torch's private ops: availability, compression, algorithm search and a
linear `y = x @ W.T (+ bias)` with the transposes fused.

cuSPARSELt computes `D = A @ B` with `A` the compressed 2:4 weight `(N, K)`. Passing `x.t()`
(a `(K, M)` view of the row-major `(M, K)` activations, so no copy: cuSPARSELt reads it as
a transposed operand) and `transpose_result=True` gives `(W x^T)^T = x W^T` written directly
as a row-major `(M, N)` tensor — the same trick as torch's `SparseSemiStructuredTensorCUSPARSELT`
but without its padding copies, except where cuSPARSELt needs them (M not a multiple of 8).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .format import COLS_PER_WORD, MMA_PAIR_COLS, Compact24, nibbles, unpack_24
from .graphs import time_call

# cuSPARSELt needs the dense operand's rows/cols/leading dimension to be multiples of 8
# for 16-bit types; torch's wrapper pads to the same (dense_min_rows = 8).
M_ALIGN = 8
# The compressed weight: rows and columns multiples of 16 (torch's sparse_min_rows/cols).
W_ALIGN = 16

__all__ = [
    "CsltConfig",
    "alignment_status",
    "cslt_best_config",
    "cslt_compress",
    "cslt_linear",
    "cslt_search",
    "cslt_shape_status",
    "cslt_status",
    "cslt_view",
    "share_cslt_buffer",
]


@dataclass(frozen=True)
class CsltConfig:
    """A cuSPARSELt matmul algorithm, as found by its search (defaults: alg 0, no split-K)."""

    alg_id: int = 0
    split_k: int = 1
    split_k_mode: int = -1


def cslt_status(device: torch.device | None = None) -> str | None:
    """None if cuSPARSELt can run on `device` (default: the current CUDA device), else why not."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if not torch.backends.cusparselt.is_available():
        return "this torch build has no cuSPARSELt"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"cuSPARSELt needs compute capability >= 8.0, device has {major}.x"
    return None


def alignment_status(out_features: int, in_features: int, align: int, kernel: str) -> str | None:
    """None if both sides of an `(out, in)` weight are multiples of `align`, else why
    `kernel` cannot take it."""
    if out_features % align or in_features % align:
        return f"{kernel} needs both dimensions multiples of {align}"
    return None


def cslt_shape_status(out_features: int, in_features: int) -> str | None:
    return alignment_status(out_features, in_features, W_ALIGN, "cuSPARSELt")


def cslt_compress(weight: torch.Tensor) -> torch.Tensor:
    """cuSPARSELt's opaque compressed form of a 2:4 fp16/bf16 CUDA weight `(N, K)`.

    It holds the `N * K / 2` kept values first (row-major), then metadata.
    """
    return torch._cslt_compress(weight.detach().contiguous())


def _values_view(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The kept-values region of a compressed weight as an `(N, K/2)` view (no copy)."""
    count = out_features * in_features // 2
    return packed.reshape(-1)[:count].view(out_features, in_features // 2)


def _meta_view(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The metadata region of a compressed weight as a 1-D int32 view (no copy); its order
    is `format.cslt_nibble_index` (checked per layer before use)."""
    count = out_features * in_features // 2
    return packed.reshape(-1)[count:].view(torch.int32)


def cslt_view(packed: torch.Tensor, out_features: int, in_features: int) -> Compact24:
    """cuSPARSELt's compressed buffer of an `(N, K)` weight as a "cslt" `Compact24` of views
    (no copy, no check: `share_cslt_buffer` checks a layer's buffer once)."""
    values = _values_view(packed, out_features, in_features)
    meta = _meta_view(packed, out_features, in_features)
    return Compact24(values=values, meta=meta, in_features=in_features, layout="cslt")


def share_cslt_buffer(compact: Compact24, packed: torch.Tensor) -> Compact24:
    """`compact` reading its values, and its indices where possible, straight from
    cuSPARSELt's compressed buffer `packed` of the same weight (fp16/bf16, or e4m3 with
    K % 64 == 0 for the tiled metadata), so a layer holds one copy.

    Everything this runtime knows about that buffer's layout is here. Each layout is
    checked on this layer's data before it is used: the whole buffer (values and tiled
    metadata) when it decodes to the same weight with two increasing indices per group (as
    mma.sp's ordered metadata needs; cuSPARSELt may pick other zero columns than `pack_24`
    in groups with fewer than two nonzeros), else the values alone when they match;
    otherwise `compact` is kept.
    """
    if compact.layout == "cslt" or compact.values.shape[1] * 2 != compact.in_features:
        return compact
    n, k = compact.out_features, compact.in_features
    tiled = cslt_view(packed, n, k)
    values = tiled.values
    e4m3 = values.dtype == torch.float8_e4m3fn
    if k % (MMA_PAIR_COLS if e4m3 else COLS_PER_WORD) == 0 and _same_weight(tiled, compact):
        return tiled
    if _same_bits(values, compact.values):
        return Compact24(values=values, meta=compact.meta, in_features=k)
    return compact


def _same_weight(tiled: Compact24, compact: Compact24) -> bool:
    """`tiled` (cuSPARSELt's buffer) stands for the same weight as `compact`, with valid
    ordered index pairs (`i0 < i1`) in every group."""
    nib = nibbles(tiled)
    if not bool(((nib & 3) < (nib >> 2)).all()):
        return False
    if torch.equal(nib, nibbles(compact)) and _same_bits(tiled.values, compact.values):
        return True
    return _same_bits(unpack_24(tiled), unpack_24(compact))


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal tensors, bit for bit (torch.equal has no e4m3 kernel)."""
    if a.dtype == torch.float8_e4m3fn and b.dtype == a.dtype:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return torch.equal(a, b)


def _pad_rows(x: torch.Tensor) -> torch.Tensor:
    m = x.shape[0]
    pad = (-m) % M_ALIGN
    return torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x


def cslt_search(
    packed: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[CsltConfig, int | None]:
    """cuSPARSELt's own search for `x @ W.T` at `x`'s token count.

    Returns the best configuration found (algorithm, split-K) and the largest valid
    algorithm id (None where torch does not report it). `x`: `(M, K)`; the search runs the
    matmul several times on the current stream.
    """
    xt = _pad_rows(x.contiguous()).t()
    search = getattr(getattr(torch._C, "_cusparselt", None), "mm_search", None)
    if search is not None:  # torch >= 2.6: alg id, split-K, split-K mode, max alg id
        alg, split_k, mode, max_alg = search(packed, xt, bias, None, None, True)
        return CsltConfig(int(alg), int(split_k), int(mode)), int(max_alg)
    alg = torch._cslt_sparse_mm_search(packed, xt, bias, transpose_result=True)
    return CsltConfig(int(alg)), None


def cslt_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: CsltConfig = CsltConfig(),
) -> torch.Tensor:
    """`x @ W.T + bias` for contiguous `x` `(M, K)`; returns a contiguous `(M, N)` tensor."""
    m = x.shape[0]
    xp = _pad_rows(x)
    extra: dict[str, Any] = {}
    if config.split_k > 1:  # the search reports split_k <= 1 when it does not split
        extra = {"split_k": config.split_k, "split_k_mode": config.split_k_mode}
    y = torch._cslt_sparse_mm(
        packed, xp.t(), bias, transpose_result=True, alg_id=config.alg_id, **extra
    )
    return y if xp is x else y[:m]


def cslt_best_config(
    packed: Sequence[torch.Tensor],
    x: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    sweep: bool = True,
    max_algs: int = 64,
) -> CsltConfig:
    """The fastest cuSPARSELt configuration for `x @ W.T` on weights of one shape.

    Starts from cuSPARSELt's own search (on `packed[0]`); with `sweep`, also times that
    configuration without split-K and every algorithm id (up to `max_algs`) under CUDA-graph
    replay over `packed` in rotation, because the search times eagerly and can pick a split-K
    that loses inside a graph.
    """
    found, max_alg = cslt_search(packed[0], x, bias)
    if not sweep:
        return found
    configs = {found, CsltConfig(found.alg_id)}
    configs |= {CsltConfig(a) for a in range(min(max_alg or 0, max_algs - 1) + 1)}
    best, best_ms = found, float("inf")
    for cfg in sorted(configs, key=lambda c: (c.alg_id, c.split_k)):

        def call(cfg: CsltConfig = cfg) -> None:
            for p in packed:
                cslt_linear(x, p, bias, cfg)

        try:
            ms = time_call(call, iters=3, repeats=1)
        except RuntimeError:  # an algorithm id this shape does not support
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    return best
