"""``ExpertsHandler``: what one architecture's fused experts module looks like, and the handler registry.

A fused experts module keeps the ``E`` experts of one MoE layer as 3-D parameters and is called with the
routed tokens: ``forward(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H)``,
``out = Σ_slots w · fc2(act(fc1(x)))``. A handler tells, for its classes,

* :meth:`~ExpertsHandler.classes` — the classes it handles (imported lazily: ``()`` when the library is not
  installed), detected with ``isinstance``;
* :meth:`~ExpertsHandler.weights` — ``(W1 (E, out1, H), W2 (E, H, I), b1 (E, out1) | None, b2 (E, H) | None)``
  in the canonical ``(E, out, in)`` orientation (views, no copy where the layout allows);
* :meth:`~ExpertsHandler.activation` — an ``nn.Module`` mapping fc1's output ``(T, out1)`` to ``(T, I)``
  (it must hold no reference to the experts module: the module is replaced);
* :attr:`~ExpertsHandler.arg_names` / :meth:`~ExpertsHandler.routing` — the names of the three forward
  arguments and their parsing from ``(args, kwargs)`` (callers may pass any of them by keyword);
* masked slots — an index outside ``[0, E)`` (e.g. ``E``, used by expert parallelism) routes nowhere.

Registry: :func:`register_experts_handler` (ordered; ``before`` puts a handler ahead of a named one) and
:func:`handler_for` (the first handler whose classes match). Adding a family is one new file under
``svdq/experts/handlers/`` and one :func:`register_experts_handler` line in its ``__init__``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from torch import Tensor, nn

__all__ = [
    "ExpertsHandler",
    "handler_by_name",
    "handler_for",
    "import_classes",
    "register_experts_handler",
    "registered_handlers",
    "supported_classes",
]


def import_classes(specs: tuple[tuple[str, str], ...]) -> tuple[type, ...]:
    """The classes ``(module path, class name)`` that import; missing modules / names are skipped."""
    out = []
    for module, name in specs:
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        out.append(cls)
    return tuple(out)


class ExpertsHandler:
    """One fused-experts layout (see the module docstring). Subclasses set :attr:`name`,
    :attr:`class_specs` (``(module path, class name)`` pairs) and implement :meth:`weights` and
    :meth:`activation`; :attr:`arg_names` defaults to the Hugging Face ``(hidden_states, top_k_index,
    top_k_weights)``."""

    name: str = ""
    class_specs: tuple[tuple[str, str], ...] = ()
    arg_names: tuple[str, str, str] = ("hidden_states", "top_k_index", "top_k_weights")

    def classes(self) -> tuple[type, ...]:
        cached = self.__dict__.get("_classes")
        if cached is None:
            cached = import_classes(self.class_specs)
            self.__dict__["_classes"] = cached
        return cached

    def handles(self, module: nn.Module) -> bool:
        classes = self.classes()
        return bool(classes) and isinstance(module, classes)

    def weights(self, module: nn.Module) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        raise NotImplementedError

    def activation(self, module: nn.Module) -> nn.Module:
        raise NotImplementedError

    def routing(self, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor]:
        """``(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k))`` from a call's arguments."""
        return parse_routing(self.arg_names, args, kwargs)


def parse_routing(names: tuple[str, ...], args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor]:
    """Bind the three routing arguments ``names`` from positional ``args`` then ``kwargs``."""
    if len(args) > len(names):
        raise TypeError(f"experts forward takes {len(names)} arguments {names}, got {len(args)} positional")
    values = list(args) + [None] * (len(names) - len(args))
    for i, n in enumerate(names):
        if n in kwargs:
            if i < len(args):
                raise TypeError(f"experts forward got {n!r} twice")
            values[i] = kwargs[n]
    extra = set(kwargs) - set(names)
    if extra:
        raise TypeError(f"experts forward got unexpected arguments {sorted(extra)}; it takes {names}")
    missing = [n for n, v in zip(names, values) if v is None]
    if missing:
        raise TypeError(f"experts forward is missing {missing}")
    return values[0], values[1], values[2]


_HANDLERS: list[ExpertsHandler] = []


def register_experts_handler(handler: ExpertsHandler, before: str | None = None) -> ExpertsHandler:
    """Add ``handler`` to the registry (at the end, or ahead of the handler named ``before``); a handler of
    the same name is replaced in place. Returns it."""
    for i, h in enumerate(_HANDLERS):
        if h.name == handler.name:
            _HANDLERS[i] = handler
            return handler
    if before is None:
        _HANDLERS.append(handler)
        return handler
    for i, h in enumerate(_HANDLERS):
        if h.name == before:
            _HANDLERS.insert(i, handler)
            return handler
    raise ValueError(f"no experts handler named {before!r}; registered: {[h.name for h in _HANDLERS]}")


def registered_handlers() -> tuple[ExpertsHandler, ...]:
    return tuple(_HANDLERS)


def handler_for(module: nn.Module) -> ExpertsHandler | None:
    """The first registered handler whose classes ``module`` is an instance of, else ``None``."""
    for h in _HANDLERS:
        if h.handles(module):
            return h
    return None


def handler_by_name(name: str) -> ExpertsHandler:
    for h in _HANDLERS:
        if h.name == name:
            return h
    raise ValueError(f"no experts handler named {name!r}; registered: {[h.name for h in _HANDLERS]}")


def supported_classes() -> list[str]:
    """``module.Class`` names of every class a registered handler handles (those that import)."""
    return [f"{c.__module__}.{c.__qualname__}" for h in _HANDLERS for c in h.classes()]


#: ``activation(y (T, out1)) -> (T, I)``
Activation = Callable[[Tensor], Tensor]
