"""Static activation scales for fp8: what one power-of-two scale per Linear input, taken
from calibration, does to quality against the per-token scales `Fp8Linear` computes at
every call. A static scale would let a GEMM kernel cast its bf16 input to e4m3 as it loads
it, with no quantization kernel (and launch) before each GEMM.

    python benches/fp8_static_scales.py

SmolLM2-135M in bf16 on the CPU, every decoder Linear in fp8 (e4m3 weights, per-row
power-of-two scales), perplexity by benches/quality.py's protocol (wiki_eval 16x512). The
static scale of a Linear is `fp8.pow2_scale(margin * amax)`, `amax` the largest input
magnitude over the pruning calibration windows (brown_calib 64x256, seed 0); inputs beyond
the range saturate at +-448. Cells: bf16, fp8 with per-token scales (`quantize_linears`,
the exact reference the GPU kernels match), and fp8 with static scales at margins 1 and 2.
Writes benches/results/fp8_static_scales.json.
"""

from __future__ import annotations

import copy
import json
import platform
import time
from pathlib import Path

import torch
from quality import LOADERS, SETTINGS, evaluate
from torch import nn

from ria.pruning import calibration_windows
from ria.sparse.fp8 import E4M3, E4M3_MAX, Fp8Weight, pow2_scale, quantize_weight
from ria.sparse.fp8_linear import quantize_linears

RESULT = Path(__file__).parent / "results" / "fp8_static_scales.json"
MARGINS = (1.0, 2.0)


class StaticScaleFp8Linear(nn.Module):
    """`fp8_linear_reference` with the input quantized by one fixed power-of-two scale
    (saturating) instead of one per token."""

    def __init__(self, linear: nn.Linear, amax: float, margin: float) -> None:
        super().__init__()
        self.weight: Fp8Weight = quantize_weight(linear.weight)
        self.bias = linear.bias
        self.scale, self.inv = pow2_scale(torch.tensor(margin * amax))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = (x.float() * self.inv).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
        y = (q.float() @ self.weight.values.float().t()) * self.scale * self.weight.scale
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)


def input_amax(model: nn.Module, names: list[str], windows: torch.Tensor) -> dict[str, float]:
    """The largest input magnitude of each Linear in `names` over the calibration windows."""
    amax = dict.fromkeys(names, 0.0)
    hooks = []
    for name in names:

        def record(_: nn.Module, args: tuple, name: str = name) -> None:
            amax[name] = max(amax[name], float(args[0].detach().abs().amax()))

        hooks.append(model.get_submodule(name).register_forward_pre_hook(record))
    with torch.no_grad():
        for row in windows:
            model(row[None])
    for h in hooks:
        h.remove()
    return amax


def main() -> None:
    torch.manual_seed(0)
    model, tokenizer = LOADERS["smollm2"]()
    model = model.to(torch.bfloat16).eval()
    results: dict = {
        "settings": {**SETTINGS, "margins": MARGINS},
        "perplexity": {},
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
    }

    def cell(label: str, m: nn.Module) -> None:
        t0 = time.perf_counter()
        results["perplexity"][label] = ppl = evaluate(m, tokenizer)
        print(f"{label:<24} ppl {ppl:8.3f}  ({time.perf_counter() - t0:.0f} s)", flush=True)

    cell("bf16", model)
    dynamic = copy.deepcopy(model)
    names = quantize_linears(dynamic, sparse=False)
    cell("fp8, per-token scales", dynamic)
    del dynamic
    windows = calibration_windows(
        SETTINGS["calibration"], tokenizer, SETTINGS["nsamples"], SETTINGS["seqlen"],
        SETTINGS["seed"],
    )  # fmt: skip
    amax = input_amax(model, names, windows)
    results["input_amax"] = amax
    for margin in MARGINS:
        static = copy.deepcopy(model)
        for name in names:
            linear = static.get_submodule(name)
            assert isinstance(linear, nn.Linear)
            parent, _, child = name.rpartition(".")
            setattr(
                static.get_submodule(parent),
                child,
                StaticScaleFp8Linear(linear, amax[name], margin),
            )
        cell(f"fp8, static scales x{margin:g}", static)
    ppl = results["perplexity"]
    for margin in MARGINS:
        key = f"fp8, static scales x{margin:g}"
        results[f"static_x{margin:g}_over_per_token"] = ppl[key] / ppl["fp8, per-token scales"]
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "input_amax"}, indent=2))


if __name__ == "__main__":
    main()
