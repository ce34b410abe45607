"""The compact 2:4 format read by the decode kernel, and the 2:4 check.

A 2:4 weight `W` (`out_features x in_features` = `N x K`, as in `nn.Linear`) keeps at most
2 nonzeros in every group of 4 consecutive input columns of every row. It is stored as:

- `values`: `N x Kp/2`, the weight's dtype. Group `g` of a row keeps its two values at slots
  `2g` (lower column) and `2g + 1` (higher column).
- `meta`: `N x Kp/32`, int32. Group `g` owns the 4-bit nibble at bits `4 * (g % 8)` of word
  `g // 8`: `i0 | (i1 << 2)` with `i0 < i1` the in-group columns (0..3) of the two slots.

`Kp` is `K` rounded up to a multiple of 32 (the padding groups hold zeros). A group with
fewer than 2 nonzeros keeps its nonzeros plus its lowest zero columns, so every group has
exactly two distinct indices. Bytes per weight: 1 value (2 B) per 2 columns + 4 bits per
4 columns = 9/16 of dense fp16/bf16 (56.25%).

The mma layout (`Mma24`, `pack_mma24`) holds the same values and nibbles rearranged into the
register fragments of the sparse tensor-core instruction `mma.sp` m16n8k32 (see `pack_mma24`),
so the `mma_sp` kernel loads each lane's operands with one 16-byte and one 4-byte load.

cuSPARSELt's compressed buffer (measured with cuSPARSELt 0.8 on sm90, checked per layer at
conversion) holds the same values row-major, then the same nibbles in a tiled order
(layout "cslt", see `cslt_nibble_index`), so the decode kernel can read a layer's
cuSPARSELt buffer directly and the layer needs no second copy of its weight. Its e4m3
buffer is built the same way, one byte per value, with another tiled nibble order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidArgumentError

GROUP = 4  # columns per 2:4 group
KEEP = 2  # kept values per group
GROUPS_PER_WORD = 8  # 4-bit nibbles per int32 metadata word
COLS_PER_WORD = GROUP * GROUPS_PER_WORD  # 32 input columns per metadata word

__all__ = [
    "COLS_PER_WORD",
    "MMA_PAIR_COLS",
    "MMA_TILE_ROWS",
    "Compact24",
    "Mma24",
    "check_24",
    "count_24_violations",
    "cslt_nibble_index",
    "nibbles",
    "pack_24",
    "pack_mma24",
    "pack_mma24_e4m3",
    "to_cslt_layout",
    "unpack_24",
    "unpack_mma24",
]


@dataclass(frozen=True)
class Compact24:
    """A 2:4 weight in the compact format (see the module docstring).

    Attributes:
        values: `(N, Kp/2)` kept values, the weight's dtype.
        meta: `(N, Kp/32)` int32, eight 4-bit index pairs per word.
        in_features: `K`, the unpadded number of input columns.
    """

    values: torch.Tensor
    meta: torch.Tensor
    in_features: int
    layout: str = "rows"  # "rows": (N, Kp/32) words as above; "cslt": 1-D, cuSPARSELt order

    @property
    def out_features(self) -> int:
        return self.values.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held by `values` and `meta` together."""
        return tensor_bytes(self.values) + tensor_bytes(self.meta)


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def count_24_violations(weight: torch.Tensor) -> int:
    """Number of (row, group of 4 columns) with more than 2 nonzeros; `K % 4 != 0` raises."""
    n, k = weight.shape
    if k % GROUP:
        raise InvalidArgumentError(f"in_features={k} is not a multiple of {GROUP}")
    nonzero = (weight.detach().reshape(n, k // GROUP, GROUP) != 0).sum(-1)
    return int((nonzero > KEEP).sum())


def check_24(weight: torch.Tensor) -> str | None:
    """None when `weight` (2-D) is 2:4 sparse along its columns, else why not (one line)."""
    if weight.dim() != 2:
        return f"weight is {weight.dim()}-D, expected 2-D"
    n, k = weight.shape
    if k % GROUP:
        return f"in_features={k} is not a multiple of {GROUP}"
    bad = count_24_violations(weight)
    if bad:
        return f"not 2:4 sparse: {bad} of {n * k // GROUP} groups of 4 have more than 2 nonzeros"
    return None


def _padded_cols(k: int) -> int:
    return -(-k // COLS_PER_WORD) * COLS_PER_WORD


def pack_24(weight: torch.Tensor) -> Compact24:
    """Compress a 2:4 weight `(N, K)` into the compact format, on the weight's device (e4m3
    too: negative zeros count as pruned).

    Raises ValueError if the weight is not 2:4 sparse (see `check_24`).
    """
    if weight.dtype == torch.float8_e4m3fn:  # exact through bf16, which has the ops e4m3 lacks
        wide = pack_24(weight.detach().to(torch.bfloat16))
        return Compact24(wide.values.to(weight.dtype), wide.meta, wide.in_features)
    reason = check_24(weight)
    if reason is not None:
        raise InvalidArgumentError(reason)
    w = weight.detach()
    n, k = w.shape
    kp = _padded_cols(k)
    if kp != k:
        w = torch.nn.functional.pad(w, (0, kp - k))
    groups = w.reshape(n, kp // GROUP, GROUP)
    # Nonzeros first (in column order), then the lowest zero columns: the first two win.
    col = torch.arange(GROUP, device=w.device, dtype=torch.int8)
    key = (groups == 0).to(torch.int8) * GROUP + col
    idx = key.topk(KEEP, dim=-1, largest=False, sorted=True).indices.sort(dim=-1).values
    values = groups.gather(-1, idx).reshape(n, kp // 2).contiguous()
    nibble = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.int64)  # (N, Kp/4), 0..14
    shifts = torch.arange(0, 32, 4, device=w.device, dtype=torch.int64)
    words = (nibble.reshape(n, kp // COLS_PER_WORD, GROUPS_PER_WORD) << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement into int32
    return Compact24(values=values, meta=words.to(torch.int32).contiguous(), in_features=k)


def cslt_nibble_index(
    n: int, k: int, device: torch.device | None = None, *, e4m3: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where cuSPARSELt keeps the nibble of (row r, group g): int32 word index and bit shift,
    both `(N, K/4)`, for `N % 64 == 0` (or < 64) and `K % 32 == 0` (e4m3: `K % 64 == 0`).

    16-bit values: tiles of 16 rows x 8 groups take 128 nibbles (rows r and r + 8 share each
    16-bit word: nibble j = (r % 16) // 8 + 2 * ((g % 8) // 4) of word 4 * (r % 8) + g % 4);
    tiles run down 64-row blocks, then along K, then to the next 64-row block.

    e4m3 (`e4m3`): tiles of 16 rows x 16 groups take 256 nibbles: rows r and r + 8 share each
    16-bit half, groups 2i and 2i + 1 one byte (nibble j = g % 2 + 2 * ((r % 16) // 8) +
    4 * ((g % 16) // 8) of word 4 * (r % 8) + (g % 8) // 2); the same tile order. Probed
    with cuSPARSELt 0.8.0 on an H200 (`tests/data/cslt_e4m3_128x256.npz`).
    """
    r = torch.arange(n, device=device)[:, None]
    g = torch.arange(k // GROUP, device=device)[None, :]
    col_tiles = k // COLS_PER_WORD
    block = 16 * 4 * col_tiles * (r // 64)  # words per 64-row block: the same for both
    if e4m3:
        word = block + 32 * ((r % 64) // 16) + 4 * (r % 8) + 128 * (g // 16) + (g % 8) // 2
        shift = 4 * (g % 2) + 8 * ((r % 16) // 8) + 16 * ((g % 16) // 8)
        return word, shift
    word = block + 16 * ((r % 64) // 16) + 2 * (r % 8)
    word = word + 64 * (g // 8) + (g % 4) // 2
    shift = 16 * (g % 2) + 4 * ((r % 16) // 8) + 8 * ((g % 8) // 4)
    return word, shift


def nibbles(compact: Compact24) -> torch.Tensor:
    """`(N, Kp/4)` int64 nibbles `i0 | i1 << 2` of a compact weight (either layout)."""
    n, half = compact.values.shape
    if compact.layout == "cslt":
        word, shift = cslt_nibble_index(n, half * 2, compact.meta.device, e4m3=_is_e4m3(compact))
        return ((compact.meta.to(torch.int64) & 0xFFFFFFFF)[word] >> shift) & 0xF
    if compact.layout != "rows":
        raise InvalidArgumentError(f"unknown metadata layout {compact.layout!r}")
    meta = compact.meta
    shifts = torch.arange(0, 32, 4, device=meta.device, dtype=torch.int64)
    nibble = ((meta.to(torch.int64) & 0xFFFFFFFF)[..., None] >> shifts) & 0xF
    return nibble.reshape(n, -1)[:, : half // KEEP]


def unpack_indices(meta: torch.Tensor) -> torch.Tensor:
    """`(N, Kp/4, 2)` int64 in-group column indices (0..3) from `(N, Kp/32)` int32 words."""
    n, words = meta.shape
    shifts = torch.arange(0, 32, 4, device=meta.device, dtype=torch.int64)
    nibble = ((meta.to(torch.int64) & 0xFFFFFFFF)[..., None] >> shifts) & 0xF
    nibble = nibble.reshape(n, words * GROUPS_PER_WORD)
    return torch.stack((nibble & 3, nibble >> 2), dim=-1)


def to_cslt_layout(compact: Compact24) -> torch.Tensor:
    """The 1-D int32 metadata of `compact` rearranged into cuSPARSELt's order (its e4m3
    order for e4m3 values)."""
    n, half = compact.values.shape
    k = half * 2
    word, shift = cslt_nibble_index(n, k, compact.meta.device, e4m3=_is_e4m3(compact))
    size = 16 * 4 * (k // COLS_PER_WORD) * (-(-n // 64))
    out = torch.zeros(size, dtype=torch.int64, device=compact.meta.device)
    out.index_add_(0, word.reshape(-1), (nibbles(compact) << shift).reshape(-1))
    out = torch.where(out >= 2**31, out - 2**32, out)
    return out.to(torch.int32)


def _is_e4m3(compact: Compact24) -> bool:
    return compact.values.dtype == torch.float8_e4m3fn


def unpack_24(compact: Compact24) -> torch.Tensor:
    """The dense `(N, K)` weight a `Compact24` stands for (exact inverse of `pack_24`)."""
    values = compact.values
    if _is_e4m3(compact):  # scatter has no e4m3 kernel; bf16 holds every e4m3 value
        values = values.to(torch.bfloat16)
    dense = _scatter_groups(values, nibbles(compact))[:, : compact.in_features]
    return dense.to(compact.values.dtype)


def _scatter_groups(values: torch.Tensor, nib: torch.Tensor) -> torch.Tensor:
    """Dense `(N, 2 * Kh)` from kept `values` `(N, Kh)` and their nibbles `(N, Kh/2)`."""
    n, half = values.shape
    idx = torch.stack((nib & 3, nib >> 2), dim=-1)
    dense = torch.zeros(n, half // KEEP, GROUP, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, idx, values.reshape(n, half // KEEP, KEEP))
    return dense.reshape(n, half * KEEP)


# -- the mma.sp fragment layout -----------------------------------------------------------

MMA_TILE_ROWS = 16  # rows of one mma.sp m16n8k32 (the weight is the sparse operand A)
MMA_STEP_COLS = 32  # input columns of one mma.sp (k32)
MMA_PAIR_COLS = 2 * MMA_STEP_COLS  # columns per metadata word: one word serves two k-steps
LANES = 32


@dataclass(frozen=True)
class Mma24:
    """A 2:4 weight `(N, K)` in the mma.sp fragment layout (see `pack_mma24`).

    Attributes:
        values: 1-D, `Np * Kp / 2` kept values, the weight's dtype, in the order
            `(tile, step, lane, 8)`: lane `l`'s A-fragment of k-step `step` of row tile `tile`.
        meta: 1-D int32, `Np * Kp / 32` words in the order `(tile, pair, lane)`.
        out_features: `N`; `Np` is `N` rounded up to 16 (zero rows).
        in_features: `K`; `Kp` is `K` rounded up to 64 (zero columns).
    """

    values: torch.Tensor
    meta: torch.Tensor
    out_features: int
    in_features: int

    @property
    def tiles(self) -> int:
        """Row tiles of 16 rows (`Np / 16`)."""
        return -(-self.out_features // MMA_TILE_ROWS)

    @property
    def pairs(self) -> int:
        """Metadata words per lane and row tile (`Kp / 64`), two k-steps each."""
        return -(-self.in_features // MMA_PAIR_COLS)

    @property
    def nbytes(self) -> int:
        """Bytes held by `values` and `meta` together."""
        return tensor_bytes(self.values) + tensor_bytes(self.meta)


def pack_mma24(weight: torch.Tensor) -> Mma24:
    """Pack a 2:4 weight `(N, K)` into the fragments of `mma.sp.m16n8k32` (16-bit types).

    Per PTX (sparse m16n8k32, .f16/.bf16): lane `l = 4g + t` of a warp holds, for the 16x32
    tile of one k-step, 8 kept values: rows `g` and `g + 8`, compressed columns
    `2t, 2t+1` (group `t`) and `2t+8, 2t+9` (group `t + 4`), in the order
    (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1), then the same at `+8`: one 16-byte load.
    Metadata (sparsity selector 0: lanes with t in {0, 1}; selector 1: t in {2, 3}) is one
    32-bit word per lane: bits `4q` hold row `g`'s nibble of group `4 * (t % 2) + q`, bits
    `16 + 4q` row `g + 8`'s. Lanes with `t < 2` carry k-step `2p`, lanes with `t >= 2`
    k-step `2p + 1` of the pair `p`, so one word per lane serves two mma.sp.

    Raises InvalidArgumentError if the weight is not 2:4 sparse (see `check_24`).
    """
    reason = check_24(weight)
    if reason is not None:
        raise InvalidArgumentError(reason)
    n, k = weight.shape
    np_, kp = -(-n // MMA_TILE_ROWS) * MMA_TILE_ROWS, -(-k // MMA_PAIR_COLS) * MMA_PAIR_COLS
    w = torch.nn.functional.pad(weight.detach(), (0, kp - k, 0, np_ - n))
    compact = pack_24(w)
    tiles, steps, pairs = np_ // MMA_TILE_ROWS, kp // MMA_STEP_COLS, kp // MMA_PAIR_COLS
    # values (Np, Kp/2): row = 8h + g, compressed column of a step = 8c + 2t + lo.
    v = compact.values.reshape(tiles, 2, 8, steps, 2, 4, 2)  # (T, h, g, S, c, t, lo)
    values = v.permute(0, 3, 2, 5, 4, 1, 6).reshape(-1).contiguous()  # (T, S, g, t, c, h, lo)
    # nibbles (Np, Kp/4): group of a pair = 16 * p + 8 * sel + 4 * half + q.
    nib = nibbles(compact).reshape(tiles, 2, 8, pairs, 2, 2, 4)  # (T, h, g, P, sel, half, q)
    shifts = 16 * torch.arange(2)[:, None] + 4 * torch.arange(4)[None, :]  # (h, q)
    shifts = shifts.to(nib.device).reshape(1, 2, 1, 1, 1, 1, 4)
    words = (nib << shifts).sum(dim=(1, 6))  # (T, g, P, sel, half)
    words = words.permute(0, 2, 1, 3, 4).reshape(-1)  # (T, P, lane = 4g + 2sel + half)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()
    return Mma24(values=values, meta=words, out_features=n, in_features=k)


def pack_mma24_e4m3(values: torch.Tensor) -> Mma24:
    """`pack_mma24` for a 2:4 e4m3 weight `(N, K)` (`fp8.Fp8Weight.values`): the same
    fragments with one byte per value, so a lane's 8 values of a k-step are one 8-byte load
    (widened to fp16 in registers by the kernel). Negative zeros count as pruned."""
    if values.dtype != torch.float8_e4m3fn:
        raise InvalidArgumentError(f"expected float8_e4m3fn values, got {values.dtype}")
    wide = pack_mma24(values.to(torch.bfloat16))  # exact: bf16 holds every e4m3 value
    return Mma24(wide.values.to(values.dtype), wide.meta, wide.out_features, wide.in_features)


def unpack_mma24(packed: Mma24) -> torch.Tensor:
    """The dense `(N, K)` weight an `Mma24` stands for (exact inverse of `pack_mma24`)."""
    tiles, pairs = packed.tiles, packed.pairs
    v = packed.values.reshape(tiles, 2 * pairs, 8, 4, 2, 2, 2)  # (T, S, g, t, c, h, lo)
    values = v.permute(0, 5, 2, 1, 4, 3, 6).reshape(tiles * MMA_TILE_ROWS, -1)
    words = packed.meta.to(torch.int64).reshape(tiles, pairs, 8, 2, 2) & 0xFFFFFFFF
    shifts = (16 * torch.arange(2)[:, None] + 4 * torch.arange(4)[None, :]).to(words.device)
    nib = (words[..., None, None] >> shifts) & 0xF  # (T, P, g, sel, half, h, q)
    nib = nib.permute(0, 5, 2, 1, 3, 4, 6).reshape(tiles * MMA_TILE_ROWS, -1)
    dense = _scatter_groups(values, nib)
    return dense[: packed.out_features, : packed.in_features]
