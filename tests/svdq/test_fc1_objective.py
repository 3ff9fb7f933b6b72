"""``SVDQConfig.fc1_objective="activation"``: expert fc1 decisions by the error of ``act(fc1(x) + b)``
(svdq/DESIGN.md §20), against a brute-force float64 evaluation of that objective on tiny shapes."""

import dataclasses

import pytest
import torch
from torch import nn

from svdq import InputStats, SVDQConfig
from svdq.experts.handlers.concat_glu import ConcatGLU
from svdq.formats import fake_quant
from svdq.solvers.expert_group import decompose_expert_group
from svdq.solvers.smoothing import smoothing_vector

F64 = torch.float64
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
CFG = SVDQConfig(rank=4, alphas=ALPHAS, refine_steps=0, sample_tokens=512, fc1_objective="activation")


def _group(out: int, E=4, n_in=64, counts=(300, 120, 0, 200), seed=0):
    """Experts with outlier input channels; every token sampled (sample_tokens ≥ tokens: weights 1)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(E, out, n_in, generator=g) / n_in**0.5
    W[:, :, :3] *= 6.0
    scale = torch.ones(n_in)
    scale[torch.randperm(n_in, generator=g)[:4]] = 20.0
    stats = []
    for i, n in enumerate(counts):
        st = InputStats(n_in, sample_size=CFG.sample_tokens, seed=i)
        if n:
            st.update(torch.randn(n, n_in, generator=g) * scale)
        stats.append(st)
    return W, stats


def _consumer_total(res, W, stats, act, bias, s) -> tuple[float, list[float]]:
    """Brute force in float64: ``act(Q_a(x/s)·Q_w(R_i)ᵀ + x·A_iᵀ·B_iᵀ + b_i)`` against ``act(x·W_iᵀ + b_i)``
    with ``R_i = (W_i − B_i·A_i)·diag(s)``, each expert's activations and residual quantized as their own
    tensors; returns the activation-weighted relative total and the per-expert errors."""
    fmt = CFG.weight_quant
    num = den = 0.0
    per = []
    for i, st in enumerate(stats):
        if st.n_tokens == 0:
            per.append(None)
            continue
        x = st.sample.to(F64)  # (n, in): all routed tokens
        down, up = (t.to(F64) for t in res.expert_branch(i))
        R = (W[i].to(F64) - up @ down) * s.to(F64)
        Rq = fake_quant(R.float(), fmt).to(F64)
        xq = fake_quant((x / s.to(F64)).float(), CFG.act_quant).to(F64)
        b = 0.0 if bias is None else bias[i].to(F64)
        z = act(xq @ Rq.T + (x @ down.T) @ up.T + b)
        z_ref = act(x @ W[i].to(F64).T + b)
        n_i, d_i = float((z - z_ref).square().sum()), float(z_ref.square().sum())
        w = st.n_tokens / x.shape[0]
        num, den = num + w * n_i, den + w * d_i
        per.append((n_i / d_i) ** 0.5)
    return (num / den) ** 0.5, per


CASES = {  # name: (activation, fc1 rows per F, bias)
    "swiglu": (ConcatGLU(nn.SiLU()), 2, False),
    "gelu+bias": (nn.GELU(), 1, True),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("layout", ["shared-down", "per-expert"])
def test_activation_objective_scores_alpha_by_the_consumer_error(case, layout):
    act, rows, with_bias = CASES[case]
    W, stats = _group(out=rows * 32)
    g = torch.Generator().manual_seed(5)
    bias = torch.randn(W.shape[0], W.shape[1], generator=g) if with_bias else None
    res = decompose_expert_group(W, stats, CFG, projection="fc1", layout=layout, activation=act, bias=bias)
    assert res.objective == "activation" and res.summary()["objective"] == "activation"
    # pooled fc1 smoothing candidates (svdq/DESIGN.md §4), scored here by brute force
    xa = torch.stack([st.absmax for st in stats if st.n_tokens]).amax(0)
    wa = W.abs().amax(dim=1).amax(0)
    ref = {a: _consumer_total(res, W, stats, act, bias, smoothing_vector(xa, wa, a))[0] for a in ALPHAS}
    table = dict(res.alpha_errors)
    assert sorted(table) == sorted(ALPHAS)
    for a in ALPHAS:  # float32 scoring vs the float64 reference (the branch stored in float32)
        assert table[a] == pytest.approx(ref[a], rel=2e-3), (a, table[a], ref[a])
    assert ref[res.alpha] <= min(ref.values()) * (1 + 2e-3)  # the consumer-optimal α
    total, per = _consumer_total(res, W, stats, act, bias, res.smooth)
    assert res.final_error == pytest.approx(total, rel=2e-3)
    for i, e in enumerate(per):
        if e is not None:
            assert res.final_errors[i] == pytest.approx(e, rel=2e-3)
    # the output objective picks its α by fc1's output error: no better on the consumer's error
    out = decompose_expert_group(
        W, stats, dataclasses.replace(CFG, fc1_objective="output"), projection="fc1", layout=layout
    )
    assert out.objective == "output"
    assert _consumer_total(out, W, stats, act, bias, out.smooth)[0] >= total * (1 - 2e-3)


def test_activation_objective_without_an_activation_keeps_the_output_objective():
    W, stats = _group(out=64)
    res = decompose_expert_group(W, stats, CFG, projection="fc1", layout="per-expert")
    fc2 = decompose_expert_group(W, stats, CFG, projection="fc2", layout="per-expert", activation=nn.GELU())
    assert res.objective == "output" and fc2.objective == "output"  # fc2 always scores its own output


def test_bad_objective_and_bias_shape_are_refused():
    with pytest.raises(ValueError, match="fc1_objective"):
        SVDQConfig(fc1_objective="loss")
    W, stats = _group(out=64)
    with pytest.raises(ValueError, match=r"layer0\.fc1: fc1 bias must be \(E × out\)"):
        decompose_expert_group(W, stats, CFG, activation=nn.GELU(), bias=torch.zeros(4, 3))
