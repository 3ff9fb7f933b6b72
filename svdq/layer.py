"""``SVDQLinear``: a 4-bit residual path plus a trainable 16-bit low-rank branch.

    y = Q_a(x / s) · Q_w(R)ᵀ  +  (x · Aᵀ) · Bᵀ  +  bias

``x (..., in)``, ``s (in,)`` smoothing, ``R (out × in)`` the frozen residual in smoothed coordinates,
``A = lora_down (r × in)`` (reads the raw input), ``B = lora_up (out × r)``. ``A`` and ``B`` are
trainable parameters; residual, scales, smoothing and bias are frozen buffers. Activation quantization
has straight-through gradients; its block / group scales are always computed per call (per token and
channel group). The per-tensor range (NVFP4 global scale, FP8 per-tensor scale) is either

* **dynamic** (``input_amax is None``): ``max|x/s|`` of each call's input tensor, or
* **static** (``input_amax``, a float32 scalar buffer set by :meth:`SVDQLinear.set_input_amax`, e.g. by
  ``svdq.quantize(..., act_range="static")`` from a calibration pass): the calibrated ``max|x/s|``; larger
  values clip (NVFP4 block scales saturate at E4M3's 448, FP8 codes at ±448) and get no gradient.

INT4 activations (per-group scales only) and per-channel FP8 have no per-tensor range: always dynamic.

The residual is held in storage mode ``"fake"`` (dequantized, buffer ``residual``) or ``"packed"`` (4-bit
codes and scales, buffers ``residual_<key>``); both give identical outputs. Residual storage and activation
range are shared with ``lora.base.SVDQBase``: :mod:`svdq.residual` lists their tensors. The layer's own:
``lora_down (r, in)`` and ``lora_up (out, r)`` parameters and ``bias (out,)`` buffer (or ``None``), all in
the layer dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from svdq.formats import PackedTensor, QuantFormat, parse_format, trusted_inputs
from svdq.kernels import triton_available
from svdq.residual import ResidualStorage, StaticActRange, check_storage, quantize_activation
from svdq.solvers.linear import SVDQResult

__all__ = ["SVDQLinear"]


class SVDQLinear(StaticActRange, ResidualStorage, nn.Module):
    """See the module docstring. Build it with :meth:`from_result`."""

    _fake_storage_hint = "; use storage='packed'"

    def __init__(
        self,
        residual: PackedTensor,
        smooth: Tensor,
        lora_down: Tensor,
        lora_up: Tensor,
        bias: Tensor | None = None,
        act_format: QuantFormat | str = "nvfp4",
        storage: str = "packed",
        dtype: torch.dtype = torch.float32,
        input_amax: Tensor | float | None = None,
    ):
        super().__init__()
        check_storage(storage)
        out_f, in_f = residual.shape
        r = lora_down.shape[0]
        if lora_down.shape != (r, in_f) or lora_up.shape != (out_f, r) or smooth.shape != (in_f,):
            raise ValueError(
                f"inconsistent shapes: residual {tuple(residual.shape)}, lora_down {tuple(lora_down.shape)}, "
                f"lora_up {tuple(lora_up.shape)}, smooth {tuple(smooth.shape)}"
            )
        self.in_features, self.out_features, self.rank = in_f, out_f, r
        self.act_format = parse_format(act_format)
        self.lora_down = nn.Parameter(lora_down.detach().to(dtype).clone())
        self.lora_up = nn.Parameter(lora_up.detach().to(dtype).clone())
        self.register_buffer("smooth", smooth.detach().float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype).clone())
        self.register_buffer("input_amax", None)  # None: dynamic activation range
        if input_amax is not None:
            self.set_input_amax(input_amax)
        self._init_residual(residual, storage, dtype)  # buffer `residual` or `residual_<key>`

    @classmethod
    def from_result(
        cls,
        result: SVDQResult,
        bias: Tensor | None = None,
        act_format: QuantFormat | str = "nvfp4",
        storage: str = "packed",
        dtype: torch.dtype = torch.float32,
        input_amax: Tensor | float | None = None,
    ) -> SVDQLinear:
        return cls(
            result.residual,
            result.smooth,
            result.lora_down,
            result.lora_up,
            bias,
            act_format,
            storage,
            dtype,
            input_amax,
        )

    def _keep_dequantized(self, weight: Tensor) -> None:
        self.register_buffer("residual", weight)

    def _dequantized(self) -> Tensor:
        return self.residual

    @property
    def residual_dtype(self) -> torch.dtype:
        """The layer dtype (that of ``lora_down``)."""
        return self.lora_down.dtype

    def forward(self, x: Tensor) -> Tensor:
        with trusted_inputs():  # a NaN input shows in the output anyway: no per-call host sync
            xq = quantize_activation(x, self.smooth, self.act_format, self.input_amax)
        u = F.linear(x, self.lora_down.to(x.dtype))  # (..., r)
        base = None
        if self.storage == "packed" and triton_available():
            from svdq.kernels.dequant_w4 import dequant_mm, dequant_mm_preferred
            from svdq.kernels.grouped_w4 import W4Weight, grouped_w4_applies, grouped_w4_mm

            x2 = xq.reshape(-1, self.in_features)  # (M, in)
            residual = self.packed_residual()
            if grouped_w4_applies(x2, residual):
                w4 = W4Weight.of(residual)
                if not dequant_mm_preferred(x2, w4):  # dequantize in the prologue, the branch in the epilogue
                    branch = dict(u=u.reshape(-1, self.rank), lora_up=self.lora_up) if self.rank else {}
                    y = grouped_w4_mm(x2, w4, None, **branch).reshape(*x.shape[:-1], self.out_features)
                    return y if self.bias is None else y + self.bias.to(x.dtype)
                base = dequant_mm(x2, w4).reshape(*x.shape[:-1], self.out_features)  # 16-bit W + cuBLAS
        if base is None:
            with trusted_inputs():
                base = F.linear(xq, self.residual_weight(x.dtype))
        y = base + F.linear(u, self.lora_up.to(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
            f"weight={self.weight_format}, act={self.act_format}, storage={self.storage}, "
            f"act_range={self.act_range}"
        )


def install_svdq_linear(
    model: nn.Module,
    name: str,
    *,
    residual: PackedTensor,
    smooth: Tensor,
    act_format: QuantFormat | str,
    lora_down: Tensor | None = None,
    lora_up: Tensor | None = None,
    bias: Tensor | None = None,
    input_amax: Tensor | float | None = None,
    storage: str = "packed",
    dtype: torch.dtype | None = None,
) -> SVDQLinear:
    """Replace the ``nn.Linear`` at ``name`` of ``model`` by an :class:`SVDQLinear` of the given tensors
    (``residual (out × in)`` packed, ``smooth (in,)``, ``lora_down (r × in)`` / ``lora_up (out × r)``,
    ``None``: an empty rank-0 branch), on the replaced layer's device, in ``dtype`` (default: its weight
    dtype); returns it. The plain-torch installer: :func:`svdq.quantize` and the torch family of
    ``lora.install`` use it."""
    old = model.get_submodule(name)
    dtype = dtype or old.weight.dtype
    out_f, in_f = residual.shape
    down = lora_down if lora_down is not None else torch.zeros(0, in_f, dtype=dtype)  # (0 × in)
    up = lora_up if lora_up is not None else torch.zeros(out_f, 0, dtype=dtype)  # (out × 0)
    layer = SVDQLinear(residual, smooth, down, up, bias, act_format, storage, dtype, input_amax)
    layer = layer.to(old.weight.device)
    model.set_submodule(name, layer)
    return layer
