"""Ranking queries of large classes by sorting whole rows of scores, as a brute force would.

Where a chunk's queries have a large share of the gallery as positives, counting against thresholds gains
nothing (most of every row is a candidate): each row is scored by one matrix product, sorted once, and its
positives' ranks read off in order."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .positives import LabelGroups
from .threads import num_threads


def rank_dense(scorer, groups: LabelGroups, c0: int, c1: int, budget: int, threads: int):
    """First rank, AP@R and R-precision of queries c0..c1-1 from whole rows of scores.

    Scores come from one matrix product per block of rows (:meth:`block_scores`); identical gallery vectors
    get their first twin's score. Each row is sorted once (:func:`_positive_ranks`) and its positives'
    ranks read off in order, as a brute force would, without the brute force's second pass over the row.
    """
    device = scorer.device
    num_gallery = len(groups.gallery_label)
    members = torch.arange(num_gallery, device=device)
    step = max(1, budget // max(1, num_gallery))
    twins = getattr(scorer, "has_duplicates", False)
    representatives = twin_of = None
    if twins:
        representatives, twin_of = torch.unique(scorer.canon, return_inverse=True)
    out = []
    for r0 in range(c0, c1, step):
        r1 = min(c1, r0 + step)
        queries = torch.arange(r0, r1, device=device)
        with num_threads(threads):
            if representatives is not None:  # each distinct vector scored once, copied to its twins
                scores = scorer.block_scores(queries, representatives)[:, twin_of]
            else:
                scores = scorer.block_scores(queries, members)
            selves = np.arange(r0, r1) if groups.exclude_self else None  # each row's own gallery item
            keys, stable = _sort_keys(scores.cpu().numpy(), selves, twins)
            del scores
            positive = groups.gallery_label[None, :] == groups.query_label[r0:r1, None]
            if selves is not None:
                positive[np.arange(r1 - r0), selves] = False
            counts = groups.count[r0:r1]
            rank = _positive_ranks(keys, positive, counts, threads, stable)
            del keys, positive
        # padding holds the int64 maximum: never within R
        within = rank < counts[:, None]
        share = np.divide(np.arange(1, rank.shape[1] + 1, dtype=np.float64)[None, :], rank + 1.0,
                          out=np.zeros(rank.shape), where=within)
        r = np.maximum(counts, 1).astype(np.float64)
        out.append((np.where(counts > 0, rank[:, 0], -1), share.sum(1) / r, within.sum(1) / r))
    first, ap, rp = (np.concatenate(parts) for parts in zip(*out, strict=True))
    return first, ap, rp


def _sort_keys(scores: np.ndarray, selves: np.ndarray | None, twins: bool):
    """Ascending sort keys for rows of scores (higher score first), and whether every row needs the stable sort.

    Integer scores (binary codes: dot products in [-dim, dim]) tie often; negated into int16 where they
    fit, numpy's stable sort of them is a radix sort, linear in the row. Float scores tie only exactly
    (identical vectors, ``twins``: those rows all go to the stable sort). In leave-one-out row i's own item,
    ``selves[i]``, takes the largest key: last, never counted above a positive.
    """
    if np.issubdtype(scores.dtype, np.integer):
        bound = int(np.abs(scores).max()) if scores.size else 0
        keys = np.negative(scores).astype(np.int16 if bound < np.iinfo(np.int16).max else np.int64, copy=False)
        largest: float = np.iinfo(keys.dtype).max
        stable = True
    else:
        keys = np.negative(scores)
        largest, stable = np.inf, twins
    if selves is not None:
        keys[np.arange(len(selves)), selves] = largest
    return keys, stable


def _positive_ranks(keys: np.ndarray, positive: np.ndarray, counts: np.ndarray, threads: int,
                    stable: bool = False) -> np.ndarray:
    """Per row, the ranks of its positives in ascending order (padded with the int64 maximum): their
    positions in the row sorted by ascending key, equal keys in gallery order.

    numpy's quicksort (vectorised where the CPU allows) orders a row; only a row whose sorted keys hold an
    exact tie is sorted again with the stable sort (``stable``: every row goes to the stable sort at once).
    Rows are shared out over ``threads`` threads: numpy releases the GIL while sorting.
    """
    width = max(1, int(counts.max()) if len(counts) else 1)
    ranks = np.full((keys.shape[0], width), np.iinfo(np.int64).max, dtype=np.int64)

    def work(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            row = keys[i]
            if stable:
                order = np.argsort(row, kind="stable")
            else:
                order = np.argsort(row)
                ordered = row[order]
                if (ordered[1:] == ordered[:-1]).any():
                    order = np.argsort(row, kind="stable")
            hits = np.flatnonzero(positive[i, order])
            ranks[i, :len(hits)] = hits

    if threads <= 1 or keys.size < (1 << 20):  # small: starting threads costs more than it saves
        work(0, keys.shape[0])
    else:
        edges = np.linspace(0, keys.shape[0], threads + 1).astype(int)
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(work, edges[:-1], edges[1:]))
    return ranks
