"""SVDQuant of the E experts of one MoE projection (svdq/DESIGN.md §3, §4).

Expert ``i`` (weight ``W_i: out × in``, routed calibration inputs ``X_i (n_i × in)``, ``C_i = X_iᵀX_i``)
becomes

    y_i = Q_a(x·diag(1/s_i))·Q_w(R_i)ᵀ + (x·A_iᵀ)·B_iᵀ,        R_i = (W_i − B_i·A_i)·diag(s_i)

with ``A_i`` = lora_down (reads the raw input), ``B_i`` = lora_up, in one of the layouts of
:mod:`svdq.solvers.shared_basis` (shared-down: one ``A``; shared-up: one ``B``; per-expert) at an **equal
parameter budget**. :func:`decompose_expert_group` does, for the local experts of one projection:

1. **Branch** (:func:`svdq.solvers.shared_basis._fit`, whitened with the damped ``Ĉ_i = C_i + damp·mean(diag
   C_i)·I``; experts without tokens use ``c·I``). It is fitted once, in *raw* input coordinates. Smoothing is
   an invertible change of input coordinates (``Ŵ_i = W_i·diag(s)``, smoothed covariance
   ``diag(1/s)·C_i·diag(1/s)``) under which the whitened objective ``Σ_i ‖(W_i − B_i·A_i)·X_iᵀ‖²`` is
   invariant: the factors computed on smoothed weights with smoothed covariances are ``A_i·diag(s)`` — the
   same branch, whatever α. So one fit serves every α candidate (only the damping ``λ·I`` is applied in the
   statistics' raw coordinates), and a shared lora_down stays one tensor in its stored, raw-input form even
   for fc2, whose smoothing differs per expert (``A^s·diag(1/s_i) = A`` for every ``i``).
2. **Smoothing** ``s = max|X_:j|^α / max|W_:j|^(1−α)`` (:func:`svdq.solvers.smoothing.smoothing_vector`):
   *fc1* — one vector for all experts (they read the same hidden state): activation absmax pooled
   (max) over all experts' routed tokens, weight absmax over all experts' columns, both all-reduced (MAX)
   over ``ep_group``; one α for the group, chosen by the group's total output error (error sums all-reduced).
   *fc2* — one vector per expert (private input spaces), and **one α per expert**: the branch does not
   depend on ``s``, so expert ``i``'s quantized output depends on ``s_i`` alone and the per-expert argmins
   minimize the total. Each candidate is scored by the output error of the *complete* quantized expert
   (quantized activations, quantized residual, branch) on its sampled tokens, over a fixed random subset
   of output rows (``score_rows``; the NVFP4/FP8 global scale still comes from all rows, so the scored
   rows are exactly those of the full quantization).
3. **Residual** ``R_i`` quantized round-to-nearest per expert — each expert its own tensor (own NVFP4 /
   FP8 global scale), all experts batched in one ``(E, out, in)`` pass (chunked to bound memory).
   With ``config.branch_fit`` ``"act-noise"`` / ``"act-both"`` the branch is then refitted once with the
   activation-quantization error of the chosen smoothing in its covariance (``Ĉ_i + N_i/ρ²``,
   :mod:`svdq.solvers.act_noise`, svdq/DESIGN.md §23), kept if it lowers the total error (one more entry
   of ``step_errors``).
4. **Refinement**: refit the layout to the targets ``W_i − Q_w(R_i)·diag(1/s_i)`` (``"act-cross"`` /
   ``"act-both"``: plus ``R̂_i·K_i·Ĉ_i⁻¹``, the exact error of the fixed residual) (warm started:
   shared-down B-step + ``refine_alternations`` A-steps, the closed-form layouts by subspace iteration
   from the current basis), re-quantize; a step that does not lower the total error is dropped and ends
   the refinement, one that lowers it by less than ``config.refine_tol`` (relative) is the last. At most
   ``config.refine_steps`` steps.
5. **GPTQ** (``config.residual_quant`` ``"gptq"`` / ``"auto"``): each expert with at least
   ``GPTQ_MIN_TOKENS_PER_INPUT·in`` routed tokens outside its scoring sample gets its residual
   GPTQ-quantized with its own Hessian ``diag(1/s_i)·X_iᵀX_i·diag(1/s_i)`` of those tokens, kept where it
   lowers that expert's error on the (held-out) sample (``residual_quants``).

``layout="auto"`` fits all three layouts at the same budget (steps 1–3), keeps the one with the lowest
total error and refines it; ``layout_figures`` records what it chose from.

**Errors.** Expert ``i``'s error is ``‖y_i − X_i·W_iᵀ‖ / ‖X_i·W_iᵀ‖`` over its sampled tokens
(``stats[i].sample``, up to ``sample_tokens``). The total is **activation-weighted**: each expert's squared
errors count ``n_i / k_i`` times (routed / sampled tokens), so it estimates the relative output error over
all routed tokens of the group (all-reduced over ``ep_group``). Experts without tokens (``fallback_experts``)
report the relative weight error ``‖W_i − Ŵ_i‖_F / ‖W_i‖_F`` and do not enter the total, unless no expert of
the group saw a token (then the total is the weight error; requires ``config.weight_only_fallback``).

**Robustness.** Zero tokens → identity-covariance branch, no smoothing of its own (fc2), flagged. Few
tokens (``0 < n_i < in``: rank-deficient ``X_iᵀX_i``) → damped, flagged in ``few_token_experts``. Any float
weight dtype (bf16, fp16): the branch is computed in float64, residuals and scoring in float32.

**Expert parallelism.** With ``ep_group``, the experts passed are this rank's; everything that must agree
is reduced over the group (fc1 smoothing, every α / layout / refinement decision, the shared factor), so all
ranks return the identical smoothing and shared factor and take the same decisions. Every rank must call
with the same ``config``, ``projection``, ``layout`` and ``budget``.

**Projections.** ``fc1`` is Megatron's ``linear_fc1``: for GLU experts gate and up are **one** matrix
(out = 2·F, gate rows first), so they share one smoothing vector (the same input) and one branch.
``config.whiten`` is not consulted: the layouts are whitened by construction.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from svdq.config import SVDQConfig
from svdq.formats import (
    PackedTensor,
    dequantize,
    fake_quant,
    quantize_tensor,
    trusted_inputs,
)
from svdq.solvers.act_noise import act_error_moments, cross_target, weight_noise_terms
from svdq.solvers.batched import chunks as _chunks
from svdq.solvers.batched import fake_quant_experts
from svdq.solvers.gptq import gptq_quantize
from svdq.solvers.linear import GPTQ_MIN_TOKENS_PER_INPUT, named_errors
from svdq.solvers.lowrank import relative_error
from svdq.solvers.shared_basis import (
    AUTO,
    EXPERT_PROJECTIONS,
    LAYOUT_CHOICES,
    LAYOUTS,
    PER_EXPERT,
    SHARED_DOWN,
    SHARED_UP,
    _fit,
    _prepare,
    param_count,
    rank_for_budget,
)
from svdq.solvers.smoothing import smoothing_vector
from svdq.stats import InputStats
from svdq.timing import phase

__all__ = ["LAYOUT_CHOICES", "PROJECTIONS", "MoEGroupResult", "decompose_expert_group", "fake_quant_experts"]

PROJECTIONS = EXPERT_PROJECTIONS
_F64 = torch.float64
_MIN_SCORE_ROWS = 256  # default rows per expert scoring the α candidates (at least)
SEARCH_BATCH_ELEMENTS = 1 << 25  # elements per candidate-batched tensor of the α search (float32: 128 MiB)


# --------------------------------------------------------------------------------------------- result


@dataclass(frozen=True)
class MoEGroupResult:
    """Outcome of :func:`decompose_expert_group` for the ``E`` local experts of one projection.

    Tensors (float32, on the weights' device):

    * ``smooth``: ``(in,)`` for fc1 (shared), ``(E × in)`` for fc2 (per expert).
    * ``shared_down``: the one ``lora_down (r × in)`` of a shared-down group, reading the **raw** input
      (else ``None``); ``shared_up``: the one ``lora_up (out × r)`` of a shared-up group (else ``None``).
    * ``lora_downs`` / ``lora_ups``: per-expert factors ``(r × in)`` / ``(out × r)`` (empty for the shared
      side). :meth:`expert_branch` returns ``(lora_down, lora_up)`` of any expert, any layout.
    * ``residuals``: per expert the packed ``Q_w(R_i)`` (``out × in``, smoothed coordinates).

    Figures: errors as in the module docstring — ``rtn_errors`` / ``final_errors`` per expert (RTN: plain
    round-to-nearest of ``W_i``, no smoothing, no branch, same activation quantization), ``rtn_error`` /
    ``final_error`` the activation-weighted totals, ``step_errors`` the total before refinement and after each
    accepted refinement step, ``alpha_errors`` ``(α, total error)`` per candidate (fc2: the total if every
    expert used that α; subset-row estimates), ``alphas`` the α of each expert (``None``: no smoothing),
    ``layout_figures`` per evaluated layout ``{rank, num_params, error (before refinement), alphas}``.
    Expert lists are local; ``expert_indices`` gives their global indices and ``fallback_experts`` /
    ``few_token_experts`` are global indices.
    """

    name: str
    projection: str
    layout: str
    budget: int
    num_params: int
    weight_format: str
    act_format: str
    smooth: Tensor
    alphas: tuple[float | None, ...]
    shared_down: Tensor | None
    shared_up: Tensor | None
    lora_downs: tuple[Tensor, ...]
    lora_ups: tuple[Tensor, ...]
    residuals: tuple[PackedTensor, ...]
    expert_indices: tuple[int, ...]
    n_tokens: tuple[int, ...]
    fallback_experts: tuple[int, ...]
    few_token_experts: tuple[int, ...]
    rtn_errors: tuple[float, ...]
    final_errors: tuple[float, ...]
    rtn_error: float
    final_error: float
    alpha_errors: tuple[tuple[float, float], ...]
    step_errors: tuple[float, ...]
    layout_figures: dict
    seconds: float
    residual_quants: tuple[str, ...] = ()
    objective: str = "output"  # fc1: "activation" when its errors are those of act(fc1(x) + b)

    @property
    def num_experts(self) -> int:
        return len(self.expert_indices)

    @property
    def rank(self) -> int:
        """Rank ``r`` of the branch, read from its factors (the one store)."""
        return self.expert_branch(0)[0].shape[0]

    @property
    def alpha(self) -> float | None:
        """The shared α of an fc1 group (``None`` for fc2 or without smoothing)."""
        return self.alphas[0] if self.projection == "fc1" else None

    @property
    def refine_steps(self) -> int:
        return len(self.step_errors) - 1

    def expert_branch(self, i: int) -> tuple[Tensor, Tensor]:
        """``(lora_down (r × in), lora_up (out × r))`` of local expert ``i``, reading the raw input."""
        down = self.shared_down if self.shared_down is not None else self.lora_downs[i]
        up = self.shared_up if self.shared_up is not None else self.lora_ups[i]
        return down, up

    def branches(self) -> list[tuple[Tensor, Tensor]]:
        """:meth:`expert_branch` of every local expert."""
        return [self.expert_branch(i) for i in range(self.num_experts)]

    def expert_smooth(self, i: int) -> Tensor:
        """Smoothing vector ``(in,)`` of local expert ``i``."""
        return self.smooth if self.smooth.dim() == 1 else self.smooth[i]

    def residual_weight(self, i: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """Dequantized ``Q_w(R_i) (out × in)`` of local expert ``i`` (smoothed coordinates)."""
        return dequantize(self.residuals[i], dtype)

    def expert_forward(self, i: int, x: Tensor) -> Tensor:
        """Output of the quantized expert ``i`` for a batch ``x (… × in)`` (float32), as in the scoring:
        ``Q_a(x/s_i)·Q_w(R_i)ᵀ + (x·A_iᵀ)·B_iᵀ`` with activation scales from the whole batch."""
        x = x.float()
        down, up = self.expert_branch(i)
        xs = fake_quant(x / self.expert_smooth(i).to(x.device), self.act_format)
        return xs @ self.residual_weight(i).to(x.device).mT + (x @ down.to(x.device).mT) @ up.to(x.device).mT

    def summary(self) -> dict:
        """JSON-friendly figures (no tensors)."""
        return {
            "name": self.name,
            "projection": self.projection,
            "layout": self.layout,
            "rank": self.rank,
            "budget": self.budget,
            "num_params": self.num_params,
            "weight_format": self.weight_format,
            "act_format": self.act_format,
            "residual_quant": _quant_label(self.residual_quants),
            "objective": self.objective,
            "residual_quants": list(self.residual_quants),
            "alphas": list(self.alphas),
            "expert_indices": list(self.expert_indices),
            "n_tokens": list(self.n_tokens),
            "fallback_experts": list(self.fallback_experts),
            "few_token_experts": list(self.few_token_experts),
            "rtn_errors": list(self.rtn_errors),
            "final_errors": list(self.final_errors),
            "rtn_error": self.rtn_error,
            "final_error": self.final_error,
            "alpha_errors": [list(p) for p in self.alpha_errors],
            "step_errors": list(self.step_errors),
            "refine_steps": self.refine_steps,
            "layout_figures": {k: dict(v) for k, v in self.layout_figures.items()},
            "seconds": self.seconds,
        }


def _quant_label(quants: Sequence[str]) -> str:
    """``"rtn"`` or ``"gptq 5/8"`` (5 of the 8 experts got GPTQ)."""
    n = sum(q == "gptq" for q in quants)
    return "rtn" if n == 0 else f"gptq {n}/{len(quants)}"


# --------------------------------------------------------------------------------------------- entry


@torch.no_grad()
def decompose_expert_group(
    weights: Sequence[Tensor] | Tensor,
    stats: Sequence[InputStats | None],
    config: SVDQConfig,
    *,
    projection: str = "fc1",
    layout: str = AUTO,
    budget: int | None = None,
    ep_group: dist.ProcessGroup | None = None,
    name: str = "layer0.fc1",
    expert_offset: int | None = None,
    score_rows: int | None = None,
    alternations: int = 3,
    refine_alternations: int = 1,
    cg_iters: int = 8,
    activation: Callable[[Tensor], Tensor] | None = None,
    bias: Tensor | None = None,
) -> MoEGroupResult:
    """SVDQuant-decompose the local experts of one MoE projection (see the module docstring).

    Args:
        weights: ``E`` matrices ``W_i (out × in)`` or a stacked ``(E × out × in)`` tensor, any float dtype,
            all on one device (everything runs there).
        stats: per-expert :class:`~svdq.stats.InputStats` of the tokens routed to it (``None`` or
            ``n_tokens = 0``: no tokens).
        config: formats, ``rank`` (sets the default budget), ``alphas``, ``refine_steps``, ``damp``,
            ``oversample`` / ``power_iters`` / ``seed`` (subspace iteration), ``weight_only_fallback``.
        projection: ``"fc1"`` (shared smoothing) or ``"fc2"`` (per-expert smoothing).
        layout: ``"auto"`` or one of :data:`svdq.solvers.shared_basis.LAYOUTS`.
        budget: branch parameters of the whole group (all ranks); default the per-expert cost
            ``E·r·(in + out)`` with ``r = config.rank``. Each layout's rank is
            :func:`~svdq.solvers.shared_basis.rank_for_budget` of it.
        group: expert-parallel process group (experts spread over its ranks).
        name: layer name used in error messages and the result.
        expert_offset: global index of the first local expert (default: from the ranks before this one in
            ``ep_group``, 0 without a group).
        score_rows: output rows per expert on which α candidates are scored (a fixed random subset, the
            same for every expert and candidate). Default: ``config.score_rows`` spread over the group's
            experts, at least 256 per expert (all rows of smaller experts).
        alternations / refine_alternations / cg_iters: shared-down A-steps (and their CG iterations) of
            the initial fit / of each refinement step.
        activation: fc1 only — the experts' activation on fc1's output, ``(…, out) -> (…, m)`` float32
            (a GLU's ``act(gate)·up``, in the weight's row layout); with ``config.fc1_objective =
            "activation"`` every fc1 decision (α, layout, refinement, GPTQ) minimizes the error of
            ``activation(fc1(x) + bias)`` instead of ``fc1(x)`` (svdq/DESIGN.md §20). ``None``: the output
            objective (the result's ``objective`` says which was used). ``bias``: fc1's bias ``(E × out)``
            (``None``: none), used only by that objective.

    Raises ``ValueError`` naming ``name`` (and the global expert index) for: bad shapes or layouts,
    non-finite weights or activations, a group-size mismatch, a budget below rank 1, missing token
    samples, or no calibration token in the whole group without ``config.weight_only_fallback``.
    """
    t0 = time.perf_counter()
    if projection not in PROJECTIONS:
        raise ValueError(f"{name}: projection must be one of {PROJECTIONS}, got {projection!r}")
    if layout not in LAYOUT_CHOICES:
        raise ValueError(f"{name}: layout must be one of {LAYOUT_CHOICES}, got {layout!r}")
    W = _stack(weights, name)
    offset = _expert_offset(W.shape[0], ep_group, W.device) if expert_offset is None else int(expert_offset)
    _validate_everywhere(W, stats, config, name, offset, ep_group)
    with named_errors(name), trusted_inputs():  # weights and statistics are validated: no NaN syncs
        act = activation if projection == "fc1" and config.fc1_objective == "activation" else None
        with phase("setup"):
            g = _ExpertProjection(
                W, list(stats), config, projection, layout, ep_group, name, offset, score_rows, act, bias
            )
        del W
        state, steps, figures, budget = _search(g, layout, budget, alternations, cg_iters)
        if config.branch_fit in ("act-noise", "act-both"):
            state, steps = _noise_refit(g, state, steps, alternations, cg_iters)
        state, steps = _refine(g, state, steps, refine_alternations, cg_iters)
        with phase("residual"):
            return g.result(state, budget, tuple(steps), figures, time.perf_counter() - t0)


def _fit_options(config: SVDQConfig) -> dict:
    return dict(oversample=config.oversample, power_iters=config.power_iters, seed=config.seed)


def _search(g: _ExpertProjection, layout: str, budget: int | None, alternations: int, cg_iters: int):
    """Fit, α-search and evaluate every candidate layout at the budget; the best ``_State`` wins."""
    E, out, n_in = g.shape
    if budget is None:
        budget = param_count(PER_EXPERT, min(g.cfg.rank, out, n_in), g.num_global, out, n_in)
    best, figures = None, {}
    for lay in LAYOUTS if layout == AUTO else (layout,):
        try:
            rank = rank_for_budget(lay, budget, g.num_global, out, n_in)
        except ValueError as exc:
            if layout != AUTO:
                raise ValueError(f"{g.name}: {exc}") from None
            figures[lay] = {"rank": None, "skipped": str(exc)}
            continue
        with phase("branch"):
            B, A, _ = _fit(
                lay,
                g.ex,
                rank,
                ep_group=g.ep_group,
                max_iters=alternations,
                cg_iters=cg_iters,
                cache=g.fit_cache,
                **_fit_options(g.cfg),
            )
        cand = g.first_pass(lay, rank, B, A)
        figures[lay] = {
            "rank": rank,
            "num_params": param_count(lay, rank, g.num_global, out, n_in),
            "error": cand.error,
            "alphas": list(cand.alphas),
        }
        if best is None or cand.error < best.error:
            best = cand
        del cand
    if best is None:
        raise ValueError(f"{g.name}: a budget of {budget} parameters is below rank 1 of every layout")
    return best, [best.error], figures, budget


def _noise_refit(g: _ExpertProjection, state: _State, steps: list[float], alternations: int, cg_iters: int):
    """``config.branch_fit`` ``"act-noise"`` / ``"act-both"`` (svdq/DESIGN.md §23): refit the branch with the
    covariances ``Ĉ_i + N_i/ρ²`` (``N_i`` the activation-error second moment under the chosen smoothing,
    ``ρ²`` the all-reduced relative weight-quantization error of the current residuals), fresh from the
    pooled start, and keep it where it lowers the total error (then one more entry of ``steps``)."""
    with phase("branch"):
        N, _ = act_error_moments(g.X, g.xq(state.s), state.s, g.weight)
        R = g.raw_residual(state.B, state.A) * g._s3(state.s)
        num, den = g._reduce(weight_noise_terms(R, state.Rq, g.X, state.s, g.weight)).tolist()
        del R
        if not (num > 0 and den > 0):
            return state, steps
        B, A, _ = _fit(
            state.layout,
            g.ex.with_noise(N * (den / num)),
            state.rank,
            ep_group=g.ep_group,
            max_iters=alternations,
            cg_iters=cg_iters,
            cache={},  # other covariances than the group's: its own A-step preconditioner
            **_fit_options(g.cfg),
        )
        del N
    with phase("residual"):
        new = g.evaluate(state.layout, state.rank, B, A, state.s, state.alphas, state.alpha_errors)
    if new.error < state.error:
        return new, [*steps, new.error]
    return state, steps


def _refine_target(g: _ExpertProjection, state: _State) -> Tensor:
    """Refinement target ``W_i − Q_w(R_i)·diag(1/s_i)``; with ``config.branch_fit`` ``"act-cross"`` /
    ``"act-both"`` plus ``R̂_i·K_i·Ĉ_i⁻¹`` (svdq/DESIGN.md §23), whose whitened fit minimizes the exact
    output error of the fixed quantized residual, activation error included."""
    T = g.target(state.Rq, state.s)
    if g.cfg.branch_fit not in ("act-cross", "act-both"):
        return T
    _, K = act_error_moments(g.X, g.xq(state.s), state.s, g.weight)
    n_in = T.shape[-1]
    eye = torch.eye(n_in, dtype=_F64, device=T.device)
    covs = torch.stack([c.dense(n_in, T.device) if c.mat is not None else c.shift * eye for c in g.ex.opt])
    return cross_target(T, state.Rq, K, covs)


def _refine(g: _ExpertProjection, state: _State, steps: list[float], alternations: int, cg_iters: int):
    """Refit the branch to ``W_i − Q_w(R_i)·diag(1/s_i)`` and re-quantize while the total error falls."""
    opts = {**_fit_options(g.cfg), "power_iters": 0}  # warm start: one orthogonalization + Rayleigh–Ritz
    for _ in range(g.cfg.refine_steps):
        with phase("branch"):
            target = g.ex.with_weights(_refine_target(g, state))
            B, A, _ = _fit(
                state.layout,
                target,
                state.rank,
                init=(state.B, state.A),
                ep_group=g.ep_group,
                max_iters=alternations,
                cg_iters=cg_iters,
                cache=g.fit_cache,
                **opts,
            )
            del target
        with phase("residual"):
            new = g.evaluate(state.layout, state.rank, B, A, state.s, state.alphas, state.alpha_errors)
        if not new.error < state.error:
            break
        gain = (state.error - new.error) / state.error
        state = new
        steps.append(new.error)
        if gain < g.cfg.refine_tol:
            break
    return state, steps


# --------------------------------------------------------------------------------------------- internals


@dataclass(frozen=True)
class _State:
    """One complete quantized group: layout factors (float64, raw coordinates), smoothing, quantized
    residual ``Rq (E × out × in)`` float32 and its per-expert squared errors ``nums (E,)``."""

    layout: str
    rank: int
    B: Tensor
    A: Tensor
    s: Tensor  # (in,) fc1 or (E × in) fc2, float32
    alphas: tuple[float | None, ...]
    alpha_errors: tuple[tuple[float, float], ...]
    Rq: Tensor
    nums: Tensor
    error: float


def _stack(weights, name: str) -> Tensor:
    if isinstance(weights, Tensor):
        if weights.dim() != 3 or weights.shape[0] == 0:
            raise ValueError(
                f"{name}: stacked expert weights must be (E × out × in), got {tuple(weights.shape)}"
            )
        W = weights.detach()
    else:
        weights = list(weights)
        if not weights:
            raise ValueError(f"{name}: need at least one expert weight")
        shapes = {tuple(w.shape) for w in weights}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"{name}: expert weights must be matrices of one shape, got {sorted(shapes)}")
        devices = {w.device for w in weights}
        if len(devices) != 1:
            raise ValueError(f"{name}: expert weights are on several devices {sorted(map(str, devices))}")
        W = torch.stack([w.detach() for w in weights])
    if not W.is_floating_point():
        raise ValueError(f"{name}: expert weights must be floating point, got {W.dtype}")
    return W


def _expert_offset(E: int, ep_group, device: torch.device) -> int:
    """Global index of this rank's first expert: local counts of the lower ranks of ``ep_group``."""
    if ep_group is None:
        return 0
    t = torch.tensor([E], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(t) for _ in range(dist.get_world_size(ep_group))]
    dist.all_gather(counts, t, group=ep_group)
    return int(sum(int(c.item()) for c in counts[: dist.get_rank(ep_group)]))


def _validate_everywhere(W: Tensor, stats, config: SVDQConfig, name: str, offset: int, ep_group) -> None:
    """:func:`_validate` on every rank of ``ep_group``; if any rank's input is invalid, all ranks raise (the
    others would otherwise wait in the next collective)."""
    try:
        _validate(W, stats, config, name, offset)
        error = None
    except ValueError as exc:
        error = exc
    if ep_group is not None:
        failed = torch.tensor([error is not None], dtype=torch.int64, device=W.device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=ep_group)
        if error is None and failed.item():
            raise ValueError(f"{name}: invalid expert inputs on another expert-parallel rank")
    if error is not None:
        raise error


def _validate(W: Tensor, stats, config: SVDQConfig, name: str, offset: int) -> None:
    E, _, n_in = W.shape
    if W.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"{name}: weight dtype {W.dtype} is not supported (float32, bfloat16 or float16); "
            "cast the model first, e.g. model.float()"
        )
    bad = (~torch.isfinite(W).flatten(1).all(dim=1)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"{name}: weights of experts {[offset + i for i in bad]} contain NaN or Inf")
    if len(stats) != E:
        raise ValueError(f"{name}: got {E} expert weights but {len(stats)} input statistics")
    for i, st in enumerate(stats):
        if st is None:
            continue
        if not isinstance(st, InputStats):
            raise ValueError(f"{name}: expert {offset + i}: stats must be InputStats or None, got {type(st)}")
        if st.in_features != n_in:
            raise ValueError(
                f"{name}: expert {offset + i}: statistics of {st.in_features} features for a weight with "
                f"in_features = {n_in}"
            )
        if st.nonfinite:
            raise ValueError(f"{name}: expert {offset + i}: calibration activations contain NaN or Inf")
        if st.n_tokens > 0 and (st.sample is None or st.sample.shape[0] == 0):
            raise ValueError(
                f"{name}: expert {offset + i}: {st.n_tokens} tokens but no token sample to score with "
                "(InputStats.sample_size must be > 0)"
            )
    for role, fmt in (("weight", config.weight_quant), ("activation", config.act_quant)):
        if fmt.group_size and n_in % fmt.group_size:
            raise ValueError(
                f"{name}: in_features {n_in} is not divisible by the {role} format {fmt}'s group size "
                f"{fmt.group_size}"
            )


def _smoothing_rows(x_absmax: Tensor, w_absmax: Tensor, alpha: float, eps: float = 1e-8) -> Tensor:
    """:func:`svdq.solvers.smoothing.smoothing_vector` for every row of ``(E × in)`` inputs at once (same ops,
    so the same values row by row)."""
    xa = x_absmax.to(_F64).clamp_min(eps)
    wa = w_absmax.to(_F64).clamp_min(eps)
    s = xa.pow(alpha) / wa.pow(1.0 - alpha)
    dead = (x_absmax <= eps) | (w_absmax <= eps)
    s = torch.where(dead, torch.ones_like(s), s)
    s = s / torch.sqrt(s.amax(-1, keepdim=True) * s.amin(-1, keepdim=True))
    return s.float()


class _ExpertProjection:
    """The local experts of one projection under :func:`decompose_expert_group` (per-call data):
    weights, scoring tokens, smoothing candidates, the prepared experts of
    :mod:`svdq.solvers.shared_basis`, and the scoring / evaluation steps."""

    def __init__(
        self, W, stats, config, projection, layout, ep_group, name, offset, score_rows, act=None, bias=None
    ):
        dev = W.device
        E, out, n_in = W.shape
        self.cfg, self.projection, self.ep_group, self.name, self.offset = (
            config,
            projection,
            ep_group,
            name,
            offset,
        )
        self.wq, self.aq = config.weight_quant, config.act_quant
        self.shape = (E, out, n_in)
        self.W64 = W.to(_F64)
        self.counts = [st.n_tokens if st is not None else 0 for st in stats]
        self.tok = torch.tensor([n > 0 for n in self.counts], device=dev)
        n_tok = sum(n > 0 for n in self.counts)
        self.fallback_local = [i for i, n in enumerate(self.counts) if n == 0]  # host-side: no sync per use
        sizes = self._reduce(torch.tensor([E, n_tok], device=dev, dtype=torch.int64)).tolist()
        self.num_global, n_tok_experts = sizes
        if n_tok_experts == 0 and not config.weight_only_fallback:
            raise ValueError(
                f"{name}: no calibration token reached any expert of this group (set "
                "weight_only_fallback=True to decompose it from its weights alone, or exclude it)"
            )
        self.any_tokens = n_tok_experts > 0

        # scoring tokens (E × k_max × in), zero rows after each expert's k_i samples
        samples = [st.sample.to(dev, torch.float32) if n > 0 else None for st, n in zip(stats, self.counts)]
        k = [0 if x is None else x.shape[0] for x in samples]
        self.X = torch.zeros(E, max(max(k), 1), n_in, device=dev)
        for i, x in enumerate(samples):
            if x is not None:
                self.X[i, : k[i]] = x
        self.k_samples = k  # sampled tokens per expert
        self.weight = torch.tensor(
            [n / ki if ki else 0.0 for n, ki in zip(self.counts, k)], dtype=_F64, device=dev
        )
        W32 = W.float()
        self.Y_ref = self.X @ W32.mT  # (E × k × out)
        self.den_w = self.W64.square().sum((1, 2))
        # consumer objective (fc1): errors of act(y + b) against act(y_ref + b); the activation mixes output
        # rows (a GLU pairs gate and up), so candidates are scored on all rows
        self.act = act
        if act is not None:
            if bias is not None and tuple(bias.shape) != (E, out):
                raise ValueError(f"{name}: fc1 bias must be (E × out) = {(E, out)}, got {tuple(bias.shape)}")
            self.bias = None if bias is None else bias.detach().to(dev, torch.float32).unsqueeze(1)  # E,1,out
            kmax = self.X.shape[1]
            self.valid = (torch.arange(kmax, device=dev) < torch.tensor(k, device=dev)[:, None]).unsqueeze(-1)
            self.Z_ref = self.consume(self.Y_ref)  # (E × k × m)
        if score_rows is None:
            score_rows = max(-(-config.score_rows // self.num_global), _MIN_SCORE_ROWS)
        self.rows = None
        if score_rows < out and act is None:
            gen = torch.Generator().manual_seed(config.seed)
            self.rows = torch.randperm(out, generator=gen)[:score_rows].sort().values.to(dev)
        # Q_a(X_i/s_i) per smoothing tensor (by identity); candidates' entries are kept for later layouts
        self._xq: dict[int, tuple[Tensor, Tensor]] = {}
        self.fit_cache: dict = {}  # shared-down A-step preconditioner, reused by every fit of the group
        self._keep_candidates = layout == AUTO

        # smoothing candidates
        w_absmax = W32.abs().amax(dim=1)  # (E × in)
        x_absmax = torch.stack(
            [
                st.absmax.to(dev).float() if n > 0 else torch.zeros(n_in, device=dev)
                for st, n in zip(stats, self.counts)
            ]
        )
        self.candidates = self._candidates(x_absmax, w_absmax)
        ones = torch.ones(n_in, device=dev)
        self.rtn_nums = self.nums(ones, fake_quant_experts(W32, self.wq), None, None, W32)
        self._xq.pop(id(ones), None)
        del W32

        covs = [
            st.covariance.to(dev) if n > 0 else torch.zeros((), dtype=_F64, device=dev).expand(n_in, n_in)
            for st, n in zip(stats, self.counts)
        ]
        self.ex = _prepare(self.W64, covs, self.counts, config.damp, ep_group)
        self.covs = covs  # raw X_iᵀX_i (in × in) float64: the per-expert GPTQ Hessians

    # -- helpers -------------------------------------------------------------------------------------
    def _reduce(self, t: Tensor, op=dist.ReduceOp.SUM) -> Tensor:
        if self.ep_group is not None:
            dist.all_reduce(t, op=op, group=self.ep_group)
        return t

    def _s3(self, s: Tensor) -> Tensor:
        """Smoothing broadcastable against ``(E × rows × in)``."""
        return s.reshape(1, 1, -1) if s.dim() == 1 else s.unsqueeze(1)

    def _candidates(self, x_absmax: Tensor, w_absmax: Tensor) -> list[tuple[float | None, Tensor]]:
        """``[(α, s)]``: ``s (in,)`` for fc1 (pooled, all-reduced MAX), ``(E × in)`` for fc2 (experts without
        tokens keep ``s = 1``). ``[(None, 1)]`` when there is nothing to smooth with."""
        E, _, n_in = self.shape
        dev = x_absmax.device
        ones = torch.ones(n_in, device=dev) if self.projection == "fc1" else torch.ones(E, n_in, device=dev)
        if not self.cfg.alphas or not self.any_tokens:
            return [(None, ones)]
        if self.projection == "fc1":
            xa = self._reduce(x_absmax.amax(0), dist.ReduceOp.MAX)
            wa = self._reduce(w_absmax.amax(0), dist.ReduceOp.MAX)
            return [(a, smoothing_vector(xa, wa, a).to(dev)) for a in self.cfg.alphas]
        tok = self.tok.unsqueeze(1)
        return [(a, torch.where(tok, _smoothing_rows(x_absmax, w_absmax, a), ones)) for a in self.cfg.alphas]

    def xq(self, s: Tensor, keep: bool = True) -> Tensor:
        """Quantized scoring activations ``Q_a(X_i/s_i)``, each expert's sample its own tensor (cached by
        the identity of ``s`` when ``keep``)."""
        hit = self._xq.get(id(s))
        if hit is not None and hit[0] is s:
            return hit[1]
        Xq = fake_quant_experts(self.X / self._s3(s), self.aq)
        if keep:
            self._xq[id(s)] = (s, Xq)
        return Xq

    def raw_residual(self, B: Tensor, A: Tensor) -> Tensor:
        """``D_i = W_i − B_i·A_i`` ``(E × out × in)`` float32 (computed in float64, chunked)."""
        D = torch.empty(self.shape, dtype=torch.float32, device=self.W64.device)
        for c in _chunks(self.shape[0], self.shape[1] * self.shape[2], 1 << 27):
            Bc = B[c] if B.dim() == 3 else B
            Ac = A[c] if A.dim() == 3 else A
            D[c] = (self.W64[c] - Bc @ Ac).float()
        return D

    def quant_residual(self, D: Tensor, s: Tensor, amax: Tensor | None = None) -> Tensor:
        """``Q_w(D_i·diag(s_i))`` per expert (``amax``: per-expert amax of the full residual)."""
        s3 = self._s3(s)
        Rq = torch.empty_like(D)
        for c in _chunks(D.shape[0], D[0].numel(), 1 << 27):
            sc = s3 if s3.shape[0] == 1 else s3[c]
            Rq[c] = fake_quant_experts(D[c] * sc, self.wq, None if amax is None else amax[c])
        return Rq

    def _stack_smooth(self, smooths: list[Tensor]) -> Tensor:
        """Smoothing candidates ``(in,)`` / ``(E × in)`` stacked as ``(c × E × 1 × in)``."""
        E, _, n_in = self.shape
        return torch.stack([self._s3(s).expand(E, 1, n_in) for s in smooths])

    def quant_residuals(self, D: Tensor, smooths: list[Tensor], colmax: Tensor) -> Tensor:
        """:meth:`quant_residual` of ``D (E × rows × in)`` for every smoothing of ``smooths`` in one batched
        quantization, each (candidate, expert) its own tensor with the full residual's amax
        ``max_j colmax_ij·s_j``: ``(c × E × rows × in)``, the same values as one call per candidate."""
        S = self._stack_smooth(smooths)  # (c × E × 1 × in)
        amax = (colmax.unsqueeze(0) * S.squeeze(2)).amax(-1)  # (c × E)
        Rq = fake_quant_experts((D.unsqueeze(0) * S).flatten(0, 1), self.wq, amax.flatten())
        return Rq.view(len(smooths), *D.shape)

    def _prefill_xq(self, smooths: list[Tensor]) -> list[int]:
        """Quantize the scoring activations of the ``smooths`` not cached yet in one batched pass and cache
        them (the same values as :meth:`xq`); returns the cache keys added."""
        missing = [s for s in smooths if self._xq.get(id(s), (None,))[0] is not s]
        if not missing:
            return []
        Xs = (self.X.unsqueeze(0) / self._stack_smooth(missing)).flatten(0, 1)  # (c·E × k × in)
        Xq = fake_quant_experts(Xs, self.aq).view(len(missing), *self.X.shape)
        for s, x in zip(missing, Xq):
            self._xq[id(s)] = (s, x)
        return [id(s) for s in missing]

    def target(self, Rq: Tensor, s: Tensor) -> Tensor:
        """Refinement targets ``W_i − Q_w(R_i)·diag(1/s_i)`` ``(E × out × in)`` float64."""
        s3 = self._s3(s).to(_F64)
        T = torch.empty_like(self.W64)
        for c in _chunks(self.shape[0], self.shape[1] * self.shape[2], 1 << 27):
            T[c] = self.W64[c] - Rq[c].to(_F64) / (s3 if s3.shape[0] == 1 else s3[c])
        return T

    def branch_out(self, B: Tensor, A: Tensor, rows: Tensor | None) -> Tensor:
        """``(X_i·A_iᵀ)·B_iᵀ`` ``(E × k × rows)`` float32."""
        B32 = B.float() if rows is None else B.float()[..., rows, :]
        return (self.X @ A.float().mT) @ B32.mT

    def nums(self, s, Rq, Yb, rows, D, keep: bool = True) -> Tensor:
        """Per-expert squared errors ``(E,)`` float64: output error ``‖Q_a(X_i/s_i)·Rq_iᵀ + Yb_i − Y_ref_i‖²``
        for experts with tokens, weight error ``‖Rq_i·diag(1/s_i) − D_i‖²`` for the others (``Rq``, ``D``,
        ``Yb`` restricted to ``rows`` when given)."""
        Y = self.xq(s, keep) @ Rq.mT
        if Yb is not None:
            Y += Yb
        if self.act is not None:  # rows is None here (see __init__)
            Y = self.consume(Y) - self.Z_ref
        else:
            Y -= self.Y_ref if rows is None else self.Y_ref[..., rows]
        nums = Y.square_().sum((1, 2), dtype=_F64)
        if self.fallback_local:
            fb = torch.tensor(self.fallback_local, device=nums.device)
            s3 = self._s3(s)
            sf = s3 if s3.shape[0] == 1 else s3[fb]
            nums[fb] = (Rq[fb] / sf - D[fb]).square().sum((1, 2), dtype=_F64)
        return nums

    def consume(self, Y: Tensor, i: int | None = None) -> Tensor:
        """``act(Y + b)`` of fc1 outputs ``Y (E × k × out)`` (or expert ``i``'s ``(k × out)``), float32; zero
        on the padding rows after each expert's samples (``act(b)`` would count there)."""
        if self.bias is not None:
            Y = Y + (self.bias if i is None else self.bias[i])
        return self.act(Y).float() * (self.valid if i is None else self.valid[i])

    def dens(self, rows: Tensor | None) -> Tensor:
        Y_ref = self.Z_ref if self.act is not None else self.Y_ref if rows is None else self.Y_ref[..., rows]
        den_out = Y_ref.square().sum((1, 2), dtype=_F64)
        den_w = self.den_w if rows is None else self.W64[:, rows].square().sum((1, 2))
        return torch.where(self.tok, den_out, den_w)

    def totals(self, nums: Tensor, dens: Tensor) -> list[float]:
        """Activation-weighted relative errors of the whole group (all-reduced), one per row of
        ``nums (n × E)``; the weight error where no expert of the group saw a token. One reduction."""
        tok, w = self.tok, self.weight
        n = nums.shape[0]
        v = torch.stack(
            [
                (w * nums)[:, tok].sum(-1),
                (w * dens)[tok].sum().expand(n),
                nums[:, ~tok].sum(-1),
                dens[~tok].sum().expand(n),
            ],
            dim=1,
        )
        v = self._reduce(v.contiguous()).tolist()
        return [relative_error(a, b) if b > 0 else relative_error(c, d) for a, b, c, d in v]

    # -- steps ---------------------------------------------------------------------------------------
    def search_alpha(self, B: Tensor, A: Tensor, D: Tensor):
        """Best smoothing for the branch ``(B, A)``: ``(s, alphas per expert, ((α, total), …))``."""
        E = self.shape[0]
        if len(self.candidates) == 1:
            alpha, s = self.candidates[0]
            return s, (alpha,) * E, ()
        rows = self.rows
        colmax = D.abs().amax(dim=1)  # (E × in): amax of D_i·diag(s) over all rows = max_j colmax_ij·s_j
        Dr = D if rows is None else D[:, rows]
        Yb = self.branch_out(B, A, rows)
        all_nums = []
        per_candidate = E * max(Dr.shape[1], self.X.shape[1]) * Dr.shape[2]
        for c in _chunks(len(self.candidates), per_candidate, SEARCH_BATCH_ELEMENTS):
            group = self.candidates[c]
            Rqs = self.quant_residuals(Dr, [s for _, s in group], colmax)
            added = self._prefill_xq([s for _, s in group])
            for (_, s), Rq in zip(group, Rqs):
                all_nums.append(self.nums(s, Rq, Yb, rows, Dr, keep=self._keep_candidates))
            if not self._keep_candidates:
                for key in added:
                    self._xq.pop(key, None)
        N = torch.stack(all_nums)  # (candidates × E)
        totals = self.totals(N, self.dens(rows))
        table = tuple((a, t) for (a, _), t in zip(self.candidates, totals))
        if self.projection == "fc1":
            j = min(range(len(totals)), key=totals.__getitem__)  # ties: the first α
            alpha, s = self.candidates[j]
            return s, (alpha,) * E, table
        pick = N.argmin(0).tolist()  # per expert (ties: the first α); experts without tokens: s = 1 anyway
        s = torch.stack([self.candidates[j][1][i] for i, j in enumerate(pick)])
        alphas = tuple(self.candidates[j][0] if self.counts[i] > 0 else None for i, j in enumerate(pick))
        return s, alphas, table

    def evaluate(self, layout, rank, B, A, s, alphas, alpha_errors, D=None) -> _State:
        """Complete quantized group for factors ``(B, A)`` and smoothing ``s`` on all rows."""
        D = self.raw_residual(B, A) if D is None else D
        Rq = self.quant_residual(D, s)
        nums = self.nums(s, Rq, self.branch_out(B, A, None), None, D)
        error = self.totals(nums.unsqueeze(0), self.dens(None))[0]
        return _State(layout, rank, B, A, s, alphas, alpha_errors, Rq, nums, error)

    def first_pass(self, layout: str, rank: int, B: Tensor, A: Tensor) -> _State:
        """α search and full evaluation of a freshly fitted branch."""
        with phase("smoothing"):
            D = self.raw_residual(B, A)
            s, alphas, table = self.search_alpha(B, A, D)
        with phase("residual"):
            return self.evaluate(layout, rank, B, A, s, alphas, table, D=D)

    def gptq(self, st: _State, R: Tensor, residuals: tuple):
        """GPTQ of each expert's residual ``R_i`` (smoothed, ``out × in``) with its own Hessian
        ``diag(1/s_i)·X_iᵀX_i·diag(1/s_i)`` of the routed tokens outside its scoring sample, for experts with
        at least ``GPTQ_MIN_TOKENS_PER_INPUT·in`` of those; kept per expert where it lowers that expert's
        output error on its sampled tokens (held-out for GPTQ, see ``decompose_linear``).
        Returns ``(state, residuals, per-expert quantizer names, whether any expert changed)``."""
        E, _, n_in = self.shape
        Xq, Yb = self.xq(st.s), self.branch_out(st.B, st.A, None)  # (E × k × in), (E × k × out)
        residuals, quants, nums = list(residuals), ["rtn"] * E, st.nums.clone()
        Rq = st.Rq
        for i in range(E):
            k_i = self.k_samples[i]
            if self.counts[i] - k_i < GPTQ_MIN_TOKENS_PER_INPUT * n_in:
                continue
            si = self._s3(st.s)[0 if st.s.dim() == 1 else i, 0].to(_F64)  # (in,)
            Xs = self.X[i, :k_i].to(_F64) / si  # (k_i, in) expert i's scoring sample, smoothed
            H = self.covs[i] / torch.outer(si, si) - Xs.T @ Xs  # Hessian of its other tokens' x/s_i
            Rq_i, packed = gptq_quantize(R[i], H, self.wq, self.cfg.damp)
            Y_i = Xq[i] @ Rq_i.mT + Yb[i]  # (k × out)
            if self.act is not None:
                num = float((self.consume(Y_i, i) - self.Z_ref[i]).square().sum(dtype=_F64))
            else:
                num = float((Y_i - self.Y_ref[i]).square().sum(dtype=_F64))
            if num < float(nums[i]):
                if Rq is st.Rq:
                    Rq = st.Rq.clone()
                residuals[i], quants[i], nums[i], Rq[i] = packed, "gptq", num, Rq_i
        changed = "gptq" in quants
        changed_any = bool(self._reduce(torch.tensor([int(changed)], device=nums.device), dist.ReduceOp.MAX))
        if changed_any:
            error = self.totals(nums.unsqueeze(0), self.dens(None))[0]
            st = _State(st.layout, st.rank, st.B, st.A, st.s, st.alphas, st.alpha_errors, Rq, nums, error)
        return st, tuple(residuals), tuple(quants), changed_any

    def result(self, st: _State, budget: int, steps, figures, seconds: float) -> MoEGroupResult:
        E, out, n_in = self.shape
        R = self.raw_residual(st.B, st.A)
        R *= self._s3(st.s)
        residuals = tuple(quantize_tensor(R[i], self.wq) for i in range(E))
        quants = ("rtn",) * E
        if self.cfg.use_gptq:
            st, residuals, quants, changed = self.gptq(st, R, residuals)
            if changed:
                steps = (*steps, st.error)
        del R
        dens = self.dens(None)
        errs = [relative_error(n, d) for n, d in zip(st.nums.tolist(), dens.tolist())]
        rtn = [relative_error(n, d) for n, d in zip(self.rtn_nums.tolist(), dens.tolist())]
        rtn_total = self.totals(self.rtn_nums.unsqueeze(0), dens)[0]
        B32, A32 = st.B.float(), st.A.float()
        down = A32.contiguous() if st.layout == SHARED_DOWN else None
        up = B32.contiguous() if st.layout == SHARED_UP else None
        downs = () if down is not None else tuple(a.clone() for a in A32)
        ups = () if up is not None else tuple(b.clone() for b in B32)
        idx = tuple(self.offset + i for i in range(E))
        return MoEGroupResult(
            name=self.name,
            projection=self.projection,
            layout=st.layout,
            budget=budget,
            num_params=param_count(st.layout, st.rank, self.num_global, out, n_in),
            weight_format=str(self.wq),
            act_format=str(self.aq),
            smooth=st.s.float().contiguous(),
            alphas=st.alphas,
            shared_down=down,
            shared_up=up,
            lora_downs=downs,
            lora_ups=ups,
            residuals=residuals,
            expert_indices=idx,
            n_tokens=tuple(self.counts),
            fallback_experts=tuple(idx[i] for i, n in enumerate(self.counts) if n == 0),
            few_token_experts=tuple(idx[i] for i, n in enumerate(self.counts) if 0 < n < n_in),
            rtn_errors=tuple(rtn),
            final_errors=tuple(errs),
            rtn_error=rtn_total,
            final_error=st.error,
            alpha_errors=st.alpha_errors,
            step_errors=tuple(steps),
            layout_figures=figures,
            seconds=seconds,
            residual_quants=quants,
            objective="output" if self.act is None else "activation",
        )
