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
