"""The Triton kernels behind `fp8_kernels` (device code; that module describes them and
holds the host side). Imported only when triton is installed. Parameters stay unannotated
(Triton reads annotations), so mypy is told not to ask for types in this file.
"""

# mypy: disable-error-code="no-untyped-def,untyped-decorator"

from __future__ import annotations

import triton
import triton.language as tl

from .fp8 import MANTISSA_175, MIN_AMAX

# Triton reads only constexpr globals inside a kernel.
_MIN_AMAX = tl.constexpr(MIN_AMAX)
_MANTISSA_175 = tl.constexpr(MANTISSA_175)


@triton.jit
def _no_dependents():
    pass


# Grid dependency control (Triton >= 3.3). Referenced through this name, never as
# tl.extra.cuda.<name> in a kernel: older Triton resolves such attribute chains when it
# hashes a kernel, and would fail on the missing name.
_GDC = getattr(getattr(getattr(tl, "extra", None), "cuda", None), "gdc_launch_dependents", None)
HAS_LAUNCH_DEPENDENTS = _GDC is not None
_launch_dependents = _GDC if _GDC is not None else _no_dependents


@triton.jit
def quantize_kernel(
    x_ptr, q_ptr, s_ptr, M, K, stride_x, BLOCK_K: tl.constexpr, LAUNCH_DEPENDENTS: tl.constexpr
):
    if LAUNCH_DEPENDENTS:  # a programmatic launch after this one may start now (sm_90+)
        _launch_dependents()
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    inside = offs < K
    if row < M:
        x = tl.load(x_ptr + row * stride_x + offs, mask=inside, other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(x), axis=0), _MIN_AMAX)
        bits = amax.to(tl.int32, bitcast=True)
        e = ((bits >> 23) & 0xFF) - 135 + ((bits & 0x7FFFFF) > _MANTISSA_175).to(tl.int32)
        poison = tl.sum(x * 0.0, axis=0)  # NaN when the row holds NaN or inf (fp8.pow2_scale)
        scale = ((e + 127) << 23).to(tl.float32, bitcast=True) + poison
        inv = ((127 - e) << 23).to(tl.float32, bitcast=True) + poison
        tl.store(q_ptr + row * K + offs, (x * inv).to(tl.float8e4nv), mask=inside)
        tl.store(s_ptr + row, scale)
    else:  # padding rows: zeros, scale 0
        zero = tl.zeros([BLOCK_K], tl.float32).to(tl.float8e4nv)
        tl.store(q_ptr + row * K + offs, zero, mask=inside)
        tl.store(s_ptr + row, 0.0)


@triton.jit
def scale_kernel(
    acc_ptr, sx_ptr, sw_ptr, b_ptr, out_ptr, M, N, stride_am, stride_an,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = (rm[:, None] < M) & (rn[None, :] < N)
    idx = rm[:, None] * N + rn[None, :]
    a_idx = rm[:, None] * stride_am + rn[None, :] * stride_an
    acc = tl.load(acc_ptr + a_idx, mask=inside, other=0.0).to(tl.float32)
    sx = tl.load(sx_ptr + rm, mask=rm < M, other=0.0)
    sw = tl.load(sw_ptr + rn, mask=rn < N, other=0.0)
    y = acc * sx[:, None] * sw[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + idx, y.to(out_ptr.dtype.element_ty), mask=inside)
