"""Training input path per core: decoding JPEGs every epoch vs cropping from the pre-resized image cache.

Both paths produce the recipe's training tensor (3x224x224, random crop, flip, ImageNet normalisation):

- decode:  load_rgb(path) -> Resize((256, 256)) -> RandomCrop(224) -> flip -> ToTensor -> Normalize
           (``normsoftmax.data.images.train_transform``)
- cache:   ImageCache.read(path) (a view of the memory map) -> array_train_transform
           (``normsoftmax.data.cache``)

on generated photo-like JPEGs of CUB's typical size (500x375, quality 90), in one process with
torch.set_num_threads(1); rates are images per CPU-second of that one thread (per core; wall-clock
rates are reported too). Rounds alternate the two paths and the median is reported. Usage:

    python benchmarks/datapath.py [--images 300] [--rounds 3] [--out benchmarks/datapath.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from normsoftmax.data.cache import array_train_transform, find_cache
from normsoftmax.data.images import ImageTransformConfig, load_rgb, train_transform
from normsoftmax.data.records import DatasetRecords, ImageSet
from normsoftmax.prepare.cache import build_cache


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colour fields at several scales, a few sharp-edged shapes and sensor-like noise."""
    rng = np.random.default_rng(seed)
    canvas = np.zeros((height, width, 3))
    for cells, weight in [((3, 4), 1.0), ((12, 16), 0.5), ((48, 64), 0.25)]:
        coarse = rng.uniform(0, 255, size=(*cells, 3)).astype(np.uint8)
        canvas += weight * np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float64)
    canvas /= 1.75
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(3, 8)):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 150))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    pixels = np.asarray(image, dtype=np.float64) + rng.normal(0, 6, size=(height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def timed_pass(paths, step) -> tuple[float, float]:
    """(images per CPU-second of this process, images per wall-clock second).

    The process runs one thread, so CPU time is the time of one core; it stays meaningful when other
    work shares the machine, where the wall-clock rate drops.
    """
    cpu, wall = time.process_time(), time.perf_counter()
    for path in paths:
        step(path)
    return len(paths) / (time.process_time() - cpu), len(paths) / (time.perf_counter() - wall)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating measurement rounds per path (median reported)")
    parser.add_argument("--out", default=str(Path(__file__).with_name("datapath.json")))
    parser.add_argument("--workdir", default=None, help="keep the generated images here instead of a temporary folder")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    config = ImageTransformConfig()  # Resize((256, 256)), crop 224: the recipe
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(args.workdir or temporary)
        (root / "images").mkdir(parents=True, exist_ok=True)
        paths = []
        for k in range(args.images):
            path = root / "images" / f"{k:05d}.jpg"
            if not path.exists():
                photo_like(500, 375, k).save(path, quality=90)
            paths.append(str(path))
        jpeg_kib = statistics.mean(os.path.getsize(p) for p in paths) / 1024
        records = DatasetRecords("datapath", str(root), ImageSet(paths, np.arange(len(paths)) % 2, ["a", "b"]),
                                 test=ImageSet(paths[:2], [0, 1], ["a", "b"]))

        started = time.perf_counter()
        build_cache(records, config, workers=1, progress=False)
        build_rate = len(paths) / (time.perf_counter() - started)
        cache = find_cache(records, config)
        assert cache is not None

        decode_transform = train_transform(config)
        array_transform = array_train_transform(config)

        def decode_step(path):
            return decode_transform(load_rgb(path))

        def cache_step(path):
            return array_transform(cache.read(path))

        # Same output either way: a normalised 3x224x224 float tensor.
        assert decode_step(paths[0]).shape == cache_step(paths[0]).shape == (3, 224, 224)
        timed_pass(paths[:50], decode_step)  # warm-up: page cache, allocator, lazy imports
        timed_pass(paths, cache_step)
        decode_runs, cache_runs = [], []
        for _ in range(args.rounds):
            decode_runs.append(timed_pass(paths, decode_step))
            cache_runs.append(timed_pass(paths, cache_step))

    decode_rates, cache_rates = [r[0] for r in decode_runs], [r[0] for r in cache_runs]
    decode, cached = statistics.median(decode_rates), statistics.median(cache_rates)
    decode_wall, cached_wall = statistics.median(r[1] for r in decode_runs), statistics.median(r[1] for r in cache_runs)
    result = {
        "benchmark": "datapath",
        "command": "python benchmarks/datapath.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "images": len(paths), "image_size": [500, 375], "jpeg_quality": 90, "mean_jpeg_kib": round(jpeg_kib, 1),
        "threads": torch.get_num_threads(), "rounds": args.rounds,
        "decode_img_per_s_per_core": round(decode, 1),
        "cache_img_per_s_per_core": round(cached, 1),
        "ratio": round(cached / decode, 2),
        "decode_rounds": [round(r, 1) for r in decode_rates], "cache_rounds": [round(r, 1) for r in cache_rates],
        "rate_basis": "images per CPU-second of the single-threaded process",
        "decode_img_per_wall_s": round(decode_wall, 1), "cache_img_per_wall_s": round(cached_wall, 1),
        "load_average": list(os.getloadavg()),
        "cache_build_img_per_s_one_process": round(build_rate, 1),
        "cache_bytes_per_image": 256 * 256 * 3,
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    print(f"decode -> Resize -> RandomCrop -> flip -> normalise : {decode:8.1f} img/s per core")
    print(f"cache read -> crop -> flip -> normalise           : {cached:8.1f} img/s per core")
    print(f"ratio                                              : {cached / decode:8.2f}x")
    print(f"(wall clock: {decode_wall:.1f} vs {cached_wall:.1f} img/s; load average {os.getloadavg()[0]:.2f})")
    print(f"(building the cache: {build_rate:.1f} img/s in one process; mean JPEG {jpeg_kib:.1f} KiB)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
