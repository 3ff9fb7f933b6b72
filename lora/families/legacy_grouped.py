"""Megatron-core's legacy ``GroupedMLP`` (experts as one fused weight, bf16 only): recognised so that
matching it is a clear error instead of a silent skip — neither quantized nor adapted."""

from __future__ import annotations

from torch import nn

from lora.families.base import Family


def _legacy_class():
    from megatron.core.transformer.moe import experts

    return getattr(experts, "GroupedMLP", None)  # removed from some megatron-core versions


class LegacyGroupedMLP(Family):
    name = "legacy-grouped-mlp"
    kind = "experts"

    def matches(self, module: nn.Module) -> bool:
        cls = _legacy_class()
        return cls is not None and isinstance(module, cls)

    def adapter_for(self, model, name, module, config) -> bool:
        raise NotImplementedError(f"{name}: adapters on the legacy GroupedMLP are not implemented")
