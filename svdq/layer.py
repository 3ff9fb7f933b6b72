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

Storage modes give identical outputs:
* ``"fake"``: the dequantized residual is held (``out × in`` in the layer dtype);
* ``"packed"``: the 4-bit codes and scales are held and dequantized on the fly (memory-saving mode for
  fine-tuning: ~4.5 bits per weight instead of 16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from svdq.formats import PackedTensor, QuantFormat, dequantize, fake_quant, parse_format, trusted_inputs
from svdq.modules import set_submodule
from svdq.solvers.linear import SVDQResult

STORAGE_MODES = ("fake", "packed")
ACT_RANGES = ("static", "dynamic")


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


class StaticActRange:
    """The activation-range part of an SVDQuant layer (:class:`SVDQLinear`, ``lora.base.SVDQBase``):
    needs ``smooth (in,)``, ``act_format`` and an ``input_amax`` buffer (``None``: dynamic ranges)."""

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


class SVDQLinear(StaticActRange, nn.Module):
    """See the module docstring. Build it with :meth:`from_result`."""

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
        if storage not in STORAGE_MODES:
            raise ValueError(f"storage must be one of {STORAGE_MODES}, got {storage!r}")
        out_f, in_f = residual.shape
        r = lora_down.shape[0]
        if lora_down.shape != (r, in_f) or lora_up.shape != (out_f, r) or smooth.shape != (in_f,):
            raise ValueError(
                f"inconsistent shapes: residual {tuple(residual.shape)}, lora_down {tuple(lora_down.shape)}, "
                f"lora_up {tuple(lora_up.shape)}, smooth {tuple(smooth.shape)}"
            )
        self.in_features, self.out_features, self.rank = in_f, out_f, r
        self.act_format = parse_format(act_format)
        self.storage = storage
        self.weight_format = residual.fmt
        self.lora_down = nn.Parameter(lora_down.detach().to(dtype).clone())
        self.lora_up = nn.Parameter(lora_up.detach().to(dtype).clone())
        self.register_buffer("smooth", smooth.detach().float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype).clone())
        self.register_buffer("input_amax", None)  # None: dynamic activation range
        if input_amax is not None:
            self.set_input_amax(input_amax)
        self._residual_meta = residual.meta()
        if storage == "fake":
            self.register_buffer("residual", dequantize(residual, torch.float32).to(dtype))
        else:
            for key, t in residual.to_tensors().items():
                self.register_buffer(f"residual_{key}", t.clone())

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

    def packed_residual(self) -> PackedTensor:
        """The residual as a :class:`PackedTensor` (re-quantized losslessly from ``fake`` storage)."""
        if self.storage == "packed":
            tensors = {k[len("residual_") :]: b for k, b in self.named_buffers() if k.startswith("residual_")}
            return PackedTensor.from_tensors(tensors, self._residual_meta)
        raise RuntimeError("fake storage keeps only the dequantized residual; use storage='packed'")

    def residual_weight(self, dtype: torch.dtype) -> Tensor:
        """Dequantized ``Q_w(R)`` (out × in) in ``dtype``; the same values in both storage modes."""
        if self.storage == "fake":
            return self.residual.to(dtype)
        return dequantize(self.packed_residual(), torch.float32).to(self.lora_down.dtype).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        xs = self.smoothed_input(x)
        with trusted_inputs():  # a NaN input shows in the output anyway: no per-call host sync
            xq = fake_quant(xs, self.act_format, global_amax=self.input_amax)
            base = F.linear(xq, self.residual_weight(x.dtype))
        branch = F.linear(F.linear(x, self.lora_down.to(x.dtype)), self.lora_up.to(x.dtype))
        y = base + branch
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
    set_submodule(model, name, layer)
    return layer
