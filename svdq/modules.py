"""Module-tree helpers shared by every package."""

from __future__ import annotations

from torch import nn


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted path ``name`` of ``model`` (``name`` must exist; ``""`` is refused)."""
    if not name:
        raise ValueError("set_submodule: cannot replace the model itself")
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)
