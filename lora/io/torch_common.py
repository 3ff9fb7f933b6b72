"""Shared pieces of the torch exporters: finding the SVDQuant layers, static activation ranges and
captured layer inputs (atomic output directories: :mod:`lora.io.atomic`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from svdq.layer import SVDQLinear
from svdq.stats import run_with_hooks

ForwardLoop = Callable[[nn.Module], None]


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=4) + "\n")


def svdq_layers(model: nn.Module) -> dict[str, SVDQLinear]:
    """``{qualified name: layer}`` of every :class:`~svdq.layer.SVDQLinear` in ``model`` (``ValueError`` if
    there is none). A model that *is* one layer is returned under the name ``""``."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, SVDQLinear)}
    if not layers:
        raise ValueError("the model has no svdq.SVDQLinear layers (quantize it with svdq.quantize first)")
    return layers


def qualified(prefix: str, name: str, leaf: str) -> str:
    """``prefix.name.leaf`` without empty parts."""
    return ".".join(p for p in (prefix, name, leaf) if p)


def require_packed(name: str, layer: SVDQLinear) -> None:
    if layer.storage != "packed":
        raise ValueError(
            f"{name or '<model>'}: storage='fake' keeps only the dequantized residual, not its NVFP4 codes "
            "and scales; build the layer with storage='packed' to export it"
        )


def capture_inputs(
    model: nn.Module, layers: Mapping[str, nn.Module], forward_loop: ForwardLoop, max_tokens: int
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(rows, amax)``: the first ``max_tokens`` input rows ``(n × in)`` each layer receives over
    ``forward_loop``, and the raw range for its static activation range over *all* its inputs (float32 0-d):
    ``max|x|`` times the layer's headroom (:func:`with_headroom`; ``max|x/s|`` measured in the same pass);
    layers that got no input are absent from both."""
    rows: dict[str, list[Tensor]] = {name: [] for name in layers}
    amax: dict[str, Tensor] = {}
    smoothed: dict[str, Tensor] = {}

    def hook(mod, args, name):
        x = args[0].detach()
        if x.numel() == 0:
            return
        xf = x.float()
        a, b = xf.abs().amax(), (xf / mod.smooth.float()).abs().amax()
        amax[name] = a if name not in amax else torch.maximum(amax[name], a)
        smoothed[name] = b if name not in smoothed else torch.maximum(smoothed[name], b)
        room = max_tokens - sum(t.shape[0] for t in rows[name])
        if room > 0:
            rows[name].append(x.reshape(-1, x.shape[-1])[:room].clone())

    handles = [
        m.register_forward_pre_hook(lambda mod, args, n=name: hook(mod, args, n))
        for name, m in layers.items()
    ]
    run_with_hooks(model, forward_loop, handles)
    static = {n: getattr(layers[n], "input_amax", None) for n in amax}
    ranges = {n: with_headroom(a, smoothed[n], static[n]) for n, a in amax.items()}
    return {name: torch.cat(r) for name, r in rows.items() if r}, ranges


def with_headroom(raw_amax: Tensor, smooth_amax: Tensor, input_amax: Tensor | None) -> Tensor:
    """The raw-coordinate static range ``max|x| · input_amax / max|x/s|`` (svdq/DESIGN.md §20): the
    layer's static range ``input_amax`` (smoothed coordinates, headroom ``act_range_margin`` included) over
    ``max|x/s|`` measured in the same pass as ``max|x|``. Elementwise (0-d for a linear, ``(E,)`` per
    expert); where the layer has no static range (``None`` or 0) or nothing was measured: ``max|x|``."""
    raw = raw_amax.float()
    if input_amax is None:
        return raw
    layer = input_amax.detach().float().to(raw.device)
    smoothed = smooth_amax.float().to(raw.device)
    ok = (layer > 0) & (smoothed > 0)
    return torch.where(ok, raw * layer / torch.where(ok, smoothed, torch.ones_like(smoothed)), raw)
