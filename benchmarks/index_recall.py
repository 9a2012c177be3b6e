"""Recall@10 of IVF-PQ (and of binary codes) against the exact index, and search speed of each.

A synthetic clustered collection (default 200,000 x 128, L2-normalised, ``--classes`` clusters with
per-item noise, like a trained model's embeddings) goes through the project's own code path
(:meth:`SearchIndex.create` into a temporary folder, written and re-opened) as a ``flat`` index and an ``ivf``
index with the parameters ``normsoftmax index build --kind ivf`` chooses. Held-out queries from the same
distribution are searched in both; recall@10 is the share of the exact top 10 (``IndexFlatIP``) that the
approximate search returns, over a sweep of nprobe (the default marked). Speeds: queries per second with
all queries in one call (batch) and one query per call (interactive), and build times.

    .venv/bin/python benchmarks/index_recall.py
    .venv/bin/python benchmarks/index_recall.py --n 50000 --queries 500   # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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


def clustered(count: int, dim: int, classes: int, spread: float, seed: int) -> np.ndarray:
    """Cluster centres on the sphere plus per-item noise of a log-normal level (most items near their centre,
    some far), normalised."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, classes, size=count)
    levels = (spread * rng.lognormal(0.0, 0.5, size=(count, 1))).astype(np.float32)
    vectors = centres[labels] + levels * rng.normal(size=(count, dim)).astype(np.float32) / np.sqrt(dim)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float32)


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a[a >= 0]) & set(e)) / len(e) for a, e in zip(found, exact, strict=True)]))


def speeds(search, queries: np.ndarray, single: int, repeats: int = 3) -> dict:
    """Queries/s with all queries in one call, and with one query per call (the first ``single`` queries); the
    best of ``repeats`` timings each (other processes on the machine only ever slow a timing down)."""
    batch, one_by_one = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        search(queries)
        batch.append(len(queries) / (time.perf_counter() - started))
        started = time.perf_counter()
        for row in range(single):
            search(queries[row:row + 1])
        one_by_one.append(single / (time.perf_counter() - started))
    return {"batch_queries_per_s": round(max(batch), 1), "single_queries_per_s": round(max(one_by_one), 1)}


def _float_bytes(index) -> int:
    return (index.directory / index.metadata["files"]["float"]["name"]).stat().st_size


def ivf_sweep(embeddings, queries, exact, folder: Path, pq_m: int | None, args) -> dict:
    """Build an IVF-PQ index (``index build --kind ivf``'s parameters, or another PQ size) and measure recall and
    speed over a sweep of nprobe."""
    from normsoftmax.search import SearchIndex, choose_ivf_parameters

    parameters = choose_ivf_parameters(len(embeddings), embeddings.dim, pq_m=pq_m)
    started = time.perf_counter()
    ivf = SearchIndex.create(folder, embeddings, "ivf", ivf=parameters)
    result = {"parameters": ivf.metadata["ivf"], "build_s": round(time.perf_counter() - started, 1)}
    ivf = SearchIndex.open(folder)
    result["mib"] = round(_float_bytes(ivf) / 2**20, 1)
    print(f"IVF-PQ {parameters}: build {result['build_s']} s, {result['mib']} MiB", flush=True)
    result["nprobe"] = {}
    default = parameters.nprobe
    for nprobe in sorted({1, 4, 16, 64, default, 4 * default, parameters.nlist}):
        if nprobe > parameters.nlist:
            continue
        found = ivf.search(queries, args.k, nprobe=nprobe).ids
        entry = {"recall@10": round(recall(found, exact), 4), "default": nprobe == default,
                 **speeds(lambda q, nprobe=nprobe: ivf.search(q, args.k, nprobe=nprobe), queries, args.single)}
        result["nprobe"][str(nprobe)] = entry
        print(f"  nprobe {nprobe:5d}{' (default)' if nprobe == default else '          '}: recall@{args.k} "
              f"{entry['recall@10']:.4f}, {entry['batch_queries_per_s']:,.0f} queries/s batched, "
              f"{entry['single_queries_per_s']:,.0f} one at a time", flush=True)
    return result


def main(argv=None) -> dict:
    from normsoftmax.embedding.files import EmbeddingsFile
    from normsoftmax.search import SearchIndex

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--classes", type=int, default=20_000)
    parser.add_argument("--spread", type=float, default=0.8, help="noise level around the cluster centres")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--single", type=int, default=200, help="queries timed one per call")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--pq_m", default="default", help="comma-separated PQ sizes to compare (bytes per vector), "
                                                          "'default' for the one `index build` chooses")
    parser.add_argument("--threads", type=int, default=None, help="faiss threads (default: all cores)")
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "index_recall.json"))
    args = parser.parse_args(argv)
    if args.threads:
        import faiss

        faiss.omp_set_num_threads(args.threads)

    everything = clustered(args.n + args.queries, args.dim, args.classes, args.spread, seed=0)
    gallery, queries = everything[:args.n], everything[args.n:]
    embeddings = EmbeddingsFile(gallery, [f"item/{i:07d}" for i in range(args.n)], None,
                                {"model": {"digest": "synthetic", "dim": args.dim}})
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join([Path(sys.executable).name] + sys.argv),
              "machine": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg(),
                          "python": platform.python_version()},
              "n": args.n, "dim": args.dim, "classes": args.classes, "queries": args.queries, "k": args.k}
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        flat = SearchIndex.create(Path(folder) / "flat", embeddings, "flat")
        report["flat_build_s"] = round(time.perf_counter() - started, 1)
        flat = SearchIndex.open(flat.directory)
        report["flat_mib"] = round(_float_bytes(flat) / 2**20, 1)
        exact = flat.search(queries, args.k).ids
        report["exact"] = speeds(lambda q: flat.search(q, args.k), queries, args.single)
        print(f"exact (IndexFlatIP): {report['exact']['batch_queries_per_s']:,.0f} queries/s batched, "
              f"{report['exact']['single_queries_per_s']:,.0f} one at a time; build {report['flat_build_s']} s, "
              f"{report['flat_mib']} MiB", flush=True)
        binary = flat.search(queries, args.k, kind="binary").ids
        report["binary"] = {"recall@10": round(recall(binary, exact), 4),
                            **speeds(lambda q: flat.search(q, args.k, kind="binary"), queries, args.single)}
        print(f"binary (IndexBinaryFlat, sign bits): recall@{args.k} {report['binary']['recall@10']:.4f} of the "
              f"exact float top {args.k}, {report['binary']['batch_queries_per_s']:,.0f} queries/s batched, "
              f"{report['binary']['single_queries_per_s']:,.0f} one at a time", flush=True)
        report["ivf"] = [ivf_sweep(embeddings, queries, exact, Path(folder) / f"ivf{number}",
                                   None if size == "default" else int(size), args)
                         for number, size in enumerate(args.pq_m.split(","))]
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {args.json}")
    return report


if __name__ == "__main__":
    main()
