"""The low-rank branches as a Hugging Face PEFT LoRA adapter (``adapter_model.safetensors`` +
``adapter_config.json``), for dense ``nn.Linear`` layers quantized to :class:`~svdq.layer.SVDQLinear`.

    from lora.io.peft import export_peft
    export_peft(qmodel, "adapter/")
    peft_model = peft.PeftModel.from_pretrained(base_model, "adapter/")

For each layer ``<m>`` with rank r > 0 the file holds ``base_model.model.<m>.lora_A.weight = A'`` (r × in,
our ``lora_down``, reading the raw input) and ``….lora_B.weight = B`` (out × r, ``lora_up``), and the
config sets ``lora_alpha = r`` so PEFT's scaling ``lora_alpha / r`` is 1 (layers of other ranks get
``rank_pattern`` / ``alpha_pattern`` entries). PEFT then computes, for a base linear of weight ``W_b``::

    y = x·W_bᵀ + b + (x·A'ᵀ)·Bᵀ

**What the adapter means.** It is the branch only: PEFT adds ``B·A'`` to whatever base you load it on.

* On the *original unquantized* model, ``W + B·A'`` counts the top-r part of ``W`` twice (the branch was
  cut out of ``W``): that is not a model of anything. It is meaningful as a *delta* — e.g. compare two
  exports (before / after fine-tuning) — or on the right base:
* on the *dequantized residual* ``W_b = Q_w(R)·diag(1/s)`` (:func:`residual_base_state_dict`, load it into
  the unquantized model first), PEFT reproduces the SVDQuant layer's weights exactly,
  ``W_b + B·A' = Q_w(R)·diag(1/s) + B·A'``, i.e. our layer without activation quantization.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor, nn

from lora.io.atomic import atomic_output_dir
from lora.io.torch_common import qualified, svdq_layers, write_json
from svdq.formats import dequantize

PEFT_PREFIX = "base_model.model"


def _targets(model: nn.Module, module_prefix: str) -> dict[str, nn.Module]:
    """``{module name as PEFT sees it: layer}`` for the layers with a branch."""
    out = {qualified(module_prefix, name, ""): m for name, m in svdq_layers(model).items() if m.rank > 0}
    if not out:
        raise ValueError("every SVDQLinear layer has rank 0 (no branch): there is no adapter to export")
    return out


def peft_adapter_config(
    ranks: dict[str, int], base_model_name_or_path: str | None = None, task_type: str | None = None
) -> dict:
    """``adapter_config.json`` for ``{target module: rank}``: LoRA with scaling 1 on every target."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {name: k for name, k in ranks.items() if k != r}
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": r,
        "target_modules": sorted(ranks),
        "exclude_modules": None,
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": dict(pattern),
        "alpha_pattern": dict(pattern),
    }


def export_peft(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    module_prefix: str = "",
    base_model_prefix: str = PEFT_PREFIX,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> dict:
    """Write the branches of ``model``'s SVDQuant layers as a PEFT LoRA adapter; returns its config.

    ``module_prefix``: where ``model`` sits inside the model PEFT will wrap (``"model"`` when ``model`` is
    ``hf_model.model``); target names are ``<module_prefix>.<layer>``. ``base_model_prefix``: PEFT's own
    key prefix (``base_model.model`` for ``PeftModel``). ``dtype``: of the saved factors (default: each
    layer's). Layers of rank 0 are skipped. Written atomically (nothing at ``out_dir`` on error).
    """
    from safetensors.torch import save_file

    targets = _targets(model, module_prefix)
    tensors: dict[str, Tensor] = {}
    for name, m in targets.items():
        dt = dtype or m.lora_down.dtype
        key = qualified(base_model_prefix, name, "")
        tensors[f"{key}.lora_A.weight"] = m.lora_down.detach().to(dt).cpu().contiguous().clone()
        tensors[f"{key}.lora_B.weight"] = m.lora_up.detach().to(dt).cpu().contiguous().clone()
    config = peft_adapter_config({n: m.rank for n, m in targets.items()}, base_model_name_or_path, task_type)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        save_file(tensors, str(Path(tmp) / "adapter_model.safetensors"), metadata={"format": "pt"})
        write_json(Path(tmp) / "adapter_config.json", config)
    return config


def residual_base_state_dict(
    model: nn.Module, module_prefix: str = "", dtype: torch.dtype | None = None
) -> dict[str, Tensor]:
    """``{<module_prefix>.<layer>.weight: Q_w(R)·diag(1/s)}`` (out × in, computed in float64, cast to
    ``dtype`` or the layer's) plus ``….bias`` where the layer has one: load it into the unquantized model
    (``load_state_dict(..., strict=False)``) so that the :func:`export_peft` adapter on top reproduces the
    SVDQuant layers' weights (see the module docstring). Works in both storage modes."""
    out = {}
    for name, m in svdq_layers(model).items():
        dt = dtype or m.lora_down.dtype
        if m.storage == "packed":
            q = dequantize(m.packed_residual(), torch.float32)
        else:
            q = m.residual_weight(torch.float32)
        key = qualified(module_prefix, name, "")
        out[qualified("", key, "weight")] = (q.double() / m.smooth.double()).to(dt).cpu()
        if m.bias is not None:
            out[qualified("", key, "bias")] = m.bias.detach().to(dt).cpu().clone()
    return out
