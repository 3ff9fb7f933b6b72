"""Fused (Hugging Face style) experts modules: handlers, the quantized module, statistics
(svdq/DESIGN.md §13). Plain torch; transformers is imported lazily, only by the handler files.

* :mod:`.handlers` — one :class:`ExpertsHandler` per layout and their registry (:func:`handler_for`);
* :mod:`.module` — :class:`SVDQExperts` (replaces the experts module, fused layout kept) and its installer;
* :mod:`.storage` — stacked per-expert packed residuals; :mod:`.ops` — per-expert activation quantization
  and grouped products; :mod:`.stats` — routed statistics hooks and static ranges;
  :mod:`.coverage` — what :func:`svdq.quantize` quantized and what it left in 16 bits.
* :mod:`.ep_dispatch` — 4-bit expert-parallel all-to-all of fc1's quantized rows (svdq/DESIGN.md §22).
"""

from svdq.experts.handlers import (
    ExpertsHandler,
    handler_by_name,
    handler_for,
    register_experts_handler,
    registered_handlers,
    supported_classes,
)
from svdq.experts.module import ExpertProjection, ProjectionState, SVDQExperts, install_svdq_experts
from svdq.experts.storage import ExpertResiduals

__all__ = [
    "ExpertProjection",
    "ExpertResiduals",
    "ExpertsHandler",
    "ProjectionState",
    "SVDQExperts",
    "handler_by_name",
    "handler_for",
    "install_svdq_experts",
    "register_experts_handler",
    "registered_handlers",
    "supported_classes",
]
