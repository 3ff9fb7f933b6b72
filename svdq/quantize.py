"""``svdq.quantize(model, config, forward_loop)``: replace targeted ``nn.Linear`` modules with SVDQLinear.

Same calling convention as nvidia-modelopt's ``mtq.quantize``: ``forward_loop(model)`` runs the
calibration batches. Input statistics are gathered by forward hooks (no change to model code).

With ``act_range="static"`` (the default) ``forward_loop`` runs a second time after the layers are
replaced (with dynamic activation ranges) and each layer's per-tensor range ``input_amax = max|x/s|`` over
all calibration batches is recorded (:func:`record_input_amax`) and fixed (see :mod:`svdq.layer`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from svdq.config import SVDQConfig
from svdq.layer import ACT_RANGES, SVDQLinear, static_range_supported
from svdq.solvers.linear import SVDQResult, decompose_linear, validate_layer
from svdq.stats import InputStats, run_with_hooks


def find_targets(model: nn.Module, config: SVDQConfig) -> dict[str, nn.Linear]:
    """``nn.Linear`` modules whose qualified name matches an ``include`` pattern and no ``exclude`` one."""
    targets = {}
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in config.include) and not any(
            fnmatch.fnmatchcase(name, p) for p in config.exclude
        ):
            targets[name] = module
    return targets


def collect_input_stats(
    model: nn.Module, modules: dict[str, nn.Module], forward_loop: Callable[[nn.Module], None], config
) -> dict[str, InputStats]:
    """Run ``forward_loop(model)`` with hooks that record each module's :class:`InputStats`."""
    stats = {
        name: InputStats(m.in_features, sample_size=config.sample_tokens, seed=config.seed)
        for name, m in modules.items()
    }
    handles = [
        m.register_forward_pre_hook(lambda mod, args, st=stats[name]: st.update(args[0]))
        for name, m in modules.items()
    ]
    run_with_hooks(model, forward_loop, handles)
    return stats


def record_input_amax(
    model: nn.Module,
    layers: dict[str, nn.Module],
    forward_loop: Callable[[nn.Module], None],
    check_finite: bool = True,
) -> dict[str, Tensor | None]:
    """Run ``forward_loop(model)`` and return each layer's ``max|x/s|`` over all its calls.

    ``layers``: modules with a ``smoothed_input(x) -> x/s`` method (:class:`~svdq.layer.SVDQLinear`,
    ``lora.base.SVDQBase``). Values are float32 0-d tensors on the layer's device (``None``: the layer
    got no element). Local to this process: a caller with tensor parallelism reduces them (MAX).
    Raises ``ValueError`` naming the layer if its input is not finite (with ``check_finite=False`` such a
    value is returned as ``inf``, e.g. to be reduced first so that every rank raises).
    """
    amax: dict[str, Tensor | None] = dict.fromkeys(layers)

    def hook(mod, args, name):
        xs = mod.smoothed_input(args[0].detach())
        if xs.numel() == 0:
            return
        a = xs.abs().amax().float()
        amax[name] = a if amax[name] is None else torch.maximum(amax[name], a)

    handles = [
        m.register_forward_pre_hook(lambda mod, args, n=name: hook(mod, args, n))
        for name, m in layers.items()
    ]
    run_with_hooks(model, forward_loop, handles)
    for name, a in amax.items():
        if a is not None and not bool(torch.isfinite(a)):
            if check_finite:
                raise ValueError(
                    f"{name}: calibration activations contain NaN or Inf (activation-range pass)"
                )
            amax[name] = torch.full_like(a, float("inf"))
    return amax


def quantize(
    model: nn.Module,
    config: SVDQConfig | dict | str = "nvfp4-w4a4-r32",
    forward_loop: Callable[[nn.Module], None] | None = None,
    *,
    storage: str = "packed",
    progress: bool = True,
    act_range: str = "static",
) -> nn.Module:
    """Calibrate and replace the targeted ``nn.Linear`` modules of ``model`` in place; returns ``model``.

    ``config``: an :class:`SVDQConfig`, a dict of its fields, or a preset name. Each replaced layer keeps
    its :class:`~svdq.solvers.linear.SVDQResult` figures in ``layer.svdq_summary`` (plus ``act_range`` and
    ``input_amax``). Every targeted layer is validated (weight finite, rank, group divisibility) before any
    calibration work, and nothing is replaced unless all layers decompose.

    ``act_range``: ``"static"`` runs ``forward_loop`` once more after the replacement and fixes each
    layer's per-tensor activation range to the calibrated ``max|x/s|`` (formats with a per-tensor range:
    nvfp4, fp8; layers that see no data in that pass stay dynamic); ``"dynamic"`` keeps per-call ranges.
    """
    if act_range not in ACT_RANGES:
        raise ValueError(f"act_range must be one of {ACT_RANGES}, got {act_range!r}")
    if isinstance(config, str):
        config = SVDQConfig.preset(config)
    elif isinstance(config, dict):
        config = SVDQConfig.from_dict(config)
    targets = find_targets(model, config)
    if not targets:
        raise ValueError(
            f"no nn.Linear matched include={config.include} exclude={config.exclude}; "
            f"linear modules: {[n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:20]}"
        )
    for name, module in targets.items():
        validate_layer(name, module.weight, config)
    if forward_loop is None and not config.weight_only_fallback:
        raise ValueError("forward_loop is required (or set weight_only_fallback=True for weight-only)")
    stats = collect_input_stats(model, targets, forward_loop, config) if forward_loop else {}
    results: dict[str, SVDQResult] = {}
    for name, module in tqdm(targets.items(), desc="svdq decompose", unit="layer", disable=not progress):
        results[name] = decompose_linear(module.weight, stats.get(name), config, name=name)
    for name, module in targets.items():
        layer = SVDQLinear.from_result(
            results[name], module.bias, config.act_format, storage=storage, dtype=module.weight.dtype
        ).to(module.weight.device)
        layer.svdq_summary = results[name].summary()
        model.set_submodule(name, layer)
    layers = {name: model.get_submodule(name) for name in targets}
    ranges = {}
    if act_range == "static" and forward_loop is not None and static_range_supported(config.act_format):
        ranges = record_input_amax(model, layers, forward_loop)
    for name, layer in layers.items():
        amax = ranges.get(name)
        layer.set_input_amax(amax if amax is not None and float(amax) > 0 else None)
        layer.svdq_summary["act_range"] = layer.act_range
        layer.svdq_summary["input_amax"] = None if layer.input_amax is None else float(layer.input_amax)
    return model
