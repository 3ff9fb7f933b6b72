"""Pretrained weights for a small Hugging Face Qwen3-MoE: the reproducible training script.

    python -m calib.pretrain_hf --out calib/assets/qwen3-moe-tiny --steps 3000 --device cuda

trains :data:`QWEN3_MOE_TINY` (a 4-layer ``transformers`` ``Qwen3MoeForCausalLM``, hidden 256, 8 SwiGLU
experts of width 128, top-2, per-head q/k norms, byte vocabulary) from a fixed seed on the base domain of
:func:`calib.corpus.stdlib_split` with AdamW, linear warmup and cosine decay (the schedule of
:mod:`calib.pretrain`, which trains the quickstart's Megatron model), and writes a standard HF checkpoint
directory — ``config.json`` and ``model.safetensors`` (bfloat16), loadable with
``AutoModelForCausalLM.from_pretrained(DIR)`` and with ``svdq ... --model hf:DIR`` — plus
``training.json`` (command, device, versions, loss log, held-out perplexity), atomically. The committed
asset was made by this script on a GPU; its ``training.json`` records where.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ASSET_DIR = Path(__file__).parent / "assets" / "qwen3-moe-tiny"
QWEN3_MOE_TINY = dict(
    vocab_size=256,
    hidden_size=256,
    intermediate_size=512,  # dense MLP width (unused: every layer is sparse)
    moe_intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=32,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    max_position_embeddings=512,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    router_aux_loss_coef=0.01,
)


def build(seed: int = 0):
    """A freshly initialized ``Qwen3MoeForCausalLM`` of :data:`QWEN3_MOE_TINY` (fp32, eager attention)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(**QWEN3_MOE_TINY, attn_implementation="eager")
    return Qwen3MoeForCausalLM(config)


def lm_loss(model, batch: dict, aux: bool = False) -> torch.Tensor:
    """Mean next-token cross entropy of an LM batch (:func:`calib.data.lm_batch`); plus the router's
    load-balancing loss (scaled by the config's coefficient) with ``aux``."""
    out = model(
        input_ids=batch["tokens"],
        position_ids=batch["position_ids"],
        output_router_logits=aux,
        use_cache=False,
    )
    logits = out.logits  # (b, s, V)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten())
    if aux and getattr(out, "aux_loss", None) is not None:
        loss = loss + model.config.router_aux_loss_coef * out.aux_loss
    return loss


@torch.no_grad()
def heldout_loss(model, batches: list[dict]) -> float:
    model.eval()
    total, n = 0.0, 0
    for b in batches:
        total += lm_loss(model, b).item() * b["labels"].numel()
        n += b["labels"].numel()
    return total / n


def train(steps: int, batch: int, lr: float, seed: int, seq_len: int, device: str, log_every: int = 100):
    """Train from scratch on the base-domain training split; returns ``(model, info)``."""
    from tqdm import tqdm

    from calib.corpus import eval_windows, random_windows, stdlib_split
    from calib.train import TrainConfig, lr_at

    split = stdlib_split()
    model = build(seed).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    schedule = TrainConfig(steps=steps, lr=lr, warmup=max(1, steps // 20), min_lr_ratio=0.1)
    log, t0 = [], time.perf_counter()
    bar = tqdm(range(steps), desc="pretrain", unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, schedule)
        loss = lm_loss(model, random_windows(split.base_train, batch, seq_len, gen, device), aux=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            log.append([step, round(loss.item(), 4)])
            bar.set_postfix(loss=f"{loss.item():.3f}")
    held = eval_windows(split.base_heldout, seq_len, batch, 64 * seq_len * batch, device)
    loss = heldout_loss(model, held)
    import transformers

    info = {
        "steps": steps,
        "batch": batch,
        "seq_len": seq_len,
        "lr": lr,
        "seed": seed,
        "seconds": round(time.perf_counter() - t0, 1),
        "device": torch.cuda.get_device_name() if str(device).startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "corpus_bytes": split.sizes(),
        "loss_log": log,
        "base_heldout_loss": round(loss, 4),
        "base_heldout_perplexity": round(math.exp(loss), 4),
    }
    return model, info


def save(model, out_dir: Path, info: dict) -> Path:
    """``save_pretrained`` (bfloat16 safetensors) + ``training.json`` into ``out_dir``, atomically."""
    from lora.io.atomic import atomic_output_dir

    with atomic_output_dir(Path(out_dir), overwrite=True) as tmp:
        model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        (tmp / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    return Path(out_dir)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ASSET_DIR)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 training, reproducible across cards
    model, info = train(args.steps, args.batch, args.lr, args.seed, args.seq_len, args.device)
    info["command"] = "python -m calib.pretrain_hf " + " ".join(argv if argv is not None else sys.argv[1:])
    out = save(model, args.out, info)
    print(json.dumps({k: v for k, v in info.items() if k != "loss_log"}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
