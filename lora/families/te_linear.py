"""Transformer Engine linears — Megatron's ``TEColumnParallelLinear`` / ``TERowParallelLinear`` /
``TELayerNormColumnParallelLinear`` and plain ``te.pytorch.Linear`` / ``LayerNormLinear``. Recognised by
their TE class hierarchy (:func:`lora.framework.te.te_kind`: TE cannot be imported everywhere). As a
Megatron linear, except that a fused input norm is split off before quantization
(:func:`lora.framework.te_convert.split_fused_norm`): the 4-bit path quantizes ``norm(x)``."""

from __future__ import annotations

from torch import nn

from lora.families.megatron_linear import MegatronLinear
from lora.framework.te import is_grouped, te_kind
from lora.framework.te_convert import is_fused_norm_linear, split_fused_norm


class TELinear(MegatronLinear):
    name = "te-linear"

    def matches(self, module: nn.Module) -> bool:
        return te_kind(module) is not None and not is_grouped(module)

    def gemm_linear(self, module: nn.Module) -> tuple[nn.Module | None, nn.Module]:
        if is_fused_norm_linear(module):  # quantize between the norm and the GEMM
            return split_fused_norm(module)
        return None, module
