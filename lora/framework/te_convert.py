"""Structural conversions of Transformer Engine modules for the SVDQuant path (GPU hosts with TE).

An SVDQuant base (:class:`lora.base.SVDQBase`) quantizes a linear's input itself and dequantizes
its 4-bit residual for every GEMM, per linear. Two TE modules do not fit that directly:

* ``TEGroupedMLP`` computes all local experts in one grouped GEMM. :func:`ungroup_experts` replaces it
  by the equivalent ``SequentialMLP`` of ``TEColumnParallelLinear`` / ``TERowParallelLinear`` expert
  linears (Megatron's TE spec with ``moe_grouped_gemm=False``), weights copied: the same function, the
  same distributed-checkpoint keys, and each expert a TE linear that an SVDQuant base can hold. The
  quantized experts ran per expert anyway (dequantize-then-GEMM), so nothing is lost by it.
* ``TELayerNormColumnParallelLinear`` fuses the input norm into the GEMM, so its input cannot be
  quantized between the two. :func:`split_fused_norm` splits it (Megatron's own
  ``split_te_layernorm_column_parallel_linear``) into a ``TENorm`` and a ``TEColumnParallelLinear``;
  the SVDQuant base keeps the norm as ``input_norm`` and the adapter reads its output.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

import torch
from torch import nn

from lora.framework.te import is_te_grouped_mlp, te_kind


def sequential_from_grouped(grouped: nn.Module) -> nn.Module:
    """A ``SequentialMLP`` of TE expert linears computing what ``grouped`` (a ``TEGroupedMLP``) computes:
    expert ``i``'s ``linear_fc1.weight`` = ``grouped.linear_fc1.weight{i}`` (biases likewise), on the same
    device and process groups."""
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP

    fc1, fc2 = grouped.linear_fc1, grouped.linear_fc2
    if not hasattr(fc1, "weight0"):
        raise TypeError(f"{type(fc1).__name__}: expected a TE grouped linear with weight0..N-1")
    submodules = MLPSubmodules(linear_fc1=TEColumnParallelLinear, linear_fc2=TERowParallelLinear)
    seq = SequentialMLP(
        grouped.num_local_experts, grouped.config, submodules, pg_collection=fc1._pg_collection
    )
    device = fc1.weight0.device
    seq.to(device)
    with torch.no_grad():
        for i, expert in enumerate(seq.local_experts):
            for src, dst in ((fc1, expert.linear_fc1), (fc2, expert.linear_fc2)):
                dst.weight.copy_(getattr(src, f"weight{i}"))
                bias = getattr(src, f"bias{i}", None)
                if isinstance(bias, torch.Tensor) and bias.numel() and getattr(dst, "bias", None) is not None:
                    dst.bias.copy_(bias)
    seq.train(grouped.training)
    return seq


def ungroup_experts(model: nn.Module, patterns: tuple[str, ...] = ("*",)) -> list[str]:
    """Replace every ``TEGroupedMLP`` whose name matches ``patterns`` by :func:`sequential_from_grouped`
    (in place); returns the names. Adapted experts (``LoraGroupedExperts``) are refused: convert first,
    then add adapters."""
    names = []
    for name, m in list(model.named_modules()):
        if not (is_te_grouped_mlp(m) and any(fnmatchcase(name, p) for p in patterns)):
            continue
        if any(type(c).__name__ == "GroupedLoraLinear" for c in m.children()):
            raise ValueError(f"{name}: TEGroupedMLP with adapters; remove_adapters() before converting it")
        model.set_submodule(name, sequential_from_grouped(m))
        names.append(name)
    return names


def is_fused_norm_linear(m: nn.Module) -> bool:
    return te_kind(m) == "layernorm-column"


def split_fused_norm(linear: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(norm, column linear)`` equal to the fused ``TELayerNormColumnParallelLinear`` ``linear``
    (``linear(x) == column(norm(x))``), on its device and dtype."""
    try:
        from megatron.core.extensions.transformer_engine import split_te_layernorm_column_parallel_linear
    except ImportError as e:  # older megatron-core
        raise NotImplementedError(
            "splitting a TELayerNormColumnParallelLinear needs megatron-core's "
            "split_te_layernorm_column_parallel_linear (0.19)"
        ) from e
    w = linear.weight
    norm, column = split_te_layernorm_column_parallel_linear(linear, linear.config, tp_group=linear._tp_group)
    return norm.to(w.device, w.dtype), column.to(w.device, w.dtype)
