"""nvidia-modelopt's Hugging Face ("unified") checkpoint layout for NVFP4 SVDQuant layers.

    from lora.io.modelopt_hf import export_modelopt_hf
    hf_quant_config = export_modelopt_hf(model, "out/")
    # out/: model.safetensors, hf_quant_config.json, config.json

Tensors of one :class:`~svdq.layer.SVDQLinear` ``<m>`` (``y = Q_a(x/s)·Q_w(R)ᵀ + (x·A'ᵀ)·Bᵀ + bias``), as
modelopt 0.47's ``export_hf_checkpoint`` writes them for a ``NVFP4_SVDQUANT_DEFAULT_CFG`` model::

    <m>.weight            uint8          (out, in/2)   E2M1 codes of Q_w(R), element 2j in the low nibble
    <m>.weight_scale      float8_e4m3fn  (out, in/16)  block scales
    <m>.weight_scale_2    float32        ()            g_w = amax(R) / (6·448)
    <m>.input_scale       float32        ()            g_a = input_amax / (6·448), input_amax = max|x/s|
    <m>.pre_quant_scale   layer dtype    (in,)         p = 1/s
    <m>.weight_quantizer._svdquant_lora_a   layer dtype  (r, in)    A = A'·diag(1/p) ≈ A'·diag(s)
    <m>.weight_quantizer._svdquant_lora_b   layer dtype  (out, r)   B
    <m>.bias              layer dtype    (out,)        if the layer has one

modelopt's ``SVDQuantLinear.forward`` reads them as ``x̃ = x·p``, ``y = Q_a(x̃)·Ŵᵀ + bias + (x̃·Aᵀ)·Bᵀ`` with
``Ŵ = e2m1(weight)·weight_scale·weight_scale_2`` and ``Q_a`` NVFP4 with the static global scale
``input_scale`` and per-call E4M3 block scales ``e4m3(amax_16 / (6·input_scale))``. So its ``lora_a`` reads
the *smoothed* input (after ``pre_quant_scale``), where our ``lora_down`` ``A'`` reads the raw input; the
export converts. ``factor_keys="module"`` writes the factors as ``<m>.svdquant_lora_a`` /
``<m>.svdquant_lora_b`` instead (the keys of modelopt's diffusers export path, which also records
``lora_rank`` in the config).

Per layer, the ``quant_algo`` is the one modelopt's ``get_quantization_format`` gives such a layer:
``NVFP4_SVD`` with a branch (rank > 0); for a branch-less layer (rank 0, e.g. after
:func:`lora.io.folded_hf.fold_branches`) ``NVFP4_AWQ`` (NVFP4 with ``pre_quant_scale``) or, when the smoothing
is all ones, ``NVFP4`` without ``pre_quant_scale`` (the layout vLLM / SGLang / TensorRT-LLM read for plain
NVFP4). Layers of different algorithms give ``MIXED_PRECISION`` with ``quantized_layers``, as in modelopt.
Every other ``nn.Linear`` and ``nn.Embedding`` is written unquantized and listed (by exact name, where
modelopt may summarize with prefix wildcards) in ``exclude_modules``.

``input_scale`` needs a static activation range: each layer's ``input_amax`` (``svdq.quantize(...,
act_range="static")``); for layers without one, pass ``forward_loop`` to measure ``max|x/s|`` over it (the
exported layer then quantizes activations with that fixed range, unlike the dynamic-range layer), else
:func:`export_modelopt_hf` raises naming the layers.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor, nn

from lora.io.atomic import atomic_output_dir
from lora.io.torch_common import (
    ForwardLoop,
    qualified,
    require_packed,
    svdq_layers,
    write_json,
)
from svdq.layer import SVDQLinear
from svdq.stats import record_input_amax

E2M1_MAX, E4M3_MAX = 6.0, 448.0
NVFP4_GROUP = 16
FACTOR_KEYS = {
    "quantizer": ("weight_quantizer._svdquant_lora_a", "weight_quantizer._svdquant_lora_b"),
    "module": ("svdquant_lora_a", "svdquant_lora_b"),
}


def _producer() -> dict:
    try:
        from importlib.metadata import version

        return {"name": "svdq", "version": version("svdq")}
    except Exception:  # not installed as a distribution (a source checkout)
        return {"name": "svdq", "version": "unknown"}


def layer_quant_algo(layer: SVDQLinear) -> str:
    """``"NVFP4_SVD"`` (rank > 0), ``"NVFP4_AWQ"`` (rank 0, smoothing) or ``"NVFP4"`` (rank 0, s = 1)."""
    if layer.rank > 0:
        return "NVFP4_SVD"
    return "NVFP4" if bool((layer.smooth == 1).all()) else "NVFP4_AWQ"


def layer_quant_config(algo: str) -> dict:
    """modelopt's per-layer entry (``process_layer_quant_config``) for ``algo``."""
    if algo == "NVFP4":
        return {"quant_algo": "NVFP4", "group_size": NVFP4_GROUP}
    return {"quant_algo": algo, "group_size": NVFP4_GROUP, "has_zero_point": False, "pre_quant_scale": True}


def check_nvfp4_w4a4(name: str, layer: SVDQLinear) -> None:
    """``ValueError`` naming the layer unless it has NVFP4 weights and activations in packed storage."""
    if layer.weight_format.name != "nvfp4" or layer.act_format.name != "nvfp4":
        raise ValueError(
            f"{name or '<model>'}: modelopt's NVFP4 layouts need nvfp4 weights and activations (W4A4); "
            f"this layer has weight={layer.weight_format}, act={layer.act_format}"
        )
    require_packed(name, layer)


def modelopt_layer_tensors(
    name: str, layer: SVDQLinear, input_amax: Tensor | float, factor_keys: str = "quantizer"
) -> dict[str, Tensor]:
    """The exported tensors of one layer (see the module docstring), on the CPU, keyed ``<name>.<leaf>``."""
    check_nvfp4_w4a4(name, layer)
    if factor_keys not in FACTOR_KEYS:
        raise ValueError(f"factor_keys must be one of {sorted(FACTOR_KEYS)}, got {factor_keys!r}")
    amax = torch.as_tensor(input_amax).detach().float().reshape(())
    if not bool(torch.isfinite(amax)) or not float(amax) > 0:
        raise ValueError(f"{name or '<model>'}: input_amax must be finite and > 0, got {float(amax)}")
    dtype = layer.lora_down.dtype
    packed = layer.packed_residual()
    out = {
        "weight": packed.qdata,
        "weight_scale": packed.scale,
        "weight_scale_2": packed.global_scale.float().reshape(()),
        "input_scale": amax / (E2M1_MAX * E4M3_MAX),  # modelopt: amax.float() / (maxbound * E4M3_MAX)
    }
    algo = layer_quant_algo(layer)
    if algo != "NVFP4":
        p = torch.reciprocal(layer.smooth.detach().double()).to(dtype)
        out["pre_quant_scale"] = p
        if layer.rank > 0:
            key_a, key_b = FACTOR_KEYS[factor_keys]
            out[key_a] = (layer.lora_down.detach().double() / p.double()).to(dtype)
            out[key_b] = layer.lora_up.detach().to(dtype)
    if layer.bias is not None:
        out["bias"] = layer.bias.detach().to(dtype)
    return {qualified("", name, k): v.detach().cpu().contiguous() for k, v in out.items()}


def _static_ranges(model: nn.Module, layers: dict[str, SVDQLinear], forward_loop: ForwardLoop | None):
    ranges = {name: getattr(m, "input_amax", None) for name, m in layers.items()}
    missing = [name for name, a in ranges.items() if a is None]
    if missing and forward_loop is not None:
        measured = record_input_amax(model, {n: layers[n] for n in missing}, forward_loop)
        ranges.update({n: a for n, a in measured.items() if a is not None and float(a) > 0})
        missing = [name for name, a in ranges.items() if a is None]
    if missing:
        how = (
            "they received no non-zero input in forward_loop"
            if forward_loop is not None
            else "calibrate with static activation ranges (svdq.quantize(..., act_range='static')) or pass "
            "forward_loop= to measure max|x/s| here"
        )
        raise ValueError(
            f"layers {missing} have no static activation range (input_amax), which modelopt's input_scale "
            f"needs; {how}"
        )
    return ranges


def build_hf_quant_config(algos: dict[str, str], excluded: list[str], lora_rank: int | None = None) -> dict:
    """``hf_quant_config.json`` as modelopt's ``get_quant_config`` builds it for these layers."""
    configs = {name: layer_quant_config(a) for name, a in algos.items()}
    quantization: dict = {"quant_algo": None, "kv_cache_quant_algo": None}
    if len({a for a in algos.values()}) > 1:
        quantization.update({"quant_algo": "MIXED_PRECISION", "quantized_layers": configs})
    else:
        quantization.update(next(iter(configs.values())))
        if lora_rank is not None and quantization["quant_algo"] == "NVFP4_SVD":
            quantization["lora_rank"] = lora_rank
        quantization["exclude_modules"] = sorted(excluded)
    return {"producer": _producer(), "quantization": quantization}


def _group_config(layer_cfg: dict) -> dict:
    """modelopt's ``_quant_algo_to_group_config`` for the algorithms written here."""
    gs = layer_cfg.get("group_size")
    fp4 = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": gs or 16}
    algo = layer_cfg["quant_algo"]
    if algo == "NVFP4":
        return {"input_activations": dict(fp4), "weights": dict(fp4)}
    if algo == "NVFP4_SVD":
        return {
            "input_activations": dict(fp4),
            "weights": dict(fp4),
            "has_zero_point": False,
            "pre_quant_scale": True,
        }
    # NVFP4_AWQ: modelopt 0.47 describes it like W4A8_AWQ (8-bit float activations, group 128 by default)
    gs = gs or 128
    return {
        "input_activations": {"dynamic": False, "num_bits": 8, "type": "float", "group_size": gs},
        "weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": gs},
    }


def hf_quantization_config(hf_quant_config: dict) -> dict:
    """``config.json``'s ``quantization_config`` (modelopt's ``convert_hf_quant_config_format``)."""
    q = hf_quant_config["quantization"]
    algo = q["quant_algo"]
    new: dict = {}
    if algo in ("NVFP4", "NVFP4_SVD"):
        group = {**_group_config(q), "targets": ["Linear"]}
        if algo == "NVFP4_SVD" and q.get("lora_rank") is not None:
            group["lora_rank"] = q["lora_rank"]
        new["config_groups"] = {"group_0": group}
    elif algo == "MIXED_PRECISION":
        by_cfg: dict[tuple, list[str]] = {}
        for name, cfg in q["quantized_layers"].items():
            by_cfg.setdefault(tuple(sorted(cfg.items())), []).append(name)
        new["config_groups"] = {
            f"group_{i}": {**_group_config(dict(key)), "targets": sorted(names)}
            for i, (key, names) in enumerate(by_cfg.items())
        }
        new["quantized_layers"] = q["quantized_layers"]
    new["ignore"] = q.get("exclude_modules") or []
    new["quant_algo"] = algo
    if hf_quant_config.get("producer"):
        new["producer"] = hf_quant_config["producer"]
    new["quant_method"] = "modelopt"
    return new


def _model_config(model: nn.Module, config: dict | None) -> dict:
    if config is not None:
        return dict(config)
    hf = getattr(model, "config", None)
    return dict(hf.to_dict()) if hasattr(hf, "to_dict") else {}


def _other_tensors(model: nn.Module, layer_names: list[str]) -> dict[str, Tensor]:
    """The model's state dict without the SVDQuant layers' own entries (copied to the CPU)."""
    prefixes = tuple(f"{n}." for n in layer_names if n)
    if "" in layer_names:
        return {}
    return {
        k: v.detach().cpu().contiguous().clone()
        for k, v in model.state_dict().items()
        if not k.startswith(prefixes)
    }


def export_modelopt_hf(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    forward_loop: ForwardLoop | None = None,
    config: dict | None = None,
    factor_keys: str = "quantizer",
    overwrite: bool = False,
) -> dict:
    """Write ``model`` in modelopt's HF layout to ``out_dir``; returns the ``hf_quant_config`` dict.

    Files: ``model.safetensors`` (the SVDQuant layers as in the module docstring, every other state-dict
    entry unchanged), ``hf_quant_config.json`` and ``config.json`` (``config``, or the model's own
    ``model.config.to_dict()`` if it has one, plus ``quantization_config`` in modelopt's converted form).
    Written to a temporary directory and renamed into place: on any error nothing is left at ``out_dir``.

    Raises ``ValueError`` naming the layer for a layer that is not NVFP4 W4A4 in packed storage, and naming
    the layers without a static activation range when ``forward_loop`` is not given (module docstring).
    """
    from safetensors.torch import save_file

    layers = svdq_layers(model)
    for name, layer in layers.items():
        check_nvfp4_w4a4(name, layer)
    ranges = _static_ranges(model, layers, forward_loop)
    tensors = _other_tensors(model, list(layers))
    for name, layer in layers.items():
        tensors.update(modelopt_layer_tensors(name, layer, ranges[name], factor_keys))
    algos = {name: layer_quant_algo(m) for name, m in layers.items()}
    excluded = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    ranks = Counter(m.rank for m in layers.values() if m.rank > 0)
    lora_rank = None
    if factor_keys == "module" and len(ranks) == 1:
        lora_rank = next(iter(ranks))
    hf_quant_config = build_hf_quant_config(algos, excluded, lora_rank)
    model_config = _model_config(model, config)
    model_config["quantization_config"] = hf_quantization_config(hf_quant_config)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        save_file(tensors, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
        write_json(Path(tmp) / "hf_quant_config.json", hf_quant_config)
        write_json(Path(tmp) / "config.json", model_config)
    return hf_quant_config
