"""Export a quantized model to the svdq checkpoint format and load it back — the one entry point for
Megatron models (:mod:`lora.base` layers with adapters) and plain torch models
(:class:`svdq.SVDQLinear` layers, handled by :mod:`lora.io.torch_model`).

    export_quantized(model, "ckpt/", metadata={"source": "..."})     # collective: call on every rank
    meta = load_quantized(fresh_model, "ckpt/")                      # collective too
    read_export_metadata("ckpt/")["user"]                            # {"source": "..."}

**Naming (version "1")**, every tensor whole (tensor-parallel shards gathered, experts under their
*global* index) — see :mod:`lora.io.naming` for one linear:

* dense quantized layer ``<name>`` (``LoraLinear`` over ``SVDQBase``, or a bare ``SVDQBase`` without
  a branch): ``<name>.weight_packed`` / ``.weight_scale`` / ``.weight_scale_2`` / ``.smooth`` /
  ``.lora_down`` / ``.lora_up`` / ``.bias`` / ``.input_amax``;
* expert group ``<experts>`` (``LoraExperts`` or bare ``SequentialMLP`` with ``SVDQBase`` expert
  linears): factors shared by the experts once, under their adapter-file keys
  (``<experts>.linear_fc1.lora_down``, ``<experts>.linear_fc2.lora_up``, ``<experts>.parallel.lora_down``);
  per global expert ``g``: ``<experts>.experts.<g>.linear_fc1.weight_packed`` / ``.weight_scale`` /
  ``.weight_scale_2`` / ``.smooth`` / ``.input_amax`` / ``.bias`` and the factors the expert owns in its
  layout (``.lora_up`` for shared-down, ``.lora_down`` for shared-up, both for per-expert;
  ``<experts>.experts.<g>.parallel.lora_up``); the same for ``linear_fc2``;
* every other state-dict entry under its full (tensor-parallel gathered) name, experts' local index
  replaced by the global one; ``_extra_state`` entries are skipped.

``lora_up`` is written with the adapter scaling folded in (``scaling · B``), so the file's branch is
``(x·Aᵀ)·Bᵀ``; the loader divides it out again (exact for scaling 1, the calibration default, and any
power of two). The metadata document (``model_kind: "megatron"``) holds per layer the linear metadata
plus ``lora`` (the :class:`~lora.config.LoraConfig` to rebuild the adapter, ``None`` for rank 0),
``base_dtype`` and ``parallel_mode``; per expert group ``num_experts`` (global), ``glu``, ``lora``,
``parallel`` and per projection the linear metadata plus ``layout`` (``input_amax``: one bool per global
expert); ``other_tensors``; ``user``.

**Distributed**: every rank takes part in the gathers; global rank 0 writes; a failure there raises on
every rank. The file does not depend on the tensor / expert parallel sizes (an EP=2 export equals the
single-process one). Loading: every rank reads the tensors it needs and keeps its shards. Pipeline
parallelism is not supported. Whole tensors are assembled in rank 0's memory before writing.

**Folded models** (no branch): ``lora.modelopt_quant.fold_adapters(model)`` leaves bare ``SVDQBase``
layers; ``export_quantized`` writes them with ``rank: 0`` and no ``lora_*`` tensors, and
``load_quantized`` rebuilds them as bare ``SVDQBase`` (no adapter).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from lora.adapters.layers import ExpertLoraLinear, ExpertParallelAdapter, LoraExperts, LoraLinear, linear_mode
from lora.base import SVDQBase
from lora.families import is_megatron_model
from lora.families.megatron_linear import is_glu_fc1
from lora.framework.te import tp_group_of
from lora.framework.tp import all_gather, gather_dim, gather_packed, group_rank_size, rank0_call, split_dim
from lora.io.container import DTYPE_NAMES, read_metadata, write_checkpoint
from lora.io.naming import LinearState, linear_meta, linear_tensors, residual_tensors
from lora.io.sites import (
    MODEL_KIND,
    check_no_pipeline,
    expert_key,
    expert_linears,
    find_sites,
    linear_bias,
    other_tensors,
    unwrap,
    unwrap_expert,
)
from lora.io.torch_model import export_torch, load_torch


def export_quantized(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    max_shard_bytes: int | None = None,
    metadata: dict | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write the quantized ``model`` (Megatron or plain torch) as a checkpoint directory; returns it.

    ``max_shard_bytes``: split into shards of at most this size (plus an index). ``metadata``: user
    metadata (JSON-serializable), stored under ``"user"``. ``overwrite``: replace a non-empty
    ``out_dir`` (only once the new one is complete). Adapters are written with their *current* values.
    Collective under tensor / expert parallelism (rank 0 writes).
    """
    if not is_megatron_model(model):
        return export_torch(
            model,
            out_dir,
            max_shard_bytes=max_shard_bytes,
            metadata=metadata,
            overwrite=overwrite,
            progress=progress,
        )
    return _export_megatron(model, Path(out_dir), max_shard_bytes, metadata, overwrite, progress)


def load_quantized(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    trainable: bool = True,
    storage: str = "packed",
    progress: bool = True,
) -> dict:
    """Load a checkpoint of :func:`export_quantized` into ``model``, built the same way as the exported
    one (same architecture, any weights, no adapters); returns the checkpoint's metadata (``"user"``:
    the user metadata).

    Everything is validated before the model is changed (layer names, shapes, expert counts, every
    tensor's dtype and shape, no missing or unknown tensor; ``ValueError`` naming the layer / tensor).
    Then quantized layers get their ``SVDQBase`` (``storage``: ``"packed"`` or ``"fake"``) and adapters
    with the stored factors, every other tensor is loaded, the base is frozen and the adapters are
    trainable (frozen too with ``trainable=False``). Collective under tensor / expert parallelism.
    """
    meta = read_metadata(path)
    if meta.get("model_kind") == "torch":
        return load_torch(model, path, trainable=trainable, storage=storage, progress=progress)
    from lora.io.svdq_load import load_megatron

    return load_megatron(model, path, trainable=trainable, storage=storage, progress=progress)


def read_export_metadata(path: str | os.PathLike) -> dict:
    """The metadata document of a checkpoint directory (validated; see the module docstring)."""
    return read_metadata(path)


# ------------------------------------------------------------------------------------------ megatron


def _check_writable(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise FileExistsError(
            f"{out} exists and is not an empty directory; pass overwrite=True to replace it"
        )


def _export_megatron(model, out: Path, max_shard_bytes, metadata, overwrite, progress) -> Path:
    check_no_pipeline()
    rank0_call(_check_writable, out, overwrite)
    ordered, document = gather_megatron(model, metadata, progress)
    return rank0_call(
        write_checkpoint, out, ordered, document, max_shard_bytes=max_shard_bytes, overwrite=overwrite
    )


def gather_megatron(model: nn.Module, metadata: dict | None = None, progress: bool = False):
    """``(tensors, document)`` of naming version "1" (module docstring) for a quantized Megatron model,
    in memory: whole tensors (tensor-parallel shards gathered, global expert indices) on global rank 0
    (``{}`` on the other ranks) and the metadata document. Collective; what :func:`export_quantized` writes
    and what other writers (e.g. modelopt's HF layout for models imported from Hugging Face) convert."""
    check_no_pipeline()
    dense, expert_groups = find_sites(model)
    if not dense and not expert_groups:
        raise ValueError("the model has no quantized layer (SVDQBase) to export; calibrate it first")
    writer = not dist.is_initialized() or dist.get_rank() == 0
    tensors: dict = {}
    layers, group_meta = {}, {}
    sites = [("dense", n) for n in dense] + [("experts", n) for n in expert_groups]
    for kind, name in tqdm(sites, desc="svdq export", unit="layer", disable=not (progress and writer)):
        if kind == "dense":
            t, layers[name] = _dense(model, name, dense[name])
        else:
            t, group_meta[name] = _expert_group(name, expert_groups[name])
        if writer:
            tensors.update(t)
    other = []
    for entry in other_tensors(model, list(dense) + list(expert_groups)):
        full = gather_dim(entry.tensor, entry.dim, entry.tp_group, entry.glu)
        if entry.expert is None:
            named = {entry.global_name(): full}
        else:
            ep_group, index, num_local = entry.expert
            parts = all_gather(full, ep_group)
            named = {entry.global_name(r * num_local + index): p for r, p in enumerate(parts)}
        other += list(named)
        if writer:
            tensors.update(named)
    other = sorted(other, key=_natural)
    document = {
        "model_kind": MODEL_KIND,
        "layers": layers,
        "expert_groups": group_meta,
        "other_tensors": other,
        "user": metadata or {},
    }
    return {k: tensors[k] for k in sorted(tensors, key=_natural)}, document


def _natural(key: str) -> list:
    """Sort key: dotted parts, numbers by value (``layers.2`` before ``layers.10``)."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split(".")]


def _packed(base: SVDQBase, who: str):
    if base.storage != "packed":
        raise ValueError(
            f"{who}: storage={base.storage!r} keeps only the dequantized residual; export needs 'packed'"
        )
    return base.packed_residual()


def _bias(inner: nn.Module) -> torch.Tensor | None:
    b = linear_bias(inner)
    if b is None:
        return None
    dim = int(b.partition_dim) if getattr(b, "tensor_model_parallel", False) else None
    return gather_dim(b.detach(), dim, tp_group_of(inner))


def _lora_dict(adapter: nn.Module, name: str) -> dict:
    cfg = adapter.lora_config.to_dict()
    cfg.update(targets=[name], init="zeros")
    return cfg


def _check_active(adapter, name: str) -> None:
    if adapter.merged or not adapter.enabled:
        raise ValueError(
            f"{name}: the adapter is disabled or merged; enable it (or fold it) before exporting"
        )


def _dense(model, name: str, site: nn.Module) -> tuple[dict, dict]:
    """Tensors and metadata of one dense quantized layer (whole tensors on every rank)."""
    adapter = site if isinstance(site, LoraLinear) else None
    base = unwrap(site)
    inner = base.inner
    dim = split_dim(inner)
    tp_group = tp_group_of(inner)
    glu = adapter.glu if adapter is not None else is_glu_fc1(model, name)
    residual = gather_packed(_packed(base, name), dim, tp_group, glu and dim == 0)
    smooth = gather_dim(base.smooth, 0, tp_group) if dim == 1 else base.smooth
    down = up = None
    dtype = base._dtype
    if adapter is not None:
        _check_active(adapter, name)
        f_down, f_up = adapter.factors()
        down = gather_dim(f_down.param.detach(), f_down.dim, tp_group, f_down.glu)
        up = gather_dim(f_up.param.detach(), f_up.dim, tp_group, f_up.glu) * adapter.scaling
        dtype = f_down.param.dtype
    state = LinearState(residual, smooth, base.act_format, down, up, _bias(inner), base.input_amax, dtype)
    meta = linear_meta(state)
    meta.update(
        lora=_lora_dict(adapter, name) if adapter is not None else None,
        base_dtype=DTYPE_NAMES[base._dtype],
        parallel_mode=linear_mode(inner),
    )
    return linear_tensors(name, state), meta


def _scaled(f, t: torch.Tensor, scaling: float) -> torch.Tensor:
    return t * scaling if f.role == "up" else t


def _expert_projection(name: str, seq: nn.Module, proj: str, adapter, local: list[dict]) -> dict:
    """Add each local expert's residual tensors of ``proj`` (expert-TP gathered) to ``local[i]`` under
    ``linear_<proj>.<key>``; returns the projection's metadata (``input_amax`` filled in later)."""
    ep_rank = group_rank_size(seq.ep_group)[0]
    glu = bool(seq.config.gated_linear_unit) and proj == "fc1"
    dim = 0 if proj == "fc1" else 1
    lins = expert_linears(seq, proj)
    meta = None
    for i, lin in enumerate(lins):
        base = unwrap(lin)
        who = expert_key(name, ep_rank * seq.num_local_experts + i, f"linear_{proj}")
        residual = gather_packed(_packed(base, who), dim, seq.tp_group, glu)
        smooth = gather_dim(base.smooth, 0, seq.tp_group) if dim == 1 else base.smooth
        state = LinearState(residual, smooth, base.act_format, None, None, _bias(base.inner), base.input_amax)
        local[i].update(residual_tensors(f"linear_{proj}", state))
        if state.input_amax is None:  # a placeholder (< 0) keeps the collectives aligned across experts
            local[i][f"linear_{proj}.input_amax"] = torch.full((), -1.0, device=base.smooth.device)
        meta = meta or linear_meta(state)
    layout = lins[0].layout if isinstance(lins[0], ExpertLoraLinear) else None
    has_branch = adapter is not None and layout is not None
    meta.update(layout=layout, rank=adapter.ranks[proj] if has_branch else 0)
    meta["base_dtype"] = DTYPE_NAMES[unwrap(lins[0])._dtype]
    if has_branch:
        meta["dtype"] = DTYPE_NAMES[next(adapter.parameters()).dtype]
    return meta


def _expert_factors(name: str, seq: nn.Module, adapter, local: list[dict]) -> None:
    """Add the factors each local expert owns (expert-TP gathered, ``lora_up`` scaled) to ``local[i]``
    under their key without the ``<experts>.experts.<g>.`` prefix."""
    first = group_rank_size(seq.ep_group)[0] * seq.num_local_experts
    for i, e in enumerate(seq.local_experts):
        inner = unwrap_expert(e)
        wrappers = [e] if isinstance(e, ExpertParallelAdapter) else []
        wrappers += [lin for lin in (inner.linear_fc1, inner.linear_fc2) if isinstance(lin, ExpertLoraLinear)]
        for w in wrappers:
            for f in w.factors():
                t = gather_dim(f.param.detach(), f.dim, seq.tp_group, f.glu)
                local[i][f.key[len(expert_key(name, first + i, "")) :]] = _scaled(f, t, adapter.scaling)


def _expert_group(name: str, site: nn.Module) -> tuple[dict, dict]:
    """Tensors (all global experts, gathered over expert-parallel ranks) and metadata of one quantized
    expert group."""
    adapter = site if isinstance(site, LoraExperts) else None
    seq = site.base if adapter is not None else site
    if adapter is not None:
        _check_active(adapter, name)
    num_local, ep_size = seq.num_local_experts, group_rank_size(seq.ep_group)[1]
    local: list[dict] = [{} for _ in range(num_local)]
    projections = {proj: _expert_projection(name, seq, proj, adapter, local) for proj in ("fc1", "fc2")}
    if adapter is not None:
        _expert_factors(name, seq, adapter, local)
    tensors = {}
    amax = {proj: [False] * (num_local * ep_size) for proj in projections}
    for i in range(num_local):
        for suffix in sorted(local[i]):  # the same keys in the same order on every rank
            for r, t in enumerate(all_gather(local[i][suffix], seq.ep_group)):
                g = r * num_local + i
                if suffix.endswith(".input_amax"):
                    if float(t) < 0:
                        continue
                    amax[suffix.split(".")[0][len("linear_") :]][g] = True
                tensors[expert_key(name, g, suffix)] = t
    if adapter is not None:
        for f in adapter.shared_factors():
            t = gather_dim(f.param.detach(), f.dim, seq.tp_group, f.glu)
            tensors[f.key] = _scaled(f, t, adapter.scaling)
    for proj, meta in projections.items():
        meta["input_amax"] = amax[proj]
    meta = {
        "kind": "experts",
        "num_experts": num_local * ep_size,
        "glu": bool(seq.config.gated_linear_unit),
        "lora": _lora_dict(adapter, name) if adapter is not None else None,
        "parallel": adapter.ranks["parallel"] if adapter is not None and adapter.parallel else None,
        "projections": projections,
    }
    return tensors, meta
