"""Property tests of the core API (`ria.core`) with hypothesis: for any shape, dtype and
values, results are exact (masks keep N per group / prune exactly k, permutations are
permutations, `retained_score` equals a numpy recomputation) or the error is a documented
`ria.RiaError`; nothing else escapes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import ria
from ria.errors import RiaError

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")

SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)

FLOAT_DTYPES = [np.float32, np.float64, np.float16]
AWKWARD = [0.0, -0.0, np.nan, np.inf, -np.inf, 1e-45, 1e-40, 3e38, -3e38, 1e30, 1.0]


def arrays(dtype, shape, elements=None):
    """Float arrays of `shape` holding `elements` as numpy casts them (too large: inf; tiny:
    subnormal or zero, as the dtype has it). Built by numpy rather than `hnp.arrays`, whose
    exact-representability check rejects such values on some numpy versions, so awkward
    values reach the core on every supported numpy."""
    if elements is None:
        elements = st.one_of(
            st.floats(allow_nan=True, allow_infinity=True, width=32),
            st.sampled_from(AWKWARD),
        )
    size = int(np.prod(shape))
    return st.lists(elements, min_size=size, max_size=size).map(
        lambda values: np.array(values, dtype=np.float64).astype(dtype).reshape(shape)
    )


def any_array(max_side: int = 6):
    """Any array: any number of dimensions (mostly 2), float or other dtypes, any values."""
    shapes = st.one_of(
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=0, max_side=max_side),
        hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3),
    )
    return st.tuples(st.sampled_from([*FLOAT_DTYPES, np.int32, np.bool_]), shapes).flatmap(
        lambda ds: hnp.arrays(ds[0], ds[1]) if ds[0] in (np.int32, np.bool_) else arrays(*ds)
    )


def any_int():
    return st.one_of(
        st.integers(-3, 10),
        st.sampled_from([2**63, -(2**70), 2**64]),
        st.integers(1, 8).map(np.int64),
        st.sampled_from([2.0, 2.7, True, None, "4"]),
    )


def only_ria_errors(call):
    """Calls `call`; a RiaError is fine, anything else fails the test."""
    try:
        return call()
    except RiaError:
        return None


@SETTINGS
@given(
    w=any_array(),
    act=st.none() | any_array(),
    alpha=st.sampled_from([0.5, 0.0, -1.0, 2.0, 50.0, 1e300, np.nan, True, 1]),
)
def test_scores_finite_or_ria_error(w, act, alpha):
    for call in (
        lambda: ria.ria_score(w, act, alpha),
        lambda: ria.wanda_score(w, act),
        lambda: ria.magnitude_score(w),
    ):
        out = only_ria_errors(call)
        if out is not None:
            assert out.dtype == np.float32 and out.shape == w.shape
            assert np.isfinite(out).all() and (out >= 0).all()


@SETTINGS
@given(data=st.data(), n=any_int(), m=any_int())
def test_nm_mask_exact_or_ria_error(data, n, m):
    s = data.draw(any_array(max_side=9))
    mask = only_ria_errors(lambda: ria.nm_mask(s, n, m))
    if mask is None:
        return
    assert isinstance(n, (int, np.integer)) and not isinstance(n, bool)
    assert mask.shape == s.shape and mask.dtype == np.bool_
    groups = mask.reshape(s.shape[0], -1, int(m))
    assert (groups.sum(axis=2) == n).all()


@SETTINGS
@given(
    rows=st.integers(1, 5),
    m=st.sampled_from([2, 4, 8]),
    g=st.integers(1, 4),
    data=st.data(),
)
def test_nm_mask_keeps_the_largest(rows, m, g, data):
    n = data.draw(st.integers(1, m - 1))
    s = data.draw(arrays(np.float32, (rows, g * m), st.integers(0, 5).map(float)))
    mask = ria.nm_mask(s, n, m)
    kept = np.where(mask, s, np.inf).reshape(rows, g, m).min(axis=2)
    dropped = np.where(mask, -np.inf, s).reshape(rows, g, m).max(axis=2)
    assert (kept >= dropped).all()


@SETTINGS
@given(
    s=any_array(),
    sparsity=st.one_of(
        st.floats(-0.5, 1.5), st.sampled_from([0.0, 1.0, np.nan, True, np.float32(0.25)])
    ),
    per_row=st.sampled_from([False, True, np.bool_(True), 1, None]),
)
def test_unstructured_mask_exact_or_ria_error(s, sparsity, per_row):
    mask = only_ria_errors(lambda: ria.unstructured_mask(s, sparsity, per_row))
    if mask is None:
        return
    pruned = (~mask).sum(axis=1) if per_row else (~mask).sum()
    count = s.shape[1] if per_row else s.size
    assert np.all(pruned == round(float(sparsity) * count))


def scores_and_pattern(max_rows: int = 5, max_groups: int = 5):
    """Non-negative finite float32 scores `(rows, g * m)` with a valid `n:m`."""
    return st.tuples(
        st.integers(1, max_rows), st.sampled_from([2, 4, 8]), st.integers(1, max_groups)
    ).flatmap(
        lambda t: st.tuples(
            arrays(
                np.float32,
                (t[0], t[1] * t[2]),
                elements=st.one_of(
                    st.floats(0, 10, width=32), st.sampled_from([0.0, 1e-45, 1.0, 1e10])
                ),
            ),
            st.integers(1, t[1] - 1),
            st.just(t[1]),
        )
    )


def numpy_retained(s: np.ndarray, n: int, m: int, perm: np.ndarray) -> float:
    groups = s[:, perm].astype(np.float64).reshape(s.shape[0], -1, m)
    return float(np.sort(groups, axis=2)[:, :, m - n :].sum())


@SETTINGS
@given(sp=scores_and_pattern(), data=st.data())
def test_retained_score_matches_numpy(sp, data):
    s, n, m = sp
    perm = np.array(data.draw(st.permutations(range(s.shape[1]))), dtype=np.int64)
    got = ria.retained_score(s, n, m, perm)
    want = numpy_retained(s, n, m, perm)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-300)


@SETTINGS
@given(sp=scores_and_pattern(), seed=st.integers(0, 2**64 - 1), tabu=st.none() | st.integers(0, 30))
def test_search_gives_a_valid_permutation_never_below_identity(sp, seed, tabu):
    s, n, m = sp
    out = ria.search_permutation(s, n, m, seed=seed, tabu_steps=tabu)
    perm = np.asarray(out.perm)
    assert sorted(perm.tolist()) == list(range(s.shape[1]))
    assert out.retained >= out.identity
    assert out.retained == pytest.approx(numpy_retained(s, n, m, perm), rel=1e-9, abs=1e-300)
    assert out.identity == pytest.approx(
        numpy_retained(s, n, m, np.arange(s.shape[1])), rel=1e-9, abs=1e-300
    )
    assert out.retained <= out.upper_bound * (1 + 1e-9) + 1e-300
    assert np.isfinite(out.efficacy)


@SETTINGS
@given(
    data=st.data(),
    n=any_int(),
    m=any_int(),
    perm=st.none() | hnp.arrays(np.int64, st.integers(0, 9), elements=st.integers(-2, 10)),
)
def test_retained_and_search_only_raise_ria_errors(data, n, m, perm):
    s = data.draw(any_array(max_side=9))
    only_ria_errors(lambda: ria.retained_score(s, n, m, perm))
    only_ria_errors(lambda: ria.search_permutation([s, s], n, m, seed=1, tabu_steps=5))
