"""Tensor-parallel plumbing: shard arithmetic, whole tensors from shards, gradient reductions.

Shards follow the base weight of the linear they sit on. A factor is either *replicated* (``dim=None``)
or split in ``size`` equal chunks along ``dim``; a ``glu`` factor is the output side of a gated fc1
whose rows are ``[gate; up]`` (gate rows first): rank ``k`` then holds ``[gate_k; up_k]``, exactly as
Megatron lays out a GLU ``linear_fc1`` weight (stride 2).

Gradient reductions use Megatron's own autograd mappings (``megatron.core.tensor_parallel.mappings``)
so that the adapter gradients are complete and identical on every rank that holds a replica right
after ``backward()`` — no extra synchronization step is needed for correctness.

Whole tensors are gathered by one primitive, :func:`all_gather`: tensors travel as raw bytes (``uint8``
views), so every dtype (float8 scales, bool, 0-d) goes through gloo and NCCL alike; nothing is pickled.
:func:`gather_dim` / :func:`gather_packed` / :func:`gather_full_weight` undo :func:`take_shard` /
:func:`shard_packed` / a Megatron linear's weight split.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lora.framework.te import tp_group_of
from svdq.formats import PackedTensor


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


def split_dim(linear: nn.Module) -> int:
    """Axis along which a Megatron linear's weight is sharded: 0 (column) or 1 (row)."""
    from lora.adapters.layers import linear_mode  # (lora.adapters.layers imports this module)

    return 0 if linear_mode(linear) == "column" else 1


def shard_packed(p: PackedTensor, dim: int, rank: int, size: int, glu: bool = False) -> PackedTensor:
    """Rank ``rank``'s shard of a packed ``(out × in)`` tensor along ``dim`` (lossless: codes and scales are
    sliced, the per-tensor scale is kept)."""
    if size == 1:
        return p
    out_f, in_f = p.shape
    shape = (out_f // size, in_f) if dim == 0 else (out_f, in_f // size)
    tensors = {}
    for key, t in p.to_tensors().items():
        if t.dim() < 2:  # per-tensor scale
            tensors[key] = t
        else:
            tensors[key] = take_shard(t, dim, rank, size, glu).contiguous()
    meta = dict(p.meta())
    meta["shape"] = list(shape)
    return PackedTensor.from_tensors(tensors, meta)


# ------------------------------------------------------------------------------------------ gathers


def all_gather(t: Tensor, group) -> list[Tensor]:
    """``t`` of every rank of ``group`` (same shape and dtype everywhere), in rank order (detached)."""
    if group_rank_size(group)[1] == 1:
        return [t]
    flat = t.detach().contiguous().reshape(-1)
    raw = flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)
    parts = [torch.empty_like(raw) for _ in range(group_rank_size(group)[1])]
    dist.all_gather(parts, raw, group=group)
    return [p.view(t.dtype).reshape(t.shape) for p in parts]


def gather_dim(t: Tensor, dim: int | None, group, glu: bool = False) -> Tensor:
    """The whole tensor from shards along ``dim`` over ``group`` (``None``: replicated, ``t`` itself);
    ``glu``: shards are ``[gate_k; up_k]`` and the whole tensor is ``[gate; up]``."""
    if dim is None or group_rank_size(group)[1] == 1:
        return t
    if glu:
        gate, up = t.chunk(2, dim=0)
        return torch.cat([torch.cat(all_gather(gate, group), 0), torch.cat(all_gather(up, group), 0)], 0)
    return torch.cat(all_gather(t, group), dim)


def gather_packed(p: PackedTensor, dim: int, group, glu: bool = False) -> PackedTensor:
    """Inverse of :func:`shard_packed`: the whole packed ``(out × in)`` tensor."""
    size = group_rank_size(group)[1]
    if size == 1:
        return p
    tensors = {k: t if t.dim() < 2 else gather_dim(t, dim, group, glu) for k, t in p.to_tensors().items()}
    meta = dict(p.meta())
    out_f, in_f = p.shape
    meta["shape"] = [out_f * size, in_f] if dim == 0 else [out_f, in_f * size]
    return PackedTensor.from_tensors(tensors, meta)


def gather_full_weight(linear: nn.Module, glu: bool = False) -> Tensor:
    """The full ``(out × in)`` weight of a tensor-parallel linear, identical on every rank.

    ``glu``: a gated fc1 whose shards are ``[gate_k; up_k]``: the full weight is ``[gate; up]``.
    """
    dim = split_dim(linear)
    return gather_dim(linear.weight.detach(), dim, tp_group_of(linear), glu and dim == 0)


def rank0_call(fn, *args, **kwargs):
    """Run ``fn`` on global rank 0 only; every rank raises if it failed there (no rank is left waiting)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn(*args, **kwargs)
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            error = exc
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.broadcast(flag, src=0)
    if error is not None:
        raise error
    if int(flag.item()):
        raise RuntimeError("the checkpoint write failed on rank 0 (see its error)")
    return result


# ------------------------------------------------------------------------------------------ gradients


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
