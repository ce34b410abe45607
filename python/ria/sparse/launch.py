"""Kernel launches with the argument block built once: per call only the addresses that
change (the input's, the output's) are written before `cuLaunchKernel`.

Torch's `_CudaKernel.__call__` converts every argument with ctypes on each call (tens of
microseconds of host time per launch in eager mode); a `PreparedLaunch` keeps one ctypes
value per kernel parameter and the `void*` array pointing at them, so a call costs two
field writes and one foreign call. The driver copies the parameters at launch (and into
the graph node under capture), so rewriting them for the next call is safe.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
from typing import Any, TypeAlias

import torch

from ..errors import InvalidArgumentError

__all__ = ["PreparedLaunch", "kernel_args", "raw_stream"]

# One kernel parameter: a device address (a tensor's data pointer), a 32-bit int, or bytes
# passed by value (a TMA tensor map).
_Param: TypeAlias = "ctypes.c_void_p | ctypes.c_int | ctypes.Array[ctypes.c_ubyte]"


def kernel_args(args: Sequence[object]) -> list[_Param]:
    """ctypes values for kernel arguments: tensors become their data pointers (`void*`),
    Python ints C `int`s (as torch's `_CudaKernel` passes them); ctypes byte arrays (a
    by-value struct such as a tensor map) are passed as they are."""
    out: list[_Param] = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(ctypes.c_void_p(a.data_ptr()))
        elif isinstance(a, int) and not isinstance(a, bool):
            if not -(2**31) <= a < 2**31:
                raise InvalidArgumentError(f"kernel int argument {a} does not fit 32 bits")
            out.append(ctypes.c_int(a))
        elif isinstance(a, ctypes.Array):
            out.append(a)
        else:
            raise InvalidArgumentError(f"kernel arguments are tensors or ints, got {type(a)}")
    return out


@functools.cache
def _cu_launch() -> Any:
    """`cuLaunchKernel` from the driver library torch uses, with its C signature (a
    prototype of our own: torch's function object keeps its untyped calls)."""
    from torch.cuda import _utils

    lib = _utils._get_gpu_runtime_library()
    u, p = ctypes.c_uint, ctypes.c_void_p
    proto = ctypes.CFUNCTYPE(ctypes.c_int, p, u, u, u, u, u, u, u, p, p, p)
    return proto(("cuLaunchKernel", lib))


def raw_stream(device: int) -> int:
    """The current CUDA stream of `device` as a raw `cudaStream_t` (the capture stream
    while a graph is captured)."""
    return int(torch._C._cuda_getCurrentRawStream(device))


class PreparedLaunch:
    """One kernel with fixed grid, block, shared memory and arguments, of which the
    arguments at `patched` (pointers) are set per call.

    Args:
        func: the kernel's `CUfunction` (an int or `ctypes.c_void_p`).
        grid: blocks `(x, y, z)`, or an int for `(grid, 1, 1)`.
        block: threads per block (x; y = z = 1).
        shared_mem: dynamic shared memory in bytes.
        args: the kernel's arguments (see `kernel_args`); the tensors among them must stay
            alive and in place while the launch is used.
        patched: indices of pointer arguments given per call, in `__call__`'s order.
    """

    def __init__(
        self,
        func: int | ctypes.c_void_p,
        grid: int | tuple[int, int, int],
        block: int,
        shared_mem: int,
        args: Sequence[object],
        patched: Sequence[int],
    ) -> None:
        self.params = kernel_args(args)
        for i in patched:
            if not isinstance(self.params[i], ctypes.c_void_p):
                raise InvalidArgumentError(f"argument {i} is patched per call but is no pointer")
        self._patched = [self.params[i] for i in patched]
        self._array = (ctypes.c_void_p * len(self.params))(
            *(ctypes.addressof(p) for p in self.params)
        )
        self._array_addr = ctypes.addressof(self._array)
        value = func.value if isinstance(func, ctypes.c_void_p) else func
        if not value:
            raise InvalidArgumentError("PreparedLaunch needs a loaded kernel (CUfunction)")
        self._func = int(value)
        self.grid = (grid, 1, 1) if isinstance(grid, int) else tuple(grid)
        self.block, self.shared_mem = block, shared_mem

    def buffer(self) -> bytes:
        """The parameter values as the kernel receives them, concatenated (for checks)."""
        return b"".join(bytes(p) for p in self.params)

    def __call__(self, *pointers: int, stream: int) -> None:
        """Launch on `stream` (a raw `cudaStream_t`) with `pointers` written to the patched
        arguments."""
        for slot, ptr in zip(self._patched, pointers, strict=True):
            slot.value = ptr
        err = _cu_launch()(
            self._func,
            *self.grid,
            self.block, 1, 1,
            self.shared_mem, stream, self._array_addr, None,
        )  # fmt: skip
        if err:
            from torch.cuda import _utils

            _utils._check_cuda(err)  # raises RuntimeError with the driver's message
