"""Streaming downloads that survive interruptions and never hand over an unverified file.

:func:`download` writes to ``<name>.part`` next to the destination, resumes an
interrupted transfer with an HTTP ``Range`` request (restarting cleanly when the
server ignores it or the file changed on the server), retries transient failures
(connection errors, time-outs, HTTP 5xx, 429, 408) with exponential back-off,
and verifies size and digests before the file gets its final name. A file that
fails verification is moved aside to ``<name>.bad`` (never left where an
extraction step could pick it up) and :class:`ChecksumError` says where it went.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..files import atomic_write

log = logging.getLogger(__name__)

USER_AGENT = "normsoftmax-prepare/0.1 (+python-urllib)"
CHUNK_SIZE = 1 << 20
TRANSIENT_4XX = {408, 425, 429}  # request timeout, too early, too many requests; every 5xx is transient too


class DownloadError(RuntimeError):
    """A download that cannot complete (permanent HTTP error, or retries exhausted)."""


class ChecksumError(DownloadError):
    """The bytes do not match the expected size or digest; ``moved_to`` is where the bad file now lies."""

    def __init__(self, message: str, path: Path | None = None, moved_to: Path | None = None):
        super().__init__(message)
        self.path = path
        self.moved_to = moved_to


@dataclass
class DownloadResult:
    path: Path
    url: str
    size: int
    sha256: str
    md5: str
    attempts: int = 1
    resumed: bool = False
    reused: bool = False  # the destination already existed and verified; nothing was fetched
    range_requests: int = 0
    notes: list[str] = field(default_factory=list)


def file_digests(path: str | os.PathLike, progress: bool = False, desc: str | None = None) -> dict[str, str | int]:
    """SHA-256, MD5 and size of a file, in one read."""
    sha, md5 = hashlib.sha256(), hashlib.md5()
    size = os.path.getsize(path)
    bar = _bar(size, 0, desc or f"hashing {Path(path).name}", progress)
    with open(path, "rb") as handle:
        while True:
            block = handle.read(CHUNK_SIZE)
            if not block:
                break
            sha.update(block)
            md5.update(block)
            bar.update(len(block))
    bar.close()
    return {"sha256": sha.hexdigest(), "md5": md5.hexdigest(), "size": size}


def verify_digests(digests: dict, sha256: str | None = None, md5: str | None = None,
                   size: int | None = None) -> list[str]:
    """Human-readable mismatches between ``digests`` and the expected values (empty when all match)."""
    problems = []
    if size is not None and int(digests["size"]) != int(size):
        problems.append(f"size {digests['size']} bytes, expected {size}")
    if sha256 and digests["sha256"] != sha256.lower():
        problems.append(f"SHA-256 {digests['sha256']}, expected {sha256.lower()}")
    if md5 and digests["md5"] != md5.lower():
        problems.append(f"MD5 {digests['md5']}, expected {md5.lower()}")
    return problems


def download(url: str, dest: str | os.PathLike, *, sha256: str | None = None, md5: str | None = None,
             size: int | None = None, retries: int = 5, backoff: float = 1.0, max_backoff: float = 60.0,
             timeout: float = 60.0, progress: bool = True, sleep: Callable[[float], None] = time.sleep,
             chunk_size: int = CHUNK_SIZE) -> DownloadResult:
    """Fetch ``url`` to ``dest`` (resuming ``dest.part``), verify it, and return what was fetched.

    ``retries`` is the number of failed attempts tolerated after the first one;
    an attempt that extends the partial file beyond anything received before
    does not count as a failure, so a flaky but progressing connection finishes.
    A file that fails verification after a *resumed* transfer is fetched once
    more from the first byte (a changed file on a server without validators can
    be spliced onto an old partial file) before giving up. Raises
    :class:`ChecksumError` on a size/digest mismatch and :class:`DownloadError`
    on a permanent failure (e.g. HTTP 404) or when the retries are used up; the
    partial file is kept for the next run in the latter case.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    meta_path = dest.with_name(dest.name + ".part.json")
    source_path = dest.with_name(dest.name + ".source.json")
    reused = _reuse_existing(dest, url, source_path, sha256, md5, size, progress)
    if reused is not None:
        return reused

    def fetch() -> DownloadResult:
        return _fetch(url, part, meta_path, retries, backoff, max_backoff, timeout, chunk_size, progress, sleep)

    result = fetch()
    # One pass over the finished file: the network, not hashing, is the bottleneck for these archives.
    digests = file_digests(part, progress=False)
    problems = verify_digests(digests, sha256, md5, size)
    if problems and result.resumed:
        log.warning("%s: the resumed download does not verify (%s); fetching it once more from the first byte",
                    url, "; ".join(problems))
        part.unlink(missing_ok=True)
        meta_path.unlink(missing_ok=True)
        attempts = result.attempts
        result = fetch()
        result.attempts += attempts
        result.notes.append("fetched again from scratch after a resumed transfer failed verification")
        digests = file_digests(part, progress=False)
        problems = verify_digests(digests, sha256, md5, size)
    if problems:
        moved = _move_aside(part)
        meta_path.unlink(missing_ok=True)
        raise ChecksumError(f"{url}: the downloaded file does not verify ({'; '.join(problems)}). "
                            f"It was NOT extracted and was moved aside to {moved}; delete it, or check the URL "
                            f"and --sha256 and run again.", path=dest, moved_to=moved)
    os.replace(part, dest)
    meta_path.unlink(missing_ok=True)
    _write_meta(source_path, {"url": url, "sha256": digests["sha256"]})
    result.size, result.sha256, result.md5 = int(digests["size"]), str(digests["sha256"]), str(digests["md5"])
    if not (sha256 or md5):
        log.info("%s: no checksum to verify against; its SHA-256 is %s", dest.name, result.sha256)
    return result


def _reuse_existing(dest: Path, url: str, source_path: Path, sha256, md5, size,
                    progress: bool) -> DownloadResult | None:
    """The finished ``dest`` when it verifies (or, with nothing to verify, came from ``url``); else clear it."""
    if not dest.is_file():
        return None
    if sha256 or md5 or size:
        digests = file_digests(dest, progress=progress, desc=f"verifying {dest.name}")
        problems = verify_digests(digests, sha256, md5, size)
        if not problems:
            log.info("%s already downloaded and verified", dest)
            return DownloadResult(dest, url, int(digests["size"]), str(digests["sha256"]), str(digests["md5"]),
                                  attempts=0, reused=True)
        moved = _move_aside(dest)
        log.warning("%s exists but does not verify (%s); moved it to %s and downloading again",
                    dest, "; ".join(problems), moved)
    elif _read_meta(source_path).get("url") == url:
        # Nothing to verify against: a finished download from the same URL is reused as it is.
        digests = file_digests(dest, progress=progress, desc=f"hashing {dest.name}")
        return DownloadResult(dest, url, int(digests["size"]), str(digests["sha256"]), str(digests["md5"]),
                              attempts=0, reused=True)
    else:
        log.info("%s came from another URL; downloading it again", dest)
        dest.unlink()
    return None


def _fetch(url: str, part: Path, meta_path: Path, retries: int, backoff: float, max_backoff: float, timeout: float,
           chunk_size: int, progress: bool, sleep: Callable[[float], None]) -> DownloadResult:
    """Attempts until ``part`` holds the whole file; retries transient failures with exponential back-off."""
    failures = 0
    attempts = 0
    best = part.stat().st_size if part.exists() else 0  # the most bytes ever held in the partial file
    result = DownloadResult(part, url, 0, "", "")
    while True:
        attempts += 1
        try:
            _attempt(url, part, meta_path, timeout, chunk_size, progress, result)
        except _Permanent as error:
            raise DownloadError(f"{url}: {error}") from None
        except _Transient as error:
            now = part.stat().st_size if part.exists() else 0
            if now > best:
                best = now
                log.warning("%s: %s after %d bytes; resuming", url, error, now)
                continue
            failures += 1
            if failures > retries:
                raise DownloadError(f"{url}: giving up after {attempts} attempts ({error}); "
                                    f"the partial file {part} is kept and a re-run resumes it") from None
            delay = min(max_backoff, backoff * (2 ** (failures - 1)))
            if error.retry_after is not None:
                delay = min(max_backoff, max(delay, error.retry_after))
            log.warning("%s: %s; retry %d of %d in %.1f s", url, error, failures, retries, delay)
            sleep(delay)
            continue
        result.attempts = attempts
        result.path = part.with_name(part.name[: -len(".part")])
        return result


# --------------------------------------------------------------------------------------------------------

class _Transient(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class _Permanent(Exception):
    pass


def _is_http(url: str) -> bool:
    return urllib.parse.urlsplit(url).scheme in ("http", "https")


def _attempt(url: str, part: Path, meta_path: Path, timeout: float, chunk_size: int, progress: bool,
             result: DownloadResult) -> None:
    """One request; returns when the partial file is complete, else raises _Transient or _Permanent."""
    offset = part.stat().st_size if part.exists() else 0
    meta = _read_meta(meta_path)
    if offset and meta.get("url") != url:
        log.info("%s was started from another URL; starting over", part.name)
        offset = 0
    response = _request(url, part, offset, meta, timeout, result)
    if response is None:
        return  # the partial file already holds every byte
    with response:
        offset, total, mode = _resume_point(response, url, part, offset, meta, result)
        headers = response.headers
        _write_meta(meta_path, {"url": url, "etag": headers.get("ETag"), "last_modified": headers.get("Last-Modified"),
                                "total": total})
        received = _receive(response, part, mode, offset, total, chunk_size, progress)
    if total is not None and received < total:
        raise _Transient(f"connection closed at byte {received} of {total}")
    if total is not None and received > total:
        part.unlink(missing_ok=True)
        raise _Transient(f"received {received} bytes, more than the announced {total}")


def _request(url: str, part: Path, offset: int, meta: dict, timeout: float, result: DownloadResult):
    """The open response (ranged from ``offset`` when resuming), None when nothing is left to fetch."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
    if offset > 0 and _is_http(url):
        request.add_header("Range", f"bytes={offset}-")
        strong_etag = meta.get("etag") and not str(meta["etag"]).startswith("W/")
        validator = meta.get("etag") if strong_etag else meta.get("last_modified")
        if validator:
            request.add_header("If-Range", validator)  # a changed file on the server answers 200, not 206
        result.range_requests += 1
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        error.close()
        if error.code == 416 and offset:
            total = _total_from_content_range(error.headers.get("Content-Range"))
            if total is not None and total == offset:
                result.resumed = True  # the bytes came from an earlier run: verify, and refetch if they fail
                return None
            log.info("%s: the server refused to resume at byte %d; starting over", url, offset)
            part.unlink(missing_ok=True)
            raise _Transient("HTTP 416 on resume") from None
        if error.code >= 500 or error.code in TRANSIENT_4XX:
            raise _Transient(f"HTTP {error.code} {error.reason}",
                             _retry_after(error.headers.get("Retry-After"))) from None
        raise _Permanent(f"HTTP {error.code} {error.reason}") from None
    except ValueError as error:  # unknown URL scheme, malformed URL
        raise _Permanent(str(error)) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        raise _Transient(f"connection failed ({getattr(error, 'reason', error)})") from None


def _resume_point(response, url: str, part: Path, offset: int, meta: dict, result: DownloadResult):
    """(offset, total, file mode): append after a valid 206, otherwise start from the first byte."""
    status = getattr(response, "status", None)
    if status == 206:
        start, total = _parse_content_range(response.headers.get("Content-Range"))
        if start != offset:
            log.info("%s: the server resumed at byte %s instead of %d; starting over", url, start, offset)
            part.unlink(missing_ok=True)
            raise _Transient("unexpected Content-Range")
        recorded = meta.get("total")
        if recorded is not None and total is not None and int(recorded) != total:
            # Without an ETag or Last-Modified this is the only sign the file changed on the server:
            # appending would splice two different files together.
            log.info("%s: the file on the server is now %d bytes, was %s; starting over", url, total, recorded)
            part.unlink(missing_ok=True)
            raise _Transient("the file changed on the server")
        result.resumed = True
        log.info("%s: resuming at byte %d", part.name, offset)
        return offset, total, "ab"
    if offset > 0 and _is_http(url):
        log.warning("%s: the server ignored the Range request (HTTP %s); restarting from the first byte", url, status)
    return 0, _content_length(response.headers), "wb"


def _receive(response, part: Path, mode: str, offset: int, total: int | None, chunk_size: int, progress: bool) -> int:
    """Stream the body into ``part``; the number of bytes it then holds."""
    bar = _bar(total, offset, part.name[: -len(".part")], progress)
    received = offset
    try:
        with open(part, mode) as handle:
            while True:
                try:
                    block = response.read(chunk_size)
                except (http.client.IncompleteRead, OSError, http.client.HTTPException) as error:
                    raise _Transient(f"connection lost ({type(error).__name__})") from None
                if not block:
                    break
                handle.write(block)
                received += len(block)
                bar.update(len(block))
    finally:
        bar.close()
    return received


def _content_length(headers) -> int | None:
    value = headers.get("Content-Length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    # "bytes 100-199/200" or "bytes 100-199/*"
    if value is None:
        return None, None
    try:
        unit, spec = value.split(" ", 1)
        span, total = spec.split("/", 1)
        start = int(span.split("-", 1)[0])
        return start, (None if total.strip() == "*" else int(total))
    except (AttributeError, ValueError):
        return None, None


def _total_from_content_range(value: str | None) -> int | None:
    # "bytes */200"
    if value is None:
        return None
    try:
        return int(value.rsplit("/", 1)[1])
    except (IndexError, ValueError):
        return None


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _read_meta(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_meta(path: Path, meta: dict) -> None:
    atomic_write(path, json.dumps(meta))


def _move_aside(path: Path) -> Path:
    """Rename a file that failed verification so nothing uses it; returns the new path."""
    name = path.name[: -len(".part")] if path.name.endswith(".part") else path.name
    target = path.with_name(name + ".bad")
    os.replace(path, target)
    return target


def _bar(total: int | None, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not enabled, leave=False, dynamic_ncols=True)


__all__ = ["download", "DownloadResult", "DownloadError", "ChecksumError", "file_digests", "verify_digests"]
