"""Quantization formats: fake quantization (straight-through gradients) and real packing.

Public API::

    from svdq.formats import QuantFormat, fake_quant, quantize_tensor, dequantize, PackedTensor

    fmt = QuantFormat("nvfp4")                  # or QuantFormat.from_str("int4-g128"), parse_format(...)
    y = fake_quant(x, fmt, global_amax=None)    # Tensor, same shape/dtype as x; STE gradient
    p = quantize_tensor(w, fmt, global_amax=None)  # PackedTensor (frozen): qdata, scale, global_scale
    w_hat = dequantize(p, dtype=torch.float32)  # == fake_quant(w, fmt) (cast to dtype), bit for bit
    tensors, meta = p.to_tensors(), p.meta()    # plain tensors + JSON-friendly meta (for safetensors)
    p2 = PackedTensor.from_tensors(tensors, meta)

Formats (grouping always along the LAST dimension, i.e. input channels; inputs float32 / bfloat16 /
float16 with any leading shape, e.g. weights ``(out, in)``, experts ``(E, out, in)``, activations
``(..., in)`` quantized dynamically per token and group):

- ``nvfp4``: E2M1 codes, blocks of 16, block scale E4M3 = e4m3(amax_b / (6 g)), global float32
  g = amax / (6 * 448) (or from a given ``global_amax``). See :mod:`svdq.formats.nvfp4`.
- ``int4``: symmetric per group of 32 / 64 (default) / 128; per-group multiplier 7 / amax stored in the
  input dtype, codes clamp(round(x * m), -8, 7) stored offset by +8. See :mod:`svdq.formats.int4`.
- ``fp8``: E4M3 with scale ~= amax / 448, per tensor or per row (``per_channel=True``).
  See :mod:`svdq.formats.fp8`.
- ``none``: identity (the tensor is kept as it is).

Every format is bit-exact with nvidia-modelopt 0.47 (``NVFP4QTensor``, ``INT4QTensor``,
``tensor_quant.scaled_e4m3``); the module docstrings list the few deliberate differences in degenerate
cases (all-zero tensors / groups). Bit-exactness holds on the same device; the same torch code runs
on CUDA, but nvfp4's global scale can differ between CPU and CUDA by one ulp (see
:mod:`svdq.formats.nvfp4`).
"""

from ._common import trusted_inputs
from .api import dequantize, fake_quant, quantize_tensor
from .config import FORMAT_NAMES, INT4_GROUP_SIZES, QuantFormat, parse_format
from .packing import PackedTensor, pack_nibbles, unpack_nibbles

__all__ = [
    "FORMAT_NAMES",
    "INT4_GROUP_SIZES",
    "PackedTensor",
    "QuantFormat",
    "dequantize",
    "fake_quant",
    "pack_nibbles",
    "parse_format",
    "quantize_tensor",
    "trusted_inputs",
    "unpack_nibbles",
]
