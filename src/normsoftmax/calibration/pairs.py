"""Every pair of a labelled set of embeddings, counted exactly by score: same-class pairs ("genuine") and
different-class pairs ("impostor"), for cosine similarity and for the Hamming distance of the sign bits.

No pair is sampled. Genuine pairs are few (the sum over classes of n(n-1)/2) and are kept, sorted. Impostor pairs
are far too many to keep (SOP's test split: 1.8 billion), so they are *counted* into the bins that a set of
edges makes -- the genuine scores themselves, plus any threshold whose rates are wanted -- which is all a rate at
one of those edges needs. Scores come from tiles of the similarity matrix over the upper triangle only, so memory
holds one tile and the genuine scores, whatever the size. The cosine of a pair is computed as the evaluator's exact
score is (docs/evaluator.md): the float64 dot product d and squared norms of the vectors as given, then
sign(d) * sqrt(d^2 / (|q|^2 |g|^2)) -- no normalised copies whose rounding would differ between the two paths that
score a pair, and each step correctly rounded, so where the sums are exact (integer-valued embeddings) equal
cosines are equal bit for bit, whichever tile scored them. Hamming distances are exact integer products of ±1
codes.

A pair *matches* a threshold when its cosine is at least the threshold, or its Hamming distance at most the
threshold: ties at the threshold match.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TILE = 2048


@dataclass
class FloatPairs:
    """Cosine scores: the sorted genuine scores and, for the sorted ``edges``, ``impostor_at_least[i]`` = number
    of impostor pairs scoring at least ``edges[i]``."""

    genuine: np.ndarray  # float64, ascending
    edges: np.ndarray  # float64, ascending, distinct
    impostor_at_least: np.ndarray  # int64, per edge
    impostors: int  # all impostor pairs

    def genuine_at_least(self, threshold: float) -> int:
        return int(len(self.genuine) - np.searchsorted(self.genuine, threshold, side="left"))

    def impostors_at_least(self, threshold: float) -> int:
        position = int(np.searchsorted(self.edges, threshold))
        if position == len(self.edges) or self.edges[position] != threshold:
            raise ValueError(f"{threshold!r} is not one of the edges counted")
        return int(self.impostor_at_least[position])


@dataclass
class HammingPairs:
    """Hamming distances of the sign bits: ``genuine[h]`` and ``impostor[h]`` pairs at distance h, h = 0..dim."""

    genuine: np.ndarray  # int64, dim + 1
    impostor: np.ndarray  # int64, dim + 1
    dim: int


def upper_tiles(count: int, tile: int | None = None):
    """(r0, r1, c0, c1) of the tiles of a count x count matrix on or above its diagonal (``tile``: TILE, read at
    call time)."""
    tile = tile or TILE
    for start in range(0, count, tile):
        for other in range(start, count, tile):
            yield start, min(count, start + tile), other, min(count, other + tile)


def _upper(rows: tuple[int, int], columns: tuple[int, int]) -> np.ndarray:
    """Pairs (i, j) of a tile with i < j (global indices)."""
    i = np.arange(*rows)[:, None]
    j = np.arange(*columns)[None, :]
    return i < j


def cosines(dots: np.ndarray, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Cosines from float64 dot products and squared norms: sign(d) sqrt(d^2 / (|q|^2 |g|^2)), 0 for zero vectors."""
    denominator = rows[:, None] * columns[None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.sign(dots) * np.sqrt(dots * dots / denominator)
    return np.where(denominator > 0, values, 0.0)


def float_pairs(embeddings, labels, extra_edges=()) -> FloatPairs:
    """Cosine scores of every pair of ``embeddings``: genuine sorted, impostors counted at the genuine scores
    and at ``extra_edges``."""
    x = np.asarray(embeddings, dtype=np.float64)
    squared = np.einsum("ij,ij->i", x, x)
    labels = np.asarray(labels)
    genuine = np.sort(_genuine_cosines(x, squared, labels))
    edges = np.unique(np.concatenate([genuine, np.asarray(extra_edges, dtype=np.float64)]))
    bins = np.zeros(len(edges) + 1, dtype=np.int64)  # bins[b]: impostors with b edges at or below their score
    impostors = 0
    for r0, r1, c0, c1 in upper_tiles(len(x)):
        scores = cosines(x[r0:r1] @ x[c0:c1].T, squared[r0:r1], squared[c0:c1])
        mask = (labels[r0:r1, None] != labels[None, c0:c1]) & _upper((r0, r1), (c0, c1))
        values = scores[mask]
        impostors += len(values)
        bins += np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(bins))
    # a score s is at least edges[i] exactly when more than i edges are at or below s
    at_least = np.cumsum(bins[::-1])[::-1][1:]
    return FloatPairs(genuine, edges, at_least.astype(np.int64), int(impostors))


def _genuine_cosines(x: np.ndarray, squared: np.ndarray, labels: np.ndarray) -> np.ndarray:
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    ends = np.r_[starts[1:], len(order)]
    parts = []
    for start, end in zip(starts, ends, strict=True):
        members = order[start:end]
        for m0, m1, n0, n1 in upper_tiles(len(members)):  # one class of any size, a tile at a time
            first, second = members[m0:m1], members[n0:n1]
            block = cosines(x[first] @ x[second].T, squared[first], squared[second])
            parts.append(block[_upper((m0, m1), (n0, n1))])
    return np.concatenate(parts) if parts else np.zeros(0, np.float64)


def hamming_pairs(embeddings, labels) -> HammingPairs:
    """Hamming distances between the sign bits of every pair, counted per distance, genuine and impostor."""
    codes = np.where(np.asarray(embeddings) > 0, 1.0, -1.0).astype(np.float32)  # ±1: exact products below 2**24
    dim = codes.shape[1]
    labels = np.asarray(labels)
    genuine = np.zeros(dim + 1, dtype=np.int64)
    impostor = np.zeros(dim + 1, dtype=np.int64)
    for r0, r1, c0, c1 in upper_tiles(len(codes)):
        agreement = codes[r0:r1] @ codes[c0:c1].T  # dim - 2 x Hamming
        distance = np.rint((dim - agreement) / 2).astype(np.int64)
        upper = _upper((r0, r1), (c0, c1))
        same = labels[r0:r1, None] == labels[None, c0:c1]
        genuine += np.bincount(distance[upper & same], minlength=dim + 1)
        impostor += np.bincount(distance[upper & ~same], minlength=dim + 1)
    return HammingPairs(genuine, impostor, dim)


__all__ = ["FloatPairs", "HammingPairs", "float_pairs", "hamming_pairs", "cosines", "upper_tiles", "TILE"]
