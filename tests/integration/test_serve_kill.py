"""Nothing acknowledged is lost: ``normsoftmax serve`` under concurrent writes and searches, killed with SIGKILL in
the middle, started again -- every write it answered 200 is there, nothing half-written is, the index and its items
agree, and searches answer as before."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
from PIL import Image

from normsoftmax.search import SearchIndex

KEY = "k" * 32


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start(run_dir, folder, keys, port) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "normsoftmax", "serve", str(run_dir), str(folder), "--port", str(port), "--device",
         "cpu", "--api_key_file", str(keys), "--max_writes_per_second", "10000", "--batch_wait_ms", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
        if process.poll() is not None:
            raise AssertionError(process.stderr.read().decode()[-3000:])
    raise AssertionError("the server did not start")


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


async def _load(url: str, seconds: float, acknowledged: dict, sent: set, kill_after: float, process) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    started = time.monotonic()
    counter = iter(range(10**6))

    async def worker(client: httpx.AsyncClient, number: int) -> None:
        rng = np.random.default_rng(number)
        while time.monotonic() - started < seconds:
            try:
                if rng.random() < 0.3:
                    label = f"w{number}-{next(counter)}"
                    sent.add(label)
                    image = (f"{label}.png", _png(len(sent)), "image/png")
                    answer = await client.post("/items", headers=headers, data={"label": label}, files={"image": image})
                    if answer.status_code == 200:
                        acknowledged[answer.json()["id"]] = label
                else:
                    await client.post("/search", params={"id": int(rng.integers(0, 48)), "k": 5})
            except httpx.HTTPError:
                await asyncio.sleep(0.05)  # the server is gone: keep trying until the time is up

    async def killer() -> None:
        await asyncio.sleep(kill_after)
        process.send_signal(signal.SIGKILL)

    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        await asyncio.gather(killer(), *(worker(client, n) for n in range(12)))


def test_acknowledged_writes_survive_sigkill(search_index, tmp_path):
    run_dir, index_dir, _ = search_index
    folder = tmp_path / "index"
    shutil.copytree(index_dir, folder)
    (tmp_path / "keys.txt").write_text(f"{KEY} write\n")
    port = _free_port()
    process = _start(run_dir, folder, tmp_path / "keys.txt", port)
    acknowledged: dict[int, str] = {}
    sent: set[str] = set()
    try:
        asyncio.run(_load(f"http://127.0.0.1:{port}", 6.0, acknowledged, sent, 3.0, process))
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
    assert len(acknowledged) >= 5, "too few writes were answered before the kill to test anything"

    restarted = _start(run_dir, folder, tmp_path / "keys.txt", port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            for item_id, label in acknowledged.items():  # every acknowledged write is there, as written
                record = http.get(f"/items/{item_id}").json()
                assert record["label"] == label and record["path"].endswith(".png"), record
            first = http.post("/search", params={"id": 7, "k": 3}).json()["neighbours"][0]
            assert first["id"] == 7  # searches answer as before
            count = http.get("/healthz").json()["items"]
    finally:
        restarted.send_signal(signal.SIGTERM)
        restarted.wait(timeout=30)
    index = SearchIndex.open(folder)
    assert index.count == count == 48 + len([i for i in index.ids() if i >= 48])
    assert index.float_index.ntotal == index.binary_index.ntotal == index.count  # the index and its items agree
    for item_id in index.ids().tolist():
        if item_id >= 48:  # anything beyond the original items is a whole write: one that was sent, with its image
            record = index.record(item_id)
            assert record.label in sent and os.path.isfile(record.path)
    assert set(acknowledged) <= set(index.ids().tolist())
