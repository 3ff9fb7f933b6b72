"""Experts handlers, one file per fused-experts layout, and their registry (:mod:`.base`).

Adding a family: write ``<family>.py`` with an :class:`~svdq.experts.handlers.base.ExpertsHandler`
subclass and add its registration line below.
"""

from svdq.experts.handlers.base import (
    ExpertsHandler,
    handler_by_name,
    handler_for,
    register_experts_handler,
    registered_handlers,
    supported_classes,
)
from svdq.experts.handlers.concat_glu import ConcatGLUHandler
from svdq.experts.handlers.gpt_oss import GptOssHandler

register_experts_handler(ConcatGLUHandler())
register_experts_handler(GptOssHandler())

__all__ = [
    "ExpertsHandler",
    "handler_by_name",
    "handler_for",
    "register_experts_handler",
    "registered_handlers",
    "supported_classes",
]
