"""Building the pre-resized image cache that :mod:`normsoftmax.data.cache` reads."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..data.cache import (
    INDEX_NAME,
    PIXELS_NAME,
    cache_spec,
    content_digest,
    default_cache_dir,
    is_under,
    open_if_valid,
)
from ..data.images import ImageTransformConfig, decoder
from ..data.records import DatasetError, DatasetRecords
from ..files import atomic_output, atomic_write, ensure_free_space
from ..runtime import worker_count

log = logging.getLogger(__name__)


def _resize_one(task: tuple[str, tuple | int, str]) -> tuple[np.ndarray, int, int, str]:
    """(resized pixels, source size, mtime, content digest): the file is read once for both."""
    from torchvision import transforms

    path, size, decode = task
    info = os.stat(path)
    data = Path(path).read_bytes()
    pixels = np.asarray(transforms.Resize(size)(decoder(decode)(io.BytesIO(data))), dtype=np.uint8)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise DatasetError(f"{path}: decoded to shape {pixels.shape}, expected HxWx3")
    return np.ascontiguousarray(pixels), info.st_size, info.st_mtime_ns, content_digest(data)


def _init_worker() -> None:
    torch.set_num_threads(1)


def build_cache(records: DatasetRecords, config: ImageTransformConfig = ImageTransformConfig(),
                workers: int | None = None, directory: str | os.PathLike | None = None,
                progress: bool = True) -> Path:
    """Decode and resize every image of ``records`` (all splits) once; returns the cache directory.

    The pixels equal ``np.asarray(transforms.Resize(config.resize_size())(decode(path)))`` exactly, with the
    dataset's decoder. An existing, up-to-date cache for the same images and spec is reused as it is.
    """
    from tqdm import tqdm

    directory = Path(directory) if directory is not None else default_cache_dir(records, config)
    paths = list(dict.fromkeys(records.all_paths()))  # all splits, each path once
    existing = open_if_valid(directory, paths, config, records.root, records.decode)
    if existing is not None:
        log.info("image cache %s is up to date (%d images)", directory, len(paths))
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    # Square caches have an exact size; keep_aspect ones are estimated for 4:3 photos.
    needed = len(paths) * config.resize * config.resize * 3 * (1 if not config.keep_aspect else 4 / 3)
    ensure_free_space(directory, needed, f"the image cache for {len(paths)} images", error=DatasetError)
    log.info("caching %d images: about %.2f GiB in %s", len(paths), needed / 2**30, directory)
    index_path = directory / INDEX_NAME
    index_path.unlink(missing_ok=True)  # the index is the completion marker: remove it before touching pixels
    root = str(Path(records.root))
    workers = worker_count(workers)
    tasks = [(path, config.resize_size(), records.decode) for path in paths]
    entries = []
    offset = 0
    started = time.perf_counter()
    parallel = workers > 1 and len(paths) > 64
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_init_worker) if parallel else None
    try:
        chunk = max(1, min(64, len(tasks) // (workers * 8) or 1))
        results = pool.map(_resize_one, tasks, chunksize=chunk) if pool else map(_resize_one, tasks)
        with atomic_output(directory / PIXELS_NAME, durable=True) as temporary, open(temporary, "wb") as sink:
            for path, (pixels, src_size, src_mtime, digest) in tqdm(zip(paths, results, strict=True), total=len(paths),
                                                                    desc="caching images", unit="img",
                                                                    disable=not progress, leave=False):
                sink.write(pixels.data)
                relative = os.path.relpath(path, root) if is_under(path, root) else path
                entries.append([relative, offset, int(pixels.shape[0]), int(pixels.shape[1]), int(src_size),
                                int(src_mtime), digest])
                offset += pixels.nbytes
    except Exception as error:
        if isinstance(error, DatasetError):
            raise
        reason = f"{type(error).__name__}: {error}"
        raise DatasetError(f"building the image cache in {directory} failed ({reason})") from None
    finally:
        if pool is not None:
            pool.shutdown()
    index = {"spec": cache_spec(config, records.decode), "root": root, "nbytes": offset, "count": len(entries),
             "paths_digest": _paths_digest(paths), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "entries": entries}
    atomic_write(index_path, json.dumps(index, separators=(",", ":")), durable=True)
    log.info("cached %d images (%.2f GiB) in %s in %.1f s", len(entries), offset / 2**30, directory,
             time.perf_counter() - started)
    return directory


def _paths_digest(paths: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()


__all__ = ["build_cache"]
