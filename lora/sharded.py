"""Distributed (``dist_checkpointing``) state of the adapters: ``sharded_state_dict`` building blocks.

Design (svdq/DESIGN.md §9, §11.2):

* Adapter wrappers are *transparent*: the base module's entries keep exactly the keys, shardings and
  replica ids they have without adapters (a pretrained checkpoint loads into an adapted model and back).
* A factor owned by one linear (a dense linear, or one expert's ``linear_fc1`` / ``linear_fc2``, or one
  expert's parallel adapter) is emitted *by that linear's wrapper with the prefix machinery of the base
  weight*: the tensor-parallel axis as the base weight's (GLU ``lora_up`` of fc1 through Megatron's own
  swiglu factory, so it reshards across tensor-parallel sizes like the fc1 weight), and inside a
  ``SequentialMLP`` the experts module itself adds the expert axis ``(…, global expert, E_global)`` and
  the expert-data-parallel replica id. No key ever holds the tensors of several experts without an
  expert offset (trap 1), and no expert tensor uses the dense replica id (trap 2).
* A factor *shared by the experts of a layer* (``LoraExperts``: fc1/fc2 shared-down or shared-up, the
  parallel adapter's down) is one global tensor under one key, replicated over expert-parallel,
  expert-data-parallel and — unless it is split like the base weight — expert-tensor-parallel ranks.
  Its replica id ``(0, etp_rank or 0, ep_rank · edp_size + edp_rank)`` is all-zero on exactly one rank
  per shard, so exactly one rank writes it. That is only correct because the shared factor *is* identical
  on all those ranks: its gradient is summed over the expert-parallel group inside autograd (see
  :mod:`lora.adapters.layers`), so every rank applies the same update.
"""

from __future__ import annotations

from lora.framework import compat
from lora.framework.tp import group_rank_size


def wrapper_sharded_state_dict(wrapper, prefix: str, sharded_offsets: tuple, metadata: dict | None, factors):
    """The base module's sharded state (same keys as without the wrapper) plus the wrapper's own
    ``factors`` (:class:`lora.adapters.layers.Factor`), sharded like the base weight; ``tp_group`` is the
    wrapper's (expert) tensor-parallel group."""
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
    from megatron.core.transformer.utils import (
        make_sharded_tensors_for_checkpoint,
        sharded_state_dict_default,
    )

    metadata = compat.ensure_dp_cp_group(metadata)
    state = sharded_state_dict_default(wrapper.base, prefix, sharded_offsets, metadata)
    own = {f.attr: f.param for f in factors}
    axes = {f.attr: f.dim for f in factors if f.dim is not None}
    state.update(
        make_sharded_tensors_for_checkpoint(
            own,
            prefix,
            axes,
            sharded_offsets,
            tp_group=wrapper.tp_group_for_checkpoint,
            dp_cp_group=metadata["dp_cp_group"],
        )
    )
    singleton = metadata.get("singleton_local_shards", False)
    for f in factors:
        if f.glu:
            key = f"{prefix}{f.attr}"
            state[key] = apply_swiglu_sharded_factory(state[key], sharded_offsets, singleton)
    return state


def shared_factor_sharded_tensor(key: str, factor, sharded_offsets: tuple, metadata: dict, groups):
    """One ``ShardedTensor`` (or swiglu factory) for a factor shared by all experts of a layer.

    ``groups = (etp_group, ep_group, edp_group)``. The tensor is split along ``factor.dim`` over the
    expert-tensor-parallel group (or replicated when ``dim`` is None) and replicated over the others.
    """
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

    etp_group, ep_group, edp_group = groups
    etp_rank, etp = group_rank_size(etp_group)
    ep_rank, _ = group_rank_size(ep_group)
    edp_rank, edp = group_rank_size(edp_group)
    replica_dp = ep_rank * edp + edp_rank
    prepend = len(sharded_offsets)
    if factor.dim is None:
        offsets, replica_id = tuple(sharded_offsets), (0, etp_rank, replica_dp)
    else:
        offsets = (*sharded_offsets, (factor.dim + prepend, etp_rank, etp))
        replica_id = (0, 0, replica_dp)
    sh = ShardedTensor.from_rank_offsets(
        key, factor.param, *offsets, replica_id=replica_id, prepend_axis_num=prepend
    )
    if factor.glu:
        sh = apply_swiglu_sharded_factory(sh, sharded_offsets, metadata.get("singleton_local_shards", False))
    return sh
