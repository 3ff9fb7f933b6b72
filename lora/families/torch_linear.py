"""A plain ``torch.nn.Linear`` (exactly that class, in models without Megatron modules): quantized by
:func:`svdq.quantize` into :class:`svdq.SVDQLinear`, which carries its own trainable branch
(``lora_down`` / ``lora_up``) — so :func:`lora.add_adapters` leaves it alone."""

from __future__ import annotations

from torch import Tensor, nn

from lora.families.base import Family
from svdq.layer import install_svdq_linear


class TorchLinear(Family):
    name = "torch-linear"
    kind = "linear"
    quantizable = True
    megatron = False

    def matches(self, module: nn.Module) -> bool:
        return type(module) is nn.Linear

    def full_weight(self, module: nn.Module, glu: bool = False) -> Tensor:
        return module.weight.detach()

    def install(self, model, name, module, site, lora_config, storage: str) -> nn.Module:
        return install_svdq_linear(
            model,
            name,
            residual=site.residual,
            smooth=site.smooth,
            act_format=site.act_format,
            lora_down=site.lora_down,
            lora_up=site.lora_up,
            bias=site.bias,
            input_amax=site.input_amax,
            storage=storage,
            dtype=site.dtype,
        )
