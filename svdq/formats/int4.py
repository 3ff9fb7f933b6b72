"""INT4: symmetric, one scale per group of ``G`` (32, 64 or 128) elements along the last dimension.

The definition follows ``modelopt.torch.quantization.qtensor.INT4QTensor`` bit for bit (see the notes
below for how it differs from "scale = amax / 7, code = round(w / scale)"). For ``x`` of shape
``(..., K)`` with dtype ``D`` and groups ``k`` of ``G`` consecutive elements:

    m_k   = rnd_D( rnd_D(1 / amax_k) * 7 )      multiplier, stored in dtype D (the *reciprocal* scale)
    q     = clamp( round_half_even( rnd_D(x * m_k) ), -8, 7 )
    code  = q + 8                               offset binary, 0..15
    x_hat = rnd_D( q / m_k )

``rnd_D`` rounds a float32 result to ``D`` (a no-op for float32): the arithmetic is done in float32 with
the roundings that modelopt's computation in the input dtype performs, so results do not depend on how a
backend evaluates 16-bit arithmetic. ``1 / amax * 7`` is how PyTorch evaluates modelopt's ``7 / amax``.

Notes (where this differs from svdq/DESIGN.md §2's ``scale = amax / 7``, ``code = round(w / scale)``):

- the stored per-group scale is the multiplier ``7 / amax`` in the input dtype (bf16/fp16 for 16-bit
  weights, float32 for float32 inputs); dequantization divides by it;
- quantization multiplies by the rounded multiplier and, for 16-bit inputs, rounds the product to the
  input dtype before rounding to an integer (a double rounding: a product within 2**-8 relative of a tie
  may round the other way);
- codes are stored offset by +8 and packed with the EVEN element in the HIGH nibble;
- an all-zero group gives ``m = inf`` (modelopt stores inf too). Here its codes are 8 (value 0), where
  modelopt casts NaN (= 0 * inf) to uint8. The same happens where ``1 / amax`` overflows (float32
  ``amax < 2.9e-39``; float16 ``amax < ~1.1e-4``): such groups dequantize to exactly 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import INT4_MAX, require_finite


def _round_to(t: Tensor, dtype: torch.dtype) -> Tensor:
    """Round float32 ``t`` to ``dtype`` and back (identity for float32)."""
    return t if dtype == torch.float32 else t.to(dtype).float()


def _groups(t: Tensor, group_size: int) -> Tensor:
    return t.reshape(*t.shape[:-1], t.shape[-1] // group_size, group_size)


def encode(x: Tensor, group_size: int, fmt: object = "int4") -> tuple[Tensor, Tensor]:
    """Quantize ``x`` ``(..., K)`` to unpacked codes.

    Returns:
        ``(codes, multiplier)``: uint8 ``(..., K)`` with values 0..15 (= q + 8) and the per-group
        multiplier ``7 / amax`` in ``x.dtype``, shape ``(..., K // group_size)``.
    """
    dtype = x.dtype
    xg = _groups(x.float(), group_size)
    amax = xg.abs().amax(dim=-1)  # exact in every dtype; NaN/Inf propagate
    require_finite(amax, x.shape, fmt)
    m = _round_to(_round_to(torch.reciprocal(amax), dtype) * INT4_MAX, dtype)
    q = _round_to(xg * m.unsqueeze(-1), dtype).round().clamp(-(INT4_MAX + 1), INT4_MAX)
    q = torch.where(torch.isnan(q), torch.zeros_like(q), q)  # 0 * inf in an all-zero / tiny group
    codes = (q + (INT4_MAX + 1)).to(torch.uint8)
    return codes.reshape(x.shape), m.to(dtype)


def decode(codes: Tensor, multiplier: Tensor, group_size: int) -> Tensor:
    """``(codes - 8) / multiplier``, rounded to the multiplier's dtype, returned as float32 ``(..., K)``."""
    q = _groups(codes.float() - (INT4_MAX + 1), group_size)
    out = _round_to(q / multiplier.float().unsqueeze(-1), multiplier.dtype)
    return out.reshape(codes.shape)
