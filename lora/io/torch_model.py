"""Export / load a plain torch model whose quantized layers are :class:`svdq.SVDQLinear` and
:class:`svdq.experts.SVDQExperts` (fused Hugging Face experts).

    export_torch(model, "out/")                 # after svdq.quantize(model, ...) (and fine-tuning)
    meta = load_torch(fresh_model, "out/")      # fresh_model: same architecture, nn.Linear at those names

Every ``SVDQLinear`` is stored with the layer naming of :mod:`lora.io.naming` under its module
name (``0``, ``encoder.fc``, …), every ``SVDQExperts`` with :mod:`lora.io.experts_naming`, and every other
entry of ``model.state_dict()`` under its own name. The metadata document::

    {"model_kind": "torch", "layers": {name: layer metadata}, "expert_groups": {},
     "experts": {name: experts metadata}, "other_tensors": [names], "user": {...}}

(``"experts"`` absent in checkpoints written before fused experts existed: read as empty.) An experts
entry loads into a module of the same class (the handler's, :func:`svdq.experts.handler_for`) with the same
expert count and weight shapes, which becomes an ``SVDQExperts``; any mismatch is one ``ValueError`` naming
the module, before the model changes.

Loading validates everything first (layer names and shapes against the fresh model, every tensor's
dtype and shape, no missing or unknown tensor) and changes the model only after that: each named
``nn.Linear`` becomes an ``SVDQLinear`` (packed storage by default), every other tensor is copied, and only
the branch factors require gradients (none with ``trainable=False``). A layer of rank 0 (no branch, e.g.
after folding) becomes an ``SVDQLinear`` with empty ``(0 × in)`` / ``(out × 0)`` factors.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from lora.install import install_linear
from lora.io.container import DTYPE_NAMES, CheckpointReader, write_checkpoint
from lora.io.experts_naming import (
    experts_meta,
    experts_specs,
    experts_tensors,
    parse_experts_meta,
    read_experts,
)
from lora.io.naming import (
    LinearState,
    check_specs,
    linear_meta,
    linear_specs,
    linear_tensors,
    parse_linear_meta,
    read_linear,
)
from svdq.experts import SVDQExperts, handler_for, install_svdq_experts
from svdq.layer import SVDQLinear

MODEL_KIND = "torch"


def layer_state(name: str, layer: SVDQLinear) -> LinearState:
    """The :class:`LinearState` of an ``SVDQLinear`` (packed storage needed)."""
    if layer.storage != "packed":
        raise ValueError(
            f"{name}: storage={layer.storage!r} keeps only the dequantized residual; export needs 'packed'"
        )
    return LinearState(
        residual=layer.packed_residual(),
        smooth=layer.smooth,
        act_format=layer.act_format,
        lora_down=layer.lora_down.detach(),
        lora_up=layer.lora_up.detach(),
        bias=layer.bias,
        input_amax=layer.input_amax,
        dtype=layer.lora_down.dtype,
    )


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def export_torch(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    max_shard_bytes: int | None = None,
    metadata: dict | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write ``model`` (with ``SVDQLinear`` / ``SVDQExperts`` layers) as a checkpoint directory; returns
    it."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SVDQLinear)}
    experts = {n: m for n, m in model.named_modules() if isinstance(m, SVDQExperts)}
    if not layers and not experts:
        raise ValueError("the model has no svdq.SVDQLinear or svdq.experts.SVDQExperts layer to export")
    tensors, layer_meta, exp_meta = {}, {}, {}
    for name, layer in tqdm(layers.items(), desc="svdq export", unit="layer", disable=not progress):
        state = layer_state(name, layer)
        tensors.update(linear_tensors(name, state))
        layer_meta[name] = linear_meta(state)
    for name, layer in experts.items():
        tensors.update(experts_tensors(name, layer))
        exp_meta[name] = experts_meta(name, layer)
    quantized = [*layers, *experts]
    other = [k for k in model.state_dict() if not _under(k, quantized)]
    sd = model.state_dict()
    for k in other:
        if k in tensors:
            raise ValueError(f"state-dict entry {k} collides with a layer tensor name")
        tensors[k] = sd[k]
    document = {
        "model_kind": MODEL_KIND,
        "layers": layer_meta,
        "expert_groups": {},
        "experts": exp_meta,
        "other_tensors": other,
        "user": metadata or {},
    }
    return write_checkpoint(out_dir, tensors, document, max_shard_bytes=max_shard_bytes, overwrite=overwrite)


def check_model_kind(meta: dict, kind: str, source) -> None:
    got = meta.get("model_kind")
    if got != kind:
        raise ValueError(f"{source}: field 'model_kind' is {got!r}; this loader reads {kind!r} checkpoints")


def _validate_experts(modules: dict, name: str, em: dict) -> tuple[dict, object]:
    """Fields of the experts entry ``name`` and the handler of the model's module there (checked)."""
    f = parse_experts_meta(em, name)
    m = modules.get(name)
    if m is None:
        raise ValueError(f"experts {name} of the checkpoint is not a module of the model")
    handler = handler_for(m)
    if handler is None or type(m).__name__ != f["class"]:
        raise ValueError(
            f"experts {name}: the model has a {type(m).__name__} there, the checkpoint a {f['class']} "
            f"(handler {f['handler']!r}); load into the model the checkpoint was exported from"
        )
    W1, W2, b1, _ = handler.weights(m)
    want = (f["fc1"]["shape"], f["fc2"]["shape"])
    if (tuple(W1.shape), tuple(W2.shape)) != want:
        raise ValueError(
            f"experts {name}: the checkpoint has weights {[list(s) for s in want]}, the model "
            f"{[list(W1.shape), list(W2.shape)]}"
        )
    if (b1 is not None) != f["fc1"]["bias"]:
        raise ValueError(f"experts {name}: bias presence differs between the checkpoint and the model")
    return f, handler


def _validate(model: nn.Module, reader: CheckpointReader) -> tuple[dict, dict, dict]:
    """``(layer fields, experts (fields, handler), other state-dict tensors)``, everything checked
    (nothing changed)."""
    meta = reader.metadata
    layers = meta.get("layers")
    experts_md = meta.get("experts", {})
    if not isinstance(layers, dict) or not isinstance(experts_md, dict) or not (layers or experts_md):
        raise ValueError(f"{reader.path}: metadata fields 'layers' / 'experts' are missing or empty")
    modules = dict(model.named_modules())
    experts = {name: _validate_experts(modules, name, em) for name, em in experts_md.items()}
    fields = {}
    for name, lm in layers.items():
        f = parse_linear_meta(lm, name)
        m = modules.get(name)
        if m is None:
            raise ValueError(f"layer {name} of the checkpoint is not a module of the model")
        if type(m) is not nn.Linear:
            raise ValueError(f"layer {name}: the model has a {type(m).__name__} there, expected nn.Linear")
        if (m.out_features, m.in_features) != f["shape"]:
            raise ValueError(
                f"layer {name}: the checkpoint has shape {list(f['shape'])}, the model "
                f"{[m.out_features, m.in_features]}"
            )
        if (m.bias is not None) != f["bias"]:
            raise ValueError(
                f"layer {name}: the checkpoint has {'a' if f['bias'] else 'no'} bias, the model "
                f"{'none' if f['bias'] else 'one'}"
            )
        if m.weight.dtype != f["dtype"]:
            raise ValueError(
                f"layer {name}: checkpoint dtype {DTYPE_NAMES[f['dtype']]}, the model {m.weight.dtype}"
            )
        fields[name] = f
    sd = model.state_dict(keep_vars=True)
    quantized = [*layers, *experts]
    other = {k: v for k, v in sd.items() if not _under(k, quantized)}
    listed = meta.get("other_tensors")
    if not isinstance(listed, list):
        raise ValueError(f"{reader.path}: metadata field 'other_tensors' is missing")
    missing = [k for k in other if k not in listed]
    if missing:
        raise ValueError(f"tensor {missing[0]} of the model is not in the checkpoint {reader.path}")
    unknown = [k for k in listed if k not in other]
    if unknown:
        raise ValueError(f"tensor {unknown[0]} of the checkpoint is not a tensor of the model")
    for k, t in other.items():
        reader.check(k, t.dtype, tuple(t.shape), "model tensor")
    known = set(listed)
    for name, f in fields.items():
        specs = linear_specs(name, f)
        check_specs(reader, specs, name)
        known.update(specs)
    for name, (f, _) in experts.items():
        specs = experts_specs(name, f)
        check_specs(reader, specs, name)
        known.update(specs)
    extra = sorted(set(reader.keys()) - known)
    if extra:
        raise ValueError(f"tensor {extra[0]} of the checkpoint is not named by its metadata")
    return fields, experts, other


def load_torch(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    trainable: bool = True,
    storage: str = "packed",
    progress: bool = True,
) -> dict:
    """Load an :func:`export_torch` checkpoint into the fresh ``model`` in place; returns the metadata."""
    with CheckpointReader(path) as reader:
        check_model_kind(reader.metadata, MODEL_KIND, reader.path)
        fields, experts, other = _validate(model, reader)
        for name in tqdm(fields, desc="svdq load", unit="layer", disable=not progress):
            st = read_linear(reader, name, reader.metadata["layers"][name])
            install_linear(
                model,
                name,
                residual=st.residual,
                smooth=st.smooth,
                act_format=st.act_format,
                lora_down=st.lora_down,
                lora_up=st.lora_up,
                bias=st.bias,
                input_amax=st.input_amax,
                storage=storage,
                dtype=st.dtype,
            )
        for name, (f, handler) in experts.items():
            states = read_experts(reader, name, f)
            install_svdq_experts(model, name, handler, states["fc1"], states["fc2"], storage=storage)
        with torch.no_grad():
            for k, t in other.items():
                t.copy_(reader.get(k))
        lora = {id(p) for m in model.modules() if isinstance(m, SVDQLinear) for p in (m.lora_down, m.lora_up)}
        lora |= {id(p) for m in model.modules() if isinstance(m, SVDQExperts) for p in m.lora_parameters()}
        for p in model.parameters():
            p.requires_grad_(trainable and id(p) in lora)
        return reader.metadata
