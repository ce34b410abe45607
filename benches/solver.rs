//! Criterion benchmarks of the core (`cargo bench`). Matrices are "LLM-like" importance
//! scores: |N(0,1)| times a log-normal(sigma=1) column scale and a log-normal(sigma=0.3)
//! row scale (heavy-tailed input channels, as in real activations).
//!
//! - `search/*`: the whole permutation search (default options) on LLaMA-7B shapes;
//!   `benches/permutation.py` runs it against the reference and reports efficacy.
//! - `lap/*`: the assignment solver on real slot-LSA value matrices of those shapes
//!   (G = 1024 and 2752 groups), next to the `lapjv` crate (Jonker-Volgenant) on the
//!   same matrices.
//! - `mask/*`, `score/*`: the N:M and unstructured selection and the RIA score.
//! - `refine/*`: mask refinement of a 4096x4096 weight against `G = X^T X` of 1024
//!   heavy-tailed calibration tokens, from its Wanda 2:4 / 50%-per-row mask, 16 sweeps at
//!   most; the residual GEMM (done by torch in the package) is set up outside the timing.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use half::bf16;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, LogNormal, StandardNormal};
use rand_pcg::Pcg64Mcg;
use rayon::prelude::*;
use ria::matrix::MatRef;
use ria::permute::{Options, Problem, heuristic, lsa, search};
use ria::refine::{self, Sparsity};
use ria::{lap, mask, score};
use std::hint::black_box;
use std::time::Duration;

fn llm_like(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut rng = Pcg64Mcg::seed_from_u64(seed);
    let col_scale: Vec<f32> = LogNormal::new(0.0, 1.0)
        .unwrap()
        .sample_iter(&mut rng)
        .take(cols)
        .collect();
    let row_scale: Vec<f32> = LogNormal::new(0.0, 0.3)
        .unwrap()
        .sample_iter(&mut rng)
        .take(rows)
        .collect();
    let mut out = Vec::with_capacity(rows * cols);
    for row in &row_scale {
        for &c in &col_scale {
            let z: f32 = StandardNormal.sample(&mut rng);
            out.push(z.abs() * c * row);
        }
    }
    out
}

const SHAPES: [(usize, usize); 3] = [(4096, 4096), (11008, 4096), (4096, 11008)];

fn bench_search(c: &mut Criterion) {
    let mut group = c.benchmark_group("search");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(30));
    for (rows, cols) in SHAPES {
        let s = llm_like(rows, cols, 0);
        let problem = Problem::new(&[MatRef::new(&s, rows, cols, "s").unwrap()], 2, 4).unwrap();
        let options = Options::default();
        group.bench_function(BenchmarkId::new("2:4", format!("{rows}x{cols}")), |b| {
            b.iter(|| black_box(search(&problem, &options).unwrap()))
        });
    }
    group.finish();
}

fn bench_lap(c: &mut Criterion) {
    let mut group = c.benchmark_group("lap");
    group.sample_size(10);
    for (rows, cols) in [(4096, 4096), (4096, 11008)] {
        let s = llm_like(rows, cols, 1);
        let problem = Problem::new(&[MatRef::new(&s, rows, cols, "s").unwrap()], 2, 4).unwrap();
        let perm = heuristic::snake(&problem);
        let groups = problem.groups();
        let all: Vec<usize> = (0..groups).collect();
        let value = lsa::value_matrix(
            &problem,
            &perm,
            &vec![0; groups],
            &all,
            &mut lsa::Panels::default(),
        );
        group.bench_function(BenchmarkId::new("auction (ours)", groups), |b| {
            b.iter(|| black_box(lap::solve_max(&value, groups)))
        });
        let cost = lapjv::Matrix::from_shape_fn((groups, groups), |(i, j)| {
            -f64::from(value[i * groups + j])
        });
        group.bench_function(BenchmarkId::new("lapjv crate", groups), |b| {
            b.iter(|| black_box(lapjv::lapjv(&cost).unwrap()))
        });
    }
    group.finish();
}

fn bench_masks_and_scores(c: &mut Criterion) {
    let (rows, cols) = (4096, 11008);
    let s = llm_like(rows, cols, 2);
    let scores = MatRef::new(&s, rows, cols, "s").unwrap();
    let mut group = c.benchmark_group("mask");
    group.bench_function("nm 2:4 4096x11008", |b| {
        b.iter(|| black_box(mask::nm_mask(scores, 2, 4).unwrap()))
    });
    group.bench_function("unstructured 50% 4096x11008", |b| {
        b.iter(|| black_box(mask::unstructured_mask(scores, rows * cols / 2, false).unwrap()))
    });
    group.bench_function("unstructured 50% per row 4096x11008", |b| {
        b.iter(|| black_box(mask::unstructured_mask(scores, cols / 2, true).unwrap()))
    });
    group.finish();

    let mut rng = Pcg64Mcg::seed_from_u64(3);
    let w: Vec<bf16> = (0..rows * cols)
        .map(|_| bf16::from_f32(rng.random::<f32>() - 0.5))
        .collect();
    let act: Vec<f32> = (0..cols).map(|_| rng.random::<f32>()).collect();
    let weight = MatRef::new(&w, rows, cols, "w").unwrap();
    let mut group = c.benchmark_group("score");
    group.bench_function("ria bf16 4096x11008", |b| {
        b.iter(|| black_box(score::ria(weight, Some(&act), 0.5).unwrap()))
    });
    group.finish();
}

/// `G = X^T X` (`cols x cols`) of `x` (`tokens x cols`, row-major), rows in parallel.
fn gram(x: &[f32], tokens: usize, cols: usize) -> Vec<f32> {
    let mut g = vec![0.0f32; cols * cols];
    g.par_chunks_mut(cols).enumerate().for_each(|(i, row)| {
        for t in 0..tokens {
            let xi = x[t * cols + i];
            for (o, &v) in row.iter_mut().zip(&x[t * cols..(t + 1) * cols]) {
                *o += xi * v;
            }
        }
    });
    g
}

/// `R = (W * !keep) G`, rows in parallel.
fn residual(w: &[f32], keep: &[bool], g: &[f32], cols: usize) -> Vec<f32> {
    let mut r = vec![0.0f32; w.len()];
    r.par_chunks_mut(cols).enumerate().for_each(|(row, out)| {
        for k in (0..cols).filter(|&k| !keep[row * cols + k]) {
            let wk = w[row * cols + k];
            for (o, &v) in out.iter_mut().zip(&g[k * cols..(k + 1) * cols]) {
                *o += wk * v;
            }
        }
    });
    r
}

fn bench_refine(c: &mut Criterion) {
    let (rows, cols, tokens) = (4096, 4096, 1024);
    let mut rng = Pcg64Mcg::seed_from_u64(4);
    // Heavy-tailed channels (log-normal scale), as in LLM activations.
    let scale: Vec<f32> = LogNormal::new(0.0, 1.0)
        .unwrap()
        .sample_iter(&mut rng)
        .take(cols)
        .collect();
    let x: Vec<f32> = (0..tokens * cols)
        .map(|k| {
            let z: f32 = StandardNormal.sample(&mut rng);
            z * scale[k % cols]
        })
        .collect();
    let g = gram(&x, tokens, cols);
    let w: Vec<f32> = (0..rows * cols)
        .map(|_| {
            let z: f32 = StandardNormal.sample(&mut rng);
            0.02 * z
        })
        .collect();
    let act: Vec<f32> = (0..cols).map(|k| g[k * cols + k].sqrt()).collect();
    let weight = MatRef::new(&w, rows, cols, "weight").unwrap();
    let scores = score::wanda(weight, &act).unwrap();
    let scores = MatRef::new(&scores, rows, cols, "scores").unwrap();
    let gram = MatRef::new(&g, cols, cols, "gram").unwrap();
    let mut group = c.benchmark_group("refine");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(60));
    for (name, sparsity, keep) in [
        (
            "2:4",
            Sparsity::NM { n: 2, m: 4 },
            mask::nm_mask(scores, 2, 4).unwrap(),
        ),
        (
            "unstructured 50% per row",
            Sparsity::Unstructured,
            mask::unstructured_mask(scores, cols / 2, true).unwrap(),
        ),
    ] {
        let r = residual(&w, &keep, &g, cols);
        let r = MatRef::new(&r, rows, cols, "residual").unwrap();
        let run = || {
            let mut refined = keep.clone();
            refine::refine(weight, gram, r, &mut refined, sparsity, 16, &|| false).unwrap()
        };
        // One line per case with what the timing covers (stderr, next to criterion's).
        let stats = run();
        eprintln!(
            "refine {name} {rows}x{cols}: error {:.4e} -> {:.4e} ({:.2}% lower), {} swaps, \
             {} sweeps, converged {}",
            stats.error_before,
            stats.error_after,
            100.0 * (1.0 - stats.error_after / stats.error_before),
            stats.swaps,
            stats.sweeps,
            stats.converged
        );
        group.bench_function(BenchmarkId::new(name, format!("{rows}x{cols}")), |b| {
            b.iter(|| black_box(run()))
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    bench_masks_and_scores,
    bench_refine,
    bench_lap,
    bench_search
);
criterion_main!(benches);
