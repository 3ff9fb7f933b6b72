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
Every other ``nn.Linear`` and ``nn.Embedding`` is written unquantized and excluded, and so are the MoE
routers (``mlp.gate``, ``shared_expert_gate``: found by modelopt's own rule), through modelopt's
``process_layer_quant_config`` (:mod:`lora.io.modelopt_hf_layout`, the one writer of this layout).

**Fused experts** (:class:`svdq.experts.SVDQExperts`) are written per expert and projection as modelopt
splits them (``<experts>.<e>.gate_proj / up_proj / down_proj``, :mod:`lora.io.modelopt_hf_experts`).
**Names**: a transformers model's in-memory names are mapped back to its checkpoint names with
modelopt's quant-aware reverse of the load-time conversion (``revert_weight_conversion_quant_aware``,
``build_reverse_name_mapper``), so the tensors are named as ``save_pretrained`` and modelopt's
``export_hf_checkpoint`` name them (Mixtral: ``block_sparse_moe.experts.<e>.w1 / w3 / w2``); tensors
sharing storage (tied embeddings) are written once, as modelopt does. ``config.json`` is the model's
``config.save_pretrained`` output plus ``quantization_config``; both configs carry an ``svdq`` entry
(export format, per layer / experts module the rank, layout and algorithm, ``metadata``).

``input_scale`` needs a static activation range: each layer's ``input_amax`` (``svdq.quantize(...,
act_range="static")``); for layers without one, pass ``forward_loop`` to measure ``max|x/s|`` over it (the
exported layer then quantizes activations with that fixed range, unlike the dynamic-range layer), else
:func:`export_modelopt_hf` raises naming the layers.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter

from torch import Tensor, nn

from lora.io.modelopt_hf_experts import (
    check_experts,
    experts_layout_tensors,
    experts_meta,
    experts_static_ranges,
    quantized_layer_names,
    svdq_experts,
)
from lora.io.modelopt_hf_layout import (
    FACTOR_KEYS,
    NVFP4_GROUP,
    build_hf_quant_config,
    hf_quantization_config,
    nvfp4_algo,
    nvfp4_linear_tensors,
    producer,
    write_modelopt_hf,
)
from lora.io.torch_common import ForwardLoop, require_packed
from svdq.layer import SVDQLinear
from svdq.stats import record_input_amax

__all__ = [
    "FACTOR_KEYS",
    "build_hf_quant_config",
    "check_nvfp4_w4a4",
    "export_modelopt_hf",
    "hf_checkpoint_names",
    "hf_quantization_config",
    "layer_quant_algo",
    "layer_quant_config",
    "modelopt_layer_tensors",
]


def layer_quant_algo(layer: SVDQLinear) -> str:
    """``"NVFP4_SVD"`` (rank > 0), ``"NVFP4_AWQ"`` (rank 0, smoothing) or ``"NVFP4"`` (rank 0, s = 1)."""
    return nvfp4_algo(layer.rank, layer.smooth)


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
    packed = layer.packed_residual()
    tensors, _ = nvfp4_linear_tensors(
        name,
        packed.qdata,
        packed.scale,
        packed.global_scale,
        input_amax,
        smooth=layer.smooth,
        lora_down=layer.lora_down if layer.rank > 0 else None,
        lora_up=layer.lora_up if layer.rank > 0 else None,
        bias=layer.bias,
        dtype=layer.lora_down.dtype,
        factor_keys=factor_keys,
    )
    return tensors


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


def _model_config(model: nn.Module, config: dict | None) -> dict:
    """``config``, else what ``model.config.save_pretrained`` writes (a transformers model), else
    ``model.config.to_dict()``, else ``{}``."""
    if config is not None:
        return dict(config)
    hf = getattr(model, "config", None)
    if hasattr(hf, "to_json_string"):
        import json

        return json.loads(hf.to_json_string(use_diff=True))
    return dict(hf.to_dict()) if hasattr(hf, "to_dict") else {}


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _other_tensors(model: nn.Module, quantized: list[str]) -> dict[str, Tensor]:
    """The model's state dict without the quantized modules' entries (copied to the CPU); a tensor sharing
    storage with an earlier one (a tied weight) is written once, under its first name (as modelopt and
    ``save_pretrained`` do)."""
    if "" in quantized:
        return {}
    out, seen = {}, set()
    for k, v in model.state_dict().items():
        if _under(k, quantized):
            continue
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.numel() else None
        if ptr is not None and ptr in seen:
            continue
        seen.add(ptr)
        out[k] = v.detach().cpu().contiguous().clone()
    return out


def excluded_modules(model: nn.Module) -> list[str]:
    """The modules modelopt lists as unquantized: every plain ``nn.Linear`` / ``nn.Embedding`` and the MoE
    routers by modelopt's own rule (``_get_unquantized_moe_router_names``: ``gate`` / ``router`` /
    ``shared_expert_gate`` with a weight, of a module with ``experts``)."""
    from modelopt.torch.export.quant_utils import _get_unquantized_moe_router_names

    names = [n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Embedding)]
    names += [n for n in _get_unquantized_moe_router_names(model) if n not in names]
    return names


def hf_checkpoint_names(
    model: nn.Module, tensors: dict[str, Tensor], algos: dict[str, str], excluded: list[str]
) -> tuple[dict[str, Tensor], dict[str, str], list[str]]:
    """Map the in-memory names of a transformers model to its checkpoint names, with modelopt's
    quant-aware reverse of the load-time conversion (what its ``export_hf_checkpoint`` does; experts must
    already be per expert). Other models, or a conversion modelopt cannot reverse (warned, as modelopt
    warns), keep their names."""
    if not hasattr(getattr(model, "config", None), "model_type"):
        return tensors, algos, excluded
    from modelopt.torch.export.quant_aware_conversion import (
        build_reverse_name_mapper,
        revert_weight_conversion_quant_aware,
    )

    try:
        mapper = build_reverse_name_mapper(model)
        renamed = revert_weight_conversion_quant_aware(model, tensors)
    except Exception as exc:  # modelopt's QuantConversionUnsupportedError, or transformers API drift
        warnings.warn(
            f"reverse weight conversion skipped ({exc}); tensor names stay the in-memory ones", stacklevel=2
        )
        return tensors, algos, excluded
    if mapper is None:
        return renamed, algos, excluded
    return renamed, {mapper(k): v for k, v in algos.items()}, [mapper(n) for n in excluded]


def export_modelopt_hf(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    forward_loop: ForwardLoop | None = None,
    config: dict | None = None,
    factor_keys: str = "quantizer",
    metadata: dict | None = None,
    overwrite: bool = False,
) -> dict:
    """Write ``model`` in modelopt's HF layout to ``out_dir``; returns the ``hf_quant_config`` dict.

    Files: ``model.safetensors`` (the SVDQuant layers and experts as in the module docstring, every other
    state-dict entry unchanged), ``hf_quant_config.json`` and ``config.json`` (``config``, or the model's
    own config, plus ``quantization_config`` in modelopt's converted form and the ``svdq`` entry with
    ``metadata`` as its ``user`` field). Written to a temporary directory and renamed into place: on any
    error nothing is left at ``out_dir``.

    Raises ``ValueError`` naming the layer for a layer or experts module that is not NVFP4 W4A4 in packed
    storage (or experts of a handler other than ``concat-glu``), and naming the layers without a static
    activation range when ``forward_loop`` is not given (module docstring).
    """
    return write_torch_modelopt_hf(
        model,
        out_dir,
        forward_loop=forward_loop,
        config=config,
        factor_keys=factor_keys,
        metadata=metadata,
        overwrite=overwrite,
    )


def write_torch_modelopt_hf(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    forward_loop: ForwardLoop | None = None,
    config: dict | None = None,
    factor_keys: str = "quantizer",
    metadata: dict | None = None,
    overwrite: bool = False,
    export_format: str = "modelopt-hf",
    extra_meta: dict | None = None,
) -> dict:
    """:func:`export_modelopt_hf` with the ``svdq`` entry's ``export_format`` and extra fields (the folded
    export's fold report summary)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SVDQLinear)}
    experts = svdq_experts(model)
    if not layers and not experts:
        raise ValueError(
            "the model has no svdq.SVDQLinear layers or svdq.experts.SVDQExperts (quantize it with "
            "svdq.quantize first)"
        )
    if factor_keys not in FACTOR_KEYS:
        raise ValueError(f"factor_keys must be one of {sorted(FACTOR_KEYS)}, got {factor_keys!r}")
    for name, layer in layers.items():
        check_nvfp4_w4a4(name, layer)
    for name, layer in experts.items():
        check_experts(name, layer)
    ranges = _static_ranges(model, layers, forward_loop) if layers else {}
    exp_ranges, filled = experts_static_ranges(model, experts, forward_loop)
    tensors = _other_tensors(model, [*layers, *experts])
    algos: dict[str, str] = {}
    for name, layer in layers.items():
        tensors.update(modelopt_layer_tensors(name, layer, ranges[name], factor_keys))
        algos[name] = layer_quant_algo(layer)
    for name, layer in experts.items():
        t, per_linear = experts_layout_tensors(name, layer, exp_ranges[name], factor_keys)
        tensors.update(t)
        algos.update(quantized_layer_names(name, per_linear))
    excluded = excluded_modules(model)
    ranks = Counter(m.rank for m in layers.values() if m.rank > 0)
    ranks.update(p.rank for m in experts.values() for p in m.projections().values() if p.rank > 0)
    lora_rank = next(iter(ranks)) if factor_keys == "module" and len(ranks) == 1 else None
    svdq_meta = {
        "producer": producer(),
        "export_format": export_format,
        "layers": {n: {"quant_algo": algos[n], "rank": m.rank} for n, m in layers.items()},
        "experts": {n: experts_meta(m, filled.get(n)) for n, m in experts.items()},
        "user": metadata or {},
    }
    svdq_meta.update(extra_meta or {})
    tensors, algos, excluded = hf_checkpoint_names(model, tensors, algos, excluded)
    return write_modelopt_hf(
        out_dir,
        tensors,
        algos,
        excluded,
        _model_config(model, config),
        svdq=svdq_meta,
        lora_rank=lora_rank,
        overwrite=overwrite,
    )
