"""``svdq save-model``: write a Megatron GPT-MoE as a ``megatron:DIR`` model source.

    svdq save-model --out DIR [--model tiny | megatron:DIR] [--model-config FILE] [--seed 0]

``DIR`` gets ``config.json`` (TinyMoEConfig fields) and the ``dist_checkpointing`` files of the model
(:func:`calib.models.save_megatron_model`), so that ``--model megatron:DIR`` rebuilds it.
"""

from __future__ import annotations

from pathlib import Path

from calib.cli.common import add_json_arg, nonneg_int


def add_parser(sub) -> None:
    p = sub.add_parser("save-model", help="write a Megatron GPT-MoE as a megatron:DIR model source")
    p.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="output directory (must not exist or be empty)"
    )
    p.add_argument("--model", default="tiny", metavar="SRC", help="'tiny' or 'megatron:DIR'")
    p.add_argument(
        "--model-config", type=Path, default=None, metavar="FILE", help="TinyMoEConfig fields (JSON file)"
    )
    p.add_argument("--seed", type=nonneg_int, default=0, help="weight seed of --model tiny")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    add_json_arg(p)


def run(args) -> int:
    from calib.cli.common import check_json_arg, check_out_dir, finish, tree_size
    from calib.models import build_model, resolve_source, save_megatron_model
    from calib.tiny_moe import TinyMoEConfig
    from lora.framework.parallel import destroy_parallel, init_parallel

    check_out_dir(args.out)
    check_json_arg(args)
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
    record = {"model": source.spec, "out": str(path), "bytes": tree_size(path), "use": f"megatron:{path}"}
    return finish(args, f"wrote {path} ({record['bytes'] / 1e6:.2f} MB; use --model megatron:{path})", record)
