"""The search service on a real uvicorn server on 127.0.0.1, exercised with a real HTTP client."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from normsoftmax.checkpoint import load_checkpoint, load_embedder
from normsoftmax.config import ServeConfig
from normsoftmax.search import BackgroundServer, SearchIndex, create_app

MAX_UPLOAD_MB = 0.25
MAX_PIXELS = 1_000_000


def png_declaring(width: int, height: int) -> bytes:
    """A valid PNG header declaring ``width`` x ``height`` pixels, with a few bytes of (truncated) data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def indexed(search_index):
    """The shared tiny run (dim 64), its 48 images embedded and in a flat index:
    ``(run_dir, index_dir, embeddings)``."""
    return search_index


@pytest.fixture(scope="module")
def server(indexed):
    run_dir, index_dir, _ = indexed
    config = ServeConfig(checkpoint=str(run_dir), index=str(index_dir), max_upload_mb=MAX_UPLOAD_MB,
                         max_pixels=MAX_PIXELS, batch_wait_ms=20, max_batch=32, device="cpu")
    app = create_app(load_embedder(run_dir, "cpu"), SearchIndex.open(index_dir), config)
    with BackgroundServer(app) as running:
        yield running


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield http


def _upload(client, data: bytes, name="query.jpg", **params):
    return client.post("/search", params=params, files={"image": (name, data, "application/octet-stream")})


def _streamed_upload(client, data: bytes):
    """A well-formed multipart upload sent in chunks, without a Content-Length."""
    encoded = httpx.Request("POST", "http://x/search", files={"image": ("query.jpg", data)})
    body = encoded.read()
    chunks = iter([body[i:i + 65536] for i in range(0, len(body), 65536)])
    return client.post("/search", content=chunks, headers={"content-type": encoded.headers["content-type"]})


def test_health_page_and_openapi(server, client):
    assert server.url.startswith("http://127.0.0.1:")
    health = client.get("/healthz").json()
    assert (health["status"], health["items"], health["kinds"], health["dim"]) == ("ok", 48, ["float", "binary"], 64)
    schema = client.get("/openapi.json").json()
    parameters = {p["name"] for p in schema["paths"]["/search"]["post"]["parameters"]}
    assert parameters == {"id", "k", "kind", "threshold"} and "/thumbnail/{item_id}" in schema["paths"]
    assert {"/items", "/items/{item_id}"} <= set(schema["paths"]) and client.get("/favicon.ico").status_code == 200
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.headers["content-type"].startswith("text/html") and 'type="file"' in page.text


@pytest.mark.parametrize("kind", ["float", "binary"])
def test_an_indexed_image_finds_itself_first(indexed, client, kind):
    _, _, stored = indexed
    codes = np.packbits(stored.embeddings > 0, axis=1)
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    # Float: any image. Binary: images whose sign pattern no other image shares (equal codes tie at distance 0).
    rows = [r for r in range(len(stored)) if kind == "float" or counts[inverse.reshape(-1)[r]] == 1][::7][:4]
    assert len(rows) >= 2
    for row in rows:
        answer = _upload(client, Path(stored.paths[row]).read_bytes(), k=5, kind=kind)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        first = body["neighbours"][0]
        assert (first["id"], first["path"]) == (row, stored.paths[row]) and len(body["neighbours"]) == 5
        if kind == "float":
            assert first["score"] == pytest.approx(1.0, abs=1e-4) and body["score"] == "cosine"
        else:
            assert first["hamming"] == 0 and body["neighbours"][1]["hamming"] > 0


def test_search_by_id_and_thumbnails(indexed, client):
    _, _, stored = indexed
    answer = client.post("/search", params={"id": 9, "k": 3, "kind": "binary"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["query"] == {"id": 9, "path": stored.paths[9]} and len(body["neighbours"]) == 3
    float_answer = client.post("/search", params={"id": 9}).json()
    assert float_answer["neighbours"][0]["id"] == 9 and len(float_answer["neighbours"]) == 12  # the default k
    thumbnail = client.get("/thumbnail/9", params={"size": 32})
    assert thumbnail.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(thumbnail.content)) as image:
        assert image.format == "JPEG" and max(image.size) == 32
    assert client.get("/thumbnail/48").status_code == 404


def _bad_requests(indexed):
    _, _, stored = indexed
    real_jpeg = Path(stored.paths[0]).read_bytes()
    too_big = np.random.default_rng(0).integers(0, 255, int(MAX_UPLOAD_MB * 2**20) * 2, dtype=np.uint8).tobytes()
    return [
        ("a text file", lambda c: _upload(c, b"just some text, not pixels", "notes.txt"), 415),
        ("an oversized upload", lambda c: _upload(c, too_big), 413),
        ("an oversized streamed upload (no Content-Length)", lambda c: _streamed_upload(c, too_big), 413),
        ("a PNG declaring 20000 x 20000 pixels", lambda c: _upload(c, png_declaring(20_000, 20_000), "bomb.png"), 413),
        ("a PNG declaring 2000 x 1000 pixels", lambda c: _upload(c, png_declaring(2_000, 1_000), "bomb.png"), 413),
        ("a truncated JPEG", lambda c: _upload(c, real_jpeg[: len(real_jpeg) // 2]), 400),
        ("no query", lambda c: c.post("/search"), 400),
        ("an image and an id", lambda c: _upload(c, real_jpeg, id=1), 400),
        ("an id outside the index", lambda c: c.post("/search", params={"id": 48}), 404),
        ("a path as id", lambda c: c.post("/search", params={"id": "../../../etc/passwd"}), 422),
        ("a path as kind", lambda c: c.post("/search", params={"id": 1, "kind": "../../etc/passwd"}), 422),
        ("a path as k", lambda c: c.post("/search", params={"id": 1, "k": "../1"}), 422),
        ("too many results", lambda c: c.post("/search", params={"id": 1, "k": 101}), 422),
        ("a path as thumbnail", lambda c: c.get("/thumbnail/..%2F..%2F..%2Fetc%2Fpasswd"), 404),
        ("a dotted thumbnail path", lambda c: c.get("/thumbnail/../../etc/passwd"), 404),
        ("a negative thumbnail id", lambda c: c.get("/thumbnail/-1"), 422),
        ("a path as thumbnail size", lambda c: c.get("/thumbnail/1", params={"size": "../../x"}), 422),
    ]


def test_bad_requests_get_4xx_and_the_service_keeps_serving(indexed, client):
    _, _, stored = indexed
    for name, send, expected in _bad_requests(indexed):
        response = send(client)
        assert response.status_code == expected, f"{name}: {response.status_code} {response.text[:200]}"
        assert client.get("/healthz").status_code == 200, f"the service stopped answering after {name}"
    # An upload named like a path is just an image: the name never reaches the filesystem.
    answer = _upload(client, Path(stored.paths[4]).read_bytes(), "../../../../etc/passwd", k=1)
    assert answer.status_code == 200 and answer.json()["neighbours"][0]["id"] == 4


def test_requests_that_arrive_together_share_one_forward_pass(indexed, server):
    _, _, stored = indexed
    rows = list(range(0, 48, 3))
    uploads = [Path(stored.paths[row]).read_bytes() for row in rows]

    async def all_at_once():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            before = (await http.get("/healthz")).json()["batching"]
            answers = await asyncio.gather(*(http.post("/search", params={"k": 1}, files={"image": ("q.jpg", data)})
                                             for data in uploads))
            after = (await http.get("/healthz")).json()["batching"]
        return before, answers, after

    before, answers, after = asyncio.run(all_at_once())
    assert [a.status_code for a in answers] == [200] * len(rows)
    assert [a.json()["neighbours"][0]["id"] for a in answers] == rows  # everyone got their own answer
    assert after["jobs"] - before["jobs"] == len(rows)
    assert after["batches"] - before["batches"] < len(rows) and after["largest"] > 1


def test_the_service_refuses_another_model(indexed, tmp_path, cli):
    run_dir, index_dir, _ = indexed
    state = load_checkpoint(run_dir)
    state["model"]["head.projection.weight"] = state["model"]["head.projection.weight"] * 1.01
    torch.save(state, tmp_path / "other.pt")
    other = load_embedder(tmp_path / "other.pt")
    index = SearchIndex.open(index_dir)
    with pytest.raises(ValueError, match=f"built with model {index.digest[:16]}.*is model {other.digest[:16]}"):
        create_app(other, index, ServeConfig())
    code, _, err = cli("serve", tmp_path / "other.pt", index_dir, "--device", "cpu")
    assert code == 2 and "their embeddings are not comparable" in err


def test_normsoftmax_serve_listens_on_127_0_0_1(indexed, tmp_path):
    run_dir, index_dir, _ = indexed
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "normsoftmax", "serve", str(run_dir), str(index_dir),
                                "--port", str(port), "--device", "cpu"], env=environment,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.3)
        assert health.json()["items"] == 48
        with socket.socket() as listener_check:  # bound to 127.0.0.1 only: the same port is free elsewhere
            listener_check.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            addresses = list(_non_loopback_addresses())
            if addresses:
                listener_check.bind((addresses[0], port))
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert "Uvicorn running on http://127.0.0.1:" in output


def _non_loopback_addresses() -> list[str]:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the outgoing interface
            address = udp.getsockname()[0]
    except OSError:
        return []
    return [] if address.startswith("127.") else [address]
