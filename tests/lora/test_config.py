"""LoraConfig: validation, scaling, presets, dict round trip."""

import pytest

from lora.config import PRESETS, LoraConfig


def test_defaults_and_scaling():
    c = LoraConfig()
    assert c.scaling == 1.0 and c.fc1_layout == "shared-down" and c.fc2_layout == "shared-up"
    assert LoraConfig(rank=8, alpha=16).scaling == 2.0
    assert LoraConfig(targets=["*.linear_qkv"]).targets == ("*.linear_qkv",)  # lists become tuples


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"rank": 0}, "rank"),
        ({"fc1_layout": "shared_down"}, "fc1_layout"),
        ({"fc2_layout": "both"}, "fc2_layout"),
        ({"init": "gaussian"}, "init"),
        ({"dropout": 1.0}, "dropout"),
        ({"targets": ()}, "targets"),
    ],
)
def test_invalid_values_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kwargs)


def test_frozen():
    with pytest.raises(AttributeError):
        LoraConfig().rank = 3


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_roundtrip_through_dict(name):
    c = LoraConfig.preset(name, rank=4)
    assert c.rank == 4
    assert LoraConfig.from_dict(c.to_dict()) == c


def test_preset_contents():
    assert not LoraConfig.preset("dense").has_expert_adapters
    par = LoraConfig.preset("moe-parallel")
    assert par.parallel_expert and par.fc1_layout is None and par.fc2_layout is None
    assert LoraConfig.preset("moe-per-expert").fc2_layout == "per-expert"
    with pytest.raises(ValueError, match="unknown LoRA preset"):
        LoraConfig.preset("nope")
    with pytest.raises(ValueError, match=r"LoraConfig: unknown field\(s\) \[.bogus.\]"):
        LoraConfig.from_dict({"rank": 2, "bogus": 1})
