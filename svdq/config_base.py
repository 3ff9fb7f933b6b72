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
  ``object.__setattr__`` since the instance is frozen) then :meth:`validate` (raise ``ValueError``).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar


class ConfigBase:
    """Mixin of the dataclass configs (see the module docstring). Subclasses must be dataclasses."""

    VERSION: ClassVar[int] = 1

    def __post_init__(self) -> None:
        self.normalize()
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


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists and nested configs as their dicts (JSON-friendly)."""
    if isinstance(value, ConfigBase):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
