"""Resumable, retried, verified downloads against a local HTTP server that misbehaves on request."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from normsoftmax.prepare.download import ChecksumError, DownloadError, download

PAYLOAD = os.urandom(300_000)
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()
FAST = dict(backoff=0.001, progress=False, timeout=10, chunk_size=16_384)




def test_clean_download_verifies_and_leaves_no_partial_file(server, tmp_path):
    url = server.add("data.bin", PAYLOAD)
    result = download(url, tmp_path / "data.bin", sha256=DIGEST, size=len(PAYLOAD), **FAST)
    assert (tmp_path / "data.bin").read_bytes() == PAYLOAD
    assert result.sha256 == DIGEST and result.md5 == hashlib.md5(PAYLOAD).hexdigest()
    assert not (tmp_path / "data.bin.part").exists()
    assert server.ranges("data.bin") == [None]


def test_cut_off_download_resumes_with_a_range_request(server, tmp_path):
    half = len(PAYLOAD) // 2
    url = server.add("data.bin", PAYLOAD, drop_after=half, drop_times=1)
    result = download(url, tmp_path / "data.bin", sha256=DIGEST, **FAST)
    assert server.ranges("data.bin") == [None, f"bytes={half}-"]
    assert result.resumed and result.range_requests == 1
    assert (tmp_path / "data.bin").read_bytes() == PAYLOAD


def test_interrupted_run_is_resumed_by_the_next_run(server, tmp_path):
    # A previous process left a partial file: the next call asks only for the rest.
    url = server.add("data.bin", PAYLOAD)
    first = download(url, tmp_path / "full.bin", **FAST)  # records the validators the way a real run does
    part = tmp_path / "data.bin.part"
    part.write_bytes(PAYLOAD[:1000])
    (tmp_path / "data.bin.part.json").write_text(json.dumps({"url": url}))
    download(url, tmp_path / "data.bin", sha256=DIGEST, **FAST)
    assert server.ranges("data.bin")[-1] == "bytes=1000-"
    assert (tmp_path / "data.bin").read_bytes() == PAYLOAD and first.sha256 == DIGEST


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    half = len(PAYLOAD) // 3
    url = server.add("data.bin", PAYLOAD, drop_after=half, drop_times=1, ignore_range=True)
    result = download(url, tmp_path / "data.bin", sha256=DIGEST, **FAST)
    assert server.ranges("data.bin") == [None, f"bytes={half}-"]
    assert not result.resumed  # the 200 answer was written from the first byte, not appended
    assert (tmp_path / "data.bin").read_bytes() == PAYLOAD


def test_server_errors_are_retried_with_backoff(server, tmp_path):
    url = server.add("data.bin", PAYLOAD, fail=[503, 429, 500], retry_after="0")
    delays = []
    result = download(url, tmp_path / "data.bin", sha256=DIGEST, sleep=delays.append, **FAST)
    assert result.attempts == 4 and len(server.ranges("data.bin")) == 4
    assert delays == [0.001, 0.002, 0.004]  # exponential back-off
    assert (tmp_path / "data.bin").read_bytes() == PAYLOAD


def test_not_found_is_not_retried(server, tmp_path):
    with pytest.raises(DownloadError, match="404"):
        download(f"{server.base}/missing.bin", tmp_path / "missing.bin", sleep=lambda s: None, **FAST)
    assert len(server.ranges("missing.bin")) == 1


def test_retries_are_bounded(server, tmp_path):
    url = server.add("data.bin", PAYLOAD, fail=[503] * 10)
    with pytest.raises(DownloadError, match="giving up after 3 attempts"):
        download(url, tmp_path / "data.bin", retries=2, sleep=lambda s: None, **FAST)
    assert len(server.ranges("data.bin")) == 3
    assert not (tmp_path / "data.bin").exists()


def test_a_server_that_always_drops_without_honouring_range_gives_up(server, tmp_path):
    url = server.add("data.bin", PAYLOAD, drop_after=1000, drop_times=100, ignore_range=True)
    with pytest.raises(DownloadError):
        download(url, tmp_path / "data.bin", retries=3, sleep=lambda s: None, **FAST)
    assert len(server.ranges("data.bin")) == 5  # one that made progress, then 1 + 3 retries that did not


def test_checksum_mismatch_is_an_error_and_the_file_is_moved_aside(server, tmp_path):
    url = server.add("data.bin", PAYLOAD)
    with pytest.raises(ChecksumError) as caught:
        download(url, tmp_path / "data.bin", sha256="0" * 64, **FAST)
    assert not (tmp_path / "data.bin").exists() and not (tmp_path / "data.bin.part").exists()
    assert caught.value.moved_to == tmp_path / "data.bin.bad"
    assert (tmp_path / "data.bin.bad").read_bytes() == PAYLOAD
    assert str(tmp_path / "data.bin.bad") in str(caught.value) and DIGEST in str(caught.value)


def test_size_mismatch_is_caught_too(server, tmp_path):
    url = server.add("data.bin", PAYLOAD)
    with pytest.raises(ChecksumError, match="size"):
        download(url, tmp_path / "data.bin", size=len(PAYLOAD) + 1, **FAST)


def test_verified_file_is_not_fetched_again(server, tmp_path):
    url = server.add("data.bin", PAYLOAD)
    download(url, tmp_path / "data.bin", sha256=DIGEST, **FAST)
    again = download(url, tmp_path / "data.bin", sha256=DIGEST, **FAST)
    assert again.reused and len(server.ranges("data.bin")) == 1


def test_unverified_file_from_another_url_is_fetched_again(server, tmp_path):
    first = server.add("a.bin", PAYLOAD)
    second = server.add("b.bin", PAYLOAD[::-1])
    download(first, tmp_path / "data.bin", **FAST)
    assert download(first, tmp_path / "data.bin", **FAST).reused
    result = download(second, tmp_path / "data.bin", **FAST)
    assert not result.reused and (tmp_path / "data.bin").read_bytes() == PAYLOAD[::-1]


def test_a_file_that_changed_on_the_server_is_not_spliced_onto_the_old_part(server, tmp_path):
    old, new = PAYLOAD[:200_000], PAYLOAD[:250_000]
    url = server.add("data.bin", new)
    (tmp_path / "data.bin.part").write_bytes(old[:1000])
    # a previous run recorded the old size and no validator (no ETag, no Last-Modified)
    (tmp_path / "data.bin.part.json").write_text(json.dumps({"url": url, "total": len(old)}))
    result = download(url, tmp_path / "data.bin", sha256=hashlib.sha256(new).hexdigest(), **FAST)
    assert (tmp_path / "data.bin").read_bytes() == new
    assert server.ranges("data.bin")[0] == "bytes=1000-" and server.ranges("data.bin")[-1] is None
    assert result.sha256 == hashlib.sha256(new).hexdigest()


def test_a_resumed_download_that_fails_verification_is_fetched_once_more_from_scratch(server, tmp_path):
    url = server.add("data.bin", PAYLOAD)
    # an old partial file of another version of the same size: nothing tells the two apart before the checksum
    (tmp_path / "data.bin.part").write_bytes(os.urandom(1000))
    (tmp_path / "data.bin.part.json").write_text(json.dumps({"url": url, "total": len(PAYLOAD)}))
    result = download(url, tmp_path / "data.bin", sha256=DIGEST, **FAST)
    assert (tmp_path / "data.bin").read_bytes() == PAYLOAD and result.sha256 == DIGEST
    assert server.ranges("data.bin") == ["bytes=1000-", None]
    assert any("from scratch" in note for note in result.notes)


def test_a_fresh_download_that_fails_verification_is_not_fetched_again(server, tmp_path):
    url = server.add("data.bin", PAYLOAD)
    with pytest.raises(ChecksumError):
        download(url, tmp_path / "data.bin", sha256="0" * 64, **FAST)
    assert server.ranges("data.bin") == [None]
