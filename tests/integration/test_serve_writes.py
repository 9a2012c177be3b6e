"""A collection changed while it is served: items added, read and removed over HTTP and from the command line,
keys, a full disk, and match decisions from a calibration -- on a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import errno
import io
import json
import shutil

import httpx
import numpy as np
import pytest
from PIL import Image

from normsoftmax.calibration import calibrate_checkpoint, decisions_of, read_calibration
from normsoftmax.checkpoint import load_embedder
from normsoftmax.config import CalibrateConfig, ServeConfig
from normsoftmax.search import BackgroundServer, SearchIndex, create_app
from normsoftmax.search import journal as journal_module
from normsoftmax.search.keys import ApiKeys

WRITE_KEY = "w" * 24
READ_KEY = "r" * 24


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _keys(tmp_path, lines: str) -> ApiKeys:
    (tmp_path / "keys.txt").write_text(lines)
    return ApiKeys.read_file(tmp_path / "keys.txt")


@pytest.fixture
def served(search_index, tmp_path):
    """A copy of the shared index, served with a write key (reads open): ``(server, index_dir, run_dir)``."""
    run_dir, index_dir, _ = search_index
    copy = tmp_path / "index"
    shutil.copytree(index_dir, copy)
    config = ServeConfig(device="cpu", batch_wait_ms=5, max_writes_per_second=1000)
    app = create_app(load_embedder(run_dir, "cpu"), SearchIndex.open(copy), config,
                     keys=_keys(tmp_path, f"{WRITE_KEY} write\n# a comment\n"))
    with BackgroundServer(app) as server:
        yield server, copy, run_dir


def _client(server, key=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.url, timeout=60, headers=headers)


def test_add_get_search_remove_over_http_and_ids_are_never_reused(served):
    server, folder, _ = served
    with _client(server, WRITE_KEY) as http:
        added = http.post("/items", files={"image": ("new.png", _png(1), "image/png")},
                          data={"label": "fresh", "metadata": json.dumps({"sku": "A-7", "price": 3})})
        assert added.status_code == 200, added.text
        item = added.json()
        assert item["id"] == 48 and item["label"] == "fresh" and item["metadata"]["sku"] == "A-7"
        assert item["path"] == str(folder / "images" / "48.png") and (folder / "images" / "48.png").is_file()
        assert http.get("/items/48").json() == item and http.get("/thumbnail/48").status_code == 200
        found = http.post("/search", files={"image": ("q.png", _png(1), "image/png")}, params={"k": 3}).json()
        assert found["neighbours"][0]["id"] == 48 and found["neighbours"][0]["metadata"]["price"] == 3
        assert http.get("/healthz").json()["items"] == 49
        assert http.delete("/items/48").json() == {"removed": 48, "items": 48}
        assert http.get("/items/48").status_code == 404 and "removed" in http.get("/items/48").text
        again = http.post("/search", files={"image": ("q.png", _png(1), "image/png")}, params={"k": 3}).json()
        assert 48 not in [hit["id"] for hit in again["neighbours"]]
        assert http.delete("/items/48").status_code == 404
        assert http.post("/items", files={"image": ("n.png", _png(2), "image/png")}).json()["id"] == 49
        assert http.post("/items", files={"image": ("x.txt", b"not an image", "text/plain")}).status_code == 415
        assert http.post("/items", files={"image": ("n.png", _png(3), "image/png")},
                         data={"metadata": "[1, 2]"}).status_code == 400
    assert SearchIndex.open(folder).ids().tolist() == list(range(48)) + [49]


def test_keys_decide_who_may_write_and_read(served, search_index, tmp_path):
    server, _, _ = served
    upload = {"image": ("n.png", _png(4), "image/png")}
    with _client(server) as anonymous:
        assert anonymous.post("/items", files=upload).status_code == 401
        assert anonymous.delete("/items/3").status_code == 401
        assert anonymous.get("/items/3").status_code == 200  # no read key in the file: reads are open
        assert anonymous.get("/healthz").json()["keys"] == {"writes": True, "reads": False}
    with _client(server, "z" * 24) as wrong:
        assert wrong.post("/items", files=upload).status_code == 401
    run_dir, index_dir, _ = search_index
    keys = _keys(tmp_path, f"{READ_KEY} read\n{WRITE_KEY} write\n")
    app = create_app(load_embedder(run_dir, "cpu"), SearchIndex.open(index_dir), ServeConfig(device="cpu"), keys=keys)
    with BackgroundServer(app) as guarded:
        with _client(guarded) as anonymous:
            assert anonymous.get("/items/3").status_code == 401 and anonymous.get("/thumbnail/3").status_code == 401
            assert anonymous.post("/search", params={"id": 3}).status_code == 401
        with _client(guarded, READ_KEY) as reader:
            assert reader.get("/items/3").status_code == 200 and reader.post("/search", params={"id": 3}).is_success
            assert reader.post("/items", files=upload).status_code == 403
            assert reader.delete("/items/3").status_code == 403
        with _client(guarded, WRITE_KEY) as writer:
            assert writer.get("/items/3").status_code == 200  # a write key reads too


def test_key_files_are_checked():
    with pytest.raises(ValueError, match="line 1: expected 'KEY read' or 'KEY write'"):
        ApiKeys.read_file(_write("k.txt", "only-a-key-without-role\n"))
    with pytest.raises(ValueError, match="at least 16 characters"):
        ApiKeys.read_file(_write("k.txt", "short write\n"))
    keys = ApiKeys.read_file(_write("k.txt", f"{READ_KEY} read\n{WRITE_KEY} write\n"))
    assert keys.role_of(WRITE_KEY) == "write" and keys.role_of(READ_KEY) == "read" and keys.role_of("x" * 30) is None
    assert WRITE_KEY.encode() not in repr(keys).encode()  # digests only


def _write(name: str, text: str):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / name
    path.write_text(text)
    return path


def test_a_full_disk_is_507_and_the_collection_stays_as_it_was(served, monkeypatch):
    server, folder, _ = served

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    with _client(server, WRITE_KEY) as http:
        monkeypatch.setattr(journal_module.os, "write", full)
        answer = http.post("/items", files={"image": ("n.png", _png(5), "image/png")})
        monkeypatch.undo()
        assert answer.status_code == 507 and "disk is full" in answer.text
        assert http.get("/healthz").json()["items"] == 48
        assert not list((folder / "images").glob("*")) if (folder / "images").exists() else True
        assert http.post("/items", files={"image": ("n.png", _png(5), "image/png")}).json()["id"] == 48


def test_the_command_line_changes_a_served_folder_without_a_restart(served, search_run, cli):
    server, folder, _ = served
    _, _, embeddings = search_run
    with _client(server) as http:
        assert cli("index", "remove", folder, "3", "5")[0] == 0
        assert http.get("/items/3").status_code == 404 and http.get("/healthz").json()["items"] == 46
        code, out, err = cli("index", "add", folder, embeddings)
        assert code == 2 and "already in the index" in err  # the same file twice: refused, nothing added
        found = http.post("/search", params={"id": 4, "k": 48}).json()
        assert {3, 5}.isdisjoint(hit["id"] for hit in found["neighbours"])


def test_match_follows_the_calibration_file(search_index, search_run, tmp_path):
    run_dir, index_dir, stored = search_index
    out = tmp_path / "calibration.json"
    document = calibrate_checkpoint(CalibrateConfig(source=str(run_dir), out=str(out), target_precision=[0.9],
                                                    workers=0, progress=False, device="cpu"))
    assert document["model"]["digest"] == load_embedder(run_dir).digest and out.is_file()
    thresholds = decisions_of(read_calibration(out), str(out))
    app = create_app(load_embedder(run_dir, "cpu"), SearchIndex.open(index_dir), ServeConfig(device="cpu"),
                     thresholds=thresholds)
    with BackgroundServer(app) as server, _client(server) as http:
        for kind in ("float", "binary"):
            if kind not in thresholds:
                continue
            answer = http.post("/search", params={"id": 2, "k": 20, "kind": kind}).json()
            threshold = thresholds[kind]["threshold"]
            assert answer["threshold"] == threshold and answer["threshold_source"] == str(out)
            for hit in answer["neighbours"]:
                expected = hit["hamming"] <= thresholds[kind]["hamming"] if kind == "binary" else \
                    hit["score"] >= threshold
                assert hit["match"] is expected
        own = http.post("/search", params={"id": 2, "k": 20, "threshold": 0.999}).json()
        assert own["threshold"] == 0.999 and own["threshold_source"] == "request"
        assert [hit["match"] for hit in own["neighbours"]] == [hit["score"] >= 0.999 for hit in own["neighbours"]]
    # thresholds of another model are refused
    other = json.loads(out.read_text())
    other["model"]["digest"] = "0" * 64
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="another model"):
        read_calibration(tmp_path / "other.json", load_embedder(run_dir).digest)
