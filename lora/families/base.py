"""The :class:`Family` interface: what the rest of svdq asks of one kind of module (see
:mod:`lora.families`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lora.config import LoraConfig

KINDS = ("linear", "experts")


def adapter_dtype(config: LoraConfig) -> torch.dtype | None:
    """The adapter parameters' dtype of ``config`` (``None``: the base weight's)."""
    return getattr(torch, config.dtype) if config.dtype else None


class Family:
    """One kind of module. Subclasses set :attr:`name` / :attr:`kind` and implement :meth:`matches`;
    the other methods have the defaults of a family that is neither quantized nor adapted.

    ``kind``: ``"linear"`` (one weight) or ``"experts"`` (the experts of one MoE layer).
    ``quantizable``: the module can get an SVDQuant base in place (:mod:`lora.install`).
    ``megatron``: a Megatron-core / Transformer Engine module (such models take the Megatron path of
    calibration and export; models with none are plain torch models, :func:`svdq.quantize`).
    """

    name: str = ""
    kind: str = "linear"
    quantizable: bool = False
    megatron: bool = True

    def matches(self, module: nn.Module) -> bool:
        raise NotImplementedError

    # -- adapters
    def adapter_for(self, model: nn.Module, name: str, module: nn.Module, config: LoraConfig) -> bool:
        """Whether :func:`lora.add_adapters` adapts this matched module under ``config`` (``False``:
        skipped silently; an error for modules that cannot be adapted at all)."""
        return False

    def make_adapter(self, model: nn.Module, name: str, module: nn.Module, config: LoraConfig) -> nn.Module:
        """The adapter wrapper around ``module`` (also a quantized base of this family), not yet placed in
        the model, with zero factors."""
        raise NotImplementedError(f"{name}: {self.name} modules take no adapters")

    # -- linear families
    def full_weight(self, module: nn.Module, glu: bool = False) -> Tensor:
        """The full ``(out × in)`` weight, identical on every tensor-parallel rank."""
        raise NotImplementedError(f"{self.name} modules are not quantized by svdq")

    def make_base(self, module: nn.Module, residual, smooth: Tensor, act_format, storage: str, glu: bool):
        """The quantized base replacing ``module``: this rank's shards of the full ``residual`` and
        ``smooth``."""
        raise NotImplementedError(f"{self.name} modules are not quantized by svdq")

    def install(self, model: nn.Module, name: str, module: nn.Module, site, lora_config, storage: str):
        """Put the quantized layer for ``site`` (a :class:`lora.install.LinearSite`) at ``name``; returns
        it. Called by :func:`lora.install.install_linear`."""
        raise NotImplementedError(f"{self.name} modules are not quantized by svdq")

    # -- experts families
    def experts_for_quantization(self, model: nn.Module, name: str) -> nn.Module:
        """The experts module whose expert linears get quantized bases (it may replace ``module`` in the
        model, e.g. a grouped one by its per-expert equivalent)."""
        raise NotImplementedError(f"{self.name} experts are not quantized by svdq")

    def __repr__(self) -> str:
        return f"<module family {self.name}>"
