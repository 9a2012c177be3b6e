"""What every index backend shares: vectors as they are stored and searched, binary codes, a search's answer, and
the layout of an IVF-PQ index."""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np

SEARCH_KINDS = ("float", "binary")
# What a search's scores mean, per representation (higher is always more similar).
SCORE_NAMES = {"float": "cosine", "binary": "bit agreement (1 - Hamming distance / dim)"}

# faiss's k-means wants at least 39 training points per centroid (it warns below); PQ sub-quantizers of 8 bits
# have 256 centroids each, so IVF-PQ cannot be trained sensibly on fewer vectors than this.
POINTS_PER_CENTROID = 39
PQ_BITS = 8
MIN_IVF_VECTORS = POINTS_PER_CENTROID * 2**PQ_BITS


def normalized(vectors) -> np.ndarray:
    """A float32, C-contiguous, L2-normalised copy (inner products are then cosines; zero rows stay zero)."""
    copy = np.array(vectors, dtype=np.float32, order="C", copy=True)
    if copy.ndim != 2:
        raise ValueError(f"expected an N x D array of vectors, got shape {copy.shape}")
    faiss.normalize_L2(copy)
    return copy


def binary_codes(vectors) -> np.ndarray:
    """Sign bits (x > 0), packed 8 per byte, zero-padded to whole bytes: (N, ceil(D / 8)) uint8."""
    return np.packbits(np.asarray(vectors) > 0, axis=1)


def plus_minus_one(vectors) -> np.ndarray:
    """The sign bits as ±1 float32 vectors: their inner product is D - 2 x Hamming distance, so a vector database
    without binary fields ranks them exactly as Hamming distance does."""
    return np.where(np.asarray(vectors) > 0, 1.0, -1.0).astype(np.float32)


@dataclass
class Neighbours:
    """A search's answer: ``ids`` (n, k), -1 where fewer than k items were found, and ``scores`` (n, k), higher
    more similar (``SCORE_NAMES[kind]``); binary searches also give the Hamming distances."""

    kind: str
    ids: np.ndarray
    scores: np.ndarray
    hamming: np.ndarray | None = None


def check_k(k) -> int:
    if int(k) < 1:
        raise ValueError(f"k must be a positive number of neighbours, got {k}")
    return int(k)


def check_kind(kind: str, kinds: tuple[str, ...], where: object) -> None:
    if kind not in SEARCH_KINDS:
        raise ValueError(f"kind must be float or binary, got {kind!r}")
    if kind not in kinds:
        raise ValueError(f"{where} holds only {', '.join(kinds)} codes")


# ------------------------------------------------------------------------------------------ IVF parameters
@dataclass(frozen=True)
class IvfParameters:
    """How an IVF-PQ index is laid out: ``nlist`` coarse lists, ``nprobe`` of them searched per query,
    ``pq_m`` sub-quantizers of 8 bits (``pq_m`` bytes per vector), trained on ``train_count`` vectors."""

    nlist: int
    nprobe: int
    pq_m: int
    train_count: int


def _power_of_two(value: float) -> int:
    return 2 ** max(0, round(math.log2(max(value, 1.0))))


def _default_pq_m(dim: int) -> int:
    """dim / 16, at least 8 (or dim itself when smaller), rounded up to a divisor of dim (PQ splits dim evenly)."""
    target = min(dim, max(8, dim // 16))
    return next(m for m in range(target, dim + 1) if dim % m == 0)


def choose_ivf_parameters(count: int, dim: int, nlist: int | None = None, nprobe: int | None = None,
                          pq_m: int | None = None, train_size: int = 100_000) -> IvfParameters:
    """IVF-PQ parameters for ``count`` vectors of ``dim`` dimensions; explicit values are checked, not changed.

    Defaults: ``nlist`` the power of two nearest 4 sqrt(count), lowered until every list has
    :data:`POINTS_PER_CENTROID` training vectors; ``nprobe`` nlist / 16; ``pq_m`` dim / 16 (at least 8).
    """
    if count < MIN_IVF_VECTORS:
        raise ValueError(
            f"IVF-PQ needs at least {MIN_IVF_VECTORS:,} vectors to train ({POINTS_PER_CENTROID} per centroid for the "
            f"{2**PQ_BITS} codes of each PQ sub-quantizer), and there are {count:,}; use --kind flat: exact search "
            f"that stays fast up to a few million vectors")
    train_count = min(count, max(train_size, MIN_IVF_VECTORS))
    if nlist is None:
        nlist = _power_of_two(4 * math.sqrt(count))
        while nlist > 1 and nlist * POINTS_PER_CENTROID > train_count:
            nlist //= 2
    elif nlist < 1 or nlist * POINTS_PER_CENTROID > train_count:
        raise ValueError(f"nlist {nlist} needs {max(1, nlist) * POINTS_PER_CENTROID:,} training vectors "
                         f"({POINTS_PER_CENTROID} per list) and {train_count:,} are used; lower --nlist"
                         + (" or raise --train_size" if train_count < count else ""))
    if nprobe is None:
        nprobe = max(1, nlist // 16)
    elif not 1 <= nprobe <= nlist:
        raise ValueError(f"nprobe must be between 1 and nlist ({nlist}), got {nprobe}")
    if pq_m is None:
        pq_m = _default_pq_m(dim)
    elif pq_m < 1 or dim % pq_m:
        raise ValueError(f"pq_m must divide the embedding dimension {dim}, got {pq_m}")
    return IvfParameters(nlist=int(nlist), nprobe=int(nprobe), pq_m=int(pq_m), train_count=int(train_count))


__all__ = ["SEARCH_KINDS", "SCORE_NAMES", "MIN_IVF_VECTORS", "Neighbours", "IvfParameters", "choose_ivf_parameters",
           "normalized", "binary_codes", "plus_minus_one", "check_k", "check_kind"]
