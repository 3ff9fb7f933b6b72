"""Calibration statistics and static ranges of fused experts modules.

:func:`register_experts_hooks` puts a forward pre-hook (``with_kwargs=True``: callers may pass the routing
arguments by keyword) on each original experts module; for every call it accumulates, per expert ``e``,
:class:`svdq.stats.InputStats` of

* **fc1**: the hidden states routed to ``e`` (each (token, slot) pair whose index is ``e``; masked slots,
  outside ``[0, E)``, route nowhere), and
* **fc2**: ``act(fc1_e(x))`` of those tokens, computed with the original weights (and fc1's bias) in the
  module dtype. Hugging Face multiplies the routing weight into fc2's *output*, so fc2's input excludes it.

The hook only reads: the module's own forward (whichever experts implementation runs) is unchanged.
:func:`record_experts_amax` runs a pass over installed :class:`~svdq.experts.SVDQExperts` and returns per
projection the per-expert ``max|x/s|`` of the inputs their quantizers saw (``0`` for an expert that got no
token: it stays dynamic).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from svdq.stats import InputStats, run_with_hooks

__all__ = ["ExpertStats", "record_experts_amax", "register_experts_hooks", "routed_rows"]

#: per experts module: ``{"fc1": [InputStats] * E, "fc2": [InputStats] * E}``
ExpertStats = dict[str, list[InputStats]]


def routed_rows(top_k_index: Tensor, num_experts: int) -> tuple[list[int], Tensor]:
    """``(counts per expert, token of each routed pair sorted by expert)`` of ``top_k_index (T, k)``;
    masked slots (outside ``[0, E)``) are dropped."""
    k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    key = torch.where((flat >= 0) & (flat < num_experts), flat, torch.full_like(flat, num_experts))
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts].tolist()
    return counts, order[: sum(counts)] // k


def register_experts_hooks(
    modules: dict[str, tuple[nn.Module, object]], sample_tokens: int = 512, seed: int = 0
) -> tuple[dict[str, ExpertStats], list[RemovableHandle]]:
    """Hooks on ``{name: (experts module, its handler)}``; returns ``(stats by name, hook handles)``."""
    stats: dict[str, ExpertStats] = {}
    handles = []
    for name, (module, handler) in modules.items():
        W1, W2, _, _ = handler.weights(module)
        E = W1.shape[0]
        stats[name] = {
            "fc1": [InputStats(W1.shape[2], sample_size=sample_tokens, seed=seed) for _ in range(E)],
            "fc2": [InputStats(W2.shape[2], sample_size=sample_tokens, seed=seed) for _ in range(E)],
        }
        act = handler.activation(module)
        handles.append(module.register_forward_pre_hook(_hook(handler, act, stats[name]), with_kwargs=True))
    return stats, handles


def _hook(handler, act: nn.Module, st: ExpertStats) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        x, idx, _ = handler.routing(args, kwargs)
        W1, _, b1, _ = handler.weights(module)
        with torch.no_grad():
            x = x.detach().reshape(-1, x.shape[-1])
            counts, tokens = routed_rows(idx.reshape(x.shape[0], -1), W1.shape[0])
            start = 0
            for e, n in enumerate(counts):
                if not n:
                    continue
                xe = x[tokens[start : start + n]]  # (n, H)
                start += n
                st["fc1"][e].update(xe)
                y = F.linear(xe, W1[e], None if b1 is None else b1[e])  # (n, out1)
                st["fc2"][e].update(act(y))  # (n, I): fc2's input, before the routing weight

    return hook


def record_experts_amax(
    model: nn.Module, layers: dict[str, nn.Module], forward_loop: Callable[[nn.Module], None] | None
) -> dict[str, dict[str, Tensor]]:
    """Per layer and projection the per-expert ``max|x/s|`` ``(E,)`` float32 over ``forward_loop``
    (run here unless ``None``: the caller runs the pass, e.g. together with the linears' hooks, between
    :func:`start_recording` and :func:`stop_recording`). ``ValueError`` naming the layer if an input is
    not finite."""
    start_recording(layers)
    try:
        if forward_loop is not None:
            run_with_hooks(model, forward_loop, [])
    finally:
        out = stop_recording(layers)
    return out


def start_recording(layers: dict[str, nn.Module]) -> None:
    for layer in layers.values():
        for proj in (layer.fc1, layer.fc2):
            proj._amax_record = torch.zeros(proj.num_experts, dtype=torch.float32, device=proj.smooth.device)


def stop_recording(layers: dict[str, nn.Module]) -> dict[str, dict[str, Tensor]]:
    out = {}
    for name, layer in layers.items():
        out[name] = {}
        for pname, proj in (("fc1", layer.fc1), ("fc2", layer.fc2)):
            rec, proj._amax_record = proj._amax_record, None
            if rec is not None and not bool(torch.isfinite(rec).all()):
                raise ValueError(
                    f"{name}.{pname}: calibration activations contain NaN or Inf (activation-range pass)"
                )
            out[name][pname] = rec
    return out
