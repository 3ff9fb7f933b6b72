"""Streaming statistics of a linear layer's inputs, gathered during calibration by forward pre-hooks.

:class:`InputStats` holds one layer's statistics; memory is bounded by ``in²`` (the second-moment matrix)
plus a fixed-size token sample, whatever the number of calibration tokens. The hooks are one
implementation, :func:`register_input_hooks`, used by :func:`collect_input_stats` (statistics for the
decomposition) and :func:`record_input_amax` (static activation ranges). A framework whose layers see
only part of their input (tensor parallelism, a fused input norm) passes an input ``transform`` that
returns the whole input (``lora.framework.full_input``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from svdq import timing

#: ``transform(module, x) -> x'``: the input a statistics hook records, from the module's detached input
InputTransform = Callable[[nn.Module, Tensor], Tensor]


@dataclass
class InputStats:
    """Per-channel absmax ``(in,)``, second moment ``XᵀX (in × in, float64)``, token count, and a
    uniform reservoir sample of at most ``sample_size`` tokens ``(k × in, float32)`` for scoring.

    ``update(x)`` takes inputs of any leading shape ``(..., in)``. The sample is reproducible: the
    reservoir uses its own generator seeded with ``seed``.
    """

    in_features: int
    sample_size: int = 512
    seed: int = 0
    absmax: Tensor | None = None
    gram: Tensor | None = None
    n_tokens: int = 0
    sample: Tensor | None = None
    nonfinite: bool = False
    _generator: torch.Generator = field(default=None, repr=False)

    def update(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with {self.in_features} features, got {tuple(x.shape)}")
        if x.shape[0] == 0:
            return
        if not bool(torch.isfinite(x).all()):
            self.nonfinite = True
            return
        x64 = x.to(torch.float64)
        amax = x.abs().amax(dim=0).float()
        if self.gram is None:
            self.absmax = amax
            self.gram = x64.T @ x64
        else:
            self.absmax = torch.maximum(self.absmax, amax)
            self.gram += x64.T @ x64
        self._update_sample(x.float())
        self.n_tokens += x.shape[0]

    def _update_sample(self, x: Tensor) -> None:
        """Reservoir sampling (algorithm R, vectorized per batch)."""
        if self.sample_size <= 0:
            return
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed)
        n_seen = self.n_tokens
        if self.sample is None:
            self.sample = torch.empty(0, self.in_features, dtype=torch.float32, device=x.device)
        free = self.sample_size - self.sample.shape[0]
        if free > 0:
            take = x[:free]
            self.sample = torch.cat([self.sample, take])
            x = x[free:]
            n_seen += take.shape[0]
        if x.shape[0] == 0:
            return
        positions = torch.arange(n_seen + 1, n_seen + 1 + x.shape[0], dtype=torch.float64)
        draws = torch.rand(x.shape[0], generator=self._generator, dtype=torch.float64)
        slots = (draws * positions).long()  # token t replaces slot j < sample_size with prob. k/t
        keep = torch.nonzero(slots < self.sample_size).flatten()
        if keep.numel() == 0:
            return
        # several tokens of one batch may draw the same slot: the last one wins (sequential semantics)
        last = torch.full((self.sample_size,), -1, dtype=torch.long)
        last.scatter_reduce_(0, slots[keep], keep, reduce="amax")
        filled = torch.nonzero(last >= 0).flatten()
        self.sample[filled.to(x.device)] = x[last[filled].to(x.device)]

    @property
    def covariance(self) -> Tensor:
        """``XᵀX`` (in × in, float64); zeros when no token was seen."""
        if self.gram is None:
            return torch.zeros(self.in_features, self.in_features, dtype=torch.float64)
        return self.gram


def run_with_hooks(model, forward_loop, handles: list, phase: str | None = None) -> None:
    """Run ``forward_loop(model)`` without gradients, then remove the hook ``handles`` (also on error).
    ``phase``: the :mod:`svdq.timing` phase the pass is charged to (when timing is collected)."""
    try:
        with torch.no_grad(), timing.phase(phase or "other"):
            forward_loop(model)
    finally:
        for h in handles:
            h.remove()


def register_input_hooks(
    modules: dict[str, nn.Module],
    on_input: Callable[[str, Tensor], None],
    transform: InputTransform | None = None,
) -> list[RemovableHandle]:
    """A forward pre-hook on each of ``modules`` calling ``on_input(name, x)`` with the module's detached
    first input ``x``, or ``transform(module, x)``. Returns the handles (remove them when done, e.g. with
    :func:`run_with_hooks`)."""

    def hook(module: nn.Module, args: tuple, name: str) -> None:
        x = args[0].detach()
        on_input(name, x if transform is None else transform(module, x))

    return [
        m.register_forward_pre_hook(lambda mod, args, n=name: hook(mod, args, n))
        for name, m in modules.items()
    ]


def collect_input_stats(
    model: nn.Module,
    modules: dict[str, nn.Module],
    forward_loop: Callable[[nn.Module], None],
    sample_tokens: int = 512,
    seed: int = 0,
    *,
    transform: InputTransform | None = None,
    in_features: Callable[[nn.Module], int] | None = None,
) -> dict[str, InputStats]:
    """Run ``forward_loop(model)`` with hooks (:func:`register_input_hooks`) that accumulate each module's
    :class:`InputStats` (``sample_size=sample_tokens``, ``seed``); returns them by name.

    ``transform``: see :func:`register_input_hooks`; ``in_features(module)``: the feature count of the
    recorded input (default ``module.in_features``). Hooks are removed afterwards, also on error.
    """
    features = in_features or (lambda m: m.in_features)
    stats = {
        name: InputStats(features(m), sample_size=sample_tokens, seed=seed) for name, m in modules.items()
    }
    handles = register_input_hooks(modules, lambda name, x: stats[name].update(x), transform)
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

    def on_input(name: str, x: Tensor) -> None:
        xs = layers[name].smoothed_input(x)
        if xs.numel() == 0:
            return
        a = xs.abs().amax().float()
        amax[name] = a if amax[name] is None else torch.maximum(amax[name], a)

    run_with_hooks(model, forward_loop, register_input_hooks(layers, on_input), phase="act_range")
    for name, a in amax.items():
        if a is not None and not bool(torch.isfinite(a)):
            if check_finite:
                raise ValueError(
                    f"{name}: calibration activations contain NaN or Inf (activation-range pass)"
                )
            amax[name] = torch.full_like(a, float("inf"))
    return amax
