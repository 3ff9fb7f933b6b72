"""Run a function on N CPU processes joined in a gloo process group (test helper).

``run_distributed(fn, world_size, *args, timeout=120)`` spawns ``world_size`` fresh interpreters, each calls
``fn(rank, world_size, *args)`` inside an initialized ``torch.distributed`` gloo group (``dist.group.WORLD``),
and returns the per-rank return values in rank order. ``fn`` must be a module-level function and its return
value must load with ``torch.load(weights_only=True)`` (tensors, numbers, strings, lists, tuples, dicts).
Results travel through ``torch.save`` files in a temporary directory, never through pickle. A child's
exception is re-raised in the parent as ``RuntimeError`` carrying the child's traceback; a child still running
after ``timeout`` seconds is killed and the parent raises ``TimeoutError``.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist


def _worker(rank: int, world_size: int, workdir: str, timeout: float, fn, args) -> None:
    out = Path(workdir)
    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"file://{out / 'store'}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        torch.save(result, out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise SystemExit(1) from None


def run_distributed(fn, world_size: int, *args, timeout: float = 120) -> list:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` gloo processes; return the results by rank."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="svdq_dist_") as workdir:
        procs = [
            ctx.Process(target=_worker, args=(rank, world_size, workdir, timeout, fn, args), daemon=True)
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        timed_out = False
        try:
            while any(p.is_alive() for p in procs):
                if any(p.exitcode not in (None, 0) for p in procs):
                    break
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join(timeout=10)

        out = Path(workdir)
        errors = [
            f"--- rank {rank} ---\n{(out / f'rank{rank}.err').read_text()}"
            for rank in range(world_size)
            if (out / f"rank{rank}.err").exists()
        ]
        if errors:
            raise RuntimeError("distributed worker failed:\n" + "\n".join(errors))
        missing = [rank for rank in range(world_size) if not (out / f"rank{rank}.pt").exists()]
        if missing:
            codes = [p.exitcode for p in procs]
            if timed_out:
                raise TimeoutError(
                    f"ranks {missing} still running after {timeout}s; killed (exit codes {codes})"
                )
            raise RuntimeError(f"ranks {missing} died without a result (exit codes {codes})")
        return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(world_size)]
