"""``svdq calibrate``: calibrate a model on a token stream, write the quantized model and its report.

    svdq calibrate --out DIR [--model tiny | megatron:DIR | hf:DIR | module:function] [--model-config FILE]
                   [--seq-len 256] [--backend torch | megatron]
                   [--data builtin | FILE | DIR | ids.npy] [--tokenizer tokenizer.json]
                   [--rank 16] [--layout fc1=shared-down,fc2=auto] [--format nvfp4] [--tokens 16384]
                   [--storage packed]
                   [--mode all | layerwise] [--act-range static | dynamic]

Writes ``DIR/model`` (the calibrated model, :func:`lora.io.svdq_export.export_quantized`, recording the model
source so that ``svdq eval/finetune/export --checkpoint DIR/model`` rebuild it; for a Hugging Face model also
its ``config.json``), ``DIR/report.json`` and
``DIR/report.png`` (with matplotlib), each through a temporary name renamed at the end: an interrupted run
leaves no partial file. Every input problem (missing or empty data, token ids outside the vocabulary, a
factory that does not return a module, a model config that does not match its checkpoint, targets that
match nothing, an existing ``DIR/model``) is reported before any calibration work.
"""

from __future__ import annotations

from pathlib import Path

from calib.cli.common import MODEL_HELP, MODEL_KEY, add_data_args, add_hf_args, nonneg_int, positive_int
from calib.models import build_model, resolve_source, write_hf_config
from svdq.solvers.shared_basis import (
    AUTO,
    DEFAULT_EXPERT_LAYOUT,
    PER_EXPERT,
    SHARED_DOWN,
    SHARED_UP,
    expert_layouts,
)


def add_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="SVDQuant-calibrate a model; write it and its report")
    p.add_argument("--out", type=Path, required=True, help="output directory (created)")
    p.add_argument("--model", default="tiny", help=MODEL_HELP + " (default: tiny)")
    p.add_argument("--model-config", type=Path, default=None, help="TinyMoEConfig fields (JSON file)")
    add_hf_args(p)
    add_data_args(p, tokens_default=16384)
    p.add_argument("--rank", type=positive_int, default=16)
    p.add_argument(
        "--layout",
        default=None,
        help=f"expert layout, one for both projections or 'fc1=L,fc2=L' with L in {AUTO}, {SHARED_DOWN}, "
        f"{SHARED_UP}, {PER_EXPERT} "
        f"(default: fc1={DEFAULT_EXPERT_LAYOUT['fc1']},fc2={DEFAULT_EXPERT_LAYOUT['fc2']})",
    )
    p.add_argument("--format", default="nvfp4", help="weight and activation format (nvfp4, int4, fp8, none)")
    p.add_argument("--storage", default="packed", choices=["packed", "fake"])
    p.add_argument(
        "--mode",
        default="all",
        choices=["all", "layerwise"],
        help="'layerwise': one transformer layer at a time, statistics memory bounded by one layer",
    )
    p.add_argument(
        "--act-range",
        default="static",
        choices=["static", "dynamic"],
        help="activation quantization range: calibrated per layer (static) or per call (dynamic)",
    )
    p.add_argument(
        "--rank-allocation",
        default="uniform",
        choices=["uniform", "sensitivity"],
        help="'sensitivity': the uniform --rank's branch budget spread over layers by measured sensitivity",
    )
    p.add_argument("--batch", type=positive_int, default=8, help="sequences per calibration batch")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing DIR/model")
    # --- distributed calibration (svdq/DESIGN.md §17): data-parallel ranks calibrate on disjoint shards
    from calib.cli.parallel import add_parallel_args

    add_parallel_args(p)


def run(args) -> int:
    from calib.calibrate import CalibConfig, calibrate
    from calib.cli.common import check_free_space, check_out_dir, device_of, quantized_size_estimate
    from calib.data import load_tokens, token_batches
    from lora.framework.parallel import destroy_parallel
    from lora.io.svdq_export import export_quantized
    from svdq import SVDQConfig

    layout = expert_layouts(args.layout)  # a bad --layout fails here, before any work
    check_out_dir(args.out)
    svdq_cfg = SVDQConfig(rank=args.rank, weight_format=args.format, act_format=args.format, seed=args.seed)
    source = resolve_source(
        args.model, args.model_config, args.seed, seq_len=args.seq_len, backend=args.backend
    )
    model_dir = args.out / "model"
    if model_dir.exists() and not args.overwrite:
        raise FileExistsError(f"{model_dir} exists; choose another --out or pass --overwrite")
    if model_dir.exists() and not model_dir.is_dir():
        raise ValueError(f"{model_dir} is a file, not a directory")
    created = not args.out.exists()
    # distributed: tp · ep · dp = WORLD_SIZE checked before any work; data-parallel rank d calibrates on
    # batches d, d + dp, … (statistics merged over data parallelism, calib.calibrate); rank 0 prints
    from calib.cli.parallel import check_parallel_args, init_from_args, is_rank0
    from lora.framework.parallel import data_parallel_rank_size

    check_parallel_args(args, source.backend)
    init_from_args(args, source.backend)
    rank0 = is_rank0()
    try:
        lm = build_model(source)
        check_free_space(args.out, quantized_size_estimate(lm.model, args.format))
        ids = load_tokens(args.data, lm.vocab_size, max_tokens=args.tokens, tokenizer=args.tokenizer)
        batches = token_batches(ids, lm.seq_len, batch=args.batch, device=device_of(lm.model))

        dp_rank, dp_size = data_parallel_rank_size()
        if len(batches) < dp_size:
            raise ValueError(
                f"--tokens: {len(batches)} batches cannot be shared by {dp_size} data-parallel ranks"
            )
        report = calibrate(
            lm.model,
            lm.forward_loop(batches[dp_rank::dp_size]),
            CalibConfig(
                svdq=svdq_cfg,
                layout=layout,
                storage=args.storage,
                mode=args.mode,
                act_range=args.act_range,
                rank_allocation=args.rank_allocation,
            ),
        )
        args.out.mkdir(parents=True, exist_ok=True)
        metadata = {
            MODEL_KEY: source.to_dict(),
            "calibration": {
                "svdq": svdq_cfg.to_dict(),
                "layout": layout,
                "storage": args.storage,
                "mode": args.mode,
                "act_range": args.act_range,
                "data": str(args.data),
                "tokenizer": None if args.tokenizer is None else str(args.tokenizer),
                "tokens": int(ids.numel()),
            },
        }
        export_quantized(lm.model, model_dir, metadata=metadata, overwrite=args.overwrite)
        if rank0:
            write_hf_config(lm, model_dir)  # a Hugging Face model's config.json travels with it
    except BaseException:
        if rank0 and created and args.out.is_dir() and not any(args.out.iterdir()):
            args.out.rmdir()  # nothing partial: not even the empty --out this run created
        raise
    finally:
        destroy_parallel()
    if not rank0:
        return 0
    report.print()
    json_path = report.write_json(args.out / "report.json")
    png = report.plot_png(args.out / "report.png")
    rtn = sum(r["rtn_error"] for r in report.rows) / len(report.rows)
    ours = sum(r["final_error"] for r in report.rows) / len(report.rows)
    print(
        f"calibrated {len(report.rows)} layers on {ids.numel()} tokens in {report.seconds:.1f} s: "
        f"mean relative output error RTN {rtn:.4f} → SVDQuant {ours:.4f}\n"
        f"wrote {model_dir} (quantized model), {json_path}"
        + (f" and {png}" if png else " (install matplotlib for report.png)")
    )
    return 0
