"""``svdq.quantize(model, config, forward_loop)``: replace targeted ``nn.Linear`` modules with SVDQLinear and
fused experts modules (Hugging Face style, 3-D expert weights) with :class:`svdq.experts.SVDQExperts`.

Same calling convention as nvidia-modelopt's ``mtq.quantize``: ``forward_loop(model)`` runs the
calibration batches. Input statistics are gathered by forward hooks (no change to model code): one pass
feeds the linears' hooks and the experts' routed per-expert hooks (:mod:`svdq.experts.stats`).

Targets and what stays in 16 bits (routers, embeddings, norms, excluded modules) follow
:mod:`svdq.experts.coverage`; the account is attached as ``model.svdq_coverage`` and printed once. Each
experts module's two projections are decomposed as expert groups (svdq/DESIGN.md §4) in the layouts of
``layout`` (:func:`svdq.solvers.shared_basis.expert_layouts`; default fc1 shared-down, fc2 auto).

With ``act_range="static"`` (the default) ``forward_loop`` runs a second time after the layers are
replaced (with dynamic activation ranges) and each layer's per-tensor range ``input_amax = max|x/s|`` over
all calibration batches is recorded (:func:`svdq.stats.record_input_amax`; per expert for experts,
:func:`svdq.experts.stats.record_experts_amax`) and fixed (see :mod:`svdq.residual`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import torch
from torch import nn
from tqdm import tqdm

from svdq import timing
from svdq.config import SVDQConfig
from svdq.experts.coverage import Coverage, scan_model
from svdq.experts.module import ProjectionState, install_svdq_experts
from svdq.experts.stats import register_experts_hooks, start_recording, stop_recording
from svdq.layer import install_svdq_linear
from svdq.residual import ACT_RANGES, static_range_supported
from svdq.solvers.allocation import ALLOCATIONS, allocate_ranks, dense_site, expert_site
from svdq.solvers.expert_group import decompose_expert_group
from svdq.solvers.linear import SVDQResult, decompose_linear, validate_layer
from svdq.solvers.shared_basis import expert_layouts
from svdq.stats import InputStats, record_input_amax, register_input_hooks, run_with_hooks


def find_targets(model: nn.Module, config: SVDQConfig) -> dict[str, nn.Linear]:
    """``nn.Linear`` modules whose qualified name matches an ``include`` pattern and no ``exclude`` one
    (routers excluded, :mod:`svdq.experts.coverage`)."""
    return scan_model(model, config.include, config.exclude, allow_unsupported=True).linears


def _validate_experts(name: str, module: nn.Module, handler, config: SVDQConfig) -> None:
    """One-line ``ValueError`` naming the module for weights the formats cannot group or not finite."""
    W1, W2, _, _ = handler.weights(module)
    for proj, W in (("fc1", W1), ("fc2", W2)):
        try:
            config.weight_quant.check_shape(tuple(W.shape[1:]))
            config.act_quant.check_shape((1, W.shape[2]))
        except ValueError as exc:
            raise ValueError(f"{name}.{proj} ({type(module).__name__}, {tuple(W.shape)}): {exc}") from None
        if not bool(torch.isfinite(W).all()):
            raise ValueError(f"{name}.{proj}: the expert weights contain NaN or Inf")


def quantize(
    model: nn.Module,
    config: SVDQConfig | dict | str = "nvfp4-w4a4-r32",
    forward_loop: Callable[[nn.Module], None] | None = None,
    *,
    storage: str = "packed",
    progress: bool = True,
    act_range: str = "static",
    layout: str | Mapping[str, str] | None = None,
    allow_unsupported: bool = False,
    report: bool = True,
    rank_allocation: str = "uniform",
) -> nn.Module:
    """Calibrate and replace the targeted modules of ``model`` in place; returns ``model``.

    ``config``: an :class:`SVDQConfig`, a dict of its fields, or a preset name. Each replaced linear keeps
    its :class:`~svdq.solvers.linear.SVDQResult` figures in ``layer.svdq_summary`` (plus ``act_range`` and
    ``input_amax``), each experts module ``{"fc1": …, "fc2": …}`` of
    :meth:`~svdq.solvers.expert_group.MoEGroupResult.summary`. Every target is validated (weights finite,
    rank, group divisibility) and unsupported fused modules are refused (``ValueError`` naming them,
    unless ``allow_unsupported``) before any calibration work; nothing is replaced unless all decompose.

    ``act_range``: ``"static"`` runs ``forward_loop`` once more after the replacement and fixes each
    layer's per-tensor activation range to ``config.act_range_margin`` times the calibrated ``max|x/s|``
    (summary: ``input_amax`` the range used, ``calib_amax`` the calibrated maximum; formats with a
    per-tensor range: nvfp4, fp8; layers / experts that see no data in that pass stay dynamic);
    ``"dynamic"`` keeps per-call ranges. ``layout``: expert layouts (a layout for both projections,
    ``{"fc1": …, "fc2": …}`` or ``"fc1=…,fc2=…"``). ``report``: print the coverage summary
    (``model.svdq_coverage``).
    ``rank_allocation``: ``"uniform"`` (``config.rank`` everywhere) or ``"sensitivity"`` (the same total
    branch budget spread over the layers by measured sensitivity, svdq/DESIGN.md §19).
    """
    if act_range not in ACT_RANGES:
        raise ValueError(f"act_range must be one of {ACT_RANGES}, got {act_range!r}")
    if rank_allocation not in ALLOCATIONS:
        raise ValueError(f"rank_allocation must be one of {ALLOCATIONS}, got {rank_allocation!r}")
    if isinstance(config, str):
        config = SVDQConfig.preset(config)
    elif isinstance(config, dict):
        config = SVDQConfig.from_dict(config)
    layouts = expert_layouts(layout)
    scan = scan_model(model, config.include, config.exclude, allow_unsupported)
    targets, experts = scan.linears, scan.experts
    if not targets and not experts:
        raise ValueError(
            f"no nn.Linear matched include={config.include} exclude={config.exclude} "
            "(nor any experts module); "
            f"linear modules: {[n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:20]}"
        )
    for name, module in targets.items():
        validate_layer(name, module.weight, config)
    for name, (module, handler) in experts.items():
        _validate_experts(name, module, handler, config)
    if forward_loop is None and not config.weight_only_fallback:
        raise ValueError("forward_loop is required (or set weight_only_fallback=True for weight-only)")

    stats: dict[str, InputStats] = {}
    expert_stats: dict = {}
    if forward_loop is not None:
        stats = {n: InputStats(m.in_features, config.sample_tokens, config.seed) for n, m in targets.items()}
        handles = register_input_hooks(targets, lambda n, x: stats[n].update(x))
        expert_stats, more = register_experts_hooks(experts, config.sample_tokens, config.seed)
        run_with_hooks(model, forward_loop, handles + more, phase="statistics")

    alloc = _allocate(targets, experts, stats, expert_stats, config, layouts, rank_allocation)
    results: dict[str, SVDQResult] = {}
    for name, module in tqdm(targets.items(), desc="svdq decompose", unit="layer", disable=not progress):
        cfg = config if name not in alloc else dataclasses.replace(config, rank=alloc[name])
        with timing.layer(name):
            results[name] = decompose_linear(module.weight, stats.get(name), cfg, name=name)
    expert_results = {}
    for name, (module, handler) in tqdm(
        experts.items(), desc="svdq experts", unit="module", disable=not progress or not experts
    ):
        W1, W2, b1, b2 = handler.weights(module)
        st = expert_stats.get(name, {})
        E = W1.shape[0]
        act = handler.activation(module)  # fc1's consumer (config.fc1_objective)
        expert_results[name] = {
            proj: timing.call(
                f"{name}.{proj}",
                None,
                decompose_expert_group,
                W.detach(),
                st.get(proj, [None] * E),
                config,
                projection=proj,
                layout=layouts[proj],
                budget=alloc.get(f"{name}.{proj}"),
                name=f"{name}.{proj}",
                **({"activation": act, "bias": None if b1 is None else b1.detach()} if proj == "fc1" else {}),
            )
            for proj, W in (("fc1", W1), ("fc2", W2))
        }

    for name, module in targets.items():
        res = results[name]
        layer = timing.call(
            name,
            "install",
            install_svdq_linear,
            model,
            name,
            residual=res.residual,
            smooth=res.smooth,
            act_format=config.act_format,
            lora_down=res.lora_down,
            lora_up=res.lora_up,
            bias=module.bias,
            storage=storage,
            dtype=module.weight.dtype,
        )
        layer.svdq_summary = res.summary()
        _add_phase_seconds(layer.svdq_summary, name)
    for name, (module, handler) in experts.items():
        W1, W2, b1, b2 = handler.weights(module)
        r = expert_results[name]
        layer = timing.call(
            f"{name}.fc1",  # the install of both projections (one module) is charged to fc1
            "install",
            install_svdq_experts,
            model,
            name,
            handler,
            ProjectionState.from_result(r["fc1"], bias=b1, dtype=W1.dtype),
            ProjectionState.from_result(r["fc2"], bias=b2, dtype=W2.dtype),
            storage=storage,
        )
        layer.svdq_summary = {p: res.summary() for p, res in r.items()}
        for p in r:
            _add_phase_seconds(layer.svdq_summary[p], f"{name}.{p}")

    layers = {name: model.get_submodule(name) for name in targets}
    expert_layers = {name: model.get_submodule(name) for name in experts}
    ranges, expert_ranges = {}, {}
    if act_range == "static" and forward_loop is not None and static_range_supported(config.act_format):
        start_recording(expert_layers)
        try:
            if layers:
                ranges = record_input_amax(model, layers, forward_loop)
            else:
                run_with_hooks(model, forward_loop, [], phase="act_range")
        finally:
            expert_ranges = stop_recording(expert_layers)
    margin = config.act_range_margin
    for name, layer in layers.items():
        amax = ranges.get(name)
        static = amax is not None and float(amax) > 0
        layer.set_input_amax(amax * margin if static else None)
        layer.svdq_summary.update(
            act_range=layer.act_range,
            input_amax=float(layer.input_amax) if static else None,  # the range the layer uses
            calib_amax=float(amax) if static else None,  # the calibrated max|x/s| it is k times
            act_range_margin=margin if static else None,
        )
    for name, layer in expert_layers.items():
        for proj_name, proj in layer.projections().items():
            amax = expert_ranges.get(name, {}).get(proj_name)
            static = amax is not None and float(amax.max()) > 0
            proj.set_input_amax(amax * margin if static else None)  # experts with 0 stay dynamic
            layer.svdq_summary[proj_name].update(
                act_range=proj.act_range,
                input_amax=proj.input_amax.tolist() if static else None,
                calib_amax=amax.tolist() if static else None,
                act_range_margin=margin if static else None,
            )

    model.svdq_coverage = scan.coverage
    if report:
        tqdm.write(scan.coverage.summary())
        for name, layer in expert_layers.items():
            tqdm.write(f"  {name}: {_layouts_line(layer.svdq_summary)}")
    return model


def _add_phase_seconds(summary: dict, name: str) -> None:
    """``summary["phase_seconds"] = {phase: seconds}`` of layer ``name`` while :func:`svdq.timing.collect`
    is active (nothing otherwise)."""
    seconds = timing.layer_seconds(name)
    if seconds is not None:
        summary["phase_seconds"] = seconds


def _allocate(targets, experts, stats, expert_stats, config, layouts, rank_allocation) -> dict:
    """``{linear name: rank, "<experts>.fc1" / ".fc2": branch parameter budget}`` of a sensitivity
    allocation (svdq/DESIGN.md §19); ``{}`` for uniform ranks."""
    if rank_allocation == "uniform":
        return {}
    sites = [dense_site(n, m.weight.detach(), stats.get(n), config) for n, m in targets.items()]
    for name, (module, handler) in experts.items():
        W1, W2, _, _ = handler.weights(module)
        st = expert_stats.get(name, {})
        for proj, W in (("fc1", W1), ("fc2", W2)):
            group = st.get(proj, [None] * W.shape[0])
            sites.append(expert_site(f"{name}.{proj}", W.detach(), group, config, layouts[proj]))
    ranks = allocate_ranks(sites)
    return {s.name: ranks[s.name] * (1 if s.layout == "-" else s.cost) for s in sites}


def _layouts_line(summary: dict) -> str:
    """``fc1 shared-down r=35 (error 0.081 vs RTN 0.153), fc2 …`` of an experts module's summary."""
    return ", ".join(
        f"{p} {s['layout']} r={s['rank']} (error {s['final_error']:.3g} vs RTN {s['rtn_error']:.3g})"
        for p, s in summary.items()
        if isinstance(s, dict) and "layout" in s
    )


__all__ = ["Coverage", "find_targets", "quantize"]
