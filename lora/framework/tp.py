"""Tensor-parallel plumbing of the adapters: shard arithmetic and gradient reductions.

Shards follow the base weight of the linear they sit on. A factor is either *replicated* (``dim=None``)
or split in ``size`` equal chunks along ``dim``; a ``glu`` factor is the output side of a gated fc1
whose rows are ``[gate; up]`` (gate rows first): rank ``k`` then holds ``[gate_k; up_k]``, exactly as
Megatron lays out a GLU ``linear_fc1`` weight (stride 2).

Gradient reductions use Megatron's own autograd mappings (``megatron.core.tensor_parallel.mappings``)
so that the adapter gradients are complete and identical on every rank that holds a replica right
after ``backward()`` — no extra synchronization step is needed for correctness.
"""

from __future__ import annotations

import torch
from torch import Tensor


def group_rank_size(group) -> tuple[int, int]:
    """``(rank, size)`` of this process in ``group``; ``(0, 1)`` for ``None`` or no distributed run."""
    if group is None or not torch.distributed.is_initialized():
        return 0, 1
    return torch.distributed.get_rank(group), torch.distributed.get_world_size(group)


def full_shape(local_shape: tuple[int, ...], dim: int | None, tp_size: int) -> tuple[int, ...]:
    """Shape of the whole tensor whose shard along ``dim`` (of ``tp_size`` shards) has ``local_shape``."""
    shape = list(local_shape)
    if dim is not None:
        shape[dim] *= tp_size
    return tuple(shape)


def take_shard(full: Tensor, dim: int | None, tp_rank: int, tp_size: int, glu: bool = False) -> Tensor:
    """Shard ``tp_rank`` of ``tp_size`` of ``full`` (see the module docstring for ``glu``)."""
    if dim is None or tp_size == 1:
        return full
    if glu:
        if dim != 0:
            raise ValueError("a GLU factor is sharded along its output rows (dim 0)")
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]], dim=0)
    return full.chunk(tp_size, dim=dim)[tp_rank]


def grad_allreduce(t: Tensor, *groups) -> Tensor:
    """Identity in forward; in backward the gradient is summed over each group of size > 1.

    Used on a factor that is replicated over a group whose ranks each see only part of its gradient
    (another shard of the output, another slice of the sequence, other experts).
    """
    from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

    for g in groups:
        if group_rank_size(g)[1] > 1:
            t = copy_to_tensor_model_parallel_region(t, group=g)
    return t


def set_tp_attributes(param: Tensor, dim: int | None, base_weight: Tensor | None) -> None:
    """Megatron attributes on an adapter parameter: the tensor-parallel split (for grad-norm
    de-duplication) and ``allreduce`` copied from the base weight (``False`` marks expert parameters,
    which Megatron's DDP reduces over the expert-data-parallel group)."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    if dim is not None:
        set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=1)
    if base_weight is not None and hasattr(base_weight, "allreduce"):
        param.allreduce = base_weight.allreduce
