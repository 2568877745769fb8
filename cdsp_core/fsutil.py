"""Atomic file output: write to a temporary name beside the target, then rename.

A reader (or a retried pipeline step) therefore sees either the old file or the whole
new one, never half of it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cdsp_core.errors import CdspError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _raise_if_disk_full(path: Path, e: BaseException) -> None:
    """A full disk (or quota) becomes a CdspError naming the file; the caller re-raises anything else."""
    if isinstance(e, OSError) and e.errno in DISK_FULL:
        raise CdspError(f"{path}: cannot write: {os.strerror(e.errno)} in {path.parent}; "
                        "an earlier version of it, if any, is kept") from e


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto `path` on success."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        _raise_if_disk_full(path, e)
        raise
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        _raise_if_disk_full(path, e)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a whole output folder under a temporary name; swap it in on success.

    On failure the temporary folder is removed and an existing `path` is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        _raise_if_disk_full(path, e)
        raise
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, CdspError) and str(tmp) in str(e):  # name the user's folder, not ours (now gone)
            raise CdspError(str(e).replace(str(tmp), str(path))) from e
        _raise_if_disk_full(path, e)
        raise


def replace_dir(new: Path, path: Path) -> None:
    """Put the folder `new` in the place of `path` (a folder, a link or nothing) with two renames;
    the old folder is removed only once the new one is in place."""
    if not (path.exists() or path.is_symlink()):
        os.replace(new, path)
        return
    old = path.with_name(f".{path.name}.old")
    _remove(old)
    os.replace(path, old)
    os.replace(new, path)
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
