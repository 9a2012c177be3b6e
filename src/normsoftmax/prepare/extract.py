"""Archive extraction that cannot write outside its target, and knows when it finished.

:func:`extract_archive` reads the whole member list of a tar (plain, gz, bz2,
xz) or zip archive and checks every member before writing anything: absolute
names, ``..`` components, links whose target leaves the folder (or is
absolute), hard links to anything but a regular member, members reached
through a link, and device files / FIFOs all make the archive refused as a
whole (:class:`UnsafeArchiveError`), so a hostile archive writes nothing at
all. While writing, a parent folder that resolves outside the target (a
symlink already on disk) is refused too, and an existing symlink at a member's
path is replaced rather than written through.

A marker file (``.<archive name>.extracted.json``) is written last, after
every byte is on disk; :func:`is_extracted` looks for it, so an interrupted
extraction is detected and redone on the next run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import tarfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..files import atomic_write, ensure_free_space

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tbz", ".tar.xz", ".txz", ".zip")


class ExtractionError(RuntimeError):
    """The archive cannot be read or extracted."""


class UnsafeArchiveError(ExtractionError):
    """The archive has members that would land outside the target; nothing was written."""


@dataclass
class Member:
    name: str            # normalised relative POSIX path
    kind: str            # "file", "dir", "symlink", "hardlink"
    size: int = 0
    mode: int = 0o644
    mtime: float | None = None
    link: str | None = None   # symlink target as stored, or the hardlink's member name (normalised)
    source: Any = None        # TarInfo or ZipInfo


def is_archive(path: str | os.PathLike) -> bool:
    name = str(path).lower()
    return name.endswith(ARCHIVE_SUFFIXES)


def marker_path(archive: str | os.PathLike, target: str | os.PathLike) -> Path:
    return Path(target) / f".{Path(archive).name}.extracted.json"


def is_extracted(archive: str | os.PathLike, target: str | os.PathLike, fingerprint: str | None = None) -> bool:
    """True when ``archive`` was fully extracted into ``target``: its completion marker is there and describes
    this archive (the same ``fingerprint``, e.g. its SHA-256, when one is given; else the same size and mtime)."""
    marker = marker_path(archive, target)
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if info.get("complete") is not True:
        return False
    if fingerprint is not None:
        return info.get("fingerprint") == fingerprint
    try:
        status = os.stat(archive)
    except OSError:
        return True  # the archive was deleted after a successful preparation: the marker is all there is
    return info.get("archive_size") == status.st_size and info.get("archive_mtime_ns") == status.st_mtime_ns


def extract_archive(archive: str | os.PathLike, target: str | os.PathLike, *, force: bool = False,
                    progress: bool = True, fingerprint: str | None = None) -> dict:
    """Safely extract ``archive`` into ``target``; a no-op when its completion marker is present.

    ``fingerprint`` (e.g. the archive's SHA-256) is stored in the marker and identifies the archive on later
    calls; without it the archive's size and modification time do. Returns the marker's content: archive
    name and size, number of members, the top-level names. Raises :class:`UnsafeArchiveError` (nothing
    written) or :class:`ExtractionError`.
    """
    archive, target = Path(archive), Path(target)
    marker = marker_path(archive, target)
    if not force and is_extracted(archive, target, fingerprint):
        log.info("%s already extracted into %s", archive.name, target)
        return json.loads(marker.read_text())
    if marker.exists():
        marker.unlink()
    with _open(archive) as reader:
        members = list(reader.members())
        _check_members(members, archive)
        _check_space(members, target, archive)
        target.mkdir(parents=True, exist_ok=True)
        log.info("extracting %s (%d members) into %s", archive.name, len(members), target)
        _write_members(reader, members, target.resolve(), archive, progress)
    status = archive.stat()
    top_level = sorted({m.name.split("/", 1)[0] for m in members if m.name != "."})
    info = {"archive": archive.name, "archive_size": status.st_size, "archive_mtime_ns": status.st_mtime_ns,
            "fingerprint": fingerprint, "members": len(members), "files": sum(m.kind == "file" for m in members),
            "top_level": top_level, "complete": True, "extracted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write(marker, json.dumps(info, indent=1), durable=True)
    return info


# ----------------------------------------------------------------------------------------------- reading

class _Reader:
    """An archive's members, and a way to read each (tar and zip alike)."""

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def members(self) -> Iterator[Member]:
        raise NotImplementedError

    def open_member(self, member: Member) -> IO[bytes]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _TarReader(_Reader):
    def __init__(self, path: Path):
        try:
            self.tar = tarfile.open(path, "r:*")  # noqa: SIM115 - the reader owns it until close()
        except (tarfile.TarError, OSError, EOFError) as error:
            raise ExtractionError(f"{path}: cannot be read as a tar archive ({error})") from None
        self.path = path

    def members(self) -> Iterator[Member]:
        try:
            infos = self.tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as error:
            raise ExtractionError(f"{self.path}: damaged or truncated archive ({error})") from None
        for info in infos:
            name = info.name
            if info.isdir():
                kind = "dir"
            elif info.isreg():
                kind = "file"
            elif info.issym():
                kind = "symlink"
            elif info.islnk():
                kind = "hardlink"
            elif info.ischr() or info.isblk():
                kind = "device"
            elif info.isfifo():
                kind = "fifo"
            else:
                kind = f"special (type {info.type!r})"
            yield Member(name, kind, info.size, info.mode, info.mtime,
                         info.linkname if kind in ("symlink", "hardlink") else None, info)

    def open_member(self, member: Member) -> IO[bytes]:
        opened = self.tar.extractfile(member.source)
        if opened is None:
            raise ExtractionError(f"{self.path}: {member.name} cannot be read as a file")
        return opened

    def close(self) -> None:
        self.tar.close()


class _ZipReader(_Reader):
    def __init__(self, path: Path):
        try:
            self.zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as error:
            raise ExtractionError(f"{path}: cannot be read as a zip archive ({error})") from None
        self.path = path

    def members(self) -> Iterator[Member]:
        for info in self.zip.infolist():
            unix_mode = info.external_attr >> 16
            file_type = stat.S_IFMT(unix_mode)
            if info.is_dir():
                kind = "dir"
            elif file_type == stat.S_IFLNK:
                kind = "symlink"
            elif file_type in (stat.S_IFCHR, stat.S_IFBLK):
                kind = "device"
            elif file_type == stat.S_IFIFO:
                kind = "fifo"
            else:
                kind = "file"
            link = self.zip.read(info).decode("utf-8", "replace") if kind == "symlink" else None
            mtime = time.mktime(info.date_time + (0, 0, -1)) if info.date_time[0] >= 1980 else None
            yield Member(info.filename, kind, info.file_size, (stat.S_IMODE(unix_mode) or 0o644), mtime, link, info)

    def open_member(self, member: Member) -> IO[bytes]:
        return self.zip.open(member.source)

    def close(self) -> None:
        self.zip.close()


def _open(path: Path) -> _Reader:
    if not path.is_file():
        raise ExtractionError(f"{path}: no such archive")
    lower = path.name.lower()
    if lower.endswith(".zip"):
        return _ZipReader(path)
    if lower.endswith(ARCHIVE_SUFFIXES):
        return _TarReader(path)
    if zipfile.is_zipfile(path):
        return _ZipReader(path)
    if tarfile.is_tarfile(path):
        return _TarReader(path)
    raise ExtractionError(f"{path}: not a tar (gz/bz2/xz) or zip archive")


# ---------------------------------------------------------------------------------------------- checking

def _normalise(name: str) -> tuple[str, str | None]:
    """(normalised relative POSIX name, None) or ("", the reason it is unsafe)."""
    raw = name.replace("\\", "/")
    if not raw or raw.startswith("/") or (len(raw) > 1 and raw[1] == ":") or "\x00" in raw:
        return "", "absolute path" if raw.startswith("/") or raw[1:2] == ":" else "empty or invalid name"
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        return "", "'..' in the path"
    if not parts:
        return ".", None
    return "/".join(parts), None


def _check_members(members: list[Member], archive: Path) -> None:
    problems = []
    regular = set()
    links = set()
    for member in members:
        name, why = _normalise(member.name)
        if why:
            problems.append(f"{member.name!r}: {why}")
            continue
        member.name = name
        if name == "." and member.kind != "dir":
            problems.append(f"{member.name!r}: a {member.kind} in place of the target folder itself")
            continue
        if member.kind not in ("file", "dir", "symlink", "hardlink"):
            problems.append(f"{member.name!r}: {member.kind} members are not allowed")
            continue
        if member.kind == "file":
            regular.add(name)
        if member.kind in ("symlink", "hardlink"):
            links.add(name)
    for member in members:
        if member.kind == "symlink":
            why = _symlink_problem(member, links)
            if why:
                problems.append(f"{member.name!r}: symlink to {member.link!r} {why}")
        elif member.kind == "hardlink":
            link_name, why = _normalise(member.link or "")
            if why:
                problems.append(f"{member.name!r}: hard link to {member.link!r} ({why})")
            elif link_name not in regular:
                problems.append(f"{member.name!r}: hard link to {member.link!r}, which is not a regular file in the "
                                "archive")
            else:
                member.link = link_name
    # Nothing may be written through a link: a member below a link member is refused.
    for member in members:
        parts = member.name.split("/")
        for depth in range(1, len(parts)):
            if "/".join(parts[:depth]) in links:
                problems.append(f"{member.name!r}: lies below the link {'/'.join(parts[:depth])!r}")
                break
    if problems:
        listed = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise UnsafeArchiveError(f"{archive}: refusing to extract; {len(problems)} unsafe member(s) "
                                 f"(nothing was written):\n  {listed}{more}")


def _symlink_problem(member: Member, links: set[str]) -> str | None:
    """Why a symlink member is unsafe, or None: its target, walked from the link's folder one component at a
    time, must never climb above the target folder nor pass through another link (whose own target could
    move the walk elsewhere)."""
    target = (member.link or "").replace("\\", "/")
    if not target or "\x00" in target:
        return "(empty or invalid target)"
    if target.startswith("/") or target[1:2] == ":":
        return "(an absolute path)"
    stack = member.name.split("/")[:-1]
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not stack:
                return "points outside the target"
            stack.pop()
        else:
            stack.append(part)
            if "/".join(stack) in links:
                return f"passes through the link {'/'.join(stack)!r}"
    return None


def _check_space(members: list[Member], target: Path, archive: Path) -> None:
    needed = sum(m.size for m in members if m.kind == "file")
    ensure_free_space(target, needed, f"extracting {archive}", error=ExtractionError)


# ----------------------------------------------------------------------------------------------- writing

def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _safe_parent(destination: Path, root: Path, checked: dict[Path, Path]) -> Path:
    """Create the parent folder of ``destination`` and make sure it really lies inside ``root``.

    ``checked`` remembers folders already resolved: only this extraction creates links, and it creates
    them after every folder and file, so a folder found safe stays safe.
    """
    parent = destination.parent
    real = checked.get(parent)
    if real is None:
        parent.mkdir(parents=True, exist_ok=True)
        real = parent.resolve()
        if not _inside(real, root):
            raise UnsafeArchiveError(f"{destination}: its folder resolves to {real}, outside {root}; "
                                     f"a symlink on disk points out of the target. Remove it and run again.")
        checked[parent] = real
    return real / destination.name


def _write_members(reader: _Reader, members: list[Member], root: Path, archive: Path, progress: bool) -> None:
    from tqdm import tqdm

    total = sum(m.size for m in members if m.kind == "file")
    bar = tqdm(total=total, desc=f"extracting {archive.name}", unit="B", unit_scale=True, unit_divisor=1024,
               disable=not progress, leave=False, dynamic_ncols=True)
    deferred_dirs = []
    checked: dict[Path, Path] = {}
    try:
        for member in members:
            if member.name == ".":
                continue
            destination = root / member.name
            if member.kind == "dir":
                final = _safe_parent(destination, root, checked)
                if final.is_symlink() or (final.exists() and not final.is_dir()):
                    _remove(final)
                final.mkdir(exist_ok=True)
                deferred_dirs.append((final, member))
            elif member.kind == "file":
                final = _safe_parent(destination, root, checked)
                if final.is_symlink() or final.exists():
                    # Never write into an existing file: it may be a hard link to one outside the target.
                    _remove(final)
                with reader.open_member(member) as source, open(final, "xb") as sink:
                    while True:
                        block = source.read(1 << 20)
                        if not block:
                            break
                        sink.write(block)
                        bar.update(len(block))
                _apply_metadata(final, member)
        # Links last, so that no regular member can be written through one.
        for member in members:
            destination = root / member.name
            if member.kind == "hardlink":
                final = _safe_parent(destination, root, {})
                if final.is_symlink() or final.exists():
                    _remove(final)
                linked = (root / (member.link or "")).resolve()
                if not _inside(linked, root):
                    raise UnsafeArchiveError(f"{destination}: hard link source {linked} is outside {root}")
                shutil.copyfile(linked, final)  # a copy, never a link to anything outside
                _apply_metadata(final, member)
            elif member.kind == "symlink":
                final = _safe_parent(destination, root, {})
                if final.parent != Path(os.path.normpath(destination.parent)):
                    # The link target was checked from where the archive puts the link; a symlinked folder
                    # already on disk would put it elsewhere, where the same target can point out.
                    raise UnsafeArchiveError(f"{destination}: a symlink on disk redirects its folder to "
                                             f"{final.parent}; refusing to create a link there. Remove the "
                                             "symlink and run again.")
                if final.is_symlink() or final.exists():
                    _remove(final)
                os.symlink((member.link or "").replace("\\", "/"), final)
        for final, member in reversed(deferred_dirs):
            if member.mtime is not None:
                os.utime(final, (member.mtime, member.mtime))
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as error:
        raise ExtractionError(f"{archive}: extraction failed ({type(error).__name__}: {error}); "
                              f"run again to redo it") from None
    finally:
        bar.close()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _apply_metadata(path: Path, member: Member) -> None:
    # Owner read/write always, execute bits as stored, never setuid/setgid/sticky.
    os.chmod(path, (member.mode & 0o755) | 0o600)
    if member.mtime is not None:
        os.utime(path, (member.mtime, member.mtime))


__all__ = ["extract_archive", "is_extracted", "is_archive", "marker_path", "ExtractionError", "UnsafeArchiveError"]
