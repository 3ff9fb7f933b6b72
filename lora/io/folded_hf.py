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
  then quantized unsmoothed, with ``input_amax = max|x|`` over the given inputs (dynamic without inputs).
  Exported as plain modelopt ``NVFP4`` (no ``pre_quant_scale``: the layout vLLM, SGLang and TensorRT-LLM
  read). ``W_fold = Q_w(T)``. Usually less accurate (the smoothing protected the activation quantization).

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

from lora.io.modelopt_hf import export_modelopt_hf
from lora.io.torch_common import ForwardLoop, capture_inputs, svdq_layers
from svdq.formats import dequantize, quantize_tensor
from svdq.layer import SVDQLinear

SMOOTHING_MODES = ("keep", "fold")


def _rel(num: Tensor, den: Tensor) -> float:
    """``‖num‖ / ‖den‖`` in float64 (0 for 0/0, inf for x/0)."""
    n, d = float(num.double().norm()), float(den.double().norm())
    if d == 0.0:
        return 0.0 if n == 0.0 else float("inf")
    return n / d


def _residual(layer: SVDQLinear) -> tuple[Tensor, torch.dtype]:
    """``(Q_w(R) as float64, dtype to re-quantize from)``."""
    if layer.storage == "packed":
        packed = layer.packed_residual()
        return dequantize(packed, torch.float32).double(), packed.dtype
    return layer.residual_weight(torch.float32).double(), layer.lora_down.dtype


def fold_layer(
    layer: SVDQLinear, smoothing: str = "keep", x: Tensor | None = None, raw_amax: Tensor | None = None
) -> tuple[SVDQLinear, dict]:
    """``(folded rank-0 layer, errors)`` for one layer (module docstring); ``layer`` is not changed.

    ``x``: raw inputs ``(n × in)`` for the input-based errors; ``raw_amax``: ``max|x|`` for the static range
    of a ``smoothing="fold"`` layer (``None``: dynamic).
    """
    if smoothing not in SMOOTHING_MODES:
        raise ValueError(f"smoothing must be one of {SMOOTHING_MODES}, got {smoothing!r}")
    q, qdtype = _residual(layer)
    s = layer.smooth.detach().double()
    delta = layer.lora_up.detach().double() @ layer.lora_down.detach().double()  # B·A', raw coordinates
    target = q / s + delta
    if smoothing == "keep":
        stored, new_s, amax = q + delta * s, layer.smooth.detach(), getattr(layer, "input_amax", None)
    else:
        stored, new_s, amax = target, torch.ones_like(layer.smooth), raw_amax
    packed = quantize_tensor(stored.to(qdtype), layer.weight_format)
    w_fold = dequantize(packed, torch.float32).double() / new_s.double()
    dtype, device = layer.lora_down.dtype, layer.smooth.device
    in_f, out_f = layer.in_features, layer.out_features
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
    errors = {
        "format": str(layer.weight_format),
        "smoothing": smoothing,
        "rank": layer.rank,
        "weight_err": _rel(w_fold - target, target),
        "delta_rel": _rel(delta, target),
    }
    if x is not None and x.shape[0]:
        x = x.reshape(-1, in_f)
        x64 = x.double()
        with torch.no_grad():
            y, y_fold = layer(x), folded(x)
        errors["act_weight_err"] = _rel(x64 @ (w_fold - target).T, x64 @ target.T)
        errors["output_err"] = _rel(y_fold.double() - y.double(), y)
        errors["tokens"] = int(x.shape[0])
    return folded, errors


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def fold_branches(
    model: nn.Module,
    pattern: str = "*",
    *,
    smoothing: str = "keep",
    forward_loop: ForwardLoop | None = None,
    inputs: Mapping[str, Tensor] | None = None,
    max_tokens: int = 4096,
) -> dict[str, dict]:
    """Fold the branch of every SVDQuant layer whose name matches ``pattern`` (fnmatch), in place.

    Returns ``{layer: errors}`` (module docstring). Inputs for the input-based errors come from ``inputs``
    (``{layer: raw inputs (..., in)}``) or are captured over ``forward_loop`` (run once, before folding).
    Layers of rank 0 are skipped. Every layer is folded before any is replaced: on an error the model is
    unchanged. ``model`` must contain the layers (a bare ``SVDQLinear`` cannot be replaced in place: use
    :func:`fold_layer`).
    """
    if smoothing not in SMOOTHING_MODES:
        raise ValueError(f"smoothing must be one of {SMOOTHING_MODES}, got {smoothing!r}")
    layers = {n: m for n, m in svdq_layers(model).items() if fnmatch.fnmatchcase(n, pattern) and m.rank > 0}
    if "" in layers:
        raise ValueError("model is itself an SVDQLinear: fold it with lora.io.folded_hf.fold_layer")
    if not layers:
        raise ValueError(f"no SVDQLinear layer with a branch matches {pattern!r}")
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
                amax[n] = x.detach().float().abs().amax()
    elif forward_loop is not None:
        xs, amax = capture_inputs(model, layers, forward_loop, max_tokens)
    folded, report = {}, {}
    for name, layer in layers.items():
        a = amax.get(name)
        folded[name], report[name] = fold_layer(
            layer, smoothing, xs.get(name), a if a is not None and a > 0 else None
        )
    for name, new in folded.items():
        _set_submodule(model, name, new)
    return report


def format_report(report: Mapping[str, Mapping]) -> str:
    """A small text table of a fold report."""
    cols = ("weight_err", "delta_rel", "act_weight_err", "output_err")
    lines = [f"{'layer':<40} " + " ".join(f"{c:>14}" for c in cols)]
    for name, r in report.items():
        vals = " ".join(f"{r[c]:>14.4e}" if c in r else f"{'-':>14}" for c in cols)
        lines.append(f"{name:<40} {vals}")
    return "\n".join(lines)


def export_folded_hf(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    smoothing: str = "keep",
    forward_loop: ForwardLoop | None = None,
    inputs: Mapping[str, Tensor] | None = None,
    max_tokens: int = 4096,
    config: dict | None = None,
    overwrite: bool = False,
    verbose: bool = True,
) -> dict[str, dict]:
    """Fold a deep copy of ``model`` (:func:`fold_branches`) and write it with
    :func:`~lora.io.modelopt_hf.export_modelopt_hf` (``NVFP4_AWQ`` for ``smoothing="keep"``, ``NVFP4`` for
    ``"fold"``); returns the fold report (also printed with ``verbose``). ``model`` is not changed;
    ``forward_loop`` also supplies static ranges that the folded layers lack. Nothing is written on error.
    """
    folded = copy.deepcopy(model)
    report = fold_branches(
        folded, smoothing=smoothing, forward_loop=forward_loop, inputs=inputs, max_tokens=max_tokens
    )
    export_modelopt_hf(folded, out_dir, forward_loop=forward_loop, config=config, overwrite=overwrite)
    if verbose:
        print(f"svdq folded export to {out_dir} (smoothing={smoothing}); error added by the fold:")
        print(format_report(report))
    return report
