"""Images -> embeddings with a trained embedder, in the eval transform, in dataset order."""

from __future__ import annotations

import contextlib
import os
from typing import Sequence

import numpy as np
import torch

from .data.images import ImageDataset, ImageTransformConfig, eval_transform


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def resolve_workers(workers: int) -> int:
    return min(8, os.cpu_count() or 1) if workers < 0 else workers


def autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_eval_dataset(paths: Sequence[str], labels, transform_config: ImageTransformConfig, cache=None) -> ImageDataset:
    if cache is not None:
        from .data.cache import array_eval_transform

        return ImageDataset(paths, labels, array_eval_transform(transform_config), cache=cache)
    return ImageDataset(paths, labels, eval_transform(transform_config))


@torch.no_grad()
def compute_embeddings(model: torch.nn.Module, dataset: ImageDataset, batch_size: int = 64,
                       device: torch.device | str = "cpu", workers: int = 0, amp: str = "none",
                       channels_last: bool = False, progress: bool = False, description: str = "embedding") -> np.ndarray:
    """(N, dim) float32 embeddings of ``dataset``, in its order; the model is left in the mode it had."""
    device = torch.device(device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         pin_memory=device.type == "cuda", persistent_workers=False)
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, desc=description, unit="batch", leave=False)
    was_training = model.training
    model.eval()
    chunks = []
    try:
        for images, _ in loader:
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
