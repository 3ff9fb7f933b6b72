"""Sensitivity rank allocation (svdq/solvers/allocation.py, svdq/DESIGN.md §19)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from svdq import SVDQConfig
from svdq.solvers.allocation import RankSite, allocate_ranks, dense_site, expert_site
from svdq.stats import InputStats


def _spectrum_weight(out_f: int, in_f: int, decay: float, seed: int) -> torch.Tensor:
    """``(out × in)`` with singular values ``decay^k`` in random orthonormal bases."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(out_f, out_f, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(in_f, in_f, generator=g, dtype=torch.float64)).Q
    k = min(out_f, in_f)
    S = decay ** torch.arange(k, dtype=torch.float64)
    return (U[:, :k] * S) @ V[:, :k].T


def _stats(x: torch.Tensor) -> InputStats:
    st = InputStats(x.shape[1], sample_size=256, seed=0)
    st.update(x)
    return st


def _random_site(name: str, g: torch.Generator, cost: int, uniform: int) -> RankSite:
    e = torch.rand(64, generator=g, dtype=torch.float64).sort(descending=True).values
    tail = e.sum() - torch.cat([torch.zeros(1, dtype=torch.float64), e.cumsum(0)])
    return RankSite(name, cost, uniform, 63, (tail / tail[0]).clamp_min(0), float(torch.rand(1, generator=g)))


def test_budget_is_conserved_and_allocation_deterministic():
    g = torch.Generator().manual_seed(0)
    sites = [_random_site(f"l{i}", g, cost=int(c), uniform=16) for i, c in enumerate([96, 160, 224, 96, 300])]
    budget = sum(s.uniform_budget for s in sites)
    ranks = allocate_ranks(sites, granularity=4)
    assert ranks == allocate_ranks(sites, granularity=4)
    used = sum(ranks[s.name] * s.cost for s in sites)
    assert used <= budget
    # nothing more fits: every site that could still grow would overrun the budget
    for s in sites:
        if ranks[s.name] < min(4 * s.uniform_rank, s.max_rank):
            assert used + 4 * s.cost > budget
    assert all(r % 4 == 0 and r >= 4 for r in ranks.values())


def test_alike_sites_get_the_uniform_rank_exactly():
    W = _spectrum_weight(96, 64, 0.9, seed=1)
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(2))
    cfg = SVDQConfig(rank=16, weight_format="int4-g32", act_format="none")
    site = dense_site("a", W.float(), _stats(x), cfg)
    sites = [dataclasses.replace(site, name=f"l{i}") for i in range(4)]
    ranks = allocate_ranks(sites, granularity=8)
    assert set(ranks.values()) == {16}
    assert sum(ranks[s.name] * s.cost for s in sites) == sum(s.uniform_budget for s in sites)


def test_slowly_decaying_spectrum_gets_more_rank():
    x = torch.randn(1024, 64, generator=torch.Generator().manual_seed(3))
    cfg = SVDQConfig(rank=16, weight_format="int4-g32", act_format="none")
    fast = dense_site("fast", _spectrum_weight(64, 64, 0.7, seed=4).float(), _stats(x), cfg)
    slow = dense_site("slow", _spectrum_weight(64, 64, 0.97, seed=5).float(), _stats(x), cfg)
    # the curve is the whitened tail energy: check it against a direct float64 reference
    L = torch.linalg.cholesky(
        x.double().T @ x.double() + 0.01 * (x.double().square().sum(0).mean()) * torch.eye(64)
    )
    sv = torch.linalg.svdvals(_spectrum_weight(64, 64, 0.97, seed=5).float().double() @ L).square()
    ref = 1 - sv[:8].sum() / sv.sum()
    assert float(slow.curve[8]) == pytest.approx(float(ref), rel=1e-6)
    ranks = allocate_ranks([fast, slow], granularity=4)
    assert ranks["slow"] > 16 > ranks["fast"]


def test_expert_site_layouts_and_fallback_expert():
    g = torch.Generator().manual_seed(6)
    W = torch.stack([_spectrum_weight(64, 32, 0.9, seed=10 + i).float() for i in range(4)])  # (E, out, in)
    stats = [_stats(torch.randn(300, 32, generator=g)) for _ in range(3)] + [None]  # expert 3: no tokens
    cfg = SVDQConfig(rank=8, weight_format="int4-g32", act_format="none")
    for layout, cost in (("per-expert", 4 * 96), ("shared-down", 32 + 4 * 64), ("shared-up", 64 + 4 * 32)):
        site = expert_site("e.fc1", W, stats, cfg, layout)
        assert site.cost == cost and site.uniform_budget == 4 * 8 * 96
        assert site.curve[0] == 1.0 and bool((site.curve[1:] <= site.curve[:-1] + 1e-12).all())
        assert site.uniform_rank == site.uniform_budget // cost
        assert 0 < site.sensitivity < 1
    assert expert_site("e.fc2", W, stats, cfg, "auto").cost == 4 * 96
