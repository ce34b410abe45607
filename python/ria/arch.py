"""What ria knows about model families: where the decoder blocks are, which modules
hold matrices (Linears, fused MoE experts, routers), and the few family rules a
deployable permutation needs: the *folds* (ARCHITECTURE.md, "The permutation contract").

Which modules read the same tensor is not a rule here: `ria.permutation.wiring` finds it
by tracing one forward of a block. A fold is what tracing cannot see: which rows of one
matrix make which input channels of the next, through an operation that keeps channels
apart (attention within a head, the gated activation of an MLP).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import UnsupportedModelError

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the longest `nn.ModuleList` of identical modules that contain
    `nn.Linear`s (`model.layers`, OPT's `model.decoder.layers`, ...), searched in the
    language model that `get_decoder()` names where it names one holding such a list (a
    vision-language model's vision tower can have more blocks, and text never runs it)."""
    lists = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and len({type(b) for b in module}) == 1
        and any(isinstance(m, nn.Linear) for m in module[0].modules())
    ]
    decoder = _decoder(model)
    inside = {id(m) for m in decoder.modules()} if decoder is not None else set()
    candidates = [c for c in lists if id(c[1]) in inside] or lists
    if not candidates:
        raise UnsupportedModelError(
            f"cannot find decoder blocks with nn.Linear layers in {type(model).__name__} "
            f"(model_type={model_type(model)!r})"
        )
    return max(candidates, key=lambda c: len(c[1]))


def _decoder(model: nn.Module) -> nn.Module | None:
    """The language model by transformers' own lookup (`PreTrainedModel.get_decoder`), or
    None where the model has none."""
    get_decoder = getattr(model, "get_decoder", None)
    if not callable(get_decoder):
        return None
    try:
        decoder = get_decoder()
    except (AttributeError, NotImplementedError, ValueError):  # its "exotic model" cases
        return None
    return decoder if isinstance(decoder, nn.Module) else None


def linear_at(block: nn.Module, name: str) -> nn.Linear:
    """The `nn.Linear` at `name` (dotted, relative to `block`)."""
    module = block.get_submodule(name)
    if not isinstance(module, nn.Linear):
        raise UnsupportedModelError(f"{name} is a {type(module).__name__}, not an nn.Linear")
    return module


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Every `nn.Linear` inside a block, by name relative to the block."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


@dataclass(frozen=True)
class Heads:
    """Attention geometry: query heads, key/value heads and the size of one head."""

    num_heads: int
    num_kv_heads: int
    head_dim: int


def _text_config(config: Any) -> Any:
    """The config of the language model: its own, or a multimodal model's text part."""
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if callable(get) else config


def attention_heads(model: PreTrainedModel) -> Heads:
    """The decoder's attention geometry (a vision-language model's text config)."""
    config = _text_config(model.config)
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Heads(heads, kv, head_dim)


# --- folds: the family rules of the permutation ----------------------------------------


@dataclass(frozen=True)
class HeadFold:
    """o_proj's input order, one within-head order per key/value head, folded into the
    rows of the Linear that makes v: value head j is rows `v_offset + j * v_stride +
    [0, head_dim)` of `v_source` (`v_proj`; Phi-3's fused `qkv_proj`; DeepSeek's
    `kv_b_proj`, whose heads interleave k_nope and v). Names are relative to the block."""

    o_proj: str
    v_source: str
    heads: Heads
    v_offset: int = 0
    v_stride: int = 0  # 0: head_dim

    def o_order(self, o_heads: torch.Tensor) -> torch.Tensor:
        """o_proj's full input order from `o_heads` `(num_kv_heads, head_dim)`."""
        h, d = self.heads, self.heads.head_dim
        group = h.num_heads // h.num_kv_heads
        return torch.cat([q * d + o_heads[q // group] for q in range(h.num_heads)]).long()

    def v_rows(self, o_heads: torch.Tensor, rows: int) -> torch.Tensor:
        """`v_source`'s output-row order (of its `rows` rows) that feeds o_proj's order."""
        order = torch.arange(rows)
        d, stride = self.heads.head_dim, self.v_stride or self.heads.head_dim
        for j in range(self.heads.num_kv_heads):
            start = self.v_offset + j * stride
            order[start : start + d] = start + o_heads[j].long()
        return order


@dataclass(frozen=True)
class MlpFold:
    """down's input order folded into the output rows of the matrices whose gated
    product it reads: `ups` (gate and up; or one fused `gate_up_proj` whose `parts` = 2
    halves, or interleaved rows, each get the order). Linears, names relative to the block."""

    down: str
    ups: tuple[str, ...]
    parts: int = 1
    interleaved: bool = False

    def up_rows(self, order: torch.Tensor) -> torch.Tensor:
        return expand_rows(order, self.parts, self.interleaved)


@dataclass(frozen=True)
class ExpertFold:
    """Each expert's down order folded into that expert's own rows of the fused
    `up` parameter (`gate_up_proj`: gate and up halves, or interleaved rows as gpt-oss
    stores them, transformers' `is_concatenated=False`)."""

    experts: str
    up: str
    down: str
    parts: int
    interleaved: bool

    def up_rows(self, order: torch.Tensor) -> torch.Tensor:
        return expand_rows(order, self.parts, self.interleaved)


def expand_rows(order: torch.Tensor, parts: int, interleaved: bool) -> torch.Tensor:
    """The row order of `parts` stacked (or interleaved) copies of a hidden order."""
    order = order.long()
    size = order.numel()
    if interleaved:
        return torch.stack([order * parts + k for k in range(parts)], dim=1).reshape(-1)
    return torch.cat([order + k * size for k in range(parts)])


Fold = HeadFold | MlpFold | ExpertFold


def block_folds(model: PreTrainedModel, block: nn.Module) -> list[Fold]:
    """The folds of one block, found by the names transformers gives these modules;
    a candidate whose shapes do not match its rule is left out (its matrices keep their
    order)."""
    folds: list[Fold] = []
    for name, module in block.named_modules():
        prefix = f"{name}." if name else ""
        kids = {k: m for k, m in module.named_children() if isinstance(m, nn.Linear)}
        head = _head_fold(model, kids, prefix)
        if head is not None:
            folds.append(head)
        mlp = _mlp_fold(kids, prefix)
        if mlp is not None:
            folds.append(mlp)
    for name, experts in fused_experts(block).items():
        fold = _expert_fold(name, experts)
        if fold is not None:
            folds.append(fold)
    return folds


def _head_fold(model: nn.Module, kids: dict[str, nn.Linear], prefix: str) -> HeadFold | None:
    o_name = next((k for k in ("o_proj", "out_proj") if k in kids), None)
    config = getattr(model, "config", None)
    if config is not None:
        config = _text_config(config)
    if o_name is None or config is None or not hasattr(config, "num_attention_heads"):
        return None
    heads = attention_heads(model)  # type: ignore[arg-type]
    o, h, kv, d = kids[o_name], heads.num_heads, heads.num_kv_heads, heads.head_dim
    fold = None
    if "v_proj" in kids and kids["v_proj"].out_features == kv * d:
        fold = HeadFold(prefix + o_name, prefix + "v_proj", heads)
    elif "qkv_proj" in kids and kids["qkv_proj"].out_features == (h + 2 * kv) * d:
        fold = HeadFold(prefix + o_name, prefix + "qkv_proj", heads, v_offset=(h + kv) * d)
    elif "kv_b_proj" in kids:  # MLA: every head has its own v, after its k_nope part
        nope, d = getattr(config, "qk_nope_head_dim", 0), getattr(config, "v_head_dim", 0)
        if kids["kv_b_proj"].out_features == h * (nope + d):
            heads = Heads(h, h, d)
            fold = HeadFold(prefix + o_name, prefix + "kv_b_proj", heads, nope, nope + d)
    if fold is None or o.in_features != fold.heads.num_heads * fold.heads.head_dim:
        return None
    return fold


def _mlp_fold(kids: dict[str, nn.Linear], prefix: str) -> MlpFold | None:
    for down, ups, parts in (
        ("down_proj", ("gate_proj", "up_proj"), 1),
        ("down_proj", ("gate_up_proj",), 2),  # Phi-3: gate and up halves
        ("fc2", ("fc1",), 1),
    ):
        if down in kids and all(u in kids for u in ups):
            hidden = kids[down].in_features
            if all(kids[u].out_features == parts * hidden for u in ups):
                return MlpFold(prefix + down, tuple(prefix + u for u in ups), parts)
    return None


def _expert_fold(name: str, experts: nn.Module) -> ExpertFold | None:
    matrices = expert_matrices(experts)
    gated = bool(getattr(experts, "has_gate", True))
    up = "gate_up_proj" if gated else "up_proj"
    if up not in matrices or "down_proj" not in matrices:
        return None
    parts = 2 if gated else 1
    interleaved = not getattr(experts, "is_concatenated", True)
    return ExpertFold(name, up, "down_proj", parts, interleaved)


def input_params(module: nn.Module) -> list[str]:
    """The parameters through which `module` reads its input's channels (the input
    dimension of each matrix they hold): a Linear's weight; fused experts' `gate_up_proj`
    (or `up_proj`); a router's `(experts, in)` weight. Raises UnsupportedModelError for
    any other module."""
    if isinstance(module, nn.Linear):
        return ["weight"]
    if hasattr(module, "is_transposed"):
        up = "gate_up_proj" if getattr(module, "has_gate", True) else "up_proj"
        param = getattr(module, up, None)
        if isinstance(param, torch.Tensor) and param.dim() == 3:
            return [up]
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return ["weight"]
    raise UnsupportedModelError(
        f"{type(module).__name__} reads the tensor, but ria does not know which of its "
        "parameters index the tensor's channels"
    )


def matrix_dim(module: nn.Module, param: torch.Tensor, axis: int) -> int:
    """The dimension of `param` (a 2-D weight, or fused experts' 3-D parameter, one
    matrix per expert along dim 0) that holds axis `axis` of its `(out, in)` matrices."""
    if param.dim() == 2:
        return axis
    transposed = bool(getattr(module, "is_transposed", False))
    return 1 + (1 - axis if transposed else axis)


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


def quantization_method(config: object) -> str | None:
    """The `quant_method` of `config.quantization_config` (transformers stores a dict or a
    config object), or None for a config without quantization."""
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return None
    method = (
        quantization.get("quant_method")
        if isinstance(quantization, dict)
        else getattr(quantization, "quant_method", None)
    )
    return str(getattr(method, "value", method) or "unknown method")
