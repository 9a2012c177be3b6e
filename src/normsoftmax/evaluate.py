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

Exactness and speed: see :mod:`normsoftmax.retrieval`. In short, ranks are
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

import os
from typing import Any

import numpy as np
import torch

from normsoftmax.retrieval import (
    BinaryScorer,
    FloatScorer,
    Positives,
    build_positive_pairs,
    cosine_from_score,
    default_block_size,
    metrics_from_ranks,
    rank_positives,
)

__all__ = ["evaluate_embeddings", "load_embeddings_npz", "save_embeddings_npz", "format_recall_lines", "CONVENTION"]

CONVENTION = (
    "Recall@K divides by all queries (a query without a correct match in the gallery is a miss); "
    "MAP@R and R-precision average over queries with at least one correct match; "
    "ties in similarity are broken by gallery order (lower gallery index ranks first)."
)

FLOAT_TILES = ("auto", "bf16", "tf32", "fp64")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------- inputs


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    arr = np.asarray(x)
    if arr.dtype == object:
        raise ValueError(f"{name} must be a numeric array, got dtype object")
    if not arr.flags.c_contiguous or not arr.flags.writeable:
        arr = np.array(arr, copy=True, order="C")
    try:
        return torch.from_numpy(arr)
    except TypeError as exc:
        raise ValueError(f"{name}: unsupported dtype {arr.dtype}") from exc


def _check_embeddings(x: Any, name: str) -> torch.Tensor:
    t = _as_tensor(x, name)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N x D), got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating-point array, got {t.dtype}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    lo, hi = torch.aminmax(t)  # NaN propagates; one pass, no temporary
    if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
        raise ValueError(f"{name} contains NaN or infinite values")
    return t


def _check_labels(y: Any, name: str, n: int) -> np.ndarray:
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integers, got dtype {arr.dtype}")
    if len(arr) != n:
        raise ValueError(f"{name} has {len(arr)} entries but there are {n} embeddings")
    return arr.astype(np.int64, copy=False)


def _resolve_inputs(embeddings, labels, query_embeddings, query_labels, gallery_embeddings, gallery_labels):
    loo = (embeddings, labels)
    qg = (query_embeddings, query_labels, gallery_embeddings, gallery_labels)
    has_loo = any(v is not None for v in loo)
    has_qg = any(v is not None for v in qg)
    if has_loo and has_qg:
        raise ValueError("give either embeddings+labels (leave-one-out) or the four query_*/gallery_* arrays, not both")
    if has_loo:
        if embeddings is None or labels is None:
            raise ValueError("leave-one-out evaluation needs both embeddings and labels")
        x = _check_embeddings(embeddings, "embeddings")
        y = _check_labels(labels, "labels", x.shape[0])
        return "leave-one-out", x, y, None, None
    if has_qg:
        missing = [n for n, v in zip(("query_embeddings", "query_labels", "gallery_embeddings", "gallery_labels"), qg) if v is None]
        if missing:
            raise ValueError(f"query-gallery evaluation needs all four arrays; missing: {', '.join(missing)}")
        xq = _check_embeddings(query_embeddings, "query_embeddings")
        yq = _check_labels(query_labels, "query_labels", xq.shape[0])
        xg = _check_embeddings(gallery_embeddings, "gallery_embeddings")
        yg = _check_labels(gallery_labels, "gallery_labels", xg.shape[0])
        if xq.shape[1] != xg.shape[1]:
            raise ValueError(f"query and gallery embeddings differ in dimension: {xq.shape[1]} vs {xg.shape[1]}")
        return "query-gallery", xq, yq, xg, yg
    raise ValueError("no embeddings given: pass embeddings+labels or query_*/gallery_* arrays")


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

    Inputs may be numpy arrays or torch tensors (any float dtype); bad inputs
    raise ``ValueError``. Returns ``{"float": {...}, "binary": {...}, "num_queries",
    "queries_without_positive", "mode", "ks", "convention"}``; each metrics dict has
    ``recall@K`` for every K in ``ks``, ``map@r``, ``r_precision`` (percent) and
    ``nmi`` (fraction, or ``None`` with ``nmi=False``). ``binary=False`` leaves out
    the ``"binary"`` entry. All numbers are Python floats/ints (JSON-serialisable).
    """
    ks = _check_ks(ks)
    mode, xq, yq, xg, yg = _resolve_inputs(embeddings, labels, query_embeddings, query_labels,
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
    y_gallery = yq if symmetric else yg
    pq, pg = build_positive_pairs(yq, y_gallery, exclude_self=symmetric)
    nq = int(xq.shape[0])
    count = np.bincount(pq, minlength=nq)
    result: dict[str, Any] = {}

    kinds = ["float", "binary"] if binary else ["float"]
    pq_t = torch.from_numpy(pq).to(device)
    pg_t = torch.from_numpy(pg).to(device)
    for name in kinds:
        if name == "float":
            scorer = FloatScorer(xq, xg, device, low_precision=None if float_tiles == "auto" else float_tiles)
        else:
            scorer = BinaryScorer(xq, xg, device)
        scores = scorer.exact_scores(pq_t, pg_t).cpu().numpy()
        if (name == "float" and float_tiles == "auto" and scorer.low_precision != "fp64"
                and _crowded(xq, xg, pq, scores, max(ks), seed)):
            scorer = FloatScorer(xq, xg, device, low_precision="fp64")
        pos = Positives.build(pq, pg, scores, nq, device)
        before, active = rank_positives(scorer, pos, max(ks), symmetric=symmetric, block_size=block_size)
        metrics = metrics_from_ranks(before, active, pos.count, ks)
        del scorer, before, active, pos
        metrics["nmi"] = _nmi(xq, yq, name, seed) if nmi else None
        result[name] = metrics

    return {
        **result,
        "num_queries": nq,
        "queries_without_positive": int((count == 0).sum()),
        "mode": mode,
        "ks": list(ks),
        "convention": CONVENTION,
    }


# Low-precision tiles leave a pair "ambiguous" (re-scored in float64 later) when its score lies within the
# tile's error bound (about 0.006 for bf16) of one of the query's positive scores. Typical trained embeddings
# leave a dozen such pairs per query; beyond this many the re-scoring would dominate time and memory.
_CROWDED_PER_QUERY = 256
_CROWDED_SHARE = 0.05
_CROWDING_BAND = 0.008


def _crowded(xq: torch.Tensor, xg: torch.Tensor | None, pq: np.ndarray, scores: np.ndarray, max_k: int,
             seed: int) -> bool:
    """Estimate, from a sample of queries, whether similarities crowd within the low-precision error band.

    An untrained network gives such embeddings (all cosines within a few hundredths): evaluated with bf16
    tiles almost every pair would need exact re-scoring (measured: 25M pairs and 3.5 GB for 5,000 images).
    Like the ranking itself, a positive with at least max(max_k, R) gallery items surely above it is not
    tracked, so the items near its score do not count.
    """
    with_positive = np.unique(pq)
    if len(with_positive) == 0:
        return False
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(with_positive, size=min(64, len(with_positive)), replace=False))
    gallery = xq if xg is None else xg
    queries = xq[torch.from_numpy(sample).to(xq.device)].to(torch.float64)
    queries = queries / queries.norm(dim=1, keepdim=True).clamp_min(1e-300)
    similar = torch.empty((len(sample), gallery.shape[0]), dtype=torch.float64)
    for start in range(0, gallery.shape[0], 8192):
        block = gallery[start:start + 8192].to(torch.float64)
        block = block / block.norm(dim=1, keepdim=True).clamp_min(1e-300)
        similar[:, start:start + 8192] = (queries @ block.T).cpu()
    similar, _ = similar.sort(dim=1)
    crowding = 0
    size = similar.shape[1]
    for row, query in enumerate(sample):
        positive_scores = cosine_from_score(torch.from_numpy(scores[pq == query]))
        low = torch.searchsorted(similar[row], positive_scores - _CROWDING_BAND)
        high = torch.searchsorted(similar[row], positive_scores + _CROWDING_BAND, right=True)
        tracked = (size - high) < max(max_k, len(positive_scores))
        crowding += int(((high - low) * tracked).sum())
    # Relative to the gallery too: trained SOP-like embeddings (60,502 images) put ~400 items per query in
    # this generous band, of which the ranking keeps ~13; crowded ones put a large share of the gallery there.
    return crowding / len(sample) > max(_CROWDED_PER_QUERY, _CROWDED_SHARE * size)


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


# --------------------------------------------------------------------------- npz files

_LOO_KEYS = ("embeddings", "labels")
_QG_KEYS = ("query_embeddings", "query_labels", "gallery_embeddings", "gallery_labels")


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            x = x.to(torch.float32)
        return x.numpy()
    return np.asarray(x)


def save_embeddings_npz(path, *, embeddings=None, labels=None, query_embeddings=None, query_labels=None,
                        gallery_embeddings=None, gallery_labels=None, paths=None, query_paths=None,
                        gallery_paths=None) -> None:
    """Write embeddings (leave-one-out or query-gallery) and optional image paths to ``path``."""
    mode, xq, yq, xg, yg = _resolve_inputs(embeddings, labels, query_embeddings, query_labels,
                                           gallery_embeddings, gallery_labels)
    arrays: dict[str, np.ndarray] = {}
    if mode == "leave-one-out":
        if query_paths is not None or gallery_paths is not None:
            raise ValueError("query_paths/gallery_paths belong to query-gallery files; use paths")
        arrays["embeddings"], arrays["labels"] = _to_numpy(xq), yq
        named = {"paths": (paths, len(yq))}
    else:
        if paths is not None:
            raise ValueError("paths belongs to leave-one-out files; use query_paths and gallery_paths")
        arrays.update(query_embeddings=_to_numpy(xq), query_labels=yq,
                      gallery_embeddings=_to_numpy(xg), gallery_labels=yg)
        named = {"query_paths": (query_paths, len(yq)), "gallery_paths": (gallery_paths, len(yg))}
    for key, (value, n) in named.items():
        if value is not None:
            value = np.asarray([str(p) for p in value], dtype=str)
            if len(value) != n:
                raise ValueError(f"{key} has {len(value)} entries but there are {n} embeddings")
            arrays[key] = value
    with open(os.fspath(path), "wb") as fh:
        np.savez(fh, **arrays)


def load_embeddings_npz(path) -> dict:
    """Read a file written by :func:`save_embeddings_npz`.

    Returns the keyword arguments for :func:`evaluate_embeddings` (``embeddings`` and
    ``labels``, or the four ``query_*``/``gallery_*`` arrays), plus ``"paths"`` when the
    file has image paths: a list of str (leave-one-out) or ``{"query": [...],
    "gallery": [...]}`` (query-gallery). Missing or inconsistent contents raise a
    ``ValueError`` naming the file.
    """
    name = os.fspath(path)
    try:
        with np.load(name, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise
    except (ValueError, OSError) as exc:
        raise ValueError(f"{name}: not a readable .npz file ({exc})") from exc
    has_loo = any(k in arrays for k in _LOO_KEYS)
    has_qg = any(k in arrays for k in _QG_KEYS)
    if has_loo and has_qg:
        raise ValueError(f"{name}: has both leave-one-out keys {_LOO_KEYS} and query-gallery keys {_QG_KEYS}")
    if not has_loo and not has_qg:
        raise ValueError(f"{name}: no embeddings; expected keys {_LOO_KEYS} or {_QG_KEYS}, found {sorted(arrays)}")
    keys = _LOO_KEYS if has_loo else _QG_KEYS
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise ValueError(f"{name}: missing key(s) {', '.join(missing)}")
    out: dict[str, Any] = {k: arrays[k] for k in keys}
    try:
        _resolve_inputs(**{k: out.get(k) for k in _LOO_KEYS + _QG_KEYS})
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from exc
    path_keys = ("paths",) if has_loo else ("query_paths", "gallery_paths")
    stray = [k for k in ("paths", "query_paths", "gallery_paths") if k in arrays and k not in path_keys]
    if stray:
        raise ValueError(f"{name}: key(s) {', '.join(stray)} do not belong to a {'leave-one-out' if has_loo else 'query-gallery'} file")
    lengths = {"paths": len(out.get("labels", ())), "query_paths": len(out.get("query_labels", ())),
               "gallery_paths": len(out.get("gallery_labels", ()))}
    found = {}
    for k in path_keys:
        if k in arrays:
            if arrays[k].ndim != 1 or len(arrays[k]) != lengths[k]:
                raise ValueError(f"{name}: {k} has {len(arrays[k])} entries but there are {lengths[k]} embeddings")
            found[k] = [str(p) for p in arrays[k]]
    if has_loo and "paths" in found:
        out["paths"] = found["paths"]
    elif has_qg and found:
        out["paths"] = {"query": found.get("query_paths"), "gallery": found.get("gallery_paths")}
    return out
