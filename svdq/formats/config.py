"""`QuantFormat`: which quantization format to use, and its validation.

A format is a small immutable value::

    QuantFormat("nvfp4")                     # E2M1 codes, blocks of 16, E4M3 block scales + FP32 global scale
    QuantFormat("int4")                      # symmetric INT4, groups of 64 (32 / 128 allowed)
    QuantFormat("int4", group_size=128)
    QuantFormat("fp8")                       # E4M3, one scale per tensor
    QuantFormat("fp8", per_channel=True)     # E4M3, one scale per row (weight: per output channel)
    QuantFormat("none")                      # keep the tensor as it is (16-bit)

All grouping runs along the LAST dimension (input channels of a weight ``(out, in)``, channels of an
activation ``(..., in)``). String forms (``str(fmt)`` / ``QuantFormat.from_str``): ``"nvfp4"``,
``"int4"`` (= ``"int4-g64"``), ``"int4-g32"``, ``"int4-g128"``, ``"fp8"``, ``"fp8-channel"``, ``"none"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

FormatName = Literal["nvfp4", "int4", "fp8", "none"]

FORMAT_NAMES: tuple[str, ...] = ("nvfp4", "int4", "fp8", "none")
NVFP4_BLOCK_SIZE = 16
INT4_GROUP_SIZES: tuple[int, ...] = (32, 64, 128)
INT4_DEFAULT_GROUP_SIZE = 64
_BITS = {"nvfp4": 4, "int4": 4, "fp8": 8, "none": 16}


@dataclass(frozen=True)
class QuantFormat:
    """A quantization format.

    Attributes:
        name: ``"nvfp4"``, ``"int4"``, ``"fp8"`` or ``"none"``.
        group_size: elements along the last dimension that share one scale. ``nvfp4``: always 16
            (``None`` is filled in); ``int4``: 32, 64 or 128 (``None`` -> 64); ``fp8`` / ``none``: must be
            ``None`` (fp8 scales are per tensor or per row, never per group).
        per_channel: ``fp8`` only. ``False``: one scale for the whole tensor. ``True``: one scale per row,
            i.e. per slice along the last dimension -- per output channel of a weight ``(out, in)``,
            per token of an activation ``(..., in)``.

    Raises:
        ValueError: unknown name, a group size the format does not allow, ``per_channel`` on a format
            other than fp8.
    """

    name: FormatName
    group_size: int | None = None
    per_channel: bool = False

    def __post_init__(self) -> None:
        if self.name not in FORMAT_NAMES:
            raise ValueError(f"unknown quantization format {self.name!r}; expected one of {FORMAT_NAMES}")
        gs = self.group_size
        if gs is not None and (isinstance(gs, bool) or not isinstance(gs, int)):
            raise ValueError(f"group_size must be an int or None, got {gs!r}")
        if not isinstance(self.per_channel, bool):
            raise ValueError(f"per_channel must be a bool, got {self.per_channel!r}")
        if self.name == "nvfp4":
            if gs not in (None, NVFP4_BLOCK_SIZE):
                raise ValueError(f"nvfp4 uses blocks of {NVFP4_BLOCK_SIZE}; got group_size={gs}")
            object.__setattr__(self, "group_size", NVFP4_BLOCK_SIZE)
        elif self.name == "int4":
            if gs is None:
                object.__setattr__(self, "group_size", INT4_DEFAULT_GROUP_SIZE)
            elif gs not in INT4_GROUP_SIZES:
                raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}; got {gs}")
        elif gs is not None:
            raise ValueError(f"{self.name} has no groups; group_size must be None, got {gs}")
        if self.per_channel and self.name != "fp8":
            raise ValueError(f"per_channel applies to fp8 only, not {self.name}")

    # ---------------------------------------------------------------- properties
    @property
    def bits(self) -> int:
        """Bits per stored element (4, 8 or 16; scales not counted)."""
        return _BITS[self.name]

    @property
    def is_quantized(self) -> bool:
        """``False`` for ``none``."""
        return self.name != "none"

    # ---------------------------------------------------------------- shape check
    def check_shape(self, shape: tuple[int, ...]) -> None:
        """Raise ``ValueError`` if a tensor of ``shape`` cannot be quantized with this format.

        Grouped formats (nvfp4, int4) need at least one dimension and a last dimension divisible by the
        group size; fp8 per channel needs at least one dimension.
        """
        shape = tuple(shape)
        if self.group_size is not None:
            if len(shape) == 0:
                raise ValueError(f"{self} needs a tensor with at least one dimension; got shape ()")
            if shape[-1] % self.group_size != 0:
                raise ValueError(
                    f"{self}: the last dimension of shape {shape} ({shape[-1]}) is not divisible by "
                    f"the group size {self.group_size}"
                )
        if self.per_channel and len(shape) == 0:
            raise ValueError(f"{self} needs a tensor with at least one dimension; got shape ()")

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the scale tensor for a tensor of ``shape`` (``()`` for per-tensor scales)."""
        shape = tuple(shape)
        if self.group_size is not None:
            return (*shape[:-1], shape[-1] // self.group_size)
        if self.per_channel:
            return (*shape[:-1], 1)
        return ()

    # ---------------------------------------------------------------- (de)serialization
    def __str__(self) -> str:
        if self.name == "int4":
            return f"int4-g{self.group_size}"
        if self.name == "fp8" and self.per_channel:
            return "fp8-channel"
        return self.name

    @classmethod
    def from_str(cls, spec: str) -> QuantFormat:
        """Parse ``"nvfp4"``, ``"int4"``, ``"int4-g128"``, ``"fp8"``, ``"fp8-channel"``, ``"none"``.

        Case-insensitive; ``_`` may be used instead of ``-``.
        """
        if not isinstance(spec, str):
            raise ValueError(f"format spec must be a string, got {spec!r}")
        s = spec.strip().lower().replace("_", "-")
        if s in ("nvfp4", "fp8", "none", "int4"):
            return cls(s)  # type: ignore[arg-type]
        if s == "fp8-channel":
            return cls("fp8", per_channel=True)
        if s.startswith("int4-g") and s[len("int4-g") :].isdigit():
            return cls("int4", group_size=int(s[len("int4-g") :]))
        raise ValueError(
            f"cannot parse quantization format {spec!r}; expected one of 'nvfp4', 'int4', 'int4-g32', "
            f"'int4-g64', 'int4-g128', 'fp8', 'fp8-channel', 'none'"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict; ``QuantFormat.from_dict(fmt.to_dict()) == fmt``."""
        return {"name": self.name, "group_size": self.group_size, "per_channel": self.per_channel}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantFormat:
        """Inverse of :meth:`to_dict`. Missing keys take their defaults; unknown keys are an error."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a dict, got {type(d).__name__}")
        unknown = set(d) - {"name", "group_size", "per_channel"}
        if unknown:
            raise ValueError(f"unknown QuantFormat keys {sorted(unknown)}")
        if "name" not in d:
            raise ValueError("QuantFormat dict needs a 'name'")
        return cls(d["name"], d.get("group_size"), d.get("per_channel", False))


def parse_format(fmt: QuantFormat | str | dict[str, Any]) -> QuantFormat:
    """Accept a :class:`QuantFormat`, its string form or its dict form."""
    if isinstance(fmt, QuantFormat):
        return fmt
    if isinstance(fmt, str):
        return QuantFormat.from_str(fmt)
    if isinstance(fmt, dict):
        return QuantFormat.from_dict(fmt)
    raise ValueError(f"cannot interpret {fmt!r} as a QuantFormat")
