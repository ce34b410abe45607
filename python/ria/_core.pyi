"""Type stub for the Rust extension `ria._core` (see rust/python.rs)."""

from typing import Any

import numpy as np
import numpy.typing as npt

__version__: str

def ria_score(
    weight: npt.NDArray[np.float32] | npt.NDArray[np.uint16],
    weight_format: str,
    act_norm: npt.NDArray[np.float32] | None,
    alpha: float,
) -> npt.NDArray[np.float32]: ...
def wanda_score(
    weight: npt.NDArray[np.float32] | npt.NDArray[np.uint16],
    weight_format: str,
    act_norm: npt.NDArray[np.float32],
) -> npt.NDArray[np.float32]: ...
def magnitude_score(
    weight: npt.NDArray[np.float32] | npt.NDArray[np.uint16], weight_format: str
) -> npt.NDArray[np.float32]: ...
def nm_mask(scores: npt.NDArray[np.float32], n: int, m: int) -> npt.NDArray[np.bool_]: ...
def unstructured_mask(
    scores: npt.NDArray[np.float32], prune: int, per_row: bool
) -> npt.NDArray[np.bool_]: ...
def retained_score(
    scores: list[npt.NDArray[np.float32]],
    n: int,
    m: int,
    perm: npt.NDArray[np.int64] | None = None,
) -> float: ...
def search_permutation(
    scores: list[npt.NDArray[np.float32]],
    n: int,
    m: int,
    *,
    seed: int = 0,
    time_budget: float | None = None,
    threads: int | None = None,
    patience: int | None = None,
    max_steps: int | None = None,
    block_groups: int | None = None,
    global_steps: int | None = None,
    tabu_steps: int | None = None,
    chains: int | None = None,
) -> dict[str, Any]: ...
