"""Benchmark: forward+backward of one Megatron MoE layer on Transformer Engine, with and without adapters.

Variants (one MoE layer — router, token dispatch, experts — of a Megatron GPT-MoE, top-2, bf16 weights):
  TEGroupedMLP (TE grouped GEMMs) without adapters / with shared-down adapters (fc1 one lora_down per
  layer and a lora_up per expert, fc2 one lora_up per layer: the ``moe`` preset) / with per-expert LoRA of
  the same rank; the local ``SequentialMLP`` (one GEMM per expert, Megatron's local linears) without and
  with shared-down adapters. Precisions: bf16, and FP8 (TE ``DelayedScaling`` through Megatron's own FP8
  context, experts padded by TEGroupedMLP) for the TE variants; the local path has no FP8.
Only the adapters train (base frozen). Reported: median step time, peak memory; ratios against the
TEGroupedMLP without adapters of the same precision and against the local SequentialMLP.

    python bench/bench_te_moe.py                     # GPU with Transformer Engine
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_lora_moe import build_layer  # noqa: E402
from bench.common import write_result  # noqa: E402

SHAPES = {
    # Mixtral-8x7B scaled to half width: hidden 2048, 8 experts of ffn 7168
    "mixtral-half": dict(hidden=2048, heads=16, num_experts=8, ffn_hidden=7168, tokens=8192),
    # fine-grained (Qwen/DeepSeek-MoE-like): 64 experts of ffn 1408
    "fine-64": dict(hidden=2048, heads=16, num_experts=64, ffn_hidden=1408, tokens=8192),
    "tiny": dict(hidden=64, heads=4, num_experts=4, ffn_hidden=64, tokens=512),
}
VARIANTS = [  # (name, spec, adapters)
    ("TEGroupedMLP, no adapters", "te", None),
    ("TEGroupedMLP, shared-down adapters", "te", "moe"),
    ("TEGroupedMLP, per-expert LoRA", "te", "moe-per-expert"),
    ("SequentialMLP (local), no adapters", "local", None),
    ("SequentialMLP (local), shared-down adapters", "local", "moe"),
]


def time_steps(layer, config, x, steps: int, warmup: int) -> float:
    from megatron.core.fp8_utils import get_fp8_context

    params = [p for p in layer.parameters() if p.requires_grad]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for i in range(warmup + steps):
        start.record()
        with get_fp8_context(config):
            out, _ = layer(x)
        out.float().square().mean().backward()
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end) / 1000)
        x.grad = None
        for p in params:
            p.grad = None
    return statistics.median(times)


def run_variant(shape, spec, adapters, fp8, rank, steps, warmup) -> dict:
    from lora.config import LoraConfig
    from lora.model import add_adapters, freeze_base

    fp8_config = {"fp8": "hybrid", "fp8_recipe": "delayed"} if fp8 else {}
    layer = build_layer(shape, "bfloat16", spec=spec, **fp8_config)
    config = layer.config
    holder = torch.nn.Module()
    holder.mlp = layer
    if adapters:
        add_adapters(holder, LoraConfig.preset(adapters, rank=rank, targets=("*experts",)), seed=0)
        freeze_base(holder)
    else:
        for p in layer.parameters():
            p.requires_grad_(False)
    layer.train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape["tokens"], 1, shape["hidden"], generator=g).to("cuda", torch.bfloat16)
    x.requires_grad_(True)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    seconds = time_steps(layer, config, x, steps, warmup)
    row = {
        "seconds": seconds,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(),
        "adapter_params": sum(p.numel() for p in layer.parameters() if p.requires_grad),
    }
    del layer, holder, x
    torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["mixtral-half", "fine-64"], choices=sorted(SHAPES))
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device with Transformer Engine")
    warnings.filterwarnings("ignore")
    import transformer_engine

    from lora.framework.parallel import destroy_parallel, init_parallel

    init_parallel()
    results = []
    try:
        for shape_name in args.shapes:
            shape = SHAPES[shape_name]
            rows = {}
            for precision in ("bf16", "fp8"):
                for name, spec, adapters in VARIANTS:
                    if precision == "fp8" and spec == "local":
                        continue
                    key = f"{precision}: {name}"
                    rows[key] = run_variant(
                        shape, spec, adapters, precision == "fp8", args.rank, args.steps, args.warmup
                    )
                    print(f"{shape_name:13s} {key:52s} {rows[key]['seconds'] * 1e3:8.2f} ms", flush=True)
            ratios = {}
            for precision in ("bf16", "fp8"):
                base = rows[f"{precision}: TEGroupedMLP, no adapters"]["seconds"]
                shared = rows[f"{precision}: TEGroupedMLP, shared-down adapters"]["seconds"]
                per = rows[f"{precision}: TEGroupedMLP, per-expert LoRA"]["seconds"]
                ratios[f"{precision}: grouped shared-down / grouped no adapters"] = shared / base
                ratios[f"{precision}: grouped per-expert / grouped shared-down"] = per / shared
            local = rows["bf16: SequentialMLP (local), shared-down adapters"]["seconds"]
            for precision in ("bf16", "fp8"):
                shared = rows[f"{precision}: TEGroupedMLP, shared-down adapters"]["seconds"]
                ratios[f"local SequentialMLP shared-down (bf16) / grouped shared-down ({precision})"] = (
                    local / shared
                )
            results.append({"shape": shape_name, **shape, "rank": args.rank, "rows": rows, "ratios": ratios})
            for k, v in ratios.items():
                print(f"  {k}: {v:.3f}")
    finally:
        destroy_parallel()
    payload = {
        "benchmark": "te_moe",
        "transformer_engine": transformer_engine.__version__,
        "steps": args.steps,
        "warmup": args.warmup,
        "results": results,
    }
    path = write_result("te_moe_gpu", payload, args.out_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
