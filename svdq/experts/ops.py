"""The two batched operations of :class:`svdq.experts.SVDQExperts`, on rows grouped by expert.

Rows ``(S, K)`` are sorted by expert; ``ids (S,)`` is each row's expert, ``counts`` the rows per expert
(host list) and ``offs (E,)`` int32 their cumulative sum (what ``torch._grouped_mm`` takes).

* :func:`quant_rows` — ``Q_a`` of each expert's rows **as its own tensor** (the per-tensor range of NVFP4 /
  per-tensor FP8 per expert, as :meth:`svdq.solvers.expert_group.MoEGroupResult.expert_forward` quantizes
  an expert's batch), with straight-through gradients. Equal bit for bit to ``fake_quant`` of each
  expert's rows.
* :func:`expert_mm` — ``x_i · W_iᵀ`` per expert: one ``torch._grouped_mm`` where it applies (CUDA, bf16,
  16-byte aligned dims), else a loop over the experts that got rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from svdq.formats import QuantFormat
from svdq.formats import fp8 as _fp8
from svdq.formats import nvfp4 as _nvfp4
from svdq.kernels import triton_available
from svdq.residual import quantize_activation, static_range_supported

__all__ = ["expert_mm", "grouped_mm_applies", "grouped_mm_fits", "quant_rows", "row_amax_per_expert"]


def row_amax_per_expert(x: Tensor, ids: Tensor, num_experts: int) -> Tensor:
    """``max|x|`` over each expert's rows: float32 ``(E,)`` (0 for an expert without rows)."""
    row = (
        x.detach().abs().amax(dim=-1).float() if x.shape[-1] else x.new_zeros(x.shape[0], dtype=torch.float32)
    )
    out = torch.zeros(num_experts, dtype=torch.float32, device=x.device)
    return out.scatter_reduce(0, ids, row, reduce="amax", include_self=True)


class _RowQuantSTE(torch.autograd.Function):
    """Forward: quantize-dequantize with a per-row range ``ga (S, 1)``. Backward: identity, zeroed where a
    static row's ``|x| > ga``."""

    @staticmethod
    def forward(ctx, x: Tensor, fmt: QuantFormat, ga: Tensor, static_rows: Tensor | None) -> Tensor:  # type: ignore[override]
        with torch.no_grad():
            if fmt.name == "nvfp4":
                out = _nvfp4.decode(*_nvfp4.encode(x, ga, fmt)).to(x.dtype)
            else:
                out = _fp8.decode(*_fp8.encode(x, False, ga, fmt)).to(x.dtype)
            mask = None
            if static_rows is not None:
                mask = (x.float().abs() <= ga) | ~static_rows.unsqueeze(-1)
        ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        if mask is not None:
            grad = torch.where(mask, grad, torch.zeros_like(grad))
        return grad, None, None, None


def quant_rows(
    x: Tensor,
    ids: Tensor,
    fmt: QuantFormat,
    num_experts: int,
    input_amax: Tensor | None = None,
    record: Tensor | None = None,
) -> Tensor:
    """``Q_a`` of ``x (S, K)``, each expert's rows as one tensor (see the module docstring).

    ``input_amax (E,)`` float32: static per-expert ranges; an entry ``0`` keeps that expert dynamic
    (``None``: all dynamic). ``record (E,)``: updated in place with the per-expert ``max|x|`` (for
    calibrating static ranges). Formats without a per-tensor range (int4, per-channel fp8) quantize per
    token anyway: one call for all rows.
    """
    if record is not None and x.shape[0]:
        torch.maximum(record, row_amax_per_expert(x, ids, num_experts), out=record)
    if not fmt.is_quantized:
        return x
    if not static_range_supported(fmt):
        return quantize_activation(x, None, fmt, None)
    if x.shape[0] == 0:
        return x
    amax = row_amax_per_expert(x, ids, num_experts)  # (E,) dynamic per-expert ranges
    static_rows = None
    if input_amax is not None:
        is_static = input_amax > 0  # (E,)
        amax = torch.where(is_static, input_amax.to(amax.device), amax)
        static_rows = is_static[ids]  # (S,)
    if fmt.name == "nvfp4" and triton_available():
        from svdq.kernels.act_quant import fused_act_applies, quantize_act_ste

        if fused_act_applies(x, fmt):  # the fused kernel: bit-identical, one pass
            return quantize_act_ste(x, None, fmt, amax[ids])[0]
    ga = amax[ids].unsqueeze(-1)  # (S, 1)
    return _RowQuantSTE.apply(x, fmt, ga, static_rows)


def _aligned(*dims: int) -> bool:
    return all(d > 0 and d % 8 == 0 for d in dims)  # bf16 rows of 16-byte multiples


def grouped_mm_fits(x: Tensor, weight: Tensor) -> bool:
    """Whether ``torch._grouped_mm`` can run ``x (S, K) · weight (E, N, K)ᵀ`` on this device: it exists,
    both bf16, ``K`` and ``N`` multiples of 8 (16-byte strides)."""
    return (
        hasattr(torch, "_grouped_mm")
        and x.dtype == torch.bfloat16
        and weight.dtype == torch.bfloat16
        and _aligned(x.shape[-1], weight.shape[1])
    )


def grouped_mm_applies(x: Tensor, weight: Tensor) -> bool:
    """Whether the automatic choice takes ``torch._grouped_mm``: :func:`grouped_mm_fits` on CUDA with
    compute capability ≥ 8.0."""
    return x.is_cuda and grouped_mm_fits(x, weight) and torch.cuda.get_device_capability(x.device) >= (8, 0)


def expert_mm(
    x: Tensor, weight: Tensor, counts: list[int], offs: Tensor, grouped: bool | None = None
) -> Tensor:
    """``y[rows of i] = x[rows of i] · weight[i]ᵀ``: ``x (S, K)`` sorted by expert, ``weight (E, N, K)``;
    returns ``(S, N)`` in ``x``'s dtype. ``grouped``: ``None`` uses ``torch._grouped_mm`` where
    :func:`grouped_mm_applies`, ``True`` wherever it :func:`grouped_mm_fits` (any device, e.g. a CPU
    kernel), ``False`` loops over the experts."""
    use = grouped_mm_applies(x, weight) if grouped is None else grouped and grouped_mm_fits(x, weight)
    if use:
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offs)
    pieces, start = [], 0
    for i, n in enumerate(counts):
        if n:
            pieces.append(F.linear(x[start : start + n], weight[i]))
            start += n
    if not pieces:
        return x.new_zeros(x.shape[0], weight.shape[1])
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]
