"""``svdq calibrate``: calibrate a model on a token stream, write the quantized model and its report.

    svdq calibrate --out DIR [--model tiny | megatron:DIR | hf:DIR | module:function] [--model-config FILE]
                   [--seq-len 256] [--backend torch | megatron]
                   [--data builtin | FILE | DIR | data.jsonl | ids.npy] [--tokenizer tokenizer.json | DIR]
                   [--text-field text] [--rank 16] [--layout fc1=shared-down,fc2=auto] [--format nvfp4]
                   [--act-format FMT] [--tokens 16384] [--storage packed]
                   [--mode all | layerwise [--resume]] [--act-range static | dynamic] [--json FILE]

Writes ``DIR/model`` (the calibrated model, :func:`lora.io.svdq_export.export_quantized`, recording the model
source so that ``svdq eval/finetune/export --checkpoint DIR/model`` rebuild it; for a Hugging Face model also
its ``config.json``), ``DIR/report.json`` and
``DIR/report.png`` (with matplotlib), each through a temporary name renamed at the end: an interrupted run
leaves no partial file. Every input problem (missing or empty data, token ids outside the vocabulary, a
factory that does not return a module, a model config that does not match its checkpoint, targets that
match nothing, an existing ``DIR/model``) is reported before any calibration work.

``--mode layerwise`` keeps, after each finished transformer layer, ``DIR/partial``: a partial checkpoint
(:func:`lora.io.svdq_export.export_quantized`, atomic) of the model so far whose user metadata records the
finished layers' report rows, the model source, the settings and the data fingerprint. ``--resume`` checks
those against the arguments (one line naming what differs), loads the partial checkpoint (the finished
layers, exactly as they were) and calibrates the remaining layers (:func:`calib.calibrate.calibrate` with
``done_layers``): the result equals an uninterrupted run's, tensor for tensor. The partial checkpoint is
removed once ``DIR/model`` is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from calib.cli.common import (
    FORMAT_CHOICES,
    MODEL_HELP,
    MODEL_KEY,
    add_data_args,
    add_hf_args,
    add_json_arg,
    layout_arg,
    nonneg_int,
    positive_int,
)
from calib.models import build_model, resolve_source, write_hf_config
from svdq.config import DEFAULT_ACT_RANGE_MARGIN
from svdq.residual import ACT_RANGES, STORAGE_MODES
from svdq.solvers.shared_basis import DEFAULT_EXPERT_LAYOUT, LAYOUT_CHOICES, expert_layouts

MODES = ("all", "layerwise")  # calib.calibrate.MODES (tests check they agree; no megatron import here)


def add_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="SVDQuant-calibrate a model; write it and its report")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory (created)")
    p.add_argument("--model", default="tiny", metavar="SRC", help=MODEL_HELP)
    p.add_argument(
        "--model-config", type=Path, default=None, metavar="FILE", help="TinyMoEConfig fields (JSON file)"
    )
    add_hf_args(p)
    add_data_args(p, tokens_default=16384)
    p.add_argument("--rank", type=positive_int, default=16, metavar="R", help="SVDQuant low-rank branch rank")
    p.add_argument(
        "--layout",
        type=layout_arg,
        default=dict(DEFAULT_EXPERT_LAYOUT),
        metavar="L|fc1=L,fc2=L",
        help="expert layout, one for both projections or per projection; L one of "
        + ", ".join(LAYOUT_CHOICES),
    )
    p.add_argument("--format", default="nvfp4", choices=FORMAT_CHOICES, help="weight (and activation) format")
    p.add_argument(
        "--act-format",
        default=None,
        choices=FORMAT_CHOICES,
        help="activation format (default: the --format)",
    )
    p.add_argument(
        "--storage", default="packed", choices=STORAGE_MODES, help="4-bit residuals packed or fake-quantized"
    )
    p.add_argument(
        "--mode",
        default="all",
        choices=MODES,
        help="'layerwise': one transformer layer at a time, statistics memory bounded by one layer",
    )
    p.add_argument(
        "--act-range",
        default="static",
        choices=ACT_RANGES,
        help="activation quantization range: calibrated per layer (static) or per call (dynamic)",
    )
    p.add_argument(
        "--act-range-margin",
        type=float,
        default=DEFAULT_ACT_RANGE_MARGIN,
        metavar="K",
        help="static ranges are K × the calibrated max|x/s| (headroom for larger held-out inputs; K ≥ 1)",
    )
    p.add_argument(
        "--rank-allocation",
        default="uniform",
        choices=["uniform", "sensitivity"],
        help="'sensitivity': the uniform --rank's branch budget spread over layers by measured sensitivity",
    )
    p.add_argument(
        "--batch", type=positive_int, default=8, metavar="N", help="sequences per calibration batch"
    )
    p.add_argument("--seed", type=nonneg_int, default=0, help="random seed (token samples, tiny weights)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DIR/model")
    p.add_argument(
        "--resume",
        action="store_true",
        help="--mode layerwise: continue the run in --out from its last finished layer (DIR/partial; the "
        "model, data and settings must be the same)",
    )
    # tests: stop (as Ctrl-C would) after this many layers finished in this run
    p.add_argument("--stop-after-layers", type=positive_int, default=None, help=argparse.SUPPRESS)
    add_json_arg(p)

    # --- distributed calibration (svdq/DESIGN.md §17): data-parallel ranks calibrate on disjoint shards
    from calib.cli.parallel import add_parallel_args

    add_parallel_args(p)


PARTIAL = "partial"  # DIR/partial: a partial checkpoint of the layers a layerwise run has finished
RESUME_KEY = "resume"


def _check_resume(partial: Path, record: dict, keys) -> dict:
    """The finished layers recorded in ``partial`` (``{layer: rows}``); ``ValueError`` naming the first of
    ``keys`` whose value differs from ``record`` (the run would not continue the same calibration)."""
    from lora.io.svdq_export import read_export_metadata

    if not partial.is_dir():
        raise ValueError(f"--resume: nothing to resume, {partial} does not exist")
    saved = (read_export_metadata(partial).get("user") or {}).get(RESUME_KEY)
    if not isinstance(saved, dict) or not isinstance(saved.get("layers"), dict):
        raise ValueError(f"--resume: {partial} records no layerwise progress")
    for key in keys:
        if saved.get(key) != record[key]:
            raise ValueError(
                f"--resume: {partial} was calibrated with another {key} ({saved.get(key)!r}, now "
                f"{record[key]!r}); rerun without --resume to start over"
            )
    return saved["layers"]


def run(args) -> int:
    from calib.calibrate import CalibConfig, calibrate
    from calib.cli.common import (
        check_free_space,
        check_json_arg,
        check_out_dir,
        device_of,
        finish,
        jsonl_fields,
        log,
        quantized_size_estimate,
    )
    from calib.data import fingerprint, load_tokens, token_batches
    from lora.framework.parallel import destroy_parallel
    from lora.io.svdq_export import export_quantized, load_quantized
    from svdq import SVDQConfig

    layout = expert_layouts(args.layout)  # already checked by argparse (layout_arg)
    check_out_dir(args.out)
    check_json_arg(args)
    fields = jsonl_fields(args)
    act_format = args.act_format or args.format
    svdq_cfg = SVDQConfig(
        rank=args.rank,
        weight_format=args.format,
        act_format=act_format,
        seed=args.seed,
        act_range_margin=args.act_range_margin,
    )
    source = resolve_source(
        args.model, args.model_config, args.seed, seq_len=args.seq_len, backend=args.backend
    )
    model_dir = args.out / "model"
    if model_dir.exists() and not args.overwrite:
        raise FileExistsError(f"{model_dir} exists; choose another --out or pass --overwrite")
    if model_dir.exists() and not model_dir.is_dir():
        raise ValueError(f"{model_dir} is a file, not a directory")
    partial = args.out / PARTIAL
    if (args.resume or args.stop_after_layers) and args.mode != "layerwise":
        raise ValueError("--resume continues a --mode layerwise run; pass --mode layerwise")
    settings = {
        "svdq": svdq_cfg.to_dict(),
        "layout": layout,
        "storage": args.storage,
        "mode": args.mode,
        "act_range": args.act_range,
        "batch": args.batch,
    }
    resume = {"model": source.to_dict(), "settings": settings}
    done = _check_resume(partial, resume, ("model", "settings")) if args.resume else {}
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
        ids = load_tokens(
            args.data, lm.vocab_size, max_tokens=args.tokens, tokenizer=args.tokenizer, fields=fields
        )
        batches = token_batches(ids, lm.seq_len, batch=args.batch, device=device_of(lm.model))
        resume.update(data=fingerprint(ids), tokens=int(ids.numel()), seq_len=lm.seq_len)
        if args.resume:
            _check_resume(partial, resume, ("data", "tokens", "seq_len"))
            load_quantized(lm.model, partial, progress=False)  # the finished layers, as they were
            log.info("resuming after %d finished layer(s) from %s", len(done), partial)
        elif partial.exists():
            log.info("starting over: %s of an earlier run is replaced (--resume continues it)", partial)
        stopped = []

        def save_layer(layer: str, rows: list[dict]) -> None:
            """After each finished layer: the model so far and the rows, one atomic checkpoint."""
            done[layer] = json.loads(json.dumps(rows, default=str))
            meta = {MODEL_KEY: source.to_dict(), RESUME_KEY: {**resume, "layers": done}}
            args.out.mkdir(parents=True, exist_ok=True)
            export_quantized(lm.model, partial, metadata=meta, overwrite=True, progress=False)
            stopped.append(layer)
            if args.stop_after_layers is not None and len(stopped) >= args.stop_after_layers:
                raise KeyboardInterrupt  # what a Ctrl-C here would do (tests)

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
                progress=args.progress,
                rank_allocation=args.rank_allocation,
            ),
            done_layers=dict(done),
            on_layer=save_layer if args.mode == "layerwise" else None,
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
                "text_field": args.text_field,
                "tokens": int(ids.numel()),
            },
        }
        export_quantized(
            lm.model, model_dir, metadata=metadata, overwrite=args.overwrite, progress=args.progress
        )
        if rank0:
            write_hf_config(lm, model_dir)  # a Hugging Face model's config.json travels with it
        if rank0 and partial.is_dir():
            shutil.rmtree(partial)  # the run is complete
    except KeyboardInterrupt:
        if partial.is_dir():
            args.interrupt_note = f"the finished layers are kept in {partial}; continue with --resume"
        raise
    except BaseException:
        if rank0 and created and args.out.is_dir() and not any(args.out.iterdir()):
            args.out.rmdir()  # nothing partial: not even the empty --out this run created
        raise
    finally:
        destroy_parallel()
    if not rank0:
        return 0
    report.model = source.spec
    if log.isEnabledFor(logging.INFO):
        report.print()
    json_path = report.write_json(args.out / "report.json")
    png = report.plot_png(args.out / "report.png")
    log.info("wrote %s (quantized model), %s%s", model_dir, json_path, f" and {png}" if png else "")
    rtn = sum(r["rtn_error"] for r in report.rows) / len(report.rows)
    ours = sum(r["final_error"] for r in report.rows) / len(report.rows)
    record = {
        "model": source.spec,
        "out": str(model_dir),
        "report_json": str(json_path),
        "report_png": None if png is None else str(png),
        "layers": len(report.rows),
        "tokens": int(ids.numel()),
        "seconds": report.seconds,
        "weight_format": args.format,
        "act_format": act_format,
        "rank": args.rank,
        "layout": layout,
        "mode": args.mode,
        "mean_rtn_error": rtn,
        "mean_final_error": ours,
    }
    line = (
        f"calibrated {len(report.rows)} layers on {ids.numel()} tokens in {report.seconds:.1f} s: "
        f"mean relative output error RTN {rtn:.4f} → SVDQuant {ours:.4f}; wrote {model_dir}"
    )
    return finish(args, line, record)
