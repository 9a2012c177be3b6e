"""What a run logged while it trained: its TensorBoard scalars and its evaluations (``metrics.jsonl``).

Both are read as they are on disk; whatever is absent or unreadable becomes a note for the page (the
report is still written), never an exception.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# The scalars the trainer logs (training/recipe.py): per step, possibly only every N steps...
STEP_SCALARS = ("train/loss", "train/lr")
# ...and per epoch (the step is the 1-based epoch number).
EPOCH_SCALARS = ("train/epoch_loss", "train/images_per_second")


@dataclass
class Series:
    """One scalar over training: ``values[i]`` was logged at ``steps[i]``."""

    steps: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.steps)


@dataclass
class RunHistory:
    scalars: dict[str, Series] = field(default_factory=dict)  # tag -> series, only the tags that were logged
    evaluations: list[dict] = field(default_factory=list)  # metrics.jsonl entries, one per evaluated epoch, in order
    notes: list[str] = field(default_factory=list)  # what is missing or unreadable, for the page

    @property
    def last_evaluation(self) -> dict | None:
        return self.evaluations[-1] if self.evaluations else None


def read_history(run_dir: Path) -> RunHistory:
    history = RunHistory()
    history.scalars = read_scalars(run_dir / "tensorboard", history.notes)
    history.evaluations = read_evaluations(run_dir / "metrics.jsonl", history.notes)
    return history


def read_scalars(folder: Path, notes: list[str]) -> dict[str, Series]:
    """The trainer's scalars from the event files in ``folder`` (all of them, in order: a resumed run's too)."""
    if not folder.is_dir() or not any(folder.glob("*tfevents*")):
        notes.append(f"{folder}: no TensorBoard event files, so no loss or learning-rate curves")
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # size_guidance 0 keeps every point; the default keeps a random sample of 10,000 per tag.
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    try:
        accumulator.Reload()
    except Exception as error:  # noqa: BLE001 -- tensorboard's reader raises its own types for damaged files
        notes.append(f"{folder}: the TensorBoard event files cannot be read ({type(error).__name__}: {error})")
        return {}
    logged = set(accumulator.Tags().get("scalars", []))
    scalars = {}
    for tag in STEP_SCALARS + EPOCH_SCALARS:
        if tag not in logged:
            notes.append(f"{folder}: the scalar {tag} was not logged")
            continue
        events = accumulator.Scalars(tag)
        scalars[tag] = Series(np.array([event.step for event in events], dtype=np.int64),
                              np.array([event.value for event in events], dtype=np.float64))
    return scalars


def read_evaluations(path: Path, notes: list[str]) -> list[dict]:
    """The entries of ``metrics.jsonl``; when an epoch was evaluated twice (a resumed run repeats the
    evaluations after its checkpoint), the later entry counts."""
    if not path.is_file():
        notes.append(f"{path}: not found, so the run has no evaluations to show (no Recall@K curves or table)")
        return []
    by_epoch: dict[int, dict] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            notes.append(f"{path}, line {number}: not JSON ({error.msg}); skipped")
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("float"), dict) or "epoch" not in entry:
            notes.append(f"{path}, line {number}: not an evaluation (no epoch and float metrics); skipped")
            continue
        by_epoch[int(entry["epoch"])] = entry
    if not by_epoch:
        notes.append(f"{path}: holds no evaluations")
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def evaluation_ks(entry: dict) -> list[int]:
    """The Recall@K cut-offs of an evaluation: its ``ks``, or (older entries) the K of its recall@K keys."""
    if entry.get("ks"):
        return [int(k) for k in entry["ks"]]
    return sorted(int(key.split("@", 1)[1]) for key in entry["float"] if key.startswith("recall@"))


__all__ = ["RunHistory", "Series", "read_history", "read_scalars", "read_evaluations", "evaluation_ks",
           "STEP_SCALARS", "EPOCH_SCALARS"]
