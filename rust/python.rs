//! The `ria._core` extension: argument checks, dtype dispatch and GIL release around
//! the core. Arrays arrive C-contiguous (the Python layer makes them so); 16-bit
//! weights arrive as raw `uint16` words with their format named, so nothing is upcast
//! on the Python side.

use crate::error::InputError;
use crate::matrix::{Element, MatRef};
use crate::permute::{self, Options, Problem};
use crate::{mask, score};
use half::slice::HalfBitsSliceExt;
use half::{bf16, f16};
use numpy::ndarray::Array2;
use numpy::{
    IntoPyArray, PyArray1, PyArray2, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::time::{Duration, Instant};

impl From<InputError> for PyErr {
    fn from(e: InputError) -> Self {
        PyValueError::new_err(e.0)
    }
}

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
                return Err(PyValueError::new_err(format!(
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

    /// Runs `f` on the weight as a typed matrix, without the GIL.
    fn with<R: Send>(&self, py: Python<'_>, f: impl ScoreFn<R>) -> PyResult<R> {
        let (rows, cols) = self.shape();
        match self {
            Weight::F32(a) => {
                let data = slice(a)?;
                py.detach(|| f.call(MatRef::new(data, rows, cols, "weight")?))
            }
            Weight::Bits16(a, half) => {
                let bits = slice(a)?;
                match half {
                    Half::F16 => {
                        let data: &[f16] = bits.reinterpret_cast();
                        py.detach(|| f.call(MatRef::new(data, rows, cols, "weight")?))
                    }
                    Half::Bf16 => {
                        let data: &[bf16] = bits.reinterpret_cast();
                        py.detach(|| f.call(MatRef::new(data, rows, cols, "weight")?))
                    }
                }
            }
        }
        .map_err(PyErr::from)
    }
}

/// A computation generic over the weight's element type.
trait ScoreFn<R>: Send + Sync {
    fn call<T: Element>(&self, w: MatRef<T>) -> crate::Result<R>;
}

struct Ria<'a> {
    act_norm: Option<&'a [f32]>,
    alpha: f32,
}
impl ScoreFn<Vec<f32>> for Ria<'_> {
    fn call<T: Element>(&self, w: MatRef<T>) -> crate::Result<Vec<f32>> {
        score::ria(w, self.act_norm, self.alpha)
    }
}

struct Wanda<'a>(&'a [f32]);
impl ScoreFn<Vec<f32>> for Wanda<'_> {
    fn call<T: Element>(&self, w: MatRef<T>) -> crate::Result<Vec<f32>> {
        score::wanda(w, self.0)
    }
}

struct Magnitude;
impl ScoreFn<Vec<f32>> for Magnitude {
    fn call<T: Element>(&self, w: MatRef<T>) -> crate::Result<Vec<f32>> {
        score::magnitude(w)
    }
}

fn slice<'a, T: numpy::Element, D: numpy::ndarray::Dimension>(
    a: &'a numpy::PyReadonlyArray<'_, T, D>,
) -> PyResult<&'a [T]> {
    a.as_slice()
        .map_err(|_| PyValueError::new_err("array must be C-contiguous"))
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
    alpha: f32,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let weight = Weight::extract(weight, weight_format)?;
    let act = act_norm.as_ref().map(slice).transpose()?;
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
    let out = weight.with(py, Wanda(slice(&act_norm)?))?;
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

fn scores_ref<'a>(a: &'a PyReadonlyArray2<'_, f32>, name: &str) -> PyResult<MatRef<'a, f32>> {
    let s = a.shape();
    Ok(MatRef::new(slice(a)?, s[0], s[1], name)?)
}

#[pyfunction]
fn nm_mask<'py>(
    py: Python<'py>,
    scores: PyReadonlyArray2<'py, f32>,
    n: usize,
    m: usize,
) -> PyResult<Bound<'py, PyArray2<bool>>> {
    let s = scores_ref(&scores, "scores")?;
    let out = py.detach(|| mask::nm_mask(s, n, m))?;
    Ok(into_matrix(py, out, s.rows(), s.cols()))
}

#[pyfunction]
fn unstructured_mask<'py>(
    py: Python<'py>,
    scores: PyReadonlyArray2<'py, f32>,
    prune: usize,
    per_row: bool,
) -> PyResult<Bound<'py, PyArray2<bool>>> {
    let s = scores_ref(&scores, "scores")?;
    let out = py.detach(|| mask::unstructured_mask(s, prune, per_row))?;
    Ok(into_matrix(py, out, s.rows(), s.cols()))
}

fn score_refs<'a>(scores: &'a [PyReadonlyArray2<'_, f32>]) -> PyResult<Vec<MatRef<'a, f32>>> {
    let single = scores.len() == 1;
    scores
        .iter()
        .enumerate()
        .map(|(i, a)| {
            scores_ref(
                a,
                &if single {
                    "scores".to_string()
                } else {
                    format!("scores[{i}]")
                },
            )
        })
        .collect()
}

/// Checks that `perm` is a permutation of `0..cols` and converts it.
fn permutation(perm: &[i64], cols: usize) -> PyResult<Vec<u32>> {
    if perm.len() != cols {
        return Err(PyValueError::new_err(format!(
            "perm has {} entries, expected {cols}",
            perm.len()
        )));
    }
    let mut seen = vec![false; cols];
    perm.iter()
        .map(|&p| {
            if p < 0 || p as usize >= cols || std::mem::replace(&mut seen[p as usize], true) {
                Err(PyValueError::new_err(format!(
                    "perm is not a permutation of 0..{cols}: {p} is out of range or repeated"
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
    n: usize,
    m: usize,
    perm: Option<PyReadonlyArray1<'_, i64>>,
) -> PyResult<f64> {
    let mats = score_refs(&scores)?;
    let problem = py.detach(|| Problem::new(&mats, n, m))?;
    let perm = match perm {
        Some(p) => permutation(slice(&p)?, problem.cols())?,
        None => (0..problem.cols() as u32).collect(),
    };
    Ok(py.detach(|| problem.retained(&perm)))
}

#[pyfunction]
#[pyo3(signature = (scores, n, m, *, seed=0, time_budget=None, threads=None, patience=None, max_steps=None, block_groups=None, global_steps=None, tabu_steps=None, chains=None))]
#[allow(clippy::too_many_arguments)]
fn search_permutation<'py>(
    py: Python<'py>,
    scores: Vec<PyReadonlyArray2<'py, f32>>,
    n: usize,
    m: usize,
    seed: u64,
    time_budget: Option<f64>,
    threads: Option<usize>,
    patience: Option<usize>,
    max_steps: Option<usize>,
    block_groups: Option<usize>,
    global_steps: Option<usize>,
    tabu_steps: Option<usize>,
    chains: Option<usize>,
) -> PyResult<Bound<'py, PyDict>> {
    let started = Instant::now();
    let mut options = Options {
        seed,
        ..Options::default()
    };
    if let Some(b) = time_budget {
        if !(b.is_finite() && b > 0.0) {
            return Err(PyValueError::new_err(format!(
                "time_budget must be a positive number of seconds, got {b}"
            )));
        }
        options.time_budget = Some(Duration::from_secs_f64(b));
    }
    options.patience = patience.unwrap_or(options.patience);
    options.max_steps = max_steps.unwrap_or(options.max_steps);
    options.block_groups = block_groups.or(options.block_groups);
    options.global_steps = global_steps.unwrap_or(options.global_steps);
    options.tabu_steps = tabu_steps.or(options.tabu_steps);
    options.chains = chains.unwrap_or(options.chains);
    if threads == Some(0) {
        return Err(PyValueError::new_err("threads must be >= 1"));
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.unwrap_or(0))
        .build()
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    let mats = score_refs(&scores)?;
    let outcome = py.detach(|| {
        pool.install(|| {
            Problem::new(&mats, n, m).map(|problem| permute::search(&problem, &options))
        })
    })?;
    let result = PyDict::new(py);
    let perm: Vec<i64> = outcome.perm.iter().map(|&p| i64::from(p)).collect();
    result.set_item("perm", PyArray1::from_vec(py, perm))?;
    result.set_item("retained", outcome.retained)?;
    result.set_item("identity_retained", outcome.identity)?;
    result.set_item("heuristic_retained", outcome.heuristic)?;
    result.set_item("upper_bound", outcome.upper_bound)?;
    result.set_item("efficacy", outcome.efficacy())?;
    result.set_item("lsa_steps", outcome.lsa_steps)?;
    result.set_item("tabu_steps", outcome.tabu_steps)?;
    result.set_item("exact", outcome.exact)?;
    result.set_item("seconds", started.elapsed().as_secs_f64())?;
    Ok(result)
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(ria_score, m)?)?;
    m.add_function(wrap_pyfunction!(wanda_score, m)?)?;
    m.add_function(wrap_pyfunction!(magnitude_score, m)?)?;
    m.add_function(wrap_pyfunction!(nm_mask, m)?)?;
    m.add_function(wrap_pyfunction!(unstructured_mask, m)?)?;
    m.add_function(wrap_pyfunction!(retained_score, m)?)?;
    m.add_function(wrap_pyfunction!(search_permutation, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
