"""``normsoftmax calibrate``: a trained model's match thresholds, from labelled images it never trained on.

The source is a run directory (or checkpoint) -- its dataset's evaluated split is embedded with the run's transform
and precision, as its evaluations were -- or an embeddings file with labels. The result, ``calibration.json``,
names the model (its weights' digest), so an index and the service can refuse thresholds made for another model.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from ..checkpoint import find_checkpoint, load_embedder, run_config_of
from ..config import CalibrateConfig, default_dataset_root
from ..data.images import ImageTransformConfig
from ..data.registry import load_dataset
from ..embedding.embed import embed_dataset, eval_dataset, run_amp
from ..embedding.files import read_embeddings
from ..files import atomic_write
from ..runtime import loader_workers, resolve_device
from .thresholds import Target, calibrate_thresholds

logger = logging.getLogger(__name__)

CALIBRATION_NAME = "calibration.json"
CALIBRATION_FORMAT = 1


def calibrate_checkpoint(config: CalibrateConfig) -> dict:
    """Calibrate the model of ``config.source`` and write its ``calibration.json``; returns what was written."""
    if not config.source:
        raise ValueError("calibrate needs a run directory, a checkpoint or an embeddings file with labels")
    targets = [Target("precision", p) for p in config.target_precision or []] + \
              [Target("fmr", f) for f in config.target_fmr or []]
    if not targets:
        targets = [Target("precision", 0.99)]
    applied = next((target for target in targets if target.metric == config.apply), None) if config.apply \
        else targets[0]
    if applied is None:
        raise ValueError(f"--apply {config.apply}: no {config.apply} target was given")
    source = Path(config.source).expanduser()
    started = time.perf_counter()
    if source.suffix == ".npz":
        embeddings, labels, described, model = _from_file(source)
        out = Path(config.out) if config.out else source.with_suffix(".calibration.json")
    else:
        embeddings, labels, described, model = _from_run(source, config)
        run_dir = _run_dir_of(find_checkpoint(source))
        out = Path(config.out) if config.out else run_dir / CALIBRATION_NAME
    kinds = ("float", "binary") if config.binary else ("float",)
    result = calibrate_thresholds(embeddings, labels, targets, kinds=kinds, seed=config.seed)
    document = {"format": CALIBRATION_FORMAT, "model": model, "source": described,
                "images": int(len(labels)), "classes": int(len(np.unique(labels))),
                "targets": [target.name for target in targets], "default": applied.name, **result,
                "seconds": round(time.perf_counter() - started, 1), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write(out, json.dumps(document, indent=2) + "\n", durable=True)
    document["path"] = str(out)
    return document


def _run_dir_of(checkpoint: Path) -> Path:
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def _from_run(source: Path, config: CalibrateConfig):
    device = resolve_device(config.device)
    model = load_embedder(source, device)
    run = run_config_of(model)
    name = config.dataset or run.dataset
    root = config.dataset_root or (run.dataset_root if not config.dataset else None) or default_dataset_root(name)
    records = load_dataset(name, root)
    split_name = config.split or ("test" if records.test is not None else "gallery")
    split = records.split(split_name)
    transform = ImageTransformConfig.of(run)
    dataset = eval_dataset(split.paths, split.labels, transform, decode=records.decode)
    embeddings = embed_dataset(model, dataset, config.batch_size, device, loader_workers(config.workers),
                               run_amp(model, "auto", device), run.channels_last, config.progress,
                               description=f"embedding {split_name}")
    described = {"kind": "dataset", "dataset": records.name, "root": str(records.root), "split": split_name}
    return embeddings, split.labels, described, {"digest": model.digest, "checkpoint": model.checkpoint}


def _from_file(source: Path):
    data = read_embeddings(source)
    if data.labels is None:
        raise ValueError(f"{source}: holds no labels; calibration needs to know which images show the same thing "
                         f"(embed a dataset split, or a CSV with a label column)")
    model = data.metadata.get("model") or {}
    described = {"kind": "embeddings", "file": str(source.resolve())}
    return data.embeddings, data.labels, described, {"digest": model.get("digest"),
                                                      "checkpoint": model.get("checkpoint")}


def read_calibration(path: str | Path, digest: str | None = None) -> dict:
    """A ``calibration.json``; refused (ValueError) when ``digest`` is given and the file is another model's."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot be read as a calibration ({error})") from None
    if not isinstance(document, dict) or document.get("format") != CALIBRATION_FORMAT or "kinds" not in document:
        raise ValueError(f"{path}: not a normsoftmax calibration (format {CALIBRATION_FORMAT})")
    theirs = (document.get("model") or {}).get("digest")
    if digest is not None and theirs != digest:
        raise ValueError(f"{path} calibrates model {str(theirs)[:16]}, not model {digest[:16]}: thresholds of "
                         f"another model mean nothing here; run `normsoftmax calibrate` on this model's run")
    return document


def decisions_of(document: dict, path: str | None = None) -> dict:
    """What an index carries and the service applies: per kind, the default target's threshold."""
    carried: dict = {"digest": (document.get("model") or {}).get("digest"), "file": path,
                     "target": document.get("default")}
    for kind, calibrated in document["kinds"].items():
        decision = next((d for d in calibrated["decisions"] if d["target"] == document.get("default")),
                        calibrated["decisions"][0])
        if decision.get("reachable"):
            carried[kind] = {"threshold": decision["threshold"], "target": decision["target"],
                             "held_out": decision["held_out"], **({"hamming": decision["hamming"]}
                                                                  if "hamming" in decision else {})}
    return carried


def read_decisions(path: str | Path, digest: str | None) -> dict:
    """What an index carries from a given ``calibration.json`` of the model ``digest`` (another model's: refused)."""
    return decisions_of(read_calibration(path, digest), str(Path(path).resolve()))


def run_calibration_for(checkpoint: str | None, digest: str | None) -> dict | None:
    """The calibration of the run a checkpoint belongs to, when that run has one for the same model."""
    if not checkpoint:
        return None
    try:
        run_dir = _run_dir_of(find_checkpoint(checkpoint))
    except FileNotFoundError:
        return None
    file = run_dir / CALIBRATION_NAME
    if not file.is_file():
        return None
    document = read_calibration(file)
    if (document.get("model") or {}).get("digest") != digest:
        logger.info("%s calibrates another checkpoint of the run; not used", file)
        return None
    return decisions_of(document, str(file))


__all__ = ["calibrate_checkpoint", "read_calibration", "decisions_of", "read_decisions", "run_calibration_for",
           "CALIBRATION_NAME"]
