"""Calibration / training token streams: byte-level text, ``.npy`` token ids, or the built-in corpus.

Every loader returns a 1-D ``torch.long`` tensor of token ids and fails with a clear error naming the file:
missing path, no data, non-integer arrays, ids outside ``[0, vocab_size)``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

BUILTIN = "builtin"


def builtin_corpus(max_bytes: int = 2_000_000) -> bytes:
    """Text that exists on any machine with Python: the standard library's own ``.py`` files, read in
    sorted order (deterministic), concatenated up to ``max_bytes``."""
    root = Path(os.__file__).parent
    out, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        out.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return b"".join(out)[:max_bytes]


def load_tokens(
    source: str | os.PathLike | None, vocab_size: int, max_tokens: int | None = None
) -> torch.Tensor:
    """Token ids ``(N,)`` from ``source``: ``None`` / ``"builtin"`` (the built-in corpus as bytes), a text
    file or a directory of text files (UTF-8 bytes: ids 0–255), or a ``.npy`` array of integer ids."""
    if source is None or str(source) == BUILTIN:
        ids = torch.frombuffer(bytearray(builtin_corpus()), dtype=torch.uint8).long()
        what = "the built-in corpus"
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"data source {path} does not exist")
        what = str(path)
        if path.suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
            if not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"{path}: token ids must be integers, got dtype {arr.dtype}")
            ids = torch.from_numpy(arr.astype(np.int64).reshape(-1))
        else:
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            raw = b"".join(p.read_bytes() for p in files)
            ids = (
                torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
                if raw
                else torch.empty(0, dtype=torch.long)
            )
    if ids.numel() == 0:
        raise ValueError(f"{what} holds no tokens")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(
            f"{what}: token ids must lie in [0, {vocab_size}) for this model, found [{lo}, {hi}]"
        )
    return ids[:max_tokens] if max_tokens else ids


def token_batches(ids: torch.Tensor, seq_len: int, batch: int, max_batches: int | None = None) -> list[dict]:
    """Consecutive ``(batch × seq_len)`` LM batches: ``tokens``, ``labels`` (shifted), ``position_ids``."""
    per_batch = batch * (seq_len + 1)
    n = ids.numel() // per_batch
    if n == 0:
        raise ValueError(f"{ids.numel()} tokens are fewer than one batch of {batch} × {seq_len + 1}")
    if max_batches:
        n = min(n, max_batches)
    out = []
    pos = torch.arange(seq_len).unsqueeze(0).expand(batch, -1).contiguous()
    for i in range(n):
        chunk = ids[i * per_batch : (i + 1) * per_batch].view(batch, seq_len + 1)
        out.append(
            {"tokens": chunk[:, :-1].contiguous(), "labels": chunk[:, 1:].contiguous(), "position_ids": pos}
        )
    return out
