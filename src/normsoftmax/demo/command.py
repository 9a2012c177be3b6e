"""The embedded demo: glyph images generated on the spot, trained from scratch on the CPU.

The demo follows the benchmarks' protocol exactly: the glyph dataset is written
in the folder layout, the first half of the classes trains, retrieval is
evaluated on the unseen half. It reports three embeddings side by side so a
user sees what training bought: raw pixels, the same network untrained, and
the trained network.

The training recipe differs from the paper's on purpose. The paper fine-tunes
ImageNet weights with SGD; from random initialisation on a CPU budget, SGD did
not learn in the time available (FINDINGS.md: R@1 0.6 after 12 epochs), while
AdamW with cosine decay reached R@1 about 72. Horizontal flips are off because
mirrored glyphs are different characters.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import DemoConfig
from ..data.custom import load_folder
from ..data.images import ImageTransformConfig, load_rgb
from ..evaluation import evaluate_embeddings, evaluate_model, recall_report
from ..files import atomic_write
from ..model import create_embedder
from ..runtime import loader_workers, resolve_amp, resolve_device, shell_command
from ..training import train_embedder
from .common import DEMO_KS, demo_train_config, results_table
from .glyphs import generate_glyph_dataset
from .transfer import run_transfer_demo

logger = logging.getLogger(__name__)

def raw_pixel_embeddings(paths: list[str], size: int) -> np.ndarray:
    """Flattened pixels, centred on their mean so that cosine similarity and sign bits are meaningful."""
    pixels = np.stack([np.asarray(load_rgb(p).resize((size, size)), dtype=np.float32).ravel() / 255.0 for p in paths])
    return pixels - pixels.mean(axis=0, keepdims=True)


def run_demo(config: DemoConfig) -> dict:
    """Generate (or reuse) the glyphs, evaluate raw pixels and the untrained net, train, evaluate; write results.json.

    ``config.transfer`` runs the transfer demo instead (:mod:`normsoftmax.demo.transfer`).
    """
    if config.transfer:
        return run_transfer_demo(config)
    started = time.perf_counter()
    output = Path(config.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    glyph_root = generate_glyph_dataset(output / "glyphs", num_classes=config.num_classes,
                                        images_per_class=config.images_per_class, image_size=config.image_size,
                                        seed=config.seed, progress=config.progress)
    records = load_folder(glyph_root)
    unseen = records.split("test")
    run_dir = set_aside(output / "run")
    train_config = demo_train_config(config, glyph_root, run_dir)
    device = resolve_device(config.device)
    transform_config = ImageTransformConfig.of(train_config)

    results: dict[str, Any] = {}
    results["raw_pixels"] = evaluate_embeddings(raw_pixel_embeddings(unseen.paths, config.image_size), unseen.labels,
                                                ks=DEMO_KS, nmi=True)
    torch.manual_seed(config.seed)
    untrained = create_embedder(train_config.model_name, train_config.dim, weights="none").to(device)
    untrained = untrained.to(memory_format=torch.channels_last)
    results["untrained"], _ = evaluate_model(untrained, records, transform_config, DEMO_KS, 128, device,
                                             loader_workers(config.workers), resolve_amp("auto", device), True,
                                             nmi=True)
    summary = train_embedder(train_config)
    results["trained"] = summary["last"]
    index_dir = build_gallery_index(config, run_dir, glyph_root, output)

    document = {**results, "seconds": round(time.perf_counter() - started, 1), "run_dir": str(run_dir),
                "index": str(index_dir), "dataset": str(glyph_root), "config": asdict(config),
                "counts": records.counts()}
    atomic_write(output / "results.json", json.dumps(document, indent=2) + "\n")
    print()
    print(f"Retrieval on {unseen.num_classes} glyph classes never seen in training "
          f"({len(unseen)} images; leave-one-out, cosine / Hamming):")
    print(results_table({"raw pixels": results["raw_pixels"], "untrained": results["untrained"],
                         "trained": results["trained"]}))
    print()
    for line in recall_report(results["trained"]):
        print(f"trained {line}")
    print(f"\nresults: {output / 'results.json'}   (run directory {run_dir}, {document['seconds']:.0f} s in all)")
    print(f"\nThe {len(unseen)} unseen glyphs are indexed in {index_dir}. Search them in a browser:\n"
          f"  {shell_command('serve', run_dir.resolve(), index_dir.resolve())}\n  then open http://127.0.0.1:8000/")
    return document


def set_aside(folder: Path) -> Path:
    """``folder``, with what an earlier demo left there renamed beside it (never overwritten)."""
    if folder.exists() and any(folder.iterdir()):
        stamp, suffix = time.strftime("%Y%m%d-%H%M%S"), 1
        while folder.with_name(f"{folder.name}-{stamp}-{suffix}").exists():
            suffix += 1
        folder.rename(folder.with_name(f"{folder.name}-{stamp}-{suffix}"))
    return folder


def build_gallery_index(config: DemoConfig, run_dir: Path, glyph_root: Path, output: Path) -> Path:
    """Embed the unseen classes with the trained model and index them (exact cosine and binary codes)."""
    from ..calibration import calibrate_checkpoint
    from ..config import CalibrateConfig, EmbedConfig, IndexBuildConfig
    from ..embedding import embed_files
    from ..search import build_index

    embeddings = output / "gallery.npz"
    embeddings.unlink(missing_ok=True)  # the previous demo's model: never mixed with this one's
    embed_files(EmbedConfig(checkpoint=str(run_dir), dataset="folder", dataset_root=str(glyph_root), split="test",
                            out=str(embeddings), device=config.device, workers=config.workers,
                            progress=config.progress))
    # Match thresholds from the same unseen classes (fitted on half of them, measured on the other half), written
    # into the run, so the index carries them and the page marks matches from the start.
    try:
        # FMR 1e-4 applied: with 100 classes a half, 1 pair in 200 is genuine, and pair precision 0.99 is reached
        # only at the very top of the scores (recorded too; `normsoftmax calibrate` defaults to it)
        calibration = calibrate_checkpoint(CalibrateConfig(source=str(embeddings), target_fmr=[1e-4],
                                                           target_precision=[0.99], apply="fmr",
                                                           out=str(run_dir / "calibration.json"), progress=False))
    except ValueError as error:  # too few unseen classes to split in two
        logger.warning("no match thresholds: %s", error)
        calibration = {"kinds": {}}
    for kind, calibrated in calibration["kinds"].items():
        for decision in calibrated["decisions"]:
            if decision["reachable"]:
                held_out = decision["held_out"]
                applied = " (applied)" if decision["target"] == calibration["default"] else ""
                print(f"match threshold, {kind}, {decision['target']} on half of the unseen classes{applied}: "
                      f"{decision['threshold']:.4f}; on the other half precision {held_out['precision']:.4f}, "
                      f"recall {held_out['recall']:.4f}, FMR {held_out['fmr']:.1e}")
    index_dir = set_aside(output / "index")
    build_index(IndexBuildConfig(embeddings=str(embeddings), out=str(index_dir), kind="flat"))  # the run's thresholds
    return index_dir
