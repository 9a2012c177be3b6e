"""Retrieval evaluation of image embeddings: Recall@K, MAP@R, R-precision, NMI.

Two protocols:

* leave-one-out (``embeddings``, ``labels``): every image is a query against all
  other images (CUB-200, Cars196, Stanford Online Products);
* query-gallery (``query_*``, ``gallery_*``): every query against the whole
  gallery, nothing excluded (In-shop Clothes).

Two kinds of scores, both reported:

* ``"float"``: cosine similarity (the embeddings are L2-normalised here, in
  float64);
* ``"binary"``: the sign bits of the raw embedding (bit = x > 0) under Hamming
  distance, as in Zhai & Wu's binarised results.

Conventions (also returned, in one sentence, under ``"convention"``):

* Ranking: higher similarity first; **ties are broken by gallery order** -- among
  equal scores the gallery item with the lower index ranks first. Ties are
  common with binary codes.
* Recall@K = percentage of all queries whose first correct match has 0-based rank
  < K. A query without any correct match in the gallery counts as a miss; such
  queries are counted in ``queries_without_positive``. K larger than the gallery
  is allowed.
* MAP@R (Musgrave et al., "A Metric Learning Reality Check"; the same as
  pytorch-metric-learning's ``mean_average_precision_at_r``) =
  (1/R) * sum over i <= R of P(i) * rel(i), R = number of correct matches of the
  query; R-precision = (correct in top R) / R. Both are averaged over queries
  with at least one correct match, in percent (``None`` if there is none).
* NMI = sklearn's ``normalized_mutual_info_score`` between the labels and a
  seeded ``faiss.Kmeans`` clustering (as many clusters as distinct labels) of the
  L2-normalised embeddings (float) or of the +-1 codes (binary); over the query
  set in query-gallery mode. It is a fraction in [0, 1], not a percentage. At
  Stanford Online Products scale (11,316 clusters) k-means is by far the most
  expensive part; pass ``nmi=False`` to skip it.

Exactness and speed: see :mod:`normsoftmax.evaluation.ranking` and docs/evaluator.md. In short, ranks are
*counted* blockwise, never sorted, and never through a full query-by-gallery
matrix; binary results are exact (integer arithmetic); float results are equal
to a float64 computation (low-precision tiles with a rigorous error bound, and
exact float64 re-scoring of the few candidates inside the bound). When a sample of
queries shows the similarities crowding inside that bound (an untrained network,
where nearly every pair would need re-scoring), the tiles are computed in float64
instead. Inputs on a CUDA device (or ``device="cuda"``) are evaluated there with the
same code.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..embedding.arrays import check_embeddings_arrays
from .ranking import (
    BinaryScorer,
    FloatScorer,
    LabelGroups,
    all_dense,
    cosine_from_score,
    default_block_size,
    metrics_from_ranks,
    rank_queries,
)

__all__ = ["evaluate_embeddings", "format_recall_lines", "nmi_by_default", "CONVENTION", "FLOAT_TILES"]

CONVENTION = (
    "Recall@K divides by all queries (a query without a correct match in the gallery is a miss); "
    "MAP@R and R-precision average over queries with at least one correct match; "
    "ties in similarity are broken by gallery order (lower gallery index ranks first)."
)

FLOAT_TILES = ("auto", "bf16", "tf32", "fp64")


# --------------------------------------------------------------------------- inputs


def _check_ks(ks) -> list[int]:
    try:
        out = [int(k) for k in ks]
    except TypeError as exc:
        raise ValueError(f"ks must be a sequence of positive integers, got {ks!r}") from exc
    if not out or any(k < 1 for k in out) or any(int(k) != k for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive integers, got {ks!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"ks has duplicates: {ks!r}")
    return out


# --------------------------------------------------------------------------- evaluation


def evaluate_embeddings(
    embeddings=None,
    labels=None,
    *,
    query_embeddings=None,
    query_labels=None,
    gallery_embeddings=None,
    gallery_labels=None,
    ks=(1, 2, 4, 8),
    binary=True,
    nmi=True,
    device=None,
    block_size=None,
    seed=0,
    float_tiles="auto",
    return_per_query=False,
) -> dict:
    """Evaluate embeddings for retrieval; see the module docstring for the conventions.

    Args:
        embeddings, labels: N x D floats and N integer labels, for leave-one-out
            evaluation (every image against all the others).
        query_embeddings, query_labels, gallery_embeddings, gallery_labels: for
            query-gallery evaluation instead (nothing excluded).
        ks: the K of Recall@K (positive, distinct; K may exceed the gallery size).
        binary: also evaluate the sign bits under Hamming distance.
        nmi: also compute NMI (seeded faiss k-means; slow at SOP scale).
        device: where to compute; default: the inputs' device (CPU for numpy).
        block_size: queries (and gallery items) per tile; memory grows with its
            square. Default 2048 on the CPU, 8192 on accelerators.
        seed: k-means seed.
        float_tiles: precision of the similarity tiles of the float ranking: ``"auto"`` (bf16 where the
            CPU has native bf16 matmul, TF32-grid float32 elsewhere, float64 when similarities crowd), or
            one of ``"bf16"``, ``"tf32"``, ``"fp64"`` to force a path. Every path gives the same metrics
            (the tiles only sort pairs into sure and ambiguous; ambiguous ones are re-scored exactly).
        return_per_query: also return ``"per_query"``: per score kind, numpy arrays over the queries of
            ``first_positive_rank`` (0-based, ``-1`` when there is no correct match within ``max(ks)``),
            ``average_precision`` and ``r_precision`` (fractions, AP at R) and ``num_positives`` (R).

    Inputs may be numpy arrays or torch tensors (any float dtype); bad inputs
    raise ``ValueError``. Returns ``{"float": {...}, "binary": {...}, "num_queries",
    "queries_without_positive", "mode", "ks", "convention"}``; each metrics dict has
    ``recall@K`` for every K in ``ks``, ``map@r``, ``r_precision`` (percent) and
    ``nmi`` (fraction, or ``None`` with ``nmi=False``). ``binary=False`` leaves out
    the ``"binary"`` entry. All numbers are Python floats/ints (JSON-serialisable).
    """
    ks = _check_ks(ks)
    mode, xq, yq, xg, yg = check_embeddings_arrays(embeddings, labels, query_embeddings, query_labels,
                                           gallery_embeddings, gallery_labels)
    if device is None:
        device = xq.device if xq.device.type != "cpu" else (xg.device if xg is not None else xq.device)
    device = torch.device(device)
    if block_size is None:
        block_size = default_block_size(device)
    block_size = int(block_size)
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if float_tiles not in FLOAT_TILES:
        raise ValueError(f"float_tiles must be one of {', '.join(FLOAT_TILES)}, got {float_tiles!r}")

    symmetric = mode == "leave-one-out"
    xq = xq.to(device)
    xg = None if symmetric else xg.to(device)
    groups = LabelGroups(yq, yq if symmetric else yg, exclude_self=symmetric)
    result: dict[str, Any] = {}
    per_query = {}
    for name in ["float", "binary"] if binary else ["float"]:
        scorer = _scorer(name, xq, xg, device, float_tiles, groups, max(ks), seed)
        ranks = rank_queries(scorer, groups, max(ks), symmetric=symmetric, block_size=block_size)
        del scorer
        metrics = metrics_from_ranks(ranks, ks)
        metrics["nmi"] = _nmi(xq, yq, name, seed) if nmi else None
        result[name] = metrics
        per_query[name] = {"first_positive_rank": ranks.first, "average_precision": ranks.ap,
                           "r_precision": ranks.rp, "num_positives": ranks.count}
    result.update(num_queries=int(xq.shape[0]), queries_without_positive=int((groups.count == 0).sum()), mode=mode,
                  ks=list(ks), convention=CONVENTION)
    if return_per_query:
        result["per_query"] = per_query
    return result


def _scorer(name: str, xq, xg, device, float_tiles: str, groups: LabelGroups, max_k: int, seed: int):
    if name == "binary":
        return BinaryScorer(xq, xg, device)
    scorer = FloatScorer(xq, xg, device, low_precision=None if float_tiles == "auto" else float_tiles)
    if (float_tiles == "auto" and scorer.low_precision != "fp64" and not all_dense(groups)
            and _crowded(scorer, groups, max_k, seed)):
        return FloatScorer(xq, xg, device, low_precision="fp64")
    return scorer


# Low-precision tiles leave a pair "ambiguous" (re-scored in float64 later) when its score lies within the
# tile's error bound (about 0.006 for bf16) of one of the query's positive scores. Typical trained embeddings
# leave a dozen such pairs per query; beyond this many the re-scoring would dominate time and memory.
_CROWDED_PER_QUERY = 256
_CROWDED_SHARE = 0.05
_CROWDING_BAND = 0.008


def _crowded(scorer: FloatScorer, groups: LabelGroups, max_k: int, seed: int) -> bool:
    """Estimate, from a sample of queries, whether negatives crowd within the low-precision error band of
    the positives' scores.

    An untrained network gives such embeddings (all cosines within a few hundredths), and so do large
    classes of unstructured embeddings (their positives' scores cover the whole range): evaluated with bf16
    tiles almost every negative would need exact re-scoring (measured: 25M pairs and 3.5 GB for 5,000
    images). Like the ranking itself, a positive with at least max(max_k, R) gallery items surely above it
    is not tracked, so the items near its score do not count.
    """
    with_positive = np.flatnonzero(groups.count > 0)
    if len(with_positive) == 0:
        return False
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(with_positive, size=min(64, len(with_positive)), replace=False))
    xq, xg = scorer.xq, scorer.xg
    queries = xq[torch.from_numpy(sample).to(xq.device)].to(torch.float64)
    queries = queries / queries.norm(dim=1, keepdim=True).clamp_min(1e-300)
    similar = torch.empty((len(sample), xg.shape[0]), dtype=torch.float64)
    for start in range(0, xg.shape[0], 8192):
        block = xg[start:start + 8192].to(torch.float64)
        block = block / block.norm(dim=1, keepdim=True).clamp_min(1e-300)
        similar[:, start:start + 8192] = (queries @ block.T).cpu()
    positives = []
    for row, query in enumerate(sample.tolist()):
        _, gallery = groups.pairs(query, query + 1)
        positives.append(cosine_from_score(scorer.exact_scores(torch.full((len(gallery),), query, device=xq.device),
                                                               torch.from_numpy(gallery).to(xq.device)).cpu()))
        similar[row, torch.from_numpy(gallery)] = float("-inf")  # positives are masked, never ambiguous
        if groups.exclude_self:
            similar[row, query] = float("-inf")
    similar, _ = similar.sort(dim=1)
    crowding = 0
    size = similar.shape[1]
    for row, positive_scores in enumerate(positives):
        low = torch.searchsorted(similar[row], positive_scores - _CROWDING_BAND)
        high = torch.searchsorted(similar[row], positive_scores + _CROWDING_BAND, right=True)
        tracked = (size - high) < max(max_k, len(positive_scores))
        crowding += int(((high - low) * tracked).sum())
    # Relative to the gallery too: trained SOP-like embeddings (60,502 images) put ~400 items per query in
    # this generous band, of which the ranking keeps ~13; crowded ones put a large share of the gallery there.
    return crowding / len(sample) > max(_CROWDED_PER_QUERY, _CROWDED_SHARE * size)


# k-means with one centroid per class costs far more than the ranking beyond this many classes (SOP: 11,316).
NMI_MAX_CLASSES = 1000


def nmi_by_default(num_classes: int) -> bool:
    """Whether NMI is computed when the user did not say: only up to ``NMI_MAX_CLASSES`` evaluated classes."""
    return num_classes <= NMI_MAX_CLASSES


def _nmi(x: torch.Tensor, labels: np.ndarray, kind: str, seed: int) -> float:
    import faiss
    from sklearn.metrics import normalized_mutual_info_score

    n, d = x.shape
    data = np.empty((n, d), dtype=np.float32)
    step = 8192
    for s in range(0, n, step):
        chunk = x[s : s + step]
        if kind == "float":
            c64 = chunk.to(torch.float64)
            c = (c64 / c64.norm(dim=1, keepdim=True).clamp_min(1e-300)).to(torch.float32)
        else:
            c = (chunk > 0).to(torch.float32) * 2 - 1
        data[s : s + step] = c.cpu().numpy()
    k = len(np.unique(labels))
    if k < 2:
        return float(normalized_mutual_info_score(labels, np.zeros(n, dtype=np.int64)))
    # Benchmarks have few images per class (CUB ~59, SOP ~5): every point is used, so faiss's
    # "too few training points per centroid" warning says nothing useful here.
    kmeans = faiss.Kmeans(d, k, seed=int(seed), verbose=False, min_points_per_centroid=1)
    kmeans.train(data)
    _, assign = kmeans.index.search(data, 1)
    return float(normalized_mutual_info_score(labels, assign.reshape(-1)))


def format_recall_lines(result: dict) -> dict:
    """One line per score kind, the reference code's format: ``R@1, R@2: 65.36 & 76.76``."""
    ks = result["ks"]
    head = ", ".join(f"R@{k}" for k in ks)
    lines = {}
    for name in ("float", "binary"):
        if name in result:
            vals = " & ".join(f"{result[name][f'recall@{k}']:.2f}" for k in ks)
            lines[name] = f"{head}: {vals}"
    return lines
