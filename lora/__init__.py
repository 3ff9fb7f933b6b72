"""lora: trainable low-rank adapters on Megatron linears and MoE experts.

    from lora import LoraConfig, add_adapters, freeze_base, save_adapters, load_adapters
    lora.export(model, "out/", format="svdq")        # svdq | folded | modelopt-hf | peft
    lora.load(fresh_model, "out/")                   # a checkpoint or an adapter file, format detected
    lora.fold_adapters(model)                        # adapters into the 4-bit weights (torch or Megatron)

* :mod:`lora.config` — :class:`LoraConfig` and named presets.
* :mod:`lora.adapters.layers` — adapter modules (:class:`LoraLinear`, :class:`LoraExperts`, …), on Megatron's
  local and Transformer Engine linears.
* :mod:`lora.adapters.grouped` — adapters on TE grouped expert linears and ``TEGroupedMLP``
  (:class:`GroupedLoraLinear`, :class:`LoraGroupedExperts`).
* :mod:`lora.framework.te` / :mod:`lora.framework.te_convert` — how adapters see TE modules; TE conversions
  for SVDQuant.
* :mod:`lora.model` — add / enable / disable / remove, freeze, merge, adapter files.
* :mod:`lora.sharded` — ``sharded_state_dict`` (Megatron ``dist_checkpointing``) design.
* :mod:`lora.base` — SVDQuant residuals as frozen bases of Megatron linears.
* :mod:`lora.io.api` — ``export`` / ``load``: every on-disk format through one front door.
* :mod:`lora.io.svdq_export` — the quantized checkpoint format: ``export_quantized`` / ``load_quantized``.
* :mod:`lora.io.folded` — folded export (adapters merged into the 4-bit residuals).
* :mod:`lora.fold` — the fold itself (``fold_adapters``; one implementation for torch and Megatron).
* :mod:`lora.families` — module families (one file each) and :func:`~lora.families.register_family`,
  the extension point for a new kind of module; :mod:`lora.install` — the one installer of a quantized site.
* :mod:`lora.framework` — megatron-core / TE version differences, parallel init, CPU patches.
"""

from lora.adapters.grouped import GroupedLoraLinear, LoraGroupedExperts
from lora.adapters.layers import ExpertLoraLinear, ExpertParallelAdapter, Factor, LoraExperts, LoraLinear
from lora.config import PRESETS, LoraConfig
from lora.fold import fold_adapters
from lora.io.api import export, load
from lora.io.svdq_export import export_quantized, load_quantized, read_export_metadata
from lora.model import (
    adapter_factors,
    adapter_modules,
    adapter_state_dict,
    add_adapters,
    disable_adapters,
    enable_adapters,
    freeze_base,
    full_adapter_state_dict,
    load_adapters,
    merge_adapters,
    remove_adapters,
    save_adapters,
    shared_adapters_out_of_sync,
    unmerge_adapters,
)

__all__ = [
    "PRESETS",
    "ExpertLoraLinear",
    "ExpertParallelAdapter",
    "Factor",
    "GroupedLoraLinear",
    "LoraConfig",
    "LoraExperts",
    "LoraGroupedExperts",
    "LoraLinear",
    "adapter_factors",
    "adapter_modules",
    "adapter_state_dict",
    "add_adapters",
    "disable_adapters",
    "enable_adapters",
    "export",
    "export_quantized",
    "fold_adapters",
    "freeze_base",
    "full_adapter_state_dict",
    "load",
    "load_adapters",
    "load_quantized",
    "merge_adapters",
    "read_export_metadata",
    "remove_adapters",
    "save_adapters",
    "shared_adapters_out_of_sync",
    "unmerge_adapters",
]
