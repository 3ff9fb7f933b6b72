"""A plain Transformer Engine ``GroupedLinear`` outside a ``TEGroupedMLP`` (``forward(x, m_splits)``):
adapted on its own by :class:`lora.adapters.grouped.GroupedLoraLinear` (local experts ``0..N-1``); not
quantized by svdq."""

from __future__ import annotations

from torch import nn

from lora.adapters.grouped import GroupedLoraLinear
from lora.config import LoraConfig
from lora.families.base import Family, adapter_dtype
from lora.framework.te import is_grouped
from svdq.solvers.shared_basis import SHARED_DOWN


class TEGroupedLinear(Family):
    name = "te-grouped-linear"
    kind = "linear"

    def matches(self, module: nn.Module) -> bool:
        return is_grouped(module)

    def adapter_for(self, model, name, module, config: LoraConfig) -> bool:
        return True

    def make_adapter(self, model, name, module, config: LoraConfig) -> GroupedLoraLinear:
        return GroupedLoraLinear(
            module,
            config.rank_for(name),
            layout=config.fc1_layout or SHARED_DOWN,
            scaling=config.scaling,
            name=name,
            dtype=adapter_dtype(config),
        )
