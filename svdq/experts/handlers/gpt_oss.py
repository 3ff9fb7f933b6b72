"""GPT-OSS experts: transposed weights ``gate_up_proj (E, H, 2I)``, ``down_proj (E, I, H)`` (``x @ W``),
biases ``gate_up_proj_bias (E, 2I)`` / ``down_proj_bias (E, H)``, interleaved gate / up (``[..., ::2]`` gate,
``[..., 1::2]`` up) and a clamped SwiGLU (``GptOssExperts._apply_gate``); forward arguments
``(hidden_states, router_indices, routing_weights)``. transformers is imported lazily."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from svdq.experts.handlers.base import ExpertsHandler


class ClampedSwiGLU(nn.Module):
    """``(clamp(up, ±limit) + 1) · g · σ(α·g)``, ``g = clamp(gate, max=limit)``, of an interleaved
    ``y (T, 2I)`` -> ``(T, I)`` (GPT-OSS)."""

    def __init__(self, alpha: float, limit: float):
        super().__init__()
        self.alpha, self.limit = float(alpha), float(limit)

    def forward(self, y: Tensor) -> Tensor:
        gate, up = y[..., ::2], y[..., 1::2]
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, limit={self.limit}"


class GptOssHandler(ExpertsHandler):
    name = "gpt-oss"
    class_specs = (("transformers.models.gpt_oss.modeling_gpt_oss", "GptOssExperts"),)
    arg_names = ("hidden_states", "router_indices", "routing_weights")

    def weights(self, module: nn.Module):
        W1 = module.gate_up_proj.transpose(1, 2)  # (E, 2I, H), rows interleaved gate / up
        W2 = module.down_proj.transpose(1, 2)  # (E, H, I)
        return W1, W2, module.gate_up_proj_bias, module.down_proj_bias

    def activation(self, module: nn.Module) -> nn.Module:
        return ClampedSwiGLU(module.alpha, module.limit)
