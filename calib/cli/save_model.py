"""``svdq save-model``: write a Megatron GPT-MoE as a ``megatron:DIR`` model source.

    svdq save-model --out DIR [--model tiny | megatron:DIR] [--model-config FILE] [--seed 0]

``DIR`` gets ``config.json`` (TinyMoEConfig fields) and the ``dist_checkpointing`` files of the model
(:func:`calib.models.save_megatron_model`), so that ``--model megatron:DIR`` rebuilds it.
"""

from __future__ import annotations

from pathlib import Path

from calib.cli.common import nonneg_int


def add_parser(sub) -> None:
    p = sub.add_parser("save-model", help="write a Megatron GPT-MoE as a megatron:DIR model source")
    p.add_argument("--out", type=Path, required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--model", default="tiny", help="'tiny' or 'megatron:DIR'")
    p.add_argument("--model-config", type=Path, default=None, help="TinyMoEConfig fields (JSON file)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="weight seed of --model tiny")
    p.add_argument("--overwrite", action="store_true")


def run(args) -> int:
    from calib.cli.common import check_out_dir
    from calib.models import build_model, resolve_source, save_megatron_model
    from calib.tiny_moe import TinyMoEConfig
    from lora.framework.parallel import destroy_parallel, init_parallel

    check_out_dir(args.out)
    source = resolve_source(args.model, args.model_config, args.seed)
    if source.kind not in ("tiny", "megatron"):
        raise ValueError(f"save-model writes Megatron models ('tiny' or 'megatron:DIR'), not {args.model}")
    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{args.out} exists and is not empty; pass --overwrite or choose another --out")
    init_parallel(seed=args.seed)
    try:
        lm = build_model(source)
        path = save_megatron_model(lm.model, TinyMoEConfig.from_dict(source.config), args.out, overwrite=True)
    finally:
        destroy_parallel()
    print(f"wrote {path} (use --model megatron:{path})")
    return 0
