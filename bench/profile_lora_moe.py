"""Profile one forward+backward of the quantized MoE layer per adapter layout (diagnostics, not a benchmark).

python bench/profile_lora_moe.py --shape mixtral-half
"""

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_lora_moe import SHAPES, build_layer, quantize_experts  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="mixtral-half", choices=sorted(SHAPES))
    p.add_argument("--rows", type=int, default=15)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    from torch.profiler import ProfilerActivity, profile

    from lora.config import LoraConfig
    from lora.framework.parallel import init_parallel
    from lora.model import add_adapters, freeze_base

    init_parallel()
    shape = SHAPES[args.shape]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if dev == "cuda" else "float32"
    for preset in (None, "moe", "moe-per-expert"):
        layer = build_layer(shape, dtype)
        if preset:
            holder = torch.nn.Module()
            holder.mlp = layer
            add_adapters(holder, LoraConfig.preset(preset, rank=32, targets=("*experts",)), seed=0)
            freeze_base(holder)
        else:
            layer.requires_grad_(False)
        quantize_experts(layer, "fake")
        x = torch.randn(shape["tokens"], 1, shape["hidden"], device=dev, dtype=getattr(torch, dtype))
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
        print(f"\n=== {preset or 'no adapters'} ===")
        print(prof.key_averages().table(sort_by=key, row_limit=args.rows))


if __name__ == "__main__":
    main()
