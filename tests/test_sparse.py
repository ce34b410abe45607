"""The GPU runtime (`ria.sparse`): compact 2:4 format, layer selection, no-GPU behaviour,
the decode kernels (Triton interpreter on CPU), and on CUDA every kernel against the masked
dense layer at token counts 1..4096 plus whole-model sparsify / generate."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import needs_cuda, prune_model_24, random_24, tiny_model

import ria
from ria.sparse import (
    Choice,
    Sparse24Linear,
    SparsifyReport,
    StaticGenerator,
    check_24,
    count_24_violations,
    find_linears,
    pack_24,
    sparse24_linear,
    sparsify,
    unpack_24,
)
from ria.sparse.format import (
    Compact24,
    cslt_nibble_index,
    nibbles,
    pack_mma24,
    to_cslt_layout,
    unpack_indices,
)
from ria.sparse.sparsify import SparseLayerReport

CUDA = torch.cuda.is_available()


# -- compact format (CPU) -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(8, 32), (16, 256), (5, 40), (3, 100), (1, 4)])
def test_pack_unpack_round_trip(dtype, shape):
    w = random_24(*shape, dtype=dtype)
    c = pack_24(w)
    kp = -(-shape[1] // 32) * 32
    assert c.values.shape == (shape[0], kp // 2) and c.values.dtype == dtype
    assert c.meta.shape == (shape[0], kp // 32) and c.meta.dtype == torch.int32
    assert torch.equal(unpack_24(c), w)


def test_round_trip_sparser_groups():
    """Groups with 0 or 1 nonzeros keep their lowest zero columns as explicit zeros."""
    w = torch.zeros(4, 32)
    w[0, 2] = 1.5  # one nonzero
    w[1, 3] = -2.0
    w[1, 0] = 4.0
    w[3, 31] = 7.0
    c = pack_24(w)
    assert torch.equal(unpack_24(c), w)
    idx = unpack_indices(c.meta)
    assert idx[0, 0].tolist() == [0, 2]  # nonzero column 2 plus lowest zero column 0
    assert idx[2, 0].tolist() == [0, 1]  # all-zero group
    assert idx[3, 7].tolist() == [0, 3]


def test_index_encoding():
    """Nibble `i0 | i1 << 2` at bits 4*(g % 8) of word g // 8; values in column order."""
    w = torch.zeros(1, 64)
    w[0, 1], w[0, 3] = 1.0, 5.0  # group 0 keeps columns 1, 3 -> 1 | 3 << 2 = 0xD
    w[0, 4 + 0], w[0, 4 + 2] = 2.0, 3.0  # group 1: columns 0, 2 -> 0 | 2 << 2 = 0x8
    w[0, 60 + 2], w[0, 60 + 3] = 6.0, 8.0  # group 15 (word 1, nibble 7): 2 | 3 << 2 = 0xE
    c = pack_24(w)
    word0 = c.meta[0, 0].item() & 0xFFFFFFFF
    word1 = c.meta[0, 1].item() & 0xFFFFFFFF
    assert word0 & 0xFF == 0x8D
    assert (word0 >> 8) == 0x444444  # empty groups 2..7 hold (0, 1)
    assert word1 >> 28 == 0xE  # the top nibble wraps into int32's sign bit
    assert c.meta[0, 1].item() < 0
    assert c.values[0, :4].tolist() == [1.0, 5.0, 2.0, 3.0]
    assert c.values[0, 30:32].tolist() == [6.0, 8.0]


def test_cslt_layout_order():
    """The nibble order measured in cuSPARSELt 0.8's compressed buffers on an H200: 16x8-group
    tiles, rows r and r + 8 interleaved, tiles down 64-row blocks, then along K."""
    n, k = 128, 256
    word, shift = cslt_nibble_index(n, k)
    q = word * 8 + shift // 4  # nibble position in the metadata region
    for r in range(16):
        for g in range(8):
            assert q[r, g] == 16 * (r % 8) + 4 * (g % 4) + (r // 8) + 2 * (g // 4)
    assert q[16, 0] == 128 and q[0, 8] == 4 * 128 and q[64, 0] == 4 * 128 * (k // 32)
    assert sorted(q.reshape(-1).tolist()) == list(range(n * k // 4))  # a permutation


@pytest.mark.parametrize("shape", [(64, 128), (128, 256), (32, 64), (192, 96)])
def test_cslt_layout_round_trip(shape):
    w = random_24(*shape)
    c = pack_24(w)
    tiled = Compact24(c.values, to_cslt_layout(c), shape[1], layout="cslt")
    assert torch.equal(unpack_24(tiled), w)


def _cslt_e4m3_probes() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(dense e4m3 weight, cuSPARSELt's compressed bytes) for the probes of
    `tests/data/cslt_e4m3_128x256.npz`: `torch._cslt_compress` of e4m3 2:4 weights (128, 256),
    cuSPARSELt 0.8.0 on an H200, 2026-12-03, made by `benches/gpu_speed.py`'s
    `_e4m3_layout_probes`, whose docstring defines each probe's weight (rebuilt here)."""
    import numpy as np

    data = np.load(Path(__file__).parent / "data" / "cslt_e4m3_128x256.npz")
    n, k = 128, 256
    pattern = torch.from_numpy(np.unpackbits(data["pattern"])[: n * k].reshape(n, k)).bool()
    pos = torch.zeros(n, k, dtype=torch.int64)
    pos[pattern] = torch.arange(n * k // 2)
    probes = []
    for d, packed in enumerate(data["position"]):
        w = torch.where(pattern, 1.0 + ((pos >> (4 * d)) & 15).float(), 0.0)
        probes.append((w, packed))
    groups = torch.arange(n * k // 4).reshape(n, k // 4)
    col = torch.arange(k) % 4
    for b, packed in enumerate(data["group"]):
        high = ((groups >> b) & 1).bool().repeat_interleave(4, dim=1)
        probes.append((torch.where(high, col >= 2, col < 2).float(), packed))
    return [(w.to(torch.float8_e4m3fn), torch.from_numpy(p)) for w, p in probes]


def test_cslt_e4m3_layout_matches_cusparselt_bytes():
    """Our e4m3 compact form in cuSPARSELt's order, byte for byte against its buffers: values
    row-major, then the nibbles in `cslt_nibble_index(..., e4m3=True)`'s order."""
    probes = _cslt_e4m3_probes()
    assert len(probes) == 4 + 13  # 14-bit value positions, 13-bit group numbers
    for w, packed in probes:
        c = pack_24(w)
        assert c.values.dtype == torch.float8_e4m3fn
        ours = torch.cat(
            [c.values.reshape(-1).view(torch.uint8), to_cslt_layout(c).view(torch.uint8)]
        )
        assert torch.equal(ours, packed.reshape(-1))
    # The 16-bit order is another one (so e4m3 weights need their own).
    w16, s16 = cslt_nibble_index(128, 256)
    w8, s8 = cslt_nibble_index(128, 256, e4m3=True)
    assert not torch.equal(w16 * 8 + s16 // 4, w8 * 8 + s8 // 4)
    c = pack_24(w)
    tiled = Compact24(c.values, to_cslt_layout(c), 256, layout="cslt")
    assert torch.equal(nibbles(tiled), nibbles(c))


def test_cslt_e4m3_buffer_is_shared():
    """`share_cslt_buffer` reads cuSPARSELt's real e4m3 buffers in place (values and tiled
    metadata), and keeps our own form for a buffer of another weight."""
    from ria.sparse.cslt import share_cslt_buffer

    probes = _cslt_e4m3_probes()
    for w, packed in probes[:2] + probes[-2:]:
        c = pack_24(w)
        shared = share_cslt_buffer(c, packed.view(torch.float8_e4m3fn))
        assert shared.layout == "cslt" and shared.values.data_ptr() == packed.data_ptr()
        assert torch.equal(unpack_24(shared).view(torch.uint8), w.view(torch.uint8))
    w, _ = probes[0]
    other = probes[1][1].view(torch.float8_e4m3fn)
    assert share_cslt_buffer(pack_24(w), other).layout == "rows"


def test_rejects_non_24():
    w = random_24(4, 16, dtype=torch.float32)
    assert check_24(w) is None and count_24_violations(w) == 0
    w[2, 4:8] = torch.tensor([1.0, 2.0, 3.0, 0.0])  # 3 nonzeros in one group
    assert count_24_violations(w) == 1
    assert "1 of 16 groups" in check_24(w)
    with pytest.raises(ValueError, match="not 2:4"):
        pack_24(w)
    assert "multiple of 4" in check_24(torch.zeros(2, 6))
    assert "2-D" in check_24(torch.zeros(2, 4, 4))


# -- layer selection and the no-GPU path (CPU) ------------------------------------------


def test_find_linears_selection():
    model = tiny_model("llama").to(torch.bfloat16)
    prune_model_24(model)
    unpruned = model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        unpruned.weight.copy_(torch.randn_like(unpruned.weight))
    found = {name: reason for name, _, reason in find_linears(model, require_cuda=False)}
    assert found["lm_head"].startswith("output embedding")
    assert found["model.layers.1.mlp.down_proj"].startswith("not 2:4")
    ok = [n for n, r in found.items() if r is None]
    assert len(ok) == 2 * 7 - 1  # q k v o gate up down per block, minus the unpruned one
    on_cpu = {n: r for n, _, r in find_linears(model)}
    assert on_cpu["model.layers.0.self_attn.q_proj"] == "on cpu, not CUDA"
    fp32 = {n: r for n, _, r in find_linears(model.float(), require_cuda=False)}
    assert "float16 or bfloat16" in fp32["model.layers.0.self_attn.q_proj"]


@pytest.mark.skipif(CUDA, reason="checks the no-GPU path")
def test_sparsify_without_cuda_is_a_noop():
    model = prune_model_24(tiny_model("llama").to(torch.bfloat16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    report = sparsify(model)
    assert isinstance(report, SparsifyReport)
    assert not report.applied and "CUDA is not available" in report.reason
    assert report.layers == [] and "nothing converted" in str(report)
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(m is modules[n] for n, m in model.named_modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="backend"):
        sparsify(model, backend="cutlass")


def test_sparse_linear_buckets_dense_on_cpu():
    w = random_24(24, 64, dtype=torch.float32)
    b = torch.randn(24)
    plan = {1: Choice("dense"), 16: Choice("dense"), 256: Choice("dense")}
    mod = Sparse24Linear(64, 24, plan, weight=w, bias=b)
    assert [mod.choice_for(m).backend for m in (1, 2, 16, 17, 10_000)] == ["dense"] * 5
    assert mod.buckets == [1, 16, 256] and mod.choice_for(300) is plan[256]
    x = torch.randn(2, 3, 64)
    torch.testing.assert_close(mod(x), torch.nn.functional.linear(x, w, b))
    assert mod.weight_bytes() == w.numel() * 4 and "plan=[<=1:dense" in repr(mod)
    assert "weight" not in mod.state_dict()  # forms stay out of checkpoints
    with pytest.raises(ValueError, match="no weight form"):
        Sparse24Linear(64, 24, {1: Choice("triton")}, weight=w)


def test_sparse_linear_refuses_a_cast_of_its_weight_forms():
    """A cast would read cuSPARSELt's buffer (metadata bits after the values) as numbers."""
    w = random_24(24, 64, dtype=torch.bfloat16)
    packed = torch.cat([pack_24(w).values.reshape(-1), torch.arange(96).to(torch.bfloat16)])
    mod = Sparse24Linear(64, 24, {1: Choice("cusparselt")}, packed=packed, bias=torch.ones(24))
    before = mod.packed.clone()
    with pytest.raises(ria.InvalidArgumentError, match=r"cannot be cast to torch\.float16"):
        mod.half()
    assert mod.packed.dtype == torch.bfloat16 and torch.equal(mod.packed, before)
    assert mod.to(torch.bfloat16).packed is mod.packed  # no cast: nothing to do
    mod.to("cpu")  # a move is fine


@pytest.mark.parametrize("backend", ["triton", "mma_cslt", "cusparselt"])
def test_sparse_linear_says_its_kernels_need_cuda(backend):
    # It failed in kernel terms ("x is on cpu, the weight on cpu", Triton's "0 active
    # drivers") after `model.cpu()`.
    w = random_24(24, 64)
    compact = pack_24(w)
    packed = torch.cat([compact.values.reshape(-1), torch.zeros(96, dtype=w.dtype)])
    if backend == "mma_cslt":
        compact = Compact24(compact.values, to_cslt_layout(compact), 64, "cslt")
    mod = Sparse24Linear(64, 24, {1: Choice(backend)}, compact=compact, packed=packed)
    with pytest.raises(ria.InvalidArgumentError, match=f"{backend} kernel runs on CUDA only"):
        mod(torch.randn(3, 64, dtype=w.dtype))


def test_sparse_linear_reads_its_input_through_its_order_on_cpu():
    """A free channel order (from a `GatheredLinear`): `x[..., order] @ W.T + b`."""
    w = random_24(24, 64, dtype=torch.float32)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    mod = Sparse24Linear(64, 24, {1: Choice("dense")}, weight=w, input_order=order)
    x = torch.randn(2, 3, 64)
    torch.testing.assert_close(mod(x), torch.nn.functional.linear(x[..., order], w))
    assert "gathered=True" in repr(mod)


def test_report_formatting():
    lr = SparseLayerReport("a.q", 32, 64, True, plan={1: "triton", 1024: "cusparselt"})
    lr.times_us = {1: {"dense": 10.0, "triton": 6.0}, 1024: {"dense": 30.0, "cusparselt": 20.0}}
    lr.dense_bytes, lr.sparse_bytes = 4096, 2304
    skip = SparseLayerReport(
        "lm_head", 100, 64, False, reason="output embedding (lm_head) stays dense"
    )
    rep = SparsifyReport(True, "", "auto", (1, 1024), [lr, skip])
    assert lr.speedup(1) == pytest.approx(10 / 6) and lr.speedup(1024) == pytest.approx(1.5)
    md = rep.markdown()
    assert "triton 1.67x" in md and "cusparselt 1.50x" in md and "0.562" in md
    assert rep.to_dict()["sparse_bytes"] == 2304 and "1 layers converted" in str(rep)


def test_static_generator_eager_matches_hf_greedy():
    """Positions, masks and cache bookkeeping of `StaticGenerator` (eager, CPU) against
    transformers' own greedy search."""
    model = tiny_model("llama")
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(0))
    ref = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    gen = StaticGenerator(model, 2, 16, cuda_graph=False)
    out = gen.generate(ids, 6)
    assert torch.equal(out, ref[:, 7:])
    again = gen.generate(ids, 6)  # a second sequence reuses the cache
    assert torch.equal(again, out)


# -- Triton kernels in the interpreter (CPU) --------------------------------------------

_INTERPRET_SCRIPT = textwrap.dedent(
    """
    import itertools
    import torch
    from ria.sparse import triton_gemv as tg
    from ria.sparse.format import pack_24, to_cslt_layout
    from ria.sparse.triton_gemv import sparse24_linear
    from helpers import random_24
    torch.manual_seed(0)
    cases = [  # (dtype, n, k, m): bf16 only through the gemv, the interpreter's bf16 dot is off
        (torch.float16, 40, 96, 1), (torch.bfloat16, 64, 256, 1), (torch.bfloat16, 33, 320, 1),
        (torch.float16, 64, 256, 3), (torch.float16, 40, 96, 17), (torch.float16, 48, 512, 70),
    ]
    variants = [  # small K tiles so the unmasked main loop and the masked tail both run
        (dict(BLOCK_N=8, BLOCK_K=64, X_VEC=1), dict(BLOCK_N=16, BLOCK_K=64, DENSE_TILE=1)),
        (dict(BLOCK_N=4, BLOCK_K=128, X_VEC=0), dict(BLOCK_N=32, BLOCK_K=128, DENSE_TILE=0)),
    ]
    for (gemv_cfg, mm_cfg), (dtype, n, k, m) in itertools.product(variants, cases):
        tg._GEMV_DEFAULT, tg._MM_DEFAULT = gemv_cfg, mm_cfg
        w = random_24(n, k, dtype=dtype, seed=n + k)
        c = pack_24(w)
        x = torch.randn(m, k, dtype=dtype)
        for bias in (None, torch.randn(n, dtype=dtype)):
            y = sparse24_linear(x, c, bias)
            ref = x.double() @ w.double().t() + (0 if bias is None else bias.double())
            err = float((y.double() - ref).norm() / ref.norm())
            assert y.shape == (m, n) and err < 1e-2, (dtype, n, k, m, err)
        if k % 32 == 0:  # indices in cuSPARSELt's order, as when read from its buffer
            y3 = sparse24_linear(
                x, None, values=c.values, meta=to_cslt_layout(c), in_features=k, layout="cslt"
            )
            assert torch.equal(y3, sparse24_linear(x, c)), (n, k, m, "cslt layout")
        # values read through a strided view, as when shared with cuSPARSELt's buffer
        wide = torch.zeros(n, c.values.shape[1] + 8, dtype=dtype)
        wide[:, : c.values.shape[1]] = c.values
        y2 = sparse24_linear(
            x, None, values=wide[:, : c.values.shape[1]], meta=c.meta, in_features=k
        )
        assert torch.equal(y2, sparse24_linear(x, c)), (n, k, m)
    print("ok")
    """
)


@pytest.mark.skipif(CUDA, reason="CPU check; on CUDA the compiled kernels are tested below")
def test_triton_kernels_interpreted():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", RIA_TRITON_AUTOTUNE="0")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", _INTERPRET_SCRIPT], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


# -- CUDA --------------------------------------------------------------------------------

TOKEN_COUNTS = [1, 2, 7, 8, 16, 33, 64, 100, 256, 1000, 4096]


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref.double()).norm() / ref.double().norm())


@needs_cuda
@pytest.mark.parametrize("backend", ["dense", "cusparselt", "triton", "mma", "mma_cslt"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_sparse_linear_matches_masked_dense(backend, dtype, bias):
    from ria.sparse.cslt import cslt_compress, share_cslt_buffer

    n, k = 384, 1376  # k = 43 * 32: not a power of two, like LLaMA's 11008
    w = random_24(n, k, dtype=dtype, device="cuda", seed=1)
    b = torch.randn(n, dtype=dtype, device="cuda") if bias else None
    forms = {
        "dense": {"weight": w},
        "cusparselt": {"packed": cslt_compress(w)},
        "triton": {"compact": pack_24(w)},
        "mma": {"mma": pack_mma24(w)},
        "mma_cslt": {"compact": share_cslt_buffer(pack_24(w), cslt_compress(w))},
    }[backend]
    mod = Sparse24Linear(k, n, {1 << 20: Choice(backend)}, bias=b, **forms)
    for m in TOKEN_COUNTS:
        x = torch.randn(m, k, dtype=dtype, device="cuda")
        ref = x.float() @ w.float().t() + (0 if b is None else b.float())
        y = mod(x)
        assert y.shape == (m, n) and y.dtype == dtype and y.is_contiguous()
        assert _rel_err(y, ref) < 1e-2, (backend, m)
    y3 = mod(torch.randn(2, 5, k, dtype=dtype, device="cuda"))
    assert y3.shape == (2, 5, n)


@needs_cuda
@pytest.mark.parametrize("shape", [(256, 512), (4096, 1376), (96, 128)])
def test_decode_kernel_reads_cuslt_buffer(shape):
    """Values and indices come straight from cuSPARSELt's compressed buffer (no copy)."""
    from ria.sparse.cslt import cslt_compress, share_cslt_buffer

    w = random_24(*shape, device="cuda", seed=3)
    packed = cslt_compress(w)
    c = share_cslt_buffer(pack_24(w), packed)
    assert c.values.untyped_storage().data_ptr() == packed.untyped_storage().data_ptr()
    print(f"{shape}: cuSPARSELt indices shared: {c.layout == 'cslt'}")
    if shape[0] % 64 == 0:
        assert (
            c.layout == "cslt"
            and c.meta.untyped_storage().data_ptr() == c.values.untyped_storage().data_ptr()
        )
    torch.testing.assert_close(unpack_24(c), w, rtol=0, atol=0)
    for m in (1, 5, 16, 64):
        x = torch.randn(m, shape[1], dtype=w.dtype, device="cuda")
        ref = x.float() @ w.float().t()
        assert _rel_err(sparse24_linear(x, c), ref) < 1e-2


@needs_cuda
def test_sparsify_keeps_free_channel_orders():
    """A model pruned with free orders (GatheredLinears) computes the same after sparsify."""
    from helpers import FAST_SEARCH

    model = tiny_model("llama").to("cuda", torch.bfloat16)
    ria.prune(
        model, sparsity="2:4", method="magnitude", calibration=None, permute="free",
        permutation_options=FAST_SEARCH, progress=False,
    )  # fmt: skip
    ids = torch.randint(0, 512, (3, 40), device="cuda")
    with torch.no_grad():
        ref = model(ids).logits.float()
    report = sparsify(model, batch_sizes=[1, 16, 128])
    gathered = [m for m in model.modules() if isinstance(m, Sparse24Linear)]
    assert sum(m.input_order is not None for m in gathered) == 12  # q/k/v/o/gate/up x 2
    with torch.no_grad():
        out = model(ids).logits.float()
    assert report.applied and _rel_err(out, ref) < 2e-2


@needs_cuda
@pytest.mark.parametrize("family", ["llama", "qwen2", "opt"])
def test_sparsify_model_matches_masked_dense(family):
    model = prune_model_24(tiny_model(family).to("cuda", torch.bfloat16))
    ids = torch.randint(0, 512, (3, 40), device="cuda")
    with torch.no_grad():
        ref = model(ids).logits.float()
    report = sparsify(model, batch_sizes=[1, 16, 128])
    assert report.applied, report.reason
    assert any(lr.name.endswith("lm_head") and not lr.converted for lr in report.layers)
    assert all(isinstance(model.get_submodule(lr.name), Sparse24Linear) for lr in report.converted)
    assert report.converted and all(set(lr.plan) == {1, 16, 128} for lr in report.converted)
    with torch.no_grad():
        out = model(ids).logits.float()
    assert _rel_err(out, ref) < 2e-2
    assert "M<=16" in report.markdown()


@needs_cuda
@pytest.mark.parametrize("backend", ["cusparselt", "triton"])
def test_generate_graphs_match_eager(backend):
    model = prune_model_24(tiny_model("llama").to("cuda", torch.bfloat16))
    sparsify(model, backend=backend, batch_sizes=[1, 64])
    ids = torch.randint(0, 512, (2, 9), device="cuda")
    eager = StaticGenerator(model, 2, 32, cuda_graph=False).generate(ids, 12)
    graphed = ria.sparse.generate(model, ids, 12, max_cache_len=32)
    assert torch.equal(graphed[:, :9], ids)
    assert (graphed[:, 9:] == eager).float().mean() > 0.9  # bf16 ties may flip a token


@needs_cuda
def test_sparsify_a_model_pruned_and_permuted_by_ria():
    """The whole path: ria.prune (2:4, permuted: gathered norms, folded orders), then
    sparsify; every decoder Linear converts and the logits match the pruned model's."""
    model = tiny_model("llama").to("cuda", torch.bfloat16)
    ria.prune(
        model, sparsity="2:4", method="magnitude", permute=True, calibration=None,
        progress=False, permutation_options={"tabu_steps": 20},
    )  # fmt: skip
    ids = torch.randint(0, 512, (2, 24), device="cuda")
    with torch.no_grad():
        ref = model(ids).logits.float()
    report = sparsify(model, batch_sizes=[1, 16, 128])
    assert report.applied, report.reason
    assert len(report.converted) == 2 * 7
    with torch.no_grad():
        out = model(ids).logits.float()
    assert _rel_err(out, ref) < 2e-2


def _folded_model(dtype: torch.dtype) -> torch.nn.Module:
    model = tiny_model("llama").to("cuda", dtype)
    ria.prune(
        model, sparsity="2:4", method="magnitude", permute=True, calibration=None,
        progress=False, permutation_options={"tabu_steps": 20},
    )  # fmt: skip
    return model


def _gathers(model: torch.nn.Module) -> int:
    from ria.permutation import ChannelGather, input_gather

    return sum(isinstance(m, ChannelGather) or input_gather(m) is not None for m in model.modules())


@needs_cuda
@pytest.mark.parametrize("dtype", [None, "fp8"])
def test_a_strict_refusal_leaves_the_model_as_it_came(dtype):
    """sparsify applies the folded orders before it checks the layers; a strict refusal
    takes them back out, so the model stays plain (no gather in its forward)."""
    from ria.sparse.fp8_kernels import fp8_status

    if dtype == "fp8" and fp8_status() is not None:
        pytest.skip(fp8_status())
    model = _folded_model(torch.bfloat16)
    dense = model.model.layers[1].mlp.up_proj  # a reader of the MLP norm's folded order
    dense.weight.data.normal_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ria.InvalidArgumentError, match=r"layers\.1\.mlp\.up_proj.*not 2:4"):
        sparsify(model, dtype=dtype, strict=True)
    assert _gathers(model) == 0
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@needs_cuda
def test_a_sparsify_that_converts_nothing_leaves_the_model_plain():
    """float32 layers are not converted: the folded orders applied for the kernels are
    taken back out instead of costing a gather per group for nothing."""
    model = _folded_model(torch.float32)
    ids = torch.randint(0, 512, (2, 24), device="cuda")
    with torch.no_grad():
        ref = model(ids).logits
    report = sparsify(model, batch_sizes=[1, 16])
    assert not report.applied and _gathers(model) == 0
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)
