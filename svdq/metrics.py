"""Relative errors, with one rule for the degenerate cases: ``0/0 → 0``, ``x/0 → inf``, never NaN.

relative_error(num_sq, den_sq)        # sqrt(num_sq / den_sq) of squared sums (floats or 0-d tensors)
relative_norm(diff, ref)              # ‖diff‖ / ‖ref‖ of tensors, in float64
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def relative_error(num_sq: float | Tensor, den_sq: float | Tensor) -> float:
    """``sqrt(num_sq / den_sq)`` for squared errors, with ``num_sq`` clamped at 0; ``0/0 → 0``, ``x/0 → inf``.

    Python floats are divided as floats; 0-d tensors (e.g. float64 sums all-reduced over a process group)
    with torch's division and square root, on their device.
    """
    if isinstance(num_sq, Tensor) or isinstance(den_sq, Tensor):
        num = torch.as_tensor(num_sq, dtype=torch.float64).clamp_min(0.0)
        den = torch.as_tensor(den_sq, dtype=torch.float64)
        if float(den) > 0.0:
            return float((num / den.to(num.device)).sqrt())
        return 0.0 if float(num) == 0.0 else math.inf
    num, den = max(num_sq, 0.0), den_sq
    if den > 0.0:
        return math.sqrt(num / den)
    return 0.0 if num == 0.0 else math.inf


def relative_norm(diff: Tensor, ref: Tensor, as_tensor: bool = False) -> float | Tensor:
    """``‖diff‖ / ‖ref‖`` (Frobenius norms of tensors of any shape, computed in float64); ``0/0 → 0``,
    ``x/0 → inf``. A float, or a float64 0-d tensor on the inputs' device with ``as_tensor`` (no host
    synchronization)."""
    num, den = diff.double().norm(), ref.double().norm()
    rel = torch.where(den > 0, num / den.clamp_min(1e-300), torch.where(num == 0, 0.0, math.inf))
    return rel if as_tensor else rel.item()
