"""The frozen quantized path of an SVDQuant layer: the 4-bit residual and its activation range.

Both SVDQuant layers compute ``Q_a(x / s) · Q_w(R)ᵀ`` on the frozen path: :class:`svdq.layer.SVDQLinear`
(plain torch) and ``lora.base.SVDQBase`` (a Megatron linear whose weight is the residual). This module
is the one implementation of how that path is held — :class:`ResidualStorage`, in one of
:data:`STORAGE_MODES` — and of its per-tensor activation range — :class:`StaticActRange`, one of
:data:`ACT_RANGES`. Both storage modes give bit-identical outputs:

* ``"fake"``: the dequantized residual is held in the layer dtype;
* ``"packed"``: the 4-bit codes and scales are held and dequantized on the fly for each forward
  (~4.5 bits per weight instead of 16: the memory-saving mode for fine-tuning).

Tensors, by state-dict name relative to the layer. ``out × in`` is the weight shape (for ``SVDQBase``
this rank's tensor-parallel shard), ``dtype`` the layer dtype, ``g`` the int4 group size::

    smooth                 float32 (in,)                       smoothing s; the 4-bit path reads x / s
    input_amax             float32 () or None                  static range max|x/s|; None: dynamic

    storage="fake": Q_w(R) dequantized (in float32, then cast to dtype)
    residual               dtype (out, in)                     SVDQLinear: a buffer
    inner.weight           dtype (out, in)                     SVDQBase: the linear's frozen weight

    storage="packed": the tensors of the residual's PackedTensor (svdq.formats.packing)
    residual_qdata         nvfp4, int4: uint8 (out, in/2)      two 4-bit codes per byte
                           fp8: float8_e4m3fn (out, in)        the codes
                           none: R's dtype (out, in)           the residual itself
    residual_scale         nvfp4: float8_e4m3fn (out, in/16)   block scales
                           int4: R's dtype (out, in/g)         reciprocal step sizes
                           fp8: float32 () or (out, 1)         per tensor or per channel
    residual_global_scale  nvfp4: float32 ()                   per-tensor scale
    inner.weight           SVDQBase: dtype (0,)                an empty placeholder (see SVDQBase)

The residual's format, shape and dtype (``PackedTensor.meta()``) are kept as ``_residual_meta``, outside
the state dict. Activation block / group scales are computed per call from the input; only the
per-tensor range (NVFP4 global scale, per-tensor FP8 scale) can be static.
"""

from __future__ import annotations

import torch
from torch import Tensor

from svdq.formats import PackedTensor, QuantFormat, dequantize, fake_quant, parse_format

STORAGE_MODES = ("fake", "packed")
ACT_RANGES = ("static", "dynamic")


def check_storage(storage: str) -> None:
    """``ValueError`` unless ``storage`` is one of :data:`STORAGE_MODES`."""
    if storage not in STORAGE_MODES:
        raise ValueError(f"storage must be one of {STORAGE_MODES}, got {storage!r}")


def static_range_supported(fmt: QuantFormat | str) -> bool:
    """Whether activations of ``fmt`` have a per-tensor range that can be calibrated (NVFP4's global
    scale, per-tensor FP8); INT4, per-channel FP8 and ``none`` have none."""
    fmt = parse_format(fmt)
    return fmt.name == "nvfp4" or (fmt.name == "fp8" and not fmt.per_channel)


def checked_input_amax(amax: Tensor | float, fmt: QuantFormat, who: str) -> Tensor:
    """``amax`` as a float32 0-d tensor after checking that ``fmt`` takes a static range and that the value
    is finite and > 0 (``ValueError`` naming ``who`` otherwise)."""
    if not static_range_supported(fmt):
        raise ValueError(
            f"{who}: activation format {fmt} has no per-tensor range; static input_amax needs nvfp4 or fp8"
        )
    t = torch.as_tensor(amax).detach().to(torch.float32)
    if t.numel() != 1:
        raise ValueError(f"{who}: input_amax must be one value, got shape {tuple(t.shape)}")
    t = t.reshape(())
    if not bool(torch.isfinite(t)) or not float(t) > 0:
        raise ValueError(f"{who}: input_amax must be finite and > 0, got {float(t)}")
    return t


def quantize_activation(
    x: Tensor, smooth: Tensor | None, fmt: QuantFormat, global_amax: Tensor | None
) -> Tensor:
    """``Q_a(x / s)`` in ``x``'s dtype with straight-through gradients — the one place the frozen path
    quantizes activations: the fused Triton kernel (:mod:`svdq.kernels.act_quant`, one pass over ``x``)
    where it applies, else ``fake_quant(rnd(x / s))`` (the reference, bit-identical). ``smooth (K,)`` or
    ``None`` (``x`` already smoothed); ``global_amax``: ``None`` (dynamic) or ``()`` (static; per-channel
    fp8 also ``(..., 1)``)."""
    from svdq.kernels import triton_available

    if fmt.is_quantized and triton_available() and x.numel():
        from svdq.kernels.act_quant import fused_act_applies, quantize_act_ste

        if fused_act_applies(x, fmt, smooth):
            return quantize_act_ste(x, smooth, fmt, global_amax)[0]
    xs = x if smooth is None else (x.float() / smooth).to(x.dtype)
    return fake_quant(xs, fmt, global_amax=global_amax)


class StaticActRange:
    """The activation-range part of an SVDQuant layer: needs ``smooth (in,)``, ``act_format`` and an
    ``input_amax`` buffer (``None``: dynamic ranges)."""

    @property
    def act_range(self) -> str:
        """``"static"`` when ``input_amax`` is set, else ``"dynamic"``."""
        return "dynamic" if self.input_amax is None else "static"

    def set_input_amax(self, amax: Tensor | float | None) -> None:
        """Fix the per-tensor activation range to ``amax = max|x/s|`` of the whole input (all
        tensor-parallel shards); ``None`` goes back to dynamic. ``ValueError`` for a format without a
        per-tensor range (int4, per-channel fp8, none) or a value that is not finite and > 0."""
        if amax is None:
            self.input_amax = None
            return
        who = type(self).__name__
        self.input_amax = checked_input_amax(amax, self.act_format, who).to(self.smooth.device)

    def smoothed_input(self, x: Tensor) -> Tensor:
        """``x / s`` in ``x``'s dtype (computed in float32): what the 4-bit path quantizes."""
        return (x.float() / self.smooth).to(x.dtype)


def _dequantize_to(packed: PackedTensor, dtype: torch.dtype, device: torch.device | None) -> Tensor:
    """``packed`` dequantized in float32 (on ``device`` if given), then cast to ``dtype``: ``(out, in)``."""
    if device is not None:
        packed = packed.to(device)
    return dequantize(packed, torch.float32).to(dtype)


def _dequantize_packed(packed: PackedTensor, dtype: torch.dtype) -> Tensor:
    """``dequantize(packed, float32).to(dtype)`` ``(out, in)``: by the Triton kernel of
    :mod:`svdq.kernels.dequant_w4` (one pass, bit for bit the same) where it applies, else in PyTorch."""
    from svdq.kernels import triton_available, use_triton

    if packed.fmt.name in ("nvfp4", "int4") and len(packed.shape) == 2 and triton_available():
        if use_triton(packed.qdata, who="dequantize_w4"):
            from svdq.kernels.dequant_w4 import dequantize_w4

            return dequantize_w4(packed, dtype)[0]
    return dequantize(packed, torch.float32).to(dtype)


class ResidualStorage:
    """The frozen residual ``Q_w(R)`` of an SVDQuant layer (an ``nn.Module``), fake or packed (see the
    module docstring).

    The layer calls :meth:`_init_residual` once (after its ``smooth`` buffer) and supplies where fake
    storage keeps the dequantized residual (:meth:`_keep_dequantized`, :meth:`_dequantized`) and the dtype
    the residual is computed in (:attr:`residual_dtype`). Sets ``storage``, ``weight_format`` and
    ``_shape = (out, in)``.
    """

    #: appended to :meth:`packed_residual`'s error in fake storage
    _fake_storage_hint = ""

    def _init_residual(
        self, residual: PackedTensor, storage: str, dtype: torch.dtype, device: torch.device | None = None
    ) -> None:
        """Hold ``residual (out × in)`` in ``storage``: dequantized to ``dtype``, or its packed tensors as
        ``residual_<key>`` buffers; on ``device`` if given (else where ``residual`` is)."""
        check_storage(storage)
        self.storage = storage
        self.weight_format = residual.fmt
        self._residual_meta = residual.meta()
        self._shape = tuple(residual.shape)
        if storage == "fake":
            self._keep_dequantized(_dequantize_to(residual, dtype, device))
        else:
            self._register_packed(residual, device)

    def _keep_dequantized(self, weight: Tensor) -> None:
        """Fake storage: hold the dequantized residual ``weight (out × in, dtype)``."""
        raise NotImplementedError

    def _dequantized(self) -> Tensor:
        """Fake storage: the dequantized residual held by :meth:`_keep_dequantized`."""
        raise NotImplementedError

    @property
    def residual_dtype(self) -> torch.dtype:
        """The dtype of the dequantized residual (the layer dtype)."""
        raise NotImplementedError

    def _register_packed(self, packed: PackedTensor, device: torch.device | None) -> None:
        for key, t in packed.to_tensors().items():
            self.register_buffer(f"residual_{key}", (t if device is None else t.to(device)).clone())

    def packed_residual(self) -> PackedTensor:
        """The residual as a :class:`PackedTensor` (packed storage; ``RuntimeError`` in fake storage)."""
        if self.storage != "packed":
            raise RuntimeError("fake storage keeps only the dequantized residual" + self._fake_storage_hint)
        tensors = {
            k[len("residual_") :]: b
            for k, b in self.named_buffers(recurse=False)
            if k.startswith("residual_")
        }
        return PackedTensor.from_tensors(tensors, self._residual_meta)

    def residual_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """Dequantized ``Q_w(R)`` ``(out × in)`` in :attr:`residual_dtype`, then cast to ``dtype`` if given;
        the same values in both storage modes (in fake storage without ``dtype``: the held tensor)."""
        if self.storage == "fake":
            weight = self._dequantized()
        else:
            weight = _dequantize_packed(self.packed_residual(), self.residual_dtype)
        return weight if dtype is None else weight.to(dtype)

    def set_residual(self, packed: PackedTensor) -> None:
        """Replace the residual (same shape) in this layer's storage mode, on ``smooth``'s device (used by
        folding); fake storage overwrites the held tensor in place."""
        if tuple(packed.shape) != self._shape:
            raise ValueError(f"residual shape {tuple(packed.shape)} != {self._shape}")
        device = self.smooth.device
        self._residual_meta = packed.meta()
        self.weight_format = packed.fmt
        if self.storage == "fake":
            with torch.no_grad():
                self._dequantized().copy_(_dequantize_to(packed, self.residual_dtype, device))
            return
        for key in [k for k in self._buffers if k.startswith("residual_")]:
            del self._buffers[key]
        self._register_packed(packed, device)
