"""The fp8 (e4m3) format and its exact CPU reference.

A weight `(N, K)` is stored as e4m3 values with one scale per output row; activations
`(M, K)` are quantized per token when the layer runs (dynamic, no calibration), or with one
static scale per layer input taken from calibration (`static_input_scale`; values beyond
its range saturate at +-448). A 2:4 weight keeps its zeros, so its e4m3 form is 2:4 again
and compresses like a bf16 one.

Every scale is a power of two, `2**e` with the smallest `e` such that the row's largest
magnitude fits e4m3's range (448). So dividing by a scale and multiplying it back are exact
in fp32 and bf16: the only roundings are the casts to e4m3 (round to nearest even) and the
final cast of the fp32 sum to the output dtype. The GPU kernels apply the scales after the
accumulation, at any point (even to cuSPARSELt's bf16 output), and still equal
`fp8_linear_reference` up to the order of the fp32 sums. A power-of-two scale costs at most
one binade of e4m3's range (the row maximum lands in [224, 448]), not precision: e4m3's
relative step is the same in every binade above its subnormals.

`fp8_linear_reference` is the definition; `ria.sparse.fp8_linear.Fp8Linear` runs it on the
CPU and runs kernels that must match it on CUDA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import InvalidArgumentError

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # = 1.75 * 2**8, the largest finite e4m3fn value
# A row whose largest magnitude is below this is scaled as if it were this (its values
# then round to e4m3 subnormals or zero), so every exponent below stays in fp32's normal range.
MIN_AMAX = 2.0**-60
MANTISSA_175 = 0x600000  # fp32 mantissa bits of 1.75

__all__ = [
    "E4M3",
    "E4M3_MAX",
    "MANTISSA_175",
    "MIN_AMAX",
    "Fp8Weight",
    "fp8_linear_reference",
    "pow2_scale",
    "quantize_rows",
    "quantize_static",
    "quantize_weight",
    "static_input_scale",
]


def pow2_scale(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale `2**e` for rows of largest magnitude `amax` (fp32, any shape) and its
    reciprocal, both fp32 and exact: `e` is the smallest integer with `amax <= 448 * 2**e`.

    Computed on the float's bits (exponent and mantissa), the same integer arithmetic the
    GPU quantization kernel does, so both give identical scales.
    """
    bits = amax.float().clamp_min(MIN_AMAX).view(torch.int32)
    # amax = 1.m * 2**(exp - 127) fits 448 * 2**(exp - 135) = 1.75 * 2**(exp - 127) iff m <= .75
    exp = (bits >> 23) & 0xFF
    e = exp - 135 + ((bits & 0x7FFFFF) > MANTISSA_175).int()
    scale = ((e + 127) << 23).view(torch.float32)
    inv = ((127 - e) << 23).view(torch.float32)
    return scale, inv


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of `x` `(R, K)` as e4m3 `(R, K)` and their power-of-two scales `(R,)` fp32:
    `x ~= q.float() * scale[:, None]`. NaN or inf in a row makes that row's scale and
    values non-finite (the kernels do the same; no check, which would cost a sync)."""
    if x.dim() != 2:
        raise InvalidArgumentError(f"quantize_rows: x must be 2-D, got shape {tuple(x.shape)}")
    xf = x.float()
    scale, inv = pow2_scale(xf.abs().amax(dim=1))
    return (xf * inv[:, None]).to(E4M3), scale


def static_input_scale(amax: float, margin: float = 1.0) -> torch.Tensor:
    """The static activation scale for a layer input whose largest magnitude over the
    calibration data is `amax`: `pow2_scale(margin * amax)`, a one-element fp32 tensor
    (a power of two), so inputs up to `margin * amax` quantize without saturating."""
    if not math.isfinite(amax) or amax < 0:
        raise InvalidArgumentError(f"amax must be finite and >= 0, got {amax}")
    if not margin >= 1.0 or not math.isfinite(margin):
        raise InvalidArgumentError(f"margin must be finite and >= 1, got {margin}")
    scale, _ = pow2_scale(torch.tensor([margin * amax], dtype=torch.float32))
    return scale


def _check_static_scale(scale: torch.Tensor) -> None:
    if scale.shape != (1,) or scale.dtype != torch.float32:
        raise InvalidArgumentError(
            f"a static input scale is a (1,) fp32 tensor, got {tuple(scale.shape)} {scale.dtype}"
        )


def quantize_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`x` `(R, K)` as e4m3 with one power-of-two `scale` `(1,)` fp32 (`static_input_scale`):
    `x / scale` rounded to nearest even, saturating at +-448 (`cvt.rn.satfinite` on the GPU;
    torch's cast alone would turn out-of-range values into NaN). Exact but for that rounding:
    dividing by a power of two is."""
    _check_static_scale(scale)
    inv = 1.0 / scale.float()  # exact: a power of two
    return (x.float() * inv).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


@dataclass(frozen=True)
class Fp8Weight:
    """A linear weight in e4m3 with one power-of-two scale per output row.

    values: `(N, K)` float8_e4m3fn, row-major (a 2:4 weight keeps its zeros);
    scale: `(N,)` float32, `W ~= values.float() * scale[:, None]`.
    """

    values: torch.Tensor
    scale: torch.Tensor

    @property
    def out_features(self) -> int:
        return int(self.values.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.values.shape[1])

    def dequantize(self) -> torch.Tensor:
        """The weight this form stands for, `(N, K)` fp32 (exact)."""
        return self.values.float() * self.scale[:, None]


def quantize_weight(weight: torch.Tensor, *, name: str = "weight") -> Fp8Weight:
    """`weight` `(N, K)` (any float dtype, any device) as an `Fp8Weight` on the same device.

    Zeros stay zeros, so a 2:4 weight stays 2:4. A non-finite weight raises
    `InvalidArgumentError` naming `name` (weights are checked once, here).
    """
    if weight.dim() != 2:
        raise InvalidArgumentError(f"{name}: expected a 2-D weight, got {tuple(weight.shape)}")
    w = weight.detach()
    if not bool(torch.isfinite(w).all()):
        raise InvalidArgumentError(f"{name}: weight has NaN or inf values; cannot quantize")
    values, scale = quantize_rows(w)
    return Fp8Weight(values.contiguous(), scale.contiguous())


def fp8_linear_reference(
    x: torch.Tensor,
    weight: Fp8Weight,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    input_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x @ W.T + bias` as the fp8 kernels compute it, `x` `(..., K)` -> `(..., N)`.

    `x` is quantized per token (`quantize_rows`) or, given `input_scale` `(1,)` fp32, with
    that static scale (`quantize_static`); the e4m3 products are summed in fp32 (exact
    products: 4-bit significands), the scales multiplied in (exact: powers of two), the
    bias added in fp32, and the result cast once to `out_dtype` (default: `x`'s dtype).
    """
    k = weight.in_features
    if x.shape[-1] != k:
        raise InvalidArgumentError(f"x has {x.shape[-1]} features, the weight expects {k}")
    x2 = x.reshape(-1, k)
    if input_scale is None:
        qx, sx = quantize_rows(x2)
    else:
        qx, sx = quantize_static(x2, input_scale), input_scale.float().expand(x2.shape[0])
    acc = qx.float() @ weight.values.float().t()
    y = acc * sx[:, None] * weight.scale[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype or x.dtype).view(*x.shape[:-1], weight.out_features)
