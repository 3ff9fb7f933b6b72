"""Which implementation of the frozen 4-bit path runs: the Triton kernels or the PyTorch reference.

``"auto"`` (the default) takes a kernel for CUDA tensors wherever it applies; ``"torch"`` always takes the
reference; ``"triton"`` takes a kernel wherever it applies — CPU tensors too under Triton's interpreter
(``TRITON_INTERPRET=1``, how the CPU tests run the kernels) — and raises where it does not (to make sure a
benchmark or test measures the kernel). The initial value comes from the environment variable
``SVDQ_KERNELS``; unset, it is ``"auto"`` (measured on an H100: bit-identical quantization, a faster and
smaller training step than the reference, svdq/DESIGN.md §16); ``SVDQ_KERNELS=torch`` goes back to the
PyTorch reference everywhere.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Iterator

import torch
from torch import Tensor

BACKENDS = ("auto", "triton", "torch")
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the kernels' ``DT`` constexpr
DEFAULT = "auto"
_state = {"backend": None}


def _check(name: str, who: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{who} must be one of {BACKENDS}, got {name!r}")
    return name


def get_backend() -> str:
    """The selected backend: set by :func:`set_backend`, else ``$SVDQ_KERNELS``, else :data:`DEFAULT`."""
    if _state["backend"] is None:
        _state["backend"] = _check(os.environ.get("SVDQ_KERNELS") or DEFAULT, "SVDQ_KERNELS")
    return _state["backend"]


def set_backend(name: str) -> None:
    """Select ``"auto"``, ``"triton"`` or ``"torch"`` for this process."""
    _state["backend"] = _check(name, "kernel backend")


@contextlib.contextmanager
def kernel_backend(name: str) -> Iterator[None]:
    """``with kernel_backend("torch"): ...`` — the backend for a block, restored afterwards."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


@functools.cache
def triton_available() -> bool:
    """Whether ``triton`` can be imported."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``, CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: Tensor, who: str = "kernel", measured: bool = True) -> bool:
    """Whether a kernel should run on ``tensors``: the backend is not ``"torch"``, Triton is importable and
    the tensors are CUDA tensors (or, with backend ``"triton"``, CPU tensors under the interpreter). With
    backend ``"triton"`` a case that does not apply raises ``RuntimeError`` naming ``who`` instead of
    falling back. ``measured=False``: a kernel not yet tested and timed on a GPU, which ``"auto"`` does not
    take (only ``"triton"`` does) until a GPU run shows it correct and faster."""
    backend = get_backend()
    if backend == "torch" or (backend == "auto" and not measured):
        return False
    on_cpu = not any(t.is_cuda for t in tensors)
    on_device = all(t.is_cuda for t in tensors) or (backend == "triton" and interpreting() and on_cpu)
    ok = triton_available() and on_device
    if not ok and backend == "triton":
        why = "triton is not installed" if not triton_available() else "tensors are not on CUDA"
        raise RuntimeError(f"{who}: SVDQ_KERNELS=triton but the kernel cannot run here ({why})")
    return ok
