"""Benchmark: NVFP4 W4A4 perplexity of a trained Hugging Face Qwen3-MoE — RTN, our expert layouts, modelopt.

The model is the committed ``calib/assets/qwen3-moe-tiny`` (trained by :mod:`calib.pretrain_hf`; every
layer sparse: 8 SwiGLU experts, top-2). Every row quantizes the attention projections and all experts
(routers and embeddings stay 16-bit) and is evaluated on the held-out split of the base domain:

* ``bf16``: the unquantized model;
* ``RTN``: round-to-nearest weights (each expert its own tensor), no smoothing, no branch, activations
  quantized with per-call ranges (our modules with an empty branch);
* ``ours <layout>``: :func:`svdq.quantize` at rank 32 with the expert layout ``fc1=…,fc2=…``; the expert
  branches of every layout have the same parameter budget (the per-expert cost at rank 32);
* ``modelopt NVFP4_DEFAULT_CFG`` / ``modelopt NVFP4_SVDQUANT_DEFAULT_CFG``: nvidia-modelopt's
  ``mtq.quantize`` on the same model and calibration batches (it quantizes fused HF experts itself).

    python bench/bench_hf_moe.py                 # GPU (bfloat16); writes bench/results/hf_moe_<dev>.json
    python bench/bench_hf_moe.py --device cpu --calib-tokens 2048 --eval-tokens 4096 --no-modelopt
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import svdq  # noqa: E402
from bench.common import sync, write_result  # noqa: E402
from svdq import SVDQConfig  # noqa: E402

ASSET = Path(__file__).resolve().parents[1] / "calib" / "assets" / "qwen3-moe-tiny"
LAYOUTS = {
    "ours fc1=shared-down, fc2=auto (default)": None,
    "ours shared-down": "shared-down",
    "ours per-expert": "per-expert",
    "ours shared-up": "shared-up",
    "ours auto": "auto",
}


def load(path: Path, device, dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    return model.to(device).eval()


def batches_of(seq_len: int, calib_tokens: int, eval_tokens: int, batch: int, device):
    from calib.corpus import eval_windows, random_windows, stdlib_split

    split = stdlib_split()
    gen = torch.Generator().manual_seed(1234)
    calib = [
        random_windows(split.base_train, batch, seq_len, gen, device)
        for _ in range(calib_tokens // (batch * seq_len))
    ]
    held = eval_windows(split.base_heldout, seq_len, batch, eval_tokens, device)
    return calib, held


def forward_loop(batches):
    @torch.no_grad()
    def loop(model: nn.Module) -> None:
        for b in batches:
            model(input_ids=b["tokens"], position_ids=b["position_ids"], use_cache=False)

    return loop


@torch.no_grad()
def perplexity(model: nn.Module, batches) -> float:
    total, n = 0.0, 0
    for b in batches:
        logits = model(input_ids=b["tokens"], position_ids=b["position_ids"], use_cache=False).logits
        loss = nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), b["labels"].flatten(), reduction="sum"
        )
        total, n = total + loss.item(), n + b["labels"].numel()
    return math.exp(total / n)


def quantized_share(model: nn.Module) -> float | None:
    cov = getattr(model, "svdq_coverage", None)
    return None if cov is None else cov.share


@torch.no_grad()
def rtn(model: nn.Module, fmt: str, config: SVDQConfig) -> nn.Module:
    """Round-to-nearest W4A4 with our modules: residual = Q_w(W), s = 1, an empty (rank-0) branch."""
    from svdq.experts import ProjectionState, handler_for, install_svdq_experts
    from svdq.experts.storage import ExpertResiduals
    from svdq.formats import quantize_tensor
    from svdq.layer import install_svdq_linear
    from svdq.quantize import find_targets

    for name, m in list(model.named_modules()):
        h = handler_for(m)
        if h is None:
            continue
        W1, W2, b1, b2 = h.weights(m)  # (E, out1, H), (E, H, I)

        def state(W, b):
            E, out_f, in_f = W.shape
            res = ExpertResiduals.from_packed([quantize_tensor(W[i].float(), fmt) for i in range(E)])
            down = torch.zeros(E, 0, in_f, dtype=W.dtype, device=W.device)  # (E, 0, in)
            up = torch.zeros(E, out_f, 0, dtype=W.dtype, device=W.device)  # (E, out, 0)
            ones = torch.ones(in_f, device=W.device)
            return ProjectionState(res, ones, fmt, down, up, bias=b, dtype=W.dtype)

        install_svdq_experts(model, name, h, state(W1, b1), state(W2, b2))
    for name, lin in find_targets(model, config).items():
        w = lin.weight.detach()
        ones = torch.ones(w.shape[1], device=w.device)
        install_svdq_linear(
            model, name, residual=quantize_tensor(w.float(), fmt), smooth=ones, act_format=fmt, bias=lin.bias
        )
    return model


def modelopt_row(model: nn.Module, cfg_name: str, loop) -> nn.Module:
    import modelopt.torch.quantization as mtq

    return mtq.quantize(model, copy.deepcopy(getattr(mtq, cfg_name)), loop)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", type=Path, default=ASSET, help="HF checkpoint directory")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--format", default="nvfp4")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--eval-tokens", type=int, default=65536)
    p.add_argument("--rows", nargs="+", default=None, help="subset of row names (default: all)")
    p.add_argument("--no-modelopt", action="store_true")
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    dtype = torch.bfloat16 if gpu else torch.float32
    calib, held = batches_of(args.seq_len, args.calib_tokens, args.eval_tokens, args.batch, args.device)
    base = load(args.model, args.device, dtype)
    config = SVDQConfig(weight_format=args.format, act_format=args.format, rank=args.rank)
    rows = {}

    def row(name, make):
        if args.rows and name not in args.rows:
            return
        print(f"--- {name}", flush=True)
        try:
            model = copy.deepcopy(base)
            sync(args.device)
            t0 = time.perf_counter()
            model = make(model)
            sync(args.device)
            seconds = time.perf_counter() - t0
            ppl = perplexity(model, held)
            rows[name] = {"perplexity": ppl, "seconds": round(seconds, 3)}
            share = quantized_share(model)
            if share is not None:
                rows[name]["quantized_share"] = share
            layouts = {
                n: {p: m.svdq_summary[p]["layout"] for p in ("fc1", "fc2")}
                for n, m in model.named_modules()
                if isinstance(getattr(m, "svdq_summary", None), dict) and "fc1" in m.svdq_summary
            }
            if layouts:
                rows[name]["layouts"] = layouts
            print(f"{name:<45} ppl {ppl:8.4f}   {seconds:7.2f} s", flush=True)
        except Exception as exc:  # a failing row is recorded, the others still run
            traceback.print_exc()
            rows[name] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            if gpu:
                torch.cuda.empty_cache()

    row("bf16" if gpu else "fp32", lambda m: m)
    row("RTN", lambda m: rtn(m, args.format, config))
    for name, layout in LAYOUTS.items():
        row(
            name,
            lambda m, lay=layout: svdq.quantize(m, config, forward_loop(calib), layout=lay, progress=False),
        )
    if not args.no_modelopt:
        for cfg_name in ("NVFP4_DEFAULT_CFG", "NVFP4_SVDQUANT_DEFAULT_CFG"):
            row(f"modelopt {cfg_name}", lambda m, c=cfg_name: modelopt_row(m, c, forward_loop(calib)))
    name = args.name or f"hf_moe_{'gpu' if gpu else 'cpu'}_{args.format}"
    path = write_result(
        name,
        {
            "model": str(args.model.name),
            "device_arg": args.device,
            "dtype": str(dtype),
            "svdq_config": config.to_dict(),
            "seq_len": args.seq_len,
            "calib_tokens": len(calib) * args.batch * args.seq_len,
            "eval_tokens": sum(b["labels"].numel() for b in held),
            "rows": rows,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
