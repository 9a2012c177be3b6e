"""The retrieval the grids show: a checkpoint's embeddings of the evaluated split(s), per-query metrics,
which queries to show, and each shown query's cosine nearest neighbours.

The protocol is the run's evaluation: leave-one-out over ``test`` (the query itself is never its own
neighbour), or ``query`` against ``gallery``. Neighbours are ranked by float64 cosine similarity, ties by
gallery index (lower first), the convention of :mod:`normsoftmax.evaluation.metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data.records import DatasetRecords, ImageSet
from ..embedding.embed import embed_dataset, eval_dataset
from ..evaluation.metrics import evaluate_embeddings

QUERY_BLOCK = 64  # queries ranked together: their sorted gallery rows are in memory at once


@dataclass
class EmbeddedProtocol:
    """The evaluated images and their embeddings; in leave-one-out mode the gallery is the query set."""

    query: ImageSet
    gallery: ImageSet
    query_embeddings: np.ndarray
    gallery_embeddings: np.ndarray
    leave_one_out: bool


@dataclass
class Neighbour:
    index: int  # into the gallery
    score: float  # cosine similarity to the query
    correct: bool  # same label as the query


@dataclass
class QueryResult:
    index: int  # into the query set
    neighbours: list[Neighbour]  # best first
    first_correct_rank: int | None  # 1-based rank of the first correct match in the whole gallery (None: none)
    average_precision: float  # AP at R, a fraction (0 without any correct match)
    num_positives: int


def embed_protocol(model: torch.nn.Module, records: DatasetRecords, transform, batch_size: int,
                   device: torch.device, workers: int, amp: str = "none", cache=None) -> EmbeddedProtocol:
    """Embed the split(s) the run evaluates, in the evaluation transform."""
    channels_last = bool(getattr(model.train_config, "channels_last", False))

    def embed(split: ImageSet) -> np.ndarray:
        dataset = eval_dataset(split.paths, split.labels, transform, cache, decode=records.decode)
        return embed_dataset(model, dataset, batch_size, device, workers, amp, channels_last)

    if records.query_gallery:
        query, gallery = records.split("query"), records.split("gallery")
        return EmbeddedProtocol(query, gallery, embed(query), embed(gallery), False)
    test_set = records.split("test")
    test = embed(test_set)
    return EmbeddedProtocol(test_set, test_set, test, test, True)


def evaluate_protocol(protocol: EmbeddedProtocol, ks: list[int], device: torch.device) -> dict:
    """The evaluation object with ``per_query`` arrays (no NMI: the report does not show it again)."""
    if protocol.leave_one_out:
        return evaluate_embeddings(protocol.query_embeddings, protocol.query.labels, ks=ks, nmi=False, device=device,
                                   return_per_query=True)
    return evaluate_embeddings(query_embeddings=protocol.query_embeddings, query_labels=protocol.query.labels,
                               gallery_embeddings=protocol.gallery_embeddings, gallery_labels=protocol.gallery.labels,
                               ks=ks, nmi=False, device=device, return_per_query=True)


def sample_queries(num_queries: int, count: int, seed: int) -> np.ndarray:
    """``count`` distinct query indices drawn with ``seed``, in index order."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_queries, size=min(count, num_queries), replace=False))


def worst_queries(per_query: dict, count: int) -> np.ndarray:
    """The ``count`` queries with the lowest average precision; among equal AP, the one whose first correct
    match ranks lowest first (``-1``: beyond the evaluated ranks), then by index. Queries without any correct
    match in the gallery are left out: no embedding could retrieve anything for them."""
    ap = per_query["average_precision"]
    first = per_query["first_positive_rank"].astype(np.float64)
    first[first < 0] = np.inf
    candidates = np.flatnonzero(per_query["num_positives"] > 0)
    order = np.lexsort((candidates, -first[candidates], ap[candidates]))
    return candidates[order[:count]]


def query_results(protocol: EmbeddedProtocol, queries: np.ndarray, per_query: dict, k: int) -> list[QueryResult]:
    """Each query's ``k`` nearest neighbours and the rank of its first correct match."""
    if len(queries) == 0:
        return []
    results = []
    for block in np.array_split(queries, -(-len(queries) // QUERY_BLOCK)):  # sorted score rows: block x gallery
        order, scores = ranked_gallery(protocol.query_embeddings[block], protocol.gallery_embeddings,
                                       block if protocol.leave_one_out else None)
        for row, query in enumerate(block.tolist()):
            correct = protocol.gallery.labels[order[row]] == protocol.query.labels[query]
            hits = np.flatnonzero(correct)
            neighbours = [Neighbour(int(order[row, rank]), float(scores[row, rank]), bool(correct[rank]))
                          for rank in range(min(k, order.shape[1]))]
            results.append(QueryResult(query, neighbours, int(hits[0]) + 1 if len(hits) else None,
                                       float(per_query["average_precision"][query]),
                                       int(per_query["num_positives"][query])))
    return results


def ranked_gallery(queries: np.ndarray, gallery: np.ndarray, exclude: np.ndarray | None = None,
                   chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """(gallery indices, cosine similarities), best first, for each query row; ``exclude[i]`` (the query's
    own gallery index, leave-one-out) is left out of row ``i``. Only the few shown queries come here, so the
    whole gallery is sorted, in float64: exact ties fall to the lower gallery index."""
    queries = _unit_rows(queries)
    scores = np.empty((len(queries), len(gallery)), dtype=np.float64)
    for start in range(0, len(gallery), chunk):  # float64 copies of a chunk at a time, not of the gallery
        scores[:, start:start + chunk] = queries @ _unit_rows(gallery[start:start + chunk]).T
    indices = np.broadcast_to(np.arange(len(gallery)), scores.shape)
    order = np.lexsort((indices, -scores), axis=1)
    if exclude is not None:
        keep = order != np.asarray(exclude)[:, None]
        order = order[keep].reshape(len(queries), len(gallery) - 1)
    return order, np.take_along_axis(scores, order, axis=1)


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float64)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-300)


__all__ = ["EmbeddedProtocol", "Neighbour", "QueryResult", "embed_protocol", "evaluate_protocol", "sample_queries",
           "worst_queries", "query_results", "ranked_gallery"]
