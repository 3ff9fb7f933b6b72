"""``lora.export(..., format="peft")``: the residual base (``out/base``) and the adapter (``out/``) read by
their real consumers — ``AutoModelForCausalLM.from_pretrained(out/base)`` then
``peft.PeftModel.from_pretrained(base, out)`` — give our fine-tuned model's logits.

Comparison model: ours with activation quantization off (every ``act_format`` set to ``none``): the PEFT
base is the dequantized residual ``W_b = Q_w(R)·diag(1/s)`` and PEFT adds ``B·A'`` in 16+ bits, so the two
compute the same weights ``W_b + B·A'`` (weight-only). Tolerance: 1e-4 relative (float32 models; PEFT adds the
branch as ``x·A'ᵀ·Bᵀ`` or merges ``W_b + B·A'`` per expert, a rounding-order difference). Adapters are
perturbed first (a "fine-tuned" branch, not the decomposition). Plain torch models get a safetensors base.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import lora
import svdq
from svdq import SVDQConfig
from svdq.experts import SVDQExperts
from svdq.formats import parse_format
from svdq.layer import SVDQLinear
from tests.helpers.hf_moe import forward_loop_of, tiny_moe, token_batches
from tests.lora.io.test_compressed_tensors import tiny_dense

peft = pytest.importorskip("peft")
CFG = SVDQConfig(rank=8, alphas=(0.0, 0.5), sample_tokens=128)


def _build(family):
    return tiny_dense() if family == "dense" else tiny_moe(family, experts_implementation="eager")


def _fine_tuned(family):
    model = _build(family)
    svdq.quantize(model, CFG, forward_loop_of(token_batches(3)), progress=False, report=False)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("lora_down", "lora_up")):
                p.add_(0.3 * p.abs().mean() * torch.randn(p.shape, generator=g))
    return model


def _weight_only(model):
    none = parse_format("none")
    for m in model.modules():
        if isinstance(m, SVDQLinear):
            m.act_format, m.input_amax = none, None
        elif isinstance(m, SVDQExperts):
            for proj in m.projections().values():
                proj.act_format, proj.input_amax = none, None
    return model


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("family", ["dense", "qwen3_moe", "mixtral"])
def test_peft_on_written_base_gives_our_logits(family, tmp_path):
    from transformers import AutoModelForCausalLM

    q = _fine_tuned(family)
    lora.export(q, tmp_path / "p", format="peft", metadata={"source": "test"})
    base = AutoModelForCausalLM.from_pretrained(
        tmp_path / "p" / "base", attn_implementation="eager", experts_implementation="eager"
    ).eval()
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "p")).eval()
    ids = token_batches(1, seed=11)[0]
    _weight_only(q)
    with torch.no_grad():
        ours = q(ids).logits
        assert _rel(pm(ids).logits, ours) < 1e-4
        # the adapter matters: the base alone is off by far more than the tolerance
        with pm.disable_adapter():
            assert _rel(pm(ids).logits, ours) > 1e-2
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    meta = json.loads((tmp_path / "p" / "svdq_export.json").read_text())
    assert meta["format"] == "peft" and meta["user"] == {"source": "test"}
    if family != "dense":
        names = [n for n, m in q.named_modules() if isinstance(m, SVDQExperts)]
        assert sorted(cfg["target_parameters"]) == sorted(
            f"{n}.{p}" for n in names for p in ("gate_up_proj", "down_proj")
        )
        assert meta["experts"][names[0]]["projections"]["fc1"]["layout"] == "shared-down"
        saved = load_file(tmp_path / "p" / "base" / "model.safetensors")
        assert not any("gate_up_proj" in k for k in saved)  # transformers' per-expert layout on disk


def test_plain_torch_model_base_and_refusals(tmp_path):
    from tests.helpers.factories import make_byte_mlp

    model = make_byte_mlp()
    ids = torch.randint(0, 256, (2, 16))
    svdq.quantize(model, CFG, lambda m: m(ids), progress=False, report=False)
    lora.export(model, tmp_path / "p", format="peft")
    base_sd = load_file(tmp_path / "p" / "base" / "model.safetensors")
    fresh = make_byte_mlp()
    fresh.load_state_dict(base_sd)  # every tensor of the unquantized model, strict
    pm = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "p")).eval()
    _weight_only(model)
    with torch.no_grad():
        assert _rel(pm(ids), model(ids)) < 1e-4
    lora.export(model, tmp_path / "a", format="peft", base=False)
    assert not (tmp_path / "a" / "base").exists()
