"""Which items of a collection are duplicates of each other: every pair scoring past a threshold, grouped into
connected components.

* **Float** (cosine >= threshold): exact. Candidates come from float32 tiles of the similarity matrix (upper
  triangle only, one tile in memory) taken a little below the threshold, then every candidate is re-scored in
  float64, so float32 rounding never decides a pair. An IVF-PQ index has too many items for tiles: its candidates
  come from faiss's range search over the IVF lists (``nprobe`` of them: approximate, as its searches are) and are
  re-scored exactly with the stored vectors.
* **Binary** (Hamming distance <= threshold): exact, by *multi-index hashing*: cut the codes into m >= t + 1
  disjoint chunks of whole bytes; two codes within Hamming distance t agree exactly on at least one chunk
  (pigeonhole), so only items sharing a chunk value are compared, each pair's distance counted exactly. For a
  near-duplicate threshold this compares little more than the output -- a million 256-bit codes in seconds, where
  faiss's range search compares all N^2 / 2 pairs. Where chunks would be narrower than 2 bytes (a threshold near
  half the bits), every pair is compared instead, by faiss's range search a block of queries at a time.

Memory grows with the pairs found (and the candidates of one chunk), not with N^2.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..calibration.pairs import upper_tiles
from ..files import atomic_output, atomic_write

logger = logging.getLogger(__name__)

TILE = 4096
QUERY_BLOCK = 4096
MIN_CHUNK_BYTES = 2
CANDIDATE_BUDGET = 50_000_000  # candidate pairs from one chunk before multi-index hashing gives way to range search


@dataclass
class Duplicates:
    """The pairs past the threshold (positions into ``ids``; i < j) and the groups they make."""

    kind: str
    threshold: float  # cosine, or bit agreement for binary
    hamming: int | None  # binary: the largest Hamming distance that counts
    ids: np.ndarray
    first: np.ndarray  # positions
    second: np.ndarray
    scores: np.ndarray  # cosine, or Hamming distance for binary
    groups: list[np.ndarray] = field(default_factory=list)  # positions per group, largest group first
    method: str = ""
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------ pairs
def float_pairs_over(vectors: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair (i < j) of L2-normalised ``vectors`` with cosine >= ``threshold``, re-scored in float64."""
    x32 = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = x32.shape[1]
    margin = dim * 2.0**-23 + 1e-6  # bounds float32 rounding of a dot product of unit vectors
    firsts, seconds = [], []
    for r0, r1, c0, c1 in upper_tiles(len(x32), TILE):
        scores = x32[r0:r1] @ x32[c0:c1].T
        rows, columns = np.nonzero(scores >= threshold - margin)
        rows, columns = rows + r0, columns + c0
        keep = rows < columns
        firsts.append(rows[keep])
        seconds.append(columns[keep])
    return _rescored(vectors, np.concatenate(firsts), np.concatenate(seconds), threshold)


def _rescored(vectors: np.ndarray, first: np.ndarray, second: np.ndarray, threshold: float):
    exact = np.zeros(len(first), np.float64)
    for start in range(0, len(first), 1 << 16):
        a = np.asarray(vectors[first[start:start + (1 << 16)]], dtype=np.float64)
        b = np.asarray(vectors[second[start:start + (1 << 16)]], dtype=np.float64)
        exact[start:start + len(a)] = np.einsum("ij,ij->i", a, b) / np.maximum(
            np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-300)
    keep = exact >= threshold
    return first[keep].astype(np.int64), second[keep].astype(np.int64), exact[keep]


def hamming(codes: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    out = np.zeros(len(first), np.int64)
    for start in range(0, len(first), 1 << 16):
        difference = codes[first[start:start + (1 << 16)]] ^ codes[second[start:start + (1 << 16)]]
        out[start:start + len(difference)] = np.bitwise_count(difference).sum(axis=1)
    return out


def binary_pairs_multi_index(codes: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Every pair (i < j) of packed codes within Hamming ``radius``, by multi-index hashing; None when the chunks
    would be too narrow (or too crowded) for it to pay."""
    count, width = codes.shape
    chunk_bytes = width // (radius + 1)
    if chunk_bytes < MIN_CHUNK_BYTES or count < 2:
        return None
    chunks = width // min(chunk_bytes, 8)  # >= radius + 1; wider chunks than 8 bytes buy nothing more
    bounds = [round(i * width / chunks) for i in range(chunks + 1)]  # widths differ by at most one byte
    found = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):  # one chunk's candidates at a time
        pairs = _equal_key_pairs(_chunk_keys(codes[:, start:end]))
        if pairs is None:
            return None
        within = hamming(codes, pairs // count, pairs % count) <= radius
        found.append(pairs[within])
    merged = np.unique(np.concatenate(found))  # a pair close enough is found by up to m chunks
    first, second = merged // count, merged % count
    return first, second, hamming(codes, first, second)


def _chunk_keys(chunk: np.ndarray) -> np.ndarray:
    """One uint64 per row: the chunk's bytes as a number when they fit in 8, else their 8-byte words mixed
    together (equal rows always give equal keys; a collision only adds candidates, whose distances are checked)."""
    words = -(-chunk.shape[1] // 8)
    padded = np.zeros((len(chunk), words * 8), np.uint8)
    padded[:, :chunk.shape[1]] = chunk
    parts = padded.view(np.uint64)
    keys = parts[:, 0].copy()
    for word in range(1, words):
        keys = keys * np.uint64(0x9E3779B97F4A7C15) ^ parts[:, word]
    return keys


def _equal_key_pairs(keys: np.ndarray) -> np.ndarray | None:
    """All pairs (i < j) of rows with equal keys, as i * N + j; None past the candidate budget."""
    count = len(keys)
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    sizes = np.diff(np.r_[starts, count])
    if int((sizes * (sizes - 1) // 2).sum()) > CANDIDATE_BUDGET:
        return None
    run_end = np.repeat(starts + sizes, sizes)  # per sorted position: where its run ends
    position = np.flatnonzero(np.repeat(sizes, sizes) > 1)  # only runs of two or more pair up
    parts = []
    step = 1
    while len(position):  # pairs (p, p + step) inside a run; the positions left shrink with the runs
        position = position[position + step < run_end[position]]
        a, b = order[position], order[position + step]
        parts.append(np.minimum(a, b).astype(np.int64) * count + np.maximum(a, b))
        step += 1
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def binary_pairs_range_search(codes: np.ndarray, radius: int,
                              queries: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair (i < j) within Hamming ``radius`` by faiss's exhaustive range search, a block of queries at a time
    (the baseline, and the path for wide radii); ``queries``: only the pairs of the first that many items (i < j
    still, each query searching all items: a timing sample)."""
    import faiss

    index = faiss.IndexBinaryFlat(codes.shape[1] * 8)
    index.add(np.ascontiguousarray(codes))
    firsts, seconds, distances = [], [], []
    last = len(codes) if queries is None else min(queries, len(codes))
    for start in range(0, last, QUERY_BLOCK):
        block = np.ascontiguousarray(codes[start:min(start + QUERY_BLOCK, last)])
        limits, found_distances, found = index.range_search(block, radius + 1)  # faiss keeps distances < radius
        limits = limits.astype(np.int64)
        rows = np.repeat(np.arange(start, start + len(limits) - 1), np.diff(limits))
        keep = rows < found
        firsts.append(rows[keep])
        seconds.append(found[keep].astype(np.int64))
        distances.append(found_distances[keep].astype(np.int64))
    return np.concatenate(firsts), np.concatenate(seconds), np.concatenate(distances)


def ivf_candidates(index, vectors: np.ndarray, threshold: float, nprobe: int | None):
    """Pairs (positions) an IVF index's range search finds at cosine >= threshold - margin (approximate)."""
    import faiss

    float_index = index.float_index
    ivf = faiss.extract_index_ivf(float_index)
    ivf.nprobe = int(nprobe or index.ivf.nprobe)
    ids = index.ids()
    firsts, seconds = [], []
    margin = 0.05  # PQ distances are approximate: a wide net, then the exact vectors decide
    for start in range(0, len(vectors), QUERY_BLOCK):
        limits, _, found = float_index.range_search(np.ascontiguousarray(vectors[start:start + QUERY_BLOCK]),
                                                    threshold - margin)
        limits = limits.astype(np.int64)
        queries = np.repeat(np.arange(start, start + len(limits) - 1), np.diff(limits))
        positions = np.searchsorted(ids, found)
        keep = queries < positions
        firsts.append(queries[keep])
        seconds.append(positions[keep])
    return np.concatenate(firsts), np.concatenate(seconds)


def groups_of(count: int, first: np.ndarray, second: np.ndarray) -> list[np.ndarray]:
    """Connected components of the pairs with at least two members, largest first (then by smallest member)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not len(first):
        return []
    graph = coo_matrix((np.ones(len(first), np.int8), (first, second)), shape=(count, count))
    _, component = connected_components(graph, directed=False)
    involved = np.unique(np.concatenate([first, second]))
    labels = component[involved]
    order = np.argsort(labels, kind="stable")
    labels, members = labels[order], involved[order]
    splits = np.flatnonzero(labels[1:] != labels[:-1]) + 1
    groups = [group for group in np.split(members, splits) if len(group) > 1]
    return sorted(groups, key=lambda group: (-len(group), int(group[0])))


# ------------------------------------------------------------------------------------------ a collection
def find_duplicates(index, threshold: float | None = None, kind: str = "float", calibrated: bool = False,
                    nprobe: int | None = None, method: str = "auto") -> Duplicates:
    """Every pair of items of ``index`` scoring at least ``threshold`` (cosine, or bit agreement
    1 - Hamming / dim for ``binary``), or past the index's calibrated threshold with ``calibrated``, and the groups
    they make. ``method`` (binary): ``auto``, ``multi-index`` or ``range-search``."""
    from ..calibration.thresholds import binary_threshold_to_hamming

    started = time.perf_counter()
    if kind not in index.kinds:
        raise ValueError(f"{index.location} holds only {', '.join(index.kinds)} codes")
    if (threshold is None) == (not calibrated):
        raise ValueError("give either a threshold or --calibrated")
    if calibrated:
        decision = (index.calibration or {}).get(kind)
        if not decision:
            raise ValueError(f"{index.location} carries no {kind} calibration: run `normsoftmax calibrate` on the "
                             f"model's run and rebuild the index, or give --threshold")
        threshold = float(decision["threshold"])
    assert threshold is not None
    ids = index.ids()
    if kind == "float":
        vectors = index.vectors_of(ids)
        if getattr(index, "ivf", None):
            first, second = ivf_candidates(index, vectors, threshold, nprobe)
            first, second, scores = _rescored(vectors, first, second, threshold)
            used = "IVF range search, re-scored exactly"
        else:
            first, second, scores = float_pairs_over(vectors, threshold)
            used = "float32 tiles, re-scored in float64"
        radius = None
    else:
        codes = index.codes_of(ids)
        radius = binary_threshold_to_hamming(threshold, index.dim)
        found = binary_pairs_multi_index(codes, radius) if method in ("auto", "multi-index") else None
        if found is None:
            if method == "multi-index":
                raise ValueError(f"Hamming radius {radius} is too wide for multi-index hashing of {index.dim} bits")
            found, used = binary_pairs_range_search(codes, radius), "faiss range search"
        else:
            used = "multi-index hashing"
        first, second, scores = found
    groups = groups_of(len(ids), first, second)
    return Duplicates(kind, float(threshold), radius, ids, first, second, scores, groups, used,
                      time.perf_counter() - started)


# ------------------------------------------------------------------------------------------ writing them down
def write_duplicates(found: Duplicates, index, out: Path, html_groups: int = 200, thumbnail: int = 96) -> dict:
    """``out`` (JSON: every group, its members and pair scores), the same stem as ``.csv`` (a row per member) and
    ``.html`` (the first ``html_groups`` groups as image grids). Returns the paths and counts."""
    out = Path(out)
    position_of_pairs: dict[int, list] = {}
    group_of = {}
    for number, group in enumerate(found.groups):
        for position in group.tolist():
            group_of[position] = number
    for a, b, score in zip(found.first.tolist(), found.second.tolist(), found.scores.tolist(), strict=True):
        position_of_pairs.setdefault(group_of[a], []).append(
            [int(found.ids[a]), int(found.ids[b]), int(score) if found.kind == "binary" else round(float(score), 6)])
    groups: list[dict[str, Any]] = [{"group": number, "size": len(group),
               "members": [index.item(int(found.ids[p])) for p in group.tolist()],
               "pairs": position_of_pairs.get(number, [])} for number, group in enumerate(found.groups)]
    document: dict[str, Any] = {"index": str(index.location), "kind": found.kind, "threshold": found.threshold,
                "hamming": found.hamming, "method": found.method, "items": int(len(found.ids)),
                "pairs": int(len(found.first)), "groups_found": len(groups),
                "items_in_groups": int(sum(g["size"] for g in groups)), "seconds": round(found.seconds, 2),
                "rule": ("pairs with Hamming distance <= hamming (bit agreement >= threshold)" if found.kind == "binary"
                         else "pairs with cosine >= threshold") + ", grouped into connected components",
                "pair_score": "Hamming distance" if found.kind == "binary" else "cosine", "groups": groups}
    atomic_write(out, json.dumps(document, indent=1) + "\n")
    csv_path = out.with_suffix(".csv")
    with atomic_output(csv_path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["group", "id", "path", "label"])
        for entry in groups:
            for member in entry["members"]:
                writer.writerow([entry["group"], member["id"], member["path"], member.get("label", "")])
    html_path = out.with_suffix(".html")
    atomic_write(html_path, _page(document, groups[:html_groups], thumbnail))
    return {"json": str(out), "csv": str(csv_path), "html": str(html_path), "groups": len(groups),
            "pairs": document["pairs"], "items_in_groups": document["items_in_groups"]}


def _page(document: dict, groups: list[dict], size: int) -> str:
    from .thumbnails import render_thumbnail

    rule = (f"Hamming distance &le; {document['hamming']} (bit agreement &ge; {document['threshold']:.4f})"
            if document["kind"] == "binary" else f"cosine &ge; {document['threshold']:.4f}")
    head = (f"<h1>Duplicate groups</h1><p>{html.escape(document['index'])}: {document['items']:,} items, "
            f"{document['groups_found']:,} groups ({document['items_in_groups']:,} items, {document['pairs']:,} pairs "
            f"with {rule}; {html.escape(document['method'])}, {document['seconds']} s).")
    if not groups:
        body = "<p><strong>No duplicates at this threshold.</strong></p>"
    else:
        shown = f" The first {len(groups)} are shown; the JSON and CSV files list all." \
            if len(groups) < document["groups_found"] else ""
        body = f"{shown}</p>" + "".join(_group_html(group, size, render_thumbnail) for group in groups)
        head = head if shown else head + "</p>"
    return ("<!doctype html><html><head><meta charset='utf-8'><title>Duplicate groups</title><style>"
            "body{font-family:sans-serif;margin:1.5em}section{margin:1em 0;padding:.5em;border:1px solid #ccc}"
            "figure{display:inline-block;margin:4px;text-align:center;font-size:11px;max-width:" + str(size + 20) +
            "px;word-break:break-all}img{display:block;margin:auto}</style></head><body>" + head + body +
            "</body></html>\n")


def _group_html(group: dict, size: int, render) -> str:
    figures = []
    for member in group["members"][:24]:
        try:
            data = base64.b64encode(render(member["path"], size, 80)).decode("ascii")
            picture = f"<img alt='' src='data:image/jpeg;base64,{data}'>"
        except OSError:
            picture = "<div>(unreadable)</div>"
        label = f" &middot; {html.escape(str(member['label']))}" if "label" in member else ""
        figures.append(f"<figure>{picture}<figcaption>#{member['id']}{label}<br>"
                       f"{html.escape(Path(member['path']).name)}</figcaption></figure>")
    more = f"<p>... and {group['size'] - 24} more</p>" if group["size"] > 24 else ""
    return f"<section><h2>Group {group['group']} ({group['size']} items)</h2>{''.join(figures)}{more}</section>"


__all__ = ["find_duplicates", "write_duplicates", "Duplicates", "binary_pairs_multi_index",
           "binary_pairs_range_search", "float_pairs_over", "groups_of", "hamming"]
