"""``svdq eval``: perplexity of a model on a token stream.

    svdq eval (--checkpoint DIR | --model SRC [--model-config FILE]) [--adapters FILE]
              [--seq-len N] [--backend torch | megatron]   (hf:DIR models)
              [--data builtin | FILE | DIR | ids.npy] [--tokenizer tokenizer.json] [--tokens 65536]
              [--batch 8] [--json FILE]

The stream is cut into ``batch × (seq_len + 1)`` windows (:func:`calib.data.token_batches`); every
position of a window but the last predicts the next id. With per-token cross entropies ``ℓ_t`` (nats)
over the ``N`` predicted tokens::

    loss = (1/N) Σ_t ℓ_t   (summed in float64),      perplexity = exp(loss)

With JSON Lines prompt / response data the sum and ``N`` run over the response tokens only (the batches'
``loss_mask``).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm import tqdm

from calib.cli.common import add_data_args, add_json_arg, add_model_args, nonneg_int, positive_int
from calib.models import LoadedModel


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a (quantized) model on a token stream")
    add_model_args(p, checkpoint=True)
    p.add_argument(
        "--adapters", type=Path, default=None, metavar="FILE", help="adapter file to load (svdq finetune)"
    )
    add_data_args(p, tokens_default=65536)
    p.add_argument("--batch", type=positive_int, default=8, metavar="N", help="sequences per batch")
    p.add_argument("--seed", type=nonneg_int, default=0, help="weight seed of --model tiny")
    add_json_arg(p)
    # --- distributed evaluation (svdq/DESIGN.md §17): data-parallel ranks evaluate disjoint batches
    from calib.cli.parallel import add_parallel_args

    add_parallel_args(p)


@torch.no_grad()
def perplexity(lm: LoadedModel, batches: list[dict], progress: bool = True) -> dict:
    """``{"loss", "perplexity", "tokens", "batches"}`` of ``lm`` on ``batches`` (see the module docstring);
    the model is put in eval mode."""
    lm.model.eval()
    total, count = 0.0, 0
    for b in tqdm(batches, desc="eval", unit="batch", disable=not progress):
        losses = lm.token_losses(b)  # (b, s)
        mask = b.get("loss_mask")  # (b, s) bool or None
        if mask is not None:
            losses = losses[mask]
        total += float(losses.double().sum())
        count += losses.numel()
    if count == 0:
        raise ValueError("the evaluation data holds no loss target (every response is cut off)")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count, "batches": len(batches)}


def run(args) -> int:
    from calib.cli.common import check_json_arg, finish, model_source, open_model_and_data
    from calib.cli.parallel import check_parallel_args, init_from_args, is_rank0
    from calib.train import evaluate
    from lora.framework.parallel import destroy_parallel

    if args.checkpoint is None and args.model is None:
        raise ValueError("pass --checkpoint DIR or --model SRC")
    if args.batch < 1:
        raise ValueError("--batch must be ≥ 1")
    check_json_arg(args)
    backend = model_source(args).backend
    _, _, dp = check_parallel_args(args, backend)
    init_from_args(args, backend)
    rank0 = is_rank0()
    try:
        lm, _, batches = open_model_and_data(args, args.batch)
        if dp == 1:
            result = perplexity(lm, batches, progress=args.progress)
        else:  # batches d, d + dp, … on data-parallel rank d; float64 sums all-reduced (calib.train)
            result = {**evaluate(lm, batches), "batches": len(batches)}
    finally:
        destroy_parallel()
    if not rank0:
        return 0
    what = str(args.checkpoint) if args.checkpoint is not None else lm.source.spec
    if args.adapters is not None:
        what += f" + {args.adapters}"
    record = {
        **result,
        "model": lm.source.to_dict(),
        "checkpoint": None if args.checkpoint is None else str(args.checkpoint),
        "adapters": None if args.adapters is None else str(args.adapters),
        "data": str(args.data),
        "tokenizer": None if args.tokenizer is None else str(args.tokenizer),
    }
    line = (
        f"perplexity {result['perplexity']:.4f} (mean loss {result['loss']:.6f} nats/token over "
        f"{result['tokens']} tokens, {result['batches']} batches) — {what}"
    )
    return finish(args, line, record)
