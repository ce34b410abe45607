"""The warpgroup decode kernel over cuSPARSELt's buffer (`wgmma_sp.cu`: a producer warp
streams TMA-fed stages, consumer warpgroups run wgmma.sp with both operands in shared memory).

CPU: its launch shapes, the generated inline assembly, where tuning offers it, the plan
cache's encoding of its shapes, its metadata image (against cuSPARSELt's layout),
shared-memory budget and tensor-map checks. GPU (compute capability 9.0 only):
against the masked dense product at M = 9..64, bf16 and fp16, with and without bias, the
LLaMA-2-7B shapes and small odd ones (K % 64 == 32, N < 64, N % 64 != 0), repeatable bits
under split-K, and the prepared launch re-pointing its tokens' tensor map.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import assert_mma_config_matches, needs_cuda, random_24

from ria.errors import InvalidArgumentError
from ria.sparse import mma_sp
from ria.sparse.format import cslt_nibble_index, pack_24
from ria.sparse.linear import Choice
from ria.sparse.mma_sp import MmaConfig
from ria.sparse.plan_cache import PlanCache, TunedPlan, plan_key

WG = MmaConfig(2, 4, 2, 4, 4, wgmma=True)  # (a shape of the sweep)


def test_wgmma_config_fields_and_checks():
    assert str(WG) == "g2w4u2s4k4" and WG.tiled and MmaConfig(2, 4, 2, 4, 4) != WG
    base = dict(row_tiles=2, warps=4, unroll=2, stages=4, split=4, wgmma=True)
    for bad in [
        dict(warps=6),  # whole warpgroups
        dict(stages=1),
        dict(unroll=3),  # stages of whole 128-column values boxes
        dict(row_tiles=8),  # 512 rows: more than one copy box holds
        dict(multicast=3),
        dict(multicast=2, split=8),  # a cluster of 16
        dict(multicast=2, wgmma=False),
    ]:
        with pytest.raises(InvalidArgumentError, match="wgmma"):
            MmaConfig(**{**base, **bad})
    mc = MmaConfig(**{**base, "multicast": 2})
    assert str(mc) == "g2w4u2s4k4m2" and mc != WG
    assert mma_sp._grid(mc, 4096 // 16) == (32, 4, 1)
    assert mma_sp._grid(mc, 208 // 16) == (2, 4, 1)  # 2 row blocks of 128: one pair
    assert mma_sp._grid(mc, 48 // 16) == (2, 4, 1)  # a block past N completes the pair
    assert "#define RIA_MC 2" in mma_sp.kernel_source(torch.bfloat16, mc, 2, 0, cslt=True)
    assert "#define RIA_MC 2" not in mma_sp.kernel_source(torch.bfloat16, WG, 2, 0, cslt=True)


def test_wgmma_prefill_shape_fields_and_grid():
    """`token_tiles` (the wgmma kernel's only): blocks of 8 * token_tiles tokens over the
    grid's third dimension for any token count."""
    pre = MmaConfig(2, 8, 2, 3, 1, wgmma=True, token_tiles=16)
    assert str(pre) == "g2w8u2s3k1t16" and pre != MmaConfig(2, 8, 2, 3, 1, wgmma=True)
    for bad in [dict(token_tiles=33), dict(token_tiles=-1), dict(wgmma=False)]:
        with pytest.raises(InvalidArgumentError, match="token_tiles"):
            MmaConfig(
                **{
                    **dict(row_tiles=2, warps=8, unroll=2, stages=3, token_tiles=16, wgmma=True),
                    **bad,
                }
            )
    assert mma_sp.token_tiles(pre, 5) == 16 and mma_sp.token_tiles(WG, 20) == 3
    assert [mma_sp.token_blocks(pre, m) for m in (1, 128, 129, 2048)] == [1, 1, 2, 16]
    assert mma_sp.token_blocks(WG, 64) == 1
    assert mma_sp._launch_shape(pre, 16, 4096 // 16, True, 8)[0] == (16, 1, 8)


def test_prefill_shapes_only_on_the_buffer_where_wgmma_runs(monkeypatch):
    """Above 64 tokens the e4m3 tuner times the prefill shapes on cuSPARSELt's buffer on
    sm_90 and nothing else; a call with no shape for its count says so."""
    from ria.sparse.format import pack_mma24_e4m3
    from ria.sparse.fp8 import quantize_rows, quantize_weight

    monkeypatch.setattr(mma_sp, "_has_wgmma", lambda: True)
    for m in (65, 1024, 4096):
        shapes = mma_sp.e4m3_candidates(m, cslt=True)
        assert shapes and all(c.token_tiles and c.wgmma for c in shapes), m
        assert mma_sp.e4m3_candidates(m) == ()  # the fragments: decode only
    assert not any(c.token_tiles for m in (1, 9, 64) for c in mma_sp.e4m3_candidates(m, True))
    monkeypatch.setattr(mma_sp, "_has_wgmma", lambda: False)
    assert mma_sp.e4m3_candidates(1024, cslt=True) == ()
    w = quantize_weight(random_24(64, 128, dtype=torch.float32))
    q, q_scale = quantize_rows(torch.randn(65, 128))
    with pytest.raises(InvalidArgumentError, match="no e4m3 launch shape takes 65 tokens"):
        mma_sp.mma24_fp8_linear(q, q_scale, pack_mma24_e4m3(w.values), w.scale)


@pytest.mark.parametrize("tiles", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wgmma_wrapper_operands(tiles, dtype):
    """The assembly names N / 2 accumulators, the A and B descriptors, the metadata and the
    selector, then scale-d, scales 1, 1 and no transposes, for N = 8 * tiles."""
    src = mma_sp.wgmma_wrapper(tiles, dtype)
    ab = "f16" if dtype == torch.float16 else "bf16"
    assert f"m64n{8 * tiles}k32.f32.{ab}.{ab} " in src
    acc = 4 * tiles
    assert re.findall(r"\{(%[0-9, %]+)\}", src)[0] == ", ".join(f"%{i}" for i in range(acc))
    assert f"}}, %{acc}, %{acc + 1}, %{acc + 2}, %{acc + 4}, p, 1, 1, 0, 0;" in src
    assert f"setp.ne.b32 p, %{acc + 3}, 0;" in src
    assert src.count('"+f"') == acc and '"n"(SEL)' in src


def _prmt(a: int, b: int, sel: int) -> int:
    """PTX `prmt.b32` (default mode): byte i of the result is byte (sel >> 4i) & 7 of b:a."""
    pool = a | b << 32
    return sum(((pool >> 8 * ((sel >> 4 * i) & 7)) & 0xFF) << 8 * i for i in range(4))


def _meta_image(w0: int, w1: int, t: int) -> int:
    """wgmma_sp.cu's `meta_image`, step by step."""
    v = _prmt(w0, w1, 0x6420 + 0x1111 * (t & 1))
    lo, hi = v & 0x0F0F0F0F, (v >> 4) & 0x0F0F0F0F
    lo, hi = (lo | lo >> 4) & 0x00FF00FF, (hi | hi >> 4) & 0x00FF00FF
    lo, hi = (lo | lo >> 8) & 0xFFFF, (hi | hi >> 8) & 0xFFFF
    return lo | hi << 16


def test_meta_image_holds_wgmma_groups_from_cusparselt_words():
    """For every lane (g, t) of every warp q and every k-tile: the register made from
    cuSPARSELt's words 2g and 2g + 1 of the lane's 16-row tile holds, at bit 4i, row
    16q + g's nibble of group 4 * (t % 2) + i of the k-tile and, at bit 16 + 4i, row
    16q + g + 8's (the layout wgmma.sp takes for 16-bit types, selector t / 2)."""
    n, k = 128, 128
    word, shift = cslt_nibble_index(n, k)
    g_ = torch.Generator().manual_seed(0)
    meta = torch.randint(0, 2**32, (int(word.max()) + 1,), generator=g_, dtype=torch.int64)
    nib = (meta[word] >> shift) & 0xF  # (n, k / 4): the nibble of (row, group)
    for blk in range(n // 64):
        for kt in range(k // 32):
            base = 64 * (blk * (k // 32) + kt)  # the 64-word block of (64 rows, k-tile)
            for q in range(4):
                for g in range(8):
                    w0, w1 = (int(meta[base + 16 * q + 2 * g + b]) for b in (0, 1))
                    row = 64 * blk + 16 * q + g
                    for t in range(4):
                        e = _meta_image(w0, w1, t)
                        for i in range(4):
                            grp = 8 * kt + 4 * (t % 2) + i
                            assert (e >> 4 * i) & 0xF == nib[row, grp]
                            assert (e >> 16 + 4 * i) & 0xF == nib[row + 8, grp]


@pytest.mark.parametrize("tiles", [1, 3, 8])
def test_wgmma_e4m3_wrapper_and_source(tiles):
    """The e4m3 form: m64nNk64 on e4m3 operands, which take no transpose operands; the
    kernel compiled with RIA_E4M3 (and without it otherwise)."""
    src = mma_sp.wgmma_wrapper(tiles, torch.bfloat16, e4m3=True)
    acc = 4 * tiles
    assert f"m64n{8 * tiles}k64.f32.e4m3.e4m3 " in src
    assert f"}}, %{acc}, %{acc + 1}, %{acc + 2}, %{acc + 4}, p, 1, 1;" in src
    assert "#define RIA_E4M3 1" in mma_sp.kernel_source(torch.bfloat16, WG, 2, e4m3=True)
    assert "RIA_E4M3 1" not in mma_sp.kernel_source(torch.bfloat16, WG, 2, cslt=True)


def _meta_image_e4m3(words: list[int], t: int) -> int:
    """wgmma_sp.cu's `meta_image_e4m3`, step by step."""
    b = 2 * (t >> 1) + (t & 1)
    pick = b | (b + 4) << 4
    return _prmt(_prmt(words[0], words[1], pick), _prmt(words[2], words[3], pick), 0x5410)


def test_e4m3_meta_image_holds_wgmma_groups_from_cusparselt_words():
    """For every lane (g, t) of every warp q and k-tile (64 columns): the register made from
    cuSPARSELt's e4m3 words 4g .. 4g + 3 of the lane's 16-row tile holds, at bit 4i, row
    16q + g + 8 (t % 2)'s nibble of group 8 (t / 2) + i of the k-tile (the layout wgmma.sp
    m64nNk64 takes for 8-bit types: CUTLASS's ELayout_64x64, selector 0)."""
    n, k = 128, 256
    word, shift = cslt_nibble_index(n, k, e4m3=True)
    g_ = torch.Generator().manual_seed(0)
    meta = torch.randint(0, 2**32, (int(word.max()) + 1,), generator=g_, dtype=torch.int64)
    nib = (meta[word] >> shift) & 0xF  # (n, k / 4): the nibble of (row, group)
    for blk in range(n // 64):
        for kt in range(k // 64):
            base = 128 * (blk * (k // 64) + kt)  # the 128-word block of (64 rows, k-tile)
            for q in range(4):
                for g in range(8):
                    words = [int(meta[base + 32 * q + 4 * g + j]) for j in range(4)]
                    for t in range(4):
                        e = _meta_image_e4m3(words, t)
                        row = 64 * blk + 16 * q + g + 8 * (t % 2)
                        for i in range(8):
                            assert (e >> 4 * i) & 0xF == nib[row, 16 * kt + 8 * (t // 2) + i]


def test_wgmma_e4m3_shapes_fit_and_read_the_buffer_only(monkeypatch):
    """e4m3 stages hold twice the metadata; the wgmma shapes tuning times at each token
    count fit in `SMEM_LIMIT`, on cuSPARSELt's buffer only, never first (the default stays
    a proven plain shape); a wgmma shape on the fragments is refused by name."""
    assert mma_sp.wgmma_stage_bytes(WG, 8, e4m3=True) == 128 * 128 + 64 * 256 + 2 * 4 * 512
    assert mma_sp._smem_bytes(WG, 8, e4m3=True) == mma_sp.wgmma_smem_bytes(WG, 8, e4m3=True)
    monkeypatch.setattr(mma_sp, "_has_wgmma", lambda: True)
    for m in (9, 16, 32, 33, 64):
        shapes = mma_sp.e4m3_candidates(m, cslt=True)
        wg = [c for c in shapes if c.wgmma]
        assert wg and not shapes[0].wgmma, m
        for c in wg:
            assert mma_sp.wgmma_smem_bytes(c, -(-m // 8), e4m3=True) <= mma_sp.SMEM_LIMIT
        assert not any(c.wgmma for c in mma_sp.e4m3_candidates(m, cslt=False))
    # The largest bf16 shapes at M = 64 do not fit with e4m3's metadata: timed with the
    # most stages that fit (4) instead; at 56 tokens their 5 still fit.
    for multicast in (1, 2):
        big = MmaConfig(3, 4, 2, 5, 2, wgmma=True, multicast=multicast)
        fewer = MmaConfig(3, 4, 2, 4, 2, wgmma=True, multicast=multicast)
        assert mma_sp.wgmma_smem_bytes(big, 8, e4m3=True) > mma_sp.SMEM_LIMIT
        assert big in mma_sp.candidates(64, cslt=True) and fewer in mma_sp.CONFIGS
        assert fewer in mma_sp.e4m3_candidates(64, True)
        assert big not in mma_sp.e4m3_candidates(64, True)
        assert big in mma_sp.e4m3_candidates(56, True)
        assert fewer not in mma_sp.e4m3_candidates(56, True)
    for m in range(9, 65):  # every shape offered is one the GPU tests run
        assert set(mma_sp.e4m3_candidates(m, True)) <= set(mma_sp.CONFIGS), m
    from ria.sparse.format import pack_mma24_e4m3
    from ria.sparse.fp8 import quantize_rows, quantize_weight

    w = quantize_weight(random_24(64, 128, dtype=torch.float32))
    q, q_scale = quantize_rows(torch.randn(16, 128))
    with pytest.raises(InvalidArgumentError, match="cuSPARSELt's e4m3 buffer only"):
        mma_sp.mma24_fp8_linear(q, q_scale, pack_mma24_e4m3(w.values), w.scale, config=WG)


def test_wgmma_stage_bytes_and_budget(monkeypatch):
    # 128 rows x 64 * 2 bytes of values, 64 tokens x 256 bytes, 2 tiles x 4 k-tiles x 256
    assert mma_sp.wgmma_stage_bytes(WG, 8) == 128 * 128 + 64 * 256 + 2 * 4 * 256
    assert mma_sp.wgmma_smem_bytes(WG, 8) == 4 * 34816 + 16 * 4 + 1024
    assert mma_sp._smem_bytes(WG, 8) == mma_sp.wgmma_smem_bytes(WG, 8)
    assert mma_sp._grid(WG, 4096 // 16) == (32, 4, 1)
    assert mma_sp._launch_shape(WG, 8, 4096 // 16)[1] == 4 * 32 + 32  # + the producer warp
    # Every wgmma shape tuning times fits an H200's 227 KB of shared memory, at the token
    # counts of its bucket (M <= 32: 4 tiles, M <= 64: 8).
    monkeypatch.setattr(mma_sp, "_has_wgmma", lambda: True)
    for m in (16, 32, 64):
        for c in (c for c in mma_sp.candidates(m, cslt=True) if c.wgmma):
            assert mma_sp.wgmma_smem_bytes(c, -(-m // 8)) <= 227 * 1024, (m, c)


def test_tensor_map_checks():
    from ria.sparse.tma import check_2d

    check_2d(0x1000, 2048, 4096, 4096, (64, 128), 3)
    for args in [
        (0x1008, 2048, 4096, 4096, (64, 128), 3),  # misaligned address
        (0x1000, 2048, 4096, 4104, (64, 128), 3),  # row stride not a multiple of 16
        (0x1000, 2048, 4096, 4096, (128, 128), 3),  # 256-byte box rows under a 128-byte swizzle
        (0x1000, 2048, 4096, 4096, (64, 512), 3),  # box side > 256
        (0x1000, 2048, 4096, 2048, (64, 128), 3),  # rows overlap
    ]:
        with pytest.raises(InvalidArgumentError):
            check_2d(*args)


def test_wgmma_candidates_only_where_it_runs(monkeypatch):
    monkeypatch.setattr(mma_sp, "_has_wgmma", lambda: True)
    for m in (9, 16, 32, 33, 64):  # timed first, and the untuned default on the buffer
        assert mma_sp.default_config(m, cslt=True).wgmma
        assert not mma_sp.default_config(m, cslt=True, ordered=True).tiled  # (no order read)
        assert any(not c.wgmma for c in mma_sp.candidates(m, cslt=True))  # the others timed too
    assert not any(c.wgmma for c in mma_sp.candidates(8, cslt=True))  # M <= 8: gemv kernels
    assert not any(c.wgmma for c in mma_sp.candidates(64))  # fragments: no wgmma form
    monkeypatch.setattr(mma_sp, "_has_wgmma", lambda: False)
    assert not any(c.wgmma for m in (16, 32, 64) for c in mma_sp.candidates(m, cslt=True))


@pytest.mark.parametrize("shape", [WG, MmaConfig(1, 4, 2, 8, 2, wgmma=True, multicast=2)])
def test_plan_cache_keeps_the_wgmma_shape(tmp_path, shape):
    key = plan_key(
        device="NVIDIA H200", capability=(9, 0), out_features=4096, in_features=4096,
        dtype=torch.bfloat16, bias=False, buckets=(16,), options={}, versions={"ria": "0"},
    )  # fmt: skip
    tuned = TunedPlan({16: Choice("mma_cslt", mma=shape)}, {16: Choice("mma_cslt", mma=shape)})
    cache = PlanCache(tmp_path)
    path = cache.store(key, tuned)
    assert path is not None and cache.load(key, (16,), {"mma_cslt"}) == tuned
    # A launch-shape field this version does not know makes the file stale, not wrong.
    data = json.loads(path.read_text())
    data["graph"]["16"][1]["bogus"] = 1
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="bogus"):
        assert cache.load(key, (16,), {"mma_cslt"}) is None


def test_plans_are_retuned_when_the_tuned_shapes_change(monkeypatch):
    """The plan cache's versions carry a fingerprint of the kernel sources and of the launch
    shapes tuning times, per token count: a plan timed before the streaming kernel existed,
    or before a count's candidates changed, is not reused."""
    from ria.sparse.plan_cache import library_versions

    now = mma_sp.kernel_fingerprint()
    assert library_versions()["kernels"] == now and len(now) == 16
    monkeypatch.setattr(mma_sp, "CONFIGS", tuple(c for c in mma_sp.CONFIGS if not c.wgmma))
    mma_sp.kernel_fingerprint.cache_clear()
    try:
        assert mma_sp.kernel_fingerprint() != now
        monkeypatch.undo()
        mma_sp.kernel_fingerprint.cache_clear()
        assert mma_sp.kernel_fingerprint() == now
        # A token count gaining a shape CONFIGS holds already (wgmma at 1-8 tokens did), or
        # the prefill counts (above 64) losing one.
        timed = mma_sp.e4m3_candidates
        for changed in (1, 65):
            monkeypatch.setattr(
                mma_sp,
                "e4m3_candidates",
                lambda m, cslt=False, c=changed: timed(m, cslt)[: -1 if m == c else None],
            )
            mma_sp.kernel_fingerprint.cache_clear()
            assert mma_sp.kernel_fingerprint() != now, changed
    finally:
        mma_sp.kernel_fingerprint.cache_clear()


def _is_hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


SHAPES = [(48, 96), (192, 1376), (208, 1376), (4096, 4096), (11008, 4096), (4096, 11008)]
EXTRA = (
    MmaConfig(1, 4, 2, 2, 1, wgmma=True),  # stages reused many times, no cluster
    MmaConfig(4, 4, 2, 3, 3, wgmma=True),  # 256 rows, a cluster of 3
    MmaConfig(1, 8, 4, 2, 8, wgmma=True),  # two consumer warpgroups, 2 values boxes a stage
    MmaConfig(1, 16, 2, 2, 2, wgmma=True),  # four consumer warpgroups
    MmaConfig(1, 4, 2, 3, 1, wgmma=True, multicast=2),  # token multicast, no K split
    MmaConfig(3, 4, 2, 3, 2, wgmma=True, multicast=2),  # multicast in a cluster of 4
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
                    if mma_sp.wgmma_smem_bytes(cfg, mma_sp.token_tiles(cfg, m)) > mma_sp.SMEM_LIMIT:
                        continue  # (an e4m3 shape for fewer tokens: bf16 never times it here)
                    assert_mma_config_matches(x, c, bias, ref, cfg)


@needs_cuda
@pytest.mark.skipif(not _is_hopper(), reason="wgmma needs compute capability 9.0")
def test_wgmma_e4m3_kernel_reads_cusparselt_e4m3_buffer():
    """The e4m3 form (wgmma.sp m64nNk64 .e4m3 on cuSPARSELt's e4m3 buffer, scales in the
    epilogue) against the fp8 reference: every e4m3 wgmma shape tuning may pick and a few
    more, odd k-tile counts (a stage cut short), 1..64 tokens (one token tile of 8 at
    M <= 8), bias or none."""
    from ria.sparse.cslt import share_cslt_buffer
    from ria.sparse.fp8 import Fp8Weight, fp8_linear_reference, quantize_weight
    from ria.sparse.fp8_kernels import fp8_cslt_compress, quantize_tokens

    extra = [c for c in EXTRA if mma_sp.wgmma_smem_bytes(c, 8, True) <= mma_sp.SMEM_LIMIT]
    shapes = [c for c in mma_sp.CONFIGS if c.wgmma] + extra
    counts = (1, 5, 8, 9, 16, 24, 33, 64)
    mma_sp.compile_kernels(torch.bfloat16, counts, cslt=True, configs=shapes, e4m3=True, threads=16)
    for n, k in [(64, 128), (192, 1344), (256, 512), (4096, 4096), (11008, 4096), (4096, 11008)]:
        w = quantize_weight(random_24(n, k, device="cuda", seed=n + k))
        view = share_cslt_buffer(pack_24(w.values), fp8_cslt_compress(w))
        assert view.layout == "cslt", (n, k)
        cpu_w = Fp8Weight(w.values.cpu(), w.scale.cpu())
        b = torch.randn(n, dtype=torch.bfloat16, device="cuda")
        small = n * k < 2**20
        for m in counts if small else (1, 8, 16, 33, 64):
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            q, q_scale = quantize_tokens(x)
            for bias in (None, b) if small else (b,):
                ref = fp8_linear_reference(x.cpu(), cpu_w, None if bias is None else bias.cpu())
                for cfg in shapes:
                    tiles = mma_sp.token_tiles(cfg, m)
                    if mma_sp.wgmma_smem_bytes(cfg, tiles, True) > mma_sp.SMEM_LIMIT:
                        continue
                    y = mma_sp.mma24_fp8_linear(q, q_scale, view, w.scale, bias, config=cfg)
                    # Hopper's FP8 tensor cores sum with fewer bits than fp32, as cuSPARSELt's
                    # fp8 GEMM does: the tuner's bound (E4M3_AGREE_TOLERANCE), not bf16's.
                    atol = mma_sp.E4M3_AGREE_TOLERANCE * float(ref.abs().max())
                    torch.testing.assert_close(
                        y.float().cpu(), ref.float(), rtol=0, atol=atol, msg=f"{n}x{k} M={m} {cfg}"
                    )


@needs_cuda
@pytest.mark.skipif(not _is_hopper(), reason="wgmma needs compute capability 9.0")
def test_wgmma_prefill_shapes_cover_any_token_count():
    """The prefill shapes (blocks of 8 * token_tiles tokens over the grid) on more tokens
    than a decode launch takes, the last token block partly empty and K ending inside a
    stage: e4m3 against the fp8 reference, bf16 against the exact product; and the tuner
    picks one at such a count after checking it against the plain kernel run 64 tokens at
    a time."""
    from ria.sparse.cslt import cslt_compress, share_cslt_buffer
    from ria.sparse.fp8 import Fp8Weight, fp8_linear_reference, quantize_weight
    from ria.sparse.fp8_kernels import fp8_cslt_compress, quantize_tokens

    shapes = mma_sp.e4m3_candidates(1024, cslt=True)
    assert shapes and all(c.token_tiles for c in shapes)
    for n, k in [(192, 1344), (4096, 4096)]:
        w = quantize_weight(random_24(n, k, device="cuda", seed=n + k))
        view = share_cslt_buffer(pack_24(w.values), fp8_cslt_compress(w))
        cpu_w = Fp8Weight(w.values.cpu(), w.scale.cpu())
        b = torch.randn(n, dtype=torch.bfloat16, device="cuda")
        for m in (65, 300, 1000):
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            q, q_scale = quantize_tokens(x)
            ref = fp8_linear_reference(x.cpu(), cpu_w, b.cpu()).float()
            atol = mma_sp.E4M3_AGREE_TOLERANCE * float(ref.abs().max())
            for cfg in shapes:
                y = mma_sp.mma24_fp8_linear(q, q_scale, view, w.scale, b, config=cfg)
                torch.testing.assert_close(
                    y.float().cpu(), ref, rtol=0, atol=atol, msg=f"{n}x{k} M={m} {cfg}"
                )
        best, times = mma_sp.mma_best_config([view], q, b, fp8_scales=(q_scale, [w.scale]))
        assert best in shapes and set(times) == {str(c) for c in shapes}
        wb = random_24(n, k, device="cuda", seed=n)
        c = share_cslt_buffer(pack_24(wb), cslt_compress(wb))
        x = torch.randn(300, k, dtype=torch.bfloat16, device="cuda")
        ref = x.double() @ wb.double().t()
        for cfg in shapes:
            y = mma_sp.mma24_linear(x, c, None, config=cfg)
            assert float((y.double() - ref).norm() / ref.norm()) < 1e-2, (n, k, cfg)


@needs_cuda
@pytest.mark.skipif(not _is_hopper(), reason="wgmma needs compute capability 9.0")
def test_bf16_tuning_leaves_out_a_wgmma_shape_that_disagrees(monkeypatch):
    """bf16 tuning checks each wgmma shape's output against the plain kernel's before it
    times it: on this GPU every one agrees, and one reading the weight wrongly (here its
    output columns shifted) is left out with a warning."""
    import warnings

    from ria.sparse.cslt import cslt_compress, share_cslt_buffer

    w = random_24(4096, 4096, device="cuda", seed=5)
    c = share_cslt_buffer(pack_24(w), cslt_compress(w))
    for m in (16, 64):
        x = torch.randn(m, 4096, dtype=torch.bfloat16, device="cuda")
        wgmma = {str(cfg) for cfg in mma_sp.candidates(m, cslt=True) if cfg.wgmma}
        assert wgmma
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a disagreeing shape would raise here
            _, times = mma_sp.mma_best_config([c], x)
        assert wgmma <= set(times), m
    real = mma_sp.mma24_linear

    def misread(x, w, bias=None, **kw):
        y = real(x, w, bias, **kw)
        return y.roll(1, dims=1) if kw["config"].wgmma else y

    monkeypatch.setattr(mma_sp, "mma24_linear", misread)
    with pytest.warns(UserWarning, match="disagrees with its plain form"):
        _, times = mma_sp.mma_best_config([c], x)
    assert times and not wgmma & set(times)


@needs_cuda
@pytest.mark.skipif(not _is_hopper(), reason="wgmma needs compute capability 9.0")
def test_wgmma_prepared_launch_follows_the_tokens():
    """`MmaLaunch` with a wgmma shape rewrites its tokens' tensor map when x moves: two
    inputs in turn, each matching its own product, the same bits on a repeat."""
    from ria.sparse.cslt import cslt_compress, share_cslt_buffer

    n, k, m = 256, 1024, 24
    w = random_24(n, k, device="cuda", seed=3)
    c = share_cslt_buffer(pack_24(w), cslt_compress(w))
    b = torch.randn(n, dtype=w.dtype, device="cuda")
    launch = mma_sp.MmaLaunch(c, b, m, config=WG)
    xs = [torch.randn(m, k, dtype=w.dtype, device="cuda") for _ in range(2)]
    ys = [launch(x) for x in xs] + [launch(xs[0])]
    for x, y in zip(xs + xs[:1], ys, strict=True):
        ref = x.double() @ w.double().t() + b.double()
        assert float((y.double() - ref).norm() / ref.norm()) < 1e-2
    assert torch.equal(ys[0], ys[2])
