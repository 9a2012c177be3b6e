"""The evaluator on a GPU against the CPU at Stanford Online Products scale: same metrics, time.

60,502 x 2048 clustered embeddings in 11,316 classes (``eval_scale.make_sop_like``), float and binary,
Recall@1, 10, 100, 1000, MAP@R, R-precision; each device once after a small warm-up. Writes JSON.

    python benchmarks/eval_device.py --device cuda [--scale 1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from eval_scale import make_sop_like  # noqa: E402
from normsoftmax.evaluation.metrics import evaluate_embeddings  # noqa: E402


def timed(x, labels, device: str) -> tuple[dict, float]:
    tensor = torch.from_numpy(x).to(device)
    evaluate_embeddings(tensor[:2000], labels[:2000], ks=(1, 10), nmi=False)  # warm-up: kernels, allocator
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = evaluate_embeddings(tensor, labels, ks=(1, 10, 100, 1000), nmi=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return result, time.perf_counter() - started


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "eval_device.json"))
    args = parser.parse_args(argv)
    x, labels = make_sop_like(args.scale)
    device_result, device_seconds = timed(x, labels, args.device)
    cpu_result, cpu_seconds = timed(x, labels, "cpu")
    same = all(device_result[kind] == cpu_result[kind] for kind in ("float", "binary"))
    report = {"shape": list(x.shape), "classes": int(labels.max() + 1), "device": args.device,
              "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "cpu_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "seconds": {args.device: device_seconds, "cpu": cpu_seconds}, "same_metrics": same,
              "metrics": {args.device: {k: device_result[k] for k in ("float", "binary")},
                          "cpu": {k: cpu_result[k] for k in ("float", "binary")}}}
    print(json.dumps({"seconds": report["seconds"], "same_metrics": same}, indent=1))
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
