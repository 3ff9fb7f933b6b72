"""Naming version "1" of a fused experts module (:class:`svdq.experts.SVDQExperts`) in a torch checkpoint.

The module at ``<name>`` (e.g. ``model.layers.0.mlp.experts``) is stored per projection ``<p>`` (``fc1``,
``fc2``) with the linear spellings of :mod:`lora.io.naming`, every tensor stacked over the ``E`` experts
(expert-major), the shared factor stored once:

=============================  =======================================================================
``<name>.<p>.weight_packed``   ``(E, out, in/2)`` uint8 (nvfp4 / int4), ``(E, out, in)`` (fp8 / none)
``<name>.<p>.weight_scale``    ``(E, out, in/16)`` float8_e4m3fn (nvfp4), ``(E, out, in/g)`` (int4),
                               ``(E,)`` / ``(E, out, 1)`` float32 (fp8 per tensor / channel)
``<name>.<p>.weight_scale_2``  ``(E,)`` float32 (nvfp4: each expert's global scale)
``<name>.<p>.smooth``          float32 ``(in,)`` (fc1, shared) or ``(E, in)`` (fc2)
``<name>.<p>.lora_down``       shared-down ``(r, in)``, else ``(E, r, in)`` (branch dtype)
``<name>.<p>.lora_up``         shared-up ``(out, r)``, else ``(E, out, r)``
``<name>.<p>.bias``            ``(E, out)`` if the experts have biases (GPT-OSS)
``<name>.<p>.input_amax``      float32 ``(E,)`` static ranges (0: that expert dynamic), if set
=============================  =======================================================================

Metadata (the document's ``"experts"`` map)::

    {"kind": "fused-experts", "handler": handler name, "class": the replaced class name,
     "num_experts": E, "hidden": H, "intermediate": I,
     "projections": {"fc1" | "fc2": {"shape": [E, out, in], "weight": one expert's PackedTensor.meta(),
                     "act_format": QuantFormat dict, "layout", "rank", "dtype", "smooth_shape",
                     "bias": bool, "bias_dtype", "input_amax": bool}}}
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lora.io.container import DTYPE_NAMES, CheckpointReader, dtype_from_name
from lora.io.naming import WEIGHT_KEYS, check_specs, residual_specs
from svdq.experts import ExpertResiduals, ProjectionState, SVDQExperts
from svdq.formats import QuantFormat
from svdq.solvers.shared_basis import LAYOUTS, SHARED_DOWN, SHARED_UP

__all__ = ["experts_meta", "experts_specs", "experts_tensors", "parse_experts_meta", "read_experts"]

KIND = "fused-experts"
PROJECTIONS = ("fc1", "fc2")


def _states(name: str, layer: SVDQExperts) -> dict[str, ProjectionState]:
    if layer.storage != "packed":
        raise ValueError(
            f"{name}: storage={layer.storage!r} keeps only the dequantized residuals; export needs 'packed'"
        )
    return {p: proj.state() for p, proj in layer.projections().items()}


def experts_tensors(name: str, layer: SVDQExperts) -> dict[str, Tensor]:
    """Every tensor of ``layer`` under ``name`` (see the module docstring)."""
    out = {}
    for p, st in _states(name, layer).items():
        prefix = f"{name}.{p}"
        for k, t in st.residual.tensors.items():
            out[f"{prefix}.{WEIGHT_KEYS[k]}"] = t.detach()
        out[f"{prefix}.smooth"] = st.smooth.detach().float()
        out[f"{prefix}.lora_down"] = st.lora_down.detach()
        out[f"{prefix}.lora_up"] = st.lora_up.detach()
        if st.bias is not None:
            out[f"{prefix}.bias"] = st.bias.detach()
        if st.input_amax is not None:
            out[f"{prefix}.input_amax"] = st.input_amax.detach().float()
    return out


def experts_meta(name: str, layer: SVDQExperts) -> dict[str, Any]:
    """The JSON description of ``layer`` (see the module docstring)."""
    projections = {}
    for p, st in _states(name, layer).items():
        projections[p] = {
            "shape": list(st.residual.shape),
            "weight": dict(st.residual.meta),
            "act_format": st.act_format.to_dict(),
            "layout": st.layout,
            "rank": st.rank,
            "dtype": DTYPE_NAMES[st.dtype],
            "smooth_shape": list(st.smooth.shape),
            "bias": st.bias is not None,
            "bias_dtype": None if st.bias is None else DTYPE_NAMES[st.bias.dtype],
            "input_amax": st.input_amax is not None,
        }
    return {
        "kind": KIND,
        "handler": layer.handler,
        "class": layer.source_class,
        "num_experts": layer.num_experts,
        "hidden": layer.hidden_size,
        "intermediate": layer.intermediate_size,
        "projections": projections,
    }


def _field(meta: dict, key: str, who: str, kind=None):
    if not isinstance(meta, dict) or key not in meta:
        raise ValueError(f"{who}: metadata field {key!r} is missing")
    value = meta[key]
    if kind is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
        raise ValueError(f"{who}: metadata field {key!r} = {value!r} is not a {kind.__name__}")
    return value


def parse_experts_meta(meta: dict, who: str) -> dict[str, Any]:
    """Validated fields of an experts module's metadata (Python / torch values)."""
    if _field(meta, "kind", who, str) != KIND:
        raise ValueError(f"{who}: metadata field 'kind' is {meta['kind']!r}, expected {KIND!r}")
    E = _field(meta, "num_experts", who, int)
    H = _field(meta, "hidden", who, int)
    inter = _field(meta, "intermediate", who, int)
    projections = _field(meta, "projections", who, dict)
    if sorted(projections) != sorted(PROJECTIONS):
        raise ValueError(f"{who}: metadata field 'projections' has {sorted(projections)}, expected fc1, fc2")
    out = {
        "handler": _field(meta, "handler", who, str),
        "class": _field(meta, "class", who, str),
        "num_experts": E,
        "hidden": H,
        "intermediate": inter,
    }
    for p in PROJECTIONS:
        pw = f"{who}.{p}"
        pm = projections[p]
        shape = _field(pm, "shape", pw, list)
        if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape) or shape[0] != E:
            raise ValueError(f"{pw}: metadata field 'shape' = {shape!r} is not [{E}, out, in]")
        if (p == "fc1" and shape[2] != H) or (p == "fc2" and shape[1:] != [H, inter]):
            raise ValueError(f"{pw}: shape {shape} does not fit hidden {H} / intermediate {inter}")
        weight = _field(pm, "weight", pw, dict)
        try:
            wfmt = QuantFormat.from_dict(_field(weight, "format", pw, dict))
            afmt = QuantFormat.from_dict(_field(pm, "act_format", pw, dict))
            wfmt.check_shape(tuple(shape[1:]))
        except ValueError as exc:
            raise ValueError(f"{pw}: bad format in metadata: {exc}") from exc
        if list(_field(weight, "shape", pw, list)) != shape[1:]:
            raise ValueError(f"{pw}: metadata field 'weight.shape' {weight['shape']} != {shape[1:]}")
        layout = _field(pm, "layout", pw, str)
        if layout not in LAYOUTS:
            raise ValueError(f"{pw}: metadata field 'layout' = {layout!r} is not one of {LAYOUTS}")
        rank = _field(pm, "rank", pw, int)
        if rank < 0:
            raise ValueError(f"{pw}: metadata field 'rank' = {rank} is negative")
        smooth_shape = _field(pm, "smooth_shape", pw, list)
        if smooth_shape not in ([shape[2]], [E, shape[2]]):
            raise ValueError(f"{pw}: metadata field 'smooth_shape' = {smooth_shape} does not fit {shape}")
        bias = _field(pm, "bias", pw, bool)
        out[p] = {
            "shape": tuple(shape),
            "weight_meta": dict(weight),
            "weight_format": wfmt,
            "weight_dtype": dtype_from_name(_field(weight, "dtype", pw, str), pw),
            "act_format": afmt,
            "layout": layout,
            "rank": rank,
            "dtype": dtype_from_name(_field(pm, "dtype", pw, str), pw),
            "smooth_shape": tuple(smooth_shape),
            "bias": bias,
            "bias_dtype": dtype_from_name(_field(pm, "bias_dtype", pw, str), pw) if bias else None,
            "input_amax": _field(pm, "input_amax", pw, bool),
        }
    return out


def experts_specs(name: str, fields: dict) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Expected ``{tensor: (dtype, shape)}`` of every tensor of an experts module (from its fields)."""
    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for p in PROJECTIONS:
        f, prefix = fields[p], f"{name}.{p}"
        E, out_f, in_f = f["shape"]
        one = {"weight_format": f["weight_format"], "shape": (out_f, in_f), "weight_dtype": f["weight_dtype"]}
        for key, (dt, shape) in residual_specs(prefix, {**one, "bias": False, "input_amax": False}).items():
            if not key.endswith(".smooth"):
                specs[key] = (dt, (E, *shape))  # one expert's tensor, stacked: () becomes (E,)
        specs[f"{prefix}.smooth"] = (torch.float32, f["smooth_shape"])
        r = f["rank"]
        down = (r, in_f) if f["layout"] == SHARED_DOWN else (E, r, in_f)
        up = (out_f, r) if f["layout"] == SHARED_UP else (E, out_f, r)
        specs[f"{prefix}.lora_down"] = (f["dtype"], down)
        specs[f"{prefix}.lora_up"] = (f["dtype"], up)
        if f["bias"]:
            specs[f"{prefix}.bias"] = (f["bias_dtype"], (E, out_f))
        if f["input_amax"]:
            specs[f"{prefix}.input_amax"] = (torch.float32, (E,))
    return specs


def read_experts(reader: CheckpointReader, name: str, fields: dict) -> dict[str, ProjectionState]:
    """The two :class:`ProjectionState` stored under ``name``; every tensor checked first."""
    specs = experts_specs(name, fields)
    check_specs(reader, specs, name)
    out = {}
    for p in PROJECTIONS:
        f, prefix = fields[p], f"{name}.{p}"

        def get(key: str, prefix=prefix) -> Tensor | None:
            return reader.get(f"{prefix}.{key}") if f"{prefix}.{key}" in specs else None

        packed = {k: reader.get(f"{prefix}.{v}") for k, v in WEIGHT_KEYS.items() if f"{prefix}.{v}" in specs}
        out[p] = ProjectionState(
            residual=ExpertResiduals(f["weight_meta"], packed),
            smooth=get("smooth"),
            act_format=f["act_format"],
            lora_down=get("lora_down"),
            lora_up=get("lora_up"),
            bias=get("bias"),
            input_amax=get("input_amax"),
            dtype=f["dtype"],
        )
    return out
