"""add_adapters refuses a rank larger than a layer and save_adapters refuses non-finite factors (issue 19,
classes 3 and 7), on the real tiny Megatron GPT-MoE."""

import pytest
import torch

from calib.tiny_moe import TinyMoEConfig, build_tiny_gpt_moe
from lora.config import LoraConfig
from lora.model import adapter_modules, add_adapters, save_adapters


def test_rank_larger_than_the_layer_is_refused_naming_it(megatron_world):
    model = build_tiny_gpt_moe(TinyMoEConfig(hidden=32, heads=4, ffn_hidden=16), seed=0)
    with pytest.raises(
        ValueError, match=r"rank 40 of decoder\.layers\.0\.self_attention\.linear_(qkv|proj) exceeds 32"
    ):
        add_adapters(model, LoraConfig(rank=40))
    assert not adapter_modules(model)  # nothing changed
    # the expert projections: fc2 is (hidden 32 × ffn 16): per expert, rank 20 > 16 only there
    cfg = LoraConfig(
        rank=4, targets=("*.mlp.experts",), rank_pattern={"*.linear_fc2": 20}, fc2_layout="per-expert"
    )
    with pytest.raises(
        ValueError, match=r"rank 20 of decoder\.layers\.0\.mlp\.experts\.linear_fc2 exceeds 16"
    ):
        add_adapters(model, cfg)
    # shared-up (one lora_up for all experts): the stacked (32 × E·16) allows up to 32, not 33
    cfg = LoraConfig(rank=4, targets=("*.mlp.experts",), rank_pattern={"*.linear_fc2": 33})
    with pytest.raises(ValueError, match=r"linear_fc2 exceeds 32, its largest \(shared-up"):
        add_adapters(model, cfg)
    assert not adapter_modules(model)
    assert add_adapters(model, LoraConfig(rank=16))  # equal to min(in, out) is allowed
    model = build_tiny_gpt_moe(TinyMoEConfig(hidden=32, heads=4, ffn_hidden=16), seed=0)
    shared_up = LoraConfig(rank=4, targets=("*.mlp.experts",), rank_pattern={"*.linear_fc2": 24})
    assert add_adapters(model, shared_up)  # 16 < 24 <= 32: a rank allocation may give a shared-up this


def test_save_adapters_refuses_nan_factors(megatron_world, tmp_path):
    model = build_tiny_gpt_moe(TinyMoEConfig(hidden=32, heads=4, ffn_hidden=16), seed=0)
    add_adapters(model, LoraConfig(rank=4, init="random"))
    save_adapters(model, tmp_path / "ok.safetensors")
    name, p = next((n, p) for n, p in model.named_parameters() if "lora_" in n)
    with torch.no_grad():
        p.view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="holds NaN or inf; refusing to write"):
        save_adapters(model, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()
