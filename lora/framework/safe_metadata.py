"""Reading Megatron ``dist_checkpointing`` directories without unpickling arbitrary objects.

PyTorch's distributed checkpoint reader (which megatron-core's ``torch_dist`` format uses) reads the
directory's ``.metadata`` file with ``pickle.load``: a crafted file could import and call any function.
:func:`restricted_checkpoint_metadata` swaps, for the duration of a load, the reader's ``pickle`` for one
whose ``load`` only rebuilds the plain data classes that metadata consists of (torch's checkpoint metadata
dataclasses, ``torch.Size``, dtypes, builtin containers); anything else raises ``ValueError`` naming the
file and the refused global, before it is imported. Tensor data (``*.distcp``) is read by torch as
tensors, and ``common.pt`` by ``torch.load`` with its ``weights_only=True`` default.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import types

import torch

_ALLOWED_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint._extension",
)
_ALLOWED_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # torch.layout pickles as _get_layout("torch.strided")
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "complex"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
}
_TORCH_ENUMS = (torch.dtype, torch.layout, torch.memory_format)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if module in _ALLOWED_MODULES or (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_ENUMS):
            return getattr(torch, name)  # torch.float32, torch.strided, torch.contiguous_format …
        raise ValueError(
            f"{self.source}: checkpoint metadata names {module}.{name}, which is not plain checkpoint "
            "metadata; refusing to load it (it could run code)"
        )


def restricted_load(file, source: str = "checkpoint metadata"):
    """``pickle.load`` that only rebuilds checkpoint metadata (module docstring)."""
    return _RestrictedUnpickler(file, source).load()


@contextlib.contextmanager
def restricted_checkpoint_metadata(root):
    """While active, torch's checkpoint ``FileSystemReader`` unpickles ``.metadata`` files of ``root`` only
    through :func:`restricted_load`."""
    from torch.distributed.checkpoint import filesystem

    shim = types.SimpleNamespace(**{k: getattr(pickle, k) for k in dir(pickle) if not k.startswith("__")})
    shim.load = lambda f, *a, **k: restricted_load(f, f"{root}/.metadata")
    shim.loads = lambda b, *a, **k: restricted_load(io.BytesIO(b), f"{root}/.metadata")
    saved = filesystem.pickle
    filesystem.pickle = shim
    try:
        yield
    finally:
        filesystem.pickle = saved
