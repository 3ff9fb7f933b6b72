"""Calibration / training token streams: text (byte-level, or a ``tokenizers`` tokenizer), ``.npy`` token
ids, or the built-in corpus.

Every loader returns a 1-D ``torch.long`` tensor of token ids and fails with a clear error naming the file:
missing path, no data, non-integer arrays, ids outside ``[0, vocab_size)``, text that is not UTF-8 when a
tokenizer is given.
"""

from __future__ import annotations

import hashlib
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


def load_tokenizer(path: str | os.PathLike):
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json`` file (``Tokenizer.from_file``)."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {path} does not exist")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises a bare Exception
        raise ValueError(f"tokenizer {path} cannot be read: {exc}") from None


def _encode(texts: list[tuple[str, bytes]], tokenizer) -> torch.Tensor:
    """Token ids of every ``(name, raw bytes)`` text, concatenated in order (UTF-8 decoding is strict)."""
    decoded = []
    for name, raw in texts:
        try:
            decoded.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ValueError(f"{name}: not UTF-8 text (byte {exc.start}); a tokenizer needs text") from None
    ids = [i for enc in tokenizer.encode_batch(decoded, add_special_tokens=False) for i in enc.ids]
    return torch.tensor(ids, dtype=torch.long)


def load_tokens(
    source: str | os.PathLike | None,
    vocab_size: int,
    max_tokens: int | None = None,
    tokenizer: str | os.PathLike | None = None,
) -> torch.Tensor:
    """Token ids ``(N,)`` from ``source``: ``None`` / ``"builtin"`` (the built-in corpus), a text file or a
    directory of text files, or a ``.npy`` array of integer ids.

    Text is byte-level (UTF-8 bytes: ids 0–255) unless ``tokenizer`` names a ``tokenizer.json``; then each
    file is encoded with it (no special tokens added) and the ids concatenated in sorted file order.
    """
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None
    if source is None or str(source) == BUILTIN:
        raw = builtin_corpus()
        what = "the built-in corpus"
        if tok is not None:
            ids = _encode([(what, raw)], tok)
        else:
            ids = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"data source {path} does not exist")
        what = str(path)
        if path.suffix == ".npy":
            if tok is not None:
                raise ValueError(f"{path} already holds token ids; --tokenizer applies to text data only")
            arr = np.load(path, allow_pickle=False)
            if not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"{path}: token ids must be integers, got dtype {arr.dtype}")
            ids = torch.from_numpy(arr.astype(np.int64).reshape(-1))
        else:
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            texts = [(str(p), p.read_bytes()) for p in files]
            raw = b"".join(t for _, t in texts)
            if not raw:
                ids = torch.empty(0, dtype=torch.long)
            elif tok is not None:
                ids = _encode(texts, tok)
            else:
                ids = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    if ids.numel() == 0:
        raise ValueError(f"{what} holds no tokens")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        via = f" (tokenizer {tokenizer}: vocabulary {tok.get_vocab_size()})" if tok is not None else ""
        raise ValueError(
            f"{what}: token ids must lie in [0, {vocab_size}) for this model, found [{lo}, {hi}]{via}"
        )
    return ids[:max_tokens] if max_tokens else ids


def fingerprint(ids: torch.Tensor) -> str:
    """SHA-256 (first 16 hex digits) of the int64 token ids: identifies a token stream across runs."""
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def lm_batch(windows: torch.Tensor, device=None) -> dict:
    """A language-modelling batch from ``windows (b × (seq_len + 1))`` of ids: ``tokens`` (all but the
    last id), ``labels`` (all but the first: the next id), ``position_ids`` ``0 … seq_len−1`` — each
    ``(b × seq_len)`` int64, on ``device`` (default: where ``windows`` is)."""
    windows = windows.long().to(device) if device is not None else windows.long()
    pos = torch.arange(windows.shape[1] - 1, device=windows.device).expand(windows.shape[0], -1)
    return {
        "tokens": windows[:, :-1].contiguous(),
        "labels": windows[:, 1:].contiguous(),
        "position_ids": pos.contiguous(),
    }


def token_batches(
    ids: torch.Tensor, seq_len: int, batch: int, max_batches: int | None = None, device=None
) -> list[dict]:
    """Consecutive ``(batch × seq_len)`` LM batches (:func:`lm_batch`, on ``device``; default CPU).
    Batch ``i`` holds ids ``[i·batch·(seq_len+1), (i+1)·batch·(seq_len+1))``; a last partial batch is
    dropped."""
    per_batch = batch * (seq_len + 1)
    n = ids.numel() // per_batch
    if n == 0:
        raise ValueError(f"{ids.numel()} tokens are fewer than one batch of {batch} × {seq_len + 1}")
    if max_batches:
        n = min(n, max_batches)
    return [
        lm_batch(ids[i * per_batch : (i + 1) * per_batch].view(batch, seq_len + 1), device) for i in range(n)
    ]
