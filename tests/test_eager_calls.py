"""Eager calls without per-call set-up: the prepared kernel launch (argument block built
once, addresses patched per call), cuSPARSELt with its plan kept, the per-(M, mode) runners
of `Sparse24Linear`, and `torch.compile` (inductor, CUDA graphs) over sparsified models.

CPU: argument packing and patching (with the driver call replaced), runners remade after
`.to()` and dropped by copies. GPU (marked gpu): each fast path gives what the checked
path gives, under graph capture too, and compiled models match eager ones."""

from __future__ import annotations

import copy
import ctypes
import struct

import pytest
import torch
from helpers import needs_cuda, prune_model_24, random_24, tiny_model

from ria.errors import InvalidArgumentError
from ria.sparse import Choice, CsltConfig, Sparse24Linear, pack_24, pack_mma24
from ria.sparse import launch as launch_mod
from ria.sparse.launch import PreparedLaunch, kernel_args

# -- argument packing (CPU) -------------------------------------------------------------


def test_kernel_args_pack_pointers_and_ints():
    t = torch.zeros(4)
    params = kernel_args([t, 7, -3])
    assert isinstance(params[0], ctypes.c_void_p) and params[0].value == t.data_ptr()
    assert isinstance(params[1], ctypes.c_int) and params[1].value == 7
    assert bytes(params[2]) == (-3).to_bytes(4, "little", signed=True)
    with pytest.raises(InvalidArgumentError, match="32 bits"):
        kernel_args([2**31])
    with pytest.raises(InvalidArgumentError, match="tensors or ints"):
        kernel_args([1.5])


def test_prepared_launch_patches_only_the_named_pointers(monkeypatch):
    """The `void*` array handed to the driver points at the argument values, and a call
    writes the given addresses into the patched slots and nothing else."""
    a, b, w = torch.zeros(2), torch.zeros(3), torch.zeros(5)
    seen = []

    def fake_launch(func, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
        array = ctypes.cast(params, ctypes.POINTER(ctypes.c_void_p))
        ptr = [ctypes.cast(array[i], ctypes.POINTER(ctypes.c_void_p))[0] for i in (0, 1, 3)]
        num = ctypes.cast(array[2], ctypes.POINTER(ctypes.c_int))[0]
        seen.append((func, gx, gy, gz, bx, by, bz, smem, stream, ptr, num, extra))
        return 0

    monkeypatch.setattr(launch_mod, "_cu_launch", lambda: fake_launch)
    launch = PreparedLaunch(0xF00, 3, 128, 512, [a, w, 42, b], patched=(0, 3))
    before = launch.buffer()
    launch(1000, 2000, stream=77)
    launch(3000, 4000, stream=78)
    assert seen[0] == (0xF00, 3, 1, 1, 128, 1, 1, 512, 77, [1000, w.data_ptr(), 2000], 42, None)
    assert seen[1][8:10] == (78, [3000, w.data_ptr(), 4000])
    assert launch.buffer()[8:20] == before[8:20]  # the weight pointer and the int untouched
    with pytest.raises(InvalidArgumentError, match="no pointer"):
        PreparedLaunch(0xF00, 1, 32, 0, [a, 5], patched=(1,))
    with pytest.raises(InvalidArgumentError, match="CUfunction"):
        PreparedLaunch(0, 1, 32, 0, [a], patched=(0,))


def test_programmatic_launch_hands_the_driver_a_cuda_h_launch_config(monkeypatch):
    """cuLaunchKernelEx receives `CUlaunchConfig` as cuda.h lays it out (7 uints, padding,
    the stream, the attribute pointer, their count) with one attribute: programmatic stream
    serialization (id 6) set to 1, followed by the 64-byte value union."""
    a = torch.zeros(2)
    seen = []

    def fake_launch_ex(config, func, params, extra):
        raw = ctypes.string_at(ctypes.addressof(config.contents), 56)
        *dims, smem, stream, attrs, count = struct.unpack("<6II4xQQI4x", raw)
        attr_id, value = struct.unpack("<i4x64s", ctypes.string_at(attrs, 72))
        first = ctypes.cast(ctypes.cast(params, ctypes.POINTER(ctypes.c_void_p))[0],
                            ctypes.POINTER(ctypes.c_void_p))[0]  # fmt: skip
        seen.append((func, dims, smem, stream, count, attr_id, value, first, extra))
        return 0

    monkeypatch.setattr(launch_mod, "_cu_launch_ex", lambda: fake_launch_ex)
    monkeypatch.setattr(launch_mod, "_cu_launch", lambda: pytest.fail("plain launch"))
    launch = PreparedLaunch(0xF00, (5, 2, 1), 96, 1024, [a], patched=(0,), programmatic=True)
    launch(1234, stream=99)
    value = (1).to_bytes(4, "little") + bytes(60)
    assert seen == [(0xF00, [5, 2, 1, 96, 1, 1], 1024, 99, 1, 6, value, 1234, None)]


def test_plain_launches_turn_programmatic_launches_off_inside(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert launch_mod.programmatic_launches()
    with launch_mod.plain_launches():
        assert not launch_mod.programmatic_launches()
        with launch_mod.plain_launches():
            assert not launch_mod.programmatic_launches()
        assert not launch_mod.programmatic_launches()
    assert launch_mod.programmatic_launches()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    assert not launch_mod.programmatic_launches()


def test_runners_are_remade_after_to_and_dropped_by_copies():
    w = random_24(24, 64, dtype=torch.float32)
    mod = Sparse24Linear(64, 24, {1 << 20: Choice("dense")}, weight=w)
    x = torch.randn(3, 64)
    torch.testing.assert_close(mod(x), x @ w.t())
    assert (3, True) in mod._runners
    twin = copy.deepcopy(mod)
    assert twin._runners == {}
    with torch.no_grad():
        twin.weight.mul_(2)
    torch.testing.assert_close(twin(x), 2 * (x @ w.t()))
    torch.testing.assert_close(mod(x), x @ w.t())  # the original kept its own weight
    mod.double()  # moves the buffers: a stale runner would still read the float32 weight
    assert mod._runners == {}
    y = mod(x.double())
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, x.double() @ w.double().t())


# -- GPU ----------------------------------------------------------------------------------


def _cslt_form(w):
    from ria.sparse.cslt import cslt_compress, share_cslt_buffer

    packed = cslt_compress(w)
    return packed, share_cslt_buffer(pack_24(w), packed)


@needs_cuda
@pytest.mark.parametrize("bias", [False, True])
def test_prepared_mma_launch_equals_the_checked_path(bias):
    from ria.sparse.graphs import capture
    from ria.sparse.mma_sp import MmaLaunch, mma24_linear

    for n, k in [(256, 1376), (192, 4096), (48, 96)]:
        w = random_24(n, k, device="cuda", seed=n + k)
        b = torch.randn(n, dtype=w.dtype, device="cuda") if bias else None
        _, tiled = _cslt_form(w)
        for weight in (pack_mma24(w), tiled):
            for m in (1, 3, 16, 33, 64):
                x = torch.randn(m, k, dtype=w.dtype, device="cuda")
                launch = MmaLaunch(weight, b, m)
                assert launch.fits(x) and not launch.fits(x.float())
                want = mma24_linear(x, weight, b)
                assert torch.equal(launch(x), want), (n, k, m)
                x2 = torch.randn_like(x)  # another input through the same argument block
                assert torch.equal(launch(x2), mma24_linear(x2, weight, b))
            graph, out = capture(lambda run=launch, x=x: run(x))  # replays read x in place
            x.copy_(x2)
            graph.replay()
            assert torch.equal(out, mma24_linear(x2, weight, b))


@needs_cuda
@pytest.mark.parametrize("bias", [False, True])
def test_kept_cusparselt_plan_equals_torch_op(bias):
    from ria.sparse.cslt import cslt_linear, cslt_search
    from ria.sparse.cslt_lib import MAX_PLANS, CsltMatmul, cslt_lib_status

    assert cslt_lib_status() is None
    n, k = 256, 1024
    w = random_24(n, k, device="cuda", seed=3)
    b = torch.randn(n, dtype=w.dtype, device="cuda") if bias else None
    packed, _ = _cslt_form(w)
    x256 = torch.randn(256, k, dtype=w.dtype, device="cuda")
    found, _ = cslt_search(packed, x256, b)
    for config in (CsltConfig(), found, CsltConfig(1)):
        mm = CsltMatmul(packed, n, k, b, config)
        for m in (1, 5, 8, 100, 256, 1000):
            x = torch.randn(m, k, dtype=w.dtype, device="cuda")
            y = mm(x)
            assert y.shape == (m, n) and y.is_contiguous()
            want = cslt_linear(x, packed, b, config)
            torch.testing.assert_close(y, want, rtol=1e-2, atol=1e-2)
            ref = x.double() @ w.double().t() + (0 if b is None else b.double())
            assert float((y.double() - ref).norm() / ref.norm()) < 1e-2
        plan = mm.plan(100)
        assert mm.plan(100) is plan and mm.plan(97) is plan  # kept; padded to 8 rows
    for m in range(1, 8 * (MAX_PLANS + 2), 8):
        mm.plan(m)
    assert len(mm._plans) == MAX_PLANS


@needs_cuda
def test_layer_eager_and_graph_runners_agree():
    """A layer whose eager plan runs cuSPARSELt (kept plan) at 256 tokens and mma.sp on
    cuSPARSELt's buffer at 1..64 tokens, and whose graph plan runs torch's op: same
    products; eager calls use the kept plan."""
    from ria.sparse.cslt_lib import CsltMatmul
    from ria.sparse.graphs import capture

    n, k = 256, 512
    w = random_24(n, k, device="cuda", seed=9)
    b = torch.randn(n, dtype=w.dtype, device="cuda")
    packed, tiled = _cslt_form(w)
    graph_plan = {64: Choice("mma_cslt"), 256: Choice("cusparselt")}
    layer = Sparse24Linear(k, n, graph_plan, packed=packed, compact=tiled, bias=b)
    for m in (1, 7, 64, 200, 256):
        x = torch.randn(m, k, dtype=w.dtype, device="cuda")
        eager = layer.linear_2d(x)
        graph, out = capture(lambda x=x: layer.linear_2d(x))
        graph.replay()
        torch.testing.assert_close(eager, out, rtol=1e-2, atol=1e-2)
    cslt_runner = layer._runners[(256, True)]
    assert any(isinstance(c.cell_contents, CsltMatmul) for c in cslt_runner.__closure__ or ())


def _sparse_tiny_model():
    from ria.sparse import sparsify

    model = prune_model_24(tiny_model("llama").to("cuda", torch.bfloat16))
    dense = copy.deepcopy(model)
    report = sparsify(model, batch_sizes=[1, 16, 64], plan_cache=False)
    assert len(report.converted) == 14
    return dense, model


@needs_cuda
def test_inductor_compiles_sparse_model_in_one_graph_with_cuda_graphs():
    """`torch.compile(fullgraph=True, mode="reduce-overhead")` (inductor, CUDA graph
    trees) of a sparsified model: no graph break, no skipped CUDA graph, same logits as
    the eager sparse model; the dense model compiled the same way too."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    dense, model = _sparse_tiny_model()
    ids = torch.randint(3, 512, (2, 16), device="cuda", generator=torch.Generator("cuda"))
    with torch.no_grad():
        want = model(ids).logits
        want_dense = dense(ids).logits
        for net, ref in ((model, want), (dense, want_dense)):
            compiled = torch.compile(net, fullgraph=True, mode="reduce-overhead")
            for _ in range(3):  # warm-up, record, replay
                got = compiled(ids).logits.clone()
            torch.testing.assert_close(got.float(), ref.float(), rtol=0.05, atol=0.05)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert not counters["graph_break"], dict(counters["graph_break"])


@needs_cuda
def test_hf_static_cache_compiled_generate_on_gpu():
    """transformers' own fast path (static cache, its compile config, inductor) over the
    sparsified model gives the eager model's tokens (bf16 ties may flip a few)."""
    from transformers import CompileConfig

    _, model = _sparse_tiny_model()
    ids = torch.randint(3, 512, (2, 8), device="cuda", generator=torch.Generator("cuda"))
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    eager = model.generate(ids, **kw)
    config = CompileConfig(fullgraph=True)
    fast = model.generate(ids, cache_implementation="static", compile_config=config, **kw)
    assert fast.shape == eager.shape
    assert (fast == eager).float().mean() > 0.9


@needs_cuda
def test_ria_generate_compiled_step_matches_and_keeps_one_graph():
    """`ria.generate(compile=True)`: the decode step's model call compiled by inductor and
    captured in our graph gives the tokens of the uncompiled step, dense and sparse."""
    from torch._dynamo.utils import counters

    from ria.sparse import cached_generator, generate

    torch._dynamo.reset()
    counters.clear()
    dense, model = _sparse_tiny_model()
    ids = torch.randint(3, 512, (2, 9), device="cuda", generator=torch.Generator("cuda"))
    for net in (dense, model):
        plain = generate(net, ids, 10, eos_token_id=())
        fast = generate(net, ids, 10, eos_token_id=(), compile=True)
        gen = cached_generator(net, 2, 256, compile=True)
        graph = gen.step_graph()
        assert graph is not None and gen.compile
        assert (fast == plain).float().mean() > 0.9  # bf16: fused kernels may flip a tie
        assert torch.equal(generate(net, ids, 10, eos_token_id=(), compile=True), fast)
        assert gen.step_graph() is graph  # replayed, not compiled or captured again
    assert not counters["graph_break"], dict(counters["graph_break"])
