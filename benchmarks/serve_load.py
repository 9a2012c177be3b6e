"""Load on the search service: requests/s and latency with and without request batching, side by side.

Starts `normsoftmax serve` on 127.0.0.1 twice -- with ``--max_batch 1`` (every request embedded alone) and
with the default micro-batching -- and sends the same bounded load to each: a fixed number of image uploads
(``POST /search``, k = 10) at each concurrency level, every upload an indexed image whose answer must be that
image first. Prints requests/s, p50/p95/p99 latency, failures, wrong answers, the mean batch size and where the
CPU went (model, server process, this client), the batched/unbatched ratio per level, and writes the figures
as JSON. Both servers run side by side and the levels alternate between them, the whole sequence repeated
(``--rounds``), medians reported: on a shared machine what else runs then weighs on both alike.

``--mixed`` measures a collection that changes while it is served instead: 90% searches and 10% writes
(``POST /items``) at concurrency 32, on both backends (a copy of the index folder, and a Milvus Lite collection of the
same vectors); then the same load again, the server killed with SIGKILL in the middle, started again, and every
write it had acknowledged looked up (found must equal acknowledged).

Without arguments it makes what it needs (reused across runs, under the system's temp folder): the demo's
glyph images (64 px), a ResNet18 embedder (dim 512, the demo's recipe) trained for one epoch, the images
embedded and indexed (flat). ``--checkpoint RUN_DIR --index INDEX_DIR`` load-tests a given model and index
instead (e.g. the demo's run and an index of its glyphs).

    .venv/bin/python benchmarks/serve_load.py
    .venv/bin/python benchmarks/serve_load.py --checkpoint demo_output/run --index demo_index --requests 512
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
try:
    import normsoftmax  # noqa: F401
except ImportError:  # a clean clone without `pip install -e .`
    sys.path.insert(0, str(REPO / "src"))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))


# ------------------------------------------------------------------------------------------ what is served
def prepare_default(work: Path) -> tuple[Path, Path]:
    """(run_dir, index_dir) of a small trained glyph model and its index, made once under ``work``."""
    from normsoftmax import train_embedder
    from normsoftmax.config import DemoConfig, EmbedConfig, IndexBuildConfig
    from normsoftmax.demo.common import demo_train_config
    from normsoftmax.demo.glyphs import generate_glyph_dataset
    from normsoftmax.embedding import embed_files
    from normsoftmax.search import build_index

    run_dir, index_dir, embeddings = work / "run", work / "index", work / "glyphs.npz"
    if (index_dir / "index.json").exists():
        return run_dir, index_dir
    started = time.perf_counter()
    demo = DemoConfig(output=str(work), num_classes=32, images_per_class=8, image_size=64, epochs=1, workers=0,
                      progress=False)
    glyphs = generate_glyph_dataset(work / "glyphs", num_classes=demo.num_classes,
                                    images_per_class=demo.images_per_class, image_size=demo.image_size, progress=False)
    if not (run_dir / "checkpoints").exists():
        train_embedder(demo_train_config(demo, glyphs, run_dir))
    embed_files(EmbedConfig(checkpoint=str(run_dir), images=str(glyphs), out=str(embeddings), workers=0,
                            progress=False))
    build_index(IndexBuildConfig(embeddings=str(embeddings), out=str(index_dir)))
    print(f"prepared {run_dir} and {index_dir} in {time.perf_counter() - started:.0f} s", flush=True)
    return run_dir, index_dir


def query_uploads(index_dir: Path, count: int, seed: int = 0) -> list[tuple[int, bytes]]:
    """(id, file bytes) of up to ``count`` indexed images: each must find itself first."""
    from normsoftmax.search import SearchIndex

    index = SearchIndex.open(index_dir)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(index.count, size=min(count, index.count), replace=False)
    return [(int(i), Path(index.path_of(i)).read_bytes()) for i in chosen if Path(index.path_of(i)).is_file()]


def model_alone(run_dir: Path, threads: int, batches=(1, 8, 32), seconds: float = 2.0) -> dict[str, float]:
    """Milliseconds per image of the bare forward pass at each batch size, on ``threads`` threads (what `serve`
    uses): the most that batching can save, with no HTTP, decoding or search around it."""
    import torch

    from normsoftmax.checkpoint import load_embedder

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    model = load_embedder(run_dir, "cpu")
    crop, channels_last = model.train_config.crop, model.train_config.channels_last
    timings = {}
    try:
        with torch.inference_mode():
            for size in batches:
                images = torch.randn(size, 3, crop, crop)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                model(images)  # warm-up: the first pass of a shape prepares its kernels
                started, runs = time.perf_counter(), 0
                while time.perf_counter() - started < seconds:
                    model(images)
                    runs += 1
                timings[str(size)] = round(1000 * (time.perf_counter() - started) / (runs * size), 2)
    finally:
        torch.set_num_threads(previous)
    return timings


# ------------------------------------------------------------------------------------------ the server
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(run_dir: Path, index_dir: Path | str, max_batch: int | None, log: Path,
                 extra: list[str] | None = None, port: int | None = None) -> tuple[subprocess.Popen, str]:
    import httpx

    port = port or free_port()
    command = [sys.executable, "-m", "normsoftmax", "serve", str(run_dir), str(index_dir), "--port", str(port),
               "--device", "cpu"] + ([] if max_batch is None else ["--max_batch", str(max_batch)]) + (extra or [])
    with open(log, "w") as output:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}); see {log}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.terminate()
            raise RuntimeError(f"the server did not start in 120 s; see {log}")
        time.sleep(0.3)


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# ------------------------------------------------------------------------------------------ the load
def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process ``pid`` (all its threads), from /proc; None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def encoded_uploads(uploads: list[tuple[int, bytes]], k: int) -> list[tuple[int, bytes, dict]]:
    """(id, multipart body, headers) per query image, encoded once so that the client spends its CPU on
    sending, not on re-encoding the same forms."""
    import httpx

    encoded = []
    for item_id, data in uploads:
        request = httpx.Request("POST", f"http://x/search?k={k}", files={"image": ("query", data)})
        encoded.append((item_id, request.read(), {"content-type": request.headers["content-type"]}))
    return encoded


async def load_level(url: str, pid: int, uploads: list[tuple[int, bytes, dict]], concurrency: int, total: int,
                     k: int) -> dict:
    """``total`` uploads from ``concurrency`` concurrent clients; throughput, latency, failures, CPU used."""
    import httpx

    latencies, failures, wrong = [], 0, 0
    order = itertools.count()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        before = (await http.get("/healthz")).json()["batching"]

        async def client():
            nonlocal failures, wrong
            while (number := next(order)) < total:
                item_id, body, headers = uploads[number % len(uploads)]
                started = time.perf_counter()
                try:
                    answer = await http.post("/search", params={"k": k}, content=body, headers=headers)
                    ok = answer.status_code == 200
                    wrong += ok and answer.json()["neighbours"][0]["id"] != item_id
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - started)
                failures += not ok

        server_cpu, client_cpu = process_cpu_seconds(pid), time.process_time()
        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        server_cpu = (process_cpu_seconds(pid) - server_cpu) if server_cpu is not None else None
        client_cpu = time.process_time() - client_cpu
        after = (await http.get("/healthz")).json()["batching"]
    milliseconds = np.array(latencies) * 1000
    batches = after["batches"] - before["batches"]
    return {"concurrency": concurrency, "requests": total, "seconds": round(elapsed, 3),
            "requests_per_s": round(total / elapsed, 1), "p50_ms": round(float(np.percentile(milliseconds, 50)), 1),
            "p95_ms": round(float(np.percentile(milliseconds, 95)), 1),
            "p99_ms": round(float(np.percentile(milliseconds, 99)), 1), "failed": failures, "wrong_first_hit": wrong,
            "mean_batch": round((after["jobs"] - before["jobs"]) / batches, 2) if batches else None,
            "model_busy_ms_per_request": round(1000 * (after["busy_seconds"] - before["busy_seconds"]) / total, 2),
            "server_cpu_ms_per_request": round(1000 * server_cpu / total, 2) if server_cpu is not None else None,
            "client_cpu_ms_per_request": round(1000 * client_cpu / total, 2)}


def run_modes(run_dir, index_dir, uploads, modes: dict, levels, total, k, rounds: int,
              work: Path) -> dict[str, list[dict]]:
    """Both servers up at once, the levels measured in turn on each (unbatched, batched, next level, ...) and the
    whole sequence ``rounds`` times, so that a change in what else runs on the machine affects both alike; per
    mode and level, the round with the median throughput (every round's figure is kept)."""
    servers = {}
    try:
        for name, max_batch in modes.items():
            servers[name] = start_server(run_dir, index_dir, max_batch, work / f"server_{name}.log")
        for process, url in servers.values():  # warm-up, not counted
            asyncio.run(load_level(url, process.pid, uploads, min(8, max(levels)), min(64, total), k))
        measured = {(name, level): [] for name in modes for level in levels}
        for number in range(1, rounds + 1):
            for level in levels:
                for name, (process, url) in servers.items():
                    result = asyncio.run(load_level(url, process.pid, uploads, level, total, k))
                    measured[name, level].append(result)
                    print(f"  round {number}: {name:9s} concurrency {level:3d}: {result['requests_per_s']} requests/s, "
                          f"mean batch {result['mean_batch']}", flush=True)
    finally:
        for process, _ in servers.values():
            stop_server(process)
    results = {name: [] for name in modes}
    for (name, _level), runs in measured.items():
        median = sorted(runs, key=lambda run: run["requests_per_s"])[len(runs) // 2]
        results[name].append({**median, "rounds_requests_per_s": [run["requests_per_s"] for run in runs],
                              "failed_all_rounds": sum(run["failed"] for run in runs),
                              "wrong_first_hit_all_rounds": sum(run["wrong_first_hit"] for run in runs)})
    return results


def table(unbatched: list[dict], batched: list[dict]) -> str:
    lines = [("| concurrency | unbatched req/s | p50 / p95 ms | batched req/s | p50 / p95 ms | mean batch | ratio | "
              "model ms/req (unbatched / batched) | server CPU ms/req | client CPU ms/req |"),
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for one, many in zip(unbatched, batched, strict=True):
        lines.append(f"| {one['concurrency']} | {one['requests_per_s']} | {one['p50_ms']} / {one['p95_ms']} | "
                     f"{many['requests_per_s']} | {many['p50_ms']} / {many['p95_ms']} | {many['mean_batch']} | "
                     f"{many['requests_per_s'] / one['requests_per_s']:.2f} | {one['model_busy_ms_per_request']} / "
                     f"{many['model_busy_ms_per_request']} | {one['server_cpu_ms_per_request']} / "
                     f"{many['server_cpu_ms_per_request']} | {one['client_cpu_ms_per_request']} / "
                     f"{many['client_cpu_ms_per_request']} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ a changing collection
WRITE_KEY = "benchmark-write-key-" + "0" * 16


def backends_of(index_dir: Path, work: Path) -> dict[str, str]:
    """Two fresh copies of the collection: an index folder, and a Milvus Lite collection of the same vectors."""
    import shutil

    from normsoftmax.embedding.files import EmbeddingsFile, write_embeddings
    from normsoftmax.search import SearchIndex
    from normsoftmax.search.backends import milvus_location

    source = SearchIndex.open(index_dir)
    folder = work / "mixed_folder"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(index_dir, folder, ignore=shutil.ignore_patterns("images", "journal.*"))
    database = work / "mixed_milvus.db"
    for leftover in work.glob("mixed_milvus.db*"):
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    ids = source.ids()
    records = [source.record(int(i)) for i in ids]
    labels = [r.label for r in records]
    names = sorted({label for label in labels if label is not None})
    embeddings = EmbeddingsFile(source.vectors_of(ids), [r.path for r in records],
                                np.array([names.index(label) for label in labels]) if names else None,
                                {"model": source.model, "label_names": names})
    # Built by the command line in a process of its own: Milvus Lite lets one process at a time open the file,
    # and a client here keeps it until this process ends.
    exported = work / "mixed_embeddings.npz"
    write_embeddings(exported, embeddings.embeddings, embeddings.paths, embeddings.labels, embeddings.metadata)
    subprocess.run([sys.executable, "-m", "normsoftmax", "index", "build", str(exported), "--backend", "milvus",
                    "--uri", str(database), "--collection", "mixed"], check=True, capture_output=True)
    return {"faiss folder": str(folder), "Milvus Lite": milvus_location(str(database), "mixed")}


async def mixed_load(url: str, uploads, concurrency: int, total: int, k: int, write_share: float,
                     acknowledged: dict, deadline: float | None = None) -> dict:
    """``total`` requests from ``concurrency`` clients, ``write_share`` of them ``POST /items`` (new images with a
    unique label), the rest searches; latency per kind. Acknowledged writes are recorded (id -> label)."""
    import httpx

    timings: dict[str, list[float]] = {"search": [], "write": []}
    failures = {"search": 0, "write": 0}
    order = itertools.count()
    rng = np.random.default_rng(len(acknowledged))
    headers_write = {"Authorization": f"Bearer {WRITE_KEY}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:

        async def client():
            while (number := next(order)) < total:
                if deadline is not None and time.monotonic() > deadline:
                    return
                item_id, body, headers = uploads[number % len(uploads)]
                kind = "write" if rng.random() < write_share else "search"
                started = time.perf_counter()
                try:
                    if kind == "write":
                        label = f"load-{number}-{time.monotonic_ns()}"
                        answer = await http.post("/items", headers=headers_write, data={"label": label},
                                                 files={"image": ("new.png", _image_bytes(number), "image/png")})
                        if answer.status_code == 200:
                            acknowledged[answer.json()["id"]] = label
                    else:
                        answer = await http.post("/search", params={"k": k}, content=body, headers=headers)
                    ok = answer.status_code == 200
                except httpx.HTTPError:
                    ok = False
                timings[kind].append(time.perf_counter() - started)
                failures[kind] += not ok

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    done = len(timings["search"]) + len(timings["write"])
    result = {"concurrency": concurrency, "requests": done, "seconds": round(elapsed, 2),
              "requests_per_s": round(done / elapsed, 1)}
    for kind, values in timings.items():
        milliseconds = np.array(values) * 1000 if values else np.zeros(1)
        result[kind] = {"count": len(values), "failed": failures[kind],
                        "p50_ms": round(float(np.percentile(milliseconds, 50)), 1),
                        "p95_ms": round(float(np.percentile(milliseconds, 95)), 1)}
    return result


def _image_bytes(seed: int) -> bytes:
    import io

    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


async def _killed_load(process, url: str, uploads, total: int, k: int, acknowledged: dict, kill_after: float) -> None:
    """The mixed load, and SIGKILL to the server ``kill_after`` seconds into it."""
    import signal

    load = asyncio.create_task(mixed_load(url, uploads, 32, 10 * total, k, 0.1, acknowledged,
                                          deadline=time.monotonic() + kill_after + 3))
    await asyncio.sleep(kill_after)
    process.send_signal(signal.SIGKILL)
    await load


def run_mixed(run_dir: Path, index_dir: Path, uploads, total: int, k: int, work: Path, kill_after: float) -> dict:
    """Per backend: the mixed load at concurrency 32, then the same load killed with SIGKILL after ``kill_after``
    seconds, the server started again and every acknowledged write looked up."""
    import httpx

    keys = work / "mixed_keys.txt"
    keys.write_text(f"{WRITE_KEY} write\n")
    results = {}
    for name, location in backends_of(index_dir, work).items():
        uploads_dir = work / f"mixed_uploads_{name.split()[0]}"
        extra = ["--api_key_file", str(keys), "--max_writes_per_second", "100000", "--uploads", str(uploads_dir)]
        process, url = start_server(run_dir, location, None, work / f"server_mixed_{name.split()[0]}.log", extra)
        acknowledged: dict[int, str] = {}
        try:
            asyncio.run(mixed_load(url, uploads, 8, 64, k, 0.1, {}))  # warm-up
            measured = asyncio.run(mixed_load(url, uploads, 32, total, k, 0.1, acknowledged))
            print(f"  {name}: {measured}", flush=True)
            # the kill: a second load, SIGKILL in the middle of it
            killed: dict[int, str] = {}
            port = int(url.rsplit(":", 1)[1])

            asyncio.run(_killed_load(process, url, uploads, total, k, killed, kill_after))
            process.wait(timeout=30)
        finally:
            if process.poll() is None:
                stop_server(process)
        restarted, url = start_server(run_dir, location, None, work / f"server_mixed_{name.split()[0]}_2.log", extra,
                                      port=port)
        try:
            with httpx.Client(base_url=url, timeout=60) as http:
                found = sum(http.get(f"/items/{item_id}").json().get("label") == label
                            for item_id, label in {**acknowledged, **killed}.items())
        finally:
            stop_server(restarted)
        results[name] = {**measured, "writes_acknowledged_before_the_kill": len(acknowledged) + len(killed),
                         "found_after_restart": found}
        print(f"  {name}: acknowledged {len(acknowledged) + len(killed)}, found after SIGKILL and restart {found}",
              flush=True)
    return results


def mixed_table(results: dict) -> str:
    lines = [("| backend | req/s | searches: p50 / p95 ms | writes: p50 / p95 ms | failed | acknowledged writes "
              "before SIGKILL | found after restart |"), "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        failed = r["search"]["failed"] + r["write"]["failed"]
        lines.append(f"| {name} | {r['requests_per_s']} | {r['search']['p50_ms']} / {r['search']['p95_ms']} | "
                     f"{r['write']['p50_ms']} / {r['write']['p95_ms']} | {failed} "
                     f"| {r['writes_acknowledged_before_the_kill']} | {r['found_after_restart']} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="the run directory or checkpoint to serve (with --index)")
    parser.add_argument("--index", help="the index folder to serve (with --checkpoint)")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "normsoftmax-serve-load"),
                        help="where the default model and index are made and kept")
    parser.add_argument("--requests", type=int, default=256, help="requests per concurrency level and mode")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="repetitions of the whole sequence; medians are reported")
    parser.add_argument("--mixed", action="store_true",
                        help="instead: 90%% searches and 10%% writes at concurrency 32 on both backends (an index "
                             "folder, Milvus Lite), then the same load killed with SIGKILL and the writes counted")
    parser.add_argument("--kill_after", type=float, default=4.0, help="--mixed: seconds of load before the SIGKILL")
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "serve_load.json"))
    args = parser.parse_args(argv)
    if bool(args.checkpoint) != bool(args.index):
        parser.error("give both --checkpoint and --index, or neither")
    levels = [int(level) for level in args.concurrency.split(",")]
    load_at_start = os.getloadavg()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.checkpoint:
        run_dir, index_dir = Path(args.checkpoint), Path(args.index)
    else:
        run_dir, index_dir = prepare_default(work)
    uploads = encoded_uploads(query_uploads(index_dir, 128), args.k)
    if args.mixed:
        mixed = run_mixed(run_dir, index_dir, uploads, args.requests, args.k, work, args.kill_after)
        report = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join([Path(sys.executable).name] + sys.argv),
                  "machine": {"cpus": os.cpu_count(), "load_average_at_start": load_at_start,
                              "load_average_at_end": os.getloadavg()}, "checkpoint": str(run_dir),
                  "index": str(index_dir), "mixed": mixed}
        print(mixed_table(mixed))
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"results: {args.json}")
        return report
    from normsoftmax.runtime import available_cpus

    threads = max(1, available_cpus() - 1)  # what `normsoftmax serve` uses by default
    alone = model_alone(run_dir, threads)
    print(f"the model alone ({threads} thread{'s' if threads > 1 else ''}), ms per image at batch size "
          + ", ".join(f"{size}: {ms}" for size, ms in alone.items()), flush=True)
    print(f"serving {run_dir} with {index_dir}; {len(uploads)} distinct query images; {args.requests} requests "
          f"per level and mode, {args.rounds} rounds", flush=True)
    results = run_modes(run_dir, index_dir, uploads, {"unbatched": 1, "batched": None}, levels, args.requests, args.k,
                        args.rounds, work)
    unbatched, batched = results["unbatched"], results["batched"]
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join([Path(sys.executable).name] + sys.argv),
              "machine": {"cpus": os.cpu_count(), "load_average_at_start": load_at_start,
                          "load_average_at_end": os.getloadavg(), "python": platform.python_version()},
              "checkpoint": str(run_dir), "index": str(index_dir), "model_alone_ms_per_image": alone,
              "serve_threads": threads, "unbatched (max_batch 1)": unbatched,
              "batched (default)": batched,
              "ratio": {str(one["concurrency"]): round(many["requests_per_s"] / one["requests_per_s"], 2)
                        for one, many in zip(unbatched, batched, strict=True)}}
    print(table(unbatched, batched))
    print(f"requests sent: {2 * len(levels) * args.rounds * args.requests}; failed: "
          f"{sum(r['failed_all_rounds'] for r in unbatched + batched)}; wrong first hits: "
          f"{sum(r['wrong_first_hit_all_rounds'] for r in unbatched + batched)}")
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {args.json}")
    return report


if __name__ == "__main__":
    main()
