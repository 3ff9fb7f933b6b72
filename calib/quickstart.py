"""The quickstart: the whole workflow on the built-in tiny MoE model, as a table of steps."""

from __future__ import annotations

import time

import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from lora.harness import TinyMoEConfig, build_tiny_gpt_moe, destroy_parallel, init_parallel, tiny_moe_batch


def run_quickstart(steps: int = 30, seed: int = 0, device: str | None = None) -> int:
    """Run the quickstart and print its table. Returns a process exit code.

    For now (the full quickstart is a later issue): train the tiny Megatron GPT-MoE on a fixed batch,
    calibrate it with ``calib.calibrate`` (NVFP4 W4A4 SVDQuant, adapters initialized from the branches
    over frozen quantized bases), then fine-tune only the adapters.
    """
    from calib.calibrate import CalibConfig, calibrate
    from svdq import SVDQConfig

    if device == "cpu" and torch.cuda.is_available():
        raise SystemExit("--device cpu on a CUDA machine: hide the GPU with CUDA_VISIBLE_DEVICES=''")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    console = Console()
    rows = []
    init_parallel(seed=seed)
    try:
        cfg = TinyMoEConfig()
        model = build_tiny_gpt_moe(cfg, seed=seed)
        batch = tiny_moe_batch(cfg, batch=8, seed=seed)

        def loss_of(m):
            return m(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).float().mean()

        t0 = time.perf_counter()
        losses = _train(model, loss_of, steps, "train tiny GPT-MoE")
        rows.append(("train tiny GPT-MoE (bf16/fp32)", f"loss {losses[0]:.3f} → {losses[-1]:.3f}", t0))

        t0 = time.perf_counter()
        calib_batches = [tiny_moe_batch(cfg, batch=8, seed=seed + 1 + i) for i in range(3)] + [batch]
        report = calibrate(
            model,
            lambda m: [m(b["tokens"], b["position_ids"], None) for b in calib_batches],
            CalibConfig(svdq=SVDQConfig(rank=8), progress=False),
        )
        with torch.no_grad():
            quant_loss = loss_of(model).item()
        rtn = sum(r["rtn_error"] for r in report.rows) / len(report.rows)
        ours = sum(r["final_error"] for r in report.rows) / len(report.rows)
        result = f"{len(report.rows)} layers, mean output error RTN {rtn:.3f} → ours {ours:.3f}; "
        result += f"loss {quant_loss:.3f}"
        rows.append(("calibrate: SVDQuant NVFP4 W4A4 + adapters", result, t0))

        t0 = time.perf_counter()
        ft = _train(model, loss_of, max(steps // 2, 2), "fine-tune adapters")
        rows.append(("fine-tune adapters only (base frozen)", f"loss {ft[0]:.3f} → {ft[-1]:.3f}", t0))
    finally:
        destroy_parallel()
    table = Table(title="svdq quickstart (train → calibrate → fine-tune; export comes with a later issue)")
    table.add_column("step")
    table.add_column("result")
    table.add_column("seconds", justify="right")
    now = time.perf_counter()
    starts = [r[2] for r in rows] + [now]
    for (name, result, _), t_start, t_end in zip(rows, starts, starts[1:]):
        table.add_row(name, result, f"{t_end - t_start:.1f}")
    console.print(table)
    report.print()
    ok = (
        losses[-1] < losses[0]
        and all(r["final_error"] < r["rtn_error"] for r in report.rows)
        and ft[-1] < ft[0]
    )
    console.print("[green]OK[/green]" if ok else "[red]a step did not improve[/red]")
    return 0 if ok else 1


def _train(model, loss_of, steps: int, desc: str) -> list[float]:
    """AdamW on the parameters that require gradients; returns the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in tqdm(range(steps), desc=desc, unit="step"):
        loss = loss_of(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
