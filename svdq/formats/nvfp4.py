"""NVFP4: E2M1 codes, blocks of 16 along the last dimension, E4M3 block scales, FP32 global scale.

For ``x`` of shape ``(..., K)`` (K divisible by 16), blocks ``b`` of 16 consecutive elements, all
arithmetic in float32:

    amax  = max |x|                  (or a given global amax, e.g. a calibrated activation range)
    g     = amax / (6 * 448)         global scale (float32); replaced by 1 if it is 0
    s_b   = e4m3( clamp(amax_b / (6 * g), 2**-9, 448) )      block scale, 1 for an all-zero block
    y     = x / (s_b * g)
    code  = sign(y) * e2m1(|y|)      nearest of {0, .5, 1, 1.5, 2, 3, 4, 6}, ties to the even code,
                                     everything above 5 -> 6 (saturates)
    x_hat = E2M1[code] * (s_b * g)

The 4-bit code is sign-magnitude: bit 3 = (y < 0), bits 0-2 = index into {0, .5, 1, 1.5, 2, 3, 4, 6}.
This reproduces ``modelopt.torch.quantization.qtensor.NVFP4QTensor.quantize/dequantize`` bit for bit,
including its expression order (``amax_b / (6 * g)``, not ``amax_b / 6 / g``), the ``s_b == 0 -> 1`` rule
applied before the clamp, and the ``[2**-9, 448]`` clamp. One deliberate difference: when ``g`` is 0
(an all-zero tensor, or ``amax < ~3.8e-42``) modelopt produces NaN; here ``g`` becomes 1 and the output
is all zeros.

Bit-exactness holds on the same device. CPU and CUDA can differ by one ulp in ``g``: on CUDA PyTorch
divides by a Python scalar as a multiplication by its reciprocal (``amax * (1 / 2688)``), and modelopt
and this module both write ``amax / 2688``.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ._common import E2M1_MAX, E4M3_MAX, amax_all, require_finite

BLOCK = 16
E4M3_MIN_SCALE = 2.0**-9  # smallest positive E4M3 value (a subnormal)
# |y| <= 0.25 -> 0, (0.25, 0.75] -> 0.5, ... ; a value equal to a bound goes to the lower code,
# except at 0.75, 1.75 and 3.5 where the upper code is the even one.
_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_ROUND_UP_TIES = (0.75, 1.75, 3.5)
# Index 8 ("negative zero") decodes to +0.0, as in modelopt's table.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@functools.cache
def _table(name: str, device: torch.device) -> Tensor:
    values = _BOUNDS if name == "bounds" else E2M1_VALUES
    return torch.tensor(values, dtype=torch.float32, device=device)


def _blocks(x32: Tensor) -> Tensor:
    return x32.reshape(*x32.shape[:-1], x32.shape[-1] // BLOCK, BLOCK)


def compute_scales(
    x32: Tensor, global_amax: Tensor | None = None, fmt: object = "nvfp4"
) -> tuple[Tensor, Tensor]:
    """Block and global scales for a float32 tensor ``x32`` of shape ``(..., K)``.

    Returns:
        ``(block_scale, global_scale)``: float8_e4m3fn ``(..., K // 16)`` and float32 ``()``.
    """
    block_amax = _blocks(x32).abs().amax(dim=-1)  # (..., K/16); NaN/Inf propagate
    require_finite(block_amax, x32.shape, fmt)
    amax = amax_all(block_amax) if global_amax is None else global_amax.float()
    g = amax / (E2M1_MAX * E4M3_MAX)
    g = torch.where(g == 0, torch.ones_like(g), g)
    s = block_amax / (E2M1_MAX * g)
    s = torch.where(s == 0, torch.ones_like(s), s)
    return s.clamp(min=E4M3_MIN_SCALE, max=E4M3_MAX).to(torch.float8_e4m3fn), g


def encode(
    x: Tensor, global_amax: Tensor | None = None, fmt: object = "nvfp4"
) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize ``x`` ``(..., K)`` to unpacked codes.

    Returns:
        ``(codes, block_scale, global_scale)``: uint8 ``(..., K)`` with values 0..15,
        float8_e4m3fn ``(..., K // 16)``, float32 ``()``.
    """
    x32 = x.float().contiguous()
    block_scale, g = compute_scales(x32, global_amax, fmt)
    y = _blocks(x32) / (block_scale.float() * g).unsqueeze(-1)
    return e2m1_codes(y).reshape(x.shape), block_scale, g


def e2m1_codes(y: Tensor) -> Tensor:
    """Nearest E2M1 code (uint8, sign-magnitude 0..15) of already-scaled float32 values ``y``.

    Ties go to the even code and ``|y| > 5`` saturates to 6. Shared by :func:`encode` and by
    quantizers that choose their own scales (e.g. GPTQ, column by column with fixed block scales).
    """
    a = y.abs()
    magnitude = torch.bucketize(a, _table("bounds", a.device), out_int32=True).to(torch.uint8)
    tie_up = functools.reduce(torch.logical_or, [a == t for t in _ROUND_UP_TIES])
    return magnitude + tie_up.to(torch.uint8) + ((y < 0).to(torch.uint8) << 3)


def e2m1_values(codes: Tensor) -> Tensor:
    """float32 E2M1 values of codes 0..15 (same shape)."""
    return _table("values", codes.device)[codes.long()]


def decode(codes: Tensor, block_scale: Tensor, global_scale: Tensor) -> Tensor:
    """``E2M1[codes] * (block_scale * global_scale)`` as float32, shape of ``codes`` ``(..., K)``."""
    values = _table("values", codes.device)[codes.long()]
    out = _blocks(values) * (block_scale.float() * global_scale).unsqueeze(-1)
    return out.reshape(codes.shape)
