"""``svdq.quantize(model, config, forward_loop)``: replace targeted ``nn.Linear`` modules with SVDQLinear.

Same calling convention as nvidia-modelopt's ``mtq.quantize``: ``forward_loop(model)`` runs the
calibration batches. Input statistics are gathered by forward hooks (no change to model code).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

from torch import nn
from tqdm import tqdm

from svdq.config import SVDQConfig
from svdq.decompose import SVDQResult, decompose_linear, validate_layer
from svdq.layer import SVDQLinear
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


def quantize(
    model: nn.Module,
    config: SVDQConfig | dict | str = "nvfp4-w4a4-r32",
    forward_loop: Callable[[nn.Module], None] | None = None,
    *,
    storage: str = "packed",
    progress: bool = True,
) -> nn.Module:
    """Calibrate and replace the targeted ``nn.Linear`` modules of ``model`` in place; returns ``model``.

    ``config``: an :class:`SVDQConfig`, a dict of its fields, or a preset name. Each replaced layer keeps
    its :class:`~svdq.decompose.SVDQResult` figures in ``layer.svdq_summary``. Every targeted layer is
    validated (weight finite, rank, group divisibility) before any calibration work, and nothing is
    replaced unless all layers decompose.
    """
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
        _set_submodule(model, name, layer)
    return model


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
