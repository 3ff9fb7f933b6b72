"""FP8 E4M3: one float32 scale per tensor, or per row (slice along the last dimension).

For ``x`` of shape ``(..., K)``, all arithmetic in float32, ``amax`` over the tensor (shape ``()``) or
over the last dimension (shape ``(..., 1)``), or a given amax:

    a     = 1 if amax <= 2**-24 else amax
    m     = 448 / a                         (PyTorch evaluates this as reciprocal(a) * 448)
    s     = 1 / m                           stored scale, ~= amax / 448
    code  = e4m3( clamp(x * m, -448, 448) ) round to nearest even
    x_hat = code * s

This reproduces modelopt's FP8 fake quantization (``tensor_quant.scaled_e4m3`` on CPU, i.e.
``fp8_eager``) bit for bit. Note that modelopt's *packed* ``FP8QTensor`` uses a different expression
(``x / (amax / 448)`` evaluated in the input dtype, no clamp, no tiny-amax guard), whose codes can differ
in the last bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import E4M3_MAX, abs_amax_lastdim, amax_all, require_finite

TINY_AMAX = 1.0 / (1 << 24)  # amax at or below this is treated as 1 (everything quantizes to ~0)


def encode(
    x: Tensor, per_channel: bool, global_amax: Tensor | None = None, fmt: object = "fp8"
) -> tuple[Tensor, Tensor]:
    """Quantize ``x`` ``(..., K)``.

    Returns:
        ``(codes, scale)``: float8_e4m3fn with ``x``'s shape, float32 ``()`` (per tensor) or
        ``(..., 1)`` (per channel).
    """
    x32 = x.float()
    amax = abs_amax_lastdim(x32, keepdim=True) if per_channel else amax_all(x32)
    require_finite(amax, x.shape, fmt)
    if global_amax is not None:
        amax = global_amax.float()
    safe = torch.where(amax <= TINY_AMAX, torch.ones_like(amax), amax)
    m = E4M3_MAX / safe
    scale = 1 / m
    codes = (x32 * m).clamp(min=-E4M3_MAX, max=E4M3_MAX).to(torch.float8_e4m3fn)
    return codes, scale


def decode(codes: Tensor, scale: Tensor) -> Tensor:
    """``codes * scale`` as float32, shape of ``codes``."""
    return codes.float() * scale
