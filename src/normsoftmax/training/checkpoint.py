"""Checkpoints: what a training run saves after each epoch, how they are found and read back, and how a
checkpoint becomes an embedder again (:func:`load_embedder`).

A checkpoint holds everything a run needs to continue exactly: model, proxies, optimizer, scaler, the
epoch, every RNG's state and the resolved config. Files are ``RUN_DIR/checkpoints/epoch_NNN.pt``, written
through :func:`normsoftmax.files.atomic_output`, so a crash mid-write never leaves a truncated file under
the final name.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..config import TrainConfig, config_from_dict
from ..files import atomic_output
from ..model import Embedder, create_embedder

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
CHECKPOINT_FOLDER = "checkpoints"


def checkpoint_path(run_dir: Path, epoch: int) -> Path:
    return Path(run_dir) / CHECKPOINT_FOLDER / f"epoch_{epoch:03d}.pt"


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or the newest one of a run directory."""
    path = Path(path)
    if path.is_file():
        return path
    found = sorted((path / CHECKPOINT_FOLDER).glob("epoch_*.pt")) if path.is_dir() else []
    if not found:
        raise FileNotFoundError(f"{path}: no checkpoint file, and no run directory with checkpoints/epoch_*.pt")
    return found[-1]


def load_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint at ``path`` (a file, or a run directory's newest), as a dict of tensors and plain values."""
    file = find_checkpoint(path)
    try:
        # weights_only: a checkpoint handed to `evaluate` cannot run code; it holds only tensors and plain values.
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{file}: cannot be read as a normsoftmax checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{file}: not a normsoftmax checkpoint")
    return state


def embedder_from_checkpoint(state: dict) -> tuple[Embedder, TrainConfig]:
    config = config_from_dict(TrainConfig, state["config"])
    model = create_embedder(config.model_name, config.dim, weights="none")
    model.load_state_dict(state["model"])
    return model, config


def load_embedder(path: str | os.PathLike, device: str | torch.device = "cpu") -> Embedder:
    """The trained embedder of a checkpoint file or run directory, in eval mode on ``device``.

    ``model.train_config`` is the run's :class:`TrainConfig` (image geometry, channels_last, ...).
    """
    model, config = embedder_from_checkpoint(load_checkpoint(path))
    model.train_config = config
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    return model.eval()


class CheckpointSaver:
    """Writes a run's checkpoints and keeps the newest ``keep`` of them (0: all)."""

    def __init__(self, run_dir: Path, keep: int = 0):
        self.run_dir = Path(run_dir)
        self.keep = keep

    def save(self, epoch: int, state: dict) -> Path:
        path = checkpoint_path(self.run_dir, epoch)
        with atomic_output(path) as temporary:
            torch.save({"format": CHECKPOINT_FORMAT, "epoch": epoch, **state}, temporary)
        self.prune()
        return path

    def prune(self) -> None:
        if self.keep > 0:
            for old in sorted((self.run_dir / CHECKPOINT_FOLDER).glob("epoch_*.pt"))[:-self.keep]:
                old.unlink()


__all__ = ["CheckpointSaver", "load_checkpoint", "find_checkpoint", "load_embedder", "embedder_from_checkpoint",
           "checkpoint_path", "CHECKPOINT_FORMAT"]
