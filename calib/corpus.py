"""A deterministic two-domain corpus from text every Python installation has.

* **base domain**: the standard library's Python source (``*.py`` under the stdlib directory, without
  ``site-packages``, test suites, ``idlelib`` and ``pydoc_data``) — code.
* **shifted domain**: the English reference documentation shipped as ``pydoc_data.topics`` (the text
  ``help("if")`` prints) — prose.

Each domain is split into train / held-out by a CRC32 hash of the file path (base) or topic name (shifted),
so the split is the same on every run and does not depend on file system order. The bytes are the token
ids (byte-level, vocabulary 256). Different Python versions ship different files, so the corpus is
deterministic per Python version.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from calib.data import lm_batch

_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "pydoc_data", "__pycache__"}


@dataclass(frozen=True)
class DomainSplit:
    """Byte-level token ids ``(N,)`` (``torch.uint8``) of the four parts."""

    base_train: torch.Tensor
    base_heldout: torch.Tensor
    shift_train: torch.Tensor
    shift_heldout: torch.Tensor

    def sizes(self) -> dict[str, int]:
        return {k: int(getattr(self, k).numel()) for k in self.__dataclass_fields__}


def _held_out(key: str, fraction: float) -> bool:
    return (zlib.crc32(key.encode()) % 10_000) < fraction * 10_000


def _as_ids(chunks: list[bytes]) -> torch.Tensor:
    data = b"\n".join(chunks)
    if not data:
        raise ValueError("the corpus part is empty")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def stdlib_sources() -> list[tuple[str, bytes]]:
    """``(relative path, bytes)`` of the standard library's Python files, sorted by path."""
    root = Path(os.__file__).parent
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _EXCLUDED_DIRS.intersection(rel.parts[:-1]):
            continue
        out.append((rel.as_posix(), path.read_bytes()))
    return out


def pydoc_topics() -> list[tuple[str, bytes]]:
    """``(topic, UTF-8 text)`` of ``pydoc_data.topics``, sorted by topic."""
    from pydoc_data.topics import topics

    return [(k, topics[k].encode()) for k in sorted(topics)]


def stdlib_split(heldout_fraction: float = 0.05, shift_heldout_fraction: float = 0.2) -> DomainSplit:
    """The two-domain split (see the module docstring)."""
    if not (0 < heldout_fraction < 1 and 0 < shift_heldout_fraction < 1):
        raise ValueError("held-out fractions must lie in (0, 1)")
    base = stdlib_sources()
    shift = pydoc_topics()
    if not base or not shift:
        raise ValueError("this Python installation has no standard-library sources or no pydoc_data")
    return DomainSplit(
        base_train=_as_ids([b for k, b in base if not _held_out(k, heldout_fraction)]),
        base_heldout=_as_ids([b for k, b in base if _held_out(k, heldout_fraction)]),
        shift_train=_as_ids([b for k, b in shift if not _held_out(k, shift_heldout_fraction)]),
        shift_heldout=_as_ids([b for k, b in shift if _held_out(k, shift_heldout_fraction)]),
    )


def random_windows(
    ids: torch.Tensor, batch: int, seq_len: int, generator: torch.Generator, device=None
) -> dict:
    """An LM batch (:func:`calib.data.lm_batch`) of ``batch`` windows of ``seq_len + 1`` ids starting at
    random offsets drawn from ``generator``."""
    starts = torch.randint(0, ids.numel() - seq_len - 1, (batch,), generator=generator)
    return lm_batch(ids[starts[:, None] + torch.arange(seq_len + 1)[None]], device)


def eval_windows(ids: torch.Tensor, seq_len: int, batch: int, max_tokens: int, device=None) -> list[dict]:
    """Evaluation batches: ``n = max_tokens // seq_len`` windows of ``seq_len + 1`` ids starting at evenly
    spaced offsets ``i · (N − seq_len − 1) // n`` over the whole stream (so they sample every part of it),
    in batches of ``batch`` (the last may be smaller). Deterministic."""
    span = ids.numel() - seq_len - 1
    if span < 0:
        raise ValueError(f"{ids.numel()} ids are fewer than one window of {seq_len + 1}")
    n = max(1, min(max_tokens // seq_len, span + 1))
    starts = torch.tensor([i * span // n for i in range(n)])
    window = torch.arange(seq_len + 1)[None]
    return [lm_batch(ids[starts[b0 : b0 + batch, None] + window], device) for b0 in range(0, n, batch)]
