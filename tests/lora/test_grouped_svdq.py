"""The grouped 4-bit forward of a SequentialMLP (lora.adapters.grouped_svdq) against the per-expert loop it
replaces: a real tiny Megatron GPT-MoE (gloo, CPU), packed NVFP4 expert bases with per-expert smoothing and
static / dynamic ranges, shared-down adapters; losses and every adapter gradient equal within float32
accumulation tolerance."""

import pytest
import torch

from calib.tiny_moe import TinyMoEConfig, build_tiny_gpt_moe, tiny_moe_batch
from lora.adapters.grouped_svdq import grouped_applies
from lora.adapters.layers import LoraExperts
from lora.base import SVDQBase
from lora.config import LoraConfig
from lora.model import add_adapters, freeze_base
from svdq.formats import quantize_tensor

pytestmark = pytest.mark.usefixtures("megatron_world")

CFG = TinyMoEConfig(num_layers=1, num_experts=4, hidden=64, ffn_hidden=32, topk=2, seq_len=16)


def _loss(model, batch):
    return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).float().mean()


def _quantize_experts(group: LoraExperts, act_format: str, static: bool | str, seed: int = 0) -> None:
    """Every expert linear → a packed SVDQBase (RTN residual of its weight); fc1 smoothing shared by the
    experts (as calibration makes it), fc2 smoothing per expert; static ranges on some experts (``"all"``:
    on every expert, as calibration sets them)."""
    g = torch.Generator().manual_seed(seed)
    weight0 = group.base.local_experts[0].linear_fc1.base.weight
    shared = (torch.rand(weight0.shape[1], generator=g) + 0.5).to(weight0.device)
    for i, expert in enumerate(group.base.local_experts):
        for attr in ("linear_fc1", "linear_fc2"):
            wrapper = getattr(expert, attr)
            inner = wrapper.base
            w = inner.weight.detach().float()
            own = (torch.rand(w.shape[1], generator=g) + 0.5).to(w.device)
            smooth = shared if attr == "linear_fc1" else own
            base = SVDQBase(inner, quantize_tensor(w * smooth, "nvfp4"), smooth, act_format, "packed")
            if static == "all" or (static and i % 2 == 0):
                base.set_input_amax(3.0)  # clips some activations: the straight-through mask matters
            wrapper.base = base


def _model(act_format="nvfp4", static=True):
    model = build_tiny_gpt_moe(CFG, seed=3)
    add_adapters(model, LoraConfig.preset("moe", rank=4, alpha=8, init="random"), seed=1)
    freeze_base(model)
    groups = [m for m in model.modules() if isinstance(m, LoraExperts)]
    assert groups
    for group in groups:
        _quantize_experts(group, act_format, static)
    return model, groups


def _step(model, batch):
    model.zero_grad(set_to_none=True)
    loss = _loss(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("act_format,static", [("nvfp4", True), ("nvfp4", False), ("int4-g32", False)])
def test_grouped_forward_equals_expert_loop(act_format, static):
    model, groups = _model(act_format, static)
    assert all(grouped_applies(g) for g in groups)
    batch = tiny_moe_batch(CFG, batch=2, seed=5)
    loss, grads = _step(model, batch)
    for g in groups:
        g.grouped_svdq = False  # the same model through the per-expert loop
    loss_ref, grads_ref = _step(model, batch)
    # the same quantized values per expert; products summed in another order (float32)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys()
    expert_grads = [n for n in grads if ".experts." in n]
    assert expert_grads
    for name in grads:
        scale = grads_ref[name].abs().max().clamp(min=1e-12)
        err = (grads[name] - grads_ref[name]).abs().max() / scale
        assert err < 1e-4, f"{name}: relative gradient difference {float(err):.2e}"


def test_fused_activation_kernel_in_the_grouped_forward(monkeypatch):
    """All ranges static, shared fc1 smoothing and lora_down: fc1's activation quantization and ``x · Aᵀ``
    run in the fused kernel, fc2's quantization with each expert's own smoothing too, and SwiGLU with the
    routing probability in its fused kernel forward and backward (Triton's interpreter here), inside the
    grouped pass, against the per-expert loop on the PyTorch reference: same loss and gradients within
    float32 accumulation tolerance."""
    from svdq.kernels import act_quant, glu_act, kernel_backend

    calls, glu = [], []
    real = act_quant.quantize_act_ste
    monkeypatch.setattr(act_quant, "quantize_act_ste", lambda *a, **k: calls.append(k) or real(*a, **k))
    for fn in ("_launch_fwd", "_launch_bwd"):
        real_glu = getattr(glu_act, fn)
        monkeypatch.setattr(glu_act, fn, lambda *a, f=real_glu, n=fn: glu.append(n) or f(*a))
    model, groups = _model("nvfp4", "all")
    batch = tiny_moe_batch(CFG, batch=2, seed=5)
    with kernel_backend("triton"):
        loss, grads = _step(model, batch)
    assert any(k.get("lora_down") is not None for k in calls)  # the fused fc1 pass ran
    assert any(k.get("smooth_ids") is not None for k in calls)  # fc2: the experts' own smoothing, fused
    assert "_launch_fwd" in glu and "_launch_bwd" in glu  # SwiGLU · p fused, forward and backward
    for g in groups:
        g.grouped_svdq = False
    with kernel_backend("torch"):
        loss_ref, grads_ref = _step(model, batch)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    for name in grads_ref:
        scale = grads_ref[name].abs().max().clamp(min=1e-12)
        err = (grads[name] - grads_ref[name]).abs().max() / scale
        assert err < 1e-4, f"{name}: relative gradient difference {float(err):.2e}"


def test_hooks_or_fake_storage_take_the_loop():
    model, groups = _model()
    group = groups[0]
    handle = group.base.local_experts[0].linear_fc1.base.register_forward_hook(lambda *a: None)
    assert not grouped_applies(group)  # statistics passes hook the bases: they must see the loop
    handle.remove()
    assert grouped_applies(group)
    group.grouped_svdq = False
    assert not grouped_applies(group)
    group.grouped_svdq = True
    base = group.base.local_experts[1].linear_fc2.base
    base.storage = "fake"  # (a fake-storage base: the grouped path reads packed residuals only)
    with pytest.raises(RuntimeError, match="packed storage"):
        grouped_applies(group)


@pytest.mark.gpu
def test_grouped_forward_on_cuda_bf16_matches_loop():
    """bf16 on CUDA: the grouped pass (Triton kernels where they apply) against the per-expert loop (reference
    ops). Both round to bf16 in different places and a rounding difference may move a 4-bit activation code
    of fc2's input, so the bound is on the relative Frobenius error of the loss and gradients: ≤ 2e-2
    (measured differences are a few 1e-3)."""
    cfg = TinyMoEConfig(
        num_layers=1, num_experts=4, hidden=128, ffn_hidden=64, topk=2, seq_len=64, dtype="bfloat16"
    )
    model = build_tiny_gpt_moe(cfg, seed=3)
    add_adapters(model, LoraConfig.preset("moe", rank=16, alpha=16, init="random"), seed=1)
    freeze_base(model)
    groups = [m for m in model.modules() if isinstance(m, LoraExperts)]
    for group in groups:
        _quantize_experts(group, "nvfp4", static=True)
    model.cuda()
    batch = {
        k: v.cuda() if torch.is_tensor(v) else v for k, v in tiny_moe_batch(cfg, batch=4, seed=5).items()
    }
    assert all(grouped_applies(g) for g in groups)
    loss, grads = _step(model, batch)
    for g in groups:
        g.grouped_svdq = False
    loss_ref, grads_ref = _step(model, batch)
    assert abs(float(loss) - float(loss_ref)) <= 2e-2 * abs(float(loss_ref))
    for name in grads_ref:
        err = (grads[name].float() - grads_ref[name].float()).norm() / grads_ref[name].float().norm().clamp(
            min=1e-30
        )
        assert err < 2e-2, f"{name}: relative gradient difference {float(err):.2e}"
