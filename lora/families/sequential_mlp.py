"""Megatron-core's ``SequentialMLP`` experts (one ``MLP`` per local expert; its linears are Megatron or
TE linears): every expert linear gets a quantized base, the layer gets one
:class:`lora.adapters.layers.LoraExperts` (shared and per-expert factors, see ``svdq/DESIGN.md``)."""

from __future__ import annotations

from torch import nn

from lora.adapters.layers import LoraExperts
from lora.config import LoraConfig
from lora.families.base import Family, adapter_dtype

BRANCHES = (("fc1", "linear_fc1"), ("fc2", "linear_fc2"), ("parallel", "parallel"))  # names in rank_pattern


class SequentialExperts(Family):
    name = "sequential-mlp"
    kind = "experts"
    quantizable = True
    adapter_class = LoraExperts

    def matches(self, module: nn.Module) -> bool:
        from megatron.core.transformer.moe.experts import SequentialMLP

        return isinstance(module, SequentialMLP)

    def adapter_for(self, model, name, module, config: LoraConfig) -> bool:
        return config.has_expert_adapters

    def make_adapter(self, model, name, module, config: LoraConfig) -> nn.Module:
        return self.adapter_class(
            module,
            config.rank,
            scaling=config.scaling,
            fc1_layout=config.fc1_layout,
            fc2_layout=config.fc2_layout,
            parallel=config.parallel_expert,
            name=name,
            dtype=adapter_dtype(config),
            dropout=config.dropout,
            ranks={proj: config.rank_for(f"{name}.{branch}") for proj, branch in BRANCHES},
        )

    def experts_for_quantization(self, model: nn.Module, name: str) -> nn.Module:
        return model.get_submodule(name)
