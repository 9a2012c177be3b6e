"""Checkpoints: what a training run saves, how it is made durable, found again, and turned back into an
embedder (:func:`load_embedder`).

A checkpoint holds everything a run needs to continue exactly: model, proxies, optimizer, scaler, the
position (completed epochs, and the step inside the next epoch for a mid-epoch checkpoint), every RNG's
state and the resolved config. Files live in ``RUN_DIR/checkpoints``:

``epoch_NNN.pt``               after NNN complete epochs
``epoch_NNN_step_SSSSSS.pt``   in the middle of epoch NNN+1, after SSSSSS of its steps (pre-emption, or
                               every ``checkpoint_every_minutes``); removed once a later epoch is saved
``*.pt.sha256``                the checksum of each, written after it
``best.pt``, ``best.json``     a hard link to the checkpoint with the best float Recall@1, and which it is

Writes go through :func:`normsoftmax.files.atomic_output` with fsync of the file and the folder, so a crash
or a full disk leaves the previous checkpoints as they were. :func:`find_resumable` skips a newest
checkpoint that is truncated or fails its checksum, with a warning naming it and the one used instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

import torch

from .config import TrainConfig, config_from_dict
from .faults import failpoint
from .files import (
    NotEnoughSpaceError,
    atomic_output,
    atomic_write,
    ensure_free_space,
    file_sha256,
)
from .model import Embedder, create_embedder

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
CHECKPOINT_FOLDER = "checkpoints"
_NAME = re.compile(r"^epoch_(\d{3,})(?:_step_(\d{6,}))?\.pt$")


def checkpoint_path(run_dir: Path, epoch: int, step: int = 0) -> Path:
    name = f"epoch_{epoch:03d}.pt" if not step else f"epoch_{epoch:03d}_step_{step:06d}.pt"
    return Path(run_dir) / CHECKPOINT_FOLDER / name


def checkpoint_position(path: Path) -> tuple[int, int] | None:
    """(complete epochs, steps into the next) from a checkpoint's name; None for other files."""
    match = _NAME.match(Path(path).name)
    return (int(match.group(1)), int(match.group(2) or 0)) if match else None


def _position(path: Path) -> tuple[int, int]:
    position = checkpoint_position(path)
    if position is None:
        raise ValueError(f"{path}: not a checkpoint name (epoch_NNN.pt or epoch_NNN_step_SSSSSS.pt)")
    return position


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """A run's checkpoints, oldest position first."""
    folder = Path(run_dir) / CHECKPOINT_FOLDER
    found = [p for p in folder.glob("epoch_*.pt") if checkpoint_position(p)] if folder.is_dir() else []
    return sorted(found, key=_position)


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or the newest one of a run directory."""
    path = Path(path)
    if path.is_file():
        return path
    found = list_checkpoints(path) if path.is_dir() else []
    if not found:
        raise FileNotFoundError(f"{path}: no checkpoint file, and no run directory with checkpoints/epoch_*.pt")
    return found[-1]


def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def load_checkpoint(path: str | os.PathLike, verify: bool = True) -> dict:
    """The checkpoint at ``path`` (a file, or a run directory's newest), as a dict of tensors and plain values.

    With ``verify``, a checkpoint whose ``.sha256`` file disagrees with its bytes is refused.
    """
    file = find_checkpoint(path)
    checksum = _checksum_path(file)
    if verify and checksum.exists():
        expected = checksum.read_text().split()[0] if checksum.read_text().strip() else ""
        if file_sha256(file) != expected:
            raise ValueError(f"{file}: does not match its checksum {checksum.name} (truncated or corrupted)")
    try:
        # weights_only: a checkpoint handed to `evaluate` cannot run code; it holds only tensors and plain values.
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = f"{type(error).__name__}: {error}"
        raise ValueError(f"{file}: cannot be read as a normsoftmax checkpoint ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{file}: not a normsoftmax checkpoint")
    return state


def find_resumable(run_dir: str | os.PathLike) -> tuple[Path, dict] | None:
    """The newest checkpoint of a run that reads back and matches its checksum, with its state; None if none.

    Broken newer checkpoints (a crash mid-write on a file system without atomic rename, a truncated copy)
    are skipped with a warning naming them and the checkpoint used instead.
    """
    broken = []
    for file in reversed(list_checkpoints(run_dir)):
        try:
            state = load_checkpoint(file)
        except ValueError as error:
            broken.append((file, error))
            continue
        for bad, reason in broken:
            logger.warning("skipping the unusable checkpoint %s (%s); resuming from %s instead", bad, reason, file)
        return file, state
    for bad, reason in broken:
        logger.warning("the checkpoint %s is unusable (%s)", bad, reason)
    return None


def embedder_from_checkpoint(state: dict) -> tuple[Embedder, TrainConfig]:
    config = config_from_dict(TrainConfig, state["config"])
    model = create_embedder(config.model_name, config.dim, weights="none")
    model.load_state_dict(state["model"])
    return model, config


def model_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a model's weights (names, shapes, dtypes, bytes): the same for every copy of the same
    weights, whatever else a checkpoint holds (optimizer, epoch)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def load_embedder(path: str | os.PathLike, device: str | torch.device = "cpu") -> Embedder:
    """The trained embedder of a checkpoint file or run directory, in eval mode on ``device``.

    ``model.train_config`` is the run's :class:`TrainConfig` (image geometry, channels_last, ...),
    ``model.checkpoint`` the file it came from and ``model.digest`` its :func:`model_digest`.
    """
    path = Path(path)
    found = find_resumable(path) if path.is_dir() else None
    file = found[0] if found else find_checkpoint(path)
    model, config = embedder_from_checkpoint(found[1] if found else load_checkpoint(file))
    model.train_config = config
    model.checkpoint = str(file.resolve())
    model.digest = model_digest(model)
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    return model.eval()


def run_config_of(model: Embedder) -> TrainConfig:
    """The config of the training run ``model`` comes from (recorded by :func:`load_embedder`)."""
    if model.train_config is None:
        raise ValueError("this embedder does not come from a training run: load it with normsoftmax.load_embedder")
    return model.train_config


def digest_of(model: Embedder) -> str:
    """``model``'s :func:`model_digest`, as recorded when it was loaded (computed now otherwise)."""
    return model.digest or model_digest(model)


class CheckpointSaver:
    """Writes a run's checkpoints durably, keeps the newest ``keep`` epoch checkpoints (0: all) plus the best
    by float Recall@1, and removes mid-epoch checkpoints once a later one exists."""

    def __init__(self, run_dir: Path, keep: int = 0):
        self.run_dir = Path(run_dir)
        self.keep = keep

    def save(self, epoch: int, state: dict, step: int = 0) -> Path:
        """Write the checkpoint of ``epoch`` complete epochs (and ``step`` steps into the next)."""
        path = checkpoint_path(self.run_dir, epoch, step)
        needed = sum(t.numel() * t.element_size() for t in _tensors(state))
        ensure_free_space(path.parent, needed * 1.05 + (1 << 20), f"the checkpoint {path.name}")
        _checksum_path(path).unlink(missing_ok=True)  # a stale checksum must never describe the new file
        try:
            with atomic_output(path, durable=True) as temporary:
                torch.save({"format": CHECKPOINT_FORMAT, "epoch": epoch, "step": step, **state}, temporary)
                failpoint("checkpoint")
            atomic_write(_checksum_path(path), f"{file_sha256(path)}  {path.name}\n", durable=True)
        except NotEnoughSpaceError as error:
            raise NotEnoughSpaceError(error.errno, f"{error.strerror}; the checkpoint needs about "
                                                   f"{needed / 2**20:.0f} MiB") from None
        except RuntimeError as error:  # torch's zip writer reports a failed write (a full disk) this way
            raise NotEnoughSpaceError(28, f"writing {path} failed ({error}); the checkpoint needs about "
                                          f"{needed / 2**20:.0f} MiB and the previous checkpoints are "
                                          "unchanged") from None
        self.prune(path)
        return path

    def mark_best(self, epoch: int, recall_at_1: float) -> bool:
        """Record epoch ``epoch``'s checkpoint as the best when its Recall@1 beats the recorded best."""
        record = self.run_dir / CHECKPOINT_FOLDER / "best.json"
        try:
            best = json.loads(record.read_text())
        except (OSError, ValueError):
            best = None
        source = checkpoint_path(self.run_dir, epoch)
        if (best is not None and best.get("recall@1", -1) >= recall_at_1) or not source.exists():
            return False
        link = self.run_dir / CHECKPOINT_FOLDER / "best.pt"
        with atomic_output(link, durable=True) as temporary:
            try:
                os.link(source, temporary)  # no extra space; survives pruning of the epoch's own name
            except OSError:
                import shutil

                shutil.copyfile(source, temporary)
        best = {"epoch": epoch, "file": source.name, "recall@1": recall_at_1}
        atomic_write(record, json.dumps(best, indent=1) + "\n", durable=True)
        return True

    def prune(self, newest: Path) -> None:
        """Drop mid-epoch checkpoints older than ``newest`` and epoch checkpoints beyond the newest ``keep``."""
        position = _position(newest)
        epochs = []
        for file in list_checkpoints(self.run_dir):
            epoch, step = _position(file)
            if step and (epoch, step) < position:
                self._remove(file)
            elif not step:
                epochs.append(file)
        if self.keep > 0:
            for old in epochs[:-self.keep]:
                self._remove(old)

    @staticmethod
    def _remove(file: Path) -> None:
        file.unlink(missing_ok=True)
        _checksum_path(file).unlink(missing_ok=True)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


__all__ = ["run_config_of", "digest_of",
           "CheckpointSaver", "load_checkpoint", "find_checkpoint", "find_resumable", "list_checkpoints",
           "load_embedder", "embedder_from_checkpoint", "model_digest", "checkpoint_path", "checkpoint_position",
           "CHECKPOINT_FORMAT"]
