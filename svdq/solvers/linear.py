"""SVDQuant decomposition of one linear layer (svdq/DESIGN.md §3).

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
* Optionally (``residual_quant="gptq"`` / ``"auto"``) the final residual is quantized by GPTQ with the
  Hessian of the smoothed inputs outside the scoring sample instead of round-to-nearest, kept when it lowers
  the output error on that (held-out) sample (svdq/DESIGN.md §19).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from svdq.config import SVDQConfig
from svdq.formats import PackedTensor, QuantFormat, fake_quant, quantize_tensor, trusted_inputs
from svdq.metrics import relative_norm
from svdq.solvers.batched import chunks, fake_quant_experts, relative_norms
from svdq.solvers.gptq import gptq_quantize
from svdq.solvers.lowrank import damped_cholesky, orthonormalize_rows, randomized_svd, randomized_svd_product
from svdq.solvers.smoothing import smoothing_vectors
from svdq.stats import InputStats
from svdq.timing import phase

GPTQ_MIN_TOKENS_PER_INPUT = 4
SCORE_BATCH_ELEMENTS = 1 << 25  # elements per candidate-batched tensor of the α search (float32: 128 MiB)


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
    residual_quant: str  # "rtn" or "gptq" (the one that gave final_error)
    rtn_error: float
    smooth_only_error: float  # W·diag(s) quantized at the chosen α, no branch
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
            "residual_quant": self.residual_quant,
            "rtn_error": self.rtn_error,
            "smooth_only_error": self.smooth_only_error,
            "final_error": self.final_error,
            "step_errors": list(self.step_errors),
            "alpha_errors": [list(p) for p in self.alpha_errors],
            "weight_only": self.weight_only,
            "n_tokens": self.n_tokens,
            "seconds": self.seconds,
        }


SUPPORTED_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@contextlib.contextmanager
def named_errors(name: str):
    """Re-raise a ``ValueError`` / ``ArithmeticError`` / ``torch.linalg.LinAlgError`` from inside the
    numerics of module ``name`` as a ``ValueError`` that starts with the name (already named ones pass)."""
    try:
        yield
    except (ValueError, ArithmeticError, torch.linalg.LinAlgError) as exc:
        if str(exc).startswith(name):
            raise
        raise ValueError(f"{name}: {exc}") from exc


def validate_layer(name: str, weight: Tensor, config: SVDQConfig) -> None:
    """Raise a ``ValueError`` naming ``name`` if ``weight (out × in)`` cannot be decomposed."""
    if weight.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D weight, got shape {tuple(weight.shape)}")
    if weight.dtype not in SUPPORTED_WEIGHT_DTYPES:
        raise ValueError(
            f"{name}: weight dtype {weight.dtype} is not supported (float32, bfloat16 or float16); "
            "cast the model first, e.g. model.float()"
        )
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
    with named_errors(name):
        return _decompose_linear(weight, stats, config, name)


def _decompose_linear(weight: Tensor, stats: InputStats | None, config: SVDQConfig, name: str) -> SVDQResult:
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
    with trusted_inputs():  # W and the statistics are validated above: skip per-call NaN syncs
        with phase("setup"):
            solver = _Solver(W, stats if has_data else None, config)
        out = solver.run()
    return SVDQResult(
        **out,
        weight_only=not has_data,
        n_tokens=stats.n_tokens if has_data else 0,
        seconds=time.perf_counter() - t0,
    )


class _Solver:
    """One layer's search: holds W, the scoring tokens and the Cholesky factor shared by all steps.

    Candidates (α, branch kind) are scored on a fixed random subset of at most ``config.score_rows``
    output rows: quantization groups run along the input dimension, so a row's quantized values do not
    depend on other rows (except NVFP4's per-tensor scale, taken from the subset while scoring). The
    reported errors (α grid aside) are computed on all rows.
    """

    def __init__(self, W: Tensor, stats: InputStats | None, config: SVDQConfig):
        self.W, self.cfg = W, config
        self.wq: QuantFormat = config.weight_quant
        self.aq: QuantFormat = config.act_quant
        dev = W.device
        out_f = W.shape[0]
        if out_f > config.score_rows:
            g = torch.Generator().manual_seed(config.seed)
            self.rows = torch.randperm(out_f, generator=g)[: config.score_rows].sort().values.to(dev)
        else:
            self.rows = None
        self.X = stats.sample.to(dev) if stats is not None else None
        self.y_ref = self.X @ W.T if self.X is not None else None
        self.C = stats.covariance.to(dev) if stats is not None else None
        self.n_tokens = stats.n_tokens if stats is not None else 0
        self.L = None
        if stats is not None and config.whiten:
            L, identity = damped_cholesky(self.C, config.damp)
            self.L = None if identity else L.float()
        self.x_absmax = stats.absmax.to(dev) if stats is not None else None
        self.w_absmax = W.abs().amax(dim=0)
        self.svd_kw = dict(oversample=config.oversample, power_iters=config.power_iters, seed=config.seed)

    def _sub(self, t: Tensor | None, subset: bool) -> Tensor | None:
        return t if (t is None or not subset or self.rows is None) else t[self.rows]

    # -- scoring -------------------------------------------------------------------------------------
    def error(self, s, Rq, B, A_raw, subset=False, as_tensor=False):
        """Relative output error of ``y = Q_a(x/s)·Rqᵀ + (x·A_rawᵀ)·Bᵀ`` against ``x·Wᵀ``.

        ``Rq`` and ``B`` hold the scored rows (all rows, or the subset when ``subset``).
        """
        W = self._sub(self.W, subset)
        if self.X is None:  # weight-only: error of the reconstructed weight
            W_hat = Rq / s
            if B is not None:
                W_hat = W_hat + B @ A_raw
            return relative_norm(W_hat - W, W, as_tensor)
        y_ref = self.y_ref if not subset or self.rows is None else self.y_ref[:, self.rows]
        y = fake_quant(self.X / s, self.aq) @ Rq.T
        if B is not None:
            y = y + (self.X @ A_raw.T) @ B.T
        return relative_norm(y - y_ref, y_ref, as_tensor)

    # -- branch --------------------------------------------------------------------------------------
    def branch(self, target_raw: Tensor, s: Tensor, whiten: bool) -> tuple[Tensor, Tensor]:
        """Rank-r ``(B (out × r), A_raw (r × in))`` for ``target_raw (out × in)`` in raw input coordinates.

        Whitened: top-r SVD of ``target_raw·L`` (never formed) mapped back with ``L⁻¹``; independent
        of ``s``. Plain: top-r SVD of the smoothed ``target_raw·diag(s)`` mapped back with ``1/s``.
        ``A_raw`` is re-gauged to orthonormal rows (a whitened ``A`` would otherwise scale like
        ``1/sqrt(tokens)``, bad for fine-tuning it as lora_down); ``B·A_raw`` is unchanged.
        """
        with phase("branch"):
            return self._branch(target_raw, s, whiten)

    def _branch(self, target_raw: Tensor, s: Tensor, whiten: bool) -> tuple[Tensor, Tensor]:
        r = self.cfg.rank
        if whiten:
            U, S, Vh = randomized_svd_product(target_raw, self.L, r, **self.svd_kw)
            A = torch.linalg.solve_triangular(self.L, Vh, upper=False, left=False)
        else:
            U, S, Vh = randomized_svd(target_raw * s, r, **self.svd_kw)
            A = Vh / s
        B, A = orthonormalize_rows((U * S).double(), A.double())
        return B.float(), A.float()

    def residual(self, s: Tensor, B: Tensor, A_raw: Tensor, subset=False) -> tuple[Tensor, Tensor]:
        """``R = (W − B·A_raw)·diag(s)`` and ``Q_w(R)`` on all rows or on the scoring subset."""
        R = (self._sub(self.W, subset) - self._sub(B, subset) @ A_raw) * s
        return R, fake_quant(R, self.wq)

    def score(self, s: Tensor, B: Tensor, A_raw: Tensor) -> Tensor:
        """Error on the scoring rows, as a 0-d tensor (no host sync)."""
        _, Rq = self.residual(s, B, A_raw, subset=True)
        return self.error(s, Rq, self._sub(B, True), A_raw, subset=True, as_tensor=True)

    def score_batch(self, smooths: list[Tensor], B: Tensor, A_raw: Tensor) -> Tensor:
        """:meth:`score` of every smoothing ``s (in,)`` of ``smooths`` with one branch ``(B, A_raw)``, batched
        over the candidates (``(n,)`` float64, no host sync): the unsmoothed residual ``W − B·A_raw`` and
        the branch output are computed once, each candidate's ``R·diag(s)`` and ``X/s`` are quantized as
        their own tensors (:func:`~svdq.solvers.batched.fake_quant_experts`: the same values as
        :meth:`score`'s ``fake_quant``), and the products run as one batched matmul per chunk of
        candidates (at most :data:`SCORE_BATCH_ELEMENTS` elements per tensor)."""
        if self.X is None:
            return torch.stack([self.score(s, B, A_raw) for s in smooths])
        B_sub = self._sub(B, True)
        D = self._sub(self.W, True) - B_sub @ A_raw  # (rows, in), unsmoothed
        y_ref = self.y_ref if self.rows is None else self.y_ref[:, self.rows]  # (k, rows)
        y_branch = (self.X @ A_raw.T) @ B_sub.T - y_ref  # (k, rows): branch output minus reference
        S = torch.stack(smooths)  # (n, in)
        errs = []
        for c in chunks(S.shape[0], max(D.shape[0], self.X.shape[0]) * D.shape[1], SCORE_BATCH_ELEMENTS):
            Sc = S[c].unsqueeze(1)  # (c, 1, in)
            Rq = fake_quant_experts(D * Sc, self.wq)  # (c, rows, in)
            Xq = fake_quant_experts(self.X / Sc, self.aq)  # (c, k, in)
            errs.append(relative_norms(torch.baddbmm(y_branch, Xq, Rq.mT), y_ref))
        return torch.cat(errs)

    # -- search --------------------------------------------------------------------------------------
    def run(self) -> dict:
        """α search, branch kind, then refinement of the best candidate.

        1. With whitening, one whitened branch serves every α (it does not depend on ``s``); each α is
           scored on the row subset. Without whitening, each α gets its own plain branch.
        2. With whitening, the plain branch is also scored at the best α; the better kind is kept.
        3. Refinement: refit the branch to ``W − Q_w(R)·diag(1/s)``, re-quantize, stop when the error
           falls by less than ``config.refine_tol`` (relative); the best step is kept.
        """
        ones = torch.ones_like(self.w_absmax)
        with phase("setup"):
            rtn = self.error(ones, fake_quant(self.W, self.wq), None, None)
        with phase("smoothing"):
            alpha, whiten, s, B, A_raw, alpha_errors = self._search()
        with phase("residual"):
            return self._finish(rtn, alpha, whiten, s, B, A_raw, alpha_errors)

    def _search(self):
        """Steps 1–2: ``(α, whitened, s, B, A_raw, alpha_errors)`` of the best candidate."""
        ones = torch.ones_like(self.w_absmax)
        alphas = self.cfg.alphas if self.x_absmax is not None else ()
        grid = smoothing_vectors(self.x_absmax, self.w_absmax, alphas) if alphas else ()
        candidates = list(zip(alphas, grid))
        if not candidates:
            candidates = [(None, ones)]
        whiten = self.L is not None
        shared = self.branch(self.W, ones, True) if whiten else None
        scored = []  # (alpha, whiten, s, B, A_raw, error tensor): no host sync inside the loop
        if whiten and len(candidates) > 1:  # one branch for every α: score them batched
            B, A_raw = shared
            errs = self.score_batch([s for _, s in candidates], B, A_raw)
            scored = [(a, True, s, B, A_raw, e) for (a, s), e in zip(candidates, errs)]
        for alpha, s in candidates if not scored else ():
            B, A_raw = shared if whiten else self.branch(self.W, s, False)
            scored.append((alpha, whiten, s, B, A_raw, self.score(s, B, A_raw)))
        errors = torch.stack([c[-1] for c in scored]).tolist()
        alpha_errors = [(c[0], c[1], e) for c, e in zip(scored, errors) if c[0] is not None]
        i = min(range(len(errors)), key=errors.__getitem__)
        best = (errors[i], *scored[i][:5])
        err, alpha, whiten, s, B, A_raw = best
        if whiten:
            B2, A2 = self.branch(self.W, s, False)
            err2 = self.score(s, B2, A2).item()
            if alpha is not None:
                alpha_errors.append((alpha, False, err2))
            if err2 < err:
                whiten, B, A_raw = False, B2, A2
        return alpha, whiten, s, B, A_raw, alpha_errors

    def _finish(self, rtn, alpha, whiten, s, B, A_raw, alpha_errors) -> dict:
        """Steps 3–4 (residual, refinement, GPTQ) for the chosen candidate."""
        R, Rq = self.residual(s, B, A_raw)
        err = self.error(s, Rq, B, A_raw)
        step_errors = [err]
        for _ in range(self.cfg.refine_steps):
            B2, A2 = self.branch(self.W - Rq / s, s, whiten)
            R2, Rq2 = self.residual(s, B2, A2)
            err2 = self.error(s, Rq2, B2, A2)
            if not err2 < err:
                break
            improved = (err - err2) / err
            err, B, A_raw, R, Rq = err2, B2, A2, R2, Rq2
            step_errors.append(err)
            if improved < self.cfg.refine_tol:
                break
        packed, residual_quant = quantize_tensor(R, self.wq), "rtn"
        # GPTQ fits the calibration tokens and can over-fit them (its error on other tokens rising above
        # RTN's while the calibration error falls). It is therefore fitted on the Hessian of the tokens
        # *outside* the scoring sample (≥ GPTQ_MIN_TOKENS_PER_INPUT per input channel, else skipped) and
        # judged on the sample: held-out for GPTQ, and RTN fits nothing.
        if self.cfg.use_gptq and self.X is not None:
            Xs = (self.X / s).double()  # (k, in) the scoring sample, smoothed
            if self.n_tokens - Xs.shape[0] >= GPTQ_MIN_TOKENS_PER_INPUT * self.W.shape[1]:
                H = self.C / torch.outer(s, s).double() - Xs.T @ Xs  # Hessian of the other tokens' x/s
                Rq_g, packed_g = gptq_quantize(R, H, self.wq, self.cfg.damp)
                err_g = self.error(s, Rq_g, B, A_raw)
                if err_g < err:
                    err, packed, residual_quant = err_g, packed_g, "gptq"
                    step_errors.append(err)
        smooth_only = self.error(s, fake_quant(self.W * s, self.wq), None, None)
        return dict(
            smooth=s.float(),
            lora_down=A_raw.contiguous(),
            lora_up=B.contiguous(),
            residual=packed,
            residual_quant=residual_quant,
            alpha=alpha,
            whitened=whiten,
            rtn_error=rtn,
            smooth_only_error=smooth_only,
            final_error=err,
            step_errors=tuple(step_errors),
            alpha_errors=tuple(alpha_errors),
        )
