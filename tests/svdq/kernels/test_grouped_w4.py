"""svdq.kernels.grouped_w4 — the grouped 4-bit residual GEMM (+ lora_up epilogue), forward and backward,
against float64 references (on CPU the kernels run in Triton's interpreter; tiny shapes).

Tolerances (``bound = |x|·|W_e|ᵀ + |u|·|B_e|ᵀ`` element-wise, in float64, ``n`` the summed length):

* float32 output vs the EXACT product ``x · (code·s_b·g)ᵀ + u · Bᵀ``: ``(n + 2) · 2⁻²⁴ · bound`` (fp32
  accumulation of exact 16-bit products, one rounding for the global scale);
* 16-bit output: additionally the output's own rounding, ``2⁻⁸ · |exact|`` (bf16) / ``2⁻¹¹`` (fp16);
* vs the bf16 torch reference ``F.linear(x, dequantize(W_e).to(bf16))`` (evaluated in float64): within the
  bf16 rounding of the weights, ``2⁻⁹ · |x|·|W_e|ᵀ``, on top of the accumulation tolerance.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import svdq.kernels
from svdq.experts.storage import ExpertResiduals
from svdq.formats import dequantize, quantize_tensor, unpack_nibbles
from svdq.formats.nvfp4 import E2M1_VALUES

pytest.importorskip("triton")

from svdq.kernels.grouped_w4 import W4Weight, grouped_w4_applies, grouped_w4_mm  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FORMATS = [
    ({"name": "nvfp4"}, 80),  # K not a multiple of the interpreter's BLOCK_K (64)
    ({"name": "int4", "group_size": 32}, 96),
    ({"name": "int4", "group_size": 64}, 128),
    ({"name": "int4", "group_size": 128}, 128),
]
COUNTS = [[0, 1, 5, 0], [3, 0, 0, 9]]
N = 24  # not a multiple of BLOCK_N


def _experts(fmt, E, n, k, seed=0, dtype=torch.bfloat16, zero=False) -> ExpertResiduals:
    gen = torch.Generator().manual_seed(seed)
    ws = [torch.randn(n, k, generator=gen) * (0.5 + i) for i in range(E)]  # distinct global scales
    ws = [torch.zeros(n, k) if zero else w for w in ws]
    return ExpertResiduals.from_packed([quantize_tensor(w.to(dtype).to(DEV), fmt) for w in ws])


def _exact(w: W4Weight) -> torch.Tensor:
    """float64 (E, N, K): the dequantized weight without any rounding of code·s_b·g (nvfp4); for int4 the
    format's values rnd_D((code - 8) / m)."""
    if w.fmt.name == "int4":
        r = ExpertResiduals(
            {"format": w.fmt.to_dict(), "shape": [w.out_features, w.in_features], "dtype": _dt(w.scale)},
            {"qdata": w.qdata, "scale": w.scale},
        )
        return r.dequantize(torch.float32).double()
    codes = unpack_nibbles(w.qdata, even_low=True).long()
    vals = torch.tensor(E2M1_VALUES, dtype=torch.float64, device=codes.device)[codes]  # (E, N, K)
    E, n, k = vals.shape
    s = w.scale.double().repeat_interleave(16, dim=-1)  # (E, N, K)
    return vals * s * w.global_scale.double().reshape(E, 1, 1)


def _dt(t):
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[t.dtype]


def _ranges(offs):
    ends = offs.tolist()
    return list(zip([0, *ends[:-1]], ends))


def _ref(x, W, offs, u=None, B=None):
    """float64 ``x_e · W_eᵀ + u_e · B_eᵀ`` (differentiable; W (E, N, K), B (E, N, r) or (N, r))."""
    out = []
    for e, (s, t) in enumerate(_ranges(offs)):
        y = x[s:t] @ W[e].T
        if u is not None:
            y = y + u[s:t] @ (B[e] if B.dim() == 3 else B).T
        out.append(y)
    return torch.cat(out)


def _inputs(counts, k, r=5, lora="expert", E=None, seed=1, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    E = len(counts) if E is None else E
    S = sum(counts)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32).to(DEV)
    x = torch.randn(S, k, generator=gen).to(dtype).to(DEV)
    u = B = None
    if lora != "none":
        u = torch.randn(S, r, generator=gen).to(dtype).to(DEV)
        shape = (E, N, r) if lora == "expert" else (N, r)
        B = (torch.randn(*shape, generator=gen) * 0.3).to(dtype).to(DEV)
    return x, offs, u, B


def _bound(x, W, offs, u, B):
    return _ref(x.double().abs(), W.abs(), offs, None if u is None else u.double().abs(), _abs(B))


def _abs(t):
    return None if t is None else t.double().abs()


def _check_exact(y, x, W, offs, u, B, out_dtype):
    exact = _ref(x.double(), W, offs, None if u is None else u.double(), None if B is None else B.double())
    bound = _bound(x, W, offs, u, B)
    n = x.shape[1] + (0 if u is None else u.shape[1])
    tol = (n + 2) * 2.0**-24 * bound
    if out_dtype == torch.bfloat16:
        tol = tol + 2.0**-8 * exact.abs()
    elif out_dtype == torch.float16:
        tol = tol + 2.0**-11 * exact.abs()
    err = (y.double() - exact).abs()
    assert y.dtype == out_dtype and y.shape == exact.shape
    assert torch.isfinite(y).all()
    assert (err <= tol).all(), f"max excess {(err - tol).max().item():.3e}"
    return exact, bound


@pytest.mark.parametrize("lora", ["none", "expert", "shared"])
@pytest.mark.parametrize("counts", COUNTS, ids=["0-1-5-0", "3-0-0-9"])
@pytest.mark.parametrize("fmt,k", FORMATS, ids=["nvfp4", "int4g32", "int4g64", "int4g128"])
def test_forward_vs_exact(fmt, k, counts, lora):
    w = W4Weight.of(_experts(fmt, len(counts), N, k))
    x, offs, u, B = _inputs(counts, k, lora=lora)
    y = grouped_w4_mm(x, w, offs, u=u, lora_up=B, out_dtype=torch.float32)
    _check_exact(y, x, _exact(w), offs, u, B, torch.float32)
    y16 = grouped_w4_mm(x, w, offs, u=u, lora_up=B)  # x's dtype, RNE
    _check_exact(y16, x, _exact(w), offs, u, B, torch.bfloat16)


@pytest.mark.parametrize("fmt,k", FORMATS[:2], ids=["nvfp4", "int4g32"])
def test_closer_to_exact_than_the_bf16_reference(fmt, k):
    """The bf16 torch reference rounds code·s_b·g (nvfp4) to bf16; the kernel does not. Its distance to that
    reference is within the weights' bf16 rounding; for int4 (bf16 weights: same values) within the
    accumulation tolerance only."""
    counts = [3, 0, 0, 9]
    res = _experts(fmt, len(counts), N, k)
    w = W4Weight.of(res)
    x, offs, _, _ = _inputs(counts, k, lora="none")
    y = grouped_w4_mm(x, res, offs, out_dtype=torch.float32).double()
    W_bf16 = torch.stack([dequantize(res.expert(e)).to(x.dtype) for e in range(len(counts))]).double()
    ref = _ref(x.double(), W_bf16, offs)  # = F.linear(x, dequantize(W_e).to(bf16)) without its own rounding
    exact = _ref(x.double(), _exact(w), offs)
    bound = _bound(x, _exact(w), offs, None, None)
    acc_tol = (k + 2) * 2.0**-24 * bound
    if fmt["name"] == "nvfp4":
        assert ((y - ref).abs() <= 2.0**-9 * bound + acc_tol).all()
        assert (y - exact).abs().max() < (ref - exact).abs().max() / 16
    else:
        assert ((y - ref).abs() <= acc_tol).all()
    torch_ref = torch.cat([F.linear(x[s:t], W_bf16[e].to(x.dtype)) for e, (s, t) in enumerate(_ranges(offs))])
    y16 = grouped_w4_mm(x, res, offs)
    assert ((y16.double() - torch_ref.double()).abs() <= 2.0**-7 * ref.abs() + 2.0**-8 * bound).all()


@pytest.mark.parametrize("fmt,k", [FORMATS[0], FORMATS[2]], ids=["nvfp4", "int4g64"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dense_weight(fmt, k, dtype):
    """A PackedTensor (N, K) is one expert: offs None, all rows; fp16 activations use fp16 MMA."""
    gen = torch.Generator().manual_seed(3)
    p = quantize_tensor(torch.randn(N, k, generator=gen).to(dtype).to(DEV), fmt)
    x = torch.randn(17, k, generator=gen).to(dtype).to(DEV)
    u, B = torch.randn(17, 3, generator=gen).to(DEV), torch.randn(N, 3, generator=gen).to(DEV)
    y = grouped_w4_mm(x, p, None, u=u, lora_up=B)
    offs = torch.tensor([17], dtype=torch.int32, device=DEV)
    _check_exact(y, x, _exact(W4Weight.of(p)), offs, u.to(dtype), B.to(dtype), dtype)


def test_stacked_packed_tensor_shares_one_global_scale():
    """A PackedTensor (E, N, K) (one quantize_tensor call: one global scale) gives the same result as its
    experts held as ExpertResiduals with that scale repeated."""
    gen = torch.Generator().manual_seed(4)
    p = quantize_tensor(torch.randn(3, N, 48, generator=gen).to(torch.bfloat16).to(DEV), "nvfp4")
    w = W4Weight.of(p)
    assert tuple(w.global_scale.shape) == (3,)
    x, offs, u, B = _inputs([2, 7, 4], 48)
    y = grouped_w4_mm(x, p, offs, u=u, lora_up=B, out_dtype=torch.float32)
    _check_exact(y, x, _exact(w), offs, u, B, torch.float32)


@pytest.mark.parametrize("fmt,k", [FORMATS[0], FORMATS[1]], ids=["nvfp4", "int4g32"])
def test_all_zero_weights(fmt, k):
    """All-zero experts (nvfp4: g = 1, block scales 1; int4: multipliers inf) give exactly u · Bᵀ."""
    w = W4Weight.of(_experts(fmt, 4, N, k, zero=True))
    x, offs, u, B = _inputs([0, 1, 5, 0], k)
    y = grouped_w4_mm(x, w, offs, u=u, lora_up=B, out_dtype=torch.float32)
    exact, _ = _check_exact(y, x, _exact(w), offs, u, B, torch.float32)
    assert float(_exact(w).abs().max()) == 0.0
    y0 = grouped_w4_mm(x, w, offs)
    assert torch.equal(y0, torch.zeros_like(y0))


@pytest.mark.parametrize("lora", ["expert", "shared"])
@pytest.mark.parametrize("fmt,k", [FORMATS[0], FORMATS[2]], ids=["nvfp4", "int4g64"])
def test_backward_vs_float64_autograd(fmt, k, lora):
    counts = [0, 1, 5, 0] if lora == "expert" else [3, 0, 0, 9]
    w = W4Weight.of(_experts(fmt, len(counts), N, k))
    x, offs, u, B = _inputs(counts, k, lora=lora)
    x, u, B = (t.clone().requires_grad_() for t in (x, u, B))
    y = grouped_w4_mm(x, w, offs, u=u, lora_up=B, out_dtype=torch.float32)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16).float().to(DEV)
    y.backward(g)  # g is bf16-exact: the backward's cast of dy to bf16 is lossless
    W = _exact(w)
    x64, u64, B64 = (t.detach().double().requires_grad_() for t in (x, u, B))
    _ref(x64, W, offs, u64, B64).backward(g.double())
    g64 = g.double()
    S = x.shape[0]
    # dx = dy · W_e (bf16 output); du = dy · B_e and dB_e = dy_eᵀ · u_e (torch matmuls, bf16 output)
    dx_bound = _ref(g64.abs(), W.abs().transpose(1, 2), offs)
    du_bound = _ref(g64.abs(), _abs(B).transpose(-1, -2).expand(len(counts), -1, -1), offs)
    for got, want, bound, n in [(x.grad, x64.grad, dx_bound, N), (u.grad, u64.grad, du_bound, N)]:
        tol = 2.0**-8 * want.abs() + (n + 2) * 2.0**-24 * bound
        assert got.shape == want.shape and ((got.double() - want).abs() <= tol).all()
    dB_bound = torch.zeros_like(B64) if lora == "expert" else None
    if lora == "expert":
        for e, (s, t) in enumerate(_ranges(offs)):
            dB_bound[e] = g64[s:t].abs().T @ u64[s:t].detach().abs()
    else:
        dB_bound = g64.abs().T @ u64.detach().abs()
    tol = 2.0**-8 * B64.grad.abs() + (S + 2) * 2.0**-24 * dB_bound
    assert ((B.grad.double() - B64.grad).abs() <= tol).all()
    if lora == "expert":  # experts without rows get zero gradients
        assert torch.equal(B.grad[0], torch.zeros_like(B.grad[0]))


def test_backward_x_only_without_lora():
    w = W4Weight.of(_experts(FORMATS[1][0], 4, N, 96))
    x, offs, _, _ = _inputs([3, 0, 0, 9], 96, lora="none")
    x = x.clone().requires_grad_()
    y = grouped_w4_mm(x, w, offs)
    y.float().sum().backward()
    W = _exact(w)
    want = _ref(torch.ones(x.shape[0], N, dtype=torch.float64, device=DEV), W.transpose(1, 2), offs)
    bound = _ref(torch.ones(x.shape[0], N, dtype=torch.float64, device=DEV), W.abs().transpose(1, 2), offs)
    tol = 2.0**-8 * want.abs() + (N + 2) * 2.0**-24 * bound
    assert ((x.grad.double() - want).abs() <= tol).all()


def test_applies_predicate():
    res = _experts(FORMATS[0][0], 2, N, 48)
    x = torch.zeros(4, 48, dtype=torch.bfloat16, device=DEV)
    with svdq.kernels.kernel_backend("triton"):
        assert grouped_w4_applies(x, res)
        assert grouped_w4_applies(x.half(), res.expert(0))
        assert not grouped_w4_applies(x.float(), res)  # 16-bit activations only
        assert not grouped_w4_applies(x[:, :32], res)  # K mismatch
        assert not grouped_w4_applies(x, quantize_tensor(torch.zeros(N, 48, device=DEV), "fp8"))
    with svdq.kernels.kernel_backend("torch"):
        assert not grouped_w4_applies(x, res)


def test_bad_arguments_raise_one_line():
    res = _experts(FORMATS[0][0], 2, N, 48)
    x = torch.zeros(4, 48, dtype=torch.bfloat16, device=DEV)
    offs = torch.tensor([1, 4], dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="offs must be int32"):
        grouped_w4_mm(x, res, offs.long())
    with pytest.raises(ValueError, match="offs is needed"):
        grouped_w4_mm(x, res, None)
    with pytest.raises(ValueError, match="lora_up must be"):
        grouped_w4_mm(x, res, offs, u=torch.zeros(4, 3), lora_up=torch.zeros(3, N, 3))
    with pytest.raises(ValueError, match="come together"):
        grouped_w4_mm(x, res, offs, u=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="columns"):
        grouped_w4_mm(x[:, :32], res, offs)
    with pytest.raises(ValueError, match="nvfp4 or int4"):
        grouped_w4_mm(x, quantize_tensor(torch.zeros(N, 48), "fp8"), None)


# ------------------------------------------------------------------------------------------- GPU sizes


@pytest.mark.gpu
@pytest.mark.parametrize(
    "E,S,n,k,fmt",
    [
        (8, 8192, 7168, 2048, {"name": "nvfp4"}),
        (8, 8192, 7168, 2048, {"name": "int4", "group_size": 128}),
        (64, 8192, 2816, 2048, {"name": "nvfp4"}),
    ],
    ids=["mixtral-half-nvfp4", "mixtral-half-int4", "fine64-nvfp4"],
)
def test_gpu_realistic_sizes(E, S, n, k, fmt):
    gen = torch.Generator(device="cuda").manual_seed(0)
    ws = [torch.randn(n, k, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(E)]
    res = ExpertResiduals.from_packed([quantize_tensor(wi, fmt) for wi in ws])
    del ws
    w = W4Weight.of(res)
    counts = torch.multinomial(torch.ones(E, device="cuda"), S, replacement=True, generator=gen)
    counts = torch.bincount(counts, minlength=E)
    counts[0] = 0  # an expert without rows
    counts[1] = 1
    offs = counts.cumsum(0).to(torch.int32)
    S = int(offs[-1])
    x = torch.randn(S, k, generator=gen, device="cuda").to(torch.bfloat16).requires_grad_()
    u = torch.randn(S, 16, generator=gen, device="cuda").to(torch.bfloat16).requires_grad_()
    B = (torch.randn(E, n, 16, generator=gen, device="cuda") * 0.1).to(torch.bfloat16).requires_grad_()
    y = grouped_w4_mm(x, w, offs, u=u, lora_up=B, out_dtype=torch.float32)
    W = _exact(w)
    _check_exact(y, x.detach(), W, offs, u.detach(), B.detach(), torch.float32)
    gy = torch.randn(y.shape, generator=gen, device="cuda").to(torch.bfloat16).float()
    y.backward(gy)
    want = _ref(gy.double(), W.transpose(1, 2), offs)
    bound = _ref(gy.double().abs(), W.abs().transpose(1, 2), offs)
    assert ((x.grad.double() - want).abs() <= 2.0**-8 * want.abs() + (n + 2) * 2.0**-24 * bound).all()
