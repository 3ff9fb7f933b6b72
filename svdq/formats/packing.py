"""Packed (real) quantized tensors: `PackedTensor` and 4-bit nibble packing.

Two 4-bit codes share one byte, neighbours along the last dimension. The nibble order follows
nvidia-modelopt, which uses *different* orders for its two 4-bit formats:

- nvfp4 (``NVFP4QTensor``): element ``2j`` in the LOW nibble, ``2j+1`` in the HIGH nibble;
- int4  (``INT4QTensor``):  element ``2j`` in the HIGH nibble, ``2j+1`` in the LOW nibble.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .config import QuantFormat

_TENSOR_KEYS = ("qdata", "scale", "global_scale")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (only the three supported input dtypes)."""
    for name, dt in _DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"unsupported dtype {dtype}; expected one of {list(_DTYPES)}")


def pack_nibbles(codes: Tensor, even_low: bool) -> Tensor:
    """Pack 4-bit codes ``(..., K)`` (uint8 values 0..15, K even) into bytes ``(..., K // 2)``.

    ``even_low=True``: byte j = codes[2j] | codes[2j+1] << 4 (nvfp4 order);
    ``even_low=False``: byte j = codes[2j] << 4 | codes[2j+1] (int4 order).
    """
    even, odd = codes[..., 0::2], codes[..., 1::2]
    if even_low:
        return (odd << 4) | even
    return (even << 4) | odd


def unpack_nibbles(packed: Tensor, even_low: bool) -> Tensor:
    """Inverse of :func:`pack_nibbles`: bytes ``(..., K // 2)`` -> uint8 codes ``(..., K)``."""
    lo, hi = packed & 0x0F, packed >> 4
    even, odd = (lo, hi) if even_low else (hi, lo)
    return torch.stack((even, odd), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


@dataclass(frozen=True, eq=False)
class PackedTensor:
    """A tensor stored in a quantized format. Immutable; holds plain tensors only.

    ``K`` is the last dimension of ``shape``, ``g`` the format's group size.

    ========  ===============================  ==============================  ======================
    format    ``qdata``                        ``scale``                       ``global_scale``
    ========  ===============================  ==============================  ======================
    nvfp4     uint8 ``(..., K/2)``, 2 E2M1     float8_e4m3fn ``(..., K/16)``   float32 ``()``
              codes per byte (bit 3 = sign)    block scale                     g = amax / (6 * 448)
    int4      uint8 ``(..., K/2)``, 2 codes    ``dtype`` ``(..., K/g)``:       ``None``
              per byte, code = q + 8           multiplier 7 / amax(group)
    fp8       float8_e4m3fn, ``shape``         float32 ``()`` or ``(..., 1)``  ``None``
    none      the tensor itself (``dtype``)    ``None``                        ``None``
    ========  ===============================  ==============================  ======================

    Dequantization: nvfp4 ``e2m1[code] * (scale * global_scale)``; int4 ``(code - 8) / scale``;
    fp8 ``qdata * scale``.  Note that the int4 ``scale`` is the *reciprocal* of the usual step size,
    as in modelopt's ``INT4QTensor``.

    Attributes:
        fmt: the format.
        shape: the original tensor's shape.
        dtype: the original tensor's dtype (float32, bfloat16 or float16).
    """

    fmt: QuantFormat
    shape: tuple[int, ...]
    dtype: torch.dtype
    qdata: Tensor
    scale: Tensor | None = None
    global_scale: Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.fmt, QuantFormat):
            raise ValueError(f"PackedTensor.fmt must be a QuantFormat, got {self.fmt!r}")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        dtype_name(self.dtype)  # validates
        self._validate()

    def _validate(self) -> None:
        fmt, shape = self.fmt, self.shape
        fmt.check_shape(shape)
        name = fmt.name
        packed_shape = (*shape[:-1], shape[-1] // 2) if shape else ()
        if name in ("nvfp4", "int4"):
            scale_dtype = torch.float8_e4m3fn if name == "nvfp4" else self.dtype
            _expect(self.qdata, "qdata", torch.uint8, packed_shape)
            _expect(self.scale, "scale", scale_dtype, fmt.scale_shape(shape))
            if name == "nvfp4":
                _expect(self.global_scale, "global_scale", torch.float32, ())
            else:
                _expect(self.global_scale, "global_scale", None)
        elif name == "fp8":
            _expect(self.qdata, "qdata", torch.float8_e4m3fn, shape)
            _expect(self.scale, "scale", torch.float32, fmt.scale_shape(shape))
            _expect(self.global_scale, "global_scale", None)
        else:
            _expect(self.qdata, "qdata", self.dtype, shape)
            _expect(self.scale, "scale", None)
            _expect(self.global_scale, "global_scale", None)

    @property
    def nbytes(self) -> int:
        """Bytes taken by all stored tensors."""
        return sum(t.numel() * t.element_size() for t in self.to_tensors().values())

    @property
    def device(self) -> torch.device:
        return self.qdata.device

    def to(self, device: torch.device | str) -> PackedTensor:
        """A copy with every tensor on ``device``."""
        moved = {k: v.to(device) for k, v in self.to_tensors().items()}
        return PackedTensor.from_tensors(moved, self.meta())

    def to_tensors(self) -> dict[str, Tensor]:
        """The stored tensors as a flat dict ``{"qdata", "scale"?, "global_scale"?}`` (contiguous)."""
        out = {}
        for key in _TENSOR_KEYS:
            t = getattr(self, key)
            if t is not None:
                out[key] = t.contiguous()
        return out

    def meta(self) -> dict[str, Any]:
        """JSON-friendly description: ``{"format": {...}, "shape": [...], "dtype": "bfloat16"}``."""
        return {"format": self.fmt.to_dict(), "shape": list(self.shape), "dtype": dtype_name(self.dtype)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> PackedTensor:
        """Rebuild from :meth:`to_tensors` and :meth:`meta`; raises ``ValueError`` on any mismatch."""
        unknown = set(tensors) - set(_TENSOR_KEYS)
        if unknown:
            raise ValueError(f"unknown PackedTensor tensors {sorted(unknown)}")
        if "qdata" not in tensors:
            raise ValueError("PackedTensor tensors need 'qdata'")
        dt = meta.get("dtype")
        if dt not in _DTYPES:
            raise ValueError(f"unsupported dtype {dt!r} in PackedTensor meta")
        return cls(
            fmt=QuantFormat.from_dict(meta["format"]),
            shape=tuple(meta["shape"]),
            dtype=_DTYPES[dt],
            qdata=tensors["qdata"],
            scale=tensors.get("scale"),
            global_scale=tensors.get("global_scale"),
        )


def _expect(t: Tensor | None, what: str, dtype: torch.dtype | None, shape: tuple[int, ...] = ()) -> None:
    if dtype is None:
        if t is not None:
            raise ValueError(f"PackedTensor.{what} must be None for this format")
        return
    if not isinstance(t, Tensor):
        raise ValueError(f"PackedTensor.{what} must be a tensor of dtype {dtype}")
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise ValueError(
            f"PackedTensor.{what}: expected dtype {dtype} and shape {tuple(shape)}, "
            f"got {t.dtype} {tuple(t.shape)}"
        )
