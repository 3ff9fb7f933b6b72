"""torch.distributed + Megatron parallel state for 1..N processes (gloo on CPU, NCCL on GPU)."""

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


def init_parallel(
    tensor_parallel: int = 1,
    expert_parallel: int = 1,
    *,
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
    (``seed``), so model init is reproducible.
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
