"""The ``evaluate`` command's API: a checkpoint (or saved embeddings) and a dataset -> the evaluation object."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .config import RECALL_KS, EvaluateConfig
from .data.benchmarks import canonical_dataset_name, load_dataset
from .data.images import verify_images
from .embed import resolve_device, resolve_workers
from .evaluate import evaluate_embeddings, load_embeddings_npz, save_embeddings_npz
from .training import default_dataset_root, image_transform, open_cache, recall_report, embedder_from_checkpoint, evaluate_model, load_checkpoint


def _evaluate_saved(config: EvaluateConfig) -> dict:
    arrays = load_embeddings_npz(config.embeddings)
    arrays = {key: value for key, value in arrays.items() if not key.endswith("paths")}
    labels = arrays.get("labels", arrays.get("query_labels"))
    nmi = config.nmi if config.nmi is not None else len(np.unique(labels)) <= 1000
    return evaluate_embeddings(**arrays, ks=config.ks or [1, 2, 4, 8], binary=config.binary, nmi=nmi)


def _evaluate_checkpoint(config: EvaluateConfig) -> dict:
    state = load_checkpoint(config.checkpoint)
    model, train_config = embedder_from_checkpoint(state)
    if config.dataset:
        train_config.dataset = config.dataset
        train_config.dataset_root = config.dataset_root
    elif config.dataset_root:
        train_config.dataset_root = config.dataset_root
    records = load_dataset(train_config.dataset, default_dataset_root(train_config))
    evaluated = records.splits()
    evaluated.pop("train")
    verify_images([path for split in evaluated.values() for path in split.paths], workers=resolve_workers(config.workers))
    transform_config = image_transform(train_config)
    cache = open_cache(records, transform_config, config.use_cache)
    device = resolve_device(config.device)
    model.to(device)
    if train_config.channels_last:
        import torch

        model.to(memory_format=torch.channels_last)
    ks = config.ks or RECALL_KS[canonical_dataset_name(train_config.dataset)]
    result, embeddings = evaluate_model(model, records, transform_config, ks, config.batch_size, device,
                                        resolve_workers(config.workers), config.amp, train_config.channels_last,
                                        config.nmi, cache, progress=config.progress, binary=config.binary)
    if config.save_embeddings:
        if records.query_gallery:
            save_embeddings_npz(config.save_embeddings, query_embeddings=embeddings["query"], query_labels=records.query.labels,
                                gallery_embeddings=embeddings["gallery"], gallery_labels=records.gallery.labels,
                                query_paths=records.query.paths, gallery_paths=records.gallery.paths)
        else:
            save_embeddings_npz(config.save_embeddings, embeddings=embeddings["test"], labels=records.test.labels,
                                paths=records.test.paths)
    return result


def run_evaluation(config: EvaluateConfig) -> tuple[dict, list[str]]:
    """(evaluation object, the reference's human-readable lines)."""
    if bool(config.checkpoint) == bool(config.embeddings):
        raise ValueError("give either a checkpoint (or run directory) or --embeddings FILE.npz")
    if config.embeddings and config.save_embeddings:
        raise ValueError("--save-embeddings needs a checkpoint; the embeddings are already saved")
    result = _evaluate_saved(config) if config.embeddings else _evaluate_checkpoint(config)
    if config.output_json:
        Path(config.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(config.output_json).write_text(json.dumps(result, indent=2) + "\n")
    return result, recall_report(result)
