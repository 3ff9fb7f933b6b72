"""svdq.kernels.dequant_w4 — packed 4-bit weights dequantized by one Triton pass (bit for bit the PyTorch
reference ``ExpertResiduals.dequantize(float32).to(dtype)``), and the frozen product through it, forward and
backward, against float64 references (CPU: Triton's interpreter, tiny shapes; ``gpu``: training sizes,
where the product must equal the reference path's cuBLAS product exactly — the same weights, the same GEMM).

Tolerance of the product vs float64: the 16-bit output's rounding (2⁻⁸ bf16) plus fp32 accumulation,
``(K + 2) · 2⁻²⁴ · |x|·|W|ᵀ``.
"""

from __future__ import annotations

import pytest
import torch

from svdq.experts.ops import expert_mm
from svdq.experts.storage import ExpertResiduals
from svdq.formats import quantize_tensor

pytest.importorskip("triton")

from svdq.kernels.dequant_w4 import (  # noqa: E402
    _BLOCKED,
    dequant_lora_applies,
    dequant_mm,
    dequant_mm_preferred,
    dequantize_w4,
    set_keep_dequantized,
)
from svdq.kernels.grouped_w4 import W4Weight  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FORMATS = [
    ({"name": "nvfp4"}, 80, torch.bfloat16),  # K not a multiple of the interpreter's BLOCK_K (64)
    ({"name": "int4", "group_size": 32}, 96, torch.bfloat16),
    ({"name": "int4", "group_size": 64}, 128, torch.float16),
    ({"name": "int4", "group_size": 128}, 128, torch.float32),
]


def _experts(fmt, E, n, k, wdtype, seed=0) -> ExpertResiduals:
    gen = torch.Generator().manual_seed(seed)
    ws = [torch.randn(n, k, generator=gen) * (0.5 + i) for i in range(E)]  # distinct global scales
    ws[0][0, :16] = 0  # an all-zero block
    ws[-1][1, :16] *= 1e-30  # subnormal-sized block scales
    return ExpertResiduals.from_packed([quantize_tensor(w.to(wdtype).to(DEV), fmt) for w in ws])


@pytest.mark.parametrize("fmt,k,wdtype", FORMATS, ids=["nvfp4", "int4g32", "int4g64", "int4g128"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("blocked", [True, False], ids=["per-block", "per-weight"])
def test_dequantize_bit_exact(fmt, k, wdtype, dtype, blocked):
    """Both tile forms (one scale per quantization block, or per weight as the GEMM's prologue)."""
    res = _experts(fmt, 3, 24, k, wdtype)  # N = 24: not a multiple of the interpreter's BLOCK_N
    token = _BLOCKED.set(blocked)
    try:
        got = dequantize_w4(res, dtype)
    finally:
        _BLOCKED.reset(token)
    want = res.dequantize(torch.float32).to(dtype)  # (E, N, K)
    assert got.dtype == dtype and got.shape == want.shape
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))  # bits: signed zeros too


def test_dequantize_dense_packed_tensor():
    w = quantize_tensor(torch.randn(40, 64).to(DEV), "nvfp4")
    got = dequantize_w4(w, torch.bfloat16)  # (1, 40, 64)
    from svdq.formats import dequantize

    assert torch.equal(got[0], dequantize(w, torch.float32).to(torch.bfloat16))


@pytest.mark.parametrize("counts", [[0, 1, 5, 0], [3, 0, 0, 9]], ids=["0-1-5-0", "3-0-0-9"])
@pytest.mark.parametrize(
    "fmt", [{"name": "nvfp4"}, {"name": "int4", "group_size": 32}], ids=["nvfp4", "int4"]
)
def test_product_forward_backward_vs_float64(counts, fmt):
    E, n, k = len(counts), 24, 96
    res = _experts(fmt, E, n, k, torch.bfloat16)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32).to(DEV)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(sum(counts), k, generator=gen).to(torch.bfloat16).to(DEV).requires_grad_()
    y = dequant_mm(x, res, offs)  # (S, n)
    W = res.dequantize(torch.float32).to(torch.bfloat16).double()  # (E, n, k): the weights it multiplies
    ends = offs.tolist()
    spans = list(zip([0, *ends[:-1]], ends))
    want = torch.cat([x.detach().double()[s:t] @ W[e].T for e, (s, t) in enumerate(spans)])
    bound = torch.cat([x.detach().double().abs()[s:t] @ W[e].abs().T for e, (s, t) in enumerate(spans)])
    tol = 2.0**-8 * want.abs() + (k + 2) * 2.0**-24 * bound
    assert y.dtype == torch.bfloat16 and ((y.double() - want).abs() <= tol).all()
    gy = torch.randn(y.shape, generator=gen).to(torch.bfloat16).to(DEV)
    y.backward(gy)
    gwant = torch.cat([gy.double()[s:t] @ W[e] for e, (s, t) in enumerate(spans)])
    gbound = torch.cat([gy.double().abs()[s:t] @ W[e].abs() for e, (s, t) in enumerate(spans)])
    assert ((x.grad.double() - gwant).abs() <= 2.0**-8 * gwant.abs() + (n + 2) * 2.0**-24 * gbound).all()
    set_keep_dequantized(True)  # the forward's 16-bit weight kept for the backward: the same bits
    try:
        x2 = x.detach().clone().requires_grad_()
        y2 = dequant_mm(x2, res, offs)
        y2.backward(gy)
    finally:
        set_keep_dequantized(False)
    assert torch.equal(y2, y) and torch.equal(x2.grad, x.grad)


def _lora_reference(x, u, W, B, spans):
    """float64 ``x_e · W_eᵀ + u_e · B_eᵀ`` per expert's rows and its magnitude bound."""
    want = torch.cat([x[s:t] @ W[e].T + u[s:t] @ B[e].T for e, (s, t) in enumerate(spans)])
    bound = torch.cat(
        [x[s:t].abs() @ W[e].abs().T + u[s:t].abs() @ B[e].abs().T for e, (s, t) in enumerate(spans)]
    )
    return want, bound


@pytest.mark.parametrize("counts", [[0, 1, 5, 0], [3, 0, 0, 9]], ids=["0-1-5-0", "3-0-0-9"])
@pytest.mark.parametrize("keep", [False, True], ids=["re-dequantized", "kept"])
def test_product_with_lora_up_vs_float64(counts, keep):
    """``[x | u] · [deq(W_e) | B_e]ᵀ`` in one GEMM = ``x · deq(W)ᵀ + u · Bᵀ``, and its gradients to x, u
    and B, against float64 (tolerance as above over K + r terms)."""
    E, n, k, r = len(counts), 24, 96, 8
    res = _experts({"name": "nvfp4"}, E, n, k, torch.bfloat16)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32).to(DEV)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(sum(counts), k, generator=gen).to(torch.bfloat16).to(DEV).requires_grad_()
    u = torch.randn(sum(counts), r, generator=gen).to(torch.bfloat16).to(DEV).requires_grad_()
    B = torch.randn(E, n, r, generator=gen).to(torch.bfloat16).to(DEV).requires_grad_()
    set_keep_dequantized(keep)
    try:
        y = dequant_mm(x, res, offs, u=u, lora_up=B)  # (S, n)
        gy = torch.randn(y.shape, generator=gen).to(torch.bfloat16).to(DEV)
        y.backward(gy)
    finally:
        set_keep_dequantized(False)
    W = res.dequantize(torch.float32).to(torch.bfloat16).double()  # (E, n, k)
    ends = offs.tolist()
    spans = list(zip([0, *ends[:-1]], ends))
    x64, u64, B64, g64 = x.detach().double(), u.detach().double(), B.detach().double(), gy.double()
    want, bound = _lora_reference(x64, u64, W, B64, spans)
    assert y.dtype == torch.bfloat16
    assert ((y.double() - want).abs() <= 2.0**-8 * want.abs() + (k + r + 2) * 2.0**-24 * bound).all()
    for got, full, mags in (
        (x.grad, torch.cat([g64[s:t] @ W[e] for e, (s, t) in enumerate(spans)]),
         torch.cat([g64.abs()[s:t] @ W[e].abs() for e, (s, t) in enumerate(spans)])),
        (u.grad, torch.cat([g64[s:t] @ B64[e] for e, (s, t) in enumerate(spans)]),
         torch.cat([g64.abs()[s:t] @ B64[e].abs() for e, (s, t) in enumerate(spans)])),
    ):  # fmt: skip
        assert ((got.double() - full).abs() <= 2.0**-8 * full.abs() + (n + 2) * 2.0**-24 * mags).all()
    dB = torch.stack([g64[s:t].T @ u64[s:t] for s, t in spans])  # (E, n, r); zeros for empty experts
    dB_bound = torch.stack([g64[s:t].abs().T @ u64[s:t].abs() for s, t in spans])
    S = sum(counts)
    assert ((B.grad.double() - dB).abs() <= 2.0**-8 * dB.abs() + (S + 2) * 2.0**-24 * dB_bound).all()


def test_product_with_lora_up_bad_arguments():
    res = _experts({"name": "nvfp4"}, 2, 16, 64, torch.bfloat16)
    offs = torch.tensor([2, 4], dtype=torch.int32, device=DEV)
    x = torch.randn(4, 64).to(torch.bfloat16).to(DEV)
    u = torch.randn(4, 8).to(torch.bfloat16).to(DEV)
    with pytest.raises(ValueError, match="both u and lora_up"):
        dequant_mm(x, res, offs, u=u)
    with pytest.raises(ValueError, match=r"lora_up \(2, 16, r\)"):
        dequant_mm(x, res, offs, u=u, lora_up=torch.zeros(2, 8, 8, dtype=torch.bfloat16, device=DEV))
    # the choice: only where the dequantized product is (CUDA bf16), per-expert up, r % 8 == 0, N >= K
    B = torch.zeros(2, 16, 8, dtype=torch.bfloat16, device=DEV)
    assert not dequant_lora_applies(x, W4Weight.of(res), u, B)


def test_dense_product_and_bad_arguments():
    w = quantize_tensor(torch.randn(32, 64).to(DEV), "nvfp4")
    x = torch.randn(5, 64).to(torch.bfloat16).to(DEV)
    from svdq.formats import dequantize

    want = x @ dequantize(w, torch.float32).to(torch.bfloat16).T
    assert torch.equal(dequant_mm(x, w), want)
    with pytest.raises(ValueError, match=r"x must be \(S, 64\)"):
        dequant_mm(x[:, :32], w)
    res = _experts({"name": "nvfp4"}, 2, 16, 64, torch.bfloat16)
    with pytest.raises(ValueError, match="keep must be a bool"):
        set_keep_dequantized("yes")
    with pytest.raises(ValueError, match="offs is needed"):
        dequant_mm(x, res)
    with pytest.raises(ValueError, match="dtype must be"):
        dequantize_w4(res, torch.int8)
    # the choice: CUDA bf16 only, from DEQUANT_MIN_ROWS rows per expert
    assert not dequant_mm_preferred(torch.zeros(4096, 64, dtype=torch.bfloat16), W4Weight.of(res))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "E,S,n,k,fmt",
    [(8, 8192, 14336, 2048, {"name": "nvfp4"}), (64, 32768, 2816, 2048, {"name": "int4", "group_size": 128})],
    ids=["mixtral-half-fc1-nvfp4", "fine64-fc1-int4"],
)
def test_gpu_equals_reference_path(E, S, n, k, fmt):
    """At training sizes the product equals the PyTorch reference path exactly (same bf16 weights, same
    torch._grouped_mm), forward and backward; and it is the path the grouped projection chooses."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    ws = [torch.randn(n, k, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(E)]
    res = ExpertResiduals.from_packed([quantize_tensor(wi, fmt) for wi in ws])
    del ws
    ids = torch.multinomial(torch.ones(E, device="cuda"), S, replacement=True, generator=gen)
    counts_t = torch.bincount(ids, minlength=E)
    counts_t[0] = 0
    offs = counts_t.cumsum(0).to(torch.int32)
    counts = counts_t.tolist()
    S = int(offs[-1])
    x = torch.randn(S, k, generator=gen, device="cuda").to(torch.bfloat16)
    assert dequant_mm_preferred(x, W4Weight.of(res))
    W = res.dequantize(torch.float32).to(torch.bfloat16)
    assert torch.equal(dequantize_w4(res, torch.bfloat16), W)
    from svdq.kernels.dequant_w4 import _TILES

    for tile in _TILES:  # every tile form the autotuner may pick
        assert torch.equal(dequantize_w4(res, torch.bfloat16, _tile=tile), W), tile
    out = []
    for ours, keep in ((True, False), (True, True), (False, False)):
        set_keep_dequantized(keep)
        try:
            xi = x.clone().requires_grad_()
            y = dequant_mm(xi, res, offs) if ours else expert_mm(xi, W, counts, offs)
            y.backward(torch.ones_like(y))
        finally:
            set_keep_dequantized(False)
        out.append((y.detach(), xi.grad))
    for got in out[:2]:  # re-dequantized or kept for the backward: the reference's bits
        assert torch.equal(got[0], out[2][0])
        assert torch.equal(got[1], out[2][1])


@pytest.mark.gpu
def test_gpu_product_with_lora_up_equals_two_products():
    """Mixtral-half fc1 at training size: the folded GEMM against the unfolded ``x · Wᵀ + u · Bᵀ`` (two
    grouped GEMMs and an addition): forward and gradients within bf16 rounding of one another."""
    E, S, n, k, r = 8, 8192, 14336, 2048, 32
    gen = torch.Generator(device="cuda").manual_seed(0)
    res = ExpertResiduals.from_packed(
        [quantize_tensor(torch.randn(n, k, generator=gen, device="cuda", dtype=torch.bfloat16), "nvfp4")
         for _ in range(E)]
    )  # fmt: skip
    counts = [S // E] * E
    counts[0], counts[1] = 0, 2 * S // E
    offs = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
    x = torch.randn(S, k, generator=gen, device="cuda").to(torch.bfloat16)
    u = torch.randn(S, r, generator=gen, device="cuda").to(torch.bfloat16)
    B = (torch.randn(E, n, r, generator=gen, device="cuda") * 0.1).to(torch.bfloat16)
    assert dequant_lora_applies(x, W4Weight.of(res), u, B)
    W = res.dequantize(torch.float32).to(torch.bfloat16)
    outs = []
    for folded in (True, False):
        xi, ui, Bi = (t.clone().requires_grad_() for t in (x, u, B))
        if folded:
            y = dequant_mm(xi, res, offs, u=ui, lora_up=Bi)
        else:
            y = expert_mm(xi, W, counts, offs) + expert_mm(ui, Bi, counts, offs)
        y.backward(torch.ones_like(y))
        outs.append([t.float() for t in (y.detach(), xi.grad, ui.grad, Bi.grad)])
    for name, a, b in zip(("y", "dx", "du", "dB"), *outs):
        err = (a - b).abs().max() / b.abs().max()
        assert err < 2.0**-7, f"{name}: {float(err):.2e}"
