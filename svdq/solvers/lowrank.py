"""Low-rank branch of one dense weight (svdq/DESIGN.md §3, step 2).

Conventions used throughout:

* ``W`` is ``(out × in)``; a rank-``r`` branch is ``W ≈ B·A`` with ``B (out × r)`` = ``lora_up`` and
  ``A (r × in)`` = ``lora_down``.
* Every branch returned here has **orthonormal rows in A** (``A·Aᵀ = I_r``); ``B`` carries the magnitudes.
  The gauge does not change ``B·A``; it keeps ``A·x`` at the scale of ``x`` whatever the covariance scale.
* A covariance is the un-normalized second moment ``C = XᵀX`` ``(in × in)`` of calibration inputs
  ``X (n × in)``; the output error of an approximation ``W̃`` is ``‖(W − W̃)·Xᵀ‖_F² = tr(D·C·Dᵀ)``,
  ``D = W − W̃``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from svdq.metrics import relative_error  # re-exported: the relative-error helper lives in svdq.metrics

__all__ = [
    "damped_cholesky",
    "lowrank_branch",
    "orthonormalize_rows",
    "output_error",
    "randomized_svd",
    "randomized_svd_product",
    "wide_svd",
    "relative_error",
]

_COMPUTE_DTYPES = (torch.float32, torch.float64)


def randomized_svd(
    M: Tensor,
    rank: int,
    oversample: int = 8,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    exact_below: int = 256,
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` singular triplets of ``M (m × n)``: ``U (m × r)``, ``S (r,)``, ``Vh (r × n)``.

    ``M ≈ U·diag(S)·Vh`` with ``S`` descending. Range finder with power iterations (Halko, Martinsson &
    Tropp 2011): with ``k = rank + oversample`` and a Gaussian test matrix ``Ω (n × k)``,

        Q ← orth(M·Ω);  repeat ``power_iters`` times:  Q ← orth(M·orth(Mᵀ·Q))

    (``orth`` = reduced QR, applied between every product so that small singular directions survive), then
    the exact SVD of the small ``Qᵀ·M (k × n)`` gives ``U = Q·Ũ``. When ``min(m, n) ≤ max(exact_below, 2k)``
    the exact ``torch.linalg.svd`` of ``M`` is used instead (cheaper and exact at that size).

    The computation runs in ``dtype`` (float32 or float64); inputs of other dtypes are converted. The result
    is deterministic: ``Ω`` comes from ``generator`` when given, else from a fresh generator seeded with
    ``seed`` on ``M``'s device.
    """
    _check_matrix(M, "M")
    if dtype not in _COMPUTE_DTYPES:
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    m, n = M.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be in [1, min(m, n) = {min(m, n)}], got {rank}")
    M = M.to(dtype)
    k = min(rank + max(oversample, 0), min(m, n))
    if min(m, n) <= max(exact_below, 2 * k):
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        return U[:, :rank], S[:rank], Vh[:rank]

    if generator is None:
        generator = torch.Generator(device=M.device)
        generator.manual_seed(seed)
    omega = torch.randn(n, k, generator=generator, device=M.device, dtype=dtype)
    Q = _orth(M @ omega)
    for _ in range(power_iters):
        Z = _orth(M.mT @ Q)
        Q = _orth(M @ Z)
    U_small, S, Vh = wide_svd(Q.mT @ M, rank)
    U = Q @ U_small
    return U[:, :rank], S[:rank], Vh[:rank]


def _orth(Y: Tensor) -> Tensor:
    """Orthonormal basis ``Q (m × k)`` of the columns of a tall ``Y (m × k)``.

    CPU: Householder QR. CUDA: shifted Cholesky-QR, three passes (Gram matrix and triangular solves in
    float64), which avoids the slow tall-skinny QR kernels and stays accurate for ill-conditioned ``Y``
    (the shift keeps the first Cholesky positive definite; the later passes restore orthogonality). The
    three factorizations are unchecked (``cholesky_ex``) and their status read once: one host sync instead
    of three; if one failed (a rank-deficient ``Y``) the basis comes from Householder QR.
    """
    if not Y.is_cuda:
        return torch.linalg.qr(Y).Q
    Q = Y.double()
    eye = torch.eye(Y.shape[1], dtype=torch.float64, device=Y.device)
    failed = torch.zeros((), dtype=torch.bool, device=Y.device)
    for i in range(3):
        G = Q.mT @ Q
        if i == 0:
            G = G + (1e-12 * G.diagonal().sum() + 1e-300) * eye
        R, info = torch.linalg.cholesky_ex(G, upper=True)
        failed |= info != 0
        Q = torch.linalg.solve_triangular(R, Q, upper=True, left=False)
    if bool(failed):
        return torch.linalg.qr(Y).Q
    return Q.to(Y.dtype)


def damped_cholesky(C: Tensor, damp: float = 0.01, *, max_tries: int = 16) -> tuple[Tensor, bool]:
    """Lower-triangular ``L (n × n, float64)`` with ``C + λ·I = L·Lᵀ``, ``λ = d·mean(diag(C))``.

    Returns ``(L, used_identity)``. ``d`` starts at ``damp``; if the damped matrix is not numerically
    positive definite, ``d`` grows (``max(10·d, 1e-10)``) up to ``max_tries`` attempts, so a rank-deficient
    covariance (few tokens) still gets a factor. An all-zero ``C`` (no calibration tokens) returns
    ``(I, True)``: whitening with it is the plain weight-space approximation. Only the lower triangle of
    ``C`` is read. Raises ``ValueError`` for a non-square, non-finite or clearly non-PSD ``C``.
    """
    _check_matrix(C, "C")
    if C.shape[0] != C.shape[1]:
        raise ValueError(f"C must be square, got {tuple(C.shape)}")
    C = C.to(torch.float64)
    eye = torch.eye(C.shape[0], dtype=torch.float64, device=C.device)
    scale = C.diagonal().mean().item()
    if scale <= 0.0:
        if not C.any():
            return eye, True
        raise ValueError("C has a non-positive trace but is not zero: not a covariance (XᵀX)")
    d = max(damp, 0.0)
    for _ in range(max_tries):
        L, info = torch.linalg.cholesky_ex(C + (d * scale) * eye)
        if info.item() == 0:
            return L, False
        d = max(10.0 * d, 1e-10)
    raise ValueError(
        f"C is not positive semidefinite: Cholesky failed even with damping {d / 10:g}·mean(diag)"
    )


def orthonormalize_rows(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    """Re-gauge a factorization ``B·A`` so that ``A`` has orthonormal rows; the product is unchanged.

    ``B (… × r)``, ``A (r × in)`` with ``r ≤ in``. With the reduced QR ``Aᵀ = Q·R`` (signs fixed so that
    ``diag(R) ≥ 0``, which makes the result unique for full-rank ``A``): ``A' = Qᵀ``, ``B' = B·Rᵀ``.
    """
    Q, R = torch.linalg.qr(A.mT)
    signs = torch.where(R.diagonal() < 0, -1.0, 1.0).to(R.dtype)
    return B @ (R * signs[:, None]).mT, (Q * signs).mT


def lowrank_branch(
    W: Tensor,
    rank: int,
    cov: Tensor | None = None,
    damp: float = 0.01,
    *,
    dtype: torch.dtype = torch.float32,
    **svd_kwargs,
) -> tuple[Tensor, Tensor]:
    """Rank-``r`` branch ``(B (out × r), A (r × in))`` of ``W (out × in)``, returned in ``dtype``.

    * ``cov is None``: truncated SVD ``W ≈ Uᵣ·diag(Sᵣ)·Vhᵣ``; ``B = Uᵣ·diag(Sᵣ)``, ``A = Vhᵣ``. Minimizes
      ``‖W − B·A‖_F``.
    * ``cov = C = XᵀX (in × in)``: whitening. With ``C + λI = S·Sᵀ`` (:func:`damped_cholesky`, float64),
      take the top-``r`` SVD ``W·S ≈ Uᵣ·diag(Sᵣ)·Vhᵣ`` and map back: ``A = Vhᵣ·S⁻¹`` (triangular solve, no
      inverse), ``B = Uᵣ·diag(Sᵣ)``; then re-gauge with :func:`orthonormalize_rows`. Minimizes
      ``‖(W − B·A)·S‖_F² = tr(D·(C + λI)·Dᵀ)``, i.e. the output error ``‖(W − B·A)·Xᵀ‖_F`` when ``λ = 0``.
      An all-zero ``cov`` falls back to the unwhitened branch.

    ``svd_kwargs`` go to :func:`randomized_svd` (``oversample``, ``power_iters``, ``generator``, ``seed``,
    ``exact_below``). In both cases ``A·Aᵀ = I``.
    """
    if dtype not in _COMPUTE_DTYPES:
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    _check_matrix(W, "W")
    if cov is not None:
        if cov.shape != (W.shape[1], W.shape[1]):
            raise ValueError(f"cov must be ({W.shape[1]} × {W.shape[1]}), got {tuple(cov.shape)}")
        L, used_identity = damped_cholesky(cov, damp)
        if not used_identity:
            WS = (W.to(torch.float64) @ L).to(dtype)
            U, S, Vh = randomized_svd(WS, rank, dtype=dtype, **svd_kwargs)
            A = torch.linalg.solve_triangular(L, Vh.to(torch.float64), upper=False, left=False)
            B, A = orthonormalize_rows((U * S[None, :]).to(torch.float64), A)
            return B.to(dtype), A.to(dtype)
    U, S, Vh = randomized_svd(W, rank, dtype=dtype, **svd_kwargs)
    return U * S[None, :], Vh


def output_error(W_approx: Tensor, W: Tensor, cov: Tensor | None = None) -> float:
    """Relative activation-weighted error ``sqrt(tr(D·C·Dᵀ) / tr(W·C·Wᵀ))``, ``D = W − W_approx``.

    ``W, W_approx (out × in)``; ``cov = C (in × in)``; ``cov=None`` means ``C = I`` (relative Frobenius
    error). Computed in float64. ``0/0`` gives 0.0 and ``x/0`` gives ``inf``, never NaN.
    """
    W = W.to(torch.float64)
    D = W - W_approx.to(torch.float64)
    if cov is None:
        return relative_error(float(D.square().sum()), float(W.square().sum()))
    C = cov.to(torch.float64)
    return relative_error(float(((D @ C) * D).sum()), float(((W @ C) * W).sum()))


def _check_matrix(T: Tensor, name: str) -> None:
    if T.dim() != 2:
        raise ValueError(f"{name} must be a matrix, got shape {tuple(T.shape)}")
    if not T.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {T.dtype}")
    if not bool(torch.isfinite(T).all()):
        raise ValueError(f"{name} contains NaN or inf")


def randomized_svd_product(
    left: Tensor,
    right: Tensor,
    rank: int,
    oversample: int = 8,
    power_iters: int = 2,
    *,
    seed: int = 0,
    exact_below: int = 256,
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` SVD of ``M = left·right`` without forming ``M`` (``left (m × p)``, ``right (p × n)``).

    Same algorithm and outputs as :func:`randomized_svd` (``U (m × r)``, ``S (r,)``, ``Vh (r × n)``,
    float32), but every product with ``M`` goes through the factors: ``M·Ω = left·(right·Ω)`` and
    ``Mᵀ·Q = rightᵀ·(leftᵀ·Q)``, so a whitened SVD ``(W·L)`` costs ``O((m + n)·p·k)`` instead of the
    ``O(m·p·n)`` of forming ``W·L``. Small problems form ``M`` and take the exact SVD.
    """
    left = left.float()
    right = right.float()
    m, n = left.shape[0], right.shape[1]
    k = min(rank + max(oversample, 0), min(m, n))
    if min(m, n) <= max(exact_below, 2 * k):
        return randomized_svd(left @ right, rank, exact_below=exact_below)
    generator = torch.Generator(device=left.device)
    generator.manual_seed(seed)
    omega = torch.randn(n, k, generator=generator, device=left.device)
    Q = _orth(left @ (right @ omega))
    for _ in range(power_iters):
        Z = _orth(right.mT @ (left.mT @ Q))
        Q = _orth(left @ (right @ Z))
    U_small, S, Vh = wide_svd((Q.mT @ left) @ right, rank)
    return (Q @ U_small)[:, :rank], S[:rank], Vh[:rank]


def wide_svd(Y: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` singular triplets ``U (k × rank)``, ``S (rank,)``, ``Vh (rank × n)`` of a wide
    ``Y (k × n)``, ``k ≤ n`` (the Rayleigh–Ritz step of the randomized SVD), in ``Y``'s dtype.

    By the eigen-decomposition of the small Gram ``Y·Yᵀ = U·diag(S²)·Uᵀ`` (float64, on the CPU: a ``k × k``
    problem) and ``Vh = diag(1/S)·Uᵀ·Y`` (float64, on ``Y``'s device), instead of ``torch.linalg.svd``
    (several times slower on CPU, and an iterative solver with host syncs on CUDA). In float64 the top
    singular values match the SVD's to ``~1e-16·S₁²/Sᵢ`` (relative ``1e-10`` unless ``Sᵢ/S₁ < 1e-3``);
    signs may differ (callers re-gauge). Falls back to ``torch.linalg.svd`` when the kept values are not
    well above round-off (``S_rank ≤ 1e-6·S₁``: rank-deficient inputs) or ``k > n``.
    """
    k, n = Y.shape
    if k > n:
        U, S, Vh = torch.linalg.svd(Y, full_matrices=False)
        return U[:, :rank], S[:rank], Vh[:rank]
    Y64 = Y.to(torch.float64)
    G = (Y64 @ Y64.mT).cpu()  # (k × k)
    w, V = torch.linalg.eigh(0.5 * (G + G.mT))  # ascending
    w_top = w.flip(0)[:rank]
    if not bool(w_top[-1] > 1e-12 * w_top[0]):
        U, S, Vh = torch.linalg.svd(Y, full_matrices=False)
        return U[:, :rank], S[:rank], Vh[:rank]
    U = V.flip(1)[:, :rank].to(Y.device)  # (k × rank)
    S = w_top.sqrt().to(Y.device)
    Vh = (U.mT @ Y64) / S[:, None]
    return U.to(Y.dtype), S.to(Y.dtype), Vh.to(Y.dtype)
