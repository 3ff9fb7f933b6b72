"""Benchmark: forward+backward of a quantized Megatron MoE layer with and without adapters.

Variants (one MoE layer of a Megatron GPT-MoE, SequentialMLP experts, top-2, bf16 on GPU):
  base bf16 (no quantization, no adapters) — the reference for weight memory;
  quantized base (NVFP4 W4A4 SVDQuant residual, packed or fake-quant) × adapters:
  none / shared-down (fc1 one lora_down per layer, fc2 one lora_up per layer: the `moe` preset) /
  per-expert LoRA of the same rank.
  bf16 base + shared-down adapters (bf16 LoRA) — the reference for adapter cost.
Every quantized variant runs once per kernel backend of ``--kernels`` (``torch``: the PyTorch reference;
``auto``: the Triton kernels of svdq/kernels, DESIGN §16), side by side in one process.
Reported: median step time (forward + backward), peak memory, base expert-weight bytes.
Targets: shared-down step ≤ 1.15× the step without adapters; ≥ 1.5× faster than per-expert LoRA at 64
experts; packed base weight memory ≤ 0.35× the bf16 base; with the kernels, packed base + shared-down
adapters ≤ 1.25× the bf16 base step without adapters.

    python bench/bench_lora_moe.py                   # GPU: mixtral-like (8 experts) and fine (64 experts)
    python bench/bench_lora_moe.py --shapes tiny     # quick CPU smoke
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import sync, write_result  # noqa: E402

SHAPES = {
    # Mixtral-8x7B scaled to half width: hidden 2048, expert ffn 7168
    "mixtral-half": dict(hidden=2048, heads=16, num_experts=8, ffn_hidden=7168, tokens=4096),
    # fine-grained (Qwen/DeepSeek-MoE-like): 64 experts of ffn 1408
    "fine-64": dict(hidden=2048, heads=16, num_experts=64, ffn_hidden=1408, tokens=4096),
    "tiny": dict(hidden=64, heads=4, num_experts=8, ffn_hidden=64, tokens=256),
}


def build_layer(shape: dict, dtype: str, seed: int = 0, **config):
    """One MoE layer (``MoELayer``) of a one-layer GPT-MoE of ``shape``; ``config``: more
    :class:`~calib.tiny_moe.TinyMoEConfig` fields (``spec``, ``fp8``, …)."""
    from calib.tiny_moe import TinyMoEConfig, build_tiny_gpt_moe

    cfg = TinyMoEConfig(
        num_layers=1,
        hidden=shape["hidden"],
        heads=shape["heads"],
        num_experts=shape["num_experts"],
        ffn_hidden=shape["ffn_hidden"],
        topk=2,
        vocab_size=256,
        seq_len=256,
        dtype=dtype,
        **config,
    )
    model = build_tiny_gpt_moe(cfg, seed=seed)
    return model.decoder.layers[0].mlp  # MoELayer: router, dispatcher, SequentialMLP experts


def expert_linears(moe_layer):
    """(holder, attribute) of every expert linear: the wrapper's ``base`` when adapted."""
    out = []
    for expert in moe_layer.experts.local_experts:
        expert = getattr(expert, "base", expert) if not hasattr(expert, "linear_fc1") else expert
        for attr in ("linear_fc1", "linear_fc2"):
            lin = getattr(expert, attr)
            out.append(
                (lin, "base") if hasattr(lin, "lora_up") or hasattr(lin, "factors") else (expert, attr)
            )
    return out


def quantize_experts(moe_layer, storage: str, act_range: str = "static", x=None):
    """Replace every expert linear's weight by an NVFP4 residual (RTN of the weight, smoothing 1).
    ``act_range="static"`` (what calibration installs by default) then fixes each base's activation range
    from one forward of ``x`` (T, 1, H) with the default headroom (``lora.base.calibrate_input_ranges``);
    ``"dynamic"`` leaves per-call ranges."""
    from lora.base import SVDQBase, calibrate_input_ranges
    from svdq import SVDQConfig
    from svdq.formats import quantize_tensor

    if act_range == "static" and x is None:
        raise ValueError("quantize_experts: static activation ranges need the tokens x to calibrate them on")

    bases = {}
    for i, (holder, attr) in enumerate(expert_linears(moe_layer)):
        inner = getattr(holder, attr)
        residual = quantize_tensor(inner.weight.detach().float(), "nvfp4")
        smooth = torch.ones(inner.weight.shape[1])
        bases[f"{i}.{attr}"] = SVDQBase(inner, residual, smooth, "nvfp4", storage)
        setattr(holder, attr, bases[f"{i}.{attr}"])
    if act_range == "static":

        def loop(m):
            with torch.no_grad():
                m(x)

        calibrate_input_ranges(moe_layer, loop, bases, margin=SVDQConfig().act_range_margin)


def base_weight_bytes(moe_layer) -> int:
    total = 0
    for holder, attr in expert_linears(moe_layer):
        base = getattr(holder, attr)
        if hasattr(base, "storage") and base.storage == "packed":
            total += sum(t.numel() * t.element_size() for t in base.packed_residual().to_tensors().values())
        else:
            w = base.inner.weight if hasattr(base, "inner") else base.weight
            total += w.numel() * w.element_size()
    return total


def time_steps(moe_layer, x, steps: int, warmup: int):
    params = [p for p in moe_layer.parameters() if p.requires_grad]
    times = []
    for i in range(warmup + steps):
        sync(x.device)
        t0 = time.perf_counter()
        out, _ = moe_layer(x)
        out.float().square().mean().backward()
        sync(x.device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        x.grad = None
        for p in params:
            p.grad = None
    return statistics.median(times)


def run_variant(shape, name, quant, adapters, storage, rank, steps, warmup, device, act_range="static"):
    from lora.config import LoraConfig
    from lora.model import add_adapters, freeze_base

    dtype = "bfloat16" if device == "cuda" else "float32"
    layer = build_layer(shape, dtype)
    if adapters != "none":
        preset = "moe" if adapters == "shared-down" else "moe-per-expert"
        cfg = LoraConfig.preset(preset, rank=rank, targets=("*experts",))
        wrapper = torch.nn.Module()
        wrapper.mlp = layer
        add_adapters(wrapper, cfg, seed=0)
        freeze_base(wrapper)
    else:
        for p in layer.parameters():
            p.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape["tokens"], 1, shape["hidden"], generator=g).to(device, getattr(torch, dtype))
    if quant:
        quantize_experts(layer, storage, act_range, x)
    layer.train()
    x.requires_grad_(True)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    seconds = time_steps(layer, x, steps, warmup)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    row = {
        "variant": name,
        "seconds": seconds,
        "peak_memory_bytes": peak,
        "base_weight_bytes": base_weight_bytes(layer) if quant else None,
        "adapter_params": sum(p.numel() for p in layer.parameters() if p.requires_grad),
    }
    if not quant:
        row["base_weight_bytes"] = sum(
            getattr(h, a).weight.numel() * getattr(h, a).weight.element_size()
            for h, a in expert_linears(layer)
        )
    del layer, x
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", nargs="+", default=None, choices=sorted(SHAPES))
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--name", default=None)
    p.add_argument(
        "--kernels",
        nargs="+",
        default=None,
        choices=["torch", "auto", "auto-keep", "triton"],
        help="kernel backends for the quantized variants (default: torch and auto on CUDA, torch on CPU); "
        "auto-keep: auto with the forward's 16-bit weight kept for the backward (SVDQ_KEEP_DEQUANT=1); "
        "triton: every kernel, also those auto does not take yet (not yet measured on a GPU)",
    )
    p.add_argument("--no-fake", action="store_true", help="skip the fake-quant (unpacked) base variants")
    p.add_argument(
        "--act-range",
        default="static",
        choices=["static", "dynamic"],
        help="activation ranges of the quantized bases: static (calibrated from one forward, the default of "
        "calibration) or dynamic (per call)",
    )
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    from lora.framework.parallel import destroy_parallel, init_parallel
    from svdq.kernels import kernel_backend
    from svdq.kernels.dequant_w4 import set_keep_dequantized

    init_parallel()
    shapes = args.shapes or (["mixtral-half", "fine-64"] if args.device == "cuda" else ["tiny"])
    backends = args.kernels or (["torch", "auto"] if args.device == "cuda" else ["torch"])
    bf16_variants = [
        ("bf16 base, no adapters", False, "none", "fake"),
        ("bf16 base, shared-down adapters", False, "shared-down", "fake"),
    ]
    quant_variants = [
        ("packed base, no adapters", True, "none", "packed"),
        ("packed base, shared-down adapters", True, "shared-down", "packed"),
        ("packed base, per-expert LoRA", True, "per-expert", "packed"),
        ("fake-quant base, no adapters", True, "none", "fake"),
        ("fake-quant base, shared-down adapters", True, "shared-down", "fake"),
        ("fake-quant base, per-expert LoRA", True, "per-expert", "fake"),
    ]
    variants = [(name, "torch", *rest) for name, *rest in bf16_variants]
    variants += [  # the kernels apply to the packed base; its fake-quant twin is measured once
        (f"{name} [{b}]", b, *rest)
        for b in backends
        for name, *rest in quant_variants
        if (b == backends[0] and not args.no_fake) or rest[2] == "packed"
    ]
    results = []
    try:
        for shape_name in shapes:
            shape = SHAPES[shape_name]
            rows = {}
            for name, backend, quant, adapters, storage in variants:
                set_keep_dequantized(backend == "auto-keep")
                with kernel_backend("auto" if backend == "auto-keep" else backend):
                    rows[name] = run_variant(
                        shape,
                        name,
                        quant,
                        adapters,
                        storage,
                        args.rank,
                        args.steps,
                        args.warmup,
                        args.device,
                        args.act_range,
                    )
                set_keep_dequantized(False)
                rows[name]["kernels"] = backend
            base = rows["bf16 base, no adapters"]["seconds"]
            checks = {
                "bf16: shared-down / no adapters": rows["bf16 base, shared-down adapters"]["seconds"] / base
            }
            for b in backends:
                for storage in ("packed", "fake-quant"):
                    if f"{storage} base, no adapters [{b}]" not in rows:
                        continue
                    none = rows[f"{storage} base, no adapters [{b}]"]["seconds"]
                    shared = rows[f"{storage} base, shared-down adapters [{b}]"]["seconds"]
                    per = rows[f"{storage} base, per-expert LoRA [{b}]"]["seconds"]
                    checks[f"{storage} [{b}]: shared-down / no adapters"] = shared / none
                    checks[f"{storage} [{b}]: per-expert / shared-down"] = per / shared
                    checks[f"{storage} [{b}]: shared-down / bf16 base step"] = shared / base
            checks["packed / bf16 base weight memory"] = (
                rows[f"packed base, no adapters [{backends[0]}]"]["base_weight_bytes"]
                / rows["bf16 base, no adapters"]["base_weight_bytes"]
            )
            results.append({"shape": shape_name, **shape, "rows": rows, "ratios": checks})
            print(f"\n{shape_name}: {shape}")
            for name, row in rows.items():
                peak = (
                    f"{row['peak_memory_bytes'] / 2**30:6.2f} GiB" if row["peak_memory_bytes"] else "   n/a"
                )
                mib = row["base_weight_bytes"] / 2**20
                print(
                    f"  {name:48s} {row['seconds'] * 1e3:9.2f} ms  peak {peak}  base weights {mib:8.1f} MiB"
                )
            for k, v in checks.items():
                print(f"  {k:45s} {v:.3f}")
    finally:
        destroy_parallel()
    name = args.name or f"lora_moe_{'gpu' if args.device == 'cuda' else 'cpu'}"
    path = write_result(
        name,
        {
            "rank": args.rank,
            "steps": args.steps,
            "kernels": backends,
            "act_range": args.act_range,
            "shapes": results,
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
