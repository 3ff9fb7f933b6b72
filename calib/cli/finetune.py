"""``svdq finetune``: train the adapters of a quantized checkpoint (the 4-bit base stays frozen).

    svdq finetune --checkpoint DIR --out FTDIR --steps N [--data builtin | FILE | DIR | ids.npy]
                  [--tokenizer tokenizer.json] [--tokens N] [--lr 1e-3] [--warmup 10] [--min-lr-ratio 0.1]
                  [--grad-clip 1.0] [--weight-decay 0] [--dropout 0] [--batch 8] [--save-every 5] [--keep 3]
                  [--seed 0] [--resume] [--stop-at K] [--seq-len N] (hf:DIR models)
                  [--grad-accum 1] [--eval-every K] [--eval-batches N] [--tp 1] [--ep 1] [--dp WORLD/(tp·ep)]

AdamW on the adapter parameters, linear warmup + cosine decay, gradient-norm clipping, bf16 autocast on
CUDA (see :mod:`calib.train`). Checkpoints ``FTDIR/checkpoints/step-000005/`` every ``--save-every``
steps (the last ``--keep`` kept); ``--resume`` continues from the latest complete one exactly as an
uninterrupted run would; ``--stop-at K`` saves after step K and stops (resume later). At the end:
``FTDIR/adapters.safetensors`` (load with ``svdq eval/export --adapters``) and ``FTDIR/losses.json``.

``--grad-accum N``: N micro-batches per step. ``--eval-every K``: the last ``--eval-batches`` batches of
the data (default a tenth, at least one) are held out and evaluated every K steps (``losses.json`` key
``evals``). Under ``torchrun`` (:mod:`calib.cli.parallel`): ``--tp`` / ``--ep`` / ``--dp``; each
data-parallel rank runs its share of every batch, the loss is the global token-weighted mean (prompt /
response masks included) and the adapter gradients are summed over data parallelism; expert-parallel
ranks take the one-process steps; global rank 0 writes the files and shows the progress (svdq/DESIGN.md
§17). ``--resume`` refuses another layout, data or prompt / response split (its loss mask's fingerprint).
"""

from __future__ import annotations

import time
from pathlib import Path

from calib.cli.common import (
    add_data_args,
    add_json_arg,
    add_model_args,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
    unit_float,
)


def add_parser(sub) -> None:
    p = sub.add_parser("finetune", help="train the adapters of a quantized checkpoint")
    add_model_args(p, checkpoint=True)
    p.add_argument("--out", type=Path, required=True, help="run directory (checkpoints, adapters, losses)")
    p.add_argument("--steps", type=positive_int, required=True, help="optimizer steps")
    add_data_args(p, tokens_default=None)
    p.add_argument("--lr", type=positive_float, default=1e-3, help="peak learning rate")
    p.add_argument("--warmup", type=nonneg_int, default=10, help="linear warmup steps")
    p.add_argument(
        "--min-lr-ratio", type=unit_float, default=0.1, help="final lr / peak lr of the cosine decay"
    )
    p.add_argument("--grad-clip", type=nonneg_float, default=1.0, help="max gradient norm (0 = off)")
    p.add_argument("--weight-decay", type=nonneg_float, default=0.0)
    p.add_argument("--dropout", type=nonneg_float, default=0.0, help="adapter dropout on the branch inputs")
    p.add_argument("--batch", type=positive_int, default=8, help="sequences per step")
    p.add_argument(
        "--save-every", type=nonneg_int, default=5, help="checkpoint every N steps (0 = only at the end)"
    )
    p.add_argument("--keep", type=positive_int, default=3, help="checkpoints to keep")
    p.add_argument("--seed", type=nonneg_int, default=0, help="data order seed")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument(
        "--stop-at", type=positive_int, default=None, help="save a checkpoint after step K and stop"
    )
    # --- distributed fine-tuning, accumulation, held-out evaluation (svdq/DESIGN.md §17)
    from calib.cli.parallel import add_parallel_args

    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    p.add_argument(
        "--eval-every", type=nonneg_int, default=0, help="held-out evaluation every K steps (0 = off)"
    )
    p.add_argument(
        "--eval-batches",
        type=positive_int,
        default=None,
        help="batches held out from the data's end for --eval-every (default: a tenth, at least 1)",
    )
    add_parallel_args(p)
    add_json_arg(p)


def _file_parameters(path) -> int:
    """Number of values in the tensors of a safetensors file (its header only)."""
    import math

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return sum(math.prod(fh.get_slice(k).get_shape()) for k in fh.keys())  # noqa: SIM118


def run(args) -> int:
    from calib.cli.common import open_model_and_data
    from calib.cli.parallel import check_parallel_args, init_from_args, is_rank0
    from calib.data import fingerprint, mask_fingerprint
    from calib.train import (
        TrainConfig,
        adapter_parameters,
        check_batch_split,
        check_resumable,
        complete_checkpoints,
        finetune,
        remove_stale_temporaries,
        write_json,
    )
    from lora.framework.parallel import destroy_parallel
    from lora.model import save_adapters

    cfg = TrainConfig(
        steps=args.steps,
        lr=args.lr,
        warmup=args.warmup,
        min_lr_ratio=args.min_lr_ratio,
        grad_clip=args.grad_clip,
        weight_decay=args.weight_decay,
        dropout=args.dropout,
        batch=args.batch,
        seed=args.seed,
        grad_accum=args.grad_accum,
    )
    if args.checkpoint is None:
        raise ValueError("--checkpoint DIR (a quantized checkpoint from svdq calibrate) is required")
    if args.save_every < 0 or args.keep < 1:
        raise ValueError("--save-every must be ≥ 0 and --keep ≥ 1")
    if args.stop_at is not None and not 1 <= args.stop_at <= args.steps:
        raise ValueError(f"--stop-at must lie in [1, --steps={args.steps}]")
    # distributed layout, accumulation, evaluation: before any work
    from calib.cli.common import model_source

    _, _, dp = check_parallel_args(args, model_source(args).backend)
    check_batch_split(cfg.batch, dp, cfg.grad_accum)
    if args.eval_batches is not None and not args.eval_every:
        raise ValueError("--eval-batches needs --eval-every K")
    from calib.cli.common import check_free_space, check_json_arg, check_out_dir, finish

    check_out_dir(args.out)
    check_json_arg(args)
    ckpt_root = args.out / "checkpoints"
    resume_from = None
    if args.resume:
        remove_stale_temporaries(ckpt_root)
        found = complete_checkpoints(ckpt_root)
        if not found:
            raise ValueError(f"--resume: nothing to resume, {ckpt_root} holds no complete checkpoint")
        resume_from = found[-1]
        check_resumable(resume_from, cfg)  # settings first, before any loading
    elif args.out.exists() and any(args.out.iterdir()):
        raise FileExistsError(
            f"{args.out} is not empty; pass --resume to continue its run or choose another --out"
        )

    t0 = time.perf_counter()
    tp, ep, dp = init_from_args(args)
    rank0 = is_rank0()
    try:
        lm, ids, batches = open_model_and_data(args, cfg.batch, trainable=True)
        eval_batches = None
        if args.eval_every:
            n_eval = args.eval_batches or max(1, len(batches) // 10)
            if n_eval >= len(batches):
                raise ValueError(
                    f"--eval-batches {n_eval}: the data has only {len(batches)} batches of {cfg.batch}; "
                    "give more --tokens or fewer --eval-batches"
                )
            batches, eval_batches = batches[:-n_eval], batches[-n_eval:]
        # per checkpoint: the adapters and two AdamW moments; --keep of them plus the final file
        adapter_bytes = sum(p.numel() * p.element_size() for p in adapter_parameters(lm.model).values())
        check_free_space(args.out, adapter_bytes * (3 * (args.keep + 1) + 1))
        run_info = {
            "checkpoint": str(args.checkpoint.resolve()),
            "model": lm.source.to_dict(),
            "data": fingerprint(ids),
            "tokens": int(ids.numel()),
            "seq_len": lm.seq_len,
        }
        mask = mask_fingerprint(batches + (eval_batches or []))  # prompt / response data: its loss mask
        if mask is not None:
            run_info["loss_mask"] = mask
        if (tp, ep, dp) != (1, 1, 1):
            run_info["parallel"] = {"tp": tp, "ep": ep, "dp": dp}
        if args.eval_every:
            run_info["eval"] = {"every": args.eval_every, "batches": len(eval_batches)}
        if resume_from is not None and rank0:
            print(f"resuming from {resume_from}")
        result = finetune(
            lm,
            batches,
            cfg,
            checkpoint_dir=ckpt_root,
            save_every=args.save_every,
            keep=args.keep,
            resume_from=resume_from,
            stop_at=args.stop_at,
            run_info=run_info,
            progress=args.progress,
            eval_batches=eval_batches,
            eval_every=args.eval_every,
        )
        if result.stopped:
            if rank0:
                print(f"stopped after step {result.step} of {cfg.steps}; continue with --resume")
            return 0
        adapters = save_adapters(lm.model, args.out / "adapters.safetensors")
        n_params = _file_parameters(adapters) if rank0 else 0  # the whole model's (TP / EP gathered)
        record = {
            "losses": result.losses,
            "lrs": result.lrs,
            "grad_norms": result.grad_norms,
            "config": cfg.to_dict(),
            "run": run_info,
        }
        if args.eval_every:
            record["evals"] = result.evals
        losses = args.out / "losses.json"
        if rank0:
            write_json(losses, record)
    finally:
        destroy_parallel()
    if not rank0:
        return 0
    first, last = result.losses[0], result.losses[-1]
    seconds = time.perf_counter() - t0
    summary = {"adapters": str(adapters), "losses": str(losses), "parameters": n_params, "steps": cfg.steps}
    summary.update(tokens=int(ids.numel()), seconds=seconds, first_loss=first, last_loss=last)
    line = (
        f"fine-tuned {n_params} adapter parameters for {cfg.steps} steps on {ids.numel()} tokens in "
        f"{seconds:.1f} s: loss {first:.4f} → {last:.4f}; wrote {adapters} and {losses}"
    )
    return finish(args, line, summary)
