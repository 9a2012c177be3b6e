"""``normsoftmax embed``: a folder, a CSV or a dataset split -> one embeddings file, resumably, on any number of
processes.

Images are embedded in fixed batches of the full, sorted list (batch ``i`` is always the same images), so a
resumed or sharded run computes exactly what an uninterrupted single process would. Progress is kept in
chunk files beside the output (``OUT.part-RANK-SEQ.npz``, each written atomically every ``save_every``
images); a new run with the same model skips every image already in the output or a chunk, and the last
step merges everything, in order, into ``OUT`` and removes the chunks. Under torchrun each rank embeds
every ``world_size``-th batch and rank 0 merges.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import digest_of, load_embedder, run_config_of
from ..config import EmbedConfig, default_dataset_root, required
from ..data.custom import IMAGE_EXTENSIONS
from ..data.images import ImageTransformConfig
from ..data.records import DatasetError
from ..data.registry import load_dataset
from ..runtime import Distributed, autocast, loader_settings, loader_workers
from .embed import eval_dataset, run_amp
from .files import read_embeddings, write_embeddings

logger = logging.getLogger(__name__)


def embed_files(config: EmbedConfig) -> dict:
    """Embed the images ``config`` names into ``config.out``; returns count, dim, out and whether this is rank 0."""
    if not config.out:
        raise ValueError("embed needs --out FILE.npz")
    if bool(config.images) == bool(config.dataset):
        raise ValueError("give either a folder / CSV of images or --dataset NAME (with --split)")
    dist = Distributed.from_environment(config.device)
    device = dist.device(config.device)
    model = load_embedder(required(config.checkpoint, "a checkpoint or run directory"), device)
    run_config, digest = run_config_of(model), digest_of(model)
    paths, labels, label_names, source, decode = _images(config)
    out = Path(config.out)
    amp = run_amp(model, config.amp, device)
    config = EmbedConfig(**{**asdict(config), "amp": amp})
    metadata = {"model": {"checkpoint": model.checkpoint, "digest": digest, "model_name": model.backbone_name,
                          "dim": model.dim, "resize": run_config.resize, "crop": run_config.crop, "amp": amp},
                "source": source, "label_names": label_names}
    batch = config.batch_size
    batches = None
    if dist.is_main:  # one view of what is done, before any rank writes a new chunk
        done = _embedded_so_far(out, digest, True)
        batches = [i for i in range(0, len(paths), batch) if any(p not in done for p in paths[i:i + batch])]
    batches = dist.broadcast(batches)
    mine = batches[dist.rank::dist.world_size]
    logger.info("%d images, %d batches of %d to embed; rank %d embeds %d of them", len(paths), len(batches), batch,
                dist.rank, len(mine))
    _embed_batches(model, config, paths, mine, out, dist.rank, ImageTransformConfig.of(run_config), decode, device)
    dist.barrier()
    if dist.is_main:
        found = _embedded_so_far(out, digest, True)
        missing = [p for p in paths if p not in found]
        if missing:
            raise RuntimeError(f"{len(missing)} images were not embedded (first: {missing[0]}); run the command again")
        embeddings = np.stack([found[p] for p in paths]) if paths else np.zeros((0, model.dim), np.float32)
        write_embeddings(out, embeddings, paths, labels, {**metadata, "complete": True,
                                                           "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        for chunk in _chunk_files(out):
            chunk.unlink()
    dist.barrier()
    return {"out": str(out), "count": len(paths), "dim": model.dim, "is_main": dist.is_main}


@torch.no_grad()
def _embed_batches(model, config: EmbedConfig, paths, batches, out: Path, rank: int, transform, decode, device) -> None:
    """Embed the given batches (start indices), writing a chunk file every ``save_every`` images."""
    per_flush = max(1, config.save_every // config.batch_size)
    sequence = len(_chunk_files(out))
    dataset = eval_dataset(paths, np.zeros(len(paths), np.int64), transform, decode=decode)
    sampler = [list(range(start, min(len(paths), start + config.batch_size))) for start in batches]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler,
                                         **loader_settings(device, loader_workers(config.workers)))
    progress = None
    if config.progress and rank == 0:
        from tqdm import tqdm

        progress = tqdm(total=len(sampler), desc="embedding", unit="batch", leave=False)
    pending_paths, pending = [], []
    for number, ((images, _), indices) in enumerate(zip(loader, sampler, strict=True), start=1):
        images = images.to(device, non_blocking=True)
        if model.train_config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, config.amp):
            pending.append(model(images).float().cpu().numpy())
        pending_paths += [paths[i] for i in indices]
        if progress is not None:
            progress.update()
        if number % per_flush == 0 or number == len(sampler):
            sequence += 1
            write_embeddings(out.with_name(f"{out.name}.part-{rank}-{sequence:06d}.npz"), np.concatenate(pending),
                             pending_paths, metadata={"digest": model.digest})
            pending_paths, pending = [], []
    if progress is not None:
        progress.close()


def _chunk_files(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f"{out.name}.part-*.npz")) if out.parent.is_dir() else []


def _embedded_so_far(out: Path, digest: str, check: bool) -> dict[str, np.ndarray]:
    """Embeddings by path from the output file and chunk files made by the same model."""
    found: dict[str, np.ndarray] = {}
    for file in ([out] if out.exists() else []) + _chunk_files(out):
        try:
            data = read_embeddings(file)
        except ValueError as error:
            if file == out:
                raise ValueError(f"{out} exists and is not an embeddings file ({error}); "
                                 "choose another --out") from None
            logger.warning("ignoring the unreadable partial file %s (%s)", file, error)
            continue
        file_digest = data.metadata.get("model", {}).get("digest", data.metadata.get("digest"))
        if file_digest != digest:
            if check and file == out:
                raise ValueError(f"{out} holds embeddings of another model (digest {str(file_digest)[:12]}, this "
                                 f"model {digest[:12]}); choose another --out or delete it")
            continue
        found.update(zip(data.paths, data.embeddings, strict=True))
    return found


def _images(config: EmbedConfig):
    """(paths, labels or None, label names, source description, decoder) of what ``config`` names."""
    if config.dataset:
        records = load_dataset(config.dataset, config.dataset_root or default_dataset_root(config.dataset))
        split = records.split(config.split)
        return (list(split.paths), split.labels, list(split.class_names),
                {"kind": "dataset", "dataset": records.name, "root": records.root, "split": config.split},
                records.decode)
    location = Path(required(config.images, "a folder or CSV of images")).expanduser().resolve()
    if location.is_dir():
        paths = sorted(str(p) for p in location.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not paths:
            raise DatasetError(f"{location}: no image files (extensions {sorted(IMAGE_EXTENSIONS)})")
        return paths, None, None, {"kind": "folder", "root": str(location)}, "robust"
    if location.is_file() and location.suffix.lower() == ".csv":
        return (*_csv_images(location), {"kind": "csv", "file": str(location)}, "robust")
    raise ValueError(f"{location}: neither a folder of images nor a .csv file")


def _csv_images(path: Path):
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = [name.strip().lower() for name in next(reader, [])]
        if "path" not in header:
            raise DatasetError(f"{path}, line 1: the header must name a path column (and optionally label)")
        rows = [(reader.line_num, fields) for fields in reader if fields and any(f.strip() for f in fields)]
    column = header.index("path")
    label_column = header.index("label") if "label" in header else None
    paths, raw_labels = [], []
    for number, fields in rows:
        if len(fields) != len(header):
            raise DatasetError(f"{path}, line {number}: expected {len(header)} fields, found {len(fields)}")
        image = Path(fields[column].strip())
        paths.append(str(image if image.is_absolute() else path.parent / image))
        if label_column is not None:
            raw_labels.append(fields[label_column].strip())
    if label_column is None:
        return paths, None, None
    names = sorted(set(raw_labels))
    index = {name: i for i, name in enumerate(names)}
    return paths, np.array([index[name] for name in raw_labels], dtype=np.int64), names


__all__ = ["embed_files"]
