"""A pre-resized image cache: every image decoded and resized once, into one uint8 memory-mapped file.

Decoding a ~500x375 JPEG and resizing it costs several times more than the
random crop, flip and normalisation that follow, and it is the same work every
epoch. :func:`build_cache` does it once: the pixels of
``torchvision.transforms.Resize(size)(load_rgb(path))`` (the recipe's square
``Resize((256, 256))``, or the shorter side with ``keep_aspect``) are appended
to ``pixels.u8``, and ``index.json`` (written last) maps each image to its
offset and shape, with the spec the cache was built for and every source file's
size and modification time. :func:`find_cache` returns a cache only when it
covers every image of a dataset, matches the transform configuration and no
source file changed since.

Training then reads pixels with :meth:`ImageCache.read` (a zero-copy view of
the memory map) and applies :func:`array_train_transform` /
:func:`array_eval_transform`: the crop, flip and normalisation of the PIL
pipeline done with numpy slicing and one float conversion. They draw their
random numbers from torch exactly as ``RandomCrop`` and ``RandomHorizontalFlip``
do, so with the same seed they return the same tensor as
``train_transform(config, resized=True)`` on the same pixels.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .images import IMAGENET_MEAN, IMAGENET_STD, ImageTransformConfig, load_rgb
from .records import DatasetError, DatasetRecords

log = logging.getLogger("normsoftmax.prepare")

CACHE_FORMAT = 1
INDEX_NAME = "index.json"
PIXELS_NAME = "pixels.u8"


def cache_spec(config: ImageTransformConfig) -> dict:
    """What a cache's pixels depend on: the resize (not the crop, which happens at read time), and the
    Pillow and torchvision versions, whose resampling defines the exact pixel values."""
    import PIL
    import torchvision

    return {"format": CACHE_FORMAT, "resize": int(config.resize), "keep_aspect": bool(config.keep_aspect),
            "interpolation": "bilinear-antialias (torchvision Resize on PIL)",
            "pillow": PIL.__version__, "torchvision": torchvision.__version__}


def default_cache_dir(records: DatasetRecords, config: ImageTransformConfig) -> Path:
    """``<dataset root>/.normsoftmax-cache/<name>-resize<size>[-aspect]``."""
    tag = f"{records.name}-resize{config.resize}{'-aspect' if config.keep_aspect else ''}"
    return Path(records.root) / ".normsoftmax-cache" / tag


class ImageCache:
    """Read-only access to a built cache; cheap to pickle (the memory map is reopened in each process)."""

    def __init__(self, directory: str | os.PathLike, root: str | os.PathLike | None = None):
        """``root`` overrides the dataset root recorded at build time (a dataset folder moved with its cache)."""
        self.directory = Path(directory)
        index = json.loads((self.directory / INDEX_NAME).read_text())
        self.spec: dict = index["spec"]
        self.root = str(root) if root is not None else index["root"]
        entries = index["entries"]
        self.count = len(entries)
        # Relative paths are resolved against the dataset root recorded at build time.
        self.paths = [e[0] if os.path.isabs(e[0]) else os.path.join(self.root, e[0]) for e in entries]
        self.offsets = np.array([e[1] for e in entries], dtype=np.int64)
        self.shapes = np.array([[e[2], e[3]] for e in entries], dtype=np.int64).reshape(-1, 2)
        self.sources = [(e[4], e[5]) for e in entries]  # (size, mtime_ns) of each source file
        self.position = {path: i for i, path in enumerate(self.paths)}
        self.nbytes = int(index["nbytes"])
        self._pixels: np.ndarray | None = None   # the np.memmap
        self._flat: np.ndarray | None = None     # a plain ndarray view of it (cheaper to slice than the subclass)

    # Pickling a np.memmap would copy every byte; send the directory and reopen instead.
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_pixels"] = state["_flat"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __len__(self) -> int:
        return self.count

    def __contains__(self, path) -> bool:
        return str(path) in self.position

    @property
    def pixels(self) -> np.ndarray:
        """The whole cache as one flat uint8 memory map (opened on first use, in each process)."""
        if self._pixels is None:
            self._open()
        return self._pixels

    def _open(self) -> np.ndarray:
        if self.nbytes == 0:
            self._pixels = np.zeros(0, dtype=np.uint8)
        else:
            self._pixels = np.memmap(self.directory / PIXELS_NAME, dtype=np.uint8, mode="r", shape=(self.nbytes,))
        self._flat = self._pixels.view(np.ndarray)
        return self._flat

    def read(self, path: str | os.PathLike) -> np.ndarray:
        """The resized HxWx3 uint8 pixels of ``path``: a read-only view of the memory map, no copy."""
        try:
            i = self.position[str(path)]
        except KeyError:
            raise KeyError(f"{path} is not in the image cache {self.directory}") from None
        flat = self._flat if self._flat is not None else self._open()
        height, width = self.shapes[i]
        start = self.offsets[i]
        return flat[start: start + height * width * 3].reshape(height, width, 3)

    def matches(self, config: ImageTransformConfig) -> bool:
        return self.spec == cache_spec(config)

    def stale_paths(self, paths: Sequence[str], limit: int | None = None) -> list[tuple[str, str]]:
        """(path, reason) for paths that are missing from the cache or changed since it was built."""
        problems = []
        for path in paths:
            i = self.position.get(str(path))
            if i is None:
                problems.append((str(path), "not in the cache"))
            else:
                try:
                    info = os.stat(path)
                except OSError:
                    problems.append((str(path), "source file missing"))
                else:
                    if (info.st_size, info.st_mtime_ns) != tuple(self.sources[i]):
                        problems.append((str(path), "source file changed since the cache was built"))
            if limit is not None and len(problems) >= limit:
                break
        return problems


def _resize_one(task: tuple[str, tuple | int]) -> tuple[np.ndarray, int, int]:
    from torchvision import transforms

    path, size = task
    info = os.stat(path)
    pixels = np.asarray(transforms.Resize(size)(load_rgb(path)), dtype=np.uint8)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise DatasetError(f"{path}: decoded to shape {pixels.shape}, expected HxWx3")
    return np.ascontiguousarray(pixels), info.st_size, info.st_mtime_ns


def _init_worker() -> None:
    torch.set_num_threads(1)


def build_cache(records: DatasetRecords, config: ImageTransformConfig = ImageTransformConfig(),
                workers: int | None = None, directory: str | os.PathLike | None = None,
                progress: bool = True) -> Path:
    """Decode and resize every image of ``records`` (all splits) once; returns the cache directory.

    The pixels equal ``np.asarray(transforms.Resize(config.resize_size())(load_rgb(path)))`` exactly.
    An existing, up-to-date cache for the same images and spec is reused as it is.
    """
    from tqdm import tqdm

    directory = Path(directory) if directory is not None else default_cache_dir(records, config)
    paths = list(dict.fromkeys(records.all_paths()))  # all splits, each path once
    existing = _open_if_valid(directory, paths, config, records.root)
    if existing is not None:
        log.info("image cache %s is up to date (%d images)", directory, len(paths))
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    _check_space(directory, len(paths), config)
    index_path = directory / INDEX_NAME
    index_path.unlink(missing_ok=True)  # the index is the completion marker: remove it before touching pixels
    root = str(Path(records.root))
    size = config.resize_size()
    workers = workers if workers is not None else (os.cpu_count() or 1)
    tasks = [(path, size) for path in paths]
    entries = []
    offset = 0
    started = time.perf_counter()
    temporary = directory / (PIXELS_NAME + ".tmp")
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_init_worker) if workers > 1 and len(paths) > 64 else None
    try:
        results = pool.map(_resize_one, tasks, chunksize=max(1, min(64, len(tasks) // (workers * 8) or 1))) if pool else map(_resize_one, tasks)
        with open(temporary, "wb") as sink:
            for path, (pixels, src_size, src_mtime) in tqdm(zip(paths, results), total=len(paths), desc="caching images",
                                                            unit="img", disable=not progress, leave=False):
                sink.write(pixels.data)
                relative = os.path.relpath(path, root) if _is_under(path, root) else path
                entries.append([relative, offset, int(pixels.shape[0]), int(pixels.shape[1]), int(src_size), int(src_mtime)])
                offset += pixels.nbytes
            sink.flush()
            os.fsync(sink.fileno())
    except Exception as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, DatasetError):
            raise
        raise DatasetError(f"building the image cache in {directory} failed ({type(error).__name__}: {error})") from None
    finally:
        if pool is not None:
            pool.shutdown()
    os.replace(temporary, directory / PIXELS_NAME)
    index = {"spec": cache_spec(config), "root": root, "nbytes": offset, "count": len(entries),
             "paths_digest": _paths_digest(paths), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "entries": entries}
    staging = directory / (INDEX_NAME + ".tmp")
    staging.write_text(json.dumps(index, separators=(",", ":")))
    os.replace(staging, index_path)
    log.info("cached %d images (%.2f GiB) in %s in %.1f s", len(entries), offset / 2**30, directory,
             time.perf_counter() - started)
    return directory


def _check_space(directory: Path, count: int, config: ImageTransformConfig) -> None:
    # Square caches have an exact size; keep_aspect ones are estimated for 4:3 photos.
    per_image = config.resize * config.resize * 3 * (1 if not config.keep_aspect else 4 / 3)
    needed = count * per_image
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise DatasetError(f"the image cache for {count} images needs about {needed / 2**30:.1f} GiB in {directory}, "
                           f"but only {free / 2**30:.1f} GiB are free")
    log.info("caching %d images: about %.2f GiB in %s", count, needed / 2**30, directory)


def find_cache(records: DatasetRecords, config: ImageTransformConfig = ImageTransformConfig(),
               directory: str | os.PathLike | None = None) -> ImageCache | None:
    """The cache for ``records`` and ``config``, or None when there is none, it misses an image,
    was built for another resize, or any source image changed since it was built (the reason is logged)."""
    directory = Path(directory) if directory is not None else default_cache_dir(records, config)
    return _open_if_valid(directory, records.all_paths(), config, records.root)


def _open_if_valid(directory: Path, paths: Sequence[str], config: ImageTransformConfig, root) -> ImageCache | None:
    if not (directory / INDEX_NAME).is_file():
        return None
    try:
        cache = ImageCache(directory, root=root)
    except (OSError, ValueError, KeyError, IndexError, TypeError) as error:
        log.warning("ignoring the unreadable image cache %s (%s)", directory, error)
        return None
    if not cache.matches(config):
        log.info("ignoring the image cache %s: built for %s, needed %s", directory, cache.spec, cache_spec(config))
        return None
    if not (directory / PIXELS_NAME).is_file() or (directory / PIXELS_NAME).stat().st_size != cache.nbytes:
        log.warning("ignoring the image cache %s: its pixel file is missing or truncated", directory)
        return None
    stale = cache.stale_paths(paths, limit=5)
    if stale:
        log.warning("ignoring the stale image cache %s: %s", directory,
                    "; ".join(f"{path} ({reason})" for path, reason in stale))
        return None
    return cache


def _is_under(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([os.path.abspath(path), os.path.abspath(root)]) == os.path.abspath(root)
    except ValueError:
        return False


def _paths_digest(paths: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ array transforms

class _ArrayTransform:
    """Shared tail of both transforms: HxWx3 uint8 window -> normalised 3xHxW float32 tensor.

    Mirrors ``ToTensor`` (permute, contiguous, float, /255) and ``Normalize`` (sub mean, div std) op for op,
    so the floats are bit-identical to the PIL pipeline's.
    """

    def __init__(self, crop: int):
        self.crop = int(crop)
        self.mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(-1, 1, 1)

    def _to_tensor(self, window: np.ndarray) -> torch.Tensor:
        chw = torch.from_numpy(np.ascontiguousarray(window.transpose(2, 0, 1)))
        return chw.to(torch.float32).div_(255).sub_(self.mean).div_(self.std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(crop={self.crop})"


class ArrayTrainTransform(_ArrayTransform):
    """RandomCrop(crop) uniform over all valid offsets, horizontal flip with p=0.5 (unless hflip is off),
    /255, ImageNet mean/std."""

    def __init__(self, crop: int, hflip: bool = True):
        super().__init__(crop)
        self.hflip = hflip

    def __call__(self, pixels: np.ndarray) -> torch.Tensor:
        height, width = pixels.shape[:2]
        if height < self.crop or width < self.crop:
            raise ValueError(f"Required crop size {(self.crop, self.crop)} is larger than input image size {(height, width)}")
        # The same torch draws, in the same order, as RandomCrop.get_params and RandomHorizontalFlip.
        if height == self.crop and width == self.crop:
            top = left = 0
        else:
            top = int(torch.randint(0, height - self.crop + 1, size=(1,)).item())
            left = int(torch.randint(0, width - self.crop + 1, size=(1,)).item())
        window = pixels[top: top + self.crop, left: left + self.crop]
        if self.hflip and torch.rand(1) < 0.5:
            window = window[:, ::-1]
        return self._to_tensor(window)


class ArrayEvalTransform(_ArrayTransform):
    """CenterCrop(crop) with torchvision's offsets (``int(round((size - crop) / 2))``, zero padding when
    the image is smaller), /255, ImageNet mean/std."""

    def __call__(self, pixels: np.ndarray) -> torch.Tensor:
        height, width = pixels.shape[:2]
        if height < self.crop or width < self.crop:
            pad_top = (self.crop - height) // 2 if self.crop > height else 0
            pad_left = (self.crop - width) // 2 if self.crop > width else 0
            pad_bottom = (self.crop - height + 1) // 2 if self.crop > height else 0
            pad_right = (self.crop - width + 1) // 2 if self.crop > width else 0
            pixels = np.pad(pixels, ((pad_top, pad_bottom), (pad_left, pad_right), (0, 0)))
            height, width = pixels.shape[:2]
        top = int(round((height - self.crop) / 2.0))
        left = int(round((width - self.crop) / 2.0))
        return self._to_tensor(pixels[top: top + self.crop, left: left + self.crop])


def array_train_transform(config: ImageTransformConfig = ImageTransformConfig()) -> ArrayTrainTransform:
    """The training transform for cached (pre-resized) pixels: ``train_transform(config)`` minus the Resize."""
    return ArrayTrainTransform(config.crop, hflip=config.hflip)


def array_eval_transform(config: ImageTransformConfig = ImageTransformConfig()) -> ArrayEvalTransform:
    """The evaluation transform for cached pixels: ``eval_transform(config)`` minus the Resize."""
    return ArrayEvalTransform(config.crop)


__all__ = ["ImageCache", "build_cache", "find_cache", "cache_spec", "default_cache_dir",
           "array_train_transform", "array_eval_transform", "ArrayTrainTransform", "ArrayEvalTransform"]
