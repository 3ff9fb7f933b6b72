"""Streaming statistics of a linear layer's inputs, gathered during calibration.

Memory is bounded by ``in²`` (the second-moment matrix) plus a fixed-size token sample, whatever the
number of calibration tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


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


def run_with_hooks(model, forward_loop, handles: list) -> None:
    """Run ``forward_loop(model)`` without gradients, then remove the hook ``handles`` (also on error)."""
    try:
        with torch.no_grad():
            forward_loop(model)
    finally:
        for h in handles:
            h.remove()
