"""Adapter dropout whose masks stay consistent under (expert) tensor parallelism.

One process drops each element of a branch input ``x`` with probability ``p`` and scales the rest by
``1 / (1 - p)``. Under tensor parallelism the branch input is either

* **replicated** over the (expert-)tensor-parallel group ``g`` — a column linear's input without sequence
  parallelism, an expert's fc1 input, the parallel expert adapter's input: every rank of ``g`` must draw
  the SAME mask (each computes ``x·Aᵀ`` redundantly and adds it to its own output shard; ``A``'s
  gradient is summed over ``g``), or
* **split** over ``g`` — a row linear's input features, a sequence-parallel shard of the tokens: every
  rank draws its own mask, as one process would for its part of the tensor.

Masks come from named states of Megatron's RNG tracker (``tensor_parallel.get_cuda_rng_tracker()``), which
activation recomputation saves and restores, so a recomputed forward redraws the forward's masks:

* split: Megatron's ``model-parallel-rng`` (dense linears) / ``expert-parallel-rng`` (experts), which
  differ per rank;
* replicated: ``svdq-lora-dropout`` (dense) / ``svdq-lora-dropout-expert`` (experts), added on first use
  with a seed agreed over ``g`` (a MIN all-reduce: this first use is collective over ``g``) from
  ``torch.initial_seed()`` and the rank's position among the groups that see other tokens (its
  data-parallel rank; for experts its expert-data-parallel and expert-parallel rank). No state is
  consumed by code that runs a different number of times on the ranks of ``g``. The seed is agreed once
  per process: when the state was created inside a recomputed region, recomputation restores the tracker
  without it and it is re-created from the same seed (so the same masks), without communication.

Group size 1 (no tensor parallelism): plain ``F.dropout`` on the default generator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lora.framework.tp import group_rank_size

DENSE_STATE = "svdq-lora-dropout"
EXPERT_STATE = "svdq-lora-dropout-expert"
_SEED_OFFSET = {DENSE_STATE: 3_000_017, EXPERT_STATE: 5_000_011}  # far from Megatron's own seed offsets
_SEEDS: dict[str, int] = {}  # state name -> seed agreed over its group (once per process)


def adapter_dropout(x: Tensor, p: float, training: bool, tp_group, *, split: bool, expert: bool) -> Tensor:
    """``F.dropout(x, p)`` in training (identity otherwise) with the mask drawn as the module docstring
    says: ``tp_group`` is the (expert-)TP group the branch input is replicated or ``split`` over."""
    if not p or not training:
        return x
    if group_rank_size(tp_group)[1] == 1:
        return F.dropout(x, p, True)
    from megatron.core.tensor_parallel.random import (
        _EXPERT_PARALLEL_RNG_TRACKER_NAME,
        _MODEL_PARALLEL_RNG_TRACKER_NAME,
        get_cuda_rng_tracker,
    )

    tracker = get_cuda_rng_tracker()
    if split:
        name = _EXPERT_PARALLEL_RNG_TRACKER_NAME if expert else _MODEL_PARALLEL_RNG_TRACKER_NAME
    else:
        name = EXPERT_STATE if expert else DENSE_STATE
        if name not in tracker.get_states():
            if name not in _SEEDS:
                _SEEDS[name] = _agreed_seed(name, tp_group, expert)
            getattr(tracker, "seeds_", set()).discard(_SEEDS[name])  # re-created after a tracker restore
            tracker.add(name, _SEEDS[name])
    with tracker.fork(name):
        return F.dropout(x, p, True)


def _agreed_seed(name: str, tp_group, expert: bool) -> int:
    """One seed for the replicated state on every rank of ``tp_group`` (collective over it)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if expert:
        position = ps.get_expert_data_parallel_rank() * ps.get_expert_model_parallel_world_size()
        position += ps.get_expert_model_parallel_rank()
    else:
        position = ps.get_data_parallel_rank()
    seed = torch.initial_seed() % (2**31) + _SEED_OFFSET[name] + 1009 * position
    device = (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(tp_group) == "nccl" else "cpu"
    )
    t = torch.tensor([seed], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=tp_group)
    return int(t.item())
