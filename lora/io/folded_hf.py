"""Folded export: the low-rank branch merged into the 4-bit weight, for engines without low-rank support.

    from lora.io.folded_hf import fold_branches, export_folded_hf
    report = export_folded_hf(model, "out/", forward_loop=loop)          # model itself is left unchanged
    report = fold_branches(model, forward_loop=loop)                     # in place

For an :class:`~svdq.layer.SVDQLinear` (``y = Q_a(x/s)·Q_w(R)ᵀ + (x·A'ᵀ)·Bᵀ + bias``) the effective
weight in raw input coordinates is ``T = Q_w(R)·diag(1/s) + B·A'`` (out × in, float64). Folding replaces
the layer by a branch-less (rank 0) one of the same formats:

* ``smoothing="keep"``: ``R' = Q_w(R) + B·A'·diag(s)`` (smoothed coordinates), new residual ``Q_w(R')``, same
  ``s`` and static range ``input_amax``; exported as modelopt ``NVFP4_AWQ`` (NVFP4 + ``pre_quant_scale``),
  which TensorRT-LLM reads. ``W_fold = Q_w(R')·diag(1/s)``.
* ``smoothing="fold"``: ``W' = T``, new residual ``Q_w(T)`` in raw coordinates, ``s = 1``; activations are
  then quantized unsmoothed, with ``input_amax = max|x|`` over the given inputs times the layer's
  headroom, its static range over ``max|x/s|`` of the same inputs (svdq/DESIGN.md §20; dynamic without
  inputs).
  Exported as plain modelopt ``NVFP4`` (no ``pre_quant_scale``: the layout vLLM, SGLang and TensorRT-LLM
  read). ``W_fold = Q_w(T)``. Usually less accurate (the smoothing protected the activation quantization).

Fused experts (:class:`svdq.experts.SVDQExperts`) are folded per expert in the same two modes
(:mod:`lora.io.fold_experts`; with ``"fold"`` each expert's static range becomes ``max|x|`` of its routed
inputs times its headroom) and written per expert (:mod:`lora.io.modelopt_hf_experts`): ``smoothing="fold"``
gives a plain ``NVFP4`` checkpoint throughout — the layout vLLM's modelopt loader reads.

The per-layer report gives the error the fold adds (float64):

* ``weight_err = ‖W_fold − T‖ / ‖T‖`` and ``delta_rel = ‖B·A'‖ / ‖T‖`` (the error of dropping the branch
  instead, for scale);
* with inputs ``X`` (n × in, raw; captured over ``forward_loop``, at most ``max_tokens`` rows, or given per
  layer in ``inputs``): ``act_weight_err = ‖X·(W_fold − T)ᵀ‖ / ‖X·Tᵀ‖`` and
  ``output_err = ‖y_fold − y‖ / ‖y‖``, the actual layer outputs before and after on ``X`` (this one
  includes activation quantization, which the folded layer also applies to what was the 16-bit branch),
  and ``tokens = n``.
"""

from __future__ import annotations

import copy
import fnmatch
import os
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lora.fold import SMOOTHING_MODES, fold_residual, format_report, squared_sum
from lora.io.fold_experts import fold_experts
from lora.io.modelopt_hf import write_torch_modelopt_hf
from lora.io.modelopt_hf_experts import capture_expert_inputs, experts_meta, svdq_experts
from lora.io.torch_common import ForwardLoop, capture_inputs, with_headroom
from svdq.formats import dequantize
from svdq.layer import SVDQLinear
from svdq.metrics import relative_error

__all__ = ["SMOOTHING_MODES", "export_folded_hf", "fold_branches", "fold_layer", "format_report"]


def _residual(layer: SVDQLinear) -> tuple[Tensor, torch.dtype]:
    """``(Q_w(R) (out × in) float32, dtype to re-quantize from)``."""
    if layer.storage == "packed":
        packed = layer.packed_residual()
        return dequantize(packed, torch.float32), packed.dtype
    return layer.residual_weight(torch.float32), layer.lora_down.dtype


def fold_layer(
    layer: SVDQLinear, smoothing: str = "keep", x: Tensor | None = None, raw_amax: Tensor | None = None
) -> tuple[SVDQLinear, dict]:
    """``(folded rank-0 layer, errors)`` for one layer (module docstring; the math is
    :func:`lora.fold.fold_residual`); ``layer`` is not changed.

    ``x``: raw inputs ``(n × in)`` for the input-based errors; ``raw_amax``: the static range of a
    ``smoothing="fold"`` layer in raw coordinates, ``max|x|`` with headroom
    (:func:`lora.io.torch_common.with_headroom`; ``None``: dynamic).
    """
    if smoothing not in SMOOTHING_MODES:
        raise ValueError(f"smoothing must be one of {SMOOTHING_MODES}, got {smoothing!r}")
    in_f, out_f = layer.in_features, layer.out_features
    if x is not None and x.shape[0]:
        x = x.reshape(-1, in_f)  # (n, in)
    else:
        x = None
    q, qdtype = _residual(layer)
    packed, new_s, weight_errors, _, _ = fold_residual(
        q,
        layer.smooth,
        layer.lora_down,
        layer.lora_up,
        fmt=layer.weight_format,
        smoothing=smoothing,
        quant_dtype=qdtype,
        inputs=x,
    )
    amax = getattr(layer, "input_amax", None) if smoothing == "keep" else raw_amax
    dtype, device = layer.lora_down.dtype, layer.smooth.device
    folded = SVDQLinear(
        packed,
        new_s,
        torch.zeros(0, in_f, dtype=dtype),
        torch.zeros(out_f, 0, dtype=dtype),
        layer.bias,
        layer.act_format,
        layer.storage,
        dtype,
    ).to(device)
    if amax is not None:
        folded.set_input_amax(amax)
    errors = {"format": str(layer.weight_format), "smoothing": smoothing, "rank": layer.rank, **weight_errors}
    if x is not None:
        with torch.no_grad():
            y, y_fold = layer(x), folded(x)
        errors["output_err"] = relative_error(squared_sum(y_fold.double() - y.double()), squared_sum(y))
        errors["tokens"] = int(x.shape[0])
    return folded, errors


def fold_branches(
    model: nn.Module,
    pattern: str = "*",
    *,
    smoothing: str = "keep",
    forward_loop: ForwardLoop | None = None,
    inputs: Mapping[str, Tensor] | None = None,
    max_tokens: int = 4096,
) -> dict[str, dict]:
    """Fold the branch of every SVDQuant layer and experts module whose name matches ``pattern`` (fnmatch),
    in place.

    Returns ``{layer: errors}`` (module docstring; experts: one entry per expert and projection,
    ``<experts>.<e>.gate_up_proj`` / ``.down_proj``). Inputs for the input-based errors come from ``inputs``
    (``{layer: raw inputs (..., in)}``) or are captured over ``forward_loop`` (run once, before folding).
    Layers of rank 0 are skipped. Every layer is folded before any is replaced: on an error the model is
    unchanged. ``model`` must contain the layers (a bare ``SVDQLinear`` cannot be replaced in place: use
    :func:`fold_layer`).
    """
    if smoothing not in SMOOTHING_MODES:
        raise ValueError(f"smoothing must be one of {SMOOTHING_MODES}, got {smoothing!r}")
    if isinstance(model, SVDQLinear):
        raise ValueError("model is itself an SVDQLinear: fold it with lora.io.folded_hf.fold_layer")
    layers = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, SVDQLinear) and fnmatch.fnmatchcase(n, pattern) and m.rank > 0
    }
    experts = {
        n: m
        for n, m in svdq_experts(model).items()
        if fnmatch.fnmatchcase(n, pattern) and any(p.rank > 0 for p in m.projections().values())
    }
    if not layers and not experts:
        raise ValueError(f"no SVDQLinear layer or SVDQExperts module with a branch matches {pattern!r}")
    xs: dict[str, Tensor] = {}
    amax: dict[str, Tensor] = {}
    if inputs is not None:
        unknown = sorted(set(inputs) - set(layers))
        if unknown:
            raise ValueError(f"inputs given for {unknown}, which are not SVDQuant layers with a branch here")
        for n, x in inputs.items():
            if x.shape[-1] != layers[n].in_features:
                raise ValueError(
                    f"{n}: inputs have {x.shape[-1]} features, the layer takes {layers[n].in_features}"
                )
            xs[n] = x.detach().reshape(-1, x.shape[-1])[:max_tokens]
            if x.numel():
                xf, layer = x.detach().float(), layers[n]
                smoothed = (xf / layer.smooth.float()).abs().amax()
                amax[n] = with_headroom(xf.abs().amax(), smoothed, getattr(layer, "input_amax", None))
    elif forward_loop is not None and layers:
        xs, amax = capture_inputs(model, layers, forward_loop, max_tokens)
    cap = None
    if experts and forward_loop is not None:
        cap = capture_expert_inputs(model, experts, forward_loop, max_tokens)
    folded, report = {}, {}
    for name, layer in layers.items():
        a = amax.get(name)
        folded[name], report[name] = fold_layer(
            layer, smoothing, xs.get(name), a if a is not None and a > 0 else None
        )
    for name, layer in experts.items():
        inputs_e = raw = None
        if cap is not None:
            inputs_e = {p: cap.inputs((name, p)) for p in ("fc1", "fc2")}
            raw = {
                p: with_headroom(cap.amax[(name, p)], cap.amax_smoothed[(name, p)], proj.input_amax)
                for p, proj in layer.projections().items()
            }
        folded[name], rep = fold_experts(layer, smoothing, inputs_e, raw, name)
        report.update(rep)
    for name, new in folded.items():
        model.set_submodule(name, new)
    return report


def fold_summary_meta(report: dict[str, dict]) -> dict:
    """The fold report in short for the configs: how many were folded, the mean / max of the added error
    (``output_err`` where every entry has one, else ``weight_err``) and where the max is."""
    key = "output_err" if report and all("output_err" in r for r in report.values()) else "weight_err"
    vals = {n: float(r[key]) for n, r in report.items()}
    worst = max(vals, key=vals.get) if vals else None
    return {
        "folded": len(vals),
        "error": key,
        "mean": sum(vals.values()) / len(vals) if vals else 0.0,
        "max": vals[worst] if worst else 0.0,
        "max_at": worst,
    }


def export_folded_hf(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    smoothing: str = "keep",
    forward_loop: ForwardLoop | None = None,
    inputs: Mapping[str, Tensor] | None = None,
    max_tokens: int = 4096,
    config: dict | None = None,
    metadata: dict | None = None,
    overwrite: bool = False,
    verbose: bool = True,
) -> dict[str, dict]:
    """Fold a deep copy of ``model`` (:func:`fold_branches`) and write it with
    :func:`~lora.io.modelopt_hf.export_modelopt_hf` (``NVFP4_AWQ`` for ``smoothing="keep"``, ``NVFP4`` for
    ``"fold"``); returns the fold report (also printed with ``verbose``; its summary — the largest errors —
    is in the configs' ``svdq`` entry with the unfolded model's ranks and layouts as ``source``, ``metadata``
    its ``user`` field). ``model`` is not changed;
    ``forward_loop`` also supplies static ranges that the folded layers lack. Nothing is written on error.
    """
    source = {
        "layers": {n: {"rank": m.rank} for n, m in model.named_modules() if isinstance(m, SVDQLinear)},
        "experts": {n: experts_meta(m) for n, m in svdq_experts(model).items()},
    }
    folded = copy.deepcopy(model)
    report = fold_branches(
        folded, smoothing=smoothing, forward_loop=forward_loop, inputs=inputs, max_tokens=max_tokens
    )
    write_torch_modelopt_hf(
        folded,
        out_dir,
        forward_loop=forward_loop,
        config=config,
        metadata=metadata,
        overwrite=overwrite,
        export_format="folded",
        extra_meta={"smoothing": smoothing, "fold": fold_summary_meta(report), "source": source},
    )
    if verbose:
        print(f"svdq folded export to {out_dir} (smoothing={smoothing}); error added by the fold:")
        print(format_report(report))
    return report
