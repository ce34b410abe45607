"""The sparse-tensor-core decode kernel (`ria.sparse.mma_sp`) and its packed layout.

CPU: the mma fragment layout round-trips and matches the PTX fragment rules, written here
lane by lane independently of `pack_mma24`'s tensor reshapes, and the CUDA kernel itself
runs on the CPU through tests/mma_sp_host.h (g++; mma.sp emulated from the PTX tables).
GPU: the kernel against the masked dense product at M in {1, 3, 8, 13, 64}, with and
without an input order, bias, fp16 and bf16, odd shapes, every launch configuration, and
the disk cache of compiled kernels.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_mma_config_matches, needs_cuda, random_24

from ria.errors import InvalidArgumentError
from ria.sparse.format import (
    Mma24,
    pack_24,
    pack_mma24,
    pack_mma24_e4m3,
    to_cslt_layout,
    unpack_mma24,
)
from ria.sparse.fp8 import fp8_linear_reference, quantize_rows, quantize_weight
from ria.sparse.mma_sp import MmaConfig

# -- layout (CPU) ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(16, 64), (48, 128), (37, 100), (8, 12), (32, 4096)])
def test_mma_layout_round_trip(dtype, shape):
    n, k = shape
    w = random_24(n, k, dtype=dtype, seed=n + k)
    p = pack_mma24(w)
    np_, kp = -(-n // 16) * 16, -(-k // 64) * 64
    assert p.values.shape == (np_ * kp // 2,) and p.values.dtype == dtype
    assert p.meta.shape == (np_ * kp // 32,) and p.meta.dtype == torch.int32
    assert (p.tiles, p.pairs) == (np_ // 16, kp // 64)
    assert torch.equal(unpack_mma24(p), w)
    if (n, k) == (np_, kp):  # no padding: exactly 9/16 of the dense bytes
        assert p.nbytes * 16 == w.numel() * 2 * 9


def _dense_from_fragments(p: Mma24) -> torch.Tensor:
    """What mma.sp m16n8k32 reads from each lane's registers, per the PTX ISA fragment
    tables (A: groupID g = lane >> 2, t = lane % 4; metadata: selector 0 -> lanes t = 0, 1,
    selector 1 -> t = 2, 3, bits 0..15 row g, 16..31 row g + 8), as a dense matrix."""
    tiles, steps = p.tiles, 2 * p.pairs
    vals = p.values.reshape(tiles, steps, 32, 8)
    meta = p.meta.reshape(tiles, p.pairs, 32).tolist()
    dense = torch.zeros(tiles * 16, steps * 32, dtype=p.values.dtype)
    for tile in range(tiles):
        for s in range(steps):
            sel = s % 2
            for lane in range(32):
                g, t = lane // 4, lane % 4
                for e in range(8):
                    row = g + 8 * ((e // 2) % 2)
                    ccol = 2 * t + (e % 2) + 8 * (e // 4)  # compressed column 0..15
                    group, slot = ccol // 2, ccol % 2  # group of 4 dense columns, 0..7
                    # The metadata lane of this row's group: in the selector's lane pair,
                    # the first holds groups 0..3, the second groups 4..7.
                    meta_lane = 4 * g + 2 * sel + group // 4
                    word = meta[tile][s // 2][meta_lane] & 0xFFFFFFFF
                    bit = 16 * (row >= 8) + 4 * (group % 4) + 2 * slot
                    col = 4 * group + ((word >> bit) & 3)
                    dense[16 * tile + row, 32 * s + col] = vals[tile, s, lane, e]
    return dense[: p.out_features, : p.in_features]


@pytest.mark.parametrize("shape", [(16, 64), (32, 192), (20, 68)])
def test_mma_layout_matches_ptx_fragments(shape):
    w = random_24(*shape, seed=7)
    assert torch.equal(_dense_from_fragments(pack_mma24(w)), w)


def test_mma_pack_rejects_non_24():
    w = random_24(16, 64)
    w[0, :4] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    with pytest.raises(InvalidArgumentError, match="not 2:4"):
        pack_mma24(w)


def test_mma_linear_checks_inputs_without_cuda_work():
    from ria.sparse.mma_sp import mma24_linear

    p = pack_mma24(random_24(16, 64))
    with pytest.raises(InvalidArgumentError, match=r"x must be \(M, 64\)"):
        mma24_linear(torch.zeros(2, 32, dtype=torch.bfloat16), p)
    with pytest.raises(InvalidArgumentError, match=r"1\.\.64"):
        mma24_linear(torch.zeros(65, 64, dtype=torch.bfloat16), p)
    with pytest.raises(InvalidArgumentError, match="fp16 or bf16"):
        mma24_linear(torch.zeros(2, 64, dtype=torch.float16), p)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the answer without CUDA")
def test_mma_status_without_cuda():
    from ria.sparse.mma_sp import mma_status

    assert mma_status() == "CUDA is not available"


# -- kernel on the CPU (host emulation of mma.sp) ----------------------------------------


def _reference(x, w, bias, order):
    xs = x if order is None else x[:, order.long()]
    return xs.double() @ w.double().t() + (0 if bias is None else bias.double())


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


GXX = shutil.which("g++")


def _run_on_host(
    tmp_path: Path, n, k, m, cfg, dtype, order_dtype, bias, e4m3=False, cslt=False, extra=None
) -> None:
    """Compile mma_sp.cu with tests/mma_sp_host.h for `cfg` = (R, W, U), run it on a random
    2:4 weight and compare with the masked dense product (with `e4m3`: weight and tokens in
    e4m3, against `fp8_linear_reference`; with `cslt`: the weight as cuSPARSELt's buffer,
    values row-major and metadata in its tiled order, `format.to_cslt_layout`)."""
    row_tiles, warps, unroll, stages, split = (*cfg, 0, 1)[:5] if len(cfg) == 3 else cfg
    w = random_24(n, k, dtype=dtype, seed=n + m)
    g = torch.Generator().manual_seed(m)
    ldx = k + 8  # a row stride larger than K
    x_rows = torch.randn(m, ldx, generator=g).to(dtype)
    order = torch.randperm(k, generator=g) if order_dtype is not None else None
    b = torch.randn(n, generator=g).to(dtype) if bias else torch.zeros(1, dtype=dtype)
    if e4m3:
        qw = quantize_weight(w)
        q, q_scale = quantize_rows(x_rows)  # the padding columns are never read
        q.view(torch.uint8).numpy().tofile(tmp_path / "x.bin")
        q_scale.numpy().tofile(tmp_path / "x_scale.bin")
        qw.scale.numpy().tofile(tmp_path / "w_scale.bin")
        if cslt:  # cuSPARSELt's e4m3 buffer: values row-major, its e4m3 metadata order
            compact = pack_24(qw.values)
            compact.values.view(torch.uint8).numpy().tofile(tmp_path / "vals.bin")
            to_cslt_layout(compact).numpy().tofile(tmp_path / "meta.bin")
        else:
            p = pack_mma24_e4m3(qw.values)
            p.values.view(torch.uint8).numpy().tofile(tmp_path / "vals.bin")
            p.meta.numpy().tofile(tmp_path / "meta.bin")
    elif cslt:
        compact = pack_24(w)
        x_rows.view(torch.int16).numpy().tofile(tmp_path / "x.bin")
        compact.values.view(torch.int16).numpy().tofile(tmp_path / "vals.bin")
        to_cslt_layout(compact).numpy().tofile(tmp_path / "meta.bin")
    else:
        p = pack_mma24(w)
        x_rows.view(torch.int16).numpy().tofile(tmp_path / "x.bin")
        p.values.view(torch.int16).numpy().tofile(tmp_path / "vals.bin")
        p.meta.numpy().tofile(tmp_path / "meta.bin")
    tiles, pairs = (n // 16, -(-k // 64)) if cslt else (p.tiles, p.pairs)
    idx = torch.zeros(1) if order is None else order
    idx.to(order_dtype or torch.int32).numpy().tofile(tmp_path / "order.bin")
    b.view(torch.int16).numpy().tofile(tmp_path / "bias.bin")
    defines = {
        "RIA_F16": int(dtype == torch.float16),
        "RIA_R": row_tiles,
        "RIA_W": warps,
        "RIA_U": unroll,
        "RIA_NT": -(-m // 8),
        "RIA_ORDER": {None: 0, torch.int32: 32, torch.int64: 64}[order_dtype],
        "RIA_E4M3": int(e4m3),
        "RIA_CSLT": int(cslt),
        **(extra or {}),
    }
    if stages:
        defines |= {"RIA_TILED": 1, "RIA_S": stages, "RIA_SK": split}
    kernel = resources.files("ria.sparse").joinpath("mma_sp.cu").read_text("utf-8")
    header = Path(__file__).with_name("mma_sp_host.h")
    src = "".join(f"#define {key} {v}\n" for key, v in defines.items())
    (tmp_path / "kernel.cpp").write_text(f'{src}#include "{header}"\n{kernel}')
    exe = tmp_path / "kernel"
    subprocess.run(
        [GXX, "-std=c++20", "-O1", "-pthread", "-w", str(tmp_path / "kernel.cpp"), "-o", str(exe)],
        check=True,
    )
    grid = -(-tiles // (row_tiles * (warps if stages else 1)))
    args = [m, n, k, tiles, pairs, int(bias), ldx, grid]
    subprocess.run([str(exe), str(tmp_path), *map(str, args)], check=True)
    raw = np.fromfile(tmp_path / "y.bin", dtype=np.int16)
    y = torch.from_numpy(raw).view(dtype).reshape(m, n)
    if e4m3:  # the definition, up to fp32 summation order and one rounding
        ref = fp8_linear_reference(x_rows[:, :k], qw, b if bias else None)
        torch.testing.assert_close(y.float(), ref.float(), rtol=2**-7, atol=1e-3)
        return
    ref = _reference(x_rows[:, :k], w, b if bias else None, order)
    assert _rel_err(y, ref) < 1e-2, (n, k, m, cfg)


@pytest.mark.skipif(GXX is None, reason="needs g++ (C++20) to build the host emulation")
@pytest.mark.parametrize(
    "n, k, m, cfg, dtype, order_dtype, bias",
    [
        # one token tile: B loaded with the weight batch; fused int32 order; ragged K
        (40, 100, 3, (2, 4, 2), torch.bfloat16, torch.int32, True),
        # three token tiles: B per k-step; fp16; int64 order; partial last block of rows
        (72, 384, 20, (2, 8, 2), torch.float16, torch.int64, False),
        # one token tile with 8 pairs per batch (no B prefetch); more warps than pairs
        (32, 640, 8, (1, 16, 8), torch.bfloat16, None, True),
    ],
)
def test_mma_kernel_on_host(tmp_path, n, k, m, cfg, dtype, order_dtype, bias):
    _run_on_host(tmp_path, n, k, m, cfg, dtype, order_dtype, bias)


@pytest.mark.skipif(GXX is None, reason="needs g++ (C++20) to build the host emulation")
@pytest.mark.parametrize(
    "n, k, m, cfg, bias",
    [
        (40, 100, 3, (2, 4, 2), True),
        (72, 384, 20, (2, 8, 2), False),
        (32, 640, 8, (1, 16, 8), True),
    ],
)
def test_mma_e4m3_kernel_on_host(tmp_path, n, k, m, cfg, bias):
    """The e4m3 form (bytes widened to fp16, scales in the epilogue) equals the fp8
    reference, over the same batching cases as the fp16/bf16 kernel."""
    _run_on_host(tmp_path, n, k, m, cfg, torch.bfloat16, None, bias, e4m3=True)


@pytest.mark.skipif(GXX is None, reason="needs g++ (C++20) to build the host emulation")
@pytest.mark.parametrize("cslt", [False, True], ids=["fragments", "cusparselt"])
@pytest.mark.parametrize(
    "n, k, m, cfg, bias, late_b",
    [
        # one token tile, B with the batch; ragged K (fragments) / K % 128 == 64 (buffer)
        (64, 192, 3, (2, 4, 2), True, 0),
        # three token tiles; units split unevenly over the warps
        (128, 640, 20, (2, 8, 2), False, 0),
        # a full 8-tile batch, B per step
        (64, 1024, 64, (1, 8, 1), True, 1),
    ],
)
def test_mma_e4m3_k64_kernel_on_host(tmp_path, n, k, m, cfg, bias, late_b, cslt):
    """The k64 form (e4m3 operands straight to mma.sp m16n8k64, emulated from the PTX ISA's
    fragment rules and CUTLASS's metadata layout) equals the fp8 reference on both weight
    forms: its regrouping of A, B and the metadata is consistent."""
    extra = {"RIA_K64": 1, "RIA_PREFETCH_B": int(not late_b and m <= 8)}
    _run_on_host(tmp_path, n, k, m, cfg, torch.bfloat16, None, bias, True, cslt, extra=extra)


@pytest.mark.skipif(GXX is None, reason="needs g++ (C++20) to build the host emulation")
@pytest.mark.parametrize(
    "n, k, m, cfg, bias",
    [
        # one token tile with B prefetch; two 64-row blocks over two k-chunks
        (128, 128, 3, (2, 4, 2), True),
        # three token tiles; three 64-row blocks; 5 units split unevenly over 8 warps
        (192, 640, 20, (4, 8, 2), False),
        # a full 8-tile batch; one unit (four k-steps) per batch, one row tile per block
        (64, 1024, 64, (1, 8, 1), True),
        # K % 128 == 64 (the last unit has one k-chunk): M = 1, and two units per batch
        (128, 192, 1, (2, 4, 1), False),
        (64, 320, 9, (1, 2, 2), True),
    ],
)
def test_mma_e4m3_cslt_kernel_on_host(tmp_path, n, k, m, cfg, bias):
    """The e4m3 kernel reading cuSPARSELt's e4m3 buffer (values row-major, metadata in
    `cslt_nibble_index(e4m3=True)`'s order, checked against cuSPARSELt's own bytes in
    test_sparse) equals the fp8 reference."""
    _run_on_host(tmp_path, n, k, m, cfg, torch.bfloat16, None, bias, e4m3=True, cslt=True)


@pytest.mark.skipif(GXX is None, reason="needs g++ (C++20) to build the host emulation")
@pytest.mark.parametrize(
    "n, k, m, cfg, dtype, order_dtype, bias",
    [
        # K % 64 == 32 (a half last pair); one token tile with B prefetch; int32 order
        (64, 96, 3, (2, 4, 2), torch.bfloat16, torch.int32, True),
        # two 64-row blocks (tiles 4..7 in the second); three token tiles; fp16
        (128, 256, 20, (4, 8, 2), torch.float16, None, False),
        # N < 64 with a partial last block of rows; 8 pairs per batch; more warps than pairs
        (48, 640, 8, (2, 16, 8), torch.bfloat16, torch.int64, True),
        # a full 8-tile batch over K = 32 * 43 (odd k-tiles)
        (64, 1376, 64, (1, 8, 4), torch.float16, None, True),
        # one pair per batch, four row tiles (cuSPARSELt's 64-row block) per block
        (128, 448, 16, (4, 8, 1), torch.bfloat16, None, True),
    ],
)
def test_mma_cslt_kernel_on_host(tmp_path, n, k, m, cfg, dtype, order_dtype, bias):
    """The kernel reading cuSPARSELt's buffer layout (values row-major, tiled metadata
    unshuffled in registers) equals the masked dense product."""
    _run_on_host(tmp_path, n, k, m, cfg, dtype, order_dtype, bias, cslt=True)


@pytest.mark.skipif(GXX is None, reason="needs g++ (C++20) to build the host emulation")
@pytest.mark.parametrize(
    "n, k, m, cfg, dtype, bias",
    [
        # 64 token rows, three stages over K = 32 * 43 (a last stage of 3 k-steps), a cluster
        # of 3 blocks splitting 11 k-chunks unevenly; N not a multiple of the block's 128 rows
        (176, 1376, 64, (2, 4, 2, 3, 3), torch.bfloat16, True),
        # odd M (2 token tiles, the second partial), fp16, one block column (no cluster),
        # 4 stages over fewer chunks than stages
        (64, 96, 13, (1, 4, 1, 4, 1), torch.float16, False),
        # four row tiles per warp, a cluster of 2 where one block has no chunk at all
        (128, 64, 33, (4, 2, 1, 2, 2), torch.bfloat16, True),
        # N < 64 rows (a partial 64-row block of metadata), two 256-row warps' worth
        (48, 256, 20, (2, 2, 2, 2, 1), torch.bfloat16, False),
    ],
)
def test_mma_tiled_kernel_on_host(tmp_path, n, k, m, cfg, dtype, bias):
    """The tiled kernel (cuSPARSELt's buffer staged in shared memory by cp.async, ldmatrix
    fragments, metadata rebuilt for the natural group order, split-K over a cluster added
    in shared memory) equals the masked dense product; the emulated cp.async lands only at
    cp.async.wait_group, so a stage read too early reads stale or NaN data."""
    _run_on_host(tmp_path, n, k, m, cfg, dtype, None, bias, cslt=True)


# -- kernel (GPU) ----------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("order_dtype", [None, torch.int32, torch.int64])
@pytest.mark.parametrize("bias", [False, True])
def test_mma_kernel_matches_masked_dense(dtype, order_dtype, bias):
    from ria.sparse.mma_sp import mma24_linear

    for n, k in [(256, 1376), (40, 100)]:  # 1376 = 43 * 32; 40 x 100: padded rows and columns
        w = random_24(n, k, dtype=dtype, device="cuda", seed=n)
        p = pack_mma24(w)
        b = torch.randn(n, dtype=dtype, device="cuda") if bias else None
        order = None
        if order_dtype is not None:
            order = torch.randperm(k, device="cuda").to(order_dtype)
        for m in (1, 3, 8, 13, 64):
            x = torch.randn(m, k, dtype=dtype, device="cuda")
            y = mma24_linear(x, p, b, order=order)
            assert y.shape == (m, n) and y.dtype == dtype
            assert _rel_err(y, _reference(x, w, b, order)) < 1e-2, (n, k, m)


@needs_cuda
def test_mma_kernel_every_config_and_strided_input():
    from ria.sparse.mma_sp import CONFIGS, mma24_linear

    n, k = 160, 704  # 10 row tiles: blocks of 4 tiles leave a partial last block
    w = random_24(n, k, device="cuda", seed=5)
    p = pack_mma24(w)
    for m in (5, 24):
        big = torch.randn(m, 2 * k, dtype=w.dtype, device="cuda")
        x = big[:, :k]  # row stride 2k: read in place
        ref = _reference(x, w, None, None)
        for cfg in CONFIGS:
            # (the tiled kernel reads cuSPARSELt's buffer only; k64 is an e4m3 form)
            if not cfg.tiled and not cfg.k64:
                assert _rel_err(mma24_linear(x, p, config=cfg), ref) < 1e-2, (m, cfg)


def test_mma_config_rejects_bad_shapes():
    from ria.sparse.mma_sp import CONFIGS, MmaConfig, candidates, default_config, e4m3_candidates

    with pytest.raises(InvalidArgumentError, match="at most 32 warps"):
        MmaConfig(1, 64, 2)
    with pytest.raises(InvalidArgumentError, match="positive"):
        MmaConfig(0, 8, 2)
    with pytest.raises(InvalidArgumentError, match="needs the tiled kernel"):
        MmaConfig(2, 8, 2, split=2)
    with pytest.raises(InvalidArgumentError, match="split <= 8"):
        MmaConfig(2, 4, 2, 3, 9)
    with pytest.raises(InvalidArgumentError, match="whole 64-row blocks"):
        MmaConfig(1, 2, 2, 4)  # 32 rows per block
    with pytest.raises(InvalidArgumentError, match="stages >= 2"):
        MmaConfig(2, 4, 2, 1)
    assert str(MmaConfig(2, 4, 2, 4, 3)) == "t2w4u2s4k3" and MmaConfig(2, 4, 2, 4).tiled
    with pytest.raises(InvalidArgumentError, match="late_b is 0 or 1"):
        MmaConfig(1, 16, 1, late_b=2)
    with pytest.raises(InvalidArgumentError, match="hint 0"):
        MmaConfig(1, 16, 1, hint=4)
    with pytest.raises(InvalidArgumentError, match="plain kernel's"):
        MmaConfig(2, 4, 2, 3, 4, late_b=1)
    assert str(MmaConfig(1, 16, 4, hint=2, late_b=1)) == "r1w16u4h2b"
    assert str(MmaConfig(2, 8, 2, min_blocks=4)) == "r2w8u2n4"
    with pytest.raises(InvalidArgumentError, match="at most 64 warps per SM"):
        MmaConfig(1, 16, 2, min_blocks=5)
    with pytest.raises(InvalidArgumentError, match="plain kernel's"):
        MmaConfig(2, 4, 2, 3, 4, min_blocks=2)
    assert MmaConfig(1, 16, 1, hint=2).streaming and not MmaConfig(1, 16, 1).streaming
    for m in (1, 8, 9, 16, 17, 64):  # every candidate is one of the configurations tested
        for cslt in (False, True):
            assert set(candidates(m, cslt)) <= set(CONFIGS)
            assert set(e4m3_candidates(m, cslt)) <= set(CONFIGS)
            assert not any(c.tiled and not c.wgmma for c in e4m3_candidates(m, cslt))
            assert default_config(m, cslt) == candidates(m, cslt)[0]
            # The tiled kernel reads no input order: an ordered call defaults to a plain one.
            assert not default_config(m, cslt, ordered=True).tiled
    assert default_config(64, cslt=True).tiled  # while an unordered one at M > 32 is tiled


@needs_cuda
def test_mma_status_compiles_on_gpu():
    from ria.sparse.mma_sp import mma_status

    assert mma_status() is None


@needs_cuda
def test_mma_kernel_cache_on_disk(tmp_path, monkeypatch):
    from ria.sparse import mma_sp

    monkeypatch.setenv("RIA_CACHE", str(tmp_path))
    monkeypatch.setattr(mma_sp, "_KERNELS", {})
    w = random_24(32, 64, device="cuda")
    x = torch.randn(2, 64, dtype=w.dtype, device="cuda")
    y = mma_sp.mma24_linear(x, pack_mma24(w))
    cached = list((tmp_path / "kernels").glob("*.bin"))
    assert len(cached) == 1 and cached[0].stat().st_size > 0
    monkeypatch.setattr(mma_sp, "_KERNELS", {})
    assert torch.equal(mma_sp.mma24_linear(x, pack_mma24(w)), y)  # loaded from the file


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_mma_cslt_kernel_reads_cusparselt_buffer(dtype, bias):
    """The kernel on cuSPARSELt's own compressed buffer (no copy, no repacking) against the
    masked dense product, at M = 1..64 and shapes with K % 64 == 32 and N < 64."""
    from ria.sparse.cslt import cslt_compress, share_cslt_buffer
    from ria.sparse.mma_sp import CONFIGS, mma24_linear

    for n, k in [(256, 1376), (192, 4096), (48, 96), (128, 11008)]:
        w = random_24(n, k, dtype=dtype, device="cuda", seed=n + k)
        packed = cslt_compress(w)
        c = share_cslt_buffer(pack_24(w), packed)
        assert c.layout == "cslt", (n, k)  # the tiled metadata decoded to the same indices
        storage = packed.untyped_storage().data_ptr()
        assert c.values.untyped_storage().data_ptr() == storage
        assert c.meta.untyped_storage().data_ptr() == storage
        b = torch.randn(n, dtype=dtype, device="cuda") if bias else None
        for m in (1, 3, 8, 13, 16, 33, 64):
            x = torch.randn(m, k, dtype=dtype, device="cuda")
            ref = _reference(x, w, b, None)
            y = mma24_linear(x, c, b)
            assert y.shape == (m, n) and y.dtype == dtype
            assert _rel_err(y, ref) < 1e-2, (n, k, m)
        x = torch.randn(24, k, dtype=dtype, device="cuda")
        order = torch.randperm(k, device="cuda", dtype=torch.int32)
        ref = _reference(x, w, b, order)
        for cfg in CONFIGS:
            if not cfg.tiled and not cfg.k64:  # (no input order in the tiled kernel; k64: e4m3)
                assert _rel_err(mma24_linear(x, c, b, order=order, config=cfg), ref) < 1e-2, cfg


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mma_tiled_kernel_reads_cusparselt_buffer(dtype):
    """The tiled kernel on cuSPARSELt's buffer against the masked dense product, for every
    tiled shape tuning may pick and a few more (clusters of 1..8 blocks), M = 9..64 (odd
    too), with and without bias, the LLaMA-2-7B shapes and small odd ones; a strided x and
    repeated calls give the same bits (the split-K sums are added in a fixed order)."""
    from ria.sparse.cslt import cslt_compress, share_cslt_buffer
    from ria.sparse.mma_sp import CONFIGS, MmaConfig, compile_kernels

    shapes = [c for c in CONFIGS if c.tiled and not c.wgmma]
    shapes += [MmaConfig(1, 4, 1, 2, 1), MmaConfig(2, 2, 2, 3, 8), MmaConfig(4, 2, 1, 4, 2)]
    compile_kernels(dtype, (9, 21, 32, 64), cslt=True, configs=shapes, threads=16)
    for n, k in [(48, 96), (208, 1376), (4096, 4096), (11008, 4096), (4096, 11008)]:
        w = random_24(n, k, dtype=dtype, device="cuda", seed=n + k)
        c = share_cslt_buffer(pack_24(w), cslt_compress(w))
        assert c.layout == "cslt", (n, k)
        b = torch.randn(n, dtype=dtype, device="cuda")
        small = n * k < 2**20  # every case on the small shapes, a few on the large
        for m in (9, 16, 21, 32, 64) if small else (16, 64):
            x = torch.randn(m, k + 8, dtype=dtype, device="cuda")[:, :k]  # row stride k + 8
            for bias in (None, b) if small else (b,):
                ref = _reference(x, w, bias, None)
                for cfg in shapes:
                    assert_mma_config_matches(x, c, bias, ref, cfg)


def test_cusparselt_buffer_is_shared_when_it_decodes_to_the_weight():
    """`share_cslt_buffer` keeps cuSPARSELt's tiled metadata whenever it stands for the same
    weight with ordered index pairs, even where it picks other zero columns than `pack_24`
    (groups with fewer than two nonzeros); never with an unordered pair (mma.sp's ordered
    metadata). CPU: the buffer is built as cuSPARSELt lays it out."""
    from ria.sparse.cslt import share_cslt_buffer
    from ria.sparse.format import Compact24, unpack_24

    w = random_24(64, 128)
    w[0, :4] = torch.tensor([0.0, 0.0, 1.5, 0.0])  # one nonzero: pack_24 keeps columns 0, 2
    w[1, 4:8] = 0.0  # none: pack_24 keeps columns 0, 1
    c = pack_24(w)

    def buffer_with(first_nibble: int, values: tuple[float, float]) -> torch.Tensor:
        meta, vals = c.meta.clone(), c.values.clone()
        meta[0, 0] = (meta[0, 0] & ~15) | first_nibble
        vals[0, :2] = torch.tensor(values)
        alt = Compact24(vals, meta, 128)
        return torch.cat([vals.reshape(-1), to_cslt_layout(alt).view(w.dtype)])

    shared = share_cslt_buffer(c, buffer_with(2 | 3 << 2, (1.5, 0.0)))  # columns 2, 3
    assert shared.layout == "cslt" and torch.equal(unpack_24(shared), w)
    unordered = share_cslt_buffer(c, buffer_with(2 | 2 << 2, (1.5, 0.0)))
    assert unordered.layout == "rows" and unordered.values is c.values  # values differ too


def test_k64_shapes_are_e4m3_plain_ones_offered_where_native(monkeypatch):
    from ria.sparse import mma_sp
    from ria.sparse.mma_sp import MmaConfig

    k64 = MmaConfig(1, 16, 2, hint=2, k64=True)
    assert str(k64) == "r1w16u2h2k64" and k64 != MmaConfig(1, 16, 2, hint=2)
    for bad in (dict(stages=3, warps=4), dict(stages=4, warps=4, split=2, wgmma=True)):
        with pytest.raises(InvalidArgumentError, match="k64"):
            MmaConfig(**{"row_tiles": 1, "unroll": 2, "k64": True, **bad})
    with pytest.raises(InvalidArgumentError, match="e4m3 kernel's form"):
        mma_sp.kernel_source(torch.bfloat16, k64, 1, 0)  # not e4m3
    assert "#define RIA_K64 1" in mma_sp.kernel_source(torch.bfloat16, k64, 1, 0, e4m3=True)
    with pytest.raises(InvalidArgumentError, match="e4m3 kernel's form"):
        mma_sp.mma24_linear(torch.zeros(2, 64, dtype=torch.bfloat16),
                            pack_mma24(random_24(16, 64)), config=k64)  # fmt: skip
    for capability, native in [((9, 0), False), ((10, 0), False), ((8, 9), True), ((12, 0), True)]:
        monkeypatch.setattr(mma_sp, "_capability", lambda c=capability: c)
        for m in (1, 8, 16, 64):
            for cslt in (False, True):
                shapes = mma_sp.e4m3_candidates(m, cslt)
                assert any(c.k64 for c in shapes) == native, (capability, m, cslt)
                assert not shapes[0].k64  # the widened default


def test_unproven_shapes_are_timed_only_after_agreeing_with_a_plain_one():
    """k64 and wgmma shapes are checked against a plain shape's output before
    `mma_best_config` times them, within their dtype's bound."""
    from ria.sparse import mma_sp
    from ria.sparse.mma_sp import BF16_AGREE_TOLERANCE, E4M3_AGREE_TOLERANCE, MmaConfig

    k64 = MmaConfig(1, 16, 2, k64=True)
    assert mma_sp._unproven(k64) and mma_sp._unproven(MmaConfig(1, 4, 2, 4, 2, wgmma=True))
    assert not mma_sp._unproven(MmaConfig(1, 16, 2, hint=2))
    plain = torch.tensor([[1.0, -2.0], [4.0, 0.5]])
    assert mma_sp._agrees(plain + 1e-3, plain, k64, BF16_AGREE_TOLERANCE)
    assert not mma_sp._agrees(plain, None, k64, E4M3_AGREE_TOLERANCE)  # nothing to agree with
    with pytest.warns(UserWarning, match="r1w16u2k64 shape disagrees"):
        assert not mma_sp._agrees(plain.flip(1), plain, k64, E4M3_AGREE_TOLERANCE)
    # 0.05 off at a largest output of 4: within bf16's bound (2 bf16 ulps: 0.0625), not
    # e4m3's (0.04); the bound scales with the largest output
    assert mma_sp._agrees(plain + 0.05, plain, k64, BF16_AGREE_TOLERANCE)
    with pytest.warns(UserWarning, match="disagrees"):
        assert not mma_sp._agrees(plain + 0.05, plain, k64, E4M3_AGREE_TOLERANCE)
    assert mma_sp._agrees(10 * plain + 0.35, 10 * plain, k64, E4M3_AGREE_TOLERANCE)


def _has_nvrtc() -> bool:
    try:
        from cuda.bindings import nvrtc  # noqa: F401  (torch's CUDA wheels bring it)
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_nvrtc(), reason="needs NVRTC from cuda-bindings")
@pytest.mark.parametrize(
    "arch, config, e4m3, cslt",
    [
        ("sm_90", MmaConfig(2, 8, 2), False, False),  # bf16 on the fragments
        ("sm_90", MmaConfig(2, 8, 1), True, True),  # e4m3, widened, on cuSPARSELt's buffer
        ("sm_89", MmaConfig(2, 8, 2, k64=True), True, False),  # the k64 form, both weights
        ("sm_120a", MmaConfig(1, 16, 2, hint=2, late_b=1, k64=True), True, True),
        ("sm_90a", MmaConfig(2, 4, 2, 3, 4), False, True),  # the tiled kernel
        ("sm_90a", MmaConfig(3, 4, 2, 5, 2, wgmma=True, multicast=2), False, True),
        ("sm_90a", MmaConfig(1, 4, 4, 4, 2, wgmma=True), True, True),  # wgmma e4m3
        ("sm_90a", MmaConfig(2, 8, 2, 3, 1, wgmma=True, token_tiles=16), True, True),  # prefill
    ],
)
def test_kernel_forms_compile_for_their_targets(arch, config, e4m3, cslt):
    """Each form of the kernel compiles (NVRTC and ptxas, no GPU needed) at 1 and 8 token
    tiles (a prefill shape: its own) without spilling, and no wgmma is serialized (ptxas
    C7519/C7515: a wgmma under a branch made it wait for each one, 2026-12-06): a GPU session
    then starts from kernels that build as meant."""
    from ria.sparse.mma_sp import kernel_source, nvrtc_cubin

    for tiles in (config.token_tiles,) if config.token_tiles else (1, 8):
        cubin, log = nvrtc_cubin(kernel_source(torch.bfloat16, config, tiles, 0, e4m3, cslt), arch)
        assert cubin and "registers" in log, log
        spilled = [int(b) for b in re.findall(r"(\d+) bytes spill stores", log)]
        assert spilled and not any(spilled), (config, tiles, log)
        assert "serialized" not in log, (config, tiles, log)


def test_mma_candidates_without_clusters(monkeypatch):
    """Before compute capability 9.0 no shape needs a cluster, and every token count keeps
    a default; a cluster shape asked for explicitly is refused."""
    from ria.sparse import mma_sp

    monkeypatch.setattr(mma_sp, "_has_clusters", lambda: False)
    for m in (1, 9, 16, 17, 32, 33, 64):
        shapes = mma_sp.candidates(m, cslt=True)
        assert shapes and all(c.split == 1 for c in shapes), m
    c = pack_24(random_24(64, 128))
    tiled = mma_sp.Compact24(c.values, to_cslt_layout(c), 128, layout="cslt")
    with pytest.raises(InvalidArgumentError, match="clusters"):
        mma_sp.mma24_linear(torch.zeros(16, 128, dtype=c.values.dtype), tiled,
                            config=mma_sp.MmaConfig(2, 2, 1, 2, 2))  # fmt: skip


def test_mma_tiled_kernel_refuses_what_it_cannot_read():
    from ria.sparse.mma_sp import MmaConfig, mma24_linear

    w = random_24(64, 128)
    cfg = MmaConfig(2, 2, 1, 2)
    x = torch.zeros(16, 128, dtype=w.dtype)
    with pytest.raises(InvalidArgumentError, match="cuSPARSELt's buffer without an input order"):
        mma24_linear(x, pack_mma24(w), config=cfg)  # the mma fragments


def test_mma_cslt_checks_its_layout():
    from ria.sparse.format import Compact24
    from ria.sparse.mma_sp import mma24_linear

    w = random_24(64, 128)
    c = pack_24(w)
    x = torch.zeros(2, 128, dtype=w.dtype)
    with pytest.raises(InvalidArgumentError, match="cuSPARSELt's layout"):
        mma24_linear(x, c)  # row-major metadata words
    tiled = Compact24(c.values, to_cslt_layout(c)[:-1], 128, layout="cslt")
    with pytest.raises(InvalidArgumentError, match="meta holds 255 words"):
        mma24_linear(x, tiled)
    odd = pack_24(random_24(64, 112))
    with pytest.raises(InvalidArgumentError, match="K % 32 == 0"):
        mma24_linear(torch.zeros(1, 112, dtype=w.dtype), Compact24(
            odd.values[:, :56], odd.meta.reshape(-1), 112, layout="cslt"
        ))  # fmt: skip


@pytest.mark.skipif(GXX is None, reason="needs g++ (C++20) to build the host emulation")
@pytest.mark.parametrize(
    "n, k, m, cfg, dtype, cslt, bias, late_b",
    [
        # cuSPARSELt's buffer, K % 64 == 32 (the last batch holds a half pair), one token
        # tile (B loaded with the batch); pairs not a multiple of the warps' batches
        (64, 1376, 1, (1, 4, 1), torch.bfloat16, True, True, 0),
        # two pairs per batch, three token tiles, fp16, two row tiles
        (128, 448, 20, (2, 2, 2), torch.float16, True, False, 0),
        # more warps than pairs (warps with no batch at all), M = 8, B per k-step
        (48, 320, 8, (1, 8, 1), torch.bfloat16, True, True, 1),
        # 4 pairs per batch, B per k-step, a partial last batch
        (64, 1376, 3, (1, 2, 4), torch.bfloat16, True, True, 1),
        # the packed fragments, two pairs per batch, B per k-step
        (40, 640, 3, (1, 2, 2), torch.bfloat16, False, True, 1),
    ],
)
def test_mma_streaming_kernel_on_host(tmp_path, n, k, m, cfg, dtype, cslt, bias, late_b):
    """With the weight-load cache hint and / or the tokens' B loaded per k-step
    (`late_b`), the plain kernel still equals the masked dense product."""
    extra = {"RIA_LDH": 2} | ({"RIA_PREFETCH_B": 0} if late_b else {})
    _run_on_host(tmp_path, n, k, m, cfg, dtype, None, bias, cslt=cslt, extra=extra)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mma_streaming_kernel_reads_cusparselt_buffer(dtype):
    """The plain kernel with the M <= 8 streaming options (`MmaConfig.hint`, `late_b`), on
    cuSPARSELt's buffer and on the packed fragments, against the masked
    dense product at M = 1, 3, 8, with and without bias, on the LLaMA-2-7B shapes and small
    odd ones; every such shape tuning may pick and a few more; repeated calls give the same
    bits."""
    from ria.sparse.cslt import cslt_compress, share_cslt_buffer
    from ria.sparse.mma_sp import CONFIGS, MmaConfig, compile_kernels, mma24_linear

    shapes = [c for c in CONFIGS if c.streaming and not c.k64]  # (k64: the e4m3 kernel's)
    shapes += [MmaConfig(2, 4, 2, hint=3), MmaConfig(2, 8, 2, hint=1, late_b=1)]
    shapes = list(dict.fromkeys(shapes))
    compile_kernels(dtype, (1,), cslt=True, configs=shapes, threads=16)
    for n, k in [(48, 96), (208, 1376), (4096, 4096), (11008, 4096), (4096, 11008)]:
        w = random_24(n, k, dtype=dtype, device="cuda", seed=n + k)
        c = share_cslt_buffer(pack_24(w), cslt_compress(w))
        assert c.layout == "cslt", (n, k)
        frags = pack_mma24(w)
        b = torch.randn(n, dtype=dtype, device="cuda")
        for m in (1, 3, 8):
            x = torch.randn(m, k + 8, dtype=dtype, device="cuda")[:, :k]  # row stride k + 8
            for bias in (None, b):
                ref = _reference(x, w, bias, None)
                for cfg in shapes:
                    assert_mma_config_matches(x, c, bias, ref, cfg)
                    if n * k < 2**20 and cfg == shapes[0]:  # packed fragments, small shapes
                        assert _rel_err(mma24_linear(x, frags, bias, config=cfg), ref) < 1e-2


@pytest.mark.skipif(GXX is None, reason="needs g++ (C++20) to build the host emulation")
def test_mma_e4m3_streaming_kernel_on_host(tmp_path):
    """The e4m3 form with the weight-load cache hint and B per k-step equals the fp8
    reference."""
    extra = {"RIA_LDH": 2, "RIA_PREFETCH_B": 0}
    _run_on_host(tmp_path, 40, 640, 3, (1, 2, 2), torch.bfloat16, None, True, True, extra=extra)


def test_a_cslt_view_the_kernel_cannot_read_is_refused_by_name():
    """`_check_cslt`'s refusals, before anything is launched (CPU tensors suffice)."""
    from ria.sparse.format import Compact24
    from ria.sparse.mma_sp import mma24_fp8_linear

    n, k = 64, 128
    e4m3 = torch.float8_e4m3fn
    q, q_scale, scale = torch.zeros(1, k, dtype=e4m3), torch.ones(1), torch.ones(n)
    meta = torch.zeros(n * k // 16, dtype=torch.int32)
    storage = torch.zeros(n * k // 2 + 1, dtype=e4m3)
    cases = [
        (Compact24(storage[:-1].view(n, k // 2), meta, k, "rows"), "cuSPARSELt's layout"),
        (Compact24(storage[1:].view(n, k // 2), meta, k, "cslt"), "16-byte aligned"),
        (Compact24(storage[:-1].view(n, k // 2), meta[::2], k, "cslt"), "1-D contiguous"),
    ]
    for weight, message in cases:
        with pytest.raises(InvalidArgumentError, match=message):
            mma24_fp8_linear(q, q_scale, weight, scale)
