"""Reading the pre-resized image cache: every image decoded and resized once, in one uint8 memory-mapped file.

Decoding a ~500x375 JPEG and resizing it costs several times more than the
random crop, flip and normalisation that follow, and it is the same work every
epoch. :func:`normsoftmax.prepare.cache.build_cache` does it once: the pixels of
``torchvision.transforms.Resize(size)(decode(path))`` (the recipe's square
``Resize((256, 256))``, or the shorter side with ``keep_aspect``; the dataset's
decoder) are appended to ``pixels.u8``, and ``index.json`` (written last) maps
each image to its offset and shape, with the spec the cache was built for and
every source file's size, modification time and content digest.
:func:`find_cache` returns a cache only when it covers every image of a
dataset, matches the transform configuration and no source file changed since.

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
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .images import IMAGENET_MEAN, IMAGENET_STD, ImageTransformConfig
from .records import DatasetRecords

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: a content digest per source file
INDEX_NAME = "index.json"
PIXELS_NAME = "pixels.u8"


def cache_spec(config: ImageTransformConfig, decode: str = "robust") -> dict:
    """What a cache's pixels depend on: the decoder, the resize (not the crop, which happens at read time),
    and the Pillow and torchvision versions, whose resampling defines the exact pixel values."""
    import PIL
    import torchvision

    return {"format": CACHE_FORMAT, "resize": int(config.resize), "keep_aspect": bool(config.keep_aspect),
            "interpolation": "bilinear-antialias (torchvision Resize on PIL)", "decode": decode,
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
        self.sources = [(e[4], e[5], e[6]) for e in entries]  # (size, mtime_ns, content digest) of each source
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
        assert self._pixels is not None
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

    def matches(self, config: ImageTransformConfig, decode: str = "robust") -> bool:
        return self.spec == cache_spec(config, decode)

    def stale_paths(self, paths: Sequence[str], limit: int | None = None) -> list[tuple[str, str]]:
        """(path, reason) for paths that are missing from the cache or whose content changed since it was built.

        A changed size or modification time makes a file stale, and so does changed content: every file is
        read and digested (threads; hashing releases the GIL), so a file replaced by another of the same size
        and modification time -- as archive extraction leaves them -- is caught too. At most ``limit``
        problems are reported.
        """
        from concurrent.futures import ThreadPoolExecutor

        from ..runtime import worker_count

        def problem(path: str) -> str | None:
            i = self.position.get(str(path))
            if i is None:
                return "not in the cache"
            size, mtime, digest = self.sources[i]
            try:
                info = os.stat(path)
                if (info.st_size, info.st_mtime_ns) != (size, mtime):
                    return "source file changed since the cache was built"
                if file_content_digest(path) != digest:
                    return "source file changed since the cache was built (content)"
            except OSError:
                return "source file missing"
            return None

        problems = []
        with ThreadPoolExecutor(max_workers=worker_count()) as pool:
            for path, reason in zip(paths, pool.map(problem, paths, chunksize=64), strict=True):
                if reason is not None:
                    problems.append((str(path), reason))
                    if limit is not None and len(problems) >= limit:
                        break
        return problems


def content_digest(data: bytes) -> str:
    """The digest a cache keeps of each source file's bytes (BLAKE2b, 128 bits)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def file_content_digest(path: str | os.PathLike) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_cache(records: DatasetRecords, config: ImageTransformConfig = ImageTransformConfig(),
               directory: str | os.PathLike | None = None) -> ImageCache | None:
    """The cache for ``records`` and ``config``, or None when there is none, it misses an image,
    was built for another resize, or any source image changed since it was built (the reason is logged)."""
    directory = Path(directory) if directory is not None else default_cache_dir(records, config)
    return open_if_valid(directory, records.all_paths(), config, records.root, records.decode)


def open_if_valid(directory: Path, paths: Sequence[str], config: ImageTransformConfig, root,
                  decode: str = "robust") -> ImageCache | None:
    if not (directory / INDEX_NAME).is_file():
        return None
    try:
        cache = ImageCache(directory, root=root)
    except (OSError, ValueError, KeyError, IndexError, TypeError) as error:
        log.warning("ignoring the unreadable image cache %s (%s)", directory, error)
        return None
    if not cache.matches(config, decode):
        log.info("ignoring the image cache %s: built for %s, needed %s", directory, cache.spec,
                 cache_spec(config, decode))
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


def is_under(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([os.path.abspath(path), os.path.abspath(root)]) == os.path.abspath(root)
    except ValueError:
        return False


# ------------------------------------------------------------------------------------------ array transforms

class _ArrayTransform:
    """Shared tail of both transforms: HxWx3 uint8 window -> normalised 3xHxW float32 tensor.

    Mirrors ``ToTensor`` (permute, contiguous, float, /255) and ``Normalize`` (sub mean, div std) op for op,
    so the floats are bit-identical to the PIL pipeline's.
    """

    def __init__(self, crop: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.crop = int(crop)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def _to_tensor(self, window: np.ndarray) -> torch.Tensor:
        chw = torch.from_numpy(np.ascontiguousarray(window.transpose(2, 0, 1)))
        return chw.to(torch.float32).div_(255).sub_(self.mean).div_(self.std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(crop={self.crop})"


class ArrayTrainTransform(_ArrayTransform):
    """RandomCrop(crop) uniform over all valid offsets, horizontal flip with p=0.5 (unless hflip is off),
    /255, the backbone's mean/std."""

    def __init__(self, crop: int, hflip: bool = True, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD):
        super().__init__(crop, mean, std)
        self.hflip = hflip

    def __call__(self, pixels: np.ndarray) -> torch.Tensor:
        height, width = pixels.shape[:2]
        if height < self.crop or width < self.crop:
            raise ValueError(f"Required crop size {(self.crop, self.crop)} is larger than input image size "
                             f"{(height, width)}")
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
    the image is smaller), /255, the backbone's mean/std."""

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
    return ArrayTrainTransform(config.crop, hflip=config.hflip, mean=config.mean, std=config.std)


def array_eval_transform(config: ImageTransformConfig = ImageTransformConfig()) -> ArrayEvalTransform:
    """The evaluation transform for cached pixels: ``eval_transform(config)`` minus the Resize."""
    return ArrayEvalTransform(config.crop, mean=config.mean, std=config.std)


__all__ = ["ImageCache", "find_cache", "cache_spec", "default_cache_dir",
           "array_train_transform", "array_eval_transform", "ArrayTrainTransform", "ArrayEvalTransform"]
