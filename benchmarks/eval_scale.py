"""Retrieval evaluation at Stanford Online Products scale: speed, memory and exactness.

Builds clustered synthetic embeddings with SOP's test-set shape (60,502 x 2048,
11,316 classes of 2-12 images, classes stored contiguously like the SOP lists)
and, in one process, times and compares:

1. this project's evaluator (``normsoftmax.evaluate.evaluate_embeddings``), float
   and binary, Recall@{1,10,100,1000} and MAP@R / R-precision, ``nmi=False``;
2. the reference approach: faiss ``IndexFlatIP`` search with k = 1001 plus a
   per-query Python Recall@K walk over the neighbour labels (first neighbour
   dropped as the query itself), and faiss ``IndexBinaryFlat`` (k = 1001) on the
   sign bits;
3. pytorch-metric-learning's ``AccuracyCalculator`` (precision_at_1, r_precision,
   mean_average_precision_at_r) on a subset of whole classes (default about 10k
   images, leave-one-out inside the subset), next to this project's evaluator on
   the same subset;

and checks every method against a float64 brute-force reference (ties broken by
gallery index) on a random subset of queries (default 3,000) against the full
gallery, binary codes included. Prints timings, ratios, peak memory per stage
(resident-set high-water mark, reset between stages where Linux allows) and the
largest metric differences; writes everything to JSON.

Usage::

    python benchmarks/eval_scale.py                 # full SOP scale
    python benchmarks/eval_scale.py --scale 0.1     # quick run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    import normsoftmax.evaluation.metrics as ev
except ImportError:  # an older checkout imported first (eval_large_classes --src borrows make_sop_like)
    ev = None

KS = (1, 10, 100, 1000)
METRICS = [f"recall@{k}" for k in KS] + ["map@r", "r_precision"]


# --------------------------------------------------------------------------- data


def class_sizes(n_classes: int, n_images: int, rng, lo: int = 2, hi: int = 12) -> np.ndarray:
    """Class sizes in [lo, hi] summing to n_images, skewed like SOP (many small classes)."""
    sizes = np.full(n_classes, lo, dtype=np.int64)
    extra = n_images - lo * n_classes
    if not 0 <= extra <= (hi - lo) * n_classes:
        raise ValueError("impossible class-size constraints")
    w = rng.exponential(1.0, n_classes)
    sizes += np.minimum(np.floor(w / w.sum() * extra).astype(np.int64), hi - lo)
    while sizes.sum() < n_images:
        room = np.flatnonzero(sizes < hi)
        pick = rng.choice(room, min(len(room), int(n_images - sizes.sum())), replace=False)
        sizes[pick] += 1
    return sizes


def make_sop_like(scale: float = 1.0, seed: int = 0, dim: int = 2048, latent: int = 256):
    """Clustered embeddings with SOP's shape.

    Class centres are random directions in a 256-d latent space, grouped around
    12 super-categories (SOP has 12); an image is its class centre plus Gaussian
    noise whose level varies per image (log-normal: most images are easy, some
    are very hard), mapped to ``dim`` dimensions by a random linear map plus a
    little isotropic noise. At full scale float Recall@1 is about 75%, Recall@1000
    about 97%, like a real SOP model; ranks, near-ties and binary ties all occur.
    """
    rng = np.random.default_rng(seed)
    n_classes = max(2, round(11316 * scale))
    n_images = max(2 * n_classes, round(60502 * scale))
    labels = np.repeat(np.arange(n_classes), class_sizes(n_classes, n_images, rng))
    sup = rng.standard_normal((12, latent))
    sup /= np.linalg.norm(sup, axis=1, keepdims=True)
    centres = sup[rng.integers(0, 12, n_classes)] + 0.55 * rng.standard_normal((n_classes, latent)) / np.sqrt(latent)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    noise = 0.8 * np.exp(0.5 * rng.standard_normal((n_images, 1)))
    z = centres[labels] + noise * rng.standard_normal((n_images, latent)) / np.sqrt(latent)
    proj = (rng.standard_normal((latent, dim)) / np.sqrt(latent)).astype(np.float32)
    x = z.astype(np.float32) @ proj
    iso = 0.3 * np.linalg.norm(x, axis=1, keepdims=True) / np.sqrt(dim)
    for s in range(0, n_images, 8192):  # in chunks: no second full-size temporary
        x[s : s + 8192] += iso[s : s + 8192] * rng.standard_normal((len(x[s : s + 8192]), dim), dtype=np.float32)
    return np.ascontiguousarray(x), labels


# --------------------------------------------------------------------------- memory and timing


def _status_kb(field: str):
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float | None:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


def peak_mb() -> float:
    kb = _status_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


def reset_peak() -> bool:
    """Reset the RSS high-water mark (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


STAGES: dict[str, dict] = {}


@contextmanager
def stage(name: str):
    reset_ok = reset_peak()
    before = rss_mb()
    cpu0, t0 = os.times(), time.perf_counter()
    info: dict = {}
    yield info
    wall = time.perf_counter() - t0
    cpu1 = os.times()
    info.update(seconds=wall, cpu_seconds=(cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
                rss_before_mb=before, rss_after_mb=rss_mb(),
                peak_rss_mb=peak_mb() if reset_ok else None,
                process_peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    STAGES[name] = info
    peak = f"{info['peak_rss_mb']:.0f}" if info["peak_rss_mb"] is not None else "n/a"
    print(f"[{name}] {wall:8.1f} s (cpu {info['cpu_seconds']:.1f} s)  RSS before {before:.0f} MB, "
          f"stage peak {peak} MB", flush=True)


# --------------------------------------------------------------------------- per-query metrics


def metrics_from_first_and_ranks(first: np.ndarray, ap: np.ndarray, rp: np.ndarray, has: np.ndarray) -> dict:
    """Average per-query results (first-match rank, AP@R, R-precision) into percentages."""
    out = {f"recall@{k}": 100.0 * float(np.mean(first < k)) for k in KS}
    out["map@r"] = 100.0 * float(ap[has].mean()) if has.any() else None
    out["r_precision"] = 100.0 * float(rp[has].mean()) if has.any() else None
    return out


def reference_ranks(x: np.ndarray, labels: np.ndarray, queries: np.ndarray, binary: bool, block: int = 250):
    """float64 brute force, leave-one-out, ties by gallery index: (first, ap, rp, has) per query."""
    n = len(labels)
    if not binary:
        norms = np.sqrt(np.einsum("ij,ij->i", x.astype(np.float64), x.astype(np.float64)))
        norms = np.maximum(norms, 1e-150)
    first = np.empty(len(queries), dtype=np.int64)
    ap = np.zeros(len(queries))
    rp = np.zeros(len(queries))
    has = np.zeros(len(queries), dtype=bool)
    idx = np.arange(n)
    for s in range(0, len(queries), block):
        qi = queries[s : s + block]
        if binary:
            q = np.where(x[qi] > 0, 1.0, -1.0)
            sims = np.empty((len(qi), n))
            for g0 in range(0, n, 8192):
                sims[:, g0 : g0 + 8192] = q @ np.where(x[g0 : g0 + 8192] > 0, 1.0, -1.0).T
        else:
            q = x[qi].astype(np.float64)
            sims = np.empty((len(qi), n))
            for g0 in range(0, n, 8192):
                sims[:, g0 : g0 + 8192] = q @ x[g0 : g0 + 8192].astype(np.float64).T
            sims /= norms[qi][:, None] * norms[None, :]
        for row, i in enumerate(qi):
            sim = sims[row]
            same = labels == labels[i]
            same[i] = False
            pos = np.flatnonzero(same)
            neg = ~same
            neg[i] = False
            r = len(pos)
            if r == 0:
                first[s + row] = np.iinfo(np.int64).max
                continue
            has[s + row] = True
            sn, idn = sim[neg], idx[neg]
            # number of negatives ranked before each positive (higher score, or equal and lower index)
            before = np.array([np.count_nonzero((sn > sim[p]) | ((sn == sim[p]) & (idn < p))) for p in pos])
            order = np.lexsort((pos, -sim[pos]))
            before = before[order]
            position = np.arange(r) + before
            first[s + row] = before[0]
            rel = position < r
            ap[s + row] = np.sum((np.arange(1, r + 1) / (position + 1))[rel]) / r
            rp[s + row] = rel.sum() / r
    return first, ap, rp, has


def ranks_from_neighbours(nbr_labels: np.ndarray, query_labels: np.ndarray, counts: np.ndarray):
    """(first, ap, rp, has) from a kNN label list (self already dropped)."""
    match = nbr_labels == query_labels[:, None]
    k = match.shape[1]
    any_match = match.any(1)
    first = np.where(any_match, match.argmax(1), np.iinfo(np.int64).max)
    has = counts > 0
    ap = np.zeros(len(query_labels))
    rp = np.zeros(len(query_labels))
    for i in np.flatnonzero(has):
        r = int(counts[i])
        top = match[i, : min(r, k)]
        prec = np.cumsum(top) / np.arange(1, len(top) + 1)
        ap[i] = float((prec * top).sum()) / r
        rp[i] = float(top.sum()) / r
    return first, ap, rp, has


def recall_walk(nbr_labels: np.ndarray, query_labels: np.ndarray, ks) -> dict:
    """The reference code's Recall@K: per K, per query, is the query's label among the first K?"""
    out = {}
    n = len(query_labels)
    for k in ks:
        hits = 0
        for i in range(n):
            if query_labels[i] in nbr_labels[i, :k]:
                hits += 1
        out[f"recall@{k}"] = 100.0 * hits / n
    return out


def max_diff(a: dict, b: dict, keys) -> float:
    return max(abs(a[k] - b[k]) for k in keys if a.get(k) is not None and b.get(k) is not None)


# --------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of SOP's size (default 1.0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "eval_scale.json"), help="output JSON path")
    parser.add_argument("--ref-queries", type=int, default=3000, help="queries in the float64 reference subset")
    parser.add_argument("--pml-images", type=int, default=10000, help="images (whole classes) for the PML comparison")
    parser.add_argument("--skip-pml", action="store_true")
    args = parser.parse_args(argv)

    import faiss

    report: dict = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "faiss_threads": faiss.omp_get_max_threads(), "python": platform.python_version(),
                    "torch": torch.__version__, "faiss": faiss.__version__, "numpy": np.__version__,
                    "load_average_start": os.getloadavg()},
        "args": vars(args),
        "ks": list(KS),
    }

    with stage("data") as info:
        x, labels = make_sop_like(args.scale, args.seed)
        info.update(shape=list(x.shape), classes=int(labels.max() + 1))
    n = len(labels)
    counts = np.bincount(labels)[labels] - 1  # correct matches per query (leave-one-out)
    print(f"data: {x.shape[0]} x {x.shape[1]} float32 ({x.nbytes / 2**20:.0f} MB), {labels.max() + 1} classes")

    # 1. this project's evaluator -------------------------------------------------------
    with stage("ours") as info:
        ours = ev.evaluate_embeddings(x, labels, ks=KS, nmi=False, return_per_query=True)
    report["ours"] = {k: ours[k] for k in ("float", "binary")}
    report["ours"]["queries_without_positive"] = ours["queries_without_positive"]

    # 2. faiss, the reference approach ------------------------------------------------------
    with stage("faiss_float_search") as info:
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(xn)
        _, nbr_f = index.search(xn, 1001)
        del index, xn
    with stage("faiss_float_walk") as info:
        nl_f = labels[nbr_f[:, 1:]]
        faiss_float = recall_walk(nl_f, labels, KS)
    with stage("faiss_binary_search") as info:
        codes = np.packbits(x > 0, axis=1)
        bindex = faiss.IndexBinaryFlat(x.shape[1])
        bindex.add(codes)
        _, nbr_b = bindex.search(codes, 1001)
        del bindex, codes
    with stage("faiss_binary_walk") as info:
        nl_b = labels[nbr_b[:, 1:]]
        faiss_binary = recall_walk(nl_b, labels, KS)
    # MAP@R from the kNN lists (not part of the timed reference approach)
    for nl, res in ((nl_f, faiss_float), (nl_b, faiss_binary)):
        f, ap, rp, has = ranks_from_neighbours(nl, labels, counts)
        full = metrics_from_first_and_ranks(f, ap, rp, has)
        res["map@r"], res["r_precision"] = full["map@r"], full["r_precision"]
    report["faiss"] = {"float": faiss_float, "binary": faiss_binary}

    # 3. float64 brute-force reference on a query subset ------------------------------------
    rng = np.random.default_rng(args.seed + 1)
    sub = np.sort(rng.choice(n, min(args.ref_queries, n), replace=False))
    ref = {}
    with stage("reference_float64") as info:
        for kind in ("float", "binary"):
            ref[kind] = metrics_from_first_and_ranks(*reference_ranks(x, labels, sub, binary=kind == "binary"))
        info["queries"] = int(len(sub))
    report["reference_subset"] = ref

    ours_sub, faiss_sub = {}, {}
    for kind, nl in (("float", nl_f), ("binary", nl_b)):
        per_query = ours["per_query"][kind]
        first = per_query["first_positive_rank"].astype(np.float64)
        first[first < 0] = np.inf  # beyond the largest K, or no correct match
        ours_sub[kind] = metrics_from_first_and_ranks(first[sub], per_query["average_precision"][sub],
                                                      per_query["r_precision"][sub],
                                                      per_query["num_positives"][sub] > 0)
        faiss_sub[kind] = metrics_from_first_and_ranks(*ranks_from_neighbours(nl[sub], labels[sub], counts[sub]))
    report["ours_subset"], report["faiss_subset"] = ours_sub, faiss_sub
    del nbr_f, nbr_b, nl_f, nl_b

    # 4. pytorch-metric-learning on a subset of whole classes ---------------------------------
    pml = None
    if not args.skip_pml:
        pml = run_pml(x, labels, args)
        report["pml"] = pml

    # summary ------------------------------------------------------------------------------
    t_ours = STAGES["ours"]["seconds"]
    t_faiss = sum(STAGES[s]["seconds"] for s in ("faiss_float_search", "faiss_float_walk",
                                                   "faiss_binary_search", "faiss_binary_walk"))
    diffs = {
        "ours_vs_reference": {k: max_diff(ours_sub[k], ref[k], METRICS) for k in ref},
        "faiss_vs_reference": {k: max_diff(faiss_sub[k], ref[k], METRICS) for k in ref},
        "ours_vs_faiss_full": {k: max_diff(report["ours"][k], report["faiss"][k], METRICS) for k in ref},
    }
    if pml:
        diffs["pml_vs_reference"] = pml["max_diff_pml_vs_reference"]
        diffs["ours_vs_reference_pml_subset"] = pml["max_diff_ours_vs_reference"]
    report["max_abs_difference_points"] = diffs
    report["seconds"] = {"ours_total": t_ours, "faiss_total": t_faiss, "ratio_ours_over_faiss": t_ours / t_faiss}
    report["stages"] = STAGES
    report["machine"]["load_average_end"] = os.getloadavg()

    print_summary(report)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(f"\nwrote {out}")
    return report


def run_pml(x: np.ndarray, labels: np.ndarray, args) -> dict:
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    rng = np.random.default_rng(args.seed + 2)
    classes = rng.permutation(labels.max() + 1)
    sizes = np.bincount(labels)
    take = classes[: int(np.searchsorted(np.cumsum(sizes[classes]), args.pml_images)) + 1]
    idx = np.flatnonzero(np.isin(labels, take))
    xs, ys = x[idx], labels[idx]
    xs_n = (xs / np.linalg.norm(xs, axis=1, keepdims=True)).astype(np.float32)
    calc = AccuracyCalculator(include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
                              device=torch.device("cpu"))
    with stage("pml_subset") as info:
        acc = calc.get_accuracy(torch.from_numpy(xs_n), torch.from_numpy(ys))
    info["images"] = int(len(idx))
    pml = {"recall@1": 100 * acc["precision_at_1"], "r_precision": 100 * acc["r_precision"],
           "map@r": 100 * acc["mean_average_precision_at_r"]}
    with stage("ours_pml_subset"):
        o = ev.evaluate_embeddings(xs, ys, ks=(1,), nmi=False, binary=False)["float"]
    counts = np.bincount(ys)[ys] - 1
    first, ap, rp, has = reference_ranks(xs, ys, np.arange(len(ys)), binary=False)
    r = {"recall@1": 100 * float(np.mean(first < 1)), "map@r": 100 * float(ap[has].mean()),
         "r_precision": 100 * float(rp[has].mean())}
    keys = ("recall@1", "map@r", "r_precision")
    return {"images": int(len(idx)), "classes": int(len(take)), "queries_without_positive": int((counts == 0).sum()),
            "pml": pml, "ours": {k: o[k] for k in keys}, "reference": r,
            "max_diff_pml_vs_reference": max_diff(pml, r, keys), "max_diff_ours_vs_reference": max_diff(o, r, keys),
            "seconds_pml": STAGES["pml_subset"]["seconds"], "seconds_ours": STAGES["ours_pml_subset"]["seconds"]}


def print_summary(rep: dict) -> None:
    s = rep["seconds"]
    st = rep["stages"]
    print("\n=== timings (seconds) ===")
    print(f"ours, float + binary (public API)   {s['ours_total']:8.1f}")
    for name in ("faiss_float_search", "faiss_float_walk", "faiss_binary_search", "faiss_binary_walk"):
        print(f"{name:36s}{st[name]['seconds']:8.1f}")
    print(f"faiss total (float + binary)        {s['faiss_total']:8.1f}")
    print(f"ratio ours / faiss                  {s['ratio_ours_over_faiss']:8.3f}")
    if "pml" in rep:
        p = rep["pml"]
        print(f"pytorch-metric-learning, {p['images']} images  {p['seconds_pml']:8.1f}   "
              f"(ours on the same subset: {p['seconds_ours']:.1f})")
    print("\n=== peak resident memory per stage (MB) ===")
    for name, info in st.items():
        peak = info["peak_rss_mb"]
        print(f"{name:24s} before {info['rss_before_mb']:8.0f}   peak {peak if peak is None else round(peak):>8}")
    print("\n=== metrics (percent) ===")
    head = "".join(f"{m:>12s}" for m in METRICS)
    print(f"{'':28s}{head}")
    rows = [("ours, all queries", rep["ours"]), ("faiss, all queries", rep["faiss"]),
            ("reference, subset", rep["reference_subset"]), ("ours, subset", rep["ours_subset"]),
            ("faiss, subset", rep["faiss_subset"])]
    for label, res in rows:
        for kind in ("float", "binary"):
            vals = "".join(f"{res[kind][m]:12.3f}" if res[kind].get(m) is not None else f"{'-':>12s}" for m in METRICS)
            print(f"{label + ' ' + kind:28s}{vals}")
    if "pml" in rep:
        p = rep["pml"]
        for label in ("pml", "ours", "reference"):
            r = p[label]
            print(f"{label + ' (PML subset)':28s}" + "".join(
                f"{r[m]:12.3f}" if m in r else f"{'':12s}" for m in METRICS))
    print("\n=== largest |difference| (points) ===")
    for k, v in rep["max_abs_difference_points"].items():
        print(f"{k:32s}{v}")


if __name__ == "__main__":
    main()
