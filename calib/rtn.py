"""Round-to-nearest (RTN) quantization of a Megatron model's adapter targets: the QLoRA-style baseline.

Every adapted linear of ``model`` gets a frozen base ``Q_a(x) · Q_w(W)ᵀ`` (no smoothing, ``s = 1``, no
low-rank branch in the base) — the same :class:`lora.base.SVDQBase` as an SVDQuant layer, with the
residual replaced by the whole weight — and plain LoRA adapters (``lora_down`` kaiming-uniform,
``lora_up = 0``), so the model starts exactly at its RTN-quantized output. :func:`rtn_baseline` copies
the adapter structure (targets, expert layouts, ranks) of an SVDQuant-calibrated model, so the baseline
trains the same number of adapter parameters.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from lora.adapters.layers import ExpertLoraLinear, LoraLinear
from lora.base import SVDQBase
from lora.framework.te import tp_group_of
from lora.framework.tp import group_rank_size
from lora.model import adapter_modules, add_adapters, freeze_base
from svdq.formats import quantize_tensor


def rtn_baseline(
    model: nn.Module,
    reference: nn.Module,
    weight_format: str,
    act_format: str,
    *,
    storage: str = "packed",
    seed: int = 0,
) -> list[str]:
    """Give ``model`` the adapters of ``reference`` (LoRA init) over RTN-quantized frozen bases.

    ``model`` must be built like ``reference`` was before calibration, without adapters, on one process
    (tensor and expert parallel size 1). Returns the adapter names.
    """
    configs = {name: m.lora_config for name, m in adapter_modules(reference).items()}
    if not configs:
        raise ValueError("the reference model has no adapters to copy")
    if adapter_modules(model):
        raise ValueError("the model already has adapters")
    for name, cfg in configs.items():
        add_adapters(model, dataclasses.replace(cfg, targets=(name,), init="kaiming"), seed=seed)
    for name, m in model.named_modules():
        if isinstance(m, LoraLinear | ExpertLoraLinear):
            inner = m.base
            if group_rank_size(tp_group_of(inner))[1] > 1:
                raise ValueError(f"{name}: RTN baseline needs tensor parallel size 1")
            w = inner.weight.detach()
            ones = torch.ones(w.shape[1], dtype=torch.float32, device=w.device)
            m.base = SVDQBase(inner, quantize_tensor(w, weight_format), ones, act_format, storage)
    freeze_base(model)
    return list(configs)
