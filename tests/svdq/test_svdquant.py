"""SVDQuant decomposition, SVDQLinear and the svdq.quantize entry point (CPU; float64 references)."""

import json

import pytest
import torch
from torch import nn

import svdq
from svdq import InputStats, SVDQConfig, SVDQLinear, decompose_linear
from svdq.formats import dequantize, fake_quant

OUT, IN, N = 192, 128, 1024


def outlier_layer(seed=0, out_f=OUT, in_f=IN, n=N):
    """A weight with a few large input columns and activations with a few outlier channels."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g) * 0.05
    W[:, :3] *= 8
    X = torch.randn(n, in_f, generator=g)
    X[:, 5:9] *= 25
    return W, X


def stats_of(X, sample=256):
    st = InputStats(X.shape[1], sample_size=sample)
    for chunk in X.split(200):
        st.update(chunk)
    return st


@pytest.mark.parametrize("preset", ["nvfp4-w4a4-r32", "int4-w4a4-r32", "nvfp4-w4a16-r32"])
def test_error_strictly_below_rtn_and_smoothing_only(preset):
    W, X = outlier_layer()
    res = decompose_linear(W, stats_of(X), SVDQConfig.preset(preset).replace(rank=16))
    assert res.final_error < 0.5 * res.rtn_error, res.summary()
    assert res.final_error < res.smooth_only_error
    # refinement never increases the error
    assert all(b <= a for a, b in zip(res.step_errors, res.step_errors[1:]))


def test_reconstruction_identity():
    """Q_w(R) is exactly the quantized (W − B·A')·diag(s); W = R/s + B·A' up to R's quantization error."""
    W, X = outlier_layer(1)
    cfg = SVDQConfig(rank=16, weight_format="int4", act_format="int4")
    res = decompose_linear(W, stats_of(X), cfg)
    R = (W - res.lora_up @ res.lora_down) * res.smooth
    assert torch.equal(dequantize(res.residual), fake_quant(R, cfg.weight_quant))
    W64 = R.double() / res.smooth.double() + res.lora_up.double() @ res.lora_down.double()
    torch.testing.assert_close(W64, W.double(), rtol=0, atol=1e-5)
    # lora_down is re-gauged to orthonormal rows (whatever the token count)
    eye = torch.eye(res.rank)
    torch.testing.assert_close(res.lora_down @ res.lora_down.T, eye, rtol=0, atol=1e-4)


def test_whitened_branch_beats_plain_on_correlated_inputs():
    """With correlated inputs and no quantization noise in the way, whitening wins clearly."""
    g = torch.Generator().manual_seed(9)
    W = torch.randn(OUT, IN, generator=g) * 0.05
    mix = torch.randn(IN, IN, generator=g) * torch.logspace(0, -2, IN)
    X = torch.randn(N, IN, generator=g) @ mix
    cfg = SVDQConfig(rank=16, weight_format="fp8", act_format="none", refine_steps=0, alphas=(0.0,))
    res = decompose_linear(W, stats_of(X), cfg)
    plain = decompose_linear(W, stats_of(X), cfg.replace(whiten=False))
    assert res.whitened and res.final_error < 0.8 * plain.final_error


def test_whitening_and_refinement_each_help():
    W, X = outlier_layer(2)
    base = SVDQConfig(rank=16, weight_format="int4", act_format="none")
    st = stats_of(X)
    plain = decompose_linear(W, st, base.replace(whiten=False, refine_steps=0))
    whiten = decompose_linear(W, st, base.replace(refine_steps=0))
    refine = decompose_linear(W, st, base)
    assert whiten.final_error <= plain.final_error  # whitening scores both branches, keeps the better
    assert refine.final_error <= whiten.final_error
    assert {w for _, w, _ in whiten.alpha_errors} == {True, False}


def _ref_forward64(layer: SVDQLinear, x: torch.Tensor) -> torch.Tensor:
    """float64 reference of y = Q_a(x/s)·Q_w(R)ᵀ + (x·Aᵀ)·Bᵀ + bias (quantizers' outputs are exact values)."""
    xs = (x.float() / layer.smooth).to(x.dtype)
    xq = fake_quant(xs, layer.act_format).double()
    R = dequantize(layer.packed_residual()).double()
    y = xq @ R.T + (x.double() @ layer.lora_down.double().T) @ layer.lora_up.double().T
    return y + layer.bias.double() if layer.bias is not None else y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_layer_packed_equals_fake_and_matches_float64(dtype):
    W, X = outlier_layer(3)
    res = decompose_linear(W, stats_of(X), SVDQConfig(rank=16))
    bias = torch.randn(OUT) * 0.1
    packed = SVDQLinear.from_result(res, bias, "nvfp4", storage="packed", dtype=dtype)
    fake = SVDQLinear.from_result(res, bias, "nvfp4", storage="fake", dtype=dtype)
    x = X[:64].to(dtype)
    y_p, y_f = packed(x), fake(x)
    assert y_p.dtype == dtype and torch.equal(y_p, y_f)
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    ref = _ref_forward64(packed, x)
    assert ((y_p.double() - ref).norm() / ref.norm()).item() < tol
    # packed storage is smaller than the fake (dequantized) residual
    nbytes = lambda m: sum(b.numel() * b.element_size() for b in m.buffers())  # noqa: E731
    assert nbytes(packed) < nbytes(fake) / 3 or dtype != torch.float32


def test_straight_through_gradients_reach_only_adapters_and_input():
    W, X = outlier_layer(4)
    res = decompose_linear(W, stats_of(X), SVDQConfig(rank=8, weight_format="int4", act_format="int4"))
    layer = SVDQLinear.from_result(res, None, "int4", storage="packed")
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_down", "lora_up"}
    x = X[:32].clone().requires_grad_(True)
    g = torch.randn(32, OUT)
    layer(x).backward(g)
    # STE: d/dx [Q_a(x/s)·Rᵀ] = (g·R)/s ; branch: g·B·A
    R = dequantize(layer.packed_residual()).double()
    A, B = layer.lora_down.double(), layer.lora_up.double()
    gx = (g.double() @ R) / layer.smooth.double() + g.double() @ B @ A
    gB = g.double().T @ (X[:32].double() @ A.T)
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(x.grad, gx) < 1e-5  # float32 kernels vs float64 reference
    assert rel(layer.lora_up.grad, gB) < 1e-5
    assert all(b.grad is None for b in layer.buffers())


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(IN, 256)
        self.act = nn.GELU()
        self.down = nn.Linear(256, IN)
        self.lm_head = nn.Linear(IN, 64)

    def forward(self, x):
        return self.lm_head(self.down(self.act(self.up(x))))


def test_quantize_entry_point_replaces_targets_and_improves_output():
    torch.manual_seed(0)
    model = TwoLayer()
    _, X = outlier_layer(5)
    ref = model(X).detach()
    loop = lambda m: [m(b) for b in X.split(256)]  # noqa: E731
    svdq.quantize(model, {"rank": 16, "exclude": ["lm_head"]}, loop, progress=False)
    assert isinstance(model.up, SVDQLinear) and isinstance(model.down, SVDQLinear)
    assert type(model.lm_head) is nn.Linear
    assert model.up.svdq_summary["final_error"] < model.up.svdq_summary["rtn_error"]
    rel = ((model(X) - ref).norm() / ref.norm()).item()
    # round-to-nearest W4A4 of the same two layers, for comparison
    torch.manual_seed(0)
    rtn = TwoLayer()
    fmt = SVDQConfig().weight_quant
    q = lambda lin, x: nn.functional.linear(fake_quant(x, fmt), fake_quant(lin.weight, fmt), lin.bias)  # noqa: E731
    y_rtn = rtn.lm_head(q(rtn.down, rtn.act(q(rtn.up, X))))
    rel_rtn = ((y_rtn - ref).norm() / ref.norm()).item()
    assert rel < 0.6 * rel_rtn, (rel, rel_rtn)


def test_config_roundtrip_and_presets():
    cfg = SVDQConfig(rank=8, alphas=(0.2, 0.5), include=("*.mlp.*",), weight_format="int4-g128")
    assert SVDQConfig.from_dict(cfg.to_dict()) == cfg
    assert SVDQConfig.from_json(cfg.to_json()) == cfg
    assert json.loads(cfg.to_json())["alphas"] == [0.2, 0.5]
    assert cfg.weight_quant.group_size == 128
    assert SVDQConfig.preset("int4-w4a4-r32").weight_format == "int4"
    assert SVDQConfig.preset("nvfp4-w4a16-r32").act_quant.is_quantized is False
    with pytest.raises(ValueError, match="unknown preset"):
        SVDQConfig.preset("nope")
    with pytest.raises(ValueError, match=r"SVDQConfig: unknown field\(s\) \[.rnak.\]"):
        SVDQConfig.from_dict({"rnak": 3})
    with pytest.raises(ValueError):
        SVDQConfig(weight_format="int5")


def _single(in_f=IN, out_f=OUT):
    m = nn.Sequential()
    m.add_module("proj", nn.Linear(in_f, out_f))
    return m


def test_bad_input_nan_weight_names_module():
    m = _single()
    m.proj.weight.data[3, 4] = float("nan")
    with pytest.raises(ValueError, match="proj: weight contains NaN"):
        svdq.quantize(m, SVDQConfig(rank=8), lambda mm: mm(torch.randn(8, IN)), progress=False)


def test_bad_input_nan_activations_names_module():
    x = torch.randn(16, IN)
    x[2, 2] = float("inf")
    with pytest.raises(ValueError, match="proj: calibration activations contain NaN or Inf"):
        svdq.quantize(_single(), SVDQConfig(rank=8), lambda mm: mm(x), progress=False)


def test_bad_input_rank_too_large():
    with pytest.raises(ValueError, match="rank 64 must be < min"):
        svdq.quantize(_single(64, 64), SVDQConfig(rank=64), lambda mm: mm(torch.randn(8, 64)), progress=False)


def test_bad_input_group_divisibility():
    with pytest.raises(ValueError, match="in_features 72 is not divisible"):
        svdq.quantize(_single(72, 64), SVDQConfig(rank=8), lambda mm: mm(torch.randn(8, 72)), progress=False)


def test_layer_without_calibration_data_errors_or_falls_back():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(IN, IN)
            self.unused = nn.Linear(IN, IN)

        def forward(self, x):
            return self.used(x)

    x = torch.randn(64, IN)
    with pytest.raises(ValueError, match="unused: no calibration data"):
        svdq.quantize(Branchy(), SVDQConfig(rank=8), lambda m: m(x), progress=False)
    m = svdq.quantize(
        Branchy(), SVDQConfig(rank=8, weight_only_fallback=True), lambda m: m(x), progress=False
    )
    assert m.unused.svdq_summary["weight_only"] and not m.used.svdq_summary["weight_only"]
    assert torch.isfinite(m.unused(x)).all()


def test_no_match_is_an_error():
    with pytest.raises(ValueError, match="no nn.Linear matched"):
        svdq.quantize(_single(), SVDQConfig(include=("nothing*",)), lambda m: None, progress=False)


def test_stats_stream_matches_batch_statistics():
    _, X = outlier_layer(6)
    st = stats_of(X, sample=100)
    torch.testing.assert_close(st.gram, X.double().T @ X.double(), rtol=1e-12, atol=1e-9)
    assert torch.equal(st.absmax, X.abs().amax(0))
    assert st.n_tokens == N and st.sample.shape == (100, IN)
    # every sampled row is a real calibration row; reproducible with the same seed
    assert all((X == row).all(1).any() for row in st.sample)
    assert torch.equal(stats_of(X, sample=100).sample, st.sample)


@pytest.mark.gpu
def test_cuda_decomposition_and_layer_match_cpu():
    W, X = outlier_layer(7)
    cfg = SVDQConfig(rank=16, refine_steps=0, alphas=(0.5,))
    res_cpu = decompose_linear(W, stats_of(X), cfg)
    st = stats_of(X)
    res_gpu = decompose_linear(W.cuda(), st, cfg)
    assert abs(res_gpu.final_error - res_cpu.final_error) < 0.02 * res_cpu.final_error + 1e-4
    layer = SVDQLinear.from_result(res_cpu, None, "nvfp4").cuda()
    cpu_layer = SVDQLinear.from_result(res_cpu, None, "nvfp4")
    x = X[:64]
    torch.testing.assert_close(layer(x.cuda()).cpu(), cpu_layer(x), rtol=1e-3, atol=1e-3)
    for dtype in (torch.bfloat16, torch.float16):
        y = SVDQLinear.from_result(res_cpu, None, "nvfp4", dtype=dtype).cuda()(x.cuda().to(dtype))
        assert y.dtype == dtype and torch.isfinite(y).all()
        y.float().sum().backward()


def test_gptq_residual_is_lossless_packed_and_beats_rtn_on_held_out_tokens():
    g = torch.Generator().manual_seed(11)
    in_f, out_f = 64, 96
    W = torch.randn(out_f, in_f, generator=g) * 0.1
    mix = torch.randn(in_f, in_f, generator=g) * 0.3 + torch.eye(in_f)
    X = torch.randn(4096, in_f, generator=g) @ mix
    X_test = torch.randn(1024, in_f, generator=g) @ mix
    cfg = SVDQConfig(rank=4, weight_format="int4-g32", act_format="none", alphas=(0.5,), refine_steps=0)
    rtn = decompose_linear(W, stats_of(X), cfg)
    gptq = decompose_linear(W, stats_of(X), cfg.replace(residual_quant="gptq"))
    assert rtn.residual_quant == "rtn" and gptq.residual_quant == "gptq"

    def held_out(res):
        W_hat = (
            dequantize(res.residual).double() / res.smooth.double() + (res.lora_up @ res.lora_down).double()
        )
        return (
            (X_test.double() @ (W_hat - W.double()).T).norm() / (X_test.double() @ W.double().T).norm()
        ).item()

    assert held_out(gptq) < 0.9 * held_out(rtn)
    # few tokens (< 4 per input channel): GPTQ is skipped instead of over-fitting
    few = decompose_linear(W, stats_of(X[:128]), cfg.replace(residual_quant="gptq"))
    assert few.residual_quant == "rtn"
    with pytest.raises(ValueError, match="gptq"):
        SVDQConfig(weight_format="fp8", residual_quant="gptq")


@pytest.mark.parametrize("fmt_name", ["nvfp4", "int4", "int4-g128"])
def test_gptq_packing_reproduces_values_and_lowers_calibration_error(fmt_name):
    from svdq.formats import parse_format
    from svdq.solvers.gptq import gptq_quantize

    g = torch.Generator().manual_seed(12)
    R = torch.randn(48, 256, generator=g)
    X = torch.randn(2048, 256, generator=g) @ (torch.randn(256, 256, generator=g) * 0.2 + torch.eye(256))
    fmt = parse_format(fmt_name)
    Q, packed = gptq_quantize(R, X.double().T @ X.double(), fmt)
    assert torch.equal(dequantize(packed), Q)
    err = lambda Rq: ((X.double() @ (Rq - R).double().T).norm() / (X.double() @ R.double().T).norm()).item()  # noqa: E731
    assert err(Q) < 0.9 * err(fake_quant(R, fmt))


def test_randomized_svd_product_matches_explicit():
    from svdq.solvers.lowrank import randomized_svd_product

    g = torch.Generator().manual_seed(13)
    left = torch.randn(600, 300, generator=g) * torch.logspace(0, -3, 300)
    right = torch.linalg.cholesky(torch.eye(300) + 0.1 * torch.ones(300, 300))
    U, S, Vh = randomized_svd_product(left, right, 16, oversample=16, power_iters=3, exact_below=0)
    S_exact = torch.linalg.svdvals((left @ right).double())[:16]
    torch.testing.assert_close(S.double(), S_exact, rtol=1e-3, atol=0)
    approx = (U * S) @ Vh
    best = torch.linalg.svd(left @ right)
    tail = best.S[16:].square().sum().sqrt()
    assert (left @ right - approx).norm() <= 1.01 * tail


@pytest.mark.gpu
def test_cuda_cholesky_qr_orthonormalizes_ill_conditioned_bases():
    from svdq.solvers.lowrank import _orth, randomized_svd

    g = torch.Generator().manual_seed(14)
    Y = torch.randn(5000, 40, generator=g) * torch.logspace(0, -6, 40)
    Q = _orth(Y.cuda())
    torch.testing.assert_close(Q.T @ Q, torch.eye(40, device="cuda"), rtol=0, atol=1e-4)
    # same column space as the CPU Householder QR (on a moderately conditioned basis)
    Y2 = torch.randn(5000, 40, generator=g) * torch.logspace(0, -3, 40)
    Q_gpu, Q_cpu = _orth(Y2.cuda()).cpu(), _orth(Y2)
    assert (Q_gpu @ (Q_gpu.T @ Q_cpu) - Q_cpu).norm() < 1e-3
    M = torch.randn(3000, 1000, generator=g) * torch.logspace(0, -2, 1000)
    S_gpu = randomized_svd(M.cuda(), 32, exact_below=0)[1].cpu().double()
    S_exact = torch.linalg.svdvals(M.double())[:32]
    # a flat spectrum: the randomized estimate is within a few percent, as on the CPU (other Ω draws)
    S_cpu = randomized_svd(M, 32, exact_below=0)[1].double()
    assert ((S_gpu - S_exact).abs() / S_exact).max() < 2 * ((S_cpu - S_exact).abs() / S_exact).max() + 1e-3
