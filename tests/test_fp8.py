"""fp8 (e4m3, per-row power-of-two scales): the format and its CPU reference, `Fp8Linear`
on the CPU, `sparsify(dtype="fp8")` arguments; on CUDA every kernel against the reference
and whole-model `sparsify(dtype="fp8")`, 2:4 and dense."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import FAST_SEARCH, needs_cuda, prune_model_24, random_24, tiny_model

import ria
from ria.errors import InvalidArgumentError
from ria.permutation import LinearOrder
from ria.sparse import find_linears, sparsify
from ria.sparse.format import pack_24, pack_mma24_e4m3
from ria.sparse.fp8 import (
    E4M3,
    E4M3_MAX,
    Fp8Weight,
    fp8_linear_reference,
    pow2_scale,
    quantize_rows,
    quantize_weight,
)
from ria.sparse.fp8_linear import (
    FP8_BACKENDS,
    FP8_CUSPARSELT,
    FP8_DENSE,
    FP8_DENSE_KERNELS,
    FP8_DENSE_UNSCALED,
    FP8_MMA,
    FP8_MMA_CSLT,
    Fp8Linear,
    choose_fp8_plan,
    fp8_layer,
    quantize_linears,
)
from ria.sparse.linear import DENSE, Choice, Sparse24Linear
from ria.sparse.siblings import fuse_model_siblings

# -- format (CPU) --------------------------------------------------------------------------


def test_pow2_scale_is_the_smallest_power_of_two_that_fits():
    amax = torch.tensor([448.0, 449.0, 1.0, 896.0, 897.0, 3.0, 0.0, 1e-30])
    scale, inv = pow2_scale(amax)
    expected = torch.tensor([1.0, 2.0, 2.0**-8, 2.0, 4.0, 2.0**-7, 2.0**-68, 2.0**-68])
    assert torch.equal(scale, expected)
    assert torch.equal(scale * inv, torch.ones_like(scale))
    big = amax[:6]
    assert bool(((big / scale[:6] <= E4M3_MAX) & (big / scale[:6] > E4M3_MAX / 2)).all())


def test_quantize_rows_error_bound_and_zeros():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 256, generator=g) * torch.logspace(-3, 3, 8)[:, None]
    x[:, ::4] = 0.0
    q, s = quantize_rows(x)
    assert q.dtype == E4M3 and s.shape == (8,)
    back = q.float() * s[:, None]
    assert bool((back[:, ::4] == 0).all())
    # Round to nearest: half a step, 2**-4 relative for normals, s * 2**-10 for subnormals.
    bound = torch.maximum(x.abs() * 2.0**-4, s[:, None] * 2.0**-10)
    assert bool(((back - x).abs() <= bound).all())
    assert torch.equal(q.float().abs().amax(1) > E4M3_MAX / 2 - 16, torch.ones(8, dtype=torch.bool))


def test_a_non_finite_token_gives_nan_not_saturated_values():
    # inf's bits read as a finite 2**120 scale: the inf saturated to 448 and the rest of
    # the token went to 0, so a layer whose inf column was pruned returned the bias.
    scale, inv = pow2_scale(torch.tensor([float("inf"), float("nan"), 1.0]))
    assert bool(scale[:2].isnan().all() and inv[:2].isnan().all()) and scale[2] == 2.0**-8
    lin = torch.nn.Linear(64, 32).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight[:, 0] = 0.0
    x = torch.ones(3, 64, dtype=torch.bfloat16)
    x[0, 0], x[1, 5] = float("inf"), float("nan")
    y = fp8_layer(lin)(x)
    assert bool(y[:2].isnan().all()) and bool(y[2].isfinite().all())
    assert bool(lin(x)[:2].isnan().all())  # as the Linear itself


def test_converted_layers_name_a_wrong_input_width():
    # It was torch's "shape '[2, 8]' is invalid for input of size 8".
    lin = torch.nn.Linear(64, 32).to(torch.bfloat16)
    sparse = Sparse24Linear(64, 32, {1 << 20: Choice("dense")}, weight=lin.weight.detach())
    for layer in (fp8_layer(lin), sparse):
        with pytest.raises(InvalidArgumentError, match=r"input has 48 features .* takes 64"):
            layer(torch.ones(2, 48, dtype=torch.bfloat16))


def test_quantize_weight_keeps_24_and_rejects_non_finite():
    w = random_24(32, 64)
    qw = quantize_weight(w)
    assert torch.equal(qw.values.float() != 0, w != 0)
    bad = w.clone()
    bad[3, 5] = float("nan")
    with pytest.raises(InvalidArgumentError, match=r"layers\.0\.q_proj"):
        quantize_weight(bad, name="layers.0.q_proj")


def test_reference_is_the_scaled_exact_sum():
    """fp32 result equals the float64 sum of the e4m3 products, scaled (up to fp32 sums)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 128, generator=g)
    w = quantize_weight(random_24(48, 128, dtype=torch.float32, seed=2))
    bias = torch.randn(48, generator=g)
    got = fp8_linear_reference(x, w, bias, out_dtype=torch.float32)
    qx, sx = quantize_rows(x)
    exact = (qx.double() @ w.values.double().t()) * sx.double()[:, None] * w.scale.double()
    exact += bias.double()
    torch.testing.assert_close(got.double(), exact, rtol=1e-6, atol=1e-6 * exact.abs().max())
    # Within fp8 error of the unquantized product.
    full = x @ w.dequantize().t() + bias
    assert float((got - full).norm() / full.norm()) < 0.05


def test_fp8_linear_cpu_runs_the_reference_with_bias_and_no_gather_for_dense():
    """fp8 dense (the default plan) reads a free order's Linear as stored: no gather."""
    lin = torch.nn.Linear(64, 32).to(torch.bfloat16)
    LinearOrder(torch.randperm(64)).install(lin)  # as a free permutation leaves it
    layer = fp8_layer(lin)
    assert layer.input_order is None
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    ref = fp8_linear_reference(x, quantize_weight(lin.weight), lin.bias.detach())
    assert torch.equal(layer(x), ref)
    assert layer.weight_bytes() == 64 * 32 + 4 * 32


def test_a_cast_moves_the_fp8_forms_and_casts_only_the_bias():
    """The output follows the input's dtype; e4m3 values and float32 scales are kept."""
    lin = torch.nn.Linear(64, 32).to(torch.bfloat16)
    layer = fp8_layer(lin)
    values, scale = layer.values.clone(), layer.scale.clone()
    layer.half()
    assert layer.values.dtype == torch.float8_e4m3fn and torch.equal(
        layer.values.view(torch.uint8), values.view(torch.uint8)
    )
    assert layer.scale.dtype == torch.float32 and torch.equal(layer.scale, scale)
    assert layer.bias.dtype == torch.float16
    x = torch.randn(3, 64, dtype=torch.float16)
    ref = fp8_linear_reference(x, quantize_weight(lin.weight), lin.bias.detach().half())
    assert torch.equal(layer(x), ref)


def test_unscaled_fp8_dense_plan_keeps_the_values_and_a_unit_scale():
    w = quantize_weight(random_24(32, 64))
    layer = Fp8Linear(w, {16: Choice(FP8_DENSE_UNSCALED)})
    assert layer.values is not None and layer.unit is not None and float(layer.unit) == 1.0
    assert layer.choice_for(64).backend == FP8_DENSE_UNSCALED
    assert Fp8Linear(w, {16: Choice("fp8_dense")}).unit is None
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert torch.equal(layer(x), fp8_linear_reference(x, w))  # off CUDA: the reference


def test_fp8_linear_rejects_bad_plans():
    w = quantize_weight(random_24(32, 64))
    with pytest.raises(InvalidArgumentError, match="packed"):
        Fp8Linear(w, {1: Choice("fp8_cusparselt")})
    with pytest.raises(InvalidArgumentError, match="packed"):
        Fp8Linear(w, {1: Choice(FP8_MMA_CSLT)})
    with pytest.raises(InvalidArgumentError, match="fp8 backends"):
        Fp8Linear(w, {1: Choice("mma")})
    with pytest.raises(InvalidArgumentError, match="at least one"):
        Fp8Linear(w, {})


def test_compiled_fp8_layers_trace_the_quantization_and_run_one_op_each():
    """torch.compile traces an Fp8Linear's token quantization (`quantize_rows`, so inductor
    can fuse it into the kernel before) and then one `ria::fp8_quantized_linear` call (its
    kernel choice and launches are not traceable: a bisect over buckets broke compiled
    decode on a GPU). An MLP block, not the whole model: dynamo before torch 2.11 cannot
    trace transformers' model wrapper."""
    model = prune_model_24(tiny_model("llama")).to(torch.bfloat16)
    quantize_linears(model, sparse=True)
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 9, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    x = x.to(torch.bfloat16)
    ops: list[object] = []

    def backend(gm: torch.fx.GraphModule, _inputs: list) -> object:
        ops.extend(n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method"))
        return gm.forward

    with torch.no_grad():
        ref = mlp(x)
        out = torch.compile(mlp, backend=backend, fullgraph=True)(x)
    assert ops.count(torch.ops.ria.fp8_quantized_linear) == 3  # gate, up, down
    assert ops.count("amax") == 3  # each layer's tokens quantized in the traced graph
    assert torch.ops.ria.sparse_linear not in ops
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("bias", [False, True])
def test_compiled_unscaled_buckets_trace_their_scaling(bias):
    """Under torch.compile a token count whose bucket runs an unscaled kernel gets
    `ria::fp8_unscaled_linear` and its scaling as traced ops (for inductor to fuse into the
    next kernel), in bf16 without bias, fp32 with one; a bucket whose kernel scales its own
    output keeps the one opaque `ria::fp8_quantized_linear`. Either way the output equals
    the eager layer's bits. Once dynamo makes the token count symbolic (automatic dynamic
    shapes, `ria.generate(compile=True)`'s mode: a second count compiles again), the graph is
    guarded only at the bucket bound where that changes: the counts on one side share it."""
    torch.manual_seed(0)
    w = quantize_weight(random_24(32, 64))
    b = torch.randn(32, dtype=torch.bfloat16) if bias else None
    plan = {4: Choice(FP8_DENSE_UNSCALED), 8: Choice(FP8_DENSE_UNSCALED), 64: Choice(FP8_DENSE)}
    layer = Fp8Linear(w, plan, bias=b)
    unscaled = torch.ops.ria.fp8_unscaled_linear
    scaled = torch.ops.ria.fp8_quantized_linear
    for dynamic in (False, None):
        graphs: list[list[object]] = []

        def backend(gm: torch.fx.GraphModule, _inputs: list, graphs: list = graphs) -> object:
            graphs.append([n.target for n in gm.graph.nodes if n.op == "call_function"])
            return gm.forward

        torch.compiler.reset()
        compiled = torch.compile(layer, backend=backend, fullgraph=True, dynamic=dynamic)
        for m in (3, 6, 2, 40, 50):
            x = torch.randn(m, 64, dtype=torch.bfloat16) * 4
            with torch.no_grad():
                assert torch.equal(compiled(x), layer(x)), (m, dynamic)
            ops = graphs[-1]
            if m <= 8:  # buckets 4 and 8: unscaled
                assert unscaled in ops and scaled not in ops, (m, dynamic)
            else:  # bucket 64: _scaled_mm scales in its epilogue
                assert scaled in ops and unscaled not in ops, (m, dynamic)
        # static: one graph per count; automatic: 3 static, then 6 symbolic (<= 8: buckets 4
        # and 8 alike, so also for 2), then 40 symbolic (> 8) also for 50
        assert len(graphs) == (5 if dynamic is False else 3), dynamic


def test_quantize_linears_picks_24_layers_or_all():
    model = prune_model_24(tiny_model("llama")).to(torch.bfloat16)
    model.model.layers[0].mlp.up_proj.weight.data.normal_()  # no longer 2:4
    dense = copy.deepcopy(model)
    sparse_names = quantize_linears(model, sparse=True)
    all_names = quantize_linears(dense, sparse=False)
    assert "model.layers.0.mlp.up_proj" not in sparse_names
    assert set(sparse_names) < set(all_names)
    assert "lm_head" not in all_names and len(all_names) == 7 * len(model.model.layers)
    assert isinstance(model.model.layers[1].mlp.up_proj, Fp8Linear)
    ids = torch.randint(0, 100, (1, 8))
    assert torch.isfinite(model(ids).logits).all()
    # fp8 dense takes any width: 6 inputs are no 2:4 groups, but quantize per row alike.
    odd = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 3)).to(torch.bfloat16)
    assert quantize_linears(odd, sparse=False) == ["0", "1"]


def test_sparsify_checks_buckets_and_tune_layers_before_anything():
    model = prune_model_24(tiny_model("llama")).to(torch.bfloat16)
    for dtype in (None, "fp8"):
        for bad in ([0, 16], [1.5], []):
            with pytest.raises(ria.InvalidArgumentError, match="batch_sizes must be positive"):
                sparsify(model, dtype=dtype, batch_sizes=bad)
        with pytest.raises(ria.InvalidArgumentError, match="tune_layers must be >= 1"):
            sparsify(model, dtype=dtype, tune_layers=0)
    # numpy integers key the plan cache's JSON like ints
    report = sparsify(model, batch_sizes=np.array([16, 1, 16]))
    assert report.batch_sizes == (1, 16) and all(type(b) is int for b in report.batch_sizes)


def test_a_model_with_fp8_layers_is_not_saved(tmp_path):
    """Fp8Linear's buffers are not in the state dict: a checkpoint would lack the weights."""
    model = prune_model_24(tiny_model("llama").bfloat16())
    assert quantize_linears(model)
    with pytest.raises(InvalidArgumentError, match=r"save it before ria\.sparsify"):
        ria.save_pruned(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_sparsify_fp8_arguments():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    with pytest.raises(InvalidArgumentError, match="dtype"):
        sparsify(model, dtype="int8")
    with pytest.raises(InvalidArgumentError, match="sparse=False"):
        sparsify(model, sparse=False)
    with pytest.raises(InvalidArgumentError, match="fp8"):
        sparsify(model, dtype="fp8", backend="mma")


def test_sparsify_fp8_checks_dense_margin():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    with pytest.raises(InvalidArgumentError, match="dense_margin"):
        sparsify(model, dtype="fp8", dense_margin=1.5)


# Graph-replay microseconds per bucket, as `_tune` measures them (DENSE: bf16 cuBLAS).
_TIMES = {
    1: {FP8_DENSE: 17.0, FP8_DENSE_UNSCALED: 10.8, FP8_CUSPARSELT: 11.0, FP8_MMA: 6.9, DENSE: 12.6},
    16: {FP8_DENSE: 16.5, FP8_DENSE_UNSCALED: 11.1, FP8_CUSPARSELT: 11.4, FP8_MMA: 11.9, DENSE: 13},
    1024: {FP8_DENSE: 26.0, FP8_DENSE_UNSCALED: 27.0, FP8_CUSPARSELT: 24.0, DENSE: 44.0},
}


def test_fp8_plan_keeps_one_form_by_default():
    # mma serves no 1024-token bucket, so cuSPARSELt's layout; fp8 dense is 2-3% faster at
    # 1 and 16 tokens, but keeping it too would cost 1 byte per weight more.
    assert choose_fp8_plan(_TIMES, sparse=True) == {
        1: FP8_CUSPARSELT,
        16: FP8_CUSPARSELT,
        1024: FP8_CUSPARSELT,
    }
    decode = {m: t for m, t in _TIMES.items() if m <= 16}
    assert choose_fp8_plan(decode, sparse=True) == {1: FP8_MMA, 16: FP8_MMA}


def test_fp8_plan_reads_the_cusparselt_buffer_with_both_kernels():
    # mma.sp on cuSPARSELt's buffer at decode sizes, cuSPARSELt at prefill: one buffer.
    times = {m: {**t, FP8_MMA_CSLT: t[FP8_MMA] + 0.3} for m, t in _TIMES.items() if m <= 16}
    times[1024] = _TIMES[1024]
    assert choose_fp8_plan(times, sparse=True) == {
        1: FP8_MMA_CSLT,
        16: FP8_CUSPARSELT,
        1024: FP8_CUSPARSELT,
    }


def test_fp8_plan_falls_back_to_fp8_dense_per_layer():
    slow_sparse = {m: {**t, FP8_CUSPARSELT: 2 * t[FP8_CUSPARSELT]} for m, t in _TIMES.items()}
    assert choose_fp8_plan(slow_sparse, sparse=True) == {
        1: FP8_DENSE_UNSCALED,
        16: FP8_DENSE_UNSCALED,
        1024: FP8_DENSE,
    }
    assert choose_fp8_plan(_TIMES, sparse=False) == choose_fp8_plan(slow_sparse, sparse=True)


def test_fp8_plan_mixes_forms_only_with_allow_dense():
    # mma fragments + the dense e4m3 weight (44.0 us over the buckets) beat cuSPARSELt's
    # layout (46.4): fp8 dense serves 1024 tokens and wins at 16 by more than the 5% margin.
    mixed = choose_fp8_plan(_TIMES, sparse=True, allow_dense=True)
    assert mixed == {1: FP8_MMA, 16: FP8_DENSE_UNSCALED, 1024: FP8_DENSE}
    wide = choose_fp8_plan(_TIMES, sparse=True, allow_dense=True, margin=0.1)
    assert wide == {1: FP8_MMA, 16: FP8_MMA, 1024: FP8_DENSE}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_sparsify_fp8_without_cuda_is_a_no_op():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    report = sparsify(model, dtype="fp8")
    assert not report.applied and "CUDA" in report.reason
    assert isinstance(model[0], torch.nn.Linear)


def test_triton_kernels_hash_on_the_installed_triton():
    """Triton hashes the names a kernel references at its first launch, so one an older
    Triton lacks (grid dependency control before 3.3) must not appear in a kernel: that
    failed only on a GPU, at the first quantization."""
    pytest.importorskip("triton")
    from ria.sparse._fp8_triton import quantize_kernel, scale_kernel

    assert quantize_kernel.cache_key and scale_kernel.cache_key


# -- CUDA: kernels against the reference ---------------------------------------------------


# cuSPARSELt's fp8 GEMM sums with fewer bits than fp32 (fp8_kernels' docstring): at these
# small K, up to about 1e-4 of the largest output measured on an H200 (2026-12-03), against
# rounding-level agreement for the other kernels.
CSLT_ATOL = 5e-4


def _sums_on_fp8_tensor_cores(choice: Choice) -> bool:
    """cuSPARSELt's fp8 GEMM and our wgmma e4m3 form accumulate on Hopper's FP8 tensor cores,
    with fewer bits than fp32 (an H100 put a wgmma layer of the tiny model 1.1e-4 of its
    largest output from the reference, 2026-12-06); the other kernels sum in fp32."""
    return choice.backend == FP8_CUSPARSELT or (choice.mma is not None and choice.mma.wgmma)


def _close_to_reference(got: torch.Tensor, ref: torch.Tensor, atol: float = 1e-4) -> None:
    """Equal up to fp32 summation order and one output rounding (bf16: 2**-8 relative);
    `atol` is relative to the largest output."""
    assert got.dtype == ref.dtype and got.shape == ref.shape
    torch.testing.assert_close(
        got.float().cpu(), ref.float().cpu(), rtol=2**-7, atol=atol * float(ref.abs().max())
    )


@needs_cuda
@pytest.mark.parametrize("m", [1, 5, 16, 33, 300])
def test_quantize_tokens_is_bit_identical(m):
    from ria.sparse.fp8_kernels import quantize_tokens

    x = torch.randn(m, 4096, dtype=torch.bfloat16, device="cuda") * 3
    x[0] = 0.0
    if m >= 5:  # non-finite tokens: NaN scales on both sides
        x[3, 7], x[4, 9] = float("inf"), float("nan")
    q, s = quantize_tokens(x, m + 7)
    rq, rs = quantize_rows(x.cpu())
    finite = x.isfinite().all(-1).cpu()
    assert torch.equal(q[:m].cpu()[finite].view(torch.uint8), rq[finite].view(torch.uint8))
    assert torch.equal(s[:m].cpu()[finite], rs[finite])
    assert bool(s[:m].cpu()[~finite].isnan().all()) and bool(rs[~finite].isnan().all())
    assert bool((q[m:].float() == 0).all()) and bool((s[m:] == 0).all())


@needs_cuda
@pytest.mark.parametrize("m", [1, 7, 16, 64, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_kernels_match_reference(m, bias):
    from ria.sparse.fp8_kernels import (
        fp8_cslt_compress,
        fp8_cslt_linear,
        fp8_dense_linear,
        fp8_dense_unscaled_linear,
    )

    w = quantize_weight(random_24(256, 512, device="cuda"))
    b = torch.randn(256, dtype=torch.bfloat16, device="cuda") if bias else None
    x = torch.randn(m, 512, dtype=torch.bfloat16, device="cuda")
    cpu_w = Fp8Weight(w.values.cpu(), w.scale.cpu())
    ref = fp8_linear_reference(x.cpu(), cpu_w, None if b is None else b.cpu())
    _close_to_reference(fp8_dense_linear(x, w, b), ref)
    unit = torch.ones(1, device="cuda")
    _close_to_reference(fp8_dense_unscaled_linear(x, w, unit, b), ref)
    # cuSPARSELt's fp8 kernel sums with less than fp32 precision (seen on an H200,
    # 2026-12-02: 1 of 16384 outputs at M = 64 off by 1.8e-4 of the largest), as Hopper's fp8
    # tensor cores do unless a kernel promotes its partial sums.
    _close_to_reference(fp8_cslt_linear(x, fp8_cslt_compress(w), w.scale, b), ref, CSLT_ATOL)
    if m <= 64:
        from ria.sparse.cslt import share_cslt_buffer
        from ria.sparse.fp8_kernels import quantize_tokens
        from ria.sparse.mma_sp import CONFIGS, mma24_fp8_linear

        q, q_scale = quantize_tokens(x)
        frag = pack_mma24_e4m3(w.values)
        # cuSPARSELt's own e4m3 buffer, read in place (its layout checked on this weight)
        view = share_cslt_buffer(pack_24(w.values), fp8_cslt_compress(w))
        assert view.layout == "cslt"
        plain = tuple(c for c in CONFIGS if not c.tiled)  # the tiled kernels have no e4m3 form
        for weight in (frag, view):
            for cfg in plain if m == 16 else (None,):  # every launch shape once (compiles)
                y = mma24_fp8_linear(q, q_scale, weight, w.scale, b, config=cfg)
                _close_to_reference(y, ref)
        tiled = next(c for c in CONFIGS if c.tiled)
        with pytest.raises(InvalidArgumentError, match="no e4m3 form"):
            mma24_fp8_linear(q, q_scale, frag, w.scale, b, config=tiled)


@needs_cuda
@pytest.mark.parametrize("m", [1, 9, 33, 64])
def test_k64_e4m3_kernel_matches_reference(m):
    """The k64 form (e4m3 straight to mma.sp m16n8k64) on the fragments and on cuSPARSELt's
    e4m3 buffer, 1-8 token tiles: one instruction on sm_89 / sm_120; on sm_90 ptxas emulates
    it exactly, so its regrouping of A, B and the metadata is checked there too."""
    from ria.sparse.cslt import share_cslt_buffer
    from ria.sparse.fp8_kernels import fp8_cslt_compress, quantize_tokens
    from ria.sparse.mma_sp import MmaConfig, mma24_fp8_linear

    w = quantize_weight(random_24(192, 640, device="cuda"))
    b = torch.randn(192, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(m, 640, dtype=torch.bfloat16, device="cuda")
    ref = fp8_linear_reference(x.cpu(), Fp8Weight(w.values.cpu(), w.scale.cpu()), b.cpu())
    q, q_scale = quantize_tokens(x)
    view = share_cslt_buffer(pack_24(w.values), fp8_cslt_compress(w))
    for weight, cfg in [
        (pack_mma24_e4m3(w.values), MmaConfig(2, 8, 2, k64=True)),
        (view, MmaConfig(2, 8, 1, k64=True)),  # (a unit: four k-steps)
        (view, MmaConfig(1, 16, 2, hint=2, late_b=1, k64=True)),
    ]:
        _close_to_reference(mma24_fp8_linear(q, q_scale, weight, w.scale, b, config=cfg), ref)


@needs_cuda
@pytest.mark.parametrize("m", [1, 8])
def test_programmatic_e4m3_launch_reads_each_replays_tokens(m):
    """Under graph replay the mma.sp kernel, launched programmatically right after the
    quantization it reads (which lets it start early), sees this replay's tokens, not the
    last replay's: its output equals a plain launch's bit for bit, on both weight forms."""
    from ria.sparse.cslt import share_cslt_buffer
    from ria.sparse.fp8_kernels import fp8_cslt_compress, quantize_tokens
    from ria.sparse.mma_sp import mma24_fp8_linear

    w = quantize_weight(random_24(4096, 4096, device="cuda"))
    view = share_cslt_buffer(pack_24(w.values), fp8_cslt_compress(w))
    x = torch.empty(m, 4096, dtype=torch.bfloat16, device="cuda")

    def step(weight, programmatic):
        q, s = quantize_tokens(x * 2)  # the kernel before the quantization writes its input
        return mma24_fp8_linear(q, s, weight, w.scale, programmatic=programmatic)

    for weight in (pack_mma24_e4m3(w.values), view):
        x.normal_()
        step(weight, True)  # compiles the kernels outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = step(weight, True)
        for seed in range(4):
            torch.manual_seed(seed)
            x.normal_()
            graph.replay()
            assert torch.equal(y, step(weight, False))


@needs_cuda
@pytest.mark.parametrize("m", [1, 5, 16, 33, 64, 100])
def test_compiled_fp8_layer_equals_its_eager_call(m):
    """Under inductor the tokens are quantized by generated code (`quantize_rows` traced)
    instead of `quantize_tokens`: the same bits, so every backend's output is identical to
    the eager layer's, cuSPARSELt's too (its operand padded to 16 rows by a copy there).
    At 100 tokens the plans' kernels leave their product unscaled (cuSPARSELt's,
    `_scaled_mm`'s tensor-wise path) and inductor's code scales it (`fp8.apply_scales`)
    instead of the scaling kernel: the same bits again (power-of-two scales are exact)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(512, 256, bias=True).to(torch.bfloat16).cuda()
    with torch.no_grad():
        linear.weight.copy_(random_24(256, 512, device="cuda"))
    plans = {
        "mma": {64: Choice(FP8_MMA), 128: Choice(FP8_CUSPARSELT)},
        "mma_cslt": {64: Choice(FP8_MMA_CSLT), 128: Choice(FP8_CUSPARSELT)},
        "dense": {64: Choice(FP8_DENSE), 128: Choice(FP8_DENSE_UNSCALED)},
    }
    x = torch.randn(m, 512, dtype=torch.bfloat16, device="cuda") * 4
    for name, plan in plans.items():
        layer = fp8_layer(linear, plan)
        torch.compiler.reset()
        with torch.no_grad():
            got = torch.compile(lambda t, layer=layer: layer(t * 0.5), fullgraph=True)(x)
            want = layer(x * 0.5)
        assert torch.equal(got, want), (name, layer.choice_for(m))


@needs_cuda
def test_sparsify_fp8_drops_a_kernel_that_disagrees(monkeypatch):
    """A kernel whose output is wrong (here: cuSPARSELt's, negated) is never planned."""
    import ria.sparse.fp8_linear as fp8_linear

    real = fp8_linear._run

    def negated_cslt(backend, forms, x, configs):
        y = real(backend, forms, x, configs)
        return -y if backend == FP8_CUSPARSELT else y

    monkeypatch.setattr(fp8_linear, "_run", negated_cslt)
    model = prune_model_24(tiny_model("llama", hidden_size=256, intermediate_size=512))
    model = model.to(torch.bfloat16).cuda()
    with pytest.warns(UserWarning, match="fp8_cusparselt is more than .* from the fp8 reference"):
        report = sparsify(model, dtype="fp8", batch_sizes=[1, 16, 64], plan_cache=False)
    assert report.applied
    assert all(FP8_CUSPARSELT not in lr.plan.values() for lr in report.converted)


@needs_cuda
@pytest.mark.parametrize("sparse, fuse", [(True, False), (False, False), (True, True)])
def test_sparsify_fp8_model_matches_reference(sparse, fuse):
    """With `fuse`, q/k/v and gate/up run as one fp8 layer each (one quantization, one
    GEMM), compared with the CPU reference of the same fused layers."""
    model = prune_model_24(tiny_model("llama", hidden_size=256, intermediate_size=512))
    model = model.to(torch.bfloat16)
    reference = copy.deepcopy(model)
    if fuse:
        fuse_model_siblings(
            reference,
            [n for n, _, why in find_linears(reference, require_cuda=False) if why is None],
        )
    quantize_linears(reference, sparse=sparse)  # CPU: the reference on every layer
    model = model.cuda()
    report = sparsify(
        model, dtype="fp8", sparse=sparse, batch_sizes=[1, 16, 64], plan_cache=False,
        fuse_siblings=fuse,
    )  # fmt: skip
    per_block = 4 if fuse else 7  # qkv, o, gate_up, down
    assert report.applied and len(report.converted) == per_block * len(model.model.layers)
    assert len(report.fused) == (2 * len(model.model.layers) if fuse else 0)
    for lr in report.converted:
        assert set(lr.plan.values()) <= set(FP8_BACKENDS)
        assert sparse or set(lr.plan.values()) <= FP8_DENSE_KERNELS
        # One form per layer by default: the 2:4 one (0.5625 bytes per weight) or e4m3 dense.
        assert lr.sparse_bytes <= lr.dense_bytes / 2 + 4 * lr.out_features  # + fp32 scales
    _assert_layers_match_reference(model, reference, len(report.converted))


@needs_cuda
def test_sparsify_fp8_keeps_free_channel_orders():
    """A model pruned with free orders: its fp8 2:4 layers are packed in each Linear's
    `nm_order` and gather their input through it, computing what the CPU reference (fp8
    dense over the weights as stored, in their original order) computes."""
    model = tiny_model("llama", hidden_size=256, intermediate_size=512).to(torch.bfloat16)
    ria.prune(
        model, sparsity="2:4", method="magnitude", calibration=None, permute="free",
        permutation_options=FAST_SEARCH, progress=False,
    )  # fmt: skip
    reference = copy.deepcopy(model)
    quantize_linears(reference, sparse=True)
    model = model.cuda()
    # (a margin of 99%: every bucket runs a 2:4 kernel, however these small shapes time)
    report = sparsify(
        model, dtype="fp8", batch_sizes=[1, 16, 64], plan_cache=False, dense_margin=0.99
    )
    layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    assert sum(m.input_order is not None for m in layers) == 12  # q/k/v/o/gate/up x 2
    _assert_layers_match_reference(model, reference, len(report.converted))


@needs_cuda
def test_sparsify_fp8_tunes_an_fp16_model_with_biases():
    """fp16 output and bias (Qwen2's q/k/v): the decode kernels are tuned in the model's
    dtype (they were timed with bf16 output, whose bias check refused an fp16 bias)."""
    model = prune_model_24(tiny_model("qwen2", hidden_size=256, intermediate_size=512))
    model = model.to(torch.float16)
    reference = copy.deepcopy(model)
    quantize_linears(reference)
    model = model.cuda()
    report = sparsify(model, dtype="fp8", batch_sizes=[1, 16, 64], plan_cache=False)
    assert report.applied and len(report.converted) == 7 * len(model.model.layers)
    assert any(model.get_submodule(lr.name).bias is not None for lr in report.converted)
    _assert_layers_match_reference(model, reference, len(report.converted))


def _assert_layers_match_reference(model, reference, converted: int) -> None:
    """Every fp8 layer of `model`, on the inputs it saw inside the model, against the
    same layer of the CPU `reference`; the argmax of the logits agrees wherever the
    reference's top two are clearly apart.
    The logits are not compared closely: a kernel's fp32 sums run in another order than
    the reference's, so a layer's bf16 output may differ by a rounding step, and the next
    layer's per-token e4m3 quantization turns some of those into whole e4m3 steps (1/8
    relative). Measured on an H200: logits 2.75e-2 apart, while the same model in bf16
    (no fp8) runs 1.3e-7 apart on CPU and GPU."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [
        layer.register_forward_hook(
            lambda _mod, args, out, name=name: seen.__setitem__(name, (args[0], out))
        )
        for name, layer in model.named_modules()
        if isinstance(layer, Fp8Linear)
    ]
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        got = model(ids.cuda()).logits.float().cpu()
        for hook in hooks:
            hook.remove()
        assert len(seen) == converted
        for name, (x, out) in seen.items():
            choice = model.get_submodule(name).choice_for(x.numel() // x.shape[-1])
            atol = CSLT_ATOL if _sums_on_fp8_tensor_cores(choice) else 1e-4
            _close_to_reference(out, reference.get_submodule(name)(x.cpu()), atol)
        ref = reference(ids).logits.float()
    # Where the reference's top two logits are clearly apart (more than the 2.75e-2 the
    # rounding chain above may move them), the argmax agrees; near ties it may flip (an
    # H100 flipped 2 of 18 tokens on the free-ordered model).
    top2 = ref.topk(2, dim=-1).values
    clear = top2[..., 0] - top2[..., 1] > 0.06 * ref.abs().max()
    assert bool(clear.any()) and bool((got.argmax(-1) == ref.argmax(-1))[clear].all())


@needs_cuda
def test_second_fp8_sparsify_reads_the_plan_cache(tmp_path):
    def model() -> torch.nn.Module:
        net = prune_model_24(tiny_model("llama", hidden_size=256, intermediate_size=512))
        return net.to("cuda", torch.bfloat16)

    first, second = model(), model()
    kw = dict(dtype="fp8", batch_sizes=[1, 16, 64], plan_cache=tmp_path)
    cold = sparsify(first, **kw)
    assert cold.plans_from_cache == 0 and list(tmp_path.glob("plan-*.json"))
    warm = sparsify(second, **kw)
    assert warm.plans_from_cache == len(warm.converted) == len(cold.converted)
    assert [lr.plan for lr in warm.converted] == [lr.plan for lr in cold.converted]
    ids = torch.randint(0, 100, (2, 9), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(first(ids).logits, second(ids).logits)
