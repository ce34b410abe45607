"""The Rust core through its Python API: values, dtypes, determinism and errors."""

from __future__ import annotations

import copy
import itertools
import json
import pickle
import threading

import numpy as np
import pytest
import torch

import ria
from ria.core import PermutationResult, SearchOptions, permute_in_place
from ria.errors import InvalidArgumentError, InvalidTypeError, RiaError


def naive_ria(w: np.ndarray, act: np.ndarray, alpha: float) -> np.ndarray:
    a = np.abs(w.astype(np.float64))
    return (a / a.sum(axis=0) + a / a.sum(axis=1, keepdims=True)) * act.astype(np.float64) ** alpha


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


# --- scores -------------------------------------------------------------------------


def test_ria_score_matches_the_formula(rng):
    w = rng.standard_normal((24, 40)).astype(np.float32)
    act = rng.random(40).astype(np.float32) + 0.1
    got = ria.ria_score(w, act, alpha=0.5)
    assert got.dtype == np.float32 and got.shape == w.shape
    np.testing.assert_allclose(got, naive_ria(w, act, 0.5), rtol=2e-6)


def test_wanda_and_magnitude(rng):
    w = rng.standard_normal((8, 12)).astype(np.float32)
    act = rng.random(12).astype(np.float32)
    np.testing.assert_allclose(ria.wanda_score(w, act), np.abs(w) * act, rtol=1e-7)
    np.testing.assert_array_equal(ria.magnitude_score(w), np.abs(w))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_score_like_their_exact_f32_values(rng, dtype):
    w = torch.from_numpy(rng.standard_normal((16, 32)).astype(np.float32)).to(dtype)
    act = rng.random(32).astype(np.float32)
    np.testing.assert_array_equal(ria.ria_score(w, act), ria.ria_score(w.float(), act))


def test_numpy_float16_and_float64_weights(rng):
    w = rng.standard_normal((8, 16))
    np.testing.assert_array_equal(
        ria.magnitude_score(w.astype(np.float16)), np.abs(w.astype(np.float16)).astype(np.float32)
    )
    np.testing.assert_array_equal(ria.magnitude_score(w), np.abs(w).astype(np.float32))


def test_non_contiguous_input_is_read_correctly(rng):
    w = rng.standard_normal((16, 32)).astype(np.float32)
    np.testing.assert_array_equal(ria.magnitude_score(w.T), np.abs(w.T))


def test_score_errors_name_the_problem():
    w = np.ones((4, 8), np.float32)
    with pytest.raises(ValueError, match="2-D"):
        ria.ria_score(np.ones(8, np.float32))
    with pytest.raises(TypeError, match="int64"):
        ria.ria_score(np.ones((4, 8), np.int64))
    with pytest.raises(ValueError, match="act_norm has 3 entries"):
        ria.ria_score(w, np.ones(3, np.float32))
    with pytest.raises(ValueError, match=">= 0"):
        ria.ria_score(w, -np.ones(8, np.float32))
    bad = w.copy()
    bad[2, 5] = np.nan
    with pytest.raises(ValueError, match=r"NaN at \(2, 5\)"):
        ria.ria_score(bad)
    bad[2, 5] = np.inf
    with pytest.raises(ValueError, match="inf"):
        ria.wanda_score(bad, np.ones(8, np.float32))
    with pytest.raises(ValueError, match="empty"):
        ria.magnitude_score(np.ones((0, 8), np.float32))


# --- masks --------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8), (1, 2)])
def test_nm_mask_keeps_the_best_n_of_every_group(rng, n, m):
    s = rng.integers(0, 4, size=(6, 8 * m)).astype(np.float32)  # many ties
    mask = ria.nm_mask(s, n, m)
    assert mask.dtype == np.bool_ and mask.shape == s.shape
    groups, kept = s.reshape(6, -1, m), mask.reshape(6, -1, m)
    assert (kept.sum(axis=-1) == n).all()
    best = np.sort(groups, axis=-1)[..., m - n :].sum(axis=-1)
    np.testing.assert_array_equal((groups * kept).sum(axis=-1), best)


def test_nm_mask_breaks_ties_towards_the_lower_index():
    np.testing.assert_array_equal(ria.nm_mask(np.ones((1, 4), np.float32), 2, 4), [[1, 1, 0, 0]])


def test_nm_mask_errors():
    s = np.ones((2, 8), np.float32)
    with pytest.raises(ValueError, match="1 <= n < m"):
        ria.nm_mask(s, 4, 4)
    with pytest.raises(ValueError, match="1 <= n < m"):
        ria.nm_mask(s, 0, 4)
    with pytest.raises(ValueError, match="not divisible by m=3"):
        ria.nm_mask(s, 1, 3)


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_unstructured_mask_prunes_exactly(rng, per_row, sparsity):
    s = rng.integers(0, 5, size=(7, 30)).astype(np.float32)  # many ties
    mask = ria.unstructured_mask(s, sparsity, per_row=per_row)
    if per_row:
        assert (mask.sum(axis=1) == 30 - round(sparsity * 30)).all()
    else:
        assert mask.sum() == s.size - round(sparsity * s.size)
    # Nothing pruned scores higher than anything kept (within a row when per_row).
    for kept_row, score_row in zip(
        mask if per_row else [mask.ravel()], s if per_row else [s.ravel()], strict=True
    ):
        if kept_row.any() and (~kept_row).any():
            assert score_row[~kept_row].max() <= score_row[kept_row].min()


def test_unstructured_mask_is_deterministic_on_ties():
    s = np.ones((4, 4), np.float32)
    mask = ria.unstructured_mask(s, 0.5)
    # Equal scores: the higher flat indices go first.
    np.testing.assert_array_equal(mask.ravel(), [True] * 8 + [False] * 8)


def test_unstructured_mask_errors():
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\]"):
        ria.unstructured_mask(np.ones((2, 2), np.float32), 1.5)
    with pytest.raises(ValueError, match="sparsity"):
        ria.unstructured_mask(np.ones((2, 2), np.float32), float("nan"))


# --- retained score and permutation search ------------------------------------------


def naive_retained(s: np.ndarray, n: int, m: int, perm=None) -> float:
    s = s if perm is None else s[:, perm]
    return float(np.sort(s.reshape(s.shape[0], -1, m), axis=-1)[..., m - n :].sum(dtype=np.float64))


def test_retained_score_matches_numpy_with_and_without_perm(rng):
    s = rng.random((10, 24)).astype(np.float32)
    perm = rng.permutation(24)
    assert ria.retained_score(s, 2, 4) == pytest.approx(naive_retained(s, 2, 4), rel=1e-12)
    assert ria.retained_score(s, 2, 4, perm) == pytest.approx(
        naive_retained(s, 2, 4, perm), rel=1e-12
    )


def test_kept_score_sums_the_kept_entries(rng):
    s = rng.random((9, 40)).astype(np.float32)
    keep = ria.nm_mask(s, 2, 4)
    assert ria.kept_score(s, keep) == pytest.approx(ria.retained_score(s, 2, 4), rel=1e-12)
    other = rng.random((9, 40)) < 0.3
    assert ria.kept_score(s, other) == pytest.approx(float(s[other].sum(dtype=np.float64)))
    with pytest.raises(ria.InvalidArgumentError, match="keep has shape"):
        ria.kept_score(s, other[:, :20])
    with pytest.raises(ria.InvalidTypeError, match="keep must be a bool array"):
        ria.kept_score(s, other.astype(np.float32))


def test_permute_in_place_equals_the_gather(rng):
    s = rng.random((33, 40)).astype(np.float32)
    rows, cols = rng.permutation(33), torch.from_numpy(rng.permutation(40))
    want = s[rows][:, cols.numpy()]
    permute_in_place(s, rows, cols)
    assert np.array_equal(s, want)
    permute_in_place(s, None, np.arange(40)[::-1].copy())
    assert np.array_equal(s, want[:, ::-1])
    with pytest.raises(ria.InvalidArgumentError, match="not a permutation"):
        permute_in_place(s, np.zeros(33, dtype=np.int64))
    with pytest.raises(ria.InvalidArgumentError, match="C-contiguous"):
        permute_in_place(np.asfortranarray(s), None, cols)


def test_the_extension_refuses_fortran_ordered_arrays(rng):
    """The Python wrappers pass C-ordered copies; the raw extension must not read a
    Fortran-ordered array's memory as rows."""
    s = np.asfortranarray(rng.random((8, 12)).astype(np.float32))
    with pytest.raises(ria.InvalidArgumentError, match="C-contiguous"):
        ria._core.nm_mask(s, 2, 4)
    assert np.array_equal(ria.nm_mask(s, 2, 4), ria.nm_mask(np.ascontiguousarray(s), 2, 4))


def test_a_list_of_matrices_counts_as_their_stack(rng):
    parts = [rng.random((r, 16)).astype(np.float32) for r in (3, 5, 2)]
    perm = rng.permutation(16)
    stacked = np.vstack(parts)
    assert ria.retained_score(parts, 2, 4, perm) == pytest.approx(
        ria.retained_score(stacked, 2, 4, perm), rel=1e-12
    )
    a = ria.search_permutation(parts, 2, 4, tabu_steps=50)
    b = ria.search_permutation(stacked, 2, 4, tabu_steps=50)
    np.testing.assert_array_equal(a.perm, b.perm)


def test_retained_score_rejects_a_bad_perm(rng):
    s = rng.random((2, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="perm has 7 entries"):
        ria.retained_score(s, 2, 4, np.arange(7))
    with pytest.raises(ValueError, match="not a permutation"):
        ria.retained_score(s, 2, 4, np.array([0, 1, 2, 3, 4, 5, 6, 6]))


def test_search_finds_the_exhaustive_optimum_of_a_tiny_matrix(rng):
    s = rng.random((6, 12)).astype(np.float32)
    best = 0.0
    # Every split of 12 columns into 3 groups of 4 (5775 of them).
    cols = set(range(12))
    for a in itertools.combinations(range(1, 12), 3):
        g1 = (0, *a)
        rest = sorted(cols - set(g1))
        for b in itertools.combinations(rest[1:], 3):
            g2 = (rest[0], *b)
            g3 = tuple(sorted(set(rest) - set(g2)))
            best = max(best, naive_retained(s, 2, 4, list(g1 + g2 + g3)))
    result = ria.search_permutation(s, 2, 4)
    assert result.exact
    assert result.retained == pytest.approx(best, rel=1e-9)


def test_search_result_is_consistent_and_beats_apex_on_its_own_matrix():
    np.random.seed(1)
    s = np.random.rand(128, 64)  # NVIDIA apex README's example
    result = ria.search_permutation(s, 2, 4)
    assert result.identity == pytest.approx(2852.38, abs=0.01)
    assert result.upper_bound == pytest.approx(3042.33, abs=0.01)
    assert result.retained == pytest.approx(ria.retained_score(s, 2, 4, result.perm), rel=1e-12)
    assert result.efficacy == pytest.approx(
        (result.retained - result.identity) / (result.upper_bound - result.identity)
    )
    assert result.efficacy > 0.366  # apex's best published result on this matrix
    assert sorted(result.perm.tolist()) == list(range(64))
    assert result.perm.dtype == np.int64


def test_search_is_deterministic_across_thread_counts(rng):
    s = rng.random((64, 256)).astype(np.float32)
    one = ria.search_permutation(s, 2, 4, seed=5, threads=1, tabu_steps=200)
    two = ria.search_permutation(s, 2, 4, seed=5, threads=2, tabu_steps=200)
    np.testing.assert_array_equal(one.perm, two.perm)
    assert one.retained == two.retained


def test_search_never_loses_to_the_identity(rng):
    s = np.ones((8, 32), np.float32)  # nothing to gain
    result = ria.search_permutation(s, 2, 4)
    assert result.retained == result.identity and result.efficacy == 1.0
    s = rng.random((16, 64)).astype(np.float32)
    assert ria.search_permutation(s, 4, 8, tabu_steps=100).retained >= ria.retained_score(s, 4, 8)


def test_search_accepts_torch_tensors(rng):
    s = torch.from_numpy(rng.random((8, 32)).astype(np.float32)).to(torch.bfloat16)
    result = ria.search_permutation(s, 2, 4, tabu_steps=20)
    assert result.retained >= result.identity


def test_search_releases_the_gil(rng):
    s = rng.random((256, 2048)).astype(np.float32)
    done = threading.Event()
    ticks = 0

    def run() -> None:
        ria.search_permutation(s, 2, 4, tabu_steps=0, max_steps=12)
        done.set()

    worker = threading.Thread(target=run)
    worker.start()
    while not done.is_set():
        ticks += 1
        done.wait(0.001)
    worker.join()
    assert ticks > 5  # the main thread kept running while Rust worked


def test_searches_at_once_equal_each_search_alone(rng):
    problems = [
        [rng.random((24, 64), dtype=np.float32), rng.random((8, 64), dtype=np.float32)],
        [rng.random((64, 256), dtype=np.float32)],
        [rng.random((16, 32), dtype=np.float32)],
    ]
    options = SearchOptions(seed=3, tabu_steps=100, threads=2)
    together = ria.search_permutations(problems, 2, 4, options)
    assert len(together) == len(problems)
    for scores, result in zip(problems, together, strict=True):
        alone = ria.search_permutation(scores, 2, 4, options)
        np.testing.assert_array_equal(result.perm, alone.perm)
        assert (result.retained, result.identity, result.upper_bound) == (
            alone.retained,
            alone.identity,
            alone.upper_bound,
        )
        assert result.seconds > 0


def test_searches_at_once_name_the_bad_problem(rng):
    good = [rng.random((4, 8), dtype=np.float32)]
    with pytest.raises(InvalidArgumentError, match=r"problems\[1\]: scores must be >= 0"):
        ria.search_permutations([good, [-np.ones((4, 8), np.float32)]], 2, 4)
    with pytest.raises(InvalidArgumentError, match=r"problems\[1\] must be a non-empty list"):
        ria.search_permutations([good, []], 2, 4)
    with pytest.raises(InvalidArgumentError, match="non-empty list"):
        ria.search_permutations([], 2, 4)


@pytest.mark.parametrize(
    ("scores", "n", "m", "message"),
    [
        (np.ones((2, 10), np.float32), 2, 4, "not divisible by m=4"),
        (np.ones((2, 8), np.float32), 4, 4, "1 <= n < m"),
        (-np.ones((2, 8), np.float32), 2, 4, ">= 0"),
        (np.full((2, 8), np.nan, np.float32), 2, 4, "NaN"),
        (np.ones(8, np.float32), 2, 4, "2-D"),
        ([], 2, 4, "empty list"),
        (
            [np.ones((2, 8), np.float32), np.ones((2, 12), np.float32)],
            2,
            4,
            r"scores\[1\] has 12 columns",
        ),
    ],
)
def test_search_errors_name_the_problem(scores, n, m, message):
    with pytest.raises(ValueError, match=message):
        ria.search_permutation(scores, n, m)


def test_search_rejects_bad_options(rng):
    s = rng.random((2, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="time_budget"):
        ria.search_permutation(s, 2, 4, time_budget=-1.0)
    with pytest.raises(ValueError, match="threads"):
        ria.search_permutation(s, 2, 4, threads=0)


# --- search options -----------------------------------------------------------------


def test_search_options_defaults_match_the_keywordless_search(rng):
    options = SearchOptions()
    assert options == SearchOptions(**options.to_dict())
    assert options.seed == 0 and options.time_budget is None and options.threads is None
    assert options.patience >= 1 and options.chains >= 1 and options.max_steps > 0
    s = rng.random((16, 64)).astype(np.float32)
    np.testing.assert_array_equal(
        ria.search_permutation(s, 2, 4, options).perm, ria.search_permutation(s, 2, 4).perm
    )


def test_options_object_and_keywords_give_the_same_search(rng):
    s = rng.random((16, 64)).astype(np.float32)
    by_object = ria.search_permutation(s, 2, 4, SearchOptions(seed=5))
    by_keyword = ria.search_permutation(s, 2, 4, seed=5)
    np.testing.assert_array_equal(by_object.perm, by_keyword.perm)
    assert (by_object.retained, by_object.lsa_steps, by_object.tabu_steps) == (
        by_keyword.retained,
        by_keyword.lsa_steps,
        by_keyword.tabu_steps,
    )
    with pytest.raises(InvalidArgumentError, match="not both"):
        ria.search_permutation(s, 2, 4, SearchOptions(), seed=5)


def test_search_options_to_dict_is_plain_json():
    options = SearchOptions(seed=3, time_budget=2.5, block_groups=64, threads=2)
    d = options.to_dict()
    assert list(d) == list(SearchOptions._option_types)
    assert d["seed"] == 3 and d["time_budget"] == 2.5 and d["block_groups"] == 64
    assert d["threads"] == 2 and d["tabu_steps"] is None
    assert json.loads(json.dumps(d)) == d
    assert SearchOptions(**d) == options


def test_search_options_equality_hash_repr_and_copies():
    a = SearchOptions(seed=1, time_budget=1.5)
    b = SearchOptions(time_budget=1.5, seed=1)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != SearchOptions(seed=2) and a != SearchOptions() and a != "seed=1"
    assert repr(a).startswith("SearchOptions(seed=1, time_budget=1.5, ")
    assert eval(repr(a), {"SearchOptions": SearchOptions}) == a
    assert pickle.loads(pickle.dumps(a)) == a and copy.deepcopy(a) == a
    with pytest.raises(AttributeError):
        a.seed = 2  # type: ignore[misc]


def test_search_options_accept_numpy_integers_and_ints_for_floats():
    options = SearchOptions(patience=np.int64(3), time_budget=2, tolerance=0)
    assert options.patience == 3 and type(options.patience) is int
    assert options.time_budget == 2.0 and options.tolerance == 0.0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"time_budget": -1.0}, r"time_budget must be > 0 .* seconds, got -1\.0"),
        ({"time_budget": 0}, "time_budget must be > 0"),
        ({"time_budget": float("inf")}, "time_budget must be finite"),
        ({"time_budget": 1e12}, "time_budget must be .*<= 1000000000"),
        ({"threads": 0}, "threads must be >= 1 and <= 1024, got 0"),
        ({"threads": 100_000}, "threads must be >= 1 and <= 1024"),
        ({"patience": 0}, "patience must be >= 1, got 0"),
        ({"chains": 0}, "chains must be >= 1"),
        ({"block_groups": 1}, "block_groups must be >= 2"),
        ({"tabu_tenure": 0}, "tabu_tenure must be >= 1"),
        ({"max_steps": -1}, "max_steps must be >= 0"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"seed": 2**64}, "seed must be >= 0 and <= 18446744073709551615"),
        ({"tolerance": 2.0}, "tolerance must be >= 0 and <= 1"),
    ],
)
def test_a_bad_option_value_is_an_invalid_argument_naming_it(rng, options, message):
    with pytest.raises(InvalidArgumentError, match=message) as caught:
        SearchOptions(**options)
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, RiaError)
    s = rng.random((2, 8)).astype(np.float32)
    with pytest.raises(ValueError, match=message):
        ria.search_permutation(s, 2, 4, **options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"patience": 2.5}, "patience must be of type int, got 2.5 of type float"),
        ({"patience": True}, "patience must be of type int, got True of type bool"),
        ({"chains": None}, "chains must be of type int, got None"),
        ({"block_groups": "64"}, r"block_groups must be of type int \| None, got '64'"),
        ({"time_budget": "5"}, r"time_budget must be of type float \| None"),
    ],
)
def test_a_bad_option_type_is_an_invalid_type_naming_it(options, message):
    with pytest.raises(InvalidTypeError, match=message) as caught:
        SearchOptions(**options)
    assert isinstance(caught.value, TypeError)


def test_an_unknown_option_is_a_type_error(rng):
    with pytest.raises(TypeError, match="bogus"):
        SearchOptions(bogus=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="bogus"):
        ria.search_permutation(rng.random((2, 8)).astype(np.float32), 2, 4, bogus=1)


def test_core_input_errors_are_invalid_argument_errors():
    with pytest.raises(InvalidArgumentError, match="1 <= n < m"):
        ria.nm_mask(np.ones((2, 8), np.float32), 4, 4)
    with pytest.raises(InvalidArgumentError, match="not divisible"):
        ria.search_permutation(np.ones((2, 10), np.float32), 2, 4)
    with pytest.raises(InvalidArgumentError, match="not a permutation"):
        ria.retained_score(np.ones((2, 8), np.float32), 2, 4, np.zeros(8, np.int64))


def test_permutation_result_is_frozen_and_reads_like_a_summary(rng):
    s = rng.random((8, 32)).astype(np.float32)
    result = ria.search_permutation(s, 2, 4, tabu_steps=20)
    assert isinstance(result, PermutationResult)
    text = str(result)
    assert text == repr(result)
    assert text.startswith("PermutationResult(efficacy=") and "columns=32" in text
    assert f"identity={result.identity:.6g}" in text
    assert result.heuristic_retained <= result.upper_bound
    assert isinstance(result.lsa_steps, int) and isinstance(result.exact, bool)
    assert not hasattr(result, "identity_retained")
    with pytest.raises(AttributeError):
        result.retained = 0.0  # type: ignore[misc]
