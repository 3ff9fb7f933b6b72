"""The fold (svdq/DESIGN.md §6) and the dequantized residual base for fused experts
(:class:`svdq.experts.SVDQExperts`, §13), one expert at a time, on tensors.

    from lora.io.fold_experts import expert_factors, fold_projection, residual_base
    A, B = expert_factors(module.fc1)                      # (E, r, in), (E, out, r): every layout expanded
    folded = fold_projection(module.fc1, smoothing="fold") # per expert: PackedTensor + fold errors
    W_b = residual_base(module.fc1)                        # (E, out, in) float64: Q_w(R_e)·diag(1/s_e)

Per expert ``e`` of a projection (``E`` experts, ``out × in`` each, rank ``r``): residual ``Q_w(R_e)``
``(out, in)`` in smoothed coordinates, smoothing ``s_e`` ``(in,)`` (fc1: one ``(in,)`` for all experts,
fc2: ``(E, in)``), factors ``A_e`` ``(r, in)`` / ``B_e`` ``(out, r)`` — a shared factor (``shared-down`` /
``shared-up`` layouts) is the same tensor for every expert. The effective weight in raw coordinates is
``T_e = Q_w(R_e)·diag(1/s_e) + B_e·A_e``; the fold of each expert is :func:`lora.fold.fold_residual`
(each expert its own NVFP4 global scale, as the residuals are stored).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lora.fold import fold_residual
from svdq.experts import ExpertProjection
from svdq.formats import PackedTensor
from svdq.solvers.shared_basis import SHARED_DOWN, SHARED_UP

__all__ = ["FoldedExpert", "expert_factors", "expert_smooth", "fold_projection", "residual_base"]


def expert_factors(proj: ExpertProjection) -> tuple[Tensor, Tensor]:
    """``(A (E, r, in), B (E, out, r))`` of ``proj`` (its dtype, detached): a shared factor repeated for
    every expert (a view, no copy)."""
    E = proj.num_experts
    A, B = proj.lora_down.detach(), proj.lora_up.detach()
    if proj.layout == SHARED_DOWN:
        A = A.unsqueeze(0).expand(E, *A.shape)  # (E, r, in)
    if proj.layout == SHARED_UP:
        B = B.unsqueeze(0).expand(E, *B.shape)  # (E, out, r)
    return A, B


def expert_smooth(proj: ExpertProjection) -> Tensor:
    """The smoothing ``s`` of every expert, float32 ``(E, in)`` (fc1's shared ``(in,)`` repeated)."""
    s = proj.smooth.detach().float()
    return s.unsqueeze(0).expand(proj.num_experts, -1) if s.dim() == 1 else s  # (E, in)


def residual_base(proj: ExpertProjection) -> Tensor:
    """``W_b = Q_w(R_e)·diag(1/s_e)`` for every expert: float64 ``(E, out, in)`` (either storage mode)."""
    q = proj.residual_weight(torch.float32).double()  # (E, out, in)
    return q / expert_smooth(proj).double().unsqueeze(1)


@dataclass(frozen=True)
class FoldedExpert:
    """One expert's folded projection: ``packed`` ``Q_w(T_e·diag(1/s'))`` (the layer's weight format),
    ``smooth`` ``s'`` ``(in,)`` and ``errors`` (:func:`lora.fold.fold_errors`: ``weight_err``,
    ``delta_rel``)."""

    packed: PackedTensor
    smooth: Tensor
    errors: dict


def fold_projection(proj: ExpertProjection, smoothing: str = "fold") -> list[FoldedExpert]:
    """Fold the branch of every expert of ``proj`` into its residual (``smoothing`` as in
    :func:`lora.fold.fold_residual`: ``"fold"`` gives raw-coordinate weights, ``s' = 1``); ``proj`` is not
    changed. The weights are re-quantized from the projection's dtype (as :mod:`lora.io.folded_hf`)."""
    q = proj.residual_weight(torch.float32)  # (E, out, in) smoothed coordinates
    s = expert_smooth(proj)  # (E, in)
    A, B = expert_factors(proj)
    out = []
    for e in range(proj.num_experts):
        packed, new_s, errors, _, _ = fold_residual(
            q[e],
            s[e],
            A[e],
            B[e],
            fmt=proj.weight_format,
            smoothing=smoothing,
            quant_dtype=proj.residual_dtype,
        )
        out.append(FoldedExpert(packed, new_s, errors))
    return out
