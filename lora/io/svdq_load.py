"""Load an svdq checkpoint into a fresh Megatron model (see :mod:`lora.io.svdq_export` for the naming).

Two phases: :func:`validate` checks the whole checkpoint against the model and returns a plan without
touching the model (layer and group names, full shapes under tensor parallelism, global expert counts,
dtypes, adapter configurations, every tensor's dtype and shape, no missing or unknown tensor); then
:func:`install` adds adapters, installs the :class:`~lora.base.SVDQBase` residual shards of this
rank, copies factors and every other tensor (this rank's shards and experts).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from lora.adapters.layers import LAYOUT_OWNS, linear_mode
from lora.base import SVDQBase
from lora.config import LoraConfig
from lora.families.megatron_linear import is_glu_fc1
from lora.framework.te import tp_group_of
from lora.framework.te_convert import ungroup_experts
from lora.framework.tp import group_rank_size
from lora.install import ExpertProjection, install_experts, install_linear
from lora.io.container import DTYPE_NAMES, CheckpointReader
from lora.io.naming import check_specs, linear_specs, parse_linear_meta, read_linear, residual_specs
from lora.io.sites import (
    MODEL_KIND,
    OtherTensor,
    check_no_pipeline,
    expert_key,
    expert_linears,
    linear_bias,
    other_tensors,
    unwrap,
)
from lora.io.torch_model import check_model_kind
from lora.model import adapter_modules, freeze_base
from svdq.residual import static_range_supported

PROJ_DIM = {"fc1": 0, "fc2": 1}  # split dim of expert linears (column fc1, row fc2)


@dataclass
class _Dense:
    name: str
    meta: dict
    lora: LoraConfig | None
    glu: bool


@dataclass
class _StoredExpertGroup:
    """One expert group of the checkpoint (``name``: the experts module), checked against the model: its
    metadata, adapter configuration and per-projection parsed fields, ready to install."""

    name: str
    meta: dict
    lora: LoraConfig | None
    fields: dict = field(default_factory=dict)  # proj -> [per global expert fields]


@dataclass
class Plan:
    dense: list[_Dense]
    expert_groups: list[_StoredExpertGroup]
    other: list[OtherTensor]


def _module(model: nn.Module, name: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{what} {name} of the checkpoint is not a module of the model") from None


def _lora(meta: dict, who: str) -> LoraConfig | None:
    cfg = meta.get("lora")
    if cfg is None:
        return None
    try:
        return LoraConfig.from_dict(cfg)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{who}: bad adapter configuration in the metadata: {exc}") from exc


def _full_shape(linear: nn.Module, dim: int) -> tuple[int, int]:
    out_l, in_l = linear.weight.shape
    size = group_rank_size(tp_group_of(linear))[1]
    return (out_l * size, in_l) if dim == 0 else (out_l, in_l * size)


def _check_linear(linear: nn.Module, fields: dict, meta: dict, dim: int, who: str, amax: bool) -> None:
    """The model linear fits the layer metadata: full shape, dtypes, bias, local shard shapes."""
    full = _full_shape(linear, dim)
    if full != fields["shape"]:
        raise ValueError(f"{who}: shape {list(fields['shape'])} in the checkpoint, {list(full)} in the model")
    got = DTYPE_NAMES.get(linear.weight.dtype)
    if meta.get("base_dtype") != got:
        raise ValueError(f"{who}: dtype {meta.get('base_dtype')} in the checkpoint, {got} in the model")
    bias = linear_bias(linear)
    has_bias = bias is not None
    if has_bias != fields["bias"] or (has_bias and bias.dtype != fields["bias_dtype"]):
        raise ValueError(f"{who}: the checkpoint's bias ({fields['bias_dtype']}) does not match the model's")
    try:
        fields["weight_format"].check_shape(tuple(linear.weight.shape))
        fields["act_format"].check_shape((1, linear.weight.shape[1]))
    except ValueError as exc:
        raise ValueError(f"{who}: this rank's shard cannot hold the format: {exc}") from exc
    if amax and not static_range_supported(fields["act_format"]):
        raise ValueError(f"{who}: input_amax given for activation format {fields['act_format']}")


def _factor_dtype(cfg: LoraConfig, linear: nn.Module) -> torch.dtype:
    return getattr(torch, cfg.dtype) if cfg.dtype else linear.weight.dtype


def _validate_dense(model, reader: CheckpointReader, name: str, meta: dict) -> tuple[_Dense, dict]:
    fields = parse_linear_meta(meta, name)
    m = _module(model, name, "layer")
    try:
        mode = linear_mode(m)
    except TypeError:
        raise ValueError(
            f"layer {name}: the model has a {type(m).__name__} there, expected a Megatron linear"
        ) from None
    _check_linear(m, fields, meta, 0 if mode == "column" else 1, f"layer {name}", fields["input_amax"])
    cfg = _lora(meta, f"layer {name}")
    if (cfg is None) != (fields["rank"] == 0) or (cfg is not None and cfg.rank_for(name) != fields["rank"]):
        raise ValueError(f"layer {name}: rank {fields['rank']} does not match its adapter configuration")
    if cfg is not None and _factor_dtype(cfg, m) != fields["dtype"]:
        raise ValueError(
            f"layer {name}: adapter dtype {DTYPE_NAMES[fields['dtype']]} does not match the model"
        )
    specs = linear_specs(name, fields)
    check_specs(reader, specs, name)
    return _Dense(name, meta, cfg, is_glu_fc1(model, name)), specs


def _group_factor_specs(name: str, gmeta: dict, fields: dict, cfg: LoraConfig, num: int, dtype) -> dict:
    specs = {}
    for proj, pm in gmeta["projections"].items():
        layout, r = pm.get("layout"), pm.get("rank", 0)
        if layout is None:
            continue
        out_f, in_f = fields[proj][0]["shape"]
        shapes = {"down": (r, in_f), "up": (out_f, r)}
        for role, own in zip(("down", "up"), LAYOUT_OWNS[layout]):
            if own:
                for g in range(num):
                    specs[expert_key(name, g, f"linear_{proj}.lora_{role}")] = (dtype, shapes[role])
            else:
                specs[f"{name}.linear_{proj}.lora_{role}"] = (dtype, shapes[role])
    rp = gmeta.get("parallel")
    if rp:
        hidden = fields["fc1"][0]["shape"][1]
        specs[f"{name}.parallel.lora_down"] = (dtype, (rp, hidden))
        for g in range(num):
            specs[expert_key(name, g, "parallel.lora_up")] = (dtype, (hidden, rp))
    return specs


def _validate_group(
    model, reader: CheckpointReader, name: str, gmeta: dict
) -> tuple[_StoredExpertGroup, dict]:
    from megatron.core.transformer.moe.experts import SequentialMLP

    who = f"expert group {name}"
    seq = _module(model, name, "expert group")
    if not isinstance(seq, SequentialMLP):
        raise ValueError(f"{who}: the model has a {type(seq).__name__} there, expected a SequentialMLP")
    num = gmeta.get("num_experts")
    have = seq.num_local_experts * group_rank_size(seq.ep_group)[1]
    if num != have:
        raise ValueError(f"{who}: {num} experts in the checkpoint, {have} in the model")
    if bool(gmeta.get("glu")) != bool(seq.config.gated_linear_unit):
        raise ValueError(f"{who}: gated linear unit {gmeta.get('glu')} in the checkpoint, not in the model")
    projections = gmeta.get("projections")
    if not isinstance(projections, dict) or set(projections) != {"fc1", "fc2"}:
        raise ValueError(f"{who}: metadata field 'projections' must have fc1 and fc2")
    cfg = _lora(gmeta, who)
    plan = _StoredExpertGroup(name, gmeta, cfg)
    specs = {}
    for proj, pm in projections.items():
        amax = pm.get("input_amax")
        if not isinstance(amax, list) or len(amax) != num:
            raise ValueError(f"{who}: metadata field 'input_amax' of {proj} must list {num} bools")
        per = [parse_linear_meta({**pm, "input_amax": bool(a)}, f"{who} {proj}") for a in amax]
        lin = unwrap(expert_linears(seq, proj)[0])
        _check_linear(lin, per[0], pm, PROJ_DIM[proj], f"{who} linear_{proj}", any(amax))
        layout = pm.get("layout")
        want = None if cfg is None else {"fc1": cfg.fc1_layout, "fc2": cfg.fc2_layout}[proj]
        rank = 0 if cfg is None or layout is None else cfg.rank_for(f"{name}.linear_{proj}")
        if layout != want or pm.get("rank") != rank:
            raise ValueError(
                f"{who}: {proj} layout/rank {layout}/{pm.get('rank')} do not match the adapter config"
            )
        if cfg is not None and layout is not None and _factor_dtype(cfg, lin) != per[0]["dtype"]:
            raise ValueError(
                f"{who}: {proj} adapter dtype {DTYPE_NAMES[per[0]['dtype']]} does not match the model"
            )
        for g, f in enumerate(per):
            specs.update(residual_specs(expert_key(name, g, f"linear_{proj}"), f))
        plan.fields[proj] = per
    if cfg is not None:
        if bool(gmeta.get("parallel")) != cfg.parallel_expert:
            raise ValueError(f"{who}: metadata field 'parallel' does not match the adapter config")
        dtype = _factor_dtype(cfg, unwrap(expert_linears(seq, "fc1")[0]))
        specs.update(_group_factor_specs(name, gmeta, plan.fields, cfg, num, dtype))
    check_specs(reader, specs, who)
    return plan, specs


def _expert_names(e: OtherTensor) -> list[str]:
    if e.expert is None:
        return [e.global_name()]
    ep_group, index, num_local = e.expert
    return [e.global_name(r * num_local + index) for r in range(group_rank_size(ep_group)[1])]


def validate(model: nn.Module, reader: CheckpointReader) -> Plan:
    """Check the checkpoint against ``model`` (nothing is changed); returns the install plan."""
    meta = reader.metadata
    check_model_kind(meta, MODEL_KIND, reader.path)
    layers, expert_groups = meta.get("layers"), meta.get("expert_groups")
    if not isinstance(layers, dict) or not isinstance(expert_groups, dict) or not (layers or expert_groups):
        raise ValueError(f"{reader.path}: metadata fields 'layers' / 'expert_groups' are missing or empty")
    if adapter_modules(model) or any(isinstance(m, SVDQBase) for m in model.modules()):
        raise ValueError(
            "load_quantized needs a fresh model: this one already has adapters or quantized layers"
        )
    known: set[str] = set()
    dense = []
    for name, lm in layers.items():
        plan, specs = _validate_dense(model, reader, name, lm)
        dense.append(plan)
        known.update(specs)
    plans = []
    for name, gm in expert_groups.items():
        plan, specs = _validate_group(model, reader, name, gm)
        plans.append(plan)
        known.update(specs)
    other = other_tensors(model, list(layers) + list(expert_groups))
    listed = meta.get("other_tensors")
    if not isinstance(listed, list):
        raise ValueError(f"{reader.path}: metadata field 'other_tensors' is missing")
    expected = set()
    for e in other:
        for nm in _expert_names(e):
            if nm not in listed:
                raise ValueError(f"tensor {nm} of the model is missing from the checkpoint {reader.path}")
            reader.check(nm, e.tensor.dtype, e.full_shape, "model tensor")
            expected.add(nm)
    unknown = [k for k in listed if k not in expected]
    if unknown:
        raise ValueError(f"tensor {unknown[0]} of the checkpoint {reader.path} is not a tensor of the model")
    extra = sorted(set(reader.keys()) - known - expected)
    if extra:
        raise ValueError(f"tensor {extra[0]} of the checkpoint {reader.path} is not named by its metadata")
    return Plan(dense, plans, other)


# ----------------------------------------------------------------------------------------------- install


def _install_dense(model, reader: CheckpointReader, p: _Dense, storage: str) -> None:
    st = read_linear(reader, p.name, p.meta)
    install_linear(
        model,
        p.name,
        residual=st.residual,
        smooth=st.smooth,
        act_format=st.act_format,
        lora_down=st.lora_down,
        lora_up=st.lora_up,
        lora_config=p.lora,
        input_amax=st.input_amax,
        bias=st.bias,
        storage=storage,
        glu=p.glu,
    )


def _install_group(model, reader: CheckpointReader, p: _StoredExpertGroup, storage: str) -> None:
    seq = model.get_submodule(p.name)
    first = group_rank_size(seq.ep_group)[0] * seq.num_local_experts
    projections = {}
    for proj in ("fc1", "fc2"):
        states = []
        for g in range(first, first + seq.num_local_experts):
            prefix = expert_key(p.name, g, f"linear_{proj}")
            meta = {**p.meta["projections"][proj], "input_amax": p.fields[proj][g]["input_amax"]}
            states.append(read_linear(reader, prefix, meta, with_branch=False))
        projections[proj] = ExpertProjection(
            residuals=[st.residual for st in states],
            smooths=[st.smooth for st in states],
            act_format=states[0].act_format,
            input_amax=[st.input_amax for st in states],
            biases=[st.bias for st in states],
        )
    install_experts(model, p.name, projections, lora_config=p.lora, factor_source=reader.get, storage=storage)


def install(model: nn.Module, reader: CheckpointReader, plan: Plan, storage: str, progress: bool) -> None:
    """Apply a :func:`validate` plan to ``model``."""
    work = [("dense", d) for d in plan.dense] + [("experts", g) for g in plan.expert_groups]
    show = progress and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0)
    with torch.no_grad():  # first: a fused-norm TE linear takes its norm along when it is split below
        for e in plan.other:
            e.tensor.copy_(e.local_from(reader.get(e.global_name())))
    for kind, p in tqdm(work, desc="svdq load", unit="layer", disable=not show):
        if kind == "dense":
            _install_dense(model, reader, p, storage)
        else:
            _install_group(model, reader, p, storage)


def load_megatron(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    trainable: bool = True,
    storage: str = "packed",
    progress=True,
) -> dict:
    """Validate, then install (see the module docstring); returns the checkpoint's metadata."""
    check_no_pipeline()
    with CheckpointReader(path) as reader:
        expert_groups = reader.metadata.get("expert_groups")
        if (
            isinstance(expert_groups, dict) and expert_groups
        ):  # quantized experts run as SequentialMLP (lora.framework.te_convert)
            ungroup_experts(model, tuple(expert_groups))
        plan = validate(model, reader)
        install(model, reader, plan, storage, progress)
        freeze_base(model)
        if not trainable:
            for p in model.parameters():
                p.requires_grad_(False)
        return reader.metadata
