"""Atomic writes: a file or a directory appears complete at its final path, or not at all.

    atomic_write_file(path, lambda tmp: save_file(tensors, str(tmp)))      # one file
    with atomic_output_dir("out/", overwrite=False) as tmp:                # a directory
        (tmp / "model.safetensors").write_bytes(...)

Both write into a temporary sibling (same directory, so the final ``os.replace`` is a rename on one file
system) named ``.<name>.tmp-<pid>-<random>`` (a file keeps its extension at the end) — hidden, and
recognisable as a temporary by the ``.tmp`` in its name. On any exception the temporary is removed and the
final path is left as it was.

**Stale temporaries.** A killed process can leave its temporary behind; the next write to the same path
removes every ``.<name>.tmp*-<pid>-*`` sibling whose process ``pid`` no longer runs on this host
(:func:`remove_stale_siblings`; temporaries of running processes are left alone).

**Concurrent writers** of one directory (:func:`atomic_output_dir`): a lock file ``.<name>.lock``
(created with ``O_CREAT | O_EXCL``, holding the writer's pid; a stale one of a dead process is taken over)
refuses a second writer at once with ``FileExistsError``; and without ``overwrite`` the final rename does
not replace a directory another process completed meanwhile (``rename(2)`` fails on a non-empty target):
exactly one writer wins, the other raises ``FileExistsError`` and leaves nothing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path


def temporary_sibling(path: str | os.PathLike, tag: str = "tmp", suffix: str = "") -> Path:
    """A fresh name beside ``path``: ``.<name>.<tag>-<pid>-<random><suffix>``."""
    p = Path(path)
    return p.with_name(f".{p.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_siblings(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries (``.<name>.tmp*-<pid>-<id>…``) and the lock of ``path`` that processes no
    longer running left; returns what was removed."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(p.name)}\.tmp[\w-]*?-(\d+)-[0-9a-f]{{8}}")
    removed = []
    for q in parent.iterdir():
        m = pattern.match(q.name)
        if m and not _pid_alive(int(m.group(1))):
            if q.name.startswith(f".{p.name}.tmp-old-") and not p.exists():
                os.replace(q, p)  # killed between the two renames of an overwrite: put the old one back
                continue
            shutil.rmtree(q, ignore_errors=True) if q.is_dir() and not q.is_symlink() else q.unlink(True)
            removed.append(q)
    lock = lock_path(p)
    holder = _lock_holder(lock)
    if holder is not None and not _pid_alive(holder):
        lock.unlink(missing_ok=True)
        removed.append(lock)
    return removed


def lock_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p.with_name(f".{p.name}.lock")


def _lock_holder(lock: Path) -> int | None:
    try:
        text = lock.read_text().strip()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    except OSError:
        return None
    return int(text) if text.isdigit() else 0  # 0: unreadable content, treated as a dead holder


@contextlib.contextmanager
def write_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold ``.<name>.lock`` beside ``path`` while the block runs; ``FileExistsError`` when a running
    process holds it (a lock of a dead process is taken over)."""
    lock = lock_path(path)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            holder = _lock_holder(lock)
            if holder is not None and _pid_alive(holder) and holder != 0:
                raise FileExistsError(
                    f"{path} is being written by another process (pid {holder}; lock {lock})"
                ) from None
            lock.unlink(missing_ok=True)  # stale: its writer is gone
    else:
        raise FileExistsError(f"{path}: cannot take the lock {lock}")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        yield lock
    finally:
        lock.unlink(missing_ok=True)


def atomic_write_file(path: str | os.PathLike, write_fn: Callable[[Path], object]) -> Path:
    """``write_fn(tmp)`` writes the whole file at the temporary path ``tmp``; it is then renamed to
    ``path`` (replacing an existing file). Returns ``path``. The directory of ``path`` must exist
    (``FileNotFoundError`` otherwise, from ``write_fn``); the temporary never survives."""
    path = Path(path)
    remove_stale_siblings(path)
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
    permissions (``0o777`` less the umask). A concurrent writer of ``out`` raises ``FileExistsError``
    (see the module docstring); stale temporaries of killed writers are removed first.
    """
    out = Path(out)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(out)
    with write_lock(out):
        check_output_dir(out, overwrite)  # again: a writer may have finished before we took the lock
        tmp = temporary_sibling(out)
        tmp.mkdir(mode=0o777 & ~current_umask())
        try:
            yield tmp
            _replace_dir(tmp, out, overwrite)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(tmp: Path, out: Path, overwrite: bool = True) -> None:
    if not overwrite or not out.exists() or not any(out.iterdir()):
        try:
            os.rename(tmp, out)  # rename(2) replaces a missing or empty directory, never a non-empty one
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise FileExistsError(
                    f"{out} was written by another process meanwhile; pass overwrite=True to replace it"
                ) from None
            raise
        return
    old = temporary_sibling(out, "tmp-old")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
