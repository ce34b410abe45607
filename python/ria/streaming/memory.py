"""Giving memory freed by one block back to the operating system before the next one."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

__all__ = ["release_freed_memory"]


def release_freed_memory() -> None:
    """Returns the C heap's free pages to the OS (glibc's `malloc_trim`; a no-op where
    there is none). glibc keeps memory freed by blocks' tensors of up to 32 MB in its
    arenas (one per thread that allocated it), fragmented; measured on a 12-block bf16
    model, the RSS left after each block grew by ~12 MB per block without this call and
    stayed flat with it."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None
    return trim
