"""Load on the search service: requests/s and latency with and without request batching, side by side.

Starts `normsoftmax serve` on 127.0.0.1 twice -- with ``--max_batch 1`` (every request embedded alone) and
with the default micro-batching -- and sends the same bounded load to each: a fixed number of image uploads
(``POST /search``, k = 10) at each concurrency level, every upload an indexed image whose answer must be that
image first. Prints requests/s, p50/p95/p99 latency, failures, wrong answers, the mean batch size and where the
CPU went (model, server process, this client), the batched/unbatched ratio per level, and writes the figures
as JSON. Both servers run side by side and the levels alternate between them, the whole sequence repeated
(``--rounds``), medians reported: on a shared machine what else runs then weighs on both alike.

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


def start_server(run_dir: Path, index_dir: Path, max_batch: int | None, log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "normsoftmax", "serve", str(run_dir), str(index_dir), "--port", str(port),
               "--device", "cpu"] + ([] if max_batch is None else ["--max_batch", str(max_batch)])
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
