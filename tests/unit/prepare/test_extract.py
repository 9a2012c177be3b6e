"""Safe extraction: hostile archives write nothing anywhere; interrupted extractions are redone."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from normsoftmax.prepare import extract
from normsoftmax.prepare.extract import (
    ExtractionError,
    UnsafeArchiveError,
    extract_archive,
    is_extracted,
    marker_path,
)

FILES = {"pkg/a.txt": b"alpha\n", "pkg/sub/b.bin": bytes(range(256)) * 10, "top.txt": b"top\n"}


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes):
    return tarfile.TarInfo(name), data


def _special(name: str, kind, link: str = ""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info, None


def _zip(path: Path, members: list[tuple[str | zipfile.ZipInfo, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members:
            archive.writestr(name, data)
    return path


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def work(tmp_path):
    """(archive folder, the parent of the target, the target); the target does not exist yet."""
    archives = tmp_path / "archives"
    archives.mkdir()
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "bystander.txt").write_text("untouched")
    return archives, parent, parent / "target"


@pytest.mark.parametrize("suffix,mode", [(".tar.gz", "w:gz"), (".tar.bz2", "w:bz2"), (".tar.xz", "w:xz"), (".tar",
                                                                                                           "w")])
def test_tar_formats_extract_with_a_completion_marker(work, suffix, mode):
    archives, parent, target = work
    archive = _tar(archives / f"data{suffix}", [_file(n, d) for n, d in FILES.items()], mode)
    info = extract_archive(archive, target, progress=False)
    for name, data in FILES.items():
        assert (target / name).read_bytes() == data
    assert info["members"] == 3 and info["top_level"] == ["pkg", "top.txt"]
    assert is_extracted(archive, target) and marker_path(archive, target).is_file()


def test_zip_extracts_with_a_completion_marker(work):
    archives, parent, target = work
    archive = _zip(archives / "data.zip", list(FILES.items()))
    extract_archive(archive, target, progress=False)
    assert {n: (target / n).read_bytes() for n in FILES} == FILES
    assert is_extracted(archive, target)


HOSTILE_TARS = {
    "dotdot": [_file("ok.txt", b"fine"), _file("../evil.txt", b"pwned")],
    "nested-dotdot": [_file("ok.txt", b"fine"), _file("pkg/../../evil.txt", b"pwned")],
    "absolute": [_file("ok.txt", b"fine"), _file("/tmp/normsoftmax-evil.txt", b"pwned")],
    "symlink-out": [_file("ok.txt", b"fine"), _special("link", tarfile.SYMTYPE, "../")],
    "symlink-absolute": [_file("ok.txt", b"fine"), _special("link", tarfile.SYMTYPE, "/etc")],
    "write-through-symlink": [_special("inner", tarfile.SYMTYPE, "."), _file("inner/evil.txt", b"pwned")],
    "symlink-chain": [_special("loop", tarfile.SYMTYPE, "."), _special("escape", tarfile.SYMTYPE, "loop/loop/..")],
    "hardlink-out": [_file("ok.txt", b"fine"), _special("hard", tarfile.LNKTYPE, "../evil.txt")],
    "hardlink-absolute": [_file("ok.txt", b"fine"), _special("hard", tarfile.LNKTYPE, "/etc/passwd")],
    "replace-the-target": [_file("ok.txt", b"fine"), _special("./", tarfile.SYMTYPE, "ok.txt")],
    "char-device": [_file("ok.txt", b"fine"), _special("dev", tarfile.CHRTYPE)],
    "block-device": [_file("ok.txt", b"fine"), _special("blk", tarfile.BLKTYPE)],
    "fifo": [_file("ok.txt", b"fine"), _special("pipe", tarfile.FIFOTYPE)],
}


@pytest.mark.parametrize("case", sorted(HOSTILE_TARS))
def test_tar_slip_writes_nothing_anywhere(work, case):
    archives, parent, target = work
    archive = _tar(archives / "hostile.tgz", HOSTILE_TARS[case])
    before = _listing(parent)
    with pytest.raises(UnsafeArchiveError, match="nothing was written"):
        extract_archive(archive, target, progress=False)
    assert _listing(parent) == before == ["bystander.txt"]  # not even the harmless ok.txt, nor the target folder
    assert not Path("/tmp/normsoftmax-evil.txt").exists()
    assert not (archives.parent / "evil.txt").exists()


def _zip_symlink(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


HOSTILE_ZIPS = {
    "dotdot": [("ok.txt", b"fine"), ("../evil.txt", b"pwned")],
    "backslash-dotdot": [("ok.txt", b"fine"), ("..\\evil.txt", b"pwned")],
    "absolute": [("ok.txt", b"fine"), (zipfile.ZipInfo("/tmp/normsoftmax-evil.txt"), b"pwned")],
    "symlink-out": [("ok.txt", b"fine"), _zip_symlink("link", "../../outside")],
}


@pytest.mark.parametrize("case", sorted(HOSTILE_ZIPS))
def test_zip_slip_writes_nothing_anywhere(work, case):
    archives, parent, target = work
    archive = _zip(archives / "hostile.zip", HOSTILE_ZIPS[case])
    names = zipfile.ZipFile(archive).namelist()
    assert any(".." in n or n.startswith("/") or n == "link" for n in names)  # the hostile name really is stored
    before = _listing(parent)
    with pytest.raises(UnsafeArchiveError):
        extract_archive(archive, target, progress=False)
    assert _listing(parent) == before == ["bystander.txt"]
    assert not Path("/tmp/normsoftmax-evil.txt").exists() and not (archives.parent / "evil.txt").exists()


def test_links_inside_the_target_are_allowed(work):
    archives, parent, target = work
    archive = _tar(archives / "links.tgz", [_file("data/real.txt", b"real"),
                                            _special("data/alias.txt", tarfile.SYMTYPE, "real.txt"),
                                            _special("data/copy.txt", tarfile.LNKTYPE, "data/real.txt")])
    extract_archive(archive, target, progress=False)
    assert (target / "data" / "alias.txt").is_symlink() and (target / "data" / "alias.txt").read_bytes() == b"real"
    assert not (target / "data" / "copy.txt").is_symlink() and (target / "data" / "copy.txt").read_bytes() == b"real"


def test_a_symlink_already_on_disk_is_not_written_through(work, tmp_path):
    archives, parent, target = work
    outside = tmp_path / "outside"
    outside.mkdir()
    target.mkdir()
    (target / "sub").symlink_to(outside)
    archive = _tar(archives / "data.tgz", [_file("sub/file.txt", b"pwned")])
    with pytest.raises(UnsafeArchiveError, match="outside"):
        extract_archive(archive, target, progress=False)
    assert list(outside.iterdir()) == []


def test_unsafe_modes_are_dropped(work):
    archives, parent, target = work
    info, data = _file("tool.sh", b"#!/bin/sh\n")
    info.mode = 0o6777
    extract_archive(_tar(archives / "modes.tgz", [(info, data)]), target, progress=False)
    mode = stat.S_IMODE(os.stat(target / "tool.sh").st_mode)
    assert mode & (stat.S_ISUID | stat.S_ISGID) == 0 and mode & 0o002 == 0 and mode & 0o700 == 0o700


def test_interrupted_extraction_is_detected_and_redone(work, monkeypatch):
    archives, parent, target = work
    archive = _tar(archives / "data.tgz", [_file(n, d) for n, d in FILES.items()])
    real = extract._apply_metadata
    calls = []

    def crash_on_second_file(path, member):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user pressed Ctrl-C halfway
        real(path, member)

    monkeypatch.setattr(extract, "_apply_metadata", crash_on_second_file)
    with pytest.raises(KeyboardInterrupt):
        extract_archive(archive, target, progress=False)
    assert not is_extracted(archive, target) and not marker_path(archive, target).exists()
    assert not (target / "top.txt").exists()
    monkeypatch.setattr(extract, "_apply_metadata", real)
    (target / "pkg" / "a.txt").write_bytes(b"half-written")
    extract_archive(archive, target, progress=False)
    assert {n: (target / n).read_bytes() for n in FILES} == FILES
    assert is_extracted(archive, target)


def test_completed_extraction_is_a_no_op(work, monkeypatch):
    archives, parent, target = work
    archive = _tar(archives / "data.tgz", [_file(n, d) for n, d in FILES.items()])
    extract_archive(archive, target, progress=False)

    def must_not_open(path):
        raise AssertionError("the archive was opened again")

    monkeypatch.setattr(extract, "_open", must_not_open)
    assert extract_archive(archive, target, progress=False)["members"] == 3
    with pytest.raises(AssertionError):
        extract_archive(archive, target, force=True, progress=False)


def test_a_different_archive_with_the_same_name_is_extracted_again(work):
    archives, parent, target = work
    archive = _tar(archives / "data.tgz", [_file("x.txt", b"one")])
    extract_archive(archive, target, progress=False)
    _tar(archive, [_file("x.txt", b"two, longer than before" * 50)])
    assert not is_extracted(archive, target)
    extract_archive(archive, target, progress=False)
    assert (target / "x.txt").read_bytes() == b"two, longer than before" * 50


def test_truncated_archive_is_an_error_without_marker(work):
    archives, parent, target = work
    archive = _tar(archives / "data.tgz", [_file("big.bin", os.urandom(200_000))])
    archive.write_bytes(archive.read_bytes()[:50_000])
    with pytest.raises(ExtractionError):
        extract_archive(archive, target, progress=False)
    assert not marker_path(archive, target).exists()


def test_a_second_archive_cannot_escape_through_a_symlink_left_by_the_first(work):
    archives, parent, target = work
    folder = tarfile.TarInfo("a/b")
    folder.type = tarfile.DIRTYPE
    first = _tar(archives / "first.tgz", [(folder, None), _special("a/b/c", tarfile.SYMTYPE, "../..")])
    extract_archive(first, target, progress=False)  # a/b/c -> target itself: inside, allowed
    second = _tar(archives / "second.tgz", [_special("a/b/c/l", tarfile.SYMTYPE, "../../../escaped")])
    with pytest.raises(UnsafeArchiveError, match="redirects its folder"):
        extract_archive(second, target, progress=False)
    assert not (target / "l").is_symlink()
    assert sorted(p.name for p in parent.iterdir()) == ["bystander.txt", "target"]


def test_an_existing_hard_link_is_replaced_not_written_through(work, tmp_path):
    archives, parent, target = work
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    (target / "pkg").mkdir(parents=True)
    os.link(victim, target / "pkg" / "a.txt")
    archive = _tar(archives / "data.tgz", [_file("pkg/a.txt", b"from the archive")])
    extract_archive(archive, target, progress=False)
    assert victim.read_text() == "original"
    assert (target / "pkg" / "a.txt").read_bytes() == b"from the archive"
