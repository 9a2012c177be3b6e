"""Writing files so that a crash or a full disk never leaves a half-written one behind, and checking space first.

Every file the package writes for keeps (configs, manifests, checkpoints, evaluations, caches, indexes,
embeddings) goes through :func:`atomic_output`: the bytes go to a temporary sibling, which replaces the
target only once complete. With ``durable=True`` the temporary file is fsynced before the rename and the
folder after it, so the new file survives a power cut, not only a killed process.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


class NotEnoughSpaceError(OSError):
    """A write that would not fit on the disk; the message says how much space was needed."""


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make a rename inside ``directory`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an error it replaces ``path``.

    On an error the temporary file is removed and ``path`` keeps its previous content. A full disk
    (``ENOSPC``) is reported as :class:`NotEnoughSpaceError` naming the file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield temporary
        if durable:
            with open(temporary, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(temporary, path)
        if durable:
            fsync_directory(path.parent)
    except OSError as error:
        written = temporary.stat().st_size if temporary.exists() else 0
        temporary.unlink(missing_ok=True)
        if error.errno == errno.ENOSPC and not isinstance(error, NotEnoughSpaceError):
            free = _free_bytes(path.parent)
            raise NotEnoughSpaceError(
                errno.ENOSPC, f"the disk is full: writing {path} stopped after {_size(written)} with "
                              f"{_size(free)} free; the previous {path.name} (if any) is unchanged") from error
        raise
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: str | bytes, *, durable: bool = False) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` through :func:`atomic_output`."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_output(path, durable=durable) as temporary:
        temporary.write_bytes(payload)


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read in blocks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_free_space(directory: str | os.PathLike, needed: int | float, what: str, error=NotEnoughSpaceError) -> None:
    """Raise ``error`` when ``needed`` bytes do not fit under ``directory`` (its nearest existing ancestor)."""
    free = _free_bytes(directory)
    if free is not None and needed > free:
        message = f"{what} needs about {_size(needed)} in {directory}, but only {_size(free)} are free"
        raise error(errno.ENOSPC, message) if issubclass(error, OSError) else error(message)


def _free_bytes(directory: str | os.PathLike) -> int | None:
    probe = Path(directory)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def _size(count: int | float | None) -> str:
    if count is None:
        return "an unknown amount"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{int(count)} bytes"


__all__ = ["atomic_output", "atomic_write", "ensure_free_space", "file_sha256", "fsync_directory",
           "NotEnoughSpaceError"]
