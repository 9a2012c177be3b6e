"""Do the two index backends agree? The same embeddings in a faiss folder and in a Milvus collection (Milvus Lite,
the embedded engine behind the same client), searched with the same queries.

* exact kinds (faiss ``flat``, Milvus ``FLAT``): the share of queries whose top-k ids are identical, and whose
  binary Hamming distances are identical (the ±1 inner products Milvus ranks by must equal dim - 2 x Hamming);
* approximate kinds (faiss IVF-PQ, Milvus IVF_FLAT and HNSW): recall@k against the exact faiss neighbours.

    .venv/bin/python benchmarks/backend_agreement.py [--embeddings demo_output/gallery.npz] [--synthetic 100000]
        [--uri http://HOST:19530]    # a Milvus server: there the approximate indexes are approximate
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def synthetic(count: int, dim: int = 128, classes: int = 2000, seed: int = 0):
    """Clustered unit vectors (a class centre plus noise), the shape of trained embeddings."""
    from normsoftmax.embedding.files import EmbeddingsFile

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)).astype(np.float32)
    labels = rng.integers(0, classes, count)
    vectors = centres[labels] + rng.normal(scale=0.9, size=(count, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return EmbeddingsFile(embeddings=vectors, paths=[f"synthetic/{i}.png" for i in range(count)], labels=labels,
                          metadata={"model": {"digest": "synthetic", "dim": dim}})


def recall_at(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact, strict=True)]))


def compare(name: str, embeddings, queries: int, k: int, work: Path, uri: str | None = None) -> dict:
    from normsoftmax.search.backends import create_index, milvus_location
    from normsoftmax.search.vectors import MIN_IVF_VECTORS, choose_ivf_parameters

    rng = np.random.default_rng(1)
    chosen = np.sort(rng.choice(len(embeddings.embeddings), min(queries, len(embeddings.embeddings)), replace=False))
    query_vectors = embeddings.embeddings[chosen]
    result: dict = {"embeddings": name, "items": len(embeddings.embeddings), "dim": int(embeddings.embeddings.shape[1]),
                    "queries": len(chosen), "k": k, "kinds": {}}
    started = time.perf_counter()
    exact = create_index(str(work / f"{name}-flat"), embeddings, "flat")
    result["kinds"]["faiss flat"] = {"build_s": round(time.perf_counter() - started, 1)}
    truth = exact.search(query_vectors, k=k)
    truth_binary = exact.search(query_vectors, k=k, kind="binary")
    engine = "Milvus" if uri else "Milvus Lite"
    candidates: list[tuple[str, str, str | None]] = [
        (f"{engine} FLAT", "flat", "FLAT"), (f"{engine} IVF_FLAT", "ivf", "IVF_FLAT"),
        (f"{engine} HNSW", "flat", "HNSW")]
    if len(embeddings.embeddings) >= MIN_IVF_VECTORS:
        candidates.insert(0, ("faiss IVF-PQ", "ivf", None))
    for label, kind, milvus_index in candidates:
        started = time.perf_counter()
        if milvus_index is None:
            index = create_index(str(work / f"{name}-ivf"), embeddings, "ivf",
                                 ivf=choose_ivf_parameters(len(embeddings.embeddings), embeddings.dim))
        else:
            location = (milvus_location(uri, f"agreement_{name}_{milvus_index.lower()}") if uri else
                        milvus_location(str(work / f"{name}-{milvus_index.lower()}.db"), "agreement"))
            index = create_index(location, embeddings, kind, milvus_index=milvus_index)
        built = time.perf_counter() - started
        started = time.perf_counter()
        found = index.search(query_vectors, k=k)
        searched = time.perf_counter() - started
        row = {"build_s": round(built, 1), "search_ms_per_query": round(1000 * searched / len(chosen), 2),
               f"recall@{k}": round(recall_at(found.ids, truth.ids), 4),
               "identical_top_k": round(float(np.mean([np.array_equal(a, b) for a, b in
                                                       zip(found.ids, truth.ids, strict=True)])), 4)}
        if "binary" in index.kinds and "binary" in exact.kinds:
            binary = index.search(query_vectors, k=k, kind="binary")
            row["binary_identical_hamming"] = round(float(np.mean([np.array_equal(a, b) for a, b in
                                                                   zip(binary.hamming, truth_binary.hamming,
                                                                       strict=True)])), 4)
        result["kinds"][label] = row
        print(f"  {label}: {json.dumps(row)}", flush=True)
        del index
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embeddings", default=str(ROOT / "demo_output" / "gallery.npz"))
    parser.add_argument("--synthetic", type=int, default=100_000, help="also this many clustered vectors (0: none)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--uri", default=None, help="a Milvus server (http://HOST:19530) instead of Milvus Lite files; "
                                                    "the benchmark creates collections agreement_* there")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from normsoftmax.embedding.files import read_embeddings

    sets = []
    if Path(args.embeddings).is_file():
        sets.append((Path(args.embeddings).stem, read_embeddings(args.embeddings)))
    if args.synthetic:
        sets.append((f"synthetic{args.synthetic}", synthetic(args.synthetic)))
    report = {"date": time.strftime("%Y-%m-%d"), "results": []}
    with tempfile.TemporaryDirectory() as scratch:
        for name, embeddings in sets:
            print(f"{name}: {len(embeddings.embeddings)} x {embeddings.embeddings.shape[1]}", flush=True)
            report["results"].append(compare(name, embeddings, args.queries, args.k, Path(scratch), args.uri))
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
