"""``svdq.quantize(model, config, forward_loop)``: replace targeted ``nn.Linear`` modules with SVDQLinear.

Same calling convention as nvidia-modelopt's ``mtq.quantize``: ``forward_loop(model)`` runs the
calibration batches. Input statistics are gathered by forward hooks (no change to model code).

With ``act_range="static"`` (the default) ``forward_loop`` runs a second time after the layers are
replaced (with dynamic activation ranges) and each layer's per-tensor range ``input_amax = max|x/s|`` over
all calibration batches is recorded (:func:`svdq.stats.record_input_amax`) and fixed (see
:mod:`svdq.residual`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

from torch import nn
from tqdm import tqdm

from svdq.config import SVDQConfig
from svdq.layer import install_svdq_linear
from svdq.residual import ACT_RANGES, static_range_supported
from svdq.solvers.linear import SVDQResult, decompose_linear, validate_layer
from svdq.stats import collect_input_stats, record_input_amax


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
    stats = (
        collect_input_stats(model, targets, forward_loop, config.sample_tokens, config.seed)
        if forward_loop
        else {}
    )
    results: dict[str, SVDQResult] = {}
    for name, module in tqdm(targets.items(), desc="svdq decompose", unit="layer", disable=not progress):
        results[name] = decompose_linear(module.weight, stats.get(name), config, name=name)
    for name, module in targets.items():
        res = results[name]
        layer = install_svdq_linear(
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
