"""Low-rank branches for the E experts of one MoE projection (DESIGN.md §3.3).

Three layouts of the rank-``r`` branch ``W_i ≈ B_i·A_i`` of expert ``i`` (``W_i: out × in``):

* ``per-expert``: ``A_i (r × in)`` and ``B_i (out × r)`` per expert; ``E·r·(in + out)`` parameters.
* ``shared-down``: one ``A (r × in)`` (lora_down), ``B_i (out × r)`` per expert; ``r·(in + E·out)``.
* ``shared-up``: ``A_i (r × in)`` per expert, one ``B (out × r)`` (lora_up); ``r·(out + E·in)``.

**Inputs.** ``weights``: ``E`` matrices ``W_i (out × in)`` as a sequence or a stacked ``(E × out × in)``
tensor, any float dtype (bf16/fp16 included). ``covs``: ``C_i = X_iᵀ·X_i (in × in)`` as a sequence or a
stacked tensor, where ``X_i (n_i × in)`` are the tokens routed to expert ``i``. They are **sums over
tokens, not means**, so the pooled ``Σ_i C_i`` is the token-weighted second moment of all routed tokens and
busy experts weigh more. ``covs=None`` means weight-only (``C_i = I``). ``token_counts``: optional ``n_i``.

**Objective.** All solvers minimize ``Σ_i tr(D_i·Ĉ_i·D_iᵀ)``, ``D_i = W_i − B_i·A_i``, with the damped
``Ĉ_i = C_i + damp·mean(diag C_i)·I`` (= ``Σ_i ‖D_i·X_iᵀ‖²`` when ``damp = 0``). All math runs in float64;
factors are returned in float32.

**Fallback experts.** An expert with ``n_i = 0`` or an all-zero ``C_i`` has no calibration data. It is
listed in ``fallback_experts`` and treated as an expert of average input energy with isotropic inputs:
``Ĉ_i = c·I``, ``c = mean_j tr(C_j) / in`` over the experts that have data (``c = 1`` if none has). Its own
fit is therefore weight-only, and it still takes part in the shared factor with average weight.

**Reported errors** use the undamped ``C_i`` (``c·I`` for fallback experts):
``expert_errors[i] = sqrt(tr(D_i C_i D_iᵀ) / tr(W_i C_i W_iᵀ))`` and
``total_error = sqrt(Σ_i tr(D_i C_i D_iᵀ) / Σ_i tr(W_i C_i W_iᵀ))``. ``objective_history`` holds the
relative damped objective ``sqrt(Σ tr(D_i Ĉ_i D_iᵀ) / Σ tr(W_i Ĉ_i W_iᵀ))``.

**Gauge.** ``B·A`` is invariant under ``A → T·A, B → B·T⁻¹``. Returned ``A`` factors have orthonormal rows
(``A·Aᵀ = I``) for per-expert and shared-down; for shared-up the shared ``B`` has orthonormal columns.

**Expert parallelism.** With ``group`` (a ``torch.distributed`` process group) the experts passed are this
rank's local ones; sums over experts are all-reduced, so every rank gets the identical shared factor.
``expert_errors`` and ``fallback_experts`` are then local (local indices); ``total_error``,
``objective_history`` and ``num_params`` are global. Every rank must hold at least one expert.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

from svdq.lowrank import damped_cholesky, lowrank_branch, orthonormalize_rows, relative_error

__all__ = [
    "LAYOUTS",
    "Layout",
    "MoELowRank",
    "max_rank",
    "param_count",
    "per_expert",
    "rank_for_budget",
    "shared_down",
    "shared_up",
]

Layout = Literal["per-expert", "shared-down", "shared-up"]
LAYOUTS: tuple[str, ...] = ("per-expert", "shared-down", "shared-up")

_F64 = torch.float64


@dataclass(frozen=True)
class MoELowRank:
    """Low-rank branches of the E experts of one projection, in one of :data:`LAYOUTS`.

    ``A``: ``(r × in)`` for shared-down, else ``(E × r × in)``. ``B``: ``(out × r)`` for shared-up, else
    ``(E × out × r)``. Both float32. ``expert_errors (E,)`` float64 (CPU), ``total_error`` and
    ``objective_history`` as in the module docstring; for shared-down the history is
    ``[pooled, refit, after alternation 1, 2, …]`` and never increases; for the closed-form layouts it has
    one entry. ``num_params`` counts the branch parameters of all experts.
    """

    layout: str
    A: Tensor
    B: Tensor
    expert_errors: Tensor
    total_error: float
    num_params: int
    fallback_experts: tuple[int, ...]
    objective_history: tuple[float, ...]

    @property
    def rank(self) -> int:
        return self.A.shape[-2]

    def factors(self, i: int) -> tuple[Tensor, Tensor]:
        """``(B_i (out × r), A_i (r × in))`` of (local) expert ``i``."""
        B = self.B if self.layout == "shared-up" else self.B[i]
        A = self.A if self.layout == "shared-down" else self.A[i]
        return B, A

    def approx(self, i: int) -> Tensor:
        """``B_i·A_i (out × in)`` of (local) expert ``i``."""
        B, A = self.factors(i)
        return B @ A


# ----------------------------------------------------------------------------------------------- budget


def param_count(layout: str, rank: int, num_experts: int, out_features: int, in_features: int) -> int:
    """Branch parameters of all experts.

    per-expert ``E·r·(in+out)``, shared-down ``r·(in+E·out)``, shared-up ``r·(out+E·in)``.
    """
    E, o, i = num_experts, out_features, in_features
    per_rank = {"per-expert": E * (i + o), "shared-down": i + E * o, "shared-up": o + E * i}
    if layout not in per_rank:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    return rank * per_rank[layout]


def max_rank(layout: str, num_experts: int, out_features: int, in_features: int) -> int:
    """Largest meaningful rank: per-expert ``min(out, in)``, shared-down ``min(in, E·out)``,
    shared-up ``min(out, E·in)`` (beyond it the approximation is already exact)."""
    E, o, i = num_experts, out_features, in_features
    limits = {"per-expert": min(o, i), "shared-down": min(i, E * o), "shared-up": min(o, E * i)}
    if layout not in limits:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    return limits[layout]


def rank_for_budget(
    layout: str, budget_params: int, num_experts: int, out_features: int, in_features: int
) -> int:
    """Largest rank whose :func:`param_count` fits ``budget_params`` (floor), capped at :func:`max_rank`.

    Raises ``ValueError`` when not even rank 1 fits.
    """
    per_rank = param_count(layout, 1, num_experts, out_features, in_features)
    rank = budget_params // per_rank
    if rank < 1:
        raise ValueError(
            f"budget of {budget_params} parameters is below the cost of rank 1 for {layout} "
            f"({per_rank} = one rank for E={num_experts}, out={out_features}, in={in_features})"
        )
    return min(rank, max_rank(layout, num_experts, out_features, in_features))


# ----------------------------------------------------------------------------------------------- layouts


def per_expert(
    weights: Sequence[Tensor] | Tensor,
    covs: Sequence[Tensor] | Tensor | None,
    rank: int,
    *,
    token_counts: Sequence[int] | Tensor | None = None,
    damp: float = 0.01,
    group: dist.ProcessGroup | None = None,
    **svd_kwargs,
) -> MoELowRank:
    """Independent whitened branch per expert: ``(B_i, A_i) = lowrank_branch(W_i, r, C_i)``.

    Optimal for every expert separately (the baseline). ``svd_kwargs`` go to :func:`randomized_svd`.
    ``group`` only makes ``total_error`` and ``num_params`` global.
    """
    ex = _prepare(weights, covs, token_counts, damp, group)
    _check_rank("per-expert", rank, ex)
    branches = [lowrank_branch(W, rank, c.mat, damp, dtype=_F64, **svd_kwargs) for W, c in zip(ex.W, ex.eval)]
    B = torch.stack([b for b, _ in branches])
    A = torch.stack([a for _, a in branches])
    history = [_objective(ex, B, A, group)]
    return _finish("per-expert", ex, B, A, history, group)


def shared_down(
    weights: Sequence[Tensor] | Tensor,
    covs: Sequence[Tensor] | Tensor | None,
    rank: int,
    *,
    token_counts: Sequence[int] | Tensor | None = None,
    damp: float = 0.01,
    max_iters: int = 10,
    tol: float = 1e-6,
    cg_iters: int = 50,
    cg_tol: float = 1e-8,
    group: dist.ProcessGroup | None = None,
) -> MoELowRank:
    """One shared ``A (r × in)`` (lora_down), one ``B_i (out × r)`` per expert.

    1. **Pooled** (exactly optimal when all ``Ĉ_i`` are equal): ``C = Σ_i Ĉ_i = S·Sᵀ`` (Cholesky), Gram
       ``G = Σ_i (W_i·S)ᵀ(W_i·S) = Sᵀ·(Σ_i W_iᵀW_i)·S (in × in)``, ``V_r`` = its top-``r`` eigenvectors (= top
       right singular vectors of ``M = [W_1·S; …; W_E·S]``), sign-fixed so each column's largest-magnitude
       entry is positive. ``A = V_rᵀ·S⁻¹``, ``B_i = W_i·S·V_r``.
    2. **Refit** each ``B_i = W_i·Ĉ_i·Aᵀ·(A·Ĉ_i·Aᵀ)⁻¹`` with its own covariance (exact minimizer given ``A``).
    3. **Alternate** up to ``max_iters`` times: A-step solving ``Σ_i B_iᵀB_i·A·Ĉ_i = Σ_i B_iᵀ·W_i·Ĉ_i`` by
       preconditioned conjugate gradient (warm start at the current ``A``; preconditioner
       ``X ↦ Ḡ⁻¹·X·C̄⁻¹`` with ``Ḡ = Σ B_iᵀB_i``, ``C̄ = Σ tr(B_iᵀB_i)·Ĉ_i``, exact for a common covariance),
       then re-orthonormalize ``A`` and refit the ``B_i``. Stops when the relative improvement is below
       ``tol`` or a step would not improve; the best solution is kept, so the objective never increases.

    With ``group``, ``C``, ``Σ W_iᵀW_i`` and every sum of the A-step are all-reduced: the single-process
    path computes exactly the same quantities, so ``A`` agrees up to floating-point summation order.
    """
    ex = _prepare(weights, covs, token_counts, damp, group)
    _check_rank("shared-down", rank, ex)
    n_in = ex.W.shape[-1]
    C_pool = _reduce(sum(c.dense(n_in, ex.W.device) for c in ex.opt), group)
    S, _ = damped_cholesky(C_pool, 0.0)
    H = _reduce(torch.einsum("eoi,eoj->ij", ex.W, ex.W), group)
    V = _top_eigvecs(S.mT @ H @ S, rank)
    A0 = torch.linalg.solve_triangular(S, V.mT, upper=False, left=False)
    B0 = ex.W @ (S @ V)
    history = [_objective(ex, B0, A0, group)]

    B, A = orthonormalize_rows(B0, A0)
    B_refit = _b_step(ex, A)
    obj = _objective(ex, B_refit, A, group)
    if obj <= history[0]:  # exact minimizer given A: only rounding could make it worse
        B = B_refit
    history.append(min(obj, history[0]))
    for _ in range(max_iters):
        _, A_new = orthonormalize_rows(B, _a_step(ex, B, A, group, cg_iters, cg_tol))
        B_new = _b_step(ex, A_new)
        obj = _objective(ex, B_new, A_new, group)
        if not obj < history[-1]:
            break
        A, B = A_new, B_new
        history.append(obj)
        if history[-2] - obj <= tol * history[-2]:
            break
    return _finish("shared-down", ex, B, A, history, group)


def shared_up(
    weights: Sequence[Tensor] | Tensor,
    covs: Sequence[Tensor] | Tensor | None,
    rank: int,
    *,
    token_counts: Sequence[int] | Tensor | None = None,
    damp: float = 0.01,
    group: dist.ProcessGroup | None = None,
) -> MoELowRank:
    """One shared ``B (out × r)`` (lora_up) with orthonormal columns, one ``A_i (r × in)`` per expert.

    ``B`` = top-``r`` left singular vectors of ``[W_1·S_1, …, W_E·S_E]`` (``Ĉ_i = S_i·S_iᵀ``), computed as
    the top-``r`` eigenvectors of its ``out × out`` Gram ``Σ_i W_i·Ĉ_i·W_iᵀ`` (no Cholesky needed;
    sign-fixed as in :func:`shared_down`); ``A_i = Bᵀ·W_i``. Exactly optimal even with per-expert
    covariances. With ``group`` the Gram is all-reduced.
    """
    ex = _prepare(weights, covs, token_counts, damp, group)
    _check_rank("shared-up", rank, ex)
    K = _reduce(sum(c.right(W) @ W.mT for W, c in zip(ex.W, ex.opt)), group)
    B = _top_eigvecs(K, rank)
    A = B.mT @ ex.W
    history = [_objective(ex, B, A, group)]
    return _finish("shared-up", ex, B, A, history, group)


# ----------------------------------------------------------------------------------------------- internals


@dataclass(frozen=True)
class _Cov:
    """Effective covariance ``Ĉ = mat + shift·I (in × in)``; ``mat=None`` means ``shift·I``."""

    mat: Tensor | None
    shift: float

    def right(self, X: Tensor) -> Tensor:
        """``X·Ĉ`` for ``X (… × in)``."""
        Y = X * self.shift
        return Y if self.mat is None else Y + X @ self.mat

    def dense(self, n: int, device: torch.device) -> Tensor:
        eye = self.shift * torch.eye(n, dtype=_F64, device=device)
        return eye if self.mat is None else self.mat + eye

    def quad(self, D: Tensor) -> Tensor:
        """``tr(D·Ĉ·Dᵀ)`` (0-dim tensor) for ``D (out × in)``."""
        return (self.right(D) * D).sum()


@dataclass(frozen=True)
class _Experts:
    W: Tensor  # (E × out × in) float64
    opt: tuple[_Cov, ...]  # Ĉ_i: damped / fallback covariances the solvers minimize with
    eval: tuple[_Cov, ...]  # undamped C_i (c·I for fallback experts) for the reported errors
    fallback: tuple[int, ...]
    num_global: int  # E summed over the process group


def _reduce(t: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Sum ``t`` over ``group`` in place (no-op without a group)."""
    if group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def _prepare(weights, covs, token_counts, damp: float, group) -> _Experts:
    W = _stack_weights(weights)
    E, _, n_in = W.shape
    num_global = int(_reduce(torch.tensor([E], dtype=torch.int64, device=W.device), group).item())
    if covs is None:
        ident = (_Cov(None, 1.0),) * E
        return _Experts(W, ident, ident, (), num_global)

    C = [c.to(device=W.device, dtype=_F64) for c in covs]
    counts = None if token_counts is None else [int(n) for n in token_counts]
    if len(C) != E or (counts is not None and len(counts) != E):
        raise ValueError(f"got {E} weights, {len(C)} covariances and {len(counts or C)} token counts")
    for i, c in enumerate(C):
        if c.shape != (n_in, n_in):
            raise ValueError(f"covariance {i} must be ({n_in} × {n_in}), got {tuple(c.shape)}")
        if not bool(torch.isfinite(c).all()):
            raise ValueError(f"covariance {i} contains NaN or inf")
        if counts is not None and counts[i] < 0:
            raise ValueError(f"token count {i} is negative")
    fallback = tuple(i for i in range(E) if (counts is not None and counts[i] == 0) or not C[i].any())

    valid = [i for i in range(E) if i not in fallback]
    stats = torch.zeros(2, dtype=_F64, device=W.device)
    for i in valid:
        stats[0] += C[i].diagonal().mean()
    stats[1] = len(valid)
    stats = _reduce(stats, group)
    c_fb = float(stats[0] / stats[1]) if stats[1] > 0 else 1.0

    opt, ev = [], []
    for i in range(E):
        if i in fallback:
            opt.append(_Cov(None, c_fb))
            ev.append(_Cov(None, c_fb))
            continue
        mean_diag = float(C[i].diagonal().mean())
        if mean_diag <= 0:
            raise ValueError(f"covariance {i} has a non-positive trace: not X_iᵀX_i")
        opt.append(_Cov(C[i], damp * mean_diag))
        ev.append(_Cov(C[i], 0.0))
    return _Experts(W, tuple(opt), tuple(ev), fallback, num_global)


def _stack_weights(weights) -> Tensor:
    if isinstance(weights, Tensor):
        W = weights
        if W.dim() != 3:
            raise ValueError(f"stacked weights must be (E × out × in), got {tuple(W.shape)}")
    else:
        weights = list(weights)
        if not weights:
            raise ValueError("need at least one expert weight")
        shapes = {tuple(w.shape) for w in weights}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"expert weights must be matrices of one shape, got {sorted(shapes)}")
        W = torch.stack([w.to(_F64) for w in weights])
    if W.shape[0] == 0:
        raise ValueError("need at least one expert weight")
    if not W.is_floating_point():
        raise ValueError(f"weights must be floating point, got {W.dtype}")
    W = W.to(_F64)
    finite = torch.isfinite(W).flatten(1).all(dim=1)
    if not bool(finite.all()):
        raise ValueError(f"expert weights {torch.nonzero(~finite).flatten().tolist()} contain NaN or inf")
    return W


def _check_rank(layout: str, rank: int, ex: _Experts) -> None:
    _, out, n_in = ex.W.shape
    limit = max_rank(layout, ex.num_global, out, n_in)
    if not 1 <= rank <= limit:
        raise ValueError(f"rank for {layout} must be in [1, {limit}], got {rank}")


def _top_eigvecs(G: Tensor, rank: int) -> Tensor:
    """Top-``rank`` eigenvectors ``(n × rank)`` of symmetric ``G``, descending eigenvalues, with the sign of
    each column fixed so its largest-magnitude entry (first one on ties) is positive."""
    _, V = torch.linalg.eigh(0.5 * (G + G.mT))
    V = V[:, -rank:].flip(-1)
    pivots = V.gather(0, V.abs().argmax(dim=0, keepdim=True))
    return V * torch.where(pivots < 0, -1.0, 1.0).to(V.dtype)


def _expert_factors(B: Tensor, A: Tensor) -> Iterable[tuple[Tensor, Tensor]]:
    """``(B_i, A_i)`` per expert for any layout: a 2-D factor is shared, a 3-D one is per expert."""
    E = B.shape[0] if B.dim() == 3 else A.shape[0]
    for i in range(E):
        yield (B[i] if B.dim() == 3 else B), (A[i] if A.dim() == 3 else A)


def _objective(ex: _Experts, B: Tensor, A: Tensor, group) -> float:
    """``Σ_i tr(D_i·Ĉ_i·D_iᵀ)`` over all experts of the group (unnormalized)."""
    total = sum(c.quad(W - Bi @ Ai) for W, c, (Bi, Ai) in zip(ex.W, ex.opt, _expert_factors(B, A)))
    return float(_reduce(total.reshape(1), group).item())


def _b_step(ex: _Experts, A: Tensor) -> Tensor:
    """``B_i = W_i·Ĉ_i·Aᵀ·(A·Ĉ_i·Aᵀ)⁻¹`` for every expert → ``(E × out × r)`` (Cholesky solve, damped on
    failure)."""
    Bs = []
    for W, c in zip(ex.W, ex.opt):
        CA = c.right(A).mT  # Ĉ_i·Aᵀ (in × r)
        L, _ = damped_cholesky(A @ CA, 0.0)
        Bs.append(torch.cholesky_solve((W @ CA).mT, L).mT)
    return torch.stack(Bs)


def _a_step(ex: _Experts, B: Tensor, A: Tensor, group, iters: int, tol: float) -> Tensor:
    """Approximately solve ``Σ_i G_i·X·Ĉ_i = Σ_i B_iᵀ·W_i·Ĉ_i`` (``G_i = B_iᵀB_i``) for ``X (r × in)`` by PCG
    from ``X = A``. The operator is symmetric positive (semi)definite in the Frobenius inner product, so
    every iterate lowers the objective. Sums over experts are all-reduced; all scalars derive from reduced
    tensors, hence every rank runs the identical iteration."""
    n_in = ex.W.shape[-1]
    G = B.mT @ B
    rhs = _reduce(sum(c.right(Bi.mT @ W) for Bi, W, c in zip(B, ex.W, ex.opt)), group)

    def apply(X: Tensor) -> Tensor:
        return _reduce(sum(c.right(Gi @ X) for Gi, c in zip(G, ex.opt)), group)

    tau = G.diagonal(dim1=-2, dim2=-1).sum(-1)
    L_G, _ = damped_cholesky(_reduce(G.sum(0), group), 0.0)
    C_bar = _reduce(sum(t * c.dense(n_in, A.device) for t, c in zip(tau, ex.opt)), group)
    L_C, _ = damped_cholesky(C_bar, 0.0)

    def precondition(R: Tensor) -> Tensor:  # Ḡ⁻¹·R·C̄⁻¹
        return torch.cholesky_solve(torch.cholesky_solve(R, L_G).mT, L_C).mT

    b_norm = float(rhs.norm())
    X = A.clone()
    R = rhs - apply(X)
    if b_norm == 0.0:
        return X
    Z = precondition(R)
    P = Z
    rz = float((R * Z).sum())
    for _ in range(iters):
        if float(R.norm()) <= tol * b_norm or rz <= 0.0:
            break
        Q = apply(P)
        pq = float((P * Q).sum())
        if pq <= 0.0:
            break
        alpha = rz / pq
        X = X + alpha * P
        R = R - alpha * Q
        Z = precondition(R)
        rz_new = float((R * Z).sum())
        P = Z + (rz_new / rz) * P
        rz = rz_new
    return X


def _finish(layout: str, ex: _Experts, B: Tensor, A: Tensor, history: list[float], group) -> MoELowRank:
    E, out, n_in = ex.W.shape
    nums, dens = [], []
    for W, c, (Bi, Ai) in zip(ex.W, ex.eval, _expert_factors(B, A)):
        nums.append(float(c.quad(W - Bi @ Ai)))
        dens.append(float(c.quad(W)))
    errors = torch.tensor([relative_error(n, d) for n, d in zip(nums, dens)], dtype=_F64)
    totals = _reduce(torch.tensor([sum(nums), sum(dens)], dtype=_F64, device=ex.W.device), group)
    den_opt = sum(c.quad(W) for W, c in zip(ex.W, ex.opt))
    den_opt = float(_reduce(den_opt.reshape(1), group).item())
    return MoELowRank(
        layout=layout,
        A=A.to(torch.float32),
        B=B.to(torch.float32),
        expert_errors=errors,
        total_error=relative_error(float(totals[0]), float(totals[1])),
        num_params=param_count(layout, A.shape[-2], ex.num_global, out, n_in),
        fallback_experts=ex.fallback,
        objective_history=tuple(relative_error(h, den_opt) for h in history),
    )
