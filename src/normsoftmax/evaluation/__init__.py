"""Evaluation: the exact ranking engine (:mod:`.ranking`), retrieval metrics on embeddings
(:mod:`.metrics`), a dataset's protocol applied to a model (:mod:`.protocol`), and the ``evaluate``
command (:mod:`.command`)."""

from .command import evaluate_checkpoint
from .metrics import (
    CONVENTION,
    evaluate_embeddings,
    format_recall_lines,
    nmi_by_default,
)
from .protocol import evaluate_model, recall_report

__all__ = ["evaluate_embeddings", "evaluate_model", "evaluate_checkpoint", "format_recall_lines", "recall_report",
           "nmi_by_default", "CONVENTION"]
