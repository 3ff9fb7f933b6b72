"""Benchmark: the fused activation-quantization kernel (svdq.kernels.act_quant) vs a plain copy and vs the
PyTorch reference (``fake_quant(smoothed_input(x))`` + ``F.linear(x, A)``).

Rows: shape (M x K), format, range (dynamic / static), LoRA rank r. Columns: milliseconds and effective
bandwidth ``(bytes of x read + bytes of xq written) / time`` for ``x.clone()`` (the memory-bound floor),
the reference and the kernel, and whether the kernel's ``xq`` equals the reference's bit for bit.

    python bench/bench_kernels_act.py                 # GPU, realistic shapes
    python bench/bench_kernels_act.py --shapes tiny   # CPU smoke run under Triton's interpreter
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the kernels run interpreted on CPU; set before they are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch.nn.functional as F  # noqa: E402

from bench.common import median_time, write_result  # noqa: E402
from svdq.formats import fake_quant, trusted_inputs  # noqa: E402
from svdq.kernels.act_quant import quantize_act  # noqa: E402

SHAPES = {"default": ["4096x2048", "4096x4096", "4096x8192", "16384x4096"], "tiny": ["16x64"]}
CASES = [("nvfp4", "dynamic", 0), ("nvfp4", "static", 0), ("nvfp4", "dynamic", 32)]
CASES += [("int4-g64", "dynamic", 32)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="default", help="'default', 'tiny' or a comma list of MxK")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--out", default=None, help="result folder (default $OUT or bench/results)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    shapes = SHAPES.get(args.shapes, args.shapes.split(","))
    iters = args.iters or (20 if device.type == "cuda" else 1)
    rows = []
    for shape in shapes:
        M, K = (int(v) for v in shape.split("x"))
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(M, K, generator=g, device=device).to(dtype)
        s = torch.rand(K, generator=g, device=device) + 0.5
        xs = (x.float() / s).to(dtype)
        for fmt, rng, r in CASES:
            ga = xs.float().abs().max() * 0.9 if rng == "static" else None
            A = torch.randn(r, K, generator=g, device=device).to(dtype) if r else None

            def reference(x=x, s=s, fmt=fmt, ga=ga, A=A):
                with trusted_inputs():
                    xq = fake_quant((x.float() / s).to(dtype), fmt, ga)
                return xq, (F.linear(x, A) if A is not None else None)

            def kernel(x=x, s=s, fmt=fmt, ga=ga, A=A):
                with trusted_inputs():
                    return quantize_act(x, s, fmt, ga, A)

            t_copy = median_time(x.clone, device, 1, iters)
            t_ref = median_time(reference, device, 1, iters)
            t_ker = median_time(kernel, device, 1, iters)
            nbytes = 2 * x.numel() * x.element_size()
            row = {
                "shape": shape,
                "format": fmt,
                "range": rng,
                "rank": r,
                "ms_copy": t_copy * 1e3,
                "ms_reference": t_ref * 1e3,
                "ms_kernel": t_ker * 1e3,
                "GBps_copy": nbytes / t_copy / 1e9,
                "GBps_reference": nbytes / t_ref / 1e9,
                "GBps_kernel": nbytes / t_ker / 1e9,
                "bit_exact": bool(torch.equal(kernel().xq, reference()[0])),
            }
            rows.append(row)
            print(
                f"{shape:>11} {fmt:>9} {rng:>7} r={r:<3} copy {row['ms_copy']:8.3f} ms "
                f"ref {row['ms_reference']:8.3f} ms  kernel {row['ms_kernel']:8.3f} ms "
                f"({row['GBps_kernel']:7.1f} GB/s vs copy {row['GBps_copy']:7.1f})  exact={row['bit_exact']}"
            )
    path = write_result("kernels_act", {"dtype": args.dtype, "iters": iters, "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
