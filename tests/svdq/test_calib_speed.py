"""The faster calibration paths equal the ones they replace (CPU, tiny shapes; tolerances stated)."""

import pytest
import torch

from svdq import InputStats, SVDQConfig, decompose_linear
from svdq.solvers import linear as linear_mod
from svdq.solvers.batched import fake_quant_experts, relative_norms
from svdq.solvers.linear import _Solver
from svdq.solvers.smoothing import smoothing_vector


def _layer(seed=0, out_f=160, in_f=128, n=700):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g) * 0.05
    W[:, :3] *= 8
    X = torch.randn(n, in_f, generator=g)
    X[:, 5:9] *= 25
    st = InputStats(in_f, sample_size=256)
    for chunk in X.split(200):
        st.update(chunk)
    return W, st


def test_relative_norms_match_relative_norm():
    from svdq.metrics import relative_norm

    g = torch.Generator().manual_seed(1)
    d, ref = torch.randn(5, 7, 9, generator=g), torch.randn(7, 9, generator=g)
    d[2] = 0
    got = relative_norms(d, ref)
    want = torch.stack([relative_norm(x, ref, as_tensor=True) for x in d])
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    assert relative_norms(torch.zeros(1, 3), torch.zeros(3)).item() == 0.0


@pytest.mark.parametrize("preset", ["nvfp4-w4a4-r32", "int4-w4a4-r32", "nvfp4-w4a16-r32"])
@pytest.mark.parametrize("score_rows", [2048, 64])  # all rows / a scoring subset
def test_batched_alpha_scores_equal_the_loop(preset, score_rows, monkeypatch):
    """score_batch gives every α candidate the error of score() (the previous loop) to float32 rounding
    of the summation order (relative 1e-5), also when the candidates are split into chunks."""
    W, st = _layer()
    cfg = SVDQConfig.preset(preset).replace(rank=16, score_rows=score_rows)
    solver = _Solver(W, st, cfg)
    B, A = solver.branch(W, torch.ones(W.shape[1]), True)
    smooths = [smoothing_vector(solver.x_absmax, solver.w_absmax, a) for a in cfg.alphas]
    loop = torch.stack([solver.score(s, B, A) for s in smooths])
    torch.testing.assert_close(solver.score_batch(smooths, B, A), loop, rtol=1e-5, atol=0)
    monkeypatch.setattr(linear_mod, "SCORE_BATCH_ELEMENTS", 1)  # one candidate per chunk
    torch.testing.assert_close(solver.score_batch(smooths, B, A), loop, rtol=1e-5, atol=0)


def test_fake_quant_experts_per_candidate_equals_fake_quant():
    """The batched quantizer of the α search reproduces fake_quant of each candidate bit for bit."""
    from svdq.formats import fake_quant

    W, st = _layer(2)
    S = torch.stack([smoothing_vector(st.absmax, W.abs().amax(0), a) for a in (0.0, 0.5, 1.0)])
    for fmt in ("nvfp4", "int4", "fp8"):
        got = fake_quant_experts(W * S[:, None], fmt)
        assert torch.equal(got, torch.stack([fake_quant(W * s, fmt) for s in S]))


@pytest.mark.parametrize("preset", ["nvfp4-w4a4-r32", "int4-w4a4-r32"])
def test_decompose_linear_unchanged_by_batched_search(preset, monkeypatch):
    """The whole decomposition with the batched α search equals the previous per-candidate loop: the same
    α and branch kind, errors to relative 1e-5, identical tensors."""
    W, st = _layer(3)
    cfg = SVDQConfig.preset(preset).replace(rank=16)
    new = decompose_linear(W, st, cfg)

    def loop(self, smooths, B, A):
        return torch.stack([self.score(s, B, A) for s in smooths])

    monkeypatch.setattr(_Solver, "score_batch", loop)
    old = decompose_linear(W, st, cfg)
    assert (new.alpha, new.whitened) == (old.alpha, old.whitened)
    for (a1, w1, e1), (a2, w2, e2) in zip(new.alpha_errors, old.alpha_errors):
        assert (a1, w1) == (a2, w2)
        assert e1 == pytest.approx(e2, rel=1e-5)
    assert new.final_error == pytest.approx(old.final_error, rel=1e-5)
    assert torch.equal(new.lora_down, old.lora_down) and torch.equal(new.smooth, old.smooth)


def test_wide_svd_matches_float64_svd():
    """The Gram-eigh Rayleigh–Ritz SVD gives the top-r triplets of a float64 SVD: values to relative 1e-10,
    the rank-r truncation to 1e-9; rank-deficient input falls back to torch.linalg.svd."""
    from svdq.solvers.lowrank import wide_svd

    g = torch.Generator().manual_seed(4)
    k, n, r = 48, 300, 32
    U0 = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64)).Q
    V0 = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    Y = U0 @ torch.diag(torch.logspace(0, -2.5, k, dtype=torch.float64)) @ V0.T  # (k × n)
    U, S, Vh = wide_svd(Y, r)
    Ur, Sr, Vhr = torch.linalg.svd(Y, full_matrices=False)
    torch.testing.assert_close(S, Sr[:r], rtol=1e-10, atol=0)
    torch.testing.assert_close((U * S) @ Vh, (Ur[:, :r] * Sr[:r]) @ Vhr[:r], rtol=0, atol=1e-9)
    torch.testing.assert_close(Vh @ Vh.T, torch.eye(r, dtype=torch.float64), rtol=0, atol=1e-9)
    Y32 = Y.float()
    assert wide_svd(Y32, r)[0].dtype == torch.float32
    low = Y[:, :] * 0
    low[:10] = Y[:10]  # rank 10 < r: fallback
    U, S, Vh = wide_svd(low, r)
    torch.testing.assert_close((U * S) @ Vh, low, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(384, 384), (1536, 384), (384, 1536)])
def test_decompose_linear_unchanged_by_wide_svd(shape, monkeypatch):
    """decompose_linear with the Gram-eigh small SVD equals the previous torch.linalg.svd (float32) one:
    same α and branch kind, branch B·A to relative 1e-4 (no refinement), output errors to 1e-4."""
    from svdq.solvers import lowrank

    W, st = _layer(5, *shape, n=1500)
    cfg = SVDQConfig(rank=32, refine_steps=0)
    new = decompose_linear(W, st, cfg)

    def old_wide(Y, rank):
        U, S, Vh = torch.linalg.svd(Y, full_matrices=False)
        return U[:, :rank], S[:rank], Vh[:rank]

    monkeypatch.setattr(lowrank, "wide_svd", old_wide)
    old = decompose_linear(W, st, cfg)
    assert (new.alpha, new.whitened) == (old.alpha, old.whitened)
    ba_new = new.lora_up.double() @ new.lora_down.double()
    ba_old = old.lora_up.double() @ old.lora_down.double()
    assert ((ba_new - ba_old).norm() / ba_old.norm()).item() < 1e-4
    assert new.final_error == pytest.approx(old.final_error, rel=1e-4)


def test_smoothing_vectors_equal_smoothing_vector():
    """The whole α grid at once equals the per-α vectors bit for bit (dead channels included)."""
    from svdq.config import DEFAULT_ALPHAS
    from svdq.solvers.smoothing import smoothing_vectors

    g = torch.Generator().manual_seed(6)
    xa, wa = torch.rand(512, generator=g) * 30, torch.rand(512, generator=g) * 0.2
    xa[3], wa[7] = 0.0, 0.0
    want = torch.stack([smoothing_vector(xa, wa, a) for a in DEFAULT_ALPHAS])
    assert torch.equal(smoothing_vectors(xa, wa, DEFAULT_ALPHAS), want)


def _old_search_alpha(self, B, A, D):
    """The per-candidate α search as it was before candidates were batched (the reference)."""
    E = self.shape[0]
    if len(self.candidates) == 1:
        alpha, s = self.candidates[0]
        return s, (alpha,) * E, ()
    rows = self.rows
    colmax = D.abs().amax(dim=1)
    Dr = D if rows is None else D[:, rows]
    Yb = self.branch_out(B, A, rows)
    all_nums = []
    for _, s in self.candidates:
        s2 = s.unsqueeze(0) if s.dim() == 1 else s
        Rq = self.quant_residual(Dr, s, amax=(colmax * s2).amax(-1))
        all_nums.append(self.nums(s, Rq, Yb, rows, Dr, keep=self._keep_candidates))
    N = torch.stack(all_nums)
    totals = self.totals(N, self.dens(rows))
    table = tuple((a, t) for (a, _), t in zip(self.candidates, totals))
    if self.projection == "fc1":
        j = min(range(len(totals)), key=totals.__getitem__)
        alpha, s = self.candidates[j]
        return s, (alpha,) * E, table
    pick = N.argmin(0).tolist()
    s = torch.stack([self.candidates[j][1][i] for i, j in enumerate(pick)])
    alphas = tuple(self.candidates[j][0] if self.counts[i] > 0 else None for i, j in enumerate(pick))
    return s, alphas, table


@pytest.mark.parametrize("projection,layout", [("fc1", "shared-down"), ("fc2", "auto")])
@pytest.mark.parametrize("batch_elements", [1 << 25, 1])  # all candidates in one batch / one per chunk
def test_expert_alpha_search_batched_equals_loop(projection, layout, batch_elements, monkeypatch):
    """The candidate-batched expert α search gives bit-identical results to the per-candidate loop
    (the same quantized values; every error figure equal), with an expert without tokens."""
    from svdq.solvers import expert_group as eg

    g = torch.Generator().manual_seed(7)
    E, out, n_in = 4, 48, 64
    W = torch.randn(E, out, n_in, generator=g) / 8
    stats = []
    for i, n in enumerate((300, 0, 90, 400)):
        st = InputStats(n_in, sample_size=64, seed=i)
        if n:
            x = torch.randn(n, n_in, generator=g)
            x[:, 3] *= 20
            st.update(x)
        stats.append(st)
    cfg = SVDQConfig(rank=4, sample_tokens=64, score_rows=64)
    kw = dict(projection=projection, layout=layout)
    monkeypatch.setattr(eg, "SEARCH_BATCH_ELEMENTS", batch_elements)
    new = eg.decompose_expert_group(W, stats, cfg, **kw)
    monkeypatch.setattr(eg._ExpertProjection, "search_alpha", _old_search_alpha)
    old = eg.decompose_expert_group(W, stats, cfg, **kw)
    a, b = new.summary(), old.summary()
    a.pop("seconds"), b.pop("seconds")
    assert a == b
    assert torch.equal(new.smooth, old.smooth)
    assert all(torch.equal(x.qdata, y.qdata) for x, y in zip(new.residuals, old.residuals))


def _old_pcg(apply, precondition, rhs, X, iters, tol):
    """The A-step's PCG loop with host-side scalars and early exits, as before (the reference)."""
    R = rhs - apply(X)
    Z = precondition(R)
    P = Z
    b_norm, r_norm, rz = torch.stack([rhs.norm(), R.norm(), (R * Z).sum()]).tolist()
    for _ in range(iters):
        if r_norm <= tol * b_norm or rz <= 0.0:
            break
        Q = apply(P)
        pq = float((P * Q).sum())
        if pq <= 0.0:
            break
        alpha = rz / pq
        X = X + alpha * P
        R = R - alpha * Q
        Z = precondition(R)
        r_norm, rz_new = torch.stack([R.norm(), (R * Z).sum()]).tolist()
        P = Z + (rz_new / rz) * P
        rz = rz_new
    return X


@pytest.mark.parametrize("tol", [1e-8, 0.3, 10.0])  # runs all iterations / stops early / stops at once
def test_sync_free_pcg_equals_early_exit_pcg(tol):
    from svdq.solvers.shared_basis import _pcg_iterations

    g = torch.Generator().manual_seed(8)
    M = torch.randn(12, 12, generator=g, dtype=torch.float64)
    M = M @ M.T + 0.1 * torch.eye(12, dtype=torch.float64)
    rhs, X0 = torch.randn(12, 5, generator=g, dtype=torch.float64), torch.zeros(12, 5, dtype=torch.float64)

    def apply(X):
        return M @ X

    def precondition(R):
        return R / M.diagonal()[:, None]

    want = _old_pcg(apply, precondition, rhs, X0.clone(), 8, tol)
    R = rhs - apply(X0)
    Z = precondition(R)
    rz = (R * Z).sum()
    got = _pcg_iterations(
        apply, precondition, X0.clone(), R, Z, (rz, float(rz)), 8, tol, float(rhs.norm()), float(R.norm())
    )
    assert torch.equal(got, want)
