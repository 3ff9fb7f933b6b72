"""Profile one forward+backward of the quantized MoE layer, by kernel (diagnostics, not a benchmark).

Profiles each adapter layout (none / shared-down / per-expert) for each kernel backend of ``--kernels``
(``torch``: the PyTorch reference — "before"; ``auto``: the Triton kernels — "after"), with the packed
NVFP4 base, and prints (and with ``--out`` writes) the top kernels by device time.

    python bench/profile_lora_moe.py --shape mixtral-half --kernels torch auto --out profile.txt
"""

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_lora_moe import SHAPES, build_layer, quantize_experts  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="mixtral-half", choices=sorted(SHAPES))
    p.add_argument("--rows", type=int, default=15)
    p.add_argument("--storage", default="packed", choices=["packed", "fake"])
    p.add_argument("--kernels", nargs="+", default=["torch", "auto"], choices=["torch", "auto", "triton"])
    p.add_argument("--act-range", default="static", choices=["static", "dynamic"])
    p.add_argument("--presets", nargs="+", default=["none", "moe", "moe-per-expert"])
    p.add_argument("--out", default=None, help="also write the tables to this text file")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    from torch.profiler import ProfilerActivity, profile

    from lora.config import LoraConfig
    from lora.framework.parallel import init_parallel
    from lora.model import add_adapters, freeze_base
    from svdq.kernels import kernel_backend

    init_parallel()
    shape = SHAPES[args.shape]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if dev == "cuda" else "float32"
    tables = []
    for backend in args.kernels:
        for preset in args.presets:
            with kernel_backend(backend):
                layer = build_layer(shape, dtype)
                if preset != "none":
                    holder = torch.nn.Module()
                    holder.mlp = layer
                    add_adapters(holder, LoraConfig.preset(preset, rank=32, targets=("*experts",)), seed=0)
                    freeze_base(holder)
                else:
                    layer.requires_grad_(False)
                x = torch.randn(shape["tokens"], 1, shape["hidden"], device=dev, dtype=getattr(torch, dtype))
                quantize_experts(layer, args.storage, args.act_range, x)  # calibrated static ranges
                x.requires_grad_(True)
                for _ in range(3):
                    out, _ = layer(x)
                    out.float().square().mean().backward()
                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
                with profile(activities=acts) as prof:
                    out, _ = layer(x)
                    out.float().square().mean().backward()
                    if dev == "cuda":
                        torch.cuda.synchronize()
            key = "cuda_time_total" if dev == "cuda" else "cpu_time_total"
            title = f"=== {args.shape}, {args.storage} base, adapters {preset}, kernels {backend} ==="
            tables.append(f"{title}\n{prof.key_averages().table(sort_by=key, row_limit=args.rows)}")
            print("\n" + tables[-1], flush=True)
            del layer, x, out
    if args.out:
        Path(args.out).write_text("\n\n".join(tables) + "\n")


if __name__ == "__main__":
    main()
