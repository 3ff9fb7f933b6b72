"""The one writer of nvidia-modelopt's Hugging Face ("unified") checkpoint layout, from per-tensor pieces.

Every model kind goes through here (svdq/DESIGN.md §14): torch models with :class:`svdq.SVDQLinear` layers
and :class:`svdq.experts.SVDQExperts` (:mod:`lora.io.modelopt_hf`, :mod:`lora.io.modelopt_hf_experts`) and,
with a name map from ``calib.hf``, Megatron models imported from Hugging Face. A caller gives the pieces of
each NVFP4 linear (:func:`nvfp4_linear_tensors`), the per-layer algorithms, the excluded (16-bit) modules
and the model config; this module builds ``hf_quant_config.json`` and ``config.json``'s
``quantization_config`` with modelopt 0.47's own helpers (``process_layer_quant_config``,
``convert_hf_quant_config_format``) and writes the directory atomically (:mod:`lora.io.atomic`).

Tensors of one NVFP4 linear ``<m>`` (``out × in``, ``dtype`` the layer's 16/32-bit dtype)::

    <m>.weight            uint8          (out, in/2)   E2M1 codes, element 2j in the low nibble
    <m>.weight_scale      float8_e4m3fn  (out, in/16)  block scales
    <m>.weight_scale_2    float32        ()            per-tensor weight scale
    <m>.input_scale       float32        ()            input_amax / (6·448)
    <m>.pre_quant_scale   dtype          (in,)         1/s              (NVFP4_AWQ, NVFP4_SVD)
    <m>.weight_quantizer._svdquant_lora_a   dtype     (r, in)   A'·diag(s)  (NVFP4_SVD)
    <m>.weight_quantizer._svdquant_lora_b   dtype     (out, r)  B           (NVFP4_SVD)
    <m>.bias              dtype          (out,)        if any

A fused linear of another model (Megatron's ``linear_qkv`` ``[q; k; v]`` rows per query group, an expert's
``linear_fc1`` ``[gate; up]``) is written as its Hugging Face linears by :func:`split_rows`: the packed
residual's rows split exactly (block scales are per row), every part keeps the fused tensor's
``weight_scale_2`` (what vLLM needs for fused q / k / v and gate / up), and the parts reading the same
input share its ``smooth`` (``pre_quant_scale``), ``input_amax`` (``input_scale``) and ``lora_down``
(``lora_a``); ``lora_up`` (``lora_b``) and ``bias`` split by rows. :func:`linear_state_tensors` writes one
:class:`lora.io.naming.LinearState` (naming version "1", whole tensors).

The algorithm of a layer is the one modelopt's ``get_quantization_format`` gives it: ``NVFP4_SVD`` with a
branch, ``NVFP4_AWQ`` without a branch but with smoothing, ``NVFP4`` (no ``pre_quant_scale``: the layout
vLLM's modelopt loader reads) without either. Besides modelopt's files, ``hf_quant_config.json`` and
``config.json`` get an ``"svdq"`` entry (tool, export format, per layer / experts module the rank,
layout and algorithm, the caller's metadata); modelopt readers ignore it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from lora.io.atomic import atomic_output_dir
from lora.io.naming import LinearState
from lora.io.torch_common import write_json

E2M1_MAX, E4M3_MAX = 6.0, 448.0
NVFP4_GROUP = 16
FACTOR_KEYS = {
    "quantizer": ("weight_quantizer._svdquant_lora_a", "weight_quantizer._svdquant_lora_b"),
    "module": ("svdquant_lora_a", "svdquant_lora_b"),
}
# quant_algo (hf_quant_config.json) -> modelopt's quantization-format string (get_quantization_format)
MODELOPT_FORMATS = {"NVFP4": "nvfp4", "NVFP4_AWQ": "nvfp4_awq", "NVFP4_SVD": "nvfp4_svdquant"}
# the tensor leaves modelopt writes for a linear (suffixes after "<m>.")
LEAVES = ("weight", "weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale", "bias")


def producer() -> dict:
    try:
        from importlib.metadata import version

        return {"name": "svdq", "version": version("svdq")}
    except Exception:  # not installed as a distribution (a source checkout)
        return {"name": "svdq", "version": "unknown"}


def nvfp4_algo(rank: int, smooth: Tensor) -> str:
    """``"NVFP4_SVD"`` (rank > 0), ``"NVFP4_AWQ"`` (rank 0, smoothing) or ``"NVFP4"`` (rank 0, s = 1)."""
    if rank > 0:
        return "NVFP4_SVD"
    return "NVFP4" if bool((smooth == 1).all()) else "NVFP4_AWQ"


def input_scale(name: str, input_amax: Tensor | float) -> Tensor:
    """modelopt's ``input_scale = amax / (6·448)`` (float32 0-d); ``ValueError`` naming ``name`` unless the
    range is finite and > 0."""
    amax = torch.as_tensor(input_amax).detach().float().reshape(())
    if not bool(torch.isfinite(amax)) or not float(amax) > 0:
        raise ValueError(f"{name or '<model>'}: input_amax must be finite and > 0, got {float(amax)}")
    return amax / (E2M1_MAX * E4M3_MAX)  # modelopt: amax.float() / (maxbound * E4M3_MAX)


def nvfp4_linear_tensors(
    name: str,
    qdata: Tensor,
    scale: Tensor,
    global_scale: Tensor,
    input_amax: Tensor | float,
    *,
    smooth: Tensor,
    lora_down: Tensor | None,
    lora_up: Tensor | None,
    bias: Tensor | None,
    dtype: torch.dtype,
    factor_keys: str = "quantizer",
) -> tuple[dict[str, Tensor], str]:
    """``({<name>.<leaf>: tensor}, quant_algo)`` of one NVFP4 linear (module docstring) from its pieces:
    the packed residual ``qdata (out, in/2)`` / ``scale (out, in/16)`` / ``global_scale ()`` in smoothed
    coordinates, the static range ``input_amax`` of ``x/s``, ``smooth`` ``s (in,)``, the branch (``lora_down``
    ``A' (r, in)`` reading the raw input, ``lora_up`` ``B (out, r)``; ``None`` or rank 0: none) and ``bias``.
    Everything on the CPU, contiguous, owning its storage."""
    if factor_keys not in FACTOR_KEYS:
        raise ValueError(f"factor_keys must be one of {sorted(FACTOR_KEYS)}, got {factor_keys!r}")
    rank = 0 if lora_down is None else int(lora_down.shape[0])
    algo = nvfp4_algo(rank, smooth)
    out = {
        "weight": qdata,
        "weight_scale": scale,
        "weight_scale_2": global_scale.float().reshape(()),
        "input_scale": input_scale(name, input_amax),
    }
    if algo != "NVFP4":
        p = torch.reciprocal(smooth.detach().double()).to(dtype)  # (in,)
        out["pre_quant_scale"] = p
        if rank > 0:
            key_a, key_b = FACTOR_KEYS[factor_keys]
            out[key_a] = (lora_down.detach().double() / p.double()).to(dtype)  # (r, in): reads x·p
            out[key_b] = lora_up.detach().to(dtype)  # (out, r)
    if bias is not None:
        out["bias"] = bias.detach().to(dtype)
    return {_join(name, k): v.detach().cpu().contiguous().clone() for k, v in out.items()}, algo


def linear_state_tensors(
    name: str, state: LinearState, input_amax: Tensor | float | None = None, factor_keys: str = "quantizer"
) -> tuple[dict[str, Tensor], str]:
    """:func:`nvfp4_linear_tensors` of a whole NVFP4 linear ``state``; ``input_amax``: its static range
    (default ``state.input_amax``; ``ValueError`` naming ``name`` when it has none)."""
    residual = state.residual
    if residual.fmt.name != "nvfp4" or state.act_format.name != "nvfp4":
        raise ValueError(
            f"{name}: modelopt's NVFP4 layouts need nvfp4 weights and activations (W4A4); this layer has "
            f"weight={residual.fmt}, act={state.act_format}"
        )
    amax = state.input_amax if input_amax is None else input_amax
    if amax is None:
        raise ValueError(
            f"{name}: no static activation range (input_amax), which modelopt's input_scale needs; "
            "calibrate with act_range='static'"
        )
    return nvfp4_linear_tensors(
        name,
        residual.qdata,
        residual.scale,
        residual.global_scale,
        amax,
        smooth=state.smooth,
        lora_down=state.lora_down,
        lora_up=state.lora_up,
        bias=state.bias,
        dtype=state.dtype,
        factor_keys=factor_keys,
    )


def split_rows(state: LinearState, parts: Mapping[str, Tensor]) -> dict[str, LinearState]:
    """``{part: LinearState}`` of a fused linear split by output rows (module docstring); ``parts``: each
    part's row indices (int64, into the fused ``out`` rows), together a partition of them."""
    out_f, in_f = state.shape
    rows = torch.cat([torch.as_tensor(r, dtype=torch.long).reshape(-1) for r in parts.values()])
    if rows.numel() != out_f or not torch.equal(torch.sort(rows).values, torch.arange(out_f)):
        raise ValueError(f"the parts {list(parts)} do not partition the {out_f} rows of the fused linear")
    res = state.residual
    split = {}
    for part, idx in parts.items():
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1).to(res.qdata.device)
        residual = type(res)(
            res.fmt,
            (int(idx.numel()), in_f),
            res.dtype,
            res.qdata[idx].contiguous(),  # (rows, in/2)
            None if res.scale is None else res.scale[idx].contiguous(),  # (rows, in/16)
            res.global_scale,  # () the fused tensor's
        )
        split[part] = LinearState(
            residual,
            state.smooth,
            state.act_format,
            state.lora_down,
            None if state.lora_up is None else state.lora_up[idx],  # (rows, r)
            None if state.bias is None else state.bias[idx],  # (rows,)
            state.input_amax,
            state.dtype,
        )
    return split


def _join(name: str, leaf: str) -> str:
    return f"{name}.{leaf}" if name else leaf


def build_hf_quant_config(
    algos: Mapping[str, str], excluded: list[str], lora_rank: int | None = None
) -> dict:
    """``hf_quant_config.json`` for layers ``{name: quant_algo}`` and the 16-bit modules ``excluded``,
    by modelopt's ``process_layer_quant_config`` (its exclusion summary with prefix wildcards, its
    ``MIXED_PRECISION`` with ``quantized_layers`` for several algorithms). ``lora_rank``: recorded for a
    uniform ``NVFP4_SVD`` model (modelopt's diffusers export does so for ``factor_keys="module"``)."""
    from modelopt.torch.export.model_config import QUANTIZATION_NONE
    from modelopt.torch.export.quant_utils import process_layer_quant_config

    unknown = sorted({a for a in algos.values()} - set(MODELOPT_FORMATS))
    if unknown:
        raise ValueError(f"quant_algo {unknown} is not one of {sorted(MODELOPT_FORMATS)}")
    layer_cfg: dict = {}
    for name, algo in algos.items():
        layer_cfg[f"{name}.quantization"] = MODELOPT_FORMATS[algo]
        layer_cfg[f"{name}.awq_block_size"] = NVFP4_GROUP
    for name in excluded:
        if name not in algos:
            layer_cfg.setdefault(f"{name}.quantization", QUANTIZATION_NONE)
    quantization: dict = {"quant_algo": None, "kv_cache_quant_algo": None}
    quantization.update(process_layer_quant_config(layer_cfg))
    if lora_rank is not None and quantization["quant_algo"] == "NVFP4_SVD":
        quantization["lora_rank"] = lora_rank
    return {"producer": producer(), "quantization": quantization}


def hf_quantization_config(hf_quant_config: dict) -> dict:
    """``config.json``'s ``quantization_config``: modelopt's ``convert_hf_quant_config_format``."""
    from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format

    return convert_hf_quant_config_format({k: v for k, v in hf_quant_config.items() if k != "svdq"})


def write_modelopt_hf(
    out_dir: str | os.PathLike,
    tensors: Mapping[str, Tensor],
    algos: Mapping[str, str],
    excluded: list[str],
    model_config: dict,
    *,
    svdq: dict | None = None,
    lora_rank: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Write the layout to ``out_dir`` (``model.safetensors``, ``hf_quant_config.json``, ``config.json``
    with ``quantization_config``) atomically; returns the ``hf_quant_config`` dict. Names are final (the
    caller maps them to the checkpoint's own names first). ``svdq``: the ``"svdq"`` metadata entry."""
    from safetensors.torch import save_file

    if not algos:
        raise ValueError("no quantized layer to write in modelopt's HF layout")
    hf_quant_config = build_hf_quant_config(algos, excluded, lora_rank)
    config = dict(model_config)
    config["quantization_config"] = hf_quantization_config(hf_quant_config)
    if svdq is not None:
        hf_quant_config["svdq"] = svdq
        config["svdq"] = svdq
    with atomic_output_dir(out_dir, overwrite) as tmp:
        save_file(dict(tensors), str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
        write_json(Path(tmp) / "hf_quant_config.json", hf_quant_config)
        write_json(Path(tmp) / "config.json", config)
    return hf_quant_config
