"""``svdq export``: write a quantized checkpoint with its (fine-tuned) adapters for deployment.

    svdq export --checkpoint DIR [--adapters FTDIR/adapters.safetensors] --out EXP
                [--format svdq|folded|modelopt-hf|peft|compressed-tensors] [--ct-scheme NVFP4|NVFP4A16]
                [--max-shard-size 2GB] [--overwrite]
                [--model SRC] [--seq-len N] [--backend torch|megatron]
                [--data builtin|FILE|DIR|ids.npy] [--tokenizer tokenizer.json] [--tokens 4096] [--batch 8]

The command parses its arguments and calls :func:`lora.export` (:mod:`lora.io.api`: which format applies to
which model kind and takes which option). Formats (the model is ``--checkpoint`` with ``--adapters`` loaded;
every output is written to a temporary directory renamed into place, so a failed export leaves nothing at
``EXP``):

* ``svdq`` (default) — our checkpoint format (:func:`lora.io.svdq_export.export_quantized`): packed 4-bit
  residuals, scales, smoothing and the adapters, loading back exactly. The model source is recorded again, so
  ``svdq eval --checkpoint EXP`` works on the export as on ``DIR`` + ``--adapters``. The only format with
  ``--max-shard-size``.
* ``folded`` — the adapters folded into the 4-bit residuals (rank 0, no low-rank branch), for engines
  without low-rank support: per linear the residual becomes ``Q_w(Q_w(R) + B·A'·diag(s))``. Megatron models
  (``tiny``, ``megatron:DIR``): :func:`lora.io.folded.export_folded`, written in the svdq format (rank-0
  layers, no ``lora_*`` tensors; ``svdq eval --checkpoint EXP`` works). Plain torch models
  (:class:`svdq.SVDQLinear` layers): :func:`lora.io.folded_hf.export_folded_hf`, written in modelopt's HF
  NVFP4 layout (``NVFP4_AWQ``: NVFP4 + ``pre_quant_scale``; ``--fold-smoothing fold`` folds the smoothing into
  the weight too and writes plain ``NVFP4``, which more engines read, at some added error). Prints the
  per-linear error the fold adds
  (:func:`lora.fold.format_report`: ``weight_err = ‖W_fold − T‖/‖T‖`` with ``T`` the unfolded
  effective weight, ``delta_rel = ‖B·A'‖/‖T‖``, and with ``--data`` the input-based ``act_weight_err`` and
  ``output_err = ‖y_fold − y‖/‖y‖`` on the inputs each linear gets from ``--tokens`` of ``--data``, at most
  4096 rows per linear) and a summary line (mean / max ``output_err`` with ``--data``, else ``weight_err``).
* ``modelopt-hf`` — nvidia-modelopt's Hugging Face layout for NVFP4 SVDQuant (``quant_algo: NVFP4_SVD``,
  :func:`lora.io.modelopt_hf.export_modelopt_hf`): ``model.safetensors``, ``hf_quant_config.json``,
  ``config.json``. Plain torch models with dense NVFP4 W4A4 layers only; ``--data`` measures the static
  activation range of layers calibrated without one.
* ``peft`` — the branches as a PEFT LoRA adapter (:func:`lora.io.peft.export_peft`:
  ``adapter_model.safetensors`` + ``adapter_config.json``; see :mod:`lora.io.peft` for which base
  it applies to). Plain torch models only.

* ``compressed-tensors`` — the adapters folded (smoothing folded too: the format has no
  ``pre_quant_scale``) into NVFP4 weights written through the compressed-tensors library
  (``nvfp4-pack-quantized``, :func:`lora.io.compressed_tensors.export_compressed_tensors`): what
  llm-compressor writes and vLLM / transformers read; fused experts per expert under the names
  ``save_pretrained`` writes,
  routers and ``lm_head`` in ``ignore``; ``config.json`` with ``quantization_config``. ``--ct-scheme NVFP4``
  (W4A4, the default for nvfp4-activation models) needs ``--data`` for the static activation global scales;
  ``NVFP4A16`` is weight-only. Plain torch / Hugging Face models only. Prints the fold report.

``hf:DIR --backend megatron`` models (the Megatron twin, :mod:`calib.hf.to_hf`) are written in ``modelopt-hf``
and ``folded`` as modelopt's HF layout under the Hugging Face names (q / k / v, gate / up split back). Their
``down_proj`` ranges are measured over a forward pass in the Hugging Face semantics (without the router
probability Megatron multiplies into ``linear_fc2``'s input): on ``--data``, or without it on the data the
checkpoint's calibration recorded (``--data`` / ``--tokenizer``, at most its token count; builtin if none).

A Hugging Face model (``hf:DIR``, or a factory returning a transformers model) keeps its module names in every
format, and ``EXP/config.json`` is its ``config.json`` (for ``modelopt-hf`` / torch ``folded`` the model's
config with ``quantization_config`` added). ``hf:DIR`` models of ``--backend torch`` are plain torch models,
of ``--backend megatron`` Megatron models.

``--data`` applies to ``folded`` and ``modelopt-hf`` only. Wrong combinations (a Megatron model with
``modelopt-hf`` / ``peft``, ``--max-shard-size`` or ``--data`` where unused) exit with status 2 before any
work.
"""

from __future__ import annotations

import logging
from pathlib import Path

from calib.cli.common import (
    MODEL_KEY,
    add_data_args,
    add_json_arg,
    add_model_args,
    nonneg_int,
    parse_size,
    positive_int,
)

# the parser is built without importing lora (megatron-core: seconds, and import warnings); the names are
# those of lora.io.api.EXPORTERS, in its order (tests/calib/cli/test_export_formats.py checks it)
FORMATS = ("svdq", "folded", "modelopt-hf", "peft", "compressed-tensors")


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a quantized checkpoint with its fine-tuned adapters")
    add_model_args(p, checkpoint=True)
    p.add_argument("--adapters", type=Path, default=None, metavar="FILE", help="adapter file (svdq finetune)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    p.add_argument(
        "--format",
        default="svdq",
        choices=FORMATS,
        help="svdq (ours), folded (adapters merged into the 4-bit weights), modelopt-hf, peft, "
        "compressed-tensors (folded, NVFP4 through the compressed-tensors library)",
    )
    p.add_argument(
        "--max-shard-size",
        default=None,
        metavar="SIZE",
        help="--format svdq: split files above this size (e.g. 2GB)",
    )
    add_data_args(p, tokens_default=4096)
    p.set_defaults(data=None)  # no data unless given: only the formats taking a forward loop use it
    p.add_argument("--batch", type=positive_int, default=8, metavar="N", help="sequences per --data batch")
    p.add_argument(
        "--fold-smoothing",
        default="keep",
        choices=["keep", "fold"],
        help="folded torch models: keep pre_quant_scale (NVFP4_AWQ) or fold it into the weight (plain NVFP4; "
        "needs --data to measure the raw input ranges)",
    )
    p.add_argument(
        "--ct-scheme",
        default=None,
        choices=["NVFP4", "NVFP4A16"],
        help="--format compressed-tensors: NVFP4 (W4A4, needs --data) or NVFP4A16 (weight-only); default "
        "from the model's activation format",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--seed", type=nonneg_int, default=0, help="weight seed of --model tiny")
    add_json_arg(p)
    # --- distributed export (svdq/DESIGN.md §17): model-parallel only, --dp 1
    from calib.cli.parallel import add_parallel_args

    add_parallel_args(p)


def _check_args(args) -> None:
    """Every input problem that needs no model (``ValueError`` / ``FileNotFoundError`` /
    ``FileExistsError``, one line each)."""
    from calib.cli.common import check_free_space, check_json_arg, check_out_dir, checkpoint_source, tree_size
    from lora.io import api

    if args.checkpoint is None:
        raise ValueError("--checkpoint DIR (a quantized checkpoint from svdq calibrate) is required")
    sharded = api.formats_taking("max_shard_bytes")
    if args.max_shard_size is not None and args.format not in sharded:
        raise ValueError(
            f"--max-shard-size applies to --format {' / '.join(sharded)} only; "
            f"--format {args.format} writes single files"
        )
    with_data = api.formats_taking("forward_loop")
    if args.data is not None and args.format not in with_data:
        raise ValueError(f"--data applies to --format {' / '.join(with_data)}, not to --format {args.format}")
    if args.ct_scheme is not None and args.format != "compressed-tensors":
        raise ValueError(f"--ct-scheme applies to --format compressed-tensors, not to --format {args.format}")
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    check_out_dir(args.out)
    check_json_arg(args)
    check_free_space(
        args.out, tree_size(args.checkpoint) + (tree_size(args.adapters) if args.adapters else 0)
    )
    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{args.out} exists and is not empty; pass --overwrite or choose another --out")
    if args.out.resolve() == args.checkpoint.resolve():
        raise ValueError("--out must differ from --checkpoint")
    if args.model is None:
        checkpoint_source(args.checkpoint)  # fails early when it is missing or records no source
    elif not args.checkpoint.exists():
        raise FileNotFoundError(f"checkpoint {args.checkpoint} does not exist")


def _calibration_data(args, previous: dict) -> None:
    from calib.cli.common import log

    """``--data`` / ``--tokenizer`` / ``--tokens`` of the calibration the checkpoint records (else the
    builtin data), for exports that measure over a forward loop."""
    cal = previous.get("calibration") or {}
    args.data = cal.get("data") or "builtin"
    if args.tokenizer is None and cal.get("tokenizer"):
        args.tokenizer = Path(cal["tokenizer"])
    if isinstance(cal.get("text_field"), str) and args.text_field == "text":
        args.text_field = cal["text_field"]
    if isinstance(cal.get("tokens"), int) and cal["tokens"] > 0:
        args.tokens = min(args.tokens, cal["tokens"]) if args.tokens else cal["tokens"]
    log.info(
        "measuring the Hugging Face down_proj input ranges on the calibration data (--data %s)", args.data
    )


def run(args) -> int:
    import torch

    from calib.cli.common import finish, log, model_source, open_model_and_data
    from calib.cli.parallel import check_parallel_args, init_from_args, is_rank0
    from calib.models import base_model_name, write_hf_config
    from lora.fold import fold_summary, format_report
    from lora.framework.parallel import destroy_parallel
    from lora.io import api
    from lora.io.svdq_export import read_export_metadata

    _check_args(args)
    source = model_source(args)
    kind = source.backend  # tiny / megatron:DIR / hf:DIR --backend megatron: Megatron models
    if source.kind == "hf" and kind == "megatron":  # the Megatron twin of an HF model: HF names, modelopt
        import calib.hf.to_hf  # noqa: F401  (registers modelopt-hf / folded for these models)

        kind = "megatron-hf"
    api.check_format(args.format, kind, spell=lambda name: f"--format {name}")
    max_shard = parse_size(args.max_shard_size) if args.max_shard_size else None
    previous = read_export_metadata(args.checkpoint).get("user") or {}
    measures = api.check_format(args.format, kind).takes("forward_loop")
    if kind == "megatron-hf" and args.data is None and measures:
        _calibration_data(args, previous)  # down_proj's ranges are measured at export (calib.hf.to_hf)
    _, _, dp = check_parallel_args(args, source.backend)
    if dp != 1:
        raise ValueError(
            f"--dp {dp}: export writes one model; run it model-parallel only (--tp × --ep = WORLD_SIZE)"
        )
    init_from_args(args, source.backend)
    rank0 = is_rank0()
    try:
        lm, _, batches = open_model_and_data(args, None if args.data is None else args.batch)
        if batches is not None:
            lm.model.eval()  # the forward loop only measures (inputs, ranges)
        settings = {
            "metadata": {
                **previous,
                MODEL_KEY: lm.source.to_dict(),
                "exported_from": str(args.checkpoint),
                "adapters": None if args.adapters is None else str(args.adapters),
                "export_format": args.format,
            },
            "max_shard_bytes": max_shard,
            "forward_loop": None if batches is None else lm.forward_loop(batches),
            "smoothing": args.fold_smoothing,
            "scheme": args.ct_scheme,
            "base_model_name_or_path": base_model_name(lm.source),
            "overwrite": args.overwrite,
            "verbose": False,
            "progress": args.progress,
        }
        options = api.supported_options(args.format, api.model_kind(lm.model), settings)
        with torch.no_grad():
            exported = api.export(lm.model, args.out, args.format, **options)
        if rank0:
            write_hf_config(lm, args.out)  # a Hugging Face model's config.json (modelopt-hf writes its own)
    finally:
        destroy_parallel()
    if not rank0:
        return 0
    fold = None
    if exported.report is not None:
        if log.isEnabledFor(logging.INFO):  # a result table: stdout, like calibrate's
            print("error added by folding the adapters into the 4-bit weights (per linear, relative):")
            print(format_report(exported.report))
        fold = fold_summary(exported.report)
    files = sorted(p for p in args.out.rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in files)
    what = f"{args.format} format" + (f", {exported.layout}" if exported.layout else "")
    record = {
        "model": lm.source.spec,
        "checkpoint": str(args.checkpoint),
        "adapters": None if args.adapters is None else str(args.adapters),
        "format": args.format,
        "layout": exported.layout,
        "out": str(args.out),
        "files": [str(p.relative_to(args.out)) for p in files],
        "bytes": size,
        "fold_summary": fold,
        "fold_report": exported.report,
    }
    line = f"exported {lm.source.spec} ({what}) to {args.out}: {len(files)} files, {size / 1e6:.2f} MB"
    return finish(args, line + (f"; {fold}" if fold else ""), record)
