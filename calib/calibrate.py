"""``calib.calibrate(model, forward_loop, config)``: SVDQuant + adapters for a Megatron GPT-MoE model.

Same calling convention as ``svdq.quantize`` and nvidia-modelopt's ``mtq.quantize``. Steps:

1. **Targets**: Megatron linears matching ``config.dense_targets`` and ``SequentialMLP`` experts modules
   matching ``config.expert_targets`` (an empty match is an error, raised before any work). A plain torch
   model (no Megatron module) goes through :func:`svdq.quantize` instead (``nn.Linear`` modules selected by
   ``config.svdq.include`` / ``exclude``), with the same report.
2. **Statistics** by forward pre-hooks, no change to model code: per dense linear the full-feature input
   (gathered over tensor-parallel ranks); per expert the *routed* inputs of its ``linear_fc1`` and, for
   ``linear_fc2``, the routed intermediate activations (SequentialMLP calls each expert on its tokens).
3. **Decompose**: dense layers with :func:`svdq.decompose_linear` on the full weight; each expert group
   with :func:`svdq.moe.decompose_expert_group` (fc1 shared smoothing, fc2 per expert, layout per
   projection at an equal parameter budget, shared factor agreed over the expert-parallel group).
4. **Install**: every target gets adapters initialized from its branch (``lora_down``/``lora_up``) and
   an :class:`~lora.svdq_base.SVDQBase` holding its quantized residual; the base is frozen.
5. **Report**: one row per dense layer and per expert projection (:class:`calib.report.CalibReport`).
"""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from calib.report import CalibReport, dense_row, expert_row, summary_row
from lora.config import LoraConfig
from lora.model import add_adapters, freeze_base
from lora.svdq_base import SVDQBase, gather_full_weight, install_svdq_base, register_stats_hooks
from lora.tp import group_rank_size
from svdq import SVDQConfig, decompose_linear
from svdq.decompose import validate_layer
from svdq.moe import decompose_expert_group
from svdq.stats import run_with_hooks

DENSE_TARGETS = ("*.self_attention.linear_qkv", "*.self_attention.linear_proj")
EXPERT_TARGETS = ("*.mlp.experts",)


@dataclass(frozen=True)
class CalibConfig:
    """What :func:`calibrate` targets and how.

    ``svdq``: formats, rank, smoothing grid, refinement (see :class:`svdq.SVDQConfig`). ``layout``: expert
    layout per projection, ``"auto"`` (best at equal budget) or one of ``shared-down``, ``shared-up``,
    ``per-expert``. ``storage``: ``"packed"`` or ``"fake"`` residuals.
    """

    svdq: SVDQConfig = field(default_factory=SVDQConfig)
    layout: str = "auto"
    dense_targets: tuple[str, ...] = DENSE_TARGETS
    expert_targets: tuple[str, ...] = EXPERT_TARGETS
    storage: str = "packed"
    progress: bool = True


def _match(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def find_targets(model: nn.Module, config: CalibConfig) -> tuple[dict, dict]:
    """``(dense linears, SequentialMLP modules)`` by name; raises if nothing matches."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.moe.experts import SequentialMLP

    dense, experts = {}, {}
    for name, m in model.named_modules():
        if isinstance(m, SequentialMLP) and _match(name, config.expert_targets):
            experts[name] = m
        elif isinstance(m, ColumnParallelLinear | RowParallelLinear) and _match(name, config.dense_targets):
            if ".experts." not in name:
                dense[name] = m
    if not dense and not experts:
        raise ValueError(
            f"no target matched dense_targets={list(config.dense_targets)} "
            f"expert_targets={list(config.expert_targets)}"
        )
    return dense, experts


def _validate(dense: dict, experts: dict, config: CalibConfig) -> None:
    """Shape / format / finiteness checks for every target, before any calibration work."""
    for name, lin in dense.items():
        validate_layer(name, lin.weight, config.svdq)
    for name, moe in experts.items():
        if group_rank_size(moe.tp_group)[1] > 1:
            raise ValueError(f"{name}: expert tensor parallelism > 1 is not supported by calibrate yet")
        for i, e in enumerate(moe.local_experts):
            for proj in ("linear_fc1", "linear_fc2"):
                w = getattr(e, proj).weight
                if not bool(torch.isfinite(w).all()):
                    raise ValueError(f"{name}.local_experts.{i}.{proj}: weight contains NaN or Inf")


def calibrate(model: nn.Module, forward_loop, config: CalibConfig = CalibConfig()) -> CalibReport:
    """Calibrate ``model`` in place (see the module docstring); returns the report.

    ``forward_loop(model)`` runs the calibration batches (no gradients needed). Afterwards every target
    is an adapter wrapper over a frozen SVDQuant base; only adapter parameters require gradients.
    """
    t0 = time.perf_counter()
    if not _has_megatron_modules(model):
        return _calibrate_torch(model, forward_loop, config, t0)
    dense, experts = find_targets(model, config)
    _validate(dense, experts, config)
    cfg = config.svdq
    hooked = dict(dense)
    for name, moe in experts.items():
        for i, e in enumerate(moe.local_experts):
            hooked[f"{name}.{i}.fc1"] = e.linear_fc1
            hooked[f"{name}.{i}.fc2"] = e.linear_fc2
    stats, handles = register_stats_hooks(hooked, cfg.sample_tokens, cfg.seed)
    run_with_hooks(model, forward_loop, handles)
    for name, st in stats.items():
        if st.nonfinite:
            raise ValueError(f"{name}: calibration activations contain NaN or Inf")

    rows, results = [], {}
    work = [("dense", n) for n in dense] + [("experts", n) for n in experts]
    for kind, name in tqdm(work, desc="calibrate", unit="layer", disable=not config.progress):
        if kind == "dense":
            lin = dense[name]
            result = decompose_linear(gather_full_weight(lin), stats[name], cfg, name=name)
            add_adapters(
                model,
                LoraConfig(rank=cfg.rank, targets=(name,), fc1_layout=None, fc2_layout=None, init="zeros"),
            )
            install_svdq_base(model.get_submodule(name), result, cfg.act_format, config.storage)
            rows.append(dense_row(name, result))
            results[name] = result
        else:
            for proj, res in _calibrate_experts(model, name, experts[name], stats, config).items():
                rows.append(expert_row(name, proj, res))
                results[f"{name}.linear_{proj}"] = res
    freeze_base(model)
    seconds = time.perf_counter() - t0
    return CalibReport(
        rows=rows, config=cfg.to_dict(), layout=config.layout, seconds=seconds, results=results
    )


def _has_megatron_modules(model: nn.Module) -> bool:
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.moe.experts import SequentialMLP

    kinds = (ColumnParallelLinear, RowParallelLinear, SequentialMLP)
    return any(isinstance(m, kinds) for m in model.modules())


def _calibrate_torch(model: nn.Module, forward_loop, config: CalibConfig, t0: float) -> CalibReport:
    """A plain torch model: ``svdq.quantize`` replaces the ``nn.Linear`` modules selected by
    ``config.svdq.include`` / ``exclude`` with :class:`svdq.SVDQLinear` (the branch is the trainable
    lora_down / lora_up), then the report is built from their summaries."""
    from svdq import SVDQLinear, quantize

    quantize(model, config.svdq, forward_loop, storage=config.storage, progress=config.progress)
    rows = [
        summary_row(name, m.svdq_summary) for name, m in model.named_modules() if isinstance(m, SVDQLinear)
    ]
    seconds = time.perf_counter() - t0
    return CalibReport(rows=rows, config=config.svdq.to_dict(), layout="-", seconds=seconds)


def _calibrate_experts(model, name, moe, stats, config: CalibConfig) -> dict:
    """Decompose fc1 and fc2 of one SequentialMLP, add its adapters and quantized bases; returns
    ``{"fc1": MoEGroupResult, "fc2": MoEGroupResult}``."""
    cfg = config.svdq
    ep_group = moe.ep_group if group_rank_size(moe.ep_group)[1] > 1 else None
    experts = list(moe.local_experts)
    results = {}
    for proj in ("fc1", "fc2"):
        weights = [getattr(e, f"linear_{proj}").weight.detach() for e in experts]
        group_stats = [stats[f"{name}.{i}.{proj}"] for i in range(len(experts))]
        results[proj] = decompose_expert_group(
            weights,
            group_stats,
            cfg,
            projection=proj,
            layout=config.layout,
            group=ep_group,
            name=f"{name}.linear_{proj}",
        )
    r1, r2 = results["fc1"], results["fc2"]
    lcfg = LoraConfig(
        rank=max(r1.rank, r2.rank),
        targets=(name,),
        fc1_layout=r1.layout,
        fc2_layout=r2.layout,
        fc1_rank=r1.rank,
        fc2_rank=r2.rank,
        init="zeros",
    )
    add_adapters(model, lcfg)
    group = model.get_submodule(name)
    for proj, res in results.items():
        downs = res.shared_down if res.shared_down is not None else torch.stack(list(res.lora_downs))
        ups = res.shared_up if res.shared_up is not None else torch.stack(list(res.lora_ups))
        group.init_from(proj, downs, ups)
        for i, expert in enumerate(group.base.local_experts):
            wrapper = getattr(expert, f"linear_{proj}")
            wrapper.base = SVDQBase(
                wrapper.base, res.residuals[i], res.expert_smooth(i), cfg.act_format, config.storage
            )
    return results
