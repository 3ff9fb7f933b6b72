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
