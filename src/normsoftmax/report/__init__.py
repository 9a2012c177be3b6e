"""``normsoftmax report RUN_DIR``: one self-contained HTML page about a training run.

The page shows what the run recorded (its configuration, the loss and learning-rate curves from its
TensorBoard events, Recall@1 at each evaluation from ``metrics.jsonl``, Recall@K float against binary at
the last evaluation) and what its newest checkpoint retrieves (grids of sampled queries and of the worst
queries, each neighbour framed green when correct and red when not). Every figure is a PNG inside the
page; nothing else is written. Parts that cannot be shown (no checkpoint, no evaluation, a dataset that
moved) are listed at the top of the page and logged as warnings; the rest of the page is still written.

Modules: :mod:`.history` reads the logs, :mod:`.neighbours` ranks, :mod:`.figures` draws,
:mod:`.sections` and :mod:`.grids` make the page's sections, :mod:`.page` the HTML.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ..config import ReportConfig, TrainConfig, config_from_dict, recall_ks
from ..files import atomic_write
from .grids import retrieval_sections
from .history import evaluation_ks, read_history
from .page import document, missing_section, paragraph
from .sections import calibration_section, recall_section, summary_section, training_section

logger = logging.getLogger(__name__)


def write_report(config: ReportConfig) -> Path:
    """Write the report of ``config.run_dir`` to ``config.out`` (default ``RUN_DIR/report.html``); returns its path.

    Raises ``FileNotFoundError`` when the run directory does not exist and ``ValueError`` for bad options;
    anything missing inside the run directory is reported on the page instead.
    """
    run_dir = _run_directory(config)
    _check_options(config)
    out = Path(config.out) if config.out else run_dir / "report.html"
    started = time.perf_counter()
    notes: list[str] = []
    train_config = _recorded_config(run_dir, notes)
    history = read_history(run_dir)
    notes.extend(history.notes)
    last = history.last_evaluation
    ks = evaluation_ks(last) if last else _configured_ks(train_config)
    parts = [summary_section(run_dir, train_config, history), training_section(history), recall_section(history),
             calibration_section(_calibration(run_dir, notes), str(run_dir / "calibration.json"))]
    parts += retrieval_sections(config, run_dir, ks, notes)
    for note in notes:
        logger.warning("report: %s", note)
    footer = paragraph(f"Written by normsoftmax report in {time.perf_counter() - started:.1f} s on "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S')}.")
    atomic_write(out, document(f"Training run {run_dir.resolve()}", [missing_section(notes), *parts, footer]))
    return out


def _run_directory(config: ReportConfig) -> Path:
    if not config.run_dir:
        raise ValueError("report needs a run directory")
    run_dir = Path(config.run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory" if not run_dir.exists()
                                else f"{run_dir}: not a run directory (a file)")
    return run_dir


def _check_options(config: ReportConfig) -> None:
    checks = [(config.queries >= 0, f"queries must not be negative, got {config.queries}"),
              (config.worst >= 0, f"worst must not be negative, got {config.worst}"),
              (config.k >= 1, f"k must be positive, got {config.k}"),
              (config.batch_size >= 1, f"batch_size must be positive, got {config.batch_size}"),
              (config.workers >= -1, f"workers must be -1 (automatic) or more, got {config.workers}")]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def _recorded_config(run_dir: Path, notes: list[str]) -> TrainConfig | None:
    """The run's resolved config (``config.json``, written before anything else), or None with a note."""
    path = run_dir / "config.json"
    try:
        return config_from_dict(TrainConfig, json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        notes.append(f"{path}: not found, so the run's settings are not shown")
    except (ValueError, TypeError) as error:  # not JSON, or not a dict of fields
        notes.append(f"{path}: cannot be read as a training config ({error})")
    return None


def _calibration(run_dir: Path, notes: list[str]) -> dict | None:
    """The run's calibration.json, when it has one (a note when it cannot be read)."""
    path = run_dir / "calibration.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        notes.append(f"{path}: cannot be read ({error})")
        return None


def _configured_ks(train_config: TrainConfig | None) -> list[int]:
    """The Recall@K cut-offs of a run that has not been evaluated yet: its own, else its dataset's."""
    if train_config is None:
        return [1, 2, 4, 8]
    try:
        return list(train_config.ks or recall_ks(train_config.dataset))
    except ValueError:  # a dataset name this version does not know
        return [1, 2, 4, 8]


__all__ = ["write_report"]
