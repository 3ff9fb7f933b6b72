"""Adapter API on the tiny Megatron GPT-MoE (one process): add / enable / disable / remove, freeze,
merge, transparent state dicts, adapter files, a single-rank dist checkpoint and bf16 training."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from calib.tiny_moe import tiny_moe_batch
from lora.adapters.layers import LoraExperts, LoraLinear
from lora.config import LoraConfig
from lora.model import (
    adapter_factors,
    adapter_state_dict,
    add_adapters,
    disable_adapters,
    enable_adapters,
    freeze_base,
    load_adapters,
    merge_adapters,
    remove_adapters,
    save_adapters,
    unmerge_adapters,
)
from tests.helpers.lora import CFG, lm_loss, tiny_model

pytestmark = pytest.mark.usefixtures("megatron_world")

MOE = LoraConfig.preset("moe", rank=4, alpha=8)
MOE_ALL = LoraConfig.preset("moe", rank=4, parallel_expert=True)
BATCH = tiny_moe_batch(CFG, batch=2, seed=0)


def _logits(model):
    with torch.no_grad():
        return model(BATCH["tokens"], BATCH["position_ids"], None)


def _random(config):
    return LoraConfig.from_dict({**config.to_dict(), "init": "random"})


def test_ranks_from_rank_pattern_and_from_an_old_fc1_rank_fc2_rank_dict():
    old = {**MOE_ALL.to_dict(), "fc1_rank": 2, "fc2_rank": 6}  # a dict written before rank_pattern
    del old["version"], old["rank_pattern"]
    model = tiny_model()
    add_adapters(model, LoraConfig.from_dict(old))
    for layer in model.decoder.layers:
        # as before: expert fc1 / fc2 their ranks, the parallel adapter and the dense layers `rank`
        assert layer.mlp.experts.ranks == {"fc1": 2, "fc2": 6, "parallel": 4}
        assert layer.mlp.experts.fc1_lora_down.shape[0] == 2 and layer.mlp.experts.fc2_lora_up.shape[1] == 6
        assert layer.self_attention.linear_qkv.rank == layer.self_attention.linear_proj.rank == 4
    pattern = {"decoder.layers.1.*": 3, "*.linear_qkv": 5}
    model = tiny_model()
    add_adapters(model, LoraConfig.preset("moe", rank=4, parallel_expert=True, rank_pattern=pattern))
    first, second = model.decoder.layers[0], model.decoder.layers[1]
    assert first.self_attention.linear_qkv.rank == 5 and first.self_attention.linear_proj.rank == 4
    assert first.mlp.experts.ranks == {"fc1": 4, "fc2": 4, "parallel": 4}
    assert second.self_attention.linear_qkv.rank == 3  # the first matching pattern wins
    assert second.mlp.experts.ranks == {"fc1": 3, "fc2": 3, "parallel": 3}


def test_add_adapters_wraps_the_targets_and_kaiming_init_keeps_the_model():
    model = tiny_model()
    ref = _logits(model)
    names = add_adapters(model, MOE_ALL)
    assert names == [
        f"decoder.layers.{i}.{m}"
        for i in range(CFG.num_layers)
        for m in ("self_attention.linear_proj", "self_attention.linear_qkv", "mlp.experts")
    ]
    assert isinstance(model.decoder.layers[0].mlp.experts, LoraExperts)
    assert isinstance(model.decoder.layers[1].self_attention.linear_qkv, LoraLinear)
    assert torch.equal(_logits(model), ref)
    with pytest.raises(ValueError, match="already has an adapter"):
        add_adapters(model, MOE)
    with pytest.raises(ValueError, match="SequentialMLP or TEGroupedMLP matched targets"):
        add_adapters(tiny_model(), LoraConfig(targets=("*.nothing",)))


def test_adapter_keys_use_global_expert_indices_and_one_entry_per_shared_factor():
    model = tiny_model()
    add_adapters(model, MOE_ALL)
    keys = set(adapter_state_dict(model))
    g = "decoder.layers.0.mlp.experts"
    for shared in ("linear_fc1.lora_down", "linear_fc2.lora_up", "parallel.lora_down"):
        assert f"{g}.{shared}" in keys
    for e in range(CFG.num_experts):
        for own in ("linear_fc1.lora_up", "linear_fc2.lora_down", "parallel.lora_up"):
            assert f"{g}.experts.{e}.{own}" in keys
    assert "decoder.layers.1.self_attention.linear_qkv.lora_down" in keys


def test_freeze_base_only_adapter_parameters_receive_gradients():
    model = tiny_model()
    add_adapters(model, _random(MOE_ALL))
    trainable = freeze_base(model)
    adapter_ids = {id(f.param) for f in adapter_factors(model).values()}
    assert len(trainable) == len(adapter_ids) > 0
    lm_loss(model, BATCH).backward()
    for name, p in model.named_parameters():
        if id(p) in adapter_ids:
            assert p.requires_grad and p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().max() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_enable_disable_and_remove_by_pattern():
    model = tiny_model()
    ref = _logits(model)
    base_keys = set(model.state_dict())
    add_adapters(model, _random(MOE_ALL))
    adapted = _logits(model)
    assert not torch.allclose(adapted, ref)
    assert len(disable_adapters(model)) == 6
    assert torch.equal(_logits(model), ref)
    assert enable_adapters(model, "decoder.layers.1.*") == [
        "decoder.layers.1.self_attention.linear_proj",
        "decoder.layers.1.self_attention.linear_qkv",
        "decoder.layers.1.mlp.experts",
    ]
    partial = _logits(model)
    assert not torch.allclose(partial, ref) and not torch.allclose(partial, adapted)
    enable_adapters(model)
    torch.testing.assert_close(_logits(model), adapted)
    assert remove_adapters(model, "*.linear_qkv") == [
        f"decoder.layers.{i}.self_attention.linear_qkv" for i in (0, 1)
    ]
    remove_adapters(model)
    assert set(model.state_dict()) == base_keys
    assert not any("base" in n for n, _ in model.named_modules())
    assert torch.equal(_logits(model), ref)


def test_merge_and_unmerge_whole_model():
    model = tiny_model()
    add_adapters(model, _random(MOE))
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("weight")}
    adapted = _logits(model)
    assert len(merge_adapters(model)) == 6
    with pytest.raises(RuntimeError, match="unmerge_adapters"):
        disable_adapters(model)
    torch.testing.assert_close(_logits(model), adapted, rtol=1e-4, atol=1e-5)
    unmerge_adapters(model)
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6, msg=n)
    torch.testing.assert_close(_logits(model), adapted, rtol=1e-5, atol=1e-6)

    par = tiny_model()
    add_adapters(par, MOE_ALL)
    with pytest.raises(TypeError, match="decoder.layers.0.mlp.experts.*cannot be merged"):
        merge_adapters(par, "*.experts")


def test_state_dicts_are_transparent():
    """An unadapted model's (plain and sharded) state dict keys are a subset of the adapted model's;
    the difference is the adapter parameters only."""
    plain = tiny_model(seed=4)
    plain_sd = plain.state_dict()
    plain_sharded = {v.key for v in plain.sharded_state_dict().values()}
    model = tiny_model(seed=5)
    add_adapters(model, _random(MOE_ALL))
    result = model.load_state_dict(plain_sd, strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all("lora_" in k for k in result.missing_keys)
    disable_adapters(model)
    assert torch.equal(_logits(model), _logits(plain))  # the base weights were loaded
    enable_adapters(model)
    adapted_sharded = {v.key for v in model.sharded_state_dict().values()}
    assert plain_sharded <= adapted_sharded
    assert all("lora_" in k for k in adapted_sharded - plain_sharded)
    model.load_state_dict(model.state_dict())  # strict round trip


def test_save_and_load_adapters_roundtrip(tmp_path):
    model = tiny_model()
    add_adapters(model, _random(MOE_ALL), seed=3)
    path = save_adapters(model, tmp_path / "a.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]  # no temporary left
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    (cfg, names), *rest = json.loads(meta["configs"])
    assert not rest and LoraConfig.from_dict(cfg) == _random(MOE_ALL) and len(names) == 6

    fresh = tiny_model()
    loaded = load_adapters(fresh, path)  # adds the adapters from the file's config
    assert sorted(loaded) == sorted(names)
    saved = adapter_state_dict(model)
    got = adapter_state_dict(fresh)
    assert set(got) == set(saved)
    for k in saved:
        assert torch.equal(got[k], saved[k]), k
    torch.testing.assert_close(_logits(fresh), _logits(model), rtol=0, atol=0)

    other = tiny_model()
    add_adapters(other, MOE_ALL, seed=9)  # existing adapters are filled in place
    load_adapters(other, path)
    assert all(torch.equal(adapter_state_dict(other)[k], saved[k]) for k in saved)


def test_load_adapters_errors_name_the_adapter(tmp_path):
    model = tiny_model()
    add_adapters(model, MOE)
    path = save_adapters(model, tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}

    key = "decoder.layers.1.mlp.experts.experts.2.linear_fc1.lora_up"
    missing = {k: v for k, v in tensors.items() if k != key}
    save_file(missing, str(tmp_path / "missing.safetensors"), metadata=meta)
    with pytest.raises(KeyError, match=f"adapter decoder.layers.1.mlp.experts: tensor {key} is missing"):
        load_adapters(model, tmp_path / "missing.safetensors")

    bad = dict(tensors, **{"decoder.layers.0.self_attention.linear_proj.lora_down": torch.zeros(4, 3)})
    save_file(bad, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"adapter decoder.layers.0.self_attention.linear_proj: .*\(4, 3\)"):
        load_adapters(model, tmp_path / "bad.safetensors")

    extra = dict(tensors, **{"decoder.layers.0.mlp.experts.experts.9.linear_fc1.lora_up": torch.zeros(1)})
    save_file(extra, str(tmp_path / "extra.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="no adapter of the model expects"):
        load_adapters(model, tmp_path / "extra.safetensors")
    load_adapters(model, tmp_path / "extra.safetensors", strict=False)

    save_file(tensors, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not an adapter file"):
        load_adapters(model, tmp_path / "plain.safetensors")


def test_dist_checkpoint_roundtrip_single_rank(tmp_path):
    from megatron.core import dist_checkpointing

    model = tiny_model(seed=2)
    add_adapters(model, _random(MOE_ALL), seed=1)
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp_path))
    fresh = tiny_model(seed=3)
    add_adapters(fresh, _random(MOE_ALL), seed=2)
    fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), str(tmp_path)))
    want, got = dict(model.named_parameters()), dict(fresh.named_parameters())
    assert set(want) == set(got)
    for n in want:
        assert torch.equal(got[n], want[n]), n


def test_bf16_training_loss_decreases():
    model = tiny_model(seed=6, dtype="bfloat16")
    add_adapters(model, LoraConfig.preset("moe", rank=8, parallel_expert=True))
    freeze_base(model)
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.bfloat16 for p in params)
    opt = torch.optim.AdamW(params, lr=2e-2)
    losses = []
    for _ in range(6):
        loss = lm_loss(model, BATCH)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0], losses
