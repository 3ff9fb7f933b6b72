"""svdq: numerics of SVDQuant — quantization formats, low-rank solvers, decomposition, layers.

    import svdq
    model = svdq.quantize(model, svdq.SVDQConfig.preset("nvfp4-w4a4-r32"), forward_loop)

No framework glue lives here (Megatron / adapters are in ``lora``, the pipeline in ``calib``).
"""

from svdq.config import PRESETS, SVDQConfig
from svdq.experts import SVDQExperts
from svdq.layer import SVDQLinear
from svdq.quantize import quantize
from svdq.solvers.expert_group import MoEGroupResult, decompose_expert_group
from svdq.solvers.linear import SVDQResult, decompose_linear
from svdq.stats import InputStats

__all__ = [
    "PRESETS",
    "InputStats",
    "MoEGroupResult",
    "SVDQConfig",
    "SVDQExperts",
    "SVDQLinear",
    "SVDQResult",
    "decompose_expert_group",
    "decompose_linear",
    "quantize",
]
