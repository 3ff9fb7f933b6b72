"""Smoothing vectors that move activation outliers into the weight (svdq/DESIGN.md §3 step 1)."""

from __future__ import annotations

import torch
from torch import Tensor


def smoothing_vector(x_absmax: Tensor, w_absmax: Tensor, alpha: float, eps: float = 1e-8) -> Tensor:
    """``s_j = max|X_:j|^α / max|W_:j|^(1−α)``, normalized by ``sqrt(max(s)·min(s))`` (float32, ``(in,)``).

    ``x_absmax`` and ``w_absmax`` are per input channel ``(in,)``. Channels that never saw a non-zero
    input or weight get ``s_j = 1`` before normalization, so ``s`` is always finite and positive.
    ``alpha = 0`` gives weight-only smoothing, ``alpha = 1`` activation-only.
    """
    xa = x_absmax.detach().to(torch.float64).clamp_min(eps)
    wa = w_absmax.detach().to(torch.float64).clamp_min(eps)
    s = xa.pow(alpha) / wa.pow(1.0 - alpha)
    dead = (x_absmax <= eps) | (w_absmax <= eps)
    s = torch.where(dead.to(s.device), torch.ones_like(s), s)
    s = s / torch.sqrt(s.max() * s.min())
    return s.float()


def smoothing_vectors(x_absmax: Tensor, w_absmax: Tensor, alphas, eps: float = 1e-8) -> Tensor:
    """:func:`smoothing_vector` of every ``α`` of ``alphas`` at once: ``(len(alphas), in)`` float32, the same
    expressions with ``α`` as a column (one set of ops for the whole grid instead of one per ``α``; equal
    to the per-``α`` vectors in float32, tested bit for bit on CPU)."""
    a = torch.tensor(tuple(alphas), dtype=torch.float64, device=x_absmax.device).unsqueeze(1)  # (n, 1)
    xa = x_absmax.detach().to(torch.float64).clamp_min(eps)
    wa = w_absmax.detach().to(torch.float64).clamp_min(eps).to(xa.device)
    s = xa.pow(a) / wa.pow(1.0 - a)  # (n, in)
    dead = (x_absmax <= eps).to(s.device) | (w_absmax <= eps).to(s.device)
    s = torch.where(dead, torch.ones_like(s), s)
    s = s / torch.sqrt(s.amax(-1, keepdim=True) * s.amin(-1, keepdim=True))
    return s.float()
