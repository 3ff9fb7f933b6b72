"""Transformer Engine modules as the adapters see them, without importing TE (it only exists on GPU hosts).

Modules are recognized by the class names in their MRO, so nvidia-modelopt's quantized subclasses (made
by class swapping) are recognized too. What matters to an adapter (svdq/DESIGN.md §11.5):

* **Kinds** (:func:`te_kind`): Megatron's ``TEColumnParallelLinear`` (``"column"``),
  ``TERowParallelLinear`` (``"row"``), ``TELayerNormColumnParallelLinear`` (``"layernorm-column"``: the
  norm is fused into the linear, an adapter must read the normalized input), the grouped expert linears
  ``TEColumnParallelGroupedLinear`` / ``TERowParallelGroupedLinear`` (``"grouped-column"`` /
  ``"grouped-row"``: ``forward(x, m_splits)``, parameters ``weight0..N-1``) and plain TE
  ``te.pytorch.Linear`` / ``GroupedLinear`` (``"linear"`` / ``"grouped"``; they return a tensor, not
  ``(out, bias)``, unless built with ``return_bias``).
* **Groups** (:func:`tp_group_of`): for expert linears whose communication Megatron does itself (tensor or
  expert parallelism > 1), Megatron gives TE ``parallel_mode=None`` and no group; the (expert)
  tensor-parallel group is kept in the wrapper's ``_tp_group``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_KINDS = {  # Megatron TE wrapper class name -> kind (most derived first)
    "TELayerNormColumnParallelLinear": "layernorm-column",
    "TEColumnParallelGroupedLinear": "grouped-column",
    "TERowParallelGroupedLinear": "grouped-row",
    "TEColumnParallelLinear": "column",
    "TERowParallelLinear": "row",
}


def _mro_names(m: nn.Module) -> list[str]:
    return [c.__name__ for c in type(m).__mro__]


def is_te_module(m: nn.Module) -> bool:
    """True for any module whose class derives from a Transformer Engine class."""
    return any(c.__module__.startswith("transformer_engine.") for c in type(m).__mro__)


def te_kind(m: nn.Module) -> str | None:
    """The kind of a TE linear (see the module docstring), or ``None`` for anything else."""
    if not is_te_module(m):
        return None
    names = _mro_names(m)
    for cls_name, kind in _KINDS.items():
        if cls_name in names:
            return kind
    if "GroupedLinear" in names:
        return "grouped"
    if "LayerNormLinear" in names:
        return "layernorm-linear"
    if "Linear" in names:
        return "linear"
    return None


def is_te_grouped_mlp(m: nn.Module) -> bool:
    """Megatron's ``TEGroupedMLP`` (experts on TE grouped linears)."""
    return any(c.__name__ == "TEGroupedMLP" for c in type(m).__mro__)


def is_grouped(m: nn.Module) -> bool:
    """A TE grouped linear (``forward(x, m_splits)``, ``weight0..N-1``)."""
    return (te_kind(m) or "").startswith("grouped")


def te_mode(m: nn.Module) -> str | None:
    """``"column"`` / ``"row"`` for TE linears, from the Megatron wrapper class when there is one (TE's own
    ``parallel_mode`` is ``None`` for experts with Megatron-side communication), else from TE's
    ``parallel_mode`` (``None``: a plain replicated TE linear, column with no tensor parallelism)."""
    kind = te_kind(m)
    if kind is None:
        return None
    if kind.endswith("column"):
        return "column"
    if kind.endswith("row"):
        return "row"
    return "row" if getattr(m, "parallel_mode", None) == "row" else "column"


def tp_group_of(m: nn.Module):
    """The (expert) tensor-parallel group of a Megatron or TE linear (see the module docstring)."""
    group = getattr(m, "_tp_group", None)
    if group is not None:
        return group
    if is_te_module(m) and getattr(m, "parallel_mode", None) is None:
        return None  # a plain TE linear without tensor parallelism
    return getattr(m, "tp_group", None)


def explicit_expert_comm(m: nn.Module) -> bool:
    """True when Megatron, not the linear, does the linear's tensor/expert-parallel communication: local
    expert linears set ``explicit_expert_comm``; Megatron's TE wrappers pass TE ``parallel_mode=None``."""
    if getattr(m, "explicit_expert_comm", False):
        return True
    kind = te_kind(m)
    megatron_kinds = ("column", "row", "grouped-column", "grouped-row")
    return kind in megatron_kinds and getattr(m, "parallel_mode", 1) is None


def fused_norm_input(m: nn.Module, x: Tensor) -> Tensor:
    """The output of the input norm fused into a TE ``LayerNormLinear`` (Megatron's
    ``TELayerNormColumnParallelLinear``), computed here in float32 and returned in ``x``'s dtype::

        RMSNorm:   x · rsqrt(mean(x²) + eps) · γ          LayerNorm: (x − mean) · rsqrt(var + eps) · γ + β

    with ``γ = layer_norm_weight`` (``+ 1`` under ``zero_centered_gamma``) and ``β = layer_norm_bias``.
    Equal to TE's own norm up to rounding; differentiable in ``x`` (and γ, β)."""
    gamma = m.layer_norm_weight.float()
    if getattr(m, "zero_centered_gamma", False):
        gamma = gamma + 1
    xf = x.float()
    if getattr(m, "normalization", "LayerNorm") == "RMSNorm":
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + m.eps) * gamma
    else:
        beta = getattr(m, "layer_norm_bias", None)
        y = F.layer_norm(xf, (xf.shape[-1],), gamma, None if beta is None else beta.float(), m.eps)
    return y.to(x.dtype)
