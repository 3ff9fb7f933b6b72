"""Run a function on N spawned processes (a real multi-process torch.distributed world).

Each child gets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` in its environment and
calls ``fn(rank, world_size, *args)``; ``fn`` usually starts with :func:`lora.framework.init_parallel`.
Results travel back through files written with ``torch.save`` and read with
``torch.load(weights_only=True)``: return tensors, numbers, strings, lists, tuples and dicts of them.
A failing child fails the caller with the child's traceback; a hung child is killed after ``timeout``.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

from lora.framework.parallel import free_port


class ChildProcessError_(RuntimeError):
    """A spawned process failed, crashed or timed out; the message carries its traceback."""


def _child(rank: int, world_size: int, port: int, outdir: str, fn, args) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    out = Path(outdir)
    try:
        result = fn(rank, world_size, *args)
        torch.save({"result": result}, out / f"result{rank}.pt.tmp")
        os.replace(out / f"result{rank}.pt.tmp", out / f"result{rank}.pt")
    except BaseException:
        (out / f"error{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


def run_on_processes(fn, world_size: int, *args, timeout: float = 180.0) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes; return results by rank.

    ``fn`` must be importable (a module-level function). Raises :class:`ChildProcessError_` with the
    first child's traceback when any child raises or dies, and kills all children after ``timeout``
    seconds.
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="svdq-spawn-") as outdir:
        procs = [
            ctx.Process(target=_child, args=(r, world_size, port, outdir, fn, args), daemon=False)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        failed = None
        while any(p.is_alive() for p in procs):
            dead_bad = [r for r, p in enumerate(procs) if not p.is_alive() and p.exitcode != 0]
            if dead_bad:
                failed = dead_bad[0]
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        for p in procs:  # a failure elsewhere leaves peers stuck in a collective: stop them all
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
        # Report every failed child, the earliest first: a root cause usually makes its peers fail
        # later with "connection closed by peer".
        errors = sorted(Path(outdir).glob("error*.txt"), key=lambda p: p.stat().st_mtime)
        if errors:
            parts = [f"process {p.stem[5:]} of {world_size} failed:\n{p.read_text()}" for p in errors]
            raise ChildProcessError_("\n".join(parts))
        if failed is not None or any(p.exitcode != 0 for p in procs):
            codes = [p.exitcode for p in procs]
            if time.monotonic() > deadline:
                raise ChildProcessError_(f"timed out after {timeout:.0f}s (exit codes {codes})")
            raise ChildProcessError_(f"a process died without a traceback (exit codes {codes})")
        return [
            torch.load(Path(outdir, f"result{r}.pt"), weights_only=True)["result"] for r in range(world_size)
        ]
