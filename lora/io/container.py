"""The svdq checkpoint container: named tensors + JSON metadata as safetensors, written atomically.

A checkpoint is a *directory* holding either

* ``model.safetensors`` — every tensor; the safetensors header's ``__metadata__`` holds
  ``format`` (``"svdq"``), ``naming_version`` (``"1"``), ``metadata`` (the JSON document) and
  ``checksum``; or
* shards ``model-00001-of-0000N.safetensors`` … (``__metadata__``: ``format``, ``naming_version``,
  ``checksum``) and ``model.safetensors.index.json``:
  ``{"metadata": {...}, "weight_map": {tensor: shard file}, "checksum": "..."}`` — when a
  ``max_shard_bytes`` limit is given (tensors are packed greedily in key order; a tensor larger than the
  limit gets a shard of its own).

The JSON document always carries ``format``, ``naming_version`` and ``tool_version`` (the installed svdq
version); what else it says (layers, naming) is up to the caller (:mod:`lora.io.naming`).

``checksum`` is the SHA-256 of the canonical JSON of the header's ``__metadata__`` (without the checksum)
and every tensor's ``[dtype, shape]`` (for the index: of ``metadata`` and ``weight_map``). Together with
the structural checks of :class:`CheckpointReader` (data offsets contiguous and matching dtype × shape,
total data size = file size) every change of a header byte is detected.

**Tensor data.** Each file's ``__metadata__`` also holds ``tensor_checksums``: JSON
``{"algorithm": "crc32", "tensors": {name: 8 hex digits}}``, the CRC-32 (``zlib.crc32``, about 3 GiB/s on
one core; see bench/bench_checksum.py) of every tensor's raw little-endian bytes. :meth:`CheckpointReader.get`
verifies a tensor's checksum when it reads it (``verify=False``, or :func:`verification` ``(False)``, skips
it for trusted multi-GB checkpoints), and always checks its values against their domain
(:mod:`lora.io.values`: scales and smoothing finite and positive, no NaN anywhere, ...). Files written before
per-tensor checksums existed have no ``tensor_checksums`` and load with the value checks only. The
checksums are unkeyed: they catch damage and careless edits, not an attacker who recomputes them (no file
is trusted to run code, see calib/cli/common.py).

Before writing, every floating tensor must be finite (``ValueError`` naming the first that is not; the
int4 multiplier ``weight_scale``, which is ``inf`` for an all-zero group, is checked for NaN only).

**Atomic writes** (:func:`lora.io.atomic.atomic_output_dir`). Everything is written into a temporary sibling
directory ``.<name>.tmp-<pid>-<id>``, which is renamed to ``out_dir`` only when complete; on any error it is
removed, so a failed write leaves no output directory and no partial file (a killed process can leave the
hidden temporary directory). A non-empty existing ``out_dir`` is refused unless ``overwrite=True``; then it
is replaced only after the new directory is complete.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import importlib.metadata
import json
import os
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lora.io.atomic import atomic_output_dir, check_output_dir, current_umask
from lora.io.values import check_values

FORMAT = "svdq"
NAMING_VERSION = "1"
SUPPORTED_NAMING_VERSIONS = ("1",)
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER_BYTES = 512 * 1024 * 1024
CHECKSUMS_KEY = "tensor_checksums"
CHECKSUM_ALGORITHM = "crc32"
_VERIFY: contextvars.ContextVar[bool] = contextvars.ContextVar("svdq_verify_checksums", default=True)


@contextlib.contextmanager
def verification(enabled: bool):
    """Within the block, :class:`CheckpointReader` objects created without ``verify=`` verify the per-tensor
    checksums only if ``enabled`` (``with verification(False): load_quantized(...)`` for a trusted file)."""
    token = _VERIFY.set(bool(enabled))
    try:
        yield
    finally:
        _VERIFY.reset(token)


def tensor_checksum(t: Tensor) -> str:
    """CRC-32 (8 hex digits) of the raw bytes of the CPU tensor ``t`` (any dtype)."""
    t = t.detach().contiguous()
    if t.numel() == 0:
        return f"{zlib.crc32(b''):08x}"
    raw = t.reshape(-1).view(torch.uint8).numpy()
    return f"{zlib.crc32(memoryview(raw)):08x}"


# torch dtype <-> safetensors dtype string
DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_FROM_STR = {v: k for k, v in DTYPES.items()}
_ITEMSIZE = {v: torch.empty((), dtype=k).element_size() for k, v in DTYPES.items()}
DTYPE_NAMES = {dt: str(dt).removeprefix("torch.") for dt in DTYPES}


def dtype_from_name(name: str, who: str = "dtype") -> torch.dtype:
    """``"float8_e4m3fn"`` → ``torch.float8_e4m3fn`` (only dtypes the container stores)."""
    for dt, n in DTYPE_NAMES.items():
        if n == name:
            return dt
    raise ValueError(f"{who}: unknown dtype {name!r}; expected one of {sorted(DTYPE_NAMES.values())}")


def tool_version() -> str:
    try:
        return importlib.metadata.version("svdq")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _checksum(document: Any) -> str:
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _header_checksum(meta: dict[str, str], specs: dict[str, tuple[str, list[int]]]) -> str:
    meta = {k: v for k, v in meta.items() if k != "checksum"}
    return _checksum({"__metadata__": meta, "tensors": {k: [d, list(s)] for k, (d, s) in specs.items()}})


def _index_checksum(metadata: dict, weight_map: dict) -> str:
    return _checksum({"metadata": metadata, "weight_map": weight_map})


# ----------------------------------------------------------------------------------------------- write


def _plan_shards(tensors: dict[str, Tensor], max_shard_bytes: int | None) -> list[list[str]]:
    if max_shard_bytes is None:
        return [list(tensors)]
    if not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be a positive int or None, got {max_shard_bytes!r}")
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _check_finite(name: str, t: Tensor) -> None:
    """Refuse writing non-finite values (the int4 multiplier may be ``inf``: checked by its domain)."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    if name.endswith(".weight_scale") and t.dtype != torch.float8_e4m3fn:
        check_values(name, t.detach().cpu(), "cannot write")
        return
    x = t.detach()
    x = x.float() if x.element_size() < 4 else x
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"cannot write tensor {name}: it holds NaN or inf")


def _check_tensors(tensors: dict[str, Tensor]) -> None:
    for name, t in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"invalid tensor name {name!r}")
        if not isinstance(t, Tensor):
            raise TypeError(f"tensor {name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in DTYPES:
            raise TypeError(
                f"tensor {name}: dtype {t.dtype} cannot be stored; supported: {list(DTYPE_NAMES.values())}"
            )
        _check_finite(name, t)


def _save_file(tensors: dict[str, Tensor], path: Path, header_meta: dict[str, str]) -> None:
    """One safetensors file (separate function so tests can make it fail midway)."""
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=header_meta)
    except OSError:
        raise
    except Exception as exc:  # safetensors raises its own SafetensorError for I/O failures too
        raise OSError(f"{path}: cannot write: {exc}") from exc
    os.chmod(path, 0o666 & ~current_umask())  # safetensors creates files 0600; use the usual permissions


def _write_file(names: Iterable[str], tensors: dict[str, Tensor], path: Path, meta: dict[str, str]) -> None:
    part = {n: tensors[n].detach().to("cpu").contiguous() for n in names}
    specs = {n: (DTYPES[t.dtype], list(t.shape)) for n, t in part.items()}
    sums = {n: tensor_checksum(t) for n, t in part.items()}
    meta = {
        **meta,
        CHECKSUMS_KEY: json.dumps({"algorithm": CHECKSUM_ALGORITHM, "tensors": sums}, sort_keys=True),
    }
    meta = {**meta, "checksum": _header_checksum(meta, specs)}
    # safetensors refuses tensors sharing memory; clone those
    seen: set[int] = set()
    for n, t in part.items():
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            part[n] = t.clone()
        elif ptr is not None:
            seen.add(ptr)
    _save_file(part, path, meta)


def write_checkpoint(
    out_dir: str | os.PathLike,
    tensors: dict[str, Tensor],
    metadata: dict[str, Any],
    *,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``tensors`` and the JSON ``metadata`` as a checkpoint directory (see the module docstring).

    ``metadata`` must be JSON-serializable; ``format``, ``naming_version`` and ``tool_version`` are set
    here. Returns the output directory. Raises ``FileExistsError`` for a non-empty ``out_dir`` without
    ``overwrite`` (before writing anything), ``TypeError`` / ``ValueError`` naming a tensor that cannot be
    stored; any failure leaves ``out_dir`` as it was.
    """
    out = Path(out_dir)
    check_output_dir(out, overwrite)  # before anything else is checked or written
    _check_tensors(tensors)
    document = {
        **metadata,
        "format": FORMAT,
        "naming_version": NAMING_VERSION,
        "tool_version": tool_version(),
    }
    text = json.dumps(document, sort_keys=True)  # fails early on non-JSON metadata
    document = json.loads(text)
    shards = _plan_shards(tensors, max_shard_bytes)
    with atomic_output_dir(out, overwrite) as tmp:
        base = {"format": FORMAT, "naming_version": NAMING_VERSION}
        if max_shard_bytes is None:
            _write_file(shards[0], tensors, tmp / SINGLE_FILE, {**base, "metadata": text})
        else:
            n = len(shards)
            weight_map = {}
            for i, names in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                _write_file(names, tensors, tmp / fname, base)
                weight_map.update(dict.fromkeys(names, fname))
            index = {"metadata": document, "weight_map": weight_map}
            index["checksum"] = _index_checksum(document, weight_map)
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=1, sort_keys=True))
    return out


# ----------------------------------------------------------------------------------------------- read


def _read_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[str, list[int]]]]:
    """``(__metadata__, {tensor: (dtype string, shape)})`` of a safetensors file, fully validated."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("file is shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER_BYTES):
                raise ValueError(
                    f"header length {n} does not fit the file ({size} bytes): truncated or corrupt"
                )
            raw = fh.read(n)
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        meta = header.pop("__metadata__", None)
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ValueError("header has no string __metadata__")
        specs, spans = {}, []
        for name, entry in header.items():
            if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
                raise ValueError(f"bad header entry for tensor {name!r}")
            dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
            if dtype not in _ITEMSIZE:
                raise ValueError(f"tensor {name!r}: unknown dtype {dtype!r}")
            if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError(f"tensor {name!r}: bad shape {shape!r}")
            ok = isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            numel = 1
            for d in shape:
                numel *= d
            if not ok or offsets[1] - offsets[0] != numel * _ITEMSIZE[dtype] or offsets[0] < 0:
                raise ValueError(f"tensor {name!r}: data offsets {offsets!r} do not match {dtype} {shape}")
            specs[name] = (dtype, shape)
            spans.append((offsets[0], offsets[1], name))
        end = 0
        for begin, stop, name in sorted(spans):
            if begin != end:
                raise ValueError(f"tensor {name!r}: data offsets are not contiguous")
            end = stop
        if end != size - 8 - n:
            raise ValueError(
                f"data is {size - 8 - n} bytes, the header describes {end}: truncated or corrupt"
            )
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError, struct.error) as exc:
        raise ValueError(f"{path}: not a valid safetensors file: {exc}") from exc
    return meta, specs


def _check_fields(where: dict, source: Path) -> None:
    fmt = where.get("format")
    if fmt != FORMAT:
        raise ValueError(f"{source}: field 'format' is {fmt!r}, expected {FORMAT!r} (not an svdq checkpoint)")
    version = where.get("naming_version")
    if version not in SUPPORTED_NAMING_VERSIONS:
        raise ValueError(
            f"{source}: field 'naming_version' is {version!r}; "
            f"this svdq reads {list(SUPPORTED_NAMING_VERSIONS)}"
        )


def resolve(path: str | os.PathLike) -> tuple[Path, Path | None, Path | None]:
    """``(directory, single file or None, index file or None)`` for a checkpoint directory or file."""
    p = Path(path)
    if p.is_dir():
        single, index = p / SINGLE_FILE, p / INDEX_FILE
        if index.is_file():
            return p, None, index
        if single.is_file():
            return p, single, None
        raise FileNotFoundError(f"{p}: no {SINGLE_FILE} or {INDEX_FILE} (not an svdq checkpoint directory)")
    if p.is_file():
        return (p.parent, None, p) if p.name.endswith(".json") else (p.parent, p, None)
    raise FileNotFoundError(f"{p}: no such checkpoint")


class CheckpointReader:
    """Validated, lazy access to a checkpoint directory (or its ``model.safetensors`` / index file).

    ``metadata``: the JSON document. ``specs``: tensor → ``(torch dtype, shape tuple)``. ``files``:
    tensor → the file holding it. :meth:`get` loads one tensor. Use as a context manager (or
    :meth:`close`) to release the file handles.

    Raises ``ValueError`` naming the file for a damaged safetensors header, a truncated file, a bad
    index, wrong ``format`` / unknown ``naming_version`` fields (naming the field), a checksum mismatch,
    a tensor listed in the index but absent from its shard; ``FileNotFoundError`` for a missing shard.
    """

    def __init__(self, path: str | os.PathLike, *, verify: bool | None = None):
        self.path, single, index = resolve(path)
        self.verify = _VERIFY.get() if verify is None else bool(verify)
        self._handles: dict[Path, Any] = {}
        self.files: dict[str, Path] = {}
        self.checksums: dict[str, str] = {}  # tensor -> crc32 hex (absent in files of older versions)
        raw: dict[str, tuple[str, list[int]]] = {}
        if single is not None:
            meta, specs = _read_header(single)
            _check_fields(meta, single)
            if meta.get("checksum") != _header_checksum(meta, specs):
                raise ValueError(f"{single}: header checksum mismatch (the header was modified or damaged)")
            try:
                self.metadata = json.loads(meta["metadata"])
            except (KeyError, json.JSONDecodeError) as exc:
                raise ValueError(f"{single}: field 'metadata' is missing or not JSON ({exc})") from exc
            raw = specs
            self.files = dict.fromkeys(specs, single)
            self.checksums.update(_tensor_checksums(meta, specs, single))
            source = single
        else:
            self.metadata = self._read_index(index, raw)
            source = index
        if not isinstance(self.metadata, dict):
            raise ValueError(f"{source}: field 'metadata' is not a JSON object")
        _check_fields(self.metadata, source)
        self.specs = {k: (_FROM_STR[d], tuple(s)) for k, (d, s) in raw.items()}

    def _read_index(self, index: Path, raw: dict) -> dict:
        try:
            doc = json.loads(index.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{index}: not a valid index file: {exc}") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("metadata"), dict):
            raise ValueError(f"{index}: field 'metadata' is missing or not an object")
        _check_fields(doc["metadata"], index)
        weight_map = doc.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index}: field 'weight_map' is missing or malformed")
        if doc.get("checksum") != _index_checksum(doc["metadata"], weight_map):
            raise ValueError(f"{index}: checksum mismatch (the index was modified or damaged)")
        for fname in sorted(set(weight_map.values())):
            shard = index.parent / fname
            if Path(fname).name != fname or not shard.is_file():
                raise FileNotFoundError(f"{index}: shard {fname} is missing")
            meta, specs = _read_header(shard)
            _check_fields(meta, shard)
            if meta.get("checksum") != _header_checksum(meta, specs):
                raise ValueError(f"{shard}: header checksum mismatch (the header was modified or damaged)")
            self.checksums.update(_tensor_checksums(meta, specs, shard))
            for name in specs:
                if weight_map.get(name) != fname:
                    raise ValueError(f"{shard}: tensor {name} is not listed for this shard in {index.name}")
                raw[name] = specs[name]
                self.files[name] = shard
        for name, fname in weight_map.items():
            if name not in raw:
                raise ValueError(f"{index.parent / fname}: tensor {name} listed in {index.name} is missing")
        return doc["metadata"]

    # -- access
    def keys(self) -> list[str]:
        return list(self.specs)

    def __contains__(self, name: str) -> bool:
        return name in self.specs

    def check(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], who: str = "") -> None:
        """Raise ``ValueError`` naming the tensor unless it exists with ``dtype`` and ``shape``."""
        who = f"{who}: " if who else ""
        if name not in self.specs:
            raise ValueError(f"{who}tensor {name} is missing from the checkpoint {self.path}")
        got_dtype, got_shape = self.specs[name]
        if got_dtype != dtype or got_shape != tuple(shape):
            raise ValueError(
                f"{who}tensor {name} in {self.files[name].name} is "
                f"{DTYPE_NAMES[got_dtype]} {list(got_shape)}, "
                f"expected {DTYPE_NAMES.get(dtype, dtype)} {list(shape)}"
            )

    def get(self, name: str) -> Tensor:
        """Load tensor ``name`` (CPU): its checksum verified (unless ``verify`` is off; files without
        checksums skip this) and its values checked (:mod:`lora.io.values`); ``ValueError`` naming the
        file and tensor otherwise."""
        if name not in self.specs:
            raise KeyError(f"tensor {name} is missing from the checkpoint {self.path}")
        from safetensors import safe_open

        path = self.files[name]
        try:
            if path not in self._handles:
                self._handles[path] = safe_open(str(path), framework="pt")
            t = self._handles[path].get_tensor(name)
        except Exception as exc:  # safetensors raises its own error type
            raise ValueError(f"{path}: cannot read tensor {name}: {exc}") from exc
        expected = self.checksums.get(name)
        if self.verify and expected is not None and tensor_checksum(t) != expected:
            raise ValueError(
                f"{path}: tensor {name}: data checksum mismatch (the file is damaged or was modified; "
                f"{CHECKSUM_ALGORITHM} {tensor_checksum(t)}, recorded {expected})"
            )
        return check_values(name, t, str(path))

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _tensor_checksums(meta: dict[str, str], specs: dict, source: Path) -> dict[str, str]:
    """The per-tensor checksums recorded in a file's ``__metadata__`` (``{}`` for older files)."""
    text = meta.get(CHECKSUMS_KEY)
    if text is None:
        return {}
    try:
        doc = json.loads(text)
        sums = doc["tensors"]
        ok = doc.get("algorithm") == CHECKSUM_ALGORITHM and isinstance(sums, dict)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        ok = False
    if (
        not ok
        or set(sums) != set(specs)
        or not all(isinstance(v, str) and len(v) == 8 for v in sums.values())
    ):
        raise ValueError(f"{source}: field {CHECKSUMS_KEY!r} is malformed or does not list every tensor")
    return dict(sums)


def read_metadata(path: str | os.PathLike) -> dict:
    """The JSON metadata of a checkpoint (validated like :class:`CheckpointReader`)."""
    with CheckpointReader(path) as reader:
        return reader.metadata
