"""Adapter API on a (Megatron) model: add / enable / disable / remove by name pattern, freeze the base,
merge / unmerge, and the adapter-only state dict as safetensors.

    names = add_adapters(model, LoraConfig.preset("moe", rank=16))
    freeze_base(model)                      # only adapter parameters train
    ...train...
    save_adapters(model, "adapters.safetensors")
    load_adapters(fresh_model, "adapters.safetensors")   # adds the adapters if the model has none

Patterns are :func:`fnmatch.fnmatch` patterns over adapter names (the module names at ``add_adapters``
time). Adapter-file keys are global factor names (:class:`lora.adapters.layers.Factor`):
``<linear>.lora_down``, ``<experts>.linear_fc1.lora_down`` for a factor shared by a layer's experts, and
``<experts>.experts.<g>.linear_fc1.lora_up`` per expert with ``g`` the *global* expert index.
"""

from __future__ import annotations

import dataclasses
import json
import os
from fnmatch import fnmatch
from pathlib import Path

import torch
from torch import nn

from lora.adapters.grouped import GroupedLoraLinear, LoraGroupedExperts
from lora.adapters.layers import (
    ExpertGroup,
    ExpertLoraLinear,
    ExpertParallelAdapter,
    Factor,
    LoraExperts,
    LoraLinear,
)
from lora.config import LoraConfig
from lora.families import family_of
from lora.framework.te import tp_group_of
from svdq.solvers.shared_basis import SHARED_DOWN, SHARED_UP

FILE_FORMAT = "svdq-lora"
FILE_VERSION = "1"
TORCH_KIND = "torch"  # metadata model_kind of a file of svdq.SVDQLinear branches
OLD_PARAMS_FORMAT = "svdq-params"  # those files before the formats were one (read only)
_WRAPPERS = (LoraLinear, ExpertGroup, ExpertLoraLinear, ExpertParallelAdapter, GroupedLoraLinear)


def _matches(name: str, patterns) -> bool:
    return any(fnmatch(name, p) for p in patterns)


def _locate(model: nn.Module, target: nn.Module) -> tuple[nn.Module, str]:
    """``(parent, attribute)`` under which ``target`` sits in ``model``."""
    for _, parent in model.named_modules():
        for cname, child in parent.named_children():
            if child is target:
                return parent, cname
    raise ValueError(f"module {type(target).__name__} is not part of the model")


def is_adapter(m: nn.Module) -> bool:
    """An adapter module: :class:`LoraLinear`, an expert group (:class:`LoraExperts`,
    :class:`~lora.adapters.grouped.LoraGroupedExperts`) or a TE grouped linear adapted on its own."""
    if isinstance(m, GroupedLoraLinear):
        return m._expert_group is None
    return isinstance(m, (LoraLinear, ExpertGroup))


def adapter_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Adapter name → adapter module (see :func:`is_adapter`)."""
    return {m.adapter_name: m for m in model.modules() if is_adapter(m)}


def _select(model: nn.Module, pattern: str) -> dict[str, nn.Module]:
    return {n: m for n, m in adapter_modules(model).items() if fnmatch(n, pattern)}


def adapter_factors(model: nn.Module) -> dict[str, Factor]:
    """Global factor name → :class:`Factor` of every adapter parameter on this rank."""
    return {f.key: f for m in adapter_modules(model).values() for f in m.factors()}


# ------------------------------------------------------------------------------------------ add/remove


def add_adapters(model: nn.Module, config: LoraConfig, *, seed: int = 0) -> list[str]:
    """Wrap every module matched by ``config.targets`` (see :mod:`lora.config`); returns their names.

    Each matched module is handled by its family (:mod:`lora.families`: Megatron / TE linears,
    SequentialMLP and TEGroupedMLP experts, a plain TE GroupedLinear); modules inside an experts module or
    an adapter are not matched on their own. Values follow ``config.init`` drawn from ``seed`` per global
    factor name. Base parameters keep their ``requires_grad``; call :func:`freeze_base` to train only the
    adapters. Everything is checked before the model changes.
    """
    modules = dict(model.named_modules())
    inside = [n for n, m in modules.items() if isinstance(m, _WRAPPERS) or _is_experts(m)]
    plans = []
    for name, m in modules.items():
        if not name or not _matches(name, config.targets) or any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(m, _WRAPPERS):
            raise ValueError(f"{name} already has an adapter; remove_adapters() it first")
        family = family_of(m)
        if family is not None and family.adapter_for(model, name, m, config):
            plans.append((name, m, family))
    if not plans:
        raise ValueError(
            f"no Megatron or TE linear, SequentialMLP or TEGroupedMLP matched targets {list(config.targets)}"
        )
    for name, m, _ in plans:
        _check_rank(name, m, config)
    for name, m, family in plans:
        new = family.make_adapter(model, name, m, config)
        new.lora_config = config
        new.reset_adapter(config.init, seed)
        model.set_submodule(name, new)
    return [name for name, _, _ in plans]


def _is_experts(m: nn.Module) -> bool:
    family = family_of(m)
    return family is not None and family.kind == "experts"


def remove_adapters(model: nn.Module, pattern: str = "*") -> list[str]:
    """Unmerge (if merged) and unwrap the matched adapters, restoring the original modules."""
    removed = []
    for name, m in _select(model, pattern).items():
        m.unmerge()
        if isinstance(m, LoraGroupedExperts):
            for attr in ("linear_fc1", "linear_fc2"):
                if isinstance(getattr(m.base, attr), GroupedLoraLinear):
                    setattr(m.base, attr, getattr(m.base, attr).base)
        if isinstance(m, LoraExperts):
            experts = m.base.local_experts
            for i in range(len(experts)):
                if isinstance(experts[i], ExpertParallelAdapter):
                    experts[i] = experts[i].base
                e = experts[i]
                for attr in ("linear_fc1", "linear_fc2"):
                    if isinstance(getattr(e, attr), ExpertLoraLinear):
                        setattr(e, attr, getattr(e, attr).base)
        parent, attr = _locate(model, m)
        setattr(parent, attr, m.base)
        removed.append(name)
    return removed


def enable_adapters(model: nn.Module, pattern: str = "*") -> list[str]:
    """Turn the matched adapters on (their branch is added in forward)."""
    return _set_enabled(model, pattern, True)


def disable_adapters(model: nn.Module, pattern: str = "*") -> list[str]:
    """Turn the matched adapters off (forward = base); a merged adapter must be unmerged first."""
    return _set_enabled(model, pattern, False)


def _set_enabled(model, pattern, value):
    chosen = _select(model, pattern)
    for name, m in chosen.items():
        if m.merged and not value:
            raise RuntimeError(f"{name} is merged into its base weight; unmerge_adapters() first")
        m.enabled = value
    return list(chosen)


def freeze_base(model: nn.Module) -> list[str]:
    """``requires_grad`` only for adapter parameters; returns the names of the trainable parameters.

    On a Megatron GPT model the (now frozen) embedding's output is also made to require grad in training
    forwards: Megatron's full activation recomputation wraps each layer in a reentrant autograd function
    whose outputs need grad only if its input does, so the adapters inside would get no gradient.
    """
    ids = {id(f.param) for f in adapter_factors(model).values()}
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(id(p) in ids)
        if id(p) in ids:
            trainable.append(name)
    inner = model
    while hasattr(inner, "module") and isinstance(inner.module, nn.Module):  # DDP / Float16Module
        inner = inner.module
    embedding = getattr(inner, "embedding", None)
    if isinstance(embedding, nn.Module) and not getattr(embedding, "_svdq_output_needs_grad", False):
        embedding.register_forward_hook(_output_needs_grad)
        embedding._svdq_output_needs_grad = True
    return trainable


def _output_needs_grad(module: nn.Module, args, out):
    """Forward hook: a tensor output computed from frozen weights becomes a leaf requiring grad."""
    if torch.is_grad_enabled() and isinstance(out, torch.Tensor) and out.grad_fn is None:
        out.requires_grad_(True)


def merge_adapters(model: nn.Module, pattern: str = "*") -> list[str]:
    """``W += scaling·B·A`` for the matched adapters (unquantized bases; not parallel expert adapters)."""
    chosen = _select(model, pattern)
    for m in chosen.values():
        m.merge()
    return list(chosen)


def unmerge_adapters(model: nn.Module, pattern: str = "*") -> list[str]:
    """Undo :func:`merge_adapters` (``W -= scaling·B·A``)."""
    chosen = _select(model, pattern)
    for m in chosen.values():
        m.unmerge()
    return list(chosen)


# ------------------------------------------------------------------------------------------ state dict


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Global factor name → this rank's tensor (detached). Under tensor parallelism these are shards;
    under expert parallelism only the local experts' entries (keyed by global expert index)."""
    return {k: f.param.detach() for k, f in adapter_factors(model).items()}


def _metadata(model: nn.Module) -> dict[str, str]:
    groups: list[list] = []
    for name, m in adapter_modules(model).items():
        cfg = m.lora_config.to_dict()
        for entry in groups:
            if entry[0] == cfg:
                entry[1].append(name)
                break
        else:
            groups.append([cfg, [name]])
    return {"format": FILE_FORMAT, "version": FILE_VERSION, "configs": json.dumps(groups)}


def full_adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Global factor name → the WHOLE tensor (detached), on every rank: tensor-parallel shards gathered
    over the (expert-)TP group, per-expert factors of every expert-parallel rank collected (keyed by
    global expert index). The same on every rank, whatever the TP / EP sizes.

    Collective under tensor / expert parallelism: every rank must call it (one all-gather per factor).
    """
    from lora.framework.tp import all_gather, gather_dim
    from lora.io.sites import check_no_pipeline

    check_no_pipeline()
    out: dict[str, torch.Tensor] = {}
    for m in adapter_modules(model).values():
        if not isinstance(m, ExpertGroup):
            tp_group = tp_group_of(m.base)
            out.update({f.key: gather_dim(f.param.detach(), f.dim, tp_group, f.glu) for f in m.factors()})
            continue
        etp, ep = m.base.tp_group, m.base.ep_group
        out.update({f.key: gather_dim(f.param.detach(), f.dim, etp, f.glu) for f in m.shared_factors()})
        for w in m.expert_wrappers():  # the same wrappers in the same order on every rank
            for j, f in enumerate(w.factors()):
                whole = gather_dim(f.param.detach(), f.dim, etp, f.glu)
                for r, t in enumerate(all_gather(whole, ep)):
                    out[w.factors(global_index=r * m.num_local + w.index)[j].key] = t
    return out


def _branch_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules of a plain torch model that carry an SVDQuant branch: every :class:`svdq.SVDQLinear` and
    every projection (``<experts>.fc1`` / ``.fc2``) of an :class:`svdq.experts.SVDQExperts`."""
    from svdq.experts.module import ExpertProjection
    from svdq.layer import SVDQLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, (SVDQLinear, ExpertProjection))}


def branch_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameter name → parameter of the ``lora_down`` / ``lora_up`` branch of every
    :class:`svdq.SVDQLinear` and SVDQuant experts projection of a plain torch model
    (``<layer>.lora_down`` / ``<layer>.lora_up``, ``<experts>.fc1.lora_down`` …)."""
    ids = {id(p) for m in _branch_modules(model).values() for p in (m.lora_down, m.lora_up)}
    return {n: p for n, p in model.named_parameters() if id(p) in ids}


def _branch_metadata(model: nn.Module) -> dict[str, str]:
    layers = {n: m.rank for n, m in _branch_modules(model).items()}
    return {
        "format": FILE_FORMAT,
        "version": FILE_VERSION,
        "configs": "[]",
        "model_kind": TORCH_KIND,
        "layers": json.dumps(layers),
    }


def _full_dims(linear: nn.Module) -> tuple[int, int]:
    """``(out, in)`` of a (possibly tensor-parallel) linear's whole weight."""
    from lora.adapters.layers import linear_mode
    from lora.framework.te import tp_group_of
    from lora.framework.tp import group_rank_size

    out_f, in_f = linear.weight.shape
    try:
        mode = linear_mode(linear)
        size = group_rank_size(tp_group_of(linear))[1]
    except (TypeError, AttributeError):
        return out_f, in_f
    return (out_f * size, in_f) if mode == "column" else (out_f, in_f * size)


def _num_experts(m: nn.Module) -> int:
    """All experts of an experts module (every expert-parallel rank's): what a shared factor spans."""
    config = getattr(m, "config", None)
    total = getattr(config, "num_moe_experts", None)
    return int(total or getattr(m, "num_local_experts", 1) or 1)


def _check_rank(name: str, m: nn.Module, config: LoraConfig) -> None:
    """``ValueError`` naming the layer when a branch's rank exceeds the rank its factors can have:
    ``min(out, in)`` of the weight, or for an expert group's shared factor the rank of the stacked
    experts (shared-down ``min(E·out, in)``, shared-up ``min(out, E·in)``)."""
    experts = _is_experts(m)
    for sub_name, sub in m.named_modules():
        w = getattr(sub, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            continue
        if experts:
            proj = next((p for p in ("fc1", "fc2") if f"linear_{p}" in sub_name.split(".")), None)
            if proj is None or getattr(config, f"{proj}_layout") is None:
                continue
            branch = f"{name}.linear_{proj}"
        elif sub_name:
            continue
        else:
            branch = name
        out_f, in_f = _full_dims(sub)
        r = config.rank_for(branch)
        layout = getattr(config, f"{proj}_layout") if experts else None
        E = _num_experts(m) if layout in (SHARED_DOWN, SHARED_UP) else 1
        bound = min(E * out_f, in_f) if layout == SHARED_DOWN else min(out_f, E * in_f)
        if r > bound:
            dims = f"weight {out_f} × {in_f}" if E == 1 else f"{layout}, {E} experts {out_f} × {in_f}"
            raise ValueError(f"add_adapters: rank {r} of {branch} exceeds {bound}, its largest ({dims})")


def save_adapters(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write every adapter factor as a whole tensor (:func:`full_adapter_state_dict`) and the configs
    (JSON metadata) to a safetensors file, atomically (:func:`lora.io.atomic.atomic_write_file`).

    A plain torch model without :mod:`lora` adapters gets its :class:`svdq.SVDQLinear` branches written
    instead (:func:`branch_parameters`, under their parameter names, which are the factor names of the
    same layer; metadata ``configs: []``, ``model_kind: "torch"`` and ``layers: {layer: rank}``).

    Collective under tensor / expert parallelism: every rank calls it, global rank 0 writes, and a failed
    write raises on every rank. The file does not depend on the TP / EP sizes; :func:`load_adapters`
    reads it at any. (Sharded alternative: ``dist_checkpointing`` on ``model.sharded_state_dict()``.)
    """
    from safetensors.torch import save_file

    from lora.framework.tp import rank0_call
    from lora.io.atomic import atomic_write_file

    path = Path(path)
    if adapter_modules(model):
        tensors = {k: t.contiguous().cpu() for k, t in full_adapter_state_dict(model).items()}
        meta = _metadata(model)
    else:
        params = branch_parameters(model)
        if not params:
            raise ValueError("the model has no adapters")
        tensors = {n: p.detach().cpu().contiguous() for n, p in params.items()}
        meta = _branch_metadata(model)

    from lora.io.values import first_non_finite

    bad = first_non_finite(tensors)
    if bad is not None:
        raise ValueError(f"save_adapters: adapter tensor {bad} holds NaN or inf; refusing to write {path}")

    def write() -> None:
        if not path.parent.is_dir():
            raise FileNotFoundError(f"save_adapters: directory {path.parent} does not exist")
        atomic_write_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    rank0_call(write)
    return path


def adapter_file_format(path: str | os.PathLike) -> str:
    """The ``format`` of an adapter file, read from its header only: ``svdq-lora``, or ``svdq-params``
    for files of the torch branches written before the formats were one. Raises naming the file when it
    is missing (``FileNotFoundError``), not safetensors or not an adapter file (``ValueError``)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            fmt = (fh.metadata() or {}).get("format")
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise ValueError(f"{path} is not a safetensors file: {exc}") from None
    if fmt not in (FILE_FORMAT, OLD_PARAMS_FORMAT):
        raise ValueError(f"{path} is not an adapter file (metadata format {fmt!r})")
    return fmt


def load_adapters(
    model: nn.Module, path: str | os.PathLike, *, strict: bool = True, seed: int = 0
) -> list[str]:
    """Load a :func:`save_adapters` file; returns the adapter names loaded (for the branches of a torch
    model: the parameter names).

    A model without adapters first gets them from the file's configs. Works under tensor / expert
    parallelism (each rank takes its shards and its global experts). Raises, naming the adapter, on a
    missing tensor (``KeyError``) or a shape mismatch (``ValueError``); with ``strict`` also on tensors
    in the file that no adapter expects. Files of torch branches (``model_kind: "torch"``, and the older
    ``svdq-params`` files) are loaded into the model's :class:`svdq.SVDQLinear` branches by parameter name
    (``ValueError`` naming the file and tensor for a missing, mis-shaped or, with ``strict``, unexpected
    tensor).
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    if meta.get("format") == OLD_PARAMS_FORMAT or (
        meta.get("format") == FILE_FORMAT and meta.get("model_kind") == TORCH_KIND
    ):
        return _load_branches(model, Path(path), tensors, strict)
    if meta.get("format") != FILE_FORMAT:
        raise ValueError(f"{path} is not an adapter file (metadata format {meta.get('format')!r})")
    modules = adapter_modules(model)
    if not modules:
        for cfg, names in json.loads(meta["configs"]):
            config = dataclasses.replace(LoraConfig.from_dict(cfg), targets=tuple(names), init="zeros")
            add_adapters(model, config, seed=seed)
        modules = adapter_modules(model)
    expected = set()
    with torch.no_grad():
        for name, m in modules.items():
            expected.update(m.expected_keys())
            for f in m.factors():
                if f.key not in tensors:
                    raise KeyError(f"adapter {name}: tensor {f.key} is missing from {path}")
                f.param.copy_(f.to_local(tensors[f.key].to(f.param.dtype), f"adapter {name}"))
    unexpected = sorted(set(tensors) - expected)
    if strict and unexpected:
        raise ValueError(f"{path} has tensors no adapter of the model expects: {unexpected[:8]}")
    return list(modules)


def _load_branches(model: nn.Module, path: Path, tensors: dict[str, torch.Tensor], strict: bool) -> list[str]:
    """Copy the file's tensors into the :func:`branch_parameters` of the same names (all checked first)."""
    params = branch_parameters(model)
    for name, p in params.items():
        if name not in tensors:
            raise ValueError(f"{path}: tensor {name} is missing (the model's adapter)")
        t = tensors[name]
        if t.shape != p.shape:
            raise ValueError(f"{path}: {name} has shape {tuple(t.shape)}, the model {tuple(p.shape)}")
    extra = sorted(set(tensors) - set(params))
    if strict and extra:
        raise ValueError(f"{path} has tensors the model's adapters do not: {extra[:8]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name].to(p.dtype))
    return list(params)


def shared_adapters_out_of_sync(model: nn.Module) -> list[str]:
    """Keys of expert-shared factors that differ between expert-parallel ranks (collective: call on
    all ranks). Empty when the gradient synchronization works (see :mod:`lora.adapters.layers`)."""
    import torch.distributed as dist

    bad = []
    for m in adapter_modules(model).values():
        if not isinstance(m, ExpertGroup) or m.ep_size == 1:
            continue
        for f in m.shared_factors():
            t = f.param.detach().float()
            hi, lo = t.clone(), t.clone()
            dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=m.base.ep_group)
            dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=m.base.ep_group)
            if not torch.equal(hi, lo):
                bad.append(f.key)
    return bad
