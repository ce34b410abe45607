"""`ria.sparse.generate`: left-padded batches and EOS against transformers' own greedy
search, sampling (temperature, top-k, top-p, seeded), generators kept across calls and
dropped when the model changes. Eager on the CPU; graph replay on CUDA (marked gpu)."""

from __future__ import annotations

import gc
import importlib

import numpy as np
import pytest
import torch
from helpers import prune_model_24, tiny_model

from ria.errors import (
    CacheFullError,
    InvalidArgumentError,
    InvalidTypeError,
    UnsupportedModelError,
)
from ria.sparse import (
    Sampling,
    StaticGenerator,
    cached_generator,
    clear_generators,
    generate,
    sparsify,
)
from ria.sparse.sampling import filter_logits, next_tokens

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model("llama")


def padded_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of 7, 4 and 6 tokens, left-padded with token 0 to 7."""
    ids = torch.randint(3, 512, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


def test_left_padded_batch_matches_hf_greedy(model):
    ids, mask = padded_prompts()
    ref = model.generate(
        ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
        pad_token_id=0,
    )  # fmt: skip
    out = generate(model, ids, 6, attention_mask=mask, eos_token_id=(), cuda_graph=False)
    assert torch.equal(out, ref)


def test_eos_stops_each_sequence_as_hf(model):
    ids, mask = padded_prompts()
    free = generate(model, ids, 6, attention_mask=mask, eos_token_id=(), cuda_graph=False)
    eos = int(free[0, 9])  # sequence 0's third new token: it stops there (or earlier)
    first = int((free[0, 7:] == eos).int().argmax()) + 7
    kw = dict(attention_mask=mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=1)
    ref = model.generate(ids, do_sample=False, **kw)
    out = generate(model, ids, cuda_graph=False, **kw)
    assert torch.equal(out, ref)
    assert out[0, first] == eos and (out[0, first + 1 :] == 1).all()
    # every sequence stops: the output ends where the last one did
    stops = [int(free[i, 7]) for i in range(3)]
    short = generate(model, ids, 6, attention_mask=mask, eos_token_id=stops, cuda_graph=False)
    assert short.shape == (3, 8) and torch.equal(short, free[:, :8])


def test_bad_prompts_are_refused(model):
    ids, mask = padded_prompts()
    with pytest.raises(InvalidArgumentError, match="left"):
        generate(model, ids, 2, attention_mask=mask.flip(1), cuda_graph=False)
    with pytest.raises(InvalidArgumentError, match="does not match"):
        generate(model, ids, 2, attention_mask=mask[:, 1:], cuda_graph=False)
    with pytest.raises(InvalidArgumentError, match="CUDA"):
        StaticGenerator(model, 1, 8, cuda_graph=True)
    assert StaticGenerator(model, 1, 8).cuda_graph is False  # default: graphs on CUDA only
    with pytest.raises(InvalidArgumentError, match="max_new_tokens"):
        generate(model, ids, 0, cuda_graph=False)


def test_a_full_cache_and_an_unsupported_attention_are_ria_errors(model):
    gen = StaticGenerator(model, 1, 4)
    gen.prefill(torch.tensor([[5, 6, 7]]))
    gen.step()  # the fourth position
    with pytest.raises(CacheFullError, match="4 tokens"):
        gen.step()
    other = tiny_model("llama")
    other.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UnsupportedModelError, match="flash_attention_2"):
        StaticGenerator(other, 1, 8)


@pytest.mark.parametrize("family", ["gemma3", "gpt_oss"])
def test_sliding_window_layers_match_hf_past_the_window_and_across_calls(family):
    # A window of 5 inside a cache of 256: the masks were the cache's width (a crash at the
    # first step), and transformers' sliding layer kept a host token count that a kept
    # generator never reset (wrong tokens once the calls added up past the cache).
    types = ["sliding_attention", "full_attention"]
    model = tiny_model(family, sliding_window=5, layer_types=types)
    ids, mask = padded_prompts()
    ref = model.generate(
        ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False,
        pad_token_id=0,
    )  # fmt: skip
    gen = StaticGenerator(model, 3, 32)
    for _ in range(6):  # 6 x 15 tokens through one cache of 32
        new = gen.generate(ids, 8, attention_mask=mask)
        assert torch.equal(torch.cat([ids, new], 1), ref)
    alone = model.generate(ids[:1], max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(generate(model, ids[:1], 8, eos_token_id=(), cuda_graph=False), alone)


def test_attention_the_generator_cannot_mask_is_refused():
    model = tiny_model("llama4")  # chunked attention layers
    with pytest.raises(UnsupportedModelError, match="'chunked_attention'"):
        StaticGenerator(model, 1, 8)


def test_sampling_settings_left_unset_are_the_generation_configs_as_in_hf():
    model = tiny_model("llama")
    prompt = torch.randint(3, 512, (1, 5), generator=torch.Generator().manual_seed(1))
    rows = prompt.expand(256, 5)  # one next-token distribution, drawn 256 times

    def drawn(**settings) -> set[int]:
        g = torch.Generator().manual_seed(0)
        out = generate(model, rows, 1, do_sample=True, temperature=100.0, generator=g,
                       eos_token_id=(), cuda_graph=False, **settings)  # fmt: skip
        return set(out[:, -1].tolist())

    top = set(model(prompt).logits[0, -1].topk(50).indices.tolist())
    assert model.generation_config.top_k is None
    assert 3 < len(drawn()) <= 50 and drawn() <= top  # transformers' default top_k=50
    assert len(drawn(top_k=0)) > 50  # 0: no top-k, as in model.generate
    model.generation_config.top_k = 3
    assert len(drawn()) == 3 and drawn() <= top
    assert len(drawn(top_k=0)) > 50


def test_prompts_and_token_ids_of_other_types():
    model = tiny_model("llama")
    ids, _ = padded_prompts()
    with pytest.raises(InvalidArgumentError, match=r"input_ids must be \(batch, tokens\)"):
        generate(model, ids[0], 2, cuda_graph=False)
    with pytest.raises(InvalidArgumentError, match="at least one token"):
        generate(model, ids[:, :0], 2, cuda_graph=False)
    with pytest.raises(InvalidTypeError, match="max_new_tokens must be an integer"):
        generate(model, ids, 2.0, cuda_graph=False)  # type: ignore[arg-type]
    with pytest.raises(InvalidTypeError, match="top_k must be an integer"):
        generate(model, ids, 2, do_sample=True, top_k=2.5, cuda_graph=False)  # type: ignore[arg-type]
    plain = generate(model, ids, 3, eos_token_id=[7, 9], cuda_graph=False)
    for eos in (np.array([7, 9]), torch.tensor([7, 9])):
        assert torch.equal(generate(model, ids, 3, eos_token_id=eos, cuda_graph=False), plain)
    assert torch.equal(
        generate(model, ids, 3, eos_token_id=np.int64(7), cuda_graph=False),
        generate(model, ids, 3, eos_token_id=7, cuda_graph=False),
    )


def test_filter_logits_top_k_top_p_temperature():
    logits = torch.tensor([[0.5, 0.25, 0.15, 0.1]]).log()
    kept = torch.isfinite(filter_logits(logits, Sampling(top_p=0.7)))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(logits, Sampling(top_k=3)))
    assert kept.tolist() == [[True, True, True, False]]
    kept = torch.isfinite(filter_logits(logits, Sampling(top_p=0.01)))  # the top one stays
    assert kept.tolist() == [[True, False, False, False]]
    hot = filter_logits(logits, Sampling(temperature=2.0)).softmax(-1)
    torch.testing.assert_close(hot, (logits / 2).softmax(-1))
    for bad in (dict(temperature=0.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(InvalidArgumentError):
            Sampling(**bad)  # type: ignore[arg-type]


def test_sampling_draws_the_filtered_distribution():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    logits = probs.log().expand(20_000, 4)
    noise = torch.empty(20_000, 4).exponential_(generator=torch.Generator().manual_seed(1))
    drawn = next_tokens(logits, Sampling(), noise).flatten()
    freq = torch.bincount(drawn, minlength=4) / drawn.numel()
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)
    top2 = next_tokens(logits, Sampling(top_k=2), noise).flatten()
    assert set(top2.tolist()) == {0, 1}
    assert abs(float((top2 == 0).float().mean()) - 2 / 3) < 0.015
    assert torch.equal(next_tokens(logits, None), torch.zeros(20_000, 1, dtype=torch.long))


def test_sampled_generation_is_seeded(model):
    ids = torch.randint(3, 512, (2, 5), generator=torch.Generator().manual_seed(2))
    kw = dict(do_sample=True, eos_token_id=(), cuda_graph=False)

    def sample(seed: int, **extra) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return generate(model, ids, 6, generator=g, **kw, **extra)  # type: ignore[arg-type]

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))
    greedy = generate(model, ids, 6, eos_token_id=(), cuda_graph=False)
    assert torch.equal(sample(3, top_k=1), greedy)


def test_generators_are_kept_per_model_and_shape_and_dropped_on_change():
    model = tiny_model("llama")
    ids = torch.randint(3, 512, (2, 5), generator=torch.Generator().manual_seed(3))
    first = generate(model, ids, 4, eos_token_id=(), cuda_graph=False)
    gen = cached_generator(model, 2, 256, cuda_graph=False)
    assert torch.equal(generate(model, ids, 4, eos_token_id=(), cuda_graph=False), first)
    assert cached_generator(model, 2, 256, cuda_graph=False) is gen  # reused, not rebuilt
    assert cached_generator(model, 1, 256, cuda_graph=False) is not gen
    model.lm_head = torch.nn.Linear(64, 512, bias=False)  # the model changed
    assert cached_generator(model, 2, 256, cuda_graph=False) is not gen
    again = cached_generator(model, 2, 256, cuda_graph=False)
    clear_generators(model)
    assert cached_generator(model, 2, 256, cuda_graph=False) is not again
    alive = cached_generator(model, 2, 256, cuda_graph=False)
    del model
    gc.collect()
    with pytest.raises(ReferenceError):  # generators never keep a model alive
        _ = alive.model


def test_a_generator_made_by_default_may_fall_back_to_eager(monkeypatch):
    """`generate`'s default (cuda_graph=None) reaches the generator as None, which runs a
    model that cannot be captured eagerly with a warning; only an explicit True makes that an
    error. (None was resolved to True first, so the default raised on such a model.) Kept
    apart, a True call never reuses a generator that fell back."""
    # The module: as an attribute of `ria.sparse`, `generate` is the function.
    generate_mod = importlib.import_module("ria.sparse.generate")

    made: list[bool | None] = []

    class Recorded:
        def __init__(self, *args: object, cuda_graph: bool | None = None, **kwargs: object):
            made.append(cuda_graph)

    monkeypatch.setattr(generate_mod, "StaticGenerator", Recorded)
    model = tiny_model("llama")
    default = cached_generator(model, 1, 64)
    asked = cached_generator(model, 1, 64, cuda_graph=True)
    assert made == [None, True] and asked is not default
    assert cached_generator(model, 1, 64) is default


# The compiled fast path needs a newer torch than our floor: torch 2.6's dynamo cannot trace
# transformers' own output wrapper (it calls `func.__code__.co_varnames`). Seen to work on
# torch 2.11 (the GPU machine) and 2.15.
OLD_DYNAMO = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) < (2, 11)


def _dense_planned_sparse_model() -> torch.nn.Module:
    """A pruned tiny Llama whose Linears are `Sparse24Linear`s planned dense (CPU-runnable)."""
    from ria.sparse import Choice, Sparse24Linear, find_linears

    model = prune_model_24(tiny_model("llama"))
    for name, mod, _ in find_linears(model, require_cuda=False):
        if not name.endswith("lm_head"):
            n, k = mod.weight.shape
            sparse = Sparse24Linear(k, n, {1: Choice("dense")}, weight=mod.weight.detach())
            model.set_submodule(name, sparse)
    return model


@pytest.mark.skipif(OLD_DYNAMO, reason="torch < 2.11: dynamo cannot trace transformers' wrapper")
def test_hf_static_cache_generate_traces_sparse_layers_in_one_graph():
    """transformers' fast path (static cache, compiled forward, `fullgraph=True`) over
    `Sparse24Linear`s: on the CPU dynamo alone (backend "eager"), dense-planned layers."""
    from transformers import CompileConfig

    model = _dense_planned_sparse_model()
    ids = torch.randint(3, 512, (2, 6), generator=torch.Generator().manual_seed(4))
    config = CompileConfig(backend="eager", fullgraph=True)
    config._compile_all_devices = True  # transformers compiles on accelerators only
    kw = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    compiled = model.generate(ids, cache_implementation="static", compile_config=config, **kw)
    assert torch.equal(compiled, model.generate(ids, **kw))


@pytest.mark.skipif(OLD_DYNAMO, reason="torch < 2.11: dynamo cannot trace transformers' wrapper")
def test_compiled_generate_runs_prefill_and_steps_compiled(monkeypatch):
    """`ria.generate(compile=True)` on the CPU with dynamo alone (backend "eager"): decode steps
    run compiled from the first call, the left-padded prefill from the second (the first
    creates the KV cache eagerly), each in one graph, with the uncompiled tokens."""
    from torch._dynamo.utils import counters

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend="eager", **kw))
    model = _dense_planned_sparse_model()
    ids, mask = padded_prompts()
    kw = dict(attention_mask=mask, eos_token_id=(), cuda_graph=False)
    plain = generate(model, ids, 4, **kw)  # type: ignore[arg-type]
    torch._dynamo.reset()
    counters.clear()
    assert torch.equal(generate(model, ids, 4, compile=True, **kw), plain)  # type: ignore[arg-type]
    step_graphs = counters["stats"]["unique_graphs"]
    assert step_graphs >= 1
    assert torch.equal(generate(model, ids, 4, compile=True, **kw), plain)  # type: ignore[arg-type]
    assert counters["stats"]["unique_graphs"] > step_graphs  # the prefill, compiled
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.reset()


# -- CUDA graphs ------------------------------------------------------------------------


def cuda_model(backend: str = "auto") -> torch.nn.Module:
    model = prune_model_24(tiny_model("llama").to("cuda", torch.bfloat16))
    sparsify(model, backend=backend, batch_sizes=[1, 16, 64], plan_cache=False)
    return model


@pytest.mark.gpu
@needs_cuda
def test_graphs_are_reused_across_calls_and_dropped_by_sparsify():
    model = prune_model_24(tiny_model("llama").to("cuda", torch.bfloat16))
    ids = torch.randint(3, 512, (2, 9), device="cuda")
    dense = generate(model, ids, 12, eos_token_id=())
    gen = cached_generator(model, 2, 256)
    graph = gen.step_graph()
    assert graph is not None
    assert torch.equal(generate(model, ids, 12, eos_token_id=()), dense)
    assert gen.step_graph() is graph  # replayed, not captured again
    sparsify(model, batch_sizes=[1, 16, 64], plan_cache=False)
    sparse = generate(model, ids, 12, eos_token_id=())
    assert cached_generator(model, 2, 256) is not gen
    assert (sparse == dense).float().mean() > 0.9  # bf16 ties may flip a token


@pytest.mark.gpu
@needs_cuda
def test_graph_replay_matches_eager_with_padding_eos_and_sampling():
    model = cuda_model("triton")  # one kernel for eager and graph calls: same numerics
    ids, mask = (t.cuda() for t in padded_prompts())
    eager = generate(model, ids, 10, attention_mask=mask, eos_token_id=(), cuda_graph=False)
    graphed = generate(model, ids, 10, attention_mask=mask, eos_token_id=())
    assert (graphed == eager).float().mean() > 0.9
    # EOS set after the graphs were captured without one: sequence 1 stops at its 3rd token
    eos = int(graphed[1, 9])
    first = int((graphed[1, 7:] == eos).int().argmax()) + 7
    stopped = generate(model, ids, 10, attention_mask=mask, eos_token_id=eos, pad_token_id=1)
    assert stopped[1, first] == eos and (stopped[1, first + 1 :] == 1).all()
    kw = dict(attention_mask=mask, do_sample=True, top_k=50, top_p=0.9, eos_token_id=())

    def sample(seed: int, graph: bool) -> torch.Tensor:
        g = torch.Generator(device="cuda").manual_seed(seed)
        return generate(model, ids, 10, generator=g, cuda_graph=graph, **kw)  # type: ignore[arg-type]

    first = sample(0, True)
    assert torch.equal(sample(0, True), first)
    assert (sample(0, False) == first).float().mean() > 0.9
    assert not torch.equal(sample(1, True), first)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("family", ["gemma3", "gpt_oss"])
def test_graph_replay_past_a_sliding_window_matches_hf(family):
    # Replays never ran transformers' host-side token count of sliding layers; the
    # generator's full-length layers and masks carry the window instead.
    types = ["sliding_attention", "full_attention"]
    model = tiny_model(family, sliding_window=5, layer_types=types).cuda()
    if family == "gpt_oss":  # float32 grouped_mm copies to the host: not capturable
        model.set_experts_implementation("batched_mm")
    ids, mask = (t.cuda() for t in padded_prompts())
    ref = model.generate(
        ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False,
        pad_token_id=0,
    )  # fmt: skip
    eager = generate(model, ids, 8, attention_mask=mask, eos_token_id=(), cuda_graph=False)
    assert (eager == ref).float().mean() > 0.9  # exact on the CPU; GPU kernels may differ
    for _ in range(3):  # replays of the same graphs: the eager path's kernels and masks
        out = generate(model, ids, 8, attention_mask=mask, eos_token_id=(), cuda_graph=True)
        assert torch.equal(out, eager)


@pytest.mark.gpu
@needs_cuda
def test_a_model_that_cannot_be_captured_runs_eagerly_unless_graphs_are_asked_for():
    # MoE experts that loop over the experts hit sync with the host: the capture failed
    # with a CUDA error out of `ria.generate` (default cuda_graph=None).
    model = tiny_model("gpt_oss").cuda()
    model.set_experts_implementation("eager")
    ids, mask = (t.cuda() for t in padded_prompts())
    eager = generate(model, ids, 6, attention_mask=mask, eos_token_id=(), cuda_graph=False)
    with pytest.warns(UserWarning, match="cannot be captured in a CUDA graph.*batched_mm"):
        out = generate(model, ids, 6, attention_mask=mask, eos_token_id=())
    assert torch.equal(out, eager)
    assert torch.equal(generate(model, ids, 6, attention_mask=mask, eos_token_id=()), eager)
    clear_generators(model)
    with pytest.raises(UnsupportedModelError, match="cuda_graph=False"):
        generate(model, ids, 6, attention_mask=mask, eos_token_id=(), cuda_graph=True)


@pytest.mark.gpu
@needs_cuda
def test_a_failed_capture_leaves_the_process_able_to_capture_again():
    """A host sync inside the captured call fails the capture. Before torch 2.12 that left
    the allocator with a capture underway, the default CUDA generator in capture mode and
    the capture stream current, and every later `empty_cache`, capture or random op in the
    process failed (on an H100 with torch 2.11, the 41 GPU tests after the one above)."""
    from ria.sparse.graphs import capture

    x = torch.ones(4, device="cuda")
    stream = torch.cuda.current_stream()
    with pytest.raises(RuntimeError):
        capture(lambda: (x * 2).sum().item(), warmup=1)
    assert torch.cuda.current_stream() == stream
    torch.cuda.empty_cache()
    assert torch.randn(4, device="cuda").isfinite().all()
    graph, out = capture(lambda: x * 3, warmup=1)
    x.fill_(2.0)
    graph.replay()
    assert torch.equal(out, torch.full_like(x, 6.0))


@pytest.mark.gpu
@needs_cuda
def test_hf_static_cache_generate_compiles_over_sparse_layers():
    """transformers' own fast path: `cache_implementation="static"` compiles the forward
    (inductor, CUDA graphs), which sees each sparse layer as one custom op."""
    model = cuda_model()
    ids = torch.randint(3, 512, (2, 9), device="cuda")
    ours = generate(model, ids, 8, eos_token_id=())
    hf = model.generate(
        ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, cache_implementation="static"
    )
    assert (hf[:, 9:] == ours[:, 9:]).float().mean() > 0.9
