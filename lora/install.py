"""The one installer: "this site gets residual R, smoothing s, factors A, B, these formats" is one call,
used by calibration (:mod:`calib.calibrate`) and by loading (:mod:`lora.io.svdq_load`), for every module
family (:mod:`lora.families`).

* :func:`install_linear` — one linear site: its family builds the quantized base (:class:`lora.base.SVDQBase`:
  this rank's residual and smoothing shards, a fused input norm split off), then, with a ``lora_config``,
  the adapter is built *around that base* (:class:`lora.adapters.layers.LoraLinear`) and initialised
  from ``A``, ``B``; the result replaces the module in the model. Without ``lora_config`` the bare base
  replaces it (a layer stored without a branch, e.g. folded).
* :func:`install_experts` — the experts of one MoE layer: every local expert linear gets its base, then the
  expert-group adapter (:class:`lora.adapters.layers.LoraExperts`) is built around them and initialised
  from the per-projection factors (or from stored factor tensors by key, when loading).

Tensors are *full* (the whole weight's ``(out × in)`` residual, ``(in,)`` smoothing, ``(r × in)`` /
``(out × r)`` factors, or per-expert stacks): each tensor-parallel rank keeps its shard, so every rank
calls the installer with the same tensors. Nothing is built in the model until every argument has been
checked (a wrong site raises before any change).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lora.config import LoraConfig
from lora.families import Family, family_of
from lora.framework.te import tp_group_of
from lora.framework.tp import group_rank_size, take_shard
from svdq.formats import PackedTensor

EXPERT_PROJECTIONS = ("fc1", "fc2")


@dataclass
class ExpertProjection:
    """What the local experts of one projection (``fc1`` or ``fc2``) get. Per local expert ``i``:
    ``residuals[i]`` the full packed ``Q_w(R_i)`` ``(out × in)``, ``smooths[i]`` ``(in,)`` float32,
    ``input_amax[i]`` a static activation range or ``None``, ``biases[i]`` a full bias to copy in or
    ``None``. ``lora_down`` / ``lora_up``: the factors as :meth:`LoraExperts.init_from` takes them (2-D
    when shared, stacked ``(E × …)`` per expert), or ``None`` when they come from a ``factor_source``."""

    residuals: list[PackedTensor]
    smooths: list[Tensor]
    act_format: object
    input_amax: list | None = None
    biases: list | None = None
    lora_down: Tensor | None = None
    lora_up: Tensor | None = None


def _family(model: nn.Module, name: str, kind: str) -> tuple[nn.Module, Family]:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{name}: no such module in the model") from None
    family = family_of(module)
    if family is None or family.kind != kind or not family.quantizable:
        what = "a Megatron / TE linear" if kind == "linear" else "a SequentialMLP / TEGroupedMLP"
        raise ValueError(f"{name}: expected {what} to quantize, found {type(module).__name__}")
    return module, family


@dataclass
class LinearSite:
    """What one linear site gets: ``residual`` the full packed ``Q_w(R)`` ``(out × in)``, ``smooth``
    ``(in,)`` float32, the full factors ``lora_down`` ``(r × in)`` / ``lora_up`` ``(out × r)`` (``None``:
    no branch), ``act_format``, ``input_amax`` (static activation range, ``None``: dynamic), ``bias`` (a
    full bias to copy in, ``None``: keep the module's), ``glu`` (a gated fc1 with ``[gate; up]`` rows),
    ``dtype`` (of a plain-torch layer; ``None``: the module weight's)."""

    residual: PackedTensor
    smooth: Tensor
    act_format: object
    lora_down: Tensor | None = None
    lora_up: Tensor | None = None
    input_amax: Tensor | float | None = None
    bias: Tensor | None = None
    glu: bool = False
    dtype: torch.dtype | None = None


def copy_bias(linear: nn.Module, full: Tensor | None) -> None:
    """Copy this rank's shard of the full ``bias`` into ``linear`` (nothing for ``None``)."""
    if full is None:
        return
    b = linear.bias
    dim = int(b.partition_dim) if getattr(b, "tensor_model_parallel", False) else None
    tp_rank, tp_size = group_rank_size(tp_group_of(linear))
    with torch.no_grad():
        b.copy_(take_shard(full, dim, tp_rank, tp_size))


def quantized_base(family: Family, module: nn.Module, site: LinearSite, storage: str) -> nn.Module:
    """The quantized base of a Megatron / TE ``module`` (this rank's shards; bias and static range set)."""
    base = family.make_base(module, site.residual, site.smooth, site.act_format, storage, site.glu)
    copy_bias(base.inner, site.bias)
    if site.input_amax is not None:
        base.set_input_amax(site.input_amax)
    return base


def install_linear(
    model: nn.Module,
    name: str,
    *,
    residual: PackedTensor,
    smooth: Tensor,
    act_format,
    lora_down: Tensor | None = None,
    lora_up: Tensor | None = None,
    lora_config: LoraConfig | None = None,
    input_amax: Tensor | float | None = None,
    bias: Tensor | None = None,
    storage: str = "packed",
    glu: bool | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Quantize the linear ``name`` of ``model`` in place (see the module docstring); returns the module
    now at ``name``: for Megatron / TE linears the adapter (:class:`~lora.adapters.layers.LoraLinear`
    around the :class:`~lora.base.SVDQBase`), or the bare base without ``lora_config``; for a plain
    ``nn.Linear`` the :class:`svdq.SVDQLinear` (which carries the branch itself; ``lora_config`` unused).

    ``residual``: full packed ``Q_w(R)`` ``(out × in)``; ``smooth``: ``(in,)``; ``lora_down`` ``(r × in)``
    and ``lora_up`` ``(out × r)`` full factors (required with ``lora_config``); ``bias``: a full bias to
    copy into the linear; ``glu``: the linear is a gated fc1 (``[gate; up]`` rows; default: detected);
    ``dtype``: a plain-torch layer's dtype (default: the replaced weight's)."""
    module, family = _family(model, name, "linear")
    if lora_config is not None and (lora_down is None or lora_up is None):
        raise ValueError(f"{name}: an adapter needs lora_down and lora_up")
    if glu is None:
        from lora.families.megatron_linear import is_glu_fc1

        glu = is_glu_fc1(model, name)
    site = LinearSite(residual, smooth, act_format, lora_down, lora_up, input_amax, bias, glu, dtype)
    return family.install(model, name, module, site, lora_config, storage)


def install_experts(
    model: nn.Module,
    name: str,
    projections: Mapping[str, ExpertProjection],
    *,
    lora_config: LoraConfig | None = None,
    factor_source: Callable[[str], Tensor] | None = None,
    storage: str = "packed",
) -> nn.Module:
    """Quantize the experts module ``name`` of ``model`` in place (see the module docstring); returns the
    module now at ``name`` (the expert-group adapter, or the experts module without ``lora_config``).

    ``projections``: ``{"fc1": ExpertProjection, "fc2": ExpertProjection}`` for the local experts.
    Factors: each projection's ``lora_down`` / ``lora_up``, or ``factor_source(key)`` returning the stored
    full tensor of every adapter factor by its global key (:class:`lora.adapters.layers.Factor`;
    ``lora_up`` tensors as stored, i.e. times ``scaling``)."""
    module, family = _family(model, name, "experts")
    if set(projections) != set(EXPERT_PROJECTIONS):
        raise ValueError(f"{name}: projections must be {EXPERT_PROJECTIONS}, got {sorted(projections)}")
    experts = family.experts_for_quantization(model, name)
    for proj, p in projections.items():
        if len(p.residuals) != len(experts.local_experts) or len(p.smooths) != len(p.residuals):
            raise ValueError(
                f"{name}.linear_{proj}: {len(p.residuals)} residuals / {len(p.smooths)} smoothing vectors "
                f"for {len(experts.local_experts)} local experts"
            )
    glu = bool(experts.config.gated_linear_unit)
    for i, expert in enumerate(experts.local_experts):
        for proj, p in projections.items():
            linear = getattr(expert, f"linear_{proj}")
            linear_family = family_of(linear)
            site = LinearSite(
                p.residuals[i],
                p.smooths[i],
                p.act_format,
                input_amax=p.input_amax[i] if p.input_amax is not None else None,
                bias=p.biases[i] if p.biases is not None else None,
                glu=glu and proj == "fc1",
            )
            setattr(expert, f"linear_{proj}", quantized_base(linear_family, linear, site, storage))
    if lora_config is None:
        return experts
    experts_family = family_of(experts)
    adapter = experts_family.make_adapter(model, name, experts, lora_config)
    adapter.lora_config = lora_config
    if factor_source is None:
        for proj, p in projections.items():
            adapter.init_from(proj, p.lora_down, p.lora_up)
    else:
        with torch.no_grad():
            for f in adapter.factors():
                t = factor_source(f.key)
                t = t / adapter.scaling if f.role == "up" else t
                f.param.copy_(f.to_local(t, name))
    model.set_submodule(name, adapter)
    return adapter
