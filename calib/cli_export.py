"""``svdq export``: write a quantized checkpoint with its (fine-tuned) adapters for deployment.

    svdq export --checkpoint DIR [--adapters FTDIR/adapters.safetensors] --out EXP
                [--max-shard-size 2GB] [--format svdq] [--overwrite]

``--format svdq`` (the only one for now) is our checkpoint format (:func:`lora.export.export_quantized`):
packed 4-bit residuals, scales, smoothing and the adapters, loading back exactly. The model source is
recorded again, so ``svdq eval --checkpoint EXP`` works on the export as on ``DIR`` + ``--adapters``.
"""

from __future__ import annotations

from pathlib import Path

from calib.cli_common import MODEL_KEY, add_model_args, parse_size

FORMATS = ("svdq",)


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a quantized checkpoint with its fine-tuned adapters")
    add_model_args(p, checkpoint=True)
    p.add_argument("--adapters", type=Path, default=None, help="adapter file (svdq finetune)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--max-shard-size", default=None, help="split files above this size (e.g. 2GB, 500MB)")
    p.add_argument("--format", default="svdq", choices=FORMATS, help="checkpoint format (default svdq)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    from calib.cli_common import checkpoint_source, open_model_and_data
    from lora.export import export_quantized, read_export_metadata
    from lora.harness import destroy_parallel, init_parallel

    if args.checkpoint is None:
        raise ValueError("--checkpoint DIR (a quantized checkpoint from svdq calibrate) is required")
    max_shard = parse_size(args.max_shard_size) if args.max_shard_size else None
    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{args.out} exists and is not empty; pass --overwrite or choose another --out")
    if args.out.resolve() == args.checkpoint.resolve():
        raise ValueError("--out must differ from --checkpoint")
    if args.model is None:
        checkpoint_source(args.checkpoint)  # fails early when it is missing or records no source
    elif not args.checkpoint.exists():
        raise FileNotFoundError(f"checkpoint {args.checkpoint} does not exist")
    previous = read_export_metadata(args.checkpoint).get("user") or {}
    init_parallel(seed=args.seed)
    try:
        lm, _, _ = open_model_and_data(args, None)
        metadata = {
            **previous,
            MODEL_KEY: lm.source.to_dict(),
            "exported_from": str(args.checkpoint),
            "adapters": None if args.adapters is None else str(args.adapters),
        }
        path = export_quantized(
            lm.model, args.out, max_shard_bytes=max_shard, metadata=metadata, overwrite=args.overwrite
        )
    finally:
        destroy_parallel()
    files = sorted(p for p in Path(path).rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in files)
    print(
        f"exported {lm.source.spec} ({args.format} format) to {path}: {len(files)} files, {size / 1e6:.2f} MB"
    )
    return 0
