"""svdq export / load of Hugging Face MoE models quantized with svdq.quantize (SVDQExperts): a fresh model
of the same config reloads bit for bit (state and logits), through lora.io.api too; mismatches are one
clear error before the model changes."""

from __future__ import annotations

import json

import pytest
import torch

import lora
import svdq
from lora.io.container import read_metadata
from lora.io.torch_model import export_torch, load_torch
from svdq import SVDQConfig
from svdq.experts import SVDQExperts
from tests.helpers.hf_moe import FAMILIES, experts_modules, forward_loop_of, lm_loss, tiny_moe, token_batches

CFG = SVDQConfig(rank=8, alphas=(0.0, 0.5), sample_tokens=128)


def _quantized(family: str, **kw):
    model = tiny_moe(family)
    svdq.quantize(model, CFG, forward_loop_of(token_batches(3)), progress=False, report=False, **kw)
    return model


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("family", FAMILIES)
def test_export_reload_bit_exact(family, tmp_path):
    model = _quantized(family)
    # fine-tune a little so the stored factors differ from the decomposition
    params = [p for n, p in model.named_parameters() if n.endswith(("lora_down", "lora_up"))]
    opt = torch.optim.Adam(params, lr=1e-3)
    opt.zero_grad()
    lm_loss(model, token_batches(1, seed=5)[0]).backward()
    opt.step()
    lora.export(model, tmp_path / "ckpt", format="svdq", progress=False)
    meta = read_metadata(tmp_path / "ckpt")
    names = [n for n, m in model.named_modules() if isinstance(m, SVDQExperts)]
    assert sorted(meta["experts"]) == sorted(names)
    em = meta["experts"][names[0]]
    assert em["class"] == type(tiny_moe(family).get_submodule(names[0])).__name__
    assert em["projections"]["fc1"]["layout"] == "shared-down" and em["projections"]["fc1"]["input_amax"]

    fresh = tiny_moe(family, seed=123)  # same config, other weights
    assert set(experts_modules(fresh)) == set(names)
    lora.load(fresh, tmp_path / "ckpt", progress=False)
    assert all(isinstance(fresh.get_submodule(n), SVDQExperts) for n in names)
    _assert_same_state(model, fresh)
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert trainable == {n for n in dict(fresh.named_parameters()) if n.endswith(("lora_down", "lora_up"))}
    ids = token_batches(1, seed=9)[0]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits)


def test_export_refuses_fake_storage(tmp_path):
    model = tiny_moe("mixtral")
    svdq.quantize(model, CFG, forward_loop_of(token_batches(2)), progress=False, report=False, storage="fake")
    with pytest.raises(ValueError, match="storage='fake'.*export needs 'packed'"):
        export_torch(model, tmp_path / "x", progress=False)


def test_load_mismatches(tmp_path):
    model = _quantized("qwen3_moe")
    export_torch(model, tmp_path / "ckpt", progress=False)
    # another family at the same names
    with pytest.raises(
        ValueError, match=r"experts model\.layers\.0\.mlp\.experts: the model has a OlmoeExperts"
    ):
        load_torch(tiny_moe("olmoe"), tmp_path / "ckpt", progress=False)
    # same class, other expert count
    import transformers

    cfg = tiny_moe("qwen3_moe").config
    cfg.num_experts = 4
    other = transformers.Qwen3MoeForCausalLM(cfg).eval()
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"experts model\.layers\.0\.mlp\.experts: the checkpoint has weights"
    ):
        load_torch(other, tmp_path / "ckpt", progress=False)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())  # nothing changed
    assert not any(isinstance(m, SVDQExperts) for m in other.modules())


def test_old_documents_without_experts_still_load(tmp_path):
    """A torch checkpoint of SVDQLinear layers only: an empty 'experts' map, a bit-exact reload."""
    from torch import nn

    net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    x = torch.randn(64, 32)
    svdq.quantize(net, SVDQConfig(rank=4, alphas=(0.5,)), lambda m: m(x), progress=False, report=False)
    export_torch(net, tmp_path / "d", progress=False)
    doc = read_metadata(tmp_path / "d")
    assert doc["experts"] == {}
    fresh = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    load_torch(fresh, tmp_path / "d", progress=False)
    assert torch.equal(net(x), fresh(x))
    json.dumps(doc)


def test_a_format_without_fused_experts_refuses_them_before_writing(tmp_path):
    from lora.io.api import EXPORTERS, register_exporter

    written = []
    register_exporter("dense-only", lambda model, out_dir: written.append(out_dir), kinds=("torch",))
    try:
        model = _quantized("qwen3_moe")
        with pytest.raises(
            ValueError,
            match=r"format 'dense-only' does not write fused experts \(svdq.SVDQExperts at "
            r"model.layers.0.mlp.experts and 1 more\); formats that do: "
            r"\['compressed-tensors', 'folded', 'modelopt-hf', 'peft', 'svdq'\]",
        ):
            lora.export(model, tmp_path / "out", format="dense-only")
        assert not written and not (tmp_path / "out").exists()
    finally:
        del EXPORTERS["dense-only"]
