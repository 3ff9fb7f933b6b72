"""One projection (fc1 or fc2) of a group of SVDQuant experts over rows sorted by expert: the function both
grouped forms compute — :class:`svdq.experts.SVDQExperts` (fused Hugging Face experts) and
``lora.adapters.grouped_svdq`` (a Megatron ``SequentialMLP`` of 4-bit experts) — so that the kernels of
:mod:`svdq.kernels` accelerate both through one place (svdq/DESIGN.md §13, §16).

For the ``S`` rows of expert ``e`` (``ids`` sorted, ``counts`` rows per expert, ``offs`` their int32 cumsum)::

    y = Q_a(x / s_e) · Q_w(R_e)ᵀ  +  scaling · ((x_b · A_eᵀ) · B_eᵀ)  +  b_e

Tensors (``E`` experts, ``in``/``out`` the projection's features, ``r`` the rank, ``dt`` x's dtype)::

    x            dt (S, in)  rows; or (T, in) tokens gathered by ``rows (S,)`` (fc1 of fused experts)
    residual     ExpertResiduals (E, out, in) packed, or dt (E, out, in) dequantized
    smooth       float32 (in,) shared or (E, in) per expert
    input_amax   float32 (E,) static max|x/s| per expert (0: that expert dynamic), or None (all dynamic)
    lora_down    shared-down (r, in) | per-expert / shared-up (E, r, in)
    lora_up      shared-down / per-expert (E, out, r) | shared-up (out, r)
    branch_x     dt like x: what the branch reads (e.g. after adapter dropout); default x
    bias         dt (E, out) or None

The activation quantization treats each expert's rows as one tensor (its own per-tensor range), with
straight-through gradients; the residual is frozen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from svdq.experts.ops import expert_mm, quant_rows
from svdq.experts.storage import ExpertResiduals
from svdq.formats import QuantFormat, trusted_inputs
from svdq.kernels import triton_available
from svdq.solvers.shared_basis import SHARED_DOWN, SHARED_UP

__all__ = ["grouped_projection"]


def grouped_projection(
    x: Tensor,
    ids: Tensor,
    counts: list[int],
    offs: Tensor,
    *,
    residual: ExpertResiduals | Tensor,
    smooth: Tensor,
    act_format: QuantFormat,
    input_amax: Tensor | None = None,
    lora_down: Tensor | None = None,
    lora_up: Tensor | None = None,
    layout: str = SHARED_DOWN,
    scaling: float = 1.0,
    rows: Tensor | None = None,
    branch_x: Tensor | None = None,
    bias: Tensor | None = None,
    grouped: bool | None = None,
    record: Tensor | None = None,
    weight_dtype: torch.dtype | None = None,
    ranges_static: bool = False,
    quantized: tuple[Tensor, Tensor | None] | None = None,
) -> Tensor:
    """``y (S, out)`` of the module docstring. ``grouped``: ``torch._grouped_mm`` choice of
    :func:`svdq.experts.ops.expert_mm`; ``record (E,)``: updated with each expert's ``max|x/s|``;
    ``weight_dtype``: the dtype a packed residual is dequantized to (default x's) before the product;
    ``ranges_static``: the caller knows every entry of ``input_amax`` is a static range (none 0), which
    lets rows already in expert order (``rows is None``), with shared or per-expert smoothing, take the
    fused kernel (:func:`svdq.kernels.quantize_act_ste`: smoothing and each row's quantization in one pass
    over ``x``, bit-identical quantization, no host sync), which also computes ``x · Aᵀ`` for a shared
    ``lora_down`` whose branch reads ``x``.

    ``quantized = (xq (S, in), u (S, r) or None)``: the rows' ``Q_a(x / s)`` (each with its expert's static
    range) and shared-down ``u = x · Aᵀ`` already computed — by the sending rank of a 4-bit expert-parallel
    dispatch (:mod:`svdq.experts.ep_dispatch`, svdq/DESIGN.md §22) — then ``x`` is that ``xq`` and
    neither is recomputed (needs shared smoothing, a shared ``lora_down`` for ``u``, no ``rows``,
    ``branch_x`` or ``record``)."""
    dt, E = x.dtype, int(residual.shape[0])
    has_branch = lora_down is not None and lora_down.shape[-2] > 0
    A = B = u = None
    if has_branch:
        A, B = lora_down.to(dt), lora_up.to(dt)
        B = B if scaling == 1.0 else B * scaling
    if quantized is not None:
        xq, u = _check_quantized(quantized, x, smooth, has_branch, layout, rows, branch_x, record)
    elif _fused_applies(x, smooth, act_format, input_amax, ranges_static, rows, record):
        from svdq.kernels.act_quant import quantize_act_ste

        fuse_down = A is not None and layout == SHARED_DOWN and (branch_x is None or branch_x is x)
        sid = ids if smooth.dim() == 2 else None  # experts' own smoothing: each row's expert's vector
        with trusted_inputs():  # one pass over x: Q_a(x / s) with each row's expert range (and x · Aᵀ)
            xq, u = quantize_act_ste(
                x, smooth, act_format, input_amax[ids], lora_down=A if fuse_down else None, smooth_ids=sid
            )  # (S, in), (S, r) or None
    else:
        xg = x if rows is None else x[rows]  # (S, in)
        if smooth.dim() == 1:  # shared smoothing: once per token, then gathered
            xs = (x.float() / smooth).to(dt)
            xs = xs if rows is None else xs[rows]
        else:
            xs = (xg.float() / smooth[ids]).to(dt)  # (S, in)
        with trusted_inputs():  # a NaN input shows in the output anyway: no per-call host sync
            xq = quant_rows(xs, ids, act_format, E, input_amax, record)  # (S, in)
    if has_branch and u is None:
        bx = x if branch_x is None else branch_x
        if layout == SHARED_DOWN:  # one down GEMM over all tokens, before the gather
            u = F.linear(bx, A)
            u = u if rows is None else u[rows]  # (S, r)
        else:
            u = expert_mm(bx if rows is None else bx[rows], A, counts, offs, grouped)  # (S, r)
    if _kernel_applies(xq, residual):
        from svdq.kernels.dequant_w4 import dequant_lora_applies, dequant_mm, dequant_mm_preferred
        from svdq.kernels.grouped_w4 import W4Weight, grouped_w4_mm

        w4 = W4Weight.of(residual)
        if not dequant_mm_preferred(xq, w4):  # dequantize in the prologue, lora_up in the epilogue
            return _add_bias(grouped_w4_mm(xq, w4, offs, u=u, lora_up=B), bias, ids)
        if u is not None and dequant_lora_applies(xq, w4, u, B):  # per-expert lora_up only
            # [xq | u] · [deq(W_e) | B_e]ᵀ: the branch inside the base's GEMM, (S, out)
            return _add_bias(dequant_mm(xq, w4, offs, u=u, lora_up=B), bias, ids)
        y = dequant_mm(xq, w4, offs)  # many rows per expert: 16-bit weight (one pass) + cuBLAS, (S, out)
    else:
        if isinstance(residual, ExpertResiduals):
            weight = residual.dequantize(torch.float32).to(weight_dtype or dt)  # (E, out, in)
        else:
            weight = residual
        y = expert_mm(xq, weight.to(dt), counts, offs, grouped)  # (S, out)
    if u is not None:
        v = F.linear(u, B) if layout == SHARED_UP else expert_mm(u, B, counts, offs, grouped)  # (S, out)
        y = y + v
    return _add_bias(y, bias, ids)


def _check_quantized(quantized, x, smooth, has_branch, layout, rows, branch_x, record):
    """``(xq, u)`` of :func:`grouped_projection`'s ``quantized`` after its checks (``ValueError``)."""
    xq, u = quantized
    if xq is not x:
        raise ValueError("grouped_projection: with quantized=(xq, u), pass x=xq")
    if smooth.dim() != 1 or rows is not None or branch_x is not None or record is not None:
        raise ValueError(
            "grouped_projection: quantized=(xq, u) needs shared smoothing and no rows / branch_x / record"
        )
    if has_branch and (u is None or layout != SHARED_DOWN or u.shape[0] != xq.shape[0]):
        raise ValueError("grouped_projection: quantized=(xq, u) needs the shared-down u of every row")
    return xq, (u if has_branch else None)


def _fused_applies(x, smooth, fmt, input_amax, ranges_static, rows, record) -> bool:
    """Whether the fused activation kernel computes ``xq`` (and the shared-down ``u`` when the branch reads
    ``x``): static nvfp4 ranges (see :func:`grouped_projection`'s ``ranges_static``), rows in expert order,
    no range recording; shared or per-expert smoothing."""
    if not (ranges_static and input_amax is not None and fmt.name == "nvfp4" and triton_available()):
        return False
    if rows is not None or record is not None:
        return False
    from svdq.kernels.act_quant import fused_act_applies  # (imports triton)

    return fused_act_applies(x, fmt, smooth)


def _kernel_applies(xq: Tensor, residual: ExpertResiduals | Tensor) -> bool:
    if not (isinstance(residual, ExpertResiduals) and triton_available()):
        return False
    from svdq.kernels.grouped_w4 import grouped_w4_applies  # (imports triton)

    return grouped_w4_applies(xq, residual)


def _add_bias(y: Tensor, bias: Tensor | None, ids: Tensor) -> Tensor:
    return y if bias is None else y + bias.to(y.dtype)[ids]
