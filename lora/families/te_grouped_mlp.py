"""Megatron-core's ``TEGroupedMLP`` (the experts of a layer on two TE ``GroupedLinear``): adapted in place
by :class:`lora.adapters.grouped.LoraGroupedExperts`; quantized as the equivalent ``SequentialMLP`` of TE
linears (:func:`lora.framework.te_convert.ungroup_experts`, same weights and state-dict keys), since the
quantized experts run one GEMM per expert."""

from __future__ import annotations

from torch import nn

from lora.adapters.grouped import LoraGroupedExperts
from lora.families.sequential_mlp import SequentialExperts
from lora.framework.te_convert import ungroup_experts


class TEGroupedExperts(SequentialExperts):
    name = "te-grouped-mlp"
    adapter_class = LoraGroupedExperts

    def matches(self, module: nn.Module) -> bool:
        from megatron.core.transformer.moe.experts import TEGroupedMLP

        return isinstance(module, TEGroupedMLP)

    def experts_for_quantization(self, model: nn.Module, name: str) -> nn.Module:
        ungroup_experts(model, (name,))
        return model.get_submodule(name)
