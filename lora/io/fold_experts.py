"""The fold (svdq/DESIGN.md §6) of fused experts (:class:`svdq.experts.SVDQExperts`, §13): each expert's
branch merged into its own 4-bit residual, and the dequantized residual base, one expert at a time.

    from lora.io.fold_experts import expert_factors, fold_experts, fold_projection, residual_base
    A, B = expert_factors(module.fc1)              # (E, r, in), (E, out, r): every layout expanded
    W_b = residual_base(module.fc1)                # (E, out, in) float64: Q_w(R_e)·diag(1/s_e)
    state, errors = fold_projection(module.fc1, "fold")   # rank-0 ProjectionState + per-expert errors
    folded, report = fold_experts(layer, smoothing="fold", name="model.layers.0.mlp.experts")

For expert ``e`` of projection ``p`` (``Q_w(R_e)`` ``(out, in)`` in smoothed coordinates, smoothing ``s`` —
fc1's shared ``(H,)``, fc2's ``s_e`` — and the expert's factors ``A_e (r, in)``, ``B_e (out, r)``, a shared
factor being every expert's own), :func:`lora.fold.fold_residual` gives the new residual exactly as for
one linear (:mod:`lora.io.folded_hf`): ``smoothing="keep"`` re-quantizes ``Q_w(R_e) + B_e·A_e·diag(s)`` and
keeps ``s`` and the static ranges; ``"fold"`` re-quantizes ``T_e = Q_w(R_e)·diag(1/s) + B_e·A_e`` in raw
coordinates, ``s = 1``, and the static range of expert ``e`` becomes the given ``raw_amax[e]``, ``max|x|``
of its routed inputs times its headroom (:func:`lora.io.torch_common.with_headroom`; 0, i.e. dynamic, for
an expert that got none). Each expert keeps its own NVFP4 global scale. The folded module
is an ``SVDQExperts`` of rank 0 (per-expert empty factors ``(E, 0, in)`` / ``(E, out, 0)``), same handler,
formats, biases and storage.

The report has one entry per expert and projection, ``<name>.<e>.gate_up_proj`` / ``<name>.<e>.down_proj``
(the fused parameters' names), with the errors of :func:`lora.fold.fold_errors` and, for an expert with
captured inputs ``X_e``, ``output_err = ‖y_fold − y‖ / ‖y‖`` of that expert's projection on ``X_e`` (the
actual module outputs, activation quantization included) and ``tokens``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lora.fold import fold_residual, squared_sum
from svdq.experts import ExpertResiduals, ProjectionState, SVDQExperts
from svdq.experts.module import ExpertProjection
from svdq.formats import dequantize
from svdq.metrics import relative_error
from svdq.solvers.shared_basis import SHARED_DOWN, SHARED_UP

__all__ = [
    "PARAM_NAMES",
    "expert_factors",
    "expert_smooth",
    "fold_experts",
    "fold_projection",
    "residual_base",
]

PARAM_NAMES = {"fc1": "gate_up_proj", "fc2": "down_proj"}


def expert_factors(proj: ExpertProjection) -> tuple[Tensor, Tensor]:
    """``(A (E, r, in), B (E, out, r))`` of ``proj`` (its dtype, detached): a shared factor repeated for
    every expert (a view, no copy)."""
    E = proj.num_experts
    A, B = proj.lora_down.detach(), proj.lora_up.detach()
    if proj.layout == SHARED_DOWN:
        A = A.unsqueeze(0).expand(E, *A.shape)  # (E, r, in)
    if proj.layout == SHARED_UP:
        B = B.unsqueeze(0).expand(E, *B.shape)  # (E, out, r)
    return A, B


def expert_smooth(proj: ExpertProjection) -> Tensor:
    """The smoothing ``s`` of every expert, float32 ``(E, in)`` (fc1's shared ``(in,)`` repeated)."""
    s = proj.smooth.detach().float()
    return s.unsqueeze(0).expand(proj.num_experts, -1) if s.dim() == 1 else s  # (E, in)


def residual_base(proj: ExpertProjection) -> Tensor:
    """``W_b = Q_w(R_e)·diag(1/s_e)`` for every expert: float64 ``(E, out, in)`` (either storage mode)."""
    q = proj.residual_weight(torch.float32).double()  # (E, out, in)
    return q / expert_smooth(proj).double().unsqueeze(1)


def _expert_output(proj: ExpertProjection, x: Tensor, e: int) -> Tensor:
    """Expert ``e``'s projection output ``(n, out)`` on its rows ``x (n, in)``, through the module."""
    n, E = x.shape[0], proj.num_experts
    counts = [0] * E
    counts[e] = n
    ids = torch.full((n,), e, dtype=torch.long, device=x.device)
    offs = torch.cumsum(torch.tensor(counts, device=x.device), 0).to(torch.int32)
    return proj(x, None, ids, counts, offs, False)


def fold_projection(
    proj: ExpertProjection,
    smoothing: str,
    inputs: list[Tensor | None] | None = None,
    raw_amax: Tensor | None = None,
) -> tuple[ProjectionState, list[dict]]:
    """``(folded rank-0 ProjectionState, per-expert errors)`` of one projection (module docstring);
    ``inputs``: expert-indexed raw rows; ``raw_amax (E,)``: the raw-coordinate static range per expert for
    ``"fold"`` (``max|x|`` with headroom)."""
    residual = proj.packed_residual()
    qdtype = residual.dtype
    E, out_f, in_f = residual.shape
    packed, errors = [], []
    factors = expert_factors(proj)  # (E, r, in), (E, out, r)
    for e in range(E):
        q = dequantize(residual.expert(e), torch.float32)  # (out, in)
        s = proj.smooth if proj.smooth.dim() == 1 else proj.smooth[e]  # (in,)
        A, B = (factors[0][e], factors[1][e]) if proj.rank else (q.new_zeros(0, in_f), q.new_zeros(out_f, 0))
        x = None if inputs is None else inputs[e]
        p, _, err, _, _ = fold_residual(
            q, s, A, B, fmt=proj.weight_format, smoothing=smoothing, quant_dtype=qdtype, inputs=x
        )
        packed.append(p)
        errors.append(err)
    if smoothing == "keep":
        smooth, amax = proj.smooth, proj.input_amax
    else:
        smooth, amax = torch.ones_like(proj.smooth), raw_amax
    dtype = proj.lora_down.dtype
    state = ProjectionState(
        residual=ExpertResiduals.from_packed(packed).to(proj.smooth.device),
        smooth=smooth,
        act_format=proj.act_format,
        lora_down=torch.zeros(E, 0, in_f, dtype=dtype, device=proj.smooth.device),
        lora_up=torch.zeros(E, out_f, 0, dtype=dtype, device=proj.smooth.device),
        bias=proj.bias,
        input_amax=amax,
        dtype=dtype,
    )
    return state, errors


def fold_experts(
    layer: SVDQExperts,
    smoothing: str = "keep",
    inputs: dict[str, list[Tensor | None]] | None = None,
    raw_amax: dict[str, Tensor] | None = None,
    name: str = "",
) -> tuple[SVDQExperts, dict[str, dict]]:
    """``(folded SVDQExperts, report)`` (module docstring); ``layer`` is not changed. ``inputs`` /
    ``raw_amax``: per projection (``"fc1"``, ``"fc2"``) the expert-indexed raw rows and range (E,),
    e.g. from :class:`lora.io.modelopt_hf_experts.ExpertCapture` through ``with_headroom``."""
    states, report = {}, {}
    inputs, raw_amax = inputs or {}, raw_amax or {}
    for p, proj in layer.projections().items():
        states[p], errs = fold_projection(proj, smoothing, inputs.get(p), raw_amax.get(p))
        for e, err in enumerate(errs):
            report[f"{name}.{e}.{PARAM_NAMES[p]}" if name else f"{e}.{PARAM_NAMES[p]}"] = {
                "format": str(proj.weight_format),
                "smoothing": smoothing,
                "rank": proj.rank,
                **err,
            }
    folded = SVDQExperts(
        states["fc1"],
        states["fc2"],
        layer.act,
        arg_names=layer.arg_names,
        storage=layer.storage,
        handler=layer.handler,
        source_class=layer.source_class,
    ).to(layer.fc1.smooth.device)
    folded.grouped_mm = layer.grouped_mm
    for p, proj in layer.projections().items():
        new = folded.projections()[p]
        for e, x in enumerate(inputs.get(p) or []):
            if x is None or not x.shape[0]:
                continue
            with torch.no_grad():
                y, y_fold = _expert_output(proj, x, e), _expert_output(new, x, e)
            r = report[f"{name}.{e}.{PARAM_NAMES[p]}" if name else f"{e}.{PARAM_NAMES[p]}"]
            r["output_err"] = relative_error(squared_sum(y_fold.double() - y.double()), squared_sum(y))
            r["tokens"] = int(x.shape[0])
    return folded, report
