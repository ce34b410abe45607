"""The fp8 (e4m3) format and its exact CPU reference.

A weight `(N, K)` is stored as e4m3 values with one scale per output row; activations
`(M, K)` are quantized per token when the layer runs (dynamic, no calibration). A 2:4
weight keeps its zeros, so its e4m3 form is 2:4 again and compresses like a bf16 one.

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
    "apply_scales",
    "fp8_linear_reference",
    "fp8_quantized_reference",
    "fp8_unscaled_reference",
    "pow2_scale",
    "quantize_rows",
    "quantize_weight",
    "unscaled_dtype",
]


def pow2_scale(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale `2**e` for rows of largest magnitude `amax` (fp32, any shape) and its
    reciprocal, both fp32 and exact: `e` is the smallest integer with `amax <= 448 * 2**e`.

    Computed on the float's bits (exponent and mantissa), the same integer arithmetic the
    GPU quantization kernel does, so both give identical scales. A NaN or infinite `amax`
    gives NaN for both (its bits would read as a finite 2**120), so the row's output is
    NaN, as a Linear's would be, not saturated values.
    """
    amax = amax.float()
    bits = amax.clamp_min(MIN_AMAX).view(torch.int32)
    # amax = 1.m * 2**(exp - 127) fits 448 * 2**(exp - 135) = 1.75 * 2**(exp - 127) iff m <= .75
    exp = (bits >> 23) & 0xFF
    e = exp - 135 + ((bits & 0x7FFFFF) > MANTISSA_175).int()
    poison = amax * 0  # 0, or NaN where amax is NaN or inf
    scale = ((e + 127) << 23).view(torch.float32) + poison
    inv = ((127 - e) << 23).view(torch.float32) + poison
    return scale, inv


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of `x` `(R, K)` as e4m3 `(R, K)` and their power-of-two scales `(R,)` fp32:
    `x ~= q.float() * scale[:, None]`. NaN or inf in a row makes that row's scale and
    values NaN (the kernels do the same; no check, which would cost a sync)."""
    if x.dim() != 2:
        raise InvalidArgumentError(f"quantize_rows: x must be 2-D, got shape {tuple(x.shape)}")
    xf = x.float()
    scale, inv = pow2_scale(xf.abs().amax(dim=1))
    return (xf * inv[:, None]).to(E4M3), scale


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
) -> torch.Tensor:
    """`x @ W.T + bias` as the fp8 kernels compute it, `x` `(..., K)` -> `(..., N)`.

    `x` is quantized per token (`quantize_rows`), the e4m3 products are summed in fp32
    (exact products: 4-bit significands), the scales multiplied in (exact: powers of two),
    the bias added in fp32, and the result cast once to `out_dtype` (default: `x`'s dtype).
    """
    k = weight.in_features
    if x.shape[-1] != k:
        raise InvalidArgumentError(f"x has {x.shape[-1]} features, the weight expects {k}")
    y = fp8_quantized_reference(
        *quantize_rows(x.reshape(-1, k)), weight, bias, out_dtype or x.dtype
    )
    return y.view(*x.shape[:-1], weight.out_features)


def fp8_quantized_reference(
    q: torch.Tensor,
    q_scale: torch.Tensor,
    weight: Fp8Weight,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """`fp8_linear_reference` on tokens already quantized (`quantize_rows`): `q` `(M, K)`
    e4m3, `q_scale` `(M,)` fp32 -> `(M, N)` in `out_dtype`."""
    return apply_scales(fp8_unscaled_reference(q, weight), q_scale, weight.scale, bias, out_dtype)


def fp8_unscaled_reference(q: torch.Tensor, weight: Fp8Weight) -> torch.Tensor:
    """The unscaled product of e4m3 tokens `q` `(M, K)` and the weight's e4m3 values,
    `(M, N)` fp32: exact products, summed in fp32."""
    return q.float() @ weight.values.float().t()


def unscaled_dtype(out_dtype: torch.dtype, has_bias: bool) -> torch.dtype:
    """The dtype an unscaled e4m3 product `(M, N)` is kept in before `apply_scales`, for an
    output in `out_dtype`: bf16 for bf16 without bias (scaling it by powers of two later is
    exact, so the output is rounded once), else fp32 (adding a bias to a rounded product
    would round twice: up to 2 bf16 ulps off; the unscaled sums, up to 448**2 * K,
    overflow fp16)."""
    return out_dtype if out_dtype == torch.bfloat16 and not has_bias else torch.float32


def apply_scales(
    acc: torch.Tensor,
    q_scale: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """An unscaled e4m3 product `acc` `(M, N)` (fp32, or `unscaled_dtype`) times the token
    scales `q_scale` `(M,)` and the weight's row scales `scale` `(N,)`, plus `bias`, in fp32,
    cast once to `out_dtype`: the reference's epilogue, and what a compiled `Fp8Linear`
    traces after an unscaled kernel so inductor fuses it into the kernel reading its output."""
    y = acc.float() * q_scale[:, None] * scale[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)
