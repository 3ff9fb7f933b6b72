"""Calibration / training token streams: text (byte-level, a ``tokenizer.json`` or a local Hugging Face
tokenizer directory), JSON Lines records, ``.npy`` token ids, or the built-in corpus.

Tensors: ``ids (N,)`` int64 token ids; ``mask (N,)`` bool, ``True`` where the token is a loss target (JSON
Lines prompt / response pairs only: the response tokens); per batch ``tokens`` / ``labels`` /
``position_ids`` ``(b, s)`` int64 and, with a mask, ``loss_mask (b, s)`` bool (the label's mask).

JSON Lines (``.jsonl`` / ``.ndjson``, or a file whose first non-blank line is a JSON object): one object per
line, blank lines skipped. ``text_field`` (default ``"text"``) names the text of each record; with
``prompt_field`` and ``response_field`` each record is a prompt / response pair and only the response
tokens are loss targets (:func:`masked_mean`). Records are encoded one by one (no special tokens; a Hugging
Face tokenizer's end-of-sequence token after each record where it has one) and concatenated in file order.
A line that is not a JSON object, or lacks a field, fails naming the file and line before any work.

Tokenizers (:func:`load_tokenizer`): a ``tokenizer.json`` file (``tokenizers.Tokenizer``) or a directory
read with ``transformers.AutoTokenizer.from_pretrained(dir, local_files_only=True)``, never with remote
code: a directory whose ``tokenizer_config.json`` names code (``auto_map``) is refused.

Every loader returns a 1-D ``torch.long`` tensor of token ids and fails with a clear error naming the file:
missing path, no data, non-integer arrays, ids outside ``[0, vocab_size)``, text that is not UTF-8.

A file's kind is told by its content, not its name (:func:`file_kind`): a NumPy ``.npy`` header means token
ids; anything else must be UTF-8 text without NUL bytes. Archives (``.npz``, zip, gzip), raw binary token
dumps, truncated ``.npy`` files and ``.npy`` arrays of Python objects are refused naming the file (a
``.npy`` is read with ``allow_pickle=False``: no file can run code).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BUILTIN = "builtin"
NPY_MAGIC = b"\x93NUMPY"
_ARCHIVES = {b"PK\x03\x04": "a zip archive (.npz?)", b"\x1f\x8b": "a gzip file", b"BZh": "a bzip2 file"}


JSONL_SUFFIXES = (".jsonl", ".ndjson")


def file_kind(path: Path, sniff_jsonl: bool = True) -> str:
    """``"npy"``, ``"jsonl"`` or ``"text"`` by content (JSON Lines by suffix, or with ``sniff_jsonl`` by a
    first non-blank line that is a JSON object); ``ValueError`` naming ``path`` for archives, binary data
    and ``.npy``-named files without a NumPy header."""
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head.startswith(NPY_MAGIC):
        return "npy"
    for magic, what in _ARCHIVES.items():
        if head.startswith(magic):
            raise ValueError(f"data file {path} is {what}; give a .npy array of token ids or text files")
    if path.suffix == ".npy":
        raise ValueError(f"data file {path} is named .npy but has no NumPy header (not a .npy file)")
    if path.suffix.lower() in JSONL_SUFFIXES or (sniff_jsonl and _first_line_is_object(path)):
        return "jsonl"
    return "text"


def _first_line_is_object(path: Path, limit: int = 1 << 20) -> bool:
    """Whether the first non-blank line (within the first ``limit`` bytes) is a JSON object."""
    with open(path, "rb") as fh:
        head = fh.read(limit)
    for raw in head.splitlines():
        if raw.strip():
            try:
                return isinstance(json.loads(raw), dict)
            except (ValueError, UnicodeDecodeError):
                return False
    return False


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


@dataclass(frozen=True)
class TextTokenizer:
    """A tokenizer of either kind behind one interface: ``encode(texts) -> [ids]`` (no special tokens),
    ``vocab_size``, ``eos_id`` (``None`` for a ``tokenizer.json``), ``path``."""

    backend: object
    path: Path
    hf: bool

    @property
    def vocab_size(self) -> int:
        return len(self.backend) if self.hf else self.backend.get_vocab_size()

    @property
    def eos_id(self) -> int | None:
        return getattr(self.backend, "eos_token_id", None) if self.hf else None

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self.hf:
            return [list(x) for x in self.backend(texts, add_special_tokens=False)["input_ids"]]
        return [enc.ids for enc in self.backend.encode_batch(texts, add_special_tokens=False)]


def load_tokenizer(path: str | os.PathLike) -> TextTokenizer:
    """A ``tokenizer.json`` file (``tokenizers.Tokenizer.from_file``) or a local Hugging Face tokenizer
    directory (``AutoTokenizer.from_pretrained(dir, local_files_only=True)``, no remote code: a
    directory whose ``tokenizer_config.json`` has an ``auto_map`` is refused)."""
    path = Path(path)
    if path.is_dir():
        return TextTokenizer(_load_hf_tokenizer(path), path, hf=True)
    from tokenizers import Tokenizer

    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {path} does not exist")
    try:
        return TextTokenizer(Tokenizer.from_file(str(path)), path, hf=False)
    except Exception as exc:  # the Rust side raises a bare Exception
        raise ValueError(f"tokenizer {path} cannot be read: {exc}") from None


def _load_hf_tokenizer(path: Path):
    config = path / "tokenizer_config.json"
    if config.is_file():
        try:
            fields = json.loads(config.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"tokenizer {config} is not valid JSON: {exc}") from None
        if isinstance(fields, dict) and fields.get("auto_map"):
            raise ValueError(
                f"tokenizer {path} asks for its own code (auto_map in tokenizer_config.json); svdq never "
                "runs code from a tokenizer directory: give a tokenizer.json or a standard tokenizer"
            )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        text = " ".join(str(exc).split())[:300]
        raise ValueError(f"tokenizer directory {path} cannot be read offline: {text}") from None


def _decode(name: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{name}: not UTF-8 text (byte {exc.start}); a tokenizer needs text") from None


def _encode(texts: list[tuple[str, bytes]], tokenizer: TextTokenizer) -> torch.Tensor:
    """Token ids of every ``(name, raw bytes)`` text, concatenated in order (UTF-8 decoding is strict)."""
    decoded = [_decode(name, raw) for name, raw in texts]
    ids = [i for enc in tokenizer.encode(decoded) for i in enc]
    return torch.tensor(ids, dtype=torch.long)


@dataclass(frozen=True)
class JsonlFields:
    """Which fields of a JSON Lines record hold the text: ``text`` alone, or a ``prompt`` / ``response``
    pair (both set) whose response tokens are the only loss targets."""

    text: str = "text"
    prompt: str | None = None
    response: str | None = None

    def __post_init__(self):
        if (self.prompt is None) != (self.response is None):
            raise ValueError("--prompt-field and --response-field go together (a prompt / response pair)")

    @property
    def pairs(self) -> bool:
        return self.prompt is not None


def read_jsonl(path: Path, fields: JsonlFields) -> list[tuple[str, ...]]:
    """The texts of every record: ``(text,)`` or ``(prompt, response)``; ``ValueError`` naming the file
    and line of the first malformed line or missing / non-string field."""
    wanted = (fields.prompt, fields.response) if fields.pairs else (fields.text,)
    out = []
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path} line {n}: not UTF-8 text (byte {exc.start})") from None
            except ValueError as exc:
                raise ValueError(f"{path} line {n}: not valid JSON ({exc})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path} line {n}: a JSON object is expected, got {type(record).__name__}")
            for key in wanted:
                if key not in record:
                    flag = "--text-field" if key == fields.text and not fields.pairs else "the field options"
                    raise ValueError(
                        f"{path} line {n}: no field {key!r} (has {sorted(record)[:8]}; see {flag})"
                    )
                if not isinstance(record[key], str):
                    raise ValueError(
                        f"{path} line {n}: field {key!r} must be a string, got {type(record[key]).__name__}"
                    )
            out.append(tuple(record[k] for k in wanted))
    return out


def _jsonl_stream(path: Path, fields: JsonlFields, tok: TextTokenizer | None):
    """``(ids (N,), mask (N,) bool | None)`` of a JSON Lines file (see the module docstring)."""
    records = read_jsonl(path, fields)

    def encode(texts: list[str]) -> list[list[int]]:
        if tok is None:
            return [list(t.encode("utf-8")) for t in texts]
        return tok.encode(texts)

    eos = [] if tok is None or tok.eos_id is None else [int(tok.eos_id)]
    if not fields.pairs:
        ids = [i for enc in encode([r[0] for r in records]) for i in (*enc, *eos)]
        return torch.tensor(ids, dtype=torch.long), None
    prompts = encode([r[0] for r in records])
    responses = encode([r[1] for r in records])
    ids, mask = [], []
    for p, r in zip(prompts, responses):
        ids += [*p, *r, *eos]
        mask += [False] * len(p) + [True] * (len(r) + len(eos))
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool)


def load_tokens(
    source: str | os.PathLike | None,
    vocab_size: int,
    max_tokens: int | None = None,
    tokenizer: str | os.PathLike | None = None,
    fields: JsonlFields | None = None,
) -> torch.Tensor:
    """Token ids ``(N,)`` of :func:`load_stream` (a prompt / response mask, if any, is dropped: for
    calibration, where every token counts)."""
    return load_stream(source, vocab_size, max_tokens, tokenizer, fields)[0]


def load_stream(
    source: str | os.PathLike | None,
    vocab_size: int,
    max_tokens: int | None = None,
    tokenizer: str | os.PathLike | None = None,
    fields: JsonlFields | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(ids (N,) int64, mask (N,) bool or None)`` from ``source``: ``None`` / ``"builtin"`` (the
    built-in corpus), a text file or a directory of text files, a JSON Lines file (``fields``; a mask
    for prompt / response pairs), or a ``.npy`` array of integer ids.

    Text is byte-level (UTF-8 bytes: ids 0–255) unless ``tokenizer`` names a ``tokenizer.json`` or a
    tokenizer directory; then each file (record) is encoded with it (no special tokens added) and the ids
    concatenated in sorted file (record) order.
    """
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
    ):
        raise ValueError(f"max_tokens (--tokens) must be a positive integer or None, got {max_tokens!r}")
    fields = fields or JsonlFields()
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None
    mask = None
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
        kind = file_kind(path) if path.is_file() else "dir"
        if fields.pairs and kind != "jsonl":
            raise ValueError(f"--prompt-field / --response-field need JSON Lines data; {path} is not")
        if kind == "npy":
            if tok is not None:
                raise ValueError(f"{path} already holds token ids; --tokenizer applies to text data only")
            ids = _load_npy(path)
        elif kind == "jsonl":
            ids, mask = _jsonl_stream(path, fields, tok)
        else:
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            for p in files:
                kind = file_kind(p, sniff_jsonl=False)  # a directory's files: text unless named .jsonl
                if kind != "text":
                    held = "token ids" if kind == "npy" else "JSON Lines records"
                    raise ValueError(f"data directory {path}: {p} holds {held}; a directory holds text files")
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
        via = f" (tokenizer {tokenizer}: vocabulary {tok.vocab_size})" if tok is not None else ""
        raise ValueError(
            f"{what}: token ids must lie in [0, {vocab_size}) for this model, found [{lo}, {hi}]{via}"
        )
    if mask is not None and not bool(mask.any()):
        raise ValueError(f"{what}: every response is empty: no token to train on")
    if max_tokens:
        ids, mask = ids[:max_tokens], None if mask is None else mask[:max_tokens]
    return ids, mask


def masked_mean(losses: torch.Tensor, mask: torch.Tensor | None, total: int | None = None) -> torch.Tensor:
    """Mean of per-token ``losses (b, s)`` over the positions where ``mask (b, s)`` is true (all of them
    without a mask); a batch without any target gives ``0`` (with a gradient, zero).

    ``total``: divide the masked sum by this count instead of this batch's own (the targets of the whole
    global batch when ``losses`` is one micro-batch of it: then the micro-batch terms add up to the global
    token-weighted mean, :func:`loss_targets`)."""
    if mask is None:
        return losses.mean() if total is None else losses.sum() / max(int(total), 1)
    m = mask.to(losses.dtype)  # (b, s)
    count = m.sum().clamp_min(1) if total is None else max(int(total), 1)
    return (losses * m).sum() / count


def loss_targets(batch: dict) -> int:
    """Number of loss targets of a batch (dict with ``labels (b, s)`` and an optional bool ``loss_mask
    (b, s)``): the true mask positions, else every position."""
    mask = batch.get("loss_mask")
    return int(mask.sum()) if mask is not None else int(batch["labels"].numel())


def mask_fingerprint(batches: list[dict]) -> str | None:
    """:func:`fingerprint` of the loss masks of ``batches`` in order (``None`` when they have none): what
    identifies the prompt / response split of a data set across runs."""
    masks = [b["loss_mask"].reshape(-1).cpu() for b in batches if b.get("loss_mask") is not None]
    return fingerprint(torch.cat(masks)) if masks else None


def fingerprint(ids: torch.Tensor) -> str:
    """SHA-256 (first 16 hex digits) of the int64 token ids: identifies a token stream across runs."""
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def lm_batch(windows: torch.Tensor, device=None, mask: torch.Tensor | None = None) -> dict:
    """A language-modelling batch from ``windows (b × (seq_len + 1))`` of ids: ``tokens`` (all but the
    last id), ``labels`` (all but the first: the next id), ``position_ids`` ``0 … seq_len−1`` — each
    ``(b × seq_len)`` int64, on ``device`` (default: where ``windows`` is); with ``mask`` (the windows'
    loss mask, same shape) also ``loss_mask`` ``(b × seq_len)`` bool: whether each label is a target."""
    windows = windows.long().to(device) if device is not None else windows.long()
    pos = torch.arange(windows.shape[1] - 1, device=windows.device).expand(windows.shape[0], -1)
    out = {
        "tokens": windows[:, :-1].contiguous(),
        "labels": windows[:, 1:].contiguous(),
        "position_ids": pos.contiguous(),
    }
    if mask is not None:
        out["loss_mask"] = mask[:, 1:].to(device=windows.device, dtype=torch.bool).contiguous()
    return out


def token_batches(
    ids: torch.Tensor,
    seq_len: int,
    batch: int,
    max_batches: int | None = None,
    device=None,
    mask: torch.Tensor | None = None,
) -> list[dict]:
    """Consecutive ``(batch × seq_len)`` LM batches (:func:`lm_batch`, on ``device``; default CPU).
    Batch ``i`` holds ids ``[i·batch·(seq_len+1), (i+1)·batch·(seq_len+1))``; a last partial batch is
    dropped. ``mask (N,)``: the loss mask of ``ids``, cut the same way (``loss_mask`` in each batch)."""
    per_batch = batch * (seq_len + 1)
    n = ids.numel() // per_batch
    if n == 0:
        raise ValueError(f"{ids.numel()} tokens are fewer than one batch of {batch} × {seq_len + 1}")
    if max_batches:
        n = min(n, max_batches)
    shape = (batch, seq_len + 1)
    return [
        lm_batch(
            ids[i * per_batch : (i + 1) * per_batch].view(shape),
            device,
            None if mask is None else mask[i * per_batch : (i + 1) * per_batch].view(shape),
        )
        for i in range(n)
    ]
