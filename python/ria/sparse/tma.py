"""Tensor maps for Hopper's bulk-copy engine (TMA), encoded on the host through the driver.

A tensor map (`CUtensorMap`, 128 opaque bytes) describes a 2-D global tensor and the box one
`cp.async.bulk.tensor.2d` copies into shared memory; kernels take it by value
(`__grid_constant__`). `encode_2d` checks the rules the driver states for the maps the
warpgroup kernel uses (`wgmma_sp.cu`) before it asks `cuTensorMapEncodeTiled` (from the
driver library torch loads), so bad input fails with our error rather than the driver's code.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

from ..errors import InvalidArgumentError

__all__ = ["MAP_BYTES", "SWIZZLE_128B", "TensorMap", "check_2d", "encode_2d"]

MAP_BYTES = 128
TensorMap = ctypes.c_ubyte * MAP_BYTES  # the kernel parameter, by value

# CUtensorMap enums (cuda.h): element type UINT16 (the copy moves bits; bf16 and fp16 alike),
# no interleave, the 128-byte swizzle, L2 promotion, out-of-bounds elements filled with zeros.
_UINT16 = 1
SWIZZLE_128B = 3
_SWIZZLE_BYTES = {0: 0, 1: 32, 2: 64, 3: 128}
_L2_PROMOTION = {0: 0, 64: 1, 128: 2, 256: 3}


def check_2d(
    address: int, cols: int, rows: int, row_stride: int, box: tuple[int, int], swizzle: int
) -> None:
    """Raises `InvalidArgumentError` unless a 2-D map of 2-byte elements with these fields
    is one the driver accepts: 16-byte aligned address and row stride (bytes), box sides
    1..256 elements, a swizzled box's row at most the swizzle's width."""
    box_cols, box_rows = box
    if address % 16 or row_stride % 16:
        raise InvalidArgumentError(
            f"a tensor map needs a 16-byte aligned address and row stride, got {address:#x}, "
            f"{row_stride} bytes"
        )
    if cols < 1 or rows < 1 or row_stride < 2 * cols:
        raise InvalidArgumentError(f"bad tensor extent {rows}x{cols}, row stride {row_stride} B")
    if not (1 <= box_cols <= 256 and 1 <= box_rows <= 256) or (2 * box_cols) % 16:
        raise InvalidArgumentError(f"box sides are 1..256 elements of 16-byte rows, got {box}")
    if swizzle not in _SWIZZLE_BYTES:
        raise InvalidArgumentError(f"unknown swizzle mode {swizzle}")
    if swizzle and 2 * box_cols > _SWIZZLE_BYTES[swizzle]:
        raise InvalidArgumentError(
            f"a box row of {2 * box_cols} bytes exceeds the {_SWIZZLE_BYTES[swizzle]}-byte swizzle"
        )


@functools.cache
def _encode_fn() -> Any:
    """`cuTensorMapEncodeTiled` from the driver library torch uses, with its C signature."""
    from torch.cuda import _utils

    lib = _utils._get_gpu_runtime_library()
    p, u32 = ctypes.c_void_p, ctypes.c_uint32
    proto = ctypes.CFUNCTYPE(ctypes.c_int, p, ctypes.c_int, u32, p, p, p, p, p, ctypes.c_int,
                             ctypes.c_int, ctypes.c_int, ctypes.c_int)  # fmt: skip
    return proto(("cuTensorMapEncodeTiled", lib))


def encode_2d(
    address: int,
    cols: int,
    rows: int,
    row_stride: int,
    box: tuple[int, int],
    *,
    swizzle: int = SWIZZLE_128B,
    l2_promotion: int = 128,
    out: ctypes.Array[ctypes.c_ubyte] | None = None,
) -> ctypes.Array[ctypes.c_ubyte]:
    """The tensor map of a row-major `(rows, cols)` tensor of 2-byte elements at device
    `address` (`row_stride` bytes between rows) copied in boxes of `box = (box_cols,
    box_rows)` elements; written into `out` when given (a prepared launch's parameter).
    Elements outside the tensor read as zeros."""
    check_2d(address, cols, rows, row_stride, box, swizzle)
    result = out if out is not None else TensorMap()
    dims = (ctypes.c_uint64 * 2)(cols, rows)
    strides = (ctypes.c_uint64 * 1)(row_stride)
    boxes = (ctypes.c_uint32 * 2)(*box)
    ones = (ctypes.c_uint32 * 2)(1, 1)
    err = _encode_fn()(
        ctypes.addressof(result), _UINT16, 2, address, ctypes.addressof(dims),
        ctypes.addressof(strides), ctypes.addressof(boxes), ctypes.addressof(ones), 0, swizzle,
        _L2_PROMOTION[l2_promotion], 0,
    )  # fmt: skip
    if err:
        from torch.cuda import _utils

        _utils._check_cuda(err)  # raises RuntimeError with the driver's message
    return result
