"""Benchmark: the grouped 4-bit residual GEMM (svdq.kernels.grouped_w4, svdq/DESIGN.md §16) against bf16
``torch._grouped_mm`` on the same shapes, forward and forward + backward.

Shapes (fc1 = gate and up stacked, ``H → 2·I``; fc2 ``I → H``; rows = tokens × top-k, routed uniformly at
random, sorted by expert):

* ``mixtral-half``: E = 8, H = 2048, I = 7168, 4096 tokens, top-2;
* ``fine-64``: E = 64, H = 2048, I = 1408, 4096 tokens, top-8;
* ``tiny``: E = 4, H = 128, I = 128, 16 tokens, top-2 (runs on CPU under ``TRITON_INTERPRET=1``).

Rows per projection and weight format (nvfp4, int4 g128), LoRA rank ``--rank`` in the kernel's epilogue:

* ``grouped_w4``: :func:`grouped_w4_mm` with ``u`` / ``lora_up`` (per expert);
* ``torch_bf16``: ``torch._grouped_mm`` on bf16 weights (the weights already dequantized; no LoRA);
* ``torch_dequant``: the PyTorch reference: ``ExpertResiduals.dequantize`` each call, then ``_grouped_mm``;
* ``triton_dequant+cublas``: :func:`svdq.kernels.dequant_w4.dequant_mm` (Triton dequantization to bf16, then
  ``_grouped_mm``; backward dequantizes again), no LoRA — what the grouped projection takes with many rows
  per expert.

TFLOP/s count the base GEMM only (``2·S·N·K`` forward, twice that forward + backward: the ``dx`` GEMM; the
base weight is frozen); times are medians over ``--iters`` calls after ``--warmup`` (the first includes
Triton's autotuning).

    python bench/bench_kernels_gemm.py --shapes mixtral-half fine-64
    TRITON_INTERPRET=1 python bench/bench_kernels_gemm.py --shapes tiny --device cpu
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import median_time, write_result  # noqa: E402
from svdq.experts.storage import ExpertResiduals  # noqa: E402
from svdq.formats import quantize_tensor  # noqa: E402

SHAPES = {
    "mixtral-half": {"experts": 8, "hidden": 2048, "ffn": 7168, "tokens": 4096, "topk": 2},
    "fine-64": {"experts": 64, "hidden": 2048, "ffn": 1408, "tokens": 4096, "topk": 8},
    "tiny": {"experts": 4, "hidden": 128, "ffn": 128, "tokens": 16, "topk": 2},
}
FORMATS = {"nvfp4": {"name": "nvfp4"}, "int4": {"name": "int4", "group_size": 128}}


def _grouped_mm(x, w, offs):
    """bf16 ``x_e · W_eᵀ``: torch._grouped_mm where it exists on this device, else a loop."""
    if x.is_cuda and hasattr(torch, "_grouped_mm"):
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
    ends = offs.tolist()
    return torch.cat([x[s:e] @ w[i].T for i, (s, e) in enumerate(zip([0, *ends[:-1]], ends))])


def bench_projection(E, S, n, k, fmt, rank, device, warmup, iters) -> dict:
    from svdq.kernels.dequant_w4 import dequant_mm
    from svdq.kernels.grouped_w4 import W4Weight, grouped_w4_mm

    gen = torch.Generator(device=device).manual_seed(0)
    ws = [torch.randn(n, k, generator=gen, device=device).to(torch.bfloat16) for _ in range(E)]
    res = ExpertResiduals.from_packed([quantize_tensor(wi, fmt) for wi in ws])
    del ws
    w = W4Weight.of(res)
    ids = torch.randint(0, E, (S,), generator=gen, device=device).sort().values
    offs = torch.bincount(ids, minlength=E).cumsum(0).to(torch.int32)  # (E,)
    x = torch.randn(S, k, generator=gen, device=device).to(torch.bfloat16).requires_grad_()
    u = torch.randn(S, rank, generator=gen, device=device).to(torch.bfloat16).requires_grad_()
    B = (torch.randn(E, n, rank, generator=gen, device=device) * 0.1).to(torch.bfloat16).requires_grad_()
    W16 = res.dequantize(torch.bfloat16)  # (E, N, K)
    dy = torch.randn(S, n, generator=gen, device=device).to(torch.bfloat16)

    def kernel_fwd():
        with torch.no_grad():
            return grouped_w4_mm(x, w, offs, u=u, lora_up=B)

    def kernel_fwd_bwd():
        x.grad = u.grad = B.grad = None
        grouped_w4_mm(x, w, offs, u=u, lora_up=B).backward(dy)

    def torch_fwd():
        with torch.no_grad():
            return _grouped_mm(x, W16, offs)

    def torch_fwd_bwd():
        x.grad = None
        _grouped_mm(x, W16, offs).backward(dy)

    def dequant_fwd():
        with torch.no_grad():
            return _grouped_mm(x, res.dequantize(torch.bfloat16), offs)

    def triton_dequant_fwd():  # the Triton dequantization + cuBLAS (base GEMM only, as torch_bf16)
        with torch.no_grad():
            return dequant_mm(x, w, offs)

    def triton_dequant_fwd_bwd():
        x.grad = None
        dequant_mm(x, w, offs).backward(dy)

    flops = 2.0 * S * n * k
    rows = {}
    for name, fwd, fwd_bwd in [
        ("grouped_w4", kernel_fwd, kernel_fwd_bwd),
        ("torch_bf16", torch_fwd, torch_fwd_bwd),
        ("torch_dequant", dequant_fwd, None),
        ("triton_dequant+cublas", triton_dequant_fwd, triton_dequant_fwd_bwd),
    ]:
        if name.startswith("triton_dequant") and device == "cpu":
            continue
        t = median_time(fwd, device, warmup, iters)
        row = {"forward_ms": t * 1e3, "forward_tflops": flops / t / 1e12}
        if fwd_bwd is not None:
            tb = median_time(fwd_bwd, device, warmup, iters)
            row.update(fwd_bwd_ms=tb * 1e3, fwd_bwd_tflops=2 * flops / tb / 1e12)
        rows[name] = row
    y = kernel_fwd().float()
    ref = _grouped_mm(x.detach(), W16, offs).float() + torch.cat(
        [u[s:e].detach().float() @ B[i].detach().float().T for i, (s, e) in enumerate(_ranges(offs))]
    )
    rows["max_rel_diff_vs_bf16_torch"] = float((y - ref).abs().max() / ref.abs().max())
    return {"experts": E, "rows": S, "N": n, "K": k, "rank": rank, "results": rows}


def _ranges(offs):
    ends = offs.tolist()
    return list(zip([0, *ends[:-1]], ends))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", nargs="+", default=["mixtral-half", "fine-64"], choices=sorted(SHAPES))
    p.add_argument("--formats", nargs="+", default=sorted(FORMATS), choices=sorted(FORMATS))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    if args.device == "cpu" and any(s != "tiny" for s in args.shapes):
        raise SystemExit("bench_kernels_gemm: on CPU (Triton's interpreter) only --shapes tiny runs")
    if args.device == "cpu":
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("bench_kernels_gemm: on CPU set TRITON_INTERPRET=1 (kernels run interpreted)")
    results = {}
    for shape in args.shapes:
        c = SHAPES[shape]
        S = c["tokens"] * c["topk"]
        projections = {"fc1": (2 * c["ffn"], c["hidden"]), "fc2": (c["hidden"], c["ffn"])}
        for proj, (n, k) in projections.items():
            for f in args.formats:
                key = f"{shape}/{proj}/{f}"
                results[key] = bench_projection(
                    c["experts"], S, n, k, FORMATS[f], args.rank, args.device, args.warmup, args.iters
                )
                r = results[key]["results"]
                tf = "  ".join(f"{m}: {v['forward_tflops']:.1f}" for m, v in r.items() if isinstance(v, dict))
                print(f"{key:28s} forward TFLOP/s  {tf}", flush=True)
    name = args.name or ("kernels_gemm_tiny" if args.shapes == ["tiny"] else "kernels_gemm")
    path = write_result(name, {"shapes": {s: SHAPES[s] for s in args.shapes}, "projections": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
