"""Small helpers shared by the format modules."""

from __future__ import annotations

import contextlib
import contextvars

import torch
from torch import Tensor

_CHECK_FINITE = contextvars.ContextVar("svdq_check_finite", default=True)


@contextlib.contextmanager
def trusted_inputs():
    """Skip the NaN/Inf check (one host-device sync per call) inside this block.

    For callers whose inputs are finite by construction (the decomposition, after validating the weight
    and the calibration statistics) or where a NaN would show in the output anyway (a layer's forward).
    """
    token = _CHECK_FINITE.set(False)
    try:
        yield
    finally:
        _CHECK_FINITE.reset(token)


E2M1_MAX = 6.0  # largest NVFP4 (E2M1) magnitude
E4M3_MAX = 448.0  # largest finite FP8 E4M3 (float8_e4m3fn) magnitude
INT4_MAX = 7  # symmetric int4: scale from amax / 7, codes clamped to [-8, 7]


def require_finite(amax: Tensor, shape: tuple[int, ...], fmt: object) -> None:
    """Raise ``ValueError`` if a reduction ``amax`` of a tensor of ``shape`` is NaN or infinite.

    ``amax`` reductions propagate NaN and Inf, so checking them covers every input element without an
    extra pass over the tensor (it costs one host-device sync).
    """
    if _CHECK_FINITE.get() and amax.numel() and not bool(torch.isfinite(amax).all()):
        raise ValueError(f"{fmt}: input of shape {tuple(shape)} contains NaN or Inf")


def abs_amax_lastdim(x32: Tensor, keepdim: bool = False) -> Tensor:
    """``max |x|`` over the last dimension (0 where that dimension is empty)."""
    if x32.shape[-1] == 0:
        shape = (*x32.shape[:-1], 1) if keepdim else x32.shape[:-1]
        return x32.new_zeros(shape)
    return x32.abs().amax(dim=-1, keepdim=keepdim)


def amax_all(t: Tensor) -> Tensor:
    """``max |t|`` over all elements as a 0-d tensor (0 for an empty tensor)."""
    if t.numel() == 0:
        return t.new_zeros(())
    return t.abs().amax()
