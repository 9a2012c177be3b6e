"""Retrieval evaluation with large classes: time and peak memory against a float64 brute force, one run.

Cases (leave-one-out, float and binary unless noted):

* ``two_classes``      10,000 x 32 Gaussian embeddings in 2 classes (R = 5,000 per query);
* ``hundred_classes``  100,000 x 512 in 100 classes of 1,000, clustered (class centre + noise), float;
* ``identical``        2,000 identical vectors in 4 classes (every score ties);
* ``sop_shaped``       SOP's test shape (60,502 x 2048, 11,316 classes of 2-12), clustered, float.

Each (case, method) runs in a fresh subprocess, so its peak resident memory is its own; "above the
embeddings" subtracts the process's resident memory right after the embeddings were made. Methods:

* ``ours``   ``normsoftmax.evaluation.evaluate_embeddings`` (``nmi=False``), with per-query results;
* ``brute``  numpy float64, every query's gallery fully sorted (ties: lower gallery index first), on all
             queries or, where that is too slow, a random subset (``--brute-queries``); its time is then
             also given scaled to all queries, and our metrics are compared on the same subset.

``--src DIR`` runs ``ours`` from another checkout's ``src`` (the "before" column of RESULTS.md).

    python benchmarks/eval_large_classes.py                      # every case
    python benchmarks/eval_large_classes.py --cases two_classes  # one
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
KS = {"two_classes": (1, 2, 4, 8), "hundred_classes": (1, 2, 4, 8), "identical": (1, 2, 4, 8),
      "sop_shaped": (1, 10, 100, 1000)}
KINDS = {"two_classes": ("float", "binary"), "hundred_classes": ("float",), "identical": ("float", "binary"),
         "sop_shaped": ("float",)}
METRICS = ("map@r", "r_precision")


# --------------------------------------------------------------------------------------------------- data
def make_case(name: str, scale: float = 1.0):
    rng = np.random.default_rng(0)
    if name == "two_classes":
        n = int(10_000 * scale)
        return rng.standard_normal((n, 32)).astype(np.float32), rng.integers(0, 2, n)
    if name == "hundred_classes":
        classes, per_class, dim = max(2, int(100 * scale)), 1000, 512
        labels = rng.permutation(np.repeat(np.arange(classes), per_class))
        centres = rng.standard_normal((classes, dim)).astype(np.float32)
        x = centres[labels] + 2.5 * rng.standard_normal((len(labels), dim)).astype(np.float32)
        return x, labels
    if name == "identical":
        n = int(2000 * scale)
        return np.tile(rng.standard_normal((1, 64)).astype(np.float32), (n, 1)), rng.integers(0, 4, n)
    if name == "sop_shaped":
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from eval_scale import make_sop_like

        return make_sop_like(scale)
    raise ValueError(name)


# --------------------------------------------------------------------------------------------------- methods
def brute_force(x: np.ndarray, labels: np.ndarray, queries: np.ndarray, binary: bool, max_k: int):
    """Per query of ``queries``: first-match rank (-1 if none below max_k), AP@R, R-precision, R."""
    if binary:
        codes = np.where(x > 0, 1.0, -1.0)
        unit = codes
    else:
        x64 = x.astype(np.float64)
        unit = x64 / np.maximum(np.linalg.norm(x64, axis=1, keepdims=True), 1e-300)
    n = len(labels)
    first = np.full(len(queries), -1, dtype=np.int64)
    ap = np.zeros(len(queries))
    rp = np.zeros(len(queries))
    count = np.zeros(len(queries), dtype=np.int64)
    for start in range(0, len(queries), 256):
        block = queries[start:start + 256]
        scores = unit[block] @ unit.T
        for row, q in enumerate(block):
            s = scores[row].copy()
            order = np.lexsort((np.arange(n), -s))  # score descending, then gallery index ascending
            order = order[order != q]
            relevant = labels[order] == labels[q]
            r = int(relevant.sum())
            i = start + row
            count[i] = r
            if r == 0:
                continue
            f = int(np.argmax(relevant))
            first[i] = f if f < max_k else -1
            top = relevant[:r]
            hits = np.cumsum(top)
            ap[i] = float((hits / np.arange(1, r + 1))[top].sum() / r)
            rp[i] = float(top.sum() / r)
    return first, ap, rp, count


def metrics(first, ap, rp, count, ks) -> dict:
    out = {f"recall@{k}": 100.0 * float(((first >= 0) & (first < k)).sum()) / len(first) for k in ks}
    has = count > 0
    out["map@r"] = 100.0 * float(ap[has].mean()) if has.any() else None
    out["r_precision"] = 100.0 * float(rp[has].mean()) if has.any() else None
    return out


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(case: str, method: str, scale: float, brute_queries: int) -> dict:
    if method == "ours":  # imported before the baseline: the libraries' own memory is not the evaluation's
        try:
            from normsoftmax.evaluation.metrics import evaluate_embeddings
            per_query = True
        except ImportError:  # an older checkout
            from normsoftmax.evaluate import evaluate_embeddings
            per_query = False
    x, labels = make_case(case, scale)
    ks = KS[case]
    baseline = rss_mb()
    rng = np.random.default_rng(1)
    subset = np.arange(len(labels)) if brute_queries >= len(labels) else \
        np.sort(rng.choice(len(labels), brute_queries, replace=False))
    out = {"case": case, "method": method, "shape": list(x.shape), "classes": int(len(np.unique(labels))),
           "embeddings_mb": round(x.nbytes / 2**20, 1), "queries_compared": int(len(subset))}
    started = time.perf_counter()
    if method == "ours":
        binary = "binary" in KINDS[case]
        kwargs = {"return_per_query": True} if per_query else {}
        result = evaluate_embeddings(x, labels, ks=ks, nmi=False, binary=binary, **kwargs)
        out["seconds"] = time.perf_counter() - started
        out["metrics"] = {kind: result[kind] for kind in KINDS[case]}
        if per_query:
            out["subset_metrics"] = {}
            for kind in KINDS[case]:
                pq = result["per_query"][kind]
                out["subset_metrics"][kind] = metrics(pq["first_positive_rank"][subset],
                                                      pq["average_precision"][subset],
                                                      pq["r_precision"][subset], pq["num_positives"][subset], ks)
    else:
        out["subset_metrics"] = {}
        for kind in KINDS[case]:
            out["subset_metrics"][kind] = metrics(*brute_force(x, labels, subset, kind == "binary", max(ks)), ks)
        out["seconds"] = time.perf_counter() - started
        out["seconds_all_queries"] = out["seconds"] * len(labels) / len(subset)
    out["peak_mb"] = round(peak_mb(), 1)
    out["above_embeddings_mb"] = round(peak_mb() - baseline, 1)
    return out


def run_worker(case: str, method: str, args) -> dict:
    env = dict(os.environ)
    if method == "ours" and args.src:
        env["PYTHONPATH"] = str(Path(args.src).resolve()) + os.pathsep + env.get("PYTHONPATH", "")
    command = [sys.executable, __file__, "--worker", case, method, "--scale", str(args.scale),
               "--brute-queries", str(args.brute_queries.get(case, 10**9))]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
    if done.returncode != 0:
        return {"case": case, "method": method, "error": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="two_classes,identical,hundred_classes,sop_shaped")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--src", help="run 'ours' from this checkout's src folder (the code before a change)")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "eval_large_classes.json"))
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "METHOD"))
    parser.add_argument("--brute-queries", type=int, default=None)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker, args.scale, args.brute_queries)))
        return {}
    args.brute_queries = {"two_classes": 10**9, "identical": 10**9, "hundred_classes": 1000, "sop_shaped": 2000}
    report = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "cpus": os.cpu_count(),
              "load_average_start": os.getloadavg(), "cases": {}}
    for case in args.cases.split(","):
        ours, brute = run_worker(case, "ours", args), run_worker(case, "brute", args)
        entry = {"ours": ours, "brute": brute}
        if "error" not in ours and "error" not in brute:
            entry["ratio_ours_over_brute"] = ours["seconds"] / brute.get("seconds_all_queries", brute["seconds"])
            if "subset_metrics" in ours:
                entry["max_abs_difference"] = {
                    kind: max(abs((ours["subset_metrics"][kind][m] or 0) - (brute["subset_metrics"][kind][m] or 0))
                              for m in brute["subset_metrics"][kind])
                    for kind in brute["subset_metrics"]}
        report["cases"][case] = entry
        print(json.dumps({case: entry}, indent=1, default=float), flush=True)
    report["load_average_end"] = os.getloadavg()
    Path(args.json).write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
