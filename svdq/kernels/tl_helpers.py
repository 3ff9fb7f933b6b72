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
