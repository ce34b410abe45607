"""Architecture adapters: where the decoder blocks are, which Linears read the same
input, and the names the deployable permutation needs (ARCHITECTURE.md).

Pruning itself is generic (every `nn.Linear` inside the decoder blocks); the channel
permutation needs to know the block's wiring, so it is limited to the families below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from .errors import UnsupportedModelError

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class BlockSpec:
    """Names, relative to one decoder block, of the modules a permutation touches.

    attn_norm feeds attn_inputs (q, k, v); v's output rows carry o's input channels;
    mlp_norm feeds mlp_inputs (gate and up, or fc1); their output rows carry mlp_output's
    input channels.
    """

    blocks: str
    attn_norm: str
    attn_inputs: tuple[str, ...]
    v_proj: str
    o_proj: str
    mlp_norm: str
    mlp_inputs: tuple[str, ...]
    mlp_output: str

    def input_groups(self) -> list[tuple[str, ...]]:
        """Linears that read the same tensor (they share statistics and a permutation)."""
        return [self.attn_inputs, (self.o_proj,), self.mlp_inputs, (self.mlp_output,)]


_LLAMA_LIKE = BlockSpec(
    blocks="model.layers",
    attn_norm="input_layernorm",
    attn_inputs=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    v_proj="self_attn.v_proj",
    o_proj="self_attn.o_proj",
    mlp_norm="post_attention_layernorm",
    mlp_inputs=("mlp.gate_proj", "mlp.up_proj"),
    mlp_output="mlp.down_proj",
)

SPECS: dict[str, BlockSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "opt": BlockSpec(
        blocks="model.decoder.layers",
        attn_norm="self_attn_layer_norm",
        attn_inputs=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        v_proj="self_attn.v_proj",
        o_proj="self_attn.out_proj",
        mlp_norm="final_layer_norm",
        mlp_inputs=("fc1",),
        mlp_output="fc2",
    ),
}


def model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


def block_spec(model: nn.Module) -> BlockSpec | None:
    """The adapter for this model's family, or None when it has none."""
    return SPECS.get(model_type(model))


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the adapter's path, else the longest `nn.ModuleList` of
    identical modules that contain `nn.Linear`s."""
    spec = block_spec(model)
    if spec is not None:
        blocks = model.get_submodule(spec.blocks)
        if not isinstance(blocks, nn.ModuleList):
            raise UnsupportedModelError(
                f"{spec.blocks} of {type(model).__name__} is a {type(blocks).__name__}, "
                "not an nn.ModuleList of decoder blocks"
            )
        return spec.blocks, blocks
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and len({type(b) for b in module}) == 1
        and any(isinstance(m, nn.Linear) for m in module[0].modules())
    ]
    if not candidates:
        raise UnsupportedModelError(
            f"cannot find decoder blocks with nn.Linear layers in {type(model).__name__} "
            f"(model_type={model_type(model)!r}); supported families: {', '.join(SPECS)}"
        )
    return max(candidates, key=lambda c: len(c[1]))


def linear_at(block: nn.Module, name: str) -> nn.Linear:
    """The `nn.Linear` at `name` (dotted, relative to `block`)."""
    module = block.get_submodule(name)
    if not isinstance(module, nn.Linear):
        raise UnsupportedModelError(f"{name} is a {type(module).__name__}, not an nn.Linear")
    return module


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Every `nn.Linear` inside a block, by name relative to the block."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def input_groups(model: nn.Module, names: list[str]) -> list[tuple[str, ...]]:
    """Partition of a block's Linear names into groups that read the same input."""
    spec = block_spec(model)
    groups: list[tuple[str, ...]] = []
    if spec is not None:
        groups = [g for g in spec.input_groups() if all(n in names for n in g)]
    grouped = {n for g in groups for n in g}
    return groups + [(n,) for n in names if n not in grouped]


@dataclass(frozen=True)
class Heads:
    """Attention geometry: query heads, key/value heads and the size of one head."""

    num_heads: int
    num_kv_heads: int
    head_dim: int


def attention_heads(model: PreTrainedModel) -> Heads:
    config = model.config
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Heads(heads, kv, head_dim)


def require_permutable(model: nn.Module) -> BlockSpec:
    """The adapter, or a clear error when channel permutation is not supported."""
    spec = block_spec(model)
    if spec is None:
        raise UnsupportedModelError(
            f"channel permutation is not supported for model_type={model_type(model)!r}; "
            f"supported: {', '.join(SPECS)} (pruning without permute=True works for any "
            "model with nn.Linear decoder blocks)"
        )
    if model_type(model) == "opt" and not getattr(model.config, "do_layer_norm_before", True):
        raise UnsupportedModelError(
            "channel permutation needs pre-norm blocks; this OPT model normalises after the "
            "residual add (do_layer_norm_before=False, e.g. opt-350m)"
        )
    return spec


# --- mixture-of-experts blocks ---------------------------------------------------------


def fused_experts(block: nn.Module) -> dict[str, nn.Module]:
    """The modules inside a block that hold experts as fused 3-D parameters (transformers
    5: `experts.gate_up_proj` `(experts, 2 * intermediate, hidden)`, `experts.down_proj`),
    by name relative to the block.

    Only modules whose layout transformers declares (its `use_experts_implementation`
    sets `is_transposed`) count: the input dimension of any other 3-D weight is a guess
    (Llama 4 stores `(experts, in, out)` without saying so), and stays dense.
    """
    return {
        name: module
        for name, module in block.named_modules()
        if hasattr(module, "is_transposed")
        and any(p.dim() == 3 for p in module.parameters(recurse=False))
    }


def expert_matrices(experts: nn.Module) -> dict[str, tuple[nn.Parameter, bool]]:
    """An experts module's fused matrices: parameter name -> (parameter, transposed).

    Each holds one `(out, in)` matrix per expert along dim 0, or `(in, out)` when
    `transposed` (gpt-oss; transformers marks such modules `is_transposed`).
    """
    transposed = bool(getattr(experts, "is_transposed", False))
    return {
        name: (param, transposed)
        for name, param in experts.named_parameters(recurse=False)
        if param.dim() == 3
    }


def is_router(block: nn.Module, name: str) -> bool:
    """Whether the module at `name` (relative to `block`) routes tokens to experts: it or
    a module above it is named like a router, or it is an `nn.Linear` directly beside
    `experts` (a Linear router, or the gate of a shared expert). Routers stay dense."""
    parts = name.split(".")
    for depth in range(1, len(parts) + 1):
        module = block.get_submodule(".".join(parts[:depth]))
        if parts[depth - 1] == "router" or "router" in type(module).__name__.lower():
            return True
    parent = block.get_submodule(".".join(parts[:-1])) if len(parts) > 1 else block
    return isinstance(module, nn.Linear) and hasattr(parent, "experts")
