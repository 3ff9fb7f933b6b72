"""Run a function on N CPU processes joined in a plain gloo group (no Megatron state): a thin layer over
:func:`tests.helpers.spawn.run_on_processes`, which does the spawning, result transport and failure handling.

``run_distributed(fn, world_size, *args, timeout=120)`` calls ``fn(rank, world_size, *args)`` in each child
inside an initialized gloo group (``dist.group.WORLD``), one intra-op thread per child (the 2-core CI
machine runs all ranks at once), and returns the per-rank results in rank order.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from tests.helpers.spawn import run_on_processes


def _in_gloo_group(rank: int, world_size: int, timeout: float, fn, *args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout))
    return fn(rank, world_size, *args)  # run_on_processes destroys the group afterwards


def run_distributed(fn, world_size: int, *args, timeout: float = 120) -> list:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` gloo processes; return the results by rank."""
    return run_on_processes(_in_gloo_group, world_size, timeout, fn, *args, timeout=timeout)
