"""svdq.solvers.expert_group: SVDQuant of MoE expert groups: optimality, refinement, budget, robustness,
expert parallelism."""

import dataclasses
import json
import math

import pytest
import torch
import torch.distributed as dist

from svdq import InputStats, SVDQConfig
from svdq.formats import PackedTensor, dequantize, quantize_tensor
from svdq.solvers.expert_group import (
    MoEGroupResult,
    _smoothing_rows,
    decompose_expert_group,
    fake_quant_experts,
)
from svdq.solvers.shared_basis import _fit, _prepare, param_count, rank_for_budget
from svdq.solvers.smoothing import smoothing_vector
from tests.helpers.dist import run_distributed

F64 = torch.float64
CFG = SVDQConfig(rank=4, alphas=(0.25, 0.5, 0.75), refine_steps=3, refine_tol=0.0, sample_tokens=64)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _group(E=6, out=48, n_in=64, counts=(300, 0, 40, 500, 3, 120), seed=0):
    """Experts = shared component + own part, 4 outlier input columns; tokens with 4 outlier channels and
    per-expert scales. Returns float32 weights ``(E × out × in)``, per-expert InputStats and the inputs."""
    g = _gen(seed)
    common = torch.randn(out, n_in, generator=g)
    W = torch.stack(
        [(0.6 * common + 0.8 * torch.randn(out, n_in, generator=g)) / n_in**0.5 for _ in range(E)]
    )
    W[:, :, torch.randperm(n_in, generator=g)[:4]] *= 8.0
    scale = torch.ones(n_in)
    scale[torch.randperm(n_in, generator=g)[:4]] = 25.0
    stats, xs = [], []
    for i, n in enumerate(counts):
        x = torch.randn(n, n_in, generator=g) * scale * (1.0 + 0.3 * i)
        st = InputStats(n_in, sample_size=CFG.sample_tokens, seed=i)
        if n:
            st.update(x)
        stats.append(st)
        xs.append(x)
    return W, stats, xs


def _rel(a, b) -> float:
    return float((a.to(F64) - b.to(F64)).norm() / b.to(F64).norm())


def _reported_total(res: MoEGroupResult, W, stats) -> float:
    """The activation-weighted total recomputed from the packed result on the scoring samples."""
    num = den = 0.0
    for i, st in enumerate(stats):
        if st.n_tokens == 0:
            continue
        x = st.sample
        y_ref = x @ W[i].float().mT
        w = st.n_tokens / x.shape[0]
        num += w * float((res.expert_forward(i, x) - y_ref).double().square().sum())
        den += w * float(y_ref.double().square().sum())
    return math.sqrt(num / den)


# ----------------------------------------------------------------------------------------- layouts (math)


def _objective(W, C, B, A) -> float:
    """Σ_i tr(D_i·C_i·D_iᵀ) for factors of any layout (2-D = shared)."""
    total = 0.0
    for i, (w, c) in enumerate(zip(W, C)):
        Bi = B if B.dim() == 2 else B[i]
        Ai = A if A.dim() == 2 else A[i]
        D = w - Bi @ Ai
        total += float(((D @ c) * D).sum())
    return total


def _als_shared_down(W, C, rank, iters, g):
    """Alternating least squares for one shared A with a common covariance, from a random start."""
    A = torch.randn(rank, W.shape[-1], generator=g, dtype=F64)
    for _ in range(iters):
        B = torch.stack([w @ C @ A.mT @ torch.linalg.inv(A @ C @ A.mT) for w in W])
        A = torch.linalg.solve((B.mT @ B).sum(0), (B.mT @ W).sum(0))  # C cancels for a common C
    B = torch.stack([w @ C @ A.mT @ torch.linalg.inv(A @ C @ A.mT) for w in W])
    return B, A


def _als_shared_up(W, C, rank, iters, g):
    """Alternating least squares for one shared B with per-expert covariances, from a random start."""
    B = torch.randn(W.shape[1], rank, generator=g, dtype=F64)
    for _ in range(iters):
        A = torch.linalg.solve(B.mT @ B, B.mT @ W)  # A_i = (BᵀB)⁻¹·Bᵀ·W_i whatever C_i
        lhs = sum(a @ c @ a.mT for a, c in zip(A, C))
        rhs = sum(w @ c @ a.mT for w, a, c in zip(W, A, C))
        B = torch.linalg.solve(lhs, rhs.mT).mT
    return B, torch.linalg.solve(B.mT @ B, B.mT @ W)


def test_closed_forms_equal_alternating_least_squares_from_a_random_start():
    g = _gen(1)
    E, out, n_in, rank = 4, 10, 12, 3
    W = torch.randn(E, out, n_in, generator=g, dtype=F64) @ torch.diag(0.8 ** torch.arange(n_in, dtype=F64))
    X = torch.randn(200, n_in, generator=g, dtype=F64) * torch.logspace(-1, 1, n_in, dtype=F64)
    C = X.mT @ X
    # shared-down, common covariance: the pooled closed form (no alternation) is the optimum
    ex = _prepare(W, [C] * E, None, 0.0, None)
    B, A, _ = _fit("shared-down", ex, rank, max_iters=0)
    B_als, A_als = _als_shared_down(W, C, rank, 400, g)
    assert _objective(W, [C] * E, B, A) == pytest.approx(_objective(W, [C] * E, B_als, A_als), rel=1e-8)
    # shared-up, per-expert covariances: exact too
    Cs = [(X * (1 + 0.5 * i)) for i in range(E)]
    Cs = [x.mT @ x * torch.logspace(0, 1, n_in, dtype=F64) for x in Cs]
    Cs = [0.5 * (c + c.mT) for c in Cs]
    ex = _prepare(W, Cs, None, 0.0, None)
    B, A, _ = _fit("shared-up", ex, rank)
    B_als, A_als = _als_shared_up(W, Cs, rank, 400, g)
    assert _objective(W, Cs, B, A) == pytest.approx(_objective(W, Cs, B_als, A_als), rel=1e-8)


def _check_subspace_iteration(ex, rank=5):
    """The large-matrix path (implicit Gram, subspace iteration with the default 2 power iterations) is
    within 0.1 % of the dense eigen-solve's objective for every layout."""
    C = [c.dense(ex.W.shape[-1], ex.W.device) for c in ex.opt]
    for layout in ("per-expert", "shared-up", "shared-down"):
        B, A, _ = _fit(layout, ex, rank, max_iters=0, exact_below=10**6)
        B_it, A_it, _ = _fit(layout, ex, rank, max_iters=0, exact_below=0)
        assert _objective(ex.W, C, B_it, A_it) <= _objective(ex.W, C, B, A) * (1 + 1e-3), layout


def test_subspace_iteration_matches_the_dense_solution():
    W, stats, _ = _group(E=4, out=200, n_in=64, counts=(100, 200, 0, 50))
    ex = _prepare(W.double(), [st.covariance for st in stats], [st.n_tokens for st in stats], 0.01, None)
    _check_subspace_iteration(ex)


# ----------------------------------------------------------------------------------------- the group


def test_quantized_group_beats_rtn_on_outlier_experts():
    W, stats, _ = _group()
    for projection in ("fc1", "fc2"):
        res = decompose_expert_group(W, stats, CFG, projection=projection, layout="shared-down")
        assert res.final_error < 0.5 * res.rtn_error, (projection, res.final_error, res.rtn_error)
        assert res.final_error == pytest.approx(_reported_total(res, W, stats), rel=1e-5)
        with_tokens = [i for i, st in enumerate(stats) if st.n_tokens]
        assert all(res.final_errors[i] < res.rtn_errors[i] for i in with_tokens)


def test_refinement_is_monotone_and_keeps_the_best():
    W, stats, _ = _group(seed=3)
    res = decompose_expert_group(
        W, stats, CFG.replace(refine_steps=6), projection="fc1", layout="shared-down"
    )
    steps = res.step_errors
    assert len(steps) >= 2
    assert all(b < a for a, b in zip(steps, steps[1:])), steps
    assert res.final_error == steps[-1] <= res.layout_figures["shared-down"]["error"]
    no_refine = decompose_expert_group(
        W, stats, CFG.replace(refine_steps=0), projection="fc1", layout="shared-down"
    )
    assert no_refine.step_errors == (steps[0],)
    assert res.final_error < no_refine.final_error


def test_equal_budget_rank_arithmetic_and_auto_choice():
    W, stats, _ = _group(E=4, out=48, n_in=64, counts=(200, 100, 0, 50))
    E, out, n_in = W.shape
    res = decompose_expert_group(W, stats, CFG.replace(rank=8), projection="fc2", layout="auto")
    budget = param_count("per-expert", 8, E, out, n_in)  # 4·8·(64 + 48) = 3584
    assert res.budget == budget == 3584
    figs = res.layout_figures
    assert figs["per-expert"]["rank"] == 8
    assert figs["shared-down"]["rank"] == 3584 // (64 + 4 * 48) == 14
    assert figs["shared-up"]["rank"] == 3584 // (48 + 4 * 64) == 11
    for layout, fig in figs.items():
        assert fig["num_params"] == param_count(layout, fig["rank"], E, out, n_in) <= budget
    chosen = min(figs, key=lambda k: figs[k]["error"])
    assert res.layout == chosen and res.rank == figs[chosen]["rank"]
    assert res.final_error <= figs[chosen]["error"]
    # a budget that affords per-expert rank 1 but not a shared layout's rank 1 elsewhere is skipped
    small = param_count("shared-down", 1, E, out, n_in)  # 256 < per-expert rank 1 (448)
    res = decompose_expert_group(W, stats, CFG, projection="fc1", layout="auto", budget=small, name="L3.fc1")
    assert (
        res.layout_figures["per-expert"]["rank"] is None
        and "below" in res.layout_figures["per-expert"]["skipped"]
    )
    assert res.layout in ("shared-down", "shared-up") and res.num_params <= small
    with pytest.raises(ValueError, match=r"L3\.fc1: budget of 256 .* per-expert"):
        decompose_expert_group(
            W, stats, CFG, projection="fc1", layout="per-expert", budget=small, name="L3.fc1"
        )
    assert rank_for_budget("shared-down", small, E, out, n_in) == 1


def test_zero_and_few_token_experts_are_flagged_and_finite():
    W, stats, _ = _group(counts=(300, 0, 40, 500, 3, 120))
    stats[1] = None  # no statistics at all: same as zero tokens
    for projection, layout in (("fc1", "shared-down"), ("fc2", "shared-up"), ("fc2", "per-expert")):
        res = decompose_expert_group(W, stats, CFG, projection=projection, layout=layout, expert_offset=10)
        assert res.expert_indices == tuple(range(10, 16))
        assert res.fallback_experts == (11,) and res.few_token_experts == (12, 14)
        for down, up in res.branches():
            assert torch.isfinite(down).all() and torch.isfinite(up).all()
        assert torch.isfinite(res.smooth).all()
        assert all(math.isfinite(e) for e in (*res.final_errors, *res.rtn_errors, res.final_error))
        assert res.final_errors[1] < 1.0  # weight error of the fallback expert
        assert torch.isfinite(res.residual_weight(1)).all()
        if projection == "fc2":
            assert res.alphas[1] is None and torch.equal(res.smooth[1], torch.ones(W.shape[2]))


def test_group_without_any_token_needs_weight_only_fallback():
    W, _, _ = _group(E=3, counts=(0, 0, 0))
    stats = [InputStats(W.shape[2]) for _ in range(3)]
    with pytest.raises(ValueError, match="grp.fc1: no calibration token"):
        decompose_expert_group(W, stats, CFG, name="grp.fc1", layout="shared-down")
    res = decompose_expert_group(W, stats, CFG.replace(weight_only_fallback=True), layout="shared-down")
    assert res.fallback_experts == (0, 1, 2) and res.alpha is None
    assert torch.equal(res.smooth, torch.ones(W.shape[2]))
    assert 0.0 < res.final_error < res.rtn_error < 1.0  # weight errors


@pytest.mark.parametrize("projection", ["fc1", "fc2"])
@pytest.mark.parametrize("layout", ["shared-down", "shared-up", "per-expert"])
def test_result_shapes_dtypes_and_summary(projection, layout):
    W, stats, _ = _group(E=3, out=32, n_in=64, counts=(100, 0, 60))
    E, out, n_in = W.shape
    res = decompose_expert_group(W, stats, CFG, projection=projection, layout=layout, name="m.l0")
    r = res.rank
    assert res.layout == layout and res.projection == projection and res.num_experts == E
    assert res.smooth.shape == ((n_in,) if projection == "fc1" else (E, n_in))
    assert (res.shared_down is not None) == (layout == "shared-down")
    assert (res.shared_up is not None) == (layout == "shared-up")
    if layout == "shared-down":
        assert res.shared_down.shape == (r, n_in) and res.lora_downs == () and len(res.lora_ups) == E
    elif layout == "shared-up":
        assert res.shared_up.shape == (out, r) and res.lora_ups == () and len(res.lora_downs) == E
    else:
        assert len(res.lora_downs) == len(res.lora_ups) == E
    for i in range(E):
        down, up = res.expert_branch(i)
        assert down.shape == (r, n_in) and up.shape == (out, r)
        assert down.dtype == up.dtype == res.smooth.dtype == torch.float32
        assert isinstance(res.residuals[i], PackedTensor) and res.residuals[i].shape == (out, n_in)
        assert res.expert_smooth(i).shape == (n_in,)
        assert res.expert_forward(i, torch.randn(5, n_in)).shape == (5, out)
    assert res.num_params == param_count(layout, r, E, out, n_in)
    summary = json.loads(json.dumps(res.summary()))
    assert summary["layout"] == layout and summary["final_error"] == res.final_error
    assert len(summary["final_errors"]) == E and summary["fallback_experts"] == [1]


def test_bf16_weights_give_the_float32_result():
    W, stats, _ = _group(E=4, counts=(100, 50, 0, 80))
    W16 = W.to(torch.bfloat16)
    a = decompose_expert_group(W16, stats, CFG, projection="fc2", layout="shared-up")
    b = decompose_expert_group([w.float() for w in W16], stats, CFG, projection="fc2", layout="shared-up")
    assert torch.equal(a.shared_up, b.shared_up) and torch.equal(a.smooth, b.smooth)
    assert all(torch.equal(x, y) for x, y in zip(a.lora_downs, b.lora_downs))
    assert a.final_error == b.final_error and math.isfinite(a.final_error)


def test_invalid_inputs_name_the_layer_and_expert():
    W, stats, _ = _group(E=3, counts=(10, 20, 30))
    bad = W.clone()
    bad[2, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"l7\.fc2: weights of experts \[7\]"):
        decompose_expert_group(bad, stats, CFG, name="l7.fc2", expert_offset=5)
    with pytest.raises(ValueError, match="3 expert weights but 2 input statistics"):
        decompose_expert_group(W, stats[:2], CFG)
    with pytest.raises(ValueError, match="expert 1: statistics of 32 features"):
        decompose_expert_group(W, [stats[0], InputStats(32), stats[2]], CFG)
    nan_stats = InputStats(W.shape[2])
    nan_stats.update(torch.full((2, W.shape[2]), float("nan")))
    with pytest.raises(ValueError, match="expert 0: calibration activations contain NaN"):
        decompose_expert_group(W, [nan_stats, *stats[1:]], CFG)
    with pytest.raises(ValueError, match="not divisible by the weight format int4-g64"):
        decompose_expert_group(W[:, :, :48], [InputStats(48)] * 3, CFG.replace(weight_format="int4"))
    with pytest.raises(ValueError, match="layout must be one of"):
        decompose_expert_group(W, stats, CFG, layout="shared_down")
    with pytest.raises(ValueError, match="projection must be one of"):
        decompose_expert_group(W, stats, CFG, projection="fc3")


# ----------------------------------------------------------------------------------------- building blocks


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8", "int4", "fp8-channel"])
def test_fake_quant_experts_equals_per_expert_quantize(fmt):
    g = _gen(5)
    x = torch.randn(5, 24, 64, generator=g) * torch.tensor([1.0, 10.0, 0.01, 3.0, 0.0]).view(5, 1, 1)
    ref = torch.stack([dequantize(quantize_tensor(x[i], fmt)) for i in range(5)])
    assert torch.equal(fake_quant_experts(x, fmt), ref)
    assert torch.equal(fake_quant_experts(x, fmt, max_elements=24 * 64 * 2), ref)  # chunked
    rows = torch.tensor([1, 5, 6, 20])  # a row subset quantized with the full tensors' amax
    amax = x.abs().amax(dim=(1, 2))
    assert torch.equal(fake_quant_experts(x[:, rows], fmt, amax), ref[:, rows])


def test_batched_smoothing_equals_smoothing_vector():
    g = _gen(6)
    xa = torch.rand(4, 64, generator=g) * 10
    wa = torch.rand(4, 64, generator=g)
    xa[1, :5] = 0.0  # dead channels
    for alpha in (0.0, 0.35, 1.0):
        rows = _smoothing_rows(xa, wa, alpha)
        for i in range(4):
            assert torch.equal(rows[i], smoothing_vector(xa[i], wa[i], alpha))


# ----------------------------------------------------------------------------------------- distributed

_DIST_COUNTS = (300, 0, 40, 500, 3, 120, 90, 60)
_DIST_SPLITS = {2: (0, 3, 8), 4: (0, 2, 4, 6, 8)}  # uneven on 2 ranks: offsets come from the group


def _dist_group():
    return _group(E=8, out=32, n_in=64, counts=_DIST_COUNTS, seed=9)


def _on_rank(rank: int, world_size: int) -> dict:
    """Each rank decomposes its contiguous slice of the 8 experts with ep_group=WORLD."""
    W, stats, _ = _dist_group()
    bounds = _DIST_SPLITS[world_size]
    local = slice(bounds[rank], bounds[rank + 1])
    out = {}
    for projection, layout in (("fc1", "shared-down"), ("fc2", "shared-up"), ("fc1", "auto")):
        res = decompose_expert_group(
            W[local], stats[local], CFG, projection=projection, layout=layout, ep_group=dist.group.WORLD
        )
        out[f"{projection}-{layout}"] = _figures(res)
    bad = W[local].clone()
    if rank == 1:
        bad[0, 0, 0] = float("nan")
    try:  # invalid input on one rank: every rank raises instead of waiting in a collective
        decompose_expert_group(
            bad, stats[local], CFG, layout="shared-down", ep_group=dist.group.WORLD, name="x.fc1"
        )
    except ValueError as exc:
        out["error"] = str(exc)
    return out


def _figures(res: MoEGroupResult) -> dict:
    down, up = zip(*res.branches())
    return {
        "layout": res.layout,
        "shared": res.shared_down if res.shared_down is not None else res.shared_up,
        "downs": torch.stack(down),
        "ups": torch.stack(up),
        "smooth": res.smooth,
        "alphas": [a for a in res.alphas],
        "final_errors": list(res.final_errors),
        "final_error": res.final_error,
        "rtn_error": res.rtn_error,
        "steps": len(res.step_errors),
        "indices": list(res.expert_indices),
        "fallback": list(res.fallback_experts),
        "residuals": torch.stack([res.residual_weight(i) for i in range(res.num_experts)]),
    }


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_distributed_group_matches_single_process(world_size):
    results = run_distributed(_on_rank, world_size, timeout=240)
    W, stats, _ = _dist_group()
    assert (
        results[1]["error"] == f"x.fc1: weights of experts [{_DIST_SPLITS[world_size][1]}] contain NaN or Inf"
    )
    assert all(
        r["error"] == "x.fc1: invalid expert inputs on another expert-parallel rank" for r in results[::2]
    )
    for key, (projection, layout) in {
        "fc1-shared-down": ("fc1", "shared-down"),
        "fc2-shared-up": ("fc2", "shared-up"),
        "fc1-auto": ("fc1", "auto"),
    }.items():
        single = _figures(decompose_expert_group(W, stats, CFG, projection=projection, layout=layout))
        ranks = [r[key] for r in results]
        for r in ranks[1:]:  # identical shared factor and decisions on every rank
            assert torch.equal(r["shared"], ranks[0]["shared"]), key
            assert r["layout"] == ranks[0]["layout"] and r["steps"] == ranks[0]["steps"]
            assert r["final_error"] == ranks[0]["final_error"]
            if projection == "fc1":
                assert torch.equal(r["smooth"], ranks[0]["smooth"])
        assert ranks[0]["layout"] == single["layout"] and ranks[0]["steps"] == single["steps"], key
        assert _rel(ranks[0]["shared"], single["shared"]) < 1e-5, key
        for field in ("downs", "ups", "residuals"):
            assert _rel(torch.cat([r[field] for r in ranks]), single[field]) < 1e-5, (key, field)
        smooth = ranks[0]["smooth"] if projection == "fc1" else torch.cat([r["smooth"] for r in ranks])
        assert _rel(smooth, single["smooth"]) < 1e-6
        assert sum((r["alphas"] for r in ranks), []) == single["alphas"]
        errors = sum((r["final_errors"] for r in ranks), [])
        assert errors == pytest.approx(single["final_errors"], rel=1e-5)
        assert ranks[0]["final_error"] == pytest.approx(single["final_error"], rel=1e-5)
        assert ranks[0]["rtn_error"] == pytest.approx(single["rtn_error"], rel=1e-6)
        assert sum((r["indices"] for r in ranks), []) == list(range(8))
        assert sum((r["fallback"] for r in ranks), []) == single["fallback"] == [1]


# ----------------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
def test_cuda_group_matches_cpu():
    """CUDA paths (device-side Gaussian draws, Cholesky-QR, small eigen-problems on the CPU) agree with
    the CPU run up to rounding; the reported error is reproduced from the packed result on the GPU."""
    W, stats, _ = _group(E=4, out=640, n_in=128, counts=(100, 0, 50, 80))  # out > 512: subspace path
    covs = [st.covariance for st in stats]
    _check_subspace_iteration(_prepare(W.double().cuda(), covs, [st.n_tokens for st in stats], 0.01, None))
    for projection, layout in (("fc1", "shared-down"), ("fc2", "shared-up"), ("fc1", "per-expert")):
        cpu = decompose_expert_group(W, stats, CFG, projection=projection, layout=layout)
        gpu = decompose_expert_group(W.cuda(), stats, CFG, projection=projection, layout=layout)
        assert gpu.smooth.is_cuda and gpu.expert_branch(0)[0].is_cuda
        assert gpu.final_error == pytest.approx(cpu.final_error, rel=2e-2)
        assert gpu.rtn_error == pytest.approx(cpu.rtn_error, rel=1e-4)
        num = den = 0.0
        for i, st in enumerate(stats):
            if st.n_tokens:
                x = st.sample.cuda()
                y_ref = x @ W[i].cuda().mT
                w = st.n_tokens / x.shape[0]
                num += w * float((gpu.expert_forward(i, x) - y_ref).double().square().sum())
                den += w * float(y_ref.double().square().sum())
        assert gpu.final_error == pytest.approx(math.sqrt(num / den), rel=1e-5)


def _correlated_group(counts, E=4, out=48, n_in=64, seed=7):
    """Experts whose routed tokens have strongly correlated channels (GPTQ's case) — tokens ``z·M`` with
    a fixed mixing ``M`` of decaying scales. Returns float32 weights ``(E × out × in)`` and InputStats."""
    g = _gen(seed)
    M = torch.randn(n_in, n_in, generator=g) * torch.logspace(0, -1.5, n_in)[:, None]  # (in, in)
    W = torch.randn(E, out, n_in, generator=g) / n_in**0.5
    stats = []
    for i, n in enumerate(counts):
        st = InputStats(n_in, sample_size=CFG.sample_tokens, seed=i)
        if n:
            st.update(torch.randn(n, n_in, generator=g) @ M)
        stats.append(st)
    return W, stats


@pytest.mark.parametrize("projection", ["fc1", "fc2"])
def test_gptq_per_expert_hessians_lower_the_error_and_match_the_packed_result(projection):
    """residual_quant="gptq": experts with ≥ 4·in routed tokens outside their scoring sample get GPTQ
    residuals from their own Hessian, kept only where they lower the expert's (held-out) error; the
    figures are those of the packed result."""
    W, stats = _correlated_group(counts=(3000, 0, 200, 2000))  # ≥ 256 = 4·in unsampled: experts 0 and 3
    rtn = decompose_expert_group(W, stats, CFG, projection=projection, layout="per-expert")
    cfg = dataclasses.replace(CFG, residual_quant="gptq")
    res = decompose_expert_group(W, stats, cfg, projection=projection, layout="per-expert")
    assert res.residual_quants[1] == res.residual_quants[2] == "rtn"  # too few tokens: never GPTQ
    assert res.residual_quants[0] == res.residual_quants[3] == "gptq"
    assert res.summary()["residual_quant"] == "gptq 2/4"
    assert res.final_error < rtn.final_error
    assert all(res.final_errors[i] <= rtn.final_errors[i] * (1 + 1e-9) for i in range(4) if stats[i].n_tokens)
    assert res.final_error == pytest.approx(_reported_total(res, W, stats), rel=1e-5)
