"""svdq.solvers.shared_basis against float64 closed forms, plus robustness and an expert-parallel (gloo)
run."""

import math

import pytest
import torch
import torch.distributed as dist

from svdq.solvers.lowrank import lowrank_branch, output_error
from svdq.solvers.shared_basis import (
    _a_step,
    _prepare,
    max_rank,
    param_count,
    per_expert,
    rank_for_budget,
    shared_down,
    shared_up,
)
from tests.helpers.dist import run_distributed

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _weights(E: int, out: int, n_in: int, g: torch.Generator) -> list[torch.Tensor]:
    """Experts that share part of their input space (what makes a shared lora_down worthwhile)."""
    common = torch.randn(out, n_in, generator=g, dtype=F64)
    basis = torch.linalg.qr(torch.randn(n_in, n_in, generator=g, dtype=F64)).Q
    decay = torch.diag(0.85 ** torch.arange(n_in, dtype=F64))
    return [(common + torch.randn(out, n_in, generator=g, dtype=F64)) @ decay @ basis.mT for _ in range(E)]


def _inputs(n: int, n_in: int, g: torch.Generator, spread: float = 3.0) -> torch.Tensor:
    """n tokens with channel scales over 10^spread, randomly permuted channels, correlated by a mixing."""
    scales = torch.logspace(-spread / 2, spread / 2, n_in, dtype=F64)[torch.randperm(n_in, generator=g)]
    mix = torch.eye(n_in, dtype=F64) + 0.3 * torch.randn(n_in, n_in, generator=g, dtype=F64) / math.sqrt(n_in)
    return (torch.randn(n, n_in, generator=g, dtype=F64) * scales) @ mix


def _hetero_problem(E=6, out=20, n_in=32, seed=0):
    """Per-expert weights, inputs X_i (different channel scalings per expert) and C_i = X_iᵀX_i."""
    g = _gen(seed)
    W = _weights(E, out, n_in, g)
    X = [_inputs(100 + 40 * i, n_in, g) for i in range(E)]
    return W, X, [x.mT @ x for x in X]


def _objective(W, X, res) -> float:
    """Σ_i ‖(W_i − B_i·A_i)·X_iᵀ‖² with the returned (float32) factors, evaluated in float64."""
    return sum(
        float(((w - res.approx(i).to(F64)) @ x.mT).square().sum()) for i, (w, x) in enumerate(zip(W, X))
    )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.to(F64) - b.to(F64)).norm() / b.to(F64).norm())


# ----------------------------------------------------------------------------------------- shared-down


def test_shared_down_common_covariance_is_exactly_optimal():
    g = _gen(1)
    E, out, n_in, rank = 5, 12, 24, 6
    W = _weights(E, out, n_in, g)
    X = _inputs(300, n_in, g)
    C = X.mT @ X
    res = shared_down(W, [C] * E, rank, damp=0.0, max_iters=0)

    # Closed form, computed independently: the best rank-r matrix of the stacked [W_1·Xᵀ; …; W_E·Xᵀ]
    # is reachable with a shared A, so the optimum is its Eckart–Young tail.
    s = torch.linalg.svdvals(torch.cat([w @ X.mT for w in W]))
    optimum = float(s[rank:].square().sum())
    assert _objective(W, [X] * E, res) == pytest.approx(optimum, rel=1e-5)  # float32 factors

    # and the factors are those of svdq/DESIGN.md §4: A = V_rᵀ·S⁻¹, B_i = W_i·S·V_r (S = chol(E·C)).
    S = torch.linalg.cholesky(E * C)
    V = torch.linalg.svd(torch.cat([w @ S for w in W]), full_matrices=False).Vh[:rank].mT
    A_ref = torch.linalg.solve_triangular(S, V.mT, upper=False, left=False)
    for i, w in enumerate(W):
        assert _rel(res.approx(i), w @ S @ V @ A_ref) < 1e-5
    # pooled, refit and (no) alternation agree in this case
    pooled, refit = res.objective_history
    assert refit == pytest.approx(pooled, rel=1e-10)
    more = shared_down(W, [C] * E, rank, damp=0.0, max_iters=5)
    assert more.objective_history[-1] == pytest.approx(pooled, rel=1e-8)


def test_shared_down_refinement_is_monotone_and_helps_with_heterogeneous_covariances():
    W, X, C = _hetero_problem()
    rank = 6
    res = shared_down(W, C, rank, damp=0.0, max_iters=15, tol=0.0)
    h = res.objective_history
    assert len(h) >= 4
    assert all(b <= a for a, b in zip(h, h[1:])), h
    pooled, refit, final = h[0], h[1], h[-1]
    assert refit < 0.9 * pooled  # own-covariance refit of the B_i
    assert final < 0.9 * refit  # alternating A/B steps
    # history (damp=0) is the relative output error of the returned factors
    den = sum(float((w @ x.mT).square().sum()) for w, x in zip(W, X))
    assert math.sqrt(_objective(W, X, res) / den) == pytest.approx(final, rel=1e-5)
    assert res.total_error == pytest.approx(final, rel=1e-5)


def test_shared_down_b_factors_are_optimal_given_a():
    W, _, C = _hetero_problem(seed=2)
    res = shared_down(W, C, 5, damp=0.01, max_iters=3)
    A = res.A.to(F64)
    for i, (w, c) in enumerate(zip(W, C)):
        c_hat = c + 0.01 * c.diagonal().mean() * torch.eye(c.shape[0], dtype=F64)
        grad = (w - res.B[i].to(F64) @ A) @ c_hat @ A.mT  # ∂/∂B_i of tr(D_i·Ĉ_i·D_iᵀ), up to −2
        assert float(grad.norm()) < 1e-5 * float((w @ c_hat @ A.mT).norm())
    assert torch.allclose(res.A @ res.A.mT, torch.eye(5), atol=1e-5)


def test_a_step_solves_the_normal_equations():
    """PCG A-step against an exact Kronecker solve of Σ_i (B_iᵀB_i ⊗ Ĉ_i)·vec(A) = vec(Σ_i B_iᵀW_iĈ_i)."""
    g = _gen(3)
    E, out, n_in, rank = 3, 5, 8, 2
    W, _, C = _hetero_problem(E=E, out=out, n_in=n_in, seed=3)
    ex = _prepare(W, C, None, 0.01, None)
    B = torch.randn(E, out, rank, generator=g, dtype=F64)
    A0 = torch.randn(rank, n_in, generator=g, dtype=F64)
    A = _a_step(ex, B, A0, None, iters=200, tol=1e-14)

    eye = torch.eye(n_in, dtype=F64)
    K = sum(torch.kron(b.mT @ b, c.mat + c.shift * eye) for b, c in zip(B, ex.opt))
    rhs = sum(b.mT @ w @ (c.mat + c.shift * eye) for b, w, c in zip(B, ex.W, ex.opt))
    A_exact = torch.linalg.solve(K, rhs.reshape(-1)).reshape(rank, n_in)  # row-major vec
    assert _rel(A, A_exact) < 1e-8


def test_shared_down_weight_only_is_svd_of_stacked_weights():
    g = _gen(4)
    W = _weights(4, 10, 16, g)
    res = shared_down(W, None, 5, max_iters=3)
    s = torch.linalg.svdvals(torch.cat(W))
    optimum = math.sqrt(float(s[5:].square().sum() / s.square().sum()))
    assert res.total_error == pytest.approx(optimum, rel=1e-5)
    assert res.fallback_experts == ()


# ----------------------------------------------------------------------------------------- shared-up


def test_shared_up_is_exact_with_per_expert_covariances():
    W, X, C = _hetero_problem(seed=5)
    rank = 7
    res = shared_up(W, C, rank, damp=0.0)
    s = torch.linalg.svdvals(torch.cat([w @ x.mT for w, x in zip(W, X)], dim=1))  # along the input side
    assert _objective(W, X, res) == pytest.approx(float(s[rank:].square().sum()), rel=1e-5)
    B = res.B.to(F64)
    assert torch.allclose(B.mT @ B, torch.eye(rank, dtype=F64), atol=1e-6)
    for i, w in enumerate(W):
        assert _rel(res.A[i], B.mT @ w) < 1e-6  # A_i = Bᵀ·W_i
    assert res.A.shape == (len(W), rank, 32) and res.B.shape == (20, rank)


# ----------------------------------------------------------------------------------------- per-expert


def test_per_expert_is_independent_whitened_svd():
    W, _, C = _hetero_problem(seed=6)
    res = per_expert(W, C, 4)
    for i, (w, c) in enumerate(zip(W, C)):
        B, A = lowrank_branch(w, 4, c, dtype=F64)
        assert _rel(res.approx(i), B @ A) < 1e-6
        assert res.expert_errors[i].item() == pytest.approx(output_error(res.approx(i), w, c), rel=1e-6)


def test_layouts_report_params_and_shapes():
    W, _, C = _hetero_problem(E=4, out=10, n_in=12, seed=7)
    for fit, layout in ((per_expert, "per-expert"), (shared_down, "shared-down"), (shared_up, "shared-up")):
        res = fit(W, C, 3)
        assert res.layout == layout and res.rank == 3
        assert res.num_params == param_count(layout, 3, 4, 10, 12)
        assert res.num_params == sum(t.numel() for t in (res.A, res.B))
        assert res.expert_errors.shape == (4,) and res.approx(2).shape == (10, 12)
        assert res.A.dtype == res.B.dtype == torch.float32


# ----------------------------------------------------------------------------------------- budget


def test_rank_for_budget_arithmetic():
    E, out, n_in = 8, 1408, 2048
    assert param_count("per-expert", 1, E, out, n_in) == 8 * (2048 + 1408)
    assert param_count("shared-down", 1, E, out, n_in) == 2048 + 8 * 1408
    assert param_count("shared-up", 1, E, out, n_in) == 1408 + 8 * 2048
    budget = param_count("per-expert", 32, E, out, n_in)  # 884_736
    assert rank_for_budget("per-expert", budget, E, out, n_in) == 32
    assert rank_for_budget("shared-down", budget, E, out, n_in) == 884_736 // 13_312 == 66
    assert rank_for_budget("shared-up", budget, E, out, n_in) == 884_736 // 17_792 == 49
    assert rank_for_budget("per-expert", budget - 1, E, out, n_in) == 31  # floor
    assert rank_for_budget("shared-down", 13_312, E, out, n_in) == 1
    assert rank_for_budget("per-expert", 10**12, 2, 3, 5) == max_rank("per-expert", 2, 3, 5) == 3  # capped
    assert max_rank("shared-down", 2, 3, 5) == 5 and max_rank("shared-up", 2, 3, 5) == 3
    with pytest.raises(ValueError, match="below the cost of rank 1"):
        rank_for_budget("shared-down", 13_311, E, out, n_in)
    with pytest.raises(ValueError, match="unknown layout"):
        rank_for_budget("shared_down", budget, E, out, n_in)


# ----------------------------------------------------------------------------------------- robustness


@pytest.mark.parametrize("fit", [per_expert, shared_down, shared_up])
@pytest.mark.parametrize("damp", [0.0, 0.01])
def test_zero_and_few_token_experts_never_nan(fit, damp):
    g = _gen(8)
    E, out, n_in = 5, 10, 16
    W = _weights(E, out, n_in, g)
    X = [_inputs(n, n_in, g) for n in (200, 0, 50, 1, 2)]
    C = [x.mT @ x for x in X]
    counts = [200, 0, 0, 1, 2]  # expert 2 has a covariance but a count of 0: the count wins
    res = fit(W, C, 4, token_counts=counts, damp=damp)
    assert res.fallback_experts == (1, 2)
    for t in (res.A, res.B, res.expert_errors):
        assert torch.isfinite(t).all()
    assert math.isfinite(res.total_error) and all(math.isfinite(h) for h in res.objective_history)
    assert bool((res.expert_errors < 1).all())
    if fit is per_expert:  # a fallback expert gets the plain (weight-only) SVD branch
        B, A = lowrank_branch(W[1], 4, dtype=F64)
        assert res.expert_errors[1].item() == pytest.approx(output_error(B @ A, W[1]), rel=1e-5)


def test_all_experts_without_tokens_is_weight_only():
    W = _weights(3, 8, 12, _gen(9))
    zeros = [torch.zeros(12, 12, dtype=F64)] * 3
    a = shared_down(W, zeros, 4, max_iters=2)
    b = shared_down(W, None, 4, max_iters=2)
    assert a.fallback_experts == (0, 1, 2)
    assert a.total_error == pytest.approx(b.total_error, rel=1e-6)
    assert torch.allclose(a.A, b.A, atol=1e-6)


def test_bf16_weights_are_accepted():
    W, _, C = _hetero_problem(E=3, out=8, n_in=16, seed=10)
    W_bf16 = torch.stack(W).to(torch.bfloat16)  # stacked (E × out × in) input
    for fit in (per_expert, shared_down, shared_up):
        res = fit(W_bf16, C, 3)
        ref = fit([w.to(torch.float32) for w in W_bf16], C, 3)  # the same values in float32
        assert res.A.dtype == torch.float32 and torch.isfinite(res.A).all()
        assert torch.equal(res.A, ref.A) and torch.equal(res.B, ref.B)


def test_invalid_inputs_raise_clear_errors():
    W, _, C = _hetero_problem(E=3, out=8, n_in=16, seed=11)
    bad = [w.clone() for w in W]
    bad[1][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"expert weights \[1\]"):
        shared_down(bad, C, 2)
    with pytest.raises(ValueError, match="covariance 2 must be"):
        shared_up(W, C[:2] + [torch.eye(5)], 2)
    with pytest.raises(ValueError, match="rank for shared-up"):
        shared_up(W, C, 9)
    with pytest.raises(ValueError, match="token counts"):
        per_expert(W, C, 2, token_counts=[1, 2])


# ----------------------------------------------------------------------------------------- distributed

_DIST_E = 8


def _dist_problem():
    W, _, C = _hetero_problem(E=_DIST_E, out=24, n_in=32, seed=12)
    C[5] = torch.zeros_like(C[5])  # an expert that received no tokens
    return W, C


def _fit_on_rank(rank: int, world_size: int) -> dict:
    """Each rank fits its contiguous slice of experts with ep_group=WORLD (runs in a spawned process)."""
    W, C = _dist_problem()
    per = _DIST_E // world_size
    local = slice(rank * per, (rank + 1) * per)
    down = shared_down(W[local], C[local], 6, max_iters=3, ep_group=dist.group.WORLD)
    up = shared_up(W[local], C[local], 6, ep_group=dist.group.WORLD)
    return {
        "A": down.A,
        "B": down.B,
        "errors": down.expert_errors,
        "total": down.total_error,
        "history": list(down.objective_history),
        "fallback": list(down.fallback_experts),
        "num_params": down.num_params,
        "up_B": up.B,
        "up_total": up.total_error,
    }


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_distributed_shared_basis_matches_single_process(world_size):
    results = run_distributed(_fit_on_rank, world_size, timeout=120)
    W, C = _dist_problem()
    single = shared_down(W, C, 6, max_iters=3)
    single_up = shared_up(W, C, 6)

    for r in results[1:]:  # every rank holds the identical shared factors
        assert torch.equal(r["A"], results[0]["A"])
        assert torch.equal(r["up_B"], results[0]["up_B"])
    assert _rel(results[0]["A"], single.A) < 1e-5
    assert _rel(results[0]["up_B"], single_up.B) < 1e-5
    assert _rel(torch.cat([r["B"] for r in results]), single.B) < 1e-5
    assert _rel(torch.cat([r["errors"] for r in results]), single.expert_errors) < 1e-5
    assert results[0]["history"] == pytest.approx(list(single.objective_history), rel=1e-6)
    for r in results:
        assert r["total"] == pytest.approx(single.total_error, rel=1e-6)
        assert r["up_total"] == pytest.approx(single_up.total_error, rel=1e-6)
        assert r["num_params"] == single.num_params
    per = _DIST_E // world_size
    fallback = [rank * per + i for rank, r in enumerate(results) for i in r["fallback"]]
    assert fallback == list(single.fallback_experts) == [5]


def test_expert_layouts_default_string_map_and_errors():
    from svdq.solvers.shared_basis import DEFAULT_EXPERT_LAYOUT, expert_layouts

    assert expert_layouts(None) == DEFAULT_EXPERT_LAYOUT == {"fc1": "shared-down", "fc2": "auto"}
    assert expert_layouts("per-expert") == {"fc1": "per-expert", "fc2": "per-expert"}
    assert expert_layouts({"fc2": "shared-up"}) == {"fc1": "shared-down", "fc2": "shared-up"}
    assert expert_layouts("fc1=auto, fc2=per-expert") == {"fc1": "auto", "fc2": "per-expert"}
    for bad, needle in [
        ("diagonal", "diagonal"),
        ({"fc3": "auto"}, "fc3"),
        ({"fc1": "x"}, "fc1"),
        (3, "int"),
    ]:
        with pytest.raises(ValueError, match=needle):
            expert_layouts(bad)
