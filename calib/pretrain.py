"""Pretrained weights for the quickstart model: the reproducible training script, save and load.

    python -m calib.pretrain --out calib/assets/quickstart-moe --steps 3000 --device cuda

trains :data:`QUICKSTART_MODEL` (a 4-layer Megatron GPT-MoE, hidden 256, 8 SwiGLU experts, top-2) on the
base domain of :func:`calib.corpus.stdlib_split` (byte-level) with AdamW, linear warmup and cosine decay,
from a fixed seed, and writes ``model.safetensors`` (bfloat16) + ``config.json`` (the model config and
the training log) into the output directory, atomically. The committed asset was made by this script on
the lent GPU machine; ``config.json`` records the command, device and losses.

The file stores every parameter under its single-process state-dict name, with experts under their
*global* index, so :func:`load_pretrained` can fill a model built with any expert-parallel size.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

from calib.tiny_moe import TinyMoEConfig

QUICKSTART_MODEL = TinyMoEConfig(
    num_layers=4, hidden=256, heads=8, num_experts=8, ffn_hidden=128, topk=2, vocab_size=256, seq_len=128
)
ASSET_DIR = Path(__file__).parent / "assets" / "quickstart-moe"
FORMAT = "svdq-pretrained"


def _expert_index_map(model: nn.Module) -> dict[str, str]:
    """Local state-dict name → name with the global expert index (identity without expert parallelism)."""
    from megatron.core.transformer.moe.experts import SequentialMLP

    out = {}
    for mod_name, m in model.named_modules():
        if isinstance(m, SequentialMLP):
            first = m.ep_group.rank() * m.num_local_experts if m.ep_group.size() > 1 else 0
            for i in range(m.num_local_experts):
                local = f"{mod_name}.local_experts.{i}."
                for pname, _ in m.local_experts[i].named_parameters():
                    out[local + pname] = f"{mod_name}.local_experts.{first + i}.{pname}"
    return out


def pretrained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters by global name (no ``_extra_state``), detached on the CPU."""
    names = _expert_index_map(model)
    return {names.get(n, n): p.detach().cpu().contiguous() for n, p in model.named_parameters()}


def save_pretrained(model: nn.Module, cfg: TinyMoEConfig, out_dir: Path, info: dict) -> Path:
    """Write ``model.safetensors`` (bfloat16) and ``config.json`` into ``out_dir`` atomically."""
    from safetensors.torch import save_file

    from lora.io.atomic import atomic_output_dir

    out_dir = Path(out_dir)
    with atomic_output_dir(out_dir, overwrite=True) as tmp:
        tensors = {k: v.to(torch.bfloat16) for k, v in pretrained_state(model).items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        (tmp / "config.json").write_text(json.dumps({"model": cfg.to_dict(), **info}, indent=1) + "\n")
    return out_dir


def read_pretrained_config(path: Path = ASSET_DIR) -> TinyMoEConfig:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} does not exist (pretrained weights missing)")
    return TinyMoEConfig.from_dict(json.loads(cfg_file.read_text())["model"])


def load_pretrained(model: nn.Module, path: Path = ASSET_DIR) -> None:
    """Copy the pretrained weights into ``model`` (built from :func:`read_pretrained_config`; any
    expert-parallel size, tensor-parallel size 1). Raises naming the tensor on a missing tensor, an extra
    tensor or a shape mismatch; the model is only changed after every check passed."""
    from safetensors import safe_open

    file = Path(path) / "model.safetensors"
    try:
        with safe_open(str(file), framework="pt") as fh:
            if (fh.metadata() or {}).get("format") != FORMAT:
                raise ValueError(f"{file}: not a pretrained-weights file (metadata 'format' != {FORMAT!r})")
            stored = {k: fh.get_tensor(k) for k in fh.keys()}
    except (OSError, RuntimeError) as exc:  # safetensors raises these on truncated / corrupt files
        raise ValueError(f"{file}: cannot read the weights ({exc})") from exc
    names = _expert_index_map(model)
    params = dict(model.named_parameters())
    wanted = {names.get(n, n): p for n, p in params.items()}
    for key, p in wanted.items():
        if key not in stored:
            raise ValueError(f"{file}: tensor {key} is missing")
        if tuple(stored[key].shape) != tuple(p.shape):
            raise ValueError(
                f"{file}: {key} has shape {tuple(stored[key].shape)}, the model {tuple(p.shape)}"
            )
    if model_is_whole(model):
        extra = sorted(set(stored) - set(wanted))
        if extra:
            raise ValueError(f"{file}: tensors the model does not have: {extra[:5]}")
    with torch.no_grad():
        for key, p in wanted.items():
            p.copy_(stored[key].to(p.dtype))


def model_is_whole(model: nn.Module) -> bool:
    """True when this process holds every expert (no expert parallelism)."""
    from megatron.core.transformer.moe.experts import SequentialMLP

    return all(m.ep_group.size() == 1 for m in model.modules() if isinstance(m, SequentialMLP))


def train(cfg: TinyMoEConfig, steps: int, batch: int, lr: float, seed: int, log_every: int = 100):
    """Train from scratch on the base-domain training split; returns ``(model, info)``."""
    from tqdm import tqdm

    from calib.cli.eval import perplexity
    from calib.corpus import eval_windows, random_windows, stdlib_split
    from calib.models import LoadedModel, ModelSource
    from calib.tiny_moe import build_tiny_gpt_moe
    from calib.train import TrainConfig, lr_at

    split = stdlib_split()
    model = build_tiny_gpt_moe(cfg, seed=seed)
    lm = LoadedModel(model, cfg.vocab_size, cfg.seq_len, True, ModelSource("tiny", cfg.to_dict(), seed))
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    schedule = TrainConfig(steps=steps, lr=lr, warmup=max(1, steps // 20), min_lr_ratio=0.1)
    log, t0 = [], time.perf_counter()
    bar = tqdm(range(steps), desc="pretrain", unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, schedule)
        loss = lm.token_losses(random_windows(split.base_train, batch, cfg.seq_len, gen, device)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            log.append([step, round(loss.item(), 4)])
            bar.set_postfix(loss=f"{loss.item():.3f}")
    held = eval_windows(split.base_heldout, cfg.seq_len, batch, 64 * cfg.seq_len * batch, device)
    heldout_loss = perplexity(lm, held, progress=False)["loss"]  # puts the model in eval mode
    info = {
        "training": {
            "steps": steps,
            "batch": batch,
            "lr": lr,
            "seed": seed,
            "seconds": round(time.perf_counter() - t0, 1),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "corpus_bytes": split.sizes(),
            "loss_log": log,
            "base_heldout_loss": round(heldout_loss, 4),
            "base_heldout_perplexity": round(math.exp(heldout_loss), 4),
        }
    }
    return model, info


def main(argv: list[str] | None = None) -> int:
    from lora.framework.parallel import destroy_parallel, init_parallel

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ASSET_DIR)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 training, reproducible across cards
    init_parallel(seed=args.seed)
    try:
        model, info = train(QUICKSTART_MODEL, args.steps, args.batch, args.lr, args.seed)
    finally:
        destroy_parallel()
    info["command"] = "python -m calib.pretrain " + " ".join(argv if argv is not None else sys.argv[1:])
    out = save_pretrained(model, QUICKSTART_MODEL, args.out, info)
    print(json.dumps(info["training"], indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
