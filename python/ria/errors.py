"""The exceptions ria-rs raises on purpose: one base class, `RiaError`, to catch them all.

Each also derives from the built-in exception it refines, so code written against the
built-ins (`except ValueError`) keeps working. Anything else escaping ria (an `IndexError`,
a `RuntimeError` from torch) is a bug in ria or in a library below it, and the CLI lets
its traceback through.
"""

from __future__ import annotations

__all__ = [
    "CacheFullError",
    "DistributedError",
    "InputNotFoundError",
    "InvalidArgumentError",
    "InvalidTypeError",
    "MissingDependencyError",
    "OutputExistsError",
    "RiaError",
    "UnsupportedModelError",
]


class RiaError(Exception):
    """Base class of every error ria-rs raises on purpose."""


class InvalidArgumentError(RiaError, ValueError):
    """An argument's value is out of range, inconsistent with another, or of the wrong
    shape; nothing was changed. The Rust core's input errors are of this class."""


class InvalidTypeError(RiaError, TypeError):
    """An argument has the wrong type or dtype; nothing was changed."""


class UnsupportedModelError(RiaError, ValueError):
    """The model's structure (or configuration, such as its attention implementation) is
    not one ria-rs knows how to prune, permute or run."""


class InputNotFoundError(RiaError, FileNotFoundError):
    """A file or directory named as input (calibration text, the demo model's file) does
    not exist."""


class OutputExistsError(RiaError, FileExistsError):
    """The output path exists and replacing it was not asked for; nothing was written."""


class CacheFullError(RiaError, RuntimeError):
    """A generator's KV cache has no room for another token: create it with a larger
    `max_cache_len`."""


class MissingDependencyError(RiaError, ImportError):
    """An optional package (or the offline demo model) is needed and not installed; the
    message says what to install."""


class DistributedError(RiaError, RuntimeError):
    """A prune split over several processes (torch.distributed) stopped: one rank failed
    (the message names it and what it was doing) or the ranks lost contact. Every rank
    raises it, and no output was written."""
