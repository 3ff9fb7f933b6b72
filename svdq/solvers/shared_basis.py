"""Low-rank branches for the E experts of one MoE projection (svdq/DESIGN.md §4).

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

**Activation-noise term** (``noise_covs``, svdq/DESIGN.md §23). Optional ``N_i (in × in)``, PSD, on the scale
of ``C_i`` (sums over tokens): the solvers then minimize ``Σ_i tr(D_i·(Ĉ_i + N_i)·D_iᵀ)``. ``N_i`` is the
second moment of whatever else multiplies the residual ``D_i`` (the activation-quantization error
``ε = x − s⊙Q_a(x/s)`` of expert ``i``'s tokens, weighted; :mod:`svdq.solvers.act_noise`), damping is
taken from ``C_i`` alone, and ``C_i + N_i`` takes the place of ``C_i`` in the reported errors and
``objective_history`` too (they are those of the objective minimized). Fallback experts ignore their ``N_i``.

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

**Scale.** No solver forms an ``(E·out) × in`` or ``out × (E·in)`` matrix, and no error evaluation costs
more than one ``out × in²`` pass per expert per call. Eigen-problems up to ``exact_below`` (default 512)
or twice the subspace size are solved densely (``eigh``); larger ones by subspace iteration on the
implicit Gram operator (products with ``W_i``, ``Ĉ_i`` and ``n × k`` blocks only, ``k = rank + oversample``,
``power_iters + 2`` operator products, Rayleigh–Ritz at the end), seeded from a fixed generator on the
weights' device so every process draws the same start. Errors use
``tr(D·Ĉ·Dᵀ) = tr(W·Ĉ·Wᵀ) − 2⟨W·Ĉ·Aᵀ, B⟩ + ⟨B·A·Ĉ·Aᵀ, B⟩``: one pass for ``tr(W_i·C_i·W_iᵀ)``, then only
``in² × r`` products. Tunables (``oversample``, ``power_iters``, ``seed``, ``exact_below``) are keyword
arguments of every layout function. On CUDA, orthonormalization is Cholesky-QR and small eigen-problems
run on the CPU.

**Expert parallelism.** With ``ep_group`` (a ``torch.distributed`` process group) the experts passed are this
rank's local ones; sums over experts are all-reduced, so every rank gets the identical shared factor.
``expert_errors`` and ``fallback_experts`` are then local (local indices); ``total_error``,
``objective_history`` and ``num_params`` are global. Every rank must hold at least one expert.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

from svdq.solvers.lowrank import damped_cholesky, orthonormalize_rows, relative_error

__all__ = [
    "AUTO",
    "DEFAULT_EXPERT_LAYOUT",
    "EXPERT_PROJECTIONS",
    "LAYOUTS",
    "LAYOUT_CHOICES",
    "PER_EXPERT",
    "SHARED_DOWN",
    "SHARED_UP",
    "Layout",
    "MoELowRank",
    "max_rank",
    "param_count",
    "per_expert",
    "expert_layouts",
    "rank_for_budget",
    "shared_down",
    "shared_up",
]

# The expert layouts: the one definition of their names (svdq, lora and calib use these constants).
PER_EXPERT = "per-expert"  # every expert its own lora_down and lora_up
SHARED_DOWN = "shared-down"  # one lora_down shared by the experts, a lora_up per expert
SHARED_UP = "shared-up"  # one lora_up shared by the experts, a lora_down per expert
LAYOUTS: tuple[str, ...] = (PER_EXPERT, SHARED_DOWN, SHARED_UP)
AUTO = "auto"  # calibration: the layout of lowest error at an equal parameter budget
LAYOUT_CHOICES: tuple[str, ...] = (AUTO, *LAYOUTS)
Layout = Literal["per-expert", "shared-down", "shared-up"]  # LAYOUTS as a type
EXPERT_PROJECTIONS: tuple[str, ...] = ("fc1", "fc2")  # fc1: gate/up (GLU) or up; fc2: down
# The mission's default (svdq/DESIGN.md §4): one shared lora_down per MoE layer for fc1 (its experts read the
# same hidden state), the layout the data prefers at equal budget for fc2 (private input spaces).
DEFAULT_EXPERT_LAYOUT: dict[str, str] = {"fc1": SHARED_DOWN, "fc2": AUTO}


def expert_layouts(layout: str | Mapping[str, str] | None = None) -> dict[str, str]:
    """The layout of each expert projection, ``{"fc1": ..., "fc2": ...}``.

    ``None``: :data:`DEFAULT_EXPERT_LAYOUT`; a string (one of :data:`LAYOUT_CHOICES`): both projections; a
    mapping: per projection, a missing one takes its default. Also accepts the command-line form
    ``"fc1=shared-down,fc2=auto"``. Raises ``ValueError`` naming the bad projection or layout.
    """
    if layout is None:
        return dict(DEFAULT_EXPERT_LAYOUT)
    if isinstance(layout, str) and "=" in layout:
        pairs = [p.split("=", 1) for p in layout.split(",") if p.strip()]
        if any(len(p) != 2 for p in pairs):
            raise ValueError(f"layout {layout!r}: write 'fc1=LAYOUT,fc2=LAYOUT'")
        layout = {k.strip(): v.strip() for k, v in pairs}
    if isinstance(layout, str):
        if layout not in LAYOUT_CHOICES:
            raise ValueError(
                f"layout must be one of {LAYOUT_CHOICES} or a per-projection map, got {layout!r}"
            )
        return dict.fromkeys(EXPERT_PROJECTIONS, layout)
    if not isinstance(layout, Mapping):
        raise ValueError(f"layout must be a string or a mapping, got {type(layout).__name__}")
    unknown = sorted(set(layout) - set(EXPERT_PROJECTIONS))
    if unknown:
        raise ValueError(f"layout: unknown projection(s) {unknown}; known: {list(EXPERT_PROJECTIONS)}")
    out = dict(DEFAULT_EXPERT_LAYOUT)
    for proj, value in layout.items():
        if value not in LAYOUT_CHOICES:
            raise ValueError(f"layout[{proj!r}] must be one of {LAYOUT_CHOICES}, got {value!r}")
        out[proj] = value
    return out


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
        B = self.B if self.layout == SHARED_UP else self.B[i]
        A = self.A if self.layout == SHARED_DOWN else self.A[i]
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
    per_rank = {PER_EXPERT: E * (i + o), SHARED_DOWN: i + E * o, SHARED_UP: o + E * i}
    if layout not in per_rank:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    return rank * per_rank[layout]


def max_rank(layout: str, num_experts: int, out_features: int, in_features: int) -> int:
    """Largest meaningful rank: per-expert ``min(out, in)``, shared-down ``min(in, E·out)``,
    shared-up ``min(out, E·in)`` (beyond it the approximation is already exact)."""
    E, o, i = num_experts, out_features, in_features
    limits = {PER_EXPERT: min(o, i), SHARED_DOWN: min(i, E * o), SHARED_UP: min(o, E * i)}
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
    noise_covs: Sequence[Tensor] | Tensor | None = None,
    ep_group: dist.ProcessGroup | None = None,
    **svd_kwargs,
) -> MoELowRank:
    """Independent whitened branch per expert (the baseline), exactly optimal for every expert separately.

    ``B_i`` = top-``r`` eigenvectors of ``K_i = W_i·Ĉ_i·W_iᵀ (out × out)`` (= the top left singular vectors of
    ``W_i·S_i`` with ``Ĉ_i = S_i·S_iᵀ``), ``A_i = B_iᵀ·W_i``, then re-gauged so that ``A_i`` has orthonormal
    rows: the branch of :func:`svdq.solvers.lowrank.lowrank_branch` with ``cov=C_i``, without any Cholesky
    factor. ``svd_kwargs``: ``oversample``, ``power_iters``, ``seed``, ``exact_below`` (module docstring,
    *Scale*). ``ep_group`` only makes ``total_error`` and ``num_params`` global.
    """
    ex = _prepare(weights, covs, token_counts, damp, ep_group).with_noise(noise_covs)
    _check_rank(PER_EXPERT, rank, ex)
    energy, const = _energy(ex, ep_group)
    B, A, history = _fit(PER_EXPERT, ex, rank, const=const, ep_group=ep_group, **svd_kwargs)
    return _finish(PER_EXPERT, ex, B, A, history, energy, ep_group)


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
    noise_covs: Sequence[Tensor] | Tensor | None = None,
    ep_group: dist.ProcessGroup | None = None,
    **svd_kwargs,
) -> MoELowRank:
    """One shared ``A (r × in)`` (lora_down), one ``B_i (out × r)`` per expert.

    1. **Pooled** (exactly optimal when all ``Ĉ_i`` are equal): ``C = Σ_i Ĉ_i = S·Sᵀ`` (Cholesky), Gram
       ``G = Σ_i (W_i·S)ᵀ(W_i·S) = Sᵀ·(Σ_i W_iᵀW_i)·S (in × in)``, ``V_r`` = its top-``r`` eigenvectors (= top
       right singular vectors of ``M = [W_1·S; …; W_E·S]``), sign-fixed so each column's largest-magnitude
       entry is positive. ``A = V_rᵀ·S⁻¹``, ``B_i = W_i·S·V_r``. For large ``in`` the Gram is never formed:
       subspace iteration applies ``Z ↦ Sᵀ·Σ_i W_iᵀ·(W_i·(S·Z))``.
    2. **Refit** each ``B_i = W_i·Ĉ_i·Aᵀ·(A·Ĉ_i·Aᵀ)⁻¹`` with its own covariance (exact minimizer given ``A``).
    3. **Alternate** up to ``max_iters`` times: A-step solving ``Σ_i B_iᵀB_i·A·Ĉ_i = Σ_i B_iᵀ·W_i·Ĉ_i`` by
       preconditioned conjugate gradient (warm start at the current ``A``; preconditioner
       ``X ↦ Ḡ⁻¹·X·C̄⁻¹`` with ``Ḡ = Σ B_iᵀB_i``, ``C̄ = Σ tr(B_iᵀB_i)·Ĉ_i``, exact for a common covariance),
       then re-orthonormalize ``A`` and refit the ``B_i``. Stops when the relative improvement is below
       ``tol`` or a step would not improve; the best solution is kept, so the objective never increases.

    With ``ep_group``, ``C``, the Gram products and every sum of the A-step are all-reduced: the
    single-process path computes exactly the same quantities, so ``A`` agrees up to floating-point
    summation order.
    """
    ex = _prepare(weights, covs, token_counts, damp, ep_group).with_noise(noise_covs)
    _check_rank(SHARED_DOWN, rank, ex)
    energy, const = _energy(ex, ep_group)
    B, A, history = _fit(
        SHARED_DOWN,
        ex,
        rank,
        const=const,
        ep_group=ep_group,
        max_iters=max_iters,
        tol=tol,
        cg_iters=cg_iters,
        cg_tol=cg_tol,
        **svd_kwargs,
    )
    return _finish(SHARED_DOWN, ex, B, A, history, energy, ep_group)


def shared_up(
    weights: Sequence[Tensor] | Tensor,
    covs: Sequence[Tensor] | Tensor | None,
    rank: int,
    *,
    token_counts: Sequence[int] | Tensor | None = None,
    damp: float = 0.01,
    noise_covs: Sequence[Tensor] | Tensor | None = None,
    ep_group: dist.ProcessGroup | None = None,
    **svd_kwargs,
) -> MoELowRank:
    """One shared ``B (out × r)`` (lora_up) with orthonormal columns, one ``A_i (r × in)`` per expert.

    ``B`` = top-``r`` left singular vectors of ``[W_1·S_1, …, W_E·S_E]`` (``Ĉ_i = S_i·S_iᵀ``), computed as
    the top-``r`` eigenvectors of its ``out × out`` Gram ``Σ_i W_i·Ĉ_i·W_iᵀ`` (no Cholesky needed; formed
    densely for small ``out``, else applied implicitly; sign-fixed as in :func:`shared_down`);
    ``A_i = Bᵀ·W_i``. Exactly optimal even with per-expert covariances. With ``ep_group`` the Gram (or its
    products) is all-reduced.
    """
    ex = _prepare(weights, covs, token_counts, damp, ep_group).with_noise(noise_covs)
    _check_rank(SHARED_UP, rank, ex)
    energy, const = _energy(ex, ep_group)
    B, A, history = _fit(SHARED_UP, ex, rank, const=const, ep_group=ep_group, **svd_kwargs)
    return _finish(SHARED_UP, ex, B, A, history, energy, ep_group)


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

    def left(self, X: Tensor) -> Tensor:
        """``Ĉ·X`` for ``X (in × k)``."""
        Y = X * self.shift
        return Y if self.mat is None else Y + self.mat @ X

    def dense(self, n: int, device: torch.device) -> Tensor:
        eye = self.shift * torch.eye(n, dtype=_F64, device=device)
        return eye if self.mat is None else self.mat + eye


@dataclass(frozen=True)
class _Experts:
    W: Tensor  # (E × out × in) float64
    opt: tuple[_Cov, ...]  # Ĉ_i: damped / fallback covariances the solvers minimize with
    eval: tuple[_Cov, ...]  # undamped C_i (c·I for fallback experts) for the reported errors
    fallback: tuple[int, ...]
    num_global: int  # E summed over the process group
    # the opt covariances stacked for batched products when small enough (_STACK_BYTES): matrix parts
    # (E × in × in, zeros for c·I) and shifts (E × 1 × 1); None: loop over experts
    mats: Tensor | None = None
    shifts: Tensor | None = None

    def with_weights(self, W: Tensor) -> _Experts:
        """The same experts and covariances with other target matrices ``W (E × out × in)`` (float64)."""
        if W.shape != self.W.shape:
            raise ValueError(f"target shape {tuple(W.shape)} differs from {tuple(self.W.shape)}")
        return replace(self, W=W.to(_F64))

    def with_noise(self, noise: Sequence[Tensor] | Tensor | None) -> _Experts:
        """The same experts minimizing ``tr(D_i·(Ĉ_i + N_i)·D_iᵀ)``: ``noise`` ``N_i (in × in)`` per expert
        (sequence or ``(E × in × in)``) added to the solvers' covariances (not to the reported ones, not to
        fallback experts); ``None``: unchanged. Raises ``ValueError`` on a bad shape or non-finite entry."""
        if noise is None:
            return self
        E, _, n_in = self.W.shape
        N = [n.to(device=self.W.device, dtype=_F64) for n in noise]
        if len(N) != E:
            raise ValueError(f"noise_covs: got {len(N)} matrices for {E} experts")
        for i, n in enumerate(N):
            if n.shape != (n_in, n_in):
                raise ValueError(f"noise_covs[{i}] must be ({n_in} × {n_in}), got {tuple(n.shape)}")
            if not bool(torch.isfinite(n).all()):
                raise ValueError(f"noise_covs[{i}] contains NaN or inf")
        opt = tuple(
            c if i in self.fallback else _Cov(_add(c.mat, 0.5 * (N[i] + N[i].mT)), c.shift)
            for i, c in enumerate(self.opt)
        )
        mats = None
        if self.mats is not None:
            zero = torch.zeros((), dtype=_F64, device=self.W.device).expand(n_in, n_in)
            mats = torch.stack([zero if c.mat is None else c.mat for c in opt])
        return replace(self, opt=opt, mats=mats)

    def cov_left(self, X: Tensor) -> Tensor:
        """``Ĉ_i·X_i`` for ``X (E × in × k)`` or a shared ``X (in × k)`` → ``(E × in × k)``."""
        if self.mats is None:
            return _left_covs(self.opt, X)
        X = X.expand(self.mats.shape[0], *X.shape[-2:]) if X.dim() == 2 else X
        return torch.baddbmm(X * self.shifts, self.mats, X)

    def cov_right(self, Y: Tensor) -> Tensor:
        """``Y_i·Ĉ_i`` for ``Y (E × r × in)`` → ``(E × r × in)``."""
        if self.mats is None:
            return torch.stack([c.right(y) for c, y in zip(self.opt, Y)])
        return torch.baddbmm(Y * self.shifts, Y, self.mats)


def _add(mat: Tensor | None, extra: Tensor) -> Tensor:
    return extra if mat is None else mat + extra


_STACK_BYTES = 4 << 30  # stack the covariances (a copy) for batched products up to this size


@dataclass(frozen=True)
class _Energy:
    """Per-expert ``tr(W_i·C_i·W_iᵀ)`` (matrix part of the covariance; 0 where ``C_i = c·I``) and
    ``‖W_i‖²``, both ``(E,)`` float64: with them ``tr(W_i·Ĉ_i·W_iᵀ) = cov_i + shift_i·frob_i``."""

    cov: Tensor
    frob: Tensor


@dataclass(frozen=True)
class _SvdOpts:
    oversample: int = 16
    power_iters: int = 2
    seed: int = 0
    exact_below: int = 512


def _svd_opts(kwargs: dict) -> _SvdOpts:
    unknown = set(kwargs) - {"oversample", "power_iters", "seed", "exact_below"}
    if unknown:
        raise TypeError(
            f"unexpected keyword arguments {sorted(unknown)}; "
            "the eigen-solver takes oversample, power_iters, seed and exact_below"
        )
    return _SvdOpts(**kwargs)


def _reduce(t: Tensor, ep_group: dist.ProcessGroup | None) -> Tensor:
    """Sum ``t`` over ``ep_group`` in place (no-op without a group)."""
    if ep_group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=ep_group)
    return t


def _sum(t: Tensor, ep_group: dist.ProcessGroup | None) -> float:
    """``float`` of a 0-dim tensor summed over ``ep_group``."""
    return float(_reduce(t.reshape(1).clone(), ep_group).item())


def _prepare(weights, covs, token_counts, damp: float, ep_group) -> _Experts:
    W = _stack_weights(weights)
    E, _, n_in = W.shape
    num_global = int(_reduce(torch.tensor([E], dtype=torch.int64, device=W.device), ep_group).item())
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
    stats = _reduce(stats, ep_group)
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
    mats = shifts = None
    if E * n_in * n_in * 8 <= _STACK_BYTES:
        zero = torch.zeros((), dtype=_F64, device=W.device).expand(n_in, n_in)
        mats = torch.stack([zero if c.mat is None else c.mat for c in opt])
        shifts = torch.tensor([c.shift for c in opt], dtype=_F64, device=W.device).view(E, 1, 1)
    return _Experts(W, tuple(opt), tuple(ev), fallback, num_global, mats, shifts)


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


# ------------------------------------------------------------------------------------- eigen-solvers


def _fix_signs(V: Tensor) -> Tensor:
    """Flip each column of ``V (… × n × r)`` so that its largest-magnitude entry (first on ties) is > 0."""
    pivots = V.gather(-2, V.abs().argmax(dim=-2, keepdim=True))
    return V * torch.where(pivots < 0, -1.0, 1.0).to(V.dtype)


def _eigh(G: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` of the symmetrized ``G (… × n × n)``; small CUDA matrices are solved on the CPU
    (the batched GPU solver is slow for them) and moved back."""
    G = 0.5 * (G + G.mT)
    if G.is_cuda and G.shape[-1] <= 512:
        w, V = torch.linalg.eigh(G.cpu())
        return w.to(G.device), V.to(G.device)
    return torch.linalg.eigh(G)


def _top_eigvecs(G: Tensor, rank: int) -> Tensor:
    """Top-``rank`` eigenvectors ``(… × n × rank)`` of symmetric ``G (… × n × n)``, descending eigenvalues,
    signs fixed by :func:`_fix_signs`."""
    _, V = _eigh(G)
    return _fix_signs(V[..., -rank:].flip(-1))


def _orth(Y: Tensor) -> Tensor:
    """Orthonormal basis ``Q (… × n × k)`` of the columns of tall ``Y (… × n × k)`` (batched).

    CPU: Householder QR. CUDA: shifted Cholesky-QR in three passes (the batched tall-skinny QR kernels are
    slow; the shift keeps the first Cholesky positive definite, the later passes restore orthogonality),
    falling back to Householder QR if a Cholesky fails (rank-deficient ``Y``).
    """
    if not Y.is_cuda:
        return torch.linalg.qr(Y).Q
    Q = Y
    eye = torch.eye(Y.shape[-1], dtype=Y.dtype, device=Y.device)
    for i in range(3):
        G = Q.mT @ Q
        if i == 0:
            trace = G.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
            G = G + (1e-12 * trace + 1e-300) * eye
        R, info = torch.linalg.cholesky_ex(G, upper=True)
        if bool((info != 0).any()):
            return torch.linalg.qr(Y).Q
        Q = torch.linalg.solve_triangular(R, Q, upper=True, left=False)
    return Q


def _dense(n: int, rank: int, opts: _SvdOpts) -> bool:
    """Whether an ``n × n`` eigen-problem is solved densely rather than by subspace iteration."""
    return n <= max(opts.exact_below, 2 * min(rank + max(opts.oversample, 0), n))


def _subspace(apply, n: int, rank: int, batch: tuple[int, ...], like: Tensor, opts: _SvdOpts, init=None):
    """Top-``rank`` eigenvectors ``(*batch, n, rank)`` of the symmetric PSD operator ``apply`` by subspace
    iteration with ``k = rank + oversample`` columns.

    ``apply(Z)`` maps ``(*batch, n, k)`` to ``(*batch, n, k)`` (and is already all-reduced under a process
    group). Start: ``init`` (a previous basis, warm start) completed with Gaussian columns, or Gaussian; the
    Gaussian columns come from a CPU generator seeded with ``opts.seed`` so every process draws the same.
    ``Q ← orth(Z)``, then ``power_iters + 1`` times ``Q ← orth(apply(Q))``, then Rayleigh–Ritz: eigenvectors
    of ``Qᵀ·apply(Q)``. Signs fixed by :func:`_fix_signs`.
    """
    k = min(rank + max(opts.oversample, 0), n)
    gen = torch.Generator(device=like.device).manual_seed(opts.seed)

    def gauss(cols: int) -> Tensor:
        if like.is_cuda:  # generated where it is used: a CPU draw would dominate the run time
            return torch.randn(*batch, n, cols, generator=gen, dtype=like.dtype, device=like.device)
        return torch.randn(*batch, n, cols, generator=gen, dtype=_F64).to(like.dtype)

    if init is None:
        Z = gauss(k)
    else:
        Z = init.to(device=like.device, dtype=like.dtype)
        if Z.shape[-1] < k:
            Z = torch.cat([Z, gauss(k - Z.shape[-1])], dim=-1)
    Q = _orth(Z)
    for _ in range(max(opts.power_iters, 0) + 1):
        Q = _orth(apply(Q))
    T = Q.mT @ apply(Q)
    _, U = _eigh(T)
    return _fix_signs(Q @ U[..., -rank:].flip(-1))


def _left_covs(covs: Sequence[_Cov], X: Tensor) -> Tensor:
    """``Ĉ_i·X_i`` for ``X (E × in × k)``, or ``Ĉ_i·X`` for a shared ``X (in × k)`` → ``(E × in × k)``."""
    if X.dim() == 2:
        return torch.stack([c.left(X) for c in covs])
    return torch.stack([c.left(x) for c, x in zip(covs, X)])


def _orthonormalize_rows(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    """Batched :func:`svdq.solvers.lowrank.orthonormalize_rows`: re-gauge ``B (… × out × r)·A (… × r × in)``
    so that ``A`` has orthonormal rows (``Aᵀ = Q·R``, ``diag(R) ≥ 0``: ``A' = Qᵀ``, ``B' = B·Rᵀ``)."""
    Q, R = torch.linalg.qr(A.mT)
    signs = torch.where(R.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(R.dtype)
    return B @ (R * signs.unsqueeze(-1)).mT, (Q * signs.unsqueeze(-2)).mT


def _batched_cholesky(G: Tensor) -> Tensor:
    """Lower Cholesky factors of the symmetric PSD batch ``G (… × r × r)``. A matrix that is not numerically
    positive definite gets a jitter ``d·mean(diag)·I`` with ``d`` from 1e-10 growing ×10 (16 tries)."""
    L, info = torch.linalg.cholesky_ex(G)
    if not bool((info != 0).any()):
        return L
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    scale = G.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(torch.finfo(G.dtype).tiny)
    d = 1e-10
    for _ in range(16):
        jitter = torch.where(info != 0, d * scale, torch.zeros_like(scale))
        L, info = torch.linalg.cholesky_ex(G + jitter[..., None, None] * eye)
        if not bool((info != 0).any()):
            return L
        d *= 10.0
    raise ValueError("A·Ĉ_i·Aᵀ is not positive semidefinite: Cholesky failed even with jitter")


# ------------------------------------------------------------------------------------- layout solvers


def _fit(
    layout: str,
    ex: _Experts,
    rank: int,
    *,
    init: tuple[Tensor, Tensor] | None = None,
    const: float = 0.0,
    ep_group: dist.ProcessGroup | None = None,
    max_iters: int = 10,
    tol: float = 1e-6,
    cg_iters: int = 50,
    cg_tol: float = 1e-8,
    cache: dict | None = None,
    **svd_kwargs,
) -> tuple[Tensor, Tensor, list[float]]:
    """Factors ``(B, A)`` (float64, shapes as in :class:`MoELowRank`) of ``layout`` for prepared experts.

    The package-internal entry point (:mod:`svdq.solvers.expert_group` refits targets ``W_i − Q(R_i)`` with
    it): no error report, optional warm start. ``init``: factors ``(B, A)`` of the same layout from a previous
    fit; shared-down then skips the pooled step and starts from ``A`` (B-step, alternations), per-expert and
    shared-up start their subspace iteration from ``B``'s columns (dense solves ignore it).
    ``history`` (shared-down only, else ``[]``): ``const + Σ_i tr(D_i·Ĉ_i·D_iᵀ) − Σ_i tr(W_i·Ĉ_i·W_iᵀ)`` after
    each accepted step, i.e. the objective itself when ``const`` is the all-reduced ``Σ_i tr(W_i·Ĉ_i·W_iᵀ)``;
    the relative stopping rule uses ``|history|`` as its scale. ``cache``: a dict kept by the caller across
    fits of the same experts (e.g. refinement steps), in which shared-down stores its A-step
    preconditioner instead of recomputing it (an ``in³`` factorization) per fit.
    """
    opts = _svd_opts(svd_kwargs)
    if layout == PER_EXPERT:
        B, A = _solve_per_expert(ex, rank, None if init is None else init[0], opts)
        return B, A, []
    if layout == SHARED_UP:
        B, A = _solve_shared_up(ex, rank, None if init is None else init[0], opts, ep_group)
        return B, A, []
    if layout == SHARED_DOWN:
        init_A = None if init is None else init[1]
        cache = {} if cache is None else cache
        return _solve_shared_down(
            ex, rank, init_A, const, ep_group, max_iters, tol, cg_iters, cg_tol, opts, cache
        )
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def _solve_per_expert(ex: _Experts, rank: int, init: Tensor | None, opts: _SvdOpts) -> tuple[Tensor, Tensor]:
    W = ex.W
    E, out, _ = W.shape
    if _dense(out, rank, opts):
        U = _top_eigvecs(W @ ex.cov_left(W.mT), rank)
    else:
        U = _subspace(lambda Z: W @ ex.cov_left(W.mT @ Z), out, rank, (E,), W, opts, init)
    return _orthonormalize_rows(U, U.mT @ W)


def _solve_shared_up(ex: _Experts, rank: int, init: Tensor | None, opts: _SvdOpts, ep_group):
    W = ex.W
    out = W.shape[1]
    if _dense(out, rank, opts):
        B = _top_eigvecs(_reduce((W @ ex.cov_left(W.mT)).sum(0), ep_group), rank)
    else:

        def apply(Z: Tensor) -> Tensor:  # Σ_i W_i·Ĉ_i·W_iᵀ·Z, all-reduced
            return _reduce((W @ ex.cov_left(W.mT @ Z)).sum(0), ep_group)

        B = _subspace(apply, out, rank, (), W, opts, init)
    return B, B.mT @ W


def _solve_shared_down(ex, rank, init_A, const, ep_group, max_iters, tol, cg_iters, cg_tol, opts, cache):
    W = ex.W
    n_in = W.shape[-1]
    history: list[float] = []
    if init_A is None:
        C_pool = _reduce(_cov_sum(ex.opt, [1.0] * len(ex.opt), n_in, W), ep_group)
        S, _ = damped_cholesky(C_pool, 0.0)
        if _dense(n_in, rank, opts):
            H = _reduce(torch.einsum("eoi,eoj->ij", W, W), ep_group)
            V = _top_eigvecs(S.mT @ H @ S, rank)
        else:

            def apply(Z: Tensor) -> Tensor:  # Sᵀ·Σ_i W_iᵀ·W_i·S·Z, all-reduced
                return S.mT @ _reduce((W.mT @ (W @ (S @ Z))).sum(0), ep_group)

            V = _subspace(apply, n_in, rank, (), W, opts)
        A0 = torch.linalg.solve_triangular(S, V.mT, upper=False, left=False)
        B0 = W @ (S @ V)
        P, G = _normal_terms(ex, A0)
        history.append(const + _sum(_delta(B0, P, G), ep_group))
        B, A = orthonormalize_rows(B0, A0)
        B_refit, delta = _b_step(ex, A)
        obj = const + _sum(delta, ep_group)
        if obj <= history[0]:  # exact minimizer given A: only rounding could make it worse
            B = B_refit
        history.append(min(obj, history[0]))
    else:
        _, A = _orthonormalize_rows(init_A.new_zeros(1, init_A.shape[0]), init_A.to(W.dtype))
        B, delta = _b_step(ex, A)
        history.append(const + _sum(delta, ep_group))
    for _ in range(max_iters):  # the A-steps share one preconditioner (kept in ``cache``)
        _, A_new = orthonormalize_rows(B, _a_step(ex, B, A, ep_group, cg_iters, cg_tol, cache))
        B_new, delta = _b_step(ex, A_new)
        obj = const + _sum(delta, ep_group)
        if not obj < history[-1]:
            break
        A, B = A_new, B_new
        history.append(obj)
        if history[-2] - obj <= tol * abs(history[-2]):
            break
    return B, A, history


def _normal_terms(ex: _Experts, A: Tensor) -> tuple[Tensor, Tensor]:
    """For a shared ``A (r × in)``: ``P_i = W_i·Ĉ_i·Aᵀ (E × out × r)`` and ``G_i = A·Ĉ_i·Aᵀ (E × r × r)``."""
    CA = ex.cov_left(A.mT)
    return ex.W @ CA, A @ CA


def _delta(B: Tensor, P: Tensor, G: Tensor) -> Tensor:
    """``Σ_i tr(D_i·Ĉ_i·D_iᵀ) − tr(W_i·Ĉ_i·W_iᵀ) = Σ_i −2⟨P_i, B_i⟩ + ⟨B_i·G_i, B_i⟩`` (0-dim, local)."""
    return -2.0 * (P * B).sum() + ((B @ G) * B).sum()


def _b_step(ex: _Experts, A: Tensor) -> tuple[Tensor, Tensor]:
    """``B_i = W_i·Ĉ_i·Aᵀ·(A·Ĉ_i·Aᵀ)⁻¹`` for every expert → ``(E × out × r)`` (batched Cholesky solve), and
    the local objective change :func:`_delta` at the new ``B``."""
    P, G = _normal_terms(ex, A)
    B = torch.cholesky_solve(P.mT, _batched_cholesky(G)).mT
    return B, _delta(B, P, G)


def _cov_sum(covs: Sequence[_Cov], weights: Sequence[float], n: int, like: Tensor) -> Tensor:
    """``Σ_i w_i·Ĉ_i (n × n)`` float64, built with a single identity."""
    out = torch.zeros(n, n, dtype=_F64, device=like.device)
    shift = 0.0
    for w, c in zip(weights, covs):
        if c.mat is not None:
            out.add_(c.mat, alpha=w)
        shift += w * c.shift
    out.diagonal().add_(shift)
    return out


def _a_step(ex: _Experts, B: Tensor, A: Tensor, ep_group, iters: int, tol: float, cache: dict | None = None):
    """Approximately solve ``Σ_i G_i·X·Ĉ_i = Σ_i B_iᵀ·W_i·Ĉ_i`` (``G_i = B_iᵀB_i``) for ``X (r × in)`` by PCG
    from ``X = A``. The operator is symmetric positive (semi)definite in the Frobenius inner product, so
    every iterate lowers the objective. Preconditioner ``X ↦ Ḡ⁻¹·X·C̄⁻¹`` (``Ḡ = Σ G_i``,
    ``C̄ = Σ tr(G_i)·Ĉ_i``; exact for a common covariance), with ``C̄⁻¹`` formed explicitly (one ``in³``
    inversion instead of two triangular solves per iteration) and kept in ``cache`` when one is given, so
    later A-steps of the same fit reuse it (still a valid SPD preconditioner). Sums over experts are
    all-reduced; all scalars derive from reduced tensors, hence every rank runs the identical iteration."""
    n_in = ex.W.shape[-1]
    G = B.mT @ B
    rhs = _reduce(ex.cov_right(B.mT @ ex.W).sum(0), ep_group)

    def apply(X: Tensor) -> Tensor:
        return _reduce(ex.cov_right(G @ X).sum(0), ep_group)

    L_G, _ = damped_cholesky(_reduce(G.sum(0), ep_group), 0.0)
    C_inv = None if cache is None else cache.get("C_inv")
    if C_inv is None:
        tau = G.diagonal(dim1=-2, dim2=-1).sum(-1).tolist()
        L_C, _ = damped_cholesky(_reduce(_cov_sum(ex.opt, tau, n_in, A), ep_group), 0.0)
        C_inv = torch.cholesky_inverse(L_C)
        if cache is not None:
            cache["C_inv"] = C_inv

    def precondition(R: Tensor) -> Tensor:  # Ḡ⁻¹·R·C̄⁻¹
        return torch.cholesky_solve(R, L_G) @ C_inv

    X = A.clone()
    R = rhs - apply(X)
    Z = precondition(R)
    P = Z
    rz = (R * Z).sum()
    b_norm, r_norm, rz_host = torch.stack([rhs.norm(), R.norm(), rz]).tolist()
    if b_norm == 0.0:
        return X
    return _pcg_iterations(apply, precondition, X, R, P, (rz, rz_host), iters, tol, b_norm, r_norm)


def _pcg_iterations(
    apply, precondition, X, R, P, rz_pair, iters: int, tol: float, b_norm: float, r_norm: float
):
    """The PCG iterations of :func:`_a_step` with one host sync per iteration (the scalars of the stopping
    rule and the next step, read together) instead of two: the curvature test ``pᵀ·A·p > 0`` is applied
    on the device (a step of exactly 0 when it fails, which leaves ``X`` unchanged) and read with the
    residual norms. Same iterates and early exits as checking it first, in the same float64 arithmetic.
    ``rz_pair``: ``⟨R, Z⟩`` as a 0-d tensor and as a float."""
    rz, rz_host = rz_pair
    zero = torch.zeros((), dtype=X.dtype, device=X.device)
    for _ in range(iters):
        if r_norm <= tol * b_norm or rz_host <= 0.0:
            break
        Q = apply(P)
        pq = (P * Q).sum()
        curved = pq > 0.0
        alpha = torch.where(curved, rz / pq, zero)
        X = X + alpha * P
        R = R - alpha * Q
        Z = precondition(R)
        rz_new = (R * Z).sum()
        ok, r_norm, rz_new_host = torch.stack([curved.to(X.dtype), R.norm(), rz_new]).tolist()
        if not ok:
            break
        P = Z + (rz_new_host / rz_host) * P
        rz, rz_host = rz_new, rz_new_host
    return X


# ------------------------------------------------------------------------------------- error report


def _shifts(covs: Sequence[_Cov], like: Tensor) -> Tensor:
    return torch.tensor([c.shift for c in covs], dtype=_F64, device=like.device)


def _energy(ex: _Experts, ep_group) -> tuple[_Energy, float]:
    """Per-expert energies (one ``out × in²`` product per expert) and the all-reduced
    ``Σ_i tr(W_i·Ĉ_i·W_iᵀ)`` (the damped objective of a zero branch)."""
    W = ex.W
    cov = torch.stack(
        [((w @ c.mat) * w).sum() if c.mat is not None else w.new_zeros(()) for w, c in zip(W, ex.opt)]
    )
    energy = _Energy(cov, W.square().sum((1, 2)))
    return energy, _sum((cov + _shifts(ex.opt, W) * energy.frob).sum(), ep_group)


def _cross_terms(ex: _Experts, B: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    """``(t_mat, t_frob)``, each ``(E,)``, with ``tr(D_i·(C_i + c·I)·D_iᵀ) = cov_i + t_mat_i + c·(frob_i +
    t_frob_i)`` for ``D_i = W_i − B_i·A_i``: ``t_mat_i = −2⟨W_i·C_i·A_iᵀ, B_i⟩ + ⟨B_i·A_i·C_i·A_iᵀ, B_i⟩``,
    ``t_frob_i`` the same with ``C_i = I``. Costs ``in² × r`` per expert."""
    E = ex.W.shape[0]
    A3 = A if A.dim() == 3 else A.expand(E, -1, -1)
    B3 = B if B.dim() == 3 else B.expand(E, -1, -1)
    AT = A3.mT
    CA = torch.stack([c.mat @ a if c.mat is not None else torch.zeros_like(a) for c, a in zip(ex.opt, AT)])

    def inner(X: Tensor, Y: Tensor) -> Tensor:
        return (X * Y).sum((-2, -1))

    t_mat = -2.0 * inner(ex.W @ CA, B3) + inner(B3 @ (A3 @ CA), B3)
    t_frob = -2.0 * inner(ex.W @ AT, B3) + inner(B3 @ (A3 @ AT), B3)
    return t_mat, t_frob


def _finish(
    layout: str, ex: _Experts, B: Tensor, A: Tensor, history: list[float], energy: _Energy, ep_group
) -> MoELowRank:
    E, out, n_in = ex.W.shape
    t_mat, t_frob = _cross_terms(ex, B, A)
    ev_shift, op_shift = _shifts(ex.eval, ex.W), _shifts(ex.opt, ex.W)
    nums = energy.cov + t_mat + ev_shift * (energy.frob + t_frob)
    dens = energy.cov + ev_shift * energy.frob
    obj = (energy.cov + t_mat + op_shift * (energy.frob + t_frob)).sum()
    den_opt = (energy.cov + op_shift * energy.frob).sum()
    totals = _reduce(torch.stack([nums.sum(), dens.sum(), obj, den_opt]), ep_group).tolist()
    history = list(history) or [totals[2]]
    errors = torch.tensor([relative_error(n, d) for n, d in zip(nums.tolist(), dens.tolist())], dtype=_F64)
    return MoELowRank(
        layout=layout,
        A=A.to(torch.float32),
        B=B.to(torch.float32),
        expert_errors=errors,
        total_error=relative_error(totals[0], totals[1]),
        num_params=param_count(layout, A.shape[-2], ex.num_global, out, n_in),
        fallback_experts=ex.fallback,
        objective_history=tuple(relative_error(h, totals[3]) for h in history),
    )
