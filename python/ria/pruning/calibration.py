"""Calibration data -> token windows `(nsamples, seqlen)`, as the papers sample them.

C4 (SparseGPT, Wanda, RIA): for each sample, draw random documents until one is longer
than `seqlen` tokens, then a random window of it. Any other text: the documents joined
with blank lines, tokenized once, and `nsamples` random windows of that stream. All
randomness comes from `random.Random(seed)`, so the windows depend on the seed alone.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from ..data import TextSource, check_unpadded, join_documents, load_documents, token_ids
from ..errors import InvalidArgumentError

# Documents drawn before giving up on finding one longer than seqlen (C4 only).
_MAX_DRAWS = 10_000


def calibration_windows(
    source: TextSource, tokenizer: Any, nsamples: int, seqlen: int, seed: int = 0
) -> torch.Tensor:
    """`nsamples` windows of `seqlen` token ids (int64, shape `(nsamples, seqlen)`).

    `source` is anything `ria.data.load_documents` reads, or token ids: a LongTensor of
    shape `(n, seqlen)` is used as is (its first `nsamples` rows), a 1-D one is a token
    stream to sample windows from. Windows given as a tensor must not be padded: with a
    `tokenizer` that has a pad token, rows that start or end with it are refused.
    `seqlen` is not checked against a model's context here (there is no model): callers
    that have one check it (`ria.data.check_context`).
    """
    if nsamples < 1 or seqlen < 1:
        raise InvalidArgumentError(f"nsamples and seqlen must be >= 1, got {nsamples} and {seqlen}")
    rng = random.Random(seed)
    if isinstance(source, torch.Tensor):
        return _from_tokens(source, tokenizer, nsamples, seqlen, rng)
    if tokenizer is None:
        raise InvalidArgumentError("a tokenizer is needed to calibrate on text; pass tokenizer=...")
    if isinstance(source, str) and source.lower() == "c4":
        return _c4_windows(load_documents(source, "train"), tokenizer, nsamples, seqlen, rng)
    docs = load_documents(source, "train")
    if not docs or not any(d.strip() for d in docs):
        raise InvalidArgumentError("the calibration text is empty")
    stream: torch.Tensor = tokenizer(join_documents(docs), return_tensors="pt").input_ids[0]
    return _sample(stream, nsamples, seqlen, rng)


def _from_tokens(
    tokens: torch.Tensor, tokenizer: Any, nsamples: int, seqlen: int, rng: random.Random
) -> torch.Tensor:
    tokens = token_ids(tokens, "calibration")
    check_unpadded(tokens, tokenizer, "calibration")
    if tokens.dim() == 1:
        return _sample(tokens, nsamples, seqlen, rng)
    if tokens.shape[1] != seqlen:
        raise InvalidArgumentError(
            f"calibration windows have {tokens.shape[1]} tokens, seqlen is {seqlen}"
        )
    if tokens.shape[0] < nsamples:
        raise InvalidArgumentError(
            f"{tokens.shape[0]} calibration windows given, nsamples={nsamples}"
        )
    return tokens[:nsamples].clone()


def _sample(stream: torch.Tensor, nsamples: int, seqlen: int, rng: random.Random) -> torch.Tensor:
    if stream.numel() == 0:
        raise InvalidArgumentError("the calibration text is empty")
    if stream.numel() <= seqlen:
        raise InvalidArgumentError(
            f"the calibration text has {stream.numel()} tokens, fewer than one window of "
            f"seqlen={seqlen} + 1"
        )
    starts = [rng.randint(0, stream.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([stream[s : s + seqlen] for s in starts])


def _c4_windows(
    docs: list[str], tokenizer: Any, nsamples: int, seqlen: int, rng: random.Random
) -> torch.Tensor:
    windows = []
    for _ in range(nsamples):
        for _ in range(_MAX_DRAWS):
            ids = tokenizer(docs[rng.randint(0, len(docs) - 1)], return_tensors="pt").input_ids[0]
            if ids.numel() > seqlen:
                break
        else:
            raise InvalidArgumentError(
                f"no C4 document longer than seqlen={seqlen} in {_MAX_DRAWS} draws"
            )
        start = rng.randint(0, ids.numel() - seqlen - 1)
        windows.append(ids[start : start + seqlen])
    return torch.stack(windows)
