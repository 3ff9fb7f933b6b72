"""The quickstart: the whole workflow on the built-in tiny MoE model, as a table of steps."""

from __future__ import annotations

import time

import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from lora.harness import TinyMoEConfig, build_tiny_gpt_moe, destroy_parallel, init_parallel, tiny_moe_batch


def run_quickstart(steps: int = 30, seed: int = 0, device: str | None = None) -> int:
    """Run the quickstart and print its table. Returns a process exit code."""
    if device == "cpu" and torch.cuda.is_available():
        raise SystemExit("--device cpu on a CUDA machine: hide the GPU with CUDA_VISIBLE_DEVICES=''")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    console = Console()
    rows = []
    t0 = time.perf_counter()
    init_parallel(seed=seed)
    try:
        cfg = TinyMoEConfig()
        model = build_tiny_gpt_moe(cfg, seed=seed)
        batch = tiny_moe_batch(cfg, batch=8, seed=seed)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for _ in tqdm(range(steps), desc="train tiny GPT-MoE", unit="step"):
            loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        rows.append(
            ("train tiny GPT-MoE", f"loss {losses[0]:.3f} → {losses[-1]:.3f}", time.perf_counter() - t0)
        )
    finally:
        destroy_parallel()
    t1 = time.perf_counter()
    rtn, ours = _svdquant_mlp_demo(seed)
    result = f"output error RTN {rtn:.3f} → SVDQuant {ours:.3f}"
    rows.append(("SVDQuant W4A4 NVFP4 of a torch MLP", result, time.perf_counter() - t1))
    table = Table(title="svdq quickstart (smoke run: later issues add MoE calibrate → finetune → export)")
    table.add_column("step")
    table.add_column("result")
    table.add_column("seconds", justify="right")
    for name, result, seconds in rows:
        table.add_row(name, result, f"{seconds:.1f}")
    console.print(table)
    ok = losses[-1] < losses[0] and ours < rtn
    console.print("[green]OK[/green]" if ok else "[red]a step did not improve[/red]")
    return 0 if ok else 1


def _svdquant_mlp_demo(seed: int) -> tuple[float, float]:
    """``svdq.quantize`` on a small torch MLP whose inputs have outlier channels.

    Returns the relative output errors of round-to-nearest W4A4 and of SVDQuant (rank 16).
    """
    import svdq
    from svdq.formats import fake_quant

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, 256, generator=g)
    x[:, :4] *= 20  # outlier channels
    mlp = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256))
    y_ref = mlp(x).detach()
    fmt = svdq.SVDQConfig().weight_quant

    def rtn_layer(lin, h):
        return torch.nn.functional.linear(fake_quant(h, fmt), fake_quant(lin.weight, fmt), lin.bias)

    y_rtn = rtn_layer(mlp[2], mlp[1](rtn_layer(mlp[0], x)))
    svdq.quantize(mlp, svdq.SVDQConfig(rank=16), lambda m: m(x[:1024]), progress=False)
    with torch.no_grad():
        y = mlp(x)
    rel = lambda a: ((a - y_ref).norm() / y_ref.norm()).item()  # noqa: E731
    return rel(y_rtn), rel(y)
