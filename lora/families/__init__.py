"""Module families: the kinds of module that svdq finds, hooks, quantizes and adapts — one file each.

A family (:class:`~lora.families.base.Family`) recognises its modules (``isinstance`` where the class can
be imported without optional dependencies, Transformer Engine's class hierarchy otherwise) and knows, for
its kind, everything the rest of the code asks of such a module:

* ``kind = "linear"`` (one weight): the full weight under tensor parallelism, the input its GEMM reads
  (calibration statistics), how to build its quantized base (:class:`lora.base.SVDQBase`), how to attach
  an adapter (:class:`lora.adapters.layers.LoraLinear`);
* ``kind = "experts"`` (the experts of one MoE layer): the experts module the quantized bases live in,
  how to attach the expert-group adapter (:class:`lora.adapters.layers.LoraExperts`, ...).

:data:`FAMILIES` is an ordered list, as PEFT's dispatchers: the first family whose :meth:`matches`
accepts a module handles it. Families (in this order):

====================  ===========================  ===============================================
file                  modules                      quantized / adapters
====================  ===========================  ===============================================
``megatron_linear``   Column/RowParallelLinear     yes / LoraLinear
``te_linear``         TE linears (+ fused norm)    yes (norm split off) / LoraLinear
``quantized_base``    an installed SVDQBase        already / LoraLinear
``sequential_mlp``    SequentialMLP experts        yes / LoraExperts
``te_grouped_mlp``    TEGroupedMLP experts         as SequentialMLP of TE linears / LoraGroupedExperts
``te_grouped_linear`` a plain TE GroupedLinear     no / GroupedLoraLinear
``legacy_grouped``    Megatron's legacy GroupedMLP no / no (a clear error)
``torch_linear``      plain ``nn.Linear``          :func:`svdq.quantize` (``SVDQLinear``) / its branch
====================  ===========================  ===============================================

Adding a family: write ``lora/families/<name>.py`` with a :class:`Family` subclass and pass an instance
to :func:`register_family` (``before=`` to take precedence over an existing one); nothing else changes.
See ``svdq/DESIGN.md`` (architecture).
"""

from __future__ import annotations

from torch import nn

from lora.adapters.layers import ExpertGroup, LoraLinear
from lora.families.base import Family
from lora.families.legacy_grouped import LegacyGroupedMLP
from lora.families.megatron_linear import MegatronLinear
from lora.families.quantized_base import QuantizedBase
from lora.families.sequential_mlp import SequentialExperts
from lora.families.te_grouped_linear import TEGroupedLinear
from lora.families.te_grouped_mlp import TEGroupedExperts
from lora.families.te_linear import TELinear
from lora.families.torch_linear import TorchLinear

FAMILIES: list[Family] = [
    MegatronLinear(),
    TELinear(),
    QuantizedBase(),
    SequentialExperts(),
    TEGroupedExperts(),
    TEGroupedLinear(),
    LegacyGroupedMLP(),
    TorchLinear(),
]


ADAPTED = (LoraLinear, ExpertGroup)  # adapters whose base is a Megatron / TE module


def register_family(family: Family, *, before: str | None = None) -> Family:
    """Add ``family`` to :data:`FAMILIES` (at the end, or just before the family named ``before``)."""
    if any(f.name == family.name for f in FAMILIES):
        raise ValueError(f"a module family named {family.name!r} is already registered")
    names = [f.name for f in FAMILIES]
    if before is not None and before not in names:
        raise ValueError(f"register_family: no family named {before!r} (known: {names})")
    FAMILIES.insert(names.index(before) if before is not None else len(FAMILIES), family)
    return family


def family_of(module: nn.Module) -> Family | None:
    """The first family of :data:`FAMILIES` that handles ``module``, or ``None``."""
    for family in FAMILIES:
        if family.matches(module):
            return family
    return None


def is_megatron_model(model: nn.Module) -> bool:
    """Whether ``model`` holds a module of a Megatron-core / Transformer Engine family (or an adapter
    on one): the Megatron paths of calibration, export and loading; else a plain torch model."""
    return any(
        getattr(family_of(m), "megatron", False) or hasattr(m, "adapter_name") for m in model.modules()
    )


def family_named(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise KeyError(f"no module family named {name!r} (known: {[f.name for f in FAMILIES]})")


__all__ = ["FAMILIES", "Family", "family_named", "family_of", "is_megatron_model", "register_family"]
