"""The layers with the Triton kernels (backend "triton") against the same layers on the PyTorch reference
(backend "torch"): SVDQLinear and SVDQExperts in bf16, forward and gradients. On CPU the kernels run in
Triton's interpreter (tiny shapes); the gpu-marked cases repeat this at realistic sizes on CUDA, and for a
Megatron MoE layer (grouped path) too.

Tolerances: the activation quantization is bit-identical in both backends; the 4-bit GEMM applies the
NVFP4 global scale after an fp32 accumulation (the reference rounds the dequantized weight to bf16 first),
so a projection's outputs differ by bf16 rounding, and where such an output feeds the next projection's
4-bit activation quantization (fc1 → fc2 of experts) a value near a rounding boundary may take the
neighbouring code. So both bf16 runs are measured against the same module in float32 (same weights and
inputs, reference backend): the kernels' relative Frobenius error must be within 1.25× the bf16
reference's own, plus 2**-9 (one bf16 rounding), for outputs and every gradient."""

from __future__ import annotations

import pytest
import torch

from svdq.kernels import kernel_backend, triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def _linear(
    in_f: int,
    out_f: int,
    rank: int,
    device: str,
    act: str = "nvfp4",
    weight: str = "nvfp4",
    dtype=torch.bfloat16,
):
    from svdq.formats import quantize_tensor
    from svdq.layer import SVDQLinear

    g = torch.Generator().manual_seed(0)
    W = torch.randn(out_f, in_f, generator=g) * 0.05
    smooth = torch.rand(in_f, generator=g) + 0.5
    A = torch.randn(rank, in_f, generator=g) * 0.05
    B = torch.randn(out_f, rank, generator=g) * 0.05
    layer = SVDQLinear(quantize_tensor(W, weight), smooth, A, B, act_format=act, dtype=dtype)
    return layer.to(device)


def _run(module, args, params, backend):
    with kernel_backend(backend):
        module.zero_grad(set_to_none=True)
        y = module(*args)
        y.float().square().mean().backward()
    return {"y": y.detach(), "dx": args[0].grad.clone(), **{n: p.grad.clone() for n, p in params(module)}}


def _run_all(module, module32, make_inputs, params):
    """``{"torch", "triton", "fp32"}`` → output and gradients (``fp32``: the float32 module, reference)."""
    out = {b: _run(module, make_inputs(torch.bfloat16), params, b) for b in ("torch", "triton")}
    out["fp32"] = _run(module32, make_inputs(torch.float32), params, "torch")
    return out


def _check(out):
    exact = out["fp32"]
    for name in exact:
        err_kernel, err_ref = _rel(out["triton"][name], exact[name]), _rel(out["torch"][name], exact[name])
        assert err_kernel <= 1.25 * err_ref + 2**-9, (
            f"{name}: kernels {err_kernel:.2e}, reference {err_ref:.2e}"
        )


@pytest.mark.parametrize("act,weight", [("nvfp4", "nvfp4"), ("int4-g32", "int4-g32")])
def test_svdq_linear_kernels_match_reference(act, weight):
    layers = [_linear(64, 48, 8, "cpu", act, weight, dtype) for dtype in (torch.bfloat16, torch.float32)]

    def inputs(dtype):
        g = torch.Generator().manual_seed(1)
        return (torch.randn(2, 5, 64, generator=g).bfloat16().to(dtype).requires_grad_(True),)

    _check(_run_all(*layers, inputs, lambda m: [("lora_down", m.lora_down), ("lora_up", m.lora_up)]))


def _experts(device: str, E: int = 4, H: int = 64, inter: int = 32, rank: int = 8, dtype=torch.bfloat16):
    from svdq import SVDQConfig, decompose_expert_group
    from svdq.experts import ProjectionState, SVDQExperts
    from svdq.experts.handlers.concat_glu import ConcatGLU
    from svdq.stats import InputStats

    torch.manual_seed(0)
    W1, W2 = torch.randn(E, 2 * inter, H) * 0.1, torch.randn(E, H, inter) * 0.1
    states = []
    for proj, W, layout in (("fc1", W1, "shared-down"), ("fc2", W2, "per-expert")):
        stats = []
        for _ in range(E):
            st = InputStats(W.shape[2], sample_size=64)
            st.update(torch.randn(64, W.shape[2]))
            stats.append(st)
        cfg = SVDQConfig(rank=rank, alphas=(0.5,))
        r = decompose_expert_group(W, stats, cfg, projection=proj, layout=layout)
        states.append(ProjectionState.from_result(r, dtype=dtype))
    return SVDQExperts(states[0], states[1], ConcatGLU(torch.nn.SiLU())).to(device)


def _experts_case(device: str, T: int, **shape):
    q, q32 = (_experts(device, dtype=dtype, **shape) for dtype in (torch.bfloat16, torch.float32))
    E, H = q.num_experts, q.hidden_size

    def inputs(dtype):
        g = torch.Generator().manual_seed(2)
        x = torch.randn(T, H, generator=g).bfloat16().to(device, dtype).requires_grad_(True)
        idx = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(T)]).to(device)
        idx[::5, 1] = E  # masked slots
        w = torch.rand(T, 2, generator=g).bfloat16().to(device, dtype)
        return x, idx, w

    _check(_run_all(q, q32, inputs, lambda m: list(zip(("a1", "b1", "a2", "b2"), m.lora_parameters()))))


def test_svdq_experts_kernels_match_reference():
    _experts_case("cpu", T=9)


@pytest.mark.gpu
@pytest.mark.parametrize("act,weight", [("nvfp4", "nvfp4"), ("int4-g64", "int4-g64")])
def test_svdq_linear_kernels_match_reference_cuda(act, weight):
    layers = [
        _linear(2048, 4096, 32, "cuda", act, weight, dtype) for dtype in (torch.bfloat16, torch.float32)
    ]

    def inputs(dtype):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(4, 512, 2048, generator=g).bfloat16()
        return (x.to("cuda", dtype).requires_grad_(True),)

    _check(_run_all(*layers, inputs, lambda m: [("lora_down", m.lora_down), ("lora_up", m.lora_up)]))


@pytest.mark.gpu
def test_svdq_experts_kernels_match_reference_cuda():
    _experts_case("cuda", T=1024, E=8, H=1024, inter=512, rank=16)
