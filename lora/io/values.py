"""Value domains of the tensors of an svdq checkpoint (naming version "1", :mod:`lora.io.naming`), checked
when a tensor is read (:meth:`lora.io.container.CheckpointReader.get`).

=====================  =========================================================================
tensor (name suffix)   allowed values
=====================  =========================================================================
``.smooth``            finite, > 0 (the smoothing divides the input)
``.input_amax``        finite, ≥ 0 (a static activation range)
``.weight_scale_2``    finite, > 0 (the nvfp4 global scale)
``.weight_scale``      float8_e4m3fn (nvfp4 block scales): finite (no NaN code), > 0; other dtypes
                       (the int4 multiplier ``7 / amax``, the fp8 scale): not NaN, > 0 (``inf`` is the
                       int4 multiplier of an all-zero group)
``.weight_packed``     floating (fp8 codes, unquantized ``none`` weights): finite; uint8 (packed 4-bit
                       codes): every nibble is a valid code, nothing to check
``.lora_down`` /
``.lora_up`` /
``.bias``              finite
any other float        no NaN
=====================  =========================================================================
"""

from __future__ import annotations

import torch
from torch import Tensor

FINITE_POSITIVE = (".smooth", ".weight_scale_2")


def _as_float(t: Tensor) -> Tensor:
    return (
        t.float() if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.float16, torch.bfloat16) else t
    )


def value_problem(name: str, t: Tensor) -> str | None:
    """Why the values of tensor ``name`` are outside its domain (see the module docstring), or ``None``."""
    if not t.is_floating_point() or t.numel() == 0:
        return None
    x = _as_float(t)
    nan = bool(torch.isnan(x).any())
    finite = bool(torch.isfinite(x).all())
    if name.endswith(FINITE_POSITIVE) or (name.endswith(".weight_scale") and t.dtype == torch.float8_e4m3fn):
        if not finite:
            return "must be finite (it holds NaN or inf)"
        if bool((x <= 0).any()):
            return f"must be > 0 (minimum {float(x.min()):.3g})"
        return None
    if name.endswith(".weight_scale"):
        if nan:
            return "must not hold NaN"
        if bool((x <= 0).any()):
            return f"must be > 0 (minimum {float(x.min()):.3g})"
        return None
    if name.endswith(".input_amax"):
        if not finite or bool((x < 0).any()):
            return f"must be finite and ≥ 0, got {x.flatten()[:4].tolist()}"
        return None
    if name.endswith((".weight_packed", ".lora_down", ".lora_up", ".bias")):
        return None if finite else "must be finite (it holds NaN or inf)"
    return "must not hold NaN" if nan else None


def check_values(name: str, t: Tensor, where: str = "") -> Tensor:
    """``t``, or ``ValueError`` naming the tensor (and ``where``) when its values are outside the domain."""
    problem = value_problem(name, t)
    if problem is not None:
        raise ValueError(f"{where}{': ' if where else ''}tensor {name} {problem}")
    return t


def first_non_finite(tensors) -> str | None:
    """The name of the first tensor of ``{name: tensor}`` (or ``(name, tensor)`` pairs) holding NaN or inf."""
    items = tensors.items() if isinstance(tensors, dict) else tensors
    for name, t in items:
        if isinstance(t, Tensor) and t.is_floating_point() and t.numel():
            if not bool(torch.isfinite(_as_float(t.detach())).all()):
                return name
    return None
