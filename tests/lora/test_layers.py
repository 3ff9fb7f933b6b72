"""Adapter modules at tensor/expert parallel size 1 against float64 references written out by hand."""

import pytest
import torch
import torch.nn.functional as F

from lora.adapters.layers import ExpertLoraLinear, LoraExperts, LoraLinear
from lora.config import LoraConfig
from lora.model import add_adapters, freeze_base
from tests.helpers.lora import CFG, reference_experts, tiny_model

pytestmark = pytest.mark.usefixtures("megatron_world")


def _attention(model):
    return model.decoder.layers[0].self_attention


@pytest.mark.parametrize("which", ["linear_qkv", "linear_proj"])
def test_linear_adapter_matches_float64_reference(which):
    """column (qkv) and row (proj): y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ, values and adapter gradients."""
    model = tiny_model()
    add_adapters(model, LoraConfig(rank=4, alpha=8, targets=(f"*.{which}",), init="random"))
    freeze_base(model)
    lin = getattr(_attention(model), which)
    assert isinstance(lin, LoraLinear) and lin.mode == ("column" if which == "linear_qkv" else "row")
    x = torch.randn(8, 2, CFG.hidden, generator=torch.Generator().manual_seed(0))
    out, bias = lin(x)
    assert bias is None
    g_out = torch.randn_like(out)
    (out * g_out).sum().backward()

    A = lin.lora_down.detach().double().requires_grad_()
    B = lin.lora_up.detach().double().requires_grad_()
    W = lin.base.weight.detach().double()
    ref = x.double() @ W.T + 2.0 * (x.double() @ A.T) @ B.T
    (ref * g_out.double()).sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin.lora_down.grad.double(), A.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lin.lora_up.grad.double(), B.grad, rtol=1e-4, atol=1e-5)
    assert lin.base.weight.grad is None


def test_kaiming_init_is_a_no_op_and_init_from_reproduces_the_branch():
    model = tiny_model()
    add_adapters(model, LoraConfig(rank=4, targets=("*.linear_qkv",)))
    lin = _attention(model).linear_qkv
    x = torch.randn(8, 2, CFG.hidden)
    base_out = lin.base(x)[0]
    assert torch.equal(lin(x)[0], base_out)  # B = 0: exactly the base
    assert lin.lora_down.abs().max() > 0 and lin.lora_up.abs().max() == 0
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(4, CFG.hidden, generator=g), torch.randn(3 * CFG.hidden, 4, generator=g)
    lin.init_from(A, B)
    torch.testing.assert_close(lin(x)[0] - base_out, x @ A.T @ B.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"linear_qkv.*lora_up has shape \(5, 4\)"):
        lin.init_from(A, torch.zeros(5, 4))


def test_linear_merge_unmerge_roundtrip():
    model = tiny_model()
    add_adapters(model, LoraConfig(rank=4, alpha=2, targets=("*.linear_proj",), init="random"))
    lin = _attention(model).linear_proj
    w0 = lin.base.weight.detach().clone()
    x = torch.randn(8, 2, CFG.hidden)
    y = lin(x)[0]
    lin.merge()
    torch.testing.assert_close(lin.base.weight, w0 + 0.5 * lin.lora_up @ lin.lora_down)
    torch.testing.assert_close(lin(x)[0], y, rtol=1e-5, atol=1e-6)
    lin.unmerge()
    torch.testing.assert_close(lin.base.weight, w0, rtol=0, atol=1e-7)
    torch.testing.assert_close(lin(x)[0], y, rtol=1e-5, atol=1e-6)


LAYOUTS = [
    ("shared-down", "shared-up", False),
    ("shared-down", "shared-down", True),
    ("per-expert", "per-expert", False),
    ("shared-up", "per-expert", True),
    (None, None, True),
]


@pytest.mark.parametrize("fc1,fc2,parallel", LAYOUTS)
def test_expert_adapters_match_float64_reference(fc1, fc2, parallel):
    """Every layout (and the parallel adapter): outputs and all adapter gradients of the SequentialMLP
    against the float64 hand computation, with an expert that receives no token."""
    model = tiny_model()
    config = LoraConfig(
        rank=4, alpha=6, targets=("*.mlp.experts",), fc1_layout=fc1, fc2_layout=fc2, parallel_expert=parallel
    )
    add_adapters(model, config.replace(init="random"))
    freeze_base(model)
    group = model.decoder.layers[0].mlp.experts
    assert isinstance(group, LoraExperts)
    g = torch.Generator().manual_seed(3)
    counts = [7, 0, 9, 8]
    x = torch.randn(sum(counts), CFG.hidden, generator=g)
    probs = torch.rand(sum(counts), generator=g)
    out, bias = group(x, torch.tensor(counts), probs)
    assert bias is None
    g_out = torch.randn_like(out)
    (out * g_out).sum().backward()

    ref, leaves = reference_experts(group, x, counts, probs)
    (ref * g_out.double()).sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    factors = group.factors()
    assert {f.key for f in factors} == set(leaves)
    for f in factors:
        torch.testing.assert_close(f.param.grad.double(), leaves[f.key].grad, rtol=1e-4, atol=1e-6, msg=f.key)
    assert all(p.grad is None for n, p in group.named_parameters() if n.endswith(".weight"))


def test_fc1_shared_down_is_one_gemm_over_all_local_tokens(monkeypatch):
    model = tiny_model()
    add_adapters(model, LoraConfig(rank=4, targets=("*.mlp.experts",), fc2_layout=None, init="random"))
    group = model.decoder.layers[0].mlp.experts
    calls = []
    real_linear = F.linear

    def spy(inp, weight, bias=None):
        calls.append((tuple(inp.shape), tuple(weight.shape)))
        return real_linear(inp, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    counts = [5, 3, 0, 4]
    group(torch.randn(12, CFG.hidden), torch.tensor(counts), torch.rand(12))
    downs = [c for c in calls if c[1] == (4, CFG.hidden)]
    ups = [c for c in calls if c[1] == (2 * CFG.ffn_hidden, 4)]
    assert downs == [((12, CFG.hidden), (4, CFG.hidden))]  # one GEMM over all 12 tokens
    assert [c[0][0] for c in ups] == counts  # one lora_up per expert on its own tokens


def test_parallel_adapter_weights_each_expert_by_its_routing_probability():
    """A top-2 token gets p1·s·B_1(A x) + p2·s·B_2(A x), computed by hand from the router's choice."""
    model = tiny_model()
    add_adapters(
        model, LoraConfig.preset("moe-parallel", rank=4, alpha=2, init="random", targets=("*.experts",))
    )
    moe = model.decoder.layers[0].mlp
    group = moe.experts
    hidden = torch.randn(16, 2, CFG.hidden, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        adapted = moe(hidden)[0]
        group.enabled = False
        plain = moe(hidden)[0]
        group.enabled = True
        probs, routing_map = moe.router(hidden)
    assert int(routing_map.sum(-1).min()) == 2 == CFG.topk  # every token goes to two experts
    x = hidden.reshape(-1, CFG.hidden).double()
    A = group.parallel_lora_down.detach().double()
    ups = {w.global_index: w.parallel_lora_up.detach().double() for w in group.base.local_experts}
    ref = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e in routing_map[t].nonzero().flatten().tolist():
            ref[t] += probs[t, e].double() * 0.5 * (ups[e] @ (A @ x[t]))
    torch.testing.assert_close((adapted - plain).reshape(-1, CFG.hidden).double(), ref, rtol=1e-4, atol=1e-6)


def test_expert_init_from_stacked_factors_and_merge():
    """init_from with MoELowRank-shaped factors reproduces W_i + B_i·A_i; merge folds it exactly."""
    model = tiny_model()
    add_adapters(
        model, LoraConfig(rank=4, targets=("*.mlp.experts",), fc1_layout="shared-down", fc2_layout=None)
    )
    group = model.decoder.layers[0].mlp.experts
    g = torch.Generator().manual_seed(7)
    A = torch.randn(4, CFG.hidden, generator=g)
    B = torch.randn(CFG.num_experts, 2 * CFG.ffn_hidden, 4, generator=g)
    group.init_from("fc1", A, B)
    for i, e in enumerate(group.base.local_experts):
        fc1 = e.linear_fc1
        assert isinstance(fc1, ExpertLoraLinear)
        torch.testing.assert_close(fc1.delta_weight(), B[i] @ A)
    counts = [3, 3, 3, 3]
    x, p = torch.randn(12, CFG.hidden), torch.rand(12)
    y = group(x, torch.tensor(counts), p)[0]
    group.merge()
    torch.testing.assert_close(group(x, torch.tensor(counts), p)[0], y, rtol=1e-5, atol=1e-5)
    group.unmerge()
    with pytest.raises(ValueError, match="4 experts given|experts given"):
        group.init_from("fc1", A, B[:3])
    with pytest.raises(ValueError, match="no adapter on fc2"):
        group.init_from("fc2", A, B)
