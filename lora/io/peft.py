"""The low-rank branches as a Hugging Face PEFT LoRA adapter (``adapter_model.safetensors`` +
``adapter_config.json``) together with the base it applies to (``base/``), for layers quantized to
:class:`~svdq.layer.SVDQLinear` and fused Hugging Face experts (:class:`~svdq.experts.SVDQExperts`).

    from lora.io.peft import export_peft
    export_peft(qmodel, "out/")                              # out/ = adapter, out/base/ = residual base
    base = AutoModelForCausalLM.from_pretrained("out/base")  # transformers models (plain torch: safetensors)
    peft_model = peft.PeftModel.from_pretrained(base, "out/")

**Layout** (one directory, written atomically): the adapter files at its top (so existing readers of the
adapter-only export keep working), ``base/`` the dequantized residual base ``W_b = Q_w(R)·diag(1/s)`` of every
quantized linear / expert with every other tensor as in the model — for a transformers model written by its
own ``save_pretrained`` (``config.json``, fused experts saved per expert as transformers does), for a plain
torch model one ``model.safetensors`` of its ``state_dict`` names — and ``svdq_export.json`` (svdq metadata:
source, formats, ranks, layouts). ``base=False`` writes the adapter only.

**Fused experts** use PEFT's ``target_parameters`` (``ParamWrapper``, peft ≥ 0.17): for a 3-D parameter
``(E, out, in)`` PEFT keeps one LoRA pair per expert, ``lora_A.weight (E·r, in)`` (row ``e·r + j`` = row
``j`` of ``A_e``) and ``lora_B.weight (out, r·E)`` (column ``j·E + e`` = column ``j`` of ``B_e``); a shared
factor (``shared-down`` / ``shared-up``) is written once per expert. The adapter of a transformers model is
then built and saved by PEFT itself (``get_peft_model`` on the written base, the factors copied in,
``save_pretrained``), so its key names (nested ``base_layer`` wrappers) are PEFT's.

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

import copy
import json
import os
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor, nn

from lora.io.atomic import atomic_output_dir
from lora.io.torch_common import qualified, svdq_layers, write_json
from svdq.experts import SVDQExperts
from svdq.formats import dequantize
from svdq.layer import SVDQLinear

PEFT_PREFIX = "base_model.model"
BASE_DIR = "base"
METADATA_FILE = "svdq_export.json"
_FUSED_PARAMS = {"concat-glu": ("gate_up_proj", "down_proj")}  # handler -> (fc1, fc2) parameter names


def _targets(model: nn.Module, module_prefix: str) -> dict[str, nn.Module]:
    """``{module name as PEFT sees it: layer}`` for the layers with a branch."""
    out = {qualified(module_prefix, name, ""): m for name, m in svdq_layers(model).items() if m.rank > 0}
    if not out:
        raise ValueError("every SVDQLinear layer has rank 0 (no branch): there is no adapter to export")
    return out


def _experts(model: nn.Module) -> dict[str, SVDQExperts]:
    out = {n: m for n, m in model.named_modules() if isinstance(m, SVDQExperts)}
    for name, m in out.items():
        if m.handler not in _FUSED_PARAMS:
            raise ValueError(
                f"experts {name}: handler {m.handler!r} ({m.source_class}); the PEFT export writes fused "
                f"experts of the handlers {sorted(_FUSED_PARAMS)} only"
            )
    return out


def _is_hf(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def _base_model_state(model: nn.Module, dtype: torch.dtype | None) -> dict[str, Tensor]:
    """The unquantized model's ``state_dict`` carrying the residual base: ``W_b`` of every
    :class:`SVDQLinear` (``<m>.weight``, ``<m>.bias``) and :class:`SVDQExperts` (the handler's fused
    parameters, ``(E, out, in)``), every other entry as it is."""
    from lora.io.fold_experts import residual_base

    layers = {n: m for n, m in model.named_modules() if isinstance(m, SVDQLinear)}
    experts = _experts(model)
    quantized = [*layers, *experts]
    sd = model.state_dict()
    out = {k: v for k, v in sd.items() if not any(k == q or k.startswith(q + ".") for q in quantized)}
    if layers:
        out.update(residual_base_state_dict(model, dtype=dtype))
    for name, m in experts.items():
        for p, param in zip(("fc1", "fc2"), _FUSED_PARAMS[m.handler]):
            proj = m.projections()[p]
            if proj.bias is not None:
                raise ValueError(f"experts {name}.{p}: biased experts are not written by the PEFT export")
            w_b = residual_base(proj)  # (E, out, in) float64
            out[f"{name}.{param}"] = w_b.to(dtype or proj.residual_dtype).cpu()
    return out


def _fresh_hf_model(model: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    """A new instance of ``model``'s transformers class and config (weights not initialized, buffers such as
    rotary tables computed) holding ``state`` (every tensor, checked by ``strict=True``)."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        fresh = type(model)(copy.deepcopy(model.config))
    fresh.load_state_dict(state, strict=True)
    return fresh.eval()


def _peft_lora_pair(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """PEFT's ``ParamWrapper`` weights for per-expert factors ``A (E, r, in)``, ``B (E, out, r)``:
    ``lora_A (E·r, in)``, ``lora_B (out, r·E)`` (module docstring)."""
    E, r, in_f = A.shape
    return A.reshape(E * r, in_f), B.permute(1, 2, 0).reshape(B.shape[1], r * E)


def _write_hf_adapter(
    base: nn.Module, model: nn.Module, out: Path, name_or_path: str | None, task_type: str | None, dtype
) -> dict:
    """Build the adapter with PEFT on ``base`` (a transformers model holding the residual base) and save it
    with PEFT's ``save_pretrained`` into ``out``; returns the adapter config dict."""
    import peft

    from lora.io.fold_experts import expert_factors

    dense = {n: m for n, m in model.named_modules() if isinstance(m, SVDQLinear) and m.rank > 0}
    experts = _experts(model)
    ranks: dict[str, int] = {n: m.rank for n, m in dense.items()}
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    for name, m in experts.items():
        for p, param in zip(("fc1", "fc2"), _FUSED_PARAMS[m.handler]):
            proj = m.projections()[p]
            if proj.rank > 0:
                ranks[f"{name}.{param}"] = proj.rank
                factors[f"{name}.{param}"] = _peft_lora_pair(*expert_factors(proj))
    if not ranks:
        raise ValueError("every quantized layer has rank 0 (no branch): there is no adapter to export")
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {n: k for n, k in ranks.items() if k != r}
    config = peft.LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=sorted(dense) or None,
        target_parameters=sorted(factors) or None,
        rank_pattern=dict(pattern),
        alpha_pattern=dict(pattern),
        lora_dropout=0.0,
        bias="none",
        task_type=task_type,
        base_model_name_or_path=name_or_path,
        inference_mode=True,
    )
    pm = peft.get_peft_model(base, config)
    wrapped = {n.removeprefix(f"{PEFT_PREFIX}."): mod for n, mod in pm.named_modules()}
    with torch.no_grad():
        for name, m in dense.items():
            layer = wrapped[name]
            dt = dtype or m.lora_down.dtype
            layer.lora_A["default"].weight.copy_(m.lora_down.detach().to(dt))
            layer.lora_B["default"].weight.copy_(m.lora_up.detach().to(dt))
        for key, (A, B) in factors.items():
            module_name, _, param = key.rpartition(".")
            wrapper = _param_wrapper(wrapped, module_name, param)
            wrapper.lora_A["default"].weight.copy_(A)
            wrapper.lora_B["default"].weight.copy_(B)
    pm.save_pretrained(str(out))
    cfg_file = Path(out) / "adapter_config.json"  # PEFT records the model's own name_or_path: ours instead
    cfg = json.loads(cfg_file.read_text())
    cfg["base_model_name_or_path"] = name_or_path
    write_json(cfg_file, cfg)
    return cfg


def _param_wrapper(wrapped: dict[str, nn.Module], module_name: str, param: str) -> nn.Module:
    """PEFT's ``ParamWrapper`` of ``module_name.param`` (wrappers nest through ``base_layer``)."""
    mod = wrapped[module_name]
    while mod is not None:
        if getattr(mod, "parameter_name", None) == param:
            return mod
        mod = getattr(mod, "base_layer", None)
    raise RuntimeError(f"peft did not wrap {module_name}.{param}")


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
    base: bool = True,
    metadata: dict | None = None,
    overwrite: bool = False,
) -> dict:
    """Write the branches of ``model``'s SVDQuant layers as a PEFT LoRA adapter at ``out_dir`` and, with
    ``base``, the residual base it applies to at ``out_dir/base`` (module docstring); returns the adapter
    config.

    ``module_prefix``: where ``model`` sits inside the model PEFT will wrap (``"model"`` when ``model`` is
    ``hf_model.model``); target names are ``<module_prefix>.<layer>`` (plain torch models).
    ``base_model_prefix``: PEFT's own key prefix (``base_model.model`` for ``PeftModel``). ``dtype``: of the
    saved factors and base (default: each layer's). Layers of rank 0 are skipped. ``metadata``: stored in
    ``svdq_export.json`` (``user``). Transformers models (fused experts included) are written through PEFT
    and ``save_pretrained`` (the base is always built for them); plain torch models have ``SVDQLinear``
    layers only. Written atomically (nothing at ``out_dir`` on error).
    """
    from safetensors.torch import save_file

    hf = _is_hf(model)
    experts = _experts(model)
    if experts and not hf:
        raise ValueError(
            f"experts {next(iter(experts))}: fused experts are exported as PEFT target_parameters of a "
            "transformers model; this model is not one"
        )
    if hf and module_prefix:
        raise ValueError("module_prefix applies to plain torch models; transformers models keep their names")
    if not hf:
        targets = _targets(model, module_prefix)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        tmp = Path(tmp)
        if hf:
            state = _base_model_state(model, dtype)
            fresh = _fresh_hf_model(model, state)
            fresh.save_pretrained(str(tmp / BASE_DIR))
            # the adapter is for the residual base written beside it, not for the original weights
            name_or_path = str((Path(out_dir) / BASE_DIR).resolve()) if base else base_model_name_or_path
            config = _write_hf_adapter(fresh, model, tmp, name_or_path, task_type, dtype)
            if not base:
                import shutil

                shutil.rmtree(tmp / BASE_DIR)
        else:
            tensors: dict[str, Tensor] = {}
            for name, m in targets.items():
                dt = dtype or m.lora_down.dtype
                key = qualified(base_model_prefix, name, "")
                tensors[f"{key}.lora_A.weight"] = m.lora_down.detach().to(dt).cpu().contiguous().clone()
                tensors[f"{key}.lora_B.weight"] = m.lora_up.detach().to(dt).cpu().contiguous().clone()
            ranks = {n: m.rank for n, m in targets.items()}
            config = peft_adapter_config(ranks, base_model_name_or_path, task_type)
            save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            write_json(tmp / "adapter_config.json", config)
            if base:
                (tmp / BASE_DIR).mkdir()
                state = {k: v.detach().cpu().contiguous() for k, v in _base_model_state(model, dtype).items()}
                save_file(state, str(tmp / BASE_DIR / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / METADATA_FILE, _metadata(model, base, metadata))
    return config


def _metadata(model: nn.Module, base: bool, user: dict | None) -> dict:
    from lora.io.container import tool_version

    layers = {
        n: {"rank": m.rank, "weight_format": str(m.weight_format), "act_format": str(m.act_format)}
        for n, m in model.named_modules()
        if isinstance(m, SVDQLinear)
    }
    experts = {
        n: {
            "handler": m.handler,
            "class": m.source_class,
            "projections": {
                p: {
                    "layout": proj.layout,
                    "rank": proj.rank,
                    "weight_format": str(proj.weight_format),
                    "act_format": str(proj.act_format),
                }
                for p, proj in m.projections().items()
            },
        }
        for n, m in _experts(model).items()
    }
    return {
        "tool": "svdq",
        "tool_version": tool_version(),
        "format": "peft",
        "base": f"{BASE_DIR}/ (residual base W_b = Q_w(R)·diag(1/s))" if base else None,
        "layers": layers,
        "experts": experts,
        "user": user or {},
    }


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
