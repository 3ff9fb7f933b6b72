"""svdq.kernels.act_quant against the PyTorch reference: ``fake_quant(smoothed_input(x))``,
``quantize_tensor``, ``quant_rows`` (bit for bit) and ``x · Aᵀ`` in float64 (stated tolerance).

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py); sizes stay small. The
``gpu`` tests repeat the key cases at realistic sizes on CUDA, against the reference on the same device.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from svdq.experts.ops import quant_rows, row_amax_per_expert  # noqa: E402
from svdq.formats import fake_quant, nvfp4, pack_nibbles, parse_format, quantize_tensor, trusted_inputs  # noqa: E402
from svdq.kernels import kernel_backend  # noqa: E402
from svdq.kernels.act_quant import fused_act_applies, quantize_act, quantize_act_ste, ste_grad  # noqa: E402

# the interpreter evaluates 1 / 0 and 0 * inf with numpy (int4 all-zero groups), which warns
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FORMATS = ("nvfp4", "int4-g32", "int4-g64", "int4-g128")
EPS = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


# ------------------------------------------------------------------------------------------- helpers
def smoothed(x, s):
    return x if s is None else (x.float() / s).to(x.dtype)  # StaticActRange.smoothed_input


def bits(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def assert_same(res, x, s, fmt, ga=None):
    """xq, codes and scales bit for bit against fake_quant / quantize_tensor of x / s."""
    fmt = parse_format(fmt)
    xs = smoothed(x, s)
    with trusted_inputs():
        ref = fake_quant(xs, fmt, ga)
        p = quantize_tensor(xs, fmt, ga)
    assert res.xq.dtype == x.dtype and res.xq.shape == x.shape
    assert torch.equal(res.xq, ref)
    if res.qdata is not None:
        assert torch.equal(res.qdata, p.qdata)
        assert res.scale.dtype == p.scale.dtype and torch.equal(bits(res.scale), bits(p.scale))
        if p.global_scale is None:
            assert res.global_scale is None
        else:
            assert torch.equal(res.global_scale, p.global_scale)


def assert_u(u, x, A):
    """u within fp32-accumulation tolerance of float64 x · Aᵀ (A rounded to x's dtype first):
    |u - u64| <= eps_D |u64| + K 2**-24 (|x| · |A|ᵀ) (+ tiny absolute slack)."""
    Ad = A.to(x.dtype).double()
    x2 = x.reshape(-1, x.shape[-1]).double()
    ref = x2 @ Ad.T
    bound = EPS[x.dtype] * ref.abs() + x.shape[-1] * 2.0**-24 * (x2.abs() @ Ad.abs().T) + 1e-30
    assert u.dtype == x.dtype and u.shape == (*x.shape[:-1], A.shape[0])
    err = (u.reshape(ref.shape).double() - ref).abs()
    assert bool((err <= bound).all()), float((err - bound).max())


def rand(shape, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale
    x[..., 5] *= 40.0  # an outlier channel
    return x.to(dtype)


def smooth_vec(K, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(K, generator=g) * 3 + 0.25


# ------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_random_matches_reference(dtype, fmt):
    x, s = rand((17, 256), dtype), smooth_vec(256)
    A = torch.randn(8, 256, generator=torch.Generator().manual_seed(2))
    res = quantize_act(x, s, fmt, lora_down=A, return_packed=True)
    assert_same(res, x, s, fmt)
    assert_u(res.u, x, A)
    assert_same(quantize_act(x, None, fmt, return_packed=True), x, None, fmt)  # no smoothing


ODD = [(1, 16, "nvfp4"), (3, 48, "nvfp4"), (17, 48, "nvfp4"), (3, 96, "int4-g32"), (1, 128, "int4-g128"),
       (17, 192, "int4-g64")]  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("M", "K", "fmt"), ODD)
def test_odd_shapes(dtype, M, K, fmt):
    x, s = rand((M, K), dtype, seed=M + K), smooth_vec(K)
    A = torch.randn(3, K, generator=torch.Generator().manual_seed(3))
    res = quantize_act(x, s, fmt, lora_down=A, return_packed=True)
    assert_same(res, x, s, fmt)
    assert_u(res.u, x, A)


@pytest.mark.parametrize("tiles", [(16, 16, 1), (16, 64, 1), (32, 128, 2), (16, 128, 4)])
@pytest.mark.parametrize("fmt", ["nvfp4", "int4-g128"])
def test_tilings(tiles, fmt):
    """Rows and K chunks split over programs (u partials summed across programs)."""
    if fmt.startswith("int4") and tiles[1] < 128:
        pytest.skip("BLOCK_K must hold whole int4 groups")
    x, s = rand((40, 512), torch.bfloat16, seed=7), smooth_vec(512)
    A = torch.randn(20, 512, generator=torch.Generator().manual_seed(4))  # r = 20, padded to 32
    res = quantize_act(x, s, fmt, lora_down=A, return_packed=True, _tiles=tiles)
    assert_same(res, x, s, fmt)
    assert_u(res.u, x, A)


def test_leading_dims_and_non_contiguous():
    x = rand((2, 3, 64), torch.bfloat16)
    A = torch.randn(4, 64)
    res = quantize_act(x, smooth_vec(64), "nvfp4", lora_down=A, return_packed=True)
    assert res.u.shape == (2, 3, 4) and res.qdata.shape == (2, 3, 32) and res.scale.shape == (2, 3, 4)
    assert_same(res, x, smooth_vec(64), "nvfp4")
    assert_u(res.u, x, A)
    xt = rand((64, 32), torch.float16).t()  # (32, 64), not contiguous
    assert not xt.is_contiguous()
    s = smooth_vec(64)
    assert_same(quantize_act(xt, s, "int4-g32", return_packed=True), xt, s, "int4-g32")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_zeros(dtype, fmt):
    x = torch.zeros(3, 128, dtype=dtype)
    assert_same(quantize_act(x, smooth_vec(128), fmt, return_packed=True), x, smooth_vec(128), fmt)
    x[1, 40:50] = torch.tensor([1.0, -2.0] * 5, dtype=dtype)  # zero blocks / groups beside a non-zero one
    assert_same(quantize_act(x, None, fmt, return_packed=True), x, None, fmt)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sg", [1.0, 0.125, 2.0**-12])
def test_nvfp4_ties_and_block_maxima(dtype, sg):
    """Blocks whose maximum is exactly 6 · (s_b · g): every E2M1 bound 0.25 … 5 (and its negative) is an
    exact tie of y = x / (s_b g); the up-ties 0.75 / 1.75 / 3.5 and the lower ones 0.25 / 1.25 / 2.5 / 5."""
    t = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    t = torch.cat([t, -t])
    nb = torch.tensor([0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 0.0, 6.0, -0.5, -1.0, -3.0, -4.0, 0.1, -0.1, 6.0, 0.3])
    x = torch.stack([torch.cat([t, nb, t.flip(0)]), torch.cat([nb, t, -t])]) * sg  # (2, 48)
    x = x.to(dtype)
    ga = torch.tensor(2688.0 * sg)  # g = sg: s_b = 1 for blocks with maximum 6 sg
    res = quantize_act(x, None, "nvfp4", ga, return_packed=True)
    assert_same(res, x, None, "nvfp4", ga)
    expect = torch.tensor([0, 1, 1, 2, 2, 4, 4, 6.0]).repeat(2) * t.sign() * sg  # ties to the even code
    assert torch.equal(res.xq.float()[0, :16], expect)
    assert_same(quantize_act(x, None, "nvfp4", return_packed=True), x, None, "nvfp4")  # dynamic


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_ties(dtype, group):
    """Groups with maximum 7 (m ~ 1) and x · m at every half integer (round half to even, double
    rounding through the dtype); groups with other maxima at half-step multiples."""
    half = torch.arange(-14, 15, dtype=torch.float32) * 0.5  # -7 … 7 by 0.5
    row = torch.cat([half, torch.zeros(group - half.numel())])
    rows = torch.stack([row, row * 0.37, row * 3.1, row.flip(0) * 1e-3])
    x = rows.repeat(1, 2).to(dtype)  # (4, 2 * group)
    fmt = f"int4-g{group}"
    assert_same(quantize_act(x, None, fmt, return_packed=True), x, None, fmt)
    s = smooth_vec(x.shape[1])
    assert_same(quantize_act(x, s, fmt, return_packed=True), x, s, fmt)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_subnormal_and_huge(dtype, fmt):
    tiny = {torch.float32: 1e-40, torch.bfloat16: 1e-39, torch.float16: 1e-6}[dtype]
    big = {torch.float32: 1e38, torch.bfloat16: 1e38, torch.float16: 6e4}[dtype]
    g = torch.Generator().manual_seed(5)
    base = torch.randn(4, 128, generator=g)
    x = torch.cat([base * tiny, base * big / 4, base, base * 1e-3]).to(dtype)  # (16, 128)
    x[2, :16] = x[2, :16] * 1e-4  # blocks far below the tensor max: E4M3 subnormal / clamped block scales
    assert_same(quantize_act(x, None, fmt, return_packed=True), x, None, fmt)
    s = torch.full((128,), 2.0)  # exact halving keeps |x / s| finite
    assert_same(quantize_act(x, s, fmt, return_packed=True), x, s, fmt)


@pytest.mark.parametrize("dtype", DTYPES)
def test_static_range_clips(dtype):
    x, s = rand((9, 64), dtype), smooth_vec(64)
    amax = smoothed(x, s).float().abs().max()
    for ga in (amax * 0.3, amax * 1.7, torch.tensor(1e-30)):
        res = quantize_act(x, s, "nvfp4", ga, return_packed=True)
        assert_same(res, x, s, "nvfp4", ga)
    assert_same(quantize_act(x, s, "nvfp4", 5.0), x, s, "nvfp4", 5.0)  # a Python float


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_row_ranges(dtype):
    """(M,) ranges: static ones vs quant_rows with one expert per row; dynamic per-expert ones
    (each row's expert maximum, 0 for an all-zero expert) vs quant_rows of sorted rows."""
    x, s = rand((12, 64), dtype, seed=9), smooth_vec(64)
    xs = smoothed(x, s)
    M = x.shape[0]
    ids = torch.arange(M)
    ga = xs.float().abs().amax(-1) * torch.linspace(0.2, 2.0, M)  # some rows clip
    res = quantize_act(x, s, "nvfp4", ga, return_packed=True)
    with trusted_inputs():
        assert torch.equal(res.xq, quant_rows(xs, ids, parse_format("nvfp4"), M, ga))
    codes, sc, gsc = nvfp4.encode(xs, ga[:, None])
    assert torch.equal(res.qdata, pack_nibbles(codes, even_low=True))
    assert torch.equal(bits(res.scale), bits(sc)) and torch.equal(res.global_scale, gsc.reshape(M))

    x[4:7] = 0  # expert 1 has only zero rows: range 0, g -> 1
    xs = smoothed(x, s)
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3])
    ga = row_amax_per_expert(xs, ids, 4)[ids]  # (M,)
    res = quantize_act(x, s, "nvfp4", ga)
    assert torch.equal(res.xq, quant_rows(xs, ids, parse_format("nvfp4"), 4))
    x3 = x.reshape(3, 4, 64)  # ranges of shape x.shape[:-1] too
    assert torch.equal(quantize_act(x3, s, "nvfp4", ga.reshape(3, 4)).xq, res.xq.reshape(3, 4, 64))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ["nvfp4", "int4-g32"])
def test_per_row_smoothing(dtype, fmt):
    """smooth (E, K) + smooth_ids: each row smoothed by its expert's vector (rows unsorted), bit for bit
    the reference of each row with its own smoothing; with per-row ranges (nvfp4) and x · Aᵀ too."""
    x = rand((10, 64), dtype, seed=3)
    table = torch.stack([smooth_vec(64, seed=i) for i in range(3)])  # (E, K)
    ids = torch.tensor([2, 0, 0, 1, 2, 2, 0, 1, 1, 0])
    xs = (x.float() / table[ids]).to(dtype)  # (M, K): the reference's smoothed input
    ga = None
    if fmt == "nvfp4":
        ga = xs.float().abs().amax(-1) * torch.linspace(0.5, 1.5, 10)  # one range per row, some clip
    A = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    res = quantize_act(x, table, fmt, ga, A, smooth_ids=ids, return_packed=True)
    if ga is None:  # int4: per-group scales, no range: the reference of the smoothed rows
        assert_same(res, xs, None, fmt)
    else:
        with trusted_inputs():
            assert torch.equal(res.xq, quant_rows(xs, torch.arange(10), parse_format(fmt), 10, ga))
        codes, sc, _ = nvfp4.encode(xs, ga[:, None])
        assert torch.equal(res.qdata, pack_nibbles(codes, even_low=True))
        assert torch.equal(bits(res.scale), bits(sc))
    assert_u(res.u, x, A)
    with pytest.raises(ValueError, match="smooth_ids range"):
        quantize_act(x, table, fmt, ga, smooth_ids=ids + 1)
    with pytest.raises(ValueError, match=r"smooth must be a float32 tensor of shape \(E, 64\)"):
        quantize_act(x, table[:, :32], fmt, ga, smooth_ids=ids)
    with pytest.raises(ValueError, match="smooth_ids must be"):
        quantize_act(x, table, fmt, ga, smooth_ids=ids[:5])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["none", "static", "rows", "rows-per-row-smoothing"])
def test_ste_grad_bit_exact(dtype, mode):
    """The backward kernel equals, bit for bit, autograd of the reference expression
    ``where(|x / s| <= range, g, 0)`` through ``(x.float() / s).to(D)``."""
    x = rand((9, 64), dtype, seed=4).requires_grad_()
    ids = torch.tensor([0, 1, 1, 2, 0, 2, 2, 1, 0])
    table = torch.stack([smooth_vec(64, seed=i) for i in range(3)])  # (E, K)
    s = table[ids] if mode.endswith("smoothing") else smooth_vec(64)  # (M, K) or (K,)
    xs = (x.float() / s).to(dtype)
    amax = xs.detach().float().abs()
    ga = {"none": None, "static": amax.max() * 0.5, "rows": amax.amax(-1) * torch.linspace(0.3, 1.2, 9)}.get(
        mode, amax.amax(-1) * 0.7
    )
    gy = torch.randn(9, 64, generator=torch.Generator().manual_seed(5)).to(dtype)
    lim = None if ga is None else (ga if ga.dim() == 0 else ga[:, None])
    passed = gy if lim is None else torch.where(xs.detach().float().abs() <= lim, gy, torch.zeros_like(gy))
    (want,) = torch.autograd.grad(xs, x, passed)  # autograd of the reference smoothing
    sm, sid = (table, ids) if mode.endswith("smoothing") else (s, None)
    got = ste_grad(x.detach(), gy, sm, ga, sid)
    assert got.dtype == dtype and torch.equal(got, want)


def test_empty_and_rank_zero():
    x = torch.zeros(0, 32, dtype=torch.bfloat16)
    res = quantize_act(x, None, "nvfp4", lora_down=torch.zeros(4, 32), return_packed=True)
    assert res.xq.shape == (0, 32) and res.u.shape == (0, 4) and res.qdata.shape == (0, 16)
    x = rand((5, 32), torch.bfloat16)
    res = quantize_act(x, None, "int4-g32", lora_down=torch.zeros(0, 32))
    assert res.u.shape == (5, 0)
    assert_same(res, x, None, "int4-g32")


# ------------------------------------------------------------------------------------------- errors
def test_bad_arguments():
    x = rand((4, 64), torch.bfloat16)
    cases = [
        (dict(x=x[:, :40]), "not divisible"),
        (dict(x=x.to(torch.int32)), "dtype"),
        (dict(fmt="fp8"), "not supported"),
        (dict(smooth=torch.ones(32)), "smooth"),
        (dict(smooth=torch.ones(64, dtype=torch.float16)), "smooth"),
        (dict(lora_down=torch.ones(4, 32)), "lora_down"),
        (dict(global_amax=torch.ones(3)), "global_amax"),
        (dict(global_amax=torch.tensor(-1.0)), "global_amax"),
        (dict(global_amax=torch.tensor(float("inf"))), "global_amax"),
        (dict(fmt="int4", global_amax=torch.tensor(1.0)), "int4"),
    ]
    for over, match in cases:
        kw = dict(x=x, smooth=None, fmt="nvfp4", global_amax=None, lora_down=None) | over
        with pytest.raises(ValueError, match=match):
            quantize_act(**kw)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("fmt", ["nvfp4", "int4"])
def test_non_finite(static, fmt):
    if static and fmt == "int4":
        pytest.skip("int4 has no static range")
    ga = torch.tensor(10.0) if static else None
    x = rand((4, 64), torch.float32)
    x[2, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        fake_quant(x, fmt, ga)  # the reference raises too
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_act(x, None, fmt, ga)
    x[2, 7] = 1.0
    s = torch.ones(64)
    s[3] = 1e-45  # x / s overflows to inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_act(x, s, fmt, ga)
    x[2, 7] = float("nan")
    with trusted_inputs():  # no check; the NaN shows in the output
        assert torch.isnan(quantize_act(x, None, fmt, ga).xq[2, 7])


# ------------------------------------------------------------------------------------------- gradients
def reference_path(x, s, fmt, ga, A):
    xq = fake_quant(smoothed(x, s), fmt, ga)
    return xq, F.linear(x, A.to(x.dtype))


@pytest.mark.parametrize(
    ("dtype", "fmt", "ga"),
    [(torch.float32, "nvfp4", None), (torch.float32, "nvfp4", "clip"), (torch.bfloat16, "nvfp4", "clip"),
     (torch.float16, "int4-g32", None), (torch.bfloat16, "nvfp4", "rows")],
)  # fmt: skip
def test_gradients_match_reference_autograd(dtype, fmt, ga):
    """Gradients to x and lora_down vs autograd of the reference path (fp32 tolerance: float32 inputs
    equal within 1e-6 relative; 16-bit within one ulp of the dtype, from the order of the dx sum)."""
    x0, s = rand((6, 64), dtype), smooth_vec(64)
    amax = smoothed(x0, s).float().abs()
    if ga == "clip":
        ga = amax.max() * 0.4
    elif ga == "rows":
        ga = amax.amax(-1) * torch.linspace(0.3, 1.5, 6)
    A0 = torch.randn(8, 64, generator=torch.Generator().manual_seed(6))
    gen = torch.Generator().manual_seed(8)
    w_xq, w_u = torch.randn(6, 64, generator=gen).to(dtype), torch.randn(6, 8, generator=gen).to(dtype)

    grads = []
    for fused in (True, False):
        x, A = x0.clone().requires_grad_(), A0.clone().requires_grad_()
        if fused:
            xq, u = quantize_act_ste(x, s, fmt, ga, A)
        elif ga is not None and ga.dim():  # per-row: what quant_rows computes, one expert per row
            xq = quant_rows(smoothed(x, s), torch.arange(6), parse_format(fmt), 6, ga)
            u = F.linear(x, A.to(dtype))
        else:
            xq, u = reference_path(x, s, fmt, ga, A)
        ((xq * w_xq).sum() + (u * w_u).sum()).backward()
        grads.append((xq.detach(), x.grad, A.grad))
    (xq1, dx1, dA1), (xq2, dx2, dA2) = grads
    assert torch.equal(xq1, xq2)
    assert dA1.dtype == torch.float32 and dx1.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else EPS[dtype] * 2
    torch.testing.assert_close(dx1.float(), dx2.float(), rtol=tol, atol=tol * dx2.float().abs().max().item())
    torch.testing.assert_close(dA1, dA2, rtol=tol, atol=tol * dA2.abs().max().item())
    if ga is not None:  # clipped elements get no gradient through xq
        clipped = amax > (ga if ga.dim() == 0 else ga[:, None])
        assert clipped.any()


def test_gradient_without_lora_and_through_smoothing():
    x0, s = rand((5, 32), torch.float32), smooth_vec(32)
    x = x0.clone().requires_grad_()
    xq, u = quantize_act_ste(x, s, "nvfp4")
    assert u is None
    xq.sum().backward()
    torch.testing.assert_close(x.grad, (1.0 / s).expand(5, 32), rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------- dispatch
def test_fused_act_applies():
    x = rand((4, 64), torch.bfloat16)
    with kernel_backend("torch"):
        assert not fused_act_applies(x, "nvfp4")
    with kernel_backend("triton"):
        assert fused_act_applies(x, "nvfp4", smooth_vec(64)) == (x.is_cuda or _interpreting())
        assert not fused_act_applies(x, "fp8")
        assert not fused_act_applies(x, "none")
        assert not fused_act_applies(x[:, :40], "nvfp4")
        assert not fused_act_applies(x.to(torch.int32), "int4")
    if not torch.cuda.is_available():
        with kernel_backend("auto"):
            assert not fused_act_applies(x, "nvfp4")  # auto takes kernels for CUDA tensors only


def _interpreting():
    from svdq.kernels import interpreting

    return interpreting()


# ------------------------------------------------------------------------------------------- GPU
GPU_CASES = [
    ("nvfp4", None, torch.bfloat16, 2048),
    ("nvfp4", "static", torch.bfloat16, 4096),
    ("nvfp4", "rows", torch.bfloat16, 4096),
    ("nvfp4", None, torch.float16, 2048),
    ("nvfp4", None, torch.float32, 2048),
    ("int4-g64", None, torch.bfloat16, 4096),
    ("int4-g128", None, torch.float16, 2048),
    ("int4-g32", None, torch.float32, 2048),
]


@pytest.mark.gpu
@pytest.mark.parametrize(("fmt", "rng", "dtype", "K"), GPU_CASES)
def test_gpu_realistic(fmt, rng, dtype, K):
    dev = torch.device("cuda")
    x, s = rand((4096, K), dtype).to(dev), smooth_vec(K).to(dev)
    x[7, :16] = 0
    x[9, 32:48] *= 1e-4
    A = torch.randn(32, K, device=dev)
    xs = smoothed(x, s)
    ga = None
    if rng == "static":
        ga = xs.float().abs().max() * 0.5
    elif rng == "rows":
        ga = xs.float().abs().amax(-1) * 0.8
    res = quantize_act(x, s, fmt, ga, A, return_packed=True)
    assert_u(res.u.cpu(), x.cpu(), A.cpu())
    if rng == "rows":
        ids = torch.arange(4096, device=dev)
        with trusted_inputs():
            assert torch.equal(res.xq, quant_rows(xs, ids, parse_format(fmt), 4096, ga))
        codes, sc, _ = nvfp4.encode(xs, ga[:, None])
        assert torch.equal(res.qdata, pack_nibbles(codes, even_low=True))
        assert torch.equal(bits(res.scale), bits(sc))
    else:
        assert_same(res, x, s, fmt, ga)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["nvfp4", "int4-g64"])
def test_gpu_special_values_and_gradients(fmt):
    dev = torch.device("cuda")
    for dtype in DTYPES:
        g = torch.Generator().manual_seed(5)
        base = torch.randn(64, 256, generator=g)
        tiny = {torch.float32: 1e-40, torch.bfloat16: 1e-39, torch.float16: 1e-6}[dtype]
        x = torch.cat([base * tiny, base * 1e3, base, base * 1e-3, torch.zeros(3, 256)]).to(dtype).to(dev)
        assert_same(quantize_act(x, None, fmt, return_packed=True), x, None, fmt)
        s = smooth_vec(256).to(dev)
        assert_same(quantize_act(x, s, fmt, return_packed=True), x, s, fmt)
    x0 = rand((512, 1024), torch.bfloat16).to(dev)
    s, A0 = smooth_vec(1024).to(dev), torch.randn(32, 1024, device=dev)
    ga = smoothed(x0, s).float().abs().max() * 0.5 if fmt == "nvfp4" else None
    # upstream gradients that do not depend on u: the kernel's u and F.linear's differ by a bf16 rounding
    # (fp32 sums in another order), which a loss like u² would feed back into dx (seen on an H100: 8.0)
    gen = torch.Generator().manual_seed(8)
    w_xq = torch.randn(512, 1024, generator=gen).to(torch.bfloat16).to(dev)
    w_u = torch.randn(512, 32, generator=gen).to(torch.bfloat16).to(dev)
    out = []
    for fused in (True, False):
        x, A = x0.clone().requires_grad_(), A0.clone().requires_grad_()
        xq, u = quantize_act_ste(x, s, fmt, ga, A) if fused else reference_path(x, s, fmt, ga, A)
        ((xq * w_xq).float().sum() + (u * w_u).float().sum()).backward()
        out.append((xq.detach(), x.grad, A.grad))
    assert torch.equal(out[0][0], out[1][0])
    torch.testing.assert_close(out[0][1].float(), out[1][1].float(), rtol=2**-7, atol=1e-2)
    torch.testing.assert_close(out[0][2], out[1][2], rtol=2**-7, atol=out[1][2].abs().max().item() * 2**-7)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_per_row_smoothing_and_ste_grad(dtype):
    """Training sizes on CUDA (fc2 of a Mixtral-half MoE: 8 experts' rows, ffn 7168): per-expert smoothing
    via smooth_ids and per-row ranges bit for bit as the reference; the backward kernel bit for bit as
    autograd of the reference expression."""
    dev = torch.device("cuda")
    M, K, E = 4096, 7168, 8
    x = rand((M, K), dtype, seed=11).to(dev)
    ids = torch.sort(torch.randint(0, E, (M,), generator=torch.Generator().manual_seed(3)))[0].to(dev)
    table = torch.stack([smooth_vec(K, seed=i) for i in range(E)]).to(dev)  # (E, K)
    xs = (x.float() / table[ids]).to(dtype)
    ga = (xs.float().abs().amax(-1) * 0.8).contiguous()  # (M,): every row clips a little
    with trusted_inputs():
        res = quantize_act(x, table, "nvfp4", ga, smooth_ids=ids, return_packed=True)
        assert torch.equal(res.xq, quant_rows(xs, torch.arange(M, device=dev), parse_format("nvfp4"), M, ga))
    codes, sc, _ = nvfp4.encode(xs, ga[:, None])
    assert torch.equal(res.qdata, pack_nibbles(codes, even_low=True))
    assert torch.equal(bits(res.scale), bits(sc))
    xr = x.clone().requires_grad_()
    xsr = (xr.float() / table[ids]).to(dtype)
    gy = torch.randn(M, K, generator=torch.Generator(device="cuda").manual_seed(4), device=dev).to(dtype)
    passed = torch.where(xsr.detach().float().abs() <= ga[:, None], gy, torch.zeros_like(gy))
    (want,) = torch.autograd.grad(xsr, xr, passed)
    assert torch.equal(ste_grad(x, gy, table, ga, ids), want)
