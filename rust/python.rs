//! The `ria._core` extension: argument checks, dtype dispatch and GIL release around
//! the core. Arrays arrive C-contiguous (the Python layer makes them so); 16-bit
//! weights arrive as raw `uint16` words with their format named, so nothing is upcast
//! on the Python side.
//!
//! The permutation search's settings and result are the classes `SearchOptions` and
//! `PermutationResult`, defined here and nowhere else: adding a search option is a field
//! of [`permute::Options`] and one line in `search_options!` below (then
//! `python -m ria._stubgen` rewrites `python/ria/_core.pyi`). Bad arguments raise
//! `ria.errors.InvalidArgumentError` (a `ValueError`), wrong argument or option types
//! `ria.errors.InvalidTypeError` (a `TypeError`); every numeric argument is checked here,
//! by type (an int is a Python or numpy integer, never a bool or a float) and range.
//!
//! Reliability at the boundary:
//! - Work runs on a thread pool of this process ([`pool`]), never rayon's global one,
//!   which does not survive `fork` (a forked child would wait forever on threads that
//!   only exist in its parent); the pool is rebuilt when the process id changes.
//! - A panic in the core is caught and raised as a `RuntimeError` that says it is a bug
//!   in ria ([`run`]): the checks here and in the core are meant to refuse every bad
//!   input with a `RiaError`, so a panic is never the caller's fault, and a
//!   `pyo3_runtime.PanicException` (a `BaseException`) would escape `except Exception`.
//! - The permutation search and mask refinement poll Ctrl-C ([`run_interruptible`]): the
//!   calling thread checks Python's signals while the work runs on the pool, and a pending
//!   `KeyboardInterrupt` stops it at its next step and is raised.

use crate::error::InputError;
use crate::matrix::{Element, MatRef};
use crate::permute::{self, Options, Problem};
use crate::refine::{self, Sparsity};
use crate::{mask, score};
use half::slice::HalfBitsSliceExt;
use half::{bf16, f16};
use numpy::ndarray::Array2;
use numpy::{
    IntoPyArray, PyArray1, PyArray2, PyReadonlyArray1, PyReadonlyArray2, PyReadwriteArray2,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyOverflowError, PyRuntimeError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyTuple};
use rayon::ThreadPool;
use std::any::Any;
use std::convert::Infallible;
use std::fmt;
use std::ops::Bound::{Excluded, Included, Unbounded};
use std::ops::RangeBounds;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

// The exceptions of `ria.errors` (python/ria/errors.py): `InvalidArgumentError` is also
// a `ValueError`, `InvalidTypeError` also a `TypeError`.
pyo3::import_exception!(ria.errors, InvalidArgumentError);
pyo3::import_exception!(ria.errors, InvalidTypeError);

impl From<InputError> for PyErr {
    fn from(e: InputError) -> Self {
        InvalidArgumentError::new_err(e.0)
    }
}

// --- where the work runs ---------------------------------------------------------------

/// The default pool and the process it was built in.
static POOL: Mutex<Option<(u32, Arc<ThreadPool>)>> = Mutex::new(None);

fn build_pool(threads: usize) -> PyResult<ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| PyRuntimeError::new_err(format!("cannot start worker threads: {e}")))
}

/// The pool for `threads` workers, or for one per core (`None`, shared between calls and
/// rebuilt in a forked child). Called with the GIL held, so `os.fork` (which takes the
/// GIL) cannot happen while another thread holds the lock.
fn pool(_py: Python<'_>, threads: Option<usize>) -> PyResult<Arc<ThreadPool>> {
    if let Some(threads) = threads {
        return Ok(Arc::new(build_pool(threads)?));
    }
    let pid = std::process::id();
    let mut slot = POOL.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((owner, pool)) = slot.as_ref()
        && *owner == pid
    {
        return Ok(pool.clone());
    }
    let fresh = Arc::new(build_pool(0)?);
    if let Some((_, inherited)) = slot.replace((pid, fresh.clone())) {
        // Built by the parent before a fork: its workers do not exist here, and dropping
        // it would signal them through locks they may have held. Leak it.
        std::mem::forget(inherited);
    }
    Ok(fresh)
}

/// The message of a caught panic.
fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

/// A panic caught at the boundary, as the `RuntimeError` it becomes.
fn bug(payload: &(dyn Any + Send)) -> PyErr {
    PyRuntimeError::new_err(format!(
        "internal error in ria (a bug, please report it with the call that caused it): {}",
        panic_message(payload)
    ))
}

/// Runs `work` on the default pool without the GIL; a panic becomes a `RuntimeError`.
fn run<R: Send>(py: Python<'_>, work: impl FnOnce() -> crate::Result<R> + Send) -> PyResult<R> {
    let pool = pool(py, None)?;
    py.detach(|| pool.install(|| catch_unwind(AssertUnwindSafe(work))))
        .map_err(|payload| bug(&*payload))?
        .map_err(PyErr::from)
}

/// Marks a worker finished when dropped.
struct Finished<'a>(&'a (Mutex<bool>, Condvar));

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        *self.0.0.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.0.1.notify_all();
    }
}

/// How often the calling thread checks for Ctrl-C while an interruptible call runs.
const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// Runs `work` on `pool` while this thread checks Python's signals every
/// [`SIGNAL_POLL`]. When a signal handler raises (Ctrl-C: `KeyboardInterrupt`), the stop
/// flag `work` polls is set, `work` is waited for, and the handler's exception is raised.
/// A panic becomes a `RuntimeError`.
fn run_interruptible<R: Send>(
    py: Python<'_>,
    pool: &ThreadPool,
    work: impl FnOnce(permute::Stop<'_>) -> crate::Result<R> + Send,
) -> PyResult<R> {
    let stop = AtomicBool::new(false);
    let stopped = || stop.load(Ordering::Relaxed);
    let slot = Mutex::new(None);
    let done = (Mutex::new(false), Condvar::new());
    let interrupted = std::thread::scope(|scope| {
        scope.spawn(|| {
            // Set when this thread ends, however it ends, so the wait below cannot hang.
            let _finished = Finished(&done);
            let outcome = pool.install(|| catch_unwind(AssertUnwindSafe(|| work(&stopped))));
            *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(outcome);
        });
        let mut interrupted: Option<PyErr> = None;
        loop {
            let finished = py.detach(|| {
                let flag = done.0.lock().unwrap_or_else(PoisonError::into_inner);
                let (flag, _) = done
                    .1
                    .wait_timeout_while(flag, SIGNAL_POLL, |finished| !*finished)
                    .unwrap_or_else(PoisonError::into_inner);
                *flag
            });
            if finished {
                return interrupted;
            }
            if interrupted.is_none()
                && let Err(e) = py.check_signals()
            {
                stop.store(true, Ordering::Relaxed);
                interrupted = Some(e);
            }
        }
    });
    let outcome = slot.into_inner().unwrap_or_else(PoisonError::into_inner);
    if let Some(e) = interrupted {
        return Err(e);
    }
    match outcome {
        Some(Ok(result)) => result.map_err(PyErr::from),
        Some(Err(payload)) => Err(bug(&*payload)),
        None => Err(bug(&"the worker thread ended without a result")),
    }
}

// --- arguments ------------------------------------------------------------------------

/// An integer argument (a Python or numpy integer, not a bool) within `range`.
fn int_arg(name: &str, obj: &Bound<'_, PyAny>, range: impl RangeBounds<i128>) -> PyResult<usize> {
    option_value::<usize>(name, obj, range)
}

/// `type(obj).__name__`, for error messages.
fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map_or_else(|_| "?".into(), |n| n.to_string())
}

/// `repr(obj)`, for error messages.
fn repr_of(obj: &Bound<'_, PyAny>) -> String {
    obj.repr().map_or_else(|_| "?".into(), |r| r.to_string())
}

/// A boolean argument (Python or numpy bool).
fn bool_arg(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<bool> {
    obj.extract::<bool>().map_err(|_| {
        let repr = repr_of(obj);
        let ty = type_name(obj);
        InvalidTypeError::new_err(format!(
            "{name} must be of type bool, got {repr} of type {ty}"
        ))
    })
}

/// Largest `alpha`: `act_norm ** alpha` is computed for float32 scores.
const MAX_ALPHA: f64 = f32::MAX as f64;

/// A 2-D weight in one of the supported storage formats.
enum Weight<'py> {
    F32(PyReadonlyArray2<'py, f32>),
    Bits16(PyReadonlyArray2<'py, u16>, Half),
}

#[derive(Clone, Copy)]
enum Half {
    F16,
    Bf16,
}

impl<'py> Weight<'py> {
    fn extract(array: &Bound<'py, PyAny>, format: &str) -> PyResult<Self> {
        Ok(match format {
            "f32" => Weight::F32(array.extract()?),
            "f16" => Weight::Bits16(array.extract()?, Half::F16),
            "bf16" => Weight::Bits16(array.extract()?, Half::Bf16),
            other => {
                return Err(InvalidArgumentError::new_err(format!(
                    "unknown weight format {other:?}"
                )));
            }
        })
    }

    fn shape(&self) -> (usize, usize) {
        let s = match self {
            Weight::F32(a) => a.shape(),
            Weight::Bits16(a, _) => a.shape(),
        };
        (s[0], s[1])
    }

    /// The weight as a typed matrix.
    fn typed(&self) -> PyResult<WeightRef<'_>> {
        let (rows, cols) = self.shape();
        Ok(match self {
            Weight::F32(a) => {
                WeightRef::F32(MatRef::new(slice(a, "weight")?, rows, cols, "weight")?)
            }
            Weight::Bits16(a, half) => {
                let bits = slice(a, "weight")?;
                match half {
                    Half::F16 => {
                        WeightRef::F16(MatRef::new(bits.reinterpret_cast(), rows, cols, "weight")?)
                    }
                    Half::Bf16 => {
                        WeightRef::Bf16(MatRef::new(bits.reinterpret_cast(), rows, cols, "weight")?)
                    }
                }
            }
        })
    }

    /// Runs `f` on the weight as a typed matrix, without the GIL (see [`run`]).
    fn with<R: Send>(&self, py: Python<'_>, f: impl WeightFn<R>) -> PyResult<R> {
        let w = self.typed()?;
        run(py, || w.apply(f))
    }
}

/// A weight matrix with its element type known.
#[derive(Clone, Copy)]
enum WeightRef<'a> {
    F32(MatRef<'a, f32>),
    F16(MatRef<'a, f16>),
    Bf16(MatRef<'a, bf16>),
}

impl WeightRef<'_> {
    fn apply<R>(self, f: impl WeightFn<R>) -> crate::Result<R> {
        match self {
            WeightRef::F32(w) => f.call(w),
            WeightRef::F16(w) => f.call(w),
            WeightRef::Bf16(w) => f.call(w),
        }
    }
}

/// A computation generic over the weight's element type.
trait WeightFn<R>: Send + Sync {
    fn call<T: Element>(self, w: MatRef<T>) -> crate::Result<R>;
}

struct Ria<'a> {
    act_norm: Option<&'a [f32]>,
    alpha: f32,
}
impl WeightFn<Vec<f32>> for Ria<'_> {
    fn call<T: Element>(self, w: MatRef<T>) -> crate::Result<Vec<f32>> {
        score::ria(w, self.act_norm, self.alpha)
    }
}

struct Wanda<'a>(&'a [f32]);
impl WeightFn<Vec<f32>> for Wanda<'_> {
    fn call<T: Element>(self, w: MatRef<T>) -> crate::Result<Vec<f32>> {
        score::wanda(w, self.0)
    }
}

struct Magnitude;
impl WeightFn<Vec<f32>> for Magnitude {
    fn call<T: Element>(self, w: MatRef<T>) -> crate::Result<Vec<f32>> {
        score::magnitude(w)
    }
}

/// The array `name` as a slice. `as_slice` also refuses a misaligned array (numpy's
/// `ascontiguousarray` leaves one misaligned), and accepts a Fortran-ordered one, which
/// would then be read as rows.
fn slice<'a, T: numpy::Element, D: numpy::ndarray::Dimension>(
    a: &'a numpy::PyReadonlyArray<'_, T, D>,
    name: &str,
) -> PyResult<&'a [T]> {
    match a.as_slice() {
        Ok(data) if a.is_c_contiguous() => Ok(data),
        _ => Err(InvalidArgumentError::new_err(format!(
            "{name} must be a C-contiguous and aligned array"
        ))),
    }
}

fn into_matrix<T: numpy::Element>(
    py: Python<'_>,
    data: Vec<T>,
    rows: usize,
    cols: usize,
) -> Bound<'_, PyArray2<T>> {
    Array2::from_shape_vec((rows, cols), data)
        .expect("shape matches length")
        .into_pyarray(py)
}

#[pyfunction]
#[pyo3(signature = (weight, weight_format, act_norm, alpha))]
fn ria_score<'py>(
    py: Python<'py>,
    weight: &Bound<'py, PyAny>,
    weight_format: &str,
    act_norm: Option<PyReadonlyArray1<'py, f32>>,
    alpha: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let alpha = option_value::<f64>("alpha", alpha, -MAX_ALPHA..=MAX_ALPHA)? as f32;
    let weight = Weight::extract(weight, weight_format)?;
    let act = act_norm
        .as_ref()
        .map(|a| slice(a, "act_norm"))
        .transpose()?;
    let out = weight.with(
        py,
        Ria {
            act_norm: act,
            alpha,
        },
    )?;
    let (rows, cols) = weight.shape();
    Ok(into_matrix(py, out, rows, cols))
}

#[pyfunction]
fn wanda_score<'py>(
    py: Python<'py>,
    weight: &Bound<'py, PyAny>,
    weight_format: &str,
    act_norm: PyReadonlyArray1<'py, f32>,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let weight = Weight::extract(weight, weight_format)?;
    let out = weight.with(py, Wanda(slice(&act_norm, "act_norm")?))?;
    let (rows, cols) = weight.shape();
    Ok(into_matrix(py, out, rows, cols))
}

#[pyfunction]
fn magnitude_score<'py>(
    py: Python<'py>,
    weight: &Bound<'py, PyAny>,
    weight_format: &str,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let weight = Weight::extract(weight, weight_format)?;
    let out = weight.with(py, Magnitude)?;
    let (rows, cols) = weight.shape();
    Ok(into_matrix(py, out, rows, cols))
}

/// `n` and `m` of an N:M pattern as non-negative ints (the core checks `1 <= n < m`).
fn pattern(n: &Bound<'_, PyAny>, m: &Bound<'_, PyAny>) -> PyResult<(usize, usize)> {
    Ok((int_arg("n", n, 0..)?, int_arg("m", m, 0..)?))
}

fn scores_ref<'a>(a: &'a PyReadonlyArray2<'_, f32>, name: &str) -> PyResult<MatRef<'a, f32>> {
    let s = a.shape();
    Ok(MatRef::new(slice(a, name)?, s[0], s[1], name)?)
}

#[pyfunction]
fn nm_mask<'py>(
    py: Python<'py>,
    scores: PyReadonlyArray2<'py, f32>,
    n: &Bound<'py, PyAny>,
    m: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArray2<bool>>> {
    let (n, m) = pattern(n, m)?;
    let s = scores_ref(&scores, "scores")?;
    let out = run(py, || mask::nm_mask(s, n, m))?;
    Ok(into_matrix(py, out, s.rows(), s.cols()))
}

/// Sum of `scores` where `keep` is True, in float64 (rows in parallel, deterministic).
#[pyfunction]
fn kept_score(
    py: Python<'_>,
    scores: PyReadonlyArray2<'_, f32>,
    keep: PyReadonlyArray2<'_, bool>,
) -> PyResult<f64> {
    let s = scores_ref(&scores, "scores")?;
    if keep.shape() != [s.rows(), s.cols()] {
        return Err(InvalidArgumentError::new_err(format!(
            "keep has shape {:?}, expected the scores' ({}, {})",
            keep.shape(),
            s.rows(),
            s.cols()
        )));
    }
    let keep = slice(&keep, "keep")?;
    run(py, || mask::kept_sum(s, keep))
}

/// Reorders a C-contiguous float32 matrix in place: `scores[:] = scores[rows][:, cols]`
/// (`None`: that axis unchanged). No matrix-sized copy is allocated.
#[pyfunction]
#[pyo3(signature = (scores, rows=None, cols=None))]
fn permute_in_place(
    py: Python<'_>,
    mut scores: PyReadwriteArray2<'_, f32>,
    rows: Option<PyReadonlyArray1<'_, i64>>,
    cols: Option<PyReadonlyArray1<'_, i64>>,
) -> PyResult<()> {
    let [n_rows, n_cols] = [scores.shape()[0], scores.shape()[1]];
    // Refused like every other function's empty input (`MatRef::new`).
    if n_rows == 0 || n_cols == 0 {
        return Err(InvalidArgumentError::new_err(format!(
            "scores is empty (shape {n_rows} x {n_cols})"
        )));
    }
    let rows = rows
        .map(|p| permutation(slice(&p, "rows")?, n_rows, "rows"))
        .transpose()?;
    let cols = cols
        .map(|p| permutation(slice(&p, "cols")?, n_cols, "cols"))
        .transpose()?;
    // `as_slice_mut` also accepts a Fortran-ordered array, which would be read as rows.
    let c_order = scores.is_c_contiguous();
    let data = match scores.as_slice_mut() {
        Ok(data) if c_order => data,
        _ => {
            return Err(InvalidArgumentError::new_err(
                "scores must be a C-contiguous and aligned float32 array",
            ));
        }
    };
    run(py, || {
        crate::matrix::permute_in_place(data, n_cols, rows.as_deref(), cols.as_deref());
        Ok(())
    })
}

#[pyfunction]
fn unstructured_mask<'py>(
    py: Python<'py>,
    scores: PyReadonlyArray2<'py, f32>,
    prune: &Bound<'py, PyAny>,
    per_row: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArray2<bool>>> {
    let prune = int_arg("prune", prune, 0..)?;
    let per_row = bool_arg("per_row", per_row)?;
    let s = scores_ref(&scores, "scores")?;
    let out = run(py, || mask::unstructured_mask(s, prune, per_row))?;
    Ok(into_matrix(py, out, s.rows(), s.cols()))
}

/// The score matrices of one problem; `name(i)` names the `i`-th in errors.
fn score_refs<'a>(
    scores: &'a [PyReadonlyArray2<'_, f32>],
    name: impl Fn(usize) -> String,
) -> PyResult<Vec<MatRef<'a, f32>>> {
    scores
        .iter()
        .enumerate()
        .map(|(i, a)| scores_ref(a, &name(i)))
        .collect()
}

/// Names the matrices of `search_permutation`'s and `retained_score`'s `scores`.
fn scores_name(count: usize) -> impl Fn(usize) -> String {
    move |i| {
        if count == 1 {
            "scores".to_string()
        } else {
            format!("scores[{i}]")
        }
    }
}

/// Checks that `perm` (the argument `name`) is a permutation of `0..cols` and converts it.
fn permutation(perm: &[i64], cols: usize, name: &str) -> PyResult<Vec<u32>> {
    if perm.len() != cols {
        return Err(InvalidArgumentError::new_err(format!(
            "{name} has {} entries, expected {cols}",
            perm.len()
        )));
    }
    let mut seen = vec![false; cols];
    perm.iter()
        .map(|&p| {
            if p < 0 || p as usize >= cols || std::mem::replace(&mut seen[p as usize], true) {
                Err(InvalidArgumentError::new_err(format!(
                    "{name} is not a permutation of 0..{cols}: {p} is out of range or repeated"
                )))
            } else {
                Ok(p as u32)
            }
        })
        .collect()
}

#[pyfunction]
#[pyo3(signature = (scores, n, m, perm=None))]
fn retained_score(
    py: Python<'_>,
    scores: Vec<PyReadonlyArray2<'_, f32>>,
    n: &Bound<'_, PyAny>,
    m: &Bound<'_, PyAny>,
    perm: Option<PyReadonlyArray1<'_, i64>>,
) -> PyResult<f64> {
    let (n, m) = pattern(n, m)?;
    let mats = score_refs(&scores, scores_name(scores.len()))?;
    let problem = run(py, || Problem::new(&mats, n, m))?;
    let perm = match perm {
        Some(p) => permutation(slice(&p, "perm")?, problem.cols(), "perm")?,
        None => (0..problem.cols() as u32).collect(),
    };
    run(py, || Ok(problem.retained(&perm)))
}

// --- search options: how each crosses the boundary -------------------------------------

/// Why a Python value was refused for an option (the caller names the option).
enum Bad {
    /// Not of the option's Python type.
    Type,
    /// Of the right type but out of range: the condition it fails, e.g. ">= 1".
    Value(String),
}

/// An option's value other than None: its Python type, the number its range is checked
/// on, and the conversions both ways.
trait Scalar: Sized {
    /// The type in `_core.pyi`.
    const PY_TYPE: &'static str;
    /// Appended to range conditions in messages (" seconds").
    const UNIT: &'static str = "";
    type Num: PartialOrd + fmt::Display;
    fn number(obj: &Bound<'_, PyAny>) -> Result<Self::Num, Bad>;
    fn convert(n: Self::Num) -> Result<Self, Bad>;
    fn scalar_to_py<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>>;
}

/// A Python int (or anything with `__index__`, such as numpy integers), but not a bool.
fn int_number(obj: &Bound<'_, PyAny>) -> Result<i128, Bad> {
    if obj.is_instance_of::<PyBool>() {
        return Err(Bad::Type);
    }
    obj.extract::<i128>().map_err(|e| {
        if e.is_instance_of::<PyOverflowError>(obj.py()) {
            Bad::Value("a 128-bit integer".into())
        } else {
            Bad::Type
        }
    })
}

/// A finite Python float or int (or anything with `__float__`), but not a bool.
fn float_number(obj: &Bound<'_, PyAny>) -> Result<f64, Bad> {
    if obj.is_instance_of::<PyBool>() {
        return Err(Bad::Type);
    }
    let x: f64 = obj.extract().map_err(|_| Bad::Type)?;
    if x.is_finite() {
        Ok(x)
    } else {
        Err(Bad::Value("finite".into()))
    }
}

macro_rules! int_scalar {
    ($($t:ty),*) => {$(
        impl Scalar for $t {
            const PY_TYPE: &'static str = "int";
            type Num = i128;
            fn number(obj: &Bound<'_, PyAny>) -> Result<i128, Bad> {
                int_number(obj)
            }
            fn convert(n: i128) -> Result<Self, Bad> {
                Self::try_from(n)
                    .map_err(|_| Bad::Value(format!(">= {} and <= {}", Self::MIN, Self::MAX)))
            }
            fn scalar_to_py<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
                Ok(self.into_pyobject(py)?.into_any())
            }
        }
    )*};
}
int_scalar!(u64, usize);

impl Scalar for f64 {
    const PY_TYPE: &'static str = "float";
    type Num = f64;
    fn number(obj: &Bound<'_, PyAny>) -> Result<f64, Bad> {
        float_number(obj)
    }
    fn convert(n: f64) -> Result<Self, Bad> {
        Ok(n)
    }
    fn scalar_to_py<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(PyFloat::new(py, *self).into_any())
    }
}

/// A duration crosses as a float number of seconds.
impl Scalar for Duration {
    const PY_TYPE: &'static str = "float";
    const UNIT: &'static str = " seconds";
    type Num = f64;
    fn number(obj: &Bound<'_, PyAny>) -> Result<f64, Bad> {
        float_number(obj)
    }
    fn convert(n: f64) -> Result<Self, Bad> {
        Duration::try_from_secs_f64(n).map_err(|e| Bad::Value(e.to_string()))
    }
    fn scalar_to_py<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(PyFloat::new(py, self.as_secs_f64()).into_any())
    }
}

/// The type of a search option's field: a [`Scalar`], or an `Option` of one where None
/// is a setting of its own (no cap, sized from the matrix).
trait OptionValue: Sized {
    type Num: PartialOrd + fmt::Display;
    fn py_type() -> String;
    fn from_py(obj: &Bound<'_, PyAny>, range: &impl RangeBounds<Self::Num>) -> Result<Self, Bad>;
    fn to_py<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>>;
}

impl<T: Scalar> OptionValue for T {
    type Num = T::Num;
    fn py_type() -> String {
        T::PY_TYPE.to_string()
    }
    fn from_py(obj: &Bound<'_, PyAny>, range: &impl RangeBounds<T::Num>) -> Result<Self, Bad> {
        let n = T::number(obj)?;
        if !range.contains(&n) {
            return Err(Bad::Value(format!("{}{}", describe_range(range), T::UNIT)));
        }
        T::convert(n)
    }
    fn to_py<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.scalar_to_py(py)
    }
}

impl<T: Scalar> OptionValue for Option<T> {
    type Num = T::Num;
    fn py_type() -> String {
        format!("{} | None", T::PY_TYPE)
    }
    fn from_py(obj: &Bound<'_, PyAny>, range: &impl RangeBounds<T::Num>) -> Result<Self, Bad> {
        if obj.is_none() {
            Ok(None)
        } else {
            <T as OptionValue>::from_py(obj, range).map(Some)
        }
    }
    fn to_py<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        match self {
            None => Ok(py.None().into_bound(py)),
            Some(value) => value.scalar_to_py(py),
        }
    }
}

/// ">= 1", "> 0 and <= 1000000000".
fn describe_range<N: fmt::Display>(range: &impl RangeBounds<N>) -> String {
    let low = match range.start_bound() {
        Included(a) => Some(format!(">= {a}")),
        Excluded(a) => Some(format!("> {a}")),
        Unbounded => None,
    };
    let high = match range.end_bound() {
        Included(b) => Some(format!("<= {b}")),
        Excluded(b) => Some(format!("< {b}")),
        Unbounded => None,
    };
    [low, high]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" and ")
}

/// The option `name` from a Python value: type and range checked, with errors that name
/// the option (`InvalidTypeError`, `InvalidArgumentError`).
fn option_value<T: OptionValue>(
    name: &str,
    obj: &Bound<'_, PyAny>,
    range: impl RangeBounds<T::Num>,
) -> PyResult<T> {
    T::from_py(obj, &range).map_err(|bad| {
        let repr = repr_of(obj);
        match bad {
            Bad::Type => {
                let ty = type_name(obj);
                InvalidTypeError::new_err(format!(
                    "{name} must be of type {}, got {repr} of type {ty}",
                    T::py_type()
                ))
            }
            Bad::Value(condition) => {
                InvalidArgumentError::new_err(format!("{name} must be {condition}, got {repr}"))
            }
        }
    })
}

/// A keyword argument that may be absent, in which case the option keeps its default.
/// None given explicitly is a value: only options whose type admits None accept it.
enum Given<'py> {
    Absent,
    Value(Bound<'py, PyAny>),
}

impl<'a, 'py> FromPyObject<'a, 'py> for Given<'py> {
    type Error = Infallible;
    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> Result<Self, Self::Error> {
        Ok(Given::Value(obj.to_owned()))
    }
}

/// Declares the `SearchOptions` pyclass from one line per option: its doc (shown by the
/// getter and in `_core.pyi`), name, Rust type and accepted range. `core` options are the
/// fields of [`permute::Options`] (listing all of them is checked at compile time), with
/// their defaults; `binding` options belong to this layer and give their default here.
/// Everything else (constructor, getters, validation, `to_dict`, `__repr__`, `__eq__`,
/// `__hash__`, pickling) is generated from that list.
macro_rules! search_options {
    (
        $(#[doc = $doc:literal])*
        core {$(
            $(#[doc = $cdoc:literal])+
            $c:ident: $cty:ty, $crange:expr;
        )*}
        binding {$(
            $(#[doc = $bdoc:literal])+
            $b:ident: $bty:ty = $bdefault:expr, $brange:expr;
        )*}
    ) => {
        $(#[doc = $doc])*
        #[pyclass(frozen, eq, module = "ria._core")]
        #[derive(Clone, Debug)]
        pub(crate) struct SearchOptions {
            core: Options,
            $($b: $bty,)*
        }

        /// Stops compiling when `permute::Options` gains a field that is not listed.
        const _: fn(Options) = |options| {
            let Options { $($c: _,)* } = options;
        };

        impl Default for SearchOptions {
            fn default() -> Self {
                Self { core: Options::default(), $($b: $bdefault,)* }
            }
        }

        impl SearchOptions {
            /// Every option's name and value, in declaration order.
            fn items<'py>(
                &self,
                py: Python<'py>,
            ) -> PyResult<Vec<(&'static str, Bound<'py, PyAny>)>> {
                Ok(vec![
                    $((stringify!($c), OptionValue::to_py(&self.core.$c, py)?),)*
                    $((stringify!($b), OptionValue::to_py(&self.$b, py)?),)*
                ])
            }

        }

        impl PartialEq for SearchOptions {
            fn eq(&self, other: &Self) -> bool {
                true $(&& self.core.$c == other.core.$c)* $(&& self.$b == other.$b)*
            }
        }

        #[pymethods]
        impl SearchOptions {
            #[new]
            #[allow(clippy::too_many_arguments, reason = "one keyword per option")]
            #[pyo3(signature = (*, $($c = Given::Absent,)* $($b = Given::Absent,)*))]
            fn new($($c: Given<'_>,)* $($b: Given<'_>,)*) -> PyResult<Self> {
                let mut options = Self::default();
                $(if let Given::Value(value) = $c {
                    options.core.$c = option_value::<$cty>(stringify!($c), &value, $crange)?;
                })*
                $(if let Given::Value(value) = $b {
                    options.$b = option_value::<$bty>(stringify!($b), &value, $brange)?;
                })*
                Ok(options)
            }

            $(
                $(#[doc = $cdoc])+
                #[getter]
                fn $c<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
                    OptionValue::to_py(&self.core.$c, py)
                }
            )*
            $(
                $(#[doc = $bdoc])+
                #[getter]
                fn $b<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
                    OptionValue::to_py(&self.$b, py)
                }
            )*

            /// The Python type of every option, by name (read by `ria._stubgen`).
            #[classattr]
            fn _option_types(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
                let types = PyDict::new(py);
                $(types.set_item(stringify!($c), <$cty as OptionValue>::py_type())?;)*
                $(types.set_item(stringify!($b), <$bty as OptionValue>::py_type())?;)*
                Ok(types)
            }

            /// Every option as `{name: value}` of plain Python types (int, float, None;
            /// seconds for `time_budget`): what a checkpoint's JSON records, and
            /// `SearchOptions(**options.to_dict())` gives equal options back.
            fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
                let dict = PyDict::new(py);
                for (name, value) in self.items(py)? {
                    dict.set_item(name, value)?;
                }
                Ok(dict)
            }

            fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
                let fields = self
                    .items(py)?
                    .into_iter()
                    .map(|(name, value)| Ok(format!("{name}={}", value.repr()?)))
                    .collect::<PyResult<Vec<_>>>()?;
                Ok(format!("SearchOptions({})", fields.join(", ")))
            }

            fn __hash__(&self, py: Python<'_>) -> PyResult<isize> {
                let values = self.items(py)?.into_iter().map(|(_, value)| value);
                PyTuple::new(py, values)?.hash()
            }

            /// Pickling and copying rebuild the options from their keywords.
            fn __getnewargs_ex__<'py>(
                &self,
                py: Python<'py>,
            ) -> PyResult<(Bound<'py, PyTuple>, Bound<'py, PyDict>)> {
                Ok((PyTuple::empty(py), self.to_dict(py)?))
            }
        }
    };
}

// --- the permutation search: its options and its result -------------------------------

/// Most `threads`: more than any machine this runs on, few enough to catch a typo.
const MAX_THREADS: i128 = 1024;
/// Most `chains`: every chain holds a copy of the search state.
const MAX_CHAINS: i128 = 1024;
/// Longest `time_budget`, in seconds (about 30 years; far longer overflows a deadline).
const MAX_SECONDS: f64 = 1e9;

search_options! {
    /// Settings of `search_permutation`. Frozen; every keyword is optional and
    /// `SearchOptions()` gives the defaults the benchmarks report. The result is identical
    /// for equal options on any number of threads, unless `time_budget` stops the search.
    core {
        /// Seed of every random choice (block draws, slot orders, tabu chains).
        seed: u64, ..;
        /// Wall-clock cap on the whole search in seconds, or None for no cap. With a cap
        /// the result depends on the machine's speed.
        time_budget: Option<Duration>, (Excluded(0.0), Included(MAX_SECONDS));
        /// A slot-LSA step makes progress when it gains more than this fraction of the gap
        /// `upper_bound - identity` (a fraction in [0, 1]).
        tolerance: f64, 0.0..=1.0;
        /// Steps in a row without progress (see `tolerance`) that end a descent.
        patience: usize, 1..;
        /// Cap on slot-LSA steps in the block phase (0 skips it).
        max_steps: usize, 0..;
        /// Groups (of m columns) per assignment in the block phase, or None to size the
        /// blocks from the matrix: all groups when one assignment over all is cheap, else
        /// as few as keep a step cheap, at least 64.
        block_groups: Option<usize>, 2..;
        /// Cap on slot-LSA steps over all groups at once, after the block phase; fewer on
        /// large matrices, where one step would take minutes.
        global_steps: usize, 0..;
        /// Tabu steps per chain, or None to size them from the matrix (none on large
        /// matrices, where slot-LSA is the better use of time). 0 skips tabu search.
        tabu_steps: Option<usize>, 0..;
        /// Steps a column may not return to a group it left (randomised around this), or
        /// None for half the number of groups, clamped to 4..=16.
        tabu_tenure: Option<usize>, 1..;
        /// Independent tabu chains, each with its own seed (at most 1024).
        chains: usize, 1..=MAX_CHAINS;
    }
    binding {
        /// Worker threads, or None for one per core (at most 1024). The result does not
        /// depend on it.
        threads: Option<usize> = None, 1..=MAX_THREADS;
    }
}

/// A column permutation for N:M sparsity and how good it is. Scores are sums of the
/// scores an N:M mask keeps, over all rows of all matrices searched together.
#[pyclass(frozen, module = "ria._core")]
pub(crate) struct PermutationResult {
    /// The new column order (int64): position p holds original column perm[p], so
    /// `scores[:, perm]` is the permuted matrix.
    #[pyo3(get)]
    perm: Py<PyArray1<i64>>,
    /// Score kept by the N:M mask after the permutation.
    #[pyo3(get)]
    retained: f64,
    /// Score kept by the N:M mask in the original column order.
    #[pyo3(get)]
    identity: f64,
    /// Score kept when every row keeps its best n/m of the columns (unstructured); no
    /// permutation can beat it.
    #[pyo3(get)]
    upper_bound: f64,
    /// Share of the gap between `identity` and `upper_bound` that the permutation
    /// closes, `(retained - identity) / (upper_bound - identity)` (NVIDIA apex's
    /// measure); 1.0 when there is no gap.
    #[pyo3(get)]
    efficacy: f64,
    /// Score kept after RIA's heuristic allocation alone, before any search.
    #[pyo3(get)]
    heuristic_retained: f64,
    /// Slot-LSA (linear assignment) steps made.
    #[pyo3(get)]
    lsa_steps: usize,
    /// Tabu steps made, over all chains.
    #[pyo3(get)]
    tabu_steps: usize,
    /// True when `perm` is a proven optimum (small problems are solved exhaustively).
    #[pyo3(get)]
    exact: bool,
    /// Wall-clock seconds the call took.
    #[pyo3(get)]
    seconds: f64,
}

/// `x` formatted like Python's `format(x, spec)`.
fn py_format(py: Python<'_>, x: f64, spec: &str) -> PyResult<String> {
    PyFloat::new(py, x)
        .call_method1("__format__", (spec,))?
        .extract()
}

#[pymethods]
impl PermutationResult {
    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "PermutationResult(efficacy={}%, retained={}, identity={}, upper_bound={}, \
             columns={}, {}s)",
            py_format(py, 100.0 * self.efficacy, ".2f")?,
            py_format(py, self.retained, ".6g")?,
            py_format(py, self.identity, ".6g")?,
            py_format(py, self.upper_bound, ".6g")?,
            self.perm.bind(py).len(),
            py_format(py, self.seconds, ".2f")?,
        ))
    }

    fn __str__(&self, py: Python<'_>) -> PyResult<String> {
        self.__repr__(py)
    }
}

/// The options argument of the searches: a `SearchOptions`, or None for the defaults.
fn search_options(options: Option<&Bound<'_, PyAny>>) -> PyResult<SearchOptions> {
    match options {
        None => Ok(SearchOptions::default()),
        Some(o) => Ok(o
            .cast::<SearchOptions>()
            .map_err(|_| {
                let ty = type_name(o);
                InvalidTypeError::new_err(format!(
                    "options must be a SearchOptions or None, got {ty}"
                ))
            })?
            .get()
            .clone()),
    }
}

impl PermutationResult {
    fn new(py: Python<'_>, outcome: &permute::Outcome, seconds: f64) -> Self {
        let perm: Vec<i64> = outcome.perm.iter().map(|&p| i64::from(p)).collect();
        Self {
            perm: PyArray1::from_vec(py, perm).unbind(),
            retained: outcome.retained,
            identity: outcome.identity,
            upper_bound: outcome.upper_bound,
            efficacy: outcome.efficacy(),
            heuristic_retained: outcome.heuristic,
            lsa_steps: outcome.lsa_steps,
            tabu_steps: outcome.tabu_steps,
            exact: outcome.exact,
            seconds,
        }
    }
}

/// The best column order for an N:M mask on `scores` (see `ria.core.search_permutation`).
#[pyfunction]
#[pyo3(signature = (scores, n, m, options=None))]
fn search_permutation(
    py: Python<'_>,
    scores: Vec<PyReadonlyArray2<'_, f32>>,
    n: &Bound<'_, PyAny>,
    m: &Bound<'_, PyAny>,
    options: Option<&Bound<'_, PyAny>>,
) -> PyResult<PermutationResult> {
    let started = Instant::now();
    let (n, m) = pattern(n, m)?;
    let options = search_options(options)?;
    let pool = pool(py, options.threads)?;
    let mats = score_refs(&scores, scores_name(scores.len()))?;
    let outcome = run_interruptible(py, &pool, |stop| {
        let problem = Problem::new(&mats, n, m)?;
        permute::search_with(&problem, &options.core, stop)
    })?;
    Ok(PermutationResult::new(
        py,
        &outcome,
        started.elapsed().as_secs_f64(),
    ))
}

/// Independent searches at once, one result per problem (see
/// `ria.core.search_permutations`).
#[pyfunction]
#[pyo3(signature = (problems, n, m, options=None))]
fn search_permutations(
    py: Python<'_>,
    problems: Vec<Vec<PyReadonlyArray2<'_, f32>>>,
    n: &Bound<'_, PyAny>,
    m: &Bound<'_, PyAny>,
    options: Option<&Bound<'_, PyAny>>,
) -> PyResult<Vec<PermutationResult>> {
    let (n, m) = pattern(n, m)?;
    let options = search_options(options)?;
    let pool = pool(py, options.threads)?;
    let mats = problems
        .iter()
        .enumerate()
        .map(|(k, scores)| score_refs(scores, |i| format!("problems[{k}][{i}]")))
        .collect::<PyResult<Vec<_>>>()?;
    let found = run_interruptible(py, &pool, |stop| {
        permute::search_all(&mats, n, m, &options.core, stop)
    })?;
    Ok(found
        .iter()
        .map(|(outcome, took)| PermutationResult::new(py, outcome, took.as_secs_f64()))
        .collect())
}

// --- mask refinement --------------------------------------------------------------------

/// What `refine_mask` did. Errors are output errors summed over rows, `d^T G d` with `d`
/// a row's pruned weights, in the units of `gram` times the weights squared.
#[pyclass(frozen, module = "ria._core")]
pub(crate) struct RefineStats {
    /// Output error of the given mask.
    #[pyo3(get)]
    error_before: f64,
    /// Output error of the refined mask; never above `error_before`.
    #[pyo3(get)]
    error_after: f64,
    /// Swaps made (a kept and a pruned weight exchanged), over all rows.
    #[pyo3(get)]
    swaps: usize,
    /// Most sweeps any row ran (the last sweep of a converged row finds nothing).
    #[pyo3(get)]
    sweeps: usize,
    /// True when every row stopped at a swap-local optimum, none at `max_sweeps`.
    #[pyo3(get)]
    converged: bool,
    /// Wall-clock seconds the call took.
    #[pyo3(get)]
    seconds: f64,
}

#[pymethods]
impl RefineStats {
    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let change = if self.error_before > 0.0 {
            self.error_after / self.error_before - 1.0
        } else {
            0.0
        };
        Ok(format!(
            "RefineStats(error {} -> {} ({}%), swaps={}, sweeps={}, converged={}, {}s)",
            py_format(py, self.error_before, ".6g")?,
            py_format(py, self.error_after, ".6g")?,
            py_format(py, 100.0 * change, "+.2f")?,
            self.swaps,
            self.sweeps,
            if self.converged { "True" } else { "False" },
            py_format(py, self.seconds, ".2f")?,
        ))
    }

    fn __str__(&self, py: Python<'_>) -> PyResult<String> {
        self.__repr__(py)
    }
}

/// Refinement of a mask for one weight, generic over the weight's element type.
struct Refine<'a> {
    gram: MatRef<'a, f32>,
    residual: MatRef<'a, f32>,
    keep: &'a mut [bool],
    sparsity: Sparsity,
    max_sweeps: usize,
    stop: permute::Stop<'a>,
}

impl WeightFn<refine::Stats> for Refine<'_> {
    fn call<T: Element>(self, w: MatRef<T>) -> crate::Result<refine::Stats> {
        refine::refine(
            w,
            self.gram,
            self.residual,
            self.keep,
            self.sparsity,
            self.max_sweeps,
            self.stop,
        )
    }
}

/// The refined keep-mask and what refinement did (see `ria.core.refine_mask`).
#[pyfunction]
#[allow(
    clippy::too_many_arguments,
    reason = "the arguments of ria.core.refine_mask"
)]
fn refine_mask<'py>(
    py: Python<'py>,
    weight: &Bound<'py, PyAny>,
    weight_format: &str,
    gram: PyReadonlyArray2<'py, f32>,
    residual: PyReadonlyArray2<'py, f32>,
    keep: PyReadonlyArray2<'py, bool>,
    n: &Bound<'py, PyAny>,
    m: &Bound<'py, PyAny>,
    max_sweeps: &Bound<'py, PyAny>,
) -> PyResult<(Bound<'py, PyArray2<bool>>, RefineStats)> {
    let started = Instant::now();
    let (n, m) = pattern(n, m)?;
    let sparsity = match (n, m) {
        (0, 0) => Sparsity::Unstructured,
        (n, m) => Sparsity::NM { n, m },
    };
    let max_sweeps = int_arg("max_sweeps", max_sweeps, 0..)?;
    let weight = Weight::extract(weight, weight_format)?;
    let (rows, cols) = weight.shape();
    if keep.shape() != [rows, cols] {
        return Err(InvalidArgumentError::new_err(format!(
            "keep has shape {:?}, expected the weight's ({rows}, {cols})",
            keep.shape()
        )));
    }
    let w = weight.typed()?;
    let gram = scores_ref(&gram, "gram")?;
    let residual = scores_ref(&residual, "residual")?;
    let mut refined = slice(&keep, "keep")?.to_vec();
    let outcome = run_interruptible(py, &*pool(py, None)?, |stop| {
        w.apply(Refine {
            gram,
            residual,
            keep: &mut refined,
            sparsity,
            max_sweeps,
            stop,
        })
    })?;
    let stats = RefineStats {
        error_before: outcome.error_before,
        error_after: outcome.error_after,
        swaps: outcome.swaps,
        sweeps: outcome.sweeps,
        converged: outcome.converged,
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok((into_matrix(py, refined, rows, cols), stats))
}

/// Panics on a pool worker thread on purpose (tests only: a panic must reach Python as
/// the `RuntimeError` of [`bug`], through [`run`] or, with `interruptible`, through
/// [`run_interruptible`]).
#[pyfunction]
fn _panic_for_tests(py: Python<'_>, interruptible: bool) -> PyResult<()> {
    use rayon::prelude::*;
    let work = || -> crate::Result<()> {
        (0..64).into_par_iter().for_each(|i| {
            if i == 63 {
                panic!("deliberate panic for tests");
            }
        });
        Ok(())
    };
    if interruptible {
        run_interruptible(py, &*pool(py, None)?, |_| work())
    } else {
        run(py, work)
    }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(ria_score, m)?)?;
    m.add_function(wrap_pyfunction!(wanda_score, m)?)?;
    m.add_function(wrap_pyfunction!(magnitude_score, m)?)?;
    m.add_function(wrap_pyfunction!(nm_mask, m)?)?;
    m.add_function(wrap_pyfunction!(unstructured_mask, m)?)?;
    m.add_function(wrap_pyfunction!(kept_score, m)?)?;
    m.add_function(wrap_pyfunction!(permute_in_place, m)?)?;
    m.add_function(wrap_pyfunction!(retained_score, m)?)?;
    m.add_function(wrap_pyfunction!(search_permutation, m)?)?;
    m.add_function(wrap_pyfunction!(search_permutations, m)?)?;
    m.add_function(wrap_pyfunction!(refine_mask, m)?)?;
    m.add_function(wrap_pyfunction!(_panic_for_tests, m)?)?;
    m.add_class::<SearchOptions>()?;
    m.add_class::<PermutationResult>()?;
    m.add_class::<RefineStats>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
