"""End-to-end training throughput: the reference recipe against this package's defaults and each option alone.

ResNet50 at 224x224, batch 75 (3 classes x 25 images, class-balanced), normalized softmax, SGD: images per
second of data loading + forward + backward + step, after warm-up steps, on generated photo-like JPEGs of
CUB's typical size (500x375), all in one run:

* ``reference``      float32, NCHW, PIL decode -> Resize((256, 256)) -> RandomCrop(224) -> flip, the reference
                     script's loader (4 workers, pinned memory, workers restarted every epoch);
* ``+bf16``, ``+channels_last``, ``+cache`` (the uint8 pre-resized cache), ``+compile`` (``torch.compile``):
                     the reference with one option changed;
* ``+bf16+channels_last`` both, as measured by hand on an AMX machine (FINDINGS: 3.1x there);
* ``defaults``       what ``normsoftmax train`` does on this device (``--amp auto``: bf16 on GPUs, on CPUs
                     with AMX, and where the bf16 probe finds it 1.5x faster, else float32; channels_last;
                     persistent loader workers, one per available core; the loss read every 10 steps),
                     decoding JPEGs;
* ``defaults+cache``, ``defaults+compile``, ``defaults+cache+compile``: with the image cache
                     (``normsoftmax prepare --cache`` makes it) and/or ``--compile``.

Also the share of step time spent waiting for data. Prints a table and the ratio of the defaults to the
reference; writes JSON.

    python benchmarks/train_throughput.py                   # CPU
    python benchmarks/train_throughput.py --device cuda     # a GPU, larger measurement
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from datapath import photo_like  # noqa: E402
from normsoftmax.data.cache import array_train_transform, find_cache  # noqa: E402
from normsoftmax.data.images import ImageDataset, ImageTransformConfig, collate_skipping, train_transform  # noqa: E402
from normsoftmax.data.records import DatasetRecords, ImageSet  # noqa: E402
from normsoftmax.data.sampler import ClassBalancedBatchSampler, SeededBatches  # noqa: E402
from normsoftmax.loss import NormSoftmaxLoss  # noqa: E402
from normsoftmax.model import create_embedder  # noqa: E402
from normsoftmax.prepare.cache import build_cache  # noqa: E402
from normsoftmax.runtime import autocast, loader_settings, loader_workers, resolve_amp, resolve_device  # noqa: E402


@dataclass
class Setting:
    name: str
    amp: str = "none"
    channels_last: bool = False
    cache: bool = False
    compile: bool = False
    workers: int = 4
    persistent: bool = False
    read_every: int = 1  # loss.item() every N steps


def settings(device: torch.device) -> list[Setting]:
    native = resolve_amp("auto", device)
    defaults = dict(amp=native, channels_last=True, workers=loader_workers(-1), persistent=True, read_every=10)
    return [
        Setting("reference"),
        Setting("+bf16", amp="bf16"),
        Setting("+channels_last", channels_last=True),
        Setting("+cache", cache=True),
        Setting("+compile", compile=True),
        Setting("+bf16+channels_last", amp="bf16", channels_last=True),
        Setting("defaults", **defaults),
        Setting("defaults+cache", cache=True, **defaults),
        Setting("defaults+compile", compile=True, **defaults),
        Setting("defaults+cache+compile", cache=True, compile=True, **defaults),
    ]


def make_images(folder: Path, classes: int, per_class: int) -> DatasetRecords:
    paths, labels = [], []
    for c in range(classes):
        (folder / f"c{c:02d}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = folder / f"c{c:02d}" / f"{i:03d}.jpg"
            if not path.exists():
                photo_like(500, 375, seed=c * 1000 + i).save(path, quality=90)
            paths.append(str(path))
            labels.append(c)
    train = ImageSet(paths, labels, [f"c{c:02d}" for c in range(classes)])
    return DatasetRecords("throughput", str(folder), train, test=train)


def measure(setting: Setting, records: DatasetRecords, device: torch.device, warmup: int, steps: int) -> dict:
    transform_config = ImageTransformConfig()
    cache = find_cache(records, transform_config) if setting.cache else None
    transform = array_train_transform(transform_config) if cache is not None else train_transform(transform_config)
    dataset = ImageDataset(records.train.paths, records.train.labels, transform, cache=cache)
    sampler = ClassBalancedBatchSampler(records.train.labels, 75, 25, seed=0)
    total = warmup + steps
    loader_kwargs = loader_settings(device, setting.workers, persistent=setting.persistent)
    loader_kwargs["pin_memory"] = device.type == "cuda"
    torch.manual_seed(0)
    model = create_embedder("resnet50", 2048, weights="none").to(device)
    criterion = NormSoftmaxLoss(records.train.num_classes, 2048).to(device)
    if setting.channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if setting.compile else model
    optimizer = torch.optim.SGD(list(model.parameters()) + list(criterion.parameters()), lr=0.01, momentum=0.9,
                                weight_decay=1e-4)
    model.train()
    step_times, waits, done = [], [], 0
    loss_sum = torch.zeros((), device=device)
    epoch = 0
    while done < total:
        batches = SeededBatches(sampler, 0, epoch)
        sampler.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate_skipping,
                                             **loader_kwargs)
        iterator = iter(loader)
        while done < total:
            started = time.perf_counter()
            try:
                images, labels, _ = next(iterator)
            except StopIteration:
                break
            waited = time.perf_counter() - started
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if setting.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(device, setting.amp):
                loss = criterion(forward(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            if (done + 1) % setting.read_every == 0 or done + 1 == total:
                float(loss_sum)  # the host waits for the device here, as the training loop does
            if device.type == "cuda":
                torch.cuda.synchronize()
            done += 1
            if done > warmup:
                step_times.append(time.perf_counter() - started)
                waits.append(waited)
        del iterator, loader
        epoch += 1
    seconds = float(np.sum(step_times))
    return {"images_per_second": 75 * len(step_times) / seconds, "seconds_per_step": seconds / len(step_times),
            "data_wait_share": float(np.sum(waits)) / seconds, "measured_steps": len(step_times),
            "cache": cache is not None, "amp": setting.amp, "channels_last": setting.channels_last,
            "compile": setting.compile, "workers": setting.workers, "persistent_workers": setting.persistent}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--warmup", type=int, default=None, help="steps before timing (default 2 CPU, 10 GPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 4 CPU, 40 GPU)")
    parser.add_argument("--only", default=None, help="comma-separated setting names")
    parser.add_argument("--workdir", default=None, help="keep the generated JPEGs (and cache) here")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "train_throughput.json"))
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    warmup = args.warmup if args.warmup is not None else (10 if gpu else 2)
    steps = args.steps if args.steps is not None else (40 if gpu else 4)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="throughput-"))
    records = make_images(workdir / "images", classes=12, per_class=25)
    build_cache(records, ImageTransformConfig(), progress=False)
    report = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if gpu else platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
              "warmup": warmup, "steps": steps, "load_average_start": os.getloadavg(), "results": {}}
    chosen = settings(device)
    if args.only:
        chosen = [s for s in chosen if s.name in args.only.split(",")]
    for setting in chosen:
        try:
            result = measure(setting, records, device, warmup + (3 if setting.compile else 0), steps)
        except Exception as error:  # torch.compile may be unavailable (no compiler): report, keep going
            result = {"error": f"{type(error).__name__}: {error}"[:500]}
        report["results"][setting.name] = result
        line = f"{setting.name:16s} " + (f"{result['images_per_second']:7.2f} images/s   data wait "
                                          f"{100 * result['data_wait_share']:5.1f}%" if "error" not in result
                                          else result["error"])
        print(line, flush=True)
    results = report["results"]
    if "reference" in results and "defaults" in results and "error" not in results["defaults"]:
        base = results["reference"]["images_per_second"]
        report["ratio_over_reference"] = {name: r["images_per_second"] / base for name, r in results.items()
                                          if "error" not in r}
        ratios = report["ratio_over_reference"]
        print(f"defaults / reference: {ratios['defaults']:.2f}x; "
              f"defaults+cache / reference: {ratios.get('defaults+cache', 0):.2f}x")
    report["load_average_end"] = os.getloadavg()
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
