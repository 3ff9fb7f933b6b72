"""Concatenated GLU experts: ``gate_up_proj (E, 2I, H)`` (gate rows first, then up), ``down_proj (E, H, I)``,
no biases, ``act_fn(gate) * up`` — Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3 in Hugging Face
transformers (imported lazily)."""

from __future__ import annotations

from torch import Tensor, nn

from svdq.experts.handlers.base import ExpertsHandler

_MODELS = "transformers.models"


class ConcatGLU(nn.Module):
    """``act(gate) * up`` of fc1's output ``y (T, 2I)`` = ``[gate | up]`` -> ``(T, I)``."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.act = act

    def forward(self, y: Tensor) -> Tensor:
        gate, up = y.chunk(2, dim=-1)
        return self.act(gate) * up


class ConcatGLUHandler(ExpertsHandler):
    name = "concat-glu"
    class_specs = (
        (f"{_MODELS}.mixtral.modeling_mixtral", "MixtralExperts"),
        (f"{_MODELS}.qwen2_moe.modeling_qwen2_moe", "Qwen2MoeExperts"),
        (f"{_MODELS}.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeExperts"),
        (f"{_MODELS}.olmoe.modeling_olmoe", "OlmoeExperts"),
        (f"{_MODELS}.deepseek_v3.modeling_deepseek_v3", "DeepseekV3Experts"),
    )

    def weights(self, module: nn.Module):
        return module.gate_up_proj, module.down_proj, None, None  # (E, 2I, H), (E, H, I)

    def activation(self, module: nn.Module) -> nn.Module:
        return ConcatGLU(module.act_fn)  # ACT2FN modules hold no weights
