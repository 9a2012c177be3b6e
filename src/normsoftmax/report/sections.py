"""The page's sections on what the run recorded: its configuration, its training curves and evaluations,
and Recall@K float against binary at its last evaluation."""

from __future__ import annotations

from pathlib import Path

from ..config import TrainConfig
from .figures import calibration_curves, recall_at_k, training_curves
from .history import RunHistory, evaluation_ks
from .page import image, metric_cell, paragraph, section, table, text


def summary_section(run_dir: Path, train_config: TrainConfig | None, history: RunHistory) -> str:
    rows = [("run directory", str(run_dir.resolve()))]
    if train_config is not None:
        c = train_config
        rows += [("dataset", f"{c.dataset} ({c.dataset_root or 'default location'})"),
                 ("model", f"{c.model_name}, {c.dim}-dimensional embeddings, weights {c.weights}"),
                 ("images", f"resize {c.resize}, crop {c.crop}{', keep aspect' if c.keep_aspect else ''}"),
                 ("training", (f"{c.total_epochs} epochs ({c.pretrain_epochs} warm-up), batch {c.batch_size}, "
                               f"{c.optimizer} lr {c.lr}, {c.scheduler} schedule, temperature {c.temperature}"))]
    evaluated = [entry["epoch"] for entry in history.evaluations]
    rows.append(("evaluations", f"{len(evaluated)} (epochs {', '.join(map(str, evaluated))})" if evaluated else "none"))
    return section("summary", "Run", [table(["", ""], rows)])


def training_section(history: RunHistory) -> str:
    parts = [image(training_curves(history), "training curves: loss, learning rate, epoch loss, Recall@1")]
    if history.scalars:
        parts.append(table(["scalar", "points", "steps", "last value"],
                           [(tag, len(series), f"{series.steps[0]}-{series.steps[-1]}", f"{series.values[-1]:.6g}")
                            for tag, series in history.scalars.items() if len(series)], "scalars"))
    if history.evaluations:
        parts.append(paragraph("Every evaluation of the run (metrics.jsonl). Recall@K, MAP@R and R-precision in "
                               "percent, NMI as a fraction; float: cosine similarity, binary: Hamming distance "
                               "of the sign bits."))
        rows = [(entry["epoch"], entry.get("main_epoch", "-") if entry.get("main_epoch") is not None else "-",
                 *(metric_cell(entry["float"].get(name)) for name in ("recall@1", "map@r", "r_precision")),
                 metric_cell((entry.get("binary") or {}).get("recall@1")), metric_cell(entry["float"].get("nmi"), 4))
                for entry in history.evaluations]
        parts.append(table(["epoch", "main epoch", "R@1 float", "MAP@R float", "R-precision float", "R@1 binary",
                            "NMI float"], rows, "evaluations"))
    return section("curves", "Training curves", parts)


def recall_section(history: RunHistory) -> str:
    last = history.last_evaluation
    if last is None:
        return section("recall", "Recall@K", [paragraph("No evaluation yet.")])
    floats, binary = last["float"], last.get("binary") or {}
    rows: list[tuple] = []  # a cell is a plain value or (html, css class): see page.table
    for k in evaluation_ks(last):
        key = f"recall@{k}"
        gap = binary[key] - floats[key] if binary.get(key) is not None and floats.get(key) is not None else None
        rows.append((f"R@{k}", metric_cell(floats.get(key)), metric_cell(binary.get(key)), metric_cell(gap)))
    rows += [("MAP@R", metric_cell(floats.get("map@r")), metric_cell(binary.get("map@r")), ""),
             ("R-precision", metric_cell(floats.get("r_precision")), metric_cell(binary.get("r_precision")), ""),
             ("NMI", metric_cell(floats.get("nmi"), 4), metric_cell(binary.get("nmi"), 4), "")]
    queries = last.get("num_queries")
    about = (f"Epoch {last['epoch']}" + (f" (main epoch {last['main_epoch']})" if last.get("main_epoch") else "")
             + (f", {queries} queries, {last.get('mode', '')}" if queries else "") + ".")
    return section("recall", "Recall@K at the last evaluation: float against binary",
                   [paragraph(about), table(["metric", "float", "binary", "binary - float"], rows, "recall-at-k"),
                    image(recall_at_k(last), "Recall@K, float against binary")])


__all__ = ["summary_section", "training_section", "recall_section"]


def calibration_section(calibration: dict | None, path: str) -> str:
    """The run's match thresholds (``normsoftmax calibrate``): per kind and target, the threshold and its rates
    on the held-out half of the classes, and the curves."""
    if calibration is None:
        return section("calibration", "Match thresholds", [paragraph(
            "Not calibrated: <code>normsoftmax calibrate RUN_DIR</code> chooses match thresholds with known error "
            "rates.")])
    rows: list[tuple] = []
    for kind, calibrated in calibration.get("kinds", {}).items():
        for decision in calibrated["decisions"]:
            if not decision.get("reachable"):
                rows.append((kind, decision["target"], "not reachable", "", "", "", ""))
                continue
            held = decision["held_out"]
            at = (f"Hamming ≤ {decision['hamming']}" if "hamming" in decision
                  else f"cosine ≥ {decision['threshold']:.4f}")
            rows.append((kind, decision["target"], at, metric_cell(100 * held["precision"]),
                         metric_cell(100 * held["recall"]), metric_cell(held["fmr"], 6),
                         metric_cell(100 * held["fnmr"])))
    split = calibration.get("split", {})
    about = (f"{calibration.get('images')} images of {calibration.get('classes')} classes "
             f"({calibration.get('source', {}).get('split', calibration.get('source', {}).get('kind', ''))}); "
             f"thresholds chosen on {split.get('fit', {}).get('classes')} classes, rates measured on the other "
             f"{split.get('held_out', {}).get('classes')}. {calibration.get('rule', '')}. From {path}.")
    return section("calibration", "Match thresholds", [
        paragraph(text(about)),
        table(["kind", "target", "threshold", "precision (%)", "recall (%)", "FMR", "FNMR (%)"], rows,
              table_id="calibration-table"),
        image(calibration_curves(calibration), "precision-recall and FMR-FNMR curves, float and binary")])
