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
        return _strings(source["text"], "the dataset's 'text' column")
    if isinstance(source, Sequence):
        return _strings(source, "a list of calibration/evaluation texts")
    raise InvalidTypeError(f"unsupported text source of type {type(source).__name__}")


def _strings(docs: Sequence[Any], what: str) -> list[str]:
    """`docs` as a list, refused unless every item is a string (`what` names them)."""
    out = list(docs)
    for doc in out:
        if not isinstance(doc, str):
            raise InvalidTypeError(
                f"{what} must contain only strings, found {type(doc).__name__}; "
                "drop or fill those rows"
            )
    return out


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
        return [_read_utf8(f) for f in files]
    if not path.exists():
        raise InputNotFoundError(f"no such text file: {path}")
    return [_read_utf8(path)]


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgumentError(
            f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); convert it to UTF-8 "
            f"first, e.g. iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8.txt"
        ) from None


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


def check_unpadded(ids: torch.Tensor, tokenizer: Any, what: str) -> None:
    """Refuses a `(rows, n)` id tensor padded by `tokenizer`: a row that starts or ends with
    its pad token (two or more when the pad token is also its BOS or EOS, which may end a
    document). Such rows are read as one stream, so the padding would be text.

    Without a tokenizer, or one without a pad token, nothing can be told and nothing is
    checked; nor are 1-D streams and single rows (a tokenizer's `(1, n)` output).
    """
    pad = getattr(tokenizer, "pad_token_id", None)
    if ids.dim() != 2 or ids.shape[0] < 2 or not isinstance(pad, int):
        return
    ends = {getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)}
    run = min(2 if pad in ends else 1, ids.shape[1])
    padded = (ids[:, :run] == pad).all(dim=1) | (ids[:, -run:] == pad).all(dim=1)
    if padded.any():
        row = int(padded.nonzero()[0, 0])
        raise InvalidArgumentError(
            f"{what} token ids of shape {tuple(ids.shape)} look padded: row {row} starts or "
            f"ends with the pad token (id {pad}), which would be read as text; pass unpadded "
            "ids as one stream (tokenizer(text, return_tensors='pt').input_ids) or the text"
        )


def context_length(model: nn.Module) -> int | None:
    """The longest sequence `model` was made for, in tokens: its (text) config's
    `max_position_embeddings`, or `n_positions` (GPT-2-like); None if it names neither."""
    config = getattr(model, "config", None)
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config):
        config = get_text_config()
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context(model: nn.Module, seqlen: int, what: str) -> None:
    """Refuses windows of `seqlen` tokens longer than the model's context: models with
    learned positions fail on them, RoPE models compute past what they were trained on."""
    context = context_length(model)
    if context is not None and seqlen > context:
        raise InvalidArgumentError(
            f"{what} seqlen={seqlen} is longer than the model's context of {context} tokens "
            f"(its config's max_position_embeddings or n_positions); give seqlen <= {context}"
        )


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
