"""Kernel launches with the argument block built once: per call only the addresses that
change (the input's, the output's) are written before `cuLaunchKernel`.

Torch's `_CudaKernel.__call__` converts every argument with ctypes on each call (tens of
microseconds of host time per launch in eager mode); a `PreparedLaunch` keeps one ctypes
value per kernel parameter and the `void*` array pointing at them, so a call costs two
field writes and one foreign call. The driver copies the parameters at launch (and into
the graph node under capture), so rewriting them for the next call is safe.

A launch can be programmatic (`cuLaunchKernelEx` with programmatic stream serialization,
compute capability >= 9.0): the kernel may then start while the kernel ahead of it in the
stream is still running, once that one has signalled (`griddepcontrol.launch_dependents`)
or finished, and must wait (`griddepcontrol.wait`) before it reads what that kernel wrote
or writes anything. Under graph capture this becomes a programmatic edge of the graph.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Iterator, Sequence
from typing import Any, TypeAlias

import torch

from ..errors import InvalidArgumentError

__all__ = ["PreparedLaunch", "kernel_args", "plain_launches", "programmatic_launches", "raw_stream"]

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


class _LaunchAttribute(ctypes.Structure):
    """`CUlaunchAttribute` (cuda.h): an id, padding to 8 bytes, a 64-byte value union."""

    _fields_ = [
        ("id", ctypes.c_int),
        ("pad", ctypes.c_ubyte * 4),
        ("value", ctypes.c_ubyte * 64),
    ]


class _LaunchConfig(ctypes.Structure):
    """`CUlaunchConfig` (cuda.h); ctypes pads `shared_mem` to the stream's 8 bytes as C does."""

    _fields_ = [
        ("grid", ctypes.c_uint * 3),
        ("block", ctypes.c_uint * 3),
        ("shared_mem", ctypes.c_uint),
        ("stream", ctypes.c_void_p),
        ("attrs", ctypes.POINTER(_LaunchAttribute)),
        ("num_attrs", ctypes.c_uint),
    ]


# CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION (cuda.h); its value is an int.
_PROGRAMMATIC_STREAM_SERIALIZATION = 6


@functools.cache
def _cu_launch_ex() -> Any:
    """`cuLaunchKernelEx(const CUlaunchConfig*, CUfunction, void**, void**)`."""
    from torch.cuda import _utils

    lib = _utils._get_gpu_runtime_library()
    p = ctypes.c_void_p
    proto = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(_LaunchConfig), p, p, p)
    return proto(("cuLaunchKernelEx", lib))


_plain_depth = 0  # > 0 inside `plain_launches`


def programmatic_launches(device: torch.device | int | None = None) -> bool:
    """Whether kernels that can be launched programmatically are, on `device` (default: the
    current one): compute capability >= 9.0 (Hopper on), outside `plain_launches`."""
    return _plain_depth == 0 and torch.cuda.get_device_capability(device) >= (9, 0)


@contextlib.contextmanager
def plain_launches() -> Iterator[None]:
    """Launch every kernel plainly inside this block (a graph captured inside keeps its plain
    launches), for side-by-side measurements (`benches/fp8_speed.py --only launch`)."""
    global _plain_depth
    _plain_depth += 1
    try:
        yield
    finally:
        _plain_depth -= 1


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
        programmatic: launch with programmatic stream serialization (see the module; the
            kernel must wait before it reads the previous kernel's output or writes).
    """

    def __init__(
        self,
        func: int | ctypes.c_void_p,
        grid: int | tuple[int, int, int],
        block: int,
        shared_mem: int,
        args: Sequence[object],
        patched: Sequence[int],
        *,
        programmatic: bool = False,
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
        self._config: _LaunchConfig | None = None
        self._config_ptr: Any = None
        if programmatic:
            self._attr = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION)
            self._attr.value[0] = 1  # the int 1, little-endian
            self._config = _LaunchConfig(
                grid=(ctypes.c_uint * 3)(*self.grid),
                block=(ctypes.c_uint * 3)(block, 1, 1),
                shared_mem=shared_mem,
                attrs=ctypes.pointer(self._attr),
                num_attrs=1,
            )
            self._config_ptr = ctypes.pointer(self._config)

    def buffer(self) -> bytes:
        """The parameter values as the kernel receives them, concatenated (for checks)."""
        return b"".join(bytes(p) for p in self.params)

    def __call__(self, *pointers: int, stream: int) -> None:
        """Launch on `stream` (a raw `cudaStream_t`) with `pointers` written to the patched
        arguments."""
        for slot, ptr in zip(self._patched, pointers, strict=True):
            slot.value = ptr
        if self._config is not None:
            self._config.stream = stream
            err = _cu_launch_ex()(self._config_ptr, self._func, self._array_addr, None)
        else:
            err = _cu_launch()(
                self._func,
                *self.grid,
                self.block, 1, 1,
                self.shared_mem, stream, self._array_addr, None,
            )  # fmt: skip
        if err:
            from torch.cuda import _utils

            _utils._check_cuda(err)  # raises RuntimeError with the driver's message
