"""An SVDQuant base installed without an adapter (:class:`lora.base.SVDQBase`, e.g. a layer loaded from a
folded, rank-0 export): already quantized, adapted by :class:`lora.adapters.layers.LoraLinear` like the
Megatron or TE linear it holds (the adapter reads its ``parallel_mode`` and ``weight_like``)."""

from __future__ import annotations

from torch import nn

from lora.base import SVDQBase
from lora.families.megatron_linear import MegatronLinear


class QuantizedBase(MegatronLinear):
    name = "svdq-base"
    quantizable = False

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, SVDQBase)

    def full_weight(self, module, glu=False):
        raise NotImplementedError("an SVDQuant base is already quantized")

    def make_base(self, *args, **kwargs):
        raise NotImplementedError("an SVDQuant base is already quantized")
