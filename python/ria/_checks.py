"""Argument checks shared by the public functions outside the Rust core: exact types
(a bool is not a number, a float is not a count; numpy integers are welcome) and ranges,
refused with the argument's name."""

from __future__ import annotations

import numbers
import os
from pathlib import Path

from .errors import InvalidArgumentError, InvalidTypeError

__all__ = ["require_bool", "require_int", "require_path"]


def require_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidTypeError(f"{name} must be True or False, got {value!r}")
    return value


def require_int(name: str, value: object, *, minimum: int) -> int:
    """`value` as an int (numpy integers welcome; bools and floats refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidTypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise InvalidArgumentError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def require_path(name: str, value: object) -> Path:
    """A non-empty `str` or `os.PathLike` of text as a `Path` (`~` expanded)."""
    if not isinstance(value, (str, os.PathLike)):
        raise InvalidTypeError(f"{name} must be a str or a path, got {type(value).__name__}")
    text = os.fspath(value)
    if not isinstance(text, str):
        raise InvalidTypeError(f"{name} must be a text path, got {text!r}")
    if not text.strip():
        raise InvalidArgumentError(f"{name} is empty; give a directory")
    return Path(text).expanduser()
