"""Evaluation of crowded embeddings (an untrained network: every cosine within a few hundredths).

bf16 tiles leave almost every pair inside their error bound, to be re-scored in float64; the evaluator
detects this from a sample of queries and uses float64 tiles instead. This script measures both, side by
side in one process (the forced-bf16 run at a size that still fits in memory):

    .venv/bin/python benchmarks/eval_crowded.py --n 20000 --bf16-n 5000
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import torch

import normsoftmax.evaluation.metrics as evaluate_module
from normsoftmax.evaluation.metrics import evaluate_embeddings


def crowded(n: int, dim: int, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=dim) + 0.05 * rng.normal(size=(n, dim))
    return x.astype(np.float32), np.repeat(np.arange(n // per_class + 1), per_class)[:n]


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(x, y, binary: bool) -> dict:
    started = time.perf_counter()
    result = evaluate_embeddings(x, y, nmi=False, binary=binary)
    return {"seconds": round(time.perf_counter() - started, 2), "peak_rss_mb_so_far": round(peak_mb()),
            "recall@1": result["float"]["recall@1"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--bf16-n", type=int, default=5000, help="size for the forced-bf16 comparison (0: skip)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--per-class", type=int, default=5)
    parser.add_argument("--json", default="benchmarks/eval_crowded.json")
    args = parser.parse_args()
    report = {}
    x, y = crowded(args.n, args.dim, args.per_class, 0)
    # first, so that the peak-memory high-water mark is this run's own
    report[f"auto_n{args.n}_float_and_binary"] = timed(x, y, binary=True)
    if args.bf16_n:
        x, y = crowded(args.bf16_n, args.dim, args.per_class, 0)
        report[f"auto_n{args.bf16_n}_float"] = timed(x, y, binary=False)
        original = evaluate_module._crowded
        evaluate_module._crowded = lambda *a, **k: False  # force the bf16 tiles
        try:
            report[f"bf16_n{args.bf16_n}_float"] = timed(x, y, binary=False)
        finally:
            evaluate_module._crowded = original
    report["threads"] = torch.get_num_threads()
    for name, row in report.items():
        print(f"{name:<32} {row}")
    with open(args.json, "w") as handle:
        json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
