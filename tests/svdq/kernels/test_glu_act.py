"""svdq.kernels.glu_act (the fused ``silu(gate) · (linear + offset) · p`` of MoE experts) against the unfused
PyTorch form, forward and backward.

On CUDA ``a`` and ``dh`` are bit-exact in every dtype (libdevice ``expf``, like PyTorch's kernels). In the
CPU interpreter NumPy's ``exp`` and PyTorch's vectorized one differ in the last float32 bit, which now and
then crosses a rounding boundary of the output dtype: there ``a`` and ``dh`` must be within 1 ulp of their
dtype everywhere (float32: 4 ulp, or 4 ulp of the tensor's largest entry) and, for 16-bit dtypes, bit for
bit in ≥ 99 % of the elements.
``dp`` (a row sum in another order) is checked against the float64 sum with float32 accumulation
tolerance, each product rounded to the promoted dtype and the sum to ``dp``'s dtype.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from svdq.kernels import kernel_backend  # noqa: E402
from svdq.kernels.glu_act import swiglu_prob, swiglu_prob_applies, swiglu_prob_reference  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's exp(+large) = inf

CASES = [  # (h dtype, probs dtype)
    (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32),
    (torch.float32, torch.float32),
]


def inputs(S, F, dt, pt, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(S, 2 * F, generator=g) * 4).to(dt)  # (S, 2F)
    p = torch.rand(S, generator=g).to(pt)  # (S,)
    da = torch.randn(S, F, generator=g).to(dt)  # (S, F)
    if S > 3 and F > 4:  # adversarial entries: zeros, -0 in linear, saturating gates, tiny values
        h[0, :F] = 0
        h[1, F : 2 * F] = -0.0
        h[2, :4] = torch.tensor([-100.0, 100.0, -30.0, 1e-30]).to(dt)
        p[3] = 0
    return h.to(device), p.to(device), da.to(device)


def run(fn, h, p, da, offset):
    h = h.clone().requires_grad_()
    p = p.clone().requires_grad_()
    a = fn(h, p, offset)
    a.backward(da)
    return a.detach(), h.grad, p.grad


def check(h, p, da, offset=0.0, exact=False):
    ref = run(swiglu_prob_reference, h, p, da, offset)
    with kernel_backend("triton"):
        assert swiglu_prob_applies(h, p)
        out = run(swiglu_prob, h, p, da, offset)
    for got, want in zip(out[:2], ref[:2]):
        assert got.dtype == want.dtype and got.shape == want.shape
        if exact:
            assert torch.equal(got, want)
            continue
        ulp = 4 * 2.0**-23 if h.dtype == torch.float32 else 2 * _eps(h.dtype)
        # float32: the derivative's (1 + g (1 - s)) cancels near g = -1.28, so the slack is absolute there
        atol = ulp * float(want.abs().max()) if h.dtype == torch.float32 and want.numel() else 1e-30
        torch.testing.assert_close(got, want, rtol=ulp, atol=atol)
        if h.dtype != torch.float32 and got.numel():
            assert (got == want).double().mean() >= 0.99
    # dp: Σ_f da · m against the float64 sum (m as the reference computes it): each product rounded to
    # the promoted dtype O, fp32 accumulation over F terms, the sum rounded to dp's dtype
    gate, linear = h.chunk(2, dim=-1)
    m = (torch.nn.functional.silu(gate) * (linear + offset)).double()  # (S, F)
    want64 = (da.double() * m).sum(-1)  # (S,)
    o_eps = _eps(torch.promote_types(h.dtype, p.dtype))
    bound = (da.double() * m).abs().sum(-1) * (o_eps + h.shape[1] * 2.0**-24) + want64.abs() * _eps(p.dtype)
    assert out[2].dtype == p.dtype and torch.all((out[2].double() - want64).abs() <= bound + 1e-30)


def _eps(dtype):
    return {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]


@pytest.mark.parametrize(("dt", "pt"), CASES)
@pytest.mark.parametrize(("S", "F"), [(37, 96), (1, 16), (5, 33), (0, 64)])
def test_matches_unfused_form(dt, pt, S, F):
    check(*inputs(S, F, dt, pt))


def test_offset_and_no_prob_gradient():
    h, p, da = inputs(9, 40, torch.bfloat16, torch.float32)
    check(h, p, da, offset=1.0)
    with kernel_backend("triton"):
        a = swiglu_prob(h.clone().requires_grad_(), p, 0.0)  # probs without grad: no dp computed
    assert a.requires_grad


def test_falls_back_where_it_does_not_apply():
    h = torch.randn(4, 7)  # odd width: not a GLU input
    p = torch.rand(4)
    assert not swiglu_prob_applies(h, p)
    with kernel_backend("torch"):
        x = torch.randn(4, 8)
        assert not swiglu_prob_applies(x, p)
        assert torch.equal(swiglu_prob(x, p), swiglu_prob_reference(x, p))


@pytest.mark.gpu
@pytest.mark.parametrize(("dt", "pt"), CASES)
def test_gpu_bit_exact(dt, pt):
    h, p, da = inputs(4096, 1408, dt, pt, device="cuda")
    check(h, p, da, exact=True)
    from svdq.kernels import glu_act

    with kernel_backend("auto"):  # auto takes the kernel only once it is measured on a GPU
        assert swiglu_prob_applies(h, p) == glu_act.MEASURED
