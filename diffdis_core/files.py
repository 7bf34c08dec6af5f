"""The ground floor for files: every file the project writes goes through here.

Writes are rsync's temp-and-rename: a uniquely named temporary file is created exclusively
(``O_CREAT | O_EXCL``: it never opens or follows a link left at that name) in the target's own folder,
filled, given the permissions the user's umask asks for (not ``mkstemp``'s 0600, so a model trained
under one account loads under another), and renamed over the target in one step. Readers therefore see
the old file or the new one, never a torn one; two writers of one target both succeed, and the target
ends as one of them wrote it whole; a crash leaves at most a hidden ``.<name>.*.tmp`` behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def _umask() -> int:
    """The process's umask, read without changing it where the OS tells (Linux); elsewhere set and
    restored at once."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as status:
            return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temporary_name_pattern(target: str | os.PathLike) -> tuple[str, str]:
    """(prefix, suffix) of the temporary files ``atomic_write`` makes for ``target``."""
    return f".{Path(target).name}.", ".tmp"


@contextlib.contextmanager
def atomic_write(target: str | os.PathLike, mode: int = 0o666) -> Iterator[BinaryIO]:
    """Open a new, exclusively created temporary file beside ``target`` for binary writing; on a clean
    exit it is flushed to disk, given ``mode`` less the umask and renamed to ``target``; on an error it
    is removed and ``target`` is untouched."""
    target = Path(target)
    prefix, suffix = temporary_name_pattern(target)
    descriptor, temporary = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=target.parent)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
            os.fchmod(stream.fileno(), mode & ~_umask())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def write_bytes_atomic(target: str | os.PathLike, data: bytes) -> None:
    """``target``'s content becomes ``data``, whole or not at all (see ``atomic_write``)."""
    with atomic_write(target) as stream:
        stream.write(data)


def make_temporary_folder(target: str | os.PathLike) -> Path:
    """A new, exclusively created, empty folder beside ``target`` (to fill, then ``os.replace`` onto
    ``target``), with the permissions the umask asks for (not ``mkdtemp``'s 0700)."""
    target = Path(target)
    prefix, suffix = temporary_name_pattern(target)
    folder = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=target.parent))
    folder.chmod(0o777 & ~_umask())
    return folder


def apply_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (and, for a folder, everything in it) the permissions the umask asks for: for what a
    library wrote into a temporary folder of ours (safetensors' ``save_file`` makes its files 0600)."""
    path = Path(path)
    mask = _umask()
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not item.is_symlink():
            item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)
