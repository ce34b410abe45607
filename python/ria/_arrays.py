"""Turning user inputs (numpy arrays, torch tensors) into what the Rust core reads.

The core reads C-contiguous, aligned arrays in native byte order; 16-bit floats travel as
their raw bits (`uint16`) with the format named, so a bf16 weight is never upcast or copied
on the Python side.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InvalidArgumentError, InvalidTypeError

try:  # torch is a dependency, but the core API must not need it.
    import torch
except ImportError:  # pragma: no cover
    torch = None  # type: ignore[assignment]

ArrayLike = Any  # np.ndarray | torch.Tensor

_TORCH_FORMATS = {"torch.float32": "f32", "torch.float16": "f16", "torch.bfloat16": "bf16"}


def is_tensor(x: object) -> bool:
    """Whether `x` is a torch tensor (False when torch is not installed)."""
    return torch is not None and isinstance(x, torch.Tensor)


def _asarray(x: ArrayLike, name: str) -> np.ndarray:
    """`np.asarray(x)`, with numpy's refusals (ragged nested lists) as InvalidArgumentError."""
    try:
        return np.asarray(x)
    except (ValueError, TypeError) as e:
        raise InvalidArgumentError(f"{name} is not an array: {e}") from None


def c_array(array: np.ndarray, dtype: Any = None) -> np.ndarray:
    """`array` (as `dtype`) C-contiguous and aligned: `np.ascontiguousarray` leaves a
    misaligned array (one at an odd offset in a buffer) misaligned, and the core refuses it."""
    return np.require(array, dtype, ["C", "A"])


def _native(array: np.ndarray) -> np.ndarray:
    """`array` in native byte order: 16-bit weights travel as their raw bits, which must
    be the value's, and a big-endian float32 is not `np.float32`."""
    if array.dtype.isnative:
        return array
    return array.astype(array.dtype.newbyteorder("="))


def _float32(array: np.ndarray) -> np.ndarray:
    """C-contiguous float32; values beyond float32's range become inf without a warning
    (the core then refuses them, naming their position)."""
    with np.errstate(over="ignore"):
        return c_array(array, np.float32)


def _check_2d(shape: tuple[int, ...], name: str) -> None:
    if len(shape) != 2:
        raise InvalidArgumentError(f"{name} must be 2-D (rows x columns), got shape {tuple(shape)}")


def weight_array(weight: ArrayLike, name: str = "weight") -> tuple[np.ndarray, str]:
    """A 2-D weight as (C-contiguous array, format) with format in f32 / f16 / bf16.

    f16 and bf16 come back as `uint16` views of the same bits. float64 is converted to
    float32 (scores are computed in f32 anyway).
    """
    if is_tensor(weight):
        _check_2d(tuple(weight.shape), name)
        t = weight.detach()
        fmt = _TORCH_FORMATS.get(str(t.dtype))
        if fmt is None and t.dtype == torch.float64:
            t, fmt = t.float(), "f32"  # torch casts out-of-range values to inf silently
        if fmt is None:
            raise InvalidTypeError(
                f"{name} has unsupported dtype {t.dtype}; use float32, float16 or bfloat16"
            )
        t = t.cpu().contiguous()
        if fmt == "f32":
            return t.numpy(), fmt
        return t.view(torch.int16).numpy().view(np.uint16), fmt
    array = _native(_asarray(weight, name))
    _check_2d(array.shape, name)
    if array.dtype == np.float32:
        return c_array(array), "f32"
    if array.dtype == np.float64:
        return _float32(array), "f32"
    if array.dtype == np.float16:
        return c_array(array).view(np.uint16), "f16"
    if array.dtype.name == "bfloat16":  # ml_dtypes' bfloat16
        return c_array(array).view(np.uint16), "bf16"
    raise InvalidTypeError(
        f"{name} has unsupported dtype {array.dtype}; use float32, float16 or bfloat16"
    )


def float32_array(x: ArrayLike, name: str, ndim: int) -> np.ndarray:
    """A C-contiguous float32 array of `ndim` dimensions (other float types converted)."""
    if is_tensor(x):
        if not x.is_floating_point():
            raise InvalidTypeError(f"{name} must be floating point, got {x.dtype}")
        array = x.detach().float().cpu().numpy()
    else:
        array = _asarray(x, name)
        if array.dtype.kind != "f" and array.dtype.name != "bfloat16":
            raise InvalidTypeError(f"{name} must be floating point, got {array.dtype}")
    if array.ndim != ndim:
        raise InvalidArgumentError(f"{name} must be {ndim}-D, got shape {tuple(array.shape)}")
    return _float32(array)


def score_list(scores: ArrayLike | list[ArrayLike] | tuple[ArrayLike, ...]) -> list[np.ndarray]:
    """One score matrix or a list of them (layers sharing an input) as float32 arrays."""
    if isinstance(scores, (list, tuple)):
        if not scores:
            raise InvalidArgumentError("scores is an empty list")
        return [float32_array(s, f"scores[{i}]", 2) for i, s in enumerate(scores)]
    return [float32_array(scores, "scores", 2)]


def bool_array(x: ArrayLike, name: str, shape: tuple[int, ...], like: str) -> np.ndarray:
    """A C-contiguous bool array of exactly `shape`, that of the argument `like` names
    ("the weight's") in errors (a mask: no other dtype is converted)."""
    array = x.detach().cpu().numpy() if is_tensor(x) else _asarray(x, name)
    if array.dtype != np.bool_:
        raise InvalidTypeError(f"{name} must be a bool array, got {array.dtype}")
    if array.shape != tuple(shape):
        raise InvalidArgumentError(
            f"{name} has shape {tuple(array.shape)}, expected {like} {tuple(shape)}"
        )
    return c_array(array)
