"""Optional per-phase timing of calibration (svdq/DESIGN.md §21).

Off by default, and then free: :func:`phase` returns one shared no-op context manager and nothing is
synchronized. Inside :func:`collect` every ``with phase(name):`` block adds its wall time to the current
layer (set by :func:`layer`) — *exclusive* time: a phase entered inside another is charged to the inner
one only, so a layer's phases add up to its measured seconds. On CUDA the device is synchronized at every
phase boundary while collecting (otherwise asynchronous kernels would be charged to whichever phase
happens to wait for them); this costs time, so compare totals with collection off.

    from svdq import timing
    with timing.collect() as t:
        svdq.quantize(model, config, forward_loop)
    t.layers["encoder.layer.0.attention.self.query"]   # {"setup": s, "smoothing": s, "branch": s, ...}
    t.totals()                                          # summed over layers, plus whole-model phases

Phases used by the solvers: ``statistics`` (the hooked calibration pass, whole model), ``setup``
(per-layer preparation: moving statistics, Cholesky factor, reference outputs), ``smoothing`` (α
candidates and their scoring), ``branch`` (SVD / layout fits), ``residual`` (residual quantization,
refinement re-quantization, GPTQ, packing), ``install`` (module replacement), ``act_range`` (the static
range pass, whole model).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

__all__ = ["PHASES", "Timings", "call", "collect", "enabled", "layer", "layer_seconds", "phase"]

PHASES = ("statistics", "setup", "smoothing", "branch", "residual", "install", "act_range")
MODEL = "<model>"  # the pseudo-layer of whole-model phases

_NULL = contextlib.nullcontext()


@dataclass
class Timings:
    """Seconds per layer and phase (``layers[name][phase]``); whole-model phases under ``layers[MODEL]``."""

    sync_cuda: bool = True
    layers: dict[str, dict[str, float]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(float))
    )
    _layer: str = MODEL
    _stack: list = field(default_factory=list)  # [(layer, phase, start)] of the open phases

    def _sync(self) -> None:
        if self.sync_cuda and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def _charge(self, now: float) -> None:
        """Add the time since the innermost open phase (re)started to it."""
        if self._stack:
            lay, name, start = self._stack[-1]
            self.layers[lay][name] += now - start

    @contextlib.contextmanager
    def phase(self, name: str):
        self._sync()
        now = time.perf_counter()
        self._charge(now)
        self._stack.append((self._layer, name, now))
        try:
            yield
        finally:
            self._sync()
            now = time.perf_counter()
            self._charge(now)
            self._stack.pop()
            if self._stack:  # the outer phase resumes now
                lay, outer, _ = self._stack[-1]
                self._stack[-1] = (lay, outer, now)

    def as_dict(self) -> dict[str, dict[str, float]]:
        """Plain ``{layer: {phase: seconds}}`` (JSON-friendly)."""
        return {k: dict(v) for k, v in self.layers.items()}

    def totals(self) -> dict[str, float]:
        """Seconds per phase summed over all layers and the model."""
        out: dict[str, float] = defaultdict(float)
        for phases in self.layers.values():
            for k, v in phases.items():
                out[k] += v
        return dict(out)


_ACTIVE: ContextVar[Timings | None] = ContextVar("svdq_timing", default=None)


def enabled() -> bool:
    return _ACTIVE.get() is not None


@contextlib.contextmanager
def collect(sync_cuda: bool = True):
    """Collect phase timings of everything run inside; yields the :class:`Timings`."""
    t = Timings(sync_cuda=sync_cuda)
    token = _ACTIVE.set(t)
    try:
        yield t
    finally:
        _ACTIVE.reset(token)


def phase(name: str):
    """Context manager charging its block to phase ``name`` of the current layer (no-op when off)."""
    t = _ACTIVE.get()
    return _NULL if t is None else t.phase(name)


@contextlib.contextmanager
def layer(name: str):
    """Charge phases inside to layer ``name`` (no-op when off). Time inside the layer outside any phase
    goes to its ``other`` phase."""
    t = _ACTIVE.get()
    if t is None:
        yield
        return
    prev = t._layer
    t._layer = name
    try:
        with t.phase("other"):
            yield
    finally:
        t._layer = prev


def call(layer_name: str, phase_name: str | None, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` charged to layer ``layer_name`` (and phase ``phase_name`` unless ``None``);
    a plain call when off."""
    if _ACTIVE.get() is None:
        return fn(*args, **kwargs)
    with layer(layer_name), phase(phase_name or "other"):
        return fn(*args, **kwargs)


def layer_seconds(name: str) -> dict[str, float] | None:
    """The phases recorded so far for layer ``name`` (``None`` when off)."""
    t = _ACTIVE.get()
    return None if t is None else dict(t.layers.get(name, {}))
