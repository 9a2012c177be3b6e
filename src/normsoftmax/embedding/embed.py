"""Images -> embeddings with an embedder, in the evaluation transform, in order."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from ..data.cache import array_eval_transform
from ..data.images import ImageDataset, ImageTransformConfig, eval_transform
from ..runtime import autocast, loader_settings, resolve_amp, resolve_device


def run_amp(model: torch.nn.Module, amp: str, device: torch.device) -> str:
    """The precision to embed with: ``auto`` means the one the model's run trained and evaluated with, so an
    index and the queries searched in it are embedded the same way."""
    if amp != "auto":
        return amp
    config = getattr(model, "train_config", None)
    return resolve_amp(config.amp if config is not None else "auto", torch.device(device))


def eval_dataset(paths: Sequence[str], labels, transform: ImageTransformConfig, cache=None,
                 decode: str = "robust") -> ImageDataset:
    """The images in the evaluation transform (Resize -> CenterCrop -> normalise), from the cache when given."""
    if cache is not None:
        return ImageDataset(paths, labels, array_eval_transform(transform), cache=cache)
    return ImageDataset(paths, labels, eval_transform(transform), decode=decode)


@torch.no_grad()
def embed_dataset(model: torch.nn.Module, dataset: torch.utils.data.Dataset, batch_size: int = 64,
                  device: torch.device | str = "cpu", workers: int = 0, amp: str = "none",
                  channels_last: bool = False, progress: bool = False, description: str = "embedding") -> np.ndarray:
    """(N, dim) float32 embeddings of ``dataset``'s images, in its order; the model is left in the mode it had."""
    device = torch.device(device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         **loader_settings(device, workers))
    batches: Iterable = loader
    if progress:
        from tqdm import tqdm

        batches = tqdm(loader, desc=description, unit="batch", leave=False)
    was_training = model.training
    model.eval()
    chunks = []
    try:
        for images, _ in batches:
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp):
                chunks.append(model(images).float().cpu())
    finally:
        model.train(was_training)
    if not chunks:
        return np.zeros((0, getattr(model, "dim", 0)), dtype=np.float32)
    return torch.cat(chunks).numpy()


def embed_images(model: torch.nn.Module, paths: Sequence[str], *, batch_size: int = 64, device: str | None = None,
                 workers: int = 0, amp: str = "auto", transform: ImageTransformConfig | None = None,
                 decode: str = "robust", progress: bool = False) -> np.ndarray:
    """(N, dim) float32 embeddings of the image files ``paths``.

    The geometry (resize, crop), normalisation and precision (``amp="auto"``) are the model's training run's
    (``model.train_config``, set by :func:`normsoftmax.load_embedder`) unless given; ``device`` defaults to
    the model's.
    """
    config = getattr(model, "train_config", None)
    if transform is None:
        if config is not None:
            transform = ImageTransformConfig.of(config)
        else:  # a model made by create_embedder: its backbone's input, the paper's geometry
            expected = getattr(model, "preprocessing", None)
            transform = ImageTransformConfig() if expected is None else ImageTransformConfig(
                resize=expected.resize_for(expected.input_size), crop=expected.input_size, mean=expected.mean,
                std=expected.std)
    parameter = next(model.parameters(), None)
    where = resolve_device(str(device if device is not None else parameter.device if parameter is not None else "cpu"))
    dataset = eval_dataset(list(paths), np.zeros(len(paths), dtype=np.int64), transform, decode=decode)
    channels_last = bool(config.channels_last) if config is not None else False
    return embed_dataset(model, dataset, batch_size, where, workers, run_amp(model, amp, where), channels_last,
                         progress)


__all__ = ["embed_images", "embed_dataset", "eval_dataset"]
