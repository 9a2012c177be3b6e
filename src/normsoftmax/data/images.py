"""Decoding images, the recipe's transforms, and the image dataset.

Two decoders turn a file into 8-bit RGB pixels (``DECODERS``, chosen per dataset):

* ``"reference"`` -- ``Image.open(path).convert("RGB")``, exactly what the
  reference code does; the four benchmarks use it, so their pixels are the
  paper's;
* ``"robust"`` (:func:`load_rgb`) -- for users' folder and CSV data: EXIF
  orientation is applied, and grayscale, palette, alpha, CMYK and 16-bit inputs
  all become 8-bit RGB (transparent areas composited onto white, 16-bit values
  scaled, not clipped). ``verify_images`` decodes every file before training so that a bad
file stops the run with its name instead of killing a DataLoader worker in
epoch 7.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import IO, Protocol

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torchvision import transforms

from ..runtime import worker_count
from .records import DatasetError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# A truncated JPEG must fail loudly, never decode as a grey tail.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# A file name, or an open binary file (an upload, bytes read once for both decoding and hashing).
ImageSource = str | os.PathLike | IO[bytes]


def load_rgb(path: ImageSource) -> Image.Image:
    """Open any image file as 8-bit RGB with EXIF orientation applied."""
    with Image.open(path) as opened:
        opened.load()
        image = ImageOps.exif_transpose(opened)
    return to_rgb(image)


def load_rgb_as_reference(path: ImageSource) -> Image.Image:
    """The reference code's decoding: ``Image.open(path).convert("RGB")``, nothing else."""
    with Image.open(path) as opened:
        return opened.convert("RGB")


DECODERS: dict[str, Callable[[ImageSource], Image.Image]] = {"robust": load_rgb,
                                                                   "reference": load_rgb_as_reference}


def decoder(name: str) -> Callable[[ImageSource], Image.Image]:
    try:
        return DECODERS[name]
    except KeyError:
        raise ValueError(f"unknown image decoding {name!r}; choose one of {', '.join(DECODERS)}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        # 16-bit samples span 0..65535; 32-bit "I" images written from 16-bit data do too.
        scale = 257.0 if mode.startswith("I;16") or values.max(initial=0) > 255 else 1.0
        gray = np.clip(np.rint(values / scale), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        high = values.max(initial=0)
        gray = np.clip(np.rint(values * (255.0 if high <= 1.0 else 1.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "P" and "transparency" in image.info or mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith(("RGB", "BGR")):
        # e.g. 16-bit-per-channel RGB opened as "RGB;16": PIL's convert keeps the high byte.
        return image.convert("RGB")
    return image.convert("RGB")


class TransformSettings(Protocol):
    """What a run's config says about its images (a ``TrainConfig`` has these fields)."""

    @property
    def resize(self) -> int | None: ...
    @property
    def crop(self) -> int | None: ...
    @property
    def keep_aspect(self) -> bool: ...
    @property
    def hflip(self) -> bool: ...
    @property
    def mean(self) -> Sequence[float] | None: ...
    @property
    def std(self) -> Sequence[float] | None: ...


@dataclass(frozen=True)
class ImageTransformConfig:
    """The recipe's geometry: Resize((resize, resize)) then a crop of ``crop`` pixels; then the pixels
    normalised with the backbone's mean and standard deviation (ImageNet's unless the backbone says otherwise)."""

    resize: int = 256
    crop: int = 224
    keep_aspect: bool = False  # Resize(resize) on the shorter side instead of a square resize
    hflip: bool = True  # off for data whose identity is not mirror-symmetric (glyphs)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @classmethod
    def of(cls, settings: TransformSettings) -> ImageTransformConfig:
        """The geometry and normalisation a run trains and evaluates with, from its resolved config. Runs that
        predate per-backbone normalisation recorded none: they used ImageNet's."""
        if settings.resize is None or settings.crop is None:
            raise ValueError("the config's image size is not resolved yet (resize and crop are None)")
        return cls(resize=settings.resize, crop=settings.crop, keep_aspect=settings.keep_aspect, hflip=settings.hflip,
                   mean=tuple(settings.mean) if settings.mean else IMAGENET_MEAN,
                   std=tuple(settings.std) if settings.std else IMAGENET_STD)

    def resize_size(self):
        return self.resize if self.keep_aspect else (self.resize, self.resize)


def train_transform(config: ImageTransformConfig = ImageTransformConfig(), resized: bool = False) -> Callable:
    """Resize -> RandomCrop -> horizontal flip -> tensor -> normalisation (``config.mean``, ``config.std``).

    ``resized=True`` leaves out the Resize, for pixels that come pre-resized from the cache.
    """
    steps = [] if resized else [transforms.Resize(config.resize_size())]
    steps += [transforms.RandomCrop(config.crop)] + ([transforms.RandomHorizontalFlip()] if config.hflip else [])
    steps += [transforms.ToTensor(), transforms.Normalize(config.mean, config.std)]
    return transforms.Compose(steps)


def eval_transform(config: ImageTransformConfig = ImageTransformConfig(), resized: bool = False) -> Callable:
    """Resize -> CenterCrop -> tensor -> normalisation (``config.mean``, ``config.std``)."""
    steps = [] if resized else [transforms.Resize(config.resize_size())]
    steps += [transforms.CenterCrop(config.crop), transforms.ToTensor(), transforms.Normalize(config.mean, config.std)]
    return transforms.Compose(steps)


class ImageDataset(torch.utils.data.Dataset):
    """(image tensor, label) pairs from paths; pixels from an image cache when one is given.

    ``cache`` is anything with ``read(path) -> HxWx3 uint8 array`` (see :mod:`normsoftmax.data.cache`);
    its pixels are already resized and go to ``transform`` as that array, so ``transform`` must then be
    one of the cache's array transforms.

    An item may be an index or ``(index, seed)``: the transform's random draws then come from ``seed``
    alone (see :class:`normsoftmax.data.sampler.SeededBatches`). With ``skip_bad`` a file that cannot be
    read gives ``(None, label, path)`` instead of raising, for :func:`collate_skipping` to drop.
    """

    def __init__(self, paths: Sequence[str], labels: Sequence[int] | np.ndarray, transform: Callable, cache=None,
                 decode: str = "robust", skip_bad: bool = False):
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.cache = cache
        self.load = decoder(decode)
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        path = self.paths[index]
        try:
            image = self.cache.read(path) if self.cache is not None else self.load(path)
        except Exception as error:
            if self.skip_bad:
                return None, int(self.labels[index]), path
            # Verification normally catches this before training; keep the file name if it slips through.
            raise DatasetError(f"{path}: cannot be read as an image ({type(error).__name__}: {error})") from None
        if seed is None:
            return self.transform(image), int(self.labels[index])
        # manual_seed reseeds the GPUs' generators too: leave every generator as it was (the main process's
        # draws, e.g. the loss's class sampling, must not depend on whether images load here or in workers)
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return self.transform(image), int(self.labels[index])


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGINT/SIGTERM to the main process, which finishes its step and checkpoints
    (a worker killed by Ctrl-C or a scheduler would make the main process fail at a random point instead)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def collate_skipping(items):
    """Collate (image, label) items, dropping unreadable ones: (images or None, labels or None, skipped paths)."""
    good = [item[:2] for item in items if item[0] is not None]
    skipped = [item[2] for item in items if item[0] is None]
    if not good:
        return None, None, skipped
    images, labels = torch.utils.data.default_collate(good)
    return images, labels, skipped


def check_image(path: str) -> str | None:
    """The reason ``path`` is unusable, or None when it decodes."""
    if not os.path.isfile(path):
        return "missing"
    try:
        with Image.open(path) as image:
            # Decoding JPEGs at reduced scale still reads every entropy-coded byte, so truncation is caught, 8x faster.
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except Exception as error:
        return f"does not decode ({type(error).__name__}: {error})"
    return None


def find_bad_images(paths: Sequence[str], workers: int | None = None, progress: bool = False) -> list[tuple[str, str]]:
    """(path, reason) for every path that is missing or does not decode."""
    paths = list(paths)
    workers = worker_count(workers)
    parallel = workers > 1 and len(paths) >= 256  # below that, starting processes costs more than it saves
    with contextlib.ExitStack() as stack:
        if parallel:
            pool = stack.enter_context(ProcessPoolExecutor(max_workers=workers))
            reasons = pool.map(check_image, paths, chunksize=max(1, len(paths) // (workers * 16)))
        else:
            reasons = map(check_image, paths)
        if progress:
            from tqdm import tqdm

            reasons = iter(tqdm(reasons, total=len(paths), desc="verifying images", unit="img", leave=False))
        return [(path, reason) for path, reason in zip(paths, reasons, strict=True) if reason is not None]


def verify_images(paths: Sequence[str], workers: int | None = None, progress: bool = False) -> None:
    """Raise :class:`DatasetError` naming the bad files, if any."""
    bad = find_bad_images(paths, workers=workers, progress=progress)
    if bad:
        listed = "\n".join(f"  {path}: {reason}" for path, reason in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise DatasetError(f"{len(bad)} of {len(paths)} images cannot be used:\n{listed}{more}")
