"""The warpgroup decode kernel (`wgmma_sp.cu`: wgmma.mma_async.sp over cuSPARSELt's buffer).

CPU: its launch shapes, the generated inline assembly, where tuning offers it, and the plan
cache's encoding of its shapes. GPU (compute capability 9.0 only): against the masked dense
product at M = 9..64, bf16 and fp16, with and without bias, the LLaMA-2-7B shapes and small
odd ones (K % 64 == 32, N < 64), repeatable bits under split-K.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import assert_mma_config_matches, needs_cuda, random_24

from ria.errors import InvalidArgumentError
from ria.sparse import mma_sp
from ria.sparse.format import pack_24
from ria.sparse.linear import Choice
from ria.sparse.mma_sp import MmaConfig
from ria.sparse.plan_cache import PlanCache, TunedPlan, plan_key

WG = MmaConfig(1, 8, 2, 3, 4, wgmma=True)  # (a shape of the sweep)


def test_wgmma_config_fields_and_checks():
    assert str(WG) == "g1w8u2s3k4" and WG.tiled and MmaConfig(1, 8, 2, 3, 4) != WG
    with pytest.raises(InvalidArgumentError, match="warpgroups"):
        MmaConfig(2, 6, 2, 3, 4, wgmma=True)
    with pytest.raises(InvalidArgumentError):
        MmaConfig(1, 8, 2, 0, 1, wgmma=True)


@pytest.mark.parametrize("tiles", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wgmma_wrapper_operands(tiles, dtype):
    """The assembly names N / 2 accumulators, 4 A registers, descriptor, metadata, scale
    and selector, in that order, for N = 8 * tiles."""
    src = mma_sp.wgmma_wrapper(tiles, dtype)
    ab = "f16" if dtype == torch.float16 else "bf16"
    assert f"m64n{8 * tiles}k32.f32.{ab}.{ab} " in src
    acc = 4 * tiles
    braces = re.findall(r"\{(%[0-9, %]+)\}", src)
    assert braces[0] == ", ".join(f"%{i}" for i in range(acc))
    assert braces[1] == ", ".join(f"%{acc + i}" for i in range(4))
    assert f"%{acc + 4}, %{acc + 5}, %{acc + 7}, p, 1, 1, 0;" in src
    assert f"setp.ne.b32 p, %{acc + 6}, 0;" in src
    assert src.count('"+f"') == acc and '"n"(SEL)' in src


def test_wgmma_candidates_only_where_it_runs(monkeypatch):
    monkeypatch.setattr(mma_sp, "_has_wgmma", lambda: True)
    assert any(c.wgmma for c in mma_sp.candidates(16, cslt=True))
    for m in (16, 32, 64):  # timed, but never the untuned default
        assert not mma_sp.default_config(m, cslt=True).wgmma
    assert not any(c.wgmma for c in mma_sp.candidates(8, cslt=True))  # M <= 8: gemv kernels
    assert not any(c.wgmma for c in mma_sp.candidates(64))  # fragments: no wgmma form
    monkeypatch.setattr(mma_sp, "_has_wgmma", lambda: False)
    assert not any(c.wgmma for m in (16, 32, 64) for c in mma_sp.candidates(m, cslt=True))


def test_plan_cache_keeps_the_wgmma_shape(tmp_path):
    key = plan_key(
        device="NVIDIA H200", capability=(9, 0), out_features=4096, in_features=4096,
        dtype=torch.bfloat16, bias=False, buckets=(16,), options={}, versions={"ria": "0"},
    )  # fmt: skip
    tuned = TunedPlan({16: Choice("mma_cslt", mma=WG)}, {16: Choice("mma_cslt", mma=WG)})
    cache = PlanCache(tmp_path)
    path = cache.store(key, tuned)
    assert path is not None and cache.load(key, (16,), {"mma_cslt"}) == tuned
    # A launch-shape field this version does not know makes the file stale, not wrong.
    data = json.loads(path.read_text())
    data["graph"]["16"][1]["bogus"] = 1
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="bogus"):
        assert cache.load(key, (16,), {"mma_cslt"}) is None


def test_wgmma_smem_holds_stages_and_sums():
    # 3 stages of 8 pieces x 8 tokens x 128 bytes per pair vs 64 tokens x (128 + 4) floats
    assert mma_sp._smem_bytes(WG, 8) == max(3 * 2 * 1024 * 8, 4 * 64 * 132)
    assert mma_sp._grid(WG, 4096 // 16) == (32, 4, 1)


def _is_hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


SHAPES = [(48, 96), (192, 1376), (4096, 4096), (11008, 4096), (4096, 11008)]
EXTRA = (
    MmaConfig(1, 4, 1, 2, 1, wgmma=True),
    MmaConfig(2, 4, 1, 2, 3, wgmma=True),
    MmaConfig(1, 16, 1, 4, 8, wgmma=True),
)


@needs_cuda
@pytest.mark.skipif(not _is_hopper(), reason="wgmma needs compute capability 9.0")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wgmma_kernel_reads_cusparselt_buffer(dtype):
    """Every wgmma shape tuning may pick and a few more (1..4 warpgroups, clusters of
    1..8) against the masked dense product; a strided x, bias or none; the same bits
    on a second call."""
    from ria.sparse.cslt import cslt_compress, share_cslt_buffer

    shapes = [c for c in mma_sp.CONFIGS if c.wgmma] + list(EXTRA)
    mma_sp.compile_kernels(dtype, (9, 16, 24, 33, 64), cslt=True, configs=shapes, threads=16)
    for n, k in SHAPES:
        w = random_24(n, k, dtype=dtype, device="cuda", seed=n + k)
        c = share_cslt_buffer(pack_24(w), cslt_compress(w))
        assert c.layout == "cslt", (n, k)
        b = torch.randn(n, dtype=dtype, device="cuda")
        small = n * k < 2**20
        for m in (9, 16, 24, 33, 64) if small else (16, 24, 33, 64):
            x = torch.randn(m, k + 8, dtype=dtype, device="cuda")[:, :k]  # row stride k + 8
            for bias in (None, b) if small else (b,):
                ref = x.double() @ w.double().t() + (0 if bias is None else bias.double())
                for cfg in shapes:
                    assert_mma_config_matches(x, c, bias, ref, cfg)
