"""The entry point: every query ranked, a chunk of queries at a time, each chunk by the cheaper way.

Chunks are contiguous query ranges whose padded positive table fits ``PAIR_BUDGET`` slots, so memory grows
with the positive pairs of a chunk, not with the queries times the largest class. A chunk of ordinary
classes is ranked by counting (:mod:`.counting`); a chunk whose classes hold at least 1/``DENSE_CLASS_RATIO``
of the gallery by sorting whole rows (:mod:`.dense`)."""

from __future__ import annotations

import numpy as np
import torch

from .counting import rank_chunk
from .dense import rank_dense
from .positives import LabelGroups, Positives, positive_scores
from .query_ranks import QueryRanks, per_query_ranks
from .threads import num_threads


def default_block_size(device: torch.device) -> int:
    """Rows per tile: 2048 on the CPU (bf16 tile of 8 MB), 8192 on accelerators."""
    return 2048 if device.type == "cpu" else 8192


# Padded positive slots (queries x their largest R) held at once: the evaluation's working memory grows with
# this, not with the number of queries times the largest class (about 80 bytes a slot: 0.7 GB).
PAIR_BUDGET = 1 << 23


# A chunk whose queries have on average at least 1/DENSE_CLASS_RATIO of the gallery as positives is ranked
# by sorting whole rows (as a brute force would): counting against thresholds gains nothing there.
DENSE_CLASS_RATIO = 64


def query_chunks(count: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Contiguous query ranges whose padded positive table (rows x largest R) fits ``budget`` slots."""
    chunks, start, widest = [], 0, 0
    for q, r in enumerate(count.tolist()):
        widest_with = max(widest, r, 1)
        if q > start and (q - start + 1) * widest_with > budget:
            chunks.append((start, q))
            start, widest_with = q, max(r, 1)
        widest = widest_with
    if len(count):
        chunks.append((start, len(count)))
    return chunks


def is_dense(positives_per_query: float, num_gallery: int) -> bool:
    """Whether queries with this many positives are ranked by sorting whole rows (:func:`rank_dense`)."""
    return positives_per_query * DENSE_CLASS_RATIO >= num_gallery


def all_dense(groups: LabelGroups) -> bool:
    """Whether every query's class is large enough for the whole-row ranking (tile precision then unused)."""
    return bool(len(groups.count)) and bool(is_dense(groups.count.min(), len(groups.gallery_label)))


def rank_queries(scorer, groups: LabelGroups, max_k: int, *, symmetric: bool, block_size: int,
                 budget: int | None = None) -> QueryRanks:
    """Exact first-match rank, AP@R and R-precision of every query, a chunk of queries at a time.

    Each chunk holds its queries' positives (exact scores, sorted) and counters, at most ``budget`` padded
    slots; the tiles of a chunk cover its rows against the whole gallery (in leave-one-out, tiles inside
    the chunk serve its rows and its columns, so a single chunk computes only half the similarity matrix).
    """
    device = scorer.device
    budget = budget or PAIR_BUDGET
    nq = len(groups.count)
    first = np.full(nq, -1, dtype=np.int64)
    ap = np.zeros(nq, dtype=np.float64)
    rp = np.zeros(nq, dtype=np.float64)
    threads = torch.get_num_threads()
    num_gallery = len(groups.gallery_label)
    for c0, c1 in query_chunks(groups.count, budget):
        if is_dense(groups.count[c0:c1].mean(), num_gallery):
            # Classes so large that most of each row would be candidates anyway: sort whole rows instead.
            f, ap[c0:c1], rp[c0:c1] = rank_dense(scorer, groups, c0, c1, budget, threads)
            first[c0:c1] = np.where(f < max_k, f, -1)
            continue
        local, gallery = groups.pairs(c0, c1)
        scores = positive_scores(scorer, groups, c0, c1, local, gallery)
        pos = Positives.build(local, gallery, scores, c1 - c0, device, offset=c0)
        del local, gallery, scores
        with num_threads(1 if device.type == "cpu" else threads):
            before, active = rank_chunk(scorer, pos, max_k, symmetric, block_size, threads)
        f, a, r = per_query_ranks(before, active, pos.count)
        first[c0:c1], ap[c0:c1], rp[c0:c1] = f.cpu().numpy(), a.cpu().numpy(), r.cpu().numpy()
        del pos, before, active
    return QueryRanks(groups.count.copy(), first, ap, rp)
