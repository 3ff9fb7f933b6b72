"""Atomic writes: a file or a directory appears complete at its final path, or not at all.

    atomic_write_file(path, lambda tmp: save_file(tensors, str(tmp)))      # one file
    with atomic_output_dir("out/", overwrite=False) as tmp:                # a directory
        (tmp / "model.safetensors").write_bytes(...)

Both write into a temporary sibling (same directory, so the final ``os.replace`` is a rename on one file
system) named ``.<name>.tmp-<pid>-<random>`` (a file keeps its extension at the end) — hidden, and
recognisable as a temporary by the ``.tmp`` in its name (``calib.train.remove_stale_temporaries`` removes the
ones a killed process left). On any exception the temporary is removed and the final path is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path


def temporary_sibling(path: str | os.PathLike, tag: str = "tmp", suffix: str = "") -> Path:
    """A fresh name beside ``path``: ``.<name>.<tag>-<pid>-<random><suffix>``."""
    p = Path(path)
    return p.with_name(f".{p.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")


def atomic_write_file(path: str | os.PathLike, write_fn: Callable[[Path], object]) -> Path:
    """``write_fn(tmp)`` writes the whole file at the temporary path ``tmp``; it is then renamed to
    ``path`` (replacing an existing file). Returns ``path``. The directory of ``path`` must exist
    (``FileNotFoundError`` otherwise, from ``write_fn``); the temporary never survives."""
    path = Path(path)
    tmp = temporary_sibling(path, suffix=path.suffix)  # writers may pick the file type by extension
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> None:
    """``FileExistsError`` unless ``out`` is missing, an empty directory, or (``overwrite``) a directory."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")


def current_umask() -> int:
    """The process's umask (read without changing it for longer than one call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out``; when the block completes it is renamed to ``out``.

    ``out`` may be missing or an empty directory; a non-empty one raises ``FileExistsError`` (before
    anything is created) unless ``overwrite``: then the old directory is renamed aside, the new one
    renamed in (the old one is put back if that fails) and the old one deleted — ``out`` is briefly absent
    between the two renames. On any exception inside the block the temporary directory is removed and
    ``out`` is unchanged. Missing parent directories are created; the new directory gets the usual
    permissions (``0o777`` less the umask).
    """
    out = Path(out)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(out)
    tmp.mkdir(mode=0o777 & ~current_umask())
    try:
        yield tmp
        _replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(tmp: Path, out: Path) -> None:
    if not out.exists() or not any(out.iterdir()):
        os.replace(tmp, out)  # rename(2) replaces an empty directory
        return
    old = temporary_sibling(out, "tmp-old")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
