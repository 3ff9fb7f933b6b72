"""Megatron-core's local ``ColumnParallelLinear`` / ``RowParallelLinear`` (dense layers and the expert
linears of a ``SequentialMLP``): quantized in place as :class:`lora.base.SVDQBase`, adapted by
:class:`lora.adapters.layers.LoraLinear`."""

from __future__ import annotations

from torch import Tensor, nn

from lora.adapters.layers import LoraLinear
from lora.base import SVDQBase
from lora.config import LoraConfig
from lora.families.base import Family, adapter_dtype
from lora.framework.te import tp_group_of
from lora.framework.tp import gather_full_weight, group_rank_size, shard_packed, split_dim, take_shard


def is_glu_fc1(model: nn.Module, name: str) -> bool:
    """``name`` is the ``linear_fc1`` of a gated dense ``MLP`` (rows ``[gate; up]``)."""
    from megatron.core.transformer.mlp import MLP

    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return attr == "linear_fc1" and isinstance(parent, MLP) and bool(parent.config.gated_linear_unit)


class MegatronLinear(Family):
    name = "megatron-linear"
    kind = "linear"
    quantizable = True

    def matches(self, module: nn.Module) -> bool:
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

        return isinstance(module, (ColumnParallelLinear, RowParallelLinear))

    def adapter_for(self, model, name, module, config: LoraConfig) -> bool:
        return True

    def make_adapter(self, model, name, module, config: LoraConfig) -> LoraLinear:
        return LoraLinear(
            module,
            config.rank_for(name),
            scaling=config.scaling,
            name=name,
            glu=is_glu_fc1(model, name),
            dtype=adapter_dtype(config),
            dropout=config.dropout,
        )

    def full_weight(self, module: nn.Module, glu: bool = False) -> Tensor:
        return gather_full_weight(module, glu)

    def gemm_linear(self, module: nn.Module) -> tuple[nn.Module | None, nn.Module]:
        """``(input norm or None, the linear whose weight becomes the residual)``."""
        return None, module

    def make_base(self, module, residual, smooth: Tensor, act_format, storage: str, glu: bool) -> SVDQBase:
        norm, linear = self.gemm_linear(module)
        dim = split_dim(linear)
        tp_rank, tp_size = group_rank_size(tp_group_of(linear))
        shard = shard_packed(residual, dim, tp_rank, tp_size, glu and dim == 0)  # (out_l × in_l)
        smooth = take_shard(smooth, 0, tp_rank, tp_size) if dim == 1 else smooth  # (in_l,)
        return SVDQBase(linear, shard, smooth, act_format, storage, input_norm=norm)

    def install(self, model, name, module, site, lora_config: LoraConfig | None, storage: str) -> nn.Module:
        from lora.install import quantized_base

        base = quantized_base(self, module, site, storage)
        if lora_config is None:
            model.set_submodule(name, base)
            return base
        adapter = self.make_adapter(model, name, base, lora_config)
        adapter.lora_config = lora_config
        adapter.init_from(site.lora_down, site.lora_up)
        model.set_submodule(name, adapter)
        return adapter
