"""Benchmark: SVDQuant of whole MoE expert groups — shared-down / shared-up / per-expert at equal budget.

Shapes: ``mixtral`` (8 experts, hidden 4096, FFN 14336, top-2: fc1 4096→2×14336, fc2 14336→4096) and
``fine`` (64 experts, hidden 2048, FFN 1408, top-6: fc1 2048→2×1408, fc2 1408→2048). fc1 is one matrix
(gate and up stacked, as Megatron's ``linear_fc1``), so a Mixtral layer's 24 matrices (8 × gate, up,
down) are 8 fc1 + 8 fc2 matrices here.

Synthetic experts = shared component + expert-specific part + a low-rank structure shared across experts
(fc1: common input directions, fc2: common output directions) + 16 outlier input columns. Calibration
tokens have 8 outlier channels and are routed top-k by a router with unequal expert popularity; one
expert receives no token. fc2 inputs are the experts' real ``silu(gate)·up`` activations. Errors are
activation-weighted relative output errors (``Σ_i ‖Y_i − Ŷ_i‖² / Σ_i ‖Y_i‖²`` over routed tokens) on
held-out tokens routed the same way; ``calib`` is :func:`svdq.solvers.expert_group.decompose_expert_group`'s
own figure.

Rows per projection: RTN (round-to-nearest, no smoothing, no branch), each layout at the same parameter
budget (per-expert rank ``--rank``), and ``auto``. ``layer_seconds``: fc1 shared-down + fc2 shared-up (the
design's layouts), ``layer_seconds_auto``: both with ``layout="auto"``.

    python bench/bench_moe_group.py --device cuda --shapes both
    python bench/bench_moe_group.py --device cpu --shapes fine
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import timed, write_result  # noqa: E402
from svdq import InputStats, SVDQConfig  # noqa: E402
from svdq.formats import fake_quant  # noqa: E402
from svdq.solvers.expert_group import decompose_expert_group
from svdq.solvers.shared_basis import LAYOUTS

SHAPES = {
    "mixtral": {"experts": 8, "hidden": 4096, "ffn": 14336, "topk": 2},
    "fine": {"experts": 64, "hidden": 2048, "ffn": 1408, "topk": 6},
}


def _randn(shape, gen, device) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, device=device)


def make_experts(E: int, out_f: int, in_f: int, shared_side: str, device, seed: int) -> torch.Tensor:
    """``(E × out × in)`` bf16: ``(0.6·C + 0.8·N_i)/√in`` + a rank-64 part sharing its input (``"in"``) or
    output (``"out"``) directions across experts, with 16 outlier input columns scaled ×8."""
    gen = torch.Generator(device=device).manual_seed(seed)
    common = _randn((out_f, in_f), gen, device)
    k = 64
    sigma = 3.0 * 0.95 ** torch.arange(k, device=device)
    shared_dirs = torch.linalg.qr(_randn((in_f if shared_side == "in" else out_f, k), gen, device)).Q
    cols = torch.randperm(in_f, generator=torch.Generator().manual_seed(seed))[:16].to(device)
    W = torch.empty(E, out_f, in_f, dtype=torch.bfloat16, device=device)
    for i in range(E):
        w = (0.6 * common + 0.8 * _randn((out_f, in_f), gen, device)) * in_f**-0.5
        if shared_side == "in":
            own = torch.linalg.qr(_randn((out_f, k), gen, device)).Q
            w += (own * sigma) @ shared_dirs.mT * (out_f / in_f) ** 0.25 / 8
        else:
            own = torch.linalg.qr(_randn((in_f, k), gen, device)).Q
            w += (shared_dirs * sigma) @ own.mT * (out_f / in_f) ** 0.25 / 8
        w[:, cols] *= 8.0
        W[i] = w.to(torch.bfloat16)
    return W


def route(n: int, hidden: int, E: int, topk: int, device, seed: int, empty_expert: int):
    """``n`` hidden states with 8 outlier channels, routed top-k with Zipf-like expert popularity; expert
    ``empty_expert`` gets none. Returns ``(x (n × hidden), [token indices of expert i])``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    scale = torch.ones(hidden, device=device)
    scale[torch.randperm(hidden, generator=torch.Generator().manual_seed(1))[:8].to(device)] = 30.0
    mix = torch.eye(hidden, device=device) + 0.2 * _randn((hidden, hidden), gen, device) / hidden**0.5
    x = (_randn((n, hidden), gen, device) * scale) @ mix
    popularity = 1.0 / torch.arange(1, E + 1, device=device, dtype=torch.float32) ** 0.8
    logits = (
        _randn((n, E), gen, device)
        + torch.log(popularity)[torch.randperm(E, generator=torch.Generator().manual_seed(2)).to(device)]
    )
    logits[:, empty_expert] = -torch.inf
    top = logits.topk(topk, dim=-1).indices
    return x, [torch.nonzero((top == i).any(-1)).flatten() for i in range(E)]


def expert_inputs(x, routes, W1: torch.Tensor | None):
    """Per-expert inputs: the routed hidden states (fc1) or ``silu(gate)·up`` of them (fc2)."""
    xs = [x[idx] for idx in routes]
    if W1 is None:
        return xs
    out = []
    for i, xi in enumerate(xs):
        h = xi @ W1[i].float().mT
        gate, up = h.chunk(2, dim=-1)
        out.append(F.silu(gate) * up)
    return out


def gather_stats(xs, in_f: int, sample: int, seed: int) -> list[InputStats]:
    stats = []
    for i, xi in enumerate(xs):
        st = InputStats(in_f, sample_size=sample, seed=seed + i)
        if xi.shape[0]:
            st.update(xi)
        stats.append(st)
    return stats


def heldout_error(forward, W: torch.Tensor, xs) -> float:
    """Activation-weighted relative output error ``sqrt(Σ_i ‖Ŷ_i − Y_i‖² / Σ_i ‖Y_i‖²)``."""
    num = den = 0.0
    for i, xi in enumerate(xs):
        if xi.shape[0] == 0:
            continue
        y_ref = xi @ W[i].float().mT
        num += float((forward(i, xi) - y_ref).double().square().sum())
        den += float(y_ref.double().square().sum())
    return (num / den) ** 0.5


def _row_line(label: str, row: dict) -> str:
    if "seconds" not in row:
        return f"    {label:14s} {'':>5s} {'':>10s} {'':>8s} {row['heldout_error']:9.4f}"
    note = f"α {row['alphas']}, {row['refine_steps']} refine steps"
    if "chosen" in row:
        note = f"chose {row['chosen']}; " + note
    return (
        f"    {label:14s} {row['rank']:5d} {row['num_params']:10d} {row['seconds']:8.2f} "
        f"{row['heldout_error']:9.4f} {row['calib_error']:8.4f}  {note}"
    )


def run_projection(proj: str, W, stats, test_xs, cfg: SVDQConfig, device, layouts) -> dict:
    """Rows of one projection, each printed as soon as it is measured."""
    head = f"{'row':14s} {'rank':>5s} {'params':>10s} {'seconds':>8s} {'held-out':>9s} {'calib':>8s}"
    print(f"  {proj} {W.shape[2]}→{W.shape[1]}\n    {head}  notes", flush=True)
    rows = {}

    def rtn_forward(i, x):
        return fake_quant(x, cfg.act_format) @ fake_quant(W[i].float(), cfg.weight_format).mT

    rows["RTN"] = {"heldout_error": heldout_error(rtn_forward, W, test_xs)}
    print(_row_line("RTN", rows["RTN"]), flush=True)
    for lay in layouts:
        res, secs = timed(
            lambda lay=lay: decompose_expert_group(W, stats, cfg, projection=proj, layout=lay, name=proj),
            device,
        )
        rows[lay] = {
            "seconds": secs,
            "rank": res.rank,
            "num_params": res.num_params,
            "calib_error": res.final_error,
            "calib_rtn_error": res.rtn_error,
            "heldout_error": heldout_error(res.expert_forward, W, test_xs),
            "refine_steps": res.refine_steps,
            "step_errors": list(res.step_errors),
            "alphas": sorted({a for a in res.alphas if a is not None}),
            "fallback_experts": list(res.fallback_experts),
        }
        if lay == "auto":
            rows[lay]["chosen"] = res.layout
            rows[lay]["layout_figures"] = res.layout_figures
        print(_row_line(lay, rows[lay]), flush=True)
        del res
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def run_shape(label: str, shape: dict, args, cfg: SVDQConfig) -> dict:
    E, H, Fd, topk = shape["experts"], shape["hidden"], shape["ffn"], shape["topk"]
    dev = args.device
    W1 = make_experts(E, 2 * Fd, H, "in", dev, seed=10)
    W2 = make_experts(E, H, Fd, "out", dev, seed=20)
    empty = E // 2
    x_cal, r_cal = route(args.tokens, H, E, topk, dev, seed=30, empty_expert=empty)
    x_test, r_test = route(args.tokens, H, E, topk, dev, seed=31, empty_expert=empty)
    counts = [len(r) for r in r_cal]
    stats1 = gather_stats(expert_inputs(x_cal, r_cal, None), H, cfg.sample_tokens, 0)
    stats2 = gather_stats(expert_inputs(x_cal, r_cal, W1), Fd, cfg.sample_tokens, 100)
    test1, test2 = expert_inputs(x_test, r_test, None), expert_inputs(x_test, r_test, W1)
    del x_cal, x_test
    print(
        f"\n{label}: {E} experts, top-{topk}, {args.tokens} tokens (expert {empty} gets none; "
        f"{min(c for c in counts if c)}..{max(counts)} per expert otherwise), W:{cfg.weight_format} "
        f"A:{cfg.act_format}, budget of per-expert rank {cfg.rank}, {dev}",
        flush=True,
    )
    layouts = args.layouts or [*LAYOUTS, "auto"]
    out = {"shape": label, **shape, "tokens": args.tokens, "tokens_per_expert": counts, "empty_expert": empty}
    for proj, W, stats, test in (("fc1", W1, stats1, test1), ("fc2", W2, stats2, test2)):
        rows = run_projection(proj, W, stats, test, cfg, dev, layouts)
        out[proj] = {"in": W.shape[2], "out": W.shape[1], "rows": rows}
    f1, f2 = out["fc1"]["rows"], out["fc2"]["rows"]
    if "shared-down" in f1 and "shared-up" in f2:
        out["layer_seconds"] = f1["shared-down"]["seconds"] + f2["shared-up"]["seconds"]
        print(f"  whole layer (fc1 shared-down + fc2 shared-up): {out['layer_seconds']:.2f} s")
    if "auto" in f1 and "auto" in f2:
        out["layer_seconds_auto"] = f1["auto"]["seconds"] + f2["auto"]["seconds"]
        print(f"  whole layer (auto + auto): {out['layer_seconds_auto']:.2f} s")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", choices=["mixtral", "fine", "both"], default=None, help="default: both on GPU")
    p.add_argument("--tokens", type=int, default=None, help="calibration tokens (default 4096 GPU, 2048 CPU)")
    p.add_argument("--rank", type=int, default=32, help="per-expert rank that sets the equal budget")
    p.add_argument("--format", default="nvfp4", help="weight and activation format")
    p.add_argument("--layouts", nargs="+", default=None, choices=[*LAYOUTS, "auto"])
    p.add_argument("--refine-steps", type=int, default=None)
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    gpu = args.device.startswith("cuda")
    args.tokens = args.tokens or (4096 if gpu else 2048)
    shapes = args.shapes or ("both" if gpu else "fine")
    labels = ["mixtral", "fine"] if shapes == "both" else [shapes]
    cfg = SVDQConfig(weight_format=args.format, act_format=args.format, rank=args.rank)
    if args.refine_steps is not None:
        cfg = cfg.replace(refine_steps=args.refine_steps)

    # warm-up (CUDA context, cuSOLVER / cuBLAS handles) outside the timings
    Ww = make_experts(4, 128, 256, "in", args.device, seed=1)
    xw, rw = route(512, 256, 4, 2, args.device, seed=2, empty_expert=1)
    decompose_expert_group(Ww, gather_stats(expert_inputs(xw, rw, None), 256, 64, 0), cfg.replace(rank=8))

    results = []
    for label in labels:
        results.append(run_shape(label, SHAPES[label], args, cfg))
    name = args.name or f"moe_group_{'gpu' if gpu else 'cpu'}_{args.format}"
    path = write_result(
        name,
        {"device_arg": args.device, "config": cfg.to_dict(), "results": results},
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
