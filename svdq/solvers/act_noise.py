"""Activation-quantization error in the branch fit of an expert group (svdq/DESIGN.md §23).

Expert ``i`` computes ``ŷ = Q_w(R_i)·Q_a(x/s) + B_i·A·x`` with ``R_i = D_i·diag(s)``, ``D_i = W_i − B_i·A``
(the branch reads the raw ``x``). With ``e = x/s − Q_a(x/s)`` (smoothed coordinates), ``ε = s⊙e`` (raw) and
``Q_w(R_i) = R_i − Δ_i`` the output error is, exactly,

    y − ŷ = D_i·ε + Δ_i·Q_a(x/s)                                   (1)

and, for a fixed quantized residual ``R̂_i`` (the refinement's target ``T_i = W_i − R̂_i·diag(1/s)``),

    y − ŷ = (T_i − B_i·A)·x + R̂_i·e.                               (2)

From (1): the first term is ``tr(D_i·N_i·D_iᵀ)`` with ``N_i = Σ_t ε_t·ε_tᵀ``; the second is proportional to
the residual, estimated as ``ρ²·tr(D_i·C_i·D_iᵀ)`` with ``ρ²`` the measured relative output error of
``Q_w`` on the residual (:func:`weight_noise_terms`). So the branch minimizing the total fits the covariance
``Ĉ_i + N_i/ρ²`` (the ``noise_covs`` of :mod:`svdq.solvers.shared_basis`).
From (2): ``Σ_t ‖(T_i − B_i·A)·x_t + R̂_i·e_t‖² = ‖(F_i − B_i·A)·Xᵀ‖² + const`` with
``F_i = T_i + R̂_i·K_i·C_i⁻¹``, ``K_i = Σ_t e_t·x_tᵀ`` (:func:`cross_target`): fitting ``F_i`` instead of
``T_i`` minimizes the exact error, the part of ``R̂_i·e`` linear in ``x`` absorbed by the branch.

All moments are estimated from each expert's sampled tokens (by default their diagonals only), scaled
by ``w_i = n_i / k_i`` to the scale of the routed-token sums ``C_i``. Tensors: ``X (E × k × in)`` raw
sampled tokens (zero rows after each expert's ``k_i``), ``Xq (E × k × in)`` their ``Q_a(X_i/s_i)``, ``s``
``(in,)`` or ``(E × in)``, float32; results float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["act_error_moments", "cross_target", "weight_noise_terms"]

_F64 = torch.float64


def _s3(s: Tensor) -> Tensor:
    return (s.reshape(1, 1, -1) if s.dim() == 1 else s.unsqueeze(1)).to(_F64)


def act_error_moments(
    X: Tensor, Xq: Tensor, s: Tensor, weight: Tensor, diagonal: bool = True
) -> tuple[Tensor, Tensor]:
    """``(N, K)``, each ``(E × in × in)`` float64: ``N_i = w_i·Σ_t ε_t·ε_tᵀ`` (raw coordinates,
    ``ε = x − s⊙Q_a(x/s)``) and ``K_i = w_i·Σ_t e_t·x_tᵀ`` (``e = x/s − Q_a(x/s)``, ``x`` raw);
    ``weight (E,)`` the ``w_i``. ``diagonal`` (what the expert groups use): only the diagonals (per-channel
    sums), the off-diagonal entries set to 0 — a few hundred sampled tokens per expert estimate the
    ``in²`` entries too noisily (svdq/DESIGN.md §23), and per-block rounding errors of different channels
    are nearly uncorrelated."""
    s3 = _s3(s)
    X64 = X.to(_F64)
    e = X64 / s3 - Xq.to(_F64)  # (E × k × in) smoothed
    eps = e * s3  # (E × k × in) raw
    w = weight.to(_F64)
    if diagonal:
        n_diag = w[:, None] * eps.square().sum(1)  # (E × in)
        k_diag = w[:, None] * (e * X64).sum(1)  # (E × in)
        return torch.diag_embed(n_diag), torch.diag_embed(k_diag)
    w3 = w.view(-1, 1, 1)
    return w3 * (eps.mT @ eps), w3 * (e.mT @ X64)


def weight_noise_terms(R: Tensor, Rq: Tensor, X: Tensor, s: Tensor, weight: Tensor) -> Tensor:
    """``[num, den]`` float64 of ``ρ² = num / den``, ``num = Σ_i w_i‖(Rq_i − R_i)·(X_i/s_i)ᵀ‖²``,
    ``den = Σ_i w_i‖R_i·(X_i/s_i)ᵀ‖²``: the relative output error of the weight quantization alone on the
    residuals ``R (E × out × in)`` (smoothed coordinates, ``Rq`` its quantization). Local sums (an
    expert-parallel caller all-reduces them before dividing)."""
    Xs = X / _s3(s).float()
    w = weight.to(_F64)
    num = (w * (Xs @ (Rq - R).mT).square().sum((1, 2), dtype=_F64)).sum()
    den = (w * (Xs @ R.mT).square().sum((1, 2), dtype=_F64)).sum()
    return torch.stack([num, den])


def cross_target(T: Tensor, Rq: Tensor, K: Tensor, covs: Tensor) -> Tensor:
    """``F_i = T_i + Rq_i·K_i·Ĉ_i⁻¹`` ``(E × out × in)`` float64 for targets ``T (E × out × in)``, quantized
    residuals ``Rq (E × out × in)`` (smoothed), ``K (E × in × in)`` of :func:`act_error_moments` and the
    (damped, positive definite) covariances ``covs (E × in × in)``; experts with ``K_i = 0`` keep ``T_i``."""
    F = T.to(_F64).clone()
    for i in range(T.shape[0]):
        if not bool(K[i].any()):
            continue
        L = torch.linalg.cholesky(covs[i].to(_F64))
        G = Rq[i].to(_F64) @ K[i]  # (out × in)
        F[i] += torch.cholesky_solve(G.mT, L).mT  # G·Ĉ⁻¹ (Ĉ symmetric)
    return F
