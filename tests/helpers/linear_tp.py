"""One adapted linear at tensor parallel size 2, every way Megatron runs it: the cases, the problem, the
per-rank setup and the check of both ranks' results against a float64 computation of the whole layer.

A case is ``(name, mode, sequence_parallel, flag, is_expert)`` with ``flag`` = ``gather_output`` for a
column linear and ``input_is_parallel`` for a row linear. Tensors are on the process's device (CUDA
under NCCL, else CPU).
"""

from __future__ import annotations

import torch

from lora.framework.tp import take_shard

CASES = [
    ("column", "column", False, False, False),
    ("column-sp", "column", True, False, False),
    ("column-gather", "column", False, True, False),
    ("column-expert", "column", False, False, True),
    ("row", "row", False, True, False),
    ("row-sp", "row", True, True, False),
    ("row-scatter", "row", False, False, False),
    ("row-expert", "row", False, True, True),
]
IN, OUT, R, SEQ, MB = 16, 24, 4, 8, 2


def problem() -> dict[str, torch.Tensor]:
    """The whole layer: ``W (OUT × IN)``, ``A (R × IN)``, ``B (OUT × R)``, input ``x (SEQ × MB × IN)``
    and output gradient ``gy (SEQ × MB × OUT)``."""
    g = torch.Generator().manual_seed(0)
    return {
        "W": torch.randn(OUT, IN, generator=g),
        "A": torch.randn(R, IN, generator=g),
        "B": torch.randn(OUT, R, generator=g),
        "x": torch.randn(SEQ, MB, IN, generator=g),
        "gy": torch.randn(SEQ, MB, OUT, generator=g),
    }


def device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def build(case, rank: int, world: int, p: dict):
    """``(linear holding this rank's shard of W (frozen), this rank's input, its output gradient)``."""
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    name, mode, sp, flag, expert = case
    cfg = ModelParallelConfig(
        tensor_model_parallel_size=world, sequence_parallel=sp, use_cpu_initialization=True
    )
    kw = {"config": cfg, "init_method": torch.nn.init.zeros_, "bias": False, "is_expert": expert}
    if mode == "column":
        lin = ColumnParallelLinear(IN, OUT, gather_output=flag, skip_bias_add=True, **kw)
        shard = p["W"].chunk(world, 0)[rank]
        x = p["x"].chunk(world, 0)[rank] if sp else p["x"]
        gy = p["gy"] if flag else p["gy"].chunk(world, 2)[rank]
    else:
        lin = RowParallelLinear(IN, OUT, input_is_parallel=flag, skip_bias_add=True, **kw)
        shard = p["W"].chunk(world, 1)[rank]
        x = p["x"].chunk(world, 2)[rank] if flag else p["x"]
        gy = p["gy"].chunk(world, 0)[rank] if sp else p["gy"]
    lin = lin.to(device())
    with torch.no_grad():
        lin.weight.copy_(shard)
    lin.weight.requires_grad_(False)
    return lin, x.to(device()).clone().requires_grad_(), gy.to(device())


def check(case, a: dict, b: dict, y: torch.Tensor, dx: torch.Tensor, dA: torch.Tensor, dB: torch.Tensor):
    """Ranks 0 and 1 (``a``, ``b``: ``y``, ``dx``, ``dA``, ``dB`` each) against the whole layer's float64
    output ``y``, input gradient ``dx`` and factor gradients ``dA``, ``dB`` (rtol = atol = 1e-5)."""
    name, mode, sp, flag, expert = case
    close = {"rtol": 1e-5, "atol": 1e-5}
    if mode == "column" and not flag:
        got = torch.cat([a["y"], b["y"]], dim=2)
    elif mode == "row" and expert:
        got = a["y"] + b["y"]  # a partial sum, reduced later by the token dispatcher
    elif mode == "row" and sp:
        got = torch.cat([a["y"], b["y"]], dim=0)
    else:
        got = a["y"]
        torch.testing.assert_close(b["y"], a["y"])
    torch.testing.assert_close(got.double(), y, **close, msg=name)
    if mode == "column" and expert:
        got = a["dx"] + b["dx"]  # partial, summed by the dispatcher
    elif mode == "column" and sp:
        got = torch.cat([a["dx"], b["dx"]], dim=0)
    elif mode == "row" and flag:
        got = torch.cat([a["dx"], b["dx"]], dim=2)
    else:
        got = a["dx"]
        torch.testing.assert_close(b["dx"], a["dx"])
    torch.testing.assert_close(got.double(), dx, **close, msg=name)
    down_dim, up_dim = (None, 0) if mode == "column" else (1, None)  # factors shard like the weight
    for key, full, dim in (("dA", dA, down_dim), ("dB", dB, up_dim)):
        for rank, r in enumerate((a, b)):
            want = take_shard(full, dim, rank, 2)
            torch.testing.assert_close(r[key].double(), want, **close, msg=f"{name} {key} rank {rank}")
