"""Module families (:mod:`lora.families`) and the one installer (:mod:`lora.install`) on the tiny
Megatron GPT-MoE: detection, a family added from outside, and installed layers equal to what the
calibration computes (the adapter is built around the quantized base: no base swap afterwards)."""

import pytest
import torch
from torch import nn

from calib.tiny_moe import TinyMoEConfig, build_tiny_gpt_moe
from lora import LoraConfig, add_adapters
from lora.base import SVDQBase
from lora.families import FAMILIES, Family, family_named, family_of, is_megatron_model, register_family
from lora.install import ExpertProjection, install_experts, install_linear
from svdq import SVDQConfig, decompose_linear
from svdq.formats import quantize_tensor
from svdq.stats import InputStats

pytestmark = pytest.mark.usefixtures("megatron_world")

QKV = "decoder.layers.0.self_attention.linear_qkv"
EXPERTS = "decoder.layers.0.mlp.experts"


def _model():
    return build_tiny_gpt_moe(TinyMoEConfig(num_layers=1), seed=1)


def test_every_module_has_the_family_its_class_says():
    model = _model()
    names = {n: family_of(m).name for n, m in model.named_modules() if family_of(m) is not None}
    assert names[QKV] == "megatron-linear"
    assert names[EXPERTS] == "sequential-mlp"
    assert names[f"{EXPERTS}.local_experts.0.linear_fc1"] == "megatron-linear"
    assert is_megatron_model(model)
    assert family_of(nn.Linear(2, 2)).name == "torch-linear"
    assert not is_megatron_model(nn.Sequential(nn.Linear(2, 2)))
    assert family_of(nn.ReLU()) is None


def test_a_new_family_is_one_registration(monkeypatch):
    """A family for a module type svdq does not know: ``add_adapters`` then adapts it."""

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))

    class Wrapped(nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base, self.adapter_name = base, "scale"
            self.lora = nn.Parameter(torch.zeros(4))

        def reset_adapter(self, init, seed):
            self.lora.data.fill_(0.5)

    class ScaleFamily(Family):
        name, kind = "scale", "linear"

        def matches(self, module):
            return isinstance(module, Scale)

        def adapter_for(self, model, name, module, config):
            return True

        def make_adapter(self, model, name, module, config):
            return Wrapped(module)

    monkeypatch.setattr("lora.families.FAMILIES", list(FAMILIES))
    register_family(ScaleFamily(), before="megatron-linear")
    import lora.families as fam

    assert [f.name for f in fam.FAMILIES][:2] == ["scale", "megatron-linear"]
    with pytest.raises(ValueError, match="already registered"):
        register_family(ScaleFamily())
    with pytest.raises(ValueError, match="no family named 'nope'"):
        register_family(type("Other", (ScaleFamily,), {"name": "other"})(), before="nope")
    model = nn.Sequential(Scale(), nn.ReLU())
    assert add_adapters(model, LoraConfig(targets=("0",))) == ["0"]
    assert isinstance(model[0], Wrapped) and float(model[0].lora[0]) == 0.5
    assert family_named("scale").matches(Scale())


def test_wrong_sites_are_clear_errors_before_any_change():
    model = _model()
    with pytest.raises(
        ValueError, match=r"decoder.layers.0.self_attention.core_attention: expected a Megatron"
    ):
        install_linear(
            model,
            "decoder.layers.0.self_attention.core_attention",
            residual=None,
            smooth=None,
            act_format="nvfp4",
        )
    with pytest.raises(ValueError, match="no such module"):
        install_linear(model, "decoder.nope", residual=None, smooth=None, act_format="nvfp4")
    with pytest.raises(ValueError, match="needs lora_down and lora_up"):
        w = model.get_submodule(QKV).weight.detach()
        install_linear(
            model,
            QKV,
            residual=quantize_tensor(w, "nvfp4"),
            smooth=torch.ones(w.shape[1]),
            act_format="nvfp4",
            lora_config=LoraConfig(rank=4, targets=(QKV,)),
        )
    assert type(model.get_submodule(QKV)).__name__ == "ColumnParallelLinear"  # untouched


@pytest.mark.parametrize("storage", ["packed", "fake"])
def test_install_linear_builds_the_adapter_around_the_base(storage):
    """y = Q_a(x/s)·Q_w(R)ᵀ + x·Aᵀ·Bᵀ (+ bias) against a float64 computation from the installed tensors."""
    model = _model()
    lin = model.get_submodule(QKV)
    w = lin.weight.detach()  # (out × in)
    x = torch.randn(64, w.shape[1], generator=torch.Generator().manual_seed(0))  # (tokens × in)
    st = InputStats(w.shape[1])
    st.update(x)
    res = decompose_linear(w, st, SVDQConfig(rank=4), name=QKV)
    cfg = LoraConfig(rank=4, targets=(QKV,), fc1_layout=None, fc2_layout=None, init="zeros")
    adapter = install_linear(
        model,
        QKV,
        residual=res.residual,
        smooth=res.smooth,
        act_format="nvfp4",
        lora_down=res.lora_down,
        lora_up=res.lora_up,
        lora_config=cfg,
        storage=storage,
    )
    assert model.get_submodule(QKV) is adapter and isinstance(adapter.base, SVDQBase)
    assert adapter.lora_config is cfg and adapter.base.storage == storage
    assert torch.equal(adapter.lora_down.detach(), res.lora_down.to(adapter.lora_down.dtype))
    with torch.no_grad():
        y, _ = adapter(x[:, None, :])  # (s, b, out)
    from svdq.formats import dequantize, fake_quant

    xq = fake_quant((x / res.smooth).float(), "nvfp4").double()  # dynamic range (no input_amax set)
    ref = xq @ dequantize(res.residual, torch.float32).double().T
    ref = ref + x.double() @ res.lora_down.double().T @ res.lora_up.double().T
    if lin.bias is not None and not lin.skip_bias_add:
        ref = ref + lin.bias.double()
    assert torch.allclose(y[:, 0].double(), ref, rtol=1e-4, atol=1e-4)


def test_install_experts_keeps_megatron_flags_on_adapter_parameters():
    """Expert adapters built on quantized bases still carry Megatron's ``allreduce=False`` (expert
    parameters are reduced over the expert-data-parallel group) — read from the base's ``weight_like``."""
    model = _model()
    seq = model.get_submodule(EXPERTS)
    flags = {getattr(e.linear_fc1.weight, "allreduce", None) for e in seq.local_experts}
    assert flags <= {True, False}  # Megatron marks every weight (False: experts under EP)
    projections = {}
    for proj in ("fc1", "fc2"):
        ws = [getattr(e, f"linear_{proj}").weight.detach() for e in seq.local_experts]  # (out × in) each
        out_f, in_f = ws[0].shape
        projections[proj] = ExpertProjection(
            residuals=[quantize_tensor(w, "nvfp4") for w in ws],
            smooths=[torch.ones(in_f) for _ in ws],
            act_format="nvfp4",
            lora_down=torch.randn(2, in_f),  # shared-down (r × in)
            lora_up=torch.randn(len(ws), out_f, 2),  # per expert (E × out × r)
        )
    cfg = LoraConfig(
        rank=2, targets=(EXPERTS,), fc1_layout="shared-down", fc2_layout="shared-down", init="zeros"
    )
    group = install_experts(model, EXPERTS, projections, lora_config=cfg)
    assert model.get_submodule(EXPERTS) is group
    bases = [getattr(e, f"linear_{p}").base for e in group.base.local_experts for p in ("fc1", "fc2")]
    assert all(isinstance(b, SVDQBase) for b in bases)
    ups = [f.param for f in group.factors() if f.role == "up"]
    assert ups and {getattr(p, "allreduce", None) for p in ups} == flags
    f = next(f for f in group.factors() if f.key.endswith("experts.0.linear_fc1.lora_up"))
    assert torch.equal(f.param.detach(), projections["fc1"].lora_up[0].to(f.param.dtype))
