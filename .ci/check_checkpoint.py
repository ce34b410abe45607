"""CI: the README's main command left a checkpoint that plain transformers reloads as a
2:4-pruned model, and that `ria.load_pruned` reloads with its channel orders, every pruned
weight 2:4 in storage order once they are applied as `ria.sparsify` applies them, both
computing the same function.

    python .ci/check_checkpoint.py DIR
"""

from __future__ import annotations

import sys

import torch
from transformers import AutoModelForCausalLM

import ria
from ria.arch import block_linears, find_blocks
from ria.permutation import apply_recorded_orders, weight_in_nm_order


def decoder_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    path, blocks = find_blocks(model)
    return {
        f"{path}.{i}.{name}": linear
        for i, block in enumerate(blocks)
        for name, linear in block_linears(block).items()
    }


def main(path: str) -> None:
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    stored = ria.load_pruned(path, dtype=torch.float32).eval()
    assert plain.config.ria["sparsity"] == "2:4", plain.config.ria
    for name, linear in decoder_linears(plain).items():
        # 2:4 zeroes half of every row (a quantised model may hold a few zeros of its own).
        zeros = (linear.weight == 0).sum(dim=1)
        assert int(zeros.min()) >= linear.in_features // 2, f"{name} is not pruned to 2:4"
    apply_recorded_orders(stored)  # shared orders: one gather a group, weights reordered
    for name, linear in decoder_linears(stored).items():
        weight = weight_in_nm_order(linear)  # a Linear's own order (free), if any
        kept = (weight != 0).reshape(linear.out_features, -1, 4).sum(-1)
        assert int(kept.max()) <= 2, f"{name} is not 2:4 along its channel order"
    ids = torch.arange(1, 65)[None]
    with torch.no_grad():
        a, b = plain(ids).logits, stored(ids).logits
    # Same function up to float rounding (the permuted sums run in another order).
    rel = float((a - b).norm() / a.norm())
    assert rel < 1e-5, f"plain and ria loads differ: relative error {rel:.2e}"
    print(f"{path}: {len(decoder_linears(plain))} Linears 2:4, plain and ria loads agree")


if __name__ == "__main__":
    main(sys.argv[1])
