"""Triton helpers shared by the kernels (import only where :func:`svdq.kernels.triton_available`).

Triton's interpreter (``TRITON_INTERPRET=1``, used by the CPU tests) holds bfloat16 as raw 16-bit integers:
its float32→bfloat16 conversion truncates and its ``tl.dot`` on bfloat16 multiplies the raw bits. Kernels
therefore take a ``INTERPRET: tl.constexpr`` flag and go through :func:`to_bf16` and :func:`mma`, which do
what the GPU does (round to nearest even; bf16 products accumulated in fp32) in both cases.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def to_bf16(x, INTERPRET: tl.constexpr):
    """float32 → bfloat16, rounding to nearest even (finite inputs)."""
    if INTERPRET:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(tl.bfloat16)


@triton.jit
def mma(a, b, acc, INTERPRET: tl.constexpr):
    """``acc + a · b`` with 16-bit ``a``, ``b`` and a float32 accumulator (exact products, fp32 sums)."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def rnd_dt(v, DT: tl.constexpr, INTERPRET: tl.constexpr):
    """float32 ``v`` rounded to dtype DT (0 fp32, 1 bf16, 2 fp16) and back to float32 (RNE)."""
    if DT == 1:
        if INTERPRET:
            bits = v.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True)
        else:
            return v.to(tl.bfloat16).to(tl.float32)
    elif DT == 2:
        return v.to(tl.float16).to(tl.float32)
    else:
        return v


@triton.jit
def as_f32(v, DT: tl.constexpr, INTERPRET: tl.constexpr):
    """A DT tensor as float32. The interpreter's own bfloat16 -> float32 cast loses subnormals, so
    there bfloat16 is widened on the bits."""
    if DT == 1 and INTERPRET:
        return (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return v.to(tl.float32)


@triton.jit
def to_dt(v, DT: tl.constexpr, INTERPRET: tl.constexpr):
    """float32 ``v`` as a tensor of dtype DT (RNE), for storing."""
    if DT == 1:
        return to_bf16(v, INTERPRET)
    elif DT == 2:
        return v.to(tl.float16)
    else:
        return v
