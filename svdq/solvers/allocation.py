"""Rank allocation: one global branch budget spread over layers by measured sensitivity (svdq/DESIGN.md §19).

Every quantized layer — a dense linear, or one projection (fc1 / fc2) of an expert group — is a
:class:`RankSite`. From the calibration statistics alone (no decomposition) a site gets

* its **spectrum curve** ``f(r) (k_max + 1,)`` float64: the share of the whitened target energy left after
  a rank-``r`` branch, ``f(r) = Σ_{k>r} σ_k² / Σ_k σ_k²``, with ``σ_k`` the singular values of ``W·L``
  (``C + λI = L·Lᵀ``, the damped Cholesky factor of ``XᵀX``, svdq/solvers/lowrank.py). Expert layouts:
  *per-expert* ``σ`` of every ``W_i·L_i`` pooled (per-expert rank ``r`` removes the top ``r`` of each);
  *shared-down* eigenvalues of ``Σ_i (W_i·L)ᵀ(W_i·L)`` with the pooled ``L`` (the shared-down pooled start,
  §4); *shared-up* eigenvalues of ``Σ_i W_i·Ĉ_i·W_iᵀ``.
* its **sensitivity** ``ρ²``: the squared relative output error of the 4-bit layer without a branch, with
  the α = 0.5 smoothing, on the sampled tokens (experts: activation-weighted over experts).

The 4-bit error of the residual scales with the residual, so the predicted squared relative output error
of the site at rank ``r`` is ``e²(r) = ρ²·f(r)``. :func:`allocate_ranks` minimizes ``Σ_sites e²`` under
the budget (the branch parameters uniform rank ``r`` would use): every site starts at ``granularity``, then
steps of ``granularity`` ranks go, one at a time, to the site with the largest error reduction per
parameter (ties: the first site), up to ``max_factor × its uniform rank`` (and the largest valid rank).
The singular values decrease, so each site's gains decrease and the greedy choice is optimal up to the
last step. The total never exceeds the budget; what is left is less than any step still possible. Sites
that are alike get the uniform rank exactly.

Cost of a rank unit: dense ``in + out``; per-expert ``E·(in + out)``; shared-down ``in + E·out``; shared-up
``out + E·in``. An ``"auto"`` expert layout is allocated in per-expert units; its parameter budget is then
passed to :func:`svdq.solvers.expert_group.decompose_expert_group`, which picks the layout within it.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from svdq.config import SVDQConfig
from svdq.formats import fake_quant
from svdq.solvers.lowrank import damped_cholesky
from svdq.solvers.shared_basis import AUTO, PER_EXPERT, SHARED_DOWN, SHARED_UP, max_rank, param_count
from svdq.solvers.smoothing import smoothing_vector
from svdq.stats import InputStats

__all__ = [
    "ALLOCATIONS",
    "RankSite",
    "allocate_ranks",
    "dense_site",
    "expert_site",
]

ALLOCATIONS = ("uniform", "sensitivity")
_F64 = torch.float64
_PROBE_ALPHA = 0.5  # smoothing strength of the sensitivity probe


@dataclass(frozen=True)
class RankSite:
    """One layer's allocation inputs. ``cost``: branch parameters per rank unit; ``uniform_rank``: its
    rank under uniform allocation (its share of the budget is ``uniform_rank·cost``); ``curve`` ``(k + 1,)``
    float64, non-increasing, ``curve[0] = 1``; ``sensitivity``: ``ρ²``; ``layout``: ``"-"`` for a dense
    layer, else the layout whose units ``cost`` counts; ``budget``: parameters under uniform allocation."""

    name: str
    cost: int
    uniform_rank: int
    max_rank: int
    curve: Tensor
    sensitivity: float
    layout: str = "-"
    budget: int | None = None

    @property
    def uniform_budget(self) -> int:
        return self.budget if self.budget is not None else self.uniform_rank * self.cost

    def predicted_error(self, rank: int) -> float:
        """``sqrt(ρ²·f(rank))``: the predicted relative output error at ``rank``."""
        f = float(self.curve[min(rank, self.curve.numel() - 1)])
        return (self.sensitivity * max(f, 0.0)) ** 0.5


def allocate_ranks(
    sites: Sequence[RankSite], granularity: int = 8, max_factor: float = 4.0, budget: int | None = None
) -> dict[str, int]:
    """Ranks ``{site name: rank}`` minimizing ``Σ ρ²·f(r)`` under ``budget`` (default: the sum of the
    sites' uniform budgets); see the module docstring. Deterministic."""
    if granularity < 1:
        raise ValueError(f"granularity must be ≥ 1, got {granularity}")
    if max_factor < 1:
        raise ValueError(f"max_factor must be ≥ 1, got {max_factor}")
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise ValueError("allocate_ranks: site names must be unique")
    total = sum(s.uniform_budget for s in sites) if budget is None else int(budget)
    ranks, caps = {}, {}
    for s in sites:
        cap = min(int(max_factor * s.uniform_rank), s.max_rank, s.curve.numel() - 1)
        caps[s.name] = max(cap, min(granularity, s.max_rank))
        ranks[s.name] = min(granularity, s.max_rank)
    used = sum(ranks[s.name] * s.cost for s in sites)
    if used > total:
        raise ValueError(
            f"allocate_ranks: a budget of {total} parameters does not cover rank {granularity} everywhere "
            f"({used} needed); use a smaller granularity"
        )

    def step(s: RankSite):
        r = ranks[s.name]
        r2 = min(r + granularity, caps[s.name])
        if r2 <= r:
            return None
        gain = s.sensitivity * float(s.curve[r] - s.curve[r2])
        return gain / ((r2 - r) * s.cost), r2

    heap = []
    for i, s in enumerate(sites):
        st = step(s)
        if st is not None:
            heapq.heappush(heap, (-st[0], i, st[1]))
    while heap:
        _, i, r2 = heapq.heappop(heap)
        s = sites[i]
        extra = (r2 - ranks[s.name]) * s.cost
        if used + extra > total:
            continue  # does not fit; cheaper steps of other sites may
        used += extra
        ranks[s.name] = r2
        st = step(s)
        if st is not None:
            heapq.heappush(heap, (-st[0], i, st[1]))
    return ranks


# ---------------------------------------------------------------------------------------------- curves


def _curve(energies: Tensor, k_max: int, total: float | None = None) -> Tensor:
    """``f(r)``, ``r = 0..k_max``, from per-rank energies sorted descending ``(k,)`` (``total``: the full
    energy when the energies are only the top ones)."""
    e = energies.to(_F64).clamp_min(0.0)
    total = float(e.sum()) if total is None else total
    cum = torch.zeros(k_max + 1, dtype=_F64)
    top = torch.cumsum(e[:k_max], 0)
    cum[1 : top.numel() + 1] = top
    cum[top.numel() + 1 :] = top[-1] if top.numel() else 0.0
    if total <= 0:
        return torch.zeros(k_max + 1, dtype=_F64)
    return ((total - cum) / total).clamp_min(0.0)


def _whitened(W: Tensor, C: Tensor | None, damp: float) -> Tensor:
    """``W·L`` (float64), ``C + λI = L·Lᵀ``; ``W`` itself without statistics."""
    W = W.to(_F64)
    if C is None:
        return W
    L, identity = damped_cholesky(C, damp)
    return W if identity else W @ L.to(W.device)


def _probe_error(W: Tensor, X: Tensor, x_absmax: Tensor, config: SVDQConfig) -> tuple[float, float]:
    """``(‖err‖², ‖ref‖²)`` of the branchless 4-bit layer with α = 0.5 smoothing on the tokens ``X``."""
    W = W.float()
    X = X.float().to(W.device)
    s = smoothing_vector(x_absmax.to(W.device), W.abs().amax(0), _PROBE_ALPHA) if config.alphas else None
    s = torch.ones(W.shape[1], device=W.device) if s is None else s.to(W.device)
    y_ref = X @ W.T
    y = fake_quant(X / s, config.act_quant) @ fake_quant(W * s, config.weight_quant).T
    return float((y - y_ref).square().sum()), float(y_ref.square().sum())


def dense_site(
    name: str, weight: Tensor, stats: InputStats | None, config: SVDQConfig, max_factor: float = 4.0
) -> RankSite:
    """:class:`RankSite` of one dense linear ``weight (out × in)`` from its statistics."""
    out_f, in_f = weight.shape
    has = stats is not None and stats.n_tokens > 0
    hard = min(out_f, in_f) - 1
    k_max = min(hard, int(max_factor * config.rank))
    M = _whitened(weight, stats.covariance if has else None, config.damp)
    sv = torch.linalg.svdvals(M)
    curve = _curve(sv.square(), k_max)
    if has and stats.sample is not None and stats.sample.shape[0] > 0:
        num, den = _probe_error(weight, stats.sample, stats.absmax, config)
        rho2 = num / den if den > 0 else 0.0
    else:
        Wf = weight.float()
        err = (fake_quant(Wf, config.weight_quant) - Wf).square().sum()
        rho2 = float(err / Wf.square().sum().clamp_min(1e-30))
    return RankSite(name, in_f + out_f, min(config.rank, hard), hard, curve, rho2)


def expert_site(
    name: str,
    weights: Tensor | Sequence[Tensor],
    stats: Sequence[InputStats | None],
    config: SVDQConfig,
    layout: str,
    max_factor: float = 4.0,
) -> RankSite:
    """:class:`RankSite` of one expert projection (``E`` weights ``(out × in)``, per-expert statistics) in
    ``layout`` (``"auto"`` counts per-expert units). The uniform budget is the per-expert cost at
    ``config.rank`` (as :func:`~svdq.solvers.expert_group.decompose_expert_group`'s default)."""
    W = torch.stack(list(weights)) if not isinstance(weights, Tensor) else weights
    E, out_f, in_f = W.shape
    unit = PER_EXPERT if layout == AUTO else layout
    if unit not in (PER_EXPERT, SHARED_DOWN, SHARED_UP):
        raise ValueError(f"{name}: unknown layout {layout!r}")
    budget = param_count(PER_EXPERT, min(config.rank, out_f, in_f), E, out_f, in_f)
    cost = param_count(unit, 1, E, out_f, in_f)
    hard = max_rank(unit, E, out_f, in_f)
    uniform = min(budget // cost, hard)
    k_max = min(hard, max(int(max_factor * uniform), 1))
    counts = [st.n_tokens if st is not None else 0 for st in stats]
    covs = [st.covariance.to(_F64) if n > 0 else None for st, n in zip(stats, counts)]
    traces = [float(c.diagonal().mean()) for c in covs if c is not None]
    c_fb = sum(traces) / len(traces) if traces else 1.0
    eye = torch.eye(in_f, dtype=_F64)
    covs = [c if c is not None else c_fb * eye for c in covs]  # no tokens: average isotropic input
    W64 = W.to(_F64).cpu()
    if unit == PER_EXPERT:
        Ms = [_whitened(W64[i], covs[i], config.damp) for i in range(E)]
        totals = torch.tensor([float(M.square().sum()) for M in Ms], dtype=_F64)  # (E,)
        per = torch.stack([_curve(torch.linalg.svdvals(M).square(), k_max) for M in Ms])  # (E, k + 1)
        curve = (per * totals[:, None]).sum(0) / totals.sum().clamp_min(1e-300)
    elif unit == SHARED_DOWN:
        gram = sum(W64[i].T @ W64[i] for i in range(E))  # (in, in) = Σ_i W_iᵀ·W_i
        L, identity = damped_cholesky(sum(covs), config.damp)  # the pooled start's one L (§4)
        K = gram if identity else L.T @ gram @ L
        curve = _curve(torch.linalg.eigvalsh(K).flip(0), k_max)
    else:
        Ms = [_whitened(W64[i], covs[i], config.damp) for i in range(E)]
        G = sum(M @ M.T for M in Ms)  # (out, out) = Σ_i W_i·Ĉ_i·W_iᵀ
        curve = _curve(torch.linalg.eigvalsh(G).flip(0), k_max)
    # sensitivity: activation-weighted branchless error (each expert smoothed from its own absmax)
    num = den = 0.0
    for i, st in enumerate(stats):
        if counts[i] == 0 or st.sample is None or st.sample.shape[0] == 0:
            continue
        a, b = _probe_error(W[i], st.sample, st.absmax, config)
        w = counts[i] / st.sample.shape[0]
        num, den = num + w * a, den + w * b
    rho2 = num / den if den > 0 else 1.0
    return RankSite(name, cost, uniform, hard, curve, rho2, layout=layout, budget=budget)
