"""Fused Triton kernels for the frozen 4-bit path (svdq/DESIGN.md §16), and the choice between them and the
PyTorch reference.

The PyTorch code in :mod:`svdq.formats`, :mod:`svdq.residual` and :mod:`svdq.experts.ops` is the reference
and the fallback; a kernel is used only where :func:`svdq.kernels.backend.use_triton` says so (Triton
importable, CUDA tensors — or CPU tensors under ``TRITON_INTERPRET=1`` — and the backend not set to
``"torch"``). Select with ``SVDQ_KERNELS=auto|triton|torch`` or :func:`set_backend` / :func:`kernel_backend`;
the default is ``"auto"`` (see :mod:`svdq.kernels.backend`).
"""

from .backend import (
    BACKENDS,
    get_backend,
    interpreting,
    kernel_backend,
    set_backend,
    triton_available,
    use_triton,
)

__all__ = [
    "BACKENDS",
    "get_backend",
    "interpreting",
    "kernel_backend",
    "set_backend",
    "triton_available",
    "use_triton",
]
