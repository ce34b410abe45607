//! Parallel loops that stay on the calling thread for small inputs.
//!
//! Handing work to the thread pool wakes its workers, which then spin for a while; for
//! a few thousand elements that costs more than it saves, and the spinning workers slow
//! down whatever runs next on the same cores (e.g. torch's own threads, when the OBS
//! update calls `nm_mask` once per group of columns).

use rayon::prelude::*;

/// Elements below which a loop runs sequentially.
pub const PARALLEL_MIN: usize = 1 << 15;

/// Calls `f(row_index, row)` for every row of a row-major `data` with `cols` columns.
pub fn for_each_row_mut<T: Send>(
    data: &mut [T],
    cols: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    if data.len() < PARALLEL_MIN {
        data.chunks_mut(cols)
            .enumerate()
            .for_each(|(r, row)| f(r, row));
    } else {
        data.par_chunks_mut(cols)
            .enumerate()
            .for_each(|(r, row)| f(r, row));
    }
}

/// The first index whose element satisfies `pred`.
pub fn position_first<T: Sync>(
    data: &[T],
    pred: impl Fn(&T) -> bool + Sync + Send,
) -> Option<usize> {
    if data.len() < PARALLEL_MIN {
        return data.iter().position(pred);
    }
    // Whole chunks per task: element-wise `position_first` pays rayon's bookkeeping on
    // every element (10x slower).
    let chunk = data
        .par_chunks(PARALLEL_MIN)
        .position_first(|c| c.iter().any(&pred))?;
    let start = chunk * PARALLEL_MIN;
    data[start..].iter().position(pred).map(|i| start + i)
}
