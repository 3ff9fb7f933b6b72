"""Calibration / training token streams: text (byte-level, or a ``tokenizers`` tokenizer), ``.npy`` token
ids, or the built-in corpus.

Every loader returns a 1-D ``torch.long`` tensor of token ids and fails with a clear error naming the file:
missing path, no data, non-integer arrays, ids outside ``[0, vocab_size)``, text that is not UTF-8.

A file's kind is told by its content, not its name (:func:`file_kind`): a NumPy ``.npy`` header means token
ids; anything else must be UTF-8 text without NUL bytes. Archives (``.npz``, zip, gzip), raw binary token
dumps, truncated ``.npy`` files and ``.npy`` arrays of Python objects are refused naming the file (a
``.npy`` is read with ``allow_pickle=False``: no file can run code).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

BUILTIN = "builtin"
NPY_MAGIC = b"\x93NUMPY"
_ARCHIVES = {b"PK\x03\x04": "a zip archive (.npz?)", b"\x1f\x8b": "a gzip file", b"BZh": "a bzip2 file"}


def file_kind(path: Path) -> str:
    """``"npy"`` or ``"text"`` by content; ``ValueError`` naming ``path`` for archives, binary data and
    ``.npy``-named files without a NumPy header."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head.startswith(NPY_MAGIC):
        return "npy"
    for magic, what in _ARCHIVES.items():
        if head.startswith(magic):
            raise ValueError(f"data file {path} is {what}; give a .npy array of token ids or text files")
    if path.suffix == ".npy":
        raise ValueError(f"data file {path} is named .npy but has no NumPy header (not a .npy file)")
    return "text"


def _check_text(name: str, raw: bytes) -> None:
    """``ValueError`` naming the file unless ``raw`` is UTF-8 text without NUL bytes."""
    nul = raw.find(b"\0")
    if nul >= 0:
        raise ValueError(
            f"data file {name} is binary (a NUL byte at offset {nul}), not text; "
            "token ids must be a .npy array"
        )
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{name}: not UTF-8 text (byte {exc.start}); token ids must be a .npy array"
        ) from None


def _load_npy(path: Path) -> torch.Tensor:
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
            raise ValueError(
                f"data file {path} holds Python objects (dtype object); token ids must be an integer array"
            ) from None
        raise ValueError(
            f"data file {path} is not a readable .npy array (truncated or damaged): {exc}"
        ) from None
    except (EOFError, OSError) as exc:
        raise ValueError(
            f"data file {path} is not a readable .npy array (truncated or damaged): {exc}"
        ) from None
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"data file {path} is not a single .npy array")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{path}: token ids must be integers, got dtype {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > np.iinfo(np.int64).max):
        raise ValueError(f"{path}: token ids must be ≥ 0, found {int(arr.min())}")
    return torch.from_numpy(arr.astype(np.int64).reshape(-1))


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
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
    ):
        raise ValueError(f"max_tokens (--tokens) must be a positive integer or None, got {max_tokens!r}")
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
        if path.is_file() and file_kind(path) == "npy":
            if tok is not None:
                raise ValueError(f"{path} already holds token ids; --tokenizer applies to text data only")
            ids = _load_npy(path)
        else:
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            for p in files:
                if file_kind(p) != "text":
                    raise ValueError(
                        f"data directory {path}: {p} holds token ids; a directory holds text files"
                    )
            texts = [(str(p), p.read_bytes()) for p in files]
            for name, t in texts:
                _check_text(name, t)
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
