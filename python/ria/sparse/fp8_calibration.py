"""Static activation scales for fp8 layers: one power-of-two scale per Linear input, from
the largest magnitude that input takes over calibration windows.

With a static scale the e4m3 mma.sp kernel quantizes the tokens itself as it loads them,
so no quantization kernel (and launch) runs before each fp8 GEMM; the other fp8 kernels
still quantize first, without the per-token reduction. Inputs beyond `margin` times the
calibrated maximum saturate at +-448 * scale. Measured on SmolLM2-135M (bf16, every decoder
Linear in fp8, `benches/fp8_static_scales.py`): perplexity +0.2% against per-token scales.

    scales = calibrate_input_scales(model, windows)
    ria.sparsify(model, dtype="fp8", input_scales=scales)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import InvalidArgumentError
from .fp8 import static_input_scale

__all__ = ["calibrate_input_scales", "check_input_scales"]


@torch.no_grad()
def calibrate_input_scales(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    margin: float = 1.0,
    batch_size: int = 1,
    progress: bool = True,
) -> dict[str, float]:
    """The static input scale of every Linear of `model` but the output embedding, by name.

    Runs `model(windows[i : i + batch_size])` over the token-id windows `(n, seqlen)`
    (int64, e.g. `ria.pruning.calibration_windows`; moved to the model's device) and records
    each Linear's largest input magnitude `amax`; its scale is `fp8.static_input_scale(amax,
    margin)`, a power of two (a float). Call it on the model as it will be converted (after
    pruning and before `sparsify`). A Linear the windows never reach is left out, with a
    warning (`sparsify` then refuses a model missing a converted layer's scale).
    """
    if windows.dim() != 2 or windows.dtype != torch.int64 or windows.shape[0] < 1:
        raise InvalidArgumentError(
            f"windows must be int64 token ids (n >= 1, seqlen), got {tuple(windows.shape)} "
            f"{windows.dtype}"
        )
    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be >= 1, got {batch_size}")
    static_input_scale(0.0, margin)  # checks margin before the model runs
    get_out_emb = getattr(model, "get_output_embeddings", None)
    out_emb = get_out_emb() if get_out_emb is not None else None
    linears = {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and mod is not out_emb
    }
    amax: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in linears.items():

        def record(_: nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
            seen = args[0].detach().abs().amax().float()  # no sync: kept on the device
            amax[name] = seen if name not in amax else torch.maximum(amax[name], seen)

        hooks.append(mod.register_forward_pre_hook(record))
    device = next(model.parameters()).device
    try:
        starts = range(0, windows.shape[0], batch_size)
        for i in tqdm(starts, desc="fp8 scales", unit="batch", disable=not progress):
            model(windows[i : i + batch_size].to(device))
    finally:
        for h in hooks:
            h.remove()
    missing = [name for name in linears if name not in amax]
    if missing:
        warnings.warn(
            f"calibrate_input_scales: {len(missing)} Linear(s) never ran on the windows and "
            f"have no scale: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}",
            stacklevel=2,
        )
    found = {name: float(a) for name, a in amax.items()}
    bad = [name for name, a in found.items() if not math.isfinite(a)]
    if bad:
        raise InvalidArgumentError(f"non-finite inputs during calibration at {', '.join(bad[:5])}")
    return {name: float(static_input_scale(a, margin)) for name, a in found.items()}


def check_input_scales(scales: Mapping[str, float], needed: list[str]) -> None:
    """Raise `InvalidArgumentError` unless `scales` holds a positive finite power of two for
    every name in `needed` (the layers about to be converted)."""
    missing = [name for name in needed if name not in scales]
    if missing:
        raise InvalidArgumentError(
            f"input_scales has no scale for {len(missing)} converted layer(s): "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} "
            "(calibrate_input_scales on this model, after pruning)"
        )
    for name in needed:
        v = scales[name]
        # (2**-100 .. 2**100: the kernels take the reciprocal from the exponent bits)
        if not (2.0**-100 <= v <= 2.0**100 and math.frexp(v)[0] == 0.5):
            raise InvalidArgumentError(
                f"input_scales[{name!r}] = {v}: not a power of two in [2**-100, 2**100]"
            )
