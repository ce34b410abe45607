"""Where text comes from: named datasets, local files, strings, `datasets` objects.

The names follow the papers: "c4" (the first shard of allenai/c4, as SparseGPT, Wanda and
RIA calibrate) and "wikitext2" (wikitext-2-raw-v1, the perplexity benchmark), both read
with `datasets` exactly as a user with network access would. "austen" is the small
public-domain sample shipped inside the package, so everything also runs offline.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .errors import InputNotFoundError, InvalidArgumentError, InvalidTypeError

Split = Literal["train", "test"]
TextSource = Any  # str | os.PathLike | Sequence[str] | datasets.Dataset | torch.Tensor

DATASETS = ("c4", "wikitext2", "austen")

# The C4 files the papers use (SparseGPT, Wanda, RIA).
_C4_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "test": "en/c4-validation.00000-of-00008.json.gz",
}


def load_documents(source: TextSource, split: Split) -> list[str]:
    """The documents of `source` as a list of strings.

    `source` is a dataset name ("c4", "wikitext2", "austen"), a path to a text file or to a
    directory of `*.txt` files, text itself (a string with whitespace), a list of
    strings, or a `datasets.Dataset` with a "text" column. Empty documents are kept, as
    the named datasets keep them: the protocol joins every line of WikiText-2, so the same
    rows given as a `Dataset` must give the same text.
    """
    if isinstance(source, torch.Tensor):
        raise InvalidTypeError("token ids are not text; pass them where token ids are accepted")
    if isinstance(source, os.PathLike):
        return _read_path(Path(source))
    if isinstance(source, str):
        return _from_string(source, split)
    if _is_dataset(source):
        if "text" not in source.column_names:
            raise InvalidArgumentError(
                f"the dataset has no 'text' column (columns: {source.column_names})"
            )
        return list(source["text"])
    if isinstance(source, Sequence):
        docs = list(source)
        if not all(isinstance(d, str) for d in docs):
            raise InvalidTypeError(
                "a list of calibration/evaluation texts must contain only strings"
            )
        return docs
    raise InvalidTypeError(f"unsupported text source of type {type(source).__name__}")


def join_documents(docs: Sequence[str]) -> str:
    """One text from many documents, joined with blank lines as the papers do."""
    return "\n\n".join(docs)


def _from_string(source: str, split: Split) -> list[str]:
    if not source.strip():
        raise InvalidArgumentError("the text source is an empty string")
    name = source.lower()
    if name == "c4":
        return _c4(split)
    if name in ("wikitext2", "wikitext-2", "wikitext"):
        return _wikitext2(split)
    if name == "austen":
        return [resources.files("ria.samples").joinpath("austen_sample.txt").read_text("utf-8")]
    if _is_existing_path(source):
        return _read_path(Path(source).expanduser())
    if _looks_like_path(source):  # a mistyped path must not be read as the text itself
        raise InputNotFoundError(f"no such text file or directory: {source}")
    if any(c.isspace() for c in source):
        return [source]
    raise InvalidArgumentError(
        f"unknown text source {source!r}: expected one of {', '.join(DATASETS)}, a path to a "
        "text file or a directory of .txt files, or the text itself"
    )


def _is_existing_path(source: str) -> bool:
    try:
        return Path(source).expanduser().exists()
    except OSError:  # e.g. a long text is not a valid file name
        return False


def _looks_like_path(source: str) -> bool:
    """One line that names a .txt file or starts like a path (/, ./, ../, ~)."""
    line = source.strip()
    return "\n" not in line and (
        line.endswith(".txt") or line.startswith(("/", "./", "../", "~", ".\\"))
    )


def _read_path(path: Path) -> list[str]:
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise InvalidArgumentError(f"directory {path} contains no .txt files")
        return [f.read_text("utf-8") for f in files]
    if not path.exists():
        raise InputNotFoundError(f"no such text file: {path}")
    return [path.read_text("utf-8")]


def _is_dataset(source: object) -> bool:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        return False
    return isinstance(source, datasets.Dataset)


def _c4(split: Split) -> list[str]:
    import datasets

    ds = datasets.load_dataset(
        "allenai/c4",
        data_files={"data": _C4_FILES[split]},
        split="data",
        verification_mode="no_checks",
    )
    return list(ds["text"])


def _wikitext2(split: Split) -> list[str]:
    import datasets

    ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
    # WikiText lines are the documents; the protocol joins them with blank lines.
    return list(ds["text"])


def token_ids(data: torch.Tensor, what: str) -> torch.Tensor:
    """Token ids given by the user as an int64 CPU tensor of the same shape.

    Accepts any integer dtype of 1 or 2 dimensions; `what` ("calibration", "evaluation")
    names the data in errors.
    """
    if data.is_floating_point() or data.is_complex() or data.dtype == torch.bool:
        raise InvalidTypeError(f"{what} token ids must be an integer tensor, got {data.dtype}")
    if data.dim() not in (1, 2):
        raise InvalidArgumentError(
            f"{what} token ids must have shape (n,) or (rows, n), got {tuple(data.shape)}"
        )
    if data.numel() == 0:
        raise InvalidArgumentError(f"the {what} token tensor is empty")
    return data.detach().to("cpu", torch.long)


def check_vocabulary(model: nn.Module, ids: torch.Tensor, what: str) -> None:
    """Refuses token ids outside the model's embedding table (on a GPU they fail later
    with an unreadable device-side assert)."""
    embed = getattr(model, "get_input_embeddings", None)
    vocab = getattr(embed() if callable(embed) else None, "num_embeddings", None)
    if vocab is None or ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab:
        raise InvalidArgumentError(
            f"{what} token ids must lie in [0, {vocab}) (the model's vocabulary), "
            f"got [{low}, {high}]"
        )
