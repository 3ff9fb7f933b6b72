"""svdq.solvers.lowrank against float64 references (full ``torch.linalg.svd`` and explicit formulas)."""

import math

import pytest
import torch

from svdq.solvers.lowrank import (
    damped_cholesky,
    lowrank_branch,
    orthonormalize_rows,
    output_error,
    randomized_svd,
    relative_error,
)

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _orthonormal(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=F64)).Q


def _with_spectrum(m: int, n: int, sigma: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """m × n matrix with singular values ``sigma`` and random singular vectors."""
    k = sigma.numel()
    return _orthonormal(m, k, g) @ torch.diag(sigma) @ _orthonormal(n, k, g).mT


def _anisotropic_inputs(n: int, n_in: int, g: torch.Generator, spread: float = 3.0) -> torch.Tensor:
    """n × in tokens with per-channel scales spanning 10^spread and correlated channels."""
    scales = torch.logspace(-spread / 2, spread / 2, n_in, dtype=F64)
    mix = torch.eye(n_in, dtype=F64) + 0.3 * torch.randn(n_in, n_in, generator=g, dtype=F64) / math.sqrt(n_in)
    return (torch.randn(n, n_in, generator=g, dtype=F64) * scales) @ mix


def _tail_error(M: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(M.to(F64))
    return float(s[rank:].square().sum().sqrt())


# ----------------------------------------------------------------------------------------- randomized_svd


@pytest.mark.parametrize("decay", [0.9, 0.97])
def test_randomized_svd_truncation_error_matches_exact(decay):
    g = _gen(0)
    sigma = decay ** torch.arange(400, dtype=F64)
    M = _with_spectrum(600, 400, sigma, g)  # min dim 400 > 256: the randomized path runs
    rank = 32
    U, S, Vh = randomized_svd(M, rank, dtype=F64)
    err = float((M - U @ torch.diag(S) @ Vh).norm())
    exact = _tail_error(M, rank)
    assert err <= 1.01 * exact  # within 1% of the Eckart–Young optimum
    # Projection can only shrink singular values: σ_k(QᵀM) ≤ σ_k(M); the leading ones are near exact.
    assert bool((S <= sigma[:rank] * (1 + 1e-12)).all())
    assert torch.allclose(S, sigma[:rank], rtol=0.03)
    assert torch.allclose(S[:8], sigma[:8], rtol=1e-3)
    assert torch.allclose(U.mT @ U, torch.eye(rank, dtype=F64), atol=1e-10)
    assert torch.allclose(Vh @ Vh.mT, torch.eye(rank, dtype=F64), atol=1e-10)


def test_randomized_svd_float32_default_and_shapes():
    g = _gen(1)
    M = _with_spectrum(300, 500, 0.9 ** torch.arange(300, dtype=F64), g)
    U, S, Vh = randomized_svd(M, 20)
    assert U.shape == (300, 20) and S.shape == (20,) and Vh.shape == (20, 500)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    err = float((M - (U @ torch.diag(S) @ Vh).to(F64)).norm())
    assert err <= 1.01 * _tail_error(M, 20)
    assert bool((S[:-1] >= S[1:]).all())


def test_randomized_svd_is_deterministic_given_seed_or_generator():
    M = _with_spectrum(400, 300, 0.95 ** torch.arange(300, dtype=F64), _gen(2))
    a = randomized_svd(M, 10, seed=7)
    b = randomized_svd(M, 10, seed=7)
    c = randomized_svd(M, 10, generator=torch.Generator().manual_seed(7))
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y) and torch.equal(x, z)
    d = randomized_svd(M, 10, seed=8)
    assert not torch.equal(a[0], d[0])


def test_randomized_svd_exact_path_for_small_matrices():
    M = torch.randn(40, 30, generator=_gen(3), dtype=F64)
    U, S, Vh = randomized_svd(M, 5, dtype=F64)
    U_ref, S_ref, Vh_ref = torch.linalg.svd(M, full_matrices=False)
    assert torch.allclose(S, S_ref[:5], rtol=1e-12)
    assert torch.allclose(
        U @ torch.diag(S) @ Vh, U_ref[:, :5] @ torch.diag(S_ref[:5]) @ Vh_ref[:5], atol=1e-12
    )


def test_randomized_svd_forced_randomized_on_small_matrix():
    M = _with_spectrum(60, 50, 0.7 ** torch.arange(50, dtype=F64), _gen(4))
    U, S, Vh = randomized_svd(M, 6, oversample=8, power_iters=2, dtype=F64, exact_below=0)
    assert float((M - U @ torch.diag(S) @ Vh).norm()) <= 1.001 * _tail_error(M, 6)


def test_randomized_svd_accepts_bf16_and_validates():
    M = torch.randn(50, 40, generator=_gen(5)).to(torch.bfloat16)
    U, S, Vh = randomized_svd(M, 4)
    assert U.dtype == torch.float32 and torch.isfinite(S).all()
    with pytest.raises(ValueError, match="rank"):
        randomized_svd(M, 0)
    with pytest.raises(ValueError, match="rank"):
        randomized_svd(M, 41)
    with pytest.raises(ValueError, match="dtype"):
        randomized_svd(M, 4, dtype=torch.float16)
    with pytest.raises(ValueError, match="NaN"):
        randomized_svd(torch.full((4, 4), float("nan")), 1)


# ----------------------------------------------------------------------------------------- damped_cholesky


def test_damped_cholesky_formula():
    X = _anisotropic_inputs(100, 16, _gen(6))
    C = X.mT @ X
    L, used_identity = damped_cholesky(C, 0.05)
    assert not used_identity and L.dtype == F64
    assert torch.equal(L, torch.tril(L))
    expected = C + 0.05 * C.diagonal().mean() * torch.eye(16, dtype=F64)
    assert torch.allclose(L @ L.mT, expected, rtol=1e-12, atol=1e-12 * float(C.diagonal().mean()))


def test_damped_cholesky_rank_deficient_retries_with_more_damping():
    x = torch.randn(3, 12, generator=_gen(7), dtype=F64)  # 3 tokens, 12 channels: rank 3
    C = x.mT @ x
    L, used_identity = damped_cholesky(C, 0.0)
    assert not used_identity and torch.isfinite(L).all()
    assert torch.allclose(L @ L.mT, C, atol=1e-6 * float(C.diagonal().mean()))


def test_damped_cholesky_zero_gives_identity_and_flag():
    L, used_identity = damped_cholesky(torch.zeros(5, 5), 0.01)
    assert used_identity and torch.equal(L, torch.eye(5, dtype=F64))


def test_damped_cholesky_rejects_garbage():
    with pytest.raises(ValueError, match="square"):
        damped_cholesky(torch.ones(3, 4))
    with pytest.raises(ValueError, match="NaN"):
        damped_cholesky(torch.tensor([[1.0, float("inf")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="covariance"):
        damped_cholesky(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))


# ----------------------------------------------------------------------------------------- lowrank_branch


def test_unwhitened_branch_is_truncated_svd():
    W = torch.randn(24, 40, generator=_gen(8), dtype=F64)
    B, A = lowrank_branch(W, 6, dtype=F64)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    assert B.shape == (24, 6) and A.shape == (6, 40)
    assert torch.allclose(B @ A, U[:, :6] @ torch.diag(S[:6]) @ Vh[:6], atol=1e-12)
    assert torch.allclose(A @ A.mT, torch.eye(6, dtype=F64), atol=1e-12)


def test_whitened_branch_is_the_exact_output_error_optimum():
    g = _gen(9)
    out, n_in, n, rank = 16, 24, 200, 5
    W = torch.randn(out, n_in, generator=g, dtype=F64)
    X = _anisotropic_inputs(n, n_in, g)
    C = X.mT @ X
    B, A = lowrank_branch(W, rank, C, damp=0.0, dtype=F64)

    # Brute force: the best rank-r approximation of W·Xᵀ (Eckart–Young), pulled back through X.
    P = W @ X.mT
    U, S, Vh = torch.linalg.svd(P, full_matrices=False)
    P_r = U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]
    Z = torch.linalg.solve(C, (P_r @ X).mT).mT  # Z = P_r·X·(XᵀX)⁻¹, so Z·Xᵀ = P_r
    optimum = float(S[rank:].square().sum().sqrt())

    achieved = float(((W - B @ A) @ X.mT).norm())
    assert achieved == pytest.approx(optimum, rel=1e-6)
    assert torch.allclose(B @ A, Z, rtol=0, atol=1e-6 * float(Z.abs().max()))
    assert torch.allclose(A @ A.mT, torch.eye(rank, dtype=F64), atol=1e-10)
    assert output_error(B @ A, W, C) == pytest.approx(optimum / float(P.norm()), rel=1e-6)


def test_whitening_beats_plain_svd_on_anisotropic_inputs():
    g = _gen(10)
    W = torch.randn(32, 48, generator=g, dtype=F64)
    C = (X := _anisotropic_inputs(500, 48, g)).mT @ X
    Bp, Ap = lowrank_branch(W, 8)
    Bw, Aw = lowrank_branch(W, 8, C)
    plain, whitened = output_error(Bp @ Ap, W, C), output_error(Bw @ Aw, W, C)
    assert whitened < 0.7 * plain
    # ... and the plain SVD stays better in the weight norm it optimizes.
    assert output_error(Bp @ Ap, W) < output_error(Bw @ Aw, W)


def test_whitened_float32_randomized_matches_float64_exact():
    g = _gen(11)
    n_in, rank = 300, 16
    W = _with_spectrum(320, n_in, 0.97 ** torch.arange(n_in, dtype=F64), g)
    C = (X := _anisotropic_inputs(1000, n_in, g, spread=2.0)).mT @ X
    B32, A32 = lowrank_branch(W, rank, C)  # float32, randomized (min dim 300 > 256)
    B64, A64 = lowrank_branch(W, rank, C, dtype=F64, exact_below=10_000)  # float64, exact SVD
    assert B32.dtype == A32.dtype == torch.float32
    e32, e64 = output_error(B32 @ A32, W, C), output_error(B64 @ A64, W, C)
    assert e64 <= e32 <= 1.01 * e64


def test_zero_cov_falls_back_to_plain_svd_and_bf16_weights():
    W = torch.randn(20, 30, generator=_gen(12)).to(torch.bfloat16)
    B0, A0 = lowrank_branch(W, 4, torch.zeros(30, 30))
    B1, A1 = lowrank_branch(W, 4)
    assert B0.dtype == torch.float32 and torch.equal(B0, B1) and torch.equal(A0, A1)
    with pytest.raises(ValueError, match="cov"):
        lowrank_branch(W, 4, torch.eye(20))


# ----------------------------------------------------------------------------------------- helpers


def test_output_error_formulas():
    g = _gen(13)
    W = torch.randn(10, 14, generator=g, dtype=F64)
    Wa = W + 0.1 * torch.randn(10, 14, generator=g, dtype=F64)
    X = torch.randn(50, 14, generator=g, dtype=F64)
    expected = float(((W - Wa) @ X.mT).norm() / (W @ X.mT).norm())
    assert output_error(Wa, W, X.mT @ X) == pytest.approx(expected, rel=1e-12)
    assert output_error(Wa, W) == pytest.approx(float((W - Wa).norm() / W.norm()), rel=1e-12)
    assert output_error(torch.zeros(3, 3), torch.zeros(3, 3)) == 0.0
    assert output_error(torch.ones(3, 3), torch.zeros(3, 3)) == math.inf
    assert relative_error(-1e-30, 1.0) == 0.0


def test_orthonormalize_rows_keeps_the_product():
    g = _gen(14)
    B = torch.randn(3, 12, 5, generator=g, dtype=F64)  # batched B is allowed
    A = torch.randn(5, 20, generator=g, dtype=F64)
    B2, A2 = orthonormalize_rows(B, A)
    assert torch.allclose(B2 @ A2, B @ A, atol=1e-12)
    assert torch.allclose(A2 @ A2.mT, torch.eye(5, dtype=F64), atol=1e-12)
    # unique: re-orthonormalizing an orthonormal A is the identity map
    B3, A3 = orthonormalize_rows(B2, A2)
    assert torch.allclose(A3, A2, atol=1e-12) and torch.allclose(B3, B2, atol=1e-12)
