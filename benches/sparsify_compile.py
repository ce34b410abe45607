"""A first `ria.sparsify` (empty kernel cache): the decode kernels compiled in parallel per
candidate set before tuning times them (`mma_sp.compile_kernels`, as `mma_best_config`
does) against one NVRTC compile after another as tuning reaches each (that call disabled).

    python benches/sparsify_compile.py [--layers 1] [--fp8]

Each mode runs in a fresh child process with its own empty `RIA_CACHE` (kernels and plans)
on the LLaMA-2-7B-shaped model of benches/gpu_speed.py, with `plan_cache=False`; the
modes alternate over two rounds. Reports seconds per `sparsify` call and the kernels
compiled (files in the cache). Writes benches/results/sparsify_compile.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MODES = ("serial", "parallel")


def child(mode: str, layers: int, fp8: bool) -> None:
    """One timed `sparsify` in this process; prints its seconds as JSON."""
    import torch
    from gpu_speed import build_model

    from ria.sparse import mma_sp, sparsify

    if mode == "serial":
        mma_sp.compile_kernels = lambda *args, **kwargs: None
    model = build_model(layers, prune_all=False)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    report = sparsify(model, plan_cache=False, dtype="fp8" if fp8 else None)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "converted": len(report.converted)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--fp8", action="store_true", help="sparsify(dtype='fp8')")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(RESULTS / "sparsify_compile.json"))
    args = ap.parse_args()
    if args.child:
        child(args.child, args.layers, args.fp8)
        return
    runs = []
    for round_ in range(args.rounds):
        for mode in MODES:
            with tempfile.TemporaryDirectory() as cache:
                cmd = [sys.executable, __file__, "--child", mode, "--layers", str(args.layers)]
                env = {**os.environ, "RIA_CACHE": cache}
                done = subprocess.run(
                    cmd + (["--fp8"] if args.fp8 else []), env=env, check=True,
                    capture_output=True, text=True,
                )  # fmt: skip
                result = json.loads(done.stdout.strip().splitlines()[-1])
                result.update(mode=mode, round=round_)
                result["kernels"] = sum(1 for _ in Path(cache, "kernels").glob("*.bin"))
                runs.append(result)
                print(json.dumps(result), flush=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
