"""SVDQuant decomposition of one linear layer (DESIGN.md §3.2).

    W (out × in)  ≈  Q_w(R)·diag(1/s)  +  B·A'           A' = A·diag(1/s)

* ``s`` (in,): smoothing, searched over a grid of α and scored by the output error of the *complete*
  quantized layer ``y = Q_a(x/s)·Q_w(R)ᵀ + (x·A'ᵀ)·Bᵀ`` on sampled calibration tokens.
* ``B·A'`` (rank r): top-r branch by randomized SVD. With whitening (``C = XᵀX = L·Lᵀ``) it minimizes the
  output error ``‖(W − B·A')·Xᵀ‖``; that optimum does not depend on ``s`` (smoothing is an invertible
  change of input coordinates), so one SVD serves every α candidate. Because the residual is then
  quantized, the plain (weight-space) branch of ``W·diag(s)`` is scored too and the better one kept.
* ``R = (W − B·A')·diag(s)``: the residual in smoothed coordinates, quantized round-to-nearest.
* Refinement: refit the branch to ``W − Q_w(R)·diag(1/s)``, re-quantize, keep going while the output error
  falls (never returns a worse result than the best seen).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from svdq.config import SVDQConfig
from svdq.formats import PackedTensor, QuantFormat, fake_quant, quantize
from svdq.lowrank import damped_cholesky, orthonormalize_rows, randomized_svd
from svdq.smoothing import smoothing_vector
from svdq.stats import InputStats


@dataclass(frozen=True)
class SVDQResult:
    """Outcome of :func:`decompose_linear` for one weight ``W (out × in)``.

    ``lora_down`` (r × in) reads the raw input (``A' = A·diag(1/s)``), ``lora_up`` (out × r), ``smooth``
    (in,), ``residual`` the packed ``Q_w(R)`` (out × in, smoothed coordinates). Errors are relative output
    errors ``‖y − y_ref‖/‖y_ref‖`` on the scoring tokens (weight errors for a weight-only fallback).
    """

    smooth: Tensor
    lora_down: Tensor
    lora_up: Tensor
    residual: PackedTensor
    alpha: float | None
    whitened: bool
    rtn_error: float
    smooth_only_error: float
    final_error: float
    step_errors: tuple[float, ...]
    alpha_errors: tuple[tuple[float, bool, float], ...]  # (α, whitened branch, error)
    weight_only: bool
    n_tokens: int
    seconds: float

    @property
    def rank(self) -> int:
        return self.lora_down.shape[0]

    @property
    def refine_steps(self) -> int:
        return len(self.step_errors) - 1

    def summary(self) -> dict:
        """JSON-friendly figures (no tensors)."""
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "whitened": self.whitened,
            "rtn_error": self.rtn_error,
            "smooth_only_error": self.smooth_only_error,
            "final_error": self.final_error,
            "step_errors": list(self.step_errors),
            "alpha_errors": [list(p) for p in self.alpha_errors],
            "weight_only": self.weight_only,
            "n_tokens": self.n_tokens,
            "seconds": self.seconds,
        }


def validate_layer(name: str, weight: Tensor, config: SVDQConfig) -> None:
    """Raise a ``ValueError`` naming ``name`` if ``weight (out × in)`` cannot be decomposed."""
    if weight.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D weight, got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{name}: weight contains NaN or Inf")
    if config.rank >= min(out_f, in_f):
        raise ValueError(
            f"{name}: rank {config.rank} must be < min(out, in) = {min(out_f, in_f)} "
            f"for a weight of shape {tuple(weight.shape)}"
        )
    for role, fmt in (("weight", config.weight_quant), ("activation", config.act_quant)):
        if fmt.group_size and in_f % fmt.group_size:
            raise ValueError(
                f"{name}: in_features {in_f} is not divisible by the {role} format {fmt}'s "
                f"group size {fmt.group_size}"
            )


def decompose_linear(
    weight: Tensor, stats: InputStats | None, config: SVDQConfig, name: str = "linear"
) -> SVDQResult:
    """SVDQuant-decompose ``weight (out × in)`` from its calibration ``stats``.

    ``stats=None`` or a layer that saw no tokens raises, unless ``config.weight_only_fallback`` is set:
    then the layer is decomposed from its weight alone (``s = 1``, no whitening, weight-error scoring)
    and the result is flagged ``weight_only``. Runs on ``weight``'s device, in float32/float64.
    """
    t0 = time.perf_counter()
    validate_layer(name, weight, config)
    if stats is not None and stats.nonfinite:
        raise ValueError(f"{name}: calibration activations contain NaN or Inf")
    has_data = stats is not None and stats.n_tokens > 0
    if not has_data and not config.weight_only_fallback:
        raise ValueError(
            f"{name}: no calibration data reached this layer (set weight_only_fallback=True "
            "to decompose it from its weight alone, or exclude it)"
        )
    W = weight.detach().float()
    solver = _Solver(W, stats if has_data else None, config)
    out = solver.run()
    return SVDQResult(
        **out,
        weight_only=not has_data,
        n_tokens=stats.n_tokens if has_data else 0,
        seconds=time.perf_counter() - t0,
    )


class _Solver:
    """One layer's search: holds W, the scoring tokens and the Cholesky factor shared by all steps."""

    def __init__(self, W: Tensor, stats: InputStats | None, config: SVDQConfig):
        self.W, self.cfg = W, config
        self.wq: QuantFormat = config.weight_quant
        self.aq: QuantFormat = config.act_quant
        dev = W.device
        self.X = stats.sample.to(dev) if stats is not None else None
        self.y_ref = self.X @ W.T if self.X is not None else None
        self.L = None
        if stats is not None and config.whiten:
            L, identity = damped_cholesky(stats.covariance.to(dev), config.damp)
            self.L = None if identity else L
        self.x_absmax = stats.absmax.to(dev) if stats is not None else None
        self.w_absmax = W.abs().amax(dim=0)
        self.gen_seed = config.seed

    # -- scoring -------------------------------------------------------------------------------------
    def error(self, s: Tensor, Rq: Tensor, B: Tensor | None, A_raw: Tensor | None) -> float:
        """Relative output error of ``y = Q_a(x/s)·Rqᵀ + (x·A_rawᵀ)·Bᵀ`` against ``x·Wᵀ``."""
        if self.X is None:  # weight-only: error of the reconstructed weight
            W_hat = Rq / s
            if B is not None:
                W_hat = W_hat + B @ A_raw
            return _rel(W_hat - self.W, self.W)
        y = fake_quant(self.X / s, self.aq) @ Rq.T
        if B is not None:
            y = y + (self.X @ A_raw.T) @ B.T
        return _rel(y - self.y_ref, self.y_ref)

    # -- branch --------------------------------------------------------------------------------------
    def branch(self, target_raw: Tensor, s: Tensor, whiten: bool) -> tuple[Tensor, Tensor]:
        """Rank-r ``(B, A_raw)`` for ``target_raw (out × in)`` in raw input coordinates.

        Whitened: top-r SVD of ``target_raw·L`` mapped back with ``L⁻¹`` (independent of ``s``).
        Unwhitened: top-r SVD of the smoothed ``target_raw·diag(s)`` mapped back with ``1/s``.
        """
        r = self.cfg.rank
        kw = dict(oversample=self.cfg.oversample, power_iters=self.cfg.power_iters, seed=self.gen_seed)
        if whiten:
            M = target_raw @ self.L.to(target_raw.dtype)
            U, S, Vh = randomized_svd(M, r, **kw)
            A = torch.linalg.solve_triangular(self.L, Vh.to(torch.float64), upper=False, left=False)
        else:
            U, S, Vh = randomized_svd(target_raw * s, r, **kw)
            A = Vh.to(torch.float64) / s
        # re-gauge so lora_down has orthonormal rows (whitened A scales like 1/sqrt(tokens) otherwise)
        B, A = orthonormalize_rows((U * S).to(torch.float64), A)
        return B.float(), A.float()

    def residual(self, s: Tensor, B: Tensor, A_raw: Tensor) -> tuple[Tensor, Tensor]:
        R = (self.W - B @ A_raw) * s
        return R, fake_quant(R, self.wq)

    # -- search --------------------------------------------------------------------------------------
    def run(self) -> dict:
        """α search (× whitened / plain branch when whitening is on), then refinement of the best."""
        ones = torch.ones_like(self.w_absmax)
        rtn = self.error(ones, fake_quant(self.W, self.wq), None, None)
        alphas = self.cfg.alphas if self.x_absmax is not None else ()
        candidates = [(a, smoothing_vector(self.x_absmax, self.w_absmax, a)) for a in alphas]
        if not candidates:
            candidates = [(None, ones)]
        # The whitened branch minimizes the output error of the unquantized residual and does not depend
        # on s; the plain one can still win once the residual is quantized, so both are scored.
        modes = (True, False) if self.L is not None else (False,)
        whitened = self.branch(self.W, ones, True) if self.L is not None else None
        best = None
        alpha_errors, smooth_only = [], math.inf
        for alpha, s in candidates:
            smooth_only = min(smooth_only, self.error(s, fake_quant(self.W * s, self.wq), None, None))
            for whiten in modes:
                B, A_raw = whitened if whiten else self.branch(self.W, s, False)
                R, Rq = self.residual(s, B, A_raw)
                err = self.error(s, Rq, B, A_raw)
                if alpha is not None:
                    alpha_errors.append((alpha, whiten, err))
                if best is None or err < best[0]:
                    best = (err, alpha, whiten, s, B, A_raw, R)
        err, alpha, whiten, s, B, A_raw, R = best
        step_errors = [err]
        Rq = fake_quant(R, self.wq)
        for _ in range(self.cfg.refine_steps):
            B2, A2 = self.branch(self.W - Rq / s, s, whiten)
            R2, Rq2 = self.residual(s, B2, A2)
            err2 = self.error(s, Rq2, B2, A2)
            if not err2 < err * (1 - 1e-4):
                break
            err, B, A_raw, R, Rq = err2, B2, A2, R2, Rq2
            step_errors.append(err)
        return dict(
            smooth=s.float(),
            lora_down=A_raw.contiguous(),
            lora_up=B.contiguous(),
            residual=quantize(R, self.wq),
            alpha=alpha,
            whitened=whiten,
            rtn_error=rtn,
            smooth_only_error=smooth_only,
            final_error=err,
            step_errors=tuple(step_errors),
            alpha_errors=tuple(alpha_errors),
        )


def _rel(diff: Tensor, ref: Tensor) -> float:
    den = ref.double().norm().item()
    num = diff.double().norm().item()
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)
