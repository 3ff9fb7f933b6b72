"""``svdq calibrate``: calibrate a model on a token stream and write the report.

    svdq calibrate --out DIR [--model tiny | module:function] [--data builtin | FILE | DIR | ids.npy]
                   [--rank 16] [--layout auto] [--format nvfp4] [--tokens 16384] [--storage packed]

Writes ``DIR/report.json`` and ``DIR/report.png`` (with matplotlib), each via a temporary name renamed at
the end: an interrupted run leaves no partial file. Every input problem (missing or empty data, token ids
outside the vocabulary, a factory that does not return a module, targets that match nothing) is reported
before any calibration work.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from torch import nn


def add_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="SVDQuant-calibrate a model and write its report")
    p.add_argument("--out", type=Path, required=True, help="output directory (created)")
    p.add_argument("--model", default="tiny", help="'tiny' (built-in GPT-MoE) or module:function factory")
    p.add_argument("--data", default="builtin", help="'builtin', a text file or directory, or a .npy of ids")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--layout", default="auto", help="expert layout: auto, shared-down, shared-up, per-expert")
    p.add_argument("--format", default="nvfp4", help="weight and activation format (nvfp4, int4, fp8, none)")
    p.add_argument("--tokens", type=int, default=16384, help="calibration tokens")
    p.add_argument("--storage", default="packed", choices=["packed", "fake"])
    p.add_argument("--seed", type=int, default=0)


def load_model(spec: str, seed: int) -> tuple[nn.Module, int, int]:
    """``(model, vocab_size, seq_len)`` from ``"tiny"`` or a ``module:function`` factory (called with no
    arguments; it must return an ``nn.Module`` and may set ``vocab_size`` / ``seq_len`` attributes)."""
    if spec == "tiny":
        from lora.harness import TinyMoEConfig, build_tiny_gpt_moe

        cfg = TinyMoEConfig()
        return build_tiny_gpt_moe(cfg, seed=seed), cfg.vocab_size, cfg.seq_len
    if ":" not in spec:
        raise ValueError(f"--model must be 'tiny' or module:function, got {spec!r}")
    module_name, func_name = spec.split(":", 1)
    factory = getattr(importlib.import_module(module_name), func_name, None)
    if not callable(factory):
        raise ValueError(f"--model {spec}: {module_name} has no callable {func_name!r}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {spec}: the factory returned {type(model).__name__}, not an nn.Module")
    return model, int(getattr(model, "vocab_size", 256)), int(getattr(model, "seq_len", 64))


def run(args) -> int:
    from calib.calibrate import CalibConfig, calibrate
    from calib.data import load_tokens, token_batches
    from lora.harness import destroy_parallel, init_parallel
    from svdq import SVDQConfig

    svdq_cfg = SVDQConfig(rank=args.rank, weight_format=args.format, act_format=args.format, seed=args.seed)
    init_parallel(seed=args.seed)
    try:
        model, vocab, seq_len = load_model(args.model, args.seed)
        ids = load_tokens(args.data, vocab, max_tokens=args.tokens)
        batches = token_batches(ids, seq_len, batch=8)
        megatron = hasattr(model, "decoder")

        def forward_loop(m):
            for b in batches:
                if megatron:
                    m(b["tokens"], b["position_ids"], None)
                else:
                    m(b["tokens"])

        report = calibrate(
            model, forward_loop, CalibConfig(svdq=svdq_cfg, layout=args.layout, storage=args.storage)
        )
    finally:
        destroy_parallel()
    args.out.mkdir(parents=True, exist_ok=True)
    report.print()
    json_path = report.write_json(args.out / "report.json")
    png = report.plot_png(args.out / "report.png")
    rtn = sum(r["rtn_error"] for r in report.rows) / len(report.rows)
    ours = sum(r["final_error"] for r in report.rows) / len(report.rows)
    print(
        f"calibrated {len(report.rows)} layers on {ids.numel()} tokens in {report.seconds:.1f} s: "
        f"mean relative output error RTN {rtn:.4f} → SVDQuant {ours:.4f}\n"
        f"wrote {json_path}" + (f" and {png}" if png else " (install matplotlib for report.png)")
    )
    return 0
