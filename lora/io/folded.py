"""Folded export of Megatron models: adapters on SVDQuant bases merged into the 4-bit residuals (rank 0),
written in the svdq checkpoint format for engines without low-rank support.

    from lora.io.folded import export_folded
    report = export_folded(model, "ckpt_folded/", forward_loop=loop)   # collective; folds model in place

For every adapter (:class:`~lora.adapters.layers.LoraLinear`, or the expert linears of a
:class:`~lora.adapters.layers.LoraExperts`) over an :class:`~lora.base.SVDQBase`, the residual becomes
``Q_w(Q_w(R) + scaling·B·A'·diag(s))`` and the adapter is removed
(:func:`lora.modelopt_quant.fold_adapters`); :func:`lora.io.svdq_export.export_quantized` then writes the bare
bases with ``rank: 0`` and no ``lora_*`` tensors (:func:`lora.io.svdq_export.load_quantized` rebuilds them).
The returned (and, with ``verbose``, printed on rank 0) report is ``fold_adapters``'s: per linear
``weight_err``, ``delta_rel`` and, with ``forward_loop``, ``act_weight_err``, ``output_err`` and
``tokens`` — the error the fold adds (see :mod:`lora.modelopt_quant`).

The fold happens **in place** (the model keeps no adapters afterwards): export the adapted model first
with ``export_quantized`` if you need it too. For plain torch models (:class:`svdq.SVDQLinear`) use
:func:`lora.io.folded_hf.export_folded_hf`, which writes modelopt's HF NVFP4 layout instead.
"""

from __future__ import annotations

import os
from fnmatch import fnmatch

import torch.distributed as dist
from torch import nn

from lora.adapters.layers import ExpertLoraLinear, LoraLinear
from lora.base import SVDQBase
from lora.fold import format_report
from lora.io.svdq_export import export_quantized
from lora.model import adapter_modules
from lora.modelopt_quant import fold_adapters


def _check_svdq_bases(chosen: dict[str, nn.Module]) -> None:
    """``ValueError`` naming the adapter unless every base it would fold into is an ``SVDQBase``."""
    for name, m in chosen.items():
        if isinstance(m, LoraLinear):
            bases = [(name, m.base)]
        else:
            bases = [
                (f"{name}.experts.{w.global_index}.linear_{w.proj}", w.base)
                for w in m.expert_wrappers()
                if isinstance(w, ExpertLoraLinear)
            ]
        for who, base in bases:
            if not isinstance(base, SVDQBase):
                raise ValueError(
                    f"{who}: the adapter's base is {type(base).__name__}, not an SVDQuant base; "
                    "export_folded folds into SVDQuant residuals only (quantize with calib.calibrate first)"
                )


def export_folded(
    model: nn.Module,
    out_dir: str | os.PathLike,
    pattern: str = "*",
    *,
    forward_loop=None,
    max_tokens: int = 4096,
    metadata: dict | None = None,
    overwrite: bool = False,
    verbose: bool = True,
    progress: bool = False,
) -> dict[str, dict]:
    """Fold the adapters matching ``pattern`` into their SVDQuant bases (in place) and export the model
    with :func:`lora.io.svdq_export.export_quantized`; returns the fold report ``{linear: errors}``.

    ``forward_loop``: run once before folding to capture each linear's inputs for the input-based errors
    (tensor-parallel size 1 only). Collective under tensor / expert parallelism, like the export.
    Every adapter's bases are checked before anything changes (``ValueError`` naming the adapter for a
    base that is not an ``SVDQBase``); parallel expert adapters cannot be folded (``TypeError``).
    """
    chosen = {n: m for n, m in adapter_modules(model).items() if fnmatch(n, pattern)}
    if not chosen:
        raise ValueError(f"no adapter matches {pattern!r}")
    _check_svdq_bases(chosen)
    report = fold_adapters(model, pattern, forward_loop=forward_loop, max_tokens=max_tokens)
    export_quantized(model, out_dir, metadata=metadata, overwrite=overwrite, progress=progress)
    if verbose and (not dist.is_initialized() or dist.get_rank() == 0):
        print(f"svdq folded export to {out_dir}; error added by the fold:")
        print(format_report(report))
    return report
