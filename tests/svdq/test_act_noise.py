"""Branch fits under the activation-quantization error (svdq/DESIGN.md §23, svdq/solvers/act_noise.py):
the solvers' noise-aware objective and the refinement's cross-term target against float64 brute force on
tiny shapes, and ``SVDQConfig.branch_fit`` in an expert group."""

import pytest
import torch

from svdq import InputStats, SVDQConfig
from svdq.formats import fake_quant
from svdq.solvers.act_noise import act_error_moments, cross_target, weight_noise_terms
from svdq.solvers.expert_group import decompose_expert_group
from svdq.solvers.shared_basis import per_expert, shared_down, shared_up

F64 = torch.float64


def _problem(E=4, out=12, n_in=16, seed=0):
    """Weights, tokens X_i (routed inputs, outlier channels) and noise tokens ε_i per expert."""
    g = torch.Generator().manual_seed(seed)
    W = [torch.randn(out, n_in, generator=g, dtype=F64) for _ in range(E)]
    scale = torch.ones(n_in, dtype=F64)
    scale[:3] = 8.0
    X = [torch.randn(40 + 10 * i, n_in, generator=g, dtype=F64) * scale for i in range(E)]
    eps = [0.3 * torch.randn(x.shape[0], n_in, generator=g, dtype=F64) * scale.flip(0) for x in X]
    return W, X, eps


def _noise_objective(W, X, eps, res, damp) -> float:
    """Brute force Σ_i ‖D_i·X_iᵀ‖² + damp·mean(diag C_i)·‖D_i‖² + ‖D_i·ε_iᵀ‖² with the returned factors."""
    total = 0.0
    for i, (w, x, e) in enumerate(zip(W, X, eps)):
        D = w - res.approx(i).to(F64)
        shift = damp * float((x.mT @ x).diagonal().mean())
        total += float((D @ x.mT).square().sum() + shift * D.square().sum() + (D @ e.mT).square().sum())
    return total


@pytest.mark.parametrize("fit", [per_expert, shared_down, shared_up])
def test_noise_objective_equals_brute_force_and_is_not_worse_than_the_plain_fit(fit):
    W, X, eps = _problem()
    C = [x.mT @ x for x in X]
    N = [e.mT @ e for e in eps]
    damp = 0.01
    noisy = fit(W, C, 5, damp=damp, noise_covs=N)
    plain = fit(W, C, 5, damp=damp)
    den = sum(
        float((w @ (c + damp * c.diagonal().mean() * torch.eye(16, dtype=F64) + n) @ w.mT).trace())
        for w, c, n in zip(W, C, N)
    )
    brute = _noise_objective(W, X, eps, noisy, damp)
    # the solver's claimed objective (relative, damped, noise included) is the brute-force one
    assert noisy.objective_history[-1] == pytest.approx((brute / den) ** 0.5, rel=1e-5)
    assert noisy.total_error == pytest.approx(
        (
            sum(
                float(((w - noisy.approx(i).to(F64)) @ torch.cat([x, e]).mT).square().sum())
                for i, (w, x, e) in enumerate(zip(W, X, eps))
            )
            / sum(float((w @ torch.cat([x, e]).mT).square().sum()) for w, x, e in zip(W, X, eps))
        )
        ** 0.5,
        rel=1e-5,
    )
    # under the noise-aware objective the noise-aware fit is at least as good as the plain one (strictly here)
    assert brute < _noise_objective(W, X, eps, plain, damp) * (1 - 1e-3)
    # and the plain fit is unchanged by noise_covs=None
    assert torch.equal(fit(W, C, 5, damp=damp, noise_covs=None).A, plain.A)


def test_noise_covs_bad_input_raises():
    W, X, _ = _problem(E=2)
    C = [x.mT @ x for x in X]
    with pytest.raises(ValueError, match="noise_covs: got 1 matrices for 2 experts"):
        shared_down(W, C, 3, noise_covs=[C[0]])
    with pytest.raises(ValueError, match=r"noise_covs\[1\] must be \(16 × 16\)"):
        shared_down(W, C, 3, noise_covs=[C[0], C[1][:8, :8]])
    with pytest.raises(ValueError, match=r"noise_covs\[0\] contains NaN"):
        shared_down(W, C, 3, noise_covs=[C[0] * float("nan"), C[1]])


def _tokens(E=3, k=24, n_in=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(E, k, n_in, generator=g)
    X[:, :, :2] *= 10.0
    X[-1, k // 2 :] = 0.0  # padding rows after the last expert's samples
    s = torch.rand(n_in, generator=g) + 0.5
    Xq = torch.stack([fake_quant(x / s, "nvfp4") for x in X])
    return X, Xq, s, torch.tensor([2.0, 1.0, 3.0], dtype=F64)


def test_act_error_moments_and_weight_noise_match_brute_force():
    X, Xq, s, w = _tokens()
    N, K = act_error_moments(X, Xq, s, w, diagonal=False)
    Nd, Kd = act_error_moments(X, Xq, s, w)
    torch.testing.assert_close(Nd, torch.diag_embed(N.diagonal(dim1=1, dim2=2)), rtol=1e-12, atol=0.0)
    torch.testing.assert_close(Kd, torch.diag_embed(K.diagonal(dim1=1, dim2=2)), rtol=1e-12, atol=0.0)
    for i in range(X.shape[0]):
        Ni = sum(torch.outer(x - s * q, x - s * q) for x, q in zip(X[i].to(F64), Xq[i].to(F64)))
        Ki = sum(torch.outer(x / s - q, x) for x, q in zip(X[i].to(F64), Xq[i].to(F64)))
        torch.testing.assert_close(N[i], w[i] * Ni, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(K[i], w[i] * Ki, rtol=1e-6, atol=1e-6)
    g = torch.Generator().manual_seed(2)
    R = torch.randn(X.shape[0], 8, X.shape[2], generator=g)
    Rq = torch.stack([fake_quant(r, "nvfp4") for r in R])
    num, den = weight_noise_terms(R, Rq, X, s, w).tolist()
    Xs = X.to(F64) / s.to(F64)
    ref_num = sum(float(w[i] * ((Rq[i] - R[i]).to(F64) @ Xs[i].mT).square().sum()) for i in range(3))
    ref_den = sum(float(w[i] * (R[i].to(F64) @ Xs[i].mT).square().sum()) for i in range(3))
    assert num == pytest.approx(ref_num, rel=1e-5) and den == pytest.approx(ref_den, rel=1e-5)
    assert 0.0 < num / den < 0.1  # nvfp4 weight noise: a few % of the residual's output energy


def test_cross_target_whitened_fit_is_the_exact_error_up_to_a_constant():
    """Σ_t ‖(T − M)·x_t + R̂·e_t‖² − ‖(F − M)·Xᵀ‖²_C does not depend on M (any branch B·A)."""
    X, Xq, s, _ = _tokens(E=1, k=64)
    x = X[0].to(F64)
    e = x / s.to(F64) - Xq[0].to(F64)
    g = torch.Generator().manual_seed(3)
    T = torch.randn(1, 6, 32, generator=g, dtype=F64)
    Rq = torch.randn(1, 6, 32, generator=g, dtype=F64)
    _, K = act_error_moments(X, Xq, s, torch.ones(1, dtype=F64), diagonal=False)
    C = x.mT @ x + 1e-3 * torch.eye(32, dtype=F64)  # damped: the identity holds with the covariance used
    F = cross_target(T, Rq, K, C.unsqueeze(0))[0]

    def gap(M):
        exact = ((T[0] - M) @ x.mT + Rq[0] @ e.mT).square().sum() + 1e-3 * (T[0] - M).square().sum()
        whitened = ((F - M) @ C @ (F - M).mT).trace()
        return float(exact - whitened)

    gaps = [gap(torch.randn(6, 32, generator=g, dtype=F64) * c) for c in (0.0, 1.0, 5.0)]
    assert max(gaps) - min(gaps) == pytest.approx(0.0, abs=1e-8 * abs(gaps[0]) + 1e-8)
    # the cross term is real: F differs from T
    assert float((F - T[0]).abs().max()) > 1e-3


def _group(E=4, out=24, n_in=32, counts=(300, 150, 0, 200), seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(E, out, n_in, generator=g) / n_in**0.5
    scale = torch.ones(n_in)
    scale[torch.randperm(n_in, generator=g)[:3]] = 15.0
    stats = []
    for i, n in enumerate(counts):
        st = InputStats(n_in, sample_size=128, seed=i)
        if n:
            st.update(torch.randn(n, n_in, generator=g) * scale)
        stats.append(st)
    return W, stats


@pytest.mark.parametrize("projection", ["fc1", "fc2"])
def test_branch_fit_act_noise_in_an_expert_group(projection):
    W, stats = _group()
    cfg = SVDQConfig(rank=4, alphas=(0.0, 0.5, 1.0), refine_steps=0, sample_tokens=128)
    layout = "shared-down" if projection == "fc1" else "per-expert"
    plain = decompose_expert_group(W, stats, cfg, projection=projection, layout=layout)
    noisy = decompose_expert_group(
        W, stats, cfg.replace(branch_fit="act-noise"), projection=projection, layout=layout
    )
    # the same search; the noise-aware refit is an accepted step (lower error) or dropped (equal result)
    assert noisy.step_errors[0] == plain.step_errors[0]
    assert noisy.final_error <= plain.final_error
    assert len(noisy.step_errors) == 1 or noisy.step_errors[1] < noisy.step_errors[0]
    both = decompose_expert_group(
        W, stats, cfg.replace(branch_fit="act-both", refine_steps=2), projection=projection, layout=layout
    )
    assert list(both.step_errors) == sorted(both.step_errors, reverse=True)
    assert both.final_error <= noisy.final_error
    for r in (plain, noisy, both):  # the reported error is that of the complete quantized group
        assert 0.0 < r.final_error < r.rtn_error


def test_branch_fit_is_validated():
    with pytest.raises(ValueError, match="branch_fit must be one of"):
        SVDQConfig(branch_fit="noise")


def _on_rank(rank: int, world_size: int) -> dict:
    """Each rank decomposes half of the experts with ep_group=WORLD and branch_fit="act-both"."""
    import torch.distributed as dist

    W, stats = _group(E=4, counts=(300, 150, 0, 200))
    local = slice(2 * rank, 2 * rank + 2)
    cfg = SVDQConfig(rank=4, alphas=(0.0, 0.5, 1.0), refine_steps=2, sample_tokens=128, branch_fit="act-both")
    res = decompose_expert_group(
        W[local], stats[local], cfg, projection="fc1", layout="shared-down", ep_group=dist.group.WORLD
    )
    return {"A": res.shared_down, "ups": torch.stack(res.lora_ups), "steps": res.step_errors}


@pytest.mark.slow
def test_branch_fit_expert_parallel_matches_single_process():
    from tests.helpers.dist import run_distributed

    results = run_distributed(_on_rank, 2, timeout=240)
    W, stats = _group(E=4, counts=(300, 150, 0, 200))
    cfg = SVDQConfig(rank=4, alphas=(0.0, 0.5, 1.0), refine_steps=2, sample_tokens=128, branch_fit="act-both")
    single = decompose_expert_group(W, stats, cfg, projection="fc1", layout="shared-down")
    assert torch.equal(results[0]["A"], results[1]["A"])  # one shared factor on every rank
    assert results[0]["steps"] == results[1]["steps"]
    assert len(results[0]["steps"]) == len(single.step_errors)
    for a, b in zip(results[0]["steps"], single.step_errors):
        assert a == pytest.approx(b, rel=1e-5)
    torch.testing.assert_close(results[0]["A"], single.shared_down, rtol=1e-4, atol=1e-5)
    ups = torch.cat([r["ups"] for r in results])
    torch.testing.assert_close(ups, torch.stack(single.lora_ups), rtol=1e-4, atol=1e-5)
