"""Folded channel orders (`permute=True`) for every family: the traced input groups and
the family's folds keep the function, 2:4 masks chosen in permuted order are 2:4 in
storage order, and checkpoints reload (plain: same logits; `load_pruned`: the same
storage order)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import (
    ALL_FAMILIES,
    FAST_SEARCH,
    along_input,
    logits,
    rows_in_nm,
    tiny_model,
    traced_layouts,
)
from transformers import AutoModelForCausalLM

import ria
from ria.arch import find_blocks
from ria.permutation import (
    ChannelGather,
    apply_block,
    apply_recorded_orders,
    block_layout,
    group_order,
    input_gather,
    nm_order,
    search_block,
    weight_in_nm_order,
)
from ria.pruning import block_matrices
from ria.save import PERMUTATION_FILE, saved_orders

# Where each family's shared orders are applied, per block (readers -> gather), as the
# trace must find them: the norm before the readers, else the module that receives the
# raw residual stream (OLMo 2's post-norm blocks).
EXPECTED_GROUPS = {
    "llama": {("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"): "output",
              ("mlp.gate_proj", "mlp.up_proj"): "output"},
    "opt": {("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"): "output",
            ("fc1",): "output"},
    "olmo2": {("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"): "input",
              ("mlp.gate_proj", "mlp.up_proj"): "input"},
    "phi3": {("self_attn.qkv_proj",): "output", ("mlp.gate_up_proj",): "output"},
    "cohere": {("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
                "mlp.up_proj"): "output"},
    "gpt_oss": {("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"): "output",
                ("mlp.router", "mlp.experts"): "output"},
}  # fmt: skip


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_folded_orders_alone_leave_logits_unchanged(family):
    model = tiny_model(family)
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    before = logits(model, ids)
    rng = np.random.default_rng(0)
    for block, layout in zip(find_blocks(model)[1], traced_layouts(model), strict=True):
        gathers = {g.gather for g in layout.groups}
        assert gathers == {"input" if family == "olmo2" else "output"}, layout.groups
        if family in EXPECTED_GROUPS:
            assert {g.readers: g.gather for g in layout.groups} == EXPECTED_GROUPS[family]
        scores = {
            n: rng.random(m.shape).astype(np.float32) for n, m in block_matrices(block).items()
        }
        perm, _ = search_block(scores, layout, 2, 4, {"seed": 0, **FAST_SEARCH})
        # Every group, every fold got an order that moves something.
        assert len(perm.shared) == len(layout.groups)
        assert len(perm.heads) == len(layout.heads) == 1
        for order in [*perm.shared.values(), *perm.hidden.values()]:
            assert not torch.equal(order, torch.arange(order.numel()))
        assert len(perm.hidden) == len(layout.mlps) + sum(
            getattr(block.get_submodule(f.experts), f.down).shape[0] for f in layout.experts
        )
        apply_block(block, layout, perm)
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-5, atol=1e-5)


def decoder_24(model) -> tuple[int, int]:
    """(parameters in 2:4 rows along their input, in the order the sparse runtime reads
    them: the recorded orders applied, a Linear's own order taken, the decoder's matmul
    parameters), read from the weights."""
    model = copy.deepcopy(model)
    apply_recorded_orders(model)
    in_24 = total = 0
    for block in find_blocks(model)[1]:
        for module in block.modules():
            for name, param in module.named_parameters(recurse=False):
                if param.dim() < 2 or name.endswith("bias"):
                    continue
                own = nm_order(module) is not None and name == "weight"
                weight = weight_in_nm_order(module) if own else param.detach()
                rows = along_input(module, weight)
                total += param.numel()
                in_24 += int(rows_in_nm(rows, 2, 4).sum()) * rows.shape[1]
    return in_24, total


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_folded_prune_is_24_along_its_orders_and_round_trips(family, tokenizer, tmp_path):
    """After pruning, the model is plain in PyTorch (no gather; the readers' weights in
    original column order, each group's order recorded on its carrier), and 2:4 in storage
    order once the recorded orders are applied, as `ria.sparsify` applies them."""
    model = tiny_model(family)
    windows = ria.pruning.calibration_windows("austen", tokenizer, 2, 32, seed=0)
    report = ria.prune(
        model,
        sparsity="2:4",
        permute=True,
        calibration=windows,
        nsamples=2,
        seqlen=32,
        progress=False,
        permutation_options=FAST_SEARCH,
    )
    assert not any(isinstance(m, ChannelGather) or input_gather(m) for m in model.modules())
    carriers = {n for n, m in model.named_modules() if group_order(m) is not None}
    applied = copy.deepcopy(model)
    apply_recorded_orders(applied)  # (as sparsify does)
    in_24, total = decoder_24(model)
    assert in_24 >= 0.95 * total
    assert report.coverage is not None  # and it counts what the weights say
    assert (report.coverage.pruned_params, report.coverage.decoder_params) == (in_24, total)
    groups = report.permutation_groups
    # Every group gathered once, where README's table says: the norm before it, or
    # (OLMo 2) the module receiving the residual stream.
    assert groups and {g["gather"] for g in groups} == {"input" if family == "olmo2" else "output"}
    assert "shared orders gathered" in str(report)
    permuted = [r for r in report.layers if r.permutation is not None]
    assert len(permuted) == len(report.layers)  # every matrix had its order searched

    out = ria.save_pruned(model, tmp_path / family, tokenizer, report)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    pruned = logits(model, ids)
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any(isinstance(m, ChannelGather) or input_gather(m) for m in plain.modules())
    torch.testing.assert_close(logits(plain, ids), pruned, rtol=1e-4, atol=1e-4)
    assert set(saved_orders(out)) == {g["carrier"] for g in groups} == carriers
    torch.testing.assert_close(logits(applied, ids), pruned, rtol=1e-5, atol=1e-5)

    restored = ria.load_pruned(out).eval()
    assert restored.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    torch.testing.assert_close(logits(restored, ids), pruned, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "olmo2", "qwen3_moe", "deepseek_v3"])
def test_a_pruned_model_is_its_plain_checkpoint_in_memory(family, tokenizer, tmp_path):
    """After a folded prune the model's parameters, names and values, are those of its
    plain checkpoint (no ChannelGather keys, readers in original column order), so what
    tools exchange with it by state dict or by module means the same on both sides: a
    Trainer resuming from its plain checkpoint (`load_state_dict`), accelerate's
    `save_model`, PEFT adapters moved to a plain `from_pretrained` (each of those computed
    another function while the gathers lived in the model)."""
    model = tiny_model(family)
    ria.prune(model, tokenizer, sparsity="2:4", permute="folded", calibration="austen",
              nsamples=2, seqlen=32, progress=False, permutation_options=FAST_SEARCH)  # fmt: skip
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    pruned = logits(model, ids)
    plain = AutoModelForCausalLM.from_pretrained(ria.save_pruned(model, tmp_path / "out"))
    state = model.state_dict()
    assert state.keys() == plain.state_dict().keys()
    assert all(torch.equal(v, state[k]) for k, v in plain.state_dict().items())
    model.load_state_dict(plain.state_dict())  # (Trainer's resume)
    torch.testing.assert_close(logits(model, ids), pruned, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(plain.eval(), ids), pruned, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["folded", "free"])
def test_save_pretrained_of_a_permuted_model_writes_what_save_pruned_writes(
    mode, tokenizer, tmp_path
):
    # DESIGN's one-liner: prune(permute=True), then model.save_pretrained(out). It wrote
    # the weights in their permuted order: the reloaded model computed another function.
    model = tiny_model("llama")
    windows = ria.pruning.calibration_windows("austen", tokenizer, 2, 32, seed=0)
    ria.prune(model, sparsity="2:4", permute=mode, calibration=windows, nsamples=2,
              seqlen=32, progress=False, permutation_options=FAST_SEARCH)  # fmt: skip
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    pruned = logits(model, ids)
    model.save_pretrained(tmp_path / "hf")
    ria.save_pruned(model, tmp_path / "ria")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(logits(plain, ids), pruned, rtol=1e-5, atol=1e-5)
    assert saved_orders(tmp_path / "hf").keys() == saved_orders(tmp_path / "ria").keys() != set()
    restored = ria.load_pruned(tmp_path / "hf")
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    # A copy saves itself, and a loaded model saves as it was loaded.
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.lm_head.weight.zero_()
    twin.save_pretrained(tmp_path / "twin")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "twin")
    assert not reloaded.lm_head.weight.any() and model.lm_head.weight.any()
    restored.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    torch.testing.assert_close(logits(again, ids), pruned, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["folded", "free"])
def test_save_pretrained_makes_a_state_dict_passed_in_plain(mode, tokenizer, tmp_path):
    # Trainer under FSDP or DeepSpeed saves `model.save_pretrained(out, state_dict=its
    # gathered copy)`: the copy, keyed as the model's own, was written as it was (folded
    # orders: reader columns permuted, norms under ChannelGather's keys, which
    # from_pretrained only warns about). DeepSpeed may leave frozen parameters out.
    model = tiny_model("llama")
    ria.prune(model, tokenizer, sparsity="2:4", permute=mode, nsamples=2, seqlen=32,
              calibration="austen", progress=False, permutation_options=FAST_SEARCH)  # fmt: skip
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    gathered = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "hf", state_dict=gathered)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(logits(plain, ids), logits(model, ids), rtol=1e-5, atol=1e-5)
    assert saved_orders(tmp_path / "hf").keys() == saved_orders(ria.save_pruned(
        model, tmp_path / "ria")).keys() != set()  # fmt: skip
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in gathered.items())  # unchanged
    # Without the embeddings (as if frozen and left out): the rest is still made plain.
    del gathered["model.embed_tokens.weight"]
    model.save_pretrained(tmp_path / "partial", state_dict=gathered)
    again = ria.load_pruned(tmp_path / "partial")  # (the embeddings re-initialised)
    blocks = {k: v for k, v in again.state_dict().items() if ".layers." in k}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in blocks.items())
    # Not the main process: the weights are its to write or not, the orders file is not.
    model.save_pretrained(tmp_path / "rank1", state_dict=gathered, is_main_process=False)
    assert not (tmp_path / "rank1" / PERMUTATION_FILE).exists()


class _Shared(torch.nn.Module):
    """A block whose norm output is read by two Linears and by the residual add too, and
    whose third Linear reads the raw input alone."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(8)
        self.a, self.b, self.c = (torch.nn.Linear(8, 8) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return h + self.a(h) + self.b(h) + self.c(x * 2)


def test_a_group_whose_tensor_is_read_elsewhere_keeps_its_order():
    block = _Shared()
    layout = block_layout(None, block, lambda: block(torch.randn(2, 3, 8)))
    groups = {g.readers: g for g in layout.groups}
    assert set(groups) == {("a", "b"), ("c",)}
    assert groups[("a", "b")].gather is None
    assert "read by other operations too" in (groups[("a", "b")].reason or "")
    assert (groups[("c",)].gather, groups[("c",)].carrier) == ("linear", "c")


def test_folded_orders_without_calibration_data_are_traced_on_probe_tokens():
    model = tiny_model("olmo2")
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    report = ria.prune(
        model,
        sparsity="2:4",
        method="magnitude",
        calibration=None,
        permute=True,
        progress=False,
        permutation_options=FAST_SEARCH,
    )
    assert [g["gather"] for g in report.permutation_groups] == ["input"] * 4
    in_24, total = decoder_24(model)
    assert in_24 == total
    assert torch.isfinite(logits(model, ids)).all()


def test_post_norm_opt_gathers_module_inputs():
    """opt-350m normalises after the residual add: q/k/v read the block's input, so their
    order is gathered at the attention's input, and fc1's (its norm's output also feeds
    the residual) at fc1's own input: two gathers per block, as the pre-norm families."""
    model = tiny_model("opt", do_layer_norm_before=False)
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    before = logits(model, ids)
    rng = np.random.default_rng(0)
    for block, layout in zip(find_blocks(model)[1], traced_layouts(model), strict=True):
        assert {g.carrier: g.gather for g in layout.groups} == {
            "self_attn": "input",
            "fc1": "linear",
        }
        scores = {
            n: rng.random(m.shape).astype(np.float32) for n, m in block_matrices(block).items()
        }
        apply_block(block, layout, search_block(scores, layout, 2, 4, FAST_SEARCH)[0])
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-5, atol=1e-5)


class _NotAnMlp(torch.nn.Module):
    """Named and shaped like an MLP, but down reads `[x, x]`, not gate * up."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = torch.nn.Linear(8, 16), torch.nn.Linear(8, 16)
        self.down_proj = torch.nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        product = self.gate_proj(x) * self.up_proj(x)
        return product.sum(-1, keepdim=True) + self.down_proj(torch.cat([x, x], -1))


def test_a_fold_the_traced_forward_contradicts_is_left_out():
    block = _NotAnMlp()
    assert len(block_layout(None, block, None).folds) == 1  # the names match the rule
    layout = block_layout(None, block, lambda: block(torch.randn(3, 8)))
    assert layout.folds == ()
    assert {g.readers: g.gather for g in layout.groups} == {
        ("gate_proj", "up_proj"): None,  # x is read by the concatenation too
        ("down_proj",): "linear",
    }


class _ScaledMlp(torch.nn.Module):
    """An MLP with a per-channel weight between gate * up and down (BitNet's sub-norm
    has one): down's input is made from gate and up alone, as a fold needs, but its
    channels are scaled unequally, so reordering gate/up's rows changes down's output."""

    def __init__(self, scale: torch.Tensor) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = torch.nn.Linear(8, 16), torch.nn.Linear(8, 16)
        self.down_proj = torch.nn.Linear(16, 8)
        self.scale = torch.nn.Parameter(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_proj(x) * self.up_proj(x) * self.scale)


def test_a_fold_through_per_channel_weights_is_left_out():
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    uneven = _ScaledMlp(torch.linspace(0.5, 1.5, 16))
    even = _ScaledMlp(torch.full((16,), 0.7))
    assert len(block_layout(None, uneven, lambda: uneven(x)).folds) == 0
    assert len(block_layout(None, even, lambda: even(x)).folds) == 1  # equal weights: it holds
    before = {n: p.detach().clone() for n, p in uneven.named_parameters()}
    block_layout(None, uneven, lambda: uneven(x))
    for n, p in uneven.named_parameters():  # the check's trial order was put back
        assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("mode", ["folded", "free"])
def test_bitnet_sub_norms_keep_their_channels_in_order(mode):
    # Its RMSNorms with weights of their own sit between gate * up and down_proj and
    # between attention and o_proj: both folds changed the model (logits off by 0.6-0.85).
    from transformers import BitNetConfig

    config = BitNetConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # trained checkpoints' norms are not all ones
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.5 * torch.randn_like(p))
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    before = logits(model, ids)
    rng = np.random.default_rng(0)
    for block, layout in zip(find_blocks(model)[1], traced_layouts(model), strict=True):
        assert layout.folds == ()
        scores = {
            n: rng.random(m.shape).astype(np.float32) for n, m in block_matrices(block).items()
        }
        perm, _ = search_block(scores, layout, 2, 4, FAST_SEARCH, mode)
        apply_block(block, layout, perm)
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-5, atol=1e-5)


def tiny_qwen2_vl() -> torch.nn.Module:
    """A vision-language model whose vision tower (4 blocks) outnumbers its language
    model's (2): text never runs the tower."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
        rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]},
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    vision = dict(
        depth=4, embed_dim=32, hidden_size=64, num_heads=4, in_channels=3, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2,
    )  # fmt: skip
    config = Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=500, video_token_id=501,
        vision_start_token_id=502,
    )  # fmt: skip
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(config).eval()


def test_a_vision_language_model_prunes_its_language_model():
    model = tiny_qwen2_vl()
    path, blocks = find_blocks(model)
    assert path.endswith("language_model.layers") and len(blocks) == 2
    before = {n: p.clone() for n, p in model.named_parameters()}
    ids = torch.randint(3, 400, (4, 16), generator=torch.Generator().manual_seed(1))
    report = ria.prune(
        model, sparsity="2:4", calibration=ids, nsamples=4, seqlen=16, progress=False
    )
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(f"{path}.") for n in changed)
    assert any(d.name.startswith("model.visual.") for d in report.coverage.dense)
    # Its head geometry is in the text config: o_proj's order is folded into v's rows
    # (it was gathered per call, the model config having no num_attention_heads).
    assert {type(f).__name__ for f in block_layout(model, blocks[0], None).folds} == {
        "HeadFold",
        "MlpFold",
    }


def test_blocks_the_forward_never_runs_are_refused():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    # LLaMA runs config.num_hidden_layers blocks: a third one is never called.
    extra = copy.deepcopy(model.model.layers[0])
    model.model.layers = torch.nn.ModuleList([*model.model.layers, extra])
    with pytest.raises(ria.UnsupportedModelError, match="never ran decoder block 2"):
        ria.prune(model, sparsity="2:4", calibration=ids, nsamples=2, seqlen=8, progress=False)
