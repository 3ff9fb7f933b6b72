"""Folded export in the compressed-tensors format (``nvfp4-pack-quantized``): what llm-compressor writes and
vLLM / transformers read.

    from lora.io.compressed_tensors import export_compressed_tensors
    report = export_compressed_tensors(model, "out/", forward_loop=loop)      # scheme from the model
    cfg = CompressedTensorsConfig(dequantize=True)
    hf = AutoModelForCausalLM.from_pretrained("out/", quantization_config=cfg)   # transformers, CPU

The format has no low-rank branch and no smoothing (``pre_quant_scale``), so each quantized linear is
folded with ``smoothing="fold"`` (svdq/DESIGN.md §6): ``T = Q_w(R)·diag(1/s) + B·A'`` re-quantized to NVFP4
in raw input coordinates (:func:`lora.io.folded_hf.fold_layer` for :class:`svdq.SVDQLinear`,
:func:`lora.io.fold_experts.fold_projection` per expert for :class:`svdq.experts.SVDQExperts`). The
weights are then written through the compressed-tensors library's own ``NVFP4PackedCompressor`` (it
quantizes the dequantized fold with our block and global scales, which reproduces our codes exactly; checked)
and the config is its ``QuantizationConfig`` / ``ModelCompressor.update_config``.

**Files** (a directory, written atomically): ``model.safetensors`` and ``config.json`` (the model's Hugging
Face config, ``quantization_config`` from compressed-tensors, and ``svdq_export``: our metadata). Per
quantized linear ``<m>`` (the name ``save_pretrained`` writes — fused experts are split per expert under
transformers' own reverse weight conversion, e.g. Qwen3-MoE ``mlp.experts.<e>.gate_proj`` / ``up_proj`` /
``down_proj``, Mixtral ``block_sparse_moe.experts.<e>.w1`` / ``w3`` / ``w2``)::

    <m>.weight_packed        uint8 (out, in/2)           E2M1 codes, element 2j in the low nibble
    <m>.weight_scale         float8_e4m3fn (out, in/16)  block scales
    <m>.weight_global_scale  float32 (1,)                1/g = 6·448/amax (compressed-tensors' convention)
    <m>.input_global_scale   float32 (1,)                scheme NVFP4 only: 6·448/amax, amax the raw range
    <m>.bias                 dtype (out,)                where the layer has one

The gate and up rows of one expert are folded as one ``(2I, H)`` weight, so the two share a global scale (as
vLLM expects for its fused ``w13``). Every other state-dict tensor is written as it is under its saved name
(tied weights once, as ``save_pretrained``); the 2-D ``weight`` of every module that is not quantized and
not an embedding — the ``lm_head``, routers (``mlp.gate``), excluded linears — is listed in ``ignore``.

**Scheme**: ``"NVFP4"`` (W4A4: dynamic per-block activation scales, a static per-layer activation global
scale, measured over ``forward_loop`` on the raw inputs: ``max|x|`` times the layer's headroom, its static
range ``input_amax`` over ``max|x/s|`` in the same pass (svdq/DESIGN.md §20) — an expert no token reached
takes the largest range of its projection) or ``"NVFP4A16"`` (weight-only). Default: ``NVFP4`` for a model
whose activations are nvfp4, ``NVFP4A16`` for activation format ``none``. Every layer must have nvfp4 weights.

**Limits**: plain torch / Hugging Face models only (not Megatron); fused experts of the ``concat-glu``
handler (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3); the fold report gives ``weight_err`` / ``delta_rel`` per
linear and per expert projection (``<experts>.fc1.<e>``), plus ``act_weight_err`` / ``output_err`` for dense
layers with ``forward_loop``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from lora.io.atomic import atomic_output_dir
from lora.io.fold_experts import PARAM_NAMES, fold_projection
from lora.io.folded_hf import fold_layer
from lora.io.modelopt_hf_experts import capture_expert_inputs
from lora.io.torch_common import ForwardLoop, capture_inputs, with_headroom, write_json
from svdq.experts import SVDQExperts
from svdq.formats import PackedTensor, dequantize
from svdq.layer import SVDQLinear

SCHEMES = ("NVFP4", "NVFP4A16")
CT_FORMAT = "nvfp4-pack-quantized"
METADATA_KEY = "svdq_export"
_GLU_HANDLERS = ("concat-glu",)


# ------------------------------------------------------------------------------------------ checks


def _quantized_modules(model: nn.Module) -> tuple[dict[str, SVDQLinear], dict[str, SVDQExperts]]:
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SVDQLinear)}
    experts = {n: m for n, m in model.named_modules() if isinstance(m, SVDQExperts)}
    if not layers and not experts:
        raise ValueError("the model has no svdq.SVDQLinear or svdq.experts.SVDQExperts layer to export")
    if "" in layers:
        raise ValueError("model is itself an SVDQLinear: export a model that contains it")
    return layers, experts


def _default_scheme(layers, experts) -> str:
    acts = {str(m.act_format) for m in layers.values()}
    acts |= {str(p.act_format) for m in experts.values() for p in m.projections().values()}
    if acts == {"none"}:
        return "NVFP4A16"
    if acts == {"nvfp4"}:
        return "NVFP4"
    raise ValueError(
        f"activation formats {sorted(acts)}: compressed-tensors NVFP4 is W4A4 (nvfp4 activations) or "
        "NVFP4A16 (none); pass scheme='NVFP4' or 'NVFP4A16' explicitly"
    )


def _check(layers, experts, scheme: str | None, forward_loop) -> str:
    for name, m in layers.items():
        if m.weight_format.name != "nvfp4":
            raise ValueError(f"{name}: weight format {m.weight_format}; compressed-tensors NVFP4 needs nvfp4")
        if m.in_features % 16:
            raise ValueError(f"{name}: {m.in_features} input features, not a multiple of NVFP4's 16")
    for name, m in experts.items():
        if m.handler not in _GLU_HANDLERS:
            raise ValueError(
                f"experts {name}: handler {m.handler!r} ({m.source_class}); the compressed-tensors export "
                f"splits fused experts of the handlers {list(_GLU_HANDLERS)} only"
            )
        for p, proj in m.projections().items():
            if proj.weight_format.name != "nvfp4":
                raise ValueError(f"experts {name}.{p}: weight format {proj.weight_format}; needs nvfp4")
    scheme = _default_scheme(layers, experts) if scheme is None else scheme
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if scheme == "NVFP4" and forward_loop is None:
        raise ValueError(
            "scheme NVFP4 (W4A4) stores a static activation global scale per layer, measured on the raw "
            "inputs: pass forward_loop (svdq export: --data), or scheme='NVFP4A16' (weight-only)"
        )
    return scheme


# ------------------------------------------------------------------------------------------ names


def _saved_names(model: nn.Module, probes: dict[str, Tensor]) -> dict[str, Tensor]:
    """``probes`` (in-memory state-dict names) under the names ``save_pretrained`` writes (transformers'
    reverse weight conversion: fused experts split per expert, renamed prefixes); identity for models that
    are not transformers models."""
    try:
        from transformers import PreTrainedModel
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return dict(probes)
    if not isinstance(model, PreTrainedModel):
        return dict(probes)
    return revert_weight_conversion(model, dict(probes))


def _row_probe(lead: tuple[int, ...], rows: int) -> Tensor:
    """Float64 ids ``(*lead, rows, 1)``: element ``[..., j, 0]`` is its flat row index."""
    n = rows
    for d in lead:
        n *= d
    return torch.arange(n, dtype=torch.float64).reshape(*lead, rows, 1)


def _split_rows(saved: Mapping[str, Tensor], num_experts: int, rows: int) -> dict[str, tuple[int, Tensor]]:
    """``{saved weight name: (expert, row indices)}`` from probe results."""
    out = {}
    for key, ids in saved.items():
        flat = ids.reshape(-1).long()
        experts = torch.unique(flat // rows)
        if experts.numel() != 1 or int(experts) >= num_experts:
            raise ValueError(f"{key}: transformers' saved layout mixes experts; cannot split it per expert")
        out[key] = (int(experts), flat % rows)
    return out


# ------------------------------------------------------------------------------------------ ranges


def _capture_expert_amax(model: nn.Module, experts: dict[str, SVDQExperts], forward_loop) -> dict:
    """``{name: {"fc1": (E,), "fc2": (E,)}}``: per expert the raw-coordinate static range of each
    projection's input (fc1: the routed hidden states; fc2: ``act(fc1(x))`` of the module as it is),
    ``max|x|`` times the expert's headroom (:func:`lora.io.torch_common.with_headroom`)."""
    cap = capture_expert_inputs(model, experts, forward_loop)
    return {
        n: {
            p: with_headroom(cap.amax[(n, p)], cap.amax_smoothed[(n, p)], proj.input_amax).cpu()
            for p, proj in m.projections().items()
        }
        for n, m in experts.items()
    }


# ------------------------------------------------------------------------------------------ compress


def _scheme(scheme: str):
    from compressed_tensors.quantization import QuantizationScheme, preset_name_to_scheme

    s = preset_name_to_scheme(scheme, ["Linear"])
    s.format = CT_FORMAT
    return QuantizationScheme.model_validate(s.model_dump())


def _input_global_scale(amax: float) -> Tensor:
    from compressed_tensors.quantization.utils import generate_gparam

    a = torch.tensor([amax], dtype=torch.float32)
    return generate_gparam(-a, a)  # (1,) 6·448 / amax


def _signed_zero_as_zero(codes: Tensor) -> Tensor:
    """E2M1 code bytes with the nibble ``-0`` (``0b1000``) written ``+0``: the same values."""
    lo, hi = codes & 0xF, codes >> 4
    lo = torch.where(lo == 8, torch.zeros_like(lo), lo)
    hi = torch.where(hi == 8, torch.zeros_like(hi), hi)
    return lo | (hi << 4)


def _compress(name: str, packed: PackedTensor, scheme, input_amax: float | None) -> dict[str, Tensor]:
    """The compressed-tensors tensors of one 2-D NVFP4 weight through ``NVFP4PackedCompressor``."""
    from compressed_tensors.compressors import NVFP4PackedCompressor

    g = packed.global_scale.double()
    state = {
        "weight": dequantize(packed, torch.float32),  # (out, in) = code · block_scale · g
        "weight_scale": packed.scale.float(),  # (out, in/16)
        "weight_global_scale": (1.0 / g).float().reshape(1),  # compressed-tensors' scale divides by it
    }
    if input_amax is not None:
        state["input_global_scale"] = _input_global_scale(input_amax)
    out = NVFP4PackedCompressor.compress(state, scheme)
    if not torch.equal(_signed_zero_as_zero(out["weight_packed"]), _signed_zero_as_zero(packed.qdata)):
        raise RuntimeError(f"{name}: compressed-tensors re-quantized the folded weight to other codes")
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def _rows(packed: PackedTensor, rows: Tensor) -> PackedTensor:
    """The rows ``rows`` of a 2-D NVFP4 ``packed`` (same global scale)."""
    return PackedTensor(
        packed.fmt,
        (int(rows.numel()), packed.shape[1]),
        packed.dtype,
        packed.qdata[rows].contiguous(),
        packed.scale[rows].contiguous(),
        packed.global_scale,
    )


# ------------------------------------------------------------------------------------------ export


def _other_tensors(model: nn.Module, quantized: list[str]) -> dict[str, Tensor]:
    sd = model.state_dict()
    out = {k: v for k, v in sd.items() if not any(k == q or k.startswith(q + ".") for q in quantized)}
    try:
        from transformers import PreTrainedModel
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:
        return out
    if isinstance(model, PreTrainedModel):
        out = remove_tied_weights_from_state_dict(out, model)
    return out


def _ignore_list(model: nn.Module, saved_other: Mapping[str, Tensor]) -> list[str]:
    embeddings = {n for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    saved_embeddings = set(_saved_names(model, {f"{n}.weight": torch.zeros(1) for n in embeddings}))
    return sorted(
        k[: -len(".weight")]
        for k, t in saved_other.items()
        if k.endswith(".weight") and t.dim() == 2 and k not in saved_embeddings
    )


def export_compressed_tensors(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    scheme: str | None = None,
    forward_loop: ForwardLoop | None = None,
    max_tokens: int = 4096,
    metadata: dict | None = None,
    config: dict | None = None,
    overwrite: bool = False,
    verbose: bool = True,
) -> dict[str, dict]:
    """Write ``model`` folded in the compressed-tensors NVFP4 format (module docstring); returns the fold
    report ``{linear or <experts>.<fc1|fc2>.<e>: errors}``. ``model`` is not changed. ``config``: the
    ``config.json`` dict (default: a transformers model's own config). ``metadata``: stored under
    ``config.json``'s ``svdq_export.user``. All checks run before any work; nothing is written on error."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus
    from safetensors.torch import save_file

    layers, experts = _quantized_modules(model)
    scheme = _check(layers, experts, scheme, forward_loop)
    qscheme = _scheme(scheme)
    w4a4 = scheme == "NVFP4"

    xs, dense_amax, expert_amax = {}, {}, {}
    if forward_loop is not None:
        xs, dense_amax = capture_inputs(model, layers, forward_loop, max_tokens)
        if experts:
            expert_amax = _capture_expert_amax(model, experts, forward_loop)
    if w4a4:
        unseen = [n for n in layers if n not in dense_amax or not float(dense_amax[n]) > 0]
        unseen += [f"{n}.{p}" for n, a in expert_amax.items() for p in a if not float(a[p].max()) > 0]
        if unseen:
            raise ValueError(
                f"{unseen[0]}: no input reached it over forward_loop; scheme NVFP4 needs its range"
            )

    # saved names: dense weights and the fused expert weights probed (one at a time) through transformers'
    # reverse conversion
    probes = {f"{n}.weight": _row_probe((), m.out_features) for n, m in layers.items()}
    for n, m in experts.items():
        probes[f"{n}.gate_up_proj"] = _row_probe((m.num_experts,), m.fc1.out_features)
        probes[f"{n}.down_proj"] = _row_probe((m.num_experts,), m.fc2.out_features)

    tensors: dict[str, Tensor] = {}
    report: dict[str, dict] = {}
    layer_meta: dict[str, dict] = {}
    for name, layer in layers.items():
        (key,) = _saved_names(model, {f"{name}.weight": probes[f"{name}.weight"]})
        prefix = key[: -len(".weight")]
        a = dense_amax.get(name)
        folded, report[name] = fold_layer(layer, "fold", xs.get(name), a if a is not None and a > 0 else None)
        ct = _compress(name, folded.packed_residual(), qscheme, float(a) if w4a4 else None)
        tensors.update({f"{prefix}.{k}": v for k, v in ct.items()})
        if layer.bias is not None:
            tensors[f"{prefix}.bias"] = layer.bias.detach().cpu().clone()
        layer_meta[name] = {
            "saved_as": prefix,
            "rank": layer.rank,
            "weight_format": str(layer.weight_format),
            "act_format": str(layer.act_format),
        }
    for name, m in experts.items():
        fused = {"fc1": f"{name}.gate_up_proj", "fc2": f"{name}.down_proj"}
        proj_meta = {}
        for p, proj in m.projections().items():
            mine = _saved_names(model, {fused[p]: probes[fused[p]]})
            split = _split_rows(mine, m.num_experts, proj.out_features)
            folded, errors = fold_projection(proj, "fold")  # rank-0 ProjectionState, per-expert errors
            amax = expert_amax.get(name, {}).get(p)
            fallback = []
            if amax is not None and w4a4:
                fallback = [e for e in range(m.num_experts) if not float(amax[e]) > 0]
                amax = torch.where(amax > 0, amax, amax.max())
            for e, err in enumerate(errors):
                report[f"{name}.{e}.{PARAM_NAMES[p]}"] = {
                    "format": str(proj.weight_format),
                    "smoothing": "fold",
                    "rank": proj.rank,
                    **err,
                }
            for key, (e, rows) in sorted(split.items()):
                prefix = key[: -len(".weight")]
                ct = _compress(
                    prefix, _rows(folded.residual.expert(e), rows), qscheme, float(amax[e]) if w4a4 else None
                )
                tensors.update({f"{prefix}.{k}": v for k, v in ct.items()})
                if proj.bias is not None:
                    tensors[f"{prefix}.bias"] = proj.bias[e, rows].detach().cpu().clone()
            proj_meta[p] = {
                "layout": proj.layout,
                "rank": proj.rank,
                "weight_format": str(proj.weight_format),
                "act_format": str(proj.act_format),
                "saved_as": sorted(k[: -len(".weight")] for k in split),
                "input_range_from_other_experts": fallback,
            }
        layer_meta[name] = {"handler": m.handler, "class": m.source_class, "projections": proj_meta}

    other = _other_tensors(model, [*layers, *experts])
    saved_other = _saved_names(model, other)
    clash = sorted(set(saved_other) & set(tensors))
    if clash:
        raise ValueError(f"state-dict entry {clash[0]} collides with a quantized layer's tensor name")
    tensors.update({k: v.detach().cpu().contiguous() for k, v in saved_other.items()})
    qconfig = QuantizationConfig(
        config_groups={"group_0": qscheme},
        format=CT_FORMAT,
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=_ignore_list(model, saved_other),
    )
    if config is None:
        cfg = getattr(model, "config", None)
        config = cfg.to_dict() if cfg is not None and hasattr(cfg, "to_dict") else {}
    config = dict(config)
    config.pop("quantization_config", None)
    from lora.io.container import tool_version

    config[METADATA_KEY] = {
        "tool": "svdq",
        "tool_version": tool_version(),
        "format": "compressed-tensors",
        "scheme": scheme,
        "fold_smoothing": "fold",
        "layers": layer_meta,
        "user": metadata or {},
    }
    with atomic_output_dir(out_dir, overwrite) as tmp:
        save_file(tensors, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
        write_json(Path(tmp) / "config.json", config)
        ModelCompressor(quantization_config=qconfig).update_config(str(tmp))
    if verbose:
        from lora.fold import format_report

        print(f"svdq compressed-tensors export to {out_dir} ({scheme}); error added by the fold:")
        print(format_report(report))
    return report
