"""cuSPARSELt called directly (ctypes, the library torch already loaded), with its matmul
plans kept: the eager path for many tokens.

`torch._cslt_sparse_mm` initialises cuSPARSELt's descriptors and matmul plan on every call
(0.5-1.5 ms of host time per call on an H200 machine, more than the GEMM itself up to
thousands of tokens). Under CUDA graphs that cost is paid once at capture, but in eager
calls (Hugging Face `model.generate` in its default mode) it made every prefill Linear
cost a millisecond. `CsltMatmul` builds the same plan torch builds (same descriptors, so
it reads the buffer `torch._cslt_compress` wrote) once per token count and then only
calls `cusparseLtMatmul`.

The descriptors mirror `aten/src/ATen/native/sparse/cuda/cuSPARSELtOps.cpp` for
`_cslt_sparse_mm(packed, x.t(), bias, transpose_result=True)`: A is the compressed
`(N, K)` weight (row-major, 50% structured), B the row-major `(M, K)` tokens used
transposed, C = D the `(N, M)` result in column order (a row-major `(M, N)` tensor), fp32
accumulation. Enum values are those of cuSPARSELt >= 0.5 (CUDA's `library_types.h` and
`cusparse.h` for data types, orders and operations).
"""

from __future__ import annotations

import ctypes
import functools
import weakref
from collections import OrderedDict
from typing import Any

import torch

from ..errors import InvalidArgumentError
from .cslt import M_ALIGN, CsltConfig

__all__ = ["MAX_PLANS", "CsltMatmul", "cslt_lib_status", "cusparselt_version"]

# Plans kept per layer (token counts, least recently used dropped first).
MAX_PLANS = 16
_OPAQUE_BYTES = 4096  # cuSPARSELt's opaque structs are 1 KiB or less; 16-byte aligned
_CUDA_R_16F, _CUDA_R_16BF = 2, 14
_ORDER_COL, _ORDER_ROW = 1, 2
_OP_N, _OP_T = 0, 1
_SPARSITY_50 = 0
_COMPUTE_32F = 2
_BIAS_POINTER = 8  # cusparseLtMatmulDescAttribute_t
_ALG_DEFAULT = 0
_ALG_CONFIG_ID, _SPLIT_K, _SPLIT_K_MODE = 0, 3, 4  # cusparseLtMatmulAlgAttribute_t
_TYPES = {torch.float16: _CUDA_R_16F, torch.bfloat16: _CUDA_R_16BF}
_MIN_VERSION = 502  # the compute-type enum changed in 0.5.2
_MAJOR_VERSION, _MINOR_VERSION, _PATCH_LEVEL = 0, 1, 2  # libraryPropertyType

_i, _p, _i64, _u32, _sz = (
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_int64,
    ctypes.c_uint32,
    ctypes.c_size_t,
)
_SIGNATURES: dict[str, tuple[Any, ...]] = {
    "cusparseLtInit": (_p,),
    "cusparseLtStructuredDescriptorInit": (_p, _p, _i64, _i64, _i64, _u32, _i, _i, _i),
    "cusparseLtDenseDescriptorInit": (_p, _p, _i64, _i64, _i64, _u32, _i, _i),
    "cusparseLtMatDescriptorDestroy": (_p,),
    "cusparseLtMatmulDescriptorInit": (_p, _p, _i, _i, _p, _p, _p, _p, _i),
    "cusparseLtMatmulDescSetAttribute": (_p, _p, _i, _p, _sz),
    "cusparseLtMatmulAlgSelectionInit": (_p, _p, _p, _i),
    "cusparseLtMatmulAlgSetAttribute": (_p, _p, _i, _p, _sz),
    "cusparseLtMatmulPlanInit": (_p, _p, _p, _p),
    "cusparseLtMatmulGetWorkspace": (_p, _p, _p),
    "cusparseLtMatmulPlanDestroy": (_p,),
    "cusparseLtMatmul": (_p, _p, _p, _p, _p, _p, _p, _p, _p, _p, _i),
}


class _Lib:
    """The cuSPARSELt functions this module calls, typed (`_SIGNATURES`)."""

    cusparseLtInit: Any
    cusparseLtStructuredDescriptorInit: Any
    cusparseLtDenseDescriptorInit: Any
    cusparseLtMatDescriptorDestroy: Any
    cusparseLtMatmulDescriptorInit: Any
    cusparseLtMatmulDescSetAttribute: Any
    cusparseLtMatmulAlgSelectionInit: Any
    cusparseLtMatmulAlgSetAttribute: Any
    cusparseLtMatmulPlanInit: Any
    cusparseLtMatmulGetWorkspace: Any
    cusparseLtMatmulPlanDestroy: Any
    cusparseLtMatmul: Any

    def __init__(self, cdll: ctypes.CDLL) -> None:
        for name, args in _SIGNATURES.items():
            proto = ctypes.CFUNCTYPE(ctypes.c_int, *args)
            setattr(self, name, proto((name, cdll)))

    def check(self, status: int, what: str) -> None:
        if status:
            raise RuntimeError(f"cuSPARSELt {what} failed with status {status}")


def _loaded_path() -> str | None:
    """The path of the libcusparseLt torch has loaded (from the process's mappings)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            for line in maps:
                path = line.split(maxsplit=5)[-1].strip()
                if "libcusparseLt" in path and path.startswith("/"):
                    return path
    except OSError:
        pass
    return None


@functools.cache
def _cdll() -> ctypes.CDLL | str:
    """torch's cuSPARSELt library, opened again by its path, or why it cannot be."""
    if not torch.backends.cusparselt.is_available():
        return "cuSPARSELt is not available"
    try:
        return ctypes.CDLL(_loaded_path() or "libcusparseLt.so.0")
    except OSError as err:
        return f"cannot open torch's cuSPARSELt library: {err}"


@functools.cache
def cusparselt_version() -> int | None:
    """The version of the cuSPARSELt library this process runs, encoded as
    `CUSPARSELT_VERSION` (major * 1000 + minor * 100 + patch: 801 is 0.8.1), asked from the
    library itself; None without cuSPARSELt.

    `torch.backends.cusparselt.version()` is the version torch was compiled against: a
    newer library installed beside torch, or preloaded, does not change it."""
    cdll = _cdll()
    if isinstance(cdll, str):
        return None
    try:
        get = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int))(
            ("cusparseLtGetProperty", cdll)
        )
    except AttributeError:  # pragma: no cover - every cuSPARSELt since 0.1 has it
        return torch.backends.cusparselt.version()
    parts = []
    for prop in (_MAJOR_VERSION, _MINOR_VERSION, _PATCH_LEVEL):
        value = ctypes.c_int()
        if get(prop, ctypes.byref(value)):
            return torch.backends.cusparselt.version()
        parts.append(value.value)
    return 1000 * parts[0] + 100 * parts[1] + parts[2]


@functools.cache
def _library() -> _Lib | str:
    """The typed library, or why it cannot be used."""
    if not torch.cuda.is_available():
        return "cuSPARSELt is not available"
    cdll = _cdll()
    if isinstance(cdll, str):
        return cdll
    version = cusparselt_version()
    if version is None or version < _MIN_VERSION:
        return f"cuSPARSELt {version} is older than 0.5.2 (other enum values)"
    try:
        return _Lib(cdll)
    except AttributeError as err:
        return f"cannot use torch's cuSPARSELt library: {err}"


def cslt_lib_status() -> str | None:
    """None if `CsltMatmul` can run here, else why not."""
    lib = _library()
    return lib if isinstance(lib, str) else None


def _lib() -> _Lib:
    lib = _library()
    if isinstance(lib, str):
        raise RuntimeError(lib)
    return lib


class _Opaque:
    """A 16-byte-aligned block for one of cuSPARSELt's opaque structs."""

    def __init__(self) -> None:
        self._raw = ctypes.create_string_buffer(_OPAQUE_BYTES + 16)
        base = ctypes.addressof(self._raw)
        self.ptr = base + (-base) % 16


@functools.cache
def _handle(device: int) -> _Opaque:
    """One cuSPARSELt handle per device, initialised on that device (never destroyed:
    it lives as long as the process, like torch's)."""
    lib = _lib()
    handle = _Opaque()
    with torch.cuda.device(device):
        lib.check(lib.cusparseLtInit(handle.ptr), "cusparseLtInit")
    return handle


class _Plan:
    """Descriptors, algorithm selection, plan and workspace of one (layer, padded M)."""

    def __init__(
        self,
        device: int,
        n: int,
        k: int,
        m: int,
        dtype: torch.dtype,
        bias: torch.Tensor | None,
        config: CsltConfig,
    ) -> None:
        lib = _lib()
        h = _handle(device).ptr
        self.a, self.b, self.d = _Opaque(), _Opaque(), _Opaque()
        self.matmul, self.alg, self.plan = _Opaque(), _Opaque(), _Opaque()
        t = _TYPES[dtype]
        self._made: list[_Opaque] = []
        with torch.cuda.device(device):
            lib.check(
                lib.cusparseLtStructuredDescriptorInit(
                    h, self.a.ptr, n, k, k, 16, t, _ORDER_ROW, _SPARSITY_50
                ),
                "structured descriptor",
            )
            self._made.append(self.a)
            lib.check(
                lib.cusparseLtDenseDescriptorInit(h, self.b.ptr, m, k, k, 16, t, _ORDER_ROW),
                "dense descriptor",
            )
            self._made.append(self.b)
            lib.check(
                lib.cusparseLtDenseDescriptorInit(h, self.d.ptr, n, m, n, 16, t, _ORDER_COL),
                "result descriptor",
            )
            self._made.append(self.d)
            lib.check(
                lib.cusparseLtMatmulDescriptorInit(
                    h, self.matmul.ptr, _OP_N, _OP_T, self.a.ptr, self.b.ptr, self.d.ptr,
                    self.d.ptr, _COMPUTE_32F,
                ),
                "matmul descriptor",
            )  # fmt: skip
            if bias is not None:
                ptr = ctypes.c_void_p(bias.data_ptr())
                lib.check(
                    lib.cusparseLtMatmulDescSetAttribute(
                        h, self.matmul.ptr, _BIAS_POINTER, ctypes.addressof(ptr), 8
                    ),
                    "bias pointer",
                )
            lib.check(
                lib.cusparseLtMatmulAlgSelectionInit(
                    h, self.alg.ptr, self.matmul.ptr, _ALG_DEFAULT
                ),
                "algorithm selection",
            )
            self._set_alg(lib, h, _ALG_CONFIG_ID, config.alg_id)
            if config.split_k > 1:  # as torch: split-K only where the search chose it
                self._set_alg(lib, h, _SPLIT_K, config.split_k)
                if config.split_k_mode > 0:
                    self._set_alg(lib, h, _SPLIT_K_MODE, config.split_k_mode)
            lib.check(
                lib.cusparseLtMatmulPlanInit(h, self.plan.ptr, self.matmul.ptr, self.alg.ptr),
                "plan",
            )
            size = ctypes.c_size_t(0)
            lib.check(
                lib.cusparseLtMatmulGetWorkspace(h, self.plan.ptr, ctypes.addressof(size)),
                "workspace size",
            )
        self.workspace = torch.empty(max(int(size.value), 1), dtype=torch.uint8, device=device)
        self.workspace_ptr = self.workspace.data_ptr() if size.value else None
        weakref.finalize(self, _destroy, lib, self.plan, list(self._made))

    def _set_alg(self, lib: _Lib, h: int, attr: int, value: int) -> None:
        v = ctypes.c_int(value)
        lib.check(
            lib.cusparseLtMatmulAlgSetAttribute(h, self.alg.ptr, attr, ctypes.addressof(v), 4),
            f"algorithm attribute {attr}",
        )


def _destroy(lib: _Lib, plan: _Opaque, descriptors: list[_Opaque]) -> None:
    try:
        lib.cusparseLtMatmulPlanDestroy(plan.ptr)
        for d in descriptors:
            lib.cusparseLtMatDescriptorDestroy(d.ptr)
    except Exception:  # interpreter shutdown: the library may be gone
        pass


class CsltMatmul:
    """`cslt.cslt_linear(x, packed, bias, config)` with cuSPARSELt's plan kept per token
    count (`MAX_PLANS` per layer): a call costs one `cusparseLtMatmul`.

    Args:
        packed: `torch._cslt_compress` of an `(N, K)` fp16/bf16 CUDA weight.
        out_features, in_features: N, K.
        bias: `(N,)` in the weight's dtype, or None.
        config: the algorithm (and split-K) to run.

    `packed` and `bias` must stay in place while this is used.
    """

    def __init__(
        self,
        packed: torch.Tensor,
        out_features: int,
        in_features: int,
        bias: torch.Tensor | None = None,
        config: CsltConfig | None = None,
    ) -> None:
        if packed.dtype not in _TYPES or not packed.is_cuda:
            raise InvalidArgumentError(f"packed must be CUDA fp16/bf16, got {packed.dtype}")
        self.packed, self.bias, self.config = packed, bias, config or CsltConfig()
        self.n, self.k = out_features, in_features
        self.dtype, self.device = packed.dtype, packed.device
        self._device_index = packed.device.index if packed.device.index is not None else 0
        self._plans: OrderedDict[int, _Plan] = OrderedDict()
        self._alpha, self._beta = ctypes.c_float(1.0), ctypes.c_float(0.0)
        self._scalars = ctypes.addressof(self._alpha), ctypes.addressof(self._beta)
        self._stream = ctypes.c_void_p(0)
        self._stream_addr = ctypes.addressof(self._stream)
        self._handle_ptr = _handle(self._device_index).ptr
        self._matmul = _lib().cusparseLtMatmul

    def plan(self, m: int) -> _Plan:
        """The plan for `m` tokens padded to cuSPARSELt's multiple of 8 (made on first use)."""
        mp = -(-m // M_ALIGN) * M_ALIGN
        plan = self._plans.get(mp)
        if plan is None:
            while len(self._plans) >= MAX_PLANS:
                self._plans.popitem(last=False)
            plan = self._plans[mp] = _Plan(
                self._device_index, self.n, self.k, mp, self.dtype, self.bias, self.config
            )
        else:
            self._plans.move_to_end(mp)
        return plan

    def fits(self, x: torch.Tensor) -> bool:
        """Whether `x` is a contiguous, 16-byte aligned `(M, K)` tensor of the weight's
        dtype and device (the alignment the descriptors declare)."""
        return (
            x.dim() == 2
            and x.shape[1] == self.k
            and x.dtype == self.dtype
            and x.is_contiguous()
            and x.device == self.device
            and x.data_ptr() % 16 == 0
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """`x @ W.T + bias` for `x` with `fits(x)`: `(M, K)` -> contiguous `(M, N)`."""
        from .launch import raw_stream

        m = x.shape[0]
        plan = self.plan(m)
        pad = (-m) % M_ALIGN
        xp = torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x
        out = torch.empty(m + pad, self.n, dtype=self.dtype, device=self.device)
        self._stream.value = raw_stream(self._device_index)
        status = self._matmul(
            self._handle_ptr, plan.plan.ptr, self._scalars[0],
            self.packed.data_ptr(), xp.data_ptr(), self._scalars[1], out.data_ptr(),
            out.data_ptr(), plan.workspace_ptr, self._stream_addr, 1,
        )  # fmt: skip
        if status:
            raise RuntimeError(f"cusparseLtMatmul failed with status {status}")
        return out[:m] if pad else out
