"""What ptxas makes of the mma.sp decode kernel, per GPU architecture, without a GPU.

Compiles `ria/sparse/mma_sp.cu` for each `--arch` through NVRTC (`cuda-bindings`, which
torch's CUDA wheels install), prints ptxas's registers and spills, and, where `nvdisasm` is
found (the `nvidia-cuda-nvdisasm` wheel from PyPI, or a CUDA toolkit), the SASS tensor-core
instructions and instruction count of the e4m3 kernel in its widened and k64 forms
(`MmaConfig.k64`). This is how the k64 form was found to be one QMMA.SP on sm_89 / sm_120
and an emulation (HMMA.SP, conversions, shuffles) on sm_90 / sm_100.

    pip install nvidia-cuda-nvdisasm
    python benches/kernel_sass.py --arch sm_89,sm_90a,sm_100a,sm_120a --tiles 2,8
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ria.sparse.mma_sp import MmaConfig, kernel_source, nvrtc_cubin


def _nvdisasm() -> str | None:
    found = shutil.which("nvdisasm")
    if found:
        return found
    for root in map(Path, sys.path):  # the PyPI wheel's binary is not on PATH
        hits = sorted(root.glob("nvidia/cu*/bin/nvdisasm"))
        if hits:
            return str(hits[0])
    return None


def _sass_summary(cubin: bytes, nvdisasm: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True).stdout
    ops = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", sass, re.M)
    mma = collections.Counter(op for op in ops if "MMA" in op)
    top = collections.Counter(op.split(".")[0] for op in ops).most_common(6)
    return f"{len(ops)} instructions; {dict(mma)}; most used {dict(top)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_89,sm_90a,sm_100a,sm_120a")
    parser.add_argument("--tiles", default="2,8", help="8-token tiles (M / 8, rounded up)")
    parser.add_argument("--config", default="r2w8u2", help="row tiles, warps, unroll")
    args = parser.parse_args()
    r, w, u = (int(v) for v in re.fullmatch(r"r(\d+)w(\d+)u(\d+)", args.config).groups())
    nvdisasm = _nvdisasm()
    if nvdisasm is None:
        print("nvdisasm not found: registers only (pip install nvidia-cuda-nvdisasm)")
    for arch in args.arch.split(","):
        for tiles in (int(t) for t in args.tiles.split(",")):
            for cslt in (False, True):
                for k64 in (False, True):
                    config = MmaConfig(r, w, u // 2 if cslt else u, k64=k64)
                    source = kernel_source(torch.bfloat16, config, tiles, e4m3=True, cslt=cslt)
                    cubin, log = nvrtc_cubin(source, arch)
                    used = [line.strip() for line in log.splitlines() if "registers" in line]
                    form = "cuSPARSELt buffer" if cslt else "fragments"
                    regs = used[-1] if used else ""
                    line = f"{arch} {tiles} tiles {form:17} {config!s:12} {regs}"
                    if nvdisasm is not None:
                        line += f"\n    {_sass_summary(cubin, nvdisasm)}"
                    print(line)


if __name__ == "__main__":
    main()
