"""The correct matches ("positives") of each query, and their exact scores.

:class:`LabelGroups` lists any query's positives from the labels without a query-by-gallery table;
:class:`Positives` holds a chunk of queries' positives best-ranked first, padded to the chunk's largest R;
:func:`positive_scores` scores them exactly, large classes by one matrix product each."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


class LabelGroups:
    """The gallery grouped by label, to list any query's positives without a query-by-gallery table.

    ``count[q]`` is the number of positives of query q (its own image excluded in leave-one-out).
    """

    def __init__(self, query_labels: np.ndarray, gallery_labels: np.ndarray, exclude_self: bool):
        query_labels = np.asarray(query_labels)
        uniq, g_ids = np.unique(np.asarray(gallery_labels), return_inverse=True)
        g_ids = g_ids.reshape(-1)
        self.exclude_self = exclude_self
        self.order = np.argsort(g_ids, kind="stable")  # gallery indices grouped by label, ascending within
        sizes = np.bincount(g_ids, minlength=len(uniq)).astype(np.int64)
        starts = np.cumsum(sizes) - sizes
        if len(uniq):
            slot = np.clip(np.searchsorted(uniq, query_labels), 0, len(uniq) - 1)
            found = uniq[slot] == query_labels
        else:
            slot = np.zeros(len(query_labels), dtype=np.int64)
            found = np.zeros(len(query_labels), dtype=bool)
        self.gallery_label = g_ids.astype(np.int64)  # label ids shared by queries and gallery; -1: unknown
        self.query_label = np.where(found, slot, -1).astype(np.int64)
        self.size = np.where(found, sizes[slot] if len(uniq) else 0, 0).astype(np.int64)
        self.start = np.where(found, starts[slot] if len(uniq) else 0, 0).astype(np.int64)
        self.count = self.size - (1 if exclude_self else 0) * (self.size > 0)

    def pairs(self, q0: int, q1: int) -> tuple[np.ndarray, np.ndarray]:
        """Positive pairs of queries ``q0..q1-1``: (local query index, gallery index), grouped by query,
        gallery indices ascending within a query."""
        size = self.size[q0:q1]
        local = np.repeat(np.arange(q1 - q0, dtype=np.int64), size)
        offset = np.arange(int(size.sum()), dtype=np.int64) - np.repeat(np.cumsum(size) - size, size)
        gallery = self.order[np.repeat(self.start[q0:q1], size) + offset].astype(np.int64)
        if self.exclude_self:
            keep = gallery != local + q0
            local, gallery = local[keep], gallery[keep]
        return local, gallery


def build_positive_pairs(query_labels: np.ndarray, gallery_labels: np.ndarray, exclude_self: bool):
    """All (query, gallery) pairs with equal labels, as two int64 arrays, grouped by query (ascending)
    and, within a query, by gallery index (ascending)."""
    groups = LabelGroups(query_labels, gallery_labels, exclude_self)
    return groups.pairs(0, len(np.asarray(query_labels)))


@dataclass
class Positives:
    """Positives of a range of queries, best-ranked first, padded to ``max_r`` columns.

    ``count[q]`` = R of local query q; ``index[q, m]`` / ``score[q, m]`` = gallery index
    and exact score (the scorer's ``exact_scores``) of its m-th ranked positive
    (``-1`` / minimum value as padding); ``offset`` is the first query's global index.
    """

    count: torch.Tensor  # (nq,) int64
    index: torch.Tensor  # (nq, max_r) int64
    score: torch.Tensor  # (nq, max_r) float64 or int64
    pair_query: torch.Tensor  # (P,) int64, every positive pair, local query index
    pair_gallery: torch.Tensor  # (P,) int64
    offset: int = 0

    @property
    def max_r(self) -> int:
        return int(self.index.shape[1])

    @classmethod
    def build(cls, pair_query, pair_gallery, score, num_queries: int, device, offset: int = 0) -> Positives:
        """From pairs grouped by query with gallery indices ascending (as :class:`LabelGroups` lists them)."""
        pq = torch.as_tensor(np.asarray(pair_query, dtype=np.int64), device=device)
        pg = torch.as_tensor(np.asarray(pair_gallery, dtype=np.int64), device=device)
        sc = torch.as_tensor(score, device=device)
        counts = torch.bincount(pq, minlength=num_queries).to(torch.int64)
        max_r = int(counts.max()) if num_queries and len(pq) else 0
        ptr = torch.cumsum(counts, 0) - counts
        slot = torch.arange(len(pq), dtype=torch.int64, device=device) - ptr[pq]
        index = torch.full((num_queries, max_r), -1, dtype=torch.int64, device=device)
        index[pq, slot] = pg
        pad = float("-inf") if sc.dtype.is_floating_point else torch.iinfo(torch.int64).min
        table = torch.full((num_queries, max_r), pad,
                           dtype=torch.float64 if sc.dtype.is_floating_point else torch.int64,
                           device=device)
        table[pq, slot] = sc.to(table.dtype)
        # rank order within a row: score descending; a stable sort keeps equal scores in gallery order
        table, order = torch.sort(table, dim=1, descending=True, stable=True)
        index = index.gather(1, order)
        return cls(counts, index, table, pq, pg, offset)


# Classes at least this large have their positives scored as one matrix product per class.
_BLOCK_CLASS = 64


def positive_scores(scorer, groups: LabelGroups, c0: int, c1: int, local: np.ndarray, gallery: np.ndarray):
    """Exact scores of the chunk's positive pairs (in the pairs' order): large classes by matrix products,
    the rest pair by pair."""
    device = scorer.device
    local_t, gallery_t = torch.from_numpy(local).to(device), torch.from_numpy(gallery).to(device)
    count = groups.count[c0:c1]
    big = groups.size[c0:c1] >= _BLOCK_CLASS
    if not big.any():
        scores = scorer.exact_scores(local_t + c0, gallery_t)
    else:
        ptr = np.cumsum(count) - count
        small_pairs = torch.from_numpy(~np.repeat(big, count)).to(device)
        scores = torch.empty(len(local), dtype=torch.float64 if scorer.kind == "float" else torch.int64, device=device)
        if bool(small_pairs.any()):
            scores[small_pairs] = scorer.exact_scores(local_t[small_pairs] + c0, gallery_t[small_pairs])
        big_queries = np.flatnonzero(big)
        for start in np.unique(groups.start[c0:c1][big_queries]):
            queries = big_queries[groups.start[c0:c1][big_queries] == start]
            members = groups.order[start:start + groups.size[c0 + queries[0]]]
            block = scorer.block_scores(torch.from_numpy(queries + c0).to(device), torch.from_numpy(members).to(device))
            if groups.exclude_self:  # drop each query's own column, keeping the others in gallery order
                keep = torch.ones(block.shape, dtype=torch.bool, device=device)
                keep[torch.arange(len(queries), device=device),
                     torch.from_numpy(np.searchsorted(members, queries + c0)).to(device)] = False
                block = block[keep].view(len(queries), -1)
            slots = torch.from_numpy(ptr[queries]).to(device)[:, None] + torch.arange(block.shape[1], device=device)
            scores[slots.reshape(-1)] = block.reshape(-1)
    scorer.equalize_duplicates(local_t, gallery_t, scores)
    return scores
