"""What a prune covers: the share of the decoder's matrix-multiply parameters that ria
prunes, and every weight that stays dense with the reason, so a report can never claim
"50% sparse" for a model whose weights it did not reach (routers, or a kind of weight
ria does not know).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from ..arch import is_router
from .matrices import block_matrices, is_matmul_weight

__all__ = ["MIN_COVERAGE", "Coverage", "DenseWeight", "decoder_coverage"]

# Below this share of the decoder's matmul parameters, `prune` refuses unless told
# `allow_partial=True`.
MIN_COVERAGE = 0.9


@dataclass(frozen=True)
class DenseWeight:
    """A matrix-multiply weight that stays dense: its name, parameter count and why."""

    name: str
    params: int
    reason: str


@dataclass(frozen=True)
class Coverage:
    """`pruned_params` of the decoder blocks' `decoder_params` matmul parameters (every
    parameter of 2 or more dimensions inside a block but biases) are pruned; `dense`
    lists the weights that are not, inside the blocks and out (embeddings, the LM head)."""

    pruned_params: int
    decoder_params: int
    dense: list[DenseWeight] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        """Share of the decoder's matmul parameters pruned (1.0 for an empty decoder)."""
        return self.pruned_params / self.decoder_params if self.decoder_params else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "pruned_params": self.pruned_params,
            "decoder_params": self.decoder_params,
            "fraction": self.fraction,
            "dense": [asdict(d) for d in self.dense],
        }

    def summary(self, limit: int = 4) -> str:
        """One line: the fraction and the largest weights left dense."""
        line = f"pruned {100 * self.fraction:.1f}% of the decoder's matmul parameters"
        if not self.dense:
            return line
        largest = sorted(self.dense, key=lambda d: -d.params)[:limit]
        shown = "; ".join(f"{d.name} ({d.reason})" for d in largest)
        more = len(self.dense) - len(largest)
        return f"{line}; dense: {shown}" + (f"; and {more} more" if more > 0 else "")


def decoder_coverage(model: nn.Module, blocks_path: str, blocks: nn.ModuleList) -> Coverage:
    """Which matmul weights `prune` reaches: the prunable matrices of the decoder blocks
    (Linears and fused experts). Everything else of 2+ dimensions is listed with a reason."""
    pruned = decoder = 0
    dense: list[DenseWeight] = []
    for i, block in enumerate(blocks):
        prunable = {id(m.param) for m in block_matrices(block).values()}
        for name, param in block.named_parameters():
            if not is_matmul_weight(name, param):
                continue  # norms, biases, scales: not matrix multiplies
            decoder += param.numel()
            if id(param) in prunable:
                pruned += param.numel()
            else:
                reason = _why_dense(block, name, param.dim())
                dense.append(DenseWeight(f"{blocks_path}.{i}.{name}", param.numel(), reason))
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    for name, param in model.named_parameters():
        if param.dim() >= 2 and id(param) not in in_blocks:
            dense.append(DenseWeight(name, param.numel(), _outside_reason(model, param)))
    return Coverage(pruned, decoder, dense)


def _why_dense(block: nn.Module, name: str, dims: int) -> str:
    owner_name = name.rpartition(".")[0]
    kind = type(block.get_submodule(owner_name) if owner_name else block).__name__
    if owner_name and is_router(block, owner_name):
        return f"router ({kind}): stays dense"
    if dims == 3:
        return (
            f"3-D weights of {kind}, whose layout transformers does not declare "
            "(no use_experts_implementation): not pruned"
        )
    return f"{kind} is neither an nn.Linear nor fused experts: not pruned"


def _outside_reason(model: nn.Module, param: nn.Parameter) -> str:
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if embeddings is not None and param is getattr(embeddings, "weight", None):
        return "input embedding: never pruned"
    if head is not None and param is getattr(head, "weight", None):
        return "output head (lm_head): never pruned"
    return "outside the decoder blocks: never pruned"
