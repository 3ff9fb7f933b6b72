"""The fold: an adapter branch merged into a quantized weight, re-quantized, with the error it adds.

    from lora import fold_adapters
    report = fold_adapters(model)            # torch (svdq.SVDQLinear) or Megatron model, in place

One implementation of the math, on tensors, used by every path (:func:`lora.modelopt_quant.fold_adapters`
for Megatron / modelopt bases, :func:`lora.io.folded_hf.fold_branches` for torch ``SVDQLinear`` layers, and
through them the folded exports :mod:`lora.io.folded` / :mod:`lora.io.folded_hf`):

* :func:`delta_weight` — the adapter's weight delta ``scaling·B·A`` ``(out × in)``.
* :func:`requantize` — the generic fold: a quantized weight ``w_q`` in stored coordinates with column
  scale ``c`` (raw weight ``= w_q·diag(c)``) gets ``T = w_q·diag(c) + delta`` (float64, raw coordinates),
  stored again as ``Q(T·diag(1/c'))`` with column scale ``c'`` (``c`` unless given).
* :func:`fold_residual` — the SVDQuant case: residual ``Q_w(R)`` in smoothed coordinates (``c = 1/s``),
  factors ``A`` / ``B`` and ``scaling``; ``smoothing="keep"`` keeps ``s``, ``"fold"`` folds it into the
  weight (``s' = 1``).
* :func:`fold_errors` — the added error of a folded weight ``W_fold`` against ``T`` (float64):
  ``weight_err = ‖W_fold − T‖ / ‖T‖``, ``delta_rel = ‖delta‖ / ‖T‖`` and, with raw inputs ``X``,
  ``act_weight_err = ‖X·(W_fold − T)ᵀ‖ / ‖X·Tᵀ‖``; the squared sums are all-reduced over ``tp_group``
  (the tensor-parallel shards of one weight), so the errors are those of the whole weight.
* :func:`format_report` / :func:`fold_summary` — a fold report as a table and as one line.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lora.framework.tp import group_rank_size
from svdq.formats import PackedTensor, QuantFormat, dequantize, parse_format, quantize_tensor
from svdq.metrics import relative_error

SMOOTHING_MODES = ("keep", "fold")


def delta_weight(B: Tensor, A: Tensor, scaling: float = 1.0, dtype: torch.dtype = torch.float32) -> Tensor:
    """``scaling · B·A`` in ``dtype``: ``B`` ``(out × r)`` (``lora_up``), ``A`` ``(r × in)`` (``lora_down``)
    → ``(out × in)``. Differentiable (detach the factors for a value only)."""
    return scaling * (B.to(dtype) @ A.to(dtype))  # (out, in)


def squared_sum(t: Tensor, tp_group=None) -> Tensor:
    """``Σ t²`` in float64 (0-d), summed over ``tp_group`` (the tensor-parallel shards of one tensor)."""
    s = t.double().square().sum()
    if group_rank_size(tp_group)[1] > 1:
        dist.all_reduce(s, group=tp_group)
    return s


def fold_errors(
    w_fold: Tensor, target: Tensor, delta: Tensor, inputs: Tensor | None = None, tp_group=None
) -> dict:
    """``{"weight_err", "delta_rel"[, "act_weight_err"]}`` of ``w_fold`` against ``target`` (module
    docstring). ``w_fold``, ``target``, ``delta`` ``(out × in)`` float64 in raw input coordinates (this rank's
    shard under tensor parallelism, ``tp_group`` its tensor-parallel group); ``inputs`` raw ``(n × in)``, any
    float dtype (read as float64; the input-based error is this shard's, tensor-parallel size 1)."""
    den = squared_sum(target, tp_group)
    out = {
        "weight_err": relative_error(squared_sum(w_fold - target, tp_group), den),
        "delta_rel": relative_error(squared_sum(delta, tp_group), den),
    }
    if inputs is not None and inputs.shape[0]:
        x = inputs.double()  # (n, in)
        err = squared_sum(x @ (w_fold - target).T)  # of (n, out)
        out["act_weight_err"] = relative_error(err, squared_sum(x @ target.T))
    return out


def tp_global_amax(stored: Tensor, fmt: QuantFormat, tp_group, mode: str) -> Tensor | None:
    """The per-tensor (or, row-parallel fp8-per-row, per-row) range over the tensor-parallel group, so that
    shards are quantized as the whole weight would be; ``None`` (the shard's own range) without TP."""
    if group_rank_size(tp_group)[1] == 1:
        return None
    if fmt.name == "nvfp4" or (fmt.name == "fp8" and not fmt.per_channel):
        amax = stored.detach().float().abs().amax()
    elif fmt.name == "fp8" and mode == "row":
        amax = stored.detach().float().abs().amax(dim=-1)
    else:
        return None
    dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=tp_group)
    return amax if bool((amax > 0).all()) else None


def _column(scale: Tensor | None, like: Tensor) -> Tensor:
    """A column scale as float64 ``(in,)`` on ``like``'s device (ones for ``None``)."""
    if scale is None:
        return torch.ones(like.shape[-1], dtype=torch.float64, device=like.device)
    return scale.detach().double().reshape(-1).to(like.device)


def requantize(
    weight: Tensor,
    delta: Tensor,
    fmt,
    *,
    col_scale: Tensor | None = None,
    new_col_scale: Tensor | None = None,
    quant_dtype: torch.dtype | None = None,
    global_amax: Tensor | float | None = None,
    tp_group=None,
    mode: str = "column",
) -> tuple[PackedTensor, Tensor, Tensor]:
    """The generic fold: ``(packed Q(T·diag(1/c')), T, W_fold)``.

    ``weight`` ``(out × in)``: the dequantized quantized weight as stored (its dtype is that of ``W_fold``'s
    dequantization); ``col_scale`` ``c`` ``(in,)`` maps stored to raw coordinates (default 1);
    ``delta`` ``(out × in)`` in raw coordinates. ``T = weight·diag(c) + delta`` (float64) is stored with
    column scale ``new_col_scale`` ``c'`` (default ``c``), cast to ``quant_dtype`` (default ``weight``'s)
    and quantized in ``fmt`` with range ``global_amax`` (default: the tensor-parallel one over ``tp_group``,
    :func:`tp_global_amax`, ``mode`` the linear's ``"column"`` / ``"row"`` split). ``W_fold =
    dequantize(packed)·diag(c')`` (float64, raw coordinates).
    """
    fmt = parse_format(fmt)
    c = _column(col_scale, weight)  # (in,) float64
    c_new = c if new_col_scale is None else _column(new_col_scale, weight)
    target = weight.detach().double() * c + delta.detach().double()  # (out, in) raw
    stored = (target / c_new).to(quant_dtype or weight.dtype)  # (out, in) stored coordinates
    if global_amax is None:
        global_amax = tp_global_amax(stored, fmt, tp_group, mode)
    packed = quantize_tensor(stored, fmt, global_amax=global_amax)
    w_fold = dequantize(packed, weight.dtype).double() * c_new  # (out, in) raw
    return packed, target, w_fold


def fold_residual(
    residual: Tensor,
    smooth: Tensor,
    A: Tensor,
    B: Tensor,
    scaling: float = 1.0,
    *,
    fmt,
    smoothing: str = "keep",
    quant_dtype: torch.dtype | None = None,
    global_amax: Tensor | float | None = None,
    tp_group=None,
    mode: str = "column",
    inputs: Tensor | None = None,
) -> tuple[PackedTensor, Tensor, dict, Tensor, Tensor]:
    """Fold the branch ``scaling·B·A`` into an SVDQuant residual: ``(packed, new smooth, errors, T, W_fold)``.

    ``residual`` ``(out × in)``: ``Q_w(R)`` dequantized, in smoothed coordinates (the layer computes
    ``Q_a(x/s)·Q_w(R)ᵀ``); ``smooth`` ``s`` ``(in,)``; ``A`` ``(r × in)`` reads the raw input, ``B``
    ``(out × r)``. ``smoothing="keep"``: the new residual is ``Q_w(Q_w(R) + scaling·B·A·diag(s))`` and ``s``
    stays; ``"fold"``: ``Q_w(T)`` in raw coordinates, the new smoothing is ones. ``errors``:
    :func:`fold_errors` (with ``inputs`` raw ``(n × in)``). The other arguments as in :func:`requantize`.
    """
    if smoothing not in SMOOTHING_MODES:
        raise ValueError(f"smoothing must be one of {SMOOTHING_MODES}, got {smoothing!r}")
    delta = delta_weight(B.detach(), A.detach(), scaling, torch.float64)  # (out, in) raw
    c = 1.0 / smooth.detach().double()  # (in,)
    new_smooth = smooth.detach() if smoothing == "keep" else torch.ones_like(smooth)
    packed, target, w_fold = requantize(
        residual,
        delta,
        fmt,
        col_scale=c,
        new_col_scale=None if smoothing == "keep" else torch.ones_like(c),
        quant_dtype=quant_dtype,
        global_amax=global_amax,
        tp_group=tp_group,
        mode=mode,
    )
    return packed, new_smooth, fold_errors(w_fold, target, delta, inputs, tp_group), target, w_fold


def fold_adapters(model: nn.Module, pattern: str = "*", **options) -> dict[str, dict]:
    """Fold the adapters of ``model`` whose name matches ``pattern`` into their quantized bases, in place;
    returns the fold report ``{linear: errors}``.

    A Megatron model (adapters on SVDQuant, modelopt-quantized or plain bases):
    :func:`lora.modelopt_quant.fold_adapters` (``weight_format``, ``forward_loop``, ``max_tokens``,
    ``recalibrate``). A torch model (the branches of its :class:`svdq.SVDQLinear` layers):
    :func:`lora.io.folded_hf.fold_branches` (``smoothing``, ``forward_loop``, ``inputs``, ``max_tokens``).
    """
    from lora.families import is_megatron_model

    if is_megatron_model(model):
        from lora.modelopt_quant import fold_adapters as fold_megatron

        return fold_megatron(model, pattern, **options)
    from lora.io.folded_hf import fold_branches

    return fold_branches(model, pattern, **options)


# ------------------------------------------------------------------------------------------ reports


def format_report(report: Mapping[str, Mapping]) -> str:
    """A small text table of a fold report."""
    cols = ("weight_err", "delta_rel", "act_weight_err", "output_err")
    lines = [f"{'layer':<40} " + " ".join(f"{c:>14}" for c in cols)]
    for name, r in report.items():
        vals = " ".join(f"{r[c]:>14.4e}" if c in r else f"{'-':>14}" for c in cols)
        lines.append(f"{name:<40} {vals}")
    return "\n".join(lines)


def fold_summary(report: Mapping[str, Mapping]) -> str:
    """One line: how many linears were folded and the mean / max of the error the fold added
    (``output_err`` where every linear has one, i.e. with inputs, else ``weight_err``)."""
    if not report:
        return "folded 0 linears"
    key = "output_err" if all("output_err" in r for r in report.values()) else "weight_err"
    vals = [float(r[key]) for r in report.values()]
    worst = max(report, key=lambda n: float(report[n][key]))
    tokens = [int(r["tokens"]) for r in report.values() if "tokens" in r]
    on = f" on up to {max(tokens)} tokens per linear" if tokens and key == "output_err" else ""
    return (
        f"folded {len(vals)} linears: added {key} mean {sum(vals) / len(vals):.4e}, "
        f"max {max(vals):.4e} ({worst}){on}"
    )
