"""Naming version "1" of one SVDQuant linear in a checkpoint: tensors and metadata, both ways.

A linear ``y = Q_a(x / s) · Q_w(R)ᵀ + (x · Aᵀ) · Bᵀ + bias`` stored under ``<name>`` (its module name):

==========================  ==========================================================================
``<name>.weight_packed``    ``PackedTensor.qdata`` of ``Q_w(R)``: uint8 ``(out, in/2)`` for nvfp4 / int4
``<name>.weight_scale``     ``PackedTensor.scale``: float8_e4m3fn ``(out, in/16)`` (nvfp4) or the 16-bit
                            multiplier ``(out, in/g)`` (int4); absent for ``none``
``<name>.weight_scale_2``   ``PackedTensor.global_scale``: float32 ``()`` (nvfp4 only)
``<name>.smooth``           float32 ``(in,)``: ``s``
``<name>.lora_down``        ``A (r, in)``, reads the raw input (absent for rank 0)
``<name>.lora_up``          ``B (out, r)``, any adapter scaling folded in (absent for rank 0)
``<name>.bias``             ``(out,)`` if the layer has a bias (in its own dtype)
``<name>.input_amax``       float32 ``()``: a static activation range, if the layer has one
==========================  ==========================================================================

Metadata of the layer (JSON)::

    {"kind": "linear", "shape": [out, in], "weight": PackedTensor.meta() (format dict, shape, dtype),
     "act_format": QuantFormat dict, "rank": r, "dtype": branch dtype, "bias": bool,
     "bias_dtype": dtype name or null, "input_amax": bool}

plus whatever the caller adds (e.g. the adapter configuration). Codes, scales and packing are those of
:class:`svdq.formats.PackedTensor` (bit-exact with nvidia-modelopt).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lora.io.container import DTYPE_NAMES, CheckpointReader, dtype_from_name
from svdq.formats import PackedTensor, QuantFormat, parse_format
from svdq.formats.packing import dtype_name

WEIGHT_KEYS = {"qdata": "weight_packed", "scale": "weight_scale", "global_scale": "weight_scale_2"}


@dataclass(frozen=True, eq=False)
class LinearState:
    """One SVDQuant linear as whole (unsharded) tensors.

    ``residual``: packed ``Q_w(R)`` ``(out × in)``; ``smooth`` ``(in,)``; ``lora_down`` ``(r × in)`` and
    ``lora_up`` ``(out × r)`` (both ``None`` for a layer without a branch, rank 0); ``bias`` ``(out,)``;
    ``input_amax`` ``()``. ``dtype``: the branch dtype (``None``: the branch's, else the residual's).
    """

    residual: PackedTensor
    smooth: Tensor
    act_format: QuantFormat
    lora_down: Tensor | None = None
    lora_up: Tensor | None = None
    bias: Tensor | None = None
    input_amax: Tensor | None = None
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "act_format", parse_format(self.act_format))
        out_f, in_f = self.shape
        if tuple(self.smooth.shape) != (in_f,):
            raise ValueError(f"smooth has shape {tuple(self.smooth.shape)}, expected ({in_f},)")
        if self.lora_down is not None and self.lora_down.shape[0] == 0 and self.lora_up is not None:
            object.__setattr__(self, "lora_down", None)  # rank 0: no branch
            object.__setattr__(self, "lora_up", None)
        if (self.lora_down is None) != (self.lora_up is None):
            raise ValueError("lora_down and lora_up must both be given or both be None")
        if self.lora_down is not None:
            r = self.lora_down.shape[0]
            if tuple(self.lora_down.shape) != (r, in_f) or tuple(self.lora_up.shape) != (out_f, r):
                raise ValueError(
                    f"branch shapes {tuple(self.lora_down.shape)} / {tuple(self.lora_up.shape)} do not fit "
                    f"the residual {(out_f, in_f)}"
                )
        if self.bias is not None and tuple(self.bias.shape) != (out_f,):
            raise ValueError(f"bias has shape {tuple(self.bias.shape)}, expected ({out_f},)")
        if self.input_amax is not None and self.input_amax.numel() != 1:
            raise ValueError(f"input_amax must be a scalar, got shape {tuple(self.input_amax.shape)}")
        if self.dtype is None:
            dt = self.lora_down.dtype if self.lora_down is not None else self.residual.dtype
            object.__setattr__(self, "dtype", dt)

    @property
    def shape(self) -> tuple[int, int]:
        out_f, in_f = self.residual.shape
        return out_f, in_f

    @property
    def rank(self) -> int:
        return 0 if self.lora_down is None else int(self.lora_down.shape[0])


# ------------------------------------------------------------------------------------------- write


def residual_tensors(prefix: str, state: LinearState) -> dict[str, Tensor]:
    """The tensors of ``state`` except the branch: packed weight, smooth, bias, input_amax."""
    out = {f"{prefix}.{WEIGHT_KEYS[k]}": t for k, t in state.residual.to_tensors().items()}
    out[f"{prefix}.smooth"] = state.smooth.detach().float()
    if state.bias is not None:
        out[f"{prefix}.bias"] = state.bias.detach()
    if state.input_amax is not None:
        out[f"{prefix}.input_amax"] = state.input_amax.detach().float().reshape(())
    return out


def linear_tensors(prefix: str, state: LinearState) -> dict[str, Tensor]:
    """Every tensor of ``state`` under ``prefix`` (see the module docstring)."""
    out = residual_tensors(prefix, state)
    if state.lora_down is not None:
        out[f"{prefix}.lora_down"] = state.lora_down.detach()
        out[f"{prefix}.lora_up"] = state.lora_up.detach()
    return out


def linear_meta(state: LinearState) -> dict[str, Any]:
    """The JSON description of ``state`` (see the module docstring)."""
    return {
        "kind": "linear",
        "shape": list(state.shape),
        "weight": state.residual.meta(),
        "act_format": state.act_format.to_dict(),
        "rank": state.rank,
        "dtype": DTYPE_NAMES[state.dtype],
        "bias": state.bias is not None,
        "bias_dtype": None if state.bias is None else DTYPE_NAMES[state.bias.dtype],
        "input_amax": state.input_amax is not None,
    }


# ------------------------------------------------------------------------------------------- read


def _field(meta: dict, key: str, who: str, kind=None):
    if key not in meta:
        raise ValueError(f"{who}: metadata field {key!r} is missing")
    value = meta[key]
    if kind is not None and not isinstance(value, kind):
        raise ValueError(f"{who}: metadata field {key!r} = {value!r} is not a {kind.__name__}")
    return value


def parse_linear_meta(meta: dict, who: str) -> dict[str, Any]:
    """Validated fields of a layer's metadata: ``shape``, ``weight_format``, ``weight_dtype``,
    ``act_format``, ``rank``, ``dtype``, ``bias``, ``input_amax`` (Python / torch values)."""
    if not isinstance(meta, dict):
        raise ValueError(f"{who}: layer metadata is not an object")
    shape = _field(meta, "shape", who, list)
    if len(shape) != 2 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ValueError(f"{who}: metadata field 'shape' = {shape!r} is not [out, in]")
    weight = _field(meta, "weight", who, dict)
    try:
        weight_format = QuantFormat.from_dict(_field(weight, "format", who, dict))
        act_format = QuantFormat.from_dict(_field(meta, "act_format", who, dict))
        weight_format.check_shape(tuple(shape))
    except ValueError as exc:
        raise ValueError(f"{who}: bad format in metadata: {exc}") from exc
    if list(_field(weight, "shape", who, list)) != shape:
        raise ValueError(f"{who}: metadata field 'weight.shape' {weight['shape']} != 'shape' {shape}")
    wdt = _field(weight, "dtype", who, str)
    try:
        dtype_name(dtype_from_name(wdt, who))
    except ValueError as exc:
        raise ValueError(f"{who}: metadata field 'weight.dtype': {exc}") from exc
    rank = _field(meta, "rank", who, int)
    bias = _field(meta, "bias", who, bool)
    if rank < 0:
        raise ValueError(f"{who}: metadata field 'rank' = {rank} is negative")
    return {
        "shape": (shape[0], shape[1]),
        "weight_format": weight_format,
        "weight_dtype": dtype_from_name(wdt, who),
        "act_format": act_format,
        "rank": rank,
        "dtype": dtype_from_name(_field(meta, "dtype", who, str), who),
        "bias": bias,
        "bias_dtype": dtype_from_name(_field(meta, "bias_dtype", who, str), who) if bias else None,
        "input_amax": bool(_field(meta, "input_amax", who, bool)),
    }


def residual_specs(prefix: str, fields: dict) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Expected ``{tensor: (dtype, shape)}`` of the non-branch tensors of a layer (from its fields)."""
    fmt, shape, wdt = fields["weight_format"], fields["shape"], fields["weight_dtype"]
    out_f, in_f = shape
    name = fmt.name
    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    if name in ("nvfp4", "int4"):
        specs["qdata"] = (torch.uint8, (out_f, in_f // 2))
        specs["scale"] = (torch.float8_e4m3fn if name == "nvfp4" else wdt, fmt.scale_shape(shape))
        if name == "nvfp4":
            specs["global_scale"] = (torch.float32, ())
    elif name == "fp8":
        specs["qdata"] = (torch.float8_e4m3fn, shape)
        specs["scale"] = (torch.float32, fmt.scale_shape(shape))
    else:
        specs["qdata"] = (wdt, shape)
    out = {f"{prefix}.{WEIGHT_KEYS[k]}": v for k, v in specs.items()}
    out[f"{prefix}.smooth"] = (torch.float32, (in_f,))
    if fields["bias"]:
        out[f"{prefix}.bias"] = (fields["bias_dtype"], (out_f,))
    if fields["input_amax"]:
        out[f"{prefix}.input_amax"] = (torch.float32, ())
    return out


def linear_specs(prefix: str, fields: dict) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Expected ``{tensor: (dtype, shape)}`` of every tensor of a layer."""
    out = residual_specs(prefix, fields)
    r = fields["rank"]
    if r:
        out_f, in_f = fields["shape"]
        out[f"{prefix}.lora_down"] = (fields["dtype"], (r, in_f))
        out[f"{prefix}.lora_up"] = (fields["dtype"], (out_f, r))
    return out


def check_specs(reader: CheckpointReader, specs: dict, who: str) -> None:
    """Every tensor of ``specs`` exists in ``reader`` with its dtype and shape (``ValueError`` naming it)."""
    for name, (dtype, shape) in specs.items():
        reader.check(name, dtype, shape, who)


def read_linear(reader: CheckpointReader, prefix: str, meta: dict, with_branch: bool = True) -> LinearState:
    """The :class:`LinearState` stored under ``prefix`` with layer metadata ``meta``; validates every
    tensor's dtype and shape first (``ValueError`` naming the tensor). ``with_branch=False``: the
    branch is stored elsewhere (expert groups) and left ``None``."""
    fields = parse_linear_meta(meta, prefix)
    specs = linear_specs(prefix, fields) if with_branch else residual_specs(prefix, fields)
    check_specs(reader, specs, prefix)
    packed = {k: reader.get(f"{prefix}.{v}") for k, v in WEIGHT_KEYS.items() if f"{prefix}.{v}" in specs}
    residual = PackedTensor.from_tensors(
        packed,
        {
            "format": fields["weight_format"].to_dict(),
            "shape": list(fields["shape"]),
            "dtype": dtype_name(fields["weight_dtype"]),
        },
    )

    def get(key: str) -> Tensor | None:
        return reader.get(f"{prefix}.{key}") if f"{prefix}.{key}" in specs else None

    return LinearState(
        residual=residual,
        smooth=reader.get(f"{prefix}.smooth"),
        act_format=fields["act_format"],
        lora_down=get("lora_down"),
        lora_up=get("lora_up"),
        bias=get("bias"),
        input_amax=get("input_amax"),
        dtype=fields["dtype"],
    )
