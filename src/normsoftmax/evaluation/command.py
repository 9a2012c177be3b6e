"""The ``evaluate`` command: a checkpoint (or saved embeddings) and a dataset -> the evaluation object."""

from __future__ import annotations

import json

import numpy as np

from ..checkpoint import load_embedder, run_config_of
from ..config import EvaluateConfig, default_dataset_root, recall_ks, required
from ..data.cache import find_cache
from ..data.images import ImageTransformConfig, verify_images
from ..data.registry import load_dataset
from ..embedding.files import load_embeddings_npz, save_embeddings_npz
from ..files import atomic_write
from ..runtime import loader_workers, resolve_device
from .metrics import evaluate_embeddings, nmi_by_default
from .protocol import evaluate_model


def evaluate_checkpoint(config: EvaluateConfig) -> dict:
    """Evaluate ``config.checkpoint`` on its dataset (or ``config.embeddings``); returns the evaluation object."""
    if bool(config.checkpoint) == bool(config.embeddings):
        raise ValueError("give either a checkpoint (or run directory) or --embeddings FILE.npz")
    if config.embeddings and config.save_embeddings:
        raise ValueError("--save-embeddings needs a checkpoint; the embeddings are already saved")
    result = _evaluate_saved(config) if config.embeddings else _evaluate_model_of(config)
    if config.output_json:
        atomic_write(config.output_json, json.dumps(result, indent=2) + "\n")
    return result


def _evaluate_saved(config: EvaluateConfig) -> dict:
    arrays = load_embeddings_npz(required(config.embeddings, "an embeddings file"))
    arrays = {key: value for key, value in arrays.items() if not key.endswith("paths")}
    labels = arrays["labels"] if "labels" in arrays else arrays["query_labels"]
    nmi = config.nmi if config.nmi is not None else nmi_by_default(len(np.unique(labels)))
    return evaluate_embeddings(**arrays, ks=config.ks or [1, 2, 4, 8], binary=config.binary, nmi=nmi)


def _evaluate_model_of(config: EvaluateConfig) -> dict:
    device = resolve_device(config.device)
    model = load_embedder(required(config.checkpoint, "a checkpoint or run directory"), device)
    train_config = run_config_of(model)
    if config.dataset:
        train_config.dataset = config.dataset
        train_config.dataset_root = config.dataset_root
    elif config.dataset_root:
        train_config.dataset_root = config.dataset_root
    records = load_dataset(train_config.dataset,
                           train_config.dataset_root or default_dataset_root(train_config.dataset))
    evaluated = records.splits()
    evaluated.pop("train")
    verify_images([path for split in evaluated.values() for path in split.paths],
                  workers=loader_workers(config.workers))
    transform = ImageTransformConfig.of(train_config)
    cache = find_cache(records, transform) if config.use_cache else None
    ks = config.ks or recall_ks(train_config.dataset)
    result, embeddings = evaluate_model(model, records, transform, ks, config.batch_size, device,
                                        loader_workers(config.workers), config.amp, train_config.channels_last,
                                        config.nmi, cache, progress=config.progress, binary=config.binary)
    if result is None or embeddings is None:  # only under torchrun, on ranks other than 0
        raise RuntimeError("evaluate runs in one process")
    if config.save_embeddings:
        if records.query_gallery:
            query, gallery = records.split("query"), records.split("gallery")
            save_embeddings_npz(config.save_embeddings, query_embeddings=embeddings["query"], query_labels=query.labels,
                                gallery_embeddings=embeddings["gallery"], gallery_labels=gallery.labels,
                                query_paths=query.paths, gallery_paths=gallery.paths)
        else:
            test = records.split("test")
            save_embeddings_npz(config.save_embeddings, embeddings=embeddings["test"], labels=test.labels,
                                paths=test.paths)
    return result
