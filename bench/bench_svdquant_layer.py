"""Benchmark: SVDQuant of one linear layer — ours vs round-to-nearest, smoothing only and modelopt.

Rows: RTN, smoothing only, ours (whitening on/off × refinement on/off), nvidia-modelopt's svdquant at
the same rank and format. Columns: calibration seconds (the whole quantize call, forward loop included)
and relative output error ‖y − y_ref‖/‖y_ref‖ on held-out tokens (y_ref = the unquantized layer).

Layers are synthetic with outliers, as in svdq/DESIGN.md §3: a bf16 weight with 16 outlier input columns,
calibration inputs with 8 outlier channels (same distribution for the held-out tokens).

    python bench/bench_svdquant_layer.py    # GPU: nvfp4 W4A4; CPU: int4 W4A16 (modelopt NVFP4 needs CUDA)
    python bench/bench_svdquant_layer.py --shapes 4096x14336 --format int4 --tokens 2048
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import svdq  # noqa: E402
from bench.common import timed, write_result  # noqa: E402
from svdq import SVDQConfig  # noqa: E402
from svdq.formats import fake_quant, parse_format  # noqa: E402
from svdq.solvers.smoothing import smoothing_vector

DEFAULT_SHAPES = ["4096x14336", "4096x4096", "14336x4096", "2048x2816"]


def make_layer(in_f: int, out_f: int, tokens: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g) * in_f**-0.5
    cols = torch.randperm(in_f, generator=g)[:16]
    W[:, cols] *= 8.0
    chans = torch.randperm(in_f, generator=g)[:8]
    scale = torch.ones(in_f)
    scale[chans] = 30.0

    def draw(n):
        return (torch.randn(n, in_f, generator=g) * scale).to(device, torch.bfloat16)

    lin = nn.Linear(in_f, out_f, bias=False, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(W.to(device, torch.bfloat16))
    return lin, draw(tokens), draw(tokens)


def rel_err(y, y_ref) -> float:
    return ((y.float() - y_ref.float()).norm() / y_ref.float().norm()).item()


def rtn(lin, x_cal, x_test, fmt, act):
    def run():
        return fake_quant(lin.weight, fmt)

    wq, secs = timed(run, x_cal.device)
    return secs, rel_err(nn.functional.linear(fake_quant(x_test, act), wq), lin(x_test))


def smoothing_only(lin, x_cal, x_test, fmt, act, alphas):
    """Best α (scored on the calibration tokens) of W·diag(s) with x/s, no branch."""

    def run():
        x_amax = x_cal.float().abs().amax(0)
        w_amax = lin.weight.float().abs().amax(0)
        y_ref = lin(x_cal)
        best = None
        for a in alphas:
            s = smoothing_vector(x_amax, w_amax, a)
            wq = fake_quant(lin.weight.float() * s, fmt)
            err = rel_err(fake_quant(x_cal.float() / s, act) @ wq.T, y_ref)
            if best is None or err < best[0]:
                best = (err, s, wq)
        return best

    (_, s, wq), secs = timed(run, x_cal.device)
    return secs, rel_err(fake_quant(x_test.float() / s, act) @ wq.T, lin(x_test))


def ours(lin, x_cal, x_test, cfg):
    model = nn.Sequential(copy.deepcopy(lin))

    def run():
        return svdq.quantize(model, cfg, lambda m: m(x_cal), progress=False)

    _, secs = timed(run, x_cal.device)
    summary = model[0].svdq_summary
    with torch.no_grad():
        err = rel_err(model(x_test), lin(x_test))
    return secs, err, {k: summary[k] for k in ("alpha", "whitened", "step_errors")}


def modelopt_svdquant(lin, x_cal, x_test, fmt_name: str, rank: int):
    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(mtq.NVFP4_SVDQUANT_DEFAULT_CFG)
    cfg["algorithm"] = {"method": "svdquant", "lowrank": rank}
    if fmt_name.startswith("int4"):
        # modelopt has no dynamic per-token INT4 activations: compare weight-only (W4A16) on both sides
        group = parse_format(fmt_name).group_size
        for entry in cfg["quant_cfg"]:
            if entry.get("quantizer_name") == "*weight_quantizer":
                entry["cfg"] = {"num_bits": 4, "block_sizes": {-1: group, "type": "static"}}
            if entry.get("quantizer_name") == "*input_quantizer":
                entry.pop("cfg", None)
                entry["enable"] = False
    model = nn.Sequential(copy.deepcopy(lin))

    def run():
        return mtq.quantize(model, cfg, lambda m: m(x_cal))

    _, secs = timed(run, x_cal.device)
    with torch.no_grad():
        err = rel_err(model(x_test), lin(x_test))
    return secs, err


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--format", default=None, help="nvfp4 (GPU default) or int4 (CPU default)")
    p.add_argument("--shapes", nargs="+", default=None, help="INxOUT, e.g. 4096x14336")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--no-modelopt", action="store_true")
    p.add_argument("--name", default=None, help="result file name (default from device/format)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    fmt_name = args.format or ("nvfp4" if args.device.startswith("cuda") else "int4")
    fmt = parse_format(fmt_name)
    act_name = "none" if fmt_name.startswith("int4") else fmt_name  # see modelopt_svdquant
    act = parse_format(act_name)
    shapes = args.shapes or (
        DEFAULT_SHAPES if args.device.startswith("cuda") else DEFAULT_SHAPES[:1] + ["2048x2816"]
    )
    base = SVDQConfig(weight_format=fmt_name, act_format=act_name, rank=args.rank)
    variants = {
        "ours (whiten + refine x4)": base.replace(refine_steps=4),
        "ours (whiten + refine)": base,
        "ours (whiten, no refine)": base.replace(refine_steps=0),
        "ours (no whiten, refine)": base.replace(whiten=False),
        "ours (no whiten, no refine)": base.replace(whiten=False, refine_steps=0),
    }
    # warm-up (CUDA context, kernels, modelopt import) outside the timings
    warm_lin, warm_x, _ = make_layer(256, 256, 64, args.device)
    ours(warm_lin, warm_x, warm_x, base.replace(rank=8))
    if not args.no_modelopt and (fmt_name.startswith("int4") or args.device.startswith("cuda")):
        try:
            modelopt_svdquant(warm_lin, warm_x, warm_x, fmt_name, 8)
        except Exception as exc:
            print(f"modelopt warm-up failed: {exc}")

    results = []
    for shape in shapes:
        in_f, out_f = (int(v) for v in shape.lower().split("x"))
        lin, x_cal, x_test = make_layer(in_f, out_f, args.tokens, args.device)
        rows = {}
        secs, err = rtn(lin, x_cal, x_test, fmt, act)
        rows["RTN"] = {"seconds": secs, "rel_error": err}
        secs, err = smoothing_only(lin, x_cal, x_test, fmt, act, base.alphas)
        rows["smoothing only"] = {"seconds": secs, "rel_error": err}
        for label, cfg in variants.items():
            secs, err, extra = ours(lin, x_cal, x_test, cfg)
            rows[label] = {"seconds": secs, "rel_error": err, **extra}
        if not args.no_modelopt:
            try:
                secs, err = modelopt_svdquant(lin, x_cal, x_test, fmt_name, args.rank)
                rows["modelopt svdquant"] = {"seconds": secs, "rel_error": err}
            except Exception as exc:  # e.g. NVFP4 fake quant without CUDA
                rows["modelopt svdquant"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        mo = rows.get("modelopt svdquant", {})
        best = rows["ours (whiten + refine)"]
        ratios = {}
        if "rel_error" in mo:
            ratios = {
                "speedup_vs_modelopt": mo["seconds"] / best["seconds"],
                "error_ratio_vs_modelopt": best["rel_error"] / mo["rel_error"],
            }
        results.append({"in": in_f, "out": out_f, "rows": rows, **ratios})
        head = f"W:{fmt_name} A:{act_name}, rank {args.rank}, {args.tokens} tokens ({args.device})"
        print(f"\n{in_f}→{out_f}, {head}")
        for label, row in rows.items():
            if "rel_error" in row:
                print(f"  {label:30s} {row['seconds']:9.3f} s   rel err {row['rel_error']:.4f}")
            else:
                print(f"  {label:30s} {row['error']}")
        if ratios:
            speed, ratio = ratios["speedup_vs_modelopt"], ratios["error_ratio_vs_modelopt"]
            print(f"  → ours is {speed:.1f}× faster than modelopt, error × {ratio:.3f}")
    name = args.name or f"svdquant_layer_{'gpu' if args.device.startswith('cuda') else 'cpu'}_{fmt_name}"
    path = write_result(
        name,
        {
            "format": fmt_name,
            "act_format": act_name,
            "rank": args.rank,
            "tokens": args.tokens,
            "device_arg": args.device,
            "config": base.to_dict(),
            "shapes": results,
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
