"""``ExpertResiduals``: the packed residuals ``Q_w(R_i)`` of the ``E`` experts of one projection, stacked.

Each expert is quantized as its own tensor (own NVFP4 global scale / FP8 per-tensor scale, as
:func:`svdq.solvers.expert_group.decompose_expert_group` returns them); stacking keeps one tensor per
kind. ``E`` experts, ``out × in`` each, ``g`` the int4 group size::

    qdata         nvfp4, int4: uint8 (E, out, in/2)      two 4-bit codes per byte
                  fp8: float8_e4m3fn (E, out, in)        the codes
                  none: dtype (E, out, in)               the residual itself
    scale         nvfp4: float8_e4m3fn (E, out, in/16)   block scales
                  int4: dtype (E, out, in/g)             reciprocal step sizes
                  fp8: float32 (E,) or (E, out, 1)       per expert tensor or per channel
    global_scale  nvfp4: float32 (E,)                    per expert tensor

Expert ``i`` (:meth:`ExpertResiduals.expert`) is exactly the :class:`~svdq.formats.PackedTensor` it was
stacked from, and :meth:`ExpertResiduals.dequantize` equals stacking each expert's ``dequantize`` bit for
bit (the same element-wise operations, the per-expert scale broadcast).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from svdq.formats import PackedTensor, QuantFormat, dequantize, unpack_nibbles
from svdq.formats import fp8 as _fp8
from svdq.formats import int4 as _int4
from svdq.formats import nvfp4 as _nvfp4

__all__ = ["ExpertResiduals"]

_KEYS = ("qdata", "scale", "global_scale")


def _per_tensor_scale(fmt: QuantFormat) -> str | None:
    """The key whose per-expert value is a scalar (stacked to ``(E,)``), if any."""
    if fmt.name == "nvfp4":
        return "global_scale"
    if fmt.name == "fp8" and not fmt.per_channel:
        return "scale"
    return None


@dataclass(frozen=True, eq=False)
class ExpertResiduals:
    """Stacked packed residuals of ``E`` experts (see the module docstring). ``meta``: one expert's
    ``PackedTensor.meta()`` (format, ``[out, in]``, dtype); ``tensors``: the stacked tensors by key."""

    meta: dict[str, Any]
    tensors: dict[str, Tensor]

    def __post_init__(self) -> None:
        unknown = set(self.tensors) - set(_KEYS)
        if unknown or "qdata" not in self.tensors:
            raise ValueError(
                f"ExpertResiduals tensors must be {_KEYS[:1]} + optional scales, got {sorted(self.tensors)}"
            )
        E = self.num_experts
        for key, t in self.tensors.items():
            if t.dim() == 0 or t.shape[0] != E:
                raise ValueError(
                    f"ExpertResiduals.{key} has shape {tuple(t.shape)}; expected {E} experts first"
                )
        self.expert(0)  # validates one expert's layout (dtypes, shapes) through PackedTensor
        if E > 1:
            self.expert(E - 1)

    @classmethod
    def from_packed(cls, residuals: Sequence[PackedTensor]) -> ExpertResiduals:
        """Stack per-expert packed residuals of one format, shape and dtype."""
        if not residuals:
            raise ValueError("ExpertResiduals needs at least one expert")
        meta = residuals[0].meta()
        for i, p in enumerate(residuals):
            if p.meta() != meta:
                raise ValueError(f"expert {i}: residual {p.meta()} differs from expert 0's {meta}")
        keys = residuals[0].to_tensors().keys()
        return cls(meta, {k: torch.stack([p.to_tensors()[k] for p in residuals]) for k in keys})

    @property
    def fmt(self) -> QuantFormat:
        return QuantFormat.from_dict(self.meta["format"])

    @property
    def num_experts(self) -> int:
        return int(self.tensors["qdata"].shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(E, out, in)``."""
        out_f, in_f = self.meta["shape"]
        return self.num_experts, int(out_f), int(in_f)

    @property
    def dtype(self) -> torch.dtype:
        return _dtype(self.meta)

    def expert(self, i: int) -> PackedTensor:
        """Expert ``i``'s :class:`PackedTensor` (views of the stacked tensors)."""
        return PackedTensor.from_tensors({k: t[i] for k, t in self.tensors.items()}, self.meta)

    def to(self, device: torch.device | str) -> ExpertResiduals:
        return ExpertResiduals(self.meta, {k: t.to(device) for k, t in self.tensors.items()})

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``(E, out, in)`` in float32 cast to ``dtype``; equals ``stack(dequantize(expert(i)))``."""
        fmt, t = self.fmt, self.tensors
        if fmt.name == "none":
            return t["qdata"].to(dtype)
        E = self.num_experts
        if fmt.name == "nvfp4":
            codes = unpack_nibbles(t["qdata"], even_low=True)
            out = _nvfp4.decode(codes, t["scale"], t["global_scale"].reshape(E, 1, 1))
        elif fmt.name == "int4":
            out = _int4.decode(unpack_nibbles(t["qdata"], even_low=False), t["scale"], fmt.group_size)
        else:
            scale = t["scale"].reshape(E, 1, 1) if not fmt.per_channel else t["scale"]
            out = _fp8.decode(t["qdata"], scale)
        return out.to(dtype)

    def dequantize_loop(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Reference: each expert dequantized on its own, stacked."""
        return torch.stack([dequantize(self.expert(i), dtype) for i in range(self.num_experts)])


def _dtype(meta: dict) -> torch.dtype:
    from svdq.formats.packing import _DTYPES

    return _DTYPES[meta["dtype"]]
