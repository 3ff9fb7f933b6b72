"""torch.distributed + Megatron parallel state for 1..N processes (gloo on CPU, NCCL on GPU).

Process grid (svdq/DESIGN.md §17): ``world = tp · ep · dp``. Megatron's rank order ``tp-cp-ep-dp-pp`` puts
tensor-parallel ranks fastest, then expert-parallel, then data-parallel; the data-parallel group used for
training and calibration is Megatron's *expert*-data-parallel group (ranks with the same TP and EP
coordinates: :func:`data_parallel_group`), each of whose members reads its own shard of the data. The
expert-parallel ranks of one shard see the same batches (the convention of :mod:`calib.calibrate`).
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from lora.framework import compat
from lora.framework.cpu_patches import apply_cpu_patches


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parallel_sizes(
    tensor_parallel: int = 1,
    expert_parallel: int = 1,
    data_parallel: int | None = None,
    world_size: int | None = None,
    *,
    flags: tuple[str, str, str] = ("tensor_parallel", "expert_parallel", "data_parallel"),
) -> tuple[int, int, int]:
    """``(tp, ep, dp)`` with ``tp · ep · dp == world_size`` (default: ``WORLD_SIZE`` of the environment, else
    1); ``data_parallel=None``: ``world_size / (tp · ep)``. One-line ``ValueError`` naming ``flags`` and the
    world size otherwise (check before any work)."""
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", 1))
    tp, ep = int(tensor_parallel), int(expert_parallel)
    ftp, fep, fdp = flags
    for flag, v in ((ftp, tp), (fep, ep), (fdp, data_parallel)):
        if v is not None and int(v) < 1:
            raise ValueError(f"{flag} must be ≥ 1, got {v}")
    if data_parallel is None:
        if world_size % (tp * ep):
            raise ValueError(
                f"{ftp}={tp} × {fep}={ep} does not divide WORLD_SIZE={world_size} "
                f"(the data-parallel size {fdp} = WORLD_SIZE / ({ftp} × {fep}) must be an integer)"
            )
        return tp, ep, world_size // (tp * ep)
    dp = int(data_parallel)
    if tp * ep * dp != world_size:
        raise ValueError(
            f"{ftp}={tp} × {fep}={ep} × {fdp}={dp} = {tp * ep * dp} must equal WORLD_SIZE={world_size} "
            f"(the number of processes torchrun started)"
        )
    return tp, ep, dp


def data_parallel_group():
    """The data-parallel process group (Megatron's expert-data-parallel group: the ranks with this rank's
    tensor- and expert-parallel coordinates), or ``None`` in a world of one process / without
    Megatron's state."""
    from megatron.core import parallel_state

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_expert_data_parallel_group()


def data_parallel_rank_size() -> tuple[int, int]:
    """``(rank, size)`` of this process in :func:`data_parallel_group` (``(0, 1)`` without one)."""
    group = data_parallel_group()
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def init_parallel(
    tensor_parallel: int = 1,
    expert_parallel: int = 1,
    *,
    data_parallel: int | None = None,
    proc_rank: int | None = None,
    world_size: int | None = None,
    backend: str | None = None,
    seed: int = 1234,
    timeout_s: float = 300.0,
) -> None:
    """Initialize torch.distributed and Megatron's model-parallel state in this process.

    The process rank (``proc_rank``) and world size come from the arguments, else from the
    ``RANK``/``WORLD_SIZE`` environment (torchrun), else a single-process world on a free local port. The
    backend defaults to NCCL when CUDA is available and gloo otherwise; on CPU the patches of
    :mod:`lora.framework.cpu_patches` are applied first. Also seeds torch and Megatron's RNG tracker
    (``seed``), so model init is reproducible. ``data_parallel`` given: ``ValueError`` unless
    ``tensor_parallel · expert_parallel · data_parallel`` equals the world size (:func:`parallel_sizes`).
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    on_cpu = apply_cpu_patches()
    compat.fix_moe_utils_without_te()
    if proc_rank is None:
        proc_rank = int(os.environ.get("RANK", 0))
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", 1))
    if backend is None:
        backend = "gloo" if on_cpu else "nccl"
    if data_parallel is not None:
        parallel_sizes(tensor_parallel, expert_parallel, data_parallel, world_size)
    if world_size % (tensor_parallel * expert_parallel) and world_size % tensor_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_parallel={tensor_parallel} "
            f"and expert_parallel={expert_parallel}"
        )
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            if world_size > 1:
                raise RuntimeError("MASTER_PORT must be set for a multi-process run")
            os.environ["MASTER_PORT"] = str(free_port())
        if backend == "nccl":
            torch.cuda.set_device(proc_rank % torch.cuda.device_count())
        dist.init_process_group(
            backend, rank=proc_rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        expert_model_parallel_size=expert_parallel,
        create_gloo_process_groups=True,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    """Tear down Megatron's parallel state and the default process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
