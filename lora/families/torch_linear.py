"""A plain ``torch.nn.Linear`` (exactly that class, in models without Megatron modules): quantized by
:func:`svdq.quantize` into :class:`svdq.SVDQLinear`, which carries its own trainable branch
(``lora_down`` / ``lora_up``) — so :func:`lora.add_adapters` leaves it alone."""

from __future__ import annotations

from torch import Tensor, nn

from lora.families.base import Family


class TorchLinear(Family):
    name = "torch-linear"
    kind = "linear"
    quantizable = True
    megatron = False

    def matches(self, module: nn.Module) -> bool:
        return type(module) is nn.Linear

    def full_weight(self, module: nn.Module, glu: bool = False) -> Tensor:
        return module.weight.detach()
