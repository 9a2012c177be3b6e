"""The page's retrieval sections: the run's newest checkpoint embeds the evaluated split(s) again, and grids
show sampled queries and the worst ones with their nearest neighbours.

A run without checkpoints, a checkpoint that cannot be read, or a dataset that is no longer where the run
found it leaves a note (what is missing and why) instead of the grids.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import find_checkpoint, load_embedder, run_config_of
from ..config import ReportConfig, default_dataset_root
from ..data.images import ImageTransformConfig, decoder
from ..data.records import DatasetRecords
from ..model import Embedder
from ..runtime import loader_workers, resolve_device
from .figures import (
    CORRECT_COLOUR,
    QUERY_COLOUR,
    WRONG_COLOUR,
    Cell,
    retrieval_grid,
    short_label,
)
from .neighbours import (
    EmbeddedProtocol,
    QueryResult,
    embed_protocol,
    evaluate_protocol,
    query_results,
    sample_queries,
    worst_queries,
)
from .page import image, metric_cell, paragraph, section, table, text


@dataclass
class LoadedRun:
    model: Embedder
    records: DatasetRecords
    device: torch.device
    checkpoint: Path


def retrieval_sections(config: ReportConfig, run_dir: Path, ks: list[int], notes: list[str]) -> list[str]:
    """The retrieval sections, or one saying why there are none (and a note)."""
    loaded = load_run(config, run_dir, notes)
    protocol = _embed(loaded, config, notes) if loaded is not None else None
    if loaded is None or protocol is None:
        return [section("retrieval", "Retrieval", [paragraph("No retrieval grids: see \u201cMissing from this "
                                                             "report\u201d at the top.")])]
    result = evaluate_protocol(protocol, ks, loaded.device)
    per_query = result["per_query"]["float"]
    sampled = query_results(protocol, sample_queries(len(protocol.query), config.queries, config.seed), per_query,
                            config.k)
    worst = query_results(protocol, worst_queries(per_query, config.worst), per_query, config.k)
    return [_overview(loaded, protocol, result, ks),
            _grid_section("samples", "Retrieval: sampled queries",
                          f"{len(sampled)} queries drawn at random (seed {config.seed}), each followed by its "
                          f"{config.k} nearest neighbours by cosine similarity.", sampled, protocol, loaded.records),
            _grid_section("worst", "Retrieval: worst queries",
                          "The queries with the lowest average precision (AP at R); among equal AP, the one whose "
                          "first correct match ranks lowest first. Queries without any correct match in the "
                          "gallery are left out.", worst, protocol, loaded.records)]


def load_run(config: ReportConfig, run_dir: Path, notes: list[str]) -> LoadedRun | None:
    """The newest checkpoint's embedder and the run's dataset, or None with a note saying what is missing."""
    from ..data.registry import load_dataset

    try:
        checkpoint = find_checkpoint(run_dir)
    except FileNotFoundError:
        notes.append(f"{run_dir / 'checkpoints'}: no checkpoint (epoch_*.pt), so no retrieval grids")
        return None
    device = resolve_device(config.device)
    try:
        model = load_embedder(checkpoint, device)
    except (ValueError, RuntimeError, KeyError) as error:  # unreadable, or weights that do not fit the model
        notes.append(f"{checkpoint}: cannot be loaded ({error}), so no retrieval grids")
        return None
    train = run_config_of(model)
    root = config.dataset_root or train.dataset_root
    try:
        root = root or default_dataset_root(train.dataset)
        records = load_dataset(train.dataset, root)
    except (OSError, ValueError) as error:  # DatasetError is a ValueError
        notes.append(f"the run's dataset ({train.dataset} at {root or 'its default location'}) cannot be read: "
                     f"{error}. No retrieval grids; give --dataset_root where the dataset is now.")
        return None
    return LoadedRun(model, records, device, checkpoint)


def _embed(loaded: LoadedRun, config: ReportConfig, notes: list[str]) -> EmbeddedProtocol | None:
    from ..data.cache import find_cache
    from ..embedding.embed import run_amp

    train = run_config_of(loaded.model)
    transform = ImageTransformConfig.of(train)
    # The run's evaluations read the image cache when there was one; the same pixels give the same ranks.
    cache = find_cache(loaded.records, transform) if train.use_cache else None
    # The run's precision (as its evaluations used): the grids' recomputed metrics are then the logged ones.
    amp = run_amp(loaded.model, "auto", loaded.device)
    try:
        return embed_protocol(loaded.model, loaded.records, transform, config.batch_size, loaded.device,
                              loader_workers(config.workers), amp, cache)
    except (OSError, ValueError) as error:  # an image moved or damaged since the dataset was read
        notes.append(f"the images of {loaded.records.root} cannot all be read ({error}), so no retrieval grids")
        return None


def _overview(loaded: LoadedRun, protocol: EmbeddedProtocol, result: dict, ks: list[int]) -> str:
    """Which checkpoint and images the grids come from, and its Recall@K recomputed here (the grids' numbers)."""
    match = re.search(r"epoch_(\d+)", loaded.checkpoint.name)
    epoch = int(match.group(1)) if match else None
    mode = ("leave-one-out over the test split (a query is never its own neighbour)" if protocol.leave_one_out
            else f"{len(protocol.query)} queries against a gallery of {len(protocol.gallery)}")
    rows = [(f"R@{k}", metric_cell(result["float"][f"recall@{k}"]), metric_cell(result["binary"][f"recall@{k}"]))
            for k in ks]
    rows.append(("MAP@R", metric_cell(result["float"]["map@r"]), metric_cell(result["binary"]["map@r"])))
    train = run_config_of(loaded.model)
    precision = ("" if train.amp == "none" or loaded.device.type == "cuda" else
                 f" in float32 (the run evaluated in {train.amp} on its own device, so the last digits can differ "
                 "from its log)")
    return section("retrieval", "Retrieval", [
        paragraph(f"Checkpoint {loaded.checkpoint} (epoch {epoch}), dataset {loaded.records.name} at "
                  f"{loaded.records.root}: {len(protocol.query)} queries, {mode}. Its metrics, recomputed for "
                  f"these grids on {loaded.device}{precision}:"),
        table(["metric", "float", "binary"], rows, "recomputed")])


def _grid_section(section_id: str, title: str, explanation: str, results: list[QueryResult],
                  protocol: EmbeddedProtocol, records: DatasetRecords) -> str:
    if not results:
        return section(section_id, title, [paragraph(explanation), paragraph("No queries to show.")])
    grid = retrieval_grid([_grid_row(result, protocol) for result in results], decoder(records.decode))
    caption = table(["query", "AP", "first correct"] + [f"{rank}" for rank in range(1, len(results[0].neighbours) + 1)],
                    [_caption_row(result, protocol, records.root) for result in results], f"{section_id}-neighbours")
    return section(section_id, title, [
        paragraph(explanation + " Frames: blue the query, green a correct neighbour (same class), red a wrong one; "
                                "the number is the cosine similarity."),
        (f"<figure>{image(grid, title)}<details><summary>the same as a table</summary><figcaption>{caption}"
         "</figcaption></details></figure>")])


def _grid_row(result: QueryResult, protocol: EmbeddedProtocol) -> list[Cell]:
    names = protocol.query.class_names
    rank = result.first_correct_rank if result.first_correct_rank is not None else "none"
    row = [Cell(protocol.query.paths[result.index],
                f"query {short_label(names[protocol.query.labels[result.index]])}\nAP {result.average_precision:.2f}, "
                f"1st hit {rank}", QUERY_COLOUR)]
    for position, neighbour in enumerate(result.neighbours, start=1):
        label = protocol.gallery.class_names[protocol.gallery.labels[neighbour.index]]
        caption = f"{position}. {neighbour.score:.3f}\n{short_label(label)}"
        row.append(Cell(protocol.gallery.paths[neighbour.index], caption,
                        CORRECT_COLOUR if neighbour.correct else WRONG_COLOUR))
    return row


def _caption_row(result: QueryResult, protocol: EmbeddedProtocol, root: str) -> list:
    """The grid row as table cells: each image's class (in a ``label`` span) and file, and the score."""

    def described(image_set, index: int, extra: str = "") -> str:
        label = image_set.class_names[image_set.labels[index]]
        file = os.path.relpath(image_set.paths[index], root)
        return f'<span class="label">{text(label)}</span>{extra}<br><small>{text(file)}</small>'

    cells = [(described(protocol.query, result.index), "query"), metric_cell(result.average_precision, 3),
             metric_cell(result.first_correct_rank)]
    for neighbour in result.neighbours:
        mark = " \u2713" if neighbour.correct else " \u2717"
        cells.append((described(protocol.gallery, neighbour.index, f"{mark} {neighbour.score:.3f}"),
                      "hit" if neighbour.correct else "miss"))
    return cells


__all__ = ["retrieval_sections", "load_run"]
