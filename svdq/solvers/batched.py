"""Batched helpers of the solvers: quantize a stack of tensors each as its own tensor, chunked
(expert groups: one tensor per expert; the dense α search: one per smoothing candidate)."""

from __future__ import annotations

import torch
from torch import Tensor

from svdq.formats import QuantFormat, fake_quant, fp8, nvfp4

__all__ = ["chunks", "fake_quant_experts", "relative_norms"]


def chunks(n: int, per_item: int, max_elements: int) -> list[slice]:
    """Slices of ``range(n)`` holding at most ``max_elements // per_item`` items each (at least one)."""
    step = max(1, max_elements // max(per_item, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def fake_quant_experts(
    x: Tensor, fmt: QuantFormat | str, amax: Tensor | None = None, *, max_elements: int = 1 << 28
) -> Tensor:
    """Fake-quantize every ``x[i]`` of ``x (E × … × K)`` float32 **as its own tensor**, batched.

    Equals ``torch.stack([fake_quant(x[i], fmt) for i in range(E)])`` bit for bit (and
    ``dequantize(quantize_tensor(x[i], fmt))``): the per-tensor scales of NVFP4 (global FP32 scale) and FP8
    (per-tensor scale) are taken per expert, grouped formats work on any leading shape anyway. ``amax (E,)``
    replaces the per-expert ``max|x[i]|`` (e.g. the amax of the full tensor when ``x`` holds a subset of its
    rows). Runs in chunks of experts of at most ``max_elements`` elements.
    """
    fmt = QuantFormat.from_str(fmt) if isinstance(fmt, str) else fmt
    if not fmt.is_quantized:
        return x
    per_tensor = fmt.name == "nvfp4" or (fmt.name == "fp8" and not fmt.per_channel)
    out = torch.empty_like(x)
    for c in chunks(x.shape[0], x[0].numel(), max_elements):
        xc = x[c]
        if not per_tensor:
            out[c] = fake_quant(xc, fmt)
            continue
        ga = xc.abs().amax(dim=tuple(range(1, xc.dim()))) if amax is None else amax[c]
        ga = ga.float().reshape(-1, *([1] * (xc.dim() - 1)))
        if fmt.name == "nvfp4":
            out[c] = nvfp4.decode(*nvfp4.encode(xc, ga, fmt))
        else:
            out[c] = fp8.decode(*fp8.encode(xc, False, ga, fmt))
    return out


def relative_norms(diff: Tensor, ref: Tensor) -> Tensor:
    """:func:`svdq.metrics.relative_norm` of every ``diff[i]`` of ``diff (n × …)`` against the one ``ref``:
    ``(n,)`` float64 on the device, no host sync; ``0/0 → 0``, ``x/0 → inf``."""
    num = torch.linalg.vector_norm(diff.double(), dim=tuple(range(1, diff.dim())))
    den = torch.linalg.vector_norm(ref.double())
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.where(num == 0, 0.0, torch.inf))
