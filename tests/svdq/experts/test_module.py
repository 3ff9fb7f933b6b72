"""SVDQExperts, its storage and operations, the handlers and the statistics hooks against Hugging Face
experts modules (tiny random models) and float64 / per-expert references."""

from __future__ import annotations

import pytest
import torch

from svdq.experts import ExpertResiduals, SVDQExperts, handler_for
from svdq.experts.ops import expert_mm, quant_rows
from svdq.experts.stats import register_experts_hooks
from svdq.formats import QuantFormat, fake_quant, quantize_tensor
from svdq.stats import run_with_hooks
from tests.helpers.hf_moe import (
    FAMILIES,
    experts_modules,
    forward_loop_of,
    install_exact,
    reference_experts,
    tiny_moe,
    token_batches,
)

LAYOUT_PAIRS = [("shared-down", "per-expert"), ("per-expert", "shared-up"), ("shared-up", "shared-down")]


def _routing(E: int, T: int = 12, k: int = 2, masked: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, 64, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    if masked:
        idx[::3, 0] = E  # masked slots (expert parallelism's sentinel)
    w = torch.rand(T, k, generator=g)
    return x, idx, w


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layouts", LAYOUT_PAIRS, ids=lambda p: "+".join(p))
def test_exact_experts_match_hf(family, layouts):
    """Format none, exact decomposition: SVDQExperts equals the HF module (fp32, 1e-5 of the output scale)
    and a float64 reference, masked slots included (HF's eager experts forward; its grouped_mm one handles
    masked slots only under expert parallelism, GPT-OSS's has no masked class: reference only)."""
    model = tiny_moe(family, experts_implementation="eager")
    name = next(iter(experts_modules(model)))
    hf = model.get_submodule(name)
    E = handler_for(hf).weights(hf)[0].shape[0]
    q = install_exact(tiny_moe(family), name, layouts)
    assert isinstance(q, SVDQExperts) and (q.fc1.layout, q.fc2.layout) == layouts
    for masked in (False, True):
        x, idx, w = _routing(E, masked=masked)
        ref = reference_experts(hf, x, idx, w)
        tol = 1e-5 * float(ref.abs().max())
        got = q(x, idx, w)
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=tol)
        if not (masked and family == "gpt_oss"):
            torch.testing.assert_close(got, hf(x, idx, w), rtol=0, atol=tol)
        names = q.arg_names
        torch.testing.assert_close(q(x, **{names[1]: idx, names[2]: w}), got, rtol=0, atol=0)  # by keyword


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_exact_model_logits(family):
    """Every experts module replaced by its exact SVDQExperts: the model's logits are unchanged."""
    model = tiny_moe(family)
    ids = token_batches(1)[0]
    with torch.no_grad():
        ref = model(ids).logits
        for name in list(experts_modules(model)):
            install_exact(model, name)
        got = model(ids).logits
    assert not experts_modules(model)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("fmt", ["nvfp4", "int4-g32", "fp8", "fp8-channel", "none"])
def test_expert_residuals_stack_bit_exact(fmt):
    W = torch.randn(3, 8, 64) * torch.tensor([1.0, 10.0, 0.1]).reshape(3, 1, 1)
    packed = [quantize_tensor(W[i], fmt) for i in range(3)]
    res = ExpertResiduals.from_packed(packed)
    assert torch.equal(res.dequantize(), res.dequantize_loop())
    for i in range(3):
        for k, t in packed[i].to_tensors().items():
            assert torch.equal(res.expert(i).to_tensors()[k], t)


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8", "int4-g32"])
def test_quant_rows_per_expert(fmt):
    """Each expert's rows quantized as its own tensor: equal bit for bit to fake_quant per expert, dynamic
    and static (an entry 0 keeps an expert dynamic); static rows above the range get no gradient."""
    fmt = QuantFormat.from_str(fmt)
    counts = [5, 0, 3, 4]
    ids = torch.repeat_interleave(torch.arange(4), torch.tensor(counts))
    x = torch.randn(12, 64) * torch.tensor([1.0, 1.0, 5.0, 0.2])[ids].unsqueeze(-1)
    starts = [0, 5, 5, 8]
    dyn = quant_rows(x, ids, fmt, 4)
    for a, n in zip(starts, counts):
        if n:
            assert torch.equal(dyn[a : a + n], fake_quant(x[a : a + n], fmt))
    if fmt.name == "int4":
        return
    amax = torch.tensor([0.5, 0.0, 0.0, 3.0])  # experts 1, 2 dynamic
    xg = x.clone().requires_grad_(True)
    st = quant_rows(xg, ids, fmt, 4, amax)
    for e, (a, n) in enumerate(zip(starts, counts)):
        if n:
            ga = None if amax[e] == 0 else amax[e]
            assert torch.equal(st[a : a + n], fake_quant(x[a : a + n], fmt, global_amax=ga))
    st.sum().backward()
    expect = torch.where((x.abs() > 0.5) & (ids == 0).unsqueeze(-1), 0.0, 1.0)
    assert torch.equal(xg.grad, expect)


def test_expert_mm_loop_reference():
    counts = [3, 0, 2]
    offs = torch.cumsum(torch.tensor(counts), 0, dtype=torch.int32)
    x, W = torch.randn(5, 16), torch.randn(3, 8, 16)
    ids = torch.repeat_interleave(torch.arange(3), torch.tensor(counts))
    ref = torch.einsum("sk,snk->sn", x.double(), W.double()[ids])
    torch.testing.assert_close(
        expert_mm(x, W, counts, offs, grouped=False).double(), ref, rtol=1e-6, atol=1e-6
    )


def test_expert_forward_semantics():
    """Per expert, SVDQExperts' projection computes MoEGroupResult.expert_forward (nvfp4 W4A4)."""
    from svdq import SVDQConfig, decompose_expert_group
    from svdq.experts import ProjectionState
    from svdq.experts.module import ExpertProjection
    from svdq.stats import InputStats

    torch.manual_seed(0)
    E, out_f, in_f = 4, 32, 64
    W = torch.randn(E, out_f, in_f)
    stats, xs = [], []
    for e in range(E):
        st = InputStats(in_f, sample_size=64)
        xe = torch.randn(40, in_f) * (1 + 3 * (torch.arange(in_f) == e))
        st.update(xe)
        stats.append(st)
        xs.append(xe[:7])
    cfg = SVDQConfig(rank=4, alphas=(0.0, 0.5))
    for proj, layout in (("fc1", "shared-down"), ("fc2", "shared-up"), ("fc2", "per-expert")):
        res = decompose_expert_group(W, stats, cfg, projection=proj, layout=layout)
        p = ExpertProjection(ProjectionState.from_result(res, dtype=torch.float32))
        x = torch.cat(xs)
        counts = [7] * E
        ids = torch.repeat_interleave(torch.arange(E), 7)
        offs = torch.cumsum(torch.tensor(counts), 0, dtype=torch.int32)
        got = p(x, None, ids, counts, offs, False)
        for e in range(E):
            ref = res.expert_forward(e, xs[e])
            torch.testing.assert_close(
                got[7 * e : 7 * e + 7], ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max())
            )


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_stats_hooks_routed_tokens(family, impl):
    """Per-expert statistics of exactly the routed tokens (fc1) and of act(fc1) with the original weights
    (fc2, before the routing weight), whichever HF experts implementation runs."""
    model = tiny_moe(family, experts_implementation=impl)
    name = next(iter(experts_modules(model)))
    mod = model.get_submodule(name)
    h = handler_for(mod)
    captured = []
    cap = mod.register_forward_pre_hook(
        lambda m, a, kw: captured.append(tuple(t.detach().clone() for t in h.routing(a, kw))),
        with_kwargs=True,
    )
    stats, handles = register_experts_hooks({name: (mod, h)}, sample_tokens=16)
    run_with_hooks(model, forward_loop_of(token_batches(2)), [*handles, cap])
    W1, W2, b1, _ = (None if t is None else t.detach().double() for t in h.weights(mod))
    act = h.activation(mod)
    for e in range(W1.shape[0]):
        rows = torch.cat([x[(idx == e).any(-1)] for x, idx, _ in captured]).double()
        y1 = rows @ W1[e].T + (0 if b1 is None else b1[e])
        h1 = act(y1)
        st1, st2 = stats[name]["fc1"][e], stats[name]["fc2"][e]
        assert st1.n_tokens == rows.shape[0] == st2.n_tokens
        torch.testing.assert_close(st1.covariance, rows.T @ rows, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(st2.covariance, h1.T @ h1, rtol=1e-4, atol=1e-6)
        assert torch.equal(st1.absmax, rows.abs().amax(0).float())


def _grouped_vs_loop(layouts, device: str) -> None:
    """torch._grouped_mm path against the per-expert loop in bf16, forward and branch gradients."""
    from svdq import SVDQConfig, decompose_expert_group
    from svdq.experts import ProjectionState
    from svdq.experts.handlers.concat_glu import ConcatGLU
    from svdq.experts.ops import grouped_mm_applies
    from svdq.stats import InputStats

    torch.manual_seed(0)
    E, H, inter = 8, 64, 32
    W1, W2 = torch.randn(E, 2 * inter, H) * 0.1, torch.randn(E, H, inter) * 0.1
    states = []
    for proj, W, lay in (("fc1", W1, layouts[0]), ("fc2", W2, layouts[1])):
        stats = []
        for _ in range(E):
            st = InputStats(W.shape[2], sample_size=64)
            st.update(torch.randn(64, W.shape[2]))
            stats.append(st)
        r = decompose_expert_group(W, stats, SVDQConfig(rank=8, alphas=(0.5,)), projection=proj, layout=lay)
        states.append(ProjectionState.from_result(r, dtype=torch.bfloat16))
    q = SVDQExperts(states[0], states[1], ConcatGLU(torch.nn.SiLU())).to(device)
    x = torch.randn(100, H, device=device, dtype=torch.bfloat16)
    idx = torch.stack([torch.randperm(E)[:2] for _ in range(100)]).to(device)
    idx[::7, 1] = E
    w = torch.rand(100, 2, device=device, dtype=torch.bfloat16)
    if device == "cuda":
        assert grouped_mm_applies(x, q.fc1.residual_weight(torch.bfloat16))
    outs = {}
    for grouped in (False, None if device == "cuda" else True):  # None: chosen automatically on CUDA
        q.grouped_mm = grouped
        q.zero_grad()
        y = q(x, idx, w)
        y.float().square().sum().backward()
        grads = [p.grad.float().clone() for p in q.lora_parameters()]
        outs[bool(grouped is not False)] = (y.detach().float(), grads)
    ref = outs[False][0]
    torch.testing.assert_close(outs[True][0], ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))
    for a, b in zip(outs[True][1], outs[False][1]):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2 * float(b.abs().max()))


def _cpu_grouped_mm() -> bool:
    try:
        x = torch.zeros(2, 8, dtype=torch.bfloat16)
        torch._grouped_mm(
            x, torch.zeros(1, 8, 8, dtype=torch.bfloat16), offs=torch.tensor([2], dtype=torch.int32)
        )
    except (AttributeError, NotImplementedError, RuntimeError):
        return False
    return True


@pytest.mark.parametrize("layouts", LAYOUT_PAIRS, ids=lambda p: "+".join(p))
def test_grouped_mm_matches_loop_cpu(layouts):
    """The grouped path forced on CPU (torch ≥ 2.9 has a CPU kernel) against the loop, bf16."""
    if not _cpu_grouped_mm():
        pytest.skip("torch._grouped_mm has no CPU kernel in this torch")
    _grouped_vs_loop(layouts, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("layouts", LAYOUT_PAIRS, ids=lambda p: "+".join(p))
def test_grouped_mm_matches_loop_bf16(layouts):
    """On CUDA the grouped path is chosen automatically (bf16, aligned dims) and matches the loop."""
    _grouped_vs_loop(layouts, "cuda")
