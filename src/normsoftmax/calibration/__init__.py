"""Decisions, not only neighbours: match thresholds with known error rates, for cosine and for the paper's binary
codes. :mod:`.pairs` counts every pair exactly, :mod:`.thresholds` chooses on half of the classes and measures on
the other, :mod:`.command` is ``normsoftmax calibrate`` and the ``calibration.json`` it writes."""

from .command import (
    CALIBRATION_NAME,
    calibrate_checkpoint,
    decisions_of,
    read_calibration,
    read_decisions,
    run_calibration_for,
)
from .thresholds import Target, calibrate_thresholds

__all__ = ["calibrate_thresholds", "calibrate_checkpoint", "read_calibration", "decisions_of", "read_decisions",
           "run_calibration_for", "Target", "CALIBRATION_NAME"]
