"""LoraConfig: validation, scaling, presets, dict round trip."""

import json

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


def test_unknown_fields_are_rejected_in_one_line_naming_them():
    with pytest.raises(ValueError) as info:
        LoraConfig.from_dict({"rank": 2, "bogus": 1, "rnak": 3})
    message = str(info.value)
    assert "\n" not in message and message.startswith("LoraConfig: unknown field(s) ['bogus', 'rnak']")


def test_version_round_trip_and_version_less_dicts():
    c = LoraConfig(rank=8, rank_pattern={"*.linear_qkv": 4})
    d = json.loads(json.dumps(c.to_dict()))  # JSON-friendly
    assert d["version"] == LoraConfig.VERSION == 1
    assert LoraConfig.from_dict(d) == c
    old = {k: v for k, v in d.items() if k != "version"}  # written before configs had a version
    assert LoraConfig.from_dict(old) == c
    with pytest.raises(ValueError, match="LoraConfig: version 2"):
        LoraConfig.from_dict({**d, "version": 2})


def test_replace_validates_again():
    c = LoraConfig(rank=8)
    assert c.replace(rank=4).rank == 4 and c.rank == 8
    with pytest.raises(ValueError, match="rank"):
        c.replace(rank=0)


_NAMES = [
    "decoder.layers.0.self_attention.linear_qkv",
    "decoder.layers.0.self_attention.linear_proj",
    "decoder.layers.0.mlp.linear_fc1",  # a dense MLP
    "decoder.layers.1.mlp.shared_experts.linear_fc1",  # the shared experts: a dense MLP
    "decoder.layers.1.mlp.experts.linear_fc1",  # expert projections (names of rank_for)
    "decoder.layers.1.mlp.experts.linear_fc2",
    "decoder.layers.1.mlp.experts.parallel",
]


@pytest.mark.parametrize("fc1_rank,fc2_rank", [(4, 12), (None, 6), (8, None), (8, 8), (None, None)])
def test_old_fc1_rank_fc2_rank_dicts_load_to_the_same_ranks(fc1_rank, fc2_rank):
    old = {"rank": 8, "targets": ["*"], "fc1_rank": fc1_rank, "fc2_rank": fc2_rank, "init": "zeros"}
    c = LoraConfig.from_dict(old)
    # the ranks before rank_pattern: lora.model.add_adapters gave dense adapters `rank`, expert groups
    # fc1_rank / fc2_rank (None: rank) and the parallel adapter `rank`
    before = {"linear_fc1": fc1_rank or 8, "linear_fc2": fc2_rank or 8}
    for name in _NAMES:
        head, _, tail = name.rpartition(".")
        want = before.get(tail, 8) if head.endswith(".mlp.experts") else 8
        assert c.rank_for(name) == want, name
    assert LoraConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['fc1_rank'\]"):  # only version-less dicts
        LoraConfig.from_dict({**c.to_dict(), "fc1_rank": 4})


def test_rank_pattern_first_match_wins():
    c = LoraConfig(
        rank=16,
        rank_pattern={"*.layers.1.mlp.experts.linear_fc1": 2, "*linear_fc1": 4, "*.experts.*": 8},
    )
    assert c.rank_for("decoder.layers.1.mlp.experts.linear_fc1") == 2  # first of three matches
    assert c.rank_for("decoder.layers.0.mlp.experts.linear_fc1") == 4  # first of two
    assert c.rank_for("decoder.layers.0.mlp.linear_fc1") == 4
    assert c.rank_for("decoder.layers.0.mlp.experts.linear_fc2") == 8
    assert c.rank_for("decoder.layers.0.self_attention.linear_qkv") == 16  # no match: rank
    swapped = LoraConfig(rank=16, rank_pattern={"*linear_fc1": 4, "*.layers.1.mlp.experts.linear_fc1": 2})
    assert swapped.rank_for("decoder.layers.1.mlp.experts.linear_fc1") == 4
    assert c.scaling == 1.0 and LoraConfig(rank=8, alpha=16, rank_pattern={"*": 2}).scaling == 2.0
    assert hash(c) == hash(LoraConfig.from_dict(c.to_dict()))


@pytest.mark.parametrize("pattern", [{"*": 0}, {"*": 2.0}, {3: 4}])
def test_bad_rank_pattern_is_rejected(pattern):
    with pytest.raises(ValueError, match="rank_pattern"):
        LoraConfig(rank_pattern=pattern)
