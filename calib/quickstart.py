"""The quickstart: the whole quantize-then-finetune workflow on a pretrained Megatron GPT-MoE, as a table.

    svdq quickstart [--steps 100] [--rank 32] [--device cpu|cuda] [--json FILE]

Model: :data:`calib.pretrain.QUICKSTART_MODEL` (4 layers, hidden 256, 8 SwiGLU experts, top-2) with the
weights shipped in ``calib/assets/quickstart-moe`` (made by ``python -m calib.pretrain``), or, with
``--model-config FILE`` (TinyMoEConfig fields), a model of another shape trained on the fly for
``--pretrain-steps``. Data: :func:`calib.corpus.stdlib_split` — standard-library code (base domain) and
the pydoc reference prose (shifted domain), byte-level. Rows:

1. unquantized perplexity on the base held-out set;
2. RTN W4A4 NVFP4 (weights and activations round-to-nearest, no smoothing, no branch);
3. SVDQuant W4A4 NVFP4 with :func:`calib.calibrate.calibrate` (target: ≤ 1.05× row 1);
4. the SVDQuant adapters fine-tuned ``steps`` updates on the shifted domain, perplexity on its held-out set;
5. the QLoRA-style baseline: LoRA of the same structure and rank (kaiming ``lora_down``, zero ``lora_up``)
   on the RTN base, same steps, data, schedule and optimizer (target: row 4 ≤ 0.95× row 5);
6. export (:func:`lora.io.svdq_export.export_quantized`), reload into a freshly built model, logits identical.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

SVDQ_TARGET = 1.05  # SVDQuant perplexity / unquantized perplexity, base held-out
FINETUNE_TARGET = 0.95  # fine-tuned SVDQuant / fine-tuned QLoRA-style baseline, shifted held-out


@dataclass(frozen=True)
class QuickstartConfig:
    """Sizes of the quickstart run. ``model_config``: TinyMoEConfig fields to train a model on the fly
    (``None``: the shipped pretrained weights)."""

    steps: int = 100
    rank: int = 32
    fmt: str = "nvfp4"
    lr: float = 1e-3
    batch: int = 8
    calib_batches: int = 8
    eval_tokens: int = 16384
    seed: int = 0
    device: str = "cpu"
    model_config: dict | None = None
    pretrain_steps: int = 300
    export_dir: str | None = None
    progress: bool = True


@dataclass
class Row:
    step: str
    result: str
    seconds: float
    figures: dict = field(default_factory=dict)


def _new_model(cfg, weights: dict | None, seed: int):
    from calib.tiny_moe import build_tiny_gpt_moe

    model = build_tiny_gpt_moe(cfg, seed=seed)
    if weights is not None:
        missing, unexpected = model.load_state_dict(weights, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise RuntimeError(
                f"weights do not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]}"
            )
    return model


def _lm(model, cfg):
    from calib.models import LoadedModel, ModelSource

    source = ModelSource(spec="tiny", config=cfg.to_dict())
    return LoadedModel(
        model=model, vocab_size=cfg.vocab_size, seq_len=cfg.seq_len, megatron=True, source=source
    )


def run(qc: QuickstartConfig) -> dict:
    """Run the quickstart; returns ``{"rows": [...], "figures": {...}, "targets": {...}}``."""
    from calib.calibrate import CalibConfig, calibrate
    from calib.cli.eval import perplexity
    from calib.corpus import eval_windows, random_windows, stdlib_split
    from calib.pretrain import ASSET_DIR, load_pretrained, read_pretrained_config, train
    from calib.rtn import rtn_baseline
    from calib.tiny_moe import TinyMoEConfig
    from calib.train import TrainConfig, finetune
    from lora.io.svdq_export import export_quantized, load_quantized
    from svdq import SVDQConfig

    rows: list[Row] = []
    t0 = time.perf_counter()
    split = stdlib_split()
    device = torch.device(qc.device)
    if qc.model_config is None:
        cfg = read_pretrained_config()
        model = _new_model(cfg, None, qc.seed)
        load_pretrained(model)
        origin = f"pretrained weights {ASSET_DIR.name}"
    else:
        cfg = TinyMoEConfig.from_dict(qc.model_config)
        model, _ = train(cfg, qc.pretrain_steps, 32, 3e-3, qc.seed)
        origin = f"trained now, {qc.pretrain_steps} steps"
    weights = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    n_params = sum(p.numel() for p in model.parameters())
    base_eval = eval_windows(split.base_heldout, cfg.seq_len, qc.batch, qc.eval_tokens, device)
    shift_eval = eval_windows(split.shift_heldout, cfg.seq_len, qc.batch, qc.eval_tokens, device)
    gen = torch.Generator().manual_seed(qc.seed)
    calib_data = [
        random_windows(split.base_train, qc.batch, cfg.seq_len, gen, device) for _ in range(qc.calib_batches)
    ]
    ft_data = [
        random_windows(split.shift_train, qc.batch, cfg.seq_len, gen, device)
        for _ in range(max(qc.steps, 16))
    ]

    def ppl(m, batches):
        return perplexity(_lm(m, cfg), batches, progress=False)["perplexity"]

    fp_base, fp_shift = ppl(model, base_eval), ppl(model, shift_eval)
    rows.append(
        Row(
            f"unquantized GPT-MoE ({n_params / 1e6:.1f} M parameters, {origin})",
            f"base ppl {fp_base:.3f} · shifted ppl {fp_shift:.3f}",
            time.perf_counter() - t0,
            {"base_ppl": fp_base, "shift_ppl": fp_shift},
        )
    )

    # SVDQuant (ours) on the calibrated copy; the RTN baseline copies its adapter structure
    t = time.perf_counter()
    svdq_cfg = SVDQConfig(rank=qc.rank, weight_format=qc.fmt, act_format=qc.fmt, seed=qc.seed)
    report = calibrate(
        model,
        lambda m: [m(b["tokens"], b["position_ids"], None) for b in calib_data],
        CalibConfig(svdq=svdq_cfg, progress=qc.progress),
    )
    calib_seconds = time.perf_counter() - t

    t = time.perf_counter()
    rtn = _new_model(cfg, weights, qc.seed)
    rtn_baseline(rtn, model, qc.fmt, qc.fmt, seed=qc.seed)
    rtn_base, rtn_shift = ppl(rtn, base_eval), ppl(rtn, shift_eval)
    rows.append(
        Row(
            f"RTN W4A4 {qc.fmt.upper()}",
            f"base ppl {rtn_base:.3f} ({rtn_base / fp_base:.3f}× unquantized)",
            time.perf_counter() - t,
            {"base_ppl": rtn_base, "shift_ppl": rtn_shift},
        )
    )
    t = time.perf_counter()
    sq_base, sq_shift = ppl(model, base_eval), ppl(model, shift_eval)
    rows.append(
        Row(
            f"SVDQuant W4A4 {qc.fmt.upper()}, rank {qc.rank} (calib.calibrate, {len(report.rows)} layers)",
            f"base ppl {sq_base:.3f} ({sq_base / fp_base:.3f}× unquantized; target ≤ {SVDQ_TARGET})",
            calib_seconds + time.perf_counter() - t,
            {"base_ppl": sq_base, "shift_ppl": sq_shift, "calibrate_seconds": calib_seconds},
        )
    )

    train_cfg = TrainConfig(
        steps=qc.steps, lr=qc.lr, warmup=max(1, qc.steps // 10), batch=qc.batch, seed=qc.seed
    )
    with tempfile.TemporaryDirectory() as ckpt:
        t = time.perf_counter()
        ours = finetune(
            _lm(model, cfg),
            ft_data,
            train_cfg,
            checkpoint_dir=Path(ckpt) / "ours",
            save_every=0,
            progress=qc.progress,
        )
        ours_shift = ppl(model, shift_eval)
        rows.append(
            Row(
                f"fine-tune SVDQuant adapters, {qc.steps} steps on the shifted domain",
                f"shifted ppl {sq_shift:.3f} → {ours_shift:.3f}",
                time.perf_counter() - t,
                {"shift_ppl_before": sq_shift, "shift_ppl": ours_shift, "losses": ours.losses},
            )
        )
        t = time.perf_counter()
        base_line = finetune(
            _lm(rtn, cfg),
            ft_data,
            train_cfg,
            checkpoint_dir=Path(ckpt) / "qlora",
            save_every=0,
            progress=qc.progress,
        )
        qlora_shift = ppl(rtn, shift_eval)
        rows.append(
            Row(
                "QLoRA-style baseline: LoRA on the RTN base, same steps / data / optimizer",
                f"shifted ppl {rtn_shift:.3f} → {qlora_shift:.3f} (ours {ours_shift / qlora_shift:.3f}×; "
                f"target ≤ {FINETUNE_TARGET})",
                time.perf_counter() - t,
                {"shift_ppl_before": rtn_shift, "shift_ppl": qlora_shift, "losses": base_line.losses},
            )
        )

    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(qc.export_dir) if qc.export_dir else Path(tmp) / "quickstart-svdq"
        export_quantized(
            model, out, metadata={"quickstart": dataclasses.asdict(qc)}, overwrite=True, progress=qc.progress
        )
        size = sum(f.stat().st_size for f in out.iterdir())
        fresh = _new_model(cfg, None, qc.seed + 1)
        load_quantized(fresh, out, progress=qc.progress)
        probe = shift_eval[0]
        model.eval(), fresh.eval()
        with torch.no_grad():
            before = model(probe["tokens"], probe["position_ids"], None)
            after = fresh(probe["tokens"], probe["position_ids"], None)
        identical = bool(torch.equal(before, after))
    rows.append(
        Row(
            "export (svdq format) → reload into a fresh model",
            f"{size / 1e6:.1f} MB; logits identical: {identical}",
            time.perf_counter() - t,
            {"bytes": size, "logits_identical": identical},
        )
    )
    figures = {
        "svdq_over_unquantized": sq_base / fp_base,
        "rtn_over_unquantized": rtn_base / fp_base,
        "finetuned_over_qlora": ours_shift / qlora_shift,
        "logits_identical": identical,
        "total_seconds": time.perf_counter() - t0,
    }
    targets = {
        "svdq_over_unquantized": {
            "target": SVDQ_TARGET,
            "met": figures["svdq_over_unquantized"] <= SVDQ_TARGET,
        },
        "finetuned_over_qlora": {
            "target": FINETUNE_TARGET,
            "met": figures["finetuned_over_qlora"] <= FINETUNE_TARGET,
        },
    }
    return {
        "config": dataclasses.asdict(qc),
        "model": cfg.to_dict(),
        "rows": [dataclasses.asdict(r) for r in rows],
        "report": report.rows,
        "figures": figures,
        "targets": targets,
    }


def print_table(result: dict, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="svdq quickstart: quantize → calibrate → fine-tune → export")
    table.add_column("step")
    table.add_column("result")
    table.add_column("seconds", justify="right")
    for r in result["rows"]:
        table.add_row(r["step"], r["result"], f"{r['seconds']:.1f}")
    console.print(table)
    f = result["figures"]
    for key, t in result["targets"].items():
        mark = "[green]met[/green]" if t["met"] else "[yellow]missed[/yellow]"
        console.print(f"{key}: {f[key]:.3f} (target ≤ {t['target']}) {mark}")
    console.print(f"total {f['total_seconds']:.0f} s")


def run_quickstart(
    steps: int = 100,
    seed: int = 0,
    device: str | None = None,
    rank: int = 32,
    json_path: str | None = None,
    **overrides,
) -> int:
    """The ``svdq quickstart`` command: run, print the table, optionally write JSON; exit code 0 when
    every stage ran and the reloaded logits are identical (missed accuracy targets are reported, not
    failures)."""
    from lora.framework.parallel import destroy_parallel, init_parallel

    if device == "cpu" and torch.cuda.is_available():
        raise ValueError("--device cpu on a CUDA machine: hide the GPU with CUDA_VISIBLE_DEVICES=''")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    qc = QuickstartConfig(steps=steps, seed=seed, device=device, rank=rank, **overrides)
    init_parallel(seed=seed)
    try:
        result = run(qc)
    finally:
        destroy_parallel()
    print_table(result)
    if json_path:
        from calib.train import write_json

        write_json(json_path, result)
    ok = result["figures"]["logits_identical"] and all(math.isfinite(r["seconds"]) for r in result["rows"])
    return 0 if ok else 1


def config_from_file(path: str) -> dict:
    """TinyMoEConfig fields of a JSON file, validated (:func:`calib.models.read_config_file`)."""
    from calib.models import read_config_file

    return read_config_file(path)
