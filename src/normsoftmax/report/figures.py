"""The report's figures, each returned as PNG bytes: training curves, Recall@K float against binary, and
retrieval grids (a query, then its neighbours framed green when correct and red when not).

Figures are built on :class:`matplotlib.figure.Figure` directly, not pyplot: no global figure state and
no GUI backend, so a report can be written from any thread or a headless machine.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from PIL import Image

from .history import RunHistory, Series, evaluation_ks

DPI = 100
# Frame colours of the grids; the frames are solid lines, so these exact RGB values are in the PNG.
QUERY_COLOUR = "#2c7bb6"
CORRECT_COLOUR = "#1a9641"
WRONG_COLOUR = "#d7191c"
FRAME_POINTS = 3.0
THUMBNAIL_PIXELS = 96  # images are shrunk to this before plotting: the page stays small at any dataset's size
CELL_INCHES = 1.0
IMAGE_SIZE = 0.86  # of a cell's width: the rest separates the frames
CAPTION_HEIGHT = 0.3  # of a cell's width, above each image: two lines of small text
LABEL_CHARACTERS = 16


def png_bytes(figure: Figure) -> bytes:
    """The figure as an RGB PNG (matplotlib writes RGBA; the page needs no transparency, 15 % smaller)."""
    rendered, buffer = io.BytesIO(), io.BytesIO()
    figure.savefig(rendered, format="png", dpi=DPI)
    Image.open(rendered).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------ curves
def training_curves(history: RunHistory) -> bytes:
    """Loss and learning rate per step, mean loss and throughput per epoch, Recall@1 per evaluation."""
    figure = Figure(figsize=(11, 7))
    # Fixed margins, not a layout engine: constrained layout measures every tick label, a second per figure.
    (loss, lr), (epochs, recall) = figure.subplots(2, 2, gridspec_kw={
        "left": 0.07, "right": 0.93, "bottom": 0.08, "top": 0.95, "wspace": 0.3, "hspace": 0.3})
    scalars = history.scalars
    _plot_step_series(loss, scalars.get("train/loss"), "loss per step", smooth=True)
    _plot_step_series(lr, scalars.get("train/lr"), "learning rate per step")
    _plot_epoch_series(epochs, scalars.get("train/epoch_loss"), scalars.get("train/images_per_second"))
    _plot_recall_history(recall, history.evaluations)
    return png_bytes(figure)


def _plot_step_series(axes, series: Series | None, title: str, smooth: bool = False) -> None:
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if series is None or len(series) == 0:
        _say_missing(axes, "not logged")
        return
    axes.plot(series.steps, series.values, color="tab:blue", alpha=0.35 if smooth else 1.0, lw=1, label="logged")
    window = max(1, len(series) // 50)
    if smooth and window > 1:
        # a centred moving average: per-step losses of small batches are too noisy to read a trend from
        averaged = np.convolve(series.values, np.ones(window) / window, mode="valid")
        axes.plot(series.steps[window // 2:window // 2 + len(averaged)], averaged, color="tab:blue", lw=2,
                  label=f"mean of {window} points")
        axes.legend(loc="upper right")
    axes.grid(alpha=0.3)


def _plot_epoch_series(axes, loss: Series | None, speed: Series | None) -> None:
    axes.set_title("mean loss and images/s per epoch")
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if not loss and not speed:
        _say_missing(axes, "not logged")
        return
    if loss:
        axes.plot(loss.steps, loss.values, "o-", color="tab:blue", label="mean loss")
        axes.set_ylabel("mean loss", color="tab:blue")
    if speed:
        twin = axes.twinx()
        twin.plot(speed.steps, speed.values, "s--", color="tab:orange", label="images/s")
        twin.set_ylabel("images/s", color="tab:orange")
        twin.set_ylim(bottom=0)
    axes.grid(alpha=0.3)


def _plot_recall_history(axes, evaluations: list[dict]) -> None:
    axes.set_title("Recall@1 at each evaluation")
    axes.set_xlabel("epoch (warm-up included)")
    axes.set_ylabel("Recall@1 (%)")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    with_recall = [entry for entry in evaluations if "recall@1" in entry["float"]]
    if not with_recall:
        _say_missing(axes, "no evaluations" if not evaluations else "Recall@1 not evaluated")
        return
    epochs = [entry["epoch"] for entry in with_recall]
    axes.plot(epochs, [entry["float"]["recall@1"] for entry in with_recall], "o-", label="float (cosine)")
    binary = [entry for entry in with_recall if "recall@1" in (entry.get("binary") or {})]
    if binary:
        axes.plot([entry["epoch"] for entry in binary], [entry["binary"]["recall@1"] for entry in binary], "s--",
                  label="binary (Hamming)")
    axes.legend(loc="best")
    axes.grid(alpha=0.3)


def recall_at_k(evaluation: dict) -> bytes:
    """Recall@K of one evaluation, float against binary, K on a log scale."""
    ks = evaluation_ks(evaluation)
    figure = Figure(figsize=(5.5, 3.8))
    axes = figure.subplots(gridspec_kw={"left": 0.13, "right": 0.97, "bottom": 0.14, "top": 0.91})
    for kind, style in (("float", "o-"), ("binary", "s--")):
        metrics = evaluation.get(kind) or {}
        shown = [k for k in ks if metrics.get(f"recall@{k}") is not None]
        if shown:
            axes.plot(shown, [metrics[f"recall@{k}"] for k in shown], style, label=kind)
    axes.set_xscale("log", base=2)
    axes.set_xticks(ks, [str(k) for k in ks])
    axes.set_xlabel("K")
    axes.set_ylabel("Recall@K (%)")
    axes.set_title(f"Recall@K at epoch {evaluation['epoch']}")
    axes.grid(alpha=0.3)
    axes.legend(loc="best")
    return png_bytes(figure)


def _say_missing(axes, text: str) -> None:
    axes.text(0.5, 0.5, text, ha="center", va="center", transform=axes.transAxes, color="grey")
    axes.set_xticks([])
    axes.set_yticks([])


# ------------------------------------------------------------------------------------------------ grids
@dataclass
class Cell:
    """One picture of a grid: an image file, its caption, and its frame (query, correct or wrong)."""

    path: str
    caption: str
    colour: str


def retrieval_grid(rows: list[list[Cell]], load_image) -> bytes:
    """One row per query: its cells left to right; ``load_image(path)`` gives a PIL image.

    The grid is one axes in cell units (a cell is 1 wide, 1 + caption tall), each thumbnail an image placed
    at its cell: one axes per cell would cost matplotlib's layout work per cell (seconds for a 16 x 9 grid).
    """
    columns = max(len(row) for row in rows)
    height = 1 + CAPTION_HEIGHT
    figure = Figure(figsize=(columns * CELL_INCHES, len(rows) * height * CELL_INCHES))
    axes = figure.add_axes((0, 0, 1, 1))
    axes.set_axis_off()
    for row, cells in enumerate(rows):
        for column, cell in enumerate(cells):
            _draw_cell(axes, cell, column + (1 - IMAGE_SIZE) / 2, row * height + CAPTION_HEIGHT, load_image)
    axes.set_xlim(0, columns)
    axes.set_ylim(len(rows) * height, 0)  # rows from the top down
    return png_bytes(figure)


def _draw_cell(axes, cell: Cell, left: float, top: float, load_image) -> None:
    """The thumbnail centred in an IMAGE_SIZE box at (left, top), its frame, and its caption above."""
    try:
        image = np.asarray(_thumbnail(load_image(cell.path)))
    except (OSError, ValueError):  # a file gone since the embeddings were computed, or damaged: a grey square
        image = np.full((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS, 3), 230, dtype=np.uint8)
        axes.text(left + IMAGE_SIZE / 2, top + IMAGE_SIZE / 2, "unreadable", ha="center", va="center", fontsize=6)
    scale = IMAGE_SIZE / max(image.shape[:2])
    width, height = image.shape[1] * scale, image.shape[0] * scale
    x0, y0 = left + (IMAGE_SIZE - width) / 2, top + (IMAGE_SIZE - height) / 2
    # aspect "auto": the figure is sized in cell units already, so square pixels stay square
    axes.imshow(image, extent=(x0, x0 + width, y0 + height, y0), aspect="auto", interpolation="antialiased")
    # One closed rectangle: each frame is a single unbroken ring of its colour.
    axes.add_patch(Rectangle((x0, y0), width, height, fill=False, edgecolor=cell.colour, linewidth=FRAME_POINTS,
                             joinstyle="miter"))
    axes.text(left + IMAGE_SIZE / 2, y0 - 0.04, cell.caption, ha="center", va="bottom", fontsize=6, linespacing=1.1)


def _thumbnail(image):
    image.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
    return image


def short_label(text: str) -> str:
    """A class name cut to fit under a thumbnail."""
    return text if len(text) <= LABEL_CHARACTERS else text[:LABEL_CHARACTERS - 1] + "…"


__all__ = ["training_curves", "recall_at_k", "retrieval_grid", "Cell", "short_label", "png_bytes", "QUERY_COLOUR",
           "CORRECT_COLOUR", "WRONG_COLOUR"]


# ------------------------------------------------------------------------------------------------ calibration
def calibration_curves(calibration: dict) -> bytes:
    """Precision against recall, and FNMR against FMR (log scale), float against binary, measured on the held-out
    half of the classes; the chosen thresholds marked."""
    figure = Figure(figsize=(11, 4.2))
    left, right = figure.subplots(1, 2, gridspec_kw={"left": 0.07, "right": 0.98, "bottom": 0.14, "top": 0.9,
                                                      "wspace": 0.25})
    for kind, style in (("float", "-"), ("binary", "--")):
        calibrated = calibration.get("kinds", {}).get(kind)
        if not calibrated:
            continue
        curve = calibrated["curves"]["held_out"]
        left.plot(curve["recall"], curve["precision"], style, label=f"{kind} (held out)")
        fmr = np.maximum(np.asarray(curve["fmr"], dtype=float), 1e-9)
        right.plot(fmr, curve["fnmr"], style, label=f"{kind} (held out)")
        for decision in calibrated["decisions"]:
            if decision.get("reachable"):
                rates = decision["held_out"]
                left.plot(rates["recall"], rates["precision"], "o", color="black", markersize=4)
                right.plot(max(rates["fmr"], 1e-9), rates["fnmr"], "o", color="black", markersize=4)
    left.set_xlabel("recall (true match rate)")
    left.set_ylabel("precision")
    left.set_title("Precision-recall over pairs (dots: chosen thresholds)")
    right.set_xscale("log")
    right.set_xlabel("false match rate (FMR)")
    right.set_ylabel("false non-match rate (FNMR)")
    right.set_title("FMR-FNMR over pairs")
    for axes in (left, right):
        axes.grid(alpha=0.3)
        axes.legend(loc="best")
    return png_bytes(figure)
