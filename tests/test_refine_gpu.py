"""N:M refinement on the GPU (`ria.pruning.refine_gpu`) against the Rust core's
`ria.refine_mask`, its reference: the same swap rule, so the same masks up to float32
near-ties, an exact N:M pattern and an error that never rises. On the CPU the kernel
runs in Triton's interpreter (in a subprocess: the mode is read at import)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from helpers import CUDA, needs_cuda, tiny_model

import ria

_CHECK = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch
    import ria
    from ria.pruning.refine_gpu import refine_nm_on_gpu

    def check(rows, cols, n, m, device, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(3 * cols, cols, generator=g) * torch.randn(cols, generator=g).exp()
        gram = x.T @ x
        w = torch.randn(rows, cols, generator=g)
        first = ria.nm_mask(ria.magnitude_score(w), n, m)
        ref_keep, ref = ria.refine_mask(w, gram, first, n, m)
        keep, got = refine_nm_on_gpu(
            w.to(device), gram.to(device), torch.from_numpy(first).to(device), n, m
        )
        keep = keep.cpu().numpy()
        assert (keep.reshape(rows, -1, m).sum(-1) == n).all(), "pattern"
        assert got.error_after <= got.error_before, (got.error_after, got.error_before)
        assert got.error_before == float(np.float32(ref.error_before)) or abs(
            got.error_before / ref.error_before - 1) < 1e-5, (got.error_before, ref.error_before)
        assert got.error_after <= ref.error_after * (1 + 1e-4), (got.error_after, ref.error_after)
        assert got.swaps > 0 and (keep == ref_keep).mean() > 0.99, (keep == ref_keep).mean()

    device = sys.argv[1]
    # 136 columns: a partial last block of the kernel's 128
    for rows, cols, n, m, seed in [(20, 136, 2, 4, 0), (9, 128, 4, 8, 1), (5, 64, 1, 2, 2)]:
        check(rows, cols, n, m, device, seed)
    if device == "cuda":
        check(300, 1088, 2, 4, "cuda", 3)
    print("ok")
    """
)


def _run_check(device: str, **env: str) -> None:
    env = dict(os.environ, **env)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", _CHECK, device], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.mark.skipif(CUDA, reason="CPU check; on CUDA the compiled kernel is tested below")
def test_interpreted_kernel_refines_like_the_core():
    pytest.importorskip("triton")
    _run_check("cpu", TRITON_INTERPRET="1")


@needs_cuda
def test_compiled_kernel_refines_like_the_core():
    _run_check("cuda")


@needs_cuda
def test_prune_refines_on_the_gpu_and_never_raises_an_error(tokenizer):
    model = tiny_model("llama").cuda()
    report = ria.prune(
        model, tokenizer, sparsity="2:4", refine=True, calibration="austen", nsamples=4,
        seqlen=32, progress=False,
    )  # fmt: skip
    refined = [r.refinement for r in report.layers if r.refinement]
    assert refined and all(r["error_after"] <= r["error_before"] for r in refined)
    assert any(r["swaps"] > 0 for r in refined)
