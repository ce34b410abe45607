"""What `sparsify` decides and keeps, checked without a GPU where it can be: the kernel
choice from (fake) timings, the weight bytes a converted layer keeps, the on-disk plan
cache (round trip, corrupt and stale files), the report's cuSPARSELt note, the eager and
graph plans of `Sparse24Linear`, and `torch.compile` over it. On CUDA (marked gpu): the
memory rule of the defaults on a real model and the second `sparsify` reading the cache."""

from __future__ import annotations

import copy
import gc
import json
import warnings
from pathlib import Path

import pytest
import torch
from helpers import prune_model_24, random_24, tiny_model

from ria.errors import InvalidArgumentError
from ria.sparse import (
    Choice,
    Compact24,
    CsltConfig,
    MmaConfig,
    PlanCache,
    Sparse24Linear,
    SparseLayerReport,
    SparsifyReport,
    TunedPlan,
)
from ria.sparse import sparsify as sparsify_fn
from ria.sparse.cslt_lib import cusparselt_version
from ria.sparse.fp8_linear import fp8_slower_warnings
from ria.sparse.plan_cache import cached_choices_run, plan_key
from ria.sparse.sparsify import (
    buckets_without_sparse_kernel,
    build_forms,
    choose_backend,
    cusparselt_version_warning,
    keep_one_layout,
    slower_than_dense_warning,
    sparse_layer,
)

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

DENSE_WINS = {"dense": 8.0, "cusparselt": 12.0, "triton": 10.0}


def test_dense_is_chosen_only_when_allowed():
    assert choose_backend(DENSE_WINS, allow_dense=False, dense_margin=0.05) == "triton"
    assert choose_backend(DENSE_WINS, allow_dense=True, dense_margin=0.05) == "dense"
    # inside the margin the sparse kernel stays, even when allowed
    close = {"dense": 9.8, "triton": 10.0}
    assert choose_backend(close, allow_dense=True, dense_margin=0.05) == "triton"
    assert choose_backend(
        {"dense": 30.0, "cusparselt": 20.0}, allow_dense=True, dense_margin=0
    ) == ("cusparselt")
    with pytest.raises(InvalidArgumentError, match="no sparse kernel"):
        choose_backend({"dense": 1.0}, allow_dense=True, dense_margin=0.05)


def test_buckets_no_sparse_kernel_serves_are_found():
    """A shape cuSPARSELt refuses has only the Triton kernel (<= 256 tokens) and mma.sp
    (<= 64): larger buckets could run only dense, so without allow_dense the layer stays
    an nn.Linear rather than keeping a dense copy beside its sparse one."""
    usable = {"dense", "triton"}
    assert buckets_without_sparse_kernel("auto", [1, 256, 1024, 4096], usable) == [1024, 4096]
    assert buckets_without_sparse_kernel("auto", [1, 4096], usable | {"cusparselt"}) == []
    assert buckets_without_sparse_kernel("triton", [4096], usable) == []  # asked for by name


def test_a_converted_layer_keeps_only_its_sparse_forms():
    linear = torch.nn.Linear(256, 96, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(random_24(96, 256))
    dense_bytes = linear.weight.numel() * 2
    sparse_only = TunedPlan({1: Choice("triton"), 64: Choice("triton")}, {1: Choice("triton")})
    layer = sparse_layer(build_forms(linear, sparse_only.backends()), sparse_only)
    assert layer.weight is None and layer.packed is None
    assert layer.weight_bytes() <= 0.6 * dense_bytes
    assert layer.eager_plan == {1: Choice("triton")} and layer.plan[64] == Choice("triton")
    opted_in = TunedPlan({1: Choice("triton"), 64: Choice("dense")}, {1: Choice("dense")})
    with_dense = sparse_layer(build_forms(linear, opted_in.backends()), opted_in)
    assert with_dense.weight is not None
    assert with_dense.weight_bytes() >= dense_bytes + layer.weight_bytes()


def test_eager_and_graph_plans_are_separate():
    w = random_24(24, 64, dtype=torch.float32)
    plan = {1: Choice("dense"), 256: Choice("dense")}
    mod = Sparse24Linear(64, 24, plan, eager_plan={8: Choice("dense")}, weight=w)
    assert mod.choice_for(100) is plan[256] and mod.choice_for(100, eager=True).backend == "dense"
    assert mod.eager_plan == {8: Choice("dense")} and "eager_plan=[<=8:dense]" in repr(mod)
    with pytest.raises(InvalidArgumentError, match="eager_plan"):
        Sparse24Linear(64, 24, plan, eager_plan={}, weight=w)


def test_compiles_as_one_opaque_op_and_copies_are_separate_layers():
    w = random_24(32, 64, dtype=torch.float32)
    layers = torch.nn.Sequential(
        Sparse24Linear(64, 32, {1 << 20: Choice("dense")}, weight=w),
        torch.nn.ReLU(),
        Sparse24Linear(32, 64, {1 << 20: Choice("dense")}, weight=w.t().contiguous()),
    )
    x = torch.randn(2, 3, 64)
    compiled = torch.compile(layers, backend="eager", fullgraph=True)  # no graph break
    torch.testing.assert_close(compiled(x), layers(x))
    twin = copy.deepcopy(layers)
    with torch.no_grad():
        twin[0].weight.mul_(2)
    compiled_twin = torch.compile(twin, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled_twin(x), twin(x))
    assert not torch.allclose(compiled_twin(x), layers(x))


def key_for(buckets=(1, 16), **changes):
    kw = dict(
        device="NVIDIA H200", capability=(9, 0), out_features=4096, in_features=4096,
        dtype=torch.bfloat16, bias=False, buckets=buckets, options={"backend": "auto"},
        versions={"torch": "2.11.0", "cusparselt": 800, "ria": "0.1.0"},
    )  # fmt: skip
    kw.update(changes)
    return plan_key(**kw)


def test_a_layer_keeps_one_sparse_layout():
    """mma wins decode, cuSPARSELt prefill: one layout must serve every bucket."""
    times = {
        1: {"dense": 13.0, "cusparselt": 23.0, "triton": 12.0, "mma": 7.0},
        16: {"dense": 13.5, "cusparselt": 21.0, "triton": 33.0, "mma": 10.0},
        256: {"dense": 40.0, "cusparselt": 35.0, "triton": 90.0},
    }
    mcfg = MmaConfig(1, 16, 2)
    configs = {m: {"cusparselt": CsltConfig(), **({"mma": mcfg} if m < 256 else {})} for m in times}

    def tuned_for(buckets):
        t = {m: times[m] for m in buckets}
        graph = {m: Choice(min(t[m], key=t[m].get)) for m in buckets}
        return TunedPlan(graph, dict(graph), t, {m: dict(v) for m, v in t.items()})

    mixed = tuned_for((1, 16, 256))
    assert {c.backend for c in mixed.graph.values()} == {"mma", "cusparselt"}
    keep_one_layout(mixed, configs, allow_dense=False, dense_margin=0.05)
    assert [mixed.graph[m].backend for m in (1, 16, 256)] == ["triton", "cusparselt", "cusparselt"]
    assert mixed.graph[16].cslt == CsltConfig() and mixed.eager == mixed.graph
    decode = tuned_for((1, 16))  # all buckets within mma's reach: the faster layout wins
    decode.graph[1] = decode.eager[1] = Choice("triton")
    keep_one_layout(decode, configs, allow_dense=False, dense_margin=0.05)
    assert all(c == Choice("mma", mma=mcfg) for c in decode.graph.values())


def test_mma_over_the_cusparselt_buffer_serves_decode_in_the_default_layout():
    """With buckets past 64 tokens (the defaults), mma.sp reading cuSPARSELt's buffer
    ("mma_cslt") shares the layout of cuSPARSELt: decode buckets keep it where it wins,
    with its own launch shape, and the fragment layout ("mma") is not needed."""
    times = {
        1: {"dense": 13.0, "cusparselt": 23.0, "triton": 12.0, "mma_cslt": 7.5, "mma": 7.0},
        16: {"dense": 13.5, "cusparselt": 21.0, "triton": 33.0, "mma_cslt": 10.5, "mma": 10.0},
        64: {"dense": 14.0, "cusparselt": 13.0, "triton": 60.0, "mma_cslt": 15.0, "mma": 14.5},
        256: {"dense": 40.0, "cusparselt": 35.0, "triton": 90.0},
    }
    c1, c16 = MmaConfig(1, 16, 2), MmaConfig(2, 16, 2)
    configs = {
        1: {"cusparselt": CsltConfig(1), "mma_cslt": c1, "mma": c1},
        16: {"cusparselt": CsltConfig(2), "mma_cslt": c16, "mma": c16},
        64: {"cusparselt": CsltConfig(3), "mma_cslt": c16, "mma": c16},
        256: {"cusparselt": CsltConfig(4)},
    }
    graph = {m: Choice(min(t, key=t.get)) for m, t in times.items()}
    tuned = TunedPlan(graph, dict(graph), times, {m: dict(v) for m, v in times.items()})
    keep_one_layout(tuned, configs, allow_dense=False, dense_margin=0.05)
    assert tuned.graph == {
        1: Choice("mma_cslt", mma=c1),
        16: Choice("mma_cslt", mma=c16),
        64: Choice("cusparselt", CsltConfig(3)),
        256: Choice("cusparselt", CsltConfig(4)),
    }
    assert tuned.backends() == {"mma_cslt", "cusparselt"}


def test_an_mma_cslt_layer_holds_cusparselt_buffer_only():
    from ria.sparse.format import pack_24, to_cslt_layout
    from ria.sparse.sparsify import mma_cslt_shape_status

    w = random_24(128, 256)
    c = pack_24(w)
    # cuSPARSELt's buffer: values row-major, then the tiled metadata (one storage)
    buffer = torch.cat([c.values.reshape(-1), to_cslt_layout(c).view(w.dtype)])
    values, meta = buffer[: c.values.numel()].view(128, 128), buffer[c.values.numel() :]
    tiled = Compact24(values, meta.view(torch.int32), 256, layout="cslt")
    plan = {16: Choice("mma_cslt", mma=MmaConfig(2, 16, 2)), 4096: Choice("cusparselt")}
    layer = Sparse24Linear(256, 128, plan, packed=buffer, compact=tiled)
    assert layer.weight is None and layer.mma_values is None and layer.meta_layout == "cslt"
    assert layer.weight_bytes() == buffer.numel() * 2 <= 0.6 * w.numel() * 2
    with pytest.raises(InvalidArgumentError, match="not in cuSPARSELt's layout"):
        Sparse24Linear(256, 128, plan, packed=buffer, compact=c)
    assert mma_cslt_shape_status(4096, 11008) is None and mma_cslt_shape_status(48, 96) is None
    assert "K % 32" in (mma_cslt_shape_status(128, 80) or "")
    assert "N % 64" in (mma_cslt_shape_status(80, 64) or "")


TUNED = TunedPlan(
    graph={  # M = 1: a plain shape with the streaming options (all 7 fields kept)
        1: Choice("mma_cslt", mma=MmaConfig(1, 8, 1, hint=2, late_b=1)),
        16: Choice("cusparselt", CsltConfig(3, 2, 1)),
    },
    eager={
        1: Choice("mma", mma=MmaConfig(1, 16, 2)),
        16: Choice("mma_cslt", mma=MmaConfig(2, 4, 2, 3, 4)),  # the tiled kernel's shape
    },
    times_us={1: {"dense": 13.4, "triton": 11.8}, 16: {"dense": 13.6, "cusparselt": 21.2}},
    eager_times_us={16: {"triton": 30.0, "cusparselt": 480.0}},
)
USABLE = {"dense", "cusparselt", "triton", "mma", "mma_cslt"}


def test_plan_cache_round_trip_and_keys(tmp_path: Path):
    cache = PlanCache(tmp_path)
    key = key_for()
    assert cache.load(key, (1, 16), USABLE) is None  # missing: no warning, no file
    path = cache.store(key, TUNED)
    assert path is not None and path.parent == tmp_path
    assert cache.load(key, (1, 16), USABLE) == TUNED
    # anything a plan depends on names another file
    other = [key_for(versions={"torch": "2.12.0", "cusparselt": 801, "ria": "0.1.0"})]
    other += [key_for(device="NVIDIA H100"), key_for(buckets=(1, 16, 64)), key_for(bias=True)]
    assert len({cache.path(k) for k in [key, *other]}) == 1 + len(other)


def test_plan_cache_keeps_fp8_plans_apart(tmp_path: Path):
    """fp8 plans (mma.sp over e4m3, cuSPARSELt fp8, fp8 dense forms) round-trip, and their
    key (the fp8 backends) never names a fp16/bf16 plan's file."""
    from ria.sparse.fp8_linear import FP8_BACKENDS

    cache = PlanCache(tmp_path)
    plan = {
        1: Choice("fp8_mma", mma=MmaConfig(1, 8, 1, hint=2)),
        16: Choice("fp8_cusparselt", CsltConfig(2, 1, 0)),
        64: Choice("fp8_dense_unscaled"),
    }
    fp8 = TunedPlan(graph=plan, eager=plan, times_us={1: {"fp8_dense": 9.5, "fp8_mma": 6.0}})
    key = key_for(buckets=(1, 16, 64), backends=FP8_BACKENDS)
    assert cache.path(key) != cache.path(key_for(buckets=(1, 16, 64)))
    cache.store(key, fp8)
    assert cache.load(key, (1, 16, 64), set(FP8_BACKENDS)) == fp8
    with pytest.warns(UserWarning, match="fp8_mma"):  # e.g. no mma.sp on this GPU
        assert cache.load(key, (1, 16, 64), set(FP8_BACKENDS) - {"fp8_mma"}) is None


def test_plan_cache_ignores_bad_files_with_a_warning(tmp_path: Path):
    cache = PlanCache(tmp_path)
    key = key_for()
    path = cache.store(key, TUNED)
    assert path is not None
    good = path.read_text()

    def load_warns(text: str, match: str, usable=USABLE) -> None:
        path.write_text(text)
        with pytest.warns(UserWarning, match=match):
            assert cache.load(key, (1, 16), usable) is None

    load_warns(good[: len(good) // 2], "ignoring")  # truncated JSON
    load_warns("[1, 2]", "ignoring")
    load_warns("[" * 100_000, "ignoring")  # nested past the parser's recursion limit
    path.write_bytes(b"\xff" + good.encode())  # not UTF-8
    with pytest.warns(UserWarning, match="ignoring"):
        assert cache.load(key, (1, 16), USABLE) is None
    foreign = json.loads(good)
    foreign["key"]["versions"]["torch"] = "2.10.0"
    load_warns(json.dumps(foreign), "key differs")
    unknown = json.loads(good)
    unknown["graph"]["1"] = ["cutlass"]
    load_warns(json.dumps(unknown), "cutlass")
    load_warns(good, "'dense'|'cusparselt'|'mma_cslt'", usable={"triton"})  # not usable now
    with pytest.warns(UserWarning, match="differ"):
        path.write_text(good)
        assert cache.load(key, (1, 16, 64), USABLE) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.load(key, (1, 16), USABLE) == TUNED  # the good file is still fine


def test_plan_cache_write_failure_warns(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.warns(UserWarning, match="cannot write"):
        assert PlanCache(blocker / "plans").store(key_for(), TUNED) is None


@pytest.mark.skipif(
    not torch.backends.cusparselt.is_available(), reason="torch built without cuSPARSELt"
)
def test_cusparselt_version_is_the_loaded_librarys():
    """The version asked from the library torch loaded matches the wheel that installed it
    (torch's own `version()` is the one it was compiled against)."""
    import importlib.metadata

    wheels = [
        d for d in importlib.metadata.distributions()
        if (d.metadata["Name"] or "").lower().startswith("nvidia-cusparselt")
    ]  # fmt: skip
    if not wheels:
        pytest.skip("cuSPARSELt does not come from an nvidia-cusparselt wheel here")
    major, minor, patch = (int(p) for p in wheels[0].version.split(".")[:3])
    assert cusparselt_version() == 1000 * major + 100 * minor + patch


def test_report_names_the_cusparselt_version_and_plan_sources():
    assert "0.8.1" in (cusparselt_version_warning(800) or "")
    assert cusparselt_version_warning(801) is None and cusparselt_version_warning(None) is None
    rep = SparsifyReport(True, "", "auto", (1,), cusparselt_version=801)
    assert rep.cusparselt == "0.8.1"
    rep.layers.append(
        SparseLayerReport(
            "q", 64, 64, True, plan={1: "cusparselt"}, eager_plan={1: "triton"},
            plan_source="cache", dense_bytes=8192, sparse_bytes=4608,
        )
    )  # fmt: skip
    assert "cusparselt (eager: triton)" in rep.markdown() and rep.plans_from_cache == 1
    rep.warnings.append("cuSPARSELt 0.8.0 is loaded")
    assert "cuSPARSELt 0.8.1" in str(rep) and "warning: cuSPARSELt 0.8.0" in str(rep)


def test_report_warns_where_the_chosen_kernel_is_slower_than_dense():
    def layer(name: str, chosen_us: float, converted: bool = True) -> SparseLayerReport:
        times = {1: {"dense": 10.0, "mma_cslt": 6.0}, 64: {"dense": 10.0, "cusparselt": chosen_us}}
        plan = {1: "mma_cslt", 64: "cusparselt"}
        eager = {1: {"dense": 30.0, "mma_cslt": 40.0}, 64: {"dense": 30.0, "cusparselt": 20.0}}
        return SparseLayerReport(
            name, 64, 64, converted, plan=plan, times_us=times,
            eager_plan=plan, eager_times_us=eager,
        )  # fmt: skip

    # graph replay: 10 / 17.5 = 0.57x and 10 / 13.7 = 0.73x at 64 tokens, 1.67x at 1 token;
    # eager: 0.75x at 1 token, 1.5x at 64
    layers = [layer("q", 17.5), layer("o", 13.7), layer("lm_head", 50.0, converted=False)]
    note = slower_than_dense_warning(layers, margin=0.05) or ""
    assert "graph replay: M<=64: 2 of 2 layers at 0.57-0.73x" in note
    assert "eager calls: M<=1: 2 of 2 layers at 0.75-0.75x" in note
    assert "allow_dense=True" in note and note.count("M<=") == 2
    fast = layer("q", 10.4)  # 0.96x: within the margin
    fast.eager_times_us = {}
    assert slower_than_dense_warning([fast], margin=0.05) is None
    assert slower_than_dense_warning([fast], margin=0.0) is not None


def test_fp8_report_warns_where_fp8_is_slower_than_bf16_or_fp8_dense():
    # The fp8 report gave neither warning: its tuning times name fp8 dense's two forms
    # and bf16 cuBLAS ("dense"), which the bf16 warning alone does not tell apart.
    times = {
        1: {"dense": 12.0, "fp8_dense": 10.0, "fp8_dense_unscaled": 9.0, "fp8_mma": 6.0},
        64: {"dense": 12.0, "fp8_dense": 12.0, "fp8_dense_unscaled": 9.0, "fp8_cusparselt": 13.0},
    }
    plan = {1: "fp8_mma", 64: "fp8_cusparselt"}
    layer = SparseLayerReport("q", 64, 64, True, plan=plan, times_us=times)
    bf16, fp8 = fp8_slower_warnings([layer], sparse=True, margin=0.05)
    assert bf16.startswith("fp8 is slower than the unconverted layers")
    assert "M<=64: 1 of 1 layers at 0.92-0.92x" in bf16 and "M<=1" not in bf16
    assert fp8.startswith("fp8 2:4 is slower than fp8 dense")
    assert "M<=64: 1 of 1 layers at 0.69-0.69x" in fp8 and "allow_dense=True" in fp8
    assert len(fp8_slower_warnings([layer], sparse=False, margin=0.05)) == 1
    assert fp8_slower_warnings([layer], sparse=True, margin=0.5) == []


# -- CUDA --------------------------------------------------------------------------------


def real_sized_llama() -> torch.nn.Module:
    """Layers big enough that allocator rounding does not hide a kept dense copy."""
    model = tiny_model("llama", hidden_size=512, intermediate_size=1024)
    return prune_model_24(model.to("cuda", torch.bfloat16))


def allocated() -> int:
    gc.collect()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


@pytest.mark.gpu
@needs_cuda
def test_a_shape_without_a_sparse_kernel_for_every_bucket_stays_dense():
    model = prune_model_24(tiny_model("llama", hidden_size=64, intermediate_size=200))
    model = model.to(torch.bfloat16).cuda()  # 200 rows: cuSPARSELt refuses gate/up
    report = sparsify_fn(model, batch_sizes=[1, 16, 1024], plan_cache=False)
    gate = next(lr for lr in report.layers if lr.name.endswith("layers.0.mlp.gate_proj"))
    assert not gate.converted and "no sparse kernel runs 1024 tokens" in gate.reason
    assert isinstance(model.get_submodule(gate.name), torch.nn.Linear)
    report = sparsify_fn(
        prune_model_24(tiny_model("llama", hidden_size=64, intermediate_size=200))
        .to(torch.bfloat16)
        .cuda(),
        batch_sizes=[1, 16, 1024],
        allow_dense=True,
        plan_cache=False,
    )
    gate = next(lr for lr in report.layers if lr.name.endswith("layers.0.mlp.gate_proj"))
    assert gate.converted and gate.plan[1024] == "dense"


@pytest.mark.gpu
@needs_cuda
def test_defaults_never_raise_gpu_memory():
    # A first run sets up what the runtime holds once per process, not per model (the
    # libraries' workspaces on the timing stream, compiled kernels): not measured here.
    sparsify_fn(real_sized_llama(), batch_sizes=[1, 16, 256], plan_cache=False)
    model = real_sized_llama()
    ids = torch.randint(0, 512, (2, 16), device="cuda")
    with torch.no_grad():
        ref = model(ids).logits.float()
    before = allocated()
    report = sparsify_fn(model, batch_sizes=[1, 16, 256], plan_cache=False)
    after = allocated()
    assert report.applied and len(report.converted) == 14
    assert all(model.get_submodule(lr.name).weight is None for lr in report.converted)
    assert report.sparse_bytes <= 0.6 * report.dense_bytes
    assert after <= before - 0.4 * report.dense_bytes, (before, after, report.dense_bytes)
    assert report.cusparselt_version == cusparselt_version()
    with torch.no_grad():
        out = model(ids).logits.float()
    assert float((out - ref).norm() / ref.norm()) < 2e-2


@pytest.mark.gpu
@needs_cuda
def test_second_sparsify_reads_the_plan_cache(tmp_path: Path):
    first, second = real_sized_llama(), real_sized_llama()
    cold = sparsify_fn(first, batch_sizes=[1, 16], plan_cache=tmp_path)
    assert cold.plans_from_cache == 0 and list(tmp_path.glob("plan-*.json"))
    warm = sparsify_fn(second, batch_sizes=[1, 16], plan_cache=tmp_path)
    assert warm.plans_from_cache == len(warm.converted) == len(cold.converted)
    assert [lr.plan for lr in warm.converted] == [lr.plan for lr in cold.converted]
    ids = torch.randint(0, 512, (1, 16), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(first(ids).logits, second(ids).logits)
    for path in tmp_path.glob("plan-*.json"):
        path.write_text("{not json")
    third = real_sized_llama()
    with pytest.warns(UserWarning, match="ignoring"):
        again = sparsify_fn(third, batch_sizes=[1, 16], plan_cache=tmp_path)
    assert again.plans_from_cache == 0 and again.applied


@pytest.mark.gpu
@needs_cuda
def test_defaults_decode_with_mma_over_the_cusparselt_buffer():
    """Default buckets: mma.sp over cuSPARSELt's buffer is timed at every decode bucket,
    chosen wherever it is the fastest kernel of the kept layout, and runs correctly without
    any second copy of the weight."""
    model = real_sized_llama()
    ids = torch.randint(0, 512, (2, 8), device="cuda")  # 16 tokens per Linear call
    with torch.no_grad():
        ref = model(ids).logits.float()
    report = sparsify_fn(model, plan_cache=False)
    assert report.applied and len(report.converted) == 14
    for lr in report.converted:
        for m in (1, 16, 64):
            times = lr.times_us[m]
            assert "mma_cslt" in times and "mma" not in times, (lr.name, m, times)
            in_layout = {b: us for b, us in times.items() if b != "dense"}
            assert lr.plan[m] == min(in_layout, key=in_layout.get), (lr.name, m, times)
        layer = model.get_submodule(lr.name)
        assert layer.mma_values is None and layer.weight is None
    # cuSPARSELt's buffer alone (its metadata rounds rows up to 64: 0.625x for 32-row k/v)
    assert report.sparse_bytes <= 0.6 * report.dense_bytes
    chosen = sum(lr.plan[m] == "mma_cslt" for lr in report.converted for m in (1, 16, 64))
    print(f"mma_cslt chosen in {chosen} of {3 * len(report.converted)} decode buckets")
    with torch.no_grad():
        out = model(ids).logits.float()
    assert float((out - ref).norm() / ref.norm()) < 2e-2


def test_cached_choices_run_names_a_refused_choice_stale():
    plan = [(1, Choice("mma")), (16, Choice("cusparselt")), (64, Choice("cusparselt"))]
    ran: list[int] = []

    def run(m, choice):
        ran.append(m)
        if m == 64:
            raise RuntimeError("CUSPARSE_STATUS_INVALID_VALUE")

    assert not cached_choices_run(plan, "cusparselt", run) and ran == [16, 64]
    assert cached_choices_run(plan[:2], "cusparselt", run) and ran == [16, 64, 16]
