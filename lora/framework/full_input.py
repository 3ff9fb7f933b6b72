"""The whole input of a Megatron (or Transformer Engine) linear, as calibration statistics record it.

A linear's forward pre-hook sees its local input. SVDQuant decomposes the full weight from full-feature
statistics on every tensor-parallel rank alike, so the statistics hooks
(:func:`svdq.stats.collect_input_stats`) take :func:`full_input` as their input transform and
:func:`full_in_features` as the feature count:

* a TE linear with a fused input norm: the norm's output (:func:`lora.framework.te.fused_norm_input`), which
  is what its GEMM reads;
* a sequence-parallel column-parallel linear: gathered along the sequence (dim 0) — not an expert linear:
  the token dispatcher already hands every expert-TP rank the same tokens;
* a row-parallel linear with ``input_is_parallel``: gathered along the features (last dim).

Every tensor-parallel rank then records the full input ``(tokens × in)`` (calibration only: the gathers
are collectives, so every rank of the group must run the same forward passes).
"""

from __future__ import annotations

from torch import Tensor, nn

from lora.framework.te import explicit_expert_comm, fused_norm_input, tp_group_of
from lora.framework.te_convert import is_fused_norm_linear
from lora.framework.tp import gather_dim, group_rank_size, split_dim


def full_in_features(linear: nn.Module) -> int:
    """The feature count of :func:`full_input`: the full weight's ``in``."""
    return linear.weight.shape[1] * (group_rank_size(tp_group_of(linear))[1] if split_dim(linear) == 1 else 1)


def full_input(linear: nn.Module, x: Tensor) -> Tensor:
    """The whole input ``(…, in)`` of ``linear`` from its local (detached) input ``x`` (see the module
    docstring); ``x`` itself when nothing is sharded or normalized."""
    if is_fused_norm_linear(linear):  # a TE linear with a fused input norm: the GEMM reads norm(x)
        x = fused_norm_input(linear, x)
    # expert linears (explicit_expert_comm) get whole, already dispatched token sets
    sequence_parallel = getattr(linear, "sequence_parallel", False) and not explicit_expert_comm(linear)
    dim = split_dim(linear)
    if dim == 0 and sequence_parallel:
        return gather_dim(x, 0, tp_group_of(linear))
    if dim == 1 and getattr(linear, "input_is_parallel", True):
        return gather_dim(x, x.dim() - 1, tp_group_of(linear))
    return x
