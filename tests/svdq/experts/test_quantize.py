"""svdq.quantize on tiny Hugging Face MoE models: experts replaced by SVDQExperts, routers / embeddings /
norms left in 16 bits and reported, lower error than round-to-nearest, adapters train; unsupported fused
modules refused."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

import svdq
from svdq import SVDQConfig, SVDQLinear
from svdq.experts import SVDQExperts
from tests.helpers.hf_moe import (
    FAMILIES,
    experts_modules,
    forward_loop_of,
    lm_loss,
    relative_logit_error,
    rtn_quantize,
    tiny_moe,
    token_batches,
)

CFG = SVDQConfig(rank=8, alphas=(0.0, 0.5), sample_tokens=128)


def _quantized(family: str, **kw):
    model = tiny_moe(family)
    ref = copy.deepcopy(model)
    experts = list(experts_modules(model))
    svdq.quantize(model, CFG, forward_loop_of(token_batches(4)), progress=False, **kw)
    return model, ref, experts


@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_hf_moe(family, capsys):
    model, ref, experts = _quantized(family)
    cov = model.svdq_coverage
    printed = capsys.readouterr().out
    assert printed.startswith("svdq.quantize:") and f"{cov.quantized_params:,}" in printed
    # experts: all replaced, static per-expert ranges recorded, summaries kept
    assert experts and all(isinstance(model.get_submodule(n), SVDQExperts) for n in experts)
    assert set(experts) <= set(cov.quantized) and cov.experts == tuple(experts)
    for n in experts:
        layer = model.get_submodule(n)
        assert (layer.fc1.layout, layer.svdq_summary["fc1"]["layout"]) == ("shared-down", "shared-down")
        assert layer.svdq_summary["fc2"]["layout"] in ("per-expert", "shared-down", "shared-up")
        fc2 = layer.svdq_summary["fc2"]
        assert f"{n}: fc1 shared-down r={layer.fc1.rank} " in printed  # the layout of every projection
        assert f"fc2 {fc2['layout']} r={fc2['rank']} " in printed
        for proj in (layer.fc1, layer.fc2):
            assert proj.input_amax is not None and proj.input_amax.shape == (layer.num_experts,)
            assert bool((proj.input_amax > 0).any())
    # the account: > 80% of the non-embedding parameters, routers / embeddings / norms listed
    assert cov.non_embedding_share > 0.8 and 0 < cov.share < 1
    reasons = {name: reason for name, _, reason, _ in cov.kept}
    routers = [n for n, r in reasons.items() if r == "router"]
    assert routers and all(not isinstance(model.get_submodule(n), SVDQLinear) for n in routers)
    assert "embedding" in reasons.values() and "norm" in reasons.values()
    assert reasons.get("lm_head") == "excluded by pattern"
    quantized = sum(ref.get_submodule(n).weight.numel() for n in cov.quantized if n not in experts)
    quantized += sum(ref.get_submodule(n).gate_up_proj.numel() for n in experts)
    quantized += sum(ref.get_submodule(n).down_proj.numel() for n in experts)
    assert cov.quantized_params == quantized
    if family == "qwen2_moe":
        assert reasons["model.layers.0.mlp.shared_expert_gate"] == "router"
        assert isinstance(model.model.layers[0].mlp.shared_expert.gate_proj, SVDQLinear)
    # better than round-to-nearest of the same weights in the same formats
    rtn = rtn_quantize(copy.deepcopy(ref), "nvfp4", "nvfp4", lambda n: n in cov.quantized)
    ev = token_batches(2, seed=7)
    err, err_rtn = relative_logit_error(model, ref, ev), relative_logit_error(rtn, ref, ev)
    assert 0 < err < err_rtn
    # adapters train: a few Adam steps on the branch factors only, the loss falls
    params = [p for n, p in model.named_parameters() if n.endswith(("lora_down", "lora_up"))]
    expert_params = {id(p) for n in experts for p in model.get_submodule(n).lora_parameters()}
    assert expert_params <= {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in {id(q) for q in params})
    opt = torch.optim.Adam(params, lr=3e-3)
    ids = token_batches(1, batch=4, seed=3)[0]
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = lm_loss(model, ids)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(model.get_submodule(n).fc1.lora_up.grad.abs().sum() > 0 for n in experts)
    assert losses[-1] < losses[0]


def test_quantize_layout_and_dynamic():
    model, _, experts = _quantized("mixtral", layout="per-expert", act_range="dynamic", report=False)
    for n in experts:
        layer = model.get_submodule(n)
        assert (layer.fc1.layout, layer.fc2.layout) == ("per-expert", "per-expert")
        assert layer.fc1.input_amax is None and layer.fc2.act_range == "dynamic"


def test_quantize_exclude_experts():
    model = tiny_moe("olmoe")
    svdq.quantize(
        model,
        SVDQConfig(rank=8, alphas=(0.5,), exclude=("*lm_head*", "*.experts")),
        forward_loop_of(token_batches(2)),
        progress=False,
        report=False,
    )
    assert experts_modules(model) and not any(isinstance(m, SVDQExperts) for m in model.modules())
    kept = {n: r for n, _, r, _ in model.svdq_coverage.kept}
    assert all(kept[n] == "excluded by pattern" for n in experts_modules(model))


class _Fused(nn.Module):
    """A fused experts module no handler knows."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 32, 16))

    def forward(self, x):
        return torch.einsum("th,eoh->to", x, self.w)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.moe = _Fused()

    def forward(self, x):
        return self.moe(self.fc(x))


def test_unsupported_fused_module():
    x = torch.randn(8, 16)
    with pytest.raises(
        ValueError, match=r"moe \(_Fused\) owns fused parameters .*MixtralExperts.*allow_unsupported"
    ):
        svdq.quantize(_Net(), SVDQConfig(rank=4), lambda m: m(x), progress=False)
    net = svdq.quantize(_Net(), SVDQConfig(rank=4), lambda m: m(x), progress=False, allow_unsupported=True)
    assert isinstance(net.fc, SVDQLinear)
    assert ("moe", "_Fused", "unsupported fused experts", 4 * 32 * 16) in net.svdq_coverage.kept


def test_svdq_imports_without_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import svdq, svdq.experts\n"
        "from svdq.experts import registered_handlers\n"
        "assert all(h.classes() == () for h in registered_handlers())\n"
        "assert 'transformers' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_expert_branches_are_adapters_saved_loaded_and_trained(tmp_path):
    """The experts' branches (fc1 / fc2 lora_down / lora_up of every SVDQExperts) are adapter parameters of
    the quantized HF model: save_adapters writes them, load_adapters restores them, finetune trains them."""
    import lora
    from calib.train import adapter_parameters
    from lora.model import branch_parameters

    model = _quantized("qwen3_moe")[0]
    experts = [n for n, m in model.named_modules() if isinstance(m, SVDQExperts)]
    expected = {f"{e}.{p}.{f}" for e in experts for p in ("fc1", "fc2") for f in ("lora_down", "lora_up")}
    params = branch_parameters(model)
    assert expected <= set(params)
    assert expected <= set(adapter_parameters(model))
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn_like(p))  # "fine-tuned" values
    path = lora.save_adapters(model, tmp_path / "adapters.safetensors")
    other = _quantized("qwen3_moe")[0]
    assert sorted(lora.load_adapters(other, path)) == sorted(params)
    for name, p in branch_parameters(other).items():
        assert torch.equal(p, params[name]), name
