"""Benchmark: expert-parallel dispatch of fc1's input, 4-bit (svdq.experts.ep_dispatch.dispatch_quantized:
NVFP4 codes + E4M3 block scales + u = x·Aᵀ + each row's global scale) against 16-bit (dispatch_16bit: bf16
rows + each row's range, quantized after the all-to-all). svdq/DESIGN.md §22.

Per rank: ``--tokens`` bf16 tokens, top-``--topk`` routing over ``--experts`` experts spread evenly over the
ranks (expert e on rank e // (E / W)), one dispatched row per (token, expert) pair ordered by destination
rank (Megatron's permutation); per-expert static ranges (max|x/s| over all ranks' tokens), shared
smoothing and lora_down of rank ``--rank``. Measured per shape: bytes handed to the all-to-all per rank and
direction (forward: activations; backward: gradients, 16-bit on both paths), the ratio, and the median
over ``--repeats`` of the step (dispatch forward + backward of a loss on the received rows) and of the
forward alone, each the maximum over ranks of that rank's median (ranks synchronized by a barrier).

    python bench/bench_dispatch.py                      # 2 gloo CPU processes (spawned here)
    torchrun --nproc-per-node 2 bench/bench_dispatch.py --backend nccl   # GPUs (not run yet)

Writes bench/results/dispatch_<backend>_<cpu|gpu>.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_result  # noqa: E402
from svdq.experts.ep_dispatch import (  # noqa: E402
    DispatchTraffic,
    bytes_per_row,
    dispatch_16bit,
    dispatch_quantized,
)

SHAPES = {"mixtral-half": 2048, "h4096": 4096}


def _setup(rank: int, world: int, hidden: int, args, device):
    """This rank's dispatched rows, send counts, smoothing, lora_down and per-row static ranges."""
    g = torch.Generator().manual_seed(1000 + rank)
    T, k, E = args.tokens, args.topk, args.experts
    x = torch.randn(T, hidden, generator=g)
    x[:, :8] *= 30.0  # outlier channels
    logits = torch.randn(T, E, generator=g) + torch.linspace(0, 1, E)  # unequal expert popularity
    experts = logits.topk(k, dim=-1).indices.reshape(-1)  # (T·k,)
    order = torch.argsort(experts, stable=True)  # rows by expert, hence by destination rank
    rows = x.repeat_interleave(k, dim=0)[order]  # (T·k, hidden)
    experts = experts[order]
    per_rank = E // world
    send = torch.bincount(experts // per_rank, minlength=world).tolist()
    gs = torch.Generator().manual_seed(0)  # the layer's shared tensors: the same on every rank
    smooth = torch.rand(hidden, generator=gs) + 0.5
    A = (torch.randn(args.rank, hidden, generator=gs) / hidden**0.5).to(torch.bfloat16)
    rows = rows.to(device=device, dtype=torch.bfloat16)
    smooth, A, experts = smooth.to(device), A.to(device), experts.to(device)
    xs = (rows.float() / smooth).abs().amax(-1)  # (T·k,)
    amax = torch.zeros(E, device=device).scatter_reduce(0, experts, xs, reduce="amax")
    dist.all_reduce(amax, op=dist.ReduceOp.MAX)  # calibrated per-expert range, identical on every rank
    return rows, send, smooth, A, amax[experts]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        dist.barrier()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    t = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _path(fn, rows, send, kw, device, repeats: int) -> dict:
    """Bytes of one step (maximum over ranks) and the step / forward medians of one dispatch path."""
    traffic = DispatchTraffic()
    x = rows.clone().requires_grad_(True)
    xq, u, recv = fn(x, send, traffic=traffic, **kw)
    ((xq.float() ** 2).sum() + (u.float() ** 2).sum()).backward()
    tb = torch.tensor(
        [traffic.forward, traffic.forward_remote, traffic.backward, traffic.backward_remote],
        dtype=torch.float64,
        device=device,
    )
    dist.all_reduce(tb, op=dist.ReduceOp.MAX)

    def step():
        x = rows.detach().requires_grad_(True)
        xq, u, _ = fn(x, send, recv_counts=recv, **kw)
        ((xq.float() ** 2).sum() + (u.float() ** 2).sum()).backward()

    def forward():
        with torch.no_grad():
            fn(rows, send, recv_counts=recv, **kw)

    return {
        "bytes_forward_max_rank": int(tb[0]),
        "bytes_forward_remote_max_rank": int(tb[1]),
        "bytes_backward_max_rank": int(tb[2]),
        "bytes_backward_remote_max_rank": int(tb[3]),
        "step_seconds_median": _timed(step, device, repeats),
        "forward_seconds_median": _timed(forward, device, repeats),
    }


def _measure(rank: int, world: int, args, device) -> dict:
    out = {}
    for shape in args.shapes:
        hidden = SHAPES[shape]
        rows, send, smooth, A, ga = _setup(rank, world, hidden, args, device)
        n = torch.tensor([rows.shape[0]], dtype=torch.float64, device=device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        row = {"hidden": hidden, "rows_sent_max_rank": int(n), "send_counts_rank0": send}
        kw = dict(act_format="nvfp4", smooth=smooth, lora_down=A, global_amax=ga)
        for path, fn in (("4bit", dispatch_quantized), ("16bit", dispatch_16bit)):
            row[path] = _path(fn, rows, send, kw, device, args.repeats)
        q, h = row["4bit"], row["16bit"]
        row["forward_bytes_ratio"] = q["bytes_forward_max_rank"] / h["bytes_forward_max_rank"]
        row["backward_bytes_ratio"] = q["bytes_backward_max_rank"] / h["bytes_backward_max_rank"]
        row["step_time_ratio"] = q["step_seconds_median"] / h["step_seconds_median"]
        row["forward_time_ratio"] = q["forward_seconds_median"] / h["forward_seconds_median"]
        row["bytes_per_row"] = bytes_per_row("nvfp4", hidden, args.rank, torch.bfloat16, per_row_range=True)
        out[shape] = row
    return out


def _run(rank: int, world: int, args) -> dict:
    if args.backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    dist.init_process_group(args.backend, rank=rank, world_size=world, timeout=timedelta(seconds=600))
    try:
        results = _measure(rank, world, args, device)
        if rank == 0:
            payload = {
                "backend": args.backend,
                "world_size": world,
                "device_kind": device.type,
                "threads_per_rank": torch.get_num_threads(),
                "config": {k: v for k, v in vars(args).items() if k != "out"},
                "shapes": results,
            }
            name = args.out or f"dispatch_{args.backend}_{'gpu' if device.type == 'cuda' else 'cpu'}"
            print(write_result(name, payload))
            for shape, row in results.items():
                print(
                    f"{shape}: forward bytes 4bit/16bit {row['forward_bytes_ratio']:.4f}, "
                    f"step {row['4bit']['step_seconds_median'] * 1e3:.1f} ms vs "
                    f"{row['16bit']['step_seconds_median'] * 1e3:.1f} ms"
                )
        return results
    finally:
        dist.destroy_process_group()


def _child(rank: int, world: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    _run(rank, world, args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    p.add_argument("--world-size", type=int, default=2, help="processes to spawn (without torchrun)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--rank", type=int, default=32, help="LoRA rank of the shared lora_down")
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["mixtral-half", "h4096"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per spawned process")
    p.add_argument("--out", default=None, help="result name (default dispatch_<backend>_<cpu|gpu>)")
    args = p.parse_args()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        _run(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
        return
    if args.backend == "nccl":
        p.error("--backend nccl: launch with torchrun (one process per GPU)")
    if args.experts % args.world_size:
        p.error(f"--experts {args.experts} must be divisible by --world-size {args.world_size}")
    import socket

    import torch.multiprocessing as mp

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # a free port on 127.0.0.1
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_child, args=(args.world_size, port, args), nprocs=args.world_size, join=True)


if __name__ == "__main__":
    main()
