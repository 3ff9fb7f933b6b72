"""``ConfigBase``: what the frozen dataclass configs of svdq, lora and calib share.

A config class is ``@dataclass(frozen=True) class C(ConfigBase)``; it gets

* ``to_dict()``: a JSON-friendly dict of every field (tuples become lists, a nested config its own dict)
  plus ``"version"``: the class's :attr:`ConfigBase.VERSION`, the number of its dict schema;
* ``from_dict(d)``: the inverse. Unknown fields raise one ``ValueError`` line naming the class and the
  fields; a dict without ``"version"`` (written before configs had one) is read as version 0, a dict of a
  newer version than the class knows is refused. :meth:`ConfigBase._upgrade` turns an older dict into the
  current fields (e.g. renamed fields); a nested config field accepts its dict;
* ``replace(**changes)``: a copy with some fields changed (validated again);
* validation: ``__post_init__`` calls :meth:`normalize` (e.g. lists → tuples, through
  ``object.__setattr__`` since the instance is frozen), then checks every field against its annotation
  (:func:`check_field_types`: ``int`` fields take ints but not bools, ``float`` fields finite ints or
  floats, ``str`` / ``bool`` / ``None`` / ``X | None`` / ``tuple[X, ...]`` / ``dict[K, V]`` / nested
  configs; ``ValueError`` naming the class, field, value and expected type), then :meth:`validate`
  (range checks, raise ``ValueError``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any, ClassVar


class ConfigBase:
    """Mixin of the dataclass configs (see the module docstring). Subclasses must be dataclasses."""

    VERSION: ClassVar[int] = 1

    def __post_init__(self) -> None:
        self.normalize()
        check_field_types(self)
        self.validate()

    def normalize(self) -> None:
        """Bring field values to their canonical form (default: nothing)."""

    def validate(self) -> None:
        """Raise ``ValueError`` on an invalid field value (default: nothing)."""

    def replace(self, **changes):
        """A copy with ``changes`` applied (normalized and validated like a new instance)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict: ``{"version": VERSION, field: value, ...}``."""
        out: dict[str, Any] = {"version": self.VERSION}
        for f in dataclasses.fields(self):
            out[f.name] = _plain(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """Inverse of :meth:`to_dict`; missing fields take their defaults."""
        d = dict(d)
        version = d.pop("version", 0)
        if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version <= cls.VERSION:
            raise ValueError(
                f"{cls.__name__}: version {version!r} is not one this code reads (0 … {cls.VERSION})"
            )
        d = cls._upgrade(d, version)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(names)}")
        hints = typing.get_type_hints(cls)
        for name, value in d.items():
            kind = hints.get(name)
            if isinstance(value, dict) and isinstance(kind, type) and issubclass(kind, ConfigBase):
                d[name] = kind.from_dict(value)
        return cls(**d)

    @classmethod
    def _upgrade(cls, d: dict[str, Any], version: int) -> dict[str, Any]:
        """The fields of dict ``d`` of schema ``version`` in the current schema (default: unchanged)."""
        return d


def _type_name(kind: Any) -> str:
    if kind is type(None):
        return "None"
    if isinstance(kind, type):
        return kind.__name__
    return str(kind).replace("typing.", "")


def _fits(value: Any, kind: Any) -> bool:
    """Whether ``value`` is of the annotated type ``kind`` (the subset of annotations configs use)."""
    if kind is Any:
        return True
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if kind is type(None) or kind is None:
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok and math.isfinite(value)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return len(args) == len(value) and all(_fits(v, a) for v, a in zip(value, args))
    if origin is dict:
        if not isinstance(value, dict):
            return False
        k, v = args or (Any, Any)
        return all(_fits(a, k) and _fits(b, v) for a, b in value.items())
    if origin is typing.Literal:
        return value in args
    if isinstance(kind, type):
        return isinstance(value, kind)
    return True  # an annotation this check does not know: left to validate()


def check_field_types(config) -> None:
    """Raise ``ValueError`` naming the first field of the dataclass ``config`` whose value does not fit
    its annotation (floats must also be finite: ``nan`` / ``inf`` are refused)."""
    hints = _hints(type(config))
    for f in dataclasses.fields(config):
        kind = hints.get(f.name, Any)
        value = getattr(config, f.name)
        if not _fits(value, kind):
            finite = " (finite)" if isinstance(value, float) and not math.isfinite(value) else ""
            raise ValueError(
                f"{type(config).__name__}.{f.name} must be {_type_name(kind)}{finite}, "
                f"got {value!r} ({type(value).__name__})"
            )


@functools.cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists and nested configs as their dicts (JSON-friendly)."""
    if isinstance(value, ConfigBase):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
