"""`fake_quant`, `quantize_tensor`, `dequantize`: plain dispatch on ``fmt.name``."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from . import fp8, int4, nvfp4
from ._common import _CHECK_FINITE
from .config import QuantFormat, parse_format
from .packing import PackedTensor, pack_nibbles, unpack_nibbles

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FormatLike = QuantFormat | str | dict[str, Any]


# ------------------------------------------------------------------------------------ checks
def _check_input(x: Tensor, fmt: QuantFormat) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{fmt}: unsupported dtype {x.dtype}; expected float32, bfloat16 or float16")
    fmt.check_shape(tuple(x.shape))


def _global_amax(global_amax: Tensor | float | None, x: Tensor, fmt: QuantFormat) -> Tensor | None:
    """Validate a given amax and shape it for broadcasting: ``()`` or, for fp8 per channel, ``(..., 1)``."""
    if global_amax is None or fmt.name == "none":
        return None
    if fmt.name == "int4":
        raise ValueError("int4 scales are dynamic per group; global_amax is not supported")
    ga = torch.as_tensor(global_amax).detach().to(device=x.device, dtype=torch.float32)
    rows = math.prod(x.shape[:-1]) if x.dim() else 1
    if ga.numel() == 1:
        ga = ga.reshape(())
    elif fmt.per_channel and ga.numel() == rows:
        ga = ga.reshape(*x.shape[:-1], 1)
    else:
        what = f"1 or {rows} (one per row)" if fmt.per_channel else "1"
        raise ValueError(
            f"{fmt}: global_amax has {ga.numel()} elements for input shape {tuple(x.shape)}; expected {what}"
        )
    # one host-device sync: skipped for trusted callers (layers validate their static range once, when set)
    if _CHECK_FINITE.get() and not bool((torch.isfinite(ga) & (ga > 0)).all()):
        raise ValueError(f"{fmt}: global_amax must be finite and > 0")
    return ga


# ------------------------------------------------------------------------------------ core
def _encode(x: Tensor, fmt: QuantFormat, ga: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(unpacked codes, scale, global_scale) for the quantized formats."""
    if fmt.name == "nvfp4":
        return nvfp4.encode(x, ga, fmt)
    if fmt.name == "int4":
        codes, m = int4.encode(x, fmt.group_size, fmt)
        return codes, m, None
    codes, scale = fp8.encode(x, fmt.per_channel, ga, fmt)
    return codes, scale, None


def _decode(fmt: QuantFormat, codes: Tensor, scale: Tensor, global_scale: Tensor | None) -> Tensor:
    """float32 values from unpacked codes."""
    if fmt.name == "nvfp4":
        return nvfp4.decode(codes, scale, global_scale)
    if fmt.name == "int4":
        return int4.decode(codes, scale, fmt.group_size)
    return fp8.decode(codes, scale)


class _FakeQuantSTE(torch.autograd.Function):
    """Forward: quantize-dequantize. Backward: identity, zeroed where ``|x| > global_amax`` if given."""

    @staticmethod
    def forward(ctx, x: Tensor, fmt: QuantFormat, ga: Tensor | None) -> Tensor:  # type: ignore[override]
        with torch.no_grad():
            codes, scale, global_scale = _encode(x, fmt, ga)
            out = _decode(fmt, codes, scale, global_scale).to(x.dtype)
            mask = None if ga is None else x.float().abs() <= ga
        ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        if mask is not None:
            grad = torch.where(mask, grad, torch.zeros_like(grad))
        return grad, None, None


# ------------------------------------------------------------------------------------ public
def fake_quant(x: Tensor, fmt: FormatLike, global_amax: Tensor | float | None = None) -> Tensor:
    """Quantize-dequantize ``x`` ``(..., K)``; same shape and dtype, straight-through gradient.

    Args:
        x: float32 / bfloat16 / float16, any leading shape; grouping runs along the last dimension.
        fmt: a :class:`QuantFormat` (or its string / dict form).
        global_amax: a fixed range instead of ``x``'s own amax (calibrated static activations).
            nvfp4: one value (sets the global scale; block scales stay dynamic). fp8: one value, or one
            per row with ``per_channel``. int4: not allowed (``ValueError``). none: ignored.

    Gradient: the identity where ``|x| <= amax`` and 0 elsewhere. With scales from ``x`` itself (no
    ``global_amax``) every element is inside its range, so the gradient is the identity everywhere
    (an nvfp4 block maximum that lands slightly above 6 * scale after the E4M3 rounding of the block
    scale is saturated to 6 in the forward pass but still gets the identity gradient). No gradient
    flows to ``global_amax``.

    ``fake_quant(x, fmt)`` equals ``dequantize(quantize_tensor(x, fmt), x.dtype)`` exactly. For ``none`` it
    returns ``x`` itself.

    Raises:
        ValueError: bad shape for the format (message has the shape and group size), NaN/Inf in ``x``
            (not checked for ``none``), invalid ``global_amax``.
        TypeError: not a float32/bfloat16/float16 tensor.
    """
    fmt = parse_format(fmt)
    if fmt.name == "none":
        return x
    _check_input(x, fmt)
    return _FakeQuantSTE.apply(x, fmt, _global_amax(global_amax, x, fmt))


def quantize_tensor(w: Tensor, fmt: FormatLike, global_amax: Tensor | float | None = None) -> PackedTensor:
    """Quantize and pack ``w`` ``(..., K)`` (see :class:`PackedTensor` for the stored layout).

    Same arguments and errors as :func:`fake_quant`; no gradient. ``none`` stores ``w`` as it is.
    """
    fmt = parse_format(fmt)
    if fmt.name == "none":
        _check_input(w, fmt)
        return PackedTensor(fmt, tuple(w.shape), w.dtype, w.detach())
    _check_input(w, fmt)
    with torch.no_grad():
        codes, scale, global_scale = _encode(w.detach(), fmt, _global_amax(global_amax, w, fmt))
        if fmt.name in ("nvfp4", "int4"):
            codes = pack_nibbles(codes, even_low=fmt.name == "nvfp4")
    return PackedTensor(fmt, tuple(w.shape), w.dtype, codes, scale, global_scale)


def dequantize(p: PackedTensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Unpack and dequantize ``p`` to a tensor of ``p.shape`` and ``dtype``.

    Values are computed in float32 (int4: rounded to the original dtype, like its scale) and cast
    to ``dtype`` at the end.
    """
    if not isinstance(p, PackedTensor):
        raise TypeError(f"expected a PackedTensor, got {type(p).__name__}")
    fmt = p.fmt
    if fmt.name == "none":
        return p.qdata.to(dtype)
    codes = p.qdata
    if fmt.name in ("nvfp4", "int4"):
        codes = unpack_nibbles(codes, even_low=fmt.name == "nvfp4")
    return _decode(fmt, codes, p.scale, p.global_scale).to(dtype)
