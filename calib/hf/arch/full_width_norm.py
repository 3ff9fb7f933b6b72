"""RMSNorm of queries or keys over all heads of the projection (OLMoE's ``q_norm`` / ``k_norm``).

Megatron's attention calls ``q_layernorm(query)`` / ``k_layernorm(key)`` on per-head tensors; this module
flattens the heads, normalizes over their whole width and restores the shape. Valid only when the tensor
holds every head (tensor parallelism 1).

* input ``x``: (s, b, n, d) any float dtype; output: same shape and dtype
* ``weight``: (n·d,) in the model's dtype (ones at construction)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FullWidthRMSNorm(nn.Module):
    """``weight · x / sqrt(mean(x², over n·d) + eps)``, the mean taken in float32."""

    def __init__(self, width: int, eps: float, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.width, self.eps = width, eps
        self.weight = nn.Parameter(torch.ones(width, dtype=dtype))  # (n·d,)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape  # (s, b, n, d)
        flat = x.reshape(*shape[:-2], -1).float()  # (s, b, n·d)
        if flat.shape[-1] != self.width:
            raise ValueError(
                f"FullWidthRMSNorm of width {self.width} got {shape[-2]} heads × {shape[-1]} "
                "(a tensor-parallel shard? it needs every head)"
            )
        flat = flat * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * flat.to(x.dtype)).view(shape)

    def extra_repr(self) -> str:
        return f"{self.width}, eps={self.eps}"
