"""Decisions from embeddings: held-out match thresholds, and duplicate groups at scale.

Two parts, one run:

1. **Thresholds.** For each trained run given (default: the demo's, ``demo_output/run``; also the emoji run of
   ``benchmarks/imagenet_transfer.py`` when its work folder holds one), ``normsoftmax calibrate`` on the run's
   unseen classes: the threshold chosen for precision 0.99 on one half of the classes, and the precision, recall
   and false match rate it reaches on the other half -- float cosine and the binary codes' Hamming distance.
2. **Duplicates.** Synthetic packed binary codes (512 bits, uniform) with planted groups -- copies of a code with
   a few bits flipped, so every pair inside a group lies within the Hamming radius and no pair across groups
   does -- at 100,000 and 1,000,000 items: ``normsoftmax duplicates``' pair search (multi-index hashing) and a plain
   faiss range search (``IndexBinaryFlat.range_search`` over all items, blocks of queries), each case in a process
   of its own so its peak resident memory is its own. At 1,000,000 items the exhaustive range search takes too
   long for this machine; it runs on a sample of queries and its time is scaled to all queries (stated in the
   output). Both must find exactly the planted pairs.

    .venv/bin/python benchmarks/calibration.py [--run DIR ...] [--sizes 100000 1000000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BITS = 512
SEED = 0


# ------------------------------------------------------------------------------------------ part 1: thresholds
def default_runs() -> list[Path]:
    runs = []
    demo = ROOT / "demo_output" / "run"
    if demo.is_dir():
        runs.append(demo)
    emoji = ROOT / "benchmarks" / ".work" / "imagenet_transfer" / "runs"
    if emoji.is_dir():
        runs.extend(sorted(path for path in emoji.iterdir() if (path / "config.json").is_file()
                           and "sop" in path.name and "freeze" not in path.name and "scratch" not in path.name))
    return runs


def calibrate_run(run: Path, precision: float, fmr: float | None) -> dict:
    from normsoftmax.calibration import calibrate_checkpoint
    from normsoftmax.config import CalibrateConfig

    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "calibration.json"
        document = calibrate_checkpoint(CalibrateConfig(source=str(run), target_precision=[precision],
                                                        target_fmr=[fmr] if fmr else None, out=str(out),
                                                        progress=False))
    rows = []
    for kind, calibrated in document["kinds"].items():
        for decision in calibrated["decisions"]:
            row = {"run": str(run), "kind": kind, "target": decision["target"], "images": document["images"],
                   "classes": document["classes"], "reachable": decision["reachable"]}
            if decision["reachable"]:
                row.update(threshold=decision["threshold"], hamming=decision.get("hamming"), fit=decision["fit"],
                           held_out=decision["held_out"], held_out_met=decision["held_out_met"])
            rows.append(row)
    return {"run": str(run), "split": document["split"], "seconds": document["seconds"], "rows": rows}


def threshold_table(results: list[dict]) -> str:
    lines = [("| run | kind | target | threshold (fit half) | fit precision / recall | held-out precision "
              "| held-out recall | held-out FMR | target met on the held-out half |"),
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for result in results:
        for row in result["rows"]:
            name = Path(row["run"]).name if Path(row["run"]).name != "run" else Path(row["run"]).parent.name
            if not row["reachable"]:
                lines.append(f"| {name} | {row['kind']} | {row['target']} | unreachable on the fit half | | | | | |")
                continue
            threshold = (f"cos {row['threshold']:.4f}" if row["kind"] == "float"
                         else f"Hamming {row['hamming']} (agreement {row['threshold']:.4f})")
            fit, out = row["fit"], row["held_out"]
            lines.append(f"| {name} | {row['kind']} | {row['target']} | {threshold} "
                         f"| {fit['precision']:.4f} / {fit['recall']:.4f} | {out['precision']:.4f} "
                         f"| {out['recall']:.4f} | {out['fmr']:.2e} | {'yes' if row['held_out_met'] else 'no'} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ part 2: duplicates
def planted_codes(count: int, radius: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """``count`` packed codes, 1 in 20 of them in planted groups of 2-5 (copies of a base code, each with at most
    radius // 2 bits flipped); returns the codes and each item's group (-1: none)."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (count, BITS // 8), dtype=np.uint8)
    group = np.full(count, -1, np.int64)
    position, next_group = 0, 0
    planted_items = count // 20
    order = rng.permutation(count)
    while position < planted_items:
        size = int(rng.integers(2, 6))
        members = order[position:position + size]
        position += size
        if len(members) < 2:
            break
        base = codes[members[0]].copy()
        for member in members:
            bits = np.unpackbits(base)
            flips = rng.choice(BITS, int(rng.integers(0, radius // 2 + 1)), replace=False)
            bits[flips] ^= 1
            codes[member] = np.packbits(bits)
        group[members] = next_group
        next_group += 1
    return codes, group


def planted_pairs(group: np.ndarray) -> set[tuple[int, int]]:
    pairs: set[tuple[int, int]] = set()
    members_of: dict[int, list[int]] = {}
    for item in np.flatnonzero(group >= 0):
        members_of.setdefault(int(group[item]), []).append(int(item))
    for members in members_of.values():
        pairs.update((a, b) for i, a in enumerate(members) for b in members[i + 1:])
    return pairs


def duplicates_case(count: int, method: str, radius: int, sample: int | None) -> dict:
    """One case, in this process: the pairs within ``radius`` and the groups, time and peak memory."""
    import faiss

    from eval_scale import peak_mb, reset_peak, rss_mb  # the benchmarks' one way of reading resident memory
    from normsoftmax.search.duplicates import binary_pairs_multi_index, binary_pairs_range_search, groups_of

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    codes, group = planted_codes(count, radius)
    expected = planted_pairs(group)
    before = rss_mb() or 0.0
    reset_peak()
    started = time.perf_counter()
    scaled = None
    if method == "multi-index":
        found = binary_pairs_multi_index(codes, radius)
        if found is None:
            raise SystemExit(f"radius {radius} is too wide for multi-index hashing of {BITS} bits")
    elif sample is None or sample >= count:
        found = binary_pairs_range_search(codes, radius)
    else:
        found = binary_pairs_range_search(codes, radius, queries=sample)
        scaled = count / sample
    first, second, _ = found
    groups = groups_of(count, first, second) if scaled is None else None
    seconds = time.perf_counter() - started
    peak = peak_mb()
    pairs = set(zip(first.tolist(), second.tolist(), strict=True))
    if scaled is None:
        exact = pairs == expected
    else:  # the sampled queries' pairs (each pair once, from its smaller member)
        queried = set(range(sample))
        exact = pairs == {pair for pair in expected if pair[0] in queried}
    return {"items": count, "method": method, "radius": radius, "bits": BITS, "seconds": round(seconds, 2),
            "seconds_all_queries": round(seconds * scaled, 1) if scaled else round(seconds, 2),
            "sampled_queries": sample if scaled else None, "pairs": len(pairs), "planted_pairs": len(expected),
            "groups": len(groups) if groups is not None else None, "exact": exact,
            "codes_mb": round(codes.nbytes / 2**20, 1), "rss_before_mb": round(before, 1),
            "peak_mb": round(peak, 1), "peak_above_start_mb": round(peak - before, 1)}


def run_case_subprocess(count: int, method: str, radius: int, sample: int | None) -> dict:
    command = [sys.executable, __file__, "--case", str(count), method, str(radius), str(sample or 0)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def duplicates_table(cases: list[dict]) -> str:
    lines = ["| items | method | Hamming radius | seconds | peak RSS MB (above start) | pairs found = planted |",
             "|---:|---|---:|---:|---:|---|"]
    for case in cases:
        seconds = (f"{case['seconds_all_queries']} (scaled from {case['sampled_queries']:,} queries: "
                   f"{case['seconds']})" if case["sampled_queries"] else f"{case['seconds']}")
        lines.append(f"| {case['items']:,} | {case['method']} | {case['radius']} | {seconds} "
                     f"| {case['peak_mb']} ({case['peak_above_start_mb']}) "
                     f"| {'yes' if case['exact'] else 'NO'} ({case['pairs']:,}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", nargs="*", default=None,
                        help="trained runs to calibrate (default: the demo's and the emoji run, where present; "
                             "--run alone: none)")
    parser.add_argument("--precision", type=float, default=0.99)
    parser.add_argument("--fmr", type=float, default=1e-4, help="a second target (0: none)")
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--radii", type=int, nargs="*", default=[16, 31],
                        help="Hamming radii of the duplicate search (31: the widest multi-index hashing takes at "
                             "512 bits)")
    parser.add_argument("--range-search-limit", type=int, default=200_000,
                        help="above this many items the faiss range search runs on a sample of queries")
    parser.add_argument("--range-search-sample", type=int, default=40_000)
    parser.add_argument("--json", default=None)
    parser.add_argument("--case", nargs=4, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        count, method, radius, sample = args.case
        print(json.dumps(duplicates_case(int(count), method, int(radius), int(sample) or None)))
        return

    report: dict = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                                "cpus": os.cpu_count()}, "date": time.strftime("%Y-%m-%d")}
    runs = [Path(run) for run in args.run] if args.run is not None else default_runs()
    report["thresholds"] = []
    for run in runs:
        print(f"calibrating {run} ...", flush=True)
        report["thresholds"].append(calibrate_run(run, args.precision, args.fmr or None))
    if report["thresholds"]:
        print(threshold_table(report["thresholds"]))
    else:
        print("no trained run to calibrate (run `bash scripts/demo.sh` first, or pass --run)")
    report["duplicates"] = []
    for count in args.sizes:
        for radius in args.radii:
            sample = args.range_search_sample if count > args.range_search_limit else None
            for method in ("multi-index", "faiss range search"):
                print(f"duplicates: {count:,} codes, radius {radius}, {method} ...", flush=True)
                case = run_case_subprocess(count, "multi-index" if method == "multi-index" else "range-search",
                                           radius, sample if method != "multi-index" else None)
                report["duplicates"].append(case)
                print(json.dumps(case), flush=True)
    print(duplicates_table(report["duplicates"]))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
