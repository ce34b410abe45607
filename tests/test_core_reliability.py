"""Defects of the Rust core's boundary, each reproduced: fork safety, Ctrl-C during a long
search, panics, argument types, quadratic memory and non-finite scores."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import ria
from ria import _core
from ria.core import permute_in_place
from ria.errors import InvalidArgumentError, InvalidTypeError, RiaError

PYTHON_DIR = str(Path(ria.__file__).resolve().parent.parent)


def _script(body: str) -> list[str]:
    """A `python -c` command running `body` with this checkout's `ria` first on the path."""
    prelude = f"import sys; sys.path.insert(0, {PYTHON_DIR!r})\n"
    return [sys.executable, "-c", prelude + textwrap.dedent(body)]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_core_calls_work_in_a_forked_child():
    # rayon's global pool does not survive fork: a child that called into the core after
    # its parent had used the pool waited forever.
    body = """
        import os, time
        import numpy as np
        import ria

        s = np.random.default_rng(0).random((256, 256), dtype=np.float32)
        ria.magnitude_score(s)  # large enough for the parallel path: starts the pool
        ria.search_permutation(s[:, :64], 2, 4, seed=0)
        pid = os.fork()
        if pid == 0:
            mask = ria.nm_mask(s, 2, 4)
            assert mask.sum() == s.size // 2
            ria.ria_score(s, np.ones(256, np.float32))
            ria.search_permutation(s[:, :64], 2, 4, seed=0)
            os._exit(0)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                print("child exit", os.waitstatus_to_exitcode(status))
                break
            time.sleep(0.05)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            print("child hung")
    """
    out = subprocess.run(_script(body), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "child exit 0" in out.stdout, out.stdout + out.stderr


def test_ctrl_c_interrupts_a_long_search():
    # The search ran to its end with Ctrl-C ignored (minutes on large matrices); this one
    # would run for hours.
    body = """
        import signal, sys, time
        import numpy as np
        import ria

        signal.signal(signal.SIGINT, signal.default_int_handler)
        s = np.random.default_rng(0).random((64, 2048), dtype=np.float32)
        print("ready", flush=True)
        started = time.monotonic()
        try:
            ria.search_permutation(
                s, 2, 4, max_steps=10**9, patience=10**9, tolerance=0.0, threads=2
            )
        except KeyboardInterrupt:
            print(f"interrupted after {time.monotonic() - started:.2f}", flush=True)
            sys.exit(3)
        print("finished", flush=True)
    """
    proc = subprocess.Popen(
        _script(body), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail("the search ignored SIGINT for 20 s")
        waited = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 3, out + err
    assert "interrupted" in out
    assert waited < 5, f"took {waited:.1f} s to stop"


@pytest.mark.parametrize("interruptible", [False, True])
def test_a_panic_in_the_core_is_a_runtime_error_naming_a_bug(interruptible):
    # pyo3's PanicException is a BaseException: `except Exception` missed it.
    with pytest.raises(RuntimeError, match=r"internal error in ria \(a bug"):
        _core._panic_for_tests(interruptible)
    # The pool still works afterwards.
    assert ria.nm_mask(np.ones((2, 8), np.float32), 2, 4).sum() == 8


@pytest.mark.parametrize("bad", [2.7, 2.0, True, "2", None, np.float32(2)])
def test_n_and_m_must_be_ints(bad):
    s = np.ones((2, 8), np.float32)
    calls = [
        lambda n, m: ria.nm_mask(s, n, m),
        lambda n, m: ria.retained_score(s, n, m),
        lambda n, m: ria.search_permutation(s, n, m),
    ]
    for call in calls:
        with pytest.raises(InvalidTypeError, match="n must be of type int"):
            call(bad, 4)
        with pytest.raises(InvalidTypeError, match="m must be of type int"):
            call(2, bad)


def test_numpy_integers_are_ints_and_ranges_are_checked():
    s = np.ones((2, 8), np.float32)
    assert ria.nm_mask(s, np.int64(2), np.uint8(4)).sum() == 8
    assert ria.retained_score(s, np.int32(1), np.int16(4)) == 4.0
    with pytest.raises(InvalidArgumentError, match="n must be >= 0, got -1"):
        ria.nm_mask(s, -1, 4)
    with pytest.raises(InvalidArgumentError, match="m must be"):
        ria.nm_mask(s, 2, 2**200)
    with pytest.raises(InvalidArgumentError, match="1 <= n < m"):
        ria.nm_mask(s, 0, 4)


def test_other_arguments_are_type_checked():
    s = np.ones((2, 8), np.float32)
    with pytest.raises(InvalidTypeError, match="sparsity"):
        ria.unstructured_mask(s, True)
    with pytest.raises(InvalidTypeError, match="sparsity"):
        ria.unstructured_mask(s, "0.5")  # type: ignore[arg-type]
    assert (~ria.unstructured_mask(s, np.float32(0.5))).sum() == 8
    with pytest.raises(InvalidTypeError, match="per_row must be of type bool"):
        ria.unstructured_mask(s, 0.5, per_row=1)  # type: ignore[arg-type]
    assert (~ria.unstructured_mask(s, 0.5, per_row=np.bool_(True))).sum() == 8
    with pytest.raises(InvalidTypeError, match="alpha must be of type float"):
        ria.ria_score(s, alpha=True)
    with pytest.raises(InvalidTypeError, match="alpha must be of type float"):
        ria.ria_score(s, alpha="0.5")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="alpha must be finite"):
        ria.ria_score(s, alpha=float("nan"))
    with pytest.raises(InvalidArgumentError, match="alpha must be"):
        ria.ria_score(s, alpha=1e300)
    with pytest.raises(InvalidTypeError, match="options must be a SearchOptions"):
        ria.search_permutation(s, 2, 4, options={"seed": 1})  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="threads must be"):
        ria.search_permutation(s, 2, 4, threads=10**6)


def test_shapes_that_needed_quadratic_memory_raise_quickly():
    # 1 row x 2^17 columns = 2^15 groups: one assignment over every group needs 2^30
    # floats (4 GiB) per block, tabu's swap matrix 2^34 (64 GiB per chain); the process
    # aborted on the allocation. Now both are refused before any work (bound: 1 GiB).
    s = np.random.default_rng(0).random((1, 1 << 17), dtype=np.float32)
    started = time.monotonic()
    with pytest.raises(
        InvalidArgumentError, match=r"block_groups=32768 needs .* use block_groups <="
    ):
        ria.search_permutation(s, 2, 4, block_groups=1 << 15, max_steps=1)
    with pytest.raises(InvalidArgumentError, match=r"tabu_steps=1 with chains=8 needs .* GiB"):
        ria.search_permutation(s, 2, 4, tabu_steps=1, max_steps=0, global_steps=0)
    assert time.monotonic() - started < 10


def test_scores_too_large_for_the_search_are_refused_with_advice():
    s = np.ones((4, 8), np.float32)
    s[0, 0] = 3e38
    with pytest.raises(InvalidArgumentError, match="too large for the permutation search"):
        ria.search_permutation(s, 2, 4)
    assert np.isfinite(ria.retained_score(s, 2, 4))


def test_finite_inputs_never_give_non_finite_scores():
    # Subnormal weights: reciprocals of their sums overflowed float32 (inf, and NaN for 0).
    tiny = np.float32(1e-44)
    w = np.array([[tiny, 0.0], [tiny, tiny]], np.float32)
    assert np.isfinite(ria.ria_score(w)).all()
    assert ria.ria_score(w)[0, 1] == 0.0
    with pytest.raises(
        InvalidArgumentError, match=r"act_norm \*\* alpha overflows float32 for alpha=3"
    ):
        ria.ria_score(np.ones((2, 2), np.float32), np.array([1e20, 1.0], np.float32), alpha=3.0)
    with pytest.raises(InvalidArgumentError, match=r"alpha=-0.5"):
        ria.ria_score(np.ones((2, 2), np.float32), np.array([0.0, 1.0], np.float32), alpha=-0.5)
    with pytest.raises(InvalidArgumentError, match=r"wanda score .* overflows float32 at \(0, 1\)"):
        ria.wanda_score(np.array([[1.0, 3e38]], np.float32), np.array([1.0, 2.0], np.float32))
    # float64 beyond float32's range: refused by name, no numpy overflow warning.
    with pytest.raises(InvalidArgumentError, match=r"scores contains inf at \(0, 1\)"):
        ria.nm_mask(np.array([[1.0, 1e300, 0.0, 0.0]]), 2, 4)


def test_every_error_is_a_ria_error():
    for call in (
        lambda: ria.nm_mask([[1.0, 2.0], [3.0]], 1, 2),
        lambda: ria.magnitude_score(np.ones((0, 4), np.float32)),
        lambda: ria.retained_score([], 2, 4),
    ):
        with pytest.raises(RiaError):
            call()


def test_permute_in_place_refuses_an_empty_matrix():
    # A matrix with no columns panicked in the core (rows split into chunks of 0).
    for shape in [(4, 0), (0, 4)]:
        with pytest.raises(InvalidArgumentError, match=r"scores is empty \(shape"):
            permute_in_place(np.zeros(shape, np.float32), cols=np.arange(shape[1]))


def test_kept_score_refuses_non_finite_scores():
    # The sum came back NaN or inf without an error.
    keep = np.ones((2, 4), bool)
    for bad in [np.nan, np.inf]:
        s = np.ones((2, 4), np.float32)
        s[1, 2] = bad
        with pytest.raises(InvalidArgumentError, match=r"scores contains (NaN|inf) at \(1, 2\)"):
            ria.kept_score(s, keep)


def _misaligned(array: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of `array` one byte into a buffer, so not aligned (unless its
    items are single bytes)."""
    out = np.ndarray(array.shape, array.dtype, buffer=bytearray(array.nbytes + 1), offset=1)
    out[...] = array
    assert out.flags.c_contiguous and out.flags.aligned == (array.itemsize == 1)
    return out


def test_misaligned_arrays_are_read():
    # np.ascontiguousarray left them misaligned and the core refused them as
    # "array must be C-contiguous".
    s = np.random.default_rng(0).random((4, 8), dtype=np.float32)
    for dtype in [np.float32, np.float16]:
        np.testing.assert_array_equal(
            ria.magnitude_score(_misaligned(s.astype(dtype))), ria.magnitude_score(s.astype(dtype))
        )
    np.testing.assert_array_equal(ria.nm_mask(_misaligned(s), 2, 4), ria.nm_mask(s, 2, 4))
    keep = np.ones((4, 8), bool)
    assert ria.kept_score(_misaligned(s), _misaligned(keep)) == ria.kept_score(s, keep)
    perm = np.arange(8)[::-1].copy()
    assert ria.retained_score(s, 2, 4, _misaligned(perm)) == ria.retained_score(s, 2, 4, perm)
    # Where no copy is made, the refusal names the argument and says why.
    with pytest.raises(InvalidArgumentError, match="scores must be a C-contiguous and aligned"):
        _core.nm_mask(_misaligned(s), 2, 4)
    with pytest.raises(InvalidArgumentError, match="scores must be a C-contiguous and aligned"):
        permute_in_place(_misaligned(s), cols=perm)
    frozen = s.copy()
    frozen.flags.writeable = False
    with pytest.raises(InvalidArgumentError, match="scores is read-only"):
        permute_in_place(frozen, cols=perm)


def test_big_endian_arrays_are_read_as_their_values():
    # A big-endian weight was refused as "unsupported dtype >f4".
    w = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    for dtype in [">f4", ">f2", ">f8"]:
        big = w.astype(dtype)
        np.testing.assert_array_equal(ria.magnitude_score(big), np.abs(big.astype(np.float32)))
    s = np.abs(w)
    np.testing.assert_array_equal(ria.nm_mask(s.astype(">f4"), 2, 4), ria.nm_mask(s, 2, 4))
    perm = np.arange(8)[::-1].copy()
    assert ria.retained_score(s, 2, 4, perm.astype(">i8")) == ria.retained_score(s, 2, 4, perm)


def test_errors_name_the_argument_at_fault():
    s = np.ones((4, 8), np.float32)
    with pytest.raises(InvalidArgumentError, match=r"expected the scores' \(4, 8\)"):
        ria.kept_score(s, np.ones((4, 7), bool))
    with pytest.raises(InvalidArgumentError, match="rows has 3 entries, expected 4"):
        permute_in_place(s, rows=np.arange(3))
    with pytest.raises(InvalidArgumentError, match=r"cols is not a permutation of 0\.\.8"):
        permute_in_place(s, cols=np.zeros(8, np.int64))
    with pytest.raises(InvalidTypeError, match=r"scores must be a float32 array.*got float64"):
        permute_in_place(s.astype(np.float64), cols=np.arange(8))
    with pytest.raises(InvalidArgumentError, match=r"problems\[1\]\[1\] is empty"):
        ria.search_permutations([[s], [s, np.ones((0, 8), np.float32)]], 2, 4)
