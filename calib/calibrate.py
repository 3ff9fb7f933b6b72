"""``calib.calibrate(model, forward_loop, config)``: SVDQuant + adapters for a Megatron GPT-MoE model.

Same calling convention as ``svdq.quantize`` and nvidia-modelopt's ``mtq.quantize``. Steps:

1. **Targets**, found by module family (:mod:`lora.families`): linears (Megatron local or Transformer
   Engine) matching ``config.dense_targets`` and experts modules (``SequentialMLP``, ``TEGroupedMLP``)
   matching ``config.expert_targets`` (an empty match is an error, raised before any work). A matched
   ``TEGroupedMLP`` is first replaced by the equivalent SequentialMLP of TE expert linears
   (:func:`lora.framework.te_convert.ungroup_experts`): quantized experts run per expert. Each target is
   installed by :mod:`lora.install` (a TE linear with a fused input norm is split there). A plain torch
   model (no Megatron module) goes through :func:`svdq.quantize` instead (``nn.Linear`` modules selected
   by ``config.svdq.include`` / ``exclude``), with the same report.
2. **Statistics** by forward pre-hooks, no change to model code: per dense linear the full-feature input
   (gathered over tensor-parallel ranks); per expert the *routed* inputs of its ``linear_fc1`` and, for
   ``linear_fc2``, the routed intermediate activations (SequentialMLP calls each expert on its tokens; the
   router probability is applied after the activation, so it is part of fc2's input).
3. **Decompose**: dense layers with :func:`svdq.decompose_linear` on the full weight; each expert group
   with :func:`svdq.solvers.expert_group.decompose_expert_group` on the full expert weights (fc1 shared
   smoothing, fc2 per expert, layout per projection at an equal parameter budget — by default a shared
   lora_down for fc1 and the best layout for fc2 —, shared factor agreed over the expert-parallel group).
4. **Install**: every target gets adapters initialized from its branch (``lora_down``/``lora_up``) and
   an :class:`~lora.base.SVDQBase` holding its quantized residual (this rank's tensor-parallel
   shard); the base is frozen.
5. **Activation ranges** (``act_range="static"``, the default): ``forward_loop`` runs once more through
   the installed layers (dynamic ranges) and every SVDQuant base gets ``input_amax = k · max|x/s|`` over
   all calibration batches (``k = svdq.act_range_margin``: headroom for held-out inputs above the
   calibrated maximum, svdq/DESIGN.md §20), all-reduced (MAX) over its tensor-parallel group, per expert
   for experts
   (:func:`lora.base.calibrate_input_ranges`). Formats without a per-tensor range (int4, per-channel
   fp8) and experts that get no token in that pass stay dynamic. ``"dynamic"`` skips this pass.
6. **Report**: one row per dense layer and per expert projection (:class:`calib.report.CalibReport`).

**Modes.** ``mode="all"`` collects the statistics of every target in one pass of ``forward_loop`` (peak
statistics memory: all targets). ``mode="layerwise"`` runs steps 2–4 one transformer layer
(``….layers.<i>``) at a time: hooks on that layer's targets only, one pass of ``forward_loop``, decompose,
install, free the statistics, next layer. Peak statistics memory is one layer's, at the price of one
forward pass per layer. This is the usual sequential scheme: later layers are calibrated on the outputs of
the already quantized earlier layers (with dynamic activation ranges; step 5 comes at the end), so their
figures differ slightly from "all" mode. If a layer fails (e.g. non-finite activations), the layers before
it stay quantized in place.

**Parallelism.** Tensor parallelism (dense and expert TP) and expert parallelism: every rank decomposes
the full weights from full-feature statistics and keeps its shard, so TP=2 reproduces TP=1. All ranks
call ``calibrate`` with the same config. Expert-parallel ranks of one data shard feed the same batches.

**Data parallelism** (svdq/DESIGN.md §17): the ranks of the data-parallel group
(:func:`lora.framework.parallel.data_parallel_group`) may feed disjoint shards of the calibration data.
Before any decomposition the statistics are merged over that group (:func:`merge_input_stats`: second
moments and token counts summed, absmax maxed, the token samples pooled), and the static activation ranges
are maxed over it, so the result equals a one-process calibration on the union of the shards (to float
round-off, with ``sample_tokens`` above the pooled token count; otherwise the pooled sample is another
uniform sample of the same tokens).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from calib.report import CalibReport, act_range_label, dense_row, expert_row, summary_row
from lora.base import calibrate_input_ranges
from lora.config import LoraConfig
from lora.families import family_of, is_megatron_model
from lora.families.megatron_linear import is_glu_fc1
from lora.framework.full_input import full_in_features, full_input
from lora.framework.parallel import data_parallel_group
from lora.framework.te import tp_group_of
from lora.framework.tp import group_rank_size
from lora.install import ExpertProjection, install_experts, install_linear
from lora.model import freeze_base
from svdq import SVDQConfig, decompose_linear
from svdq.config_base import ConfigBase
from svdq.residual import ACT_RANGES
from svdq.solvers.allocation import ALLOCATIONS, allocate_ranks, dense_site, expert_site
from svdq.solvers.expert_group import decompose_expert_group
from svdq.solvers.linear import validate_layer
from svdq.solvers.shared_basis import DEFAULT_EXPERT_LAYOUT, expert_layouts
from svdq.stats import InputStats, collect_input_stats

DENSE_TARGETS = ("*.self_attention.linear_qkv", "*.self_attention.linear_proj")
EXPERT_TARGETS = ("*.mlp.experts",)
MODES = ("all", "layerwise")
_LAYER = re.compile(r"^(.*?\.layers\.\d+)\.")


@dataclass(frozen=True)
class CalibConfig(ConfigBase):
    """What :func:`calibrate` targets and how.

    ``svdq``: formats, rank, smoothing grid, refinement (see :class:`svdq.SVDQConfig`). ``layout``: expert
    layout per projection, ``{"fc1": ..., "fc2": ...}`` (a single string sets both; see
    :func:`svdq.solvers.shared_basis.expert_layouts`), default shared-down for fc1 and ``"auto"`` for fc2;
    each ``"auto"`` (best at equal budget) or one of ``shared-down``, ``shared-up``,
    ``per-expert``. ``storage``: ``"packed"`` or ``"fake"`` residuals. ``mode``: ``"all"`` (one statistics
    pass for every target) or ``"layerwise"`` (one transformer layer at a time, bounded memory; see the
    module docstring). ``act_range``: ``"static"`` (calibrated per-tensor activation ranges) or
    ``"dynamic"`` (per call, the behaviour before static ranges existed). ``rank_allocation``:
    ``"uniform"`` (``svdq.rank`` everywhere) or ``"sensitivity"`` (the same total branch budget spread over
    the layers of each statistics pass by measured sensitivity, svdq/DESIGN.md §19; in ``"all"`` mode one
    global budget; ranks are in the report).
    """

    svdq: SVDQConfig = field(default_factory=SVDQConfig)
    layout: str | dict = field(default_factory=lambda: dict(DEFAULT_EXPERT_LAYOUT))
    dense_targets: tuple[str, ...] = DENSE_TARGETS
    expert_targets: tuple[str, ...] = EXPERT_TARGETS
    storage: str = "packed"
    progress: bool = True
    mode: str = "all"
    act_range: str = "static"
    rank_allocation: str = "uniform"

    def normalize(self) -> None:
        object.__setattr__(self, "layout", expert_layouts(self.layout))
        for name in ("dense_targets", "expert_targets"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"CalibConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.act_range not in ACT_RANGES:
            raise ValueError(f"CalibConfig.act_range must be one of {ACT_RANGES}, got {self.act_range!r}")
        if self.rank_allocation not in ALLOCATIONS:
            raise ValueError(
                f"CalibConfig.rank_allocation must be one of {ALLOCATIONS}, got {self.rank_allocation!r}"
            )


def _match(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def find_targets(model: nn.Module, config: CalibConfig) -> tuple[dict, dict]:
    """``(dense linears, experts modules)`` by name: modules of a quantizable family
    (:mod:`lora.families`) of kind ``"linear"`` matching ``config.dense_targets`` (not inside an experts
    module) and of kind ``"experts"`` matching ``config.expert_targets``; raises if nothing matches."""
    dense, experts = {}, {}
    for name, m in model.named_modules():
        family = family_of(m)
        if family is None or not family.quantizable or not family.megatron:
            continue
        if family.kind == "experts" and _match(name, config.expert_targets):
            experts[name] = m
        elif family.kind == "linear" and _match(name, config.dense_targets) and ".experts." not in name:
            dense[name] = m
    if not dense and not experts:
        raise ValueError(
            f"no target matched dense_targets={list(config.dense_targets)} "
            f"expert_targets={list(config.expert_targets)}"
        )
    return dense, experts


def layer_key(name: str) -> str:
    """The transformer layer of a target: ``decoder.layers.3`` for
    ``decoder.layers.3.self_attention.linear_qkv``; a target outside ``….layers.<i>`` is its own layer."""
    m = _LAYER.match(name)
    return m.group(1) if m else name


def _resumable_work(model: nn.Module, dense: dict, experts: dict, done_layers: dict) -> tuple[list, set]:
    """``(work, done)``: every ``(kind, name)`` target in module order — those still to calibrate and those
    of ``done_layers`` (rebuilt from their rows: ``kind`` ``"dense"`` / ``"experts fc1"``, an expert row's
    layer ``<experts>.linear_fc1``) — and the set of the done ones."""
    done = set()
    for layer_rows in done_layers.values():
        for r in layer_rows:
            if r["kind"] == "dense":
                done.add(("dense", r["layer"]))
            else:
                done.add(("experts", r["layer"].rsplit(".linear_", 1)[0]))
    names = {n: k for k, n in done} | dict.fromkeys(dense, "dense") | dict.fromkeys(experts, "experts")
    work = [(names[n], n) for n, _ in model.named_modules() if n in names]
    missing = {n for _, n in done} - {n for _, n in work}
    if missing:
        raise ValueError(f"resumed layer(s) {sorted(missing)} are not modules of this model")
    return work, done


def stats_nbytes(stats) -> int:
    """Bytes held by :class:`~svdq.stats.InputStats` objects: second moment (``in² × 8``), absmax
    (``in × 4``) and token sample (``k × in × 4``)."""
    return sum(
        t.numel() * t.element_size() for st in stats for t in (st.gram, st.absmax, st.sample) if t is not None
    )


def _is_rank0() -> bool:
    """Global rank 0, or no process group (who shows the progress bars)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def _validate(dense: dict, experts: dict, config: CalibConfig) -> None:
    """Shape / format / finiteness checks for every target, before any calibration work."""
    for name, lin in dense.items():
        validate_layer(name, lin.weight, config.svdq)
    for name, moe in experts.items():
        for i, e in enumerate(moe.local_experts):
            for proj in ("linear_fc1", "linear_fc2"):
                w = getattr(e, proj).weight
                if not bool(torch.isfinite(w).all()):
                    raise ValueError(f"{name}.local_experts.{i}.{proj}: weight contains NaN or Inf")


def calibrate(
    model: nn.Module,
    forward_loop,
    config: CalibConfig = CalibConfig(),
    *,
    done_layers: dict[str, list[dict]] | None = None,
    on_layer=None,
) -> CalibReport:
    """Calibrate ``model`` in place (see the module docstring); returns the report.

    ``forward_loop(model)`` runs the calibration batches (no gradients needed). It is called once
    (``mode="all"``) or once per transformer layer (``"layerwise"``), plus once for static activation
    ranges. Afterwards every target is an adapter wrapper over a frozen SVDQuant base; only adapter
    parameters require gradients. ``report.peak_stats_bytes``: the most statistics bytes alive at once
    (:func:`stats_nbytes`; all targets in "all" mode, the largest layer in "layerwise" mode).

    Resuming (``mode="layerwise"`` only, see :func:`_resumable_work`): ``on_layer(layer, rows)`` is called
    after each finished transformer layer with its report rows; ``done_layers`` maps layers finished by
    an earlier run (already installed in ``model``, e.g. loaded from its partial checkpoint) to their rows:
    they are skipped, and the result equals an uninterrupted run's.
    """
    t0 = time.perf_counter()
    if not is_megatron_model(model):
        return _calibrate_torch(model, forward_loop, config, t0)
    done_layers = done_layers or {}
    if done_layers and config.mode != "layerwise":
        raise ValueError("resuming a calibration needs mode='layerwise'")
    if done_layers:
        try:
            dense, experts = find_targets(model, config)
        except ValueError:  # every layer was finished before
            dense, experts = {}, {}
    else:
        dense, experts = find_targets(model, config)
    # the experts module whose linears get the bases (a TEGroupedMLP becomes a SequentialMLP of TE linears)
    experts = {n: family_of(m).experts_for_quantization(model, n) for n, m in experts.items()}
    _validate(dense, experts, config)
    work, done_items = _resumable_work(model, dense, experts, done_layers)
    layerwise = config.mode == "layerwise"
    if layerwise:
        by_layer: dict[str, list] = {}
        for item in work:
            by_layer.setdefault(layer_key(item[1]), []).append(item)
        passes = list(by_layer.values())
    else:
        passes = [work]
    show = config.progress and _is_rank0()  # one set of bars under data parallelism
    rows, results, peak = {}, {}, 0
    for items in tqdm(passes, desc="calibrate (layerwise)", unit="layer", disable=not show or not layerwise):
        layer = layer_key(items[0][1])
        if layerwise and layer in done_layers:  # finished by an earlier run: installed, rows recorded
            rows.update((r["layer"], dict(r)) for r in done_layers[layer])
            continue
        stats = _collect_stats(model, forward_loop, items, dense, experts, config.svdq)
        peak = max(peak, stats_nbytes(stats.values()))
        alloc = _allocate(model, items, dense, experts, stats, config)
        for kind, name in tqdm(items, desc="calibrate", unit="layer", disable=not show or layerwise):
            if kind == "dense":
                rows[name], results[name] = _calibrate_dense(
                    model, name, dense[name], stats[name], config, alloc.get(name)
                )
                continue
            for proj, res in _calibrate_experts(model, name, experts[name], stats, config, alloc).items():
                row = expert_row(name, proj, res)
                row["stats_bytes"] = stats_nbytes(stats[f"{name}.{i}.{proj}"] for i in range(res.num_experts))
                rows[row["layer"]], results[row["layer"]] = row, res
        del stats
        if layerwise and on_layer is not None:
            on_layer(layer, [rows[k] for k in rows if layer_key(k) == layer])
    freeze_base(model)
    bases = _svdq_bases(model, work)
    ranges = dict.fromkeys(bases)
    if config.act_range == "static":
        ranges = calibrate_input_ranges(
            model, forward_loop, bases, extra_group=data_parallel_group(), margin=config.svdq.act_range_margin
        )
    for layer, row in rows.items():
        row["input_amax"] = (
            ranges[layer] if layer in bases else [ranges[k] for k in bases if k.startswith(layer + "#")]
        )
        row["act_range"] = act_range_label(row["input_amax"])
    report = CalibReport(
        rows=list(rows.values()),
        config=config.svdq.to_dict(),
        layout=config.layout,
        seconds=time.perf_counter() - t0,
        results=results,
        mode=config.mode,
        act_range=config.act_range,
        peak_stats_bytes=peak,
    )
    if show and config.svdq.residual_quant != "rtn":
        tqdm.write(report.residual_quant_line())
    return report


def _collect_stats(model, forward_loop, items, dense: dict, experts: dict, cfg: SVDQConfig) -> dict:
    """One pass of ``forward_loop`` with statistics hooks on the targets ``items`` only; raises (on every
    rank) if an activation is not finite. Keys: dense names, ``"<experts>.<i>.fc1"`` / ``.fc2``."""
    hooked = {}
    for kind, name in items:
        if kind == "dense":
            hooked[name] = dense[name]
            continue
        for i, e in enumerate(experts[name].local_experts):
            hooked[f"{name}.{i}.fc1"] = e.linear_fc1
            hooked[f"{name}.{i}.fc2"] = e.linear_fc2
    stats = collect_input_stats(
        model,
        hooked,
        forward_loop,
        cfg.sample_tokens,
        cfg.seed,
        transform=full_input,
        in_features=full_in_features,
    )
    merge_input_stats(stats, data_parallel_group(), next(model.parameters()).device)
    _raise_if_nonfinite(model, stats)
    return stats


def merge_input_stats(stats: dict[str, InputStats], group, device) -> None:
    """Merge every rank's statistics over ``group`` in place (``None`` or a group of one: nothing to do):
    ``n_tokens`` and ``gram`` (``in × in`` float64) summed, ``absmax`` (``in``) maxed, ``nonfinite`` or-ed,
    and the token samples (``k_r × in`` float32) pooled in rank order; when the pool exceeds
    ``sample_size`` rank ``r`` keeps ``≈ sample_size · n_r / n`` of its rows, drawn with the statistics'
    ``seed`` (each rank's reservoir is uniform over its tokens, so the pool stays uniform over all of them).
    Collective: every rank calls it with the same keys in the same order."""
    if group is None or dist.get_world_size(group) == 1:
        return
    size = dist.get_world_size(group)
    names = list(stats)
    rows_of = [0 if st.sample is None else st.sample.shape[0] for st in stats.values()]
    counts = torch.tensor(
        [[st.n_tokens, int(st.nonfinite), k] for st, k in zip(stats.values(), rows_of)],
        dtype=torch.int64,
        device=device,
    ).reshape(len(names), 3)  # (layers, [tokens, nonfinite, sample rows])
    per_rank = [torch.empty_like(counts) for _ in range(size)]
    dist.all_gather(per_rank, counts, group=group)
    per_rank = torch.stack(per_rank).cpu()  # (ranks, layers, 3)
    for j, name in enumerate(names):
        st = stats[name]
        n = int(per_rank[:, j, 0].sum())
        f = st.in_features
        zero = torch.zeros(f, f, dtype=torch.float64, device=device)
        gram = zero if st.gram is None else st.gram.to(device)  # (in, in) float64
        absmax = st.absmax.to(device) if st.absmax is not None else torch.zeros(f, device=device)
        dist.all_reduce(gram, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(absmax, op=dist.ReduceOp.MAX, group=group)
        rows = per_rank[:, j, 2].tolist()
        sample = st.sample.to(device) if st.sample is not None else torch.empty(0, f, device=device)
        padded = torch.zeros(max(rows), f, dtype=torch.float32, device=device)  # (max k_r, in)
        padded[: sample.shape[0]] = sample
        pooled = [torch.empty_like(padded) for _ in range(size)]
        dist.all_gather(pooled, padded, group=group)
        parts = [p[:k] for p, k in zip(pooled, rows)]
        if sum(rows) > st.sample_size:
            tokens = per_rank[:, j, 0].double()
            keep = torch.floor(tokens / tokens.sum() * st.sample_size).long().clamp(max=torch.tensor(rows))
            g = torch.Generator().manual_seed(st.seed + 7919)
            picks = [torch.randperm(p.shape[0], generator=g)[: int(m)] for p, m in zip(parts, keep)]
            parts = [p[i.sort().values.to(device)] for p, i in zip(parts, picks)]
        st.n_tokens = n
        st.nonfinite = bool(per_rank[:, j, 1].any())
        st.gram = gram if n > 0 else None
        st.absmax = absmax if n > 0 else None
        st.sample = torch.cat(parts) if n > 0 and st.sample_size > 0 else st.sample


def _raise_if_nonfinite(model: nn.Module, stats: dict[str, InputStats]) -> None:
    """``ValueError`` naming the first layer whose calibration activations were not finite, raised on every
    rank (the others would otherwise wait in the next collective)."""
    bad = [name for name, st in stats.items() if st.nonfinite]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([int(bool(bad))], dtype=torch.int64, device=next(model.parameters()).device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not bad:
            raise ValueError("calibration activations contain NaN or Inf on another rank")
    if bad:
        raise ValueError(f"{bad[0]}: calibration activations contain NaN or Inf")


def _allocate(model, items, dense: dict, experts: dict, stats: dict, config: CalibConfig) -> dict:
    """``rank_allocation="sensitivity"``: the ranks of one statistics pass (svdq/DESIGN.md §19) —
    ``{dense name: rank, "<experts>.linear_fc1" / "….linear_fc2": branch parameter budget}``; ``{}`` for
    uniform allocation. Expert groups need all experts in this process (expert-parallel size 1)."""
    if config.rank_allocation == "uniform":
        return {}
    cfg, sites = config.svdq, []
    for kind, name in items:
        if kind == "dense":
            w = family_of(dense[name]).full_weight(dense[name], is_glu_fc1(model, name))
            sites.append(dense_site(name, w.detach(), stats[name], cfg))
            continue
        moe = experts[name]
        if group_rank_size(moe.ep_group)[1] > 1:
            raise ValueError(
                f"{name}: rank_allocation='sensitivity' needs expert-parallel size 1 (every expert local)"
            )
        glu = bool(moe.config.gated_linear_unit)
        for proj in ("fc1", "fc2"):
            linears = [getattr(e, f"linear_{proj}") for e in moe.local_experts]
            weights = [family_of(lin).full_weight(lin, glu and proj == "fc1").detach() for lin in linears]
            group_stats = [stats[f"{name}.{i}.{proj}"] for i in range(len(linears))]
            sites.append(expert_site(f"{name}.linear_{proj}", weights, group_stats, cfg, config.layout[proj]))
    ranks = allocate_ranks(sites)
    return {s.name: ranks[s.name] * (1 if s.layout == "-" else s.cost) for s in sites}


def _calibrate_dense(
    model, name: str, linear: nn.Module, stats: InputStats, config: CalibConfig, rank: int | None = None
):
    """Decompose one dense linear on its full weight and install its quantized base with the branch as
    the adapter (``rank``: an allocated rank instead of ``config.svdq.rank``); returns
    ``(report row, SVDQResult)``."""
    cfg = config.svdq if rank is None else dataclasses.replace(config.svdq, rank=rank)
    glu = is_glu_fc1(model, name)
    result = decompose_linear(family_of(linear).full_weight(linear, glu), stats, cfg, name=name)
    install_linear(
        model,
        name,
        residual=result.residual,
        smooth=result.smooth,
        act_format=cfg.act_format,
        lora_down=result.lora_down,
        lora_up=result.lora_up,
        lora_config=LoraConfig(
            rank=cfg.rank, targets=(name,), fc1_layout=None, fc2_layout=None, init="zeros"
        ),
        storage=config.storage,
        glu=glu,
    )
    row = dense_row(name, result)
    row["stats_bytes"] = stats_nbytes([stats])
    return row, result


def _svdq_bases(model: nn.Module, work) -> dict:
    """The installed SVDQuant bases: a dense layer under its name, local expert ``i`` of an experts module
    under ``"<experts>.linear_fc1#<i>"`` / ``"….linear_fc2#<i>"`` (the same order on every rank)."""
    bases = {}
    for kind, name in work:
        module = model.get_submodule(name)
        if kind == "dense":
            bases[name] = module.base
            continue
        for proj in ("fc1", "fc2"):
            for i, expert in enumerate(module.base.local_experts):
                bases[f"{name}.linear_{proj}#{i}"] = getattr(expert, f"linear_{proj}").base
    return bases


def _calibrate_torch(model: nn.Module, forward_loop, config: CalibConfig, t0: float) -> CalibReport:
    """A plain torch model: ``svdq.quantize`` replaces the ``nn.Linear`` modules selected by
    ``config.svdq.include`` / ``exclude`` with :class:`svdq.SVDQLinear` (the branch is the trainable
    lora_down / lora_up), then the report is built from their summaries."""
    from svdq import SVDQLinear, quantize

    if config.mode != "all":
        raise ValueError(f"mode={config.mode!r} needs a Megatron model; plain torch models use mode='all'")
    if data_parallel_group() is not None:
        raise ValueError(
            "data-parallel calibration (several processes) needs a Megatron model; calibrate a plain torch "
            "model in one process"
        )
    quantize(
        model,
        config.svdq,
        forward_loop,
        storage=config.storage,
        progress=config.progress,
        act_range=config.act_range,
        rank_allocation=config.rank_allocation,
    )
    rows = [
        summary_row(name, m.svdq_summary) for name, m in model.named_modules() if isinstance(m, SVDQLinear)
    ]
    return CalibReport(
        rows=rows,
        config=config.svdq.to_dict(),
        layout="-",
        seconds=time.perf_counter() - t0,
        act_range=config.act_range,
    )


def _fc1_consumer(moe, fc1s: list) -> dict:
    """``{"activation": …, "bias": …}`` for :func:`decompose_expert_group`'s fc1 objective
    (``SVDQConfig.fc1_objective``): Megatron ``MLP.forward``'s activation of the full ``[gate; up]`` output
    (the routing probability left out) and the experts' fc1 biases ``(E × out)``. Biases sharded by expert
    tensor parallelism are not gathered: such a group keeps the output objective (``{}``)."""
    from lora.adapters.grouped_svdq import _activation  # the one copy of Megatron's expert activation

    biases = [getattr(lin, "bias", None) for lin in fc1s]
    bias = None
    if any(b is not None and b.numel() for b in biases):
        if group_rank_size(tp_group_of(fc1s[0]))[1] > 1 or any(b is None for b in biases):
            return {}
        bias = torch.stack([b.detach().float() for b in biases])  # (E, out)
    config = moe.config

    def activation(h: Tensor) -> Tensor:  # (…, out) -> (…, F)
        return _activation(config, h, h.new_ones(h.shape[:-1]))

    return {"activation": activation, "bias": bias}


def _calibrate_experts(model, name, moe, stats, config: CalibConfig, alloc: dict | None = None) -> dict:
    """Decompose fc1 and fc2 of one SequentialMLP on the full expert weights (gathered over expert tensor
    parallelism; a GLU fc1 as ``[gate; up]``), add its adapters and quantized bases (this rank's shards;
    ``alloc``: allocated branch budgets by ``"<name>.linear_<proj>"``); returns
    ``{"fc1": MoEGroupResult, "fc2": MoEGroupResult}``."""
    cfg = config.svdq
    ep_group = moe.ep_group if group_rank_size(moe.ep_group)[1] > 1 else None
    glu = bool(moe.config.gated_linear_unit)
    experts = list(moe.local_experts)
    results = {}
    for proj in ("fc1", "fc2"):
        linears = [getattr(e, f"linear_{proj}") for e in experts]
        weights = [family_of(lin).full_weight(lin, glu and proj == "fc1") for lin in linears]
        group_stats = [stats[f"{name}.{i}.{proj}"] for i in range(len(experts))]
        results[proj] = decompose_expert_group(
            weights,
            group_stats,
            cfg,
            projection=proj,
            layout=config.layout[proj],
            budget=(alloc or {}).get(f"{name}.linear_{proj}"),
            ep_group=ep_group,
            name=f"{name}.linear_{proj}",
            **(_fc1_consumer(moe, linears) if proj == "fc1" else {}),
        )
    r1, r2 = results["fc1"], results["fc2"]
    lcfg = LoraConfig(
        rank=max(r1.rank, r2.rank),
        targets=(name,),
        fc1_layout=r1.layout,
        fc2_layout=r2.layout,
        rank_pattern={f"{name}.linear_fc1": r1.rank, f"{name}.linear_fc2": r2.rank},
        init="zeros",
    )
    projections = {
        proj: ExpertProjection(
            residuals=list(res.residuals),
            smooths=[res.expert_smooth(i) for i in range(len(experts))],
            act_format=cfg.act_format,
            lora_down=res.shared_down if res.shared_down is not None else torch.stack(list(res.lora_downs)),
            lora_up=res.shared_up if res.shared_up is not None else torch.stack(list(res.lora_ups)),
        )
        for proj, res in results.items()
    }
    install_experts(model, name, projections, lora_config=lcfg, storage=config.storage)
    return results
